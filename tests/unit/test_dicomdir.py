"""DICOMDIR given as the SOURCE (or met in a folder or archive): its references are followed.

The test set is written by pydicom's ``FileSet`` (upper-case 8.3 names, as on a CD), then
damaged the way real exports are: names lowered on disk, one referenced file missing, one
ReferencedFileID rewritten to escape the export folder.
"""

from __future__ import annotations

import csv
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from medres.cli.app import app
from medres.ingest.archives import InputFile
from medres.ingest.dicomdir import follow_dicomdirs
from medres.ingest.discover import discover

N_SLICES = 6
MISSING = "PT000000/ST000000/SE000000/IM000005"


def _slice(study: str, series: str, k: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.Modality = "P1", "Doe^J", "CT"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20200101", "1200", "1", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 4, 5, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
    ds.PixelSpacing = [1.0, 1.0]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.full((4, 5), 100 * k, np.int16).tobytes()
    return ds


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """A CD-style export: DICOMDIR + 6 slices, names lowered on disk, IM000005 missing and
    IM000004's reference rewritten to ``../OUTSIDE`` (a real file outside the export)."""
    fs = FileSet()
    study, series = generate_uid(), generate_uid()
    for k in range(N_SLICES):
        fs.add(_slice(study, series, k))
    root = tmp_path / "cd"
    fs.write(root)
    series_dir = root / "PT000000" / "ST000000" / "SE000000"
    (series_dir / "IM000005").unlink()
    (series_dir / "IM000004").rename(tmp_path / "OUTSIDE")  # a valid slice, outside
    dd = pydicom.dcmread(root / "DICOMDIR")
    for rec in dd.DirectoryRecordSequence:
        if list(rec.get("ReferencedFileID", []))[-1:] == ["IM000004"]:
            rec.ReferencedFileID = ["..", "OUTSIDE"]
    dd.save_as(root / "DICOMDIR")
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):  # lower the names
        for name in filenames + dirnames:
            if name != "DICOMDIR":
                os.rename(Path(dirpath) / name, Path(dirpath) / name.lower())
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _ingest(src: Path, out: Path) -> tuple[list[dict], dict[str, str], dict]:
    r = CliRunner().invoke(app, ["ingest", str(src), "--out", str(out), "-j", "1"])
    assert r.exit_code == 0, r.output
    errors = {e["source"]: e["code"] for e in _rows(out / "errors.csv")}
    info = json.loads((out / "ingest.json").read_text())
    return _rows(out / "manifest.csv"), errors, info


@pytest.mark.parametrize("how", ["dicomdir", "folder", "zip"])
def test_dicomdir_followed_case_insensitively_with_missing_and_escape(
    export: Path, tmp_path: Path, how: str
) -> None:
    if how == "dicomdir":
        src, prefix = export / "DICOMDIR", ""
    elif how == "folder":
        src, prefix = export, ""
    else:
        src, prefix = tmp_path / "cd.zip", "cd.zip!"
        with zipfile.ZipFile(src, "w") as z:
            for p in sorted(export.rglob("*")):
                if p.is_file():
                    z.write(p, p.relative_to(export).as_posix())
    manifest, errors, info = _ingest(src, tmp_path / f"out-{how}")
    assert len(manifest) == 1 and manifest[0]["n_slices"] == "4"  # IM000000..IM000003
    assert errors == {
        f"{prefix}DICOMDIR": "not_image",  # a skip, never a junk row
        f"{prefix}{MISSING}": "unreadable",
        f"{prefix}../OUTSIDE": "archive_unsafe",
    }
    # every file once: 4 slices used (found by the walk and the DICOMDIR alike), 3 rows
    assert info["files"]["seen"] == 7 and info["files"]["used"] == 4
    assert info["files"]["rejected"] == 2 and info["files"]["skipped"] == 1
    assert "Doe" not in (tmp_path / f"out-{how}" / "errors.csv").read_text()


def test_referenced_files_counted_once_and_bad_components_rejected(export: Path) -> None:
    found = discover([export], export.parent / "scratch")
    sources = [f.source for f in found.files]
    assert len(sources) == len(set(sources)) == 4
    assert all(s.startswith("pt000000/st000000/se000000/im00000") for s in sources)
    codes = {r.source: r.code for r in found.rejected}
    assert codes["DICOMDIR"] == "not_image" and found.seen == 7


def test_not_a_media_directory_is_left_to_the_scan(tmp_path: Path) -> None:
    junk = tmp_path / "DICOMDIR"
    junk.write_bytes(b"not a dicom file at all")
    f = InputFile(junk, "DICOMDIR", junk.stat().st_size, "x")
    files, rejected = follow_dicomdirs([f], [], 100)
    assert files == [f] and rejected == []
