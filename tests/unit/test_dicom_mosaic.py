"""Siemens mosaic images: cut into slices, placed at their true world coordinates.

Each test builds mosaic DICOM files with pydicom from a known volume (7 tiles of 6x5 in a
3x3 grid, values unique per voxel) and a CSA image header built here, then checks voxel by
voxel through the output affine that every voxel of the known volume lands at its true
world coordinate. The file's ImagePositionPatient is written the way Siemens writes it (the
grid's corner as if the grid were one image centred like a tile), so the test fails unless
the published correction is applied. The opt-in test at the end compares with dcm2niix on
real Siemens mosaics (``../shared/data/dcm_qa_nih``).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import random
import shutil
import struct
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from typer.testing import CliRunner

from medres.cli.app import app
from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.dicom import (
    decode,
    fastscan,
    group_stacks,
    load_stack,
    scan,
    scan_header,
    scan_headers,
)
from medres.ingest.dicom.csa import csa_float, csa_vector, parse_csa
from medres.ingest.dicom.fields import FIELD_BY_TAG
from medres.ingest.dicom.mosaic import mosaic_count

N, TR, TC, GRID = 7, 6, 5, 3  # tiles, tile rows, tile cols, grid side
DR, DC, SPACING = 2.0, 1.5, 3.5  # PixelSpacing (row, col), slice spacing (mm)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "dcm_qa_nih" / "In"


def _oblique() -> tuple[float, ...]:
    """Row/column cosines rotated 20 deg about x, then 30 deg about z."""
    a, b = math.radians(20), math.radians(30)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    m = rz @ rx
    return (*m[:, 0], *m[:, 1])


def csa_bytes(tags: dict[str, list[str]], *, sv10: bool = True) -> bytes:
    """A CSA image header holding ``tags`` (SV10 or the old layout)."""
    first = len(next(iter(tags.values()))) if tags else 0
    out = [b"SV10\x04\x03\x02\x01" if sv10 else b"", struct.pack("<II", len(tags), 77)]
    for name, items in tags.items():
        out.append(struct.pack("<64si4siii", name.encode(), 1, b"FD", 4, len(items), 77))
        for item in items:
            data = item.encode() + b"\x00"
            x0 = len(data) if sv10 else len(data) + first
            out.append(struct.pack("<4i", x0, len(data), 77, len(data)))
            out.append(data + b"\x00" * (-len(data) % 4))
    return b"".join(out)


def known_volume(seed: int = 0) -> np.ndarray:
    """(N, TR, TC) uint16 values, unique per voxel."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(N * TR * TC) + 100).astype(np.uint16).reshape(N, TR, TC)


def geometry(orient: tuple[float, ...], sign: float) -> tuple[np.ndarray, ...]:
    """(row cosine, column cosine, slice direction, first tile origin) in LPS."""
    r, c = np.array(orient[:3]), np.array(orient[3:])
    n = sign * np.cross(r, c)
    return r, c, n / np.linalg.norm(n), np.array([-20.0, 15.0, 40.0])


