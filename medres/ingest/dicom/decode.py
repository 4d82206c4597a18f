"""Pixel decoding: the stored values of a stack's files, and their mapping to output values.

Owns the three decode paths (see the package docstring): uncompressed little-endian pixel
data read straight from the file at the offset found by the header scan
(:func:`read_native`); compressed pixel data handed from that offset to pydicom's decoder
plugins (:func:`decode_encapsulated`); and a full ``dcmread`` + ``pixel_array`` for
everything else (:func:`decode_dataset`, which also classifies the error). With
``workers > 1``, compressed stacks whose estimated serial decode time exceeds
``_POOL_WORTH_S`` are decoded in :class:`medres.workers.IsolatedPool` processes. A file
whose file meta lacks TransferSyntaxUID is decoded with the syntax it was read with. It
also owns :func:`mask_unused_bits` (stored words -> their BitsStored bits, sign-extended,
on every path, as pydicom's ``pixel_array``), the value mapping (:func:`apply_values`:
modality LUT per slice, MONOCHROME1 inversion, output dtype) and :func:`run_guarded`,
which turns any decoder failure into ``IngestError(code=decode_failed)``, and
:func:`read_mosaic_tiles`: each Siemens mosaic file's frame read once (on the same paths)
and cut into the tiles its slices name (:mod:`.mosaic`). Imports :mod:`.header`,
:mod:`.mosaic`, :mod:`medres.ingest.image`, :mod:`medres.workers`, numpy and pydicom.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.dicom.decoder_guards import install as guard_decoders
from medres.ingest.dicom.header import (
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    NO_CATCH,
    DicomHeader,
    Slice,
    Stack,
    as_code,
)
from medres.ingest.dicom.mosaic import frame_header, tile_region
from medres.ingest.image import to_output_dtype
from medres.workers import IsolatedPool

# Serial decode cost per output byte (seconds), by transfer syntax, measured on one core
# of the project's CI-class machine with pydicom's plugins (pylibjpeg, openjpeg, libjpeg).
_DECODE_S_PER_BYTE = {
    "1.2.840.10008.1.2.5": 2.5e-9,  # RLE Lossless
    "1.2.840.10008.1.2.4.50": 5e-9,  # JPEG baseline
    "1.2.840.10008.1.2.4.51": 5e-9,  # JPEG extended
}
_DEFAULT_DECODE_S_PER_BYTE = 2e-8  # JPEG lossless, JPEG-LS, JPEG 2000, HTJ2K, ...
# A process pool (start-up, pickling the frames back) pays off above this much serial work.
_POOL_WORTH_S = 0.5


# --------------------------------------------------------------------------- stored values
def stored_dtype(h: DicomHeader) -> np.dtype:
    """The little-endian dtype of the stored values of an uncompressed file."""
    if h.pixel_keyword == "FloatPixelData":
        return np.dtype("<f4")
    if h.pixel_keyword == "DoubleFloatPixelData":
        return np.dtype("<f8")
    kind = "i" if h.pixel_representation == 1 else "u"
    return np.dtype(f"<{kind}{h.bits_allocated // 8}")


def mask_unused_bits(raw: np.ndarray, bits: Sequence[int]) -> tuple[float, float]:
    """Keep only the low BitsStored bits of each slice of ``raw`` (axis 0; ``bits[k]`` is
    slice k's BitsStored), sign-extending signed data, in place; return the value range the
    result is guaranteed to lie in.

    PS3.5 8.1.1: bits above the stored ones are not pixel data. As pydicom's ``pixel_array``
    this is a shift left then right by BitsAllocated - BitsStored, whatever HighBit says.
    A slice whose values are already in range (the common case) is only scanned, not
    rewritten. Float data and BitsStored >= the word size are left as they are.
    """
    if raw.dtype.kind not in "iu":
        return -math.inf, math.inf
    info = np.iinfo(raw.dtype)
    width = raw.dtype.itemsize * 8
    signed = raw.dtype.kind == "i"
    ranges = [(float(info.min), float(info.max))] if not len(bits) else []
    same = len(set(bits)) == 1
    groups = [(bits[0], raw)] if same else [(b, raw[k]) for k, b in enumerate(bits)]
    for b, part in groups:
        if not 0 < b < width:
            ranges.append((float(info.min), float(info.max)))
            continue
        lo, hi = (-(1 << (b - 1)), (1 << (b - 1)) - 1) if signed else (0, (1 << b) - 1)
        ranges.append((float(lo), float(hi)))
        if part.size and (int(part.min()) < lo or int(part.max()) > hi):
            shift = raw.dtype.type(width - b)
            np.left_shift(part, shift, out=part)
            np.right_shift(part, shift, out=part)
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def fast_ok(h: DicomHeader) -> bool:
    """True when the file's pixels can be read straight from it (:func:`read_native`)."""
    return (
        h.is_native
        and h.pixel_offset >= 0
        and h.pixel_length >= 0
        and h.samples_per_pixel == 1
        and h.bits_allocated in (8, 16, 32, 64)
        and h.photometric in ("MONOCHROME1", "MONOCHROME2")
        and not h.has_modality_lut_sequence
        and h.pixel_length >= h.expected_pixel_bytes()
    )


def read_native(h: DicomHeader, out: np.ndarray) -> None:
    """Read ``out.size`` stored values from the file straight into ``out`` (C-contiguous)."""
    with open(h.path, "rb") as fh:
        fh.seek(h.pixel_offset)
        n = fh.readinto(memoryview(out).cast("B"))
    if n != out.nbytes:
        raise IngestError(
            f"{h.source}: pixel data ends early; re-copy the file", code=Code.TRUNCATED
        )


def decode_dataset(h: DicomHeader) -> tuple[np.ndarray, Any]:
    """Decode all frames with pydicom -> (frames, rows, cols[, 3]) and the dataset."""
    import pydicom

    guard_decoders()  # JP2 box walk and pylibjpeg JPEG-LS never return on some frames
    try:
        ds = pydicom.dcmread(h.path, force=True)
    except NO_CATCH:
        raise
    except BaseException as exc:
        raise IngestError(
            f"{h.source}: cannot re-read file ({type(exc).__name__}); re-copy it",
            code=Code.TRUNCATED,
        ) from None
    _set_transfer_syntax(ds, h.transfer_syntax)
    try:
        arr = ds.pixel_array
    except NO_CATCH:
        raise
    except NotImplementedError as exc:
        if not _decoder_available(h.transfer_syntax):
            raise IngestError(
                f"{h.source}: no installed decoder handles transfer syntax {h.transfer_syntax} ({exc}); "
                "install the pydicom plugins (pylibjpeg, gdcm) or re-export uncompressed",
                code=Code.UNSUPPORTED_TRANSFER_SYNTAX,
            ) from None
        # a decoder is there: what pydicom could not do is read a damaged element
        msg = str(exc).split("\n")[0][:160]
        raise IngestError(
            f"{h.source}: pixel decoding failed ({type(exc).__name__}: {msg}); the file is "
            "damaged, re-copy or re-export it",
            code=Code.DECODE_FAILED,
        ) from None
    except BaseException as exc:
        msg = str(exc).split("\n")[0][:160]
        low = msg.lower()
        unsupported = any(
            k in low for k in ("no pixel data decoders", "missing dependencies", "missing required")
        )
        code = Code.UNSUPPORTED_TRANSFER_SYNTAX if unsupported else Code.DECODE_FAILED
        raise IngestError(
            f"{h.source}: pixel decoding failed ({type(exc).__name__}: {msg}); the compressed data is corrupt or unsupported, re-export the file",
            code=code,
        ) from None
    nf = h.number_of_frames
    arr = np.asarray(arr)
    if h.photometric.startswith("PALETTE"):
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, ds)
        except NO_CATCH:
            raise
        except BaseException as exc:
            raise IngestError(
                f"{h.source}: palette colour lookup failed ({type(exc).__name__}); re-export as RGB",
                code=Code.DECODE_FAILED,
            ) from None
    color = arr.ndim == (4 if nf > 1 else 3)
    if not color:
        arr = arr.reshape(nf, h.rows, h.cols)
    else:
        arr = arr.reshape(nf, h.rows, h.cols, arr.shape[-1])
    return arr, ds


