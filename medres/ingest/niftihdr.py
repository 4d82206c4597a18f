"""The NIfTI-1 header of an image medres writes, built without importing nibabel.

:class:`LeanImage` (from :func:`lean_image`) stands in for ``nibabel.Nifti1Image(arr,
affine)`` where :func:`medres.ingest.nifti.write_image` writes a ``.nii``: its
:class:`LeanHeader` holds the same 348 bytes after the same calls (``set_sform``,
``set_qform``, ``set_xyzt_units``, ...): the same quaternion (nibabel's ``mat2quat`` of the
shear-stripped rotation), ``qfac``, zooms and defaults (``scl_slope``/``scl_inter`` NaN,
``magic`` ``n+1``). ``.nii`` writing then needs
numpy only: importing nibabel costs more than writing a small series (~0.6 s with the
pydicom and scipy it imports). ``tests/unit/test_orientation.py`` compares the bytes with
nibabel's. Imports numpy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DATATYPES", "HEADER_DTYPE", "LeanHeader", "LeanImage", "lean_image"]

# the NIfTI-1 header layout (as nibabel.nifti1.header_dtd), little endian
HEADER_DTYPE = np.dtype(
    [
        ("sizeof_hdr", "<i4"), ("data_type", "S10"), ("db_name", "S18"),
        ("extents", "<i4"), ("session_error", "<i2"), ("regular", "S1"),
        ("dim_info", "u1"), ("dim", "<i2", (8,)), ("intent_p1", "<f4"),
        ("intent_p2", "<f4"), ("intent_p3", "<f4"), ("intent_code", "<i2"),
        ("datatype", "<i2"), ("bitpix", "<i2"), ("slice_start", "<i2"),
        ("pixdim", "<f4", (8,)), ("vox_offset", "<f4"), ("scl_slope", "<f4"),
        ("scl_inter", "<f4"), ("slice_end", "<i2"), ("slice_code", "u1"),
        ("xyzt_units", "u1"), ("cal_max", "<f4"), ("cal_min", "<f4"),
        ("slice_duration", "<f4"), ("toffset", "<f4"), ("glmax", "<i4"),
        ("glmin", "<i4"), ("descrip", "S80"), ("aux_file", "S24"),
        ("qform_code", "<i2"), ("sform_code", "<i2"), ("quatern_b", "<f4"),
        ("quatern_c", "<f4"), ("quatern_d", "<f4"), ("qoffset_x", "<f4"),
        ("qoffset_y", "<f4"), ("qoffset_z", "<f4"), ("srow_x", "<f4", (4,)),
        ("srow_y", "<f4", (4,)), ("srow_z", "<f4", (4,)), ("intent_name", "S16"),
        ("magic", "S4"),
    ]
)  # fmt: skip
# numpy dtype -> (NIfTI datatype code, bits per voxel): the plain numeric types
DATATYPES = {
    np.dtype("uint8"): (2, 8),
    np.dtype("int16"): (4, 16),
    np.dtype("int32"): (8, 32),
    np.dtype("float32"): (16, 32),
    np.dtype("float64"): (64, 64),
    np.dtype("int8"): (256, 8),
    np.dtype("uint16"): (512, 16),
    np.dtype("uint32"): (768, 32),
}


def _mat2quat(m: np.ndarray) -> np.ndarray:
    """nibabel's ``quaternions.mat2quat``: (w, x, y, z) of a rotation, w >= 0."""
    qxx, qyx, qzx, qxy, qyy, qzy, qxz, qyz, qzz = m.flat
    k = (
        np.array(
            [
                [qxx - qyy - qzz, 0, 0, 0],
                [qyx + qxy, qyy - qxx - qzz, 0, 0],
                [qzx + qxz, qzy + qyz, qzz - qxx - qyy, 0],
                [qyz - qzy, qzx - qxz, qxy - qyx, qxx + qyy + qzz],
            ]
        )
        / 3.0
    )
    vals, vecs = np.linalg.eigh(k)
    q = vecs[[3, 0, 1, 2], np.argmax(vals)]
    if q[0] < 0:
        q *= -1
    return q


