"""``run_ingest``: sources -> dataset folder (images/, manifest.csv, errors.csv, ingest.json).

This module owns the orchestration only; each concern lives in its own module:
:mod:`~medres.ingest.config` (options, report), :mod:`~medres.ingest.accounting` (per-file
ledger), :mod:`~medres.ingest.cache` (incremental cache), :mod:`~medres.ingest.plan`
(headers -> decode jobs), :mod:`~medres.ingest.tasks` (worker tasks),
:mod:`~medres.ingest.records` (image records), :mod:`~medres.ingest.outputs` (files written).
Imports: core, ``medres.dataset.manifest`` and the ingest modules above.

Stages (each a small function below): discover inputs and extract archives
(:mod:`medres.ingest.discover`) -> scan headers (in process or in parallel worker processes,
see "In-process work") -> group DICOM into stacks (:func:`medres.ingest.dicom.group_stacks`)
-> decode and write each stack or NIfTI file (plain small stacks in process, the rest in
isolated workers), reusing cached images whose inputs did not change -> join
labels and assign patient-grouped splits -> write the outputs atomically.

Choices made here:

* **Isolation.** Every read that involves pydicom's parser or a decoder library (compressed
  pixel data: C decoders that may crash on a hostile file), every NIfTI decode and every
  file the rule below does not cover runs in worker processes supervised by
  :class:`medres.workers.IsolatedPool`: a worker that crashes (segfault, ``os._exit``, OOM kill) or
  exceeds the per-file time limit is killed and replaced; the item it was on (published in
  shared memory) is rejected (``decode_failed`` / ``timeout``) and the rest of its chunk is
  re-queued. Workers come from a ``forkserver`` (``spawn`` where there is none) with the
  DICOM stack preloaded, never from a plain ``fork`` of the CLI process, whose progress
  thread and logging locks a child could inherit held. One pool serves both stages, and
  it starts only when an item needs it (a small plain series never pays for it).
* **In-process work** (the rule; ``isolate=False`` runs everything in process anyway).
  Pure-Python reading bounded by the file's own bytes cannot crash the process and cannot
  hang, so it runs here, with the same results and the same coded rejections as in a
  worker: (1) header scans by the lean walk (:func:`~medres.ingest.tasks.scan_task_lean`:
  DICM preamble, little-endian, not deflated, single frame, wanted values in ASCII/Latin-1/
  UTF-8; files up to 64 MiB; a file with neither a preamble nor a plausible first element
  is ``not_dicom`` or NIfTI by content) when the run scans fewer than
  :data:`LOCAL_SCAN_MAX_FILES` files or has one worker; every other file is scanned in the
  pool; (2) decodes of DICOM stacks whose every file is uncompressed little-endian
  monochrome of one stored type, read with ``readinto`` and mapped with numpy, with at most
  256 MiB of output and a quarter of ``--worker-memory-mb``
  (:func:`~medres.ingest.tasks.decodes_in_process`), up to :data:`LOCAL_DECODE_S` of
  estimated work when the pool has several workers (their parallelism pays beyond that),
  all of them with one worker; the pool starts meanwhile for the other jobs. The per-file
  time limit (``--file-timeout``) applies to pool work only; in-process work is linear in
  the bytes of files already checked against their declared lengths. ``--workers 0`` (the
  default) is one worker per idle core (:func:`idle_workers`), so a busy machine scans and
  decodes plain files in process.
* **Chunks.** Header scans go to workers in chunks (up to 64 files, two queued per worker)
  and come back in batches, so isolation costs ~nothing per file; decodes go one stack at a
  time.
* **Incremental.** Each image's inputs give a fingerprint (relative source paths, sizes,
  mtimes; for archive members the archive's size/mtime and the member's size/CRC).
  ``.medres_cache.json`` keeps, per DICOM series (and per NIfTI file), the fingerprints of
  all its files, the rejections inside it and the manifest records it produced, keyed by
  pseudonyms only. A series whose files are all present and unchanged is trusted whole:
  its headers are not read and its images are not decoded. Any file that is new or changed
  is scanned; if its header belongs to a trusted series, that series is read again. Series
  rejected whole are remembered too, unless a failure may be transient
  (:data:`medres.ingest.cache.TRANSIENT_CODES`). A change of version, ``--min-slices`` or ``--compress`` voids
  the cache.
* **Accounting.** Every discovered file ends in exactly one of ``used`` (behind an image in
  the manifest), ``rejected`` or ``skipped`` (benign: :data:`~medres.ingest.accounting.SKIP_CODES`); ``errors.csv``
  holds one row for every file that is not used, and ``ingest.json`` records the counts.
* **Writes.** Images are written atomically (temp file, ``os.replace``) as they are
  decoded; the run's small outputs (``.medres_cache.json``, tokens, manifest.csv,
  errors.csv, ingest.json) are written at the end inside :func:`medres.io.batched_fsync`:
  one shared disk flush, then moved into place in that order.
* **Privacy.** Raw identifiers stay in worker/main memory only: pseudonyms are computed
  right after the header is read. ``ingest.json`` records SOURCE arguments by base name
  only (folder names above may hold patient names). Folder and file names below a SOURCE
  root often hold patient names or IDs too: every ``source`` written (manifest.csv,
  errors.csv, ingest.json) goes through :class:`medres.phi.PathRedactor` with the
  identity tokens of *all* headers of the run (``--source-paths``: ``identity`` by default,
  ``all``, or ``keep`` for de-identified data). Labels keyed by ``path`` are joined on the
  raw paths before redaction. The cache stores sources as keyed hashes and the redactor's
  hashed tokens, so an incremental run redacts exactly like a full one. Free-text header
  values of every record (:data:`~medres.ingest.records.FREE_TEXT_FIELDS`: Manufacturer,
  BodyPartExamined, ...) pass :meth:`PathRedactor.redact_value` before the cache and the
  manifest are written, in every ``--source-paths`` mode.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medres import progress
from medres.dataset.manifest import MANIFEST_NAME
from medres.errors import IngestError
from medres.ingest.accounting import SKIP_CODES, Ledger
from medres.ingest.cache import (
    CACHE_NAME,
    TRANSIENT_CODES,
    Cache,
    CacheGroup,
    Trusted,
    cache_settings,
    group_id,
    load_cache,
    reuse_trusted,
    save_cache,
    trusted_groups,
)
from medres.ingest.config import (
    IMAGES_DIR,
    SCRATCH_DIR,
    IngestConfig,
    IngestReport,
    check_config,
)
from medres.ingest.discover import Discovery, InputFile, Rejected, discover, root_prefixes
from medres.ingest.labels import LabelTable, assign_splits, join_labels, read_labels
from medres.ingest.outputs import (
    ERRORS_NAME,
    INGEST_JSON,
    manifest_rows,
    write_ingest_json,
    write_outputs,
)
from medres.ingest.plan import PlannedJob, plan_jobs
from medres.ingest.records import FREE_TEXT_FIELDS, ImageRecord
from medres.ingest.tasks import (
    DecodeJob,
    ScanResult,
    decode_task,
    decodes_in_process,
    scan_task,
    scan_task_lean,
)
from medres.io import (
    LOCK_NAME,
    MIN_FREE_BYTES,
    batched_fsync,
    check_output_dir,
    output_lock,
    tree_bytes,
)
from medres.phi import PathRedactor, load_or_create_key, save_tokens
from medres.workers import Failure, IsolatedPool, default_workers, isolated_map

log = logging.getLogger(__name__)

# In-process work (module docstring): header scans of runs with fewer files
# than this, and decodes while their estimated serial cost stays under LOCAL_DECODE_S
# (above it, with more than one worker, the pool's parallelism pays for its start-up).
LOCAL_SCAN_MAX_FILES = 2000
LOCAL_DECODE_S = 1.0


def run_ingest(config: IngestConfig) -> IngestReport:
    """Ingest ``config.sources`` into ``config.out_dir``; see the module docstring.

    Raises :class:`ConfigError` / :class:`~medres.errors.ManifestError` for bad options or
    labels (before any heavy work) and :class:`IngestError` when nothing usable was found
    (errors.csv and ingest.json are written first so the reasons can be read).
    """
    t0 = time.monotonic()
    check_config(config)
    out = config.out_dir
    # disk space: --out checked (io.check_output_dir); a full disk later names the inputs' size
    check_output_dir(out, MIN_FREE_BYTES)
    with output_lock(out, command="ingest", need_bytes=lambda: tree_bytes(config.sources)):
        return _run(config, t0)


def idle_workers() -> int:
    """``--workers 0``: one worker per idle core, the cores available minus the one-minute
    load average, rounded up once a quarter core is spare (at least 1; the idea of
    ``make -l``). On a busy machine extra processes only
    compete with the main one (measured: 5,600 small files at load 7 on 2 cores took 7.3 s
    in process and 10.9 s with two workers), while one worker still isolates what needs it."""
    cores = default_workers()
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average on this platform
        return cores
    return max(1, min(cores, math.ceil(cores - load - 0.25)))


@dataclass
class _Run:
    """What the stages of one run share."""

    config: IngestConfig
    key: bytes
    redactor: PathRedactor
    workers: int
    ledger: Ledger = field(default_factory=Ledger)
    timing: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Images:
    """The images of a run (decoded now or reused) and the file counts behind them."""

    records: list[ImageRecord]
    cached_files: int
    scanned: int
    cache: Cache  # what .medres_cache.json will hold


@dataclass(frozen=True)
class _Labelled:
    """Per image (in record order): its labels and split."""

    labels: list[dict[str, str]]
    splits: list[str]
    label_columns: tuple[str, ...]
    unmatched: int = 0
    unlabelled: int = 0


def _run(config: IngestConfig, t0: float) -> IngestReport:
    out = config.out_dir
    key = load_or_create_key(out)
    roots = [p for p in root_prefixes(list(config.sources)) if p]
    redactor = PathRedactor(key, config.source_paths, root_names=roots)
    table = read_labels(config.labels, key, config.label_key) if config.labels else None
    run = _Run(config, key, redactor, config.workers or idle_workers())
    images = _read_images(run)
    with batched_fsync():  # cache, tokens, manifest, errors, ingest.json: one disk flush
        with _timed(run.timing, "write_s"):
            save_cache(out, images.cache, cache_settings(config), key, redactor)
            save_tokens(out, key)  # for commands that read no header (medres.phi.tokens)
            records = sorted(images.records, key=lambda r: r.image_id)
            labelled = _label_and_split(records, table, config)
            rows = manifest_rows(records, labelled.labels, labelled.splits, redactor)
            error_rows = run.ledger.error_rows(redactor)
            write_outputs(out, out / MANIFEST_NAME, rows, labelled.label_columns, error_rows)
        report = _report(run, images, rows, error_rows, labelled, table, t0)
        write_ingest_json(out / INGEST_JSON, config, report, run.workers, table, redactor)
    if not rows:
        raise IngestError(
            f"no usable image found in {len(config.sources)} source(s) "
            f"({report.files['seen']} files, {report.files['rejected']} rejected); see "
            f"{report.errors_path.name} for the reason per file",
            code="nothing_usable",
        )
    return report


@contextlib.contextmanager
def _timed(timing: dict[str, float], name: str) -> Iterator[None]:
    t = time.monotonic()
    yield
    timing[name] = time.monotonic() - t


def _read_images(run: _Run) -> _Images:
    """Discover, scan, plan and decode in one worker pool; the scratch folder (extracted
    archives) lives exactly as long as the pool."""
    config = run.config
    scratch = config.out_dir / SCRATCH_DIR
    shutil.rmtree(scratch, ignore_errors=True)
    pool = IsolatedPool(
        run.workers,
        timeout_s=config.file_timeout_s,
        isolate=config.isolate,
        memory_mb=config.worker_memory_mb,
    )
    try:
        found = _discover_stage(run, scratch)
        cache, trusted, headers, niftis, scanned = _scan_stage(run, found.files, pool)
        with _timed(run.timing, "group_s"):
            jobs, groups = plan_jobs(headers, niftis, found.files, config, run.key, run.ledger)
        with _timed(run.timing, "decode_s"):
            records, cached_files, new_cache = _decode_stage(
                run, jobs, groups, cache, trusted, pool
            )
        run.ledger.account_rest(f.source for f in found.files)
    except BaseException:
        pool.close(kill=True)  # Ctrl-C or a bug: do not wait for busy workers
        raise
    finally:
        pool.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return _Images(records, cached_files, scanned, new_cache)


def _discover_stage(run: _Run, scratch: Path) -> Discovery:
    """List every input (archives extracted into ``scratch``); rejections go to the ledger."""
    config = run.config
    with _timed(run.timing, "discover_s"):
        with progress.task("Finding inputs", total=None, unit="files") as bar:
            found = discover(
                list(config.sources),
                scratch,
                limits=config.limits,
                exclude=[config.out_dir],
                on_input=bar.advance,
            )
        run.ledger.seen = found.seen
        for r in found.rejected:
            run.ledger.reject(r.source, r.code, r.message)
    return found


def _scan_stage(
    run: _Run, files: list[InputFile], pool: IsolatedPool
) -> tuple[Cache, Trusted, list[Any], list[InputFile], int]:
    """Load the cache, trust unchanged groups and scan the headers of every other file."""
    config = run.config
    with _timed(run.timing, "scan_s"):
        if config.incremental:
            cache = load_cache(config.out_dir, cache_settings(config), files, run.key)
        else:
            cache = Cache()
        run.redactor.add_hashed(cache.tokens)
        trusted = trusted_groups(cache, files, config.out_dir)
        headers, niftis, scanned = _scan_untrusted(files, trusted, cache, run.key, pool, run.ledger)
        for h in headers:
            run.redactor.add_header(h)
    return cache, trusted, headers, niftis, scanned


def _scan(
    files: list[InputFile], pool: IsolatedPool, ledger: Ledger
) -> tuple[list[Any], list[InputFile]]:
    """Header-scan ``files``: plain DICOM in process when the run is small ("In-process work"),
    the rest in chunks in the pool; DICOM headers and NIfTI inputs; failures rejected."""
    items = [(f.path, f.source) for f in files]
    with progress.task("Scanning headers", total=len(items), unit="files") as bar:
        results = _scan_local(items, pool, bar)
        rest = [i for i, r in enumerate(results) if r is None]
        chunk = max(1, min(64, math.ceil(len(rest) / (pool.workers * 4))))
        done = pool.map(
            scan_task,
            [items[i] for i in rest],
            chunk_size=chunk,
            on_result=lambda _i: bar.advance(),
        )
        for i, res in zip(rest, done, strict=True):
            results[i] = res
    headers: list[Any] = []
    niftis: list[InputFile] = []
    for f, (ok, val) in zip(files, results, strict=True):
        if not ok:
            ledger.reject(f.source, val.code, val.message)
        elif val.kind == "nifti":
            niftis.append(f)
        else:
            headers.append(val.header)
    return headers, niftis


def _scan_local(
    items: list[tuple[Path, str]], pool: IsolatedPool, bar: progress.Task
) -> list[tuple[bool, Any] | None]:
    """The lean in-process scan of a small run (fewer than :data:`LOCAL_SCAN_MAX_FILES`
    files, or one worker): ``(ok, result)`` per file it read, ``None`` for the pool's."""
    results: list[tuple[bool, Any] | None] = [None] * len(items)
    if not pool.isolate or (len(items) >= LOCAL_SCAN_MAX_FILES and pool.workers > 1):
        return results
    for i, item in enumerate(items):
        try:
            res = scan_task_lean(item)
        except IngestError as exc:
            results[i] = (False, Failure(str(exc.code), str(exc)))
        else:
            results[i] = None if res is None else (True, res)
        if results[i] is not None:
            bar.advance()
    return results


