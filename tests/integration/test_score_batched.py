"""`medres score` (raw decode + batched preprocessing on the device) scores a model dir as the
per-item MONAI path did before it (issue 18).

A model dir is written through the real saver (as any model dir written before the
batched path was: ``model.json``'s preprocessing is unchanged), then the same NIfTI files
are scored twice: (a) the old per-item path, ``build_transforms(pre, train=False,
load=False)`` on ``image_to_metatensor(load_nifti(f))`` and the model on each item, and
(b) :func:`medres.score.score`. Probabilities must agree within 1e-5 for every shipped
pipeline in 2D and 3D and for the spacing resample, ``slice_mode``, 4D volume modes and
channel handling, with images of mixed shapes, dtypes, spacings and orientations in one
run (so batches hold several groups, and groups of several items).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medres.ingest.nifti import load_nifti
from medres.models.modeldir import ModelMeta, load_model_dir, save_model_dir
from medres.models.resnet import build_model
from medres.score import ScoreConfig, score
from medres.train.spec import TransformSpec, load_pipeline
from medres.train.transforms import build_transforms, image_to_metatensor, preprocessing_dict

PIPELINES = sorted((Path(__file__).resolve().parents[2] / "pipelines").glob("*.yaml"))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TOL = 1e-5


def _spec(dims: int, path: Path | None = None, **changes) -> TransformSpec:
    """A pipeline's transforms resolved as training would, at a tiny image size."""
    spec = load_pipeline(path).transforms if path is not None else TransformSpec()
    fields = {"dims": dims, "in_channels": 1, "augment": False}
    fields["image_size"] = (12, 10) if dims == 2 else (8, 9, 10)
    if path is not None and load_pipeline(path).model.weights == "imagenet":
        fields.update(in_channels=3, mean=IMAGENET[0], std=IMAGENET[1])
    if spec.intensity == "auto":
        fields["intensity"] = "range"
    return dataclasses.replace(spec, **{**fields, **changes})


def _model_dir(root: Path, spec: TransformSpec) -> Path:
    torch.manual_seed(0)
    size = tuple(spec.image_size)
    model = build_model(
        "resnet18", spec.dims, spec.in_channels, 2, stem="standard", image_size=size
    )  # the strided stem: the default small stem costs seconds per 3D test
    meta = ModelMeta.for_model(
        model, task="binary", classes=("0", "1"), positive_class="1",
        preprocessing=preprocessing_dict(spec),
    )  # fmt: skip
    return save_model_dir(root / "model", model, meta)


def _affine(spacing, flip: bool) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = [-7.5, 3.25, 1.0]
    if flip:
        a[:, 0] *= -1
    return a


