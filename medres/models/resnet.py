"""2D/3D ResNets on MONAI's ``ResNet``, built to match torchvision's architecture exactly.

Choices made here:

* **torchvision's network in 2D.** ``conv1`` is 7x7 stride 2 (MONAI's default stride is
  1), then a 3x3 stride-2 max-pool; projection shortcuts (MONAI ``shortcut_type="B"``)
  without bias (``bias_downsample=False``); bottleneck stride on the 3x3 conv (v1.5).
  State-dict keys and shapes are torchvision's, so its ImageNet checkpoints load strictly.
* **The same stem in 3D** (7x7x7, stride 2 on every axis, then the max-pool). MONAI's
  default stride-1 stem costs 8x the FLOPs of every later layer in 3D.
* **Small stem** (``stem="small"``): 3x3(x3) stride 1 and no max-pool, for tiny inputs;
  see :func:`medres.models.registry.resolve_stem` for the ``"auto"`` rule.
* MedicalNet's type-A shortcuts (parameter-free, zero-padded identity) are not built; the
  loader maps them exactly onto projection shortcuts (see :mod:`medres.models.adapt`), so
  every model has the same trainable structure whatever its weights came from.
* The classifier is ``fc`` (keys ``fc.weight``/``fc.bias``); everything else is backbone.
  ``forward_features`` returns the pooled features; ``forward`` flattens with
  ``torch.flatten`` (channels-last safe).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from monai.networks.nets.resnet import ResNet
from torch import nn

from medres.errors import ModelError
from medres.models.registry import (
    REFERENCE_CLASSES,
    REFERENCE_INPUT,
    check_dims,
    get_arch,
    resolve_stem,
)
from medres.runtime import unwrap

log = logging.getLogger(__name__)

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's structure (written to ``model.json``)."""

    arch: str
    dims: int
    in_channels: int
    num_classes: int
    stem: str  # "standard" | "small" (never "auto": resolved at build time)
    ensemble: int = 1
    """Members whose logits are averaged (:class:`medres.models.ensemble.Ensemble`)."""
    tta_flips: tuple[int, ...] = ()
    """Spatial axes flipped at test time (every subset of them is averaged)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields; ``ensemble``/``tta_flips`` only when set (one network: as before)."""
        d = asdict(self)
        if d["ensemble"] == 1:
            del d["ensemble"]
        if not d["tta_flips"]:
            del d["tta_flips"]
        return d


