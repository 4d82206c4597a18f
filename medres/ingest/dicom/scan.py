"""The DICOM header scan: one file up to (not into) its pixel data -> :class:`DicomHeader`.

Owns :func:`is_dicom` (detection by content), :func:`scan_header` (the lean walk of
:mod:`.fastscan` first, pydicom's ``dcmread(stop_before_pixels=True)`` for everything
else; the 8/12-byte header of the pixel data element tells where the pixels start and how
long they are), the pixel-data checks that reject truncated or empty files with a code,
and :func:`scan_headers` (many files; per-file errors become rejections; processes of
:class:`medres.workers.IsolatedPool` from ``_SCAN_POOL_MIN_FILES`` files on). Imports
:mod:`.header`, :mod:`.fields`, :mod:`.fastscan`, :mod:`medres.workers` and pydicom.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.dicom.fastscan import fast_scan
from medres.ingest.dicom.fields import FIELD_BY_TAG, extract, functional_groups, header_from_values
from medres.ingest.dicom.header import (
    DEFLATED,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    NO_CATCH,
    DicomHeader,
    Rejection,
    as_code,
)
from medres.workers import Failure, IsolatedPool

_PIXEL_TAGS = {
    0x7FE00010: "PixelData",
    0x7FE00008: "FloatPixelData",
    0x7FE00009: "DoubleFloatPixelData",
}
# first two bytes of a preamble-less dataset: group 0002 or 0008, little or big endian
_FIRST_GROUPS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
# Header scans (~0.1 ms a file with the lean walk) go to processes from this many files.
_SCAN_POOL_MIN_FILES = 2000


def is_dicom(path: Path) -> bool:
    """True when ``path`` holds DICOM by content: the ``DICM`` preamble, or a preamble-less
    file that starts with a plausible group 0002/0008 element and parses."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
            if len(head) == 132 and head[128:132] == b"DICM":
                return True
            if len(head) < 8:
                return False
            if head[:2] not in _FIRST_GROUPS:
                return False
            import pydicom

            fh.seek(0)
            ds = pydicom.dcmread(fh, force=True, stop_before_pixels=True)
            return len(ds) > 0 and any(
                k in ds
                for k in ("SOPClassUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID")
            )
    except NO_CATCH:
        raise
    except BaseException:
        return False


def _read_pixel_element(fh: BinaryIO, little: bool) -> tuple[str, int, int] | None:
    """At the start of a pixel data element: (keyword, value offset, length) or None at EOF."""
    start = fh.tell()
    head = fh.read(8)
    if len(head) < 8:
        return None
    end = "<" if little else ">"
    group, elem = struct.unpack(end + "HH", head[:4])
    tag = group << 16 | elem
    if tag not in _PIXEL_TAGS:
        return None
    # trust the bytes, not the declared syntax: some files say explicit and are implicit
    if head[4:6] not in (b"OB", b"OW", b"OF", b"OD", b"UN", b"OV", b"OL"):
        (length,) = struct.unpack(end + "L", head[4:8])
        return _PIXEL_TAGS[tag], start + 8, length
    more = fh.read(4)
    if len(more) < 4:
        return None
    (length,) = struct.unpack(end + "L", more)
    return _PIXEL_TAGS[tag], start + 12, length


