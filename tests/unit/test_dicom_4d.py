"""Multi-volume (4D) DICOM series: split by each key, checked voxel by voxel through the affine.

Every constructed series is a few 4x3 slices; each test writes the files with pydicom,
runs the real scan -> group -> load path, and checks that every stored pixel of every file
lands, through the written image's affine, at the voxel of its world position in the volume
its key says (``assert_lands``), plus the sidecar values. The opt-in test at the end
compares GE classic fMRI (dcm_qa_nih) with dcm2niix.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from medres.cli.app import app
from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.dicom import group_stacks, load_stack, scan_headers
from medres.ingest.nifti import sidecar_path, write_image

MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
ROWS, COLS, NZ = 4, 3, 3
OBLIQUE = (0.9950042, 0.0, 0.0998334, 0.0, 1.0, 0.0)  # rows tilted 5.7 deg about y
SPACING = (0.8, 0.7)  # (row spacing, column spacing)
STEP = 2.5
REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "dcm_qa_nih" / "In"


def _normal(o: tuple[float, ...]) -> np.ndarray:
    return np.cross(np.array(o[:3]), np.array(o[3:]))


def _pos(z: int, o: tuple[float, ...] = OBLIQUE) -> tuple[float, float, float]:
    p = np.array([-20.0, 10.0, 30.0]) + z * STEP * _normal(o)
    return (float(p[0]), float(p[1]), float(p[2]))


def _pixels(t: int, z: int) -> np.ndarray:
    """Values unique per (volume, slice, pixel)."""
    return (1000 * t + 100 * z + np.arange(ROWS * COLS).reshape(ROWS, COLS)).astype(np.int16)


def _meta(sop_class: str, ts: str = ExplicitVRLittleEndian) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Manufacturer = "ACME"
    ds.PatientID = "PAT-4D-SECRET"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.Rows, ds.Columns = ROWS, COLS
    return ds


def write_series(
    folder: Path, n_volumes: int, attrs: Any, *, ts: str = ExplicitVRLittleEndian
) -> list[dict[str, Any]]:
    """One slice per file for ``n_volumes`` x NZ slices (files named in scrambled order);
    ``attrs(t, z, ds)`` sets the volume keys. Returns what each file holds."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    written = []
    for t in range(n_volumes):
        for z in range(NZ):
            ds = _meta(MR, ts)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
            ds.AcquisitionNumber = 1
            ds.InstanceNumber = 1 + t * NZ + z
            ds.RepetitionTime = "2000"
            ds.ImageOrientationPatient = [f"{v:.7f}" for v in OBLIQUE]
            ds.ImagePositionPatient = [f"{v:.4f}" for v in _pos(z)]
            ds.PixelSpacing = [str(SPACING[0]), str(SPACING[1])]
            ds.SliceThickness = str(STEP)
            attrs(t, z, ds)
            pix = _pixels(t, z)
            ds.PixelData = pix.tobytes()
            name = f"f{(37 * (t * NZ + z) + 11) % 997:04d}.dcm"  # never the volume order
            ds.save_as(folder / name, enforce_file_format=True)
            written.append({"t": t, "z": z, "pixels": pix, "pos": _pos(z), "orient": OBLIQUE})
    return written


def assert_lands(
    data: np.ndarray,
    affine: np.ndarray,
    written: list[dict[str, Any]],
    order: list[int] | None = None,
) -> None:
    """Every pixel of every written slice is at the voxel of its world position (LPS ->
    RAS) in its volume, and the image holds nothing else. ``order[v]`` is the written
    volume t that image volume v must hold (default: v itself)."""
    inv = np.linalg.inv(affine)
    n_t = len({w["t"] for w in written})
    assert data.ndim == 4 and data.shape[3] == n_t
    assert data.size == sum(w["pixels"].size for w in written)
    where = {t: v for v, t in enumerate(order if order is not None else range(n_t))}
    dr, dc = SPACING
    for w in written:
        o = np.array(w["orient"])
        for i in range(ROWS):
            for j in range(COLS):
                lps = np.array(w["pos"]) + j * dc * o[:3] + i * dr * o[3:]
                v = inv @ np.array([-lps[0], -lps[1], lps[2], 1.0])
                idx = np.round(v[:3]).astype(int)
                assert np.allclose(v[:3], idx, atol=1e-3), (w["t"], w["z"], v)
                assert data[idx[0], idx[1], idx[2], where[w["t"]]] == w["pixels"][i, j]


