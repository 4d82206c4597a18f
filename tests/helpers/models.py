"""Tiny synthetic inputs for scoring tests, the crash harness and ``benchmarks/score.py``.

Writes an untrained (seeded) model dir through the real ``medres.models`` saver with a
real saved ``preprocessing``, folders of small NIfTI images, and 2D DICOM files through
``medres.synth``'s writers, so that everything downstream runs the production code path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_model_dir(
    path: str | os.PathLike[str],
    *,
    arch: str = "resnet18",
    dims: int = 2,
    image_size: Sequence[int] = (16, 16),
    in_channels: int = 1,
    classes: Sequence[str] = ("0", "1"),
    task: str = "binary",
    stem: str = "auto",
    seed: int = 0,
) -> Path:
    """A seeded, untrained model dir (``weights.safetensors`` + ``model.json``)."""
    import torch

    from medres.models.modeldir import ModelMeta, save_model_dir
    from medres.models.resnet import build_model
    from medres.train.spec import TransformSpec
    from medres.train.transforms import preprocessing_dict

    torch.manual_seed(seed)
    model = build_model(arch, dims, in_channels, len(classes), stem=stem, image_size=image_size)
    pre = preprocessing_dict(
        TransformSpec(
            dims=dims,
            in_channels=in_channels,
            intensity="range",
            image_size=tuple(image_size),
            augment=False,
            orientation="RAS" if dims == 3 else "",
        )
    )
    positive = str(classes[-1]) if task == "binary" else None
    meta = ModelMeta.for_model(
        model, task=task, classes=tuple(classes), positive_class=positive, preprocessing=pre
    )
    return save_model_dir(Path(path), model, meta)


def write_nifti_folder(
    folder: str | os.PathLike[str],
    n: int,
    shape: Sequence[int] = (16, 16),
    *,
    seed: int = 0,
    start: int = 0,
    compress: bool = False,
) -> list[Path]:
    """``n`` random int16 NIfTI images named ``img{i:05d}.nii[.gz]``; returns their paths."""
    import nibabel as nib

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".nii.gz" if compress else ".nii"
    paths = []
    for i in range(start, start + n):
        arr = rng.integers(0, 1000, size=tuple(shape)).astype(np.int16)
        # a learnable-looking bright square in half of the images
        if i % 2:
            sl = tuple(slice(s // 4, s // 2) for s in shape)
            arr[sl] += 500
        p = out / f"img{i:05d}{suffix}"
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
        paths.append(p)
    return paths


def write_dicom_2d(
    path: str | os.PathLike[str],
    *,
    study_uid: str,
    series_uid: str,
    size: int = 16,
    seed: int = 0,
    patient_id: str = "PAT-0001",
    accession: str = "ACC0001",
    compression: str | None = None,
) -> Path:
    """One 2D radiograph (DX, MONOCHROME2, 12 bits stored) with the given UIDs, written by
    :func:`medres.synth.writers.write_2d` (``compression``: a ``medres.synth`` codec name)."""
    from medres.synth import SynthSpec, plan_series
    from medres.synth.writers import write_2d

    # synth plans images of 8 px or more; smaller test images keep the planned geometry
    plan_size = max(size, 8)
    spec = SynthSpec(kind="xray", n_patients=1, shape=(plan_size,) * 2, monochrome1_fraction=0.0)
    plan = plan_series(spec)[0]
    plan = dataclasses.replace(
        plan,
        geometry=dataclasses.replace(plan.geometry, rows=size, cols=size),
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=patient_id,
        patient_name="Doe^Jane",
        accession=accession,
        modality="DX",
        photometric="MONOCHROME2",
        defect="",
    )
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 1000, size=(size, size)).astype(np.uint16)
    out = Path(path)
    (written,) = write_2d(plan, arr, lambda inst, suffix: out, compression)
    return written
