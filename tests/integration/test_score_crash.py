"""Crash harness: `medres score` SIGKILLed at random points, then resumed.

The scorer runs as a subprocess in its own process group; the whole group (main process
and decode workers) is killed with SIGKILL, like a power cut of the process. After the
kills a final run completes the work. The result must have exactly one row per item and
scores identical to an uninterrupted run under the same key.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.models import write_model_dir, write_nifti_folder

from medres.phi import KEY_FILE, load_or_create_key
from medres.score import ScoreConfig, score

pytestmark = pytest.mark.reliability


def _cmd(model: Path, imgs: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "medres", "-q", "score", str(model), str(imgs),
        "--out", str(out), "--workers", "2", "--batch-size", "16", "--precision", "fp32",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _committed(out: Path) -> int:
    db = out / "ledger.sqlite"
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _run_and_kill(cmd: list[str], out: Path, target: int, rng: random.Random) -> bool:
    """Start the scorer, SIGKILL its process group once ``target`` items are committed
    (plus a random few ms, so kills land mid-batch too). True if it was killed."""
    proc = subprocess.Popen(
        cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        while proc.poll() is None:
            if _committed(out) >= target:
                time.sleep(rng.uniform(0, 0.05))
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.01)
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert proc.returncode == 0, err
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _scores(out: Path) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _crash_and_resume(tmp_path: Path, n_items: int, n_kills: int, seed: int) -> None:
    model = write_model_dir(tmp_path / "model", image_size=(16, 16))
    imgs = tmp_path / "imgs"
    write_nifti_folder(imgs, n_items, (16, 16))
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    load_or_create_key(ref)
    crashed.mkdir()
    shutil.copy(ref / KEY_FILE, crashed / KEY_FILE)  # same pseudonyms -> comparable CSVs

    # the uninterrupted reference runs in-process (same library call the CLI makes)
    score(ScoreConfig(model, (imgs,), ref, batch_size=16, workers=2, precision="fp32"))

    rng = random.Random(seed)
    # kill points before the last two batches, so every run is killed mid-way
    targets = sorted(rng.sample(range(1, n_items - 32), n_kills))
    kills = 0
    for t in targets:
        kills += _run_and_kill(_cmd(model, imgs, crashed), crashed, t, rng)
    assert kills >= max(1, n_kills - 1)  # a target passed by an earlier run is not a kill
    r = subprocess.run(_cmd(model, imgs, crashed), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    got, want = _scores(crashed), _scores(ref)
    ids = [row["image_id"] for row in got]
    assert len(ids) == len(set(ids)) == n_items  # exactly one row per item
    assert all(row["status"] == "ok" for row in got)
    assert got == want  # identical scores, to the last digit
    assert not list(crashed.glob(".scratch-*"))


def test_sigkill_resume_small(tmp_path: Path) -> None:
    _crash_and_resume(tmp_path, n_items=48, n_kills=1, seed=1)


@pytest.mark.slow
def test_sigkill_resume_1000_items_5_kills(tmp_path: Path) -> None:
    _crash_and_resume(tmp_path, n_items=1000, n_kills=5, seed=7)