def write_mosaic(
    path: Path,
    vol: np.ndarray,
    *,
    orient: tuple[float, ...] = AXIAL,
    sign: float = 1.0,
    ts: str = ExplicitVRLittleEndian,
    count: int | str | None = N,
    csa: bytes | None = b"auto",
    series: str = "",
    acq: int = 1,
) -> Path:
    """One mosaic file of ``vol`` (tiles along ``sign * cross(row, col)``)."""
    r, c, n, p0 = geometry(orient, sign)
    frame = np.zeros((GRID * TR, GRID * TC), np.uint16)
    for k in range(vol.shape[0]):
        frame[(k // GRID) * TR : (k // GRID + 1) * TR, (k % GRID) * TC : (k % GRID + 1) * TC] = vol[
            k
        ]
    ipp = p0 - (r * DC * (GRID * TC - TC) / 2 + c * DR * (GRID * TR - TR) / 2)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientID, ds.Modality, ds.Manufacturer = "P1", "MR", "SIEMENS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.AcquisitionNumber, ds.InstanceNumber = acq, acq
    ds.AcquisitionTime = f"1200{acq:02d}.000000"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = frame.shape[0], frame.shape[1], 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in orient]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    ds.PixelSpacing = [str(DR), str(DC)]
    ds.SliceThickness, ds.SpacingBetweenSlices = "3", str(SPACING)
    if count is not None:
        vr = "US" if isinstance(count, int) else "IS"
        ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0A, vr, count)
    if csa == b"auto":
        normal = [f"{v:.8f}" for v in n]
        n_csa = str(count if isinstance(count, int) else N)
        csa = csa_bytes({"NumberOfImagesInMosaic": [n_csa], "SliceNormalVector": normal})
    if csa is not None:
        ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(0x10, "OB", csa)
    ds.PixelData = frame.tobytes()
    if ts == RLELossless:
        ds.compress(RLELossless, frame)
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_lands(array: np.ndarray, affine: np.ndarray, vol: np.ndarray, orient, sign) -> None:
    """Every voxel (k, row, col) of ``vol`` sits where ``affine`` (RAS) puts its true LPS
    world coordinate, with its value."""
    assert array.size == vol.size
    r, c, n, p0 = geometry(orient, sign)
    k, i, j = np.meshgrid(*(np.arange(s) for s in vol.shape), indexing="ij")
    lps = p0 + k[..., None] * SPACING * n + j[..., None] * DC * r + i[..., None] * DR * c
    ras = lps * np.array([-1.0, -1.0, 1.0])
    ijk = (np.linalg.inv(affine) @ np.c_[ras.reshape(-1, 3), np.ones(vol.size)].T)[:3].T
    idx = np.rint(ijk).astype(int)
    assert np.abs(ijk - idx).max() < 1e-4
    assert (idx >= 0).all() and (idx < np.array(array.shape[:3])).all()  # no wrap-around
    assert np.array_equal(array[tuple(idx.T)], vol.reshape(-1))


def load(paths: list[Path]):
    headers, rejected = scan_headers(paths)
    assert rejected == []
    stacks, rejected = group_stacks(headers)
    assert rejected == [] and len(stacks) == 1
    return load_stack(stacks[0])


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    ("orient", "sign", "ts", "count"),
    [
        (AXIAL, 1.0, ExplicitVRLittleEndian, N),
        (_oblique(), 1.0, ExplicitVRLittleEndian, N),
        (_oblique(), -1.0, ExplicitVRLittleEndian, N),  # CSA normal against cross(row, col)
        (_oblique(), -1.0, ImplicitVRLittleEndian, N),
        (_oblique(), 1.0, ExplicitVRLittleEndian, "7"),  # count as IS text
        (_oblique(), -1.0, RLELossless, N),  # compressed: decoded, then cut
    ],
)
def test_mosaic_voxels_land_at_true_world_coordinates(tmp_path, orient, sign, ts, count) -> None:
    vol = known_volume()
    path = write_mosaic(tmp_path / "m.dcm", vol, orient=orient, sign=sign, ts=ts, count=count)
    h = scan_header(path)
    assert (h.mosaic_images, h.mosaic_spacing) == (N, SPACING)
    img = load([path])
    assert img.dims == 3 and img.n_slices == N and img.sources == [str(path)]
    assert_lands(img.array, img.affine, vol, orient, sign)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("count", [N, "7", None])
def test_lean_walk_and_pydicom_agree(tmp_path, monkeypatch, ts, count) -> None:
    path = write_mosaic(tmp_path / "m.dcm", known_volume(), orient=_oblique(), ts=ts, count=count)
    with open(path, "rb") as fh:
        assert fastscan.fast_scan(fh, path.stat().st_size, FIELD_BY_TAG) is not None
    lean = scan_header(path)
    monkeypatch.setattr(scan, "fast_scan", lambda *a, **k: None)
    assert dataclasses.asdict(scan_header(path)) == dataclasses.asdict(lean)
    assert lean.mosaic_images == N and lean.mosaic_normal is not None


@pytest.mark.parametrize("path_kind", ["pydicom_native", "pydicom_rle"])
def test_pydicom_decode_path_cuts_the_same(tmp_path, monkeypatch, path_kind) -> None:
    """With the shortcuts off (full dcmread + pixel_array), the same volume."""
    vol, orient = known_volume(5), _oblique()
    ts = RLELossless if path_kind == "pydicom_rle" else ExplicitVRLittleEndian
    path = write_mosaic(tmp_path / "m.dcm", vol, orient=orient, sign=-1.0, ts=ts)
    monkeypatch.setattr(decode, "fast_ok", lambda h: False)
    monkeypatch.setattr(decode, "decode_encapsulated", lambda h: None)
    img = load([path])
    assert_lands(img.array, img.affine, vol, orient, -1.0)


