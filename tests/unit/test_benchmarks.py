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
