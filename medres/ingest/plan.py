"""Planning: scanned headers and NIfTI inputs -> one decode job per image to write.

DICOM headers are grouped into stacks (:func:`medres.ingest.dicom.group_stacks`, imported
only when there is something to group); each kept stack and each NIfTI file becomes a
:class:`~medres.ingest.tasks.DecodeJob` with its PHI-free ``image_id`` and its cache
fingerprint. Planning also builds the cache groups (per DICOM series and per NIfTI file:
the fingerprints of all its files and the rejections inside it) and records grouping
rejections in the ledger. Imports: core, ``ingest.accounting``, ``ingest.cache``,
``ingest.config``, ``ingest.discover``, ``ingest.identity``, ``ingest.tasks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from medres.ingest.accounting import Ledger, grouping_rejections
from medres.ingest.cache import CacheGroup, group_id, image_fingerprint
from medres.ingest.config import IMAGES_DIR, IngestConfig
from medres.ingest.discover import InputFile
from medres.ingest.identity import nifti_identity, stack_identity, unique_image_id
from medres.ingest.tasks import DecodeJob
from medres.phi import pseudonym

# a decode job with the fingerprint of its image
PlannedJob = tuple[str, DecodeJob]


@dataclass
class _Planner:
    """Makes decode jobs with distinct image ids and their fingerprints."""

    config: IngestConfig
    key: bytes
    by_source: dict[str, InputFile]
    jobs: list[PlannedJob] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)

    def add(self, kind: str, payload: Any, identity: str, sources: tuple[str, ...], gid: str):
        image_id, _ = unique_image_id(identity, self.key, self.taken)
        suffix = ".nii.gz" if self.config.compress else ".nii"
        rel = f"{IMAGES_DIR}/{image_id}{suffix}"
        parts = [(s, self.by_source[s].fingerprint) for s in sources]
        job = DecodeJob(
            kind,
            payload,
            image_id,
            self.config.out_dir / IMAGES_DIR / f"{image_id}{suffix}",
            rel,
            self.key,
            self.config.min_slices,
            sources,
            gid,
        )
        self.jobs.append((image_fingerprint(parts, self.config), job))


def plan_jobs(
    headers: Sequence[Any],
    niftis: Sequence[InputFile],
    files: Sequence[InputFile],
    config: IngestConfig,
    key: bytes,
    ledger: Ledger,
) -> tuple[list[PlannedJob], dict[str, CacheGroup]]:
    """Group headers into stacks and make one decode job (with its fingerprint) per image.

    Also returns the cache groups: per DICOM series (and per NIfTI file) the fingerprints of
    all its files and the rejections inside it, so that a later run can trust the whole
    series without reading its headers.
    """
    by_source = {f.source: f for f in files}
    groups: dict[str, CacheGroup] = {}
    header_group: dict[str, str] = {}
    gids: dict[tuple[str, str], str] = {}  # one pair of keyed hashes per series, not per file
    for h in headers:
        ident = (h.study_uid, h.series_uid)
        gid = gids.get(ident) or gids.setdefault(ident, group_id(h, key))
        header_group[h.source] = gid
        groups.setdefault(gid, CacheGroup()).inputs[h.source] = by_source[h.source].fingerprint
    planner = _Planner(config, key, by_source)
    if headers:
        _plan_stacks(headers, header_group, groups, planner, ledger)
    images, data_of = _join_pairs(niftis, ledger)
    for f in images:
        gid = f"nifti|{pseudonym(f.source, key)}"
        parts = (f, *data_of.get(f.source, ()))  # a .hdr with its .img: one image, both used
        groups[gid] = CacheGroup({p.source: p.fingerprint for p in parts})
        sources = tuple(p.source for p in parts)
        planner.add("nifti", (f.path, f.source), nifti_identity(f.source), sources, gid)
    return planner.jobs, groups


def _join_pairs(
    niftis: Sequence[InputFile], ledger: Ledger
) -> tuple[list[InputFile], dict[str, list[InputFile]]]:
    """The NIfTI inputs to read (every one but the data files of ``.hdr``/``.img`` pairs)
    and, per ``.hdr`` source, its pair data files: those are read through the header and
    accounted with its image. A data file whose ``.hdr`` is not among the inputs (rejected,
    or outside the SOURCE) is rejected naming it."""
    from pathlib import Path

    from medres.ingest.nifti import is_nifti, pair_data_header

    by_path = {str(Path(f.path)): f for f in niftis}
    images: list[InputFile] = []
    data_of: dict[str, list[InputFile]] = {}
    for f in niftis:
        hdr = pair_data_header(Path(f.path))
        if hdr is None or is_nifti(Path(f.path)):
            images.append(f)
            continue
        owner = by_path.get(str(hdr))
        if owner is None:
            ledger.reject(
                f.source, "invalid_nifti",
                f"{f.source}: the data file of {hdr.name}, whose header was not read (see "
                f"its row in errors.csv); fix or replace {hdr.name}",
            )  # fmt: skip
        else:
            data_of.setdefault(owner.source, []).append(f)
    return images, data_of


def _plan_stacks(
    headers: Sequence[Any],
    header_group: dict[str, str],
    groups: dict[str, CacheGroup],
    planner: _Planner,
    ledger: Ledger,
) -> None:
    """Group DICOM headers into stacks: a job per kept stack, a rejection per other file."""
    from medres.ingest import dicom  # imported only when there is something to group

    policy = dicom.GeometryPolicy(
        min_slices=planner.config.min_slices, uneven_spacing=planner.config.uneven_spacing
    )
    stacks, rejections = dicom.group_stacks(list(headers), policy)
    for src, code, message in grouping_rejections(headers, stacks, rejections):
        ledger.reject(src, code, message)
        gid = header_group.get(src)
        if gid is not None:
            groups[gid].rejections.append((src, code, message))
    for stack in stacks:
        sources = tuple(stack.sources)
        planner.add("dicom", stack, stack_identity(stack), sources, header_group[sources[0]])
