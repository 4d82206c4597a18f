"""NIfTI input and the canonical on-disk image (read, validate, write).

Choices made (docs/architecture.md, "Canonical image on disk"):

- :func:`load_nifti` reads NIfTI-1/2 (``.nii``, ``.nii.gz``, ``.hdr``/``.img``) with nibabel,
  applies ``scl_slope``/``scl_inter``, rejects a non-finite or singular affine, and
  reorients 3D data to the closest canonical RAS+ orientation by permuting and flipping
  axes only (never resampling), so every voxel keeps its world coordinate. 2D data (and
  ``X x Y x 1``) stays as (X, Y). A 4th dimension of size 1 is dropped; a real 4D image
  keeps its volumes as (X, Y, Z, T) with only the spatial axes reoriented (``n_volumes``;
  ``volume_axis`` ``other``: the header's time step is not carried over), 5D and more are
  rejected. RGB24 data becomes a trailing channel axis of 3.
- 4D images (DICOM multi-volume series, 4D NIfTI) are written as (X, Y, Z, T) with
  pixdim[4] = the repetition time (s) for a ``time`` axis (else 1.0, unit unknown) and a
  sidecar ``img-x.json`` next to the image (:func:`sidecar_path`; the body is
  :meth:`medres.ingest.dicom.volume_keys.VolumeAxis.sidecar`), written before the image.
- A file named like NIfTI (``.nii``, ``.nii.gz``, ``.hdr``, a pair's ``.img`` without its
  ``.hdr``) that holds no NIfTI header is ``invalid_nifti`` with its cause (empty, N of the
  348 header bytes, a broken gzip, no magic): :func:`named_nifti_error`, used by ingest's
  classification and by :func:`load_nifti`, never ``not_dicom`` junk.
- Values: complex data and float64 values beyond the float32 range are refused
  (``unsupported_values``), never silently cut to their real part or to +-inf.
- :func:`write_image` writes exactly the array and affine of a
  :class:`~medres.ingest.image.LoadedImage`: int16 when all values are integral and fit,
  else float32; sform = the affine (code 1, scanner); qform = the same when the affine has
  no shear, else unset (code 0) because a qform cannot hold the shear of a gantry-tilted
  CT. The suffix chooses the format: uncompressed ``.nii`` is several times cheaper to
  write and read than ``.nii.gz`` (gzip level 1 is used when asked for). The write is
  atomic (temp file, then ``os.replace``).

Imports only :mod:`medres.ingest.image`, :mod:`medres.ingest.codes` and :mod:`medres.io`
(nibabel lazily);
the DICOM reader imports this module to write its images, never the other way round.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.image import LoadedImage, to_output_dtype
from medres.io import atomic_write_json

log = logging.getLogger(__name__)

__all__ = [
    "is_nifti",
    "is_ras_diagonal",
    "load_nifti",
    "named_nifti_error",
    "pair_data_header",
    "sidecar_path",
    "write_image",
]

_NO_CATCH = (KeyboardInterrupt, SystemExit, GeneratorExit)


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as fh:
        start = fh.read(2)
        fh.seek(0)
        if start == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=fh) as gz:
                return gz.read(n)
        return fh.read(n)


def is_nifti(path: Path) -> bool:
    """True when ``path`` holds a NIfTI-1 or NIfTI-2 header (by content, gzip or not)."""
    try:
        head = _head(Path(path), 548)
    except _NO_CATCH:
        raise
    except BaseException:
        return False
    if len(head) >= 348:
        for end in "<>":
            (size,) = struct.unpack(end + "i", head[:4])
            if size == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
                return True
            if size == 540 and len(head) >= 12 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
                return True
    return False


# names that promise NIfTI (or an Analyze-style pair): such a file that is not NIfTI by
# content is a broken NIfTI (invalid_nifti, with the cause), never not_dicom junk
NIFTI_NAMES = (".nii", ".nii.gz", ".hdr", ".hdr.gz", ".img", ".img.gz")
_PAIR_DATA = (".img", ".img.gz")


def _pair_header(path: Path) -> Path | None:
    """The ``.hdr`` beside a pair's ``.img`` data file, when there is one."""
    stem = path.name[: -len(".img.gz")] if path.name.lower().endswith(".gz") else path.stem
    for suffix in (".hdr", ".HDR", ".hdr.gz"):
        if (path.parent / (stem + suffix)).is_file():
            return path.parent / (stem + suffix)
    return None