def _scan_untrusted(
    files: list[InputFile],
    trusted: Trusted,
    cache: Cache,
    key: bytes,
    pool: IsolatedPool,
    ledger: Ledger,
) -> tuple[list[Any], list[InputFile], int]:
    """Scan every file outside trusted groups; a group that a newly scanned header belongs
    to (a file was added to the series) loses its trust and is scanned too."""
    skip = {src for gid in trusted for src in cache.groups[gid].inputs}
    todo = [f for f in files if f.source not in skip]
    headers, niftis = _scan(todo, pool, ledger)
    touched = {group_id(h, key) for h in headers} & trusted.keys() if trusted else set()
    if touched:
        again = {src for gid in touched for src in cache.groups[gid].inputs}
        for gid in touched:
            del trusted[gid]
        more = [f for f in files if f.source in again]
        h2, n2 = _scan(more, pool, ledger)
        headers += h2
        niftis += n2
        todo += more
    return headers, niftis, len(todo)


def _decode_stage(
    run: _Run,
    jobs: list[PlannedJob],
    groups: dict[str, CacheGroup],
    cache: Cache,
    trusted: Trusted,
    pool: IsolatedPool,
) -> tuple[list[ImageRecord], int, Cache]:
    """Reuse trusted groups and decode the rest; returns every image's record, the number
    of files behind reused images and the new cache (saved with the outputs)."""
    config = run.config
    new_cache = reuse_trusted(trusted, cache, run.ledger)
    records = list(new_cache.units.values())
    cached_files = sum(len(r.sources) for r in records)
    decoded, reused = _decode(jobs, groups, cache, new_cache, config, pool, run.ledger)
    records += decoded
    # free-text header values may hold a name or ID: filtered before cache and manifest
    new_cache.units = {fp: _filtered(r, run.redactor) for fp, r in new_cache.units.items()}
    records = [_filtered(r, run.redactor) for r in records]
    return records, cached_files + reused, new_cache