def _load(folder: Path):
    headers, rej = scan_headers(sorted(folder.glob("*.dcm")))
    assert rej == []
    return group_stacks(headers)


def _written_image(folder: Path, out: Path):
    stacks, rej = _load(folder)
    assert rej == [] and len(stacks) == 1, rej
    img = load_stack(stacks[0])
    write_image(img, out)
    nii = nib.load(out)
    return img, nii, json.loads(sidecar_path(out).read_text())


# --------------------------------------------------------------------------- by key
def test_temporal_position_identifier(tmp_path: Path) -> None:
    def attrs(t: int, z: int, ds: Dataset) -> None:
        ds.TemporalPositionIdentifier = t + 1
        ds.InstanceNumber = 50 - (t * NZ + z)  # reversed: the key wins, not the order
        ds.AcquisitionTime = f"1200{10 * t + z:02d}.000"  # differs per slice too

    written = write_series(tmp_path / "s", 3, attrs)
    img, nii, side = _written_image(tmp_path / "s", tmp_path / "img.nii")
    assert img.n_volumes == 3 and img.shape == (COLS, ROWS, NZ) and img.dims == 3
    assert_lands(np.asarray(nii.dataobj), nii.affine, written)
    assert side["volume_axis"] == "time" and side["key"] == "TemporalPositionIdentifier"
    assert side["key_values"] == ["1", "2", "3"] and side["times_s"] == [0.0, 10.0, 20.0]
    assert nii.header.get_zooms()[3] == pytest.approx(2.0)  # pixdim[4] = TR in s
    assert nii.header.get_xyzt_units() == ("mm", "sec")


