"""Model quality end to end on a tiny CPU run: calibration, thresholds, selection, reproducibility.

One run (and a second with the same seed) of ``medres train`` through the CLI on the tiny
learnable NIfTI set of ``train_data``; then ``medres score`` and ``medres evaluate`` on it.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.models import write_model_dir, write_nifti_folder
from helpers.runs import assert_score_matches_test_predictions
from safetensors.torch import load_file
from train_data import make_dataset
from typer.testing import CliRunner

from medres.cli import app

runner = CliRunner()


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _train(manifest: Path, out: Path, *extra: str) -> None:
    # a pipeline file (the defaults) instead of the measured plan: the same spec every time
    pipeline = manifest.parent / "pipeline.yaml"
    pipeline.write_text("train: {ema_decay: 0.9}\n")
    r = runner.invoke(
        app,
        ["-q", "train", str(pipeline), "--manifest", str(manifest), "--out", str(out), "--epochs", "2",
         "--batch-size", "4", "--image-size", "16", "--seed", "3", "--device", "cpu",
         "--set", "train.threads=1", "--set", "data.cache=none", *extra],
    )  # fmt: skip
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quality")
    manifest = make_dataset(root / "ds", n=30, size=16)
    _train(manifest, root / "a")
    _train(manifest, root / "b")
    return {"root": root, "manifest": manifest, "a": root / "a", "b": root / "b"}


def test_model_json_records_temperature_threshold_and_selection(runs):
    meta = json.loads((runs["a"] / "model" / "model.json").read_text())
    assert meta["temperature"] > 0 and meta["threshold_rule"] == "youden"
    assert 0.0 < meta["threshold"] <= 1.0
    assert meta["selected_weights"] in ("live", "ema")
    cal = meta["calibration"]
    assert cal["split"] == "val" and cal["n"] == 6
    assert {"nll_before", "nll_after", "ece_before", "ece_after"} <= set(cal)
    assert cal["nll_after"] <= cal["nll_before"] + 1e-12
    for r in _read(runs["a"] / "predictions_test.csv"):  # pred uses the stored threshold
        assert r["pred"] == ("1" if float(r["prob_1"]) >= meta["threshold"] else "0")
    history = _read(runs["a"] / "history.csv")
    assert {"ema_val_auc", "ema_val_loss", "best_source"} <= set(history[0])
    last = torch.load(runs["a"] / "checkpoints" / "last.pt", weights_only=True)
    assert last["ema"]["updates"] == last["step"] and last["best"]["source"] in ("live", "ema")


def test_same_seed_gives_bit_identical_weights_and_predictions(runs):
    a, b = runs["a"], runs["b"]
    for name in ("predictions_test.csv", "predictions_val.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    wa = load_file(str(a / "model" / "weights.safetensors"))
    wb = load_file(str(b / "model" / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la = torch.load(a / "checkpoints" / "last.pt", weights_only=True)
    lb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)
    for k in la["ema"]["model"]:
        assert torch.equal(la["ema"]["model"][k], lb["ema"]["model"][k]), k


def test_an_ensemble_is_one_reproducible_model_dir_that_score_runs(runs, tmp_path):
    manifest = runs["manifest"]
    for name in ("e1", "e2"):
        _train(manifest, tmp_path / name, "--set", "model.ensemble=2", "--set", "model.tta=on")
    a, b = tmp_path / "e1", tmp_path / "e2"
    assert (a / "predictions_test.csv").read_bytes() == (b / "predictions_test.csv").read_bytes()
    meta = json.loads((a / "model" / "model.json").read_text())
    assert meta["ensemble"] == 2 and meta["tta_flips"] == [0]
    assert [m["seed"] for m in meta["members"]] == [3, 4]
    assert meta["calibration"]["tta_kept"] is True and meta["temperature"] > 0
    weights = load_file(str(a / "model" / "weights.safetensors"))
    assert {k.split(".")[1] for k in weights} == {"0", "1"}
    assert (a / "checkpoints" / "member1" / "best.pt").is_file()
    history = _read(a / "history.csv")
    assert [r["member"] for r in history] == ["0", "0", "1", "1"]
    assert_score_matches_test_predictions(a, manifest, tmp_path)


def test_score_applies_the_stored_temperature_and_threshold(runs, tmp_path):
    run, manifest = runs["a"], runs["manifest"]
    meta = json.loads((run / "model" / "model.json").read_text())
    mrows = {r["image_id"]: r for r in _read(manifest)}
    test = _read(run / "predictions_test.csv")
    src = tmp_path / "src"
    src.mkdir()
    for r in test:
        shutil.copy(manifest.parent / mrows[r["image_id"]]["image_path"], src)
    res = runner.invoke(
        app, ["-q", "score", str(run / "model"), str(src), "--out", str(tmp_path / "s")]
    )
    assert res.exit_code == 0, res.output
    scored = {Path(r["source"]).name: r for r in _read(tmp_path / "s" / "scores.csv")}
    assert len(scored) == len(test)
    for r in test:
        s = scored[Path(mrows[r["image_id"]]["image_path"]).name]
        assert float(s["prob_1"]) == pytest.approx(float(r["prob_1"]), abs=1e-5)
        assert s["pred"] == ("1" if float(s["prob_1"]) >= meta["threshold"] else "0")
        assert s["pred"] == r["pred"]


def test_evaluate_reports_the_validation_threshold_and_calibration(runs, tmp_path):
    run = runs["a"]
    meta = json.loads((run / "model" / "model.json").read_text())
    res = runner.invoke(
        app, ["-q", "evaluate", str(run), "--out", str(tmp_path / "e"), "--n-boot", "0"]
    )
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    block = next(iter(m["models"].values()))
    vt = block["validation_threshold"]
    assert vt["threshold"] == meta["threshold"] and vt["chosen_on"] == "validation"
    y = [r["label"] == "1" for r in _read(run / "predictions_test.csv")]
    assert vt["tp"] + vt["fn"] == sum(y) and vt["tn"] + vt["fp"] == len(y) - sum(y)
    assert block["confusion_matrix"]["threshold"] == meta["threshold"]
    before = block["calibration_before"]
    assert before["temperature"] == pytest.approx(meta["temperature"])
    if abs(meta["temperature"] - 1) > 1e-3:
        assert before["ece"] != pytest.approx(block["ece"], abs=1e-9)
    html = (tmp_path / "e" / "report.html").read_text()
    assert "Operating threshold chosen on validation" in html
    assert "Chosen on these cases (optimistic)" in html
    assert "Calibration before and after temperature scaling" in html


def test_an_old_model_dir_without_calibration_scores_as_before(tmp_path):
    model = write_model_dir(tmp_path / "model", image_size=(16, 16))
    meta = json.loads((model / "model.json").read_text())
    assert "temperature" not in meta and "threshold" not in meta
    write_nifti_folder(tmp_path / "src", 4, (16, 16))
    res = runner.invoke(
        app, ["-q", "score", str(model), str(tmp_path / "src"), "--out", str(tmp_path / "s")]
    )
    assert res.exit_code == 0, res.output
    from medres.ingest.image import LoadedImage
    from medres.models import load_model_dir
    from medres.train.transforms import build_transforms, image_to_metatensor

    net, m = load_model_dir(model)
    assert m.effective_temperature == 1.0 and m.effective_threshold == 0.5
    tf = build_transforms(m.preprocessing, train=False, load=False)
    rows = _read(tmp_path / "s" / "scores.csv")
    assert len(rows) == 4
    for r in rows:
        nii = nib.load(tmp_path / "src" / Path(r["source"]).name)
        img = LoadedImage(
            array=np.asanyarray(nii.dataobj).astype(np.float64), affine=nii.affine, dims=2
        )
        x = tf({"image": image_to_metatensor(img)})["image"][None]
        with torch.no_grad():
            p = torch.softmax(net(x), dim=1)[0]
        assert float(r["prob_1"]) == pytest.approx(float(p[1]), abs=1e-5)
        assert r["pred"] == ("1" if float(r["prob_1"]) >= 0.5 else "0")
