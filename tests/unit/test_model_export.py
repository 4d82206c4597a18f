"""Model exporters: TorchScript, ONNX and MONAI bundle reload to the PyTorch outputs."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medres.cli import app
from medres.errors import ConfigError, ModelError
from medres.model_export import (
    ATOL,
    export_model,
    export_monai_bundle,
    export_onnx,
    export_torchscript,
    input_shape,
    load_run_model,
    monai_resnet_args,
    verify_monai_bundle,
)

runner = CliRunner()
SIZES = {2: [16, 16], 3: [8, 8, 8]}


def _make_run(run: Path, dims: int, in_channels: int = 1, num_classes: int = 2) -> Path:
    """A run dir in the documented model-dir format (safetensors + model.json)."""
    from safetensors.torch import save_file

    from medres.models.resnet import build_model

    torch.manual_seed(dims)
    model = build_model("resnet18", dims, in_channels, num_classes, image_size=SIZES[dims])
    # non-trivial batch-norm statistics, so a train-mode export would not match
    for mod in model.modules():
        if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    (run / "model").mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(run / "model" / "weights.safetensors"))
    classes = [f"c{i}" for i in range(num_classes)]
    meta = {
        "format": "medres-model/1",
        "medres_version": "0",
        "arch": "resnet18",
        "dims": dims,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "task": "binary" if num_classes == 2 else "multiclass",
        "classes": classes,
        "positive_class": classes[-1],
        "stem": model.config.stem,
        "weights_source": "none",
        "preprocessing": {"spatial": {"image_size": SIZES[dims]}, "modality": "CT"},
    }
    (run / "model" / "model.json").write_text(json.dumps(meta))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {2: _make_run(root / "run2d", 2), 3: _make_run(root / "run3d", 3, 2, 3)}


@pytest.fixture(scope="module")
def loaded(runs) -> dict[int, tuple]:
    """(model, meta) per run, loaded once: building a 3D ResNet is the slow part."""
    return {d: load_run_model(r) for d, r in runs.items()}


def _batch(meta: dict, n: int = 3, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, meta["in_channels"], *SIZES[meta["dims"]], generator=g)


def _torch_out(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.parametrize("dims", [2, 3])
def test_torchscript_matches_pytorch(loaded, tmp_path: Path, dims: int):
    model, meta0 = loaded[dims]
    res = export_torchscript(model, meta0, tmp_path / "m.ts", input_shape(meta0))
    assert res.max_abs_diff <= ATOL
    assert res.input_shape[2:] == tuple(SIZES[dims])
    extra = {"model.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(res.path), _extra_files=extra)
    meta = json.loads(extra["model.json"])
    assert meta["dims"] == dims
    x = _batch(meta)  # batch 3: not the traced batch size
    with torch.no_grad():
        got = loaded(x).numpy()
    np.testing.assert_allclose(got, _torch_out(model, x), atol=ATOL, rtol=0)
    assert got.shape == (3, meta["num_classes"])


@pytest.mark.parametrize("dims", [2, 3])
def test_onnx_matches_pytorch_with_dynamic_batch(loaded, tmp_path: Path, dims: int):
    import onnx
    import onnxruntime as ort

    model, meta0 = loaded[dims]
    res = export_onnx(model, meta0, tmp_path, input_shape(meta0))  # folder: model.onnx
    assert res.path == tmp_path / "model.onnx"
    proto = onnx.load(str(res.path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props["medres_model_json"])
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = _batch(meta, n=n)
        got = sess.run(["logits"], {"image": x.numpy()})[0]
        np.testing.assert_allclose(got, _torch_out(model, x), atol=ATOL, rtol=0)


def test_monai_bundle_loads_and_matches(runs, loaded, tmp_path: Path):
    from monai.bundle import ConfigParser, load, verify_net_in_out

    bundle = tmp_path / "tiny_bundle"
    res = export_model(runs[2], "monai-bundle", bundle)
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt"):
        assert (bundle / rel).is_file()
    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.read_config(str(bundle / "configs" / "inference.json"))
    assert parser["_meta_#network_data_format#inputs#image#spatial_shape"] == SIZES[2]
    assert parser["_meta_#network_data_format#outputs#pred#channel_def"] == {"0": "c0", "1": "c1"}
    assert parser["network_def#_target_"] == "monai.networks.nets.ResNet"  # MONAI only
    meta = parser["_meta_#medres"]
    x = _batch(meta)
    ref = _torch_out(loaded[2][0], x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # state dict into the config's network_def
        net = load(
            name=bundle.name,
            bundle_dir=str(tmp_path),
            model=parser.get_parsed_content("network_def"),
            device="cpu",
        )
        # network built by monai from configs/inference.json itself
        net_cfg = load(
            name=bundle.name, bundle_dir=str(tmp_path), workflow_type="inference", device="cpu"
        )
        ts, ts_meta, _ = load(
            name=bundle.name, bundle_dir=str(tmp_path), load_ts_module=True, device="cpu"
        )
    assert ts_meta["medres"]["classes"] == ["c0", "c1"]
    with torch.no_grad():
        for m in (net.eval(), net_cfg.eval(), ts):
            np.testing.assert_allclose(m(x).numpy(), ref, atol=ATOL, rtol=0)
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        device="cpu",
    )
    inf = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inf["postprocessing"]["transforms"][0]["softmax"] is True
    assert res.max_abs_diff <= ATOL


def test_bundle_check_catches_a_different_model(loaded, tmp_path: Path):
    model, meta = loaded[2]
    bundle = tmp_path / "b"
    export_monai_bundle(model, meta, bundle, input_shape(meta))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    with pytest.raises(ModelError, match="differ from PyTorch"):
        verify_monai_bundle(bundle, other)


def test_resnet_args_and_non_resnet_fallback(loaded, tmp_path: Path):
    model, _ = loaded[3]
    args = monai_resnet_args(model)
    assert args is not None
    assert args["spatial_dims"] == 3 and args["n_input_channels"] == 2
    assert args["num_classes"] == 3 and args["layers"] == [2, 2, 2, 2]
    assert monai_resnet_args(torch.nn.Linear(2, 2)) is None
    with pytest.raises(ModelError, match="cannot describe"):
        export_monai_bundle(
            torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 2)),
            {"arch": "resnet18", "dims": 2, "in_channels": 1, "num_classes": 2},
            tmp_path / "nb",
            (1, 1, 16, 16),
        )


def test_input_shape_rules():
    meta = {"dims": 3, "in_channels": 2, "preprocessing": {"a": [{"spatial_size": 8}]}}
    assert input_shape(meta) == (1, 2, 8, 8, 8)
    assert input_shape(meta, [4, 5, 6], batch=2) == (2, 2, 4, 5, 6)
    with pytest.raises(ConfigError, match="3D"):
        input_shape(meta, [4, 5])
    with pytest.raises(ModelError, match="--input-size"):
        input_shape({"dims": 2, "in_channels": 1, "preprocessing": {}})


def test_errors_name_the_path(runs, tmp_path: Path):
    with pytest.raises(ModelError, match=r"no model/model\.json") as exc:
        export_model(tmp_path / "empty_run", "onnx", tmp_path / "x.onnx")
    assert "empty_run" in str(exc.value)
    with pytest.raises(ConfigError, match="torchscript, onnx, monai-bundle"):
        export_model(runs[2], "tflite", tmp_path / "x")


def test_cli_export_model(runs, tmp_path: Path):
    out = tmp_path / "cli.ts"
    r = runner.invoke(
        app, ["export-model", str(runs[2]), "--format", "torchscript", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert out.is_file() and "max |diff|" in r.output
    r = runner.invoke(app, ["export-model", str(tmp_path / "nope"), "-f", "onnx", "-o", str(out)])
    assert r.exit_code == 1
    assert "no model/model.json" in r.output and "Traceback" not in r.output
    r = runner.invoke(
        app, ["export-model", str(runs[2]), "-f", "onnx", "-o", str(out), "--input-size", "a,b"]
    )
    assert r.exit_code == 1 and "--input-size" in r.output
