"""``load_pretrained``: put published or local weights into a medres model, adapting them.

The loader builds an adapted state dict key by key against the model's own state dict
(timm's ``load_pretrained`` approach): the first conv is adapted to the input channels,
the stem size and 2D/3D (:mod:`medres.models.adapt`); 2D kernels are inflated for 3D
models; a classifier with another number of classes is left at its initialisation (a new
head); MedicalNet's type-A shortcuts are written as identity projections; a shortcut
conv bias (MONAI's ``bias_downsample=True``) is folded into the BatchNorm after it. Everything it
adapted, left out or ignored is in the returned :class:`LoadReport` and in the log.

It refuses (``WeightsError``) what would silently build a different network: a backbone
tensor with another shape, backbone tensors the model lacks (a deeper file into a
shallower model) or backbone tensors missing from the file.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medres.errors import ModelError, WeightsError
from medres.models import adapt
from medres.models.modeldir import read_state_dict
from medres.models.resnet import model_config, unwrap
from medres.models.weights import (
    NAMED_SOURCES,
    canonical_source,
    fetch_weights,
    get_weight_spec,
    is_named_source,
    weights_meta,
)

log = logging.getLogger(__name__)

_BACKBONE_KEY = re.compile(r"^(conv1|bn1|layer\d+)\.")
_IGNORED_EXTRA = re.compile(r"^(conv_seg|fc)\.")  # MedicalNet's segmentation head; old heads
_MEDICALNET_NOTE = (
    "MedicalNet trained layer3/layer4 with stride 1 and dilation 2/4 for segmentation; "
    "medres uses stride 2 without dilation (as MONAI): the kernels transfer, the receptive "
    "fields differ"
)


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did; ``meta`` is :func:`weights_meta` of the source."""

    source: str
    file: str | None = None
    loaded: int = 0
    adapted: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    new_head: bool = False
    notes: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        if self.file is None:
            return f"weights: {self.source} (random initialisation)"
        parts = [f"{self.loaded} tensors from {Path(self.file).name}"]
        if self.adapted:
            parts.append(f"{len(self.adapted)} adapted")
        if self.new_head:
            parts.append("new classifier head")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} ignored")
        return f"weights: {self.source}: " + ", ".join(parts)


def load_pretrained(
    model: nn.Module,
    source: str,
    *,
    arch: str | None = None,
    dims: int | None = None,
    inflate: str = "i3d",
) -> LoadReport:
    """Load ``source`` (``imagenet``, ``imagenet-v2``, ``medicalnet``, ``none`` or a path) into ``model``.

    ``arch``/``dims`` are checked against the model when given. ``inflate`` (``"i3d"`` or
    ``"center"``) chooses how 2D kernels become 3D. A path may be a torchvision-style
    ``.pth`` (read with ``weights_only=True`` after a pickle scan), a ``.safetensors`` file
    or a medres model dir. Returns a :class:`LoadReport`; raises :class:`WeightsError`.
    """
    config = model_config(model)
    if arch is not None and arch.lower() != config.arch:
        raise ModelError(f"arch {arch!r} does not match the model ({config.arch}); build it again")
    if dims is not None and int(dims) != config.dims:
        raise ModelError(f"dims={dims} does not match the model ({config.dims}D); build it again")
    if inflate not in adapt.INFLATE_MODES:
        raise WeightsError(
            f"unknown inflation {inflate!r}: use one of {', '.join(adapt.INFLATE_MODES)}"
        )
    src = canonical_source(source)
    if src == "none":
        meta = weights_meta("none", config.arch, in_channels=config.in_channels)
        return LoadReport(source="none", meta=meta)
    notes: list[str] = []
    if is_named_source(src):
        spec = get_weight_spec(src, config.arch)
        if spec.dims == 3 and config.dims == 2:
            raise WeightsError(
                f"{spec.source} weights are 3D only: use --dims 3, or --weights imagenet for 2D"
            )
        path = fetch_weights(spec)
        if spec.source == "medicalnet":
            notes.append(_MEDICALNET_NOTE)
        label = src
    else:
        path = Path(source).expanduser()
        label = str(path)
        if not path.exists():
            raise WeightsError(
                f"--weights {source!r} is neither a known source ({', '.join(NAMED_SOURCES)}) "
                "nor an existing .pth/.safetensors file or medres model dir; fix the name or path"
            )
    state = read_state_dict(path)
    adapted, changes, new_head, folded = adapt_state_dict(
        state, unwrap(model), inflate=inflate, label=label
    )
    target = unwrap(model).state_dict()
    with torch.no_grad():
        result = unwrap(model).load_state_dict(adapted, strict=False)
    missing = tuple(k for k in result.missing_keys if not k.endswith("num_batches_tracked"))
    unexpected = tuple(sorted(k for k in state if k not in target and k not in folded))
    report = LoadReport(
        source=label,
        file=str(path),
        loaded=len(adapted),
        adapted=tuple(changes),
        missing=missing,
        unexpected=unexpected,
        new_head=new_head,
        notes=tuple(notes),
        meta=weights_meta(source, config.arch, in_channels=config.in_channels),
    )
    _log_report(report)
    return report


