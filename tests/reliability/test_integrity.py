"""Data integrity (issue #16). Two files of one SOP instance: an identical copy is a
``duplicate_input`` row "copy skipped"; a file with the same SOPInstanceUID but other pixel
data is not a copy, and its row says so and names the file that was kept. One command's
``--out`` is never another command's output folder."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from helpers.models import write_dicom_2d
from typer.testing import CliRunner

from medres.cli import app

pydicom = pytest.importorskip("pydicom")
pytestmark = pytest.mark.reliability

runner = CliRunner()


def test_same_sop_instance_with_other_pixels_is_named_not_called_a_copy(tmp_path: Path) -> None:
    src = tmp_path / "src"
    uid = "1.2.826.0.1.3680043.8.498.91"
    first = write_dicom_2d(src / "a" / "x.dcm", study_uid=uid, series_uid=uid + ".1", seed=1)
    (src / "b").mkdir()
    shutil.copy(first, src / "b" / "copy.dcm")
    ds = pydicom.dcmread(first)
    arr = ds.pixel_array.copy()
    arr[0, 0] += 7
    ds.PixelData = arr.tobytes()
    ds.save_as(src / "b" / "edited.dcm")
    out = tmp_path / "ds"
    res = runner.invoke(app, ["ingest", str(src), "--out", str(out), "--workers", "0"])
    assert res.exit_code == 0, res.output
    rows = {
        r["source"]: r
        for r in csv.DictReader((out / "errors.csv").read_text(encoding="utf-8").splitlines())
    }
    assert set(rows) == {"b/copy.dcm", "b/edited.dcm"}
    assert all(r["code"] == "duplicate_input" for r in rows.values())
    assert rows["b/copy.dcm"]["message"].endswith("copy skipped")
    edited = rows["b/edited.dcm"]["message"]
    assert "different pixel data" in edited and "kept a/x.dcm" in edited, edited
    manifest = list(csv.DictReader((out / "manifest.csv").read_text(encoding="utf-8").splitlines()))
    assert [r["source"] for r in manifest] == ["a/x.dcm"]  # accounted: 1 used, 2 skipped


# ------------------------------------------ one command's --out is not another's output
def test_no_command_writes_into_another_commands_output(tmp_path: Path) -> None:
    """A run into a dataset, scores into a dataset or a run, a dataset into scores: each is
    one line naming the file found, and nothing is written there."""
    from helpers.models import write_model_dir
    from integration.train_data import make_dataset

    uid = "1.2.826.0.1.3680043.8.498.92"
    write_dicom_2d(tmp_path / "src" / "a.dcm", study_uid=uid, series_uid=uid + ".1")
    ds = tmp_path / "ds"
    assert runner.invoke(app, ["ingest", str(tmp_path / "src"), "--out", str(ds)]).exit_code == 0
    before = sorted(p.name for p in ds.iterdir())
    model = write_model_dir(tmp_path / "model", image_size=(16, 16))
    scores = tmp_path / "scores"
    res = runner.invoke(app, ["score", str(model), str(tmp_path / "src"), "--out", str(scores)])
    assert res.exit_code == 0, res.output
    labelled = make_dataset(tmp_path / "labelled", n=10)
    cases = [
        (["train", "pipelines/small_2d.yaml", "--manifest", str(labelled), "--out", str(ds),
          "--epochs", "1"], "ingest.json"),
        (["score", str(model), str(tmp_path / "src"), "--out", str(ds)], "ingest.json"),
        (["ingest", str(tmp_path / "src"), "--out", str(scores)], "ledger.sqlite"),
    ]  # fmt: skip
    for args, marker in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 1, (args, res.output)
        (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert f"({marker}); give `medres {args[0]}` a folder of its own" in line, line
    assert sorted(p.name for p in ds.iterdir()) == before
    assert not (scores / "manifest.csv").exists()


# ------------------------------------- a NIfTI header that declares more than the file
def test_a_nifti_header_declaring_huge_or_missing_data_is_named_before_any_allocation(
    tmp_path: Path,
) -> None:
    """dim = 30000^3 in a 360-byte file is ``invalid_nifti`` naming the declared shape and
    size (not a ``MemoryError``), a 7D header past the file's end is ``truncated`` with the
    byte counts; both in well under a second each."""
    import struct
    import time

    nib = pytest.importorskip("nibabel")
    import numpy as np

    src = tmp_path / "src"
    src.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), src / "ok.nii")
    raw = bytearray((src / "ok.nii").read_bytes())
    huge, long = bytearray(raw), bytearray(raw)
    struct.pack_into("<8h", huge, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)
    struct.pack_into("<8h", long, 40, 7, 8, 8, 8, 2, 2, 2, 2)
    (src / "huge.nii").write_bytes(huge)
    (src / "long.nii").write_bytes(long)
    out = tmp_path / "ds"
    t0 = time.monotonic()
    res = runner.invoke(app, ["ingest", str(src), "--out", str(out), "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert time.monotonic() - t0 < 30
    text = (out / "errors.csv").read_text(encoding="utf-8")
    rows = {r["source"]: r for r in csv.DictReader(text.splitlines())}
    assert rows["huge.nii"]["code"] == "invalid_nifti"
    assert "declares 30000x30000x30000 voxels" in rows["huge.nii"]["message"]
    assert "MemoryError" not in text
    assert rows["long.nii"]["code"] == "truncated"
    assert "from byte 352, the file has" in rows["long.nii"]["message"]
