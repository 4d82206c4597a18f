"""The deterministic preprocessing of :mod:`medres.train.transforms`, batched in torch on a device.

:func:`medres.train.transforms.build_transforms` (``train=False``) runs steps 1-8 of the
saved preprocessing per item in MONAI on the CPU. :class:`BatchedPreprocess` computes the
same result for a list of raw decoded images (:class:`RawImage`: the array as a reader
gives it, its affine and channel count) on any torch device, batch by batch:

- **Planning** (numpy, per item, microseconds): the geometry of each step is taken from
  the functions MONAI itself uses: ``nibabel``'s orientation transform, and for a
  ``spacing`` resample MONAI's ``affine_to_spacing`` / ``zoom_affine`` /
  ``compute_shape_offset`` and ``solve(src_affine, dst_affine)``. So the output shape and
  the voxel mapping are exactly MONAI's.
- **Grouping**: items with the same raw shape, dtype, channels and (float32-rounded)
  affine share one plan; each group is stacked and processed as one batch. The result of
  an item never depends on its batch-mates: spatial steps are per plane, statistics
  (min/max, percentiles, z-score) are reduced per item (per item and channel for z-score).
- **Spatial steps on the batch folded into channels**: MONAI's spatial array transforms
  treat every channel alike, so ``Resize`` (mode ``area``: ``torch.nn.functional.interpolate``,
  no anti-aliasing, as MONAI calls it) and ``ResizeWithPadOrCrop`` are applied by MONAI's
  own classes to the ``(B * C, *spatial)`` tensor on the device: identical by construction.
- **Resampling** (``spacing``): when the output-to-input voxel map is axis-aligned (every
  image ingest writes; after the RAS orientation, any affine without rotation), it is
  separable and done as one linear interpolation per axis with border clamping: the
  tensor product of the same weights ``grid_sample`` (bilinear, ``border``,
  ``align_corners=False``) uses, in float32 on the device instead of MONAI's float64 on
  the CPU: first along the axis outermost in memory (a Fortran-order NIfTI volume is taken
  as it lies, without a transposing copy), then the largest reduction first. A rotated map falls back to MONAI's
  ``SpatialResample`` on the folded batch (float32). Difference from MONAI's float64
  path: float32 rounding of the interpolated values (|delta| <= ~1e-6 after the
  intensity step; ``tests/unit/test_batched_preprocess.py`` bounds it at 1e-5).
- **Intensity, slice, channels, normalisation**: written out in torch with MONAI's
  formulas (``ScaleIntensityRange`` with clip; percentiles by linear interpolation as
  ``numpy.percentile``/``torch.quantile``; ``rescale_array``'s min == max rule;
  ``NormalizeIntensity(nonzero=True, channel_wise=True)``: mean and population std of the
  non-zero voxels of each channel, std 0 -> 1, an all-zero channel left as it is).

Not covered: augmentation and the random slice (training only; this module is the
deterministic part). Imports: :mod:`medres.train.transforms`, :mod:`medres.errors`, numpy,
torch, MONAI (spatial array transforms and ``monai.data.utils``), nibabel's orientations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medres.errors import ConfigError
from medres.train.spec import TransformSpec
from medres.train.transforms import check_volumes, transform_spec_from

log = logging.getLogger(__name__)

__all__ = ["BatchedPreprocess", "RawImage", "plan_geometry"]

_AFFINE_TOL = 1e-3  # MONAI's AFFINE_TOL: below it an affine counts as unchanged


@dataclass(frozen=True)
class RawImage:
    """One decoded image before preprocessing: ``array`` (X, Y[, Z])[, C or T] as the
    reader gives it (any real dtype, numpy or torch), ``affine`` voxel -> RAS+ mm (4x4),
    ``channels`` (> 1: a trailing channel axis)."""

    array: Any
    affine: np.ndarray
    channels: int = 1


@dataclass(frozen=True)
class Geometry:
    """The spatial plan of one item: reorientation (``flip`` axes, then ``perm`` of the
    spatial axes) and, for a resample, the output shape and the separable map
    ``src = scale * i + shift`` per axis (or the full ``xform`` when it rotates)."""

    flip: tuple[int, ...]
    perm: tuple[int, ...]
    out_shape: tuple[int, ...] | None
    scale: tuple[float, ...] | None
    shift: tuple[float, ...] | None
    xform: np.ndarray | None


def _mt_affine(affine: np.ndarray) -> np.ndarray:
    """The affine as the per-item path holds it (rounded through float32, as NIfTI stores it)."""
    return np.asarray(affine, dtype=np.float64).astype(np.float32).astype(np.float64)


def _orient_plan(
    affine: np.ndarray, shape: tuple[int, ...], axcodes: str
) -> tuple[tuple[int, ...], tuple[int, ...], np.ndarray]:
    """(flip axes, permutation, affine after) of MONAI's ``Orientation(axcodes)`` on a 3D image."""
    import nibabel as nib

    if not axcodes or len(shape) != 3:
        return (), tuple(range(len(shape))), affine
    src = nib.io_orientation(affine)
    ornt = nib.orientations.ornt_transform(src, nib.orientations.axcodes2ornt(axcodes[:3]))
    after = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    flips = tuple(int(i) for i, f in enumerate(ornt[:, 1]) if f == -1)
    perm = tuple(int(i) for i in np.argsort(ornt[:, 0]))
    return flips, perm, after


