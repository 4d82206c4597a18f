"""`--out` problems for every command that writes a folder: one line from one check (#16).

An ``--out`` that is an existing file, that lies below a regular file, or that is a
read-only folder stops ingest, train, score, evaluate and export-model with exit 1 and
one ``error: --out ...`` line from :func:`medres.io.check_output_dir`, before any work is
written. A read-only folder is made with ``chmod 0o555``, which does not stop root: the
test then skips with the reason, and :func:`test_read_only_mount_is_told_apart_even_for_root`
covers the same path with an ``EROFS`` probe (what a read-only mount answers to root).
"""

from __future__ import annotations

import csv
import errno
import os
from pathlib import Path

import pytest
from helpers.models import write_model_dir, write_nifti_folder
from train_data import make_dataset
from typer.testing import CliRunner

from medres import io as mio
from medres.cli import app
from medres.errors import OutputDirError

pytestmark = pytest.mark.reliability

runner = CliRunner()
COMMANDS = ("ingest", "train", "score", "evaluate", "export-model")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outdir")
    src = root / "src"
    write_nifti_folder(src, 2, (16, 16))
    model = write_model_dir(root / "run" / "model", image_size=(16, 16))
    preds = root / "preds.csv"
    with preds.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "y", "p"])
        w.writerows([[i, i % 2, (i % 2 + i / 40) / 2] for i in range(20)])
    manifest = make_dataset(root / "ds", n=10, size=16)
    return {"src": src, "model": model, "run": model.parent, "preds": preds, "manifest": manifest}


def _argv(command: str, inputs: dict[str, Path], out: Path) -> list[str]:
    o = ["--out", str(out)]
    return {
        "ingest": ["ingest", str(inputs["src"]), *o],
        "train": [
            "train",
            "--manifest",
            str(inputs["manifest"]),
            *o,
            *["--epochs", "1", "--image-size", "16", "--device", "cpu", "--set", "train.threads=1"],
        ],
        "score": ["score", str(inputs["model"]), str(inputs["src"]), *o, "--workers", "0"],
        "evaluate": [
            "evaluate",
            str(inputs["preds"]),
            *o,
            *["--label", "y", "--positive", "1", "--score", "p", "--n-boot", "0"],
        ],
        "export-model": ["export-model", str(inputs["run"]), "--format", "monai-bundle", *o],
    }[command]


def _one_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --out "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_out_that_is_an_existing_file(command, inputs, tmp_path):
    out = tmp_path / "taken"
    out.write_text("precious")
    line = _one_line(runner.invoke(app, ["-q", *_argv(command, inputs, out)]))
    assert "is a file, not a folder" in line and "taken" in line
    assert out.read_text() == "precious"


@pytest.mark.parametrize("command", COMMANDS)
def test_out_below_a_regular_file(command, inputs, tmp_path):
    (tmp_path / "plain").write_text("x")
    out = tmp_path / "plain" / "sub" / "out"
    line = _one_line(runner.invoke(app, ["-q", *_argv(command, inputs, out)]))
    assert "lies below the file" in line and "plain" in line
    assert (tmp_path / "plain").read_text() == "x"


def _chmod_stops_writes(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("x")
    except PermissionError:
        return True
    (folder / ".probe").unlink()
    return False


@pytest.mark.parametrize("command", COMMANDS)
def test_out_in_a_read_only_folder(command, inputs, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not _chmod_stops_writes(ro):
            pytest.skip("running as root: chmod 0o555 does not stop writes (EROFS case below)")
        for out in (ro, ro / "new"):  # the folder itself, and a new folder inside it
            line = _one_line(runner.invoke(app, ["-q", *_argv(command, inputs, out)]))
            assert "cannot be" in line and "ro" in line
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_read_only_mount_is_told_apart_even_for_root(tmp_path, monkeypatch):
    """A read-only mount refuses root too (EROFS): the probe write tells it, as one line."""

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(mio.tempfile, "mkstemp", erofs)
    with pytest.raises(OutputDirError, match=r"--out .* cannot be written \(Read-only file system"):
        mio.check_output_dir(tmp_path / "out")


def test_check_output_dir_accepts_an_earlier_output_and_leaves_no_probe(tmp_path):
    out = tmp_path / "a" / "b"
    assert mio.check_output_dir(out) == out and out.is_dir()
    (out / "kept.csv").write_text("1")
    mio.check_output_dir(out)  # a folder that exists is fine (resume)
    assert sorted(p.name for p in out.iterdir()) == ["kept.csv"]


def test_a_refused_command_leaves_no_empty_out_behind(tmp_path: Path) -> None:
    """A command that fails after its --out check (a bad model, a missing input) removes the
    --out folders it made and left empty; a folder that existed, or holds anything, stays."""
    bad_model = tmp_path / "model"
    bad_model.mkdir()
    (bad_model / "model.json").write_text("{}")
    src = tmp_path / "src"
    write_nifti_folder(src, 1, (16, 16))
    cases = {
        "score": ["score", str(bad_model), str(src), "--out"],
        "evaluate": ["evaluate", str(tmp_path / "missing.csv"), "--out"],
    }
    for name, args in cases.items():
        out = tmp_path / f"new_{name}" / "deeper"
        res = runner.invoke(app, [*args, str(out)])
        assert res.exit_code == 1, res.output
        assert not (tmp_path / f"new_{name}").exists(), name  # both levels it made are gone
        kept = tmp_path / f"kept_{name}"
        kept.mkdir()
        res = runner.invoke(app, [*args, str(kept)])
        assert res.exit_code == 1 and kept.is_dir(), name  # the user's folder stays
        (kept / "notes.txt").write_text("mine")
        res = runner.invoke(app, [*args, str(kept / "x")])
        assert res.exit_code == 1 and (kept / "notes.txt").read_text() == "mine"
        assert not (kept / "x").exists()
    ok = tmp_path / "ok_ds"
    assert runner.invoke(app, ["ingest", str(src), "--out", str(ok)]).exit_code == 0
    assert (ok / "manifest.csv").is_file()  # success: nothing removed
