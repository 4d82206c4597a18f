"""Series -> volume: sorting, geometry validation, values, affine, robustness.

Every test builds its own tiny DICOM files with pydicom; the expected values and world
coordinates are computed independently from the DICOM attributes.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.dicom import (
    DicomHeader,
    GeometryPolicy,
    convert_series,
    group_stacks,
    is_dicom,
    load_stack,
    scan_header,
    scan_headers,
)
from medres.ingest.nifti import write_image

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# the strict gap rule (the default resamples gaps: tests/unit/test_dicom_uneven.py)
STRICT = GeometryPolicy(uneven_spacing="reject")


def _base(
    rows: int, cols: int, *, sop_class: str = CTImageStorage, ts: str = ExplicitVRLittleEndian
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "PAT-SECRET-1"
    ds.PatientSex = "F"
    ds.PatientAge = "061Y"
    ds.Manufacturer = "ACME"
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def make_series(
    folder: Path,
    volume: np.ndarray,  # (slices, rows, cols) stored values
    *,
    spacing: tuple[float, float] = (0.7, 0.8),  # (row spacing, col spacing)
    step: tuple[float, float, float] | None = None,  # position increment per slice (LPS)
    orientation: tuple[float, ...] = AXIAL,
    origin: tuple[float, float, float] = (-100.0, -120.0, 30.0),
    slope: float | list[float] = 1.0,
    intercept: float | list[float] = -1024.0,
    order: list[int] | None = None,
    drop: tuple[int, ...] = (),
    ts: str = ExplicitVRLittleEndian,
    study: str | None = None,
    series: str | None = None,
    modality: str = "CT",
    photometric: str = "MONOCHROME2",
    acquisition: int | list[int] = 1,
    positions: list[tuple[float, float, float]] | None = None,
) -> list[Path]:
    """Write one slice per file; instance numbers deliberately scrambled vs position."""
    folder.mkdir(parents=True, exist_ok=True)
    study = study or generate_uid()
    series = series or generate_uid()
    n = volume.shape[0]
    r = np.array(orientation[:3])
    c = np.array(orientation[3:])
    if step is None:
        step = tuple(np.cross(r, c) * 2.5)
    paths = []
    for k in order if order is not None else range(n):
        if k in drop:
            continue
        ds = _base(
            volume.shape[1],
            volume.shape[2],
            ts=ImplicitVRLittleEndian if ts == ImplicitVRLittleEndian else ExplicitVRLittleEndian,
        )
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.Modality = modality
        ds.PhotometricInterpretation = photometric
        ds.InstanceNumber = (7 * k + 3) % 101  # never the spatial order
        ds.AcquisitionNumber = acquisition[k] if isinstance(acquisition, list) else acquisition
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        pos = (
            positions[k] if positions is not None else tuple(np.array(origin) + k * np.array(step))
        )
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.PixelSpacing = [str(spacing[0]), str(spacing[1])]
        ds.SliceThickness = "2.5"
        ds.RescaleSlope = str(slope[k] if isinstance(slope, list) else slope)
        ds.RescaleIntercept = str(intercept[k] if isinstance(intercept, list) else intercept)
        ds.PixelData = volume[k].astype(np.int16).tobytes()
        if ts == RLELossless:
            ds.compress(RLELossless)
        path = folder / f"f{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _rng_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 3000, size=shape).astype(np.int16)


def _load(paths: list[Path], policy: GeometryPolicy | None = None):
    headers, rej = scan_headers(paths)
    assert rej == []
    stacks, rej2 = group_stacks(headers, *(() if policy is None else (policy,)))
    return stacks, rej2


def _world_lps(orientation, spacing, pos, i, j):
    """DICOM PS3.3 C.7.6.2.1.1: P = S + i*col_spacing*X + j*row_spacing*Y (i=column, j=row)."""
    r = np.array(orientation[:3])
    c = np.array(orientation[3:])
    return np.array(pos) + i * spacing[1] * r + j * spacing[0] * c


def _check_voxels(img, vol, orientation, spacing, positions, slope=1.0, intercept=-1024.0):
    """Every probed stored voxel appears at the canonical index whose affine gives its DICOM world coordinate."""
    inv = np.linalg.inv(img.affine)
    rng = np.random.default_rng(1)
    for _ in range(40):
        k = int(rng.integers(vol.shape[0]))
        j = int(rng.integers(vol.shape[1]))
        i = int(rng.integers(vol.shape[2]))
        lps = _world_lps(orientation, spacing, positions[k], i, j)
        ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
        idx = inv @ ras
        assert np.allclose(idx[:3], np.round(idx[:3]), atol=1e-3), idx
        x, y, z = (round(v) for v in idx[:3])
        assert img.array[x, y, z] == pytest.approx(vol[k, j, i] * slope + intercept)


@pytest.mark.parametrize(
    "orientation",
    [
        AXIAL,
        (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),  # sagittal
        (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),  # coronal
        (0.866025, 0.5, 0.0, -0.5, 0.866025, 0.0),  # oblique axial (30 deg)
        (0.0, 0.707107, -0.707107, 0.0, 0.707107, 0.707107),  # double oblique-ish
    ],
)
def test_volume_voxels_map_to_dicom_world(tmp_path: Path, orientation) -> None:
    vol = _rng_volume((6, 5, 7))
    r, c = np.array(orientation[:3]), np.array(orientation[3:])
    step = tuple(np.cross(r, c) / np.linalg.norm(np.cross(r, c)) * 2.5)
    order = [3, 0, 5, 1, 4, 2]  # files in random order, instance numbers scrambled
    paths = make_series(tmp_path, vol, orientation=orientation, step=step, order=order)
    stacks, rej = _load(paths)
    assert rej == [] and len(stacks) == 1
    img = load_stack(stacks[0])
    assert img.dims == 3 and img.n_slices == 6 and img.array.dtype == np.int16
    assert sorted(img.spacing) == pytest.approx(sorted([0.7, 0.8, 2.5]), abs=1e-4)
    from nibabel.orientations import aff2axcodes

    assert aff2axcodes(img.affine) == ("R", "A", "S")
    positions = [tuple(np.array((-100.0, -120.0, 30.0)) + k * np.array(step)) for k in range(6)]
    _check_voxels(img, vol, orientation, (0.7, 0.8), positions)


def test_gantry_tilt_keeps_sheared_affine_and_warns(tmp_path: Path) -> None:
    vol = _rng_volume((5, 4, 6), seed=2)
    # axial slices whose positions also advance along y (tilted gantry, 15 degrees)
    step = (0.0, 2.5 * np.tan(np.radians(15)), 2.5)
    paths = make_series(tmp_path, vol, step=step)
    stacks, rej = _load(paths)
    assert rej == []
    img = load_stack(stacks[0])
    assert any(w.startswith("gantry_tilt:15.0") for w in img.warnings)
    positions = [tuple(np.array((-100.0, -120.0, 30.0)) + k * np.array(step)) for k in range(5)]
    _check_voxels(img, vol, AXIAL, (0.7, 0.8), positions)
    out = tmp_path / "tilt.nii"
    write_image(img, out)
    import nibabel as nib

    back = nib.load(out)
    assert np.allclose(back.affine, img.affine, atol=1e-5)
    assert int(back.header["qform_code"]) == 0 and int(back.header["sform_code"]) == 1


def test_sorting_ignores_instance_number_and_file_order(tmp_path: Path) -> None:
    vol = _rng_volume((5, 3, 3), seed=3)
    paths = make_series(tmp_path, vol, order=[4, 2, 0, 3, 1])
    stacks, _ = _load(paths)
    img = load_stack(stacks[0])
    # axial, step +z: canonical z increases with slice index k
    for k in range(5):
        assert np.array_equal(img.array[:, :, k], (vol[k].astype(int) - 1024).T[::-1, ::-1])


def test_per_slice_rescale_gives_hu_and_float_when_needed(tmp_path: Path) -> None:
    vol = _rng_volume((3, 4, 4), seed=4)
    paths = make_series(
        tmp_path / "a", vol, slope=[1.0, 1.0, 1.0], intercept=[-1024.0, -1000.0, 0.0]
    )
    img = load_stack(_load(paths)[0][0])
    assert img.array.dtype == np.int16
    # canonical axial: x flipped (LPS->RAS) and y flipped
    for k, b in enumerate([-1024, -1000, 0]):
        assert np.array_equal(img.array[::-1, ::-1, k], vol[k].T.astype(int) + b)
    paths = make_series(tmp_path / "b", vol, slope=[0.5, 0.5, 0.25], intercept=-10.0)
    img = load_stack(_load(paths)[0][0])
    assert img.array.dtype == np.float32
    for k, s in enumerate([0.5, 0.5, 0.25]):
        assert np.allclose(img.array[::-1, ::-1, k], vol[k].T * s - 10.0)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    vol = np.array([[[0, 100], [200, 300]]] * 3, dtype=np.int16)
    paths = make_series(tmp_path, vol, photometric="MONOCHROME1", intercept=0.0)
    img = load_stack(_load(paths)[0][0])
    a = img.array[::-1, ::-1, 0].T  # back to (rows, cols)
    # signed 16-bit stored range [-32768, 32767]: lut(min)+lut(max) - v = -1 - v
    assert np.array_equal(a, -1 - vol[0].astype(int))
    assert a[0, 0] > a[1, 1]  # higher stored value (darker in MONOCHROME1) -> lower output


def test_missing_slice_rejected(tmp_path: Path) -> None:
    vol = _rng_volume((8, 3, 3))
    paths = make_series(tmp_path, vol, drop=(4,))
    stacks, rej = _load(paths, STRICT)
    assert stacks == [] and [r.code for r in rej] == [Code.MISSING_SLICES]
    assert "PAT-SECRET" not in rej[0].message and "1 slice(s) missing" in rej[0].message


def test_uneven_spacing_rejected_and_tolerance_configurable(tmp_path: Path) -> None:
    vol = _rng_volume((6, 3, 3))
    z = [0.0, 2.5, 5.0, 8.2, 10.7, 13.2]  # one gap of 3.2 mm among 2.5 mm gaps
    positions = [(0.0, 0.0, v) for v in z]
    paths = make_series(tmp_path, vol, positions=positions)
    stacks, rej = _load(paths, STRICT)
    assert stacks == [] and [r.code for r in rej] == [Code.INCONSISTENT_GEOMETRY]
    stacks, rej = _load(paths, GeometryPolicy(spacing_rtol=0.5, uneven_spacing="reject"))
    assert rej == [] and len(stacks) == 1 and stacks[0].grid_positions == ()


def test_small_jitter_within_tolerance_accepted(tmp_path: Path) -> None:
    vol = _rng_volume((5, 3, 3))
    positions = [(0.0, 0.0, 2.5 * k + (0.05 if k == 2 else 0.0)) for k in range(5)]
    stacks, rej = _load(make_series(tmp_path, vol, positions=positions))
    assert rej == [] and stacks[0].n_slices == 5


def test_duplicate_positions(tmp_path: Path) -> None:
    vol = _rng_volume((4, 3, 3))
    positions = [(0.0, 0.0, 0.0), (0.0, 0.0, 2.5), (0.0, 0.0, 2.5), (0.0, 0.0, 5.0)]
    same = vol.copy()
    same[2] = same[1]
    stacks, rej = _load(make_series(tmp_path / "same", same, positions=positions))
    img = load_stack(stacks[0])
    assert img.n_slices == 3 and any(w.startswith("duplicate_positions") for w in img.warnings)
    stacks, rej = _load(make_series(tmp_path / "diff", vol, positions=positions))
    assert rej == [] and stacks[0].n_slices == 3  # same-position slices checked at load time
    with pytest.raises(IngestError) as exc:
        load_stack(stacks[0])
    assert exc.value.code == Code.DUPLICATE_SLICES


def test_repeated_acquisition_is_a_second_volume(tmp_path: Path) -> None:
    # two passes of the same positions: one 4D stack by AcquisitionNumber (issue 15; it was
    # the largest pass kept and the other reported as extra_stack)
    vol = _rng_volume((6, 3, 3))
    positions = [(0.0, 0.0, 2.5 * (k % 3)) for k in range(6)]
    acq = [1, 1, 1, 2, 2, 2]
    stacks, rej = _load(make_series(tmp_path, vol, positions=positions, acquisition=acq))
    assert len(stacks) == 1 and stacks[0].n_slices == 3 and stacks[0].n_volumes == 2
    assert rej == []


def test_localizer_and_other_orientation_are_extra_stacks(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    vol = _rng_volume((5, 3, 3))
    main = make_series(tmp_path / "m", vol, study=study, series=series)
    loc = make_series(
        tmp_path / "l",
        vol[:1],
        study=study,
        series=series,
        orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    )
    stacks, rej = _load(main + loc)
    assert len(stacks) == 1 and stacks[0].n_slices == 5
    assert [r.code for r in rej] == [Code.EXTRA_STACK]


def test_slightly_mixed_orientation_rejected(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    vol = _rng_volume((4, 3, 3))
    a = make_series(tmp_path / "a", vol[:2], study=study, series=series)
    b = make_series(
        tmp_path / "b",
        vol[2:],
        study=study,
        series=series,
        orientation=(0.9998, 0.02, 0.0, -0.02, 0.9998, 0.0),
        origin=(-100.0, -120.0, 35.0),
    )
    stacks, rej = _load(a + b)
    assert stacks == [] and [r.code for r in rej] == [Code.MIXED_ORIENTATION]


def test_inconsistent_rows_rejected(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    a = make_series(tmp_path / "a", _rng_volume((3, 3, 3)), study=study, series=series)
    b = make_series(
        tmp_path / "b",
        _rng_volume((1, 4, 3)),
        study=study,
        series=series,
        origin=(-100.0, -120.0, 37.5),
    )
    stacks, rej = _load(a + b)
    assert stacks == [] and [r.code for r in rej] == [Code.INCONSISTENT_GEOMETRY]


def test_duplicate_sop_instance_is_duplicate_input(tmp_path: Path) -> None:
    vol = _rng_volume((3, 3, 3))
    paths = make_series(tmp_path, vol)
    copy = tmp_path / "zcopy.dcm"
    copy.write_bytes(paths[1].read_bytes())
    stacks, rej = _load([*paths, copy])
    assert len(stacks) == 1 and stacks[0].n_slices == 3
    assert [r.code for r in rej] == [Code.DUPLICATE_INPUT] and rej[0].source.endswith("zcopy.dcm")


def test_too_few_slices(tmp_path: Path) -> None:
    stacks, rej = _load(make_series(tmp_path, _rng_volume((2, 3, 3))))
    assert stacks == [] and [r.code for r in rej] == [Code.TOO_FEW_SLICES]


def test_rle_matches_uncompressed(tmp_path: Path) -> None:
    vol = _rng_volume((4, 6, 5), seed=9)
    raw = load_stack(_load(make_series(tmp_path / "raw", vol))[0][0])
    rle_paths = make_series(tmp_path / "rle", vol, ts=RLELossless)
    assert scan_header(rle_paths[0]).pixel_length == -1  # encapsulated
    rle = load_stack(_load(rle_paths)[0][0])
    assert np.array_equal(raw.array, rle.array) and np.allclose(raw.affine, rle.affine)


def test_implicit_vr_fast_path(tmp_path: Path) -> None:
    vol = _rng_volume((3, 4, 5), seed=5)
    paths = make_series(tmp_path, vol, ts=ImplicitVRLittleEndian)
    h = scan_header(paths[0])
    assert h.transfer_syntax == ImplicitVRLittleEndian and h.pixel_length == 4 * 5 * 2
    img = load_stack(_load(paths)[0][0])
    assert np.array_equal(img.array[::-1, ::-1, 1], vol[1].T.astype(int) - 1024)


# ------------------------------------------------------------------ header scan / robustness
def test_header_is_picklable_and_complete(tmp_path: Path) -> None:
    paths = make_series(tmp_path, _rng_volume((3, 4, 5)))
    h = scan_header(paths[0], "zip!a/f0000.dcm")
    assert isinstance(pickle.loads(pickle.dumps(h)), DicomHeader)
    assert (h.rows, h.cols, h.modality, h.sex, h.age) == (4, 5, "CT", "F", 61.0)
    assert h.has_pixel_data and h.pixel_length == 40 and h.source == "zip!a/f0000.dcm"
    assert h.pixel_spacing == (0.7, 0.8) and h.image_orientation == AXIAL


def test_not_dicom_and_is_dicom(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("hello world, this is not a DICOM file at all" * 10)
    assert not is_dicom(junk)
    with pytest.raises(IngestError) as exc:
        scan_header(junk)
    assert exc.value.code == Code.NOT_DICOM
    dcm = make_series(tmp_path / "d", _rng_volume((3, 2, 2)))[0]
    assert is_dicom(dcm)
    # preamble-less (raw dataset, no file meta) still recognised by content
    ds = pydicom.dcmread(dcm)
    ds.preamble = None
    del ds.file_meta
    bare = tmp_path / "bare"
    ds.save_as(bare, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert bare.read_bytes()[:2] == b"\x08\x00"  # starts with group 0008, no preamble
    assert is_dicom(bare)
    assert scan_header(bare).rows == 2


@pytest.mark.parametrize("cut", ["in_pixels", "before_pixels", "header"])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, RLELossless])
def test_truncated_files_rejected_with_code(tmp_path: Path, cut: str, ts: str) -> None:
    vol = _rng_volume((3, 16, 16))
    path = make_series(tmp_path, vol, ts=ts)[0]
    data = path.read_bytes()
    h = scan_header(path)
    pix_start = h.pixel_offset - (12 if ts != ImplicitVRLittleEndian else 8)
    n = {"in_pixels": h.pixel_offset + 20, "before_pixels": pix_start, "header": 300}[cut]
    path.write_bytes(data[:n])
    with pytest.raises(IngestError) as exc:
        h2 = scan_header(path)
        stacks, rej = group_stacks([h2])
        if rej:
            raise IngestError(rej[0].message, code=rej[0].code)
        load_stack(stacks[0])
    assert exc.value.code in {Code.TRUNCATED, Code.NO_PIXEL_DATA, Code.DECODE_FAILED}
    if cut == "before_pixels":
        assert exc.value.code == Code.NO_PIXEL_DATA


def test_short_pixel_data_is_no_pixel_data(tmp_path: Path) -> None:
    ds = _base(8, 8)
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PixelData = b"\x00\x01" * 10  # 20 bytes, 128 needed
    p = tmp_path / "short.dcm"
    ds.save_as(p, enforce_file_format=True)
    with pytest.raises(IngestError) as exc:
        scan_header(p)
    assert exc.value.code == Code.NO_PIXEL_DATA


def test_non_image_is_not_image(tmp_path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # basic text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    p = tmp_path / "sr.dcm"
    ds.save_as(p, enforce_file_format=True)
    with pytest.raises(IngestError) as exc:
        scan_header(p)
    assert exc.value.code == Code.NOT_IMAGE


def test_decoder_panic_is_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A BaseException (like pyo3's PanicException) from the decoder becomes decode_failed."""

    class FakePanic(BaseException):
        pass

    paths = make_series(tmp_path, _rng_volume((3, 4, 4)), ts=RLELossless)
    stacks, _ = _load(paths)

    def boom(*args, **kwargs):
        raise FakePanic("rust panicked")

    from pydicom.pixels.decoders.base import Decoder

    monkeypatch.setattr(Decoder, "as_array", boom)  # every decode path ends here
    with pytest.raises(IngestError) as exc:
        load_stack(stacks[0])
    assert exc.value.code == Code.DECODE_FAILED


