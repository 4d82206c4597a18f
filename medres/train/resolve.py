"""Spec resolution: a pipeline spec + the manifest -> a fully resolved spec.

Owns the range checks of the spec and every automatic choice made from the manifest
(each logged or documented with its reason): task and classes (via
:func:`medres.train.data.resolve_labels`), 2D vs 3D, input channels, image size, the
intensity method per modality, the mean/std of the pretrained weights and the slice mode
of a 2D network on 3D images. Imports ``medres.train.spec``/``data``/``transforms``,
``medres.models`` (weights metadata, stems), ``medres.runtime`` and core only.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from medres.dataset.manifest import Manifest
from medres.errors import ConfigError
from medres.train.spec import PipelineSpec

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SIZE", "build_spec", "check_ranges", "resolve_spec"]

# automatic image-size caps (2D, 3D): small on CPU so the defaults train in minutes
DEFAULT_SIZE = {"cpu": {2: 64, 3: 48}, "cuda": {2: 224, 3: 96}}


def build_spec(
    pipeline: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None
) -> PipelineSpec:
    """Load the pipeline YAML (or the defaults) and apply ``{"section.field": value}`` overrides."""
    from medres.train.spec import apply_overrides, load_pipeline

    spec = load_pipeline(pipeline) if pipeline else PipelineSpec()
    return apply_overrides(spec, overrides or {})


def _majority(values: list[str], default: str) -> str:
    vals = [v for v in values if v]
    return Counter(vals).most_common(1)[0][0] if vals else default


def _image_dims(rows: list[dict[str, str]]) -> int:
    dims = _majority([r.get("dims", "") for r in rows], "")
    if dims:
        return int(dims)
    shape = _majority([r.get("shape", "") for r in rows], "")
    return len(shape.split("x")) if shape else 2


def _median_shape(rows: list[dict[str, str]], n: int) -> list[int] | None:
    shapes = [
        [int(v) for v in r["shape"].split("x")]
        for r in rows
        if r.get("shape") and len(r["shape"].split("x")) >= n
    ]
    if not shapes:
        return None
    return [int(statistics.median(s[i] for s in shapes)) for i in range(n)]


def _auto_intensity(rows: list[dict[str, str]], weights_norm: str | None) -> str:
    """CT: HU window; MR: percentiles; others: z-score from scratch, [0, 1] for mean/std weights.

    Radiographs/US/SC trained from scratch get a per-image z-score: on the synthetic
    radiographs (300 patients, difficulty 0.5, ResNet-18 at 64 px, 12 epochs) it reached val
    AUC 0.97 where min-max ``range`` plateaued at 0.73 (same data, seed and augmentation).
    Weights that expect ``mean_std`` input (ImageNet) keep ``range`` then mean/std.
    """
    if weights_norm == "zscore_nonzero":
        return "zscore"
    modality = _majority([r.get("modality", "").upper() for r in rows], "")
    if modality in ("CT", "MR"):
        return "ct_window" if modality == "CT" else "percentile"
    return "range" if weights_norm == "mean_std" else "zscore"


# the largest values check_ranges accepts (an lr of 1e38 overflows AdamW's float32 step)
MAX_LR = 10.0
MAX_EPOCHS = 100_000


def check_ranges(spec: PipelineSpec) -> None:
    """Raise ConfigError naming the first field whose value is out of range."""
    t = spec.train
    checks = [
        # upper bounds: absurd values stop here with one line, not in the optimizer (#16)
        (1 <= t.epochs <= MAX_EPOCHS, "train.epochs", f"between 1 and {MAX_EPOCHS}"),
        (t.batch_size >= 1, "train.batch_size", "at least 1"),
        (0 < t.lr <= MAX_LR, "train.lr", f"a finite positive number at most {MAX_LR:g} (e.g. 0.001)"),
        (-(2**63) <= t.seed < 2**63, "train.seed", "an integer within +-2**63"),
        (t.weight_decay >= 0 and math.isfinite(t.weight_decay), "train.weight_decay", "0 or a finite positive number"),
        (t.grad_accum >= 1, "train.grad_accum", "at least 1"),
        (t.grad_clip >= 0 and math.isfinite(t.grad_clip), "train.grad_clip", "0 (off) or a finite positive number"),
        (0 <= t.label_smoothing < 1, "train.label_smoothing", "in [0, 1)"),
        (t.warmup_epochs >= 0 and math.isfinite(t.warmup_epochs), "train.warmup_epochs", "0 or a finite positive number"),
        (t.early_stopping >= 0, "train.early_stopping", "0 (off) or positive"),
        (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "train.device", "auto, cpu or cuda"),
        (spec.data.workers >= 0, "data.workers", "0 or positive"),
        (spec.data.balance in ("none", "sampler", "weights"), "data.balance", "none, sampler or weights"),
        (spec.data.cache in ("none", "memory", "disk"), "data.cache", "none, memory or disk"),
        (spec.model.channels_last in ("auto", "on", "off"), "model.channels_last", "auto, on or off"),
        (spec.model.freeze_backbone_epochs >= 0, "model.freeze_backbone_epochs", "0 or positive"),
        (spec.model.backbone_lr_mult > 0 and math.isfinite(spec.model.backbone_lr_mult), "model.backbone_lr_mult", "a finite positive number"),
        (spec.eval.metric in ("auc", "loss"), "eval.metric", "auc or loss"),
        (spec.eval.batch_size >= 0, "eval.batch_size", "0 (= train.batch_size) or positive"),
    ]  # fmt: skip
    for ok, name, want in checks:
        if not ok:
            section, _, fld = name.partition(".")
            value = getattr(getattr(spec, section), fld)
            raise ConfigError(
                f"{name} is {value!r}; it must be {want} (pipeline YAML or --set {name}=...)"
            )


def _resolve_dims(spec: PipelineSpec, img_dims: int, manifest: Manifest) -> tuple[int, str]:
    """(network dims, slice mode): explicit dims win; a 2D net on 3D images takes the centre."""
    m, t = spec.model, spec.transforms
    dims = m.dims or t.dims or img_dims
    if dims not in (2, 3):
        raise ConfigError(f"model.dims is {dims}; use 2 or 3")
    if t.dims and t.dims != dims:
        raise ConfigError(
            f"transforms.dims {t.dims} contradicts model.dims {dims}; set only model.dims"
        )
    if dims == 3 and img_dims == 2:
        raise ConfigError(
            f"model.dims is 3 but {Path(manifest.path).name} holds 2D images; use --dims 2"
        )
    slice_mode = t.slice_mode
    if dims == 2 and img_dims == 3 and slice_mode == "none":
        slice_mode = "center"
        log.info("2D network on 3D images: using the centre slice (transforms.slice_mode)")
    return dims, slice_mode


def _on_cuda(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def _resolve_size(
    spec: PipelineSpec, rows: list[dict[str, str]], dims: int, img_dims: int
) -> tuple[int, ...]:
    """The given size (one value = isotropic), else the median shape capped per device."""
    t = spec.transforms
    size = tuple(t.image_size)
    if len(size) == 1:
        size = size * dims
    if size:
        return tuple(int(s) for s in size)
    if img_dims == dims:
        med = _median_shape(rows, dims)
    else:  # 2D slices out of 3D volumes: the in-plane axes
        med3 = _median_shape(rows, 3)
        med = [s for i, s in enumerate(med3) if i != t.slice_axis] if med3 else None
    cap = DEFAULT_SIZE["cuda" if _on_cuda(spec.train.device) else "cpu"][dims]
    return tuple(int(min(cap, s)) for s in med) if med else (cap,) * dims


def resolve_spec(spec: PipelineSpec, manifest: Manifest) -> tuple[PipelineSpec, Any]:
    """Fill every auto field from the manifest; returns (resolved spec, LabelInfo)."""
    from medres.models import resolve_stem, weights_meta
    from medres.train.data import resolve_labels
    from medres.train.transforms import resolve_volume, transform_spec_from

    check_ranges(spec)
    labels = resolve_labels(manifest, spec.data)
    train_rows = manifest.select(spec.data.train_split) or manifest.rows
    img_dims = _image_dims(train_rows)
    m, t = spec.model, spec.transforms
    dims, slice_mode = _resolve_dims(spec, img_dims, manifest)
    channels = int(_majority([r.get("channels", "") for r in train_rows], "1"))
    volume, channels = resolve_volume(manifest.rows, t, channels)  # 4D: transforms.volume
    in_ch = m.in_channels or t.in_channels or channels
    wmeta = weights_meta(m.weights, m.arch, in_channels=in_ch)
    size = _resolve_size(spec, train_rows, dims, img_dims)
    mean, std = tuple(t.mean), tuple(t.std)
    if not mean and wmeta.get("normalization") == "mean_std" and wmeta.get("mean"):
        mean, std = tuple(wmeta["mean"]), tuple(wmeta["std"])
    intensity = (
        t.intensity
        if t.intensity != "auto"
        else _auto_intensity(train_rows, wmeta.get("normalization"))
    )
    resolved = replace(
        spec,
        data=replace(
            spec.data,
            task=labels.task,
            label_columns=labels.label_columns,
            classes=labels.classes,
            positive_class=labels.positive_class,
        ),
        model=replace(m, dims=dims, in_channels=in_ch, stem=resolve_stem(m.stem, list(size))),
        transforms=replace(
            t,
            dims=dims,
            in_channels=in_ch,
            volume=volume,
            image_size=size,
            intensity=intensity,
            mean=mean,
            std=std,
            slice_mode=slice_mode,
        ),
        eval=replace(spec.eval, batch_size=spec.eval.batch_size or spec.train.batch_size),
    )
    transform_spec_from(resolved.transforms)  # validates
    return resolved, labels
