"""DICOM results for PACS: one TID 1500 measurement report per study (``--dicom-out``).

Optional extra ``medres[dicom-out]`` (highdicom). Choices:

- One Comprehensive SR (``1.2.840.10008.5.1.4.1.1.88.33``) per source study holding a
  standard **TID 1500 Measurement Report** (highdicom ``MeasurementReport``), written to
  ``OUT_DIR/dicom/<study_key>.dcm`` (named by the pseudonymous study key). Content:
  the device observer (medres, the model's architecture), procedure reported SCT
  363679005 "Imaging procedure", and per scored series one TID 1501 measurement group:
  a tracking identifier, the algorithm (``AlgorithmIdentification``: ``medres <arch>``,
  version = the first 16 hex digits of the model hash), the **classification as a coded
  finding** (the group's DCM 121071 "Finding" = the predicted class, coded
  ``99MEDRES``/class name: model classes have no standard code; highdicom reads it back
  as ``finding_type``), the probability of the
  positive class (binary) or of the predicted class as DCM 122157 "Probability" (UCUM
  "1"), the probability of every class under ``99MEDRES`` codes, each measurement with
  its source image reference (the stack's first instance). The evidence (one header per
  scored series, read without pixel data) is listed in the Current Requested Procedure
  Evidence Sequence: source StudyInstanceUID, SeriesInstanceUIDs, SOPInstanceUIDs.
- Deterministic UIDs: the SR's SeriesInstanceUID derives from (model hash, study), its
  SOPInstanceUID from (model hash, study, the scored series and their results). A re-run
  writes the same object, so a repeated ``--push`` stores no duplicate; a study that
  gained a series gets a new SR (new SOPInstanceUID) in the same SR series.
- Identity: without ``--keep-ids`` (the default) the SR carries only what the standard
  needs to link it to its study: **StudyInstanceUID** (the study the result belongs to;
  a PACS files the SR into the study by it) and the evidence/source image
  **SeriesInstanceUID + SOPClassUID + SOPInstanceUID** (the images the result was
  computed from, required by the evidence sequence and the image references). The
  type-2 patient and study attributes PatientName, PatientID, PatientBirthDate,
  PatientSex, AccessionNumber, ReferringPhysicianName, StudyID, StudyDate and StudyTime
  are present but **empty** (type 2; no keyed pseudonym: a PACS would file an empty ID as
  "unknown", a pseudonym as another patient). The rule is an allow-list, the one of every
  source header medres copies or caches (:func:`slim_header`): only the attributes of
  :data:`EVIDENCE_KEEP` (UIDs, Modality, the pixel description highdicom checks) and a
  minimal file meta survive, so nothing else of the source (OtherPatientIDs, clinical
  trial subject IDs, PatientComments, private tags, ...) can reach the patient and study
  modules highdicom copies. Consequence: a PACS that groups by PatientID
  (Orthanc does) shows the SR under an anonymous patient with the same StudyInstanceUID;
  ``--keep-ids`` copies the patient and study modules as they are, so the SR joins the
  source study in every viewer. The SR is written only when asked for, only into OUT_DIR,
  and leaves medres only with ``--push``.
- Every scored series of a study that was discovered in this run is included, also if
  it was committed by an earlier (interrupted) run; the SR file is rewritten atomically.

Imports: :mod:`medres.errors`, :mod:`medres.io`, :mod:`medres.score.ledger`; highdicom,
pydicom and :mod:`medres.ingest.pacs` (push) lazily.
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

# all that a source header keeps without --keep-ids, in the SR/SC evidence and in the PACS
# header cache: what links a derived object to its images, and the image pixel
# description highdicom checks a source image reference by (an allow-list: anything not
# named here, private tags included, is dropped)
EVIDENCE_KEEP = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "NumberOfFrames",
)
_META_KEEP = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")


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


@dataclass(frozen=True)
class Algorithm:
    """The model as the SR names it: ``name`` (``medres <arch>``), ``version`` and the
    positive class of a binary model ("" otherwise)."""

    name: str = "medres"
    version: str = "unknown"
    positive: str = ""


def write_ledger_srs(
    ledger: Ledger,
    model_hash: str,
    refs: Mapping[str, DicomRef],
    classes: Sequence[str],
    out_dir: Path,
    *,
    keep_ids: bool = False,
    algorithm: Algorithm | None = None,
    push_to: str | None = None,
) -> Path:
    """One SR per study of the ``ok`` ledger rows of ``model_hash`` whose item is in ``refs``
    (item key -> :class:`DicomRef`); returns ``out_dir``. Identity: see the module doc.
    ``push_to`` (a PACS URL) stores the SRs not stored there before (STOW-RS/C-STORE)."""
    results = [
        SeriesResult(ref.study_uid, ref.study_key, ref.header_path, r.scores, r.pred)
        for r in ledger.records(model_hash)
        if r.status == "ok" and (ref := refs.get(r.item_key)) is not None
    ]
    algo = algorithm or Algorithm(version=model_hash[:16])
    written = write_study_srs(results, out_dir, classes, keep_ids=keep_ids, algorithm=algo)
    if push_to:
        push_new(push_to, written, out_dir / ".pushed.json")
    return out_dir


def write_study_srs(
    results: Sequence[SeriesResult],
    out_dir: str | os.PathLike[str],
    classes: Sequence[str],
    *,
    manufacturer: str = "medres",
    keep_ids: bool = False,
    algorithm: Algorithm | None = None,
) -> list[Path]:
    """Write one SR per study of ``results``; returns the written paths (identity: see the
    module doc)."""
    hd = _require_highdicom()
    by_study: dict[str, list[SeriesResult]] = {}
    for r in results:
        by_study.setdefault(r.study_uid, []).append(r)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    algo = algorithm or Algorithm()
    written = [
        _write_one(hd, rows, out, classes, manufacturer, keep_ids, algo)
        for _, rows in sorted(by_study.items())
    ]
    log.info("wrote %d DICOM SR(s) to %s", len(written), out)
    return written


def _evidence(rows: Sequence[SeriesResult], keep_ids: bool) -> list[Any]:
    """One header (no pixel data) per series (:func:`reference_header`)."""
    return [reference_header(r.header_path, keep_ids) for r in rows]


def reference_header(path: str | os.PathLike[str], keep_ids: bool) -> Any:
    """The pixel-free header of a source image as a derived object may copy it: type-2
    attributes absent in the wild are added empty (SR and SC need them); without
    ``keep_ids`` identifiers emptied or removed (see the module doc)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if not keep_ids:
        ds = slim_header(ds)
    for kw in _TYPE2:
        if kw not in ds:
            setattr(ds, kw, "")
    return ds


