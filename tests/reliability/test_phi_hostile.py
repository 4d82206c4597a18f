"""Hostile headers (issue #16): a patient's name and ID in free-text header fields never
reach an ingest output, and ``score --dicom-out`` without ``--keep-ids`` writes an SR
without patient identifiers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.models import write_dicom_2d, write_model_dir
from typer.testing import CliRunner

from medres.cli import app

pydicom = pytest.importorskip("pydicom")

pytestmark = pytest.mark.reliability

runner = CliRunner()
NAME = "CANARYFAM^CANARYGIVEN"
PID = "CANARYPID9"
CANARIES = ("canaryfam", "canarygiven", "canarypid9")


def _series(folder: Path, n: int = 3, name: str = NAME) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientName = PID, name
        ds.Manufacturer = "CanaryFam CanaryGiven"  # a name where a vendor belongs
        ds.BodyPartExamined = f"{PID}_CHEST"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = "CT"
        ds.Rows = ds.Columns = 8
        ds.PixelSpacing = [0.5, 0.5]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.0 * k]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.full((8, 8), k, dtype=np.int16).tobytes()
        pydicom.dcmwrite(folder / f"IM{k:04d}", ds, enforce_file_format=True)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").lower()


def test_names_in_free_text_header_fields_reach_no_ingest_output(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _series(src / "site" / "ct")
    (src / "site" / "broken.dcm").write_bytes(b"not dicom " + NAME.encode())
    out = tmp_path / "ds"
    for _ in range(2):  # a second, incremental run reuses the cache: still clean
        res = runner.invoke(app, ["ingest", str(src), "--out", str(out), "--workers", "0"])
        assert res.exit_code == 0, res.output
        for name in ("manifest.csv", ".medres_cache.json", "errors.csv", "ingest.json"):
            text = _text(out / name)
            assert not any(c in text for c in CANARIES), name
        assert not any(c in res.output.lower() for c in CANARIES)
    manifest = _text(out / "manifest.csv")
    assert "~" in manifest and "ct" in manifest  # filtered, not dropped


def test_score_dicom_out_without_keep_ids_writes_no_patient_identifiers(tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    model = write_model_dir(tmp_path / "model", image_size=(16, 16))
    study = "1.2.826.0.1.3680043.8.498.303"
    p = write_dicom_2d(
        tmp_path / "src" / "a.dcm", study_uid=study, series_uid=study + ".1", patient_id=PID
    )
    ds = pydicom.dcmread(p)
    ds.PatientName, ds.PatientBirthDate = NAME, "19500101"
    ds.ReferringPhysicianName, ds.AccessionNumber = "CANARYFAM^DOC", "ACCCANARY1"
    ds.OtherPatientIDs = "CANARYPID9X"
    # what no block-list names: clinical-trial IDs, comments, a private tag (allow-list rule)
    ds.ClinicalTrialSubjectID, ds.ClinicalTrialSponsorName = "CANARYTRIAL7", "CanarySponsor"
    ds.PatientComments, ds.EthnicGroup = "canary comment", "CANARYETH"
    ds.add_new(0x00431010, "LO", "CANARYPRIVATE")
    ds.save_as(p)
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["score", str(model), str(tmp_path / "src"), "--out", str(out), "--workers", "0",
              "--dicom-out", "--cam", "1"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    sr_path, *scs = sorted((out / "dicom").glob("*.dcm"), key=lambda q: q.name.startswith("cam"))
    assert len(scs) == 1  # the Grad-CAM secondary capture follows the same rule
    for path in scs:
        assert b"canary" not in path.read_bytes().lower(), path
    sr = pydicom.dcmread(sr_path)
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
               "ReferringPhysicianName"):  # fmt: skip
        assert str(sr.get(kw, "") or "") == "", kw
    assert "OtherPatientIDs" not in sr
    raw = sr_path.read_bytes().lower()
    assert b"canary" not in raw and b"19500101" not in raw
    # what links it to the study stays
    assert sr.StudyInstanceUID == study
    refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [r.SeriesInstanceUID for r in refs] == [study + ".1"]


# ------------------------------------------- error lines, logs and summaries (one filter)
def _no_canary(text: str) -> None:
    low = text.lower()
    assert not any(c in low for c in CANARIES), text


def test_a_full_disk_error_does_not_print_a_patient_named_out(tmp_path: Path, monkeypatch) -> None:
    """The disk-full line names --out; a folder on it named after the patient (from the
    DICOM headers of this run) is pseudonymised by the one message filter."""
    import errno

    from medres import io as mio

    src = tmp_path / "src"
    _series(src / "ct")
    out = tmp_path / "CanaryFam_CanaryGiven" / "ds"
    real = mio.os.fsync

    def full(fd):  # every atomic write fails: the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mio.os, "fsync", full)
    res = runner.invoke(app, ["ingest", str(src), "--out", str(out), "--workers", "0"])
    monkeypatch.setattr(mio.os, "fsync", real)
    assert res.exit_code == 1, res.output
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: no space left on the disk of ") and "~" in line
    assert str(tmp_path) in line and line.endswith("it resumes")  # the rest stays readable
    _no_canary(res.output)


def test_score_logs_and_summary_do_not_print_a_patient_named_out(tmp_path: Path) -> None:
    """``score --dicom-out`` logs the SR folder and prints the scores path: both pass the
    filter (the log handler's :class:`medres.phi.IdentityLogFilter`, the summary's
    :func:`medres.phi.filter_message`)."""
    pytest.importorskip("highdicom")
    model = write_model_dir(tmp_path / "model", image_size=(16, 16))
    uid = "1.2.826.0.1.3680043.8.498.304"
    write_dicom_2d(tmp_path / "src" / "a.dcm", study_uid=uid, series_uid=uid + ".1", patient_id=PID)
    out = tmp_path / "CANARYPID9 results" / "out"
    res = runner.invoke(
        app, ["score", str(model), str(tmp_path / "src"), "--out", str(out), "--workers", "0",
              "--dicom-out"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "DICOM SR" in res.stderr and "scored 1," in res.stdout  # the lines are there
    _no_canary(res.output)
    for path in out.rglob("*"):  # scores.csv, errors.csv, the ledger, the SR
        if path.is_file() and path.name != ".medres_key":
            _no_canary(path.read_bytes().decode("latin-1"))


def test_the_message_filter_keeps_what_is_not_identity() -> None:
    """Containment for path components, whole tokens for words, tag notation untouched,
    NFD and full-width spellings matched, and nothing changes before a token is known."""
    import unicodedata

    from medres.phi import PathRedactor, filter_message

    text = "'/data/Zoë_Quux/out' lacks (0002,0010) near /x/ＭＲＮ０００９７/y; zoë wrote it"
    assert filter_message(text) == text  # no redactor knows these tokens yet
    r = PathRedactor(b"\x01" * 32, mode="keep")  # every mode, keep included
    r.add_values(["MRN00097", "0010"], [unicodedata.normalize("NFD", "QUUX^ZOË")])
    got = filter_message(text)
    assert "Zoë" not in got and "zoë" not in got and "ＭＲＮ" not in got, got
    assert "(0002,0010)" in got and got.startswith("'/data/~") and "/out' lacks" in got


def test_nfd_and_full_width_folder_names_of_the_patient_are_pseudonymised(tmp_path: Path) -> None:
    """Folders named after the patient in NFD (what macOS writes), in full-width characters
    and in another case reach no output, through the CLI."""
    import unicodedata

    src = tmp_path / "src"
    nfd = unicodedata.normalize("NFD", "Zoë_CANARYZOË")  # the decomposed ë: two code points
    for folder in (nfd, "ＣＡＮＡＲＹＰＩＤ９", "canaryzoË"):
        _series(src / folder / "ct", name="CanaryFam^CanaryGiven^CanaryZoë")
    out = tmp_path / "ds"
    res = runner.invoke(app, ["ingest", str(src), "--out", str(out), "--workers", "0"])
    assert res.exit_code == 0, res.output
    for name in ("manifest.csv", "errors.csv", "ingest.json", ".medres_cache.json"):
        text = unicodedata.normalize("NFKC", (out / name).read_text(encoding="utf-8")).casefold()
        assert not any(c in text for c in (*CANARIES, "canaryzo")), (name, text)
    sources = [ln.split(",")[2] for ln in _text(out / "manifest.csv").splitlines()[1:]]
    assert len(sources) == 3 and all(s.startswith("~") and s.endswith("/ct") for s in sources)


# ------------------------- commands that read no header (train, evaluate, export, plan)
def test_train_evaluate_export_filter_a_patient_named_folder_from_stored_tokens(
    tmp_path: Path, monkeypatch
) -> None:
    """``train``, ``evaluate`` and ``export-model`` read no DICOM header, yet a folder named
    after a patient of their dataset is pseudonymised in every line they print: ingest
    stores the hashed tokens next to the key (``.medres_tokens.json``) and each command
    restores them from the folders it is given (the manifest's dataset, the run's
    pipeline.yaml). Each command starts with an empty filter, as in a new process."""
    import collections

    from medres.phi import TOKENS_FILE, redact
    from medres.synth import SynthSpec, generate

    def fresh_filter() -> None:  # a new process: no redactor is live
        monkeypatch.setattr(redact, "_LIVE", collections.deque(maxlen=redact._LIVE_MAX))

    spec = SynthSpec(kind="xray", n_patients=10, shape=(16, 16), phi_canary=True, seed=3)
    synth = generate(spec, tmp_path / "synth")
    ds = tmp_path / "ds"
    res = runner.invoke(
        app, ["ingest", str(synth.data_dir), "--out", str(ds), "--labels",
              str(synth.labels_csv), "--workers", "0"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    stored = (ds / TOKENS_FILE).read_text(encoding="utf-8")
    assert "zelda" not in stored.lower() and "phicanary" not in stored.lower()  # hashes only
    canaries = ("zelda", "phicanary")
    named = tmp_path / "Zelda results"  # the patient's given name (PHICANARY^ZELDA^1)

    def clean(out: str) -> None:
        assert not any(c in out.lower() for c in canaries), out
        assert str(tmp_path) in out and "~" in out, out  # the rest stays readable

    fresh_filter()
    run = named / "run"
    res = runner.invoke(
        app, ["train", "pipelines/small_2d.yaml", "--manifest", str(ds / "manifest.csv"),
              "--out", str(run), "--epochs", "1", "--image-size", "16", "--device", "cpu",
              "--set", "data.workers=0"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    clean(res.output)
    fresh_filter()
    res = runner.invoke(app, ["evaluate", str(run), "--out", str(named / "eval"), "--n-boot", "0"])
    assert res.exit_code == 0, res.output
    clean(res.output)
    fresh_filter()
    res = runner.invoke(
        app, ["export-model", str(run), "--format", "torchscript", "--out", str(named / "m.ts")]
    )
    assert res.exit_code == 0, res.output
    clean(res.output)
    fresh_filter()  # an error line names --out: a file where the run folder should be
    (named / "blocker").write_text("x")
    res = runner.invoke(
        app, ["train", "pipelines/small_2d.yaml", "--manifest", str(ds / "manifest.csv"),
              "--out", str(named / "blocker" / "run"), "--epochs", "1"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert "lies below the file" in line, line
    clean(res.output)