def pair_data_header(path: Path) -> Path | None:
    """For the data file of a NIfTI/Analyze pair (``.img``/``.img.gz``, no NIfTI header of
    its own) with its ``.hdr`` beside it: that ``.hdr``; else None. Such a file is part of
    the image its ``.hdr`` gives (read through the header), accounted with it."""
    path = Path(path)
    if not path.name.lower().endswith(_PAIR_DATA):
        return None
    return _pair_header(path)


def _header_cause(path: Path) -> str:
    """Why ``path`` holds no NIfTI header: empty, cut short, not gzip, or no NIfTI magic."""
    try:
        head = _head(path, 348)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        return f"not a readable gzip stream ({type(exc).__name__}); re-copy or re-export the file"
    with open(path, "rb") as fh:
        where = " after decompression" if fh.read(2) == b"\x1f\x8b" else ""
    if not head:
        return (
            f"empty file (0 bytes{where}), a NIfTI header needs 348; re-export the file or "
            "remove it"
        )
    if len(head) < 348:
        return (
            f"{len(head)} bytes{where}, a NIfTI header needs 348 (the file is cut short); "
            "re-copy or re-export it"
        )
    return (
        "no NIfTI-1/2 header (sizeof_hdr is not 348/540 or the magic is not n+1/ni1/n+2/ni2; "
        "an Analyze 7.5 file?); convert it to NIfTI"
    )


def named_nifti_error(path: Path, source: str = "") -> IngestError | None:
    """For a file named like NIfTI (:data:`NIFTI_NAMES`) that holds no NIfTI header: the
    ``invalid_nifti`` error naming the file, the cause (empty, N bytes of the 348 a header
    needs, a broken gzip, no NIfTI magic) and the fix; ``None`` for any other name, and for
    a pair's ``.img`` data file whose ``.hdr`` lies beside it (the header is read instead).
    """
    path = Path(path)
    low = path.name.lower()
    if not low.endswith(NIFTI_NAMES):
        return None
    src = source or str(path)
    if low.endswith(_PAIR_DATA):
        if _pair_header(path) is not None:
            return None
        cause = (
            "the data file of a NIfTI/Analyze pair without its .hdr header; put the .hdr beside it"
        )
    else:
        try:
            cause = _header_cause(path)
        except OSError as exc:
            return IngestError(f"{src}: cannot be read ({exc.strerror})", code=Code.UNREADABLE)
    return IngestError(f"{src}: {cause}", code=Code.INVALID_NIFTI)


def load_nifti(path: Path, source: str = "") -> LoadedImage:
    """Read one NIfTI file into a canonical :class:`LoadedImage`.

    Raises ``IngestError`` with ``invalid_nifti`` (corrupt header, bad affine, unsupported
    shape), ``truncated`` (data shorter than the header says) or ``unreadable`` (I/O).
    """
    import nibabel as nib

    path = Path(path)
    src = source or str(path)
    fast = _read_simple_nii(path)
    if fast is not None:
        affine, data, codes = fast
        return _canonical(data, affine, codes, src)
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise IngestError(f"{src}: file not found; check the path", code=Code.UNREADABLE) from None
    except PermissionError:
        raise IngestError(
            f"{src}: permission denied; make the file readable", code=Code.UNREADABLE
        ) from None
    except _NO_CATCH:
        raise
    except BaseException as exc:
        named = None if is_nifti(path) else named_nifti_error(path, src)
        raise named or IngestError(
            f"{src}: not a valid NIfTI header ({type(exc).__name__}); re-export the file",
            code=Code.INVALID_NIFTI,
        ) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image, nib.Nifti1Pair, nib.Nifti2Pair)):
        raise IngestError(
            f"{src}: not a NIfTI image ({type(img).__name__}); convert it to NIfTI",
            code=Code.INVALID_NIFTI,
        )
    affine = np.asarray(img.affine, dtype=float)
    if (
        affine.shape != (4, 4)
        or not np.all(np.isfinite(affine))
        or abs(np.linalg.det(affine[:3, :3])) < 1e-12
    ):
        raise IngestError(
            f"{src}: NIfTI affine is non-finite or singular (zero voxel size); fix the header's sform/qform",
            code=Code.INVALID_NIFTI,
        )
    shape = tuple(int(s) for s in img.shape)
    if any(s <= 0 for s in shape) or len(shape) < 2:
        raise IngestError(
            f"{src}: NIfTI has an empty or 1D shape {shape}; re-export the file",
            code=Code.INVALID_NIFTI,
        )
    _check_data_size(img, path, shape, src)
    try:
        data = np.asanyarray(img.dataobj)
    except _NO_CATCH:
        raise
    except (EOFError, ValueError, OSError) as exc:
        raise IngestError(
            f"{src}: NIfTI data is shorter than its header says ({type(exc).__name__}); re-copy the file",
            code=Code.TRUNCATED,
        ) from None
    except BaseException as exc:
        raise IngestError(
            f"{src}: NIfTI data cannot be read ({type(exc).__name__}); re-export the file",
            code=Code.INVALID_NIFTI,
        ) from None
    codes = (int(img.header["qform_code"]), int(img.header["sform_code"]))
    return _canonical(data, affine, codes, src)