def _set_qform_fields(hdr: np.ndarray, affine: np.ndarray) -> None:
    """Quaternion, offsets, qfac and zooms from ``affine`` (shears stripped), as nibabel's
    ``Nifti1Header.set_qform``."""
    rzs = affine[:3, :3]
    zooms = np.sqrt(np.sum(rzs * rzs, axis=0))
    r = rzs / zooms
    if np.linalg.det(r) > 0:
        qfac = 1
    else:
        qfac = -1
        r[:, -1] *= -1
    u, _s, vt = np.linalg.svd(r)
    quat = _mat2quat(np.dot(u, vt))
    hdr["qoffset_x"], hdr["qoffset_y"], hdr["qoffset_z"] = affine[:3, 3]
    hdr["pixdim"][0] = qfac
    hdr["pixdim"][1:4] = zooms
    hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"] = quat[1:]


_UNITS = {"unknown": 0, "meter": 1, "mm": 2, "micron": 3, "sec": 8, "msec": 16, "usec": 24}


class LeanHeader:
    """The part of ``nibabel.Nifti1Header`` that :func:`medres.ingest.nifti.write_image`
    uses, over the same structured array: ``set_sform``, ``set_qform``, ``set_xyzt_units``,
    item access, ``set_data_offset``, ``set_data_dtype``, ``endianness`` and
    ``binaryblock``. Made as ``Nifti1Image(arr, affine)`` makes its header (dims, dtype,
    qform and sform from the affine with code 2)."""

    endianness = "<"

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, affine: np.ndarray) -> None:
        affine = np.asarray(affine, dtype=float)
        hdr = np.zeros((), dtype=HEADER_DTYPE)
        hdr["sizeof_hdr"] = 348
        hdr["dim"] = [len(shape), *shape] + [1] * (7 - len(shape))
        hdr["pixdim"] = 1
        hdr["vox_offset"] = 0
        hdr["scl_slope"] = np.nan
        hdr["scl_inter"] = np.nan
        hdr["magic"] = b"n+1"
        self._hdr = hdr
        self.set_data_dtype(dtype)
        self.set_qform(affine, code=2)
        self.set_sform(affine, code=2)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._hdr[name]

    def __setitem__(self, name: str, value: object) -> None:
        self._hdr[name] = value

    def set_sform(self, affine: np.ndarray | None, code: int = 1) -> None:
        self._hdr["sform_code"] = code
        if affine is not None:
            a = np.asarray(affine, dtype=float)
            self._hdr["srow_x"], self._hdr["srow_y"], self._hdr["srow_z"] = a[0], a[1], a[2]

    def set_qform(self, affine: np.ndarray | None, code: int = 1) -> None:
        self._hdr["qform_code"] = code
        if affine is not None:
            _set_qform_fields(self._hdr, np.asarray(affine, dtype=float))

    def set_xyzt_units(self, xyz: str | None = None, t: str | None = None) -> None:
        self._hdr["xyzt_units"] = _UNITS[xyz or "unknown"] + _UNITS[t or "unknown"]

    def set_data_offset(self, offset: int) -> None:
        self._hdr["vox_offset"] = offset

    def set_data_dtype(self, dtype: np.dtype) -> None:
        dt = np.dtype(dtype)
        self._hdr["datatype"], self._hdr["bitpix"] = DATATYPES[dt.newbyteorder("=")]

    @property
    def binaryblock(self) -> bytes:
        return self._hdr.tobytes()


class LeanImage:
    """What :func:`medres.ingest.nifti.write_image` needs of ``nibabel.Nifti1Image`` to
    write a ``.nii``: its :class:`LeanHeader`."""

    def __init__(self, arr: np.ndarray, affine: np.ndarray) -> None:
        self.header = LeanHeader(arr.shape, arr.dtype, affine)


def lean_image(arr: np.ndarray, affine: np.ndarray) -> LeanImage | None:
    """A :class:`LeanImage` for ``arr``, or ``None`` for a dtype or shape it does not cover
    (the caller then uses nibabel)."""
    dt = np.dtype(arr.dtype)
    if dt.newbyteorder("=") not in DATATYPES or not 1 <= arr.ndim <= 7:
        return None
    if any(int(d) > 32767 for d in arr.shape):
        return None
    return LeanImage(arr, affine)
