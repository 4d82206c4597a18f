"""`medres ingest` end to end through the CLI, on tiny DICOM/NIfTI data made here."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medres.cli import app
from medres.dataset.manifest import MANIFEST_COLUMNS, read_manifest
from medres.errors import IngestError
from medres.ingest.pipeline import IngestConfig, run_ingest
from medres.workers import IsolatedPool

runner = CliRunner()
CANARY_NAME = "CANARYNAME^Zeta"
CANARY_PREFIX = "CANARYPID"


def write_ct_series(folder: Path, patient_id: str, *, n: int = 4, seed: int = 0) -> list[Path]:
    """A tiny axial CT series (8x8xn, int16 + rescale) with canary identities."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientID = patient_id
        ds.PatientName = CANARY_NAME
        ds.PatientSex = "F"
        ds.PatientAge = "061Y"
        ds.AccessionNumber = f"A{patient_id[-6:]}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", "ACME", "CHEST"
        ds.Rows, ds.Columns = 8, 8
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 2.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.0 * k]
        ds.InstanceNumber = k + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = rng.integers(0, 2000, (8, 8), dtype=np.int16).tobytes()
        p = folder / f"IM{k:04d}"  # no extension: DICOM is found by content
        pydicom.dcmwrite(p, ds, enforce_file_format=True)
        paths.append(p)
    return paths