def test_diffusion_bvalue_and_gradient(tmp_path: Path) -> None:
    dirs = [None, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), None, (0.0, 0.6, 0.8)]
    bvals = [0.0, 1000.0, 1000.0, 0.0, 1000.0]  # two b=0 volumes: key + position order

    shell = [0, 0, 1, 1, 2]  # InstanceNumber restarts per b-value: position order alone ties

    def attrs(t: int, z: int, ds: Dataset) -> None:
        ds.DiffusionBValue = bvals[t]
        ds.InstanceNumber = 1 + shell[t] * NZ + z
        if dirs[t] is not None:
            ds.DiffusionGradientOrientation = list(dirs[t])

    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        folder = tmp_path / ts
        written = write_series(folder, 5, attrs, ts=ts)
        _img, nii, side = _written_image(folder, tmp_path / f"{ts}.nii.gz")
        data = np.asarray(nii.dataobj)
        order = [int(data[..., v].min()) // 1000 for v in range(5)]  # which t is volume v
        assert sorted(order) == list(range(5))
        assert_lands(data, nii.affine, written, order)
        assert side["volume_axis"] == "diffusion"
        assert side["key"] == "DiffusionBValue+Gradient+position order"
        assert side["b_values"] == [bvals[t] for t in order]
        want = [(-g[0], -g[1], g[2]) if g else (0.0, 0.0, 0.0) for g in (dirs[t] for t in order)]
        assert np.allclose(side["gradients_ras"], want)
        # on the voxel axes: the canonical axes' unit vectors dotted with the RAS gradient
        unit = nii.affine[:3, :3] / np.linalg.norm(nii.affine[:3, :3], axis=0)
        assert np.allclose(side["gradients_voxel"], [unit.T @ np.array(g) for g in want], atol=1e-5)
        assert nii.header.get_xyzt_units()[1] == "unknown"  # not a time axis


def test_echo_numbers(tmp_path: Path) -> None:
    def attrs(t: int, z: int, ds: Dataset) -> None:
        ds.EchoNumbers = t + 1
        ds.EchoTime = str(10.0 * (t + 1))

    written = write_series(tmp_path / "s", 3, attrs)
    _img, nii, side = _written_image(tmp_path / "s", tmp_path / "img.nii")
    assert_lands(np.asarray(nii.dataobj), nii.affine, written)
    assert side["volume_axis"] == "echo" and side["echo_times_ms"] == [10.0, 20.0, 30.0]


def test_multi_echo_time_series_is_one_4d_image_per_echo(tmp_path: Path) -> None:
    def attrs(t: int, z: int, ds: Dataset) -> None:  # t = 2 * time point + echo
        ds.EchoNumbers, ds.TemporalPositionIdentifier = t % 2 + 1, t // 2 + 1
        ds.EchoTime = str(12.0 * (t % 2 + 1))

    write_series(tmp_path / "s", 4, attrs)
    stacks, rej = _load(tmp_path / "s")
    assert rej == [] and len(stacks) == 2 and len({s.key for s in stacks}) == 2
    for s in stacks:
        img = load_stack(s)
        echo = int(img.array.min()) // 1000 % 2  # volumes t of this echo
        assert img.n_volumes == 2 and img.meta["volume_axis"]["volume_axis"] == "time"
        assert [int(img.array[..., v].min()) // 1000 for v in range(2)] == [echo, echo + 2]


def test_ge_position_order(tmp_path: Path) -> None:
    """GE classic fMRI: one AcquisitionNumber and AcquisitionTime; the k-th occurrence of a
    position in InstanceNumber order is volume k."""

    def attrs(t: int, z: int, ds: Dataset) -> None:
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.AcquisitionTime = "114815"

    written = write_series(tmp_path / "s", 4, attrs)
    _img, nii, side = _written_image(tmp_path / "s", tmp_path / "img.nii")
    assert_lands(np.asarray(nii.dataobj), nii.affine, written)
    assert side["key"] == "position order" and side["volume_axis"] == "time"
    assert side["times_s"] == [0.0, 2.0, 4.0, 6.0]  # k x TR without distinct times


def test_cine_one_position_many_trigger_times(tmp_path: Path) -> None:
    """Cardiac cine: one slice position, phases by TriggerTime -> (X, Y, 1, T) with the
    slice's patient geometry (step = normal x SliceThickness)."""
    folder = tmp_path / "s"
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    written = []
    for t in range(4):
        ds = _meta(MR)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.InstanceNumber, ds.TriggerTime = 10 - t, str(40.0 * t)
        ds.ImageOrientationPatient = [f"{v:.7f}" for v in OBLIQUE]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in _pos(0)]
        ds.PixelSpacing = [str(SPACING[0]), str(SPACING[1])]
        ds.SliceThickness = "6"
        ds.PixelData = _pixels(t, 0).tobytes()
        ds.save_as(folder / f"c{t}.dcm", enforce_file_format=True)
        written.append({"t": t, "z": 0, "pixels": _pixels(t, 0), "pos": _pos(0), "orient": OBLIQUE})
    img, nii, side = _written_image(folder, tmp_path / "img.nii")
    assert np.asarray(nii.dataobj).shape[2:] == (1, 4)
    assert_lands(np.asarray(nii.dataobj), nii.affine, written)
    assert side["key"] == "TriggerTime" and side["times_s"] == [0.0, 0.04, 0.08, 0.12]
    assert img.spacing[2] == pytest.approx(6.0)


def test_magnitude_and_phase_are_separate_images(tmp_path: Path) -> None:
    def attrs(t: int, z: int, ds: Dataset) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "P" if t else "M", "ND"]

    write_series(tmp_path / "s", 2, attrs)
    stacks, rej = _load(tmp_path / "s")
    assert rej == [] and len(stacks) == 2
    assert all(s.n_volumes == 1 and s.n_slices == NZ for s in stacks)
    assert len({s.key for s in stacks}) == 2  # distinct image ids


