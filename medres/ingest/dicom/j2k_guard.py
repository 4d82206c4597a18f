"""A guard for pydicom's JPEG 2000 parameter scan, which never returns on some corrupt frames.

``pydicom.pixels.utils.get_j2k_parameters`` (pydicom 3.0: its JP2 header support, pydicom PR #2074) walks the boxes
of a JP2-wrapped frame with ``offset += length`` until it finds the ``jp2c`` box. A box
whose length field is 0 (in JP2, "to the end of the file") makes that loop spin forever in
pure Python, before any decoder runs: a mutated ``GDCMJ2K_TextGBR.dcm`` found by the long
fuzz mode held an isolated worker until its per-file limit killed it (a ``timeout`` row,
after 10 s in the fuzz test, 120 s by default), and inline (``--workers 0``) it would never
return.

:func:`install` wraps that function, once per process, before medres decodes pixels:
a frame whose box chain reaches a zero-length box before ``jp2c`` gets pydicom's own
answer for a codestream it cannot parse (``{}``), and the decoder then fails on it in
milliseconds (``decode_failed``). Every other frame goes to pydicom's function unchanged.

Imports pydicom lazily (only when installed); no medres module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# how the JP2 signature box (always the first 12 bytes of a JP2 file) starts, as pydicom tests it
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "

_installed = False


def jp2_boxes_advance(codestream: bytes) -> bool:
    """False when a JP2 frame's box chain holds a zero-length box before its ``jp2c``
    codestream box (where pydicom's walk would never advance); True otherwise, and for a
    raw J2K codestream (no JP2 wrapper)."""
    if not codestream.startswith(JP2_SIGNATURE):
        return True
    offset, total = 12, len(codestream)
    while offset < total:
        if codestream[offset + 4 : offset + 8] == b"jp2c":
            return True
        length = int.from_bytes(codestream[offset : offset + 4], byteorder="big")
        if length == 0:
            return False
        offset += length
    return True


def guarded(original: Callable[[bytes], dict[str, Any]]) -> Callable[[bytes], dict[str, Any]]:
    """``original`` (pydicom's ``get_j2k_parameters``), answering ``{}`` for a frame whose
    box walk would never end."""

    def get_j2k_parameters(codestream: bytes) -> dict[str, Any]:
        data = codestream if isinstance(codestream, (bytes, bytearray)) else bytes(codestream)
        if not jp2_boxes_advance(data):
            return {}
        return original(codestream)

    get_j2k_parameters.__wrapped__ = original  # type: ignore[attr-defined]
    return get_j2k_parameters


def install() -> None:
    """Wrap pydicom's ``get_j2k_parameters`` where its decoders call it (idempotent)."""
    global _installed
    if _installed:
        return
    from pydicom.pixels import utils
    from pydicom.pixels.decoders import base

    safe = guarded(getattr(utils.get_j2k_parameters, "__wrapped__", utils.get_j2k_parameters))
    for module in (utils, base):
        if hasattr(module, "get_j2k_parameters"):
            module.get_j2k_parameters = safe
    _installed = True
