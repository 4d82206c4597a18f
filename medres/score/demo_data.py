"""Tiny synthetic inputs for scoring tests, the crash harness and ``benchmarks/score.py``.

Writes an untrained (seeded) model dir through the real ``medres.models`` saver with a
real saved ``preprocessing``, and folders of small NIfTI images, so that everything
downstream runs the production code path. Nothing here is used by ``medres score``.
"""

from __future__ import annotations

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

    from medres.models.modeldir import save_model_dir
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
    meta = {"task": task, "classes": list(classes), "preprocessing": pre}
    if task == "binary":
        meta["positive_class"] = str(classes[-1])
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
) -> Path:
    """One uncompressed 2D (DX, MONOCHROME2) DICOM file with the given UIDs."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 1000, size=(size, size)).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName, ds.AccessionNumber = patient_id, "Doe^Jane", accession
    ds.Modality, ds.InstanceNumber = "DX", 1
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = arr.tobytes()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out
