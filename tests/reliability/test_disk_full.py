"""A full disk in ingest, score and train: one line, earlier outputs intact, resumes (#16).

The disk is made full without root mounts: ``os.fsync`` (called by every atomic write
before its rename) or a file handle's ``write`` raises ``OSError(ENOSPC)`` from the Nth
call, and for the scoring ledger SQLite's own limit (``PRAGMA max_page_count``) makes the
database full for real (SQLITE_FULL, "database or disk is full"). Each command must then
stop with exit 1 and one ``error: no space left on the disk of ...`` line naming the
folder, leave what an earlier run wrote byte for byte as it was (no temp file, no lock),
and finish when the same command is run again after the space is "freed".
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest
import torch
from helpers.models import write_model_dir, write_nifti_folder
from train_data import make_dataset
from typer.testing import CliRunner

from medres import io as mio
from medres import workers
from medres.cli import app
from medres.errors import DiskFullError
from medres.ingest.pipeline import IngestConfig, run_ingest

pytestmark = pytest.mark.reliability

runner = CliRunner()
FULL = "error: no space left on the disk of "


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _fail_from(monkeypatch, module, name: str, n: int) -> None:
    """``module.name`` raises ENOSPC from its ``n``-th call on (the disk fills up)."""
    real = getattr(module, name)
    calls = {"n": 0}

    def filling(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n:
            _enospc()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, filling)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _full_line(result, folder: Path) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(FULL), result.stderr
    assert str(folder) in lines[0] and "free" in lines[0] and "run the same" in lines[0]
    return lines[0]


# ------------------------------------------------------------------------------ the rule
def test_disk_full_is_recognised_through_wrappers():
    assert mio.is_disk_full(OSError(errno.ENOSPC, "x"))
    assert mio.is_disk_full(OSError(errno.EDQUOT, "quota"))
    assert mio.is_disk_full(sqlite3.OperationalError("database or disk is full"))
    try:  # torch.save on a handle whose write fails: RuntimeError with the OSError as context
        torch.save({"w": torch.zeros(10_000)}, _FullHandle(after=1))
    except RuntimeError as exc:
        assert mio.is_disk_full(exc)
    else:  # pragma: no cover
        pytest.fail("torch.save did not fail")
    assert not mio.is_disk_full(OSError(errno.EACCES, "denied"))
    assert not mio.is_disk_full(sqlite3.OperationalError("database is locked"))
    with (
        pytest.raises(DiskFullError, match=r"about 2\.0 MiB needed"),
        mio.disk_guard("/data/out", lambda: 2 << 20),
    ):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_start_check_refuses_when_the_estimate_does_not_fit(tmp_path):
    free = mio.free_bytes(tmp_path)
    with pytest.raises(DiskFullError, match=r"no space left on the disk of .* needed"):
        mio.check_output_dir(tmp_path / "out", need_bytes=free * 4 + (1 << 40))


def test_a_worker_on_a_full_disk_stops_the_pool_not_the_item():
    """A worker's ENOSPC is the machine's fault: never a ``decode_failed`` row."""
    failure = workers._describe(OSError(errno.ENOSPC, "No space left on device"))
    assert failure.code == workers.DISK_FULL
    with pytest.raises(OSError) as info:
        workers._raise_if_disk_full((False, failure))
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError):  # in-process pools raise it as it is
        workers.isolated_map(_enospc, [1, 2], isolate=False)


class _FullHandle:
    """A writable binary handle that fails with ENOSPC after ``after`` writes."""

    def __init__(self, after: int) -> None:
        self.left = after

    def write(self, b) -> int:
        self.left -= 1
        if self.left < 0:
            _enospc()
        return len(b)

    def flush(self) -> None:
        pass


# -------------------------------------------------------------------------------- ingest
def test_ingest_on_a_full_disk_keeps_the_earlier_dataset_and_resumes(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "ds"
    write_nifti_folder(src, 3, (16, 16))
    assert runner.invoke(app, ["-q", "ingest", str(src), "--out", str(out)]).exit_code == 0
    before = _snapshot(out)
    write_nifti_folder(src, 2, (16, 16), start=3, seed=1)  # new inputs: outputs must change
    _fail_from(monkeypatch, mio.os, "fsync", 1)  # the first atomic write in this process
    r = runner.invoke(app, ["-q", "ingest", str(src), "--out", str(out)])
    line = _full_line(r, out)
    assert "needed" in line  # the inputs' size, as the estimate
    monkeypatch.undo()
    after = _snapshot(out)
    new_images = {k for k in after if k.startswith("images/")} - set(before)
    assert {k: v for k, v in after.items() if k not in new_images} == before
    r = runner.invoke(app, ["-q", "ingest", str(src), "--out", str(out)])  # space freed
    assert r.exit_code == 0, r.output
    assert (out / "manifest.csv").read_text().count("\n") == 1 + 5


def test_ingest_image_write_on_a_full_disk_is_not_a_rejected_input(tmp_path, monkeypatch):
    """Writing a decoded image fails with ENOSPC (in-process pool): the run stops with a
    DiskFullError; it does not record the image as ``decode_failed`` and carry on."""
    from medres.ingest import nifti

    src, out = tmp_path / "src", tmp_path / "ds"
    write_nifti_folder(src, 3, (16, 16))
    _fail_from(monkeypatch, nifti, "_write_nii", 2)
    with pytest.raises(DiskFullError, match="no space left"):
        run_ingest(IngestConfig((src,), out, isolate=False, workers=1))
    assert not (out / "manifest.csv").exists() and not (out / mio.LOCK_NAME).exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".nii." in p.name]
    monkeypatch.undo()
    report = run_ingest(IngestConfig((src,), out, isolate=False, workers=1))
    assert report.files["used"] == 3


# --------------------------------------------------------------------------------- score
def test_score_ledger_full_keeps_the_scores_and_resumes(tmp_path, monkeypatch):
    from medres.score import ledger as led

    model = write_model_dir(tmp_path / "run" / "model", image_size=(16, 16))
    src, out = tmp_path / "src", tmp_path / "scores"
    write_nifti_folder(src, 3, (16, 16))
    args = ["-q", "score", str(model), str(src), "--out", str(out), "--workers", "0"]
    assert runner.invoke(app, args).exit_code == 0
    before = {k: v for k, v in _snapshot(out).items() if not k.startswith("ledger.sqlite")}
    write_nifti_folder(src, 40, (16, 16), start=3, seed=2)
    real = led._connect

    def full_db(path, **kw):  # SQLite's own limit: the database cannot grow (SQLITE_FULL)
        con = real(path, **kw)
        con.execute(f"PRAGMA max_page_count={con.execute('PRAGMA page_count').fetchone()[0]}")
        return con

    monkeypatch.setattr(led, "_connect", full_db)
    _full_line(runner.invoke(app, args), out)
    monkeypatch.undo()
    after = {k: v for k, v in _snapshot(out).items() if not k.startswith("ledger.sqlite")}
    assert after == before  # scores.csv and errors.csv as the first run wrote them
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (out / "scores.csv").read_text().count("\n") == 1 + 43


# --------------------------------------------------------------------------------- train
@pytest.mark.slow  # three short trainings (~30 s on 2 busy cores)
def test_train_checkpoint_on_a_full_disk_keeps_the_last_one_and_resumes(tmp_path, monkeypatch):
    from medres.train import checkpoint as ckpt

    manifest = make_dataset(tmp_path / "ds", n=10, size=16)
    out = tmp_path / "run"
    args = ["-q", "train", "--manifest", str(manifest), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--image-size", "16", "--seed", "3", "--device", "cpu",
            "--set", "train.threads=1", "--set", "data.cache=none",
            "--set", "train.warmup_epochs=0"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    before = _snapshot(out)
    real_save = torch.save

    def save_on_full_disk(obj, fh, *a, **kw):  # the handle fills up after a few writes
        real_save(obj, _FullHandle(after=3), *a, **kw)

    monkeypatch.setattr(torch, "save", save_on_full_disk)
    _full_line(runner.invoke(app, [*args, "--resume", "--epochs", "2"]), out)
    monkeypatch.undo()
    after = _snapshot(out)
    for name in ("pipeline.yaml", "history.csv"):  # a resume may rewrite these two
        before.pop(name, None), after.pop(name, None)
    assert after == before  # checkpoints and model as epoch 1 left them; no temp, no lock
    assert ckpt.load_checkpoint(out / "checkpoints" / ckpt.LAST)["epoch"] == 1
    r = runner.invoke(app, [*args, "--resume", "--epochs", "2"])  # space freed
    assert r.exit_code == 0, r.output
    assert ckpt.load_checkpoint(out / "checkpoints" / ckpt.LAST)["epoch"] == 2


def test_evaluate_on_a_full_disk_writes_neither_file(tmp_path, monkeypatch):
    import csv

    preds = tmp_path / "p.csv"
    with preds.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["y", "p"])
        w.writerows([[i % 2, (i % 2 + i / 40) / 2] for i in range(20)])
    out = tmp_path / "eval"
    _fail_from(monkeypatch, mio.os, "fsync", 1)
    r = runner.invoke(app, ["-q", "evaluate", str(preds), "--label", "y", "--positive", "1",
                            "--score", "p", "--out", str(out), "--n-boot", "0"])  # fmt: skip
    _full_line(r, out)
    assert not out.exists()  # no metrics.json without report; the empty --out it made is gone


def test_full_disk_outside_any_guard_is_still_one_line(tmp_path, monkeypatch):
    """The CLI boundary maps a disk-full error that no library guard caught (any command,
    e.g. ``synth``) to the same line, naming --out."""
    import medres.synth as synth

    def full(*args, **kwargs):
        raise RuntimeError("writer failed") from OSError(errno.ENOSPC, "No space left")

    monkeypatch.setattr(synth, "generate", full)
    out = tmp_path / "synth"
    _full_line(runner.invoke(app, ["-q", "synth", "--out", str(out)]), out)
