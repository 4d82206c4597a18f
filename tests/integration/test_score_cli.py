"""`medres score` end to end through the CLI (CliRunner, CPU, tiny data)."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers.models import write_dicom_2d, write_model_dir, write_nifti_folder
from typer.testing import CliRunner

from medres.cli import app

runner = CliRunner()
STUDY_A, STUDY_B = "1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.202"


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("score_cli")
    model = write_model_dir(root / "run" / "model", image_size=(16, 16))
    src = root / "src"
    write_nifti_folder(src / "nifti", 6, (16, 16))
    # two studies of 2D DICOM, study A with two series (for per-study aggregation)
    write_dicom_2d(src / "dcm" / "a1.dcm", study_uid=STUDY_A, series_uid=STUDY_A + ".1", seed=1)
    write_dicom_2d(src / "dcm" / "a2.dcm", study_uid=STUDY_A, series_uid=STUDY_A + ".2", seed=2)
    write_dicom_2d(src / "dcm" / "b1.dcm", study_uid=STUDY_B, series_uid=STUDY_B + ".1", seed=3)
    (src / "junk.txt").write_text("not an image")
    (src / "broken.nii").write_bytes(b"\x00" * 100)
    return {"root": root, "model": model, "src": src}


def _score(*args: str) -> object:
    return runner.invoke(app, ["-q", "score", *args], catch_exceptions=False)


def test_score_folder_then_resume(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [str(data["model"]), str(data["src"]), "--out", str(out), "--workers", "2"]
    res = _score(*args, "--batch-size", "4", "--aggregate", "max", "--cam", "2")
    assert res.exit_code == 0, res.output
    rows = _read(out / "scores.csv")
    assert list(rows[0]) == ["image_id", "source", "prob_0", "prob_1", "pred", "status"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 9  # 6 NIfTI + 3 DICOM series
    for r in ok:
        p = [float(r["prob_0"]), float(r["prob_1"])]
        assert sum(p) == pytest.approx(1.0, abs=1e-6)
        assert r["pred"] == str(int(np.argmax(p)))
        assert r["image_id"].startswith("img-")
    errors = {e["source"]: e["code"] for e in _read(out / "errors.csv")}
    assert errors == {"junk.txt": "not_dicom", "broken.nii": "invalid_nifti"}
    assert len(rows) == 11  # one row per item, rejected inputs included
    text = (out / "scores.csv").read_text() + (out / "errors.csv").read_text()
    assert STUDY_A not in text and "PAT-0001" not in text and "Doe" not in text
    studies = _read(out / "scores_study.csv")
    by_n = sorted(int(s["n_items"]) for s in studies)
    assert by_n == [1, 1, 1, 1, 1, 1, 1, 2]  # study A's two series aggregated
    a_rows = [r for r in ok if r["source"].startswith("dcm/a")]
    study_a = next(s for s in studies if s["n_items"] == "2")
    assert float(study_a["prob_1"]) == max(float(r["prob_1"]) for r in a_rows)

    # Grad-CAM overlays for the top 2 items by the positive class, named by image_id
    top2 = sorted(ok, key=lambda r: -float(r["prob_1"]))[:2]
    assert sorted(p.stem for p in (out / "cam").glob("*.png")) == sorted(
        r["image_id"] for r in top2
    )

    before = (out / "scores.csv").read_bytes()
    res = _score(*args)
    assert res.exit_code == 0
    assert "scored 0" in res.output and "skipped 11" in res.output
    assert (out / "scores.csv").read_bytes() == before


def test_keep_ids_and_archive_source(data: dict[str, Path], tmp_path: Path) -> None:
    arc = tmp_path / "batch.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        for p in sorted((data["src"] / "dcm").iterdir()):
            zf.write(p, f"dcm/{p.name}")
    out = tmp_path / "out"
    res = _score(
        str(data["model"]), str(arc), "--out", str(out), "--keep-ids", "--workers", "0",
        "--dicom-out",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = _read(out / "scores.csv")
    assert {r["StudyInstanceUID"] for r in rows} == {STUDY_A, STUDY_B}
    assert {r["AccessionNumber"] for r in rows} == {"ACC0001"}
    assert all(r["source"].startswith("batch.zip!dcm/") for r in rows)
    # one Comprehensive SR per study, in the source study, referencing its series
    import pydicom

    srs = [pydicom.dcmread(p) for p in sorted((out / "dicom").glob("*.dcm"))]
    assert len(srs) == 2
    by_study = {ds.StudyInstanceUID: ds for ds in srs}
    assert set(by_study) == {STUDY_A, STUDY_B}
    a = by_study[STUDY_A]
    assert a.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    refs = a.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert {r.SeriesInstanceUID for r in refs} == {STUDY_A + ".1", STUDY_A + ".2"}
    import highdicom as hd  # a TID 1500 report: one measurement group per series
    from pydicom.sr.codedict import codes

    groups = hd.sr.ComprehensiveSR.from_dataset(a).content.get_image_measurement_groups()
    probs = [g.get_measurements(name=codes.DCM.Probability)[0].value for g in groups]
    a_rows = [r for r in rows if r["StudyInstanceUID"] == STUDY_A]
    assert sorted(probs) == pytest.approx(sorted(float(r["prob_1"]) for r in a_rows), abs=1e-6)


def test_manifest_source_keeps_image_ids_and_split(data: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "ds"
    paths = write_nifti_folder(root / "images", 4, (16, 16))
    lines = ["image_id,image_path,source,dims,label,split"]
    for i, p in enumerate(paths):
        lines.append(f"case{i},images/{p.name},{p.name},2,{i % 2},{'test' if i < 3 else 'train'}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    res = _score(
        str(data["model"].parent), str(root / "manifest.csv"), "--out", str(out), "--split", "test"
    )
    assert res.exit_code == 0, res.output
    assert [r["image_id"] for r in _read(out / "scores.csv")] == ["case0", "case1", "case2"]


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--shard", "2/2"], "--shard"),
        (["--precision", "int4"], "--precision"),
        (["--aggregate", "median"], "--aggregate"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_options_are_one_line_errors(
    data: dict[str, Path], tmp_path: Path, extra: list[str], needle: str
) -> None:
    res = runner.invoke(
        app, ["score", str(data["model"]), str(data["src"]), "--out", str(tmp_path), *extra]
    )
    assert res.exit_code == 1
    assert needle in res.output and "Traceback" not in res.output


def test_missing_model_dir_and_source(data: dict[str, Path], tmp_path: Path) -> None:
    res = runner.invoke(app, ["score", str(tmp_path), str(data["src"]), "--out", str(tmp_path)])
    assert res.exit_code == 1 and "model" in res.output
    res = runner.invoke(
        app, ["score", str(data["model"]), str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 1 and "does not exist" in res.output


@pytest.mark.slow
def test_scoring_the_test_split_reproduces_training_predictions(tmp_path: Path) -> None:
    """Train 1 epoch, then score the manifest's test split: fp32 scores equal
    predictions_test.csv to 1e-5 (the file itself is rounded to 8 digits)."""
    ds = tmp_path / "ds"
    paths = write_nifti_folder(ds / "images", 24, (16, 16))
    lines = [
        "image_id,image_path,source,dims,channels,shape,spacing,modality,patient_key,label,split"
    ]
    for i, p in enumerate(paths):
        split = "train" if i < 12 else "val" if i < 18 else "test"
        lines.append(f"c{i:02d},images/{p.name},{p.name},2,1,16x16,1x1,DX,pat{i},{i % 2},{split}")
    (ds / "manifest.csv").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    res = runner.invoke(
        app,
        ["-q", "train", "--manifest", str(ds / "manifest.csv"), "--out", str(run), "--epochs", "1",
         "--weights", "none", "--batch-size", "8", "--image-size", "16", "--device", "cpu"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = tmp_path / "scored"
    res = _score(str(run), str(ds / "manifest.csv"), "--split", "test", "--out", str(out),
                 "--precision", "fp32", "--workers", "2")  # fmt: skip
    assert res.exit_code == 0, res.output
    want = {r["image_id"]: r for r in _read(run / "predictions_test.csv")}
    got = {r["image_id"]: r for r in _read(out / "scores.csv")}
    assert set(got) == set(want) and len(got) == 6
    for k, w in want.items():
        for c in ("prob_0", "prob_1"):
            assert abs(float(got[k][c]) - float(w[c])) <= 1e-5
        assert got[k]["pred"] == w["pred"]