def test_unseparable_volumes_name_the_keys_tried(tmp_path: Path) -> None:
    """Positions that repeat unevenly, no key: kept as one stack whose same-position
    slices must match; they differ, so duplicate_slices names every key tried."""
    folder = tmp_path / "s"
    write_series(folder, 2, lambda t, z, ds: None)
    # drop the last slice of the second volume: positions 0 and 1 repeat, 2 does not
    (last,) = [f for f in folder.glob("*.dcm") if pydicom.dcmread(f).InstanceNumber == 2 * NZ]
    last.unlink()
    stacks, rej = _load(folder)
    assert rej == [] and len(stacks) == 1 and stacks[0].n_volumes == 1
    with pytest.raises(IngestError) as exc:
        load_stack(stacks[0])
    msg = str(exc.value)
    assert exc.value.code == Code.DUPLICATE_SLICES
    for key in ("TemporalPositionIdentifier", "DiffusionBValue", "EchoNumbers", "TriggerTime"):
        assert key in msg
    assert "AcquisitionNumber (one value for every slice)" in msg and "position order" in msg
    assert "PAT-4D-SECRET" not in msg


# --------------------------------------------------------------------------- enhanced
def _enhanced(
    path: Path,
    frames: list[tuple[int, int]],
    *,
    frame_type=None,
    temporal: bool = True,
    diffusion: dict[int, tuple[float, tuple[float, float, float]]] | None = None,
) -> list[dict[str, Any]]:
    """One enhanced MR file whose frames are (t, z) in the given order, with dimension
    indices (InStackPositionNumber, TemporalPositionIndex) and FrameType per frame."""
    ds = _meta(ENHANCED_MR)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frames)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    dim = []
    for ptr in (0x00209057, 0x00209128):
        item = Dataset()
        item.DimensionIndexPointer = ptr
        item.FunctionalGroupPointer = 0x00209111
        dim.append(item)
    ds.DimensionIndexSequence = dim
    shared = Dataset()
    po, pm = Dataset(), Dataset()
    po.ImageOrientationPatient = [f"{v:.7f}" for v in OBLIQUE]
    pm.PixelSpacing = [str(SPACING[0]), str(SPACING[1])]
    pm.SliceThickness = str(STEP)
    shared.PlaneOrientationSequence = [po]
    shared.PixelMeasuresSequence = [pm]
    ds.SharedFunctionalGroupsSequence = [shared]
    per, written, data = [], [], []
    for t, z in frames:
        item, pp, fc, ft = Dataset(), Dataset(), Dataset(), Dataset()
        pp.ImagePositionPatient = [f"{v:.4f}" for v in _pos(z)]
        fc.InStackPositionNumber = z + 1
        fc.DimensionIndexValues = [z + 1, t + 1]
        if temporal:
            fc.TemporalPositionIndex = t + 1
        ft.FrameType = ["ORIGINAL", "PRIMARY", (frame_type or (lambda t: "M"))(t), "NONE"]
        item.PlanePositionSequence = [pp]
        item.FrameContentSequence = [fc]
        item.MRImageFrameTypeSequence = [ft]
        if diffusion is not None:
            md, gd = Dataset(), Dataset()
            md.DiffusionBValue = diffusion[t][0]
            gd.DiffusionGradientOrientation = list(diffusion[t][1])
            md.DiffusionGradientDirectionSequence = [gd]
            item.MRDiffusionSequence = [md]
        per.append(item)
        data.append(_pixels(t, z))
        written.append({"t": t, "z": z, "pixels": data[-1], "pos": _pos(z), "orient": OBLIQUE})
    ds.PerFrameFunctionalGroupsSequence = per
    ds.PixelData = np.stack(data).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return written


