"""Seeded byte-level mutations of DICOM/NIfTI files (helpers for ``test_fuzz.py``).

Every case is a pure function of ``(seed file name, case index, base seed)``, so a failing
case can be re-made from the ids in the assertion message. Mutators:

* ``truncate``: cut the file at a random offset (biased towards the last quarter, where
  pixel data lives).
* ``bitflip``: flip 1-8 random bits.
* ``byteset``: set 1-16 random bytes to 0x00, 0xFF, 0x7F, 0x80 or a random value.
* ``length``: find DICOM element headers (PixelData, Rows, Columns, NumberOfFrames,
  BitsAllocated, item tags; both byte orders) and overwrite their length field, or for
  Rows/Columns/NumberOfFrames/BitsAllocated their value, with hostile numbers (0, 1,
  0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, the file size, random).
* ``duplicate``: copy a random chunk (up to 4 KiB) and insert it at a random offset.

A case applies one to three mutators in a row.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable

MUTATORS = ("truncate", "bitflip", "byteset", "length", "duplicate")

# (group, element) of the elements whose length/value fields are worth attacking
_TAGS = (
    (0x7FE0, 0x0010),  # PixelData
    (0x0028, 0x0010),  # Rows
    (0x0028, 0x0011),  # Columns
    (0x0028, 0x0008),  # NumberOfFrames
    (0x0028, 0x0100),  # BitsAllocated
    (0x0028, 0x0002),  # SamplesPerPixel
    (0xFFFE, 0xE000),  # Item
    (0x0008, 0x0016),  # SOPClassUID
    (0x0002, 0x0010),  # TransferSyntaxUID
)
_VALUE_TAGS = {(0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0008), (0x0028, 0x0100)}
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UT", b"UN", b"UC", b"UR"}
_HOSTILE = (0, 1, 2, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFFE)


def case_rng(name: str, index: int, base_seed: int) -> random.Random:
    """The random generator of one case (stable across runs and Python versions)."""
    return random.Random(zlib.crc32(f"{name}\x00{index}\x00{base_seed}".encode()))


def _truncate(data: bytearray, rng: random.Random) -> bytearray:
    if len(data) < 2:
        return data
    cut = (
        rng.randrange(len(data) * 3 // 4, len(data))
        if rng.random() < 0.6
        else rng.randrange(1, len(data))
    )
    return data[:cut]


def _bitflip(data: bytearray, rng: random.Random) -> bytearray:
    for _ in range(rng.randint(1, 8)):
        if data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    return data


def _byteset(data: bytearray, rng: random.Random) -> bytearray:
    for _ in range(rng.randint(1, 16)):
        if data:
            data[rng.randrange(len(data))] = rng.choice(
                (0x00, 0xFF, 0x7F, 0x80, rng.randrange(256))
            )
    return data


def element_offsets(data: bytes | bytearray) -> list[tuple[int, tuple[int, int], bool]]:
    """Offsets of the interesting tags in ``data``: (offset, tag, little endian)."""
    found = []
    for tag in _TAGS:
        for little in (True, False):
            pat = struct.pack("<HH" if little else ">HH", *tag)
            start = data.find(pat)
            while start != -1:
                found.append((start, tag, little))
                start = data.find(pat, start + 1)
    return found


def _length(data: bytearray, rng: random.Random) -> bytearray:
    found = element_offsets(data)
    if not found:
        return _byteset(data, rng)
    off, tag, little = rng.choice(found)
    e = "<" if little else ">"
    vr = bytes(data[off + 4 : off + 6])
    hostile = rng.choice((*_HOSTILE, len(data), rng.randrange(1 << 32)))
    if vr.isalpha() and vr.isupper():  # explicit VR
        if vr in _LONG_VRS:
            pos, fmt = off + 8, e + "I"
        else:
            pos, fmt = off + 6, e + "H"
    else:  # implicit VR (and items): 4-byte length
        pos, fmt = off + 4, e + "I"
    size = struct.calcsize(fmt)
    if tag in _VALUE_TAGS and rng.random() < 0.5 and fmt.endswith("H"):
        # attack the value (Rows=65535, NumberOfFrames huge, ...) instead of the length
        pos += 2
        if tag == (0x0028, 0x0008):  # IS: text
            text = rng.choice((b"99999999", b"-1  ", b"0 ", b"1e9 ", b"NaN "))
            data[pos : pos + len(text)] = text
            return data
        fmt = e + "H"
    if pos + size > len(data):
        return data
    mask = (1 << (8 * size)) - 1
    data[pos : pos + size] = struct.pack(fmt, hostile & mask)
    return data


def _duplicate(data: bytearray, rng: random.Random) -> bytearray:
    if len(data) < 4:
        return data
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.randint(1, 4096))
    c = rng.randrange(len(data))
    return data[:c] + data[a:b] + data[c:]


_FUNCS: dict[str, Callable[[bytearray, random.Random], bytearray]] = {
    "truncate": _truncate,
    "bitflip": _bitflip,
    "byteset": _byteset,
    "length": _length,
    "duplicate": _duplicate,
}


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, tuple[str, ...]]:
    """Apply one to three mutators; returns the new bytes and the mutators' names."""
    out = bytearray(data)
    names = tuple(rng.choice(MUTATORS) for _ in range(rng.choice((1, 1, 2, 3))))
    for name in names:
        out = _FUNCS[name](out, rng)
    return bytes(out), names