def test_corrupt_rle_stream_rejected(tmp_path: Path) -> None:
    paths = make_series(tmp_path, _rng_volume((3, 16, 16)), ts=RLELossless)
    data = bytearray(paths[1].read_bytes())
    h = scan_header(paths[1])
    for i in range(h.pixel_offset + 40, len(data) - 20):
        data[i] = 0xFF if i % 3 else 0x80
    paths[1].write_bytes(bytes(data))
    stacks, rej = _load(paths)
    assert rej == []  # the header is intact: only decoding can find the damage
    with pytest.raises(IngestError) as exc:
        load_stack(stacks[0])
    assert exc.value.code in {Code.DECODE_FAILED, Code.TRUNCATED}


def test_worker_processes_give_what_serial_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Header scans and compressed decodes in medres.workers processes (thresholds lowered
    so that a small series takes those paths) give the serial results and error codes."""
    from medres.ingest.dicom import decode, scan

    paths = make_series(tmp_path / "rle", _rng_volume((10, 8, 8), seed=3), ts=RLELossless)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    serial = scan_headers([*paths, junk])
    serial_img = load_stack(group_stacks(serial[0])[0][0])
    monkeypatch.setattr(scan, "_SCAN_POOL_MIN_FILES", 2)
    monkeypatch.setattr(decode, "_POOL_WORTH_S", 0.0)
    pooled_calls: list[int] = []
    real = decode._decode_in_pool
    monkeypatch.setattr(decode, "_decode_in_pool", lambda *a: pooled_calls.append(1) or real(*a))
    pooled = scan_headers([*paths, junk], workers=2)
    assert pooled == serial and [r.code for r in pooled[1]] == [Code.NOT_DICOM]
    img = load_stack(group_stacks(pooled[0])[0][0], workers=2)
    assert pooled_calls == [1]
    assert np.array_equal(img.array, serial_img.array) and np.allclose(
        img.affine, serial_img.affine
    )
    data = bytearray(paths[4].read_bytes())
    h = scan_header(paths[4])
    for i in range(h.pixel_offset + 40, len(data) - 20):
        data[i] = 0xFF if i % 3 else 0x80
    paths[4].write_bytes(bytes(data))
    stack = group_stacks(scan_headers(paths)[0])[0][0]
    codes = []
    for workers in (1, 2):
        with pytest.raises(IngestError) as exc:
            load_stack(stack, workers=workers)
        codes.append(exc.value.code)
    assert codes[0] == codes[1] and codes[0] in {Code.DECODE_FAILED, Code.TRUNCATED}


# ------------------------------------------------------------------ 2D / multi-frame / colour
def _dx(tmp_path: Path, name: str, arr: np.ndarray, **attrs) -> Path:
    ds = _base(arr.shape[0], arr.shape[1], sop_class="1.2.840.10008.5.1.4.1.1.1.1")
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PixelRepresentation = 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = arr.astype(np.uint16 if ds.BitsAllocated == 16 else np.uint8).tobytes()
    p = tmp_path / name
    ds.save_as(p, enforce_file_format=True)
    return p


def test_2d_dx_with_imager_spacing(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100
    p = _dx(tmp_path, "dx.dcm", arr, ImagerPixelSpacing=["0.15", "0.2"])
    stacks, rej = group_stacks([scan_header(p)])
    assert rej == [] and stacks[0].kind == "image"
    img = load_stack(stacks[0])
    assert img.dims == 2 and img.array.shape == (4, 3)  # (X=cols, Y=rows)
    assert np.array_equal(img.array, arr.T)
    assert img.spacing == (0.2, 0.15)


def test_2d_without_spacing_warns(tmp_path: Path) -> None:
    p = _dx(tmp_path, "dx.dcm", np.ones((3, 4)))
    img = load_stack(group_stacks([scan_header(p)])[0][0])
    assert img.spacing == (1.0, 1.0) and any("no_pixel_spacing" in w for w in img.warnings)


def test_rgb_image_has_channel_axis(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, size=(5, 6, 3)).astype(np.uint8)
    ds = _base(5, 6, sop_class="1.2.840.10008.5.1.4.1.1.7")
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SC"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rgb.tobytes()
    p = tmp_path / "rgb.dcm"
    ds.save_as(p, enforce_file_format=True)
    img = load_stack(group_stacks([scan_header(p)])[0][0])
    assert img.channels == 3 and img.dims == 2 and img.array.shape == (6, 5, 3)
    assert np.array_equal(img.array, rgb.transpose(1, 0, 2))


def test_multiframe_2d_frames_as_slices(tmp_path: Path) -> None:
    frames = np.random.default_rng(1).integers(0, 255, size=(4, 3, 5)).astype(np.uint8)
    ds = _base(3, 5, sop_class="1.2.840.10008.5.1.4.1.1.3.1")  # US multi-frame
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = 4
    ds.PixelData = frames.tobytes()
    p = tmp_path / "us.dcm"
    ds.save_as(p, enforce_file_format=True)
    img = load_stack(group_stacks([scan_header(p)])[0][0])
    assert img.array.shape == (5, 3, 4) and "frames_as_slices" in img.warnings
    assert np.array_equal(img.array[:, :, 2], frames[2].T)


def test_enhanced_multiframe_ct_volume(tmp_path: Path) -> None:
    vol = _rng_volume((4, 3, 5), seed=11)
    ds = _base(3, 5, sop_class="1.2.840.10008.5.1.4.1.1.2.1")  # enhanced CT
    ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.NumberOfFrames = 4
    shared = Dataset()
    o = Dataset()
    o.ImageOrientationPatient = list(AXIAL)
    m = Dataset()
    m.PixelSpacing = [0.5, 0.6]
    m.SliceThickness = 1.0
    shared.PlaneOrientationSequence = [o]
    shared.PixelMeasuresSequence = [m]
    ds.SharedFunctionalGroupsSequence = [shared]
    per = []
    frame_z = [3.0, 0.0, 2.0, 1.0]  # frames stored out of spatial order
    for f in range(4):
        item = Dataset()
        p = Dataset()
        p.ImagePositionPatient = [10.0, 20.0, frame_z[f]]
        item.PlanePositionSequence = [p]
        t = Dataset()
        t.RescaleSlope = 1
        t.RescaleIntercept = -1000 + f
        item.PixelValueTransformationSequence = [t]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = per
    ds.PixelData = vol.tobytes()
    path = tmp_path / "enh.dcm"
    ds.save_as(path, enforce_file_format=True)
    h = scan_header(path)
    assert len(h.frame_positions) == 4 and h.pixel_spacing == (0.5, 0.6)
    img = load_stack(group_stacks([h])[0][0])
    assert img.dims == 3 and img.array.shape == (5, 3, 4)
    assert img.spacing == pytest.approx((0.6, 0.5, 1.0))
    for f in range(4):
        z = int(frame_z[f])
        assert np.array_equal(img.array[::-1, ::-1, z], vol[f].T.astype(int) - 1000 + f)


def test_convert_series_writes_nifti(tmp_path: Path) -> None:
    import nibabel as nib

    vol = _rng_volume((5, 6, 7))
    paths = make_series(tmp_path / "s", vol)
    out = tmp_path / "out.nii"
    img = convert_series(paths, out, workers=1)
    back = nib.load(out)
    assert back.get_data_dtype() == np.int16
    assert np.array_equal(np.asanyarray(back.dataobj), img.array)
    assert np.allclose(back.affine, img.affine) and int(back.header["qform_code"]) == 1
    with pytest.raises(IngestError) as exc:
        convert_series(paths[:2] + paths[3:], tmp_path / "gap.nii", policy=STRICT)
    assert exc.value.code == Code.MISSING_SLICES


# ------------------------------------------------------------------ synthetic ground truth
def _synth_series(spec, tmp_path: Path, policy: GeometryPolicy | None = None):
    from medres.synth import generate

    res = generate(spec, tmp_path / "synth")
    for row in res.truth:
        headers, rej = scan_headers([res.out_dir / p for p in row.paths])
        stacks, rej2 = group_stacks(headers, policy or GeometryPolicy())
        yield res, row, stacks, rej + rej2


@pytest.mark.parametrize(
    "spec_kw",
    [
        {"kind": "ct", "shape": (24, 20, 10)},
        {"kind": "ct", "shape": (24, 20, 10), "oblique": 1.0, "compression": "rle"},
        {"kind": "ct", "shape": (24, 20, 10), "multiframe": True},
        {"kind": "mr", "shape": (24, 20, 8), "oblique": 1.0},
        {"kind": "xray", "shape": (30, 26), "monochrome1_fraction": 0.5},
        {"kind": "us", "shape": (30, 26)},
        {"kind": "sc", "shape": (30, 26)},
    ],
    ids=lambda kw: "-".join(f"{v}" for k, v in kw.items() if k != "shape"),
)
def test_synthetic_series_match_ground_truth(tmp_path: Path, spec_kw: dict) -> None:
    """Voxel for voxel (HU for CT), with the right spacing and affine, for every series."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    from medres.synth import SynthSpec, ground_truth

    spec = SynthSpec(n_patients=3, seed=7, **spec_kw)
    n = 0
    for res, row, stacks, rej in _synth_series(spec, tmp_path):
        assert rej == [] and len(stacks) == 1
        img = load_stack(stacks[0])
        gt = ground_truth(res, row.series_uid)
        if spec.dims == 3:
            arr, aff = gt.xyz_ras()
            ornt = io_orientation(aff)
            expected = apply_orientation(arr, ornt)
            expected_aff = aff @ inv_ornt_aff(ornt, arr.shape[:3])
            # positions are DS strings (<= 16 chars): world agreement to 1 micrometre-ish
            np.testing.assert_allclose(img.affine, expected_aff, atol=1e-3)
            assert sorted(img.spacing) == pytest.approx(sorted(gt.spacing), abs=1e-3)
        else:
            a = gt.array[0]
            expected = a.transpose((1, 0, 2)) if a.ndim == 3 else a.T
            if any(w.startswith("no_pixel_spacing") for w in img.warnings):
                assert img.spacing == (1.0, 1.0)  # ultrasound without calibration
            else:
                assert img.spacing == pytest.approx((gt.spacing[2], gt.spacing[1]), abs=1e-4)
        assert img.array.shape == expected.shape
        np.testing.assert_allclose(img.array, expected, rtol=1e-6, atol=0)
        if row.modality == "CT":
            assert img.array.dtype == np.int16  # HU, integral
        n += 1
    assert n == 3


