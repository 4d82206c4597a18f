"""Exact resume: SIGKILL right after epoch k's checkpoint, resume, compare with an uninterrupted run.

The kill comes from outside the training process (``run_killed_after_epoch`` watches
``history.csv``); the library holds no test hook.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys

import pytest
import torch
from train_data import make_dataset, run_killed_after_epoch

TIMING = {"epoch_time_s", "data_wait_frac"}  # wall-clock columns differ between any two runs


def _cmd(manifest, out, *extra):
    return [
        sys.executable, "-m", "medres", "-q", "train", "--manifest", str(manifest), "--out", str(out),
        "--epochs", "3", "--batch-size", "4", "--image-size", "16", "--seed", "7", "--device", "cpu",
        "--set", "train.deterministic=true", "--set", "train.threads=1", "--set", "train.warmup_epochs=0.5",
        *extra,
    ]  # fmt: skip


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(manifest, out, *extra):
    cmd = _cmd(manifest, out, *extra)
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _history(path):
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


@pytest.mark.parametrize("cache", ["memory"])
def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path, cache):
    manifest = make_dataset(tmp_path / "ds", n=15, size=16)
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = _train(manifest, full, "--set", f"data.cache={cache}")
    assert r.returncode == 0, r.stderr
    cmd = _cmd(manifest, cut, "--set", f"data.cache={cache}")
    r = run_killed_after_epoch(cmd, _env(), cut, 1, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert not (cut / "model").exists()
    r = _train(manifest, cut, "--set", f"data.cache={cache}", "--resume")
    assert r.returncode == 0, r.stderr

    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k  # bit-identical weights
    assert a["ema"]["updates"] == b["ema"]["updates"] == a["step"]  # the EMA resumed too
    for k, v in a["ema"]["model"].items():
        assert torch.equal(v, b["ema"]["model"][k]), f"ema {k}"
    assert _history(full / "history.csv") == _history(cut / "history.csv")
    assert (full / "predictions_test.csv").read_text() == (cut / "predictions_test.csv").read_text()


def test_resume_with_a_different_model_is_refused(tmp_path):
    from medres.errors import TrainError
    from medres.train.run import run_train
    from medres.train.spec import PipelineSpec, apply_overrides

    manifest = make_dataset(tmp_path / "ds", n=10, size=16)
    base = {
        "data.manifest": str(manifest),
        "train.epochs": 1,
        "train.batch_size": 4,
        "train.threads": 1,
    }
    run_train(apply_overrides(PipelineSpec(), base), tmp_path / "run")
    changed = apply_overrides(PipelineSpec(), {**base, "train.epochs": 2, "model.arch": "resnet34"})
    with pytest.raises(TrainError, match=r"different model\.arch.*original pipeline"):
        run_train(changed, tmp_path / "run", resume=True)
