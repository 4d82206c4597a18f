"""Adapting pretrained tensors to the model at hand: input channels, stem size, 2D -> 3D.

:func:`adapt_state_dict` builds the tensors to load key by key against the model's own
state dict (timm's ``load_pretrained`` approach): the first conv is adapted to the input
channels, the stem size and 2D/3D; 2D kernels are inflated for 3D models; a classifier
with another number of classes is left at its initialisation (a new head); MedicalNet's
type-A shortcuts are written as identity projections; a shortcut conv bias (MONAI's
``bias_downsample=True``) is folded into the BatchNorm after it.

Choices made here (see timm's ``adapt_input_conv``/``load_pretrained``):

* **Input channels** (:func:`adapt_input_conv`): the new kernel of channel ``i`` is
  ``sum_c M[i, c] * W[c]`` with :func:`medres.models.weights.channel_mixing`'s ``M``,
  whose columns sum to 1. One channel gets the sum of the RGB kernels; more channels get
  the RGB kernels repeated, each divided by its number of copies. An image repeated on
  every channel then gives exactly the original network's response.
* **Inflation** (:func:`inflate_kernel`): ``"i3d"`` repeats a 2D kernel ``T`` times along
  depth and divides by ``T`` (Carreira & Zisserman 2017); ``"center"`` puts the 2D kernel
  in the middle depth tap and zeros elsewhere. Either way a volume that is constant along
  depth gives the 2D network's activations (I3D away from zero-padded depth borders;
  "center" everywhere).
* **Small stem** (:func:`resize_kernel`): the 7x7 stem kernel is area-resampled to 3x3
  and scaled by 49/9, so that a constant image gives the same response as before; the
  finer taps are an approximation (logged).
* **MedicalNet shortcuts** (:func:`identity_shortcut`): MedicalNet's ResNet-18/34 use
  parameter-free type-A shortcuts (stride-subsampled identity plus zero channels). They
  are written into medres' projection shortcut as a 1x1 identity kernel and an identity
  BatchNorm (running_var = 1 - eps), which computes the same function in eval mode and
  stays trainable.

Owns the tensor arithmetic of adaptation. Imports torch, core and
:mod:`medres.models.weights` (the channel mixing rule) only.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from medres.errors import WeightsError
from medres.models.weights import channel_mixing

INFLATE_MODES = ("i3d", "center")
_BACKBONE_KEY = re.compile(r"^(conv1|bn1|layer\d+)\.")
_IGNORED_EXTRA = re.compile(r"^(conv_seg|fc)\.")  # MedicalNet's segmentation head; old heads


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a first-conv kernel (out, C, *k) to ``in_channels`` input channels.

    Works for 2D and 3D kernels and keeps the dtype. See the module docstring for the rule.
    """
    src = weight.shape[1]
    if in_channels == src:
        return weight
    if in_channels < 1:
        raise WeightsError(f"in_channels={in_channels} is invalid: give 1 or more channels")
    mix = torch.tensor(channel_mixing(in_channels, src), dtype=torch.float64)
    w = weight.to(torch.float64)
    out = torch.einsum("ic,oc...->oi...", mix, w)
    return out.to(weight.dtype).contiguous()


def inflate_kernel(weight: torch.Tensor, depth: int, mode: str = "i3d") -> torch.Tensor:
    """Turn a 2D kernel (out, in, kh, kw) into a 3D one (out, in, depth, kh, kw)."""
    if mode not in INFLATE_MODES:
        raise WeightsError(f"unknown inflation {mode!r}: use one of {', '.join(INFLATE_MODES)}")
    if weight.ndim != 4:
        raise WeightsError(f"only 2D kernels can be inflated, got shape {tuple(weight.shape)}")
    if mode == "i3d":
        return (weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth).contiguous()
    out = weight.new_zeros(weight.shape[0], weight.shape[1], depth, *weight.shape[2:])
    out[:, :, depth // 2] = weight
    return out


def resize_kernel(weight: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Area-resample the spatial taps of a kernel (out, in, *k) to ``size``, keeping the DC gain.

    The result is multiplied by ``prod(k) / prod(size)`` so that a constant input gives
    the same response when the source kernel is constant and approximately otherwise.
    """
    spatial = tuple(weight.shape[2:])
    if spatial == tuple(size):
        return weight
    if len(size) != len(spatial):
        raise WeightsError(f"cannot resize a {len(spatial)}D kernel to {len(size)}D")
    o, i = weight.shape[:2]
    flat = weight.reshape(o * i, 1, *spatial).to(torch.float64)
    resized = F.interpolate(flat, size=size, mode="area")
    gain = float(torch.tensor(spatial).prod()) / float(torch.tensor(size).prod())
    return (resized * gain).reshape(o, i, *size).to(weight.dtype).contiguous()


def identity_shortcut(
    in_planes: int, out_planes: int, dims: int, eps: float = 1e-5
) -> dict[str, torch.Tensor]:
    """Projection-shortcut tensors equal to a type-A (zero-padded identity) shortcut.

    Keys are relative to ``downsample.`` (``0.weight``, ``1.weight``, ``1.bias``,
    ``1.running_mean``, ``1.running_var``, ``1.num_batches_tracked``).
    """
    if out_planes < in_planes:
        raise WeightsError(f"a type-A shortcut cannot shrink {in_planes} to {out_planes} channels")
    conv = torch.zeros(out_planes, in_planes, *([1] * dims))
    idx = torch.arange(in_planes)
    conv[(idx, idx) + (0,) * dims] = 1.0
    return {
        "0.weight": conv,
        "1.weight": torch.ones(out_planes),
        "1.bias": torch.zeros(out_planes),
        "1.running_mean": torch.zeros(out_planes),
        "1.running_var": torch.full((out_planes,), 1.0 - eps),
        "1.num_batches_tracked": torch.tensor(0, dtype=torch.long),
    }


# --- a whole state dict ------------------------------------------------------------------


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
            s = inflate_kernel(s, t.shape[2], inflate)
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
        s = adapt_input_conv(s, t.shape[1])
    spatial = tuple(t.shape[3:]) if (s.ndim == 4 and t.ndim == 5) else tuple(t.shape[2:])
    if tuple(s.shape[2:]) != spatial:
        how.append(
            f"kernel {'x'.join(map(str, s.shape[2:]))} resized to {'x'.join(map(str, spatial))} "
            "for the small stem (area resampling, DC gain kept)"
        )
        s = resize_kernel(s, spatial)
    if s.ndim == 4 and t.ndim == 5:
        how.append(f"inflated to depth {t.shape[2]} ({inflate})")
        s = inflate_kernel(s, t.shape[2], inflate)
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
        for k, v in identity_shortcut(conv.shape[1], conv.shape[0], dims).items():
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
