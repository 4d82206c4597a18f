"""Checks on a finished training run shared by the ensemble and cross-validation tests."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medres.cli import app


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def assert_score_matches_test_predictions(run: Path, manifest: Path, tmp_path: Path) -> None:
    """``medres score RUN/model`` on the test images gives ``predictions_test.csv``'s
    probabilities (to 1e-5) and decisions."""
    test = _read(run / "predictions_test.csv")
    mrows = {r["image_id"]: r for r in _read(manifest)}
    src = tmp_path / "src"
    src.mkdir()
    for r in test:
        shutil.copy(manifest.parent / mrows[r["image_id"]]["image_path"], src)
    res = CliRunner().invoke(
        app, ["-q", "score", str(run / "model"), str(src), "--out", str(tmp_path / "s")]
    )
    assert res.exit_code == 0, res.output
    scored = {Path(r["source"]).name: r for r in _read(tmp_path / "s" / "scores.csv")}
    for r in test:
        s = scored[Path(mrows[r["image_id"]]["image_path"]).name]
        assert float(s["prob_1"]) == pytest.approx(float(r["prob_1"]), abs=1e-5)
        assert s["pred"] == r["pred"]
