"""The CLI's exit codes and messages under wrong use and Ctrl-C (#16).

Usage errors (unknown option, missing argument or value, a value of the wrong type) exit 2,
the click convention, with one ``error: ...; see 'medres CMD --help'`` line instead of
click's four-line usage block; ``-h`` is ``--help`` for every command; Ctrl-C anywhere in a
command is one line and exit 130 (and during a checkpoint save the last good checkpoint
survives and ``--resume`` continues from it).
"""

from __future__ import annotations

import pytest
import torch
from train_data import make_dataset
from typer.testing import CliRunner

from medres.cli import app
from medres.cli.app import _register  # noqa: F401  (the commands are registered on import)

pytestmark = pytest.mark.reliability

runner = CliRunner()
COMMANDS = ("synth", "ingest", "models", "train", "evaluate", "score", "score-merge", "demo",
            "export", "export-model")  # fmt: skip

USAGE_CASES = [
    (["ingest", "--bogus", "x"], "No such option: --bogus", "medres ingest"),
    (["ingest"], "Missing argument", "medres ingest"),
    (["ingest", "src", "--out"], "requires an argument", "medres ingest"),
    (["train", "--epochs", "many"], "Invalid value for '--epochs'", "medres train"),
    (["score", "--workers", "2.5"], "Invalid value for '--workers'", "medres score"),
    (["--bogus"], "No such option: --bogus", "medres"),
    (["no-such-command"], "No such command", "medres"),
    (["evaluate", "--n-boot", "x", "p.csv"], "Invalid value for '--n-boot'", "medres evaluate"),
]


@pytest.mark.parametrize(("argv", "needle", "where"), USAGE_CASES)
def test_usage_errors_exit_2_with_one_line(argv, needle, where):
    r = runner.invoke(app, argv)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert lines[0].endswith(f"see '{where} --help'"), lines[0]
    assert "Usage:" not in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_dash_h_is_help_everywhere(command):
    argv = [command] if command else []
    short, long = runner.invoke(app, [*argv, "-h"]), runner.invoke(app, [*argv, "--help"])
    assert short.exit_code == long.exit_code == 0, short.output
    assert short.stdout == long.stdout and "Usage:" in short.stdout
    assert "-h, --help" in short.stdout


def test_ctrl_c_anywhere_is_one_line_and_exit_130(monkeypatch, tmp_path):
    import medres.evaluate.evaluate as ev

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "run_evaluate", interrupted)
    p = tmp_path / "p.csv"
    p.write_text("y,p\n0,0.1\n1,0.9\n")
    r = runner.invoke(app, ["evaluate", str(p), "--label", "y", "--positive", "1",
                            "--score", "p", "--out", str(tmp_path / "e")])  # fmt: skip
    assert r.exit_code == 130, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), r.stderr
    assert "Traceback" not in r.output


@pytest.mark.slow  # three short trainings (~30 s on 2 busy cores)
def test_ctrl_c_during_a_checkpoint_save_then_resume(tmp_path, monkeypatch):
    """Exit 130 and one line; no temp file left; ``--resume`` then finishes the run."""
    from medres.train import checkpoint as ckpt

    manifest = make_dataset(tmp_path / "ds", n=10, size=16)
    out = tmp_path / "run"
    args = ["-q", "train", "--manifest", str(manifest), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--image-size", "16", "--seed", "3", "--device", "cpu",
            "--set", "train.threads=1", "--set", "data.cache=none",
            "--set", "train.warmup_epochs=0"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    last = (out / "checkpoints" / ckpt.LAST).read_bytes()
    real_save = torch.save

    def interrupted_save(obj, fh, *a, **kw):
        real_save({"partial": torch.zeros(1000)}, fh)  # some bytes reach the temp file
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    r = runner.invoke(app, [*args, "--resume", "--epochs", "2"])
    monkeypatch.undo()
    assert r.exit_code == 130, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "resume" in lines[0], r.stderr
    assert (out / "checkpoints" / ckpt.LAST).read_bytes() == last
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    r = runner.invoke(app, [*args, "--resume", "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert ckpt.load_checkpoint(out / "checkpoints" / ckpt.LAST)["epoch"] == 2
