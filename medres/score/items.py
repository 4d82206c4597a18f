"""The records that flow through scoring: :class:`ScoreItem` (a unit of work, made by
:mod:`medres.score.sources`) and :class:`Decoded` (what decoding made of it).

Imports: numpy only (a leaf of :mod:`medres.score`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ScoreItem:
    """One unit of scoring work (a NIfTI file, a DICOM stack or a manifest row).

    ``key`` is the pseudonymous item key (also the output ``image_id``). ``identity`` is
    the raw stable identity used only to compute the shard; it is never written.
    ``kind`` is ``nifti``, ``dicom`` or ``error`` (rejected during discovery, with
    ``code``/``message``). ``payload`` is whatever the decoder needs (paths, picklable).
    """

    key: str
    identity: str
    source: str
    kind: str
    payload: Any = None
    study_key: str = ""
    series_key: str = ""
    study_uid: str = ""
    accession: str = ""
    code: str = ""
    message: str = ""


@dataclass
class Decoded:
    """What decoding returns for one item: the model input array or an error."""

    item: ScoreItem
    array: np.ndarray | None = None
    code: str = ""
    message: str = ""
