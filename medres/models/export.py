"""Model export: a trained run's model to TorchScript, ONNX or a MONAI bundle, by name.

Formats are chosen by name from :data:`MODEL_EXPORTERS`; the exporters live in
:mod:`medres.models.export_formats` (TorchScript, ONNX) and :mod:`medres.models.bundle`
(MONAI bundle). Every export is reloaded and its outputs on a random batch of two are
compared with the PyTorch model's; a difference above :data:`ATOL` (1e-4) raises
:class:`ModelError`.

Choices made here:

* **Input.** The model is exported for inputs ``(N, in_channels, *image_size)`` where
  ``image_size`` comes from ``model.json`` ``preprocessing`` (the first of ``image_size``,
  ``spatial_size``, ``roi_size``, ``input_size``, ``size``), or from ``input_size=``.
  The inputs are the *preprocessed* tensors (after the saved transforms), float32.
* **Output.** The raw network output, ``(N, num_classes)`` logits, named ``logits``;
  apply softmax (binary/multiclass) or sigmoid (multilabel) as ``model.json`` ``task`` says.
  The export keeps the model in eval mode (batch-norm running statistics).

Owns the exporter registry, the run-dir lookup and the input shape. Imports core and
medres.models only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medres.errors import ConfigError, ModelError
from medres.io import check_output_dir, disk_guard
from medres.models.bundle import export_monai_bundle, monai_resnet_args, verify_monai_bundle
from medres.models.export_formats import (
    ATOL,
    ONNX_OPSET,
    ModelExportResult,
    export_onnx,
    export_torchscript,
    find_key,
)
from medres.models.modeldir import ModelMeta

SIZE_KEYS = ("image_size", "spatial_size", "roi_size", "input_size", "size")


# --- loading the run's model -------------------------------------------------------------
def find_model_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``RUN_DIR/model`` (or ``RUN_DIR`` itself when it is a model dir)."""
    p = Path(run_dir)
    for cand in (p / "model", p):
        if (cand / "model.json").is_file():
            return cand
    raise ModelError(
        f"{p}: no model/model.json found; pass a run dir written by `medres train` "
        "(it holds model/) or its model/ folder"
    )


def load_run_model(run_dir: str | os.PathLike[str]) -> tuple[Any, ModelMeta]:
    """Load the trained model (eval mode, CPU) and its ``model.json`` from a run dir."""
    from medres.models.modeldir import load_model_dir

    model, meta = load_model_dir(find_model_dir(run_dir), device="cpu")
    model.eval()
    return model, meta


# --- sample input ------------------------------------------------------------------------
def input_shape(
    meta: ModelMeta, input_size: Sequence[int] | None = None, batch: int = 1
) -> tuple[int, ...]:
    """``(batch, in_channels, *spatial)`` for the model of ``meta``; see the module docs."""
    dims = meta.dims
    chans = meta.in_channels
    size: Any = list(input_size) if input_size else None
    pre = meta.preprocessing
    for key in SIZE_KEYS:
        if size is not None:
            break
        size = find_key(pre, key)
    if size is None:
        raise ModelError(
            "model.json preprocessing has no image size; pass --input-size N[,N[,N]] "
            "(the size the model was trained at)"
        )
    spatial = [int(size)] * dims if isinstance(size, (int, float)) else [int(s) for s in size]
    if len(spatial) == 1:
        spatial = spatial * dims
    if len(spatial) != dims or any(s < 1 for s in spatial):
        raise ConfigError(
            f"input size {spatial} does not fit a {dims}D model; give {dims} positive sizes"
        )
    return (batch, chans, *spatial)


# --- registry ----------------------------------------------------------------------------
MODEL_EXPORTERS: dict[str, Callable[..., ModelExportResult]] = {
    "torchscript": export_torchscript,
    "onnx": export_onnx,
    "monai-bundle": export_monai_bundle,
}


def export_model(
    run_dir: str | os.PathLike[str],
    fmt: str,
    out: str | os.PathLike[str],
    *,
    input_size: Sequence[int] | None = None,
) -> ModelExportResult:
    """Export the model of ``run_dir`` as ``fmt`` (a name in :data:`MODEL_EXPORTERS`)."""
    if fmt not in MODEL_EXPORTERS:
        raise ConfigError(
            f"unknown model export format {fmt!r}; choose one of {', '.join(MODEL_EXPORTERS)}"
        )
    model, meta = load_run_model(run_dir)
    shape = input_shape(meta, input_size)
    target = Path(out)  # torchscript/onnx: a file or a folder; a bundle: a folder
    bundle = fmt not in ("torchscript", "onnx")
    folder = target if bundle or target.is_dir() or not target.suffix else target.parent
    check_output_dir(folder)  # a file / below a file / read-only: one line
    need = 4 * sum(p.numel() for p in model.parameters())  # float32 weights, about
    with disk_guard(folder, need):
        return MODEL_EXPORTERS[fmt](model, meta, out, shape)


__all__ = [
    "ATOL",
    "MODEL_EXPORTERS",
    "ONNX_OPSET",
    "SIZE_KEYS",
    "ModelExportResult",
    "export_model",
    "export_monai_bundle",
    "export_onnx",
    "export_torchscript",
    "find_model_dir",
    "input_shape",
    "load_run_model",
    "monai_resnet_args",
    "verify_monai_bundle",
]
