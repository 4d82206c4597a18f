"""Hostile model folders and sizes (issue #16): a model.json whose saved preprocessing asks
for an absurd image size is one line naming model.json, never a ``decode_failed`` row for
every item (the data is not at fault), and ``train --image-size`` past the allocation
limit is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.models import write_dicom_2d, write_model_dir
from typer.testing import CliRunner

from medres.cli import app

pytestmark = pytest.mark.reliability

runner = CliRunner()


@pytest.mark.parametrize("size", [[10**9, 10**9], [16, 10**5], [0, 16]])
def test_a_model_json_with_an_absurd_image_size_is_one_line(tmp_path: Path, size) -> None:
    model = write_model_dir(tmp_path / "model", image_size=(16, 16))
    meta_path = model / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["preprocessing"]["image_size"] = size
    meta_path.write_text(json.dumps(meta))
    uid = "1.2.826.0.1.3680043.8.498.77"
    write_dicom_2d(tmp_path / "src" / "a.dcm", study_uid=uid, series_uid=uid + ".1")
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["score", str(model), str(tmp_path / "src"), "--out", str(out), "--workers", "0"]
    )
    assert res.exit_code == 1, res.output
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert "model.json: field 'preprocessing'" in line and "image_size" in line, line
    assert not (out / "scores.csv").exists()  # no row blames the data


def test_train_refuses_an_image_size_past_the_allocation_limit(tmp_path: Path) -> None:
    from integration.train_data import make_dataset

    manifest = make_dataset(tmp_path / "ds", n=10)
    run = tmp_path / "run"
    res = runner.invoke(
        app, ["train", "pipelines/small_2d.yaml", "--manifest", str(manifest), "--out",
              str(run), "--image-size", "100000", "--epochs", "1"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert "image_size" in line and "8192 a side" in line, line
    assert not (run / "checkpoints").exists()