def write_nifti(path: Path, seed: int = 0) -> Path:
    arr = np.random.default_rng(seed).integers(-100, 100, (6, 5, 4)).astype(np.int16)
    nib.save(nib.Nifti1Image(arr, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> dict:
    """5 patients: 3 CT folders (+ a second series for p1), one NIfTI, one zipped series,
    junk, an exact duplicate file; a labels file keyed by patient_id."""
    src = tmp_path / "src"
    pids = [f"{CANARY_PREFIX}-{i:03d}" for i in range(5)]
    write_ct_series(src / "p0" / "s1", pids[0], seed=0)
    write_ct_series(src / "p0" / "s2", pids[0], seed=10)
    write_ct_series(src / "p1" / "s1", pids[1], seed=1)
    write_ct_series(src / "p2" / "s1", pids[2], seed=2)
    shutil.copy(src / "p2" / "s1" / "IM0000", src / "p2" / "zz_copy_of_IM0000")
    zdir = tmp_path / "zipme"
    write_ct_series(zdir / "s1", pids[3], seed=3)
    with zipfile.ZipFile(src / "batch.zip", "w") as zf:
        for p in sorted((zdir / "s1").iterdir()):
            zf.write(p, f"p3/{p.name}")
    write_nifti(src / "loose.nii.gz")
    (src / "README.txt").write_text("not an image")
    (src / ".DS_Store").write_bytes(os.urandom(64))
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "patient_id,label\n"
        + "".join(f"{pid},{i % 2}\n" for i, pid in enumerate(pids[:4]))
        + f"{CANARY_PREFIX}-GHOST,1\n"
    )
    n_files = sum(1 for p in src.rglob("*") if p.is_file()) - 1 + 4  # zip -> its 4 members
    return {"src": src, "labels": labels, "pids": pids, "out": tmp_path / "out", "n_files": n_files}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _all_output_bytes(out: Path) -> list[tuple[Path, bytes]]:
    found = []
    for p in out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith(".gz"):
                data += gzip.decompress(data)
            found.append((p, data))
    return found


def test_ingest_end_to_end(dataset, tmp_path):
    out = dataset["out"]
    r = runner.invoke(
        app,
        [
            "ingest", str(dataset["src"]), "--out", str(out), "--labels", str(dataset["labels"]),
            "--workers", "2", "--val-frac", "0.25", "--test-frac", "0.25", "--seed", "1",
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "images CT" in r.output and "unmatched label rows" in r.output

    manifest = read_manifest(out / "manifest.csv", check_files=True)
    assert manifest.columns == MANIFEST_COLUMNS
    rows = manifest.rows
    by_source = {row["source"]: row for row in rows}
    assert set(by_source) == {"p0/s1", "p0/s2", "p1/s1", "p2/s1", "batch.zip!p3", "loose.nii.gz"}
    ct = by_source["p1/s1"]
    assert (ct["dims"], ct["shape"], ct["spacing"], ct["n_slices"]) == (
        "3",
        "8x8x4",
        "0.5x0.5x2",
        "4",
    )
    assert (ct["modality"], ct["manufacturer"], ct["sex"], ct["age"]) == ("CT", "ACME", "F", "61")
    assert ct["patient_key"].startswith("pat-") and ct["image_id"].startswith("img-")
    img = nib.load(manifest.resolve(ct))
    assert img.shape == (8, 8, 4)
    assert float(np.asarray(img.dataobj).min()) < 0  # HU: the rescale intercept was applied
    # labels joined through pseudonyms; the NIfTI has no patient id -> unlabelled
    assert [by_source[s]["label"] for s in ("p0/s1", "p0/s2", "p1/s1", "p2/s1", "batch.zip!p3")] == [
        "0", "0", "1", "0", "1"
    ]  # fmt: skip
    assert by_source["loose.nii.gz"]["label"] == ""
    assert by_source["p0/s1"]["patient_key"] == by_source["p0/s2"]["patient_key"]
    # a patient never spans two splits
    per_patient: dict[str, set[str]] = {}
    for row in rows:
        per_patient.setdefault(row["patient_key"] or row["image_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in per_patient.values())

    errors = {e["source"]: e["code"] for e in _rows(out / "errors.csv")}
    assert errors == {
        "README.txt": "not_dicom",
        ".DS_Store": "not_dicom",
        "p2/zz_copy_of_IM0000": "duplicate_input",  # the later path of the same instance
    }

    info = json.loads((out / "ingest.json").read_text())
    files = info["files"]
    assert files["seen"] == dataset["n_files"]
    assert files["seen"] == files["used"] + files["rejected"] + files["skipped"]
    assert (files["used"], files["rejected"], files["skipped"]) == (5 * 4 + 1, 2, 1)
    assert info["labels"] == {
        "key_column": "patient_id", "rows": 5, "unmatched_rows": 1, "unlabelled_images": 1,
    }  # fmt: skip
    assert info["images_by_modality"] == {"CT": 5, "unknown": 1}  # NIfTI has no modality

    # no PatientName / PatientID / accession value, nor the absolute source path, anywhere
    needles = [CANARY_NAME.encode(), b"CANARYNAME", CANARY_PREFIX.encode(), str(tmp_path).encode()]
    for path, data in _all_output_bytes(out):
        for needle in needles:
            assert needle not in data, f"{needle!r} leaked into {path.name}"


def test_rerun_is_incremental_and_identical(dataset):
    out = dataset["out"]
    args = ["ingest", str(dataset["src"]), "--out", str(out), "--workers", "1"]
    assert runner.invoke(app, args).exit_code == 0
    first = (out / "manifest.csv").read_bytes()
    images = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert runner.invoke(app, args).exit_code == 0
    assert (out / "manifest.csv").read_bytes() == first
    info = json.loads((out / "ingest.json").read_text())
    assert info["files"]["cached"] == info["files"]["used"] == 21
    # unchanged series are trusted whole: only the two junk files are read again
    assert info["files"]["scanned"] == 2
    assert info["files"]["skipped"] == 1  # the duplicate copy, remembered with its series
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == images

    # change one series: only that image is decoded again; a removed input disappears
    time.sleep(0.01)
    changed = dataset["src"] / "p1" / "s1" / "IM0003"
    changed.write_bytes(changed.read_bytes())  # same bytes, new mtime -> new fingerprint
    (dataset["src"] / "loose.nii.gz").unlink()
    assert runner.invoke(app, args).exit_code == 0
    info = json.loads((out / "ingest.json").read_text())
    assert info["files"]["used"] == 20
    assert info["files"]["cached"] == 16
    assert info["files"]["scanned"] == 4 + 2  # the changed series and the junk
    rows = read_manifest(out / "manifest.csv", check_files=True).rows
    assert len(rows) == 5
    assert len(list((out / "images").iterdir())) == 5  # the NIfTI's image was pruned

    # a file added to a trusted series makes the series be read and decoded again
    write_ct_series(dataset["src"] / "p0" / "extra", "OTHER", n=3, seed=5)
    extra = dataset["src"] / "p0" / "s1" / "IM0000"
    shutil.copy(extra, dataset["src"] / "p0" / "zz_copy")  # joins series p0/s1 (duplicate)
    assert runner.invoke(app, args).exit_code == 0
    info = json.loads((out / "ingest.json").read_text())
    assert info["files"]["scanned"] == 3 + 1 + 4 + 2  # new series, new copy, its series, junk
    assert info["files"]["skipped"] == 2
    assert info["files"]["seen"] == 20 + 3 + 1 + 2 + 1
    assert len(read_manifest(out / "manifest.csv", check_files=True).rows) == 6


def test_nothing_usable_exits_1_with_one_line(tmp_path):
    src = tmp_path / "junk"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    (src / "b.bin").write_bytes(os.urandom(300))
    r = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no usable image" in lines[0] and "errors.csv" in lines[0]
    assert "Traceback" not in r.output
    errors = _rows(tmp_path / "out" / "errors.csv")
    assert sorted(e["code"] for e in errors) == ["not_dicom", "not_dicom"]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--val-frac", "0.7", "--test-frac", "0.5"], "--val-frac"),
        (["--labels", "MISSING"], "labels file 'missing.csv' not found"),
        (["--workers", "-2"], "--workers"),
        (["--min-slices", "0"], "--min-slices"),
    ],
)
def test_bad_options_exit_1_before_work(tmp_path, extra, match):
    src = tmp_path / "src"
    write_nifti(src / "a.nii.gz") if src.mkdir() is None else None
    extra = [str(tmp_path / "missing.csv") if e == "MISSING" else e for e in extra]
    r = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "out"), *extra])
    assert r.exit_code == 1, r.output
    assert match in r.output
    assert not (tmp_path / "out" / "images").exists()