@pytest.mark.parametrize("temporal", [True, False])
def test_enhanced_frames_by_dimension_index(tmp_path: Path, temporal: bool) -> None:
    frames = [(t, z) for z in range(NZ) for t in (1, 0)]  # frame order is neither
    (tmp_path / "s").mkdir()
    written = _enhanced(tmp_path / "s" / "e.dcm", frames, temporal=temporal)
    img, nii, side = _written_image(tmp_path / "s", tmp_path / "img.nii")
    assert img.n_volumes == 2
    assert_lands(np.asarray(nii.dataobj), nii.affine, written)
    assert side["key"] == ("TemporalPositionIdentifier" if temporal else "DimensionIndexValues")
    assert side["key_values"] == ["1", "2"]  # TemporalPositionIndex / the index value


def test_enhanced_diffusion_frames(tmp_path: Path) -> None:
    diff = {0: (0.0, (0.0, 0.0, 0.0)), 1: (800.0, (0.0, 0.0, 1.0)), 2: (800.0, (1.0, 0.0, 0.0))}
    frames = [(t, z) for z in range(NZ) for t in range(3)]
    (tmp_path / "s").mkdir()
    written = _enhanced(tmp_path / "s" / "e.dcm", frames, temporal=False, diffusion=diff)
    _img, nii, side = _written_image(tmp_path / "s", tmp_path / "img.nii")
    assert_lands(np.asarray(nii.dataobj), nii.affine, written)
    assert side["key"] == "DiffusionBValue+Gradient" and side["volume_axis"] == "diffusion"
    assert side["b_values"] == [0.0, 800.0, 800.0]
    assert np.allclose(side["gradients_ras"], [(0, 0, 0), (0, 0, 1), (-1, 0, 0)])