def _filtered(rec: ImageRecord, redactor: PathRedactor) -> ImageRecord:
    """``rec`` with its free-text header values passed through the identifier filter."""
    values = {f: redactor.redact_value(getattr(rec, f)) for f in FREE_TEXT_FIELDS}
    return rec if all(v == getattr(rec, f) for f, v in values.items()) else replace(rec, **values)


def _decode(
    jobs: list[PlannedJob],
    groups: dict[str, CacheGroup],
    cache: Cache,
    new_cache: Cache,
    config: IngestConfig,
    pool: IsolatedPool,
    ledger: Ledger,
) -> tuple[list[ImageRecord], int]:
    """Decode the jobs whose fingerprint is not cached; returns the records and the number
    of files behind reused images. Fills ``new_cache`` with every image kept."""
    (config.out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    records, todo = _reusable(jobs, cache)
    cached_files = sum(len(r.sources) for r in records)
    log.info("%d image(s) unchanged since the last run, %d to decode", len(records), len(todo))
    with progress.task("Decoding images", total=len(todo), unit="images") as bar:
        results = _decode_jobs([j for _, j in todo], pool, config, bar)
    retry = set()  # groups with a failure that may be transient are not remembered
    for (_fp, job), (ok, val) in zip(todo, results, strict=True):
        if ok:
            records.append(_in_group(val, job.group))
            continue
        for src in job.sources:
            ledger.reject(src, val.code, val.message)
            if job.group in groups:
                groups[job.group].rejections.append((src, val.code, val.message))
        if val.code in TRANSIENT_CODES:
            retry.add(job.group)
    job_fp = {job.image_id: fp for fp, job in jobs}
    for rec in records:
        for src in rec.sources:
            ledger.use(src)
        new_cache.units[job_fp[rec.image_id]] = rec
    for gid, g in groups.items():
        if gid not in retry:
            new_cache.groups[gid] = g
    return records, cached_files


def _decode_jobs(
    jobs: list[DecodeJob], pool: IsolatedPool, config: IngestConfig, bar: progress.Task
) -> list[tuple[bool, Any]]:
    """``(ok, record | Failure)`` per job: the stacks the in-process rule allows (up to
    :data:`LOCAL_DECODE_S` of estimated work when the pool has several workers) are decoded
    here while the pool starts; every other job is decoded in the pool."""
    local: list[int] = []
    if pool.isolate:
        budget = math.inf if pool.workers == 1 else LOCAL_DECODE_S
        for i, job in enumerate(jobs):
            cost = decodes_in_process(job, config.worker_memory_mb)
            if cost is not None and cost <= budget:
                local.append(i)
                budget -= cost
    rest = sorted(set(range(len(jobs))) - set(local))
    if rest:
        pool.start(len(rest))  # the workers start while this process decodes
    results: list[tuple[bool, Any]] = [(False, None)] * len(jobs)
    here = IsolatedPool(1, isolate=False)  # in this process: failures coded as in a worker
    done = here.map(decode_task, [jobs[i] for i in local], on_result=lambda _i: bar.advance())
    done += pool.map(
        decode_task, [jobs[i] for i in rest], chunk_size=1, on_result=lambda _i: bar.advance()
    )
    for i, res in zip(local + rest, done, strict=True):
        results[i] = res
    return results


def _reusable(jobs: list[PlannedJob], cache: Cache) -> tuple[list[ImageRecord], list[PlannedJob]]:
    """Split jobs into cached records whose image is still there and jobs to decode."""
    records: list[ImageRecord] = []
    todo: list[PlannedJob] = []
    for fp, job in jobs:
        rec = cache.units.get(fp)
        if rec is not None and rec.image_id == job.image_id and job.out_path.is_file():
            records.append(_in_group(rec, job.group))
        else:
            todo.append((fp, job))
    return records, todo


def _in_group(rec: ImageRecord, group: str) -> ImageRecord:
    """``rec`` in cache group ``group``."""
    return rec if rec.group == group else replace(rec, group=group)


def _label_and_split(
    records: Sequence[ImageRecord], table: LabelTable | None, config: IngestConfig
) -> _Labelled:
    """Join the labels file (if any) and assign patient-grouped, stratified splits."""
    label_columns: tuple[str, ...] = ("label",)
    unmatched = unlabelled = 0
    labels: list[dict[str, str]] = [{"label": ""} for _ in records]
    given = [""] * len(records)
    if table is not None:
        joined = join_labels(records, table)
        labels, given = joined.labels, joined.given_splits
        label_columns = table.label_columns
        unmatched, unlabelled = joined.unmatched_rows, joined.unlabelled_images
    groups = [r.patient_key or f"image:{r.image_id}" for r in records]
    strata = ["|".join(lab[c] for c in label_columns) for lab in labels]
    splits = assign_splits(
        groups,
        strata,
        given,
        val_frac=config.val_frac,
        test_frac=config.test_frac,
        seed=config.seed,
    )
    return _Labelled(labels, splits, label_columns, unmatched, unlabelled)


def _report(
    run: _Run,
    images: _Images,
    rows: list[dict[str, str]],
    error_rows: list[dict[str, str]],
    labelled: _Labelled,
    table: LabelTable | None,
    t0: float,
) -> IngestReport:
    """The run's summary (also the body of ``ingest.json``)."""
    out = run.config.out_dir
    elapsed = time.monotonic() - t0
    run.timing["total_s"] = elapsed
    files = run.ledger.counts()
    files["cached"] = images.cached_files
    files["scanned"] = images.scanned
    return IngestReport(
        out_dir=out,
        manifest_path=out / MANIFEST_NAME,
        errors_path=out / ERRORS_NAME,
        n_images=len(rows),
        images_by_modality=dict(sorted(Counter(r["modality"] or "unknown" for r in rows).items())),
        rejections_by_code=dict(sorted(Counter(e["code"] for e in error_rows).items())),
        files=files,
        splits=dict(Counter(labelled.splits)),
        label_columns=labelled.label_columns if table is not None else (),
        unmatched_labels=labelled.unmatched,
        unlabelled_images=labelled.unlabelled,
        timing={k: round(v, 3) for k, v in run.timing.items()},
        elapsed_s=round(elapsed, 3),
    )


__all__ = [
    "CACHE_NAME",
    "ERRORS_NAME",
    "IMAGES_DIR",
    "INGEST_JSON",
    "LOCK_NAME",
    "SCRATCH_DIR",
    "SKIP_CODES",
    "DecodeJob",
    "Failure",
    "ImageRecord",
    "IngestConfig",
    "IngestReport",
    "IsolatedPool",
    "Rejected",
    "ScanResult",
    "decode_task",
    "default_workers",
    "isolated_map",
    "run_ingest",
    "scan_task",
]