class MedresResNet(ResNet):
    """MONAI ``ResNet`` plus medres' config, pooled-feature access and backbone freezing.

    When the backbone is frozen (:func:`set_backbone_trainable`), ``train()`` keeps the
    backbone's BatchNorm layers in eval mode, so a linear probe neither updates their
    running statistics nor normalizes with batch statistics.
    """

    def __init__(self, config: ModelConfig) -> None:
        spec = get_arch(config.arch)
        small = config.stem == "small"
        super().__init__(
            block=spec.block,
            layers=list(spec.layers),
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=config.dims,
            n_input_channels=config.in_channels,
            conv1_t_size=3 if small else 7,
            conv1_t_stride=1 if small else 2,
            no_max_pool=small,
            shortcut_type="B",
            num_classes=config.num_classes,
            bias_downsample=False,
        )
        self.config = config
        self.backbone_frozen = False

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (``layer4`` output), shape (N, feature_dim, *h)."""
        x = self.act(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, shape (N, feature_dim)."""
        return torch.flatten(self.avgpool(self.forward_map(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

    def train(self, mode: bool = True) -> MedresResNet:
        super().train(mode)
        if mode and self.backbone_frozen:
            for name, module in self.named_modules():
                if isinstance(module, _NORM_TYPES) and not name.startswith("fc"):
                    module.eval()
        return self


def build_model(
    arch: str,
    dims: int,
    in_channels: int,
    num_classes: int,
    stem: str = "auto",
    image_size: int | Sequence[int] | None = None,
    ensemble: int = 1,
    tta_flips: Sequence[int] = (),
) -> nn.Module:
    """Build a randomly initialised ResNet (MONAI's Kaiming init).

    ``ensemble`` > 1 or a non-empty ``tta_flips`` gives an
    :class:`~medres.models.ensemble.Ensemble` of that many such networks (members seeded
    one after the other) that averages their logits over the flipped inputs; the defaults
    give a plain :class:`MedresResNet`. ``stem="auto"`` resolves to ``"small"`` when ``min(image_size) < 64`` (see
    :func:`medres.models.registry.resolve_stem`). Raises :class:`ModelError` for an unknown
    ``arch``, ``dims`` not in (2, 3) or non-positive channel/class counts.
    """
    spec = get_arch(arch)
    dims = check_dims(dims)
    if int(in_channels) < 1:
        raise ModelError(f"in_channels={in_channels!r} is invalid: give 1 or more channels")
    if int(num_classes) < 1:
        raise ModelError(f"num_classes={num_classes!r} is invalid: give 1 or more outputs")
    config = ModelConfig(
        arch=spec.name,
        dims=dims,
        in_channels=int(in_channels),
        num_classes=int(num_classes),
        stem=resolve_stem(stem, image_size),
    )
    if int(ensemble) != 1 or tuple(tta_flips):
        from medres.models.ensemble import Ensemble

        if int(ensemble) < 1:
            raise ModelError(f"ensemble={ensemble!r} is invalid: give 1 or more members")
        members = [MedresResNet(config) for _ in range(int(ensemble))]
        return Ensemble(members, tta_flips)
    log.debug("building %s", config)
    return MedresResNet(config)


def model_config(model: nn.Module) -> ModelConfig:
    """The :class:`ModelConfig` of a model built by :func:`build_model` (DDP unwrapped)."""
    core = unwrap(model)
    config = getattr(core, "config", None)
    if not isinstance(config, ModelConfig):
        raise ModelError(
            f"{type(core).__name__} was not built by medres.models.build_model; "
            "build it with build_model(arch, dims, in_channels, num_classes)"
        )
    return config


def _head(model: nn.Module) -> nn.Module:
    core = unwrap(model)
    head = getattr(core, "fc", None)
    if not isinstance(head, nn.Module):
        raise ModelError(f"{type(core).__name__} has no `fc` classifier head")
    return head


def head_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of the classifier head (``fc``)."""
    yield from _head(model).parameters()


def backbone_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every parameter that is not in the classifier head."""
    head_ids = {id(p) for p in _head(model).parameters()}
    for p in unwrap(model).parameters():
        if id(p) not in head_ids:
            yield p


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (``False``) or unfreeze (``True``) the backbone; the head stays trainable.

    Freezing sets ``requires_grad=False`` on backbone parameters and keeps backbone
    BatchNorm layers in eval mode while the model trains (linear probe). Unfreezing
    restores both. Optimizers built over all parameters keep working: frozen parameters
    simply get no gradient.
    """
    core = unwrap(model)
    params = list(backbone_parameters(core))
    changed = any(p.requires_grad != trainable for p in params)
    for p in params:
        p.requires_grad_(trainable)
    if hasattr(core, "backbone_frozen"):
        changed = changed or core.backbone_frozen == trainable
        core.backbone_frozen = not trainable
    core.train(core.training)
    if changed:  # called every epoch by schedules: log transitions only
        log.info("backbone %s", "trainable" if trainable else "frozen (linear probe)")


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    backbone_lr_scale: float = 0.1,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the backbone at ``lr * backbone_lr_scale``, the head at ``lr``.

    Biases and normalization parameters (tensors with one dimension) get no weight decay.
    Each group carries a ``name`` (``backbone``, ``backbone_no_decay``, ``head``,
    ``head_no_decay``) and ``lr_scale`` so schedulers can keep the ratio. Empty groups are
    left out.
    """
    groups: list[dict[str, Any]] = []
    for part, params, scale in (
        ("backbone", list(backbone_parameters(model)), backbone_lr_scale),
        ("head", list(head_parameters(model)), 1.0),
    ):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for suffix, ps, wd in (("", decay, weight_decay), ("_no_decay", no_decay, 0.0)):
            if ps:
                groups.append(
                    {
                        "name": part + suffix,
                        "params": ps,
                        "lr": lr * scale,
                        "lr_scale": scale,
                        "weight_decay": wd,
                    }
                )
    return groups


def count_cost(
    arch: str,
    dims: int,
    size: int | None = None,
    in_channels: int | None = None,
    num_classes: int = REFERENCE_CLASSES,
    stem: str = "standard",
) -> tuple[int, float]:
    """(parameters, GFLOPs) of one forward pass at batch 1, counted on the meta device.

    Defaults to the reference input of :data:`medres.models.registry.REFERENCE_INPUT`.
    FLOPs count 2 per multiply-add (``torch.utils.flop_counter``).
    """
    from torch.utils.flop_counter import FlopCounterMode

    ref_size, ref_ch = REFERENCE_INPUT[check_dims(dims)]
    size = size or ref_size
    in_channels = in_channels or ref_ch
    with torch.device("meta"):
        model = build_model(arch, dims, in_channels, num_classes, stem=stem)
        x = torch.empty(1, in_channels, *([size] * dims))
        with FlopCounterMode(display=False) as counter:
            model(x)
    params = sum(p.numel() for p in model.parameters())
    return params, counter.get_total_flops() / 1e9
