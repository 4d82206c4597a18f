"""Ingest's worker tasks and their records: what one supervised worker does with one input.

``scan_task`` reads one file's header (DICOM or NIfTI); ``decode_task`` decodes and writes
one stack or NIfTI file and returns its :class:`~medres.ingest.records.ImageRecord`. Both
are module-level so that :class:`medres.workers.IsolatedPool` workers import them by name.

The work that may run outside the pool (``medres ingest``'s in-process rule, see
:mod:`medres.ingest.pipeline`, "In-process work") is defined here too: :func:`scan_task_lean`
(the lean header walk only: pure Python, no pydicom parser, no decoder library, at most
:data:`LOCAL_SCAN_MAX_BYTES` per file) and :func:`decodes_in_process` (a DICOM stack whose
every file is uncompressed little-endian monochrome, read with ``readinto`` and numpy only,
of at most :data:`LOCAL_DECODE_MAX_BYTES` of output).
This is ingest's public API for other stages (scoring reads files with the same tasks); the
orchestration lives in :mod:`medres.ingest.pipeline`. Imports: core, ``ingest.codes``,
``ingest.labels``, ``ingest.records``; ``ingest.dicom`` / ``ingest.nifti`` lazily (heavy).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.labels import id_keys
from medres.ingest.records import ImageRecord


@dataclass(frozen=True)
class ScanResult:
    """Header-scan outcome for one file: ``kind`` is ``dicom`` (with ``header``) or ``nifti``."""

    kind: str
    header: Any = None


def scan_task(item: tuple[Path, str]) -> ScanResult:
    """Classify one file by content and scan its DICOM header (pixels not read).

    DICOM is tried first (one open per DICOM file); only a file that is not DICOM is
    checked for a NIfTI header.
    """
    from medres.ingest import dicom, nifti

    path, source = item
    try:
        return ScanResult("dicom", dicom.scan_header(path, source))
    except IngestError as exc:
        if str(exc.code) == Code.NOT_DICOM.value:
            if nifti.is_nifti(path) or nifti.pair_data_header(path) is not None:
                return ScanResult("nifti")  # a pair's .img: joined to its .hdr (plan_jobs)
            _raise_named_nifti(path, source)
        raise


def _raise_named_nifti(path: Path, source: str) -> None:
    """A file named like NIfTI that is neither DICOM nor NIfTI is a broken NIfTI
    (``invalid_nifti`` with its cause), not ``not_dicom`` junk."""
    from medres.ingest import nifti

    named = nifti.named_nifti_error(path, source)
    if named is not None:
        raise named from None


# Files larger than this are header-scanned in the pool even when the lean walk would take
# them (the walk reads wanted values whole; a large file may declare a large one).
LOCAL_SCAN_MAX_BYTES = 64 << 20
# A stack is decoded in process only when its output (float32 at worst) fits in this, and in
# a quarter of --worker-memory-mb when that is set (what the pool would allow it).
LOCAL_DECODE_MAX_BYTES = 256 << 20
# Serial in-process decode cost (read, value mapping, reorientation, .nii write), measured
# on the project's 2-core CI-class machine: per file and per output byte.
_LOCAL_S_PER_FILE = 4e-4
_LOCAL_S_PER_BYTE = 4e-9


def scan_task_lean(item: tuple[Path, str]) -> ScanResult | None:
    """:func:`scan_task` for plain DICOM read by the lean walk alone and for files that are
    plainly not DICOM (no preamble, no plausible first element: NIfTI by content, else
    ``not_dicom``); ``None`` for every other file (it then goes to :func:`scan_task` in a
    worker). Raises the same coded ``IngestError`` as :func:`scan_task` would."""
    from medres.ingest.dicom.scan import scan_header_lean

    path, source = item
    try:
        if os.stat(path).st_size > LOCAL_SCAN_MAX_BYTES:
            return None
    except OSError:
        return None  # the worker reports it with its code
    try:
        header = scan_header_lean(path, source)
    except IngestError as exc:  # plainly not DICOM: NIfTI by content, else not_dicom
        from medres.ingest import nifti

        if str(exc.code) == Code.NOT_DICOM.value:
            if nifti.is_nifti(path) or nifti.pair_data_header(path) is not None:
                return ScanResult("nifti")  # a pair's .img: joined to its .hdr (plan_jobs)
            _raise_named_nifti(path, source)
        raise
    return None if header is None else ScanResult("dicom", header)


def decodes_in_process(job: DecodeJob, memory_mb: int | None = None) -> float | None:
    """The estimated in-process cost (s) of ``job`` when it may be decoded outside the pool:
    a DICOM stack of uncompressed little-endian monochrome files of one stored type, whose
    output fits :data:`LOCAL_DECODE_MAX_BYTES` (and a quarter of ``memory_mb``); else
    ``None``. Such a stack is read with ``readinto`` and mapped with numpy: no decoder
    library, memory and time bounded by its files' sizes."""
    if job.kind != "dicom":
        return None
    from medres.ingest.dicom.decode import fast_ok, stored_dtype

    stack = job.payload
    headers = getattr(stack, "headers", None)  # another kind of payload: the pool's
    if not headers or not all(fast_ok(h) for h in headers):
        return None
    if len({stored_dtype(h) for h in headers}) != 1:
        return None
    h0 = headers[0]
    grid = getattr(stack, "grid_positions", ())
    n_out = max(len(headers), round(grid[-1]) + 1 if grid else 0) * max(1, h0.number_of_frames)
    out_bytes = 4 * h0.rows * h0.cols * max(1, h0.samples_per_pixel) * n_out
    cap = LOCAL_DECODE_MAX_BYTES
    if memory_mb:
        cap = min(cap, (memory_mb << 20) // 4)
    if out_bytes > cap:
        return None
    return len(headers) * _LOCAL_S_PER_FILE + out_bytes * _LOCAL_S_PER_BYTE


@dataclass(frozen=True)
class DecodeJob:
    """One image to decode and write: a DICOM stack or a NIfTI file."""

    kind: str  # "dicom" | "nifti"
    payload: Any  # Stack | (path, source)
    image_id: str
    out_path: Path
    rel_path: str
    key: bytes
    min_slices: int
    sources: tuple[str, ...]
    group: str = ""


def decode_task(job: DecodeJob) -> ImageRecord:
    """Decode one image, write it atomically as NIfTI and return its record."""
    from medres.ingest import dicom, nifti

    if job.kind == "nifti":
        path, source = job.payload
        img = nifti.load_nifti(Path(path), source)
    else:
        img = dicom.load_stack(job.payload)
    # DICOM stacks are checked by group_stacks' GeometryPolicy(min_slices); NIfTI here
    if job.kind == "nifti" and img.dims == 3 and img.n_slices < job.min_slices:
        raise IngestError(
            f"{job.sources[0]}: 3D volume with {img.n_slices} slice(s), fewer than "
            f"--min-slices {job.min_slices}; lower --min-slices to keep it",
            code=Code.TOO_FEW_SLICES.value,
        )
    nifti.write_image(img, job.out_path)  # atomic (temp file + os.replace)
    keys = id_keys(
        job.key,
        patient_id=img.patient_id,
        study_uid=img.study_uid,
        series_uid=img.series_uid,
        accession=img.accession,
    )
    return ImageRecord(
        image_id=job.image_id,
        image_path=job.rel_path,
        source=job.sources[0] if job.kind == "nifti" else common_source(job.sources),
        dims=str(img.dims),
        channels=str(img.channels),
        shape="x".join(str(s) for s in img.shape),
        spacing="x".join(_num(s) for s in img.spacing),
        modality=img.modality or "",
        manufacturer=img.manufacturer or "",
        body_part=img.body_part or "",
        sex=img.sex or "",
        age="" if img.age is None else _num(img.age),
        **keys,
        n_slices=str(img.n_slices),
        n_volumes=str(img.n_volumes),
        volume_axis=str((img.meta.get("volume_axis") or {}).get("volume_axis", "")),
        warnings=";".join(dict.fromkeys(w.replace(";", ",") for w in img.warnings)),
        sources=tuple(job.sources),
        group=job.group,
    )


def _num(v: float) -> str:
    return f"{float(v):.6g}"


def common_source(sources: Sequence[str]) -> str:
    """The manifest ``source`` of an image: its one file, else the deepest common folder
    (``p01/ct`` for ``p01/ct/1.dcm`` ... ``p01/ct/90.dcm``; ``a.zip`` for members at its top)."""
    if len(sources) == 1:
        return sources[0]
    tokens = [re.split(r"([/!])", s) for s in sources]
    common: list[str] = []
    for parts in zip(*tokens, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    # keep whole components only: drop a trailing separator or partial component
    if len(common) % 2 == 0:
        common = common[:-1]
    if not common or any(len(t) == len(common) for t in tokens):
        return sorted(sources)[0]
    return "".join(common)
