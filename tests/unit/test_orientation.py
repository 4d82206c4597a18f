"""medres' nibabel-free orientation and NIfTI-1 header equal nibabel's, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
from nibabel import orientations as nibo  # noqa: E402

from medres.ingest import orientation as mo  # noqa: E402
from medres.ingest.image import LoadedImage  # noqa: E402
from medres.ingest.nifti import _has_shear, write_image  # noqa: E402
from medres.ingest.niftihdr import lean_image  # noqa: E402


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _affines(n: int = 60) -> list[np.ndarray]:
    """Oblique, axis-aligned (permuted and flipped) and sheared affines."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if i % 3 == 0:
            m = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], 3)
        else:
            m = _rotation(rng)
        m = m @ np.diag(rng.uniform(0.3, 5, 3))
        if i % 5 == 0:
            m[:, 2] += 0.25 * m[:, 0]  # gantry-tilt-like shear
        aff = np.eye(4)
        aff[:3, :3] = m
        aff[:3, 3] = rng.uniform(-200, 200, 3)
        out.append(aff)
    return out


@pytest.mark.parametrize("aff", _affines())
def test_orientation_equals_nibabel(aff):
    shape = (4, 5, 6)
    arr = np.arange(np.prod(shape)).reshape(shape)
    ours, theirs = mo.io_orientation(aff), nibo.io_orientation(aff)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(mo.inv_ornt_aff(ours, shape), nibo.inv_ornt_aff(theirs, shape))
    assert np.array_equal(mo.apply_orientation(arr, ours), nibo.apply_orientation(arr, theirs))


def _nibabel_header(arr: np.ndarray, affine: np.ndarray) -> bytes:
    """The header write_image wrote with nibabel before the lean writer."""
    hdr = nib.Nifti1Image(arr, affine).header
    hdr.set_sform(affine, code=1)
    if _has_shear(affine):
        hdr.set_qform(None, code=0)
    else:
        hdr.set_qform(affine, code=1)
    hdr.set_xyzt_units("mm")
    hdr.set_data_offset(352)
    hdr.set_data_dtype(arr.dtype)
    return hdr.binaryblock


@pytest.mark.parametrize("i", range(0, 60, 7))
@pytest.mark.parametrize(
    ("shape", "dtype"), [((5, 4, 3), np.int16), ((6, 5), np.float32), ((3, 4, 5, 2), np.int16)]
)
def test_lean_header_equals_nibabel(i, shape, dtype):
    aff = _affines()[i]
    arr = np.zeros(shape, dtype)
    lean = lean_image(arr, aff)
    assert lean is not None
    h = lean.header
    h.set_sform(aff, code=1)
    if _has_shear(aff):
        h.set_qform(None, code=0)
    else:
        h.set_qform(aff, code=1)
    h.set_xyzt_units("mm")
    h.set_data_offset(352)
    h.set_data_dtype(arr.dtype)
    assert h.binaryblock == _nibabel_header(arr, aff)


@pytest.mark.parametrize("i", [1, 3, 5])
def test_written_nii_reads_back_through_nibabel(tmp_path, i):
    aff = _affines()[i]
    arr = np.asfortranarray(np.arange(60, dtype=np.int16).reshape(5, 4, 3))
    img = LoadedImage(array=arr, affine=aff, dims=3)
    write_image(img, tmp_path / "a.nii")
    assert (tmp_path / "a.nii").read_bytes()[:348] == _nibabel_header(arr, aff)
    back = nib.load(tmp_path / "a.nii")
    assert np.array_equal(np.asanyarray(back.dataobj), arr)
    assert np.allclose(back.affine, aff, atol=1e-4)
