"""Registry, architecture details, stem rule, reference costs and the `medres models` command."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from medres.cli import app
from medres.errors import ModelError
from medres.models import build_model, get_arch, list_archs, resolve_stem
from medres.models.registry import REFERENCE_COST
from medres.models.resnet import count_cost

runner = CliRunner()
ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def test_registry_names_and_unknown_name_lists_them():
    assert list_archs() == ARCHS
    with pytest.raises(ModelError) as exc:
        get_arch("resnet20")
    assert "resnet20" in str(exc.value) and ", ".join(ARCHS) in str(exc.value)
    with pytest.raises(ModelError, match="resnet18, resnet34"):
        build_model("densenet121", 2, 1, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dims": 4}, "dims=4"),
        ({"in_channels": 0}, "in_channels"),
        ({"num_classes": 0}, "num_classes"),
        ({"stem": "tiny"}, "auto, standard, small"),
    ],
)
def test_invalid_options_are_model_errors(kwargs, match):
    args = {"arch": "resnet18", "dims": 2, "in_channels": 1, "num_classes": 2, **kwargs}
    with pytest.raises(ModelError, match=match):
        build_model(**args)


@pytest.mark.parametrize(
    ("size", "expected"),
    [(None, "standard"), (28, "small"), ((63, 200), "small"), ((64, 64), "standard"),
     ((224, 224), "standard"), ((128, 128, 48), "small"), ((96, 96, 96), "standard")],
)  # fmt: skip
def test_auto_stem_rule(size, expected):
    assert resolve_stem("auto", size) == expected
    assert resolve_stem("standard", 28) == "standard" and resolve_stem("small", 512) == "small"


@pytest.mark.parametrize("dims", [2, 3])
def test_torchvision_stem_and_v15_bottleneck(dims):
    with torch.device("meta"):
        m = build_model("resnet50", dims, 3, 2, stem="standard")
    assert m.conv1.stride == (2,) * dims and m.conv1.kernel_size == (7,) * dims
    assert not m.no_max_pool and m.maxpool.stride == 2
    block = m.layer2[0]
    assert block.conv1.stride == (1,) * dims and block.conv2.stride == (2,) * dims  # v1.5
    assert block.downsample[0].bias is None  # bias_downsample=False
    assert m.fc.in_features == 2048


def test_small_stem_structure_and_forward():
    m = build_model("resnet18", 3, 2, 3, stem="small")
    assert m.conv1.kernel_size == (3, 3, 3) and m.conv1.stride == (1, 1, 1) and m.no_max_pool
    with torch.no_grad():
        assert m(torch.randn(1, 2, 16, 16, 16)).shape == (1, 3)


def test_channels_last_forward_matches():
    torch.manual_seed(0)
    m = build_model("resnet18", 2, 3, 4, stem="standard").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        m_cl = m.to(memory_format=torch.channels_last)
        out = m_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_no_torchvision_import():
    """torchvision is not a dependency: no module of medres.models imports it."""
    import ast
    from pathlib import Path

    import medres.models

    files = list(Path(medres.models.__file__).parent.glob("*.py"))
    assert len(files) >= 6
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "torchvision" for n in names), path


_FAST_COST = [("resnet18", 2), ("resnet50", 2), ("resnet18", 3)]


@pytest.mark.parametrize(
    "key",
    [k if k in _FAST_COST else pytest.param(k, marks=pytest.mark.slow) for k in REFERENCE_COST],
    ids=lambda k: f"{k[0]}-{k[1]}d",
)
def test_reference_cost_table_matches_a_live_count(key):
    """The cached table behind `medres models` equals counting on the meta device."""
    params, gflops = REFERENCE_COST[key]
    p, g = count_cost(*key)
    assert p == params
    assert g == pytest.approx(gflops, abs=0.006)


def test_torchvision_flops_convention():
    # torchvision lists 1.81 GMACs for resnet18 at 224: 3.63 GFLOPs at 2 FLOPs per MAC
    assert REFERENCE_COST[("resnet18", 2)][1] == pytest.approx(3.63, abs=0.01)


def test_params_match_an_independent_formula():
    """Params of resnet18-2D/3D from the layer shapes (conv weights + BN affine + fc)."""

    def count(k: int, in_ch: int, classes: int) -> int:
        total = 64 * in_ch * 7**k + 2 * 64  # conv1 + bn1
        inplanes = 64
        for stage, planes in enumerate([64, 128, 256, 512]):
            for b in range(2):
                i = inplanes if b == 0 else planes
                total += planes * i * 3**k + 2 * planes + planes * planes * 3**k + 2 * planes
                if b == 0 and stage > 0:
                    total += planes * inplanes + 2 * planes
            inplanes = planes
        return total + 512 * classes + classes

    assert count(2, 3, 2) == REFERENCE_COST[("resnet18", 2)][0]
    assert count(3, 1, 2) == REFERENCE_COST[("resnet18", 3)][0]
    with torch.device("meta"):
        m = build_model("resnet34", 2, 5, 7, stem="standard")
    assert (
        sum(p.numel() for p in m.parameters())
        == REFERENCE_COST[("resnet34", 2)][0] + 64 * 2 * 49 + 5 * 512 + 5
    )


def test_models_command_table_and_json():
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0, r.output
    for arch in ARCHS:
        assert arch in r.output
    assert "medicalnet" in r.output and "imagenet" in r.output
    r = runner.invoke(app, ["models", "--json", "--dims", "3"])
    assert r.exit_code == 0
    rows = json.loads(r.output)
    assert [row["name"] for row in rows] == ARCHS and all(row["dims"] == 3 for row in rows)
    assert "medicalnet" in rows[0]["weights"] and "imagenet (inflated)" in rows[0]["weights"]
    assert rows[0]["params"] == REFERENCE_COST[("resnet18", 3)][0]
    r = runner.invoke(app, ["models", "--dims", "5"])
    assert r.exit_code == 1 and "dims=5" in r.output


def test_models_command_is_fast():
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "medres", "models", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 10
    assert elapsed < 5.0


def test_model_is_a_plain_module_for_other_stages():
    m = build_model("resnet18", 2, 1, 2, image_size=(28, 28))
    assert isinstance(m, nn.Module) and m.config.stem == "small"
    assert m.config.to_dict() == {
        "arch": "resnet18",
        "dims": 2,
        "in_channels": 1,
        "num_classes": 2,
        "stem": "small",
    }


def test_models_files_lists_urls_cache_paths_and_mirror(monkeypatch):
    from medres.models.hub import cache_dir

    monkeypatch.setenv("MEDRES_WEIGHTS_MIRROR", "file:///mnt/weights/")
    (cache_dir()).mkdir(parents=True)
    (cache_dir() / "resnet34-b627a593.pth").write_bytes(b"x")
    r = runner.invoke(app, ["models", "--files", "--json"])
    assert r.exit_code == 0, r.output
    rows = {(row["arch"], row["source"]): row for row in json.loads(r.output)}
    assert len(rows) == 13  # 5 imagenet + 3 imagenet-v2 + 5 medicalnet
    r18 = rows[("resnet18", "imagenet")]
    assert r18["url"] == "file:///mnt/weights/resnet18-f37072fd.pth"
    assert r18["cache_path"] == str(cache_dir() / "resnet18-f37072fd.pth") and not r18["cached"]
    assert rows[("resnet34", "imagenet")]["cached"]
    assert rows[("resnet50", "medicalnet")]["url"].endswith("/resnet_50_23dataset.pth")
    r = runner.invoke(app, ["models", "--files"])
    assert r.exit_code == 0 and "resnet152" in r.output