def _resample_plan(
    affine: np.ndarray, shape: tuple[int, ...], pixdim: Sequence[float]
) -> tuple[tuple[int, ...], np.ndarray] | None:
    """(output shape, output -> input voxel map) of MONAI's ``Spacing(pixdim)``; ``None``
    when MONAI would leave the image as it is."""
    from monai.data.utils import (
        affine_to_spacing,
        compute_shape_offset,
        to_affine_nd,
        zoom_affine,
    )

    sr = len(shape)
    pix = tuple(pixdim[:sr]) if len(pixdim) >= sr else (*pixdim, pixdim[-1])
    src = to_affine_nd(sr, affine).astype(np.float64)
    out_d = np.asarray(pix, dtype=np.float64)
    orig_d = affine_to_spacing(src, sr, out_d.dtype)
    out_d = np.where(np.abs(orig_d - out_d) <= _AFFINE_TOL, orig_d, out_d)
    new = zoom_affine(src, out_d, diagonal=False)
    out_shape, offset = compute_shape_offset(shape, src, new, False)
    new[:sr, -1] = offset[:sr]
    out_shape = tuple(int(s) for s in out_shape)
    xform = np.linalg.solve(src, new)
    same = out_shape == tuple(shape) and (
        np.allclose(src, new, atol=_AFFINE_TOL)
        or np.allclose(xform, np.eye(sr + 1), atol=_AFFINE_TOL)
    )
    return None if same else (out_shape, xform)


def plan_geometry(affine: np.ndarray, shape: tuple[int, ...], spec: TransformSpec) -> Geometry:
    """The spatial plan of an item of spatial ``shape`` and (float32-rounded) ``affine``."""
    flip, perm, aff = _orient_plan(affine, shape, spec.orientation)
    oriented = tuple(shape[p] for p in perm)
    plan = _resample_plan(aff, oriented, spec.spacing) if spec.spacing else None
    if plan is None:
        return Geometry(flip, perm, None, None, None, None)
    out_shape, xform = plan
    sr = len(oriented)
    lin = xform[:sr, :sr]
    if np.count_nonzero(np.abs(lin - np.diag(np.diag(lin))) > 1e-12) == 0:
        scale = tuple(float(v) for v in np.diag(lin))
        shift = tuple(float(v) for v in xform[:sr, -1])
        return Geometry(flip, perm, out_shape, scale, shift, None)
    return Geometry(flip, perm, out_shape, None, None, xform)


# ------------------------------------------------------------------------------ spatial steps
def _lerp_axis(x: torch.Tensor, axis: int, n_out: int, scale: float, shift: float) -> torch.Tensor:
    """Linear interpolation along ``axis`` at ``scale * i + shift`` (border clamped), in
    float32: two advanced-indexing gathers along ``axis`` (whole planes or rows when it is
    not the innermost in memory; no transposing copy) and one ``lerp``."""
    n_in = x.shape[axis]
    pos = torch.arange(n_out, dtype=torch.float64, device=x.device) * scale + shift
    pos = pos.clamp(0.0, float(n_in - 1))
    near = pos.round()
    pos = torch.where((pos - near).abs() < 1e-9, near, pos)  # grid-aligned voxels stay exact
    i0 = pos.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w = (pos - i0).to(torch.float32).view(shape)
    at = (slice(None),) * axis
    a = x[(*at, i0)].to(torch.float32)  # a raw int16 volume is cast after the gather
    b = x[(*at, i1)].to(torch.float32)
    return torch.lerp(a, b, w)