def slim_header(ds: Any) -> Any:
    """A new dataset holding only the :data:`EVIDENCE_KEEP` attributes of ``ds`` and the
    file meta a file needs (SOP class/instance, transfer syntax): the one identity rule
    for source headers medres writes without ``--keep-ids``."""
    import pydicom

    slim = pydicom.Dataset()
    for kw in EVIDENCE_KEEP:
        if kw in ds:
            setattr(slim, kw, ds.data_element(kw).value)
    meta = pydicom.dataset.FileMetaDataset()
    old = getattr(ds, "file_meta", None)
    for kw in _META_KEEP:
        if old is not None and kw in old:
            setattr(meta, kw, old.data_element(kw).value)
    slim.file_meta = meta
    return slim


def _code(hd: Any, value: str, meaning: str) -> Any:
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


def _group(
    hd: Any, r: SeriesResult, ds: Any, classes: Sequence[str], algo: Algorithm, index: int
) -> Any:
    """The TID 1501 group of one series: finding, probabilities, source image."""
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algo_id = hd.sr.AlgorithmIdentification(name=algo.name, version=algo.version)
    source = [hd.sr.SourceImageForMeasurement.from_source_image(ds)]
    c_main = classes.index(algo.positive) if algo.positive in classes else None
    if c_main is None:
        c_main = max(range(len(classes)), key=lambda c: r.probs[c])

    def measure(name: Any, c: int) -> Any:
        return hd.sr.Measurement(
            name=name, value=float(r.probs[c]), unit=codes.UCUM.NoUnits,
            algorithm_id=algo_id, referenced_images=source,
        )  # fmt: skip

    measurements = [measure(codes.DCM.Probability, c_main)]
    measurements += [
        measure(_code(hd, f"P-{c_i}", f"Probability of {c}"), c_i) for c_i, c in enumerate(classes)
    ]
    c_pred = classes.index(r.pred) if r.pred in classes else None
    finding = _code(hd, f"C-{c_pred}" if c_pred is not None else "C-NONE", r.pred or "-")
    tracking = hd.sr.TrackingIdentifier(
        uid=generate_uid(entropy_srcs=["medres-track", algo.version, ds.SeriesInstanceUID]),
        identifier=f"medres series {index + 1}",
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=algo_id,
        finding_type=finding,
        measurements=measurements,
    )


def _report(hd: Any, groups: list[Any], algo: Algorithm) -> Any:
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["medres-device", algo.name]),
        name="medres",
        manufacturer_name="medres",
        model_name=algo.name[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )
    return hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )


def _write_one(
    hd: Any,
    rows: Sequence[SeriesResult],
    out: Path,
    classes: Sequence[str],
    manufacturer: str,
    keep_ids: bool,
    algo: Algorithm,
) -> Path:
    """The SR of one study, written atomically to ``out/<study_key>.dcm``."""
    from pydicom.uid import generate_uid

    from medres.io import atomic_open

    evidence = _evidence(rows, keep_ids)
    order = sorted(range(len(rows)), key=lambda i: str(evidence[i].SeriesInstanceUID))
    rows, evidence = [rows[i] for i in order], [evidence[i] for i in order]
    groups = [_group(hd, r, ds, classes, algo, i) for i, (r, ds) in enumerate(zip(rows, evidence, strict=True))]  # fmt: skip
    study = str(evidence[0].StudyInstanceUID)
    content = [algo.version, study] + [
        f"{ds.SOPInstanceUID}={','.join(repr(float(p)) for p in r.probs)}"
        for r, ds in zip(rows, evidence, strict=True)
    ]
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=_report(hd, groups, algo),
        series_instance_uid=generate_uid(entropy_srcs=["medres-sr-series", algo.version, study]),
        series_number=9901,
        sop_instance_uid=generate_uid(entropy_srcs=["medres-sr", *content]),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        series_description="medres AI result",
    )
    path = out / f"{rows[0].study_key or 'study'}.dcm"
    with atomic_open(path, "wb") as fh:
        sr.save_as(fh, enforce_file_format=True)
    return path


def push_new(url: str, paths: Sequence[Path], record: Path) -> int:
    """Store the objects (SRs, SCs) of ``paths`` whose SOPInstanceUID ``record`` (a JSON list) does not
    hold yet; returns how many were stored. A repeated run pushes nothing twice."""
    import json

    import pydicom

    from medres.ingest.pacs import push
    from medres.io import atomic_open

    done = set(json.loads(record.read_text())) if record.is_file() else set()
    todo = {}
    for p in paths:
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        if uid not in done:
            todo[uid] = p
    n = push(url, list(todo.values()))
    with atomic_open(record, "w") as fh:
        json.dump(sorted(done | set(todo)), fh)
    log.info("pushed %d object(s) to the PACS (%d already there)", n, len(paths) - len(todo))
    return n