def _set_transfer_syntax(ds: Any, tsyntax: str) -> None:
    """Give a dataset whose file meta lacks TransferSyntaxUID the syntax it was read with
    (``tsyntax``, inferred by the header scan; else pydicom's detected encoding), which
    pydicom's decoders need."""
    from pydicom.dataset import FileMetaDataset

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    if not tsyntax:
        implicit, little = ds.original_encoding
        if implicit is None:
            return
        tsyntax = IMPLICIT_LE if implicit else (EXPLICIT_LE if little else EXPLICIT_BE)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    meta.TransferSyntaxUID = tsyntax


def _decoder_available(transfer_syntax: str) -> bool:
    """Whether pydicom has a working decoder (an installed plugin) for ``transfer_syntax``."""
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(transfer_syntax).is_available)
    except NO_CATCH:
        raise
    except BaseException:
        return False


_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item, little endian
_SEQ_END = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD) Sequence Delimitation Item


def cut_fragment(buf: bytes) -> tuple[int, int, int] | None:
    """The first item of encapsulated pixel data ``buf`` (from its value's first byte) that
    the file cuts short, as (item index, bytes declared, bytes left), or None when every
    item is whole (also when the walk meets something it does not know: the decoders judge
    that). Index 0 is the Basic Offset Table. A file that ends right after its last item,
    without the delimiter, is whole."""
    offset, total, index = 0, len(buf), 0
    while offset < total:
        tag = buf[offset : offset + 4]
        if tag == _SEQ_END:
            return None
        if offset + 8 > total:
            return (index, 8, total - offset) if tag == _ITEM[: len(tag)] else None
        if tag != _ITEM:
            return None
        length = int.from_bytes(buf[offset + 4 : offset + 8], "little")
        left = total - offset - 8
        if length > left:
            return index, length, left
        offset += 8 + length
        index += 1
    return None


