"""The Siemens CSA image header (0029,1010): a small, bounded parser for the few tags used.

Siemens MR files carry a private binary header, "CSA", in (0029,1010). Two layouts exist
(described by SPM's ``spm_dicom_headers.m``, nibabel's ``nicom/csareader.py`` and
dcm2niix's ``readCSAImageHeader``):

- **SV10** (CSA2, syngo VB and later): ``b"SV10"``, 4 unused bytes, then the tag count and
  an unused 32-bit word; tags from byte 16.
- **old** (CSA1): the tag count and an unused word at byte 0; tags from byte 8.

Each tag is 84 bytes (name[64] NUL-terminated, VM, VR[4], SyngoDT, item count, an unused
word), followed by its items: four 32-bit words, then the item's text padded to a multiple
of 4 bytes. The item length is word 1 in SV10 and ``word 0 - first tag's item count`` in
the old layout. Values are text (numbers as decimal strings), all little endian.

:func:`parse_csa` reads only the tags asked for and never raises: any input that is not a
well-formed CSA header (wrong magic, counts out of bounds, an item running past the end)
gives ``None``, so a malformed header can only make a caller fall back or reject with a
code. Work is bounded by the input size (at most ``MAX_CSA_BYTES``), ``MAX_TAGS`` tags and
``MAX_ITEMS`` items a tag. Imports only the standard library.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Collection, Mapping

__all__ = ["MAX_CSA_BYTES", "CsaValues", "csa_float", "csa_vector", "parse_csa"]

MAX_CSA_BYTES = 4 << 20  # real headers are 10-30 KB
MAX_TAGS = 1000
MAX_ITEMS = 1000
_TAG = struct.Struct("<64si4siii")  # name, vm, vr, syngodt, nitems, xx
_ITEM = struct.Struct("<4i")
_COUNT = struct.Struct("<II")

CsaValues = Mapping[str, tuple[str, ...]]


def parse_csa(raw: bytes, wanted: Collection[str]) -> dict[str, tuple[str, ...]] | None:
    """The text items of the ``wanted`` tags of a CSA header (a tag without items maps to
    ``()``; a tag that is absent is left out), or ``None`` when ``raw`` is not a well-formed
    CSA header. Never raises for any ``raw``."""
    try:
        return _parse(bytes(raw), frozenset(wanted))
    except (struct.error, ValueError, TypeError, OverflowError):
        return None


def _parse(raw: bytes, wanted: frozenset[str]) -> dict[str, tuple[str, ...]] | None:
    size = len(raw)
    if size < 16 or size > MAX_CSA_BYTES:
        return None
    sv10 = raw[:4] == b"SV10"
    pos = 8 if sv10 else 0
    n_tags, _ = _COUNT.unpack_from(raw, pos)
    pos += 8
    if not 0 < n_tags <= MAX_TAGS:
        return None
    out: dict[str, tuple[str, ...]] = {}
    first_items = 0
    for tag_no in range(n_tags):
        if pos + _TAG.size > size:
            return None
        name_raw, _vm, _vr, _dt, n_items, _xx = _TAG.unpack_from(raw, pos)
        pos += _TAG.size
        if not 0 <= n_items <= MAX_ITEMS:
            return None
        if tag_no == 0:
            first_items = n_items
        name = _text(name_raw)
        items: list[str] = []
        for _ in range(n_items):
            if pos + _ITEM.size > size:
                return None
            words = _ITEM.unpack_from(raw, pos)
            pos += _ITEM.size
            length = words[1] if sv10 else words[0] - first_items
            if length < 0 or pos + length > size:
                return None
            if name in wanted:
                items.append(_text(raw[pos : pos + length]))
            pos += (length + 3) // 4 * 4
        if name in wanted:
            out[name] = tuple(items)
    return out


def _text(b: bytes) -> str:
    """Bytes up to the first NUL, as Latin-1 text without surrounding blanks."""
    return b.split(b"\x00", 1)[0].decode("latin-1").strip()


def _number(item: str) -> float | None:
    try:
        v = float(item)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def csa_float(values: CsaValues | None, name: str) -> float | None:
    """The first non-empty item of tag ``name`` as a finite number, else ``None``."""
    items = [i for i in (values or {}).get(name, ()) if i]
    return _number(items[0]) if items else None


def csa_vector(values: CsaValues | None, name: str, n: int) -> tuple[float, ...] | None:
    """The first ``n`` non-empty items of tag ``name`` as finite numbers (``None`` when
    fewer exist or any is not a number)."""
    items = [i for i in (values or {}).get(name, ()) if i][:n]
    if len(items) != n:
        return None
    nums = [_number(i) for i in items]
    if any(v is None for v in nums):
        return None
    return tuple(v for v in nums if v is not None)
