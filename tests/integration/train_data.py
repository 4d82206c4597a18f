"""Tiny learnable NIfTI datasets + manifests for the train tests (no synth/ingest needed).

Positives carry a bright Gaussian blob at a random place on a noisy background, so a
ResNet learns them within an epoch or two. Splits are grouped by patient (one image per
patient) in the pattern train, train, train, val, test.

:func:`run_killed_after_epoch` runs ``medres train`` in a subprocess and SIGKILLs it from
outside right after a given epoch's checkpoint (the crash/resume tests).
"""

from __future__ import annotations

import csv
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

SPLIT_PATTERN = ("train", "train", "train", "val", "test")


def make_dataset(
    root: Path,
    *,
    n: int = 30,
    dims: int = 2,
    size: int = 24,
    seed: int = 0,
    modality: str = "DX",
    classes: int = 2,
    multilabel: bool = False,
) -> Path:
    """Write ``root/images/*.nii.gz`` and ``root/manifest.csv``; returns the manifest path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(size)] * dims, indexing="ij")
    rows = []
    for i in range(n):
        lab = i % classes
        arr = rng.normal(100, 20, size=(size,) * dims)
        for _ in range(lab):  # class k: k blobs
            c = rng.integers(size // 4, 3 * size // 4, size=dims)
            d2 = sum((g - cc) ** 2 for g, cc in zip(grid, c, strict=True))
            arr += 150 * np.exp(-d2 / (2 * (size / 8) ** 2))
        affine = np.diag([0.8] * 3 + [1.0])
        path = f"images/img{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(arr.astype(np.int16), affine), root / path)
        row = {
            "image_id": f"img-{i:016x}",
            "image_path": path,
            "source": "",
            "dims": str(dims),
            "channels": "1",
            "shape": "x".join([str(size)] * dims),
            "spacing": "x".join(["0.8"] * dims),
            "modality": modality,
            "manufacturer": "ACME",
            "body_part": "CHEST",
            "sex": "F" if i % 3 else "M",
            "age": str(40 + i % 30),
            "patient_key": f"p{i:015x}",
            "study_key": f"s{i:015x}",
            "series_key": f"r{i:015x}",
            "n_slices": "1",
            "warnings": "",
        }
        if multilabel:
            row["label_blob"] = str(int(lab > 0))
            row["label_even"] = str(int(i % 2 == 0))
        else:
            row["label"] = str(lab)
        row["split"] = SPLIT_PATTERN[i % len(SPLIT_PATTERN)]
        rows.append(row)
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return manifest


def history_rows(run_dir: Path) -> int:
    """Data rows in ``run_dir/history.csv`` (0 while it does not exist yet)."""
    try:
        text = (run_dir / "history.csv").read_text(encoding="utf-8")
    except (FileNotFoundError, PermissionError):
        return 0
    return max(len(text.splitlines()) - 1, 0)


_KILL_SCRIPT = """
import os, signal, sys
import medres.train.run as run
epoch = int(sys.argv[1])
real = run.run_train
def killing(*args, **kwargs):
    def on_epoch_end(done, row):
        if done >= epoch:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, on_epoch_end=on_epoch_end, **kwargs)
run.run_train = killing
sys.argv = ["medres", *sys.argv[2:]]
from medres.cli import main
main()
"""


def _with_kill_callback(cmd: list[str], epoch: int) -> list[str]:
    """``python -m medres ARGS`` -> the same CLI run with a self-kill after ``epoch``."""
    if len(cmd) > 2 and cmd[1:3] == ["-m", "medres"]:
        return [cmd[0], "-c", _KILL_SCRIPT, str(epoch), *cmd[3:]]
    return cmd


def run_killed_after_epoch(
    cmd: list[str], env: dict[str, str], run_dir: Path, epoch: int, *, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a ``medres train`` writing ``run_dir``) and SIGKILL it right after epoch
    ``epoch``'s checkpoint and history row are on disk. For ``python -m medres ...`` the kill
    comes from the library's documented ``run_train(on_epoch_end=...)`` callback, so it lands
    at exactly that point however fast the next epoch is; otherwise (and as a fallback) it
    comes from outside, as soon as ``history.csv`` holds ``epoch`` rows. Returns the
    process's completed state; its ``returncode`` is ``-SIGKILL`` when the kill landed.
    """
    cmd = _with_kill_callback(cmd, epoch)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if history_rows(run_dir) >= epoch:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
            else:
                if proc.poll() is None:
                    proc.kill()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