_MAX_DATA_BYTES = 16 << 30  # a header declaring more is not read (no allocation attempt)


def _check_data_size(img: Any, path: Path, shape: tuple[int, ...], src: str) -> None:
    """Before any allocation: the voxel data the header declares must fit in the file (an
    uncompressed image) and below :data:`_MAX_DATA_BYTES`; else one coded line that
    names the declared shape and size instead of a ``MemoryError``."""
    try:
        itemsize = np.dtype(img.header.get_data_dtype()).itemsize
        offset = int(getattr(img.dataobj, "offset", 0))
        data_file = Path(img.file_map["image"].filename or path)
    except Exception:  # an odd header: nibabel's own read reports it
        return
    need = math.prod(shape) * itemsize
    amount = f"{need / 2**30:.3g} GiB" if need >= 2**30 else f"{need:,} bytes"
    declared = f"its header declares {'x'.join(map(str, shape))} voxels ({amount})"
    if need > _MAX_DATA_BYTES:
        raise IngestError(
            f"{src}: {declared}, more than medres reads (16 GiB); check the header's dim "
            "field or re-export the file",
            code=Code.INVALID_NIFTI,
        )
    if data_file.name.lower().endswith(".gz"):
        return
    try:
        size = data_file.stat().st_size
    except OSError:
        return
    if offset + need > size:
        raise IngestError(
            f"{src}: NIfTI data is shorter than its header says: {declared} from byte "
            f"{offset}, the file has {size} bytes; re-copy the file",
            code=Code.TRUNCATED,
        )


def is_ras_diagonal(affine: Any) -> bool:
    """True when the affine's 3x3 part is diagonal and positive: voxel axes already run
    along +R, +A, +S, so the closest canonical orientation is the identity (the exact
    answer of ``nibabel.orientations.io_orientation``, without its SVD, which costs more
    than reading a small image)."""
    m = np.asarray(affine, dtype=float)[:3, :3]
    d = np.diag(m)
    return bool(np.all(d > 0) and np.count_nonzero(m) == 3)


_F32_MAX = float(np.finfo(np.float32).max)


def _check_values(data: np.ndarray, src: str) -> None:
    """Refuse (``unsupported_values``) what the float32/int16 image on disk cannot hold:
    complex voxels (the imaginary part would be dropped) and finite floats beyond float32's
    range (they would become +-inf). Float64 precision beyond float32's is not checked."""
    if np.iscomplexobj(data):
        raise IngestError(
            f"{src}: complex-valued NIfTI ({data.dtype}); medres stores real images only: save "
            "the magnitude (abs) or the real part as float32",
            code=Code.UNSUPPORTED_VALUES,
        )
    if data.dtype.kind == "f" and data.dtype.itemsize > 4 and data.size:
        finite = np.abs(np.asarray(data)[np.isfinite(data)])
        peak = float(finite.max()) if finite.size else 0.0
        if peak > _F32_MAX:
            raise IngestError(
                f"{src}: values up to {peak:.3g} exceed the float32 range (3.4e38) medres "
                "stores images in; rescale the image (or save it in other units)",
                code=Code.UNSUPPORTED_VALUES,
            )