def _resample(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """``x`` (N, *spatial) resampled by the plan ``g``."""
    assert g.out_shape is not None
    if g.scale is not None and g.shift is not None:
        # on the memory-order view (a Fortran-order NIfTI volume is taken as it lies: no
        # transposing copy), the strongest reduction first, so that every later pass
        # works on fewer voxels; the order depends on the plan only (not on the layout)
        n = len(g.out_shape)
        mem = sorted(range(n), key=lambda k: -x.stride(k + 1))  # spatial axes, outer first
        t = x.permute(0, *[k + 1 for k in mem])
        t = t if t.is_contiguous() else t.contiguous()
        for k in sorted(range(n), key=lambda k: (g.out_shape[k] / x.shape[k + 1], k)):
            t = _lerp_axis(t, mem.index(k) + 1, g.out_shape[k], g.scale[k], g.shift[k])
        return t.permute(0, *[mem.index(k) + 1 for k in range(n)])
    from monai.networks.layers import AffineTransform

    op = AffineTransform(
        normalized=False, mode="bilinear", padding_mode="border", align_corners=False,
        reverse_indexing=True,
    )  # fmt: skip
    x = x.to(torch.float32)
    theta = torch.as_tensor(g.xform, dtype=x.dtype, device=x.device)
    return op(x.unsqueeze(0), theta=theta, spatial_size=list(g.out_shape)).squeeze(0)


def _fold(fn: Any, x: torch.Tensor) -> torch.Tensor:
    """Apply the channel-wise array op ``fn`` to (B, C, *s) as one (B * C, *s) image."""
    b, c = x.shape[:2]
    y = fn(x.reshape(b * c, *x.shape[2:]))
    y = y.as_tensor() if hasattr(y, "as_tensor") else y
    return y.reshape(b, c, *y.shape[1:])


# ---------------------------------------------------------------------------- intensity steps
def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def _scale_range(x: torch.Tensor, lo: Any, hi: Any, clip: bool) -> torch.Tensor:
    """``ScaleIntensityRange(lo, hi, 0, 1, clip)``; where hi == lo: ``x - lo`` (MONAI's rule)."""
    if not torch.is_tensor(lo):
        if hi - lo == 0:
            return x - lo
        y = (x - lo) / (hi - lo)
        return y.clamp(0.0, 1.0) if clip else y
    lo, hi = _bcast(lo, x), _bcast(hi, x)
    width = hi - lo
    y = (x - lo) / torch.where(width == 0, torch.ones_like(width), width)
    y = y.clamp(0.0, 1.0) if clip else y
    return torch.where(width == 0, x - lo, y)


def _percentiles(x: torch.Tensor, q: Sequence[float]) -> list[torch.Tensor]:
    """Per-item percentiles (linear interpolation, as numpy.percentile) of (B, ...)."""
    v, _ = torch.sort(_flat(x).double(), dim=1)
    n = v.shape[1]
    out = []
    for p in q:
        pos = p / 100.0 * (n - 1)
        i0 = int(np.floor(pos))
        i1 = min(i0 + 1, n - 1)
        out.append((v[:, i0] + (v[:, i1] - v[:, i0]) * (pos - i0)).to(x.dtype))
    return out


def _range(x: torch.Tensor) -> torch.Tensor:
    """``ScaleIntensity(0, 1)`` per item; a constant item becomes 0 (``arr * minv``)."""
    f = _flat(x)
    lo, hi = _bcast(f.amin(1), x), _bcast(f.amax(1), x)
    width = hi - lo
    y = (x - lo) / torch.where(width == 0, torch.ones_like(width), width)
    return torch.where(width == 0, x * 0.0, y)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """``NormalizeIntensity(nonzero=True, channel_wise=True)`` per item and channel."""
    b, c = x.shape[:2]
    f = x.reshape(b * c, -1)
    m = f != 0
    cnt = m.sum(1, dtype=torch.float64)
    safe = cnt.clamp(min=1)
    fd = f.double()
    mean = (fd * m).sum(1) / safe
    var = (((fd - mean[:, None]) * m) ** 2).sum(1) / safe
    std = var.sqrt()
    std = torch.where(std == 0, torch.ones_like(std), std)
    y = ((fd - mean[:, None]) / std[:, None]).to(x.dtype)
    return torch.where(m, y, f).reshape(x.shape)


def _intensity(x: torch.Tensor, spec: TransformSpec) -> torch.Tensor:
    if spec.intensity == "ct_window":
        c, w = spec.ct_window
        return _scale_range(x, c - w / 2, c + w / 2, clip=True)
    if spec.intensity == "percentile":
        lo, hi = _percentiles(x, spec.percentiles)
        return _scale_range(x, lo, hi, clip=True)
    if spec.intensity == "range":
        return _range(x)
    if spec.intensity == "zscore":
        return _zscore(x)
    return x


# ------------------------------------------------------------------------------------- driver
def _channel_first(arr: Any, channels: int, device: torch.device) -> torch.Tensor:
    """(C, *spatial[, T]) on ``device``, as ``_make_metatensor`` lays it out, in the raw
    dtype (int16 is half the bytes); it becomes float32 (exactly, as the per-item path
    casts it first) in the resample's gathers or just before the intensity step."""
    t = torch.as_tensor(_c_or_f(arr) if isinstance(arr, np.ndarray) else arr)
    t = t.to(device, non_blocking=True)
    return t.movedim(-1, 0) if channels > 1 else t.unsqueeze(0)


def _c_or_f(arr: np.ndarray) -> np.ndarray:
    """``arr`` as it lies when C- or Fortran-contiguous (a NIfTI volume read by nibabel is
    Fortran order: no transposing copy of the whole volume), else a C-order copy."""
    if arr.flags.c_contiguous or arr.flags.f_contiguous:
        return arr
    return np.ascontiguousarray(arr)


def _stack(xs: list[torch.Tensor]) -> torch.Tensor:
    """(B, ...) from equal items, keeping their memory order (Fortran order stays so), so
    that a batch of one and a batch of many are laid out, and computed, alike."""
    if len(xs) == 1:
        return xs[0].unsqueeze(0)
    order = sorted(range(xs[0].ndim), key=lambda k: -xs[0].stride(k))
    inv = [order.index(k) for k in range(len(order))]
    y = torch.stack([t.permute(order) for t in xs])
    return y.permute(0, *[i + 1 for i in inv])


def _stack_numpy(arrs: list[Any], channels: int, device: torch.device) -> torch.Tensor | None:
    """(B, C, ...) from equal numpy items stacked in numpy first (one host copy, one
    transfer: no per-item torch overhead, which dominates for tiny 2D images), laid out as
    :func:`_stack` lays out the per-item tensors (a Fortran-order item stays so); ``None``
    when an item is not a C- or Fortran-contiguous numpy array of the group's order."""
    if len(arrs) < 2 or not all(isinstance(a, np.ndarray) for a in arrs):
        return None
    if all(a.flags.c_contiguous for a in arrs):
        x = torch.from_numpy(np.stack(arrs))
    elif all(a.flags.f_contiguous for a in arrs):
        x = torch.from_numpy(np.stack([a.T for a in arrs]))  # (B, *reversed): C order
        x = x.permute(0, *range(x.ndim - 1, 0, -1))
    else:
        return None
    x = x.to(device, non_blocking=True)
    return x.movedim(-1, 1) if channels > 1 else x.unsqueeze(1)


def _select_volume(x: torch.Tensor, mode: str) -> torch.Tensor:
    """``SelectVolume`` on (B, 1, X, Y, Z, T); other shapes pass through."""
    if x.ndim != 6:
        return x
    if mode == "first":
        return x[..., 0]
    if mode == "mean":
        return x.to(torch.float32).mean(dim=-1)
    return x[:, 0].movedim(-1, 1)


def _match_channels(x: torch.Tensor, n: int) -> torch.Tensor:
    c = x.shape[1]
    if c == n:
        return x
    if c == 1:
        return x.repeat(1, n, *([1] * (x.ndim - 2)))
    if n == 1:
        return x.mean(dim=1, keepdim=True)
    raise ConfigError(
        f"image has {c} channels but the model takes {n}; set model.in_channels to {c} or 1"
    )


class BatchedPreprocess:
    """Steps 1-8 of the saved preprocessing (``train=False``) for a batch, on ``device``.

    ``BatchedPreprocess(model_meta.preprocessing, device="cuda")(images)`` returns a
    (B, C, *image_size) float32 tensor on the device equal (within float32 rounding, see
    the module docstring) to stacking ``build_transforms(pre, train=False, load=False)``
    applied to each image. A random slice (``slice_mode: random``) is taken as the centre
    slice, as evaluation does.
    """

    def __init__(self, preprocessing: Any, device: str | torch.device = "cpu") -> None:
        self.spec = transform_spec_from(preprocessing)
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self._plans: dict[tuple[Any, ...], Geometry] = {}

    @property
    def out_shape(self) -> tuple[int, ...]:
        """(C, *image_size): the shape of every preprocessed item."""
        return (int(self.spec.in_channels), *(int(s) for s in self.spec.image_size))

    def key(self, img: RawImage) -> tuple[Any, ...]:
        """The group of ``img``: items of one key share one plan and are stacked together."""
        return self._key(img)

    def _key(self, img: RawImage) -> tuple[Any, ...]:
        arr = img.array
        dtype = str(arr.dtype)
        aff = _mt_affine(img.affine)
        fortran = bool(getattr(getattr(arr, "flags", None), "f_contiguous", False)) and not bool(
            arr.flags.c_contiguous
        )  # the memory order decides the order of the resample's passes: one per group
        return (tuple(arr.shape), dtype, int(img.channels or 1), aff.tobytes(), fortran)

    def _plan(self, key: tuple[Any, ...], x: torch.Tensor) -> Geometry:
        plan = self._plans.get(key)
        if plan is None:
            aff = np.frombuffer(key[3], dtype=np.float64).reshape(4, 4)
            spatial = tuple(int(s) for s in x.shape[2:])
            if len(spatial) not in (2, 3):
                raise ConfigError(f"an image of shape {key[0]}: expected 2 or 3 spatial axes")
            plan = plan_geometry(aff, spatial, self.spec)
            if len(self._plans) > 256:  # a stream of ever-new geometries: keep memory bounded
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def __call__(self, images: Sequence[RawImage]) -> torch.Tensor:
        """The preprocessed batch, in the order of ``images`` (grouped internally)."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self._key(img), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for key, idx in groups.items():
            y = self.group([images[i] for i in idx], key)
            for j, i in enumerate(idx):
                out[i] = y[j]
        if not out:
            return torch.empty(0, device=self.device)
        if len(groups) == 1:  # one group (the usual case): already in order, no copy
            return y
        return torch.stack(out)  # type: ignore[arg-type]

    def group(self, images: Sequence[RawImage], key: tuple[Any, ...] | None = None) -> torch.Tensor:
        """Preprocess images that share shape, dtype, channels and affine (one plan)."""
        spec = self.spec
        key = key or self._key(images[0])
        ch = int(images[0].channels or 1)
        x = _stack_numpy([im.array for im in images], ch, self.device)
        if x is None:
            x = _stack([_channel_first(im.array, ch, self.device) for im in images])
        if x.ndim == 6:
            check_volumes(self.preprocessing, int(x.shape[-1]), "image")
        x = _select_volume(x, spec.volume)
        g = self._plan(key, x)
        return self._apply(x, g)

    def _apply(self, x: torch.Tensor, g: Geometry) -> torch.Tensor:
        from monai.transforms import Resize, ResizeWithPadOrCrop

        spec = self.spec
        if g.flip:
            x = torch.flip(x, dims=[a + 2 for a in g.flip])
        if g.perm != tuple(range(len(g.perm))):
            x = x.permute(0, 1, *[p + 2 for p in g.perm])
        if g.out_shape is not None:
            x = _fold(lambda t: _resample(t, g), x)
        x = _intensity(x.to(torch.float32), spec)
        if spec.slice_mode != "none" and x.ndim == 5:
            ax = spec.slice_axis
            x = x.select(ax + 2, x.shape[ax + 2] // 2)
        size = tuple(spec.image_size)
        if spec.resize_mode == "resize":
            op: Any = Resize(spatial_size=size, mode="area")
        else:
            op = ResizeWithPadOrCrop(spatial_size=size)
        x = _fold(op, x.contiguous())
        x = _match_channels(x, spec.in_channels).to(torch.float32)
        if spec.mean:
            n = spec.in_channels
            mean = list(spec.mean) * (n if len(spec.mean) == 1 else 1)
            std = list(spec.std) * (n if len(spec.std) == 1 else 1)
            shape = (1, n) + (1,) * (x.ndim - 2)
            m = torch.tensor(mean, dtype=torch.float32, device=x.device).reshape(shape)
            s = torch.tensor(std, dtype=torch.float32, device=x.device).reshape(shape)
            x = (x - m) / s
        return x.contiguous()
