"""``benchmarks/gpu.py --smoke``: the GPU benchmark's every row runs on the CPU (issue 18)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_gpu_smoke_covers_loader_with_device_augmentation_and_3d_scoring(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("gpu_bench_smoke", BENCH / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, gpu)  # dataclasses look their module up
    spec.loader.exec_module(gpu)
    out = tmp_path / "gpu.json"
    assert gpu.main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["name"] for r in res["results"]] == ["resnet18-2d", "resnet18-3d"]
    assert res["loader"]["arch"] == "resnet18" and res["loader"]["real_img_s"] > 0
    s3 = res["score3d"]
    assert s3["volumes_s"] > 0 and s3["n"] == 4 and 0 < s3["mfu"] < 1
    text = capsys.readouterr().out
    assert "medres score 3D ResNet-18" in text and "CUDA-only" in text
