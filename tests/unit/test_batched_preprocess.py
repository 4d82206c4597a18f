"""The batched, device-side preprocessing equals the per-item MONAI path (medres.train.batched).

For every shipped pipeline (``pipelines/*.yaml``), in 2D and 3D, on tiny images of varied
shapes, dtypes, spacings and orientations (flipped, permuted and one oblique affine),
:class:`BatchedPreprocess` must give what ``build_transforms(pre, train=False, load=False)``
gives item by item. Tolerance: 1e-5 absolute, times the largest |value| when that is over
1: the resample runs in float32 where MONAI's ``Spacing`` runs in float64, so for
un-scaled values (intensity ``none``, HU ~1000) the float32 rounding of the interpolated
value (~1e-4 at 1500) is what differs; after any intensity step values are O(1) and the
difference is <= ~2e-6. One explained exception (z-score after a resample) has its own test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medres.train.batched import BatchedPreprocess, RawImage
from medres.train.spec import TransformSpec, load_pipeline
from medres.train.transforms import build_transforms, image_to_metatensor, preprocessing_dict

PIPELINES = sorted((Path(__file__).resolve().parents[2] / "pipelines").glob("*.yaml"))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _affine(spacing, flips=(), perm=None, rotate=0.0) -> np.ndarray:
    n = len(spacing)
    a = np.eye(4)
    a[:n, :n] = np.diag(spacing)
    a[:3, 3] = [-10.5, 5.25, 3.0]
    if rotate:
        c, s = np.cos(rotate), np.sin(rotate)
        a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ a[:3, :3]
    for f in flips:
        a[:, f] *= -1
    if perm is not None:
        a[:, :n] = a[:, list(perm)]
    return a


def _images(dims: int, seed: int = 0, zeros: bool = True) -> list[RawImage]:
    """Varied tiny images: int16 / float32 (with exact zeros unless ``zeros`` is false), two
    equal geometries (one group) and others."""
    rng = np.random.default_rng(seed)
    if dims == 2:
        shapes = [(13, 11), (13, 11), (9, 16), (20, 7)]
        geo = [_affine((0.7, 0.8)), _affine((0.7, 0.8)), _affine((1.3, 1.0)), _affine((0.5, 2.0))]
    else:
        shapes = [(12, 14, 9), (12, 14, 9), (12, 14, 9), (10, 11, 7), (9, 8, 13)]
        geo = [
            _affine((0.7, 0.8, 1.0)),
            _affine((0.7, 0.8, 1.0)),
            _affine((0.7, 0.8, 1.0), flips=(0,), perm=(1, 0, 2)),
            _affine((1.2, 1.0, 2.0), flips=(2,)),
            _affine((1.0, 0.9, 1.1), rotate=0.3),  # oblique: the non-separable resample
        ]
    out = []
    for i, (shape, aff) in enumerate(zip(shapes, geo, strict=True)):
        if i % 2:
            arr = rng.normal(50, 300, size=shape).astype(np.float32)
            if zeros:  # z-score is over the non-zero voxels
                arr[rng.random(shape) < 0.2] = 0
        else:
            arr = rng.integers(-1000, 1500, size=shape).astype(np.int16)
        out.append(RawImage(arr, aff))
    return out


def _per_item(pre: dict, img: RawImage) -> torch.Tensor:
    tf = build_transforms(pre, train=False, load=False)
    li = SimpleNamespace(array=img.array, affine=img.affine, channels=img.channels)
    return torch.as_tensor(tf({"image": image_to_metatensor(li)})["image"])


def _spec(path: Path, dims: int, **changes) -> TransformSpec:
    """The pipeline's transforms resolved as training would (dims, channels, mean/std)."""
    spec = load_pipeline(path).transforms
    pipe = load_pipeline(path)
    size = (12, 10) if dims == 2 else (8, 9, 10)
    fields = {"dims": dims, "in_channels": 1, "image_size": size, "augment": False}
    if pipe.model.weights == "imagenet":
        fields.update(in_channels=3, mean=IMAGENET[0], std=IMAGENET[1])
    if spec.intensity == "auto":
        fields["intensity"] = "range"
    return dataclasses.replace(spec, **{**fields, **changes})


def _check(spec: TransformSpec, images: list[RawImage], device: str = "cpu") -> None:
    pre = preprocessing_dict(spec)
    got = BatchedPreprocess(pre, device=device)(images).cpu()
    want = torch.stack([_per_item(pre, im) for im in images])
    assert got.shape == want.shape
    assert got.dtype == torch.float32
    scale = max(1.0, float(want.abs().max()))  # un-scaled HU: 1e-5 of the value range
    torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=0.0)


VARIANTS = [
    {},
    {"spacing": (1.5, 1.5, 1.5)},
    {"resize_mode": "crop_pad"},
    {"intensity": "percentile"},
    {"intensity": "none", "spacing": (1.1, 0.9, 1.3)},
]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_batched_equals_per_item(path: Path, dims: int, variant: int) -> None:
    spec = _spec(path, dims, **VARIANTS[variant])
    zeros = not (spec.intensity == "zscore" and spec.spacing)  # see the test below
    _check(spec, _images(dims, seed=variant, zeros=zeros))


