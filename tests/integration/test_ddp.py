"""DDP: `torchrun --nproc-per-node 2 -m medres train` with gloo on CPU gives a valid run."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import torch
from train_data import make_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes(tmp_path):
    manifest = make_dataset(tmp_path / "ds", n=20, size=16)  # 12 train, 4 val, 4 test
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "medres", "-q", "train", "--manifest", str(manifest), "--out", str(out),
        "--epochs", "2", "--batch-size", "3", "--device", "cpu", "--set", "train.threads=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("run ") == 1  # only rank 0 reports
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    # 12 training images sharded over 2 ranks at 3 per step: 2 steps per epoch
    assert ck["epoch"] == 2 and ck["step"] == 4
    with open(out / "history.csv", newline="") as fh:
        assert [int(h["epoch"]) for h in csv.DictReader(fh)] == [1, 2]
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["task"] == "binary"
    with open(out / "predictions_test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and len({r["image_id"] for r in rows}) == 4  # rank 0 predicted all, once
    assert not list(out.rglob("*.tmp"))
