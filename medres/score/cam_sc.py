"""Grad-CAM overlays as DICOM Secondary Capture images (``--cam K --dicom-out``).

Choices:

- One SC image (``1.2.840.10008.5.1.4.1.1.7``, highdicom ``SCImage.from_ref_dataset``)
  per explained DICOM item, made from the overlay PNG that :mod:`medres.score.cam` wrote
  (RGB, 8 bits: exactly the picture a user sees in ``OUT_DIR/cam/``), written to
  ``OUT_DIR/dicom/cam-<item key>.dcm`` and, with ``--push``, stored with the SRs.
- It joins the source study: StudyInstanceUID and the patient/study modules come from
  the source header through :func:`medres.score.dicom_out.reference_header`, so the
  identity rule is the SR's (without ``--keep-ids``: patient and study identifiers
  present but empty, other identifiers removed; see ``docs/pacs.md``). The image holds
  no burned-in identity (its title is the pseudonymous item key and the probability):
  BurnedInAnnotation ``NO``.
- Deterministic UIDs: the SC series from (model hash, study), the instance from (model
  hash, item key, the PNG's bytes): a re-run writes the same object, a repeated
  ``--push`` stores nothing twice.
- Items that are not DICOM (NIfTI) have no study to join and get no SC.

Imports: numpy, :mod:`medres.io`, :mod:`medres.score.dicom_out`; highdicom, pydicom and
matplotlib lazily.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medres.io import atomic_open
from medres.score.dicom_out import Algorithm, DicomRef, reference_header

log = logging.getLogger(__name__)

SERIES_NUMBER = 9902


def _rgb(png: Path) -> np.ndarray:
    """The PNG as an (rows, columns, 3) uint8 array."""
    import matplotlib.image as mpimg

    a = mpimg.imread(png)  # float in [0, 1] for PNG, (H, W, 3 or 4)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(np.asarray(a, np.float64) * 255), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def write_cam_scs(
    cam_dir: Path,
    refs: Mapping[str, DicomRef],
    out_dir: Path,
    *,
    keep_ids: bool = False,
    algorithm: Algorithm | None = None,
) -> list[Path]:
    """One SC per ``cam_dir/<item key>.png`` whose item is a DICOM item of ``refs``;
    returns the written paths (see the module doc)."""
    from medres.score.dicom_out import _require_highdicom

    hd = _require_highdicom()
    from pydicom.uid import generate_uid

    algo = algorithm or Algorithm()
    written: list[Path] = []
    pngs = sorted(p for p in cam_dir.glob("*.png") if p.stem in refs) if cam_dir.is_dir() else []
    for n, png in enumerate(pngs, start=1):
        ref = refs[png.stem]
        src = reference_header(ref.header_path, keep_ids)
        digest = hashlib.sha256(png.read_bytes()).hexdigest()
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=src,
            pixel_array=_rgb(png),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            patient_orientation=("R", "P"),  # emptied below (highdicom wants a value here)
            series_instance_uid=generate_uid(
                entropy_srcs=["medres-cam-series", algo.version, ref.study_uid]
            ),
            series_number=SERIES_NUMBER,
            sop_instance_uid=generate_uid(
                entropy_srcs=["medres-cam", algo.version, png.stem, digest]
            ),
            instance_number=n,
            manufacturer="medres",
            series_description=f"{algo.name} Grad-CAM",
        )
        sc.BurnedInAnnotation = "NO"
        # a rendered figure (title, margins, a montage of three planes for 3D): no row or
        # column direction holds for the whole picture, so PatientOrientation (type 2C)
        # is present and empty ("unknown") rather than a claim a viewer would trust
        sc.PatientOrientation = ""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"cam-{png.stem}.dcm"
        with atomic_open(path, "wb") as fh:
            sc.save_as(fh, enforce_file_format=True)
        written.append(path)
    if written:
        log.info("wrote %d Grad-CAM secondary capture(s) to %s", len(written), out_dir)
    return written
