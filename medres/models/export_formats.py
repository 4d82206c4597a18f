"""TorchScript and ONNX exporters, and the reload check every exporter uses.

Every export is checked before it is reported done: the file is reloaded
(``torch.jit.load``, ``onnxruntime``) and its outputs on a random batch of two are compared
with the PyTorch model's; a difference above :data:`ATOL` (1e-4) raises
:class:`ModelError`.

* **TorchScript** uses ``torch.jit.trace`` (ResNets have no data-dependent control flow)
  and embeds ``model.json`` as the extra file ``model.json``.
* **ONNX** uses the TorchScript-based exporter (``dynamo=False``), which needs no
  ``onnxscript``, at opset :data:`ONNX_OPSET`, with a dynamic batch axis (``batch``) on
  the input ``image`` and the output ``logits``; ``model.json`` goes into the model's
  ``metadata_props``.

Owns the two file formats and the helpers :mod:`medres.models.bundle` shares
(:func:`reference_outputs`, :func:`check_outputs`, :func:`trace`, :func:`save_torchscript`,
:func:`find_key`). Imports core and :mod:`medres.models.modeldir`; torch, onnx and
onnxruntime lazily.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medres import __version__
from medres.errors import ConfigError, ModelError
from medres.models.modeldir import ModelMeta

log = logging.getLogger(__name__)

ATOL = 1e-4
ONNX_OPSET = 17


@dataclass(frozen=True)
class ModelExportResult:
    """Summary of one model export and of its reload check."""

    format: str
    path: Path
    input_shape: tuple[int, ...]
    max_abs_diff: float
    files: tuple[Path, ...] = field(default_factory=tuple)


# --- shared helpers ----------------------------------------------------------------------
def find_key(obj: Any, key: str) -> Any:
    """First value of ``key`` in a nested dict/list (the preprocessing spec)."""
    if isinstance(obj, Mapping):
        if obj.get(key) not in (None, "", []):
            return obj[key]
        for v in obj.values():
            found = find_key(v, key)
            if found is not None:
                return found
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            found = find_key(v, key)
            if found is not None:
                return found
    return None


def reference_outputs(model: Any, shape: Sequence[int], seed: int = 0) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    with torch.no_grad():
        y = model(x)
    return x, y


def check_outputs(name: str, ref: Any, got: Any) -> float:
    import numpy as np

    ref_np = np.asarray(ref.detach().cpu().numpy() if hasattr(ref, "detach") else ref)
    got_np = np.asarray(got.detach().cpu().numpy() if hasattr(got, "detach") else got)
    if ref_np.shape != got_np.shape:
        raise ModelError(
            f"{name}: reloaded output shape {got_np.shape} != {ref_np.shape}; "
            "report this with the model.json"
        )
    diff = float(np.max(np.abs(ref_np - got_np))) if ref_np.size else 0.0
    if not diff <= ATOL:
        raise ModelError(
            f"{name}: reloaded outputs differ from PyTorch by {diff:.2e} (> {ATOL:g}); "
            "the export is not faithful, report it with the model.json"
        )
    return diff


def trace(model: Any, shape: Sequence[int]) -> Any:
    import torch

    x, _ = reference_outputs(model, shape, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices
        with torch.no_grad():
            return torch.jit.trace(model, x, check_trace=False)


def export_torchscript(
    model: Any, meta: ModelMeta, out: str | os.PathLike[str], shape: Sequence[int]
) -> ModelExportResult:
    """Trace ``model`` to ``out`` (``.ts``/``.pt``; a folder gets ``model.ts``) and check it."""
    import torch

    path = _file_out(out, "model.ts")
    traced = trace(model, shape)
    save_torchscript(traced, path, {"model.json": json.dumps(meta.to_json())})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
    x, ref = reference_outputs(model, (2, *shape[1:]))
    with torch.no_grad():
        diff = check_outputs(str(path), ref, loaded(x))
    log.info("wrote %s (max |diff| %.2e)", path, diff)
    return ModelExportResult("torchscript", path, tuple(shape), diff, (path,))


def save_torchscript(traced: Any, path: Path, extra: dict[str, str]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(traced, str(tmp), _extra_files=extra)
    os.replace(tmp, path)


def _file_out(out: str | os.PathLike[str], default_name: str) -> Path:
    p = Path(out)
    if p.is_dir() or not p.suffix:
        return p / default_name
    return p


# --- ONNX --------------------------------------------------------------------------------
def export_onnx(
    model: Any, meta: ModelMeta, out: str | os.PathLike[str], shape: Sequence[int]
) -> ModelExportResult:
    """Export ``model`` to ONNX at ``out`` (a folder gets ``model.onnx``) and check it."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(
            "ONNX export needs onnx and onnxruntime; install them with "
            "`pip install 'medres[export]'`"
        ) from None
    import torch

    path = _file_out(out, "model.onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    x, _ = reference_outputs(model, shape, seed=1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(tmp),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
        )
    proto = onnx.load(str(tmp))
    onnx.helper.set_model_props(
        proto, {"medres_model_json": json.dumps(meta.to_json()), "medres_version": __version__}
    )
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xb, ref = reference_outputs(model, (2, *shape[1:]))
    got = sess.run(["logits"], {"image": xb.numpy()})[0]
    diff = check_outputs(str(path), ref, got)
    log.info("wrote %s (max |diff| %.2e)", path, diff)
    return ModelExportResult("onnx", path, tuple(shape), diff, (path,))
