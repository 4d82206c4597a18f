"""Model exporters: TorchScript, ONNX and MONAI bundle reload to the PyTorch outputs."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medres.cli import app
from medres.errors import ConfigError, ModelError
from medres.models import ModelMeta
from medres.models.export import (
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


def _preprocessing(dims: int, in_channels: int) -> dict:
    """A resolved medres TransformSpec, as training saves it in model.json."""
    from medres.train.spec import TransformSpec

    spec = TransformSpec(
        dims=dims, in_channels=in_channels, image_size=tuple(SIZES[dims]), intensity="range"
    )
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def _make_run(run: Path, dims: int, in_channels: int = 1, num_classes: int = 2) -> Path:
    """A run dir written with the models stage's own save_model_dir."""
    from medres.models import build_model, save_model_dir

    torch.manual_seed(dims)
    model = build_model("resnet18", dims, in_channels, num_classes, image_size=SIZES[dims])
    # non-trivial batch-norm statistics, so a train-mode export would not match
    for mod in model.modules():
        if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    classes = [f"c{i}" for i in range(num_classes)]
    meta = {
        "task": "binary" if num_classes == 2 else "multiclass",
        "classes": classes,
        "positive_class": classes[-1],
        "weights_source": "none",
        "preprocessing": _preprocessing(dims, in_channels),
    }
    save_model_dir(run / "model", model, ModelMeta.for_model(model, **meta))
    return run


@pytest.fixture(scope="module")
def run2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_run(tmp_path_factory.mktemp("runs") / "run2d", 2)


def _tiny(dims: int, in_channels: int, num_classes: int) -> tuple[torch.nn.Module, ModelMeta]:
    """A narrow MONAI ResNet (widths 4..32): the exporters take any module, and this one
    exports in milliseconds; the resnet18 run dir above covers the full path."""
    from monai.networks.nets import ResNet

    torch.manual_seed(10 + dims)
    model = ResNet(
        "basic",
        [1, 1, 1, 1],
        [4, 8, 16, 32],
        spatial_dims=dims,
        n_input_channels=in_channels,
        num_classes=num_classes,
        conv1_t_stride=2,
        bias_downsample=False,
    )
    for mod in model.modules():
        if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    meta = ModelMeta(
        arch="resnet18",
        dims=dims,
        in_channels=in_channels,
        num_classes=num_classes,
        task="multilabel" if num_classes == 3 else "binary",
        classes=tuple(f"c{i}" for i in range(num_classes)),
        preprocessing=_preprocessing(dims, in_channels),
    )
    return model.eval(), meta


@pytest.fixture(scope="module")
def loaded() -> dict[int, tuple]:
    return {2: _tiny(2, 1, 2), 3: _tiny(3, 2, 3)}


def _batch(meta: dict | ModelMeta, n: int = 3, seed: int = 7) -> torch.Tensor:
    meta = meta.to_json() if isinstance(meta, ModelMeta) else meta
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


