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
- The SR is a derived object that carries raw identifiers by design; it is written only
  when asked for, and only into OUT_DIR.
- Every scored series of a study that was discovered in this run is included, also if
  it was committed by an earlier (interrupted) run; the SR file is rewritten atomically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medres.errors import ConfigError

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


def write_study_srs(
    results: Sequence[SeriesResult],
    out_dir: str | os.PathLike[str],
    classes: Sequence[str],
    *,
    manufacturer: str = "medres",
) -> list[Path]:
    """Write one SR per study of ``results``; returns the written paths."""
    hd = _require_highdicom()
    import pydicom
    from pydicom.uid import generate_uid

    from medres.io import atomic_open

    by_study: dict[str, list[SeriesResult]] = {}
    for r in results:
        by_study.setdefault(r.study_uid, []).append(r)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def code(value: str, meaning: str) -> object:
        return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)

    no_units = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
    written = []
    for _, rows in sorted(by_study.items()):
        evidence = [pydicom.dcmread(r.header_path, stop_before_pixels=True) for r in rows]
        for ds in evidence:  # type-2 attributes may be absent in the wild; SR needs them
            for kw in _TYPE2:
                if kw not in ds:
                    setattr(ds, kw, "")
        items = []
        for c_i, c in enumerate(classes):
            items.append(
                hd.sr.NumContentItem(
                    name=code(f"STUDY-P-{c_i}", f"Study max probability of {c}"),
                    value=max(r.probs[c_i] for r in rows),
                    unit=no_units,
                    relationship_type="CONTAINS",
                )
            )
        for r, ds in zip(rows, evidence, strict=True):
            series = hd.sr.ContainerContentItem(
                name=code("SERIES", f"Series {ds.get('SeriesNumber', '')}".strip()),
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
                        name=code(f"P-{c_i}", f"Probability of {c}"),
                        value=float(r.probs[c_i]),
                        unit=no_units,
                        relationship_type="CONTAINS",
                    )
                )
            children.append(
                hd.sr.TextContentItem(
                    name=code("PRED", "Predicted label"),
                    value=r.pred or "-",
                    relationship_type="CONTAINS",
                )
            )
            series.ContentSequence = hd.sr.ContentSequence(children)
            items.append(series)
        root = hd.sr.ContainerContentItem(name=code("RESULT", "medres AI result"))
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
        written.append(path)
    log.info("wrote %d DICOM SR(s) to %s", len(written), out)
    return written
