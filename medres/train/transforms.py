"""MONAI dict transforms built from a :class:`~medres.train.spec.TransformSpec`.

One code path for training, evaluation and scoring: :func:`build_transforms` turns the
resolved preprocessing (saved in ``model.json``) into a ``monai.transforms.Compose`` on key
``"image"``. Order and choices:

1. **load** (``load=True``): the cached NIfTI from ingest, read with nibabel, cast to
   float32, channel first (``channels`` from the manifest row). ``load=False`` expects a
   MetaTensor from :func:`image_to_metatensor`, which builds exactly the same tensor from a
   :class:`~medres.ingest.image.LoadedImage` (float32 values, affine rounded through
   float32 as the NIfTI header stores it), so scoring reproduces training bit for bit.
2. **orientation** (3D only; ingest already stores RAS+, so this is normally a no-op).
3. **spacing** resample (optional; bilinear).
4. **intensity** by modality: CT HU window -> [0, 1]; MR percentiles -> [0, 1]; X-ray and
   others: per-image min/max -> [0, 1]. ``auto`` is resolved to one of these at training
   time and never reaches a saved model.
5. **slice** a 2D image out of a 3D volume (optional): centre slice, or a random slice in
   training (that random step ends the cached prefix).
6. **resize** (area interpolation) or centre **crop/pad** to ``image_size``.
7. **channels**: repeat grey to N channels (ImageNet weights), or average RGB to grey.
8. **normalise** by the weights' mean/std, then a plain float32 tensor.
9. **augmentation** (``train=True`` and ``augment``): flips, a random affine (rotation and
   zoom), intensity scale/shift, Gaussian noise.

Steps 1-8 are deterministic, so ``CacheDataset``/``PersistentDataset`` cache their output
and only augmentation runs per epoch.

medres's own steps follow MONAI's pattern: an array transform holds the logic
(:class:`Orient`, :class:`Resample`, :class:`CenterSlice`, :class:`RandSlice`,
:class:`MatchChannels`, :class:`ToFloatTensor`, :class:`LoadNifti`) and its dict
transform (``Orientd``, ...) is a thin wrapper that applies it to each key. This module
owns the preprocessing dict saved in model.json and its validation; it imports
``medres.train.spec``, ``medres.ingest.nifti`` and core only.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, fields, replace
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    NormalizeIntensityd,
    Orientation,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacing,
    Transform,
)

from medres.errors import ConfigError
from medres.train.spec import TransformSpec, section_from_dict

log = logging.getLogger(__name__)

__all__ = [
    "INTENSITY_METHODS",
    "build_transforms",
    "check_volumes",
    "image_to_metatensor",
    "load_image_tensor",
    "preprocessing_dict",
    "resolve_volume",
    "transform_spec_from",
]

INTENSITY_METHODS = ("ct_window", "percentile", "range", "zscore", "none")
RESIZE_MODES = ("resize", "crop_pad")
SLICE_MODES = ("none", "center", "random")
VOLUME_MODES = ("auto", "first", "mean", "channels")  # transforms.volume (auto: refuse 4D)
MAX_SIDE = 8192  # transforms.image_size: at most this a side ...
MAX_VOXELS = 512**3  # ... and this many voxels per channel (512 MiB of float32)
_EXTRA_KEYS = {"format", "value_range", "weights_source", "weights"}


def preprocessing_dict(spec: TransformSpec, **extra: Any) -> dict[str, Any]:
    """The JSON-able preprocessing saved in model.json (the resolved TransformSpec + extras)."""
    out: dict[str, Any] = {"format": "medres-preprocessing/1"}
    for k, v in asdict(spec).items():
        out[k] = list(v) if isinstance(v, tuple) else v
    out.update(extra)
    return out


def transform_spec_from(preprocessing: Mapping[str, Any] | TransformSpec) -> TransformSpec:
    """A validated TransformSpec from a saved preprocessing dict (or the spec itself)."""
    spec = preprocessing
    if not isinstance(spec, TransformSpec):
        known = {f.name for f in fields(TransformSpec)}
        unknown = set(spec) - known - _EXTRA_KEYS
        if unknown:
            log.warning("preprocessing: ignoring unknown keys %s", ", ".join(sorted(unknown)))
        spec = section_from_dict(
            TransformSpec, {k: v for k, v in spec.items() if k in known}, source="preprocessing"
        )
    _validate(spec)
    return spec


def _validate(spec: TransformSpec) -> None:
    where = "transforms"
    if spec.dims not in (2, 3):
        raise ConfigError(f"{where}.dims is {spec.dims}; use 2 or 3 (0 is resolved before use)")
    if spec.in_channels < 1:
        raise ConfigError(f"{where}.in_channels is {spec.in_channels}; it must be resolved to >= 1")
    if spec.intensity not in INTENSITY_METHODS:
        raise ConfigError(
            f"{where}.intensity is {spec.intensity!r}; use one of {', '.join(INTENSITY_METHODS)} "
            "(auto is resolved from the manifest modality before building transforms)"
        )
    if spec.resize_mode not in RESIZE_MODES:
        raise ConfigError(
            f"{where}.resize_mode is {spec.resize_mode!r}; use one of {', '.join(RESIZE_MODES)}"
        )
    if spec.slice_mode not in SLICE_MODES:
        raise ConfigError(
            f"{where}.slice_mode is {spec.slice_mode!r}; use one of {', '.join(SLICE_MODES)}"
        )
    if spec.volume not in VOLUME_MODES:
        raise ConfigError(
            f"{where}.volume is {spec.volume!r}; use first, mean or channels (or auto: first "
            "when the training manifest has 4D images)"
        )
    if spec.slice_mode != "none" and spec.dims != 2:
        raise ConfigError(f"{where}.slice_mode needs a 2D network (dims 2); got dims {spec.dims}")
    if len(spec.image_size) != spec.dims or any(s < 1 for s in spec.image_size):
        raise ConfigError(
            f"{where}.image_size is {list(spec.image_size)}; give {spec.dims} positive sizes "
            "(e.g. --image-size 128 or 64,64,64)"
        )
    voxels = math.prod(spec.image_size)
    if max(spec.image_size) > MAX_SIDE or voxels > MAX_VOXELS:
        raise ConfigError(
            f"{where}.image_size is {list(spec.image_size)}: {voxels:,} voxels per image, more "
            f"than medres allocates ({MAX_SIDE} a side, {MAX_VOXELS:,} in all = 512^3); give a "
            "smaller size (e.g. --image-size 224 or 128,128,128)"
        )
    if spec.intensity == "ct_window" and (len(spec.ct_window) != 2 or spec.ct_window[1] <= 0):
        raise ConfigError(f"{where}.ct_window is {list(spec.ct_window)}; give [center, width>0]")
    if spec.intensity == "percentile" and (
        len(spec.percentiles) != 2 or not 0 <= spec.percentiles[0] < spec.percentiles[1] <= 100
    ):
        raise ConfigError(
            f"{where}.percentiles is {list(spec.percentiles)}; give [low, high] in 0..100"
        )
    if len(spec.mean) != len(spec.std) or any(s <= 0 for s in spec.std):
        raise ConfigError(f"{where}.mean/std must have the same length and std > 0")
    if spec.mean and len(spec.mean) not in (1, spec.in_channels):
        raise ConfigError(
            f"{where}.mean has {len(spec.mean)} values; give 1 or in_channels ({spec.in_channels})"
        )
    if spec.spacing and (len(spec.spacing) < 2 or any(s <= 0 for s in spec.spacing)):
        raise ConfigError(
            f"{where}.spacing is {list(spec.spacing)}; give 2 or 3 positive mm values"
        )
    if any(a < 0 or a >= spec.dims for a in spec.flip_axes):
        raise ConfigError(
            f"{where}.flip_axes {list(spec.flip_axes)} must be spatial axes < {spec.dims}"
        )


# ----------------------------------------------------------------------------------- loading
def _make_metatensor(array: np.ndarray, affine: np.ndarray, channels: int) -> MetaTensor:
    """Channel-first float32 MetaTensor; the single constructor both load paths use."""
    arr = np.asarray(array, dtype=np.float32)
    if channels > 1:
        arr = np.moveaxis(arr, -1, 0)
    else:
        arr = arr[None]
    aff = torch.as_tensor(
        np.asarray(affine, dtype=np.float64).astype(np.float32), dtype=torch.float64
    )
    return MetaTensor(
        torch.from_numpy(np.ascontiguousarray(arr)), affine=aff, meta={"space": "RAS"}
    )


def load_image_tensor(path: str | os.PathLike[str], channels: int = 1) -> MetaTensor:
    """Read a canonical NIfTI written by ingest into a channel-first float32 MetaTensor."""
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj)
    if channels > 1 and arr.ndim >= 4 and arr.shape[-2] == 1:
        arr = arr[..., 0, :]  # (X, Y, 1, C) layout of RGB images stored as 4D
    return _make_metatensor(arr, img.affine, channels)


def image_to_metatensor(img: Any) -> MetaTensor:
    """The MetaTensor that loading ``img``'s NIfTI would give (dtype, values and affine)."""
    return _make_metatensor(img.array, img.affine, int(getattr(img, "channels", 1) or 1))