def test_enhanced_magnitude_and_field_map_are_two_images(tmp_path: Path) -> None:
    frames = [(t, z) for t in range(2) for z in range(NZ)]
    (tmp_path / "s").mkdir()
    _enhanced(tmp_path / "s" / "e.dcm", frames, frame_type=lambda t: "B0 MAP" if t else "M")
    stacks, rej = _load(tmp_path / "s")
    assert rej == [] and len(stacks) == 2 and {s.n_volumes for s in stacks} == {1}
    images = [load_stack(s) for s in stacks]
    assert sorted(int(i.array[0, 0, 0]) // 1000 for i in images) == [0, 1]


# --------------------------------------------------------------------------- CLI
def test_cli_writes_4d_image_sidecar_and_manifest_columns(tmp_path: Path) -> None:
    def attrs(t: int, z: int, ds: Dataset) -> None:
        ds.TemporalPositionIdentifier = t + 1

    written = write_series(tmp_path / "src" / "fmri", 3, attrs)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["ingest", str(tmp_path / "src"), "--out", str(out), "-j", "1"])
    assert r.exit_code == 0, r.output
    with open(out / "manifest.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["n_volumes"], row["volume_axis"], row["dims"]) == ("3", "time", "3")
    assert row["shape"] == f"{COLS}x{ROWS}x{NZ}" and row["n_slices"] == str(NZ)
    nii = nib.load(out / row["image_path"])
    assert_lands(np.asarray(nii.dataobj), nii.affine, written)
    side = json.loads(sidecar_path(out / row["image_path"]).read_text())
    assert side["n_volumes"] == 3 and side["volume_axis"] == "time"
    # a re-run keeps the sidecar (pruning removes only what no manifest row points to)
    r = CliRunner().invoke(app, ["ingest", str(tmp_path / "src"), "--out", str(out), "-j", "1"])
    assert r.exit_code == 0 and sidecar_path(out / row["image_path"]).is_file()


# --------------------------------------------------------------------------- real data (opt-in)
@pytest.mark.slow
def test_real_ge_fmri_matches_dcm2niix(tmp_path: Path) -> None:
    """dcm_qa_nih GE classic fMRI (150 files, 15 slices x 10 volumes, one AcquisitionNumber):
    medres' 4D voxels equal dcm2niix's after reorientation to the closest RAS+ axes, and
    world positions agree within 0.01 mm."""
    root = REAL / "20180918GE"
    if not root.is_dir():
        pytest.skip(f"real data absent: {root}")
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix not on PATH (apt-get install dcm2niix)")
    from medres.ingest.dicom import convert_series

    series = sorted(p for p in root.iterdir() if p.is_dir())
    assert series
    for s in series:
        ref_dir = tmp_path / s.name
        ref_dir.mkdir()
        subprocess.run(
            ["dcm2niix", "-z", "n", "-b", "n", "-f", "ref", "-o", str(ref_dir), str(s)],
            check=True,
            capture_output=True,
        )
        (ref_path,) = ref_dir.glob("ref*.nii")
        ref = nib.as_closest_canonical(nib.load(ref_path))
        img = convert_series(sorted(s.glob("*.dcm")), tmp_path / f"{s.name}.nii")
        want, got = np.asarray(ref.dataobj), img.array
        assert got.shape == want.shape == (64, 64, 15, 10), s.name
        assert np.array_equal(got, want), s.name
        corners = np.array([[0, 0, 0, 1], [*(np.array(got.shape[:3]) - 1), 1]], float).T
        assert np.abs(img.affine @ corners - ref.affine @ corners).max() < 0.01, s.name
        assert ref.header.get_zooms()[3] == pytest.approx(img.meta["volume_axis"]["times_s"][1])


# --------------------------------------------------------------------------- 4D NIfTI input
def test_4d_nifti_input_keeps_its_volumes(tmp_path: Path) -> None:
    from medres.ingest.nifti import load_nifti

    data = np.arange(3 * 4 * 5 * 2, dtype=np.int16).reshape(3, 4, 5, 2)
    aff = np.array([[-2.0, 0, 0, 10], [0, 1.5, 0, -5], [0, 0, 3.0, 7], [0, 0, 0, 1]])  # LAS
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "in.nii")
    img = load_nifti(tmp_path / "in.nii")
    assert img.n_volumes == 2 and img.shape == (3, 4, 5) and img.dims == 3 and img.n_slices == 5
    write_image(img, tmp_path / "out.nii")
    out = nib.load(tmp_path / "out.nii")
    got = np.asarray(out.dataobj)
    for v in range(2):  # every voxel keeps its world position in its volume
        for ijk in np.ndindex(3, 4, 5):
            world = aff @ np.array([*ijk, 1.0])
            i, j, k = np.round(np.linalg.inv(out.affine) @ world)[:3].astype(int)
            assert got[i, j, k, v] == data[(*ijk, v)]
    assert json.loads(sidecar_path(tmp_path / "out.nii").read_text())["volume_axis"] == "other"


# --------------------------------------------------------------------------- train / score rule
def _spec(mode: str, channels: int = 1):
    from medres.train.spec import TransformSpec

    return TransformSpec(
        dims=3, in_channels=channels, image_size=(3, 4, 5), intensity="none", volume=mode
    )


@pytest.mark.parametrize("mode", ["first", "mean", "channels"])
def test_volume_rule_same_in_training_and_scoring(tmp_path: Path, mode: str) -> None:
    """The saved preprocessing replays the rule: loading the written 4D NIfTI (training)
    and the in-memory image (scoring) give the same tensor, the rule's."""
    from medres.ingest.image import LoadedImage
    from medres.train.transforms import build_transforms, image_to_metatensor, preprocessing_dict

    arr = np.random.default_rng(0).integers(0, 500, (3, 4, 5, 4)).astype(np.int16)
    img = LoadedImage(array=arr, affine=np.diag([1.0, 2.0, 3.0, 1.0]), dims=3, n_volumes=4)
    write_image(img, tmp_path / "x.nii")
    pre = json.loads(json.dumps(preprocessing_dict(_spec(mode, 4 if mode == "channels" else 1))))
    train = build_transforms(pre, train=False)({"image": str(tmp_path / "x.nii"), "channels": 1})
    score = build_transforms(pre, train=False, load=False)({"image": image_to_metatensor(img)})
    want = {
        "first": arr[..., 0][None],
        "mean": arr.astype(np.float32).mean(-1)[None],
        "channels": np.moveaxis(arr, -1, 0),
    }[mode]
    for out in (train["image"], score["image"]):
        assert np.allclose(np.asarray(out), want, atol=1e-4)


