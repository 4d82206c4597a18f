"""Adapting pretrained tensors to the model at hand: input channels, stem size, 2D -> 3D.

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medres.errors import WeightsError
from medres.models.weights import channel_mixing

INFLATE_MODES = ("i3d", "center")


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
