"""No code runs from a file: pickle-payload weights and checkpoints, YAML tags.

Every entry point that reads a user-supplied file is fed a payload whose unpickling (or
YAML construction) would create a marker file. Promise: a one-line error, exit 1, and the
marker never appears, also with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (which flips
``torch.load``'s default to full unpickling).

Entry points: ``train --weights PATH`` (.pth zip, legacy and plain pickle), ``train
--resume`` with a poisoned ``checkpoints/last.pt``, ``score MODEL_DIR`` whose weights file
is a pickle (under the safetensors name, or as ``weights.pt`` with no safetensors), a
pipeline YAML with ``!!python/object`` tags. A control proves each payload is live.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_data import make_dataset
from typer.testing import CliRunner

from medres.cli import app

pytestmark = pytest.mark.reliability

FORCE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _evil(path: Path, marker: Path, kind: str, obj: dict | None = None) -> Path:
    obj = dict(obj or {"conv1.weight": torch.zeros(2, 1, 3, 3)})
    obj["extra"] = _Payload(marker)
    if kind == "zip":
        torch.save(obj, path)
    elif kind == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=4)
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("unsafe_ds"), n=10, dims=2, size=16)


def _invoke(args: list[str]):
    r = CliRunner().invoke(app, args)
    return r


def _one_line_error(r) -> None:
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert lines and "Traceback" not in r.output, r.output
    assert not isinstance(r.exception, AssertionError)


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain"])
@pytest.mark.parametrize("force", [False, True])
def test_train_weights_path_with_pickle_payload_is_refused(
    manifest, tmp_path, monkeypatch, kind, force
):
    if force:
        monkeypatch.setenv(FORCE_ENV, "1")
    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / "evil.pth", marker, kind)
    r = _invoke(["train", "--manifest", str(manifest), "--out", str(tmp_path / "run"),
                 "--weights", str(evil), "--epochs", "1", "--image-size", "16",
                 "--batch-size", "4", "--device", "cpu"])  # fmt: skip
    _one_line_error(r)
    assert not marker.exists()
    assert "pickled code" in r.output or "refused" in r.output


@pytest.mark.parametrize("force", [False, True])
def test_poisoned_resume_checkpoint_is_refused(manifest, tmp_path, monkeypatch, force):
    if force:
        monkeypatch.setenv(FORCE_ENV, "1")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "pwned"
    _evil(run / "checkpoints" / "last.pt", marker, "zip", {"format": "medres-checkpoint/1"})
    r = _invoke(["train", "--manifest", str(manifest), "--out", str(run), "--resume",
                 "--epochs", "1", "--image-size", "16", "--batch-size", "4",
                 "--device", "cpu"])  # fmt: skip
    _one_line_error(r)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["safetensors_name", "pt_only"])
@pytest.mark.parametrize("force", [False, True])
def test_score_model_dir_with_pickled_weights_is_refused(tmp_path, monkeypatch, where, force):
    from helpers.models import write_model_dir, write_nifti_folder

    if force:
        monkeypatch.setenv(FORCE_ENV, "1")
    model = write_model_dir(tmp_path / "model", image_size=(16, 16))
    imgs = tmp_path / "imgs"
    write_nifti_folder(imgs, 2, (16, 16))
    marker = tmp_path / "pwned"
    weights = model / "weights.safetensors"
    if where == "safetensors_name":
        _evil(weights, marker, "zip")
        meta = json.loads((model / "model.json").read_text())
        meta.pop("weights_sha256", None)  # also without the checksum guard
        (model / "model.json").write_text(json.dumps(meta))
    else:
        weights.unlink()
        _evil(model / "weights.pt", marker, "zip")
    r = _invoke(["score", str(model), str(imgs), "--out", str(tmp_path / "out"),
                 "--workers", "0", "--device", "cpu"])  # fmt: skip
    _one_line_error(r)
    assert not marker.exists()


def test_pipeline_yaml_with_python_tags_runs_nothing(manifest, tmp_path):
    marker = tmp_path / "pwned"
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(
        f"model: !!python/object/apply:builtins.open ['{marker}', 'w']\n"
        f"train: !!python/object/new:builtins.open ['{marker}', 'w']\n"
    )
    r = _invoke(["train", str(spec), "--manifest", str(manifest), "--out", str(tmp_path / "run"),
                 "--epochs", "1"])  # fmt: skip
    _one_line_error(r)
    assert not marker.exists()


def test_the_environment_override_holds_in_a_fresh_process(manifest, tmp_path):
    """The variable set before Python starts (torch reads some settings at import)."""
    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / "evil.pth", marker, "legacy")
    env = dict(os.environ, **{FORCE_ENV: "1"}, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "medres", "train", "--manifest", str(manifest),
         "--out", str(tmp_path / "run"), "--weights", str(evil), "--epochs", "1",
         "--image-size", "16", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["zip", "plain"])
def test_control_payloads_are_live(tmp_path, monkeypatch, kind):
    """Without the guards the same files do run code: the tests above are not vacuous."""
    monkeypatch.setenv(FORCE_ENV, "1")
    marker = tmp_path / "pwned"
    path = _evil(tmp_path / "evil.pth", marker, kind)
    import yaml

    if kind == "zip":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as fh:
            pickle.load(fh)
    assert marker.exists()
    marker.unlink()
    yaml.unsafe_load(f"x: !!python/object/apply:builtins.open ['{marker}', 'w']")
    assert marker.exists()