def test_volume_rule_errors_name_the_image_and_option() -> None:
    from medres.train.transforms import check_volumes, resolve_volume

    rows = [{"image_id": "img-a", "image_path": "images/img-a.nii", "n_volumes": "10"}]
    assert resolve_volume(rows, _spec("auto"), 1) == ("first", 1)  # auto: first, logged
    assert resolve_volume([{"n_volumes": "1"}], _spec("auto"), 1) == ("auto", 1)  # no 4D
    assert resolve_volume(rows, _spec("channels", 0), 1) == ("channels", 10)  # = volumes
    assert resolve_volume([*rows, {"n_volumes": ""}], _spec("mean"), 1) == ("mean", 1)
    two = [*rows, {"image_id": "img-b", "image_path": "images/img-b.nii", "n_volumes": "4"}]
    with pytest.raises(IngestError) as exc:
        resolve_volume(two, _spec("channels", 0), 1)
    assert "img-b" in str(exc.value) and exc.value.code == Code.WRONG_DIMS
    # a model trained without 4D images (volume never resolved, or an older model.json)
    for pre in ({"volume": "auto"}, {}):
        with pytest.raises(IngestError) as exc:
            check_volumes(pre, 10, "scans/x.nii")
        assert "scans/x.nii" in str(exc.value) and "transforms.volume" in str(exc.value)
    with pytest.raises(IngestError, match="takes 4 channels"):
        check_volumes({"volume": "channels", "in_channels": 4}, 10, "scans/x.nii")
    check_volumes({}, 1, "3D images pass")  # no volume axis: nothing to check


@pytest.mark.slow
def test_real_siemens_mosaic_series_are_4d_by_acquisition(tmp_path: Path) -> None:
    """dcm_qa_nih Siemens: one mosaic per time point; the files of a series are the volumes
    of one 4D image, told apart by AcquisitionNumber (voxels vs dcm2niix: the mosaic tests)."""
    root = REAL / "20180918Si"
    if not root.is_dir():
        pytest.skip(f"real data absent: {root}")
    from medres.ingest.dicom import convert_series

    for s in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(s.glob("*.dcm"))
        img = convert_series(files, tmp_path / f"{s.name}.nii")
        side = img.meta["volume_axis"]
        assert img.n_volumes == len(files) and side["key"] == "AcquisitionNumber", s.name
        assert side["volume_axis"] == "time" and side["times_s"][0] == 0.0
        assert json.loads(sidecar_path(tmp_path / f"{s.name}.nii").read_text()) == side


def test_scoring_replays_the_saved_volume_rule(tmp_path: Path) -> None:
    """Scoring's decoder takes a 4D image by the model's saved rule, and a model saved
    without one gets a wrong_dims row naming the image and the option."""
    from medres.score.decode import MedresDecoder, decode_one
    from medres.score.items import ScoreItem
    from medres.train.transforms import preprocessing_dict

    arr = np.arange(3 * 4 * 5 * 2, dtype=np.int16).reshape(3, 4, 5, 2)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "run.nii")
    item = ScoreItem("k", "id", "scans/run.nii", "nifti", (tmp_path / "run.nii", "scans/run.nii"))
    pre = preprocessing_dict(_spec("first"))
    dec = MedresDecoder(pre)
    got = decode_one(dec, item)
    assert got.code in ("", None)
    # the raw 4D image goes through the one (batched) preprocessing: the first volume
    x = dec.batched([got.array])[0].cpu().numpy()
    assert np.allclose(x, arr[..., 0][None])
    old = {k: v for k, v in preprocessing_dict(_spec("auto")).items() if k != "volume"}
    bad = decode_one(MedresDecoder(old), item)
    assert bad.code == Code.WRONG_DIMS and "scans/run.nii" in bad.message
    assert "transforms.volume" in bad.message