def test_synthetic_messy_series_are_rejected_with_codes(tmp_path: Path) -> None:
    from medres.synth import SynthSpec

    defects = (
        "missing_slice",
        "duplicate_slice",
        "localizer",
        "uneven_spacing",
        "truncated",
        "no_preamble",
    )
    spec = SynthSpec(kind="ct", n_patients=7, shape=(20, 18, 10), messy=defects, seed=3)
    seen = {}
    for _res, row, stacks, rej in _synth_series(spec, tmp_path, STRICT):
        codes = {str(r.code) for r in rej}
        kept = [s for s in stacks if s.series_uid == row.series_uid]
        seen[row.defect] = (codes, len(kept))
        if kept:
            load_stack(kept[0])
    assert seen["missing_slice"] == ({"missing_slices"}, 0)
    assert seen["uneven_spacing"] == ({"inconsistent_geometry"}, 0)
    assert seen["localizer"] == ({"extra_stack"}, 1)
    assert seen["duplicate_slice"] == ({"duplicate_input"}, 1)
    # the cut file is rejected (its pixels or header are gone), so its series has a gap
    assert seen["truncated"][0] & {"truncated", "no_pixel_data"} and seen["truncated"][1] == 0
    assert seen["no_preamble"] == (set(), 1)
    assert seen[""] == (set(), 1)