@pytest.mark.parametrize("dims", [2, 3])
def test_monai_bundle_loads_and_matches(loaded, tmp_path: Path, dims: int):
    from monai.bundle import ConfigParser, load, verify_net_in_out

    model, meta0 = loaded[dims]
    bundle = tmp_path / "tiny_bundle"
    res = export_monai_bundle(model, meta0, bundle, input_shape(meta0))
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt"):
        assert (bundle / rel).is_file()
    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.read_config(str(bundle / "configs" / "inference.json"))
    classes = list(meta0.classes)
    assert parser["_meta_#network_data_format#inputs#image#spatial_shape"] == SIZES[dims]
    assert parser["_meta_#network_data_format#inputs#image#num_channels"] == meta0.in_channels
    channel_def = {str(i): c for i, c in enumerate(classes)}
    assert parser["_meta_#network_data_format#outputs#pred#channel_def"] == channel_def
    assert parser["network_def#_target_"] == "monai.networks.nets.ResNet"  # MONAI only
    assert parser["network_def#block_inplanes"] == [4, 8, 16, 32]
    meta = parser["_meta_#medres"]
    x = _batch(meta)
    ref = _torch_out(model, x)
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
    assert ts_meta["medres"]["classes"] == classes
    with torch.no_grad():
        for m in (net.eval(), net_cfg.eval(), ts):
            np.testing.assert_allclose(m(x).numpy(), ref, atol=ATOL, rtol=0)
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        device="cpu",
    )
    # the bundle's preprocessing replays medres's transforms on NIfTI files
    from medres.train.transforms import build_transforms

    rng = np.random.default_rng(dims)
    img_shape = (20, 24) if dims == 2 else (10, 12, 9)
    img_shape = (*img_shape, meta0.in_channels) if meta0.in_channels > 1 else img_shape
    for i in range(2):
        arr = rng.normal(size=img_shape).astype(np.float32)
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / f"scan{i}.nii.gz"))
    parser["dataset_dir"] = str(tmp_path)
    dataset = parser.get_parsed_content("dataset")
    assert len(dataset) == 2
    item = dataset[0]
    expected = build_transforms(meta0.preprocessing, train=False)(
        {"image": str(tmp_path / "scan0.nii.gz"), "channels": meta0.in_channels}
    )
    assert tuple(item["image"].shape) == (meta0.in_channels, *SIZES[dims])
    assert item["image_path"] == str(tmp_path / "scan0.nii.gz")  # for ClassificationSaver
    np.testing.assert_array_equal(np.asarray(item["image"]), np.asarray(expected["image"]))
    inf = json.loads((bundle / "configs" / "inference.json").read_text())
    act = "sigmoid" if meta0.task == "multilabel" else "softmax"
    assert inf["postprocessing"]["transforms"][0] == {
        "_target_": "Activationsd",
        "keys": "pred",
        act: True,
    }
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
    assert args["num_classes"] == 3 and args["layers"] == [1, 1, 1, 1]
    assert args["block_inplanes"] == [4, 8, 16, 32] and args["block"] == "basic"
    assert args["conv1_t_stride"] == [2, 2, 2] and args["no_max_pool"] is False
    assert monai_resnet_args(torch.nn.Linear(2, 2)) is None
    with pytest.raises(ModelError, match="cannot describe"):
        export_monai_bundle(
            torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 2)),
            ModelMeta(arch="resnet18", dims=2, in_channels=1, num_classes=2),
            tmp_path / "nb",
            (1, 1, 16, 16),
        )


def test_input_shape_rules():
    meta = ModelMeta(
        arch="resnet18", dims=3, in_channels=2, num_classes=2,
        preprocessing={"a": [{"spatial_size": 8}]},
    )  # fmt: skip
    assert input_shape(meta) == (1, 2, 8, 8, 8)
    assert input_shape(meta, [4, 5, 6], batch=2) == (2, 2, 4, 5, 6)
    with pytest.raises(ConfigError, match="3D"):
        input_shape(meta, [4, 5])
    with pytest.raises(ModelError, match="--input-size"):
        input_shape(ModelMeta(arch="resnet18", dims=2, in_channels=1, num_classes=2))


def test_export_model_from_run_dir(run2d, tmp_path: Path):
    """The full path: run dir -> medres model loader -> ONNX, checked with onnxruntime."""
    import onnxruntime as ort

    res = export_model(run2d, "onnx", tmp_path / "run.onnx")
    model, meta = load_run_model(run2d)
    assert not model.training
    x = _batch(meta, n=2)
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, _torch_out(model, x), atol=ATOL, rtol=0)


def test_errors_name_the_path(run2d, tmp_path: Path):
    with pytest.raises(ModelError, match=r"no model/model\.json") as exc:
        export_model(tmp_path / "empty_run", "onnx", tmp_path / "x.onnx")
    assert "empty_run" in str(exc.value)
    with pytest.raises(ConfigError, match="torchscript, onnx, monai-bundle"):
        export_model(run2d, "tflite", tmp_path / "x")


def test_cli_export_model(run2d, tmp_path: Path):
    out = tmp_path / "cli.ts"
    r = runner.invoke(
        app, ["export-model", str(run2d), "--format", "torchscript", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert out.is_file() and "max |diff|" in r.output
    r = runner.invoke(app, ["export-model", str(tmp_path / "nope"), "-f", "onnx", "-o", str(out)])
    assert r.exit_code == 1
    assert "no model/model.json" in r.output and "Traceback" not in r.output
    r = runner.invoke(
        app, ["export-model", str(run2d), "-f", "onnx", "-o", str(out), "--input-size", "a,b"]
    )
    assert r.exit_code == 1 and "--input-size" in r.output