def adapt_state_dict(
    state: dict[str, torch.Tensor],
    model: nn.Module,
    *,
    inflate: str = "i3d",
    label: str = "weights",
) -> tuple[dict[str, torch.Tensor], list[str], bool, set[str]]:
    """(tensors to load, what was adapted, whether the head is new, source keys folded away)."""
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    changes: list[str] = []
    inflated = 0
    new_head = False
    for key, t in target.items():
        s = state.get(key)
        if s is None:
            continue
        if s.is_floating_point() and s.shape != t.shape:
            s = s.to(torch.float64)  # adapt in double, round once to the model's dtype
        if key == "conv1.weight":
            s, how = _adapt_stem(s, t, inflate, label)
            if how:
                changes.append(f"conv1.weight: {how}")
        elif s.ndim == 4 and t.ndim == 5:
            s = adapt.inflate_kernel(s, t.shape[2], inflate)
            inflated += 1
        if tuple(s.shape) != tuple(t.shape):
            if key.startswith("fc."):
                new_head = True
                continue
            raise WeightsError(
                f"{label}: tensor {key} has shape {tuple(s.shape)} but the model needs "
                f"{tuple(t.shape)}; the weights are for another architecture: pick the "
                "matching --arch"
            )
        out[key] = s.to(dtype=t.dtype)
    if inflated:
        changes.append(f"{inflated} kernels inflated to 3D ({inflate})")
    changes.extend(_fill_type_a_shortcuts(state, target, out))
    folded = _fold_shortcut_bias(state, target, out)
    if folded:
        changes.append(
            f"{len(folded)} shortcut conv biases folded into the following BatchNorm "
            "(running_mean -= bias: the same function in train and eval mode)"
        )
    if any(k.startswith("fc.") for k in target) and not any(k.startswith("fc.") for k in out):
        new_head = True
    lacking = [
        k
        for k in target
        if k not in out and _BACKBONE_KEY.match(k) and not k.endswith("num_batches_tracked")
    ]
    if lacking:
        raise WeightsError(
            f"{label} lacks {len(lacking)} backbone tensors of the model (e.g. {lacking[0]}); "
            "the weights are for another architecture: pick the matching --arch"
        )
    extra = [
        k for k in state if k not in target and k not in folded and not _IGNORED_EXTRA.match(k)
    ]
    extra_backbone = [k for k in extra if _BACKBONE_KEY.match(k)]
    if extra_backbone:
        raise WeightsError(
            f"{label} has {len(extra_backbone)} backbone tensors the model lacks (e.g. "
            f"{extra_backbone[0]}); the weights are for a deeper network: pick the matching --arch"
        )
    return out, changes, new_head, folded


def _adapt_stem(
    s: torch.Tensor, t: torch.Tensor, inflate: str, label: str
) -> tuple[torch.Tensor, str]:
    how: list[str] = []
    if s.ndim == 5 and t.ndim == 4:
        raise WeightsError(
            f"{label} holds 3D weights; they cannot initialise a 2D model: use --dims 3"
        )
    if s.shape[1] != t.shape[1]:
        how.append(f"{s.shape[1]}->{t.shape[1]} input channels")
        s = adapt.adapt_input_conv(s, t.shape[1])
    spatial = tuple(t.shape[3:]) if (s.ndim == 4 and t.ndim == 5) else tuple(t.shape[2:])
    if tuple(s.shape[2:]) != spatial:
        how.append(
            f"kernel {'x'.join(map(str, s.shape[2:]))} resized to {'x'.join(map(str, spatial))} "
            "for the small stem (area resampling, DC gain kept)"
        )
        s = adapt.resize_kernel(s, spatial)
    if s.ndim == 4 and t.ndim == 5:
        how.append(f"inflated to depth {t.shape[2]} ({inflate})")
        s = adapt.inflate_kernel(s, t.shape[2], inflate)
    return s, "; ".join(how)


def _fill_type_a_shortcuts(
    state: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    out: dict[str, torch.Tensor],
) -> list[str]:
    """Write identity projections where the file has a block but no shortcut tensors."""
    changes = []
    for stage in range(1, 5):
        prefix = f"layer{stage}.0.downsample."
        conv_key = prefix + "0.weight"
        if conv_key not in target or conv_key in state:
            continue
        if f"layer{stage}.0.conv1.weight" not in state:
            continue
        conv = target[conv_key]
        dims = conv.ndim - 2
        for k, v in adapt.identity_shortcut(conv.shape[1], conv.shape[0], dims).items():
            if prefix + k in target:
                out[prefix + k] = v.to(target[prefix + k].dtype)
        changes.append(
            f"{prefix}*: type-A shortcut ({conv.shape[1]}->{conv.shape[0]} channels) written "
            "as an identity projection"
        )
    return changes


def _fold_shortcut_bias(
    state: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    out: dict[str, torch.Tensor],
) -> set[str]:
    """Fold ``downsample.0.bias`` (MONAI's ``bias_downsample=True`` files) into the BN after it.

    BN(conv(x) + b) with running mean m equals BN(conv(x)) with running mean m - b, and in
    train mode the batch mean absorbs b; so the bias-free projection computes the same.
    """
    folded: set[str] = set()
    for key, bias in state.items():
        if not key.endswith("downsample.0.bias") or key in target:
            continue
        mean_key = key.removesuffix("0.bias") + "1.running_mean"
        if mean_key in out and out[mean_key].shape == bias.shape:
            out[mean_key] = (out[mean_key].to(torch.float64) - bias.to(torch.float64)).to(
                out[mean_key].dtype
            )
            folded.add(key)
    return folded


def _log_report(report: LoadReport) -> None:
    log.info(report.summary())
    for line in report.adapted:
        log.info("  adapted %s", line)
    for note in report.notes:
        log.info("  note: %s", note)
    if report.new_head:
        log.info("  classifier head (fc) initialised anew for this task")
    if report.missing:
        log.debug("  left at initialisation: %s", ", ".join(report.missing))
    if report.unexpected:
        log.info(
            "  ignored %d tensors the model has no use for (e.g. %s)",
            len(report.unexpected),
            report.unexpected[0],
        )
