"""Transforms: load == image_to_metatensor (bit for bit), intensity, shapes, caching order."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Randomizable

from medres.errors import ConfigError
from medres.ingest.image import LoadedImage
from medres.train.spec import TransformSpec
from medres.train.transforms import build_transforms, image_to_metatensor, preprocessing_dict


def _affine(dims: int) -> np.ndarray:
    a = np.diag([0.7, 0.73, 2.5, 1.0])
    a[:3, 3] = [-10.1, 3.3, 7.7]
    return a


def _write(tmp_path, arr, affine, name="x.nii.gz"):
    p = tmp_path / name
    nib.save(nib.Nifti1Image(arr, affine), p)
    return p


@pytest.mark.parametrize(
    ("dims", "shape", "channels", "dtype", "intensity"),
    [
        (2, (50, 41), 1, np.int16, "range"),
        (2, (30, 28, 3), 3, np.float32, "percentile"),
        (3, (20, 18, 9), 1, np.int16, "ct_window"),
        (3, (20, 18, 9), 1, np.float32, "zscore"),
    ],
)
def test_load_and_metatensor_paths_are_bit_identical(
    tmp_path, dims, shape, channels, dtype, intensity
):
    rng = np.random.default_rng(0)
    arr = (rng.normal(0, 500, size=shape)).astype(dtype)
    aff = _affine(dims)
    path = _write(tmp_path, arr, aff)
    spec = TransformSpec(
        dims=dims,
        in_channels=3,
        image_size=(16,) * dims,
        intensity=intensity,
        mean=(0.5,),
        std=(0.25,),
        spacing=(1.0, 1.0, 2.0) if dims == 3 else (),
    )
    pre = preprocessing_dict(spec)  # what model.json stores
    from_file = build_transforms(pre, train=False)({"image": str(path), "channels": channels})[
        "image"
    ]
    # scoring: a LoadedImage straight from the decoder (float64 values, float64 affine)
    img = LoadedImage(array=arr.astype(np.float64), affine=aff, dims=dims, channels=channels)
    from_img = build_transforms(pre, train=False, load=False)({"image": image_to_metatensor(img)})[
        "image"
    ]
    assert type(from_file) is torch.Tensor
    assert from_file.dtype == torch.float32
    assert tuple(from_file.shape) == (3, *(16,) * dims)
    assert torch.equal(from_file, from_img)


def test_ct_window_maps_hu_to_unit_range_and_clips(tmp_path):
    arr = np.array([[-1000, -160], [240, 3000]], dtype=np.int16).repeat(4, 0).repeat(4, 1)
    path = _write(tmp_path, arr, np.eye(4))
    spec = TransformSpec(
        dims=2, in_channels=1, image_size=(8, 8), intensity="ct_window", ct_window=(40, 400)
    )
    out = build_transforms(spec, train=False)({"image": str(path)})["image"]
    vals = sorted(set(np.round(out.numpy().ravel(), 4)))
    assert vals == [0.0, 1.0]  # -1000 and -160 clip to 0; 240 and 3000 to 1
    spec2 = TransformSpec(
        dims=2, in_channels=1, image_size=(8, 8), intensity="ct_window", ct_window=(40, 800)
    )
    out2 = build_transforms(spec2, train=False)({"image": str(path)})["image"]
    assert sorted(set(np.round(out2.numpy().ravel(), 4))) == [0.0, 0.25, 0.75, 1.0]


def test_augmentation_only_in_training_and_deterministic_prefix_first(tmp_path):
    rng = np.random.default_rng(1)
    path = _write(tmp_path, rng.normal(0, 1, size=(32, 32)).astype(np.float32), np.eye(4))
    spec = TransformSpec(
        dims=2, in_channels=1, image_size=(32, 32), intensity="range", flip_prob=1.0
    )
    ev = build_transforms(spec, train=False)
    assert not any(isinstance(t, Randomizable) for t in ev.transforms)
    a = ev({"image": str(path)})["image"]
    b = ev({"image": str(path)})["image"]
    assert torch.equal(a, b)
    tr = build_transforms(spec, train=True)
    kinds = [isinstance(t, Randomizable) for t in tr.transforms]
    first_random = kinds.index(True)
    assert all(kinds[first_random:-1]), "random transforms must come after every deterministic one"
    tr.set_random_state(0)
    c = tr({"image": str(path)})["image"]
    assert c.shape == a.shape
    assert not torch.equal(c, a)
    no_aug = build_transforms(TransformSpec(**{**spec.__dict__, "augment": False}), train=True)
    assert torch.equal(no_aug({"image": str(path)})["image"], a)


def test_slice_from_3d(tmp_path):
    arr = np.zeros((8, 8, 5), dtype=np.float32)
    for z in range(5):
        arr[..., z] = z
    path = _write(tmp_path, arr, np.eye(4))
    spec = TransformSpec(
        dims=2,
        in_channels=1,
        image_size=(8, 8),
        intensity="none",
        slice_mode="random",
        slice_axis=2,
    )
    centre = build_transforms(spec, train=False)({"image": str(path)})["image"]
    assert centre.shape == (1, 8, 8)
    assert float(centre.mean()) == 2.0
    tr = build_transforms(TransformSpec(**{**spec.__dict__, "augment": False}), train=True)
    tr.set_random_state(3)
    seen = {float(tr({"image": str(path)})["image"].mean()) for _ in range(30)}
    assert len(seen) > 2 and seen <= {0.0, 1.0, 2.0, 3.0, 4.0}


def test_crop_pad_and_channel_average(tmp_path):
    arr = np.ones((10, 6, 3), dtype=np.float32) * np.array([0.0, 3.0, 6.0], dtype=np.float32)
    path = _write(tmp_path, arr, np.eye(4))
    spec = TransformSpec(
        dims=2, in_channels=1, image_size=(8, 8), intensity="none", resize_mode="crop_pad"
    )
    out = build_transforms(spec, train=False)({"image": str(path), "channels": 3})["image"]
    assert out.shape == (1, 8, 8)
    assert float(out[0, 4, 4]) == 3.0  # mean of the three channels
    assert float(out[0, 4, 0]) == 0.0  # zero padding along the short axis


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"intensity": "auto"}, "intensity"),
        ({"image_size": (16,)}, "image_size"),
        ({"dims": 4}, "dims"),
        ({"slice_mode": "center", "dims": 3, "image_size": (8, 8, 8)}, "slice_mode"),
        ({"mean": (0.5, 0.5), "std": (0.2,)}, "mean/std"),
        ({"flip_axes": (2,)}, "flip_axes"),
    ],
)
def test_invalid_preprocessing_is_config_error(change, needle):
    base = {"dims": 2, "in_channels": 1, "image_size": (16, 16), "intensity": "range"}
    with pytest.raises(ConfigError, match=needle):
        build_transforms(TransformSpec(**{**base, **change}), train=False)


def test_orientd_skips_identity_only_without_metadata() -> None:
    """A RAS-diagonal image without metadata tracking gets exactly what Orientation gives
    (same voxels, plain tensor); other affines, and tracking on, run Orientation."""
    import torch
    from monai.data import MetaTensor, set_track_meta
    from monai.transforms import Orientation

    from medres.ingest.nifti import is_ras_diagonal
    from medres.train.transforms import Orientd

    diag = torch.diag(torch.tensor([0.7, 0.8, 2.5, 1.0], dtype=torch.float64))
    flipped = diag.clone()
    flipped[0, 0] = -0.7
    x = torch.randn(1, 5, 6, 7)
    ref_op = Orientation(axcodes="RAS", labels=None)
    tf = Orientd("image", "RAS")
    try:
        for track in (False, True):
            set_track_meta(track)
            for aff in (diag, flipped):
                img = MetaTensor(x.clone(), affine=aff.clone())
                got = tf({"image": img})["image"]
                want = ref_op(MetaTensor(x.clone(), affine=aff.clone()))
                assert type(got) is type(want)
                assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))
                if track:
                    assert torch.equal(got.affine, want.affine)
                    assert len(got.applied_operations) == len(want.applied_operations) == 1
    finally:
        set_track_meta(True)
    assert is_ras_diagonal(diag) and not is_ras_diagonal(flipped)
    perm = torch.zeros(4, 4, dtype=torch.float64)
    perm[0, 1] = perm[1, 0] = perm[2, 2] = perm[3, 3] = 1.0
    shear = diag.clone()
    shear[0, 2] = 0.1
    assert not is_ras_diagonal(perm) and not is_ras_diagonal(shear)