def _canonical(
    data: np.ndarray, affine: np.ndarray, codes: tuple[int, int], src: str
) -> LoadedImage:
    """Channels, dropped unit axes, RAS+ reorientation and output dtype (both read paths)."""
    channels = 1
    if data.dtype.names:  # RGB24 / RGBA32 structured
        data = np.stack([data[n] for n in data.dtype.names[:3]], axis=-1)
        channels = 3
    _check_values(data, src)
    spatial = data.shape[: data.ndim - (1 if channels > 1 else 0)]
    while len(spatial) > 3 and spatial[-1] == 1:
        data = data.reshape(spatial[:-1] + data.shape[len(spatial) :])
        spatial = spatial[:-1]
    n_volumes = 1
    if len(spatial) == 4 and channels == 1:  # 4D: spatial axes reoriented, volumes kept
        n_volumes, spatial = int(spatial[3]), spatial[:3]
    if len(spatial) > 3:
        raise IngestError(
            f"{src}: {len(spatial)}D NIfTI is not supported (at most 3 spatial dims and one "
            "volume axis); split it into 3D or 4D files",
            code=Code.INVALID_NIFTI,
        )
    warnings: list[str] = []
    if len(spatial) == 3 and spatial[2] == 1 and n_volumes == 1:
        data = data.reshape(spatial[:2] + data.shape[3:])
        spatial = spatial[:2]
    if len(spatial) == 3:
        from nibabel.orientations import (
            OrientationError,
            apply_orientation,
            inv_ornt_aff,
            io_orientation,
        )

        try:
            if not is_ras_diagonal(affine):  # already RAS+ on its axes: nothing to do
                ornt = io_orientation(affine)
                data = apply_orientation(data, ornt)
                affine = affine @ inv_ornt_aff(ornt, spatial)
        except (ValueError, OrientationError):
            # a nearly degenerate affine (two axes almost parallel): no closest RAS+ axis
            raise IngestError(
                f"{src}: NIfTI affine has no clear axis orientation (axes nearly parallel); "
                "fix the header's sform/qform",
                code=Code.INVALID_NIFTI,
            ) from None
        dims = 3
    else:
        dims = 2
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        warnings.append("non_finite_values")
    values = to_output_dtype(np.asarray(data))
    img = LoadedImage(
        array=values,
        affine=affine,
        dims=dims,
        channels=channels,
        sources=[src],
        n_slices=int(spatial[2]) if dims == 3 else 1,
        n_volumes=n_volumes,
        warnings=warnings,
        meta={
            "format": "nifti",
            "qform_code": codes[0],
            "sform_code": codes[1],
        },
    )
    if n_volumes > 1:  # what the 4th axis holds is not in a NIfTI header we trust
        img.meta["volume_axis"] = {
            "format": "medres-volumes/1",
            "volume_axis": "other",
            "n_volumes": n_volumes,
            "key": "NIfTI 4th axis",
            "key_values": [str(k) for k in range(n_volumes)],
            "repetition_time_s": None,
        }
    return img


# NIfTI-1 datatype codes the fast path reads as plain arrays (no RGB, no complex)
_SIMPLE_DTYPES = {
    2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4",
}  # fmt: skip


def _read_simple_nii(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]] | None:
    """``(affine, data, (qform_code, sform_code))`` of a simple ``.nii``, else ``None``.

    The common case (what ingest writes): a single-file uncompressed NIfTI-1 with an
    sform, a plain numeric datatype and no scaling (slope 0/1/NaN, intercept 0). Its
    header is parsed with nibabel's own header dtype and the voxels are read with one
    ``np.fromfile`` at ``vox_offset``, which gives exactly what ``nib.load`` would
    (nibabel's best affine is the sform whenever ``sform_code != 0``; unscaled data keeps
    its on-disk dtype) at a fraction of the cost: nibabel's header checks and image
    construction cost ~0.5 ms per file, more than the read of a small image. Anything
    else (gzip, NIfTI-2, pairs, qform only, scaling, a short file, odd fields) returns
    ``None`` and takes the nibabel path, which also produces the coded errors.
    """
    from nibabel.nifti1 import header_dtype

    if not path.name.lower().endswith(".nii"):
        return None
    try:
        with open(path, "rb") as fh:
            block = fh.read(348)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return None
    if len(block) < 348 or block[344:348] != b"n+1\x00":
        return None
    for end in "<>":
        if struct.unpack(end + "i", block[:4])[0] == 348:
            break
    else:
        return None
    hdr = np.frombuffer(block, dtype=header_dtype.newbyteorder(end))[0]
    ndim = int(hdr["dim"][0])
    dtype = _SIMPLE_DTYPES.get(int(hdr["datatype"]))
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    offset = float(hdr["vox_offset"])
    if (
        dtype is None
        or not 2 <= ndim <= 7
        or int(hdr["sform_code"]) == 0
        or not (slope == 0 or not np.isfinite(slope) or (slope == 1 and inter == 0))
        or not np.isfinite(offset)  # a NaN/inf vox_offset: nibabel's path reports it
        or offset < 352
        or offset != int(offset)
    ):
        return None
    shape = tuple(int(d) for d in hdr["dim"][1 : ndim + 1])
    if any(d <= 0 for d in shape):
        return None
    dt = np.dtype(dtype).newbyteorder(end)
    count = int(np.prod(shape))
    if int(offset) + count * dt.itemsize > size:
        return None  # truncated: the nibabel path reports it with its code
    data = np.fromfile(path, dtype=dt, count=count, offset=int(offset))
    if len(data) != count:
        return None
    if not dt.isnative:
        data = data.astype(dt.newbyteorder("="))
    affine = np.eye(4)
    affine[0, :] = hdr["srow_x"]
    affine[1, :] = hdr["srow_y"]
    affine[2, :] = hdr["srow_z"]
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        return None  # the nibabel path rejects it with its code
    codes = (int(hdr["qform_code"]), int(hdr["sform_code"]))
    return affine, data.reshape(shape, order="F"), codes


