"""The benchmark scripts run (tiny sizes, CPU) and the suite runner reads their results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _gpu_tiny(tmp_path, archs: list[str]) -> dict:
    gpu = _load("gpu")
    out = tmp_path / "gpu.json"
    argv = ["--tiny", "--device", "cpu", "--archs", ",".join(archs), "--json", str(out)]
    assert gpu.main(argv) == 0
    res = json.loads(out.read_text())
    names = [r["name"] for r in res["results"]]
    assert names == [f"{a}-{d}d" for d in (2, 3) for a in archs]
    return res


@pytest.mark.slow
def test_gpu_benchmark_full_set_runs_on_cpu_with_tiny_sizes(tmp_path):
    _gpu_tiny(tmp_path, ["resnet18", "resnet50"])


def test_gpu_benchmark_runs_on_cpu_with_tiny_sizes(tmp_path, capsys):
    res = _gpu_tiny(tmp_path, ["resnet18"])
    for r in res["results"]:
        assert r["samples_per_s"] > 0
        assert r["tflops_per_s"] > 0  # FLOPs were counted
        assert 0 < r["mfu"] < 1
    assert res["loader"]["real_img_s"] > 0 and res["loader"]["ratio"] > 0
    assert "MFU" in capsys.readouterr().out


def test_run_all_turns_results_into_ratio_rows():
    run_all = _load("run_all")
    ingest = {
        "scan": {"bare_ms": 0.4, "medres_ms": 0.48, "ratio": 1.2},
        "uncompressed": {
            "case": "uncompressed",
            "ms_per_file": {"medres": 2.0, "sitk": 2.2, "dicom2nifti": 7.0, "monai": 5.0},
        },
    }
    rows = run_all.ingest_rows(ingest)
    by = {(r.case, r.measure): r for r in rows}
    assert by[("header scan", "medres/bare")].ok is True
    assert by[("uncompressed", "sitk/medres time")].value == 1.1
    assert by[("uncompressed", "monai/medres time")].ok is False  # 2.5 < 3
    train = {
        "engine": [{"case": "2d", "ratio": 0.9}],
        "input": [{"case": "2d", "data_wait_frac": 0.3}],
    }
    rows = run_all.train_rows(train)
    assert [r.ok for r in rows] == [True, False]
    score = [
        {
            "workload": "small2d",
            "precision": "fp32",
            "ratios": {"medres/ceiling": 0.5, "medres/naive": 4.0},
        }
    ]
    rows = run_all.score_rows(score)
    assert [(r.measure, r.ok) for r in rows] == [("medres/ceiling", False), ("medres/naive", True)]
    assert "| score |" in run_all.table(rows)


def _tiny_npz(folder: Path, name: str, shape: tuple[int, ...], n: int = 12) -> Path:
    """A MedMNIST-shaped .npz (uint8 images, (N, 1) labels) with a learnable pattern."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        y = np.arange(n) % 2
        x = rng.integers(0, 100, size=(n, *shape)).astype(np.uint8)
        x[y == 1] += 120
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y.reshape(-1, 1)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / name, **arrays)
    return folder / name


def test_quality_exports_dicom_and_nifti_and_formats_the_table(tmp_path):
    import numpy as np
    import pydicom

    q = _load("quality")
    npz = _tiny_npz(tmp_path, "breastmnist.npz", (8, 8))
    data = q.load_npz(npz, limit=4)
    assert [len(y) for _, y in data.values()] == [4, 4, 4]
    labels = q.export_dicom2d(data, tmp_path / "bm")
    files = sorted((tmp_path / "bm" / "dicom").glob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    assert len(files) == 12 and ds.Modality == "US" and ds.pixel_array.shape == (8, 8)
    assert np.array_equal(ds.pixel_array, data["train"][0][0])
    assert labels.read_text().splitlines()[0] == "patient_id,label,split"
    data3 = q.load_npz(_tiny_npz(tmp_path, "a.npz", (4, 4, 4)), limit=2)
    rows = q.export_nifti3d(data3, tmp_path / "ad").read_text().splitlines()
    assert rows[0] == "path,label,split" and len(rows) == 7
    assert (tmp_path / "ad" / "nifti" / rows[1].split(",")[0]).is_file()
    res = {
        "set": "breastmnist", "budget_min": 15.0, "quick": False, "auc": 0.93, "acc": 0.87,
        "acc_at_0.5": 0.85, "estimated_min": 14.0, "train_min": 15.2, "epochs": 30,
        "load_before": [2.0, 2.0, 2.0], "load_after": [2.1, 2.0, 2.0], "plan": "data:\n  x: 1",
    }  # fmt: skip
    assert "Google AutoML Vision | 0.919" in q.table(res) and "**0.930**" in q.table(res)
    assert "meets the target" in q.summary(res) and "-8%" in q.summary(res)
    q.append_results([res], tmp_path / "RESULTS.md")
    assert "Quality benchmark" in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.slow
def test_quality_quick_runs_ingest_plan_train_on_tiny_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDRES_CACHE_DIR", str(tmp_path / "cache"))
    q = _load("quality")
    data = tmp_path / "data"
    _tiny_npz(data, "breastmnist.npz", (12, 12), n=20)
    _tiny_npz(data, "adrenalmnist3d_64.npz", (16, 16, 16), n=20)
    out = tmp_path / "res.json"
    argv = ["--quick", "--data", str(data), "--work", str(tmp_path / "w"), "--json", str(out)]
    assert q.main(argv) == 0
    res = json.loads(out.read_text())
    assert [r["set"] for r in res] == ["breastmnist", "adrenalmnist3d_64"]
    for r in res:
        assert 0 <= r["auc"] <= 1 and r["epochs"] >= 1 and r["estimated_min"] > 0
