"""``medres train --folds K``: a cross-validation ensemble end to end on a tiny CPU run.

Two same-seed runs of ``--folds 3`` on the tiny learnable NIfTI set of ``train_data``, with
two images per patient (so grouping matters), ``build_data`` spied on to see what each
member trained and validated on; then ``medres score``, ``evaluate`` and ``export-model``
on the model dir, and the one-line refusals of bad fold settings.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest
from helpers.runs import assert_score_matches_test_predictions
from train_data import make_dataset
from typer.testing import CliRunner

from medres.cli import app

runner = CliRunner()
K = 3


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _paired_patients(manifest: Path) -> None:
    """Two consecutive rows of one split share a patient (labels may differ)."""
    rows = _read(manifest)
    by_split: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_split[r["split"]].append(r)
    for split, rs in by_split.items():
        for j, r in enumerate(rs):
            r["patient_key"] = f"{split}{j // 2:013x}"
    _write(manifest, rows)


def _train(manifest: Path, out: Path, *extra: str) -> object:
    pipeline = manifest.parent / "pipeline.yaml"
    pipeline.write_text("train: {ema_decay: 0.9}\n")
    return runner.invoke(
        app,
        ["-q", "train", str(pipeline), "--manifest", str(manifest), "--out", str(out), "--epochs", "1",
         "--batch-size", "4", "--image-size", "16", "--seed", "3", "--device", "cpu",
         "--set", "train.threads=1", "--set", "data.cache=none", *extra],
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    import medres.train.data as data_mod

    root = tmp_path_factory.mktemp("folds")
    manifest = make_dataset(root / "ds", n=30, size=16)
    _paired_patients(manifest)
    seen: list[tuple[set[int], set[int]]] = []
    real = data_mod.build_data

    def spy(spec, manifest_, labels, rt, run_dir):
        bundle = real(spec, manifest_, labels, rt, run_dir)
        seen.append(({it["index"] for it in bundle.train_items},
                     {it["index"] for it in bundle.val_items}))  # fmt: skip
        return bundle

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_mod, "build_data", spy)
        r = _train(manifest, root / "a", "--folds", str(K))
    assert r.exit_code == 0, r.output
    r = _train(manifest, root / "b", "--folds", str(K))
    assert r.exit_code == 0, r.output
    return {"root": root, "manifest": manifest, "a": root / "a", "b": root / "b", "seen": seen}


def _pooled(manifest: Path) -> dict[str, dict[str, str]]:
    return {r["image_id"]: r for r in _read(manifest) if r["split"] in ("train", "val")}


def test_folds_are_patient_grouped_and_stratified(runs):
    folds = _read(runs["a"] / "folds.csv")
    pooled = _pooled(runs["manifest"])
    assert sorted(r["image_id"] for r in folds) == sorted(pooled)  # train+val, no test row
    fold_of_patient: dict[str, set[str]] = defaultdict(set)
    labels_of_fold: dict[str, set[str]] = defaultdict(set)
    for r in folds:
        assert r["patient_key"] == pooled[r["image_id"]]["patient_key"]
        assert r["split"] == pooled[r["image_id"]]["split"] and r["label"] in ("0", "1")
        fold_of_patient[r["patient_key"]].add(r["fold"])
        labels_of_fold[r["fold"]].add(r["label"])
    assert all(len(f) == 1 for f in fold_of_patient.values())  # one patient, one fold
    assert sorted(labels_of_fold) == [str(k) for k in range(K)]
    assert all(v == {"0", "1"} for v in labels_of_fold.values())  # both classes everywhere
    assert len({r["patient_key"] for r in folds}) < len(folds)  # patients with 2 images


def test_each_member_trains_without_its_fold_and_validates_on_it(runs):
    manifest = _read(runs["manifest"])
    ids = {r["image_id"]: i for i, r in enumerate(manifest)}
    fold = defaultdict(set)
    for r in _read(runs["a"] / "folds.csv"):
        fold[int(r["fold"])].add(ids[r["image_id"]])
    pooled = set().union(*fold.values())
    test = {i for i, r in enumerate(manifest) if r["split"] == "test"}
    assert len(runs["seen"]) == K
    for k, (train, val) in enumerate(runs["seen"]):
        assert val == fold[k] and train == pooled - fold[k]
        assert not train & test and not val & test
    history = _read(runs["a"] / "history.csv")
    assert [r["member"] for r in history] == [str(k) for k in range(K)]  # 1 epoch each
    assert (runs["a"] / "checkpoints" / f"member{K - 1}" / "best.pt").is_file()


def test_every_train_val_row_has_one_out_of_fold_prediction(runs):
    preds = _read(runs["a"] / "predictions_val.csv")
    folds = {r["image_id"]: r for r in _read(runs["a"] / "folds.csv")}
    assert sorted(r["image_id"] for r in preds) == sorted(folds)  # each exactly once
    for r in preds:
        assert r["fold"] == folds[r["image_id"]]["fold"]
        assert r["split"] == folds[r["image_id"]]["split"]
    test = _read(runs["a"] / "predictions_test.csv")
    mtest = [r["image_id"] for r in _read(runs["manifest"]) if r["split"] == "test"]
    assert sorted(r["image_id"] for r in test) == sorted(mtest)


def test_model_json_records_the_folds_and_the_out_of_fold_calibration(runs):
    meta = json.loads((runs["a"] / "model" / "model.json").read_text())
    assert meta["ensemble"] == K and [m["fold"] for m in meta["members"]] == list(range(K))
    f = meta["folds"]
    assert f["k"] == K and f["group_by"] == "patient_key" and f["stratify_by"] == "label"
    assert sum(f["fold_sizes"]) == f["n_rows"] == len(_pooled(runs["manifest"]))
    assert len(f["member_val_score"]) == len(f["member_oof_auc"]) == K
    assert f["oof_auc"] == pytest.approx(meta["val_auc"], abs=1e-6)
    assert "out-of-fold" in f["predictions_val"]
    cal = meta["calibration"]
    assert cal["split"] == "oof" and cal["n"] == f["n_rows"] and meta["temperature"] > 0
    for r in _read(runs["a"] / "predictions_val.csv"):  # pred at the stored threshold
        assert r["pred"] == ("1" if float(r["prob_1"]) >= meta["threshold"] else "0")


def test_each_member_s_offset_shift_is_folded_into_its_saved_head(runs):
    import torch
    from safetensors.torch import load_file

    run = runs["a"]
    meta = json.loads((run / "model" / "model.json").read_text())
    saved = load_file(str(run / "model" / "weights.safetensors"))
    for k, m in enumerate(meta["members"]):
        folder = run / "checkpoints" / (f"member{k}" if k else "")
        best = torch.load(folder / "best.pt", weights_only=True)["model"]
        shift = torch.tensor(m["logit_shift"], dtype=torch.float32)
        assert len(shift) == 2
        got = saved[f"members.{k}.fc.bias"]
        assert torch.allclose(got, best["fc.bias"] + shift, atol=1e-5), k
        assert torch.equal(saved[f"members.{k}.fc.weight"], best["fc.weight"])
    assert max(abs(v) for m in meta["members"] for v in m["logit_shift"]) > 1e-3
    assert meta["folds"]["oof_auc_unaligned"] is not None


def test_same_seed_gives_identical_predictions(runs):
    a, b = runs["a"], runs["b"]
    for name in ("predictions_test.csv", "predictions_val.csv", "folds.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_score_evaluate_and_export_accept_the_model_dir(runs, tmp_path):
    run, manifest = runs["a"], runs["manifest"]
    assert_score_matches_test_predictions(run, manifest, tmp_path)
    res = runner.invoke(app, ["-q", "evaluate", str(run), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ev" / "metrics.json").is_file()
    res = runner.invoke(
        app,
        ["-q", "export-model", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.ts")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--folds", "1"], "model.folds (--folds) is 1"),
        (["--folds", "11"], "model.folds (--folds) is 11"),
        (["--folds", "3", "--set", "model.ensemble=2"], "model.ensemble 2"),
        (["--folds", "3", "--resume"], "--resume of a cross-validation run"),
        (["--folds", "9"], "8 patient(s)"),
        (["--folds", "5"], "class '0' has 4 patient(s)"),
    ],
)
def test_bad_fold_settings_are_one_line_errors(tmp_path, args, needle):
    manifest = make_dataset(tmp_path / "ds", n=10, size=16)  # 8 train+val patients, 4 a class
    out = tmp_path / "r"
    r = _train(manifest, out, *args)
    assert r.exit_code == 1, r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and needle in err[0], r.output
    assert "Traceback" not in r.output and not (out / "model").exists()