def decode_encapsulated(h: DicomHeader) -> np.ndarray | None:
    """Decode compressed frames straight from the bytes located by the header scan (no second
    header parse): (frames, rows, cols[, 3]), or None when this shortcut does not apply or
    fails (the caller then decodes through the full dataset, which also classifies errors).

    Pixel data cut short by the end of the file (:func:`cut_fragment`) is ``truncated`` at
    once, before any decoder: CharLS, for one, spends seconds on a cut JPEG-LS frame (the
    long fuzz mode's per-file timeouts)."""
    if h.pixel_offset < 0 or h.pixel_length != -1 or h.photometric.startswith("PALETTE"):
        return None
    if h.has_modality_lut_sequence:
        return None
    try:
        with open(h.path, "rb") as fh:
            fh.seek(h.pixel_offset)
            buf = fh.read()
    except OSError:
        return None
    cut = cut_fragment(buf)
    if cut is not None:
        item, declared, left = cut
        what = "its offset table" if item == 0 else f"fragment {item}"
        raise IngestError(
            f"{h.source}: pixel data ends early ({what} declares {declared} bytes, the file "
            f"holds {left}); re-copy the file",
            code=Code.TRUNCATED,
        )
    try:
        from pydicom.pixels import get_decoder  # here: native reads never need pydicom

        guard_decoders()
        decoder = get_decoder(h.transfer_syntax)
        kw: dict[str, Any] = {
            "rows": h.rows,
            "columns": h.cols,
            "samples_per_pixel": h.samples_per_pixel,
            "number_of_frames": h.number_of_frames,
            "bits_allocated": h.bits_allocated,
            "bits_stored": h.bits_stored,
            "pixel_representation": h.pixel_representation,
            "photometric_interpretation": h.photometric,
            "pixel_keyword": "PixelData",
        }
        if h.samples_per_pixel > 1:
            kw["planar_configuration"] = h.planar_configuration
        arr, _ = decoder.as_array(buf, **kw)
    except NO_CATCH:
        raise
    except BaseException:
        return None
    nf = h.number_of_frames
    color = arr.ndim == (4 if nf > 1 else 3)
    return arr.reshape((nf, h.rows, h.cols, arr.shape[-1]) if color else (nf, h.rows, h.cols))