def test_frame_that_cannot_be_cut_is_rejected(tmp_path, monkeypatch) -> None:
    path = write_mosaic(tmp_path / "m.dcm", known_volume(), ts=RLELossless)
    monkeypatch.setattr(decode, "decode_encapsulated", lambda h: np.zeros((1, 4, 4), np.uint16))
    headers, _ = scan_headers([path])
    (stack,), _ = group_stacks(headers)
    with pytest.raises(IngestError) as exc:
        load_stack(stack)
    assert exc.value.code == Code.INVALID_MOSAIC


def test_each_file_read_once(tmp_path, monkeypatch) -> None:
    calls: list[str] = []
    real = decode._mosaic_frame

    def counting(h):
        calls.append(h.source)
        return real(h)

    monkeypatch.setattr(decode, "_mosaic_frame", counting)
    vol = known_volume()
    load([write_mosaic(tmp_path / "m.dcm", vol)])
    assert len(calls) == 1


def test_cli_ingests_a_mosaic_as_a_volume(tmp_path) -> None:
    vol = known_volume(3)
    orient = _oblique()
    (tmp_path / "src").mkdir()
    write_mosaic(tmp_path / "src" / "m.dcm", vol, orient=orient, sign=-1.0)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["ingest", str(tmp_path / "src"), "--out", str(out), "-j", "1"])
    assert r.exit_code == 0, r.output
    (row,) = _rows(out / "manifest.csv")
    assert row["dims"] == "3" and row["n_slices"] == str(N)
    nii = nib.load(out / row["image_path"])
    assert_lands(np.asarray(nii.dataobj), nii.affine, vol, orient, -1.0)


# --------------------------------------------------------------------------- count and CSA sources
def test_count_from_csa_only_and_tag_only(tmp_path) -> None:
    vol = known_volume(1)
    orient = _oblique()
    only_csa = write_mosaic(tmp_path / "a.dcm", vol, orient=orient, sign=-1.0, count=None)
    img = load([only_csa])
    assert_lands(img.array, img.affine, vol, orient, -1.0)
    # a malformed CSA header: the tag's count is used, the normal is cross(row, col)
    junk = write_mosaic(tmp_path / "b.dcm", vol, orient=orient, csa=b"SV10" + b"\xff" * 60)
    img = load([junk])
    assert_lands(img.array, img.affine, vol, orient, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"count": 10}, "does not fit"),  # 10 tiles need a 4x4 grid: 18x15 does not divide
        ({"count": 0}, "does not fit"),
        ({"count": 2, "csa": csa_bytes({"NumberOfImagesInMosaic": ["7"]})}, "disagrees"),
        ({"count": None, "csa": b"SV10" + b"\x00" * 40}, "without NumberOfImagesInMosaic"),
        ({"count": None, "csa": None}, "without NumberOfImagesInMosaic"),
        (
            {"csa": csa_bytes({"SliceNormalVector": ["1", "0", "0"]})},  # in the image plane
            "not perpendicular",
        ),
    ],
)
def test_bad_mosaic_is_a_coded_rejection(tmp_path, kwargs, why) -> None:
    path = write_mosaic(tmp_path / "m.dcm", known_volume(), **kwargs)
    with pytest.raises(IngestError) as exc:
        scan_header(path)
    assert exc.value.code == Code.INVALID_MOSAIC and why in str(exc.value)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["ingest", str(path), "--out", str(out), "-j", "1"])
    assert r.exit_code == 1 and "invalid_mosaic" in (out / "errors.csv").read_text()


def test_mosaic_count_encodings() -> None:
    assert mosaic_count(("US", (36).to_bytes(2, "little"))) == 36
    assert mosaic_count(("", (36).to_bytes(2, "little"))) == 36  # implicit VR, binary
    assert mosaic_count(("", b"36")) == 36  # implicit VR, text
    assert mosaic_count(("IS", b"5 ")) == 5
    assert mosaic_count(("UN", b"12")) == 12
    assert mosaic_count(("US", 9)) == 9  # already converted by pydicom
    assert mosaic_count(("US", b"\x01")) is None
    assert mosaic_count(("IS", b"x1")) is None
    assert mosaic_count(None) is None