# ---------------------------------------------------------------------------- array transforms
class LoadNifti(Transform):
    """A NIfTI path -> the channel-first float32 MetaTensor of :func:`load_image_tensor`."""

    def __call__(self, path: str | os.PathLike[str], channels: int = 1) -> MetaTensor:
        return load_image_tensor(path, channels)


def check_volumes(
    preprocessing: Mapping[str, Any] | TransformSpec, n_volumes: int, name: str
) -> None:
    """Refuse (``wrong_dims``, naming ``name``) a 4D image of ``n_volumes`` volumes that the
    preprocessing cannot take: ``transforms.volume`` unset, or ``channels`` with another
    volume count than the model's input channels. Training and scoring both call it."""
    from medres.errors import IngestError
    from medres.ingest.codes import Code

    if n_volumes <= 1:
        return
    pre = preprocessing if isinstance(preprocessing, Mapping) else asdict(preprocessing)
    mode, channels = str(pre.get("volume") or "auto"), int(pre.get("in_channels") or 0)
    if mode == "auto":  # never resolved: the model was trained without 4D images
        raise IngestError(
            f"{name}: a 4D image with {n_volumes} volumes, and transforms.volume is not set; "
            "set it to first, mean or channels (e.g. --set transforms.volume=first) and train again",
            code=Code.WRONG_DIMS,
        )
    if mode == "channels" and channels and channels != n_volumes:
        raise IngestError(
            f"{name}: a 4D image with {n_volumes} volumes, and the model takes {channels} "
            "channels (transforms.volume=channels); use images with that many volumes",
            code=Code.WRONG_DIMS,
        )