def test_projection_images_with_geometry_stay_separate_images(tmp_path: Path) -> None:
    """Two radiographs of one series carrying the same IPP/IOP are two 2D images, not a stack."""
    series = generate_uid()
    paths = []
    for k in range(2):
        arr = np.full((3, 4), 100 * (k + 1))
        p = _dx(
            tmp_path,
            f"dx{k}.dcm",
            arr,
            SeriesInstanceUID=series,
            ImagePositionPatient=["0", "0", "0"],
            ImageOrientationPatient=list(AXIAL),
            PixelSpacing=["0.1", "0.1"],
        )
        paths.append(p)
    headers = [scan_header(p) for p in paths]
    headers = [dataclasses.replace(h, study_uid="1.2.3") for h in headers]
    stacks, rej = group_stacks(headers)
    assert rej == [] and len(stacks) == 2 and all(s.kind == "image" for s in stacks)
    assert {int(load_stack(s).array.max()) for s in stacks} == {100, 200}


@pytest.mark.reliability
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, RLELossless])
def test_corrupted_bytes_never_escape_as_other_exceptions(tmp_path: Path, ts: str) -> None:
    """Random byte damage anywhere in the files: every outcome is an image or a coded error."""
    clean = make_series(tmp_path / "clean", _rng_volume((4, 8, 8)), ts=ts)
    rng = np.random.default_rng(0)
    outcomes = set()
    for trial in range(12):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        paths = []
        for p in clean:
            data = bytearray(p.read_bytes())
            for pos in rng.integers(0, len(data), size=6):
                data[pos] = int(rng.integers(0, 256))
            if trial % 3 == 0:
                data = data[: int(rng.integers(1, len(data)))]
            q = folder / p.name
            q.write_bytes(bytes(data))
            paths.append(q)
        headers, rejected = scan_headers(paths)
        outcomes.update(str(r.code) for r in rejected)
        stacks, rej2 = group_stacks(headers)
        outcomes.update(str(r.code) for r in rej2)
        for s in stacks:
            try:
                img = load_stack(s)
                assert img.array.size > 0
                outcomes.add("ok")
            except IngestError as exc:
                outcomes.add(str(Code(exc.code)))
    assert outcomes - {"ok"}, outcomes  # the damage was noticed at least once


