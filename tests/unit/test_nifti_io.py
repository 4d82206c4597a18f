"""NIfTI detection, loading to canonical RAS+, validation, and the canonical writer."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.image import LoadedImage
from medres.ingest.nifti import is_nifti, load_nifti, write_image

LPS_AFFINE = np.array(
    [[-0.8, 0.0, 0.0, 100.0], [0.0, -0.7, 0.0, 120.0], [0.0, 0.0, 2.5, -30.0], [0.0, 0.0, 0.0, 1.0]]
)
SAGITTAL = np.array(  # voxel axes: i -> -y (P), j -> -z (I), k -> +x (R)
    [[0.0, 0.0, 1.5, -10.0], [-0.9, 0.0, 0.0, 40.0], [0.0, -1.1, 0.0, 60.0], [0.0, 0.0, 0.0, 1.0]]
)


def _save(path: Path, data: np.ndarray, affine: np.ndarray, **hdr) -> Path:
    img = nib.Nifti1Image(data, affine)
    for k, v in hdr.items():
        img.header[k] = v
    nib.save(img, path)
    return path


@pytest.mark.parametrize("affine", [LPS_AFFINE, SAGITTAL, np.diag([1.0, 2.0, 3.0, 1.0])])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_load_is_canonical_and_keeps_world_coordinates(tmp_path: Path, affine, suffix) -> None:
    data = np.random.default_rng(0).integers(-500, 500, size=(4, 5, 6)).astype(np.int16)
    p = _save(tmp_path / f"x{suffix}", data, affine)
    img = load_nifti(p, "src/x")
    assert img.dims == 3 and img.sources == ["src/x"] and img.array.dtype == np.int16
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert sorted(img.shape) == sorted(data.shape)
    inv = np.linalg.inv(img.affine)
    for ijk in [(0, 0, 0), (3, 4, 5), (1, 2, 3), (2, 0, 4)]:
        world = affine @ np.array([*ijk, 1.0])
        x, y, z = (round(v) for v in (inv @ world)[:3])
        assert img.array[x, y, z] == data[ijk]


def test_scaling_and_dtype_rules(tmp_path: Path) -> None:
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    p = tmp_path / "s.nii"
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, p)
    out = load_nifti(p)
    assert out.array.dtype == np.float32 and np.allclose(out.array, raw * 0.5 - 3.0)
    integral = _save(tmp_path / "i.nii", (raw * 2.0).astype(np.float64), np.eye(4))
    assert load_nifti(integral).array.dtype == np.int16
    big = _save(tmp_path / "b.nii", (raw.astype(np.uint16) + 40000), np.eye(4))
    assert load_nifti(big).array.dtype == np.float32
    assert float(load_nifti(big).array.max()) == 40023.0


def test_2d_inputs(tmp_path: Path) -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    for name, data in [("a.nii", a), ("b.nii", a[:, :, None])]:
        img = load_nifti(_save(tmp_path / name, data, np.diag([0.5, 0.6, 1.0, 1.0])))
        assert img.dims == 2 and img.shape == (3, 4) and img.spacing == (0.5, 0.6)
        assert np.array_equal(img.array, a)


def test_4d(tmp_path: Path) -> None:
    one = load_nifti(_save(tmp_path / "one.nii", np.zeros((3, 4, 5, 1), np.int16), np.eye(4)))
    assert one.dims == 3 and one.shape == (3, 4, 5)
    many = load_nifti(_save(tmp_path / "many.nii", np.zeros((3, 4, 5, 2), np.int16), np.eye(4)))
    assert many.n_volumes == 2 and many.shape == (3, 4, 5)  # 4D kept (issue 15)
    with pytest.raises(IngestError) as exc:
        load_nifti(_save(tmp_path / "5d.nii", np.zeros((3, 4, 5, 2, 2), np.int16), np.eye(4)))
    assert exc.value.code == Code.INVALID_NIFTI and "split it into 3D or 4D" in str(exc.value)


def test_rgb24(tmp_path: Path) -> None:
    rgb = np.zeros((3, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"], rgb["G"], rgb["B"] = 10, 20, 30
    img = load_nifti(_save(tmp_path / "c.nii", rgb, np.eye(4)))
    assert (
        img.channels == 3
        and img.array.shape == (3, 4, 3)
        and img.array[0, 0].tolist() == [10, 20, 30]
    )


def test_invalid_inputs(tmp_path: Path) -> None:
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"\x00" * 20 + b"not nifti" * 50)
    with pytest.raises(IngestError) as exc:
        load_nifti(junk)
    assert exc.value.code == Code.INVALID_NIFTI
    sing = _save(tmp_path / "sing.nii", np.zeros((2, 2, 2), np.int16), np.eye(4))
    raw = bytearray(sing.read_bytes())  # patch the header: sform (code 1) with a zero row
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])))
    hdr["srow_x"] = [0.0, 0.0, 0.0, 0.0]
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    raw[:348] = hdr.binaryblock
    sing.write_bytes(bytes(raw))
    with pytest.raises(IngestError) as exc:
        load_nifti(sing)
    assert exc.value.code == Code.INVALID_NIFTI
    full = _save(tmp_path / "full.nii", np.ones((16, 16, 16), np.int16), np.eye(4))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(full.read_bytes()[:2000])
    with pytest.raises(IngestError) as exc:
        load_nifti(cut)
    assert exc.value.code == Code.TRUNCATED
    with pytest.raises(IngestError) as exc:
        load_nifti(tmp_path / "missing.nii")
    assert exc.value.code == Code.UNREADABLE


def test_is_nifti_by_content(tmp_path: Path) -> None:
    p = _save(tmp_path / "a.nii", np.zeros((2, 2, 2), np.int16), np.eye(4))
    renamed = tmp_path / "noext"
    renamed.write_bytes(p.read_bytes())
    gz = tmp_path / "b.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    two = tmp_path / "c.nii"
    nib.save(nib.Nifti2Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), two)
    assert all(is_nifti(x) for x in (p, renamed, gz, two))
    junk = tmp_path / "j.nii"
    junk.write_bytes(b"x" * 400)
    assert not is_nifti(junk) and not is_nifti(tmp_path / "absent.nii") and not is_nifti(tmp_path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64, np.uint8])
def test_write_roundtrip(tmp_path: Path, suffix: str, dtype) -> None:
    arr = np.asarray(np.random.default_rng(2).integers(-100, 100, size=(5, 4, 3)), dtype=dtype)
    if dtype == np.float32:
        arr = arr + 0.25
    img = LoadedImage(array=arr[::-1], affine=LPS_AFFINE, dims=3)  # non-contiguous view
    out = tmp_path / f"o{suffix}"
    write_image(img, out)
    back = nib.load(out)
    expected_dtype = np.float32 if dtype == np.float32 else np.int16
    assert back.get_data_dtype() == expected_dtype
    assert np.array_equal(np.asanyarray(back.dataobj), arr[::-1])
    assert np.allclose(back.affine, LPS_AFFINE)
    assert int(back.header["sform_code"]) == 1 and int(back.header["qform_code"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left


def test_write_2d_and_colour(tmp_path: Path) -> None:
    rgb = np.random.default_rng(3).integers(0, 255, size=(6, 5, 3)).astype(np.int16)
    write_image(
        LoadedImage(array=rgb, affine=np.diag([0.2, 0.3, 1.0, 1.0]), dims=2, channels=3),
        tmp_path / "c.nii",
    )
    assert np.array_equal(np.asanyarray(nib.load(tmp_path / "c.nii").dataobj), rgb)


def test_write_sheared_affine_drops_qform(tmp_path: Path) -> None:
    shear = np.array([[-0.7, 0, 0, 0], [0, -0.7, 0.67, 0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]])
    write_image(
        LoadedImage(array=np.zeros((2, 2, 2), np.int16), affine=shear, dims=3), tmp_path / "s.nii"
    )
    back = nib.load(tmp_path / "s.nii")
    assert np.allclose(back.affine, shear) and int(back.header["qform_code"]) == 0


def test_write_rejects_other_suffix(tmp_path: Path) -> None:
    with pytest.raises(IngestError):
        write_image(
            LoadedImage(array=np.zeros((2, 2), np.int16), affine=np.eye(4), dims=2),
            tmp_path / "x.mha",
        )