def test_missing_source_is_a_one_line_error(tmp_path):
    r = runner.invoke(app, ["ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "does not exist" in r.output


def test_library_entry_point_in_process(tmp_path):
    src = tmp_path / "src"
    write_ct_series(src / "a", "X1", n=3)
    write_nifti(src / "b.nii")
    report = run_ingest(IngestConfig(sources=(src,), out_dir=tmp_path / "o", isolate=False))
    assert report.n_images == 2
    assert report.files == {
        "seen": 4, "used": 4, "rejected": 0, "skipped": 0, "cached": 0, "scanned": 4,
    }  # fmt: skip
    assert report.manifest_path.is_file()
    # --min-slices rejects the 3-slice stack and the 4-slice NIfTI with a stable code
    with pytest.raises(IngestError, match="no usable image"):
        run_ingest(
            IngestConfig(sources=(src,), out_dir=tmp_path / "o2", isolate=False, min_slices=5)
        )
    codes = {e["source"]: e["code"] for e in _rows(tmp_path / "o2" / "errors.csv")}
    assert codes == {"a/IM0000": "too_few_slices", "a/IM0001": "too_few_slices",
                     "a/IM0002": "too_few_slices", "b.nii": "too_few_slices"}  # fmt: skip


def test_output_inside_source_several_roots_and_path_labels(tmp_path):
    a, b = tmp_path / "siteA", tmp_path / "siteB"
    write_ct_series(a / "p1", "A1", n=3, seed=1)
    b.mkdir()
    write_nifti(b / "scan.nii.gz")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\nsiteA/p1,pos,test\nsiteB/scan.nii.gz,neg,train\n")
    out = a / "derived"  # inside a source folder: never ingested itself
    cfg = IngestConfig(sources=(a, b), out_dir=out, labels=labels, isolate=False)
    for _ in range(2):  # the second run must not pick up the first run's images
        report = run_ingest(cfg)
        rows = read_manifest(out).rows
        assert {(r["source"], r["label"], r["split"]) for r in rows} == {
            ("siteA/p1", "pos", "test"),
            ("siteB/scan.nii.gz", "neg", "train"),
        }
        assert report.files["seen"] == 4


def test_one_ingest_at_a_time_per_output_folder(tmp_path):
    from medres.errors import ConfigError

    src = tmp_path / "src"
    src.mkdir()
    write_nifti(src / "a.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".medres_lock").write_text(str(os.getpid()))  # a live owner
    cfg = IngestConfig(sources=(src,), out_dir=out, isolate=False)
    with pytest.raises(ConfigError, match="another `medres ingest`"):
        run_ingest(cfg)
    (out / ".medres_lock").write_text("999999999")  # a dead owner: the stale lock is taken over
    assert run_ingest(cfg).n_images == 1
    assert not (out / ".medres_lock").exists()


@pytest.mark.reliability
@pytest.mark.parametrize(("archive", "workers"), [(None, "1"), ("tar.gz", "2")])
def test_synth_messy_defects_are_caught_with_their_codes(tmp_path, archive, workers):
    """Every defect `medres synth` plants ends in errors.csv with its code (or is repaired),
    no canary identity leaks, and every file is accounted for."""
    from medres.ingest.labels import id_keys
    from medres.phi import load_or_create_key
    from medres.synth import PHI_CANARY_MARKER, SynthSpec, generate

    messy = (
        "missing_slice", "duplicate_slice", "localizer", "uneven_spacing", "two_series",
        "junk", "truncated", "no_preamble", "shuffle_names",
    )  # fmt: skip
    spec = SynthSpec(
        kind="ct", n_patients=8, shape=(16, 16, 8), messy=messy, seed=3, phi_canary=True,
        archive=archive,
    )  # fmt: skip
    res = generate(spec, tmp_path / "syn")
    src = res.archive or res.data_dir
    out = tmp_path / "out"
    r = runner.invoke(
        app,
        ["ingest", str(src), "--out", str(out), "--labels", str(res.labels_csv), "-j", workers,
         "--uneven-spacing", "reject"],  # the strict rule (the default resamples gaps)
    )  # fmt: skip
    assert r.exit_code == 0, r.output

    def source(rel: str) -> str:  # truth paths are relative to the synth folder
        if res.archive is not None:
            return f"{res.archive.name}!{rel}"
        return Path(rel).relative_to(res.data_dir.relative_to(res.out_dir)).as_posix()

    errors = {e["source"]: e["code"] for e in _rows(out / "errors.csv")}
    key = load_or_create_key(out)
    series_in_manifest = {row["series_key"] for row in _rows(out / "manifest.csv")}
    for t in res.truth:
        codes = [errors.get(source(p)) for p in t.paths]
        kept = id_keys(key, series_uid=t.series_uid)["series_key"] in series_in_manifest
        if t.defect == "missing_slice":
            assert set(codes) == {"missing_slices"} and not kept
        elif t.defect == "uneven_spacing":
            assert set(codes) == {"inconsistent_geometry"} and not kept
        elif t.defect == "localizer":
            assert sorted(c or "" for c in codes)[-1] == "extra_stack" and kept
            assert codes.count("extra_stack") == 1
        elif t.defect == "duplicate_slice":
            assert codes.count("duplicate_input") == 1 and kept
        elif t.defect == "truncated":
            assert sum(c in ("truncated", "no_pixel_data") for c in codes) == 1
        else:  # clean series, no_preamble, two_series: all files used
            assert codes == [None] * len(codes) and kept, t.defect
    for junk in res.junk:
        rel = junk.relative_to(res.out_dir).as_posix()
        assert errors[source(rel)] == "not_dicom"

    info = json.loads((out / "ingest.json").read_text())
    files = info["files"]
    assert files["seen"] == files["used"] + files["rejected"] + files["skipped"]
    assert files["seen"] == len(errors) + files["used"]
    marker = PHI_CANARY_MARKER.encode()
    for path, data in _all_output_bytes(out):
        assert marker not in data, f"canary leaked into {path.name}"

    # a re-run remembers rejected series too: only files without a readable header are read
    before = [(out / n).read_bytes() for n in ("manifest.csv", "errors.csv")]
    r = runner.invoke(
        app,
        ["ingest", str(src), "--out", str(out), "--labels", str(res.labels_csv), "-j", workers,
         "--uneven-spacing", "reject"],  # same settings, else the cache is void
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert [(out / n).read_bytes() for n in ("manifest.csv", "errors.csv")] == before
    again = json.loads((out / "ingest.json").read_text())["files"]
    no_header = sum(c in ("not_dicom", "truncated", "no_pixel_data") for c in errors.values())
    assert again["scanned"] == no_header
    assert again["cached"] == again["used"] == files["used"]


# ---------------------------------------------------------------------------------------
# worker isolation: module-level functions so that spawned workers can import them


def _job(x: str) -> str:
    if x == "crash":
        os._exit(3)  # a segfaulting decoder looks like this to the supervisor
    if x == "hang":
        time.sleep(60)
    if x == "raise":
        raise ValueError("SECRET value from a header")
    if x == "panic":
        raise BaseException("not an Exception subclass")
    return x.upper()


@pytest.mark.reliability
def test_isolated_pool_survives_crash_timeout_and_panics():
    items = ["a", "crash", "b", "hang", "c", "raise", "panic", "d"]
    t = time.monotonic()
    with IsolatedPool(2, timeout_s=2.0) as pool:
        res = pool.map(_job, items, chunk_size=3)
        again = pool.map(_job, ["e", "f"])  # the pool keeps working afterwards
    assert time.monotonic() - t < 40
    ok = {items[i]: v for i, (good, v) in enumerate(res) if good}
    assert ok == {"a": "A", "b": "B", "c": "C", "d": "D"}
    failed = {items[i]: v for i, (good, v) in enumerate(res) if not good}
    assert failed["crash"].code == "decode_failed" and "crashed" in failed["crash"].message
    assert failed["hang"].code == "timeout"
    assert failed["raise"].code == "decode_failed"
    assert "SECRET" not in failed["raise"].message  # exception text is never echoed
    assert failed["panic"].code == "decode_failed"
    assert again == [(True, "E"), (True, "F")]