def resolve_volume(
    rows: Sequence[Mapping[str, str]], spec: TransformSpec, channels: int
) -> tuple[str, int]:
    """(``transforms.volume``, input channels) for manifest ``rows``: ``auto`` becomes
    ``first`` when a row is 4D (logged); ``channels`` mode takes the volume count as the
    channels. Every 4D row is checked by :func:`check_volumes` (named by its image_id)."""
    counts = {int(r.get("n_volumes") or 1) for r in rows} - {1}
    mode = spec.volume
    if mode == "auto" and counts:
        mode = "first"
        log.info(
            "transforms.volume=first: the manifest has 4D images (%s volumes); each is taken "
            "by its first volume (set transforms.volume to mean or channels to change)",
            "/".join(str(c) for c in sorted(counts)),
        )
    if mode == "channels" and counts:
        channels = max(counts)  # a row with another count is refused below
    for r in rows:
        check_volumes(
            replace(spec, volume=mode, in_channels=spec.in_channels or channels),
            int(r.get("n_volumes") or 1),
            f"image {r.get('image_id', '?')} ({r.get('image_path', '')})",
        )
    return mode, channels


class SelectVolume(Transform):
    """The ``transforms.volume`` rule on a channel-first 4D image (1, X, Y, Z, T): ``first``
    volume, ``mean`` over volumes, or the volumes as ``channels`` (T, X, Y, Z). Images of up
    to 3 spatial dims pass through; ``auto`` (never resolved) refuses a 4D image."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            return x
        check_volumes({"volume": self.mode}, int(x.shape[-1]), "image")
        t = x.as_tensor() if isinstance(x, MetaTensor) else x
        if self.mode == "first":
            out = t[..., 0]
        elif self.mode == "mean":
            out = t.mean(dim=-1)
        else:
            out = t[0].movedim(-1, 0)
        out = out.contiguous()
        if isinstance(x, MetaTensor):
            return MetaTensor(out, affine=x.affine, meta={"space": "RAS"})
        return out


class Orient(Transform):
    """Reorient a 3D image to ``axcodes``; 2D images are returned as they are (ingest orients them).

    Without metadata tracking (scoring), an image whose affine is already diagonal and
    positive is returned as the plain tensor that ``Orientation`` would return for it
    (the same voxels, no copy) without computing the orientation, which costs more than
    the rest of the step. With tracking on (training) ``Orientation`` always runs, so
    every item records the same applied operations.
    """

    def __init__(self, axcodes: str) -> None:
        self.axcodes = axcodes
        self.op = Orientation(axcodes=axcodes, labels=None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from monai.data import get_track_meta

        from medres.ingest.nifti import is_ras_diagonal

        if x.ndim != 4:
            return x
        if (
            self.axcodes == "RAS"
            and not get_track_meta()
            and isinstance(x, MetaTensor)
            and is_ras_diagonal(x.affine)
        ):
            return x.as_tensor()
        return self.op(x)


class Resample(Transform):
    """Bilinear resample to ``pixdim`` (first N values for an N-D image; the last repeats)."""

    def __init__(self, pixdim: tuple[float, ...]) -> None:
        self.pixdim = tuple(pixdim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.ndim - 1
        pix = self.pixdim[:n] if len(self.pixdim) >= n else (*self.pixdim, self.pixdim[-1])
        return Spacing(pixdim=pix, mode="bilinear")(x)


def _take_slice(x: torch.Tensor, axis: int, index: int) -> torch.Tensor:
    out = x.select(axis + 1, index)
    return out.as_tensor() if isinstance(out, MetaTensor) else out


class CenterSlice(Transform):
    """The 2D centre slice along spatial ``axis`` of a 3D image; 2D images pass through."""

    def __init__(self, axis: int) -> None:
        self.axis = axis

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            return x
        return _take_slice(x, self.axis, x.shape[self.axis + 1] // 2)


class RandSlice(Randomizable, Transform):
    """A uniformly random 2D slice along spatial ``axis`` of a 3D image (training only)."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self._index = 0

    def randomize(self, data: Any = None) -> None:
        """Draw the slice index for an image with ``data`` slices along ``axis``."""
        self._index = int(self.R.randint(0, int(data)))

    def __call__(self, x: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if x.ndim != 4:
            return x
        if randomize:
            self.randomize(x.shape[self.axis + 1])
        return _take_slice(x, self.axis, self._index)


class MatchChannels(Transform):
    """Repeat a grey channel to ``n`` channels or average several channels to one."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[0]
        if c == self.n:
            return x
        if c == 1:
            return x.repeat(self.n, *([1] * (x.ndim - 1)))
        if self.n == 1:
            return x.mean(dim=0, keepdim=True)
        raise ConfigError(
            f"image has {c} channels but the model takes {self.n}; set model.in_channels "
            f"to {c} or 1"
        )


class ToFloatTensor(Transform):
    """A contiguous plain float32 tensor (drops MONAI metadata, which training does not use)."""

    def __call__(self, x: Any) -> torch.Tensor:
        if isinstance(x, MetaTensor):
            x = x.as_tensor()
        return torch.as_tensor(x, dtype=torch.float32).contiguous()


# ------------------------------------------------------------------ dict wrappers (by key)
class _Mapd(MapTransform):
    """Apply the array transform ``self.op`` to every key (MONAI's dictionary pattern)."""

    op: Callable[[Any], Any]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.op(d[key])
        return d


class LoadNiftid(MapTransform):
    """Replace the path in ``d[key]`` by the image tensor; ``d["channels"]`` gives channels."""

    def __init__(self, keys: KeysCollection) -> None:
        super().__init__(keys)
        self.loader = LoadNifti()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key], int(d.get("channels", 1) or 1))
        return d


