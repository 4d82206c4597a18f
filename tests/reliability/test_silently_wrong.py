"""Results that used to be silently wrong are now coded rows (#16).

* A 3D model scoring 2D images reported ``ok``; a 2D model on 3D volumes marked every item
  ``decode_failed ... the file may be corrupt``. Both are ``wrong_dims`` rows naming the
  image's and the model's dimensionality.
* NIfTI float64 values beyond float32's range became +inf and complex data lost its
  imaginary part, without a word: both are ``unsupported_values`` rejections.
* The ingest cache written before the identity filter changed (version 3) is rebuilt, not
  reused with its stale filtering.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.models import write_model_dir, write_nifti_folder
from typer.testing import CliRunner

from medres.cli import app
from medres.errors import IngestError
from medres.ingest import cache as icache
from medres.ingest.codes import Code
from medres.ingest.nifti import load_nifti
from medres.ingest.pipeline import IngestConfig, run_ingest

pytestmark = pytest.mark.reliability

runner = CliRunner()


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize(
    ("model_dims", "image_shape", "image_dims"),
    [(3, (16, 16), 2), (2, (16, 16, 8), 3)],
    ids=["3d-model-2d-images", "2d-model-3d-volumes"],
)
@pytest.mark.parametrize("workers", ["0", "1"])
def test_model_and_image_dims_that_differ_are_wrong_dims(
    tmp_path, model_dims, image_shape, image_dims, workers
):
    size = (16, 16, 8) if model_dims == 3 else (16, 16)
    model = write_model_dir(tmp_path / "model", dims=model_dims, image_size=size)
    write_nifti_folder(tmp_path / "src", 2, image_shape)
    out = tmp_path / "out"
    r = runner.invoke(app, ["-q", "score", str(model), str(tmp_path / "src"), "--out",
                            str(out), "--workers", workers])  # fmt: skip
    assert r.exit_code in (0, 1), r.output  # nothing scored: exit code of an empty run
    assert "Traceback" not in r.output
    rows = _rows(out / "scores.csv")
    assert len(rows) == 2 and {x["status"] for x in rows} == {"error"}  # never "ok"
    errors = _rows(out / "errors.csv")
    assert len(errors) == 2 and {e["code"] for e in errors} == {Code.WRONG_DIMS.value}
    for e in errors:
        msg = e["message"]
        assert f"a {image_dims}D image" in msg and f"takes {model_dims}D images" in msg, msg
        assert "corrupt" not in msg


def test_a_2d_model_trained_on_slices_scores_volumes_by_its_saved_rule(tmp_path):
    """The documented exception: a 2D model whose saved preprocessing slices volumes
    (``slice_mode`` center) scores 3D images on their centre slice."""
    model = write_model_dir(tmp_path / "model", dims=2, image_size=(16, 16))
    meta = json.loads((model / "model.json").read_text())
    meta["preprocessing"]["slice_mode"] = "center"
    (model / "model.json").write_text(json.dumps(meta))
    write_nifti_folder(tmp_path / "src", 2, (16, 16, 8))
    out = tmp_path / "out"
    r = runner.invoke(app, ["-q", "score", str(model), str(tmp_path / "src"), "--out",
                            str(out), "--workers", "0"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert [x["status"] for x in _rows(out / "scores.csv")] == ["ok", "ok"]


def _nifti(path: Path, arr: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


VALUES = {
    "float64_overflow": (np.full((8, 8), 1e300, np.float64), "exceed the float32 range"),
    "float64_negative_overflow": (
        np.r_[np.zeros(63), -1e39].reshape(8, 8).astype(np.float64),
        "exceed the float32 range",
    ),
    "complex64": ((np.ones((8, 8)) + 1j * np.ones((8, 8))).astype(np.complex64), "complex"),
    "complex128_3d": (np.ones((8, 8, 4), np.complex128) * (1 + 2j), "complex"),
}


@pytest.mark.parametrize("name", sorted(VALUES))
def test_values_medres_cannot_store_are_refused(tmp_path, name):
    arr, needle = VALUES[name]
    path = _nifti(tmp_path / f"{name}.nii", arr)
    with pytest.raises(IngestError, match=needle) as info:
        load_nifti(path)
    assert info.value.code == Code.UNSUPPORTED_VALUES


def test_float64_within_float32_range_and_non_finite_still_load(tmp_path):
    arr = np.linspace(-3e38, 3e38, 64).reshape(8, 8)
    arr[0, 0] = np.inf  # non-finite input keeps its existing warning, not this rejection
    img = load_nifti(_nifti(tmp_path / "ok.nii", arr))
    assert np.isfinite(img.array[1:]).all() and "non_finite_values" in img.warnings


def test_ingest_reports_unsupported_values_per_file(tmp_path):
    src = tmp_path / "src"
    write_nifti_folder(src, 1, (8, 8))
    _nifti(src / "big.nii", np.full((8, 8), 1e300, np.float64))
    _nifti(src / "cplx.nii.gz", np.ones((8, 8), np.complex64))
    run_ingest(IngestConfig((src,), tmp_path / "ds", isolate=False, workers=1))
    codes = {r["source"]: r["code"] for r in _rows(tmp_path / "ds" / "errors.csv")}
    assert codes == {"big.nii": "unsupported_values", "cplx.nii.gz": "unsupported_values"}


def test_a_cache_of_the_old_identity_filter_is_rebuilt(tmp_path):
    src, out = tmp_path / "src", tmp_path / "ds"
    write_nifti_folder(src, 2, (8, 8))
    config = IngestConfig((src,), out, isolate=False, workers=1)
    run_ingest(config)
    assert run_ingest(config).files.get("cached") == 2  # the cache works
    cache_file = out / icache.CACHE_NAME
    data = json.loads(cache_file.read_text())
    assert data["version"] >= 4
    # the same cache as the version before the NFKC whole-token filter wrote it, with a
    # record it let through: it must not be reused
    data["version"] = 3
    for rec in data["units"].values():
        rec["manufacturer"] = "STALE-FILTER"
    cache_file.write_text(json.dumps(data))
    report = run_ingest(config)
    assert not report.files.get("cached")
    assert "STALE-FILTER" not in (out / "manifest.csv").read_text()
    assert json.loads(cache_file.read_text())["version"] == icache._CACHE_VERSION


@pytest.mark.parametrize("offset", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_vox_offset_is_a_coded_rejection_not_a_crash(tmp_path, offset):
    """Found by the long-mode fuzz (plain.nii#325@0): a NaN ``vox_offset`` crashed the fast
    NIfTI reader with ``ValueError``; now the file is read or rejected with a code."""
    import struct

    path = tmp_path / "a.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)), path)
    data = bytearray(path.read_bytes())
    data[108:112] = struct.pack("<f", offset)  # vox_offset
    path.write_bytes(bytes(data))
    try:
        load_nifti(path, "a.nii")
    except IngestError as exc:
        assert exc.code and "a.nii" in str(exc)
