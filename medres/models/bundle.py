"""The MONAI bundle exporter: a trained model as a folder ``monai.bundle`` can load and run.

Layout: ``configs/metadata.json`` (MONAI's metadata schema fields,
``network_data_format`` for ``image`` and ``pred``, and the full ``model.json`` under
``medres``), ``configs/inference.json`` (MONAI's standard evaluator layout:
``network_def``, checkpoint loading, preprocessing through
``medres.train.transforms.build_transforms`` with the saved spec read from the metadata,
softmax/sigmoid post-processing, a ``ClassificationSaver`` writing
``eval/predictions.csv``, over the NIfTI files in ``dataset_dir``; its ``dataset``,
``network`` and ``postprocessing`` reproduce medres's own predictions, and running the
evaluator needs pytorch-ignite), ``models/model.pt`` (state dict) and ``models/model.ts``
(TorchScript with the metadata embedded, for ``monai.bundle.load(...,
load_ts_module=True)``), ``docs/README.md``. ``network_def`` is a plain
``monai.networks.nets.ResNet`` whenever the model is one (its arguments are read off the
module and checked by rebuilding it and loading the weights strictly), so the bundle's
network needs only MONAI; otherwise it falls back to ``medres.models.build_model``.

The bundle is reloaded through ``monai.bundle`` and compared with the PyTorch model
(:func:`verify_monai_bundle`) before the export is reported done.

Owns the bundle layout. Imports core, :mod:`medres.models.modeldir` and
:mod:`medres.models.export_formats`; torch and monai lazily. The inference config names
``medres.train.transforms`` as a string for MONAI to import at run time; this module does
not import it.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medres import __version__
from medres.errors import ConfigError, ModelError
from medres.models.export_formats import (
    ModelExportResult,
    check_outputs,
    find_key,
    reference_outputs,
    save_torchscript,
    trace,
)
from medres.models.modeldir import ModelMeta

log = logging.getLogger(__name__)

METADATA_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
    "0.8.1/meta_schema_20240725.json"
)


def monai_resnet_args(model: Any) -> dict[str, Any] | None:
    """Constructor arguments of a plain ``monai.networks.nets.ResNet``, read off the module.

    Returns None when ``model`` is not a MONAI ResNet (or subclass) with batch norm, ReLU
    and a linear head. A subclass may change ``forward``, so the caller checks that the
    rebuilt network gives the same outputs before using these arguments.
    """
    import torch.nn as nn
    from monai.networks.nets import ResNet
    from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

    if not isinstance(model, ResNet) or not isinstance(model.fc, nn.Linear):
        return None
    if not isinstance(model.act, nn.ReLU) or not isinstance(
        model.bn1, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    ):
        return None
    first = model.layer1[0]
    if isinstance(first, ResNetBottleneck):
        block, expansion = "bottleneck", ResNetBottleneck.expansion
    elif isinstance(first, ResNetBlock):
        block, expansion = "basic", ResNetBlock.expansion
    else:
        return None
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]
    inplanes = [int(layer[0].conv1.out_channels) for layer in layers]
    shortcut = "B"
    for layer in layers:
        ds = getattr(layer[0], "downsample", None)
        if ds is not None and not isinstance(ds, nn.Sequential):
            shortcut = "A"
    if model.fc.in_features != inplanes[3] * expansion:
        return None
    conv1 = model.conv1
    return {
        "_target_": "monai.networks.nets.ResNet",
        "block": block,
        "layers": [len(layer) for layer in layers],
        "block_inplanes": inplanes,
        "spatial_dims": conv1.weight.ndim - 2,
        "n_input_channels": int(conv1.in_channels),
        "conv1_t_size": [int(k) for k in conv1.kernel_size],
        "conv1_t_stride": [int(s) for s in conv1.stride],
        "no_max_pool": bool(model.no_max_pool),
        "shortcut_type": shortcut,
        "num_classes": int(model.fc.out_features),
        "bias_downsample": bool(model.bias_downsample),
    }


def _medres_network_def(meta: ModelMeta, shape: Sequence[int]) -> dict[str, Any]:
    return {
        "_target_": "medres.models.build_model",
        "arch": meta.arch,
        "dims": meta.dims,
        "in_channels": meta.in_channels,
        "num_classes": meta.num_classes,
        "stem": meta.stem,
        "image_size": list(shape[2:]),
        "ensemble": meta.ensemble,
        "tta_flips": list(meta.tta_flips),
    }


def _network_def(model: Any, meta: ModelMeta, shape: Sequence[int]) -> dict[str, Any]:
    """A ``network_def`` that rebuilds ``model`` and takes its state dict strictly."""
    from monai.bundle import ConfigParser

    candidates = []
    args = monai_resnet_args(model)
    if args is not None:
        candidates.append(args)
    candidates.append(_medres_network_def(meta, shape))
    import torch

    state = model.state_dict()
    x, ref = reference_outputs(model, (2, *shape[1:]), seed=2)
    for cand in candidates:
        try:
            net = ConfigParser({"network_def": cand}).get_parsed_content("network_def")
            net.load_state_dict(state, strict=True)
            net.eval()
            with torch.no_grad():
                check_outputs(cand["_target_"], ref, net(x))
            return cand
        except Exception as exc:  # try the next description
            log.debug("network_def %s does not rebuild the model: %s", cand["_target_"], exc)
    raise ModelError(
        f"cannot describe model {type(model).__name__} as a bundle network_def; "
        "export --format torchscript or onnx instead"
    )


def _io_format(meta: ModelMeta, shape: Sequence[int]) -> dict[str, Any]:
    classes = list(meta.classes) or [str(i) for i in range(meta.num_classes)]
    if len(classes) != meta.num_classes:
        classes = [str(i) for i in range(meta.num_classes)]
    pre = meta.preprocessing
    vrange = find_key(pre, "value_range") or find_key(pre, "range")
    chans = meta.in_channels
    return {
        "inputs": {
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": str(find_key(pre, "modality") or "unknown"),
                "num_channels": chans,
                "spatial_shape": [int(s) for s in shape[2:]],
                "dtype": "float32",
                "value_range": list(vrange) if isinstance(vrange, (list, tuple)) else [],
                "is_patch_data": False,
                "channel_def": {str(i): f"channel{i}" for i in range(chans)}
                if chans > 1
                else {"0": "image"},
            }
        },
        "outputs": {
            "pred": {
                "type": "probabilities",
                "format": "classes",
                "num_channels": len(classes),
                "spatial_shape": [1, len(classes)],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": False,
                "channel_def": {str(i): c for i, c in enumerate(classes)},
            }
        },
    }


def bundle_metadata(meta: ModelMeta, shape: Sequence[int], name: str) -> dict[str, Any]:
    """``configs/metadata.json`` in MONAI's bundle metadata schema (see module docs)."""
    import monai
    import numpy
    import torch

    task = meta.task or "multiclass"
    return {
        "schema": METADATA_SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medres {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"medres": __version__},
        "name": name,
        "task": f"{meta.arch} {meta.dims}D image classification ({task})",
        "description": (
            "Exported from a medres run. Inputs are images after medres preprocessing "
            "(configs/inference.json builds it with medres.train.transforms); outputs are logits, "
            "turned into probabilities by the post-processing (softmax, or sigmoid for "
            "multi-label). Research use; validate before any clinical use."
        ),
        "authors": "medres export",
        "copyright": "Copyright the model's authors",
        "data_type": "nibabel",
        "image_classes": f"{shape[1]} channel image(s), {len(shape) - 2}D",
        "pred_classes": ", ".join(meta.classes),
        "intended_use": "Research only; not validated for clinical use",
        "network_data_format": _io_format(meta, shape),
        "medres": meta.to_json(),
    }


