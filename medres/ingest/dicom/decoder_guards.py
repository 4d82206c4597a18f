"""Guards for two third-party decode paths that never return on some corrupt frames.

Both were found by the long fuzz mode (``MEDRES_RELIABILITY_LONG=1``); both are installed
once per process by :func:`install`, before medres decodes pixels.

**JPEG 2000 parameter scan.**

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

**JPEG-LS through pylibjpeg-libjpeg.** pydicom tries its JPEG-LS plugins in turn
(gdcm, pyjpegls, pylibjpeg) until one decodes. On a JPEG-LS frame with one byte changed
(a synthetic radiograph mutated by the fuzz test) gdcm and pyjpegls (CharLS) refuse it in
under a millisecond, but ``pylibjpeg-libjpeg`` 2.x spins in C and never returns: a
``timeout`` row at best, a hung inline run at worst. Where pyjpegls is installed (a
medres dependency) :func:`install` takes pylibjpeg out of the JPEG-LS decoders' plugins,
so a damaged JPEG-LS frame is ``decode_failed`` at once and a sound one is decoded by
CharLS, the JPEG-LS reference implementation. pylibjpeg stays the plugin for every other
syntax.

Imports pydicom lazily (only when installed); no medres module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# how the JP2 signature box (always the first 12 bytes of a JP2 file) starts, as pydicom tests it
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "

_installed = False
# the pydicom JPEG-LS decoders (by name in pydicom.pixels.decoders) and the plugin that hangs
JPEGLS_DECODERS = ("JPEGLSLosslessDecoder", "JPEGLSNearLosslessDecoder")
HANGING_JPEGLS_PLUGIN = "pylibjpeg"
SAFE_JPEGLS_PLUGIN = "pyjpegls"


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


def drop_hanging_jpegls_plugin() -> list[str]:
    """Take pylibjpeg out of pydicom's JPEG-LS decoders where pyjpegls can decode instead;
    returns the names of the decoders changed (none without pyjpegls: then pylibjpeg is
    the only JPEG-LS decoder and stays)."""
    from pydicom.pixels import decoders

    changed = []
    for name in JPEGLS_DECODERS:
        decoder = getattr(decoders, name, None)
        if decoder is None:
            continue
        plugins = decoder.available_plugins
        if SAFE_JPEGLS_PLUGIN in plugins and HANGING_JPEGLS_PLUGIN in plugins:
            decoder.remove_plugin(HANGING_JPEGLS_PLUGIN)
            changed.append(name)
    return changed


def install() -> None:
    """Wrap pydicom's ``get_j2k_parameters`` where its decoders call it and drop the
    hanging JPEG-LS plugin (idempotent)."""
    global _installed
    if _installed:
        return
    drop_hanging_jpegls_plugin()
    from pydicom.pixels import utils
    from pydicom.pixels.decoders import base

    safe = guarded(getattr(utils.get_j2k_parameters, "__wrapped__", utils.get_j2k_parameters))
    for module in (utils, base):
        if hasattr(module, "get_j2k_parameters"):
            module.get_j2k_parameters = safe
    _installed = True