def test_one_failing_series_does_not_stop_grouping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medres.ingest.dicom.series as dicom_mod

    good = make_series(tmp_path / "good", _rng_volume((3, 3, 3)))
    bad = make_series(tmp_path / "bad", _rng_volume((3, 3, 3)))
    bad_series = scan_header(bad[0]).series_uid
    real = dicom_mod._group_series

    def flaky(study, series, hs, policy):
        if series == bad_series:
            raise ZeroDivisionError("unexpected")
        return real(study, series, hs, policy)

    monkeypatch.setattr(dicom_mod, "_group_series", flaky)
    stacks, rej = _load(good + bad)
    assert len(stacks) == 1 and stacks[0].series_uid != bad_series
    assert [(r.code, r.n_files) for r in rej] == [(Code.INCONSISTENT_GEOMETRY, 3)]


@pytest.mark.parametrize(
    ("charset", "text"),
    [("ISO_IR 192", "Müller-Ñandú-日本"), ("ISO_IR 100", "Müller"), ("GB18030", "医院设备")],
)
def test_header_text_respects_specific_character_set(
    tmp_path: Path, charset: str, text: str
) -> None:
    paths = make_series(tmp_path, _rng_volume((3, 2, 2)))
    ds = pydicom.dcmread(paths[0])
    ds.SpecificCharacterSet = charset
    ds.PatientID = text
    ds.Manufacturer = text
    ds.save_as(paths[0], enforce_file_format=True)
    h = scan_header(paths[0])
    assert (h.patient_id, h.manufacturer) == (text, text)
    assert h.rows == 2 and h.image_orientation == AXIAL and h.pixel_spacing == (0.7, 0.8)
