"""Real-size CT row of ``benchmarks/score.py``: one NIfTI volume to a 128^3 prediction.

A synthetic CT (int16 HU, 512x512x300 at 0.7x0.7x1.0 mm; ``--tiny``: 64x64x40) is scored by
a 3D ResNet-18 whose saved preprocessing resamples to 1.5 mm, windows (40, 400) and
resizes (area) to 128^3, two ways, alternately, per volume:

- ``medres``: the real ``medres score`` path (:func:`medres.score.score` on a model dir
  and a folder holding the volume, into a fresh OUT_DIR): ingest's NIfTI reader, the
  batched preprocessing (:class:`medres.train.batched.BatchedPreprocess`) on the scoring
  device (here the CPU), the model, the ledger commit. Timed: the scoring loop (listing,
  decoding, preprocessing, model, commit), not the model load or the CSV export (the
  ``monai`` variant's model is built before its clock starts too).
- ``monai``: ``monai.transforms.LoadImage`` + the per-item MONAI chain that scoring uses
  today (``build_transforms(pre, train=False, load=False)``: Orientation, Spacing
  (float64 ``grid_sample``), ScaleIntensityRange, Resize) + the same model.

Printed: per-stage seconds (load, preprocess, model) of ``monai``, the loop seconds of
``medres``, the time ratio monai/medres (target >= 3x on CPU; the model alone bounds it
at monai/model), max |delta p| of the two variants' probabilities, and the 1-minute load
average after every repeat.
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


def _model_dir(root: Path, pre: dict[str, Any], size: tuple[int, ...]) -> Path:
    """A seeded 3D ResNet-18 model dir with the CT preprocessing (the real saver)."""
    from medres.models.modeldir import ModelMeta, save_model_dir
    from medres.models.resnet import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1, 2, stem="standard", image_size=size).eval()
    meta = ModelMeta.for_model(
        model, task="binary", classes=("0", "1"), positive_class="1", preprocessing=pre
    )
    return save_model_dir(root / "model", model, meta)


def _run_medres(model_dir: Path, src: Path, out: Path) -> tuple[float, np.ndarray]:
    """``medres score`` (fp32, CPU) into a fresh ``out``: loop seconds and probabilities."""
    import csv
    import shutil

    from medres.score import ScoreConfig, score

    shutil.rmtree(out, ignore_errors=True)
    cfg = ScoreConfig(model_dir, (src,), out, batch_size=1, device="cpu", precision="fp32")
    s = score(cfg)
    with open(out / "scores.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    return s.seconds, np.array([float(row["prob_0"]), float(row["prob_1"])])


def _run_monai(path: Path, pre: dict[str, Any], model: Any) -> tuple[list[float], np.ndarray]:
    from monai.transforms import LoadImage

    from medres.train.transforms import build_transforms

    tf = build_transforms(pre, train=False, load=False)
    t0 = time.perf_counter()
    img = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    t1 = time.perf_counter()
    x = torch.as_tensor(tf({"image": img})["image"])[None].float()
    t2 = time.perf_counter()
    with torch.inference_mode():
        p = torch.softmax(model(x), 1)[0].numpy()
    t3 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2], p


def bench_ct(root: Path, repeats: int, tiny: bool) -> dict[str, Any]:
    """Time both variants ``repeats`` times, alternately; returns the medians and ratios."""
    from medres.models.modeldir import load_model_dir

    shape, spacing, size = TINY if tiny else FULL
    src = root / "ct"
    src.mkdir(parents=True, exist_ok=True)
    path = write_ct(src / "ct.nii", shape, spacing)
    pre = _preprocessing(size)
    model_dir = _model_dir(root, pre, size)
    model, _ = load_model_dir(model_dir)
    model.eval()
    runs: dict[str, list[Any]] = {"medres": [], "monai": []}
    load1: list[float] = []
    delta = 0.0
    for rep in range(repeats):
        m, pm = _run_medres(model_dir, src, root / "ct_out")
        n, pn = _run_monai(path, pre, model)
        delta = max(delta, float(np.abs(pm - pn).max()))
        runs["medres"].append(m)
        runs["monai"].append(n)
        load1.append(os.getloadavg()[0])
        print(
            f"  ct rep {rep + 1}: medres score {m:.2f} s  monai {sum(n):.2f} s (load "
            f"{n[0]:.2f}, prep {n[1]:.2f}, model {n[2]:.2f})  (load average {load1[-1]:.1f})",
            flush=True,
        )
    mon = [statistics.median(r[i] for r in runs["monai"]) for i in range(3)]
    tot = {"medres": statistics.median(runs["medres"]),
           "monai": statistics.median(sum(r) for r in runs["monai"])}  # fmt: skip
    return {
        "workload": f"ct {'x'.join(map(str, shape))} -> {'x'.join(map(str, size))}",
        "medres_s": tot["medres"],
        "monai_s": tot["monai"],
        "monai_stages_s": mon,
        "monai/medres time": tot["monai"] / tot["medres"],
        "monai/model bound": tot["monai"] / mon[2],
        "max_abs_delta_p": delta,
        "load1": load1,
    }


def print_ct(r: dict[str, Any]) -> None:
    """One summary line for the CT row."""
    print(
        f"\n{r['workload']}: medres score {r['medres_s']:.2f} s/volume, MONAI LoadImage+Spacing+"
        f"Resize+model {r['monai_s']:.2f} s/volume: monai/medres {r['monai/medres time']:.2f}x "
        f"(bound by the model alone: {r['monai/model bound']:.2f}x; max |dp| "
        f"{r['max_abs_delta_p']:.1e}; load average {min(r['load1']):.1f}-{max(r['load1']):.1f})"
    )


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="medres-bench-ct-") as tmp:
        print_ct(bench_ct(Path(tmp), 3 if "--tiny" not in sys.argv else 1, "--tiny" in sys.argv))
