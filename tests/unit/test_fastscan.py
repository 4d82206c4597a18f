"""The lean header walk (medres.ingest.dicom.fastscan) gives exactly what the pydicom path gives.

Every file is scanned twice: as shipped (lean walk where it applies) and with the lean walk
switched off (pydicom ``dcmread``). The headers, or the coded errors, must be equal. The
corpus: pydicom's bundled test files, the synthetic messy CT set, radiographs, and files
built here to hit the walk's branches (implicit VR, nested undefined-length sequences, UN
sequences, private tags, non-Latin character sets, multi-frame, damage at every offset).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from medres.errors import IngestError
from medres.ingest.dicom import fastscan, scan
from medres.ingest.dicom.fields import FIELD_BY_TAG
from medres.ingest.dicom.scan import scan_header


def _both(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object, bool]:
    """(lean result, pydicom result, whether the lean walk accepted the file)."""

    def run() -> object:
        try:
            return scan_header(path, "src")
        except IngestError as exc:
            return ("error", str(exc.code), str(exc))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(path, "rb") as fh:
            size = path.stat().st_size
            accepted = fastscan.fast_scan(fh, size, FIELD_BY_TAG) is not None
        lean = run()
        with monkeypatch.context() as m:
            m.setattr(scan, "fast_scan", lambda *a, **k: None)
            ref = run()
    return lean, ref, accepted


def _assert_same(path: Path, monkeypatch: pytest.MonkeyPatch) -> bool:
    lean, ref, accepted = _both(path, monkeypatch)
    if dataclasses.is_dataclass(lean) and dataclasses.is_dataclass(ref):
        assert dataclasses.asdict(lean) == dataclasses.asdict(ref), path
    else:
        assert lean == ref, path
    return accepted


def test_pydicom_test_files_equal(monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted(p for p in (Path(f) for f in get_testdata_files()) if p.is_file())
    assert len(files) > 100
    accepted = sum(_assert_same(p, monkeypatch) for p in files)
    # the walk must actually take the common case, not decline everything
    assert accepted >= 40, accepted


def test_synthetic_sets_equal(synth_ct_messy, synth_xray, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [
        p
        for root in (synth_ct_messy.data_dir, synth_xray.data_dir)
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    ]
    assert len(files) > 50
    accepted = sum(_assert_same(p, monkeypatch) for p in files)
    assert accepted >= 0.8 * len(files), (accepted, len(files))


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "mr", "shape": (16, 16, 6), "oblique": 1.0},
        {"kind": "us", "shape": (24, 20)},
        {"kind": "sc", "shape": (24, 20)},
        {"kind": "ct", "shape": (16, 16, 6), "multiframe": True},
        {"kind": "ct", "shape": (16, 16, 6), "compression": "rle"},
        {"kind": "ct", "shape": (16, 16, 6), "compression": "jpegls"},
        {"kind": "ct", "shape": (16, 16, 6), "phi_canary": True},
    ],
    ids=["mr-oblique", "us", "sc", "enhanced-multiframe", "rle", "jpegls", "phi-canary"],
)
def test_other_synthetic_kinds_equal(
    synth_factory, spec: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = synth_factory(n_patients=2, seed=21, **spec)
    files = [p for p in sorted(Path(res.data_dir).rglob("*")) if p.is_file()]
    assert files
    for p in files:
        _assert_same(p, monkeypatch)


def _ct(path: Path, syntax: str = ExplicitVRLittleEndian, **extra: object) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax == RLELossless else syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientName = "Canary^Fast"
    ds.PatientID = "FAST001"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = np.arange(64, dtype=np.int16).tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)
    return path


def _nested() -> Sequence:
    inner = Dataset()
    inner.CodeValue = "123"
    inner.CodeMeaning = "thing"
    item = Dataset()
    item.ReferencedSOPInstanceUID = generate_uid()
    item.ConceptNameCodeSequence = Sequence([inner, inner])
    return Sequence([item, item])


def _rich(path: Path, syntax: str) -> Path:
    """A CT slice with private tags, Latin-1 text and nested undefined-length sequences."""
    p = _ct(
        path,
        syntax,
        ReferencedImageSequence=_nested(),
        InstitutionName="Hôpital Général",
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
    )
    ds = pydicom.dcmread(p)
    ds.add_new(0x00091010, "LO", "private")
    ds.add_new(0x00091011, "SQ", _nested())
    # undefined-length sequences and items (nested), as many scanners write them
    ds["ReferencedImageSequence"].is_undefined_length = True
    for item in ds.ReferencedImageSequence:
        item.is_undefined_length_sequence_item = True
    ds.save_as(p)
    return p


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless])
def test_constructed_files_equal_and_taken(
    tmp_path: Path, syntax: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = _rich(tmp_path / "a.dcm", syntax)
    assert b"\xff\xff\xff\xff" in p.read_bytes()  # undefined lengths really written
    assert _assert_same(p, monkeypatch)
    h = scan_header(p)
    assert (h.rows, h.cols, h.rescale_intercept) == (8, 8, -1024.0)
    assert h.patient_id == "FAST001" and h.has_pixel_data


def test_declined_cases_still_equal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # non-Latin character set: declined (pydicom decodes), same header
    p = _ct(tmp_path / "jp.dcm", SpecificCharacterSet="ISO_IR 13", InstitutionName="abc")
    assert not _assert_same(p, monkeypatch)
    # multi-frame: declined
    p2 = _ct(tmp_path / "mf.dcm", NumberOfFrames="1")
    assert _assert_same(p2, monkeypatch)
    ds = pydicom.dcmread(p2)
    ds.NumberOfFrames = "2"
    ds.PixelData = np.arange(128, dtype=np.int16).tobytes()
    ds.save_as(p2)
    assert not _assert_same(p2, monkeypatch)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_damage_at_every_offset_equal(
    tmp_path: Path, syntax: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Truncate or corrupt a header all along: the two paths agree every time."""
    src = _rich(tmp_path / "src.dcm", syntax)
    data = src.read_bytes()
    pixel_at = data.index(b"\xe0\x7f\x10\x00")
    bad = tmp_path / "bad.dcm"
    for cut in range(128, pixel_at + 16, 5):
        bad.write_bytes(data[:cut])
        _assert_same(bad, monkeypatch)
    rng = np.random.default_rng(0)
    for _ in range(300):
        b = bytearray(data)
        k = int(rng.integers(132, pixel_at + 12))
        b[k] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(b))
        _assert_same(bad, monkeypatch)