class SelectVolumed(_Mapd):
    """Dict wrapper of :class:`SelectVolume`."""

    def __init__(self, keys: KeysCollection, mode: str) -> None:
        super().__init__(keys)
        self.mode = mode
        self.op = SelectVolume(mode)


class Orientd(_Mapd):
    """Dict wrapper of :class:`Orient`."""

    def __init__(self, keys: KeysCollection, axcodes: str) -> None:
        super().__init__(keys)
        self.axcodes = axcodes
        self.op = Orient(axcodes)


class Spacingd_(_Mapd):
    """Dict wrapper of :class:`Resample`."""

    def __init__(self, keys: KeysCollection, pixdim: tuple[float, ...]) -> None:
        super().__init__(keys)
        self.pixdim = tuple(pixdim)
        self.op = Resample(pixdim)


class CenterSliced(_Mapd):
    """Dict wrapper of :class:`CenterSlice`."""

    def __init__(self, keys: KeysCollection, axis: int) -> None:
        super().__init__(keys)
        self.axis = axis
        self.op = CenterSlice(axis)


class RandSliced(Randomizable, _Mapd):
    """Dict wrapper of :class:`RandSlice`; seeding it seeds the array transform."""

    def __init__(self, keys: KeysCollection, axis: int) -> None:
        _Mapd.__init__(self, keys)
        self.axis = axis
        self.op = RandSlice(axis)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandSliced:
        super().set_random_state(seed, state)
        self.op.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:  # pragma: no cover - the op draws per key
        pass


