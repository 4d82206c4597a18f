"""Uneven slice spacing and missing slices: resampled onto a regular grid (or rejected).

Each test writes a tiny CT series whose values are a linear function of the world
coordinate, so linear resampling along the slice line is exact: every voxel of the result
must equal the field at the world coordinate its affine gives it.
"""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from medres.cli.app import app
from medres.ingest.codes import Code
from medres.ingest.dicom import GeometryPolicy, group_stacks, load_stack, scan_headers
from medres.ingest.dicom.resample import plan_grid, resample_slices

ROWS, COLS = 5, 6
ORIGIN = (-3.0, 2.0, 40.0)  # LPS, integral so that the int16 field is integral


def field(lps: np.ndarray) -> np.ndarray:
    """The known field (HU) at LPS world coordinates (last axis x, y, z)."""
    return 3.0 * lps[..., 0] + 2.0 * lps[..., 1] + 10.0 * lps[..., 2] + 100.0


def write_series(
    folder: Path,
    z: list[float],
    *,
    tilt_deg: float = 0.0,
    slope: float = 1.0,
    intercept: float = -1024.0,
    values: np.ndarray | None = None,
    ascending_instances: bool = False,
) -> list[Path]:
    """Axial slices at distances ``z`` (mm along the normal) from ORIGIN; with ``tilt_deg``
    the slice origins move along y too (gantry tilt). Stored values hold :func:`field`
    through the rescale, unless ``values`` (slices, rows, cols) are given. InstanceNumber
    runs against the spatial order unless ``ascending_instances``."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for k, dz in enumerate(z):
        pos = np.array(ORIGIN) + np.array([0.0, dz * math.tan(math.radians(tilt_deg)), dz])
        jj, ii = np.mgrid[0:ROWS, 0:COLS]
        world = np.stack([pos[0] + ii * 1.0, pos[1] + jj * 1.0, np.full(ii.shape, pos[2])], -1)
        stored = (field(world) - intercept) / slope if values is None else values[k]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.Modality, ds.InstanceNumber = "P1", "CT", len(z) - k
        if ascending_instances:
            ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns, ds.SamplesPerPixel = ROWS, COLS, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.PixelSpacing = ["1.0", "1.0"]
        ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(intercept)
        ds.PixelData = np.rint(stored).astype(np.int16).tobytes()
        path = folder / f"s{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def stacks_of(paths: list[Path], policy: GeometryPolicy | None = None):
    headers, rej = scan_headers(paths)
    assert rej == []
    return group_stacks(headers, policy or GeometryPolicy())


def world_lps(img) -> np.ndarray:
    """LPS world coordinate of every voxel of ``img`` (through its RAS affine)."""
    idx = np.indices(img.array.shape, dtype=float).reshape(3, -1)
    ras = img.affine[:3, :3] @ idx + img.affine[:3, 3:4]
    lps = np.stack([-ras[0], -ras[1], ras[2]], -1)
    return lps.reshape(*img.array.shape, 3)


def test_uneven_int16_ct_resampled_exactly_at_smallest_gap(tmp_path: Path) -> None:
    z = [0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 9.0, 11.0]  # 1 mm then 2 mm sections
    stacks, rej = stacks_of(write_series(tmp_path, z))
    assert rej == [] and len(stacks) == 1
    img = load_stack(stacks[0])
    assert img.array.dtype == np.int16  # HU stay integral (rounded back, here exact)
    assert img.array.shape == (COLS, ROWS, 12) and img.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(img.array, field(world_lps(img)))
    (w,) = [w for w in img.warnings if w.startswith("uneven_spacing_resampled:")]
    assert "gaps 1..2 mm (2 distinct)" in w and "resampled to 1 mm (8 -> 12 slices)" in w


@pytest.mark.parametrize("tilt", [0.0, 12.0])
def test_uneven_float_values_and_tilt_match_field_through_affine(tmp_path: Path, tilt) -> None:
    z = [0.0, 1.3, 2.6, 5.0, 8.7, 9.9]  # gaps 1.3, 1.3, 2.4, 3.7, 1.2: nothing commensurate
    stacks, rej = stacks_of(write_series(tmp_path, z, tilt_deg=tilt, slope=0.25, intercept=-7.3))
    assert rej == []
    img = load_stack(stacks[0])
    assert img.array.dtype == np.float32  # non-integral values stay float32
    # intervals = ceil(9.9 / 1.2) = 9 -> 10 slices at 1.1 mm along the normal
    assert img.array.shape[2] == 10
    # stored values are rounded to 1/4 HU (error <= 1/8), interpolation adds none
    np.testing.assert_allclose(img.array, field(world_lps(img)), rtol=0, atol=0.126)
    w = " ".join(img.warnings)
    assert "gaps 1.2..3.7 mm (4 distinct)" in w and "(6 -> 10 slices)" in w
    assert ("gantry_tilt:12.00deg" in w) == (tilt > 0)
    step = img.affine[:3, 2]  # the grid step along the (sheared) slice line
    assert np.linalg.norm(step) == pytest.approx(1.1 / math.cos(math.radians(tilt)), abs=1e-4)


def test_missing_slice_interpolated_present_slices_copied(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 3000, size=(8, ROWS, COLS)).astype(np.int16)
    z = [2.5 * k for k in range(8) if k != 4]  # slice 4 missing
    paths = write_series(tmp_path, z, values=np.delete(vol, 4, axis=0))
    stacks, rej = stacks_of(paths)
    assert rej == []
    img = load_stack(stacks[0])
    assert img.array.dtype == np.int16 and img.array.shape == (COLS, ROWS, 8)
    hu = vol.astype(np.float64) - 1024.0
    for k in range(8):
        got = img.array[::-1, ::-1, k].T  # canonical RAS+ flips columns and rows
        want = np.rint((hu[3] + hu[5]) / 2) if k == 4 else hu[k]
        np.testing.assert_array_equal(got, want)
    assert any(
        w.startswith("missing_slices_interpolated:1 of 8 slices interpolated") for w in img.warnings
    )


def test_reject_option_keeps_strict_rejection(tmp_path: Path) -> None:
    strict = GeometryPolicy(uneven_spacing="reject")
    uneven = write_series(tmp_path / "u", [0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 9.0])
    stacks, rej = stacks_of(uneven, strict)
    assert stacks == [] and [r.code for r in rej] == [Code.INCONSISTENT_GEOMETRY]
    assert "--uneven-spacing resample" in rej[0].message
    missing = write_series(tmp_path / "m", [0.0, 2.5, 5.0, 10.0, 12.5])
    stacks, rej = stacks_of(missing, strict)
    assert stacks == [] and [r.code for r in rej] == [Code.MISSING_SLICES]


def test_gap_of_two_stacks_is_not_bridged(tmp_path: Path) -> None:
    stacks, rej = stacks_of(write_series(tmp_path, [0.0, 2.0, 4.0, 6.0, 200.0, 202.0]))
    assert stacks == [] and [r.code for r in rej] == [Code.INCONSISTENT_GEOMETRY]
    assert "not interpolated" in rej[0].message


def test_grid_is_capped_at_twice_the_slices() -> None:
    d = [0.0, 0.1, 10.0, 20.0, 30.0]  # one odd 0.1 mm gap would mean 300 intervals
    grid = plan_grid(d, GeometryPolicy())
    assert grid.n_out == 10 and grid.spacing == pytest.approx(30.0 / 9)
    assert grid.positions[0] == 0.0 and grid.positions[-1] == 9.0


def test_resample_slices_interpolates_and_copies() -> None:
    v = np.array([[0.0], [10.0], [40.0]], dtype=np.float32)
    out = resample_slices(v, (0.0, 1.0, 4.0), 5)
    np.testing.assert_allclose(out[:, 0], [0.0, 10.0, 20.0, 30.0, 40.0])
    iv = np.array([[0], [1]], dtype=np.int16)
    assert resample_slices(iv, (0.0, 3.0), 4).dtype == np.int16
    with pytest.raises(ValueError):
        resample_slices(v, (0.0, 2.0, 1.0), 3)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_cli_resamples_by_default_and_rejects_on_request(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_series(src, [0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 9.0])
    runner = CliRunner()
    out = tmp_path / "out"
    r = runner.invoke(app, ["ingest", str(src), "--out", str(out), "-j", "1"])
    assert r.exit_code == 0, r.output
    (row,) = _rows(out / "manifest.csv")
    assert row["shape"] == f"{COLS}x{ROWS}x10" and "uneven_spacing_resampled:" in row["warnings"]
    strict = tmp_path / "strict"
    r = runner.invoke(
        app, ["ingest", str(src), "--out", str(strict), "-j", "1", "--uneven-spacing", "reject"]
    )
    assert r.exit_code != 0 or not _rows(strict / "manifest.csv")
    codes = {e["code"] for e in _rows(strict / "errors.csv")}
    assert codes == {"inconsistent_geometry"}
    r = runner.invoke(
        app, ["ingest", str(src), "--out", str(tmp_path / "x"), "--uneven-spacing", "bad"]
    )
    assert r.exit_code == 1 and "--uneven-spacing" in r.output


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed (apt)")
def test_matches_dcm2niix_equalized_volume_in_world(tmp_path: Path) -> None:
    """dcm2niix writes an ``_Eq`` volume at the smallest gap too: every one of its voxels
    has our value at the same world position. (InstanceNumber follows the spatial order:
    dcm2niix v1.0.20220720 pairs the gaps with the wrong slices when it runs backwards.)"""
    import nibabel as nib

    z = [0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 9.0, 11.0]
    paths = write_series(tmp_path / "src", z, ascending_instances=True)
    out = tmp_path / "d2n"
    out.mkdir()
    subprocess.run(
        ["dcm2niix", "-z", "n", "-f", "img", "-o", str(out), str(tmp_path / "src")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    (eq_path,) = out.glob("img_Eq*.nii")
    eq = nib.load(eq_path)
    ref = np.asanyarray(eq.dataobj).astype(np.float64)
    stacks, _ = stacks_of(paths)
    img = load_stack(stacks[0])
    assert ref.shape[2] >= 9  # dcm2niix stops half its last gap short of the last slice
    idx = np.indices(ref.shape).reshape(3, -1)
    world = eq.affine[:3, :3] @ idx + eq.affine[:3, 3:4]
    inv = np.linalg.inv(img.affine)
    ours = inv[:3, :3] @ world + inv[:3, 3:4]
    np.testing.assert_allclose(ours, np.round(ours), atol=1e-3)  # same grid in the world
    o = np.round(ours).astype(int)
    np.testing.assert_array_equal(img.array[o[0], o[1], o[2]], ref[tuple(idx)])


def test_synth_gap_defects_are_kept_with_warnings_by_default(tmp_path: Path) -> None:
    """`medres synth`'s missing-slice and uneven-spacing series: kept (resampled) by default."""
    from medres.synth import SynthSpec, generate

    spec = SynthSpec(
        kind="ct", n_patients=3, shape=(12, 10, 8), messy=("missing_slice", "uneven_spacing")
    )
    res = generate(spec, tmp_path / "synth")
    seen = {}
    for row in res.truth:
        stacks, rej = stacks_of([res.out_dir / p for p in row.paths])
        assert rej == [] and len(stacks) == 1, row.defect
        img = load_stack(stacks[0])
        seen[row.defect] = [w.split(":")[0] for w in img.warnings]
        assert img.array.dtype == np.int16  # CT stays HU int16
    assert "missing_slices_interpolated" in seen["missing_slice"]
    assert "uneven_spacing_resampled" in seen["uneven_spacing"]
    assert not any("interpolated" in w or "resampled" in w for w in seen[""])