def bundle_inference(
    meta: ModelMeta, network_def: dict[str, Any], shape: Sequence[int]
) -> dict[str, Any]:
    """``configs/inference.json``: MONAI's standard evaluator workflow around the model.

    Preprocessing replays medres's saved spec (``medres.train.transforms.build_transforms``,
    ``train=False``), so running it needs medres (and pytorch-ignite for the evaluator).
    """
    multilabel = meta.task == "multilabel"
    activation = {"sigmoid": True} if multilabel else {"softmax": True}
    return {
        "imports": ["$import glob", "$import os", "$import medres.train.transforms"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": "/workspace/data",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii*')))",
        "classes": list(meta.classes),
        "image_channels": meta.in_channels,
        "medres_preprocessing": "@_meta_#medres#preprocessing",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "medres.train.transforms.build_transforms",
            "preprocessing": "@medres_preprocessing",
            "train": False,
        },
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i, 'image_path': i, 'channels': @image_channels} "
            "for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", **activation}],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "@ckpt_path",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            {
                "_target_": "ClassificationSaver",
                "output_dir": "@output_dir",
                "batch_transform": "$lambda x: [{'filename_or_obj': xx['image_path']} for xx in x]",
                "output_transform": "$lambda x: [xx['pred'] for xx in x]",
            },
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": [],
        "run": ["$@evaluator.run()"],
    }


