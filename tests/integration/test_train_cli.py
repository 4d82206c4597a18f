"""`medres train` end to end on CPU through the CLI, on a tiny learnable NIfTI set."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from train_data import make_dataset
from typer.testing import CliRunner

from medres.cli import app
from medres.ingest.image import LoadedImage
from medres.train.spec import load_pipeline

runner = CliRunner()
FAST = ["--set", "train.threads=1", "--set", "data.cache=none"]


def _read(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    manifest = make_dataset(root / "ds", n=20, size=24)
    out = root / "run"
    r = runner.invoke(
        app,
        ["train", "--manifest", str(manifest), "--out", str(out), "--epochs", "2", "--batch-size", "4",
         "--image-size", "24", "--seed", "1", "--device", "cpu", *FAST],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return manifest, out, r.output


def test_run_dir_layout_and_history(trained):
    _, out, output = trained
    for name in ("pipeline.yaml", "history.csv", "predictions_val.csv", "predictions_test.csv"):
        assert (out / name).is_file(), name
    assert (out / "model" / "weights.safetensors").is_file()
    assert "val AUC" in output
    hist = _read(out / "history.csv")
    assert [int(r["epoch"]) for r in hist] == [1, 2]
    assert {"train_loss", "val_loss", "val_auc", "lr", "best_epoch"} <= set(hist[0])
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["step"] == 6  # 12 train images / batch 4 = 3 steps per epoch
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == int(hist[-1]["best_epoch"])


def test_resolved_pipeline_is_replayable(trained):
    manifest, out, _ = trained
    spec = load_pipeline(out / "pipeline.yaml")
    assert spec.data.manifest == str(manifest)
    assert spec.model.dims == 2 and spec.model.in_channels == 1
    assert spec.transforms.image_size == (24, 24)
    assert spec.transforms.intensity == "zscore"  # auto -> zscore for DX from scratch
    assert spec.data.task == "binary" and spec.data.classes == ("0", "1")
    assert spec.train.epochs == 2 and spec.train.seed == 1
    assert yaml.safe_load((out / "pipeline.yaml").read_text())["train"]["batch_size"] == 4


def test_model_json_and_prediction_columns(trained):
    manifest, out, _ = trained
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["task"] == "binary"
    assert meta["classes"] == ["0", "1"] and meta["positive_class"] == "1"
    assert meta["preprocessing"]["image_size"] == [24, 24]
    rows = _read(out / "predictions_val.csv")
    assert list(rows[0]) == [
        "image_id", "split", "label", "prob_0", "prob_1", "pred",
        "modality", "manufacturer", "body_part", "sex", "age", "patient_key", "study_key",
    ]  # fmt: skip
    mrows = {r["image_id"]: r for r in _read(manifest)}
    assert len(rows) == sum(r["split"] == "val" for r in mrows.values())
    for r in rows:
        assert r["split"] == "val"
        assert r["label"] == mrows[r["image_id"]]["label"]
        assert float(r["prob_0"]) + float(r["prob_1"]) == pytest.approx(1.0, abs=1e-6)
        assert r["pred"] == ("1" if float(r["prob_1"]) >= meta["threshold"] else "0")
    assert {r["split"] for r in _read(out / "predictions_test.csv")} == {"test"}


def test_scoring_path_reproduces_predictions(trained):
    """model.json preprocessing + image_to_metatensor (the scoring path) == predictions_test.csv."""
    from medres.models import load_model_dir
    from medres.train.transforms import build_transforms, image_to_metatensor

    manifest, out, _ = trained
    model, meta = load_model_dir(out / "model")
    tf = build_transforms(meta.preprocessing, train=False, load=False)
    mrows = {r["image_id"]: r for r in _read(manifest)}
    for r in _read(out / "predictions_test.csv"):
        nii = nib.load(manifest.parent / mrows[r["image_id"]]["image_path"])
        img = LoadedImage(
            array=np.asanyarray(nii.dataobj).astype(np.float64), affine=nii.affine, dims=2
        )
        x = tf({"image": image_to_metatensor(img)})["image"][None]
        with torch.no_grad():
            p = torch.softmax(model(x) / meta.effective_temperature, dim=1)[0]
        assert float(p[1]) == pytest.approx(float(r["prob_1"]), abs=1e-5)


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(trained, tmp_path):
    manifest, out, _ = trained
    r = runner.invoke(app, ["train", "--manifest", str(manifest), "--out", str(out)])
    assert r.exit_code == 1
    assert "already holds a training run" in r.output and "--resume" in r.output
    r = runner.invoke(
        app, ["train", "--manifest", str(manifest), "--out", str(tmp_path / "new"), "--resume"]
    )
    assert r.exit_code == 1 and "nothing to resume" in r.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "train.learning_rate=1"], "unknown field 'learning_rate'"),
        (["--set", "model.arch=resnet19"], "resnet19"),
        (["--weights", "imagenet"], "imagenet"),
        (["--epochs", "0"], "train.epochs"),
        (["--image-size", "24,24,24"], "image_size"),
    ],
)
def test_user_errors_are_one_line_exit_1(trained, tmp_path, args, needle):
    manifest, _, _ = trained
    r = runner.invoke(
        app, ["train", "--manifest", str(manifest), "--out", str(tmp_path / "r"), *FAST, *args]
    )
    assert r.exit_code == 1, r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and needle in err[0], r.output
    assert "Traceback" not in r.output


def test_patient_in_two_splits_is_refused(tmp_path):
    manifest = make_dataset(tmp_path / "ds", n=10, size=16)
    rows = _read(manifest)
    rows[1]["patient_key"] = rows[3]["patient_key"]  # train and val share a patient
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = runner.invoke(app, ["train", "--manifest", str(manifest), "--out", str(tmp_path / "r")])
    assert r.exit_code == 1
    assert rows[3]["patient_key"] in r.output and "leakage" in r.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
def test_multiclass_and_multilabel_runs(tmp_path, kind):
    from medres.train.run import run_train
    from medres.train.spec import PipelineSpec, apply_overrides

    manifest = make_dataset(
        tmp_path / "ds",
        n=15,
        size=16,
        classes=3 if kind == "multiclass" else 2,
        multilabel=kind == "multilabel",
    )
    cache = "disk" if kind == "multiclass" else "memory"  # both cache modes get a run
    spec = apply_overrides(
        PipelineSpec(),
        {
            "data.manifest": str(manifest),
            "train.epochs": 1,
            "train.batch_size": 4,
            "train.threads": 1,
            "data.cache": cache,
        },
    )
    res = run_train(spec, tmp_path / "run")
    if cache == "disk":
        assert list((tmp_path / "run" / "cache").rglob("*.pt")), "PersistentDataset wrote no cache"
    meta = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    rows = _read(tmp_path / "run" / "predictions_val.csv")
    assert meta["task"] == kind
    if kind == "multiclass":
        assert meta["classes"] == ["0", "1", "2"]
        assert [c for c in rows[0] if c.startswith("prob_")] == ["prob_0", "prob_1", "prob_2"]
        assert all(r["pred"] in {"0", "1", "2"} for r in rows)
    else:
        assert meta["classes"] == ["blob", "even"]
        assert {"label_blob", "label_even", "prob_blob", "prob_even"} <= set(rows[0])
    assert res.epochs_completed == 1


def _synth_ingest(tmp_path, kind: str, patients: int, shape: tuple[int, ...]):
    from medres.synth import SynthSpec, generate

    res = generate(
        SynthSpec(kind=kind, n_patients=patients, shape=shape, seed=11), tmp_path / "synth"
    )
    r = runner.invoke(
        app,
        ["ingest", str(res.data_dir), "--out", str(tmp_path / "ds"), "--labels", str(res.labels_csv),
         "--workers", "1", "--seed", "0"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return tmp_path / "ds" / "manifest.csv"


@pytest.mark.slow
def test_synth_xray_2d_resnet18_from_scratch_reaches_auc_090(tmp_path):
    """Demo target: a few hundred synthetic radiographs, defaults, CPU, val AUC >= 0.90 in 5 min."""
    import time

    manifest = _synth_ingest(tmp_path, "xray", 300, (128, 128))
    t0 = time.perf_counter()
    r = runner.invoke(
        app,
        ["train", "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--device", "cpu",
         "--epochs", "12"],
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    best = max(float(h["val_auc"]) for h in _read(tmp_path / "run" / "history.csv"))
    print(f"2D: best val AUC {best:.3f} in {seconds:.0f} s")
    assert best >= 0.90
    assert seconds < 300


@pytest.mark.slow
def test_synth_ct_3d_resnet18_at_64_reaches_auc_090(tmp_path):
    """3D target: synthetic CT, ResNet-18 3D at 64^3 from scratch, val AUC >= 0.90 in 10 min.

    Uses the shipped ``pipelines/ct_3d.yaml`` (lr 1e-3): at the default lr 2e-3 the eval-mode
    BatchNorm statistics lag the first epochs (val loss ~25, constant predictions).
    """
    import time
    from pathlib import Path

    pipeline = Path(__file__).resolve().parents[2] / "pipelines" / "ct_3d.yaml"
    manifest = _synth_ingest(tmp_path, "ct", 200, (64, 64, 64))
    t0 = time.perf_counter()
    r = runner.invoke(
        app,
        ["train", str(pipeline), "--manifest", str(manifest), "--out", str(tmp_path / "run"),
         "--device", "cpu", "--image-size", "64", "--batch-size", "8", "--epochs", "12"],
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    best = max(float(h["val_auc"]) for h in _read(tmp_path / "run" / "history.csv"))
    print(f"3D: best val AUC {best:.3f} in {seconds:.0f} s")
    assert best >= 0.90
    assert seconds < 600
