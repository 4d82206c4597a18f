"""DICOM results for PACS: one Comprehensive SR per study (``medres score --dicom-out``).

Optional extra ``medres[dicom-out]`` (highdicom). Choices:

- One Comprehensive SR (``1.2.840.10008.5.1.4.1.1.88.33``) per source study, written to
  ``OUT_DIR/dicom/<study_key>.dcm`` (file named by the pseudonymous study key). highdicom
  copies the patient and study module from the evidence, so the SR joins the source
  study in PACS; the evidence (one header per scored series, read without pixel data)
  is listed in the Current Requested Procedure Evidence Sequence, so it references the
  source StudyInstanceUID, SeriesInstanceUIDs and SOPInstanceUIDs.
- Content: a container "medres AI result" holding the study-level aggregate (max over
  its series) and, per series, the probability of every class (unit "no units") and the
  predicted label, under private codes (scheme ``99MEDRES``): not a TID 1500 report.
- Identity: without ``--keep-ids`` (the default) the SR carries no patient or study
  identifier besides the UIDs that link it to the study: PatientName, PatientID,
  PatientBirthDate, AccessionNumber and ReferringPhysicianName are present but **empty**
  (type 2, no keyed pseudonym: a PACS would file an empty ID as "unknown", a pseudonym as
  another patient), and :data:`_DROPPED` identifiers (OtherPatientIDs, IssuerOfPatientID,
  ...) are removed from the evidence before highdicom copies its patient and study
  modules. StudyInstanceUID, the evidence SeriesInstanceUIDs and SOPInstanceUIDs are kept.
  With ``--keep-ids`` the patient and study modules are copied as they are. The SR is
  written only when asked for, and only into OUT_DIR.
- Every scored series of a study that was discovered in this run is included, also if
  it was committed by an earlier (interrupted) run; the SR file is rewritten atomically.

Imports: :mod:`medres.errors`, :mod:`medres.io`, :mod:`medres.score.ledger`; highdicom and
pydicom lazily.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medres.errors import ConfigError
from medres.score.ledger import Ledger

log = logging.getLogger(__name__)

SCHEME = "99MEDRES"
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

# emptied in the SR without --keep-ids (type 2: present but empty)
_BLANKED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "ReferringPhysicianName",
)
# removed from the evidence without --keep-ids
_DROPPED = (
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "IssuerOfPatientID",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "ReferringPhysicianIdentificationSequence",
    "StudyID",
)


@dataclass(frozen=True)
class DicomRef:
    """Where a DICOM item's SR goes: its study UID and key, and one header file of it."""

    study_uid: str
    study_key: str
    header_path: str


@dataclass(frozen=True)
class SeriesResult:
    """One scored DICOM stack: a header file of it, its probabilities and prediction."""

    study_uid: str
    study_key: str
    header_path: str
    probs: tuple[float, ...]
    pred: str


def _require_highdicom():
    try:
        import highdicom
    except ImportError:
        raise ConfigError("--dicom-out needs highdicom: pip install 'medres[dicom-out]'") from None
    return highdicom


def write_ledger_srs(
    ledger: Ledger,
    model_hash: str,
    refs: Mapping[str, DicomRef],
    classes: Sequence[str],
    out_dir: Path,
    *,
    keep_ids: bool = False,
) -> Path:
    """One SR per study of the ``ok`` ledger rows of ``model_hash`` whose item is in ``refs``
    (item key -> :class:`DicomRef`); returns ``out_dir``. Identity: see the module doc."""
    results = [
        SeriesResult(ref.study_uid, ref.study_key, ref.header_path, r.scores, r.pred)
        for r in ledger.records(model_hash)
        if r.status == "ok" and (ref := refs.get(r.item_key)) is not None
    ]
    write_study_srs(results, out_dir, classes, keep_ids=keep_ids)
    return out_dir