def _has_shear(affine: np.ndarray) -> bool:
    m = affine[:3, :3]
    cols = m / np.linalg.norm(m, axis=0)
    off = cols.T @ cols - np.eye(3)
    return bool(np.max(np.abs(off)) > 1e-6)


def _write_nii(nimg: object, arr: np.ndarray, path: str) -> None:
    """Single-file NIfTI-1: 348-byte header, 4 zero extension bytes, voxels in F order.

    Writes the F-ordered voxels straight from the array's buffer (no ``tobytes`` copy when
    the array is already F-contiguous, which :func:`~medres.ingest.dicom.stack.load_stack` makes).
    """
    hdr = nimg.header  # type: ignore[attr-defined]
    hdr.set_data_offset(352)
    data = np.asfortranarray(arr)
    if data.dtype.byteorder == ">" or (data.dtype.byteorder == "=" and not np.little_endian):
        data = data.astype(data.dtype.newbyteorder("<"))
    hdr.set_data_dtype(data.dtype)
    if hdr.endianness != "<":
        hdr = hdr.as_byteswapped("<")
    with open(path, "wb") as fh:
        fh.write(hdr.binaryblock)
        fh.write(b"\x00" * 4)
        fh.write(memoryview(data.T).cast("B") if data.size else b"")


def sidecar_path(image_path: Path) -> Path:
    """The sidecar JSON of a 4D image: ``img-x.nii`` / ``img-x.nii.gz`` -> ``img-x.json``."""
    name = Path(image_path).name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name.removesuffix(".nii")
    return Path(image_path).with_name(stem + ".json")


def write_image(img: LoadedImage, path: Path) -> None:
    """Write ``img`` to ``path`` (``.nii`` or ``.nii.gz``) atomically; see the module docstring.
    A ``.nii`` is written without importing nibabel (:mod:`medres.ingest.niftihdr`: the same
    header bytes)."""
    from medres.ingest.niftihdr import lean_image

    path = Path(path)
    name = path.name
    if name.endswith(".nii.gz"):
        suffix = ".nii.gz"
    elif name.endswith(".nii"):
        suffix = ".nii"
    else:
        raise IngestError(
            f"{path}: output image name must end in .nii or .nii.gz", code=Code.INVALID_NIFTI
        )
    arr = img.array
    if arr.dtype not in (np.int16, np.float32):
        arr = to_output_dtype(arr)
    affine = np.asarray(img.affine, dtype=float)
    nimg: Any = lean_image(arr, affine) if suffix == ".nii" else None
    if nimg is None:
        import nibabel as nib

        nimg = nib.Nifti1Image(arr, affine)
    hdr = nimg.header
    hdr.set_sform(affine, code=1)
    if _has_shear(affine):
        hdr.set_qform(None, code=0)
    else:
        hdr.set_qform(affine, code=1)
    hdr.set_xyzt_units("mm")
    axis = img.meta.get("volume_axis") if img.n_volumes > 1 else None
    if axis is not None:  # 4D: pixdim[4] = the repetition time of a time axis (s)
        tr = axis.get("repetition_time_s") if axis.get("volume_axis") == "time" else None
        hdr["pixdim"][4] = float(tr) if tr else 1.0
        hdr.set_xyzt_units("mm", "sec" if tr else "unknown")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        if suffix == ".nii.gz":
            import nibabel as nib

            nib.openers.Opener.default_compresslevel = 1
            nib.save(nimg, tmp)
        else:
            _write_nii(nimg, arr, tmp)
        if axis is not None:  # the sidecar first: an image on disk always has its sidecar
            atomic_write_json(sidecar_path(path), axis)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