# --------------------------------------------------------------------------- CSA parser
def test_csa_parser_reads_both_layouts() -> None:
    tags = {
        "Other": ["a", "b"],
        "NumberOfImagesInMosaic": ["7"],
        "SliceNormalVector": ["0", "0.5", "-1"],
    }
    for sv10 in (True, False):
        got = parse_csa(csa_bytes(tags, sv10=sv10), ["NumberOfImagesInMosaic", "SliceNormalVector"])
        assert got == {"NumberOfImagesInMosaic": ("7",), "SliceNormalVector": ("0", "0.5", "-1")}
        assert csa_float(got, "NumberOfImagesInMosaic") == 7.0
        assert csa_vector(got, "SliceNormalVector", 3) == (0.0, 0.5, -1.0)
    assert csa_vector({"SliceNormalVector": ("0", "nan", "1")}, "SliceNormalVector", 3) is None


def test_csa_parser_never_raises_on_damage() -> None:
    good = csa_bytes({"NumberOfImagesInMosaic": ["7"], "SliceNormalVector": ["0", "0", "1"]})
    wanted = ["NumberOfImagesInMosaic", "SliceNormalVector"]
    for cut in range(len(good)):
        assert parse_csa(good[:cut], wanted) in (None, {}) or cut >= len(good) - 3
    rng = random.Random(7)
    for _ in range(300):
        bad = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        got = parse_csa(bytes(bad), wanted)
        assert got is None or isinstance(got, dict)
    huge = b"SV10\x04\x03\x02\x01" + struct.pack("<II", 10**6, 77) + b"\x00" * 100
    assert parse_csa(huge, wanted) is None
    assert parse_csa(b"", wanted) is None and parse_csa(b"\x00" * 3, wanted) is None


def test_damaged_mosaic_files_fail_only_with_codes(tmp_path) -> None:
    """A byte changed anywhere in the header (CSA included): a correct volume or a coded
    error, never another exception."""
    good = write_mosaic(tmp_path / "m.dcm", known_volume(), orient=_oblique()).read_bytes()
    pixels = good.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010)
    for i, off in enumerate(range(132, pixels, 4)):
        bad = bytearray(good)
        bad[off] ^= 0xFF if i % 2 else 0x41
        path = tmp_path / f"d{off}.dcm"
        path.write_bytes(bytes(bad))
        try:
            stacks, _ = group_stacks([scan_header(path)])
            for st in stacks:
                load_stack(st)
        except IngestError:
            pass


# --------------------------------------------------------------------------- multi-file series
def test_multi_file_mosaic_series_keeps_every_volume_or_says_so(tmp_path) -> None:
    """One mosaic per time point: every file is in the image (4D) or named in errors.csv."""
    src = tmp_path / "src"
    src.mkdir()
    vols = [known_volume(10 + t) for t in range(2)]
    for t, vol in enumerate(vols):
        write_mosaic(src / f"v{t}.dcm", vol, orient=_oblique(), series="1.2.3.9", acq=t + 1)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["ingest", str(src), "--out", str(out), "-j", "1"])
    assert r.exit_code == 0, r.output
    (row,) = _rows(out / "manifest.csv")
    nii = nib.load(out / row["image_path"])
    data = np.asarray(nii.dataobj)
    if data.ndim == 4:  # multi-volume series became 4D: every volume checked
        assert data.shape[3] == 2
        for t, vol in enumerate(vols):
            assert_lands(data[..., t], nii.affine, vol, _oblique(), 1.0)
    else:
        assert_lands(data, nii.affine, vols[0], _oblique(), 1.0)
        errors = {e["source"]: e for e in _rows(out / "errors.csv")}
        assert "v1.dcm" in errors and errors["v1.dcm"]["code"] == "extra_stack"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- real data (opt-in)
@pytest.mark.slow
def test_real_siemens_mosaics_match_dcm2niix(tmp_path) -> None:
    """Every Siemens mosaic series of dcm_qa_nih: medres' volume equals dcm2niix's after
    reorientation, and world positions agree within 0.01 mm (all volumes when medres
    writes 4D, else the first)."""
    root = REAL / "20180918Si"
    if not root.is_dir():
        pytest.skip(f"real data absent: {root}")
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix not on PATH (apt-get install dcm2niix)")
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
        img = load(sorted(s.glob("*.dcm")))
        want, got = np.asarray(ref.dataobj), img.array
        if got.ndim == 3:
            want = want[..., 0] if want.ndim == 4 else want
        assert got.shape == want.shape, s.name
        assert np.array_equal(got, want), s.name
        ends = [(0, n - 1) for n in got.shape[:3]]
        corners = np.array([[i, j, k, 1] for i in ends[0] for j in ends[1] for k in ends[2]]).T
        assert np.abs(img.affine @ corners - ref.affine @ corners).max() < 0.01, s.name
