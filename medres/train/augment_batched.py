"""Random training augmentation, batched in torch on the device, seeded per sample.

The per-item MONAI path (:func:`medres.train.transforms.build_transforms`, ``train=True``)
runs the augmentation of :class:`~medres.train.spec.TransformSpec` on the CPU, item by
item, inside the loader. :class:`BatchedAugment` applies the same augmentations, with the
same parameter distributions, to a ``(B, C, *spatial)`` batch already on the training
device, in MONAI's order:

1. **flips**: each axis of ``flip_axes`` flipped with probability ``flip_prob``
   (independent draws per axis, as one ``RandFlipd`` per axis).
2. **affine** with probability ``affine_prob``: rotation uniform in +/- ``rotate_deg``
   (in-plane in 2D; about each axis in 3D, composed ``R0 @ R1 @ R2`` as MONAI's
   ``create_rotate``) and a zoom factor ``1 + U(-scale, scale)`` per axis, applied as
   ``input = R @ S @ output`` about the image centre in voxel units (MONAI's
   ``RandAffine``), sampled with ``affine_grid``/``grid_sample`` (bilinear, border padding,
   ``align_corners=False``, so voxel centres map as MONAI's grid does).
3. **intensity**: with probability ``intensity_prob`` each, a gain ``x * (1 + U(-j, j))``
   and an offset ``x + U(-j, j)`` (``j = intensity_jitter``; ``RandScaleIntensity`` and
   ``RandShiftIntensity``).
4. **noise** with probability ``noise_prob``: ``N(0, s)`` with ``s ~ U(0, noise_std)``
   (``RandGaussianNoise``'s sampled std).

Seeding: every sample gets its own seed, :func:`sample_seed` of (run seed, epoch, the
sample's position in the epoch's global order). Its parameters are the first values of
that seed's own counter-based stream (splitmix64; vectorised over the batch in numpy,
since seeding one ``torch.Generator`` per sample costs ~50 us, 13 ms a batch of 256), and
its noise field comes from a ``torch.Generator`` on the device seeded from that stream. So
a run is reproducible, an item's augmentation never depends on its batch-mates or on the
batch size, and a class-balanced sampler that draws an item twice gives the two copies
different augmentations. Only the samples an augmentation applies to
are touched (index subsets), so with every probability 0 the batch comes back unchanged.

The draws differ from MONAI's (another generator), so the device path is not bit-equal to
the per-item path; the distributions are the same (``tests/unit/test_augment_batched.py``).
Imports :mod:`medres.train.spec` and torch only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medres.train.spec import TransformSpec

__all__ = ["AugmentParams", "BatchedAugment", "sample_seed"]

# Layout of the uniforms drawn per sample (fixed, whatever the spec enables).
_FLIP, _AFF_ON, _ROT, _ZOOM = 0, 3, 4, 7
_GAIN_ON, _GAIN, _OFF_ON, _OFF, _NOISE_ON, _NOISE_STD = 10, 11, 12, 13, 14, 15
_N_DRAWS = 16

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function (uint64, wrapping)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _uniforms(seeds: Sequence[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) float64 uniforms in [0, 1) and (n,) int64 noise seeds: the splitmix64 stream
    of each sample's seed (a counter-based generator: row i depends on ``seeds[i]`` only)."""
    base = np.asarray([int(v) for v in seeds], dtype=np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        z = _mix(base + _GOLDEN * np.arange(1, k + 2, dtype=np.uint64))
    u = (z[:, :k] >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    nseed = (z[:, k] >> np.uint64(2)).astype(np.int64)
    return torch.from_numpy(u), torch.from_numpy(nseed)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed of one sample: (run seed, 0-based epoch, position in the epoch's order)."""
    h = hashlib.sha256(f"augment:{seed}:{epoch}:{position}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class AugmentParams:
    """The parameters drawn for a batch (CPU tensors, one row per sample)."""

    flip: torch.Tensor
    """(B, dims) bool: flip along that spatial axis."""
    affine: torch.Tensor
    """(B,) bool: apply the random affine."""
    rotate: torch.Tensor
    """(B, 1) radians in 2D, (B, 3) about each axis in 3D (0 where no affine)."""
    zoom: torch.Tensor
    """(B, dims) zoom factor per axis (1 where no affine)."""
    gain: torch.Tensor
    """(B,) multiplier (1 where off)."""
    offset: torch.Tensor
    """(B,) additive offset (0 where off)."""
    noise_std: torch.Tensor
    """(B,) noise std (0 where off)."""
    noise_seed: torch.Tensor
    """(B,) int64 seeds of the noise fields."""


def _rotation(dims: int, angles: torch.Tensor) -> torch.Tensor:
    """(n, dims, dims) rotation matrices in spatial-axis order (float64)."""
    n = angles.shape[0]
    c, s = torch.cos(angles), torch.sin(angles)
    if dims == 2:
        r = torch.zeros(n, 2, 2, dtype=torch.float64)
        r[:, 0, 0], r[:, 0, 1], r[:, 1, 0], r[:, 1, 1] = c[:, 0], -s[:, 0], s[:, 0], c[:, 0]
        return r
    out = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    for k in range(3):  # rotation about spatial axis k, composed R0 @ R1 @ R2
        i, j = [a for a in range(3) if a != k]
        rk = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
        rk[:, i, i], rk[:, i, j], rk[:, j, i], rk[:, j, j] = c[:, k], -s[:, k], s[:, k], c[:, k]
        out = out @ rk
    return out


def affine_theta(rotate: torch.Tensor, zoom: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """``affine_grid`` matrices (n, dims, dims + 1) for ``input = R @ S @ output`` in
    centred voxel units on an image of ``spatial`` size (align_corners=False)."""
    dims = len(spatial)
    a = _rotation(dims, rotate) @ torch.diag_embed(zoom.to(torch.float64))
    half = torch.tensor([s / 2.0 for s in spatial], dtype=torch.float64)
    an = a * half[None, None, :] / half[None, :, None]  # D^-1 A D in normalised coordinates
    an = an.flip(1).flip(2)  # grid coordinates run (last axis, ..., first axis)
    theta = torch.zeros(an.shape[0], dims, dims + 1, dtype=torch.float64)
    theta[:, :, :dims] = an
    return theta


class BatchedAugment:
    """The random augmentation of ``spec`` on a ``(B, C, *spatial)`` batch, seeded per sample.

    ``seed`` is the run seed; ``rank``/``world`` place a rank's shard in the epoch's global
    order (the :class:`~medres.train.data.EpochSampler` gives rank ``r`` the positions
    ``r, r + world, ...``). Call ``aug(x, epoch=e, start=n)`` with ``n`` the number of
    samples of this epoch the rank has already seen.
    """

    def __init__(
        self, spec: TransformSpec, seed: int = 0, *, rank: int = 0, world: int = 1
    ) -> None:
        self.spec, self.seed, self.rank, self.world = spec, int(seed), int(rank), int(world)
        self.dims = int(spec.dims)

    @property
    def active(self) -> bool:
        """Whether any augmentation can apply (``augment`` on and some probability > 0)."""
        s = self.spec
        return bool(s.augment) and (
            (s.flip_prob > 0 and bool(s.flip_axes))
            or (s.affine_prob > 0 and (s.rotate_deg > 0 or s.scale > 0))
            or (s.intensity_prob > 0 and s.intensity_jitter > 0)
            or (s.noise_prob > 0 and s.noise_std > 0)
        )

    def seeds(self, epoch: int, start: int, n: int) -> list[int]:
        """Seeds of this rank's samples ``start .. start + n - 1`` of ``epoch``."""
        return [
            sample_seed(self.seed, epoch, self.rank + (start + k) * self.world) for k in range(n)
        ]

    def draw(self, seeds: Sequence[int]) -> AugmentParams:
        """The parameters of the samples with these seeds (each from its own stream)."""
        s, dims = self.spec, self.dims
        u, nseed = _uniforms(seeds, _N_DRAWS)
        on = bool(s.augment)
        axes = torch.zeros(dims, dtype=torch.bool)
        axes[list(s.flip_axes)] = True
        flip = (u[:, _FLIP : _FLIP + dims] < s.flip_prob) & axes & on
        aff_ok = on and s.affine_prob > 0 and (s.rotate_deg > 0 or s.scale > 0)
        affine = (u[:, _AFF_ON] < s.affine_prob) & aff_ok
        n_rot = 1 if dims == 2 else 3
        rad = math.radians(s.rotate_deg)
        rotate = (2 * u[:, _ROT : _ROT + n_rot] - 1) * rad * affine[:, None]
        zoom = 1 + (2 * u[:, _ZOOM : _ZOOM + dims] - 1) * s.scale * affine[:, None]
        j = s.intensity_jitter if on else 0.0
        gain_on = u[:, _GAIN_ON] < s.intensity_prob
        gain = torch.where(gain_on, 1 + (2 * u[:, _GAIN] - 1) * j, torch.ones(()))
        off_on = u[:, _OFF_ON] < s.intensity_prob
        offset = torch.where(off_on, (2 * u[:, _OFF] - 1) * j, torch.zeros(()))
        noise_on = (u[:, _NOISE_ON] < s.noise_prob) & on
        noise_std = torch.where(noise_on, u[:, _NOISE_STD] * s.noise_std, torch.zeros(()))
        return AugmentParams(flip, affine, rotate, zoom, gain, offset, noise_std, nseed)

    def __call__(self, x: torch.Tensor, *, epoch: int, start: int) -> torch.Tensor:
        """Augment this rank's batch ``x`` of ``epoch`` whose first sample is its ``start``-th."""
        if not self.active:
            return x
        return self.apply(x, self.draw(self.seeds(epoch, start, x.shape[0])))

    def apply(self, x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """``x`` augmented with the parameters ``p`` (a new tensor; ``x`` is not changed)."""
        if x.ndim != self.dims + 2:
            raise ValueError(f"expected a (B, C, *{self.dims} spatial) batch, got {tuple(x.shape)}")
        out = x.clone()
        dev = x.device
        for a in range(self.dims):
            idx = torch.nonzero(p.flip[:, a]).flatten().to(dev)
            if idx.numel():
                out[idx] = out[idx].flip(a + 2)
        idx_cpu = torch.nonzero(p.affine).flatten()
        if idx_cpu.numel():
            idx = idx_cpu.to(dev)
            sub = out[idx]
            theta = affine_theta(p.rotate[idx_cpu], p.zoom[idx_cpu], sub.shape[2:])
            grid = F.affine_grid(theta.to(dev, torch.float32), list(sub.shape), align_corners=False)
            out[idx] = F.grid_sample(
                sub.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
            ).to(out.dtype)
        shape = (-1,) + (1,) * (x.ndim - 1)
        if bool((p.gain != 1).any()):
            out.mul_(p.gain.to(dev, out.dtype).view(shape))
        if bool((p.offset != 0).any()):
            out.add_(p.offset.to(dev, out.dtype).view(shape))
        for i in torch.nonzero(p.noise_std > 0).flatten().tolist():
            g = torch.Generator(device=dev).manual_seed(int(p.noise_seed[i]))
            noise = torch.randn(out.shape[1:], generator=g, device=dev, dtype=torch.float32)
            out[i] += (noise * float(p.noise_std[i])).to(out.dtype)
        return out
