"""`medres score` survives inputs that hang or exhaust their decoder, through the CLI.

Two hostile but valid-looking ``.nii.gz`` files sit among good NIfTI and DICOM inputs:

- ``slow.nii.gz``: a multi-member gzip (legal: pigz and bgzip write such files) whose
  header and voxels are separated by 1.5 million empty members; every gzip reader walks
  them one by one, so decoding this 30 MB file takes about 15 s here, far past
  ``--file-timeout 2`` (200,000 members took 2 s: too close to the limit to test it).
- ``huge.nii.gz``: a 1 KB file whose header declares a 20000 x 20000 x 20 int16 volume
  (16 GB); the reader allocates the declared size up front (``--worker-memory-mb``).

Both must end as ``timeout`` rows in errors.csv, every other item scored, exit 0.
"""

from __future__ import annotations

import csv
import gzip
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.models import write_dicom_2d, write_model_dir, write_nifti_folder
from typer.testing import CliRunner

from medres.cli import app

pytestmark = pytest.mark.reliability

runner = CliRunner()


def _slow_nifti(path: Path, members: int = 1_500_000) -> None:
    raw = nib.Nifti1Image(np.ones((16, 16), np.int16), np.eye(4)).to_bytes()
    empty = gzip.compress(b"", mtime=0)
    blob = gzip.compress(raw[:352], mtime=0) + empty * members + gzip.compress(raw[352:], mtime=0)
    path.write_bytes(blob)


def _huge_nifti(path: Path) -> None:
    img = nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4))
    img.header.set_data_shape((20000, 20000, 20))  # 16 GB declared, a few bytes stored
    raw = img.header.binaryblock + b"\x00" * 4 + b"\x00" * 64
    path.write_bytes(gzip.compress(raw, mtime=0))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_hanging_and_memory_hungry_files_become_timeout_rows(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", image_size=(16, 16))
    src = tmp_path / "src"
    write_nifti_folder(src / "plain", 4, (16, 16))
    write_nifti_folder(src / "gz", 2, (16, 16), start=10, compress=True)
    write_dicom_2d(src / "dcm" / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.1", seed=1)
    _slow_nifti(src / "slow.nii.gz")
    _huge_nifti(src / "huge.nii.gz")
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = runner.invoke(
        app,
        ["-q", "score", str(model), str(src), "--out", str(out), "--workers", "2",
         "--file-timeout", "2", "--worker-memory-mb", "2048", "--device", "cpu"],
        catch_exceptions=False,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert time.monotonic() - t0 < 120  # the hang was cut short, not waited out
    errors = {Path(row["source"]).name: row for row in _rows(out / "errors.csv")}
    assert set(errors) == {"slow.nii.gz", "huge.nii.gz"}
    assert {row["code"] for row in errors.values()} == {"timeout"}
    assert "limit" in errors["slow.nii.gz"]["message"]
    assert "memory" in errors["huge.nii.gz"]["message"]
    status = [row["status"] for row in _rows(out / "scores.csv")]
    assert (status.count("ok"), status.count("error")) == (7, 2)  # every other item scored


def test_score_limits_are_validated(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", image_size=(16, 16))
    write_nifti_folder(tmp_path / "src", 1, (16, 16))
    for extra in (["--file-timeout", "0"], ["--worker-memory-mb", "64"]):
        r = runner.invoke(
            app, ["-q", "score", str(model), str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                  *extra],
        )  # fmt: skip
        assert r.exit_code == 1, r.output
        assert extra[0] in r.output
