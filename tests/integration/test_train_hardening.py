"""`medres train` on bad runs and bad inputs: one error line, exit 1, no lost or mixed files.

Issue #16: a diverging run, a refused ``--resume``, two trains into one ``--out``, a
manifest with a missing or a 3D-among-2D image, and Ctrl-C during a checkpoint save.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from train_data import make_dataset
from typer.testing import CliRunner

from medres.cli import app

runner = CliRunner()
FAST = ["--set", "train.threads=1", "--set", "data.cache=none", "--set", "train.warmup_epochs=0"]


def _train(manifest, out, *extra):
    args = ["-q", "train", "--manifest", str(manifest), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--image-size", "16", "--seed", "3", "--device", "cpu", *FAST]  # fmt: skip
    return runner.invoke(app, [*args, *extra])


def _error_line(r) -> str:
    """The run failed with exit 1 and exactly one line on stderr, no traceback."""
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    return lines[0]


def _snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def _finite(path) -> bool:
    ck = torch.load(path, weights_only=True)
    return all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("hard") / "ds", n=10, size=16)


# --------------------------------------------------------------------------- 1: divergence
@pytest.mark.parametrize("lr", ["inf", "nan", "-inf"])
def test_non_finite_lr_is_refused_before_anything_is_written(manifest, tmp_path, lr):
    line = _error_line(_train(manifest, tmp_path / "run", "--lr", lr))
    assert "train.lr" in line and "finite" in line
    assert not (tmp_path / "run").exists()


def test_diverging_run_stops_with_one_line_and_saves_no_nan(manifest, tmp_path):
    out = tmp_path / "run"
    # (an lr above 10 is refused up front since #16; a weight decay of 1e308 still diverges)
    line = _error_line(_train(manifest, out, "--set", "train.weight_decay=1e308", "--epochs", "2"))
    assert "epoch 1" in line and "not finite" in line and "--lr" in line, line
    assert "train.amp=none" in line
    assert not (out / "model").exists()
    for ck in ("best.pt", "last.pt"):  # a checkpoint is either absent or finite
        path = out / "checkpoints" / ck
        assert not path.exists() or _finite(path), ck
    assert not (out / ".medres_lock").exists()


# ------------------------------------------------------------------------ 2: refused resume
@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--arch", "resnet34"], "model.arch"), (["--image-size", "20"], "transforms.image_size")],
)
def test_refused_resume_leaves_the_run_dir_byte_identical(manifest, tmp_path, args, needle):
    out = tmp_path / "run"
    r = _train(manifest, out)
    assert r.exit_code == 0, r.output
    before = _snapshot(out)
    assert "pipeline.yaml" in before and ".medres_lock" not in before
    line = _error_line(_train(manifest, out, "--resume", "--epochs", "2", *args))
    assert f"different {needle}" in line, line
    assert _snapshot(out) == before


# ------------------------------------------------------------------- 3: one train per --out
def test_second_train_into_a_locked_out_fails_at_once(manifest, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = textwrap.dedent(f"""
        import sys, time
        from medres.io import output_lock
        with output_lock({str(out)!r}, command="train"):
            print("locked", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        line = _error_line(_train(manifest, out))
        assert "another `medres train`" in line and "--out" in line, line
        assert sorted(p.name for p in out.iterdir()) == [".medres_lock"]
    finally:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------- 4: bad manifests
def _rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_rows(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def test_missing_image_is_named_before_training(tmp_path):
    manifest = make_dataset(tmp_path / "ds", n=10, size=16)
    row = _rows(manifest)[3]  # a val row
    (manifest.parent / row["image_path"]).unlink()
    line = _error_line(_train(manifest, tmp_path / "run"))
    assert row["image_id"] in line and row["image_path"] in line and "missing" in line, line
    assert "line 5" in line  # header + rows 0..3
    assert not (tmp_path / "run").exists()


def test_3d_image_in_a_2d_manifest_is_named_before_training(tmp_path):
    manifest = make_dataset(tmp_path / "ds", n=10, size=16)
    vol = make_dataset(tmp_path / "vol", n=1, size=16, dims=3)
    row3 = _rows(vol)[0]
    shutil.copy(vol.parent / row3["image_path"], manifest.parent / "images" / "vol0.nii.gz")
    row3.update(image_id="vol-0000000000000000", image_path="images/vol0.nii.gz",
                patient_key="pvol", split="train")  # fmt: skip
    _write_rows(manifest, [*_rows(manifest), row3])
    line = _error_line(_train(manifest, tmp_path / "run"))
    assert "vol-0000000000000000" in line and "3D image" in line and "2D" in line, line
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------- 5: Ctrl-C during a save
def test_ctrl_c_during_a_checkpoint_save_keeps_the_previous_one(manifest, tmp_path, monkeypatch):
    from medres.train import checkpoint as ckpt

    out = tmp_path / "run"
    assert _train(manifest, out).exit_code == 0
    ck_dir = out / "checkpoints"
    before = _snapshot(out)
    del before["pipeline.yaml"]  # a resume rewrites it with the new train.epochs
    real_save = torch.save

    def interrupted_save(obj, fh, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, fh)  # some bytes reach the temp file
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    r = _train(manifest, out, "--resume", "--epochs", "2")
    assert r.exit_code != 0
    with pytest.raises(KeyboardInterrupt):  # the same through the library, on last.pt
        ckpt.save_checkpoint(ck_dir / ckpt.LAST, {"epoch": 99})
    monkeypatch.undo()
    after = _snapshot(out)
    del after["pipeline.yaml"]
    assert after == before  # no temp file or lock left, old checkpoints and model unchanged
    assert ckpt.load_checkpoint(ck_dir / ckpt.LAST)["epoch"] == 1
