"""The in-memory image that every reader returns and every writer/consumer takes.

Owns :class:`LoadedImage` and the output dtype rule shared by the DICOM decoder and the
NIfTI reader and writer (:func:`to_output_dtype`). Imports numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class LoadedImage:
    """One 2D image or 3D volume, decoded, validated, in medres' canonical orientation.

    ``array`` axes are (X, Y[, Z])[, C]: spatial axes first in the NIfTI order that
    ``affine`` maps (voxel index -> RAS+ world mm), a trailing channel axis only when
    ``channels > 1``. Values are the original values after the modality LUT (HU for CT).

    Raw identifiers (``patient_id`` ... ``accession``) exist only so that labels can be
    joined and pseudonyms made; they are never written anywhere.
    """

    array: np.ndarray
    affine: np.ndarray
    dims: int
    channels: int = 1
    modality: str = ""
    manufacturer: str = ""
    body_part: str = ""
    sex: str = ""
    age: float | None = None
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    accession: str = ""
    sources: list[str] = field(default_factory=list)
    n_slices: int = 1
    n_volumes: int = 1  # > 1: a trailing volume axis (X, Y, Z, T); meta["volume_axis"] says what
    warnings: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial axis (norms of the affine's columns)."""
        cols = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(round(v, 6)) for v in cols[: self.spatial_ndim])

    @property
    def spatial_ndim(self) -> int:
        return self.array.ndim - (1 if self.channels > 1 else 0) - (1 if self.n_volumes > 1 else 0)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape[: self.spatial_ndim])


def to_output_dtype(a: np.ndarray) -> np.ndarray:
    """int16 when every value is integral and fits, else float32."""
    if a.dtype == np.int16:
        return a
    if a.size == 0:
        return a.astype(np.int16)
    if a.dtype.kind in "iub":
        lo, hi = a.min(), a.max()
        if lo >= -32768 and hi <= 32767:
            return a.astype(np.int16)
        return a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        return a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if lo >= -32768 and hi <= 32767 and np.array_equal(a, np.round(a)):
        return a.astype(np.int16)
    return a.astype(np.float32)
