"""NIfTI input and the canonical on-disk image (read, validate, write).

Choices made (docs/architecture.md, "Canonical image on disk"):

- :func:`load_nifti` reads NIfTI-1/2 (``.nii``, ``.nii.gz``, ``.hdr``/``.img``) with nibabel,
  applies ``scl_slope``/``scl_inter``, rejects a non-finite or singular affine, and
  reorients 3D data to the closest canonical RAS+ orientation by permuting and flipping
  axes only (never resampling), so every voxel keeps its world coordinate. 2D data (and
  ``X x Y x 1``) stays as (X, Y). A 4th dimension of size 1 is dropped; real 4D series are
  rejected (split them into 3D files). RGB24 data becomes a trailing channel axis of 3.
- :func:`write_image` writes exactly the array and affine of a
  :class:`~medres.ingest.image.LoadedImage`: int16 when all values are integral and fit,
  else float32; sform = the affine (code 1, scanner); qform = the same when the affine has
  no shear, else unset (code 0) because a qform cannot hold the shear of a gantry-tilted
  CT. The suffix chooses the format: uncompressed ``.nii`` is several times cheaper to
  write and read than ``.nii.gz`` (gzip level 1 is used when asked for). The write is
  atomic (temp file, then ``os.replace``).
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.image import LoadedImage

log = logging.getLogger(__name__)

__all__ = ["is_nifti", "load_nifti", "write_image"]

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


def _to_output_dtype(a: np.ndarray) -> np.ndarray:
    from medres.ingest.dicom import _to_output_dtype as conv

    return conv(a)


def load_nifti(path: Path, source: str = "") -> LoadedImage:
    """Read one NIfTI file into a canonical :class:`LoadedImage`.

    Raises ``IngestError`` with ``invalid_nifti`` (corrupt header, bad affine, unsupported
    shape), ``truncated`` (data shorter than the header says) or ``unreadable`` (I/O).
    """
    import nibabel as nib

    path = Path(path)
    src = source or str(path)
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
        raise IngestError(
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
    channels = 1
    if data.dtype.names:  # RGB24 / RGBA32 structured
        data = np.stack([data[n] for n in data.dtype.names[:3]], axis=-1)
        channels = 3
    spatial = data.shape[: data.ndim - (1 if channels > 1 else 0)]
    while len(spatial) > 3 and spatial[-1] == 1:
        data = data.reshape(spatial[:-1] + data.shape[len(spatial) :])
        spatial = spatial[:-1]
    if len(spatial) > 3:
        raise IngestError(
            f"{src}: 4D NIfTI with {spatial[3]} volumes is not supported; split it into 3D files",
            code=Code.INVALID_NIFTI,
        )
    warnings: list[str] = []
    if len(spatial) == 3 and spatial[2] == 1:
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
    values = _to_output_dtype(np.asarray(data))
    return LoadedImage(
        array=values,
        affine=affine,
        dims=dims,
        channels=channels,
        sources=[src],
        n_slices=int(spatial[2]) if dims == 3 else 1,
        warnings=warnings,
        meta={
            "format": "nifti",
            "qform_code": int(img.header["qform_code"]),
            "sform_code": int(img.header["sform_code"]),
        },
    )


def _has_shear(affine: np.ndarray) -> bool:
    m = affine[:3, :3]
    cols = m / np.linalg.norm(m, axis=0)
    off = cols.T @ cols - np.eye(3)
    return bool(np.max(np.abs(off)) > 1e-6)


def _write_nii(nimg: object, arr: np.ndarray, path: str) -> None:
    """Single-file NIfTI-1: 348-byte header, 4 zero extension bytes, voxels in F order.

    Writes the F-ordered voxels straight from the array's buffer (no ``tobytes`` copy when
    the array is already F-contiguous, which :func:`~medres.ingest.dicom.load_stack` makes).
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


def write_image(img: LoadedImage, path: Path) -> None:
    """Write ``img`` to ``path`` (``.nii`` or ``.nii.gz``) atomically; see the module docstring."""
    import nibabel as nib

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
        arr = _to_output_dtype(arr)
    affine = np.asarray(img.affine, dtype=float)
    nimg = nib.Nifti1Image(arr, affine)
    hdr = nimg.header
    hdr.set_sform(affine, code=1)
    if _has_shear(affine):
        hdr.set_qform(None, code=0)
    else:
        hdr.set_qform(affine, code=1)
    hdr.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        if suffix == ".nii.gz":
            nib.openers.Opener.default_compresslevel = 1
            nib.save(nimg, tmp)
        else:
            _write_nii(nimg, arr, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