def _write(folder: Path, shapes, spacings, seed: int = 0, zeros: bool = True) -> list[Path]:
    """NIfTI files of the given shapes (int16 and float32 alternately, some flipped; with
    exact zeros in the float ones unless ``zeros`` is false)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i, (shape, sp) in enumerate(zip(shapes, spacings, strict=True)):
        if i % 2:
            arr = rng.normal(100, 300, size=shape).astype(np.float32)
            if zeros:  # z-score is over the non-zero voxels
                arr[rng.random(shape) < 0.2] = 0
        else:
            arr = rng.integers(-1000, 1500, size=shape).astype(np.int16)
        p = folder / f"im{i:02d}.nii"
        sp3 = (*sp, 1.0)[:3] if len(sp) < 3 else sp
        nib.save(nib.Nifti1Image(arr, _affine(sp3, flip=i % 3 == 2)), str(p))
        out.append(p)
    return out


def _old_path(model_dir: Path, files: list[Path]) -> dict[str, np.ndarray]:
    """The per-item path ``medres score`` took before the batched one."""
    model, meta = load_model_dir(model_dir)
    tf = build_transforms(meta.preprocessing, train=False, load=False)
    out = {}
    with torch.inference_mode():
        for f in files:
            x = torch.as_tensor(tf({"image": image_to_metatensor(load_nifti(f))})["image"])
            out[f.name] = torch.softmax(model.eval()(x[None].float()), 1)[0].numpy()
    return out


def _scored(model_dir: Path, src: Path, out: Path, **kw) -> dict[str, np.ndarray]:
    cfg = ScoreConfig(model_dir, (src,), out, device="cpu", precision="fp32", **kw)
    summary = score(cfg)
    assert summary.errors == 0
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {
        Path(r["source"]).name: np.array([float(r["prob_0"]), float(r["prob_1"])]) for r in rows
    }


def _compare(tmp_path: Path, spec: TransformSpec, shapes, spacings, **kw) -> float:
    model_dir = _model_dir(tmp_path, spec)
    # z-score after a resample: MONAI's float64 resample turns exact zeros into +-1e-15,
    # which count as foreground; the batched path keeps them 0 (explained and bounded in
    # tests/unit/test_batched_preprocess.py::test_zscore_after_a_resample_...): no zeros
    zeros = not (spec.intensity == "zscore" and spec.spacing)
    files = _write(tmp_path / "src", shapes, spacings, zeros=zeros)
    want = _old_path(model_dir, files)
    got = _scored(model_dir, tmp_path / "src", tmp_path / "out", **kw)
    assert set(got) == set(want)
    dp = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    assert dp <= TOL, f"max |dp| {dp:.2e} > {TOL}"
    return dp


SHAPES = {
    2: (
        [(13, 11), (13, 11), (13, 11), (9, 16), (20, 7)],
        [(0.7, 0.8)] * 3 + [(1.3, 1.0), (0.5, 2.0)],
    ),
    3: (
        [(12, 14, 9), (12, 14, 9), (12, 14, 9), (10, 11, 7), (9, 8, 13)],
        [(0.7, 0.8, 1.0)] * 3 + [(1.2, 1.0, 2.0), (1.0, 0.9, 1.1)],
    ),
}


# the default suite keeps one 2D and one 3D case (each a model build and two scorings);
# the rest are @slow (about 5 s of CPU each)
_FAST = {("radiograph_2d", 2), ("ct_3d", 3)}
CASES = [
    pytest.param(p, d, id=f"{p.stem}-{d}d", marks=() if (p.stem, d) in _FAST else pytest.mark.slow)
    for p in PIPELINES
    for d in (2, 3)
]


@pytest.mark.parametrize(("path", "dims"), CASES)
def test_score_equals_old_per_item_path(tmp_path: Path, path: Path, dims: int) -> None:
    # 3D with a spacing resample, 2D without: both kinds of geometry in the default suite
    spacing = {"spacing": (1.5, 1.5, 1.5)} if dims == 3 else {}
    spec = _spec(dims, path, **spacing)
    _compare(tmp_path, spec, *SHAPES[dims], batch_size=4, workers=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dims", "changes"),
    [
        (2, {"spacing": (1.1, 0.9), "intensity": "percentile"}),
        (2, {"slice_mode": "center", "intensity": "ct_window"}),  # 3D volumes, 2D model
        (3, {"resize_mode": "crop_pad", "intensity": "zscore"}),
    ],
    ids=["2d-spacing", "2d-slice", "3d-crop"],
)
def test_score_equals_old_path_geometry(tmp_path: Path, dims: int, changes: dict) -> None:
    spec = _spec(dims, **changes)
    shapes, spacings = SHAPES[3 if changes.get("slice_mode") else dims]
    _compare(tmp_path, spec, shapes, spacings, batch_size=3, workers=0)


@pytest.mark.slow
@pytest.mark.parametrize("volume", ["first", "mean", "channels"])
def test_score_equals_old_path_4d(tmp_path: Path, volume: str) -> None:
    spec = _spec(3, volume=volume, in_channels=3 if volume == "channels" else 1)
    shapes = [(10, 9, 8, 3)] * 3 + [(7, 9, 11, 3)]
    _compare(tmp_path, spec, shapes, [(1.0, 1.0, 1.0)] * 4, batch_size=4, workers=0)


@pytest.mark.slow
def test_score_equals_old_path_rgb_and_workers(tmp_path: Path) -> None:
    """RGB NIfTI (channels averaged to one, and kept as three), through the worker pool
    (``.nii.gz`` is decoded in isolated workers: raw images shipped back)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    rgb = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    files = []
    for i, shape in enumerate([(14, 12), (14, 12), (9, 17)]):
        arr = np.zeros(shape, rgb)
        for c in "RGB":
            arr[c] = rng.integers(0, 255, size=shape)
        p = src / f"rgb{i}.nii.gz"
        nib.save(nib.Nifti1Image(arr, np.diag([0.5, 0.6, 1.0, 1.0])), str(p))
        files.append(p)
    for n in (1, 3):
        spec = _spec(2, in_channels=n, intensity="range")
        model_dir = _model_dir(tmp_path / f"c{n}", spec)
        want = _old_path(model_dir, files)
        got = _scored(model_dir, src, tmp_path / f"out{n}", batch_size=4, workers=1)
        dp = max(float(np.abs(got[k] - want[k]).max()) for k in want)
        assert dp <= TOL, f"in_channels {n}: max |dp| {dp:.2e}"