# --------------------------------------------------------------------------- mosaics
def read_mosaic_tiles(stack: Stack, all_slices: Sequence[Slice]) -> tuple[np.ndarray, Any]:
    """(slices, tile rows, tile cols) values of a stack of Siemens mosaic tiles
    (:mod:`.mosaic`) and the first dataset pydicom read (for a Modality LUT) or None.

    Each file's frame is read once - straight from the file when uncompressed, else by the
    decoders as any other file - and cut into the tiles its slices name; unused tiles are
    never looked at. A frame that does not decode to one Rows x Columns grayscale frame is
    ``invalid_mosaic``: it is never cut on a guess.
    """
    by_file: dict[tuple[str, str], list[int]] = {}
    for k, s in enumerate(all_slices):
        h = stack.headers[s.header_index]
        by_file.setdefault((str(h.path), h.source), []).append(k)
    tiles: list[np.ndarray] = [np.empty(0)] * len(all_slices)
    ds0 = None
    for ks in by_file.values():
        frame, ds = _mosaic_frame(frame_header(stack.headers[all_slices[ks[0]].header_index]))
        ds0 = ds if ds0 is None else ds0
        for k in ks:
            t = stack.headers[all_slices[k].header_index]
            rows, cols = tile_region(t)
            tiles[k] = frame[rows, cols]
            if tiles[k].shape != (t.rows, t.cols):
                raise IngestError(
                    f"{t.source}: mosaic tile {t.mosaic_tile} lies outside the "
                    f"{frame.shape[0]}x{frame.shape[1]} frame; re-export the series",
                    code=Code.INVALID_MOSAIC,
                )
    return np.stack(tiles), ds0


def _mosaic_frame(h: DicomHeader) -> tuple[np.ndarray, Any]:
    """The one stored frame (Rows, Columns) of mosaic file ``h`` and its dataset (or None)."""
    if fast_ok(h):
        frame = np.empty((h.rows, h.cols), dtype=stored_dtype(h))
        read_native(h, frame)
        return frame, None
    ds = None
    arr = decode_encapsulated(h)
    if arr is None:
        arr, ds = decode_dataset(h)
    if arr.shape != (1, h.rows, h.cols):
        raise IngestError(
            f"{h.source}: Siemens mosaic decoded to shape {tuple(arr.shape)}, not one "
            f"{h.rows}x{h.cols} grayscale frame; re-export the series uncompressed",
            code=Code.INVALID_MOSAIC,
        )
    return arr[0], ds


# --------------------------------------------------------------------------- many files
def decode_all(stack: Stack, all_slices: list[Slice], workers: int) -> dict[int, Any]:
    """pydicom-decode every header a slice needs; key -1 holds the first dataset (for a
    Modality LUT). ``workers`` processes are used when the estimated serial decode time
    (:func:`_decode_seconds`) exceeds ``_POOL_WORTH_S``, below which the pool's start-up and
    the pickling of frames cost more than they save."""
    need = sorted({s.header_index for s in all_slices})
    out: dict[int, Any] = {}
    if workers > 1 and len(need) > 8 and _decode_seconds(stack, need) > _POOL_WORTH_S:
        out = _decode_in_pool(stack, need, workers)
        if stack.first.has_modality_lut_sequence:
            out[-1] = decode_dataset(stack.first)[1]
        return out
    for i in need:
        h = stack.headers[i]
        fast = decode_encapsulated(h)
        if fast is not None:
            out[i] = fast
            continue
        arr, ds = decode_dataset(h)
        out[i] = arr
        out.setdefault(-1, ds)
    if stack.first.has_modality_lut_sequence and -1 not in out:
        out[-1] = decode_dataset(stack.first)[1]
    return out