def scan_header(path: Path, source: str = "", *, require_pixels: bool = True) -> DicomHeader:
    """Read one DICOM file's header (no pixel decoding) into a :class:`DicomHeader`.

    Raises ``IngestError`` with ``code`` = ``unreadable`` (I/O), ``not_dicom`` (not DICOM by
    content), ``truncated`` (header or pixel data cut short), ``not_image`` (a valid object
    without an image: SR, presentation state, ...), ``no_pixel_data`` (an image without
    pixel data, or pixel data shorter than rows*cols*frames*samples*bits/8). With
    ``require_pixels=False`` the last case returns a header with ``has_pixel_data=False``.
    """
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    src = source or str(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise IngestError(
            f"{src}: cannot be read ({exc.strerror or exc}); check that the file exists and is readable",
            code=Code.UNREADABLE,
        ) from None
    with fh:
        size = 0
        try:
            size = os.fstat(fh.fileno()).st_size
            hdr = _read_header(fh, path, src, size)
        except IngestError:
            raise
        except InvalidDicomError:
            raise _not_dicom(src) from None
        except OSError as exc:
            raise IngestError(
                f"{src}: read failed ({exc.strerror or exc}); check the storage and permissions",
                code=Code.UNREADABLE,
            ) from None
        except NO_CATCH:
            raise
        except BaseException as exc:
            kind = (
                "truncated"
                if size < 1024 or "EOF" in repr(exc) or "end of" in str(exc).lower()
                else "unparsable"
            )
            raise IngestError(
                f"{src}: DICOM header is {kind} ({type(exc).__name__}); re-export or re-copy the file",
                code=Code.TRUNCATED,
            ) from None
    _check_pixels(hdr, require_pixels)
    return hdr


def scan_header_lean(path: Path, source: str = "") -> DicomHeader | None:
    """:func:`scan_header` for the files the lean walk accepts, without pydicom and without
    any decoder library: the same header (or the same coded ``IngestError``), or ``None``
    for every other file and for any failure that is not a coded rejection, which
    :func:`scan_header` then reads and classifies. Pure Python over at most the file's
    bytes, so ``medres ingest`` may run it outside its worker pool."""
    path = Path(path)
    src = source or str(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            hdr = _read_lean(fh, path, src, size)
            fh.seek(0)
            pre = fh.read(132) if hdr is None else b""
    except IngestError:
        raise
    except NO_CATCH:
        raise
    except BaseException:
        return None
    if hdr is not None:
        _check_pixels(hdr, True)
    elif pre[128:132] != b"DICM" and (len(pre) < 8 or pre[:2] not in _FIRST_GROUPS):
        raise _not_dicom(src)  # what scan_header says of it, without pydicom
    return hdr


def _not_dicom(src: str) -> IngestError:
    return IngestError(
        f"{src}: not a DICOM file (no DICM preamble and does not parse); remove it or ignore this line",
        code=Code.NOT_DICOM,
    )


def _read_lean(fh: BinaryIO, path: Path, src: str, size: int) -> DicomHeader | None:
    """The header by the lean walk, ``None`` when it declines the file."""
    fast = fast_scan(fh, size, FIELD_BY_TAG)  # checks the DICM preamble itself
    if fast is None:
        return None
    pix = None
    if fast.pixel_element >= 0:
        fh.seek(fast.pixel_element)
        pix = _read_pixel_element(fh, True)
    return header_from_values(
        fast.values,
        path,
        src,
        fast.transfer_syntax,
        pix,
        size,
        media_sop_class=fast.media_sop_class,
        has_lut_sequence=fast.has_lut_sequence,
        functional_groups=None,
    )


def _read_header(fh: BinaryIO, path: Path, src: str, size: int) -> DicomHeader:
    """The lean walk when it accepts the file, else pydicom (which classifies the damage)."""
    hdr = _read_lean(fh, path, src, size)
    if hdr is not None:
        return hdr
    import pydicom
    from pydicom.errors import InvalidDicomError

    fh.seek(0)
    pre = fh.read(132)
    force = not (len(pre) == 132 and pre[128:132] == b"DICM")
    if force and (len(pre) < 8 or pre[:2] not in _FIRST_GROUPS):
        raise InvalidDicomError("no DICM preamble and no plausible first element")
    fh.seek(0)
    ds = pydicom.dcmread(fh, stop_before_pixels=True, force=force)
    return _header_from_dataset(ds, fh, path, src, size)


def _header_from_dataset(ds: Any, fh: BinaryIO, path: Path, src: str, size: int) -> DicomHeader:
    """The header of a dataset pydicom read up to its pixel data (``fh`` is positioned
    there)."""
    implicit, little = ds.original_encoding
    tsyntax = ""
    meta = ds.file_meta if "file_meta" in ds.__dict__ else None
    if meta is not None:
        e = meta._dict.get(0x00020010)
        v = e.value if e is not None else ""
        v = v.decode("latin-1") if isinstance(v, bytes) else str(v or "")
        tsyntax = v.strip(" \x00")
    if not tsyntax:
        tsyntax = IMPLICIT_LE if implicit else (EXPLICIT_LE if little else EXPLICIT_BE)
    pix = None
    if tsyntax != DEFLATED and implicit is not None:
        pix = _read_pixel_element(fh, bool(little))
    elif tsyntax == DEFLATED:
        pix = ("PixelData", -1, -1)  # inside the inflated stream: decode via pydicom
    return header_from_values(
        extract(ds),
        path,
        src,
        tsyntax,
        pix,
        size,
        media_sop_class=_meta_get(ds, "MediaStorageSOPClassUID"),
        has_lut_sequence=0x00283000 in ds._dict,
        functional_groups=lambda nframes: functional_groups(ds, nframes),
        has_per_frame=0x52009230 in ds._dict,
    )


def _meta_get(ds: Any, keyword: str) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get(keyword, "") or "").strip() if meta is not None else ""


def _check_pixels(hdr: DicomHeader, require: bool) -> None:
    src = hdr.source
    if not hdr.has_pixel_data:
        if require:
            raise IngestError(
                f"{src}: image object without PixelData (missing, or the file was cut short); "
                "re-export or re-copy the file",
                code=Code.NO_PIXEL_DATA,
            )
        return
    if hdr.rows <= 0 or hdr.cols <= 0 or hdr.bits_allocated <= 0:
        raise IngestError(
            f"{src}: Rows/Columns/BitsAllocated missing or zero; the header is incomplete, re-export the file",
            code=Code.NO_PIXEL_DATA,
        )
    if hdr.pixel_offset < 0:
        return  # deflated: length only known after inflating
    remaining = hdr.file_size - hdr.pixel_offset
    if hdr.pixel_length >= 0:  # native (uncompressed) pixel data
        if hdr.pixel_length > remaining:
            raise IngestError(
                f"{src}: pixel data declares {hdr.pixel_length} bytes but the file ends after "
                f"{max(remaining, 0)}; the file is truncated, re-copy it",
                code=Code.TRUNCATED,
            )
        expected = hdr.expected_pixel_bytes()
        if hdr.pixel_keyword == "PixelData" and hdr.pixel_length < expected:
            raise IngestError(
                f"{src}: pixel data has {hdr.pixel_length} bytes, fewer than the "
                f"{expected} that Rows x Columns x frames x samples x bits need; re-export the file",
                code=Code.NO_PIXEL_DATA,
            )
    elif remaining < 16:
        raise IngestError(
            f"{src}: encapsulated pixel data is empty or cut short; re-copy the file",
            code=Code.TRUNCATED,
        )


def scan_headers(
    paths: Sequence[Path],
    sources: Sequence[str] | None = None,
    workers: int = 1,
) -> tuple[list[DicomHeader], list[Rejection]]:
    """Scan many files; per-file errors become rejections.

    The lean header walk costs about 0.1 ms a file, less than starting and feeding worker
    processes for a few hundred files, so ``workers`` processes (an
    :class:`~medres.workers.IsolatedPool`) are used only from ``_SCAN_POOL_MIN_FILES`` files
    on (``medres ingest`` scans in its own isolated pool). A file whose worker crashes or
    hangs becomes a rejection with the pool's code.
    """
    srcs = list(sources) if sources is not None else [str(p) for p in paths]
    items = list(zip(paths, srcs, strict=True))
    results: list[DicomHeader | Rejection]
    if workers > 1 and len(items) >= _SCAN_POOL_MIN_FILES:
        chunk = max(8, len(items) // (workers * 4))
        with IsolatedPool(workers) as pool:
            done = pool.map(_scan_safe, items, chunk_size=chunk)
        results = [
            value if ok else _worker_failed(item, value)
            for item, (ok, value) in zip(items, done, strict=True)
        ]
    else:
        results = [_scan_safe(it) for it in items]
    headers = [r for r in results if isinstance(r, DicomHeader)]
    rejections = [r for r in results if isinstance(r, Rejection)]
    return headers, rejections


def _scan_safe(item: tuple[Path, str]) -> DicomHeader | Rejection:
    """Pool task: the header of one (path, source), or its rejection."""
    path, src = item
    try:
        return scan_header(Path(path), src)
    except IngestError as exc:
        return Rejection(source=src, code=as_code(exc.code), message=str(exc), path=str(path))


def _worker_failed(item: tuple[Path, str], failure: Failure) -> Rejection:
    """The rejection of a file whose worker process crashed or timed out."""
    path, src = item
    return Rejection(
        source=src,
        code=as_code(failure.code),
        message=f"{src}: {failure.message}",
        path=str(path),
    )
