"""Crashes lose nothing: killed training resumes exactly, a full disk during scoring leaves a
consistent ledger and a clean rerun completes.

* ``medres train`` is SIGKILLed from outside right after the checkpoint of epoch 1 (the
  test watches ``history.csv``; the library holds no test hook), then resumed with
  ``--resume``: history and weights equal an uninterrupted run's (deterministic mode,
  one machine).
* Scoring with ENOSPC injected in-process, at the ledger's commit (after a few batches
  were committed) and at the CSV export's write: the error propagates, the ledger passes
  ``PRAGMA integrity_check`` and holds only whole batches, no partial ``scores.csv`` or
  temp file is left behind, and a rerun scores exactly the missing items, with results
  identical to an uninterrupted run.

The SIGKILL-and-resume harness of scoring (``tests/integration/test_score_crash.py``) and
the other crash tests of the stages are gathered into ``-m reliability`` by this folder's
conftest.
"""

from __future__ import annotations

import csv
import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers.models import write_model_dir, write_nifti_folder
from safetensors.torch import load_file
from train_data import make_dataset, run_killed_after_epoch

from medres.phi import KEY_FILE, load_or_create_key
from medres.score import ScoreConfig, score
from medres.score import ledger as ledger_mod

pytestmark = pytest.mark.reliability

# --------------------------------------------------------------------------- training


def _train(manifest: Path, out: Path, *extra: str, kill_after: int | None = None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "medres", "-q", "train", "--manifest", str(manifest),
           "--out", str(out), "--epochs", "2", "--batch-size", "4", "--image-size", "16",
           "--device", "cpu", "--weights", "none", "--seed", "3",
           "--set", "train.deterministic=true", "--set", "data.workers=0", *extra]  # fmt: skip
    if kill_after is not None:
        return run_killed_after_epoch(cmd, env, out, kill_after, timeout=600)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    timing = ("time", "wait", "seconds", "_s", "per_s")
    for r in rows:  # wall-clock columns differ between runs by nature
        for k in [k for k in r if any(t in k for t in timing)]:
            r.pop(k)
    return rows


def test_train_sigkill_after_checkpoint_then_resume_is_exact(tmp_path):
    manifest = make_dataset(tmp_path / "ds", n=15, dims=2, size=16, seed=5)
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    r = _train(manifest, ref)
    assert r.returncode == 0, r.stderr[-3000:]

    r = _train(manifest, crashed, kill_after=1)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert (crashed / "checkpoints" / "last.pt").is_file()
    assert not (crashed / "model").exists()  # it really died before finishing
    r = _train(manifest, crashed, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]

    assert len(_history(ref)) == 2
    assert _history(crashed) == _history(ref)
    a = load_file(str(ref / "model" / "weights.safetensors"))
    b = load_file(str(crashed / "model" / "weights.safetensors"))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "resumed weights differ from the reference"
    for name in ("predictions_val.csv", "predictions_test.csv"):
        assert (crashed / name).read_text() == (ref / name).read_text()


# --------------------------------------------------------------------------- scoring


N_ITEMS = 40
BATCH = 8


@pytest.fixture(scope="module")
def scoring_setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("enospc")
    model = write_model_dir(root / "model", image_size=(16, 16))
    imgs = root / "imgs"
    write_nifti_folder(imgs, N_ITEMS, (16, 16))
    ref = root / "ref"
    load_or_create_key(ref)
    score(_config(model, imgs, ref))
    return {"model": model, "imgs": imgs, "ref": ref}


def _config(model: Path, imgs: Path, out: Path) -> ScoreConfig:
    return ScoreConfig(model, (imgs,), out, batch_size=BATCH, workers=0, precision="fp32",
                       device="cpu")  # fmt: skip


def _out_dir(setup: dict, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(setup["ref"] / KEY_FILE, out / KEY_FILE)  # same pseudonyms as the reference
    return out


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _ledger_state(out: Path) -> tuple[str, int, int]:
    con = sqlite3.connect(out / "ledger.sqlite")
    try:
        check = con.execute("PRAGMA integrity_check").fetchone()[0]
        n = con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        distinct = con.execute("SELECT COUNT(DISTINCT item_key) FROM items").fetchone()[0]
    finally:
        con.close()
    return check, n, distinct


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_disk_full_at_ledger_commit_then_rerun_completes(scoring_setup, tmp_path, monkeypatch):
    out = _out_dir(scoring_setup, tmp_path)
    real_commit = ledger_mod.Ledger.commit
    calls = {"n": 0}

    def commit(self, model_hash, records):
        calls["n"] += 1
        if calls["n"] == 3:  # two whole batches are in, the third hits a full disk
            _enospc()
        return real_commit(self, model_hash, records)

    monkeypatch.setattr(ledger_mod.Ledger, "commit", commit)
    with pytest.raises(OSError) as ei:
        score(_config(scoring_setup["model"], scoring_setup["imgs"], out))
    assert ei.value.errno == errno.ENOSPC
    check, n, distinct = _ledger_state(out)
    assert check == "ok"
    assert n == distinct == 2 * BATCH  # whole batches only, nothing half-written
    assert not (out / "scores.csv").exists()
    monkeypatch.setattr(ledger_mod.Ledger, "commit", real_commit)

    summary = score(_config(scoring_setup["model"], scoring_setup["imgs"], out))
    assert summary.skipped_done == 2 * BATCH
    assert summary.scored == N_ITEMS - 2 * BATCH
    assert _ledger_state(out) == ("ok", N_ITEMS, N_ITEMS)
    assert _rows(out / "scores.csv") == _rows(scoring_setup["ref"] / "scores.csv")
    assert not list(out.glob(".scratch-*"))


def test_disk_full_at_export_keeps_the_previous_csv_then_rerun_completes(
    scoring_setup, tmp_path, monkeypatch
):
    out = _out_dir(scoring_setup, tmp_path)
    cfg = _config(scoring_setup["model"], scoring_setup["imgs"], out)
    # a first complete run leaves a good scores.csv
    score(cfg)
    before = (out / "scores.csv").read_bytes()

    real_open = ledger_mod.atomic_open
    state = {"n": 0}

    class _FullDisk:
        """Writes a few bytes, then the disk is full."""

        def __init__(self, fh):
            self.fh = fh

        def write(self, s):
            state["n"] += len(s)
            if state["n"] > 64:
                _enospc()
            return self.fh.write(s)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    @contextmanager
    def full_open(path, *a, **k):
        with real_open(path, *a, **k) as fh:
            yield _FullDisk(fh)

    monkeypatch.setattr(ledger_mod, "atomic_open", full_open)
    with pytest.raises(OSError) as ei:  # a rerun with nothing left to score still exports
        score(cfg)
    assert ei.value.errno == errno.ENOSPC
    assert (out / "scores.csv").read_bytes() == before  # the old file is intact (atomic)
    assert not list(out.glob(".*.tmp")), list(out.glob(".*.tmp"))  # no temp file left
    assert _ledger_state(out) == ("ok", N_ITEMS, N_ITEMS)
    monkeypatch.setattr(ledger_mod, "atomic_open", real_open)

    score(cfg)
    assert _rows(out / "scores.csv") == _rows(scoring_setup["ref"] / "scores.csv")
    assert not list(out.glob(".*.tmp"))