class MatchChannelsd(_Mapd):
    """Dict wrapper of :class:`MatchChannels`."""

    def __init__(self, keys: KeysCollection, n: int) -> None:
        super().__init__(keys)
        self.n = n
        self.op = MatchChannels(n)


class ToFloatTensord(_Mapd):
    """Dict wrapper of :class:`ToFloatTensor`."""

    def __init__(self, keys: KeysCollection) -> None:
        super().__init__(keys)
        self.op = ToFloatTensor()


# ------------------------------------------------------------------------------------- builder
def _intensity(spec: TransformSpec) -> list[Any]:
    k = "image"
    if spec.intensity == "ct_window":
        c, w = spec.ct_window
        return [
            ScaleIntensityRanged(
                k, a_min=c - w / 2, a_max=c + w / 2, b_min=0.0, b_max=1.0, clip=True
            )
        ]
    if spec.intensity == "percentile":
        lo, hi = spec.percentiles
        return [
            ScaleIntensityRangePercentilesd(k, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True)
        ]
    if spec.intensity == "range":
        return [ScaleIntensityd(k, minv=0.0, maxv=1.0)]
    if spec.intensity == "zscore":
        return [NormalizeIntensityd(k, nonzero=True, channel_wise=True, dtype=np.float32)]
    return []


def _augment(spec: TransformSpec) -> list[Any]:
    k = "image"
    out: list[Any] = [RandFlipd(k, prob=spec.flip_prob, spatial_axis=a) for a in spec.flip_axes]
    if spec.affine_prob > 0 and (spec.rotate_deg > 0 or spec.scale > 0):
        rad = math.radians(spec.rotate_deg)
        rot = (rad,) if spec.dims == 2 else (rad, rad, rad)
        out.append(
            RandAffined(
                k,
                prob=spec.affine_prob,
                rotate_range=rot,
                scale_range=(spec.scale,) * spec.dims,
                mode="bilinear",
                padding_mode="border",
            )
        )
    if spec.intensity_prob > 0 and spec.intensity_jitter > 0:
        out.append(RandScaleIntensityd(k, factors=spec.intensity_jitter, prob=spec.intensity_prob))
        out.append(RandShiftIntensityd(k, offsets=spec.intensity_jitter, prob=spec.intensity_prob))
    if spec.noise_prob > 0 and spec.noise_std > 0:
        out.append(
            RandGaussianNoised(k, prob=spec.noise_prob, std=spec.noise_std, dtype=np.float32)
        )
    return out


def build_transforms(
    preprocessing: Mapping[str, Any] | TransformSpec, *, train: bool, load: bool = True
) -> Compose:
    """MONAI ``Compose`` on key ``"image"`` (see the module docstring for the order).

    ``train=True`` adds augmentation (when ``augment``) and a random slice (when
    ``slice_mode == "random"``); ``train=False`` is the evaluation/scoring path.
    """
    spec = transform_spec_from(preprocessing)
    k = "image"
    ts: list[Any] = []
    if load:
        ts.append(LoadNiftid(k))
    ts.append(SelectVolumed(k, spec.volume))  # 4D -> 3D or channels; others pass through
    if spec.orientation:
        ts.append(Orientd(k, spec.orientation))
    if spec.spacing:
        ts.append(Spacingd_(k, spec.spacing))
    ts.extend(_intensity(spec))
    if spec.slice_mode == "random" and train:
        ts.append(RandSliced(k, spec.slice_axis))
    elif spec.slice_mode != "none":
        ts.append(CenterSliced(k, spec.slice_axis))
    if spec.resize_mode == "resize":
        ts.append(Resized(k, spatial_size=tuple(spec.image_size), mode="area"))
    else:
        ts.append(ResizeWithPadOrCropd(k, spatial_size=tuple(spec.image_size)))
    ts.append(MatchChannelsd(k, spec.in_channels))
    ts.append(ToFloatTensord(k))
    if spec.mean:
        n = spec.in_channels
        mean = list(spec.mean) * (n if len(spec.mean) == 1 else 1)
        std = list(spec.std) * (n if len(spec.std) == 1 else 1)
        ts.append(
            NormalizeIntensityd(
                k,
                subtrahend=np.asarray(mean, dtype=np.float32),
                divisor=np.asarray(std, dtype=np.float32),
                channel_wise=True,
                dtype=np.float32,
            )
        )
    if train and spec.augment:
        ts.extend(_augment(spec))
    if spec.mean or (train and spec.augment):
        ts.append(ToFloatTensord(k))
    return Compose(ts)