def write_study_srs(
    results: Sequence[SeriesResult],
    out_dir: str | os.PathLike[str],
    classes: Sequence[str],
    *,
    manufacturer: str = "medres",
    keep_ids: bool = False,
) -> list[Path]:
    """Write one SR per study of ``results``; returns the written paths (identity: see the
    module doc)."""
    hd = _require_highdicom()
    by_study: dict[str, list[SeriesResult]] = {}
    for r in results:
        by_study.setdefault(r.study_uid, []).append(r)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _write_one(hd, rows, out, classes, manufacturer, keep_ids)
        for _, rows in sorted(by_study.items())
    ]
    log.info("wrote %d DICOM SR(s) to %s", len(written), out)
    return written


def _evidence(rows: Sequence[SeriesResult], keep_ids: bool) -> list[Any]:
    """One header (no pixel data) per series; type-2 attributes absent in the wild are
    added empty (the SR needs them); without ``keep_ids`` identifiers emptied or removed."""
    import pydicom

    evidence = [pydicom.dcmread(r.header_path, stop_before_pixels=True) for r in rows]
    for ds in evidence:
        if not keep_ids:
            for kw in _DROPPED:
                if kw in ds:
                    delattr(ds, kw)
            for kw in _BLANKED:
                setattr(ds, kw, "")
        for kw in _TYPE2:
            if kw not in ds:
                setattr(ds, kw, "")
    return evidence


def _code(hd: Any, value: str, meaning: str) -> Any:
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


def _no_units(hd: Any) -> Any:
    return hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")


def _study_items(hd: Any, rows: Sequence[SeriesResult], classes: Sequence[str]) -> list[Any]:
    """The study-level aggregate: the max over its series of every class probability."""
    return [
        hd.sr.NumContentItem(
            name=_code(hd, f"STUDY-P-{c_i}", f"Study max probability of {c}"),
            value=max(r.probs[c_i] for r in rows),
            unit=_no_units(hd),
            relationship_type="CONTAINS",
        )
        for c_i, c in enumerate(classes)
    ]


def _series_item(hd: Any, r: SeriesResult, ds: Any, classes: Sequence[str]) -> Any:
    """One series container: its UID, the probability of every class, the prediction."""
    series = hd.sr.ContainerContentItem(
        name=_code(hd, "SERIES", f"Series {ds.get('SeriesNumber', '')}".strip()),
        relationship_type="CONTAINS",
    )
    children = [
        hd.sr.UIDRefContentItem(
            name=hd.sr.CodedConcept("112002", "DCM", "Series Instance UID"),
            value=ds.SeriesInstanceUID,
            relationship_type="CONTAINS",
        )
    ]
    for c_i, c in enumerate(classes):
        children.append(
            hd.sr.NumContentItem(
                name=_code(hd, f"P-{c_i}", f"Probability of {c}"),
                value=float(r.probs[c_i]),
                unit=_no_units(hd),
                relationship_type="CONTAINS",
            )
        )
    children.append(
        hd.sr.TextContentItem(
            name=_code(hd, "PRED", "Predicted label"),
            value=r.pred or "-",
            relationship_type="CONTAINS",
        )
    )
    series.ContentSequence = hd.sr.ContentSequence(children)
    return series


def _write_one(
    hd: Any,
    rows: Sequence[SeriesResult],
    out: Path,
    classes: Sequence[str],
    manufacturer: str,
    keep_ids: bool,
) -> Path:
    """The SR of one study, written atomically to ``out/<study_key>.dcm``."""
    from pydicom.uid import generate_uid

    from medres.io import atomic_open

    evidence = _evidence(rows, keep_ids)
    items = _study_items(hd, rows, classes)
    items += [_series_item(hd, r, ds, classes) for r, ds in zip(rows, evidence, strict=True)]
    root = hd.sr.ContainerContentItem(name=_code(hd, "RESULT", "medres AI result"))
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=root,
        series_instance_uid=generate_uid(),
        series_number=9901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
    )
    path = out / f"{rows[0].study_key or 'study'}.dcm"
    with atomic_open(path, "wb") as fh:
        sr.save_as(fh, enforce_file_format=True)
    return path
