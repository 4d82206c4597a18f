"""A lean DICOM header walker for the common case; anything unusual is left to pydicom.

``pydicom.dcmread(stop_before_pixels=True)`` builds a ``RawDataElement`` and a dataset entry
for every element of a file, while the header scan needs about thirty plain values. This
module walks the element stream itself (tag, VR, length; values of the wanted tags only) and
hands back exactly what :func:`medres.ingest.dicom.fields.extract` would have produced from
pydicom's dataset, or ``None`` whenever the file is not the well-formed common case, so that
the caller falls back to pydicom, which then also classifies the damage. Declined cases:

- no ``DICM`` preamble, a file meta group that is not explicit VR little endian;
- big-endian, deflated or missing transfer syntax; an implicit-VR dataset whose first
  element looks explicit (the kind of mislabelled file pydicom detects);
- an unknown VR, tags out of order or repeated, a group 0002 element after the meta group,
  an element or sequence that runs past the end of the file, undefined lengths other than
  sequences (and ``UN`` read as one), items that are not items;
- a wanted value pydicom would have to convert (a character set other than ASCII, Latin-1
  or UTF-8; an unsigned short that is not exactly one value);
- enhanced multi-frame objects (functional groups) and multi-frame files in general.

The equivalence with the pydicom path is tested on pydicom's own test files and on the
synthetic messy sets (``tests/unit/test_fastscan.py``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

__all__ = ["FastScan", "charset_encoding", "fast_scan"]

_CHUNK = 16384
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_FUNCTIONAL_GROUPS = frozenset({0x52009229, 0x52009230})
_LUT_SEQUENCE = 0x00283000
_FRAMES = 0x00280008
_CHARSET = 0x00080005
_TS_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_TS_DEFLATED = "1.2.840.10008.1.2.1.99"
_TS_IMPLICIT = "1.2.840.10008.1.2"
_VR_LONG = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_VR_SHORT = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
_HEAD = struct.Struct("<HH2sH")  # group, element, VR, short length (explicit VR)
_IMPL = struct.Struct("<HHL")  # group, element, length (implicit VR; also items)
_LONG = struct.Struct("<L")
_HEAD12 = struct.Struct("<HH2sHL")  # explicit VR header and the 4 bytes after it


def charset_encoding(charset: str) -> str | None:
    """The codec for text in a dataset whose SpecificCharacterSet is ``charset``: UTF-8
    (ISO_IR 192), Latin-1 (default, ISO_IR 100, ISO_IR 6), else ``None`` (pydicom's own
    conversion is needed)."""
    if "192" in charset:
        return "utf-8"
    return "latin-1" if charset in ("", "ISO_IR 100", "ISO_IR 6") else None


class _Decline(Exception):
    """The file is not the common case: let pydicom read it."""


@dataclass(frozen=True)
class FastScan:
    """What the lean walk found: ``values`` as ``fields.extract`` returns them, the transfer
    syntax and media SOP class from the file meta, whether a Modality LUT Sequence exists
    and where the pixel data element starts (-1: none before the end of the file)."""

    values: dict[str, object]
    transfer_syntax: str
    media_sop_class: str
    implicit: bool
    has_lut_sequence: bool
    pixel_element: int


class _Reader:
    """Random access to a file through one moving buffer."""

    __slots__ = ("base", "buf", "fh", "size")

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.size = fh, size
        fh.seek(0)
        self.buf = fh.read(_CHUNK)
        self.base = 0

    def view(self, pos: int, n: int) -> tuple[bytes, int]:
        """(buffer, offset of ``pos`` in it) holding at least ``n`` bytes from ``pos``."""
        off = pos - self.base
        if off < 0 or off + n > len(self.buf):
            if pos + n > self.size:
                raise _Decline
            self.fh.seek(pos)
            self.buf = self.fh.read(max(n, _CHUNK))
            self.base, off = pos, 0
            if len(self.buf) < n:
                raise _Decline
        return self.buf, off


def fast_scan(fh: BinaryIO, size: int, fields: dict[int, tuple[int, str, str]]) -> FastScan | None:
    """Walk ``fh`` (``size`` bytes) up to its pixel data; ``None`` when declined (see the
    module docstring). ``fields`` maps tag -> (tag, name, kind) as ``fields.FIELD_BY_TAG``."""
    try:
        return _scan(_Reader(fh, size), fields)
    except (_Decline, struct.error, UnicodeDecodeError, ValueError):
        return None


def _scan(r: _Reader, fields: dict[int, tuple[int, str, str]]) -> FastScan | None:
    buf, off = r.view(0, 132)
    if buf[off + 128 : off + 132] != b"DICM":
        return None
    meta, pos = _read_meta(r)
    ts = meta.get(0x0010, "")
    if not ts or ts in (_TS_EXPLICIT_BE, _TS_DEFLATED):
        return None
    implicit = ts == _TS_IMPLICIT
    if implicit and pos + 6 <= r.size:
        buf, off = r.view(pos, 6)
        if buf[off + 4 : off + 6] in _VR_SHORT or buf[off + 4 : off + 6] in _VR_LONG:
            return None  # labelled implicit, written explicit: pydicom's call
    values, has_lut, pixel = _walk_dataset(r, pos, implicit, fields)
    return FastScan(
        values=values,
        transfer_syntax=ts,
        media_sop_class=meta.get(0x0002, ""),
        implicit=implicit,
        has_lut_sequence=has_lut,
        pixel_element=pixel,
    )


def _read_meta(r: _Reader) -> tuple[dict[int, str], int]:
    """The media SOP class (0002) and transfer syntax (0010) of the file meta group, and the
    position of the first dataset element after it.

    The meta group is always explicit VR; the group is checked before the VR because the
    first dataset element after it may be implicit (no VR bytes), so :func:`_element`,
    which declines unknown VRs, cannot read this boundary.
    """
    pos = 132
    meta: dict[int, str] = {}
    while pos + 8 <= r.size:
        buf, off = r.view(pos, 8)
        group, elem, vr, length = _HEAD.unpack_from(buf, off)
        if group != 2:
            break
        if vr in _VR_LONG:
            buf, off = r.view(pos, 12)
            (length,) = _LONG.unpack_from(buf, off + 8)
            pos += 12
        elif vr in _VR_SHORT:
            pos += 8
        else:
            raise _Decline
        if length == _UNDEFINED:
            raise _Decline
        if elem in (0x0002, 0x0010):
            buf, off = r.view(pos, length)
            meta[elem] = buf[off : off + length].decode("latin-1").strip(" \x00")
        pos += length
    return meta, pos


def _walk_dataset(
    r: _Reader, pos: int, implicit: bool, fields: dict[int, tuple[int, str, str]]
) -> tuple[dict[str, object], bool, int]:
    """(values of the wanted ``fields``, whether a Modality LUT Sequence exists, position of
    the pixel data element or -1) of the dataset elements from ``pos`` on.

    The hot loop of every header scan (a real MR header holds 300-400 elements): an element
    header that lies whole in the reader's buffer is read here, inline; any other goes
    through :func:`_element` (the same result, or the same decline).
    """
    values: dict[str, object] = {}
    enc: str | None = "latin-1"
    has_lut = False
    last = 0x0002FFFF
    pixel = -1
    size = r.size
    impl, head12, vr_long, vr_short = _IMPL.unpack_from, _HEAD12.unpack_from, _VR_LONG, _VR_SHORT
    special = _special(fields)  # tag -> wanted field spec, or a _STOP / _FG / _LUT marker
    buf, base = r.buf, r.base
    nbuf = len(buf)
    while pos < size:
        off = pos - base
        if off >= 0 and off + 12 <= nbuf:
            if implicit:
                group, elem, length = impl(buf, off)
                vr, start = b"", pos + 8
            else:
                group, elem, vr, length, long_length = head12(buf, off)
                if group == 0xFFFE:
                    length = impl(buf, off)[2]
                    vr, start = b"", pos + 8
                elif vr in vr_long:
                    length, start = long_length, pos + 12
                elif vr in vr_short:
                    start = pos + 8
                else:
                    raise _Decline
            tag = group << 16 | elem
        else:
            tag, vr, length, start = _element(r, pos, implicit)
            buf, base = r.buf, r.base
            nbuf = len(buf)
        if tag <= last or tag >> 16 == 0xFFFE:
            raise _Decline
        last = tag
        spec = special.get(tag)
        if spec is not None and len(spec) == 1:  # a marker
            if spec is _STOP:
                pixel = pos
                break
            if spec is _FG:
                raise _Decline
            has_lut = True
            spec = fields.get(tag)
        if length == _UNDEFINED:
            if implicit or vr in (b"SQ", b"UN"):
                pos = _skip_sequence(r, start, implicit or vr == b"UN")
                buf, base = r.buf, r.base
                nbuf = len(buf)
                continue
            raise _Decline
        end = start + length
        if end > size:
            raise _Decline
        if spec is not None:
            voff = start - base
            if voff >= 0 and voff + length <= nbuf:  # the value lies in the buffer
                if spec[2] == "s" and tag != _CHARSET and tag != _FRAMES:  # _store, inline
                    raw = buf[voff : voff + length]
                    values[spec[1]] = raw.decode("latin-1", "replace").strip(" \x00") if raw else ""
                else:
                    enc = _store(values, spec, buf[voff : voff + length], enc, vr)
            else:
                vbuf, voff = r.view(start, length)
                enc = _store(values, spec, vbuf[voff : voff + length], enc, vr)
                buf, base = r.buf, r.base
                nbuf = len(buf)
        pos = end
    return values, has_lut, pixel


# markers of _special (1-tuples; a wanted field's spec is a 3-tuple)
_STOP, _FG, _LUT = ("pixel",), ("functional groups",), ("modality LUT",)
_SPECIAL: list[Any] = [None, {}]  # the last (fields, special) pair built


def _special(fields: dict[int, tuple[int, str, str]]) -> dict[int, tuple]:
    """``fields`` plus the tags the walk acts on (one dict lookup per element); built once
    per ``fields`` mapping (callers pass the one ``FIELD_BY_TAG``)."""
    if _SPECIAL[0] is not fields:
        found: dict[int, tuple] = dict(fields)
        found.update(dict.fromkeys(_FUNCTIONAL_GROUPS, _FG))
        found[_LUT_SEQUENCE] = _LUT
        found.update(dict.fromkeys(_PIXEL_TAGS, _STOP))
        _SPECIAL[:] = [fields, found]
    return _SPECIAL[1]


def _store(
    values: dict[str, object],
    spec: tuple[int, str, str],
    raw: bytes,
    enc: str | None,
    vr: bytes = b"",
) -> str | None:
    """Decode one wanted value into ``values``; return the text encoding from now on (a
    SpecificCharacterSet changes it). Kind ``b`` keeps (VR, raw bytes)."""
    tag, name, kind = spec
    if kind == "b":
        values[name] = (vr.decode("latin-1"), bytes(raw))
        return enc
    if kind == "u":
        if len(raw) == 2:
            values[name] = raw[0] | raw[1] << 8
        elif len(raw) == 0:
            values[name] = None
        else:
            raise _Decline
        return enc
    if kind == "d":  # FD doubles (the lean walk reads little-endian files only)
        from medres.ingest.dicom.volume_keys import doubles_text

        values[name] = doubles_text(raw)
        return enc
    if kind == "p" and enc is None:
        raise _Decline
    text = raw.decode(enc if kind == "p" else "latin-1", "replace").strip(" \x00") if raw else ""  # type: ignore[arg-type]
    values[name] = text
    if tag == _CHARSET:
        return charset_encoding(text)
    if tag == _FRAMES and raw.strip(b" \x00") not in (b"", b"1"):
        raise _Decline  # multi-frame: functional groups etc. go through pydicom
    return enc


def _element(r: _Reader, pos: int, implicit: bool) -> tuple[int, bytes, int, int]:
    """(tag, VR, value length, value offset) of the element header at ``pos``.

    Item and delimiter tags (group FFFE) carry no VR in either encoding; an explicit VR
    that is not a known one declines the file.
    """
    buf, off = r.view(pos, 8)
    group, elem, vr, length = _HEAD.unpack_from(buf, off)
    if implicit or group == 0xFFFE:
        _, _, length = _IMPL.unpack_from(buf, off)
        return group << 16 | elem, b"", length, pos + 8
    if vr in _VR_LONG:
        buf, off = r.view(pos, 12)
        (length,) = _LONG.unpack_from(buf, off + 8)
        return group << 16 | elem, vr, length, pos + 12
    if vr in _VR_SHORT:
        return group << 16 | elem, vr, length, pos + 8
    raise _Decline


def _skip_sequence(r: _Reader, pos: int, implicit: bool) -> int:
    """Position after an undefined-length sequence starting at ``pos`` (its first item)."""
    while True:
        buf, off = r.view(pos, 8)
        group, elem, length = _IMPL.unpack_from(buf, off)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Decline
        if length != _UNDEFINED:
            pos += length
            if pos > r.size:
                raise _Decline
            continue
        pos = _skip_item(r, pos, implicit)


def _skip_item(r: _Reader, pos: int, implicit: bool) -> int:
    """Position after an undefined-length item whose first element is at ``pos``."""
    while True:
        tag, vr, length, start = _element(r, pos, implicit)
        if tag == _ITEM_END:
            return start
        if length == _UNDEFINED:
            if implicit or vr in (b"SQ", b"UN"):
                pos = _skip_sequence(r, start, implicit or vr == b"UN")
                continue
            raise _Decline
        pos = start + length
        if pos > r.size:
            raise _Decline