def _decode_in_pool(stack: Stack, need: Sequence[int], workers: int) -> dict[int, Any]:
    """The decoded frames of the headers ``need`` of ``stack``, in ``workers`` processes of
    an :class:`~medres.workers.IsolatedPool` (no per-file time limit, as in a serial
    decode). The first coded error, in slice order, is raised; a crashed worker fails its
    file with the pool's code."""
    headers = [stack.headers[i] for i in need]
    chunk = max(4, len(need) // (workers * 4))
    with IsolatedPool(workers, timeout_s=math.inf) as pool:
        done = pool.map(_decode_array, headers, chunk_size=chunk)
    out: dict[int, Any] = {}
    for i, h, (ok, value) in zip(need, headers, done, strict=True):
        if not ok:  # the worker process itself failed (crash, memory)
            raise IngestError(f"{h.source}: {value.message}", code=as_code(value.code))
        if isinstance(value, IngestError):
            raise value
        out[i] = value
    return out


def _decode_seconds(stack: Stack, need: Sequence[int]) -> float:
    """Estimated serial decode time of the compressed files ``need`` of ``stack``."""
    total = 0.0
    for i in need:
        h = stack.headers[i]
        per = _DECODE_S_PER_BYTE.get(h.transfer_syntax, _DEFAULT_DECODE_S_PER_BYTE)
        nbytes = h.rows * h.cols * h.number_of_frames * h.samples_per_pixel
        total += per * nbytes * max(1, h.bits_allocated // 8)
    return total


def _decode_array(h: DicomHeader) -> np.ndarray | IngestError:
    """Pool task: the decoded frames, or the coded error (exceptions pickle)."""
    try:
        fast = decode_encapsulated(h)
        return fast if fast is not None else run_guarded(lambda: decode_dataset(h)[0], h.source)
    except IngestError as exc:
        return exc


def run_guarded(fn: Callable[[], Any], src: str) -> Any:
    """``fn()``; any failure but ``IngestError`` becomes a coded one (``decode_failed``, or
    ``timeout`` when out of memory)."""
    try:
        return fn()
    except (IngestError, *NO_CATCH):
        raise
    except MemoryError:
        raise IngestError(
            f"{src}: out of memory while decoding; ingest with fewer workers", code=Code.TIMEOUT
        ) from None
    except BaseException as exc:
        raise IngestError(
            f"{src}: decoding failed ({type(exc).__name__}); the pixel data is corrupt, re-export the file",
            code=Code.DECODE_FAILED,
        ) from None


# --------------------------------------------------------------------------- output values
def _lut_sequence(ds: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    if ds is None or not ds.get("ModalityLUTSequence"):
        return None
    from pydicom.pixels import apply_modality_lut

    return lambda a: apply_modality_lut(a, ds)


def _bits_range(h: DicomHeader) -> tuple[float, float]:
    b = h.bits_stored or h.bits_allocated
    if h.pixel_representation == 1:
        return -(2.0 ** (b - 1)), 2.0 ** (b - 1) - 1
    return 0.0, 2.0**b - 1


def apply_values(
    raw: np.ndarray,
    slices: Sequence[Slice],
    h0: DicomHeader,
    orient: Callable[[np.ndarray], np.ndarray],
    ds: Any = None,
    stored_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Modality LUT per slice (axis 0 of ``raw``), MONOCHROME1 inversion, output dtype.

    ``orient`` maps a (slices, rows, cols)-shaped array to a view in canonical layout; the
    result is written once, F-contiguous, in that layout (the value pass doubles as the
    reorientation copy, and the NIfTI writer can then write it without another copy).
    ``stored_range`` bounds the stored values (from :func:`mask_unused_bits`; default the
    dtype's range).
    """
    lut = _lut_sequence(ds)
    slopes = np.array([s.slope for s in slices], dtype=np.float64)
    inters = np.array([s.intercept for s in slices], dtype=np.float64)
    mono1 = h0.photometric == "MONOCHROME1"
    per_slice = (-1, 1, 1)
    view = orient(raw)
    if lut is not None:
        out = lut(view)
        if mono1:
            lo, hi = (float(v) for v in lut(np.array(_bits_range(h0), dtype=raw.dtype)))
            out = (lo + hi) - out.astype(np.float64)
        return np.asfortranarray(to_output_dtype(out))
    integral = (
        raw.dtype.kind in "iu"
        and bool(np.all(slopes == 1.0))
        and bool(np.all(inters == np.round(inters)))
    )
    if integral and not mono1:
        blo, bhi = float(np.iinfo(raw.dtype).min), float(np.iinfo(raw.dtype).max)
        if stored_range is not None:
            blo, bhi = max(blo, stored_range[0]), min(bhi, stored_range[1])
        lo, hi = blo + inters.min(), bhi + inters.max()
        if not (lo >= -32768 and hi <= 32767) and raw.size:
            # the stored-bits range does not settle it: look at the actual values
            lo, hi = float(raw.min()) + inters.min(), float(raw.max()) + inters.max()
        if lo >= -32768 and hi <= 32767:
            out = np.empty(view.shape, dtype=np.int16, order="F")
            if np.all(inters == inters[0]):
                np.add(
                    view,
                    np.int16(inters[0]) if raw.dtype == np.int16 else np.int32(inters[0]),
                    out=out,
                    casting="unsafe",
                )
            else:
                np.add(
                    view,
                    orient(inters.astype(np.int32).reshape(per_slice)),
                    out=out,
                    casting="unsafe",
                )
            return out
    out = view.astype(np.float64, order="F") * orient(slopes.reshape(per_slice))
    out += orient(inters.reshape(per_slice))
    if mono1:
        blo, bhi = _bits_range(h0)
        lo_hi = (blo + bhi) * slopes + 2 * inters
        out = orient(lo_hi.reshape(per_slice)) - out
    return np.asfortranarray(to_output_dtype(out))
