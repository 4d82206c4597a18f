"""Ground-truth records of a synthetic study set: :class:`TruthRow` (one per written
series, ``truth.csv``), ``labels.csv`` and :class:`SynthResult` (what ``generate`` wrote,
re-opened by :func:`load_result`).

Imports: numpy, ``medres.errors``, ``medres.io`` and, within the package,
:mod:`~medres.synth.spec` and :mod:`~medres.synth.plan`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medres.errors import ManifestError
from medres.io import atomic_write_text, csv_dict_reader, csv_dict_writer, csv_writer
from medres.synth.plan import SeriesPlan
from medres.synth.spec import SynthSpec

TRUTH_FIELDS = [
    "patient_id",
    "study_uid",
    "series_uid",
    "label",
    "kind",
    "modality",
    "defect",
    "defect_detail",
    "n_lesions",
    "lesion_x",
    "lesion_y",
    "lesion_z",
    "lesion_radius_mm",
    "lesion_value",
    "lesions",
    "shape",
    "spacing",
    "oblique",
    "photometric",
    "manufacturer",
    "accession",
    "series_index",
    "n_files",
    "paths",
]


@dataclass(frozen=True)
class TruthRow:
    """One planted series/image as written to ``truth.csv`` (lesion centres in world LPS mm)."""

    patient_id: str
    study_uid: str
    series_uid: str
    label: int
    kind: str
    modality: str
    defect: str
    defect_detail: str
    n_lesions: int
    lesion_x: float | None
    lesion_y: float | None
    lesion_z: float | None
    lesion_radius_mm: float | None
    lesion_value: float | None
    lesions: tuple[tuple[float, float, float, float], ...]
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    oblique: bool
    photometric: str
    manufacturer: str
    accession: str
    series_index: int
    n_files: int
    paths: tuple[str, ...]

    def to_csv(self) -> dict[str, str]:
        def f(v: float | None) -> str:
            return "" if v is None else f"{v:.4f}"

        formatted = {
            "lesion_x": f(self.lesion_x),
            "lesion_y": f(self.lesion_y),
            "lesion_z": f(self.lesion_z),
            "lesion_radius_mm": f(self.lesion_radius_mm),
            "lesion_value": f(self.lesion_value),
            "lesions": ";".join(" ".join(f"{v:.4f}" for v in les) for les in self.lesions),
            "shape": "x".join(str(v) for v in self.shape),
            "spacing": "x".join(f"{v:g}" for v in self.spacing),
            "oblique": "1" if self.oblique else "0",
            "paths": ";".join(self.paths),
        }
        return {k: formatted[k] if k in formatted else str(getattr(self, k)) for k in TRUTH_FIELDS}

    @classmethod
    def from_csv(cls, d: dict[str, str]) -> TruthRow:
        def f(v: str) -> float | None:
            return None if v == "" else float(v)

        return cls(
            patient_id=d["patient_id"],
            study_uid=d["study_uid"],
            series_uid=d["series_uid"],
            label=int(d["label"]),
            kind=d["kind"],
            modality=d["modality"],
            defect=d["defect"],
            defect_detail=d["defect_detail"],
            n_lesions=int(d["n_lesions"]),
            lesion_x=f(d["lesion_x"]),
            lesion_y=f(d["lesion_y"]),
            lesion_z=f(d["lesion_z"]),
            lesion_radius_mm=f(d["lesion_radius_mm"]),
            lesion_value=f(d["lesion_value"]),
            lesions=tuple(tuple(float(v) for v in s.split()) for s in d["lesions"].split(";") if s),  # type: ignore[misc]
            shape=tuple(int(v) for v in d["shape"].split("x")),
            spacing=tuple(float(v) for v in d["spacing"].split("x")),
            oblique=d["oblique"] == "1",
            photometric=d["photometric"],
            manufacturer=d["manufacturer"],
            accession=d["accession"],
            series_index=int(d["series_index"]),
            n_files=int(d["n_files"]),
            paths=tuple(p for p in d["paths"].split(";") if p),
        )


@dataclass(frozen=True)
class SynthResult:
    """What :func:`generate` wrote. Paths in ``truth`` rows are relative to ``out_dir``."""

    spec: SynthSpec
    out_dir: Path
    data_dir: Path
    labels_csv: Path
    truth_csv: Path
    truth: tuple[TruthRow, ...]
    archive: Path | None
    junk: tuple[Path, ...]
    n_files: int
    seconds: float

    def row(self, series_uid: str) -> TruthRow:
        for r in self.truth:
            if r.series_uid == series_uid:
                return r
        raise ManifestError(
            f"the requested series is not in {self.truth_csv}; pick a series_uid from that file"
        )

    def files(self, series_uid: str) -> list[Path]:
        return [self.out_dir / p for p in self.row(series_uid).paths]


def truth_row(spec: SynthSpec, plan: SeriesPlan, paths: list[Path], out_dir: Path) -> TruthRow:
    """The ``truth.csv`` row of ``plan`` written as ``paths`` (stored relative to ``out_dir``)."""
    g = plan.geometry
    world = [
        (*plan.geometry.local_to_world(np.array([le.x, le.y, le.z])).tolist(), le.radius)
        for le in plan.lesions
    ]
    first = plan.lesions[0] if plan.lesions else None
    return TruthRow(
        patient_id=plan.patient_id,
        study_uid=plan.study_uid,
        series_uid=plan.series_uid,
        label=plan.label,
        kind=spec.kind,
        modality=plan.modality,
        defect=plan.defect,
        defect_detail=plan.defect_detail,
        n_lesions=len(plan.lesions),
        lesion_x=world[0][0] if world else None,
        lesion_y=world[0][1] if world else None,
        lesion_z=world[0][2] if world else None,
        lesion_radius_mm=first.radius if first else None,
        lesion_value=first.value if first else None,
        lesions=tuple(tuple(round(v, 4) for v in w) for w in world),  # type: ignore[misc]
        shape=(g.rows, g.cols, g.slices) if spec.dims == 3 else (g.rows, g.cols),
        spacing=(g.row_sp, g.col_sp, g.slice_sp) if spec.dims == 3 else (g.row_sp, g.col_sp),
        oblique=plan.oblique,
        photometric=plan.photometric,
        manufacturer=plan.manufacturer,
        accession=plan.accession,
        series_index=plan.index,
        n_files=len(paths),
        paths=tuple(p.relative_to(out_dir).as_posix() for p in paths),
    )


def write_labels_csv(path: Path, plans: Sequence[SeriesPlan]) -> None:
    """``labels.csv``: ``patient_id,label``, one row per patient (its first series' label)."""
    labels: dict[str, int] = {}
    for pl in plans:
        labels.setdefault(pl.patient_id, pl.label)
    buf = io.StringIO()
    wr = csv_writer(buf, lineterminator="\n")
    wr.writerow(["patient_id", "label"])
    wr.writerows(labels.items())
    atomic_write_text(path, buf.getvalue())


def write_truth_csv(path: Path, rows: Sequence[TruthRow]) -> None:
    """``truth.csv``: the :data:`TRUTH_FIELDS` columns, one row per written series."""
    buf = io.StringIO()
    wr = csv_dict_writer(buf, TRUTH_FIELDS, lineterminator="\n")
    wr.writeheader()
    for r in rows:
        wr.writerow(r.to_csv())
    atomic_write_text(path, buf.getvalue())


def load_result(out_dir: str | os.PathLike[str]) -> SynthResult:
    """Re-open a set written by :func:`generate` (reads ``synth.json`` and ``truth.csv``)."""
    out = Path(out_dir)
    meta_path = out / "synth.json"
    if not meta_path.exists():
        raise ManifestError(f"{meta_path} is missing; point at a folder written by `medres synth`")
    meta = json.loads(meta_path.read_text())
    spec = SynthSpec.from_dict(meta["spec"])
    with open(out / "truth.csv", newline="") as fh:
        rows = tuple(TruthRow.from_csv(r) for r in csv_dict_reader(fh))
    return SynthResult(
        spec,
        out,
        out / meta["data_dir"],
        out / "labels.csv",
        out / "truth.csv",
        rows,
        out / meta["archive"] if meta.get("archive") else None,
        tuple(out / p for p in meta.get("junk", [])),
        int(meta["n_files"]),
        0.0,
    )
