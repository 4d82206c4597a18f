"""`medres train --time-budget`: the plan fits the budget and training stops at it."""

from __future__ import annotations

import csv
import time

from train_data import make_dataset
from typer.testing import CliRunner

from medres.cli import app

runner = CliRunner()


def test_time_budget_stops_training_within_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDRES_CACHE_DIR", str(tmp_path / "cache"))
    manifest = make_dataset(tmp_path / "ds", n=20, size=16)
    out = tmp_path / "run"
    budget_min = 1.0  # tiny data: start-up, planning and the final stage take ~30 s here
    t0 = time.perf_counter()
    r = runner.invoke(
        app,
        ["train", "--manifest", str(manifest), "--out", str(out), "--time-budget", str(budget_min),
         "--epochs", "10000", "--device", "cpu", "--set", "train.threads=1"],
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    assert "plan:" in r.output and "estimated" in r.output
    with (out / "history.csv").open() as fh:
        epochs = len(list(csv.DictReader(fh)))
    assert 1 <= epochs < 10000  # stopped by the budget, not by --epochs
    assert elapsed <= budget_min * 60 * 1.1, f"{elapsed:.1f}s for a {budget_min} min budget"
    assert (out / "plan.yaml").is_file() and (out / "model").is_dir()
