"""Tiny learnable NIfTI datasets + manifests for the train tests (no synth/ingest needed).

Positives carry a bright Gaussian blob at a random place on a noisy background, so a
ResNet learns them within an epoch or two. Splits are grouped by patient (one image per
patient) in the pattern train, train, train, val, test.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np

SPLIT_PATTERN = ("train", "train", "train", "val", "test")


def make_dataset(
    root: Path,
    *,
    n: int = 30,
    dims: int = 2,
    size: int = 24,
    seed: int = 0,
    modality: str = "DX",
    classes: int = 2,
    multilabel: bool = False,
) -> Path:
    """Write ``root/images/*.nii.gz`` and ``root/manifest.csv``; returns the manifest path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(size)] * dims, indexing="ij")
    rows = []
    for i in range(n):
        lab = i % classes
        arr = rng.normal(100, 20, size=(size,) * dims)
        for _ in range(lab):  # class k: k blobs
            c = rng.integers(size // 4, 3 * size // 4, size=dims)
            d2 = sum((g - cc) ** 2 for g, cc in zip(grid, c, strict=True))
            arr += 150 * np.exp(-d2 / (2 * (size / 8) ** 2))
        affine = np.diag([0.8] * 3 + [1.0])
        path = f"images/img{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(arr.astype(np.int16), affine), root / path)
        row = {
            "image_id": f"img-{i:016x}",
            "image_path": path,
            "source": "",
            "dims": str(dims),
            "channels": "1",
            "shape": "x".join([str(size)] * dims),
            "spacing": "x".join(["0.8"] * dims),
            "modality": modality,
            "manufacturer": "ACME",
            "body_part": "CHEST",
            "sex": "F" if i % 3 else "M",
            "age": str(40 + i % 30),
            "patient_key": f"p{i:015x}",
            "study_key": f"s{i:015x}",
            "series_key": f"r{i:015x}",
            "n_slices": "1",
            "warnings": "",
        }
        if multilabel:
            row["label_blob"] = str(int(lab > 0))
            row["label_even"] = str(int(i % 2 == 0))
        else:
            row["label"] = str(lab)
        row["split"] = SPLIT_PATTERN[i % len(SPLIT_PATTERN)]
        rows.append(row)
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return manifest
