"""ResNet zoo (2D/3D, MONAI), pretrained weights (ImageNet, inflated, MedicalNet, files) and
the model directory.

Modules: ``registry`` (architecture names, stem rule, reference costs), ``resnet`` (the
network), ``weights`` (the published checkpoints and their preprocessing), ``hub`` (cache,
download, mirrors, checksums), ``statedict`` (reading weight files without executing code),
``adapt`` (fitting pretrained tensors to a model), ``pretrained`` (``load_pretrained``),
``modeldir`` (the model directory and its typed ``ModelMeta``), ``catalog`` (``medres
models`` rows), ``export`` / ``export_formats`` / ``bundle`` (TorchScript, ONNX, MONAI
bundle). medres.models imports the core only (never train, score or evaluate).

Public API (imported lazily, so ``import medres.models`` does not import torch)::

    build_model(arch, dims, in_channels, num_classes, stem="auto", image_size=None) -> nn.Module
    load_pretrained(model, source, *, arch=None, dims=None, inflate="i3d") -> LoadReport
    weights_meta(source, arch, in_channels=None) -> dict
    backbone_parameters(model), head_parameters(model), set_backbone_trainable(model, bool)
    param_groups(model, lr, *, backbone_lr_scale=0.1, weight_decay=0.0) -> list[dict]
    ModelMeta (model.json), ModelMeta.for_model(model, **fields), read_model_meta(path)
    save_model_dir(path, model, meta: ModelMeta) -> Path
    load_model_dir(path, device="cpu") -> (model, ModelMeta)
    read_state_dict(path) -> dict[str, Tensor]     (safe: never executes pickled code)
    list_archs(), get_arch(name), resolve_stem(stem, image_size), available_weights(arch, dims)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_model": "medres.models.resnet",
    "MedresResNet": "medres.models.resnet",
    "ModelConfig": "medres.models.resnet",
    "model_config": "medres.models.resnet",
    "backbone_parameters": "medres.models.resnet",
    "head_parameters": "medres.models.resnet",
    "set_backbone_trainable": "medres.models.resnet",
    "param_groups": "medres.models.resnet",
    "count_cost": "medres.models.resnet",
    "load_pretrained": "medres.models.pretrained",
    "LoadReport": "medres.models.pretrained",
    "weights_meta": "medres.models.weights",
    "available_weights": "medres.models.weights",
    "fetch_weights": "medres.models.hub",
    "cache_dir": "medres.models.hub",
    "ModelMeta": "medres.models.modeldir",
    "read_model_meta": "medres.models.modeldir",
    "save_model_dir": "medres.models.modeldir",
    "load_model_dir": "medres.models.modeldir",
    "read_model_json": "medres.models.modeldir",
    "read_state_dict": "medres.models.statedict",
    "list_archs": "medres.models.registry",
    "get_arch": "medres.models.registry",
    "resolve_stem": "medres.models.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medres.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