_BUNDLE_README = """# {name}

A MONAI bundle exported by medres {version} from a trained run.

* `models/model.pt`: state dict for `network_def` in `configs/inference.json`.
* `models/model.ts`: TorchScript with `metadata.json` embedded
  (`monai.bundle.load(name, bundle_dir=..., load_ts_module=True)`).
* `configs/metadata.json`: input `{shape}` (N, C, spatial...) after medres preprocessing,
  output `pred` = logits for classes {classes}; the medres `model.json` is under `medres`.

Run inference over a folder of NIfTI files written by `medres ingest` (needs medres and
pytorch-ignite); probabilities go to `eval/predictions.csv`:

```
python -m monai.bundle run --config_file configs/inference.json \\
    --meta_file configs/metadata.json --bundle_root . --dataset_dir /path/to/images
```

Add `--image_channels N` when the files hold N channels (default: the model's input
channels).
"""


def export_monai_bundle(
    model: Any, meta: ModelMeta, out: str | os.PathLike[str], shape: Sequence[int]
) -> ModelExportResult:
    """Write a MONAI bundle folder at ``out`` (see module docs) and check it reloads."""
    import torch

    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: exists and is not a folder; choose a folder for --out")
    if root.is_dir() and any(root.iterdir()) and not (root / "configs" / "metadata.json").is_file():
        raise ConfigError(
            f"{root}: folder is not empty and is not a bundle; choose an empty or new folder"
        )
    from medres.io import atomic_write_json, atomic_write_text

    network_def = _network_def(model, meta, shape)
    metadata = bundle_metadata(meta, shape, root.name)
    inference = bundle_inference(meta, network_def, shape)
    (root / "models").mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "configs" / "metadata.json", metadata)
    atomic_write_json(root / "configs" / "inference.json", inference)
    pt = root / "models" / "model.pt"
    tmp = pt.with_name(".model.pt.tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, pt)
    ts = root / "models" / "model.ts"
    save_torchscript(trace(model, shape), ts, {"metadata.json": json.dumps(metadata)})
    readme = _BUNDLE_README.format(
        name=root.name, version=__version__, shape=list(shape), classes=list(meta.classes)
    )
    atomic_write_text(root / "docs" / "README.md", readme)
    diff = verify_monai_bundle(root, model)
    log.info("wrote MONAI bundle %s (max |diff| %.2e)", root, diff)
    files = tuple(
        root / p
        for p in (
            "configs/metadata.json",
            "configs/inference.json",
            "models/model.pt",
            "models/model.ts",
            "docs/README.md",
        )
    )
    return ModelExportResult("monai-bundle", root, tuple(shape), diff, files)


def verify_monai_bundle(bundle: str | os.PathLike[str], model: Any) -> float:
    """Reload ``bundle`` through ``monai.bundle`` and compare with ``model``; max |diff|.

    Checks: ``ConfigParser`` reads metadata + inference config and builds ``network_def``;
    ``monai.bundle.load`` fills it from ``models/model.pt`` and, with
    ``load_ts_module=True``, loads ``models/model.ts`` with its embedded metadata; the
    metadata's input shape feeds both.
    """
    import torch
    from monai.bundle import ConfigParser, load

    root = Path(bundle).resolve()
    parser = ConfigParser()
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser.read_config(str(root / "configs" / "inference.json"))
    fmt = parser["_meta_#network_data_format#inputs#image"]
    shape = (2, int(fmt["num_channels"]), *[int(s) for s in fmt["spatial_shape"]])
    net = parser.get_parsed_content("network_def")
    # monai logs "'dst' model updated" at INFO on its own handler; keep the console clean
    monai_log = logging.getLogger("monai.networks.utils")
    level = monai_log.level
    monai_log.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = load(name=root.name, bundle_dir=str(root.parent), model=net, device="cpu")
            ts_net, ts_meta, _ = load(
                name=root.name, bundle_dir=str(root.parent), load_ts_module=True, device="cpu"
            )
    finally:
        monai_log.setLevel(level)
    net.eval()
    if ts_meta.get("medres", {}).get("num_classes") != parser["_meta_#medres#num_classes"]:
        raise ModelError(f"{root}/models/model.ts: embedded metadata does not match metadata.json")
    x, ref = reference_outputs(model, shape)
    with torch.no_grad():
        d1 = check_outputs(f"{root}/models/model.pt", ref, net(x))
        d2 = check_outputs(f"{root}/models/model.ts", ref, ts_net(x))
    return max(d1, d2)
