"""Real-size CT row of ``benchmarks/score.py``: one NIfTI volume to a 128^3 prediction.

A synthetic CT (int16 HU, 512x512x300 at 0.7x0.7x1.0 mm; ``--tiny``: 64x64x40) is scored by
a 3D ResNet-18 whose saved preprocessing resamples to 1.5 mm, windows (40, 400) and
resizes (area) to 128^3, two ways, alternately, per volume:

- ``medres``: ingest's NIfTI reader (``medres.ingest.nifti.load_nifti``) + the batched
  device-side preprocessing (:class:`medres.train.batched.BatchedPreprocess`, here on the
  CPU) + the model. NOTE: ``medres score`` does not use the batched path yet; this row
  times the batched function directly, not the CLI.
- ``monai``: ``monai.transforms.LoadImage`` + the per-item MONAI chain that scoring uses
  today (``build_transforms(pre, train=False, load=False)``: Orientation, Spacing
  (float64 ``grid_sample``), ScaleIntensityRange, Resize) + the same model.

Printed: per-stage seconds (load, preprocess, model) of each, the time ratio monai/medres
(target >= 3x on CPU; the model alone bounds it at monai/model), the load+preprocess ratio
(medres's reader maps the file, so reading is paid in its first preprocessing step), max |delta| of the two model inputs,
and the 1-minute load average after every repeat.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

FULL = ((512, 512, 300), (0.7, 0.7, 1.0), (128, 128, 128))
TINY = ((64, 64, 40), (0.7, 0.7, 1.0), (16, 16, 16))


def write_ct(path: Path, shape: tuple[int, ...], spacing: tuple[float, ...]) -> Path:
    """A synthetic CT-like int16 volume (air, a body ellipse of soft tissue, bone)."""
    import nibabel as nib

    x, y = np.ogrid[: shape[0], : shape[1]]
    cx, cy = shape[0] / 2, shape[1] / 2
    body = ((x - cx) / (0.42 * shape[0])) ** 2 + ((y - cy) / (0.32 * shape[1])) ** 2 < 1
    bone = ((x - cx) / (0.06 * shape[0])) ** 2 + ((y - cy * 1.4) / (0.05 * shape[1])) ** 2 < 1
    rng = np.random.default_rng(0)
    vol = np.full(shape, -1000, np.int16)
    vol[body] = 40
    vol[bone] = 700
    vol += rng.integers(-20, 20, size=shape, dtype=np.int16)
    aff = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(vol, aff), str(path))
    return path


def _preprocessing(size: tuple[int, ...]) -> dict[str, Any]:
    from medres.train.spec import TransformSpec
    from medres.train.transforms import preprocessing_dict

    spec = TransformSpec(
        dims=3, in_channels=1, intensity="ct_window", ct_window=(40.0, 400.0),
        spacing=(1.5, 1.5, 1.5), image_size=size, augment=False,
    )  # fmt: skip
    return preprocessing_dict(spec)


def _run_medres(path: Path, pre: dict[str, Any], model: Any) -> tuple[list[float], torch.Tensor]:
    from medres.ingest.nifti import load_nifti
    from medres.train.batched import BatchedPreprocess, RawImage

    t0 = time.perf_counter()
    img = load_nifti(path)
    t1 = time.perf_counter()
    x = BatchedPreprocess(pre)([RawImage(img.array, img.affine, img.channels)])
    t2 = time.perf_counter()
    with torch.inference_mode():
        model(x)
    t3 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2], x


def _run_monai(path: Path, pre: dict[str, Any], model: Any) -> tuple[list[float], torch.Tensor]:
    from monai.transforms import LoadImage

    from medres.train.transforms import build_transforms

    tf = build_transforms(pre, train=False, load=False)
    t0 = time.perf_counter()
    img = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    t1 = time.perf_counter()
    x = torch.as_tensor(tf({"image": img})["image"])[None].float()
    t2 = time.perf_counter()
    with torch.inference_mode():
        model(x)
    t3 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2], x


def bench_ct(root: Path, repeats: int, tiny: bool) -> dict[str, Any]:
    """Time both variants ``repeats`` times, alternately; returns the medians and ratios."""
    from medres.models.resnet import build_model

    shape, spacing, size = TINY if tiny else FULL
    path = write_ct(root / "ct.nii", shape, spacing)
    pre = _preprocessing(size)
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1, 2, stem="standard", image_size=size).eval()
    runs: dict[str, list[list[float]]] = {"medres": [], "monai": []}
    load1: list[float] = []
    delta = 0.0
    for rep in range(repeats):
        m, xm = _run_medres(path, pre, model)
        n, xn = _run_monai(path, pre, model)
        delta = float((xm - xn).abs().max())
        runs["medres"].append(m)
        runs["monai"].append(n)
        load1.append(os.getloadavg()[0])
        print(
            f"  ct rep {rep + 1}: medres {sum(m):.2f} s (load {m[0]:.2f}, prep {m[1]:.2f}, "
            f"model {m[2]:.2f})  monai {sum(n):.2f} s (load {n[0]:.2f}, prep {n[1]:.2f}, "
            f"model {n[2]:.2f})  (load average {load1[-1]:.1f})",
            flush=True,
        )
    med = {k: [statistics.median(r[i] for r in v) for i in range(3)] for k, v in runs.items()}
    tot = {k: statistics.median(sum(r) for r in v) for k, v in runs.items()}
    return {
        "workload": f"ct {'x'.join(map(str, shape))} -> {'x'.join(map(str, size))}",
        "medres_s": tot["medres"],
        "monai_s": tot["monai"],
        "stages_s": med,
        "monai/medres time": tot["monai"] / tot["medres"],
        # load + preprocess: medres's reader maps the file lazily, so its reading is paid
        # in the first preprocessing step; only the sum compares like with like
        "load+preprocess monai/medres": sum(med["monai"][:2]) / sum(med["medres"][:2]),
        "max_abs_delta_input": delta,
        "load1": load1,
    }


def print_ct(r: dict[str, Any]) -> None:
    """One summary line for the CT row."""
    print(
        f"\n{r['workload']}: medres {r['medres_s']:.2f} s/volume, MONAI LoadImage+Spacing+"
        f"Resize+model {r['monai_s']:.2f} s/volume: monai/medres {r['monai/medres time']:.2f}x "
        f"(load+preprocess alone {r['load+preprocess monai/medres']:.2f}x; max |dx| of the model "
        f"inputs {r['max_abs_delta_input']:.1e}; load average {min(r['load1']):.1f}-"
        f"{max(r['load1']):.1f}). medres = batched function timed directly, not `medres score`."
    )
