"""Scale-out: 2 CPU processes on shards (shared ledger, or separate ledgers + merge)
give exactly the single-process result."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.models import write_model_dir, write_nifti_folder
from typer.testing import CliRunner

from medres.cli import app
from medres.phi import KEY_FILE, load_or_create_key
from medres.score import ScoreConfig, score

N = 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shard")
    model = write_model_dir(root / "model", image_size=(16, 16))
    imgs = root / "imgs"
    write_nifti_folder(imgs, N, (16, 16))
    ref = root / "ref"
    load_or_create_key(ref)
    score(ScoreConfig(model, (imgs,), ref, batch_size=8, workers=0, precision="fp32"))
    return {"model": model, "imgs": imgs, "ref": ref, "key": ref / KEY_FILE}


def _with_key(folder: Path, key: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(key, folder / KEY_FILE)
    return folder


@pytest.mark.slow
def test_two_concurrent_processes_share_one_ledger(setup: dict[str, Path], tmp_path: Path) -> None:
    out = _with_key(tmp_path / "shared", setup["key"])
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def cmd(i: int) -> list[str]:
        return [
            sys.executable, "-m", "medres", "-q", "score", str(setup["model"]),
            str(setup["imgs"]), "--out", str(out), "--shard", f"{i}/2", "--workers", "1",
            "--batch-size", "8", "--precision", "fp32",
        ]  # fmt: skip

    procs = [
        subprocess.Popen(cmd(i), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, se) in zip(procs, outs, strict=True):
        assert p.returncode == 0, se
    scored = sorted(int(so.split("scored ")[1].split(",")[0]) for so, _ in outs)
    assert sum(scored) == N and min(scored) > 10  # both did real work, nothing twice
    # the last exporter saw every commit: identical to the single-process run
    assert (out / "scores.csv").read_text() == (setup["ref"] / "scores.csv").read_text()


def test_separate_shards_then_merge(setup: dict[str, Path], tmp_path: Path) -> None:
    outs = []
    for i in range(2):
        out = _with_key(tmp_path / f"s{i}", setup["key"])
        s = score(
            ScoreConfig(
                setup["model"], (setup["imgs"],), out, batch_size=8, workers=0,
                precision="fp32", shard=f"{i}/2",
            )
        )  # fmt: skip
        assert s.scored + s.skipped_shard == N
        outs.append(out)
    merged = tmp_path / "merged"
    res = CliRunner().invoke(app, ["score-merge", *map(str, outs), "--out", str(merged)])
    assert res.exit_code == 0, res.output
    assert f"{N} new" in res.output
    assert (merged / "scores.csv").read_text() == (setup["ref"] / "scores.csv").read_text()
    # a shard scored under another key cannot be merged silently
    stranger = tmp_path / "stranger"
    score(ScoreConfig(setup["model"], (setup["imgs"],), stranger, workers=0, shard="0/2"))
    res = CliRunner().invoke(
        app, ["score-merge", str(outs[0]), str(stranger), "--out", str(tmp_path / "m2")]
    )
    assert res.exit_code == 1 and "medres_key" in res.output


def test_torchrun_env_picks_the_shard(setup: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = _with_key(tmp_path / "rank1", setup["key"])
    s = score(ScoreConfig(setup["model"], (setup["imgs"],), out, workers=0, precision="fp32"))
    assert s.shard == (1, 2) and 0 < s.scored < N
    with pytest.raises(Exception, match="torchrun"):
        score(ScoreConfig(setup["model"], (setup["imgs"],), out, workers=0, shard="0/2"))