@pytest.mark.parametrize("dims", [2, 3])
def test_zscore_after_a_resample_with_exact_background(dims: int) -> None:
    """Explained difference: z-score over the non-zero voxels after a resample. MONAI's
    float64 ``grid_sample`` turns some exact-zero voxels into +-1e-15, which then count as
    foreground and shift the item's mean/std (by up to ~0.1 on these tiny images: 2 of 42
    foreground voxels); the batched path keeps grid-aligned voxels exact, so 0 stays 0.
    Bound: equal to MONAI's own chain when its resampled values below 1e-6 are taken as 0."""
    from monai.transforms import NormalizeIntensity, ResizeWithPadOrCrop

    spec = _spec(PIPELINES[0], dims, intensity="zscore", spacing=(1.5, 1.5, 1.5))
    spec = dataclasses.replace(spec, resize_mode="crop_pad", image_size=(40,) * dims)
    images = _images(dims, seed=1)
    got = BatchedPreprocess(preprocessing_dict(spec))(images)
    raw = preprocessing_dict(dataclasses.replace(spec, intensity="none", image_size=(80,) * dims))
    want = []
    for im in images:  # resampled by MONAI, background flushed, z-scored by MONAI, cropped
        x = _per_item(raw, im)
        x = torch.where(x.abs() < 1e-6, torch.zeros_like(x), x)
        x = NormalizeIntensity(nonzero=True, channel_wise=True)(x)
        want.append(torch.as_tensor(ResizeWithPadOrCrop(spec.image_size)(x)))
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-6)


def test_centre_slice_of_volumes_for_a_2d_model() -> None:
    spec = _spec(PIPELINES[0], 2, slice_mode="center", slice_axis=2, spacing=(1.5, 1.5, 1.5))
    _check(spec, _images(3))


@pytest.mark.parametrize("mode", ["first", "mean", "channels"])
def test_4d_volumes(mode: str) -> None:
    rng = np.random.default_rng(3)
    imgs = [RawImage(rng.normal(size=(9, 8, 7, 3)).astype(np.float32), _affine((1, 1, 2)))] * 2
    channels = 3 if mode == "channels" else 1
    spec = _spec(PIPELINES[0], 3, volume=mode, in_channels=channels, intensity="zscore")
    _check(spec, imgs)


def test_rgb_to_grey_and_grey_to_rgb() -> None:
    rng = np.random.default_rng(4)
    rgb = RawImage(rng.integers(0, 255, (14, 12, 3)).astype(np.uint8), _affine((1, 1)), 3)
    _check(_spec(PIPELINES[0], 2, in_channels=1, intensity="range"), [rgb, rgb])
    grey = RawImage(rng.integers(0, 255, (14, 12)).astype(np.uint8), _affine((1, 1)))
    _check(_spec(PIPELINES[0], 2, in_channels=3, intensity="range"), [grey])


def test_constant_image_and_all_zero_channel() -> None:
    flat = RawImage(np.full((10, 9), 7, np.int16), _affine((1, 1)))
    zero = RawImage(np.zeros((10, 9), np.float32), _affine((1, 1)))
    for intensity in ("range", "zscore", "percentile"):
        _check(_spec(PIPELINES[0], 2, intensity=intensity), [flat, zero])


def test_an_item_does_not_depend_on_its_batch_mates() -> None:
    spec = _spec(PIPELINES[0], 3, spacing=(1.5, 1.5, 1.5), intensity="zscore")
    bp = BatchedPreprocess(preprocessing_dict(spec))
    imgs = _images(3, seed=7)
    together = bp(imgs)
    for i, im in enumerate(imgs):
        assert torch.equal(bp([im])[0], together[i])


def test_fortran_order_volumes_as_nibabel_reads_them() -> None:
    """A Fortran-order array (a NIfTI volume as nibabel maps it) is taken as it lies; its
    result equals the per-item path, and does not depend on its batch-mates either."""
    spec = _spec(PIPELINES[0], 3, spacing=(1.5, 1.5, 1.5))
    imgs = [RawImage(np.asfortranarray(im.array), im.affine) for im in _images(3, seed=5)]
    assert not imgs[0].array.flags.c_contiguous
    _check(spec, imgs)
    bp = BatchedPreprocess(preprocessing_dict(spec))
    together = bp(imgs)
    for i, im in enumerate(imgs):
        assert torch.equal(bp([im])[0], together[i])


def test_matches_the_scoring_decoder_on_a_helper_model_dir(tmp_path: Path) -> None:
    """A model dir written by the test helpers (before this module existed): what scoring's
    decoder returns (the raw image), batched, equals the per-item path on the same files."""
    from helpers.models import write_model_dir, write_nifti_folder

    from medres.ingest.nifti import load_nifti
    from medres.models.modeldir import read_model_meta
    from medres.score.decode import MedresDecoder
    from medres.score.items import ScoreItem

    for dims, stored, size in ((2, (20, 17), (16, 16)), (3, (12, 10, 9), (8, 8, 8))):
        mdir = write_model_dir(tmp_path / f"m{dims}", dims=dims, image_size=size)
        pre = read_model_meta(mdir).preprocessing
        files = write_nifti_folder(tmp_path / f"i{dims}", 3, stored)
        dec = MedresDecoder(pre)
        raws = [dec(ScoreItem(f.stem, f.stem, f.name, "nifti", (str(f),))) for f in files]
        assert all(isinstance(r, RawImage) for r in raws)
        want = torch.stack([_per_item(pre, load_nifti(f)) for f in files])
        np.testing.assert_allclose(dec.batched(raws).numpy(), want.numpy(), atol=1e-5, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dims", [2, 3])
def test_cuda_equals_per_item_cpu(dims: int) -> None:
    for path in PIPELINES:
        _check(_spec(path, dims, spacing=(1.5, 1.5, 1.5)), _images(dims), device="cuda")
