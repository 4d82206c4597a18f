"""``ImageRecord``: what ingest knows about one written image (one manifest row and more).

:func:`medres.ingest.tasks.decode_task` returns one per image; the pipeline joins labels
onto it, writes :meth:`ImageRecord.manifest_row` to ``manifest.csv`` and keeps the whole
record (internal fields included) in the incremental cache (:meth:`to_cache` /
:meth:`from_cache`). The manifest fields hold their manifest strings (``"3"``,
``"64x64x20"``, ``""`` = unknown); the column order is :data:`MANIFEST_COLUMNS`
(:mod:`medres.dataset.manifest`). Imports: ``medres.dataset.manifest`` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from medres.dataset.manifest import MANIFEST_COLUMNS

# manifest columns an image record fills (labels and split are joined later)
RECORD_COLUMNS: tuple[str, ...] = tuple(c for c in MANIFEST_COLUMNS if c not in ("label", "split"))
# fields copied from free-text header values (filtered by medres.phi before any output)
FREE_TEXT_FIELDS: tuple[str, ...] = ("modality", "manufacturer", "body_part", "sex", "warnings")


@dataclass(frozen=True)
class ImageRecord:
    """One decoded image: its manifest fields plus the internal ones never written there.

    Internal fields: ``accession_key`` (for labels keyed by accession), ``sources`` (every
    input file behind the image, raw relative paths: for ``path`` labels and accounting)
    and ``group`` (its cache group: a DICOM series or NIfTI file, by pseudonyms).
    """

    image_id: str
    image_path: str
    source: str
    dims: str
    channels: str
    shape: str
    spacing: str
    modality: str = ""
    manufacturer: str = ""
    body_part: str = ""
    sex: str = ""
    age: str = ""
    patient_key: str = ""
    study_key: str = ""
    series_key: str = ""
    n_slices: str = ""
    n_volumes: str = ""
    volume_axis: str = ""
    warnings: str = ""
    accession_key: str = ""
    sources: tuple[str, ...] = ()
    group: str = ""

    def manifest_row(self) -> dict[str, str]:
        """The manifest columns this record fills, in manifest order."""
        return {c: str(getattr(self, c, "")) for c in RECORD_COLUMNS}

    def to_cache(self) -> dict[str, Any]:
        """The JSON form kept in ``.medres_cache.json`` (``sources`` as a list)."""
        data = asdict(self)
        data["sources"] = list(self.sources)
        return data

    @classmethod
    def from_cache(cls, data: Mapping[str, Any]) -> ImageRecord:
        """The inverse of :meth:`to_cache`; raises ``KeyError``/``TypeError``/``ValueError``
        on a malformed entry (the caller then voids the cache)."""
        if not isinstance(data, Mapping):
            raise TypeError("cache record is not an object")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "sources":
                sources = data.get("sources", [])
                if not isinstance(sources, list):
                    raise TypeError("cache record sources is not a list")
                values["sources"] = tuple(str(s) for s in sources)
            elif f.name in data:
                values[f.name] = str(data[f.name])
            elif f.default is MISSING:
                raise KeyError(f.name)
        return cls(**values)
