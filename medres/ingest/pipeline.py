"""``run_ingest``: sources -> dataset folder (images/, manifest.csv, errors.csv, ingest.json).

Stages (each a small function below): discover inputs and extract archives
(:mod:`medres.ingest.discover`) -> scan headers in parallel worker processes -> group DICOM
into stacks (:func:`medres.ingest.dicom.group_stacks`) -> decode and write each stack or
NIfTI file in isolated workers, reusing cached images whose inputs did not change -> join
labels and assign patient-grouped splits -> write the outputs atomically.

Choices made here:

* **Isolation.** Header scans and decodes run in worker processes supervised by
  :class:`IsolatedPool`: a worker that crashes (segfault, ``os._exit``, OOM kill) or
  exceeds the per-file time limit is killed and replaced; the item it was on (published in
  shared memory) is rejected (``decode_failed`` / ``timeout``) and the rest of its chunk is
  re-queued. Workers come from a ``forkserver`` (``spawn`` where there is none) with the
  DICOM stack preloaded, never from a plain ``fork`` of the CLI process, whose progress
  thread and logging locks a child could inherit held. One pool serves both stages.
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
  (:data:`_TRANSIENT_CODES`). A change of version, ``--min-slices`` or ``--compress`` voids
  the cache.
* **Accounting.** Every discovered file ends in exactly one of ``used`` (behind an image in
  the manifest), ``rejected`` or ``skipped`` (benign: :data:`SKIP_CODES`); ``errors.csv``
  holds one row for every file that is not used, and ``ingest.json`` records the counts.
* **Privacy.** Raw identifiers stay in worker/main memory only: pseudonyms are computed
  right after the header is read. ``ingest.json`` records SOURCE arguments by base name
  only (folder names above may hold patient names). Folder and file names below a SOURCE
  root often hold patient names or IDs too: every ``source`` written (manifest.csv,
  errors.csv, ingest.json) goes through :class:`medres.phi.PathRedactor` with the
  identity tokens of *all* headers of the run (``--source-paths``: ``identity`` by default,
  ``all``, or ``keep`` for de-identified data). Labels keyed by ``path`` are joined on the
  raw paths before redaction. The cache stores sources as keyed hashes and the redactor's
  hashed tokens, so an incremental run redacts exactly like a full one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medres import __version__, progress
from medres.dataset.manifest import MANIFEST_NAME, write_manifest
from medres.errors import ConfigError, IngestError
from medres.ingest.codes import Code
from medres.ingest.discover import ArchiveLimits, InputFile, Rejected, discover, root_prefixes
from medres.ingest.identity import nifti_identity, stack_identity, unique_image_id
from medres.ingest.labels import (
    assign_splits,
    check_fractions,
    join_labels,
    read_labels,
)
from medres.ingest.tasks import DecodeJob, ScanResult, common_source, decode_task, scan_task
from medres.io import atomic_open, atomic_write_json
from medres.phi import (
    KEY_FILE,
    SOURCE_PATH_MODES,
    PathRedactor,
    load_or_create_key,
    pseudonym,
)
from medres.workers import Failure, IsolatedPool, default_workers, isolated_map

log = logging.getLogger(__name__)

ERRORS_NAME = "errors.csv"
INGEST_JSON = "ingest.json"
CACHE_NAME = ".medres_cache.json"
IMAGES_DIR = "images"
SCRATCH_DIR = ".medres_scratch"
LOCK_NAME = ".medres_lock"
SKIP_CODES = frozenset({Code.NOT_IMAGE.value, Code.DUPLICATE_INPUT.value, Code.EXTRA_STACK.value})
_CACHE_VERSION = 3
_SRC_MARK = "\x1f\x1f"  # a rejection message's own source, in the cache
# failures that may not happen again (load, memory, a crashed worker): never cached
_TRANSIENT_CODES = frozenset({Code.TIMEOUT.value, Code.DECODE_FAILED.value, Code.UNREADABLE.value})


@dataclass(frozen=True)
class IngestConfig:
    """Everything ``medres ingest`` needs; built once by the CLI (or by library users).

    ``workers``: worker processes (0 = one per core; 1 still isolates in one worker;
    ``isolate=False`` runs everything in this process, for tests and debugging).
    ``min_slices``: 3D stacks with fewer slices are rejected (``too_few_slices``).
    ``file_timeout_s``: per header/decode item; ``worker_memory_mb``: address-space limit
    per worker (``None`` = none). ``incremental``: reuse unchanged images of a previous run.
    ``source_paths``: how ``source`` paths are written (:class:`medres.phi.PathRedactor`
    mode: ``identity``, ``all`` or ``keep``).
    """

    sources: tuple[Path, ...]
    out_dir: Path
    labels: Path | None = None
    label_key: str | None = None
    workers: int = 0
    val_frac: float = 0.15
    test_frac: float = 0.15
    seed: int = 0
    min_slices: int = 3
    compress: bool = False
    file_timeout_s: float = 120.0
    worker_memory_mb: int | None = None
    incremental: bool = True
    isolate: bool = True
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)
    source_paths: str = "identity"


@dataclass(frozen=True)
class IngestReport:
    """What one ingest run produced; the CLI prints it as the summary table."""

    out_dir: Path
    manifest_path: Path
    errors_path: Path
    n_images: int
    images_by_modality: dict[str, int]
    rejections_by_code: dict[str, int]
    files: dict[str, int]
    splits: dict[str, int]
    label_columns: tuple[str, ...]
    unmatched_labels: int
    unlabelled_images: int
    timing: dict[str, float]
    elapsed_s: float


# ---------------------------------------------------------------------------------------
# stages


@dataclass
class _Ledger:
    """Per-file status: every discovered source ends used, rejected or skipped."""

    status: dict[str, tuple[str, str, str]] = field(
        default_factory=dict
    )  # source -> (state, code, msg)
    seen: int = 0

    def reject(self, source: str, code: str, message: str) -> None:
        code = str(code)
        state = "skipped" if code in SKIP_CODES else "rejected"
        self.status.setdefault(source, (state, code, message))

    def use(self, source: str) -> None:
        self.status[source] = ("used", "", "")

    def counts(self) -> dict[str, int]:
        c = Counter(s for s, _, _ in self.status.values())
        return {
            "seen": self.seen,
            "used": c["used"],
            "rejected": c["rejected"],
            "skipped": c["skipped"],
        }

    def error_rows(self, redactor: PathRedactor | None = None) -> list[dict[str, str]]:
        """One row per file not used; sources and messages redacted by ``redactor``."""
        rows = [
            {"source": src, "code": code, "message": msg}
            for src, (state, code, msg) in sorted(self.status.items())
            if state != "used"
        ]
        if redactor is not None:
            for r in rows:
                r["message"] = redactor.redact_text(r["message"], (r["source"],))
                r["source"] = redactor.redact(r["source"])
        return rows


def run_ingest(config: IngestConfig) -> IngestReport:
    """Ingest ``config.sources`` into ``config.out_dir``; see the module docstring.

    Raises :class:`ConfigError` / :class:`~medres.errors.ManifestError` for bad options or
    labels (before any heavy work) and :class:`IngestError` when nothing usable was found
    (errors.csv and ingest.json are written first so the reasons can be read).
    """
    t0 = time.monotonic()
    timing: dict[str, float] = {}
    _check_config(config)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    with _out_dir_lock(out):
        return _run(config, t0, timing)


@contextlib.contextmanager
def _out_dir_lock(out: Path) -> Iterator[None]:
    """One ingest at a time per output folder (``.medres_lock`` holds the owner's pid)."""
    lock = out / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # stale: its owner is gone
                continue
            except PermissionError:
                pass
            raise ConfigError(
                f"another `medres ingest` (pid {pid}) is writing to --out {out.name!r}; wait for "
                f"it to finish, or delete {LOCK_NAME} there if it is gone"
            ) from None
    else:  # pragma: no cover - lost the race twice
        raise ConfigError(f"cannot lock --out {out.name!r}; retry")
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _run(config: IngestConfig, t0: float, timing: dict[str, float]) -> IngestReport:
    out = config.out_dir
    key = load_or_create_key(out)
    redactor = PathRedactor(
        key, config.source_paths, root_names=[p for p in root_prefixes(list(config.sources)) if p]
    )
    table = read_labels(config.labels, key, config.label_key) if config.labels else None
    workers = config.workers or default_workers()
    scratch = out / SCRATCH_DIR
    shutil.rmtree(scratch, ignore_errors=True)
    ledger = _Ledger()
    pool = IsolatedPool(
        workers,
        timeout_s=config.file_timeout_s,
        isolate=config.isolate,
        memory_mb=config.worker_memory_mb,
    )
    try:
        t = time.monotonic()
        with progress.task("Finding inputs", total=None, unit="files") as bar:
            found = discover(
                list(config.sources),
                scratch,
                limits=config.limits,
                exclude=[out],
                on_input=bar.advance,
            )
        ledger.seen = found.seen
        for r in found.rejected:
            ledger.reject(r.source, r.code, r.message)
        timing["discover_s"] = time.monotonic() - t

        t = time.monotonic()
        cache = (
            _load_cache(out, _cache_settings(config), found.files, key)
            if config.incremental
            else _Cache()
        )
        redactor.add_hashed(cache.tokens)
        trusted = _trusted_groups(cache, found.files, out)
        headers, niftis, scanned = _scan_untrusted(found.files, trusted, cache, key, pool, ledger)
        for h in headers:
            redactor.add_header(h)
        timing["scan_s"] = time.monotonic() - t

        t = time.monotonic()
        jobs, groups = _plan(headers, niftis, found.files, config, key, ledger)
        timing["group_s"] = time.monotonic() - t

        t = time.monotonic()
        new_cache = _reuse_trusted(trusted, cache, ledger)
        records = list(new_cache.units.values())
        cached_files = sum(len(r.get("sources", [])) for r in records)
        decoded, reused = _decode(jobs, groups, cache, new_cache, config, pool, ledger)
        records += decoded
        cached_files += reused
        _save_cache(out, new_cache, _cache_settings(config), key, redactor)
        timing["decode_s"] = time.monotonic() - t
        for f in found.files:  # the invariant seen == used + rejected + skipped, whatever happens
            if f.source not in ledger.status:
                log.warning("an input was not accounted for by any stage; reported as rejected")
                ledger.reject(f.source, Code.DECODE_FAILED.value, f"{f.source}: not processed")
    except BaseException:
        pool.close(kill=True)  # Ctrl-C or a bug: do not wait for busy workers
        raise
    finally:
        pool.close()
        shutil.rmtree(scratch, ignore_errors=True)

    t = time.monotonic()
    records.sort(key=lambda r: r["image_id"])
    label_columns: tuple[str, ...] = ("label",)
    unmatched = unlabelled = 0
    labels: list[dict[str, str]] = [{"label": ""} for _ in records]
    given = [""] * len(records)
    if table is not None:
        joined = join_labels(records, table)
        labels, given = joined.labels, joined.given_splits
        label_columns = table.label_columns
        unmatched, unlabelled = joined.unmatched_rows, joined.unlabelled_images
    groups = [r["patient_key"] or f"image:{r['image_id']}" for r in records]
    strata = ["|".join(lab[c] for c in label_columns) for lab in labels]
    splits = assign_splits(
        groups,
        strata,
        given,
        val_frac=config.val_frac,
        test_frac=config.test_frac,
        seed=config.seed,
    )
    rows = []
    for rec, lab, sp in zip(records, labels, splits, strict=True):
        row = {k: v for k, v in rec.items() if k not in ("sources", "accession_key", "group")}
        row["source"] = redactor.redact(str(row.get("source", "")))
        row.update(lab)
        row["split"] = sp
        rows.append(row)
    manifest_path = out / MANIFEST_NAME
    errors_path = out / ERRORS_NAME
    # always rewritten (header only when empty) so that a stale manifest never survives
    write_manifest(manifest_path, rows, label_columns)
    error_rows = ledger.error_rows(redactor)
    _write_errors(errors_path, error_rows)
    _prune_images(out, {r["image_path"] for r in rows})
    timing["write_s"] = time.monotonic() - t
    elapsed = time.monotonic() - t0
    timing["total_s"] = elapsed

    files = ledger.counts()
    files["cached"] = cached_files
    files["scanned"] = scanned
    report = IngestReport(
        out_dir=out,
        manifest_path=manifest_path,
        errors_path=errors_path,
        n_images=len(rows),
        images_by_modality=dict(sorted(Counter(r["modality"] or "unknown" for r in rows).items())),
        rejections_by_code=dict(sorted(Counter(e["code"] for e in error_rows).items())),
        files=files,
        splits=dict(Counter(splits)),
        label_columns=label_columns if table is not None else (),
        unmatched_labels=unmatched,
        unlabelled_images=unlabelled,
        timing={k: round(v, 3) for k, v in timing.items()},
        elapsed_s=round(elapsed, 3),
    )
    _write_ingest_json(out / INGEST_JSON, config, report, workers, table, redactor)
    if not rows:
        raise IngestError(
            f"no usable image found in {len(config.sources)} source(s) "
            f"({files['seen']} files, {files['rejected']} rejected); see {errors_path.name} "
            "for the reason per file",
            code="nothing_usable",
        )
    return report


def _check_config(config: IngestConfig) -> None:
    if not config.sources:
        raise ConfigError("no SOURCE given; pass folders, files or archives to ingest")
    check_fractions(config.val_frac, config.test_frac)
    if config.source_paths not in SOURCE_PATH_MODES:
        raise ConfigError(
            f"--source-paths {config.source_paths!r} is not known; use one of "
            f"{', '.join(SOURCE_PATH_MODES)}"
        )
    if config.workers < 0:
        raise ConfigError(f"--workers {config.workers} must be 0 (one per core) or more")
    if config.min_slices < 1:
        raise ConfigError(f"--min-slices {config.min_slices} must be at least 1")
    if config.worker_memory_mb is not None and config.worker_memory_mb < 256:
        raise ConfigError(
            f"--worker-memory-mb {config.worker_memory_mb} is too small; use at least 256 "
            "(a worker needs ~200 MiB before it reads any file)"
        )
    if config.file_timeout_s <= 0:
        raise ConfigError("--file-timeout must be positive (seconds)")
    if config.out_dir.exists() and not config.out_dir.is_dir():
        raise ConfigError(
            f"--out {config.out_dir.name!r} exists and is not a folder; choose a folder"
        )
    for i, src in enumerate(config.sources):
        if not src.exists():
            raise ConfigError(
                f"SOURCE argument {i + 1} ({src.name!r}) does not exist; check the path"
            )


def _scan(
    files: list[InputFile], pool: IsolatedPool, ledger: _Ledger
) -> tuple[list[Any], list[InputFile]]:
    items = [(f.path, f.source) for f in files]
    chunk = max(1, min(64, math.ceil(len(items) / (pool.workers * 4))))
    with progress.task("Scanning headers", total=len(items), unit="files") as bar:
        results = pool.map(scan_task, items, chunk_size=chunk, on_result=lambda _i: bar.advance())
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


def _fingerprint(parts: list[tuple[str, str]], config: IngestConfig) -> str:
    h = hashlib.sha256()
    h.update(f"{_CACHE_VERSION}|{__version__}|{config.min_slices}|{config.compress}".encode())
    for src, fp in sorted(parts):
        h.update(f"\n{src}\t{fp}".encode())
    return h.hexdigest()


def _plan(
    headers: list[Any],
    niftis: list[InputFile],
    files: list[InputFile],
    config: IngestConfig,
    key: bytes,
    ledger: _Ledger,
) -> tuple[list[tuple[str, DecodeJob]], dict[str, dict[str, Any]]]:
    """Group headers into stacks and make one decode job (with its fingerprint) per image.

    Also returns the cache groups: per DICOM series (and per NIfTI file) the fingerprints of
    all its files and the rejections inside it, so that a later run can trust the whole
    series without reading its headers.
    """
    by_source = {f.source: f for f in files}
    groups: dict[str, dict[str, Any]] = {}
    header_group: dict[str, str] = {}
    for h in headers:
        gid = _group_id(h, key)
        header_group[h.source] = gid
        g = groups.setdefault(gid, {"inputs": {}, "rejections": []})
        g["inputs"][h.source] = by_source[h.source].fingerprint
    jobs: list[tuple[str, DecodeJob]] = []
    suffix = ".nii.gz" if config.compress else ".nii"
    images = config.out_dir / IMAGES_DIR
    taken: set[str] = set()

    def make(kind: str, payload: Any, identity: str, sources: tuple[str, ...], gid: str) -> None:
        image_id, _ = unique_image_id(identity, key, taken)
        rel = f"{IMAGES_DIR}/{image_id}{suffix}"
        fp = _fingerprint([(s, by_source[s].fingerprint) for s in sources], config)
        jobs.append(
            (
                fp,
                DecodeJob(
                    kind,
                    payload,
                    image_id,
                    images / f"{image_id}{suffix}",
                    rel,
                    key,
                    config.min_slices,
                    sources,
                    gid,
                ),
            )
        )

    if headers:
        from medres.ingest import dicom  # imported only when there is something to group

        policy = dicom.GeometryPolicy(min_slices=config.min_slices)
        stacks, rejections = dicom.group_stacks(headers, policy)
        for src, code, message in _rejected_files(headers, stacks, rejections):
            ledger.reject(src, code, message)
            gid = header_group.get(src)
            if gid is not None:
                groups[gid]["rejections"].append([src, code, message])
        for stack in stacks:
            sources = tuple(stack.sources)
            make("dicom", stack, stack_identity(stack), sources, header_group[sources[0]])
    for f in niftis:
        gid = f"nifti|{pseudonym(f.source, key)}"
        groups[gid] = {"inputs": {f.source: f.fingerprint}, "rejections": []}
        make("nifti", (f.path, f.source), nifti_identity(f.source), (f.source,), gid)
    return jobs, groups


def _group_id(header: Any, key: bytes) -> str:
    """The PHI-free cache group of a DICOM header: its (study, series) pseudonyms."""
    return f"dicom|{pseudonym(header.study_uid, key)}|{pseudonym(header.series_uid, key)}"


def _rejected_files(
    headers: Sequence[Any], stacks: Sequence[Any], rejections: Sequence[Any]
) -> list[tuple[str, str, str]]:
    """One (source, code, message) per file that grouping did not put in a kept stack.

    A grouping rejection names its first file and ``n_files``; the other files of its
    series that no kept stack uses are attributed to the series' rejections in order
    (``sources`` on a rejection, when present, is used as is).
    """
    kept = {src for st in stacks for src in st.sources}
    left: dict[tuple[str, str], list[str]] = {}
    for h in sorted(headers, key=lambda h: h.source):
        if h.source not in kept:
            left.setdefault((h.study_uid, h.series_uid), []).append(h.source)
    out: list[tuple[str, str, str]] = []
    capacity: list[tuple[Any, int]] = []
    for rej in rejections:
        series = left.get((rej.study_uid, rej.series_uid), [])
        explicit = getattr(rej, "sources", None)
        wanted = list(explicit) if explicit else [rej.source]
        for src in wanted:
            if src in series:
                series.remove(src)
            out.append((src, str(rej.code), rej.message))
        capacity.append((rej, 0 if explicit else max(0, int(rej.n_files) - 1)))
    for rej, cap in capacity:
        series = left.get((rej.study_uid, rej.series_uid), [])
        while cap > 0 and series:
            out.append((series.pop(0), str(rej.code), rej.message))
            cap -= 1
    for series in left.values():
        for src in series:  # not claimed by any rejection: should not happen, but account
            log.debug("file not in any kept stack nor rejection; reported as extra_stack")
            out.append(
                (src, Code.EXTRA_STACK.value, f"{src}: not part of the kept stack of its series")
            )
    return out


@dataclass
class _Cache:
    """``.medres_cache.json``: ``units`` maps an image fingerprint to its manifest record
    (plus ``sources`` and ``group``); ``groups`` maps a cache group (a DICOM series or a NIfTI
    file, by pseudonyms) to ``{"inputs": {source: file fingerprint}, "rejections": [...]}``."""

    units: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)  # PathRedactor.hashed_tokens


def _cache_settings(config: IngestConfig) -> str:
    """What a cached image depends on besides its inputs (a change voids the cache)."""
    return f"{__version__}|min_slices={config.min_slices}|compress={config.compress}"


def _src_id(source: str, key: bytes) -> str:
    """How the cache names a source: a keyed hash (the path may hold PHI)."""
    return pseudonym(source, key, "src-")


def _load_cache(out: Path, settings: str, files: Sequence[InputFile], key: bytes) -> _Cache:
    """The previous run's cache with its hashed sources mapped back to the current inputs'
    paths (a hash no current file has stays as is and so never matches)."""
    path = out / CACHE_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return _Cache()
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return _Cache()
    if data.get("settings") != settings:
        return _Cache()
    units, groups, tokens = data.get("units"), data.get("groups"), data.get("path_tokens")
    if not isinstance(units, dict) or not isinstance(groups, dict):
        return _Cache()
    raw = {_src_id(f.source, key): f.source for f in files}
    try:
        for rec in units.values():
            rec["sources"] = [raw.get(s, s) for s in rec.get("sources", [])]
            rec["source"] = common_source(rec["sources"]) if rec["sources"] else ""
        for g in groups.values():
            g["inputs"] = {raw.get(s, s): fp for s, fp in (g.get("inputs") or {}).items()}
            g["rejections"] = [
                [raw.get(s, s), code, str(msg).replace(_SRC_MARK, raw.get(s, s))]
                for s, code, msg in g.get("rejections", [])
            ]
    except (AttributeError, TypeError, ValueError):
        return _Cache()
    return _Cache(units, groups, [str(t) for t in tokens] if isinstance(tokens, list) else [])


def _save_cache(
    out: Path, cache: _Cache, settings: str, key: bytes, redactor: PathRedactor
) -> None:
    """Write the cache with every source as a keyed hash and rejection messages redacted
    (their own source as a marker restored on load), plus the redactor's hashed tokens."""
    units = {
        fp: {
            **rec,
            "source": "",
            "sources": [_src_id(s, key) for s in rec.get("sources", [])],
        }
        for fp, rec in cache.units.items()
    }
    groups = {
        gid: {
            **g,
            "inputs": {_src_id(s, key): v for s, v in (g.get("inputs") or {}).items()},
            "rejections": [
                [_src_id(s, key), code, redactor.redact_text(str(msg).replace(s, _SRC_MARK))]
                for s, code, msg in g.get("rejections", [])
            ],
        }
        for gid, g in cache.groups.items()
    }
    data = {
        "version": _CACHE_VERSION,
        "settings": settings,
        "units": units,
        "groups": groups,
        "path_tokens": redactor.hashed_tokens,
    }
    with atomic_open(out / CACHE_NAME, "w", encoding="utf-8") as fh:
        json.dump(data, fh)


def _trusted_groups(
    cache: _Cache, files: list[InputFile], out: Path
) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Cache groups whose every input is present and unchanged and whose images exist:
    their headers need not be read again (unless a new file joins the series)."""
    current = {f.source: f.fingerprint for f in files}
    by_group: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    broken: set[str] = set()
    for fp, rec in cache.units.items():
        gid = rec.get("group", "")
        if not (out / str(rec.get("image_path", ""))).is_file():
            broken.add(gid)
        by_group.setdefault(gid, []).append((fp, rec))
    trusted = {}
    for gid, g in cache.groups.items():  # groups without images: series rejected whole
        if gid in broken or not isinstance(g, dict):
            continue
        inputs = g.get("inputs") or {}
        if inputs and all(current.get(src) == fp for src, fp in inputs.items()):
            trusted[gid] = by_group.get(gid, [])
    return trusted


def _scan_untrusted(
    files: list[InputFile],
    trusted: dict[str, list[tuple[str, dict[str, Any]]]],
    cache: _Cache,
    key: bytes,
    pool: IsolatedPool,
    ledger: _Ledger,
) -> tuple[list[Any], list[InputFile], int]:
    """Scan every file outside trusted groups; a group that a newly scanned header belongs
    to (a file was added to the series) loses its trust and is scanned too."""
    skip = {src for gid in trusted for src in cache.groups[gid]["inputs"]}
    todo = [f for f in files if f.source not in skip]
    headers, niftis = _scan(todo, pool, ledger)
    touched = {_group_id(h, key) for h in headers} & trusted.keys()
    if touched:
        again = {src for gid in touched for src in cache.groups[gid]["inputs"]}
        for gid in touched:
            del trusted[gid]
        more = [f for f in files if f.source in again]
        h2, n2 = _scan(more, pool, ledger)
        headers += h2
        niftis += n2
        todo += more
    return headers, niftis, len(todo)


def _reuse_trusted(
    trusted: dict[str, list[tuple[str, dict[str, Any]]]], cache: _Cache, ledger: _Ledger
) -> _Cache:
    """Records and rejections of trusted groups, carried over without reading anything."""
    kept = _Cache()
    for gid, units in trusted.items():
        g = cache.groups[gid]
        kept.groups[gid] = g
        for fp, rec in units:
            kept.units[fp] = rec
            for src in rec.get("sources", []):
                ledger.use(src)
        for src, code, message in g.get("rejections", []):
            ledger.reject(src, code, message)
    if trusted:
        log.info("%d series/files unchanged since the last run: headers not re-read", len(trusted))
    return kept


def _decode(
    jobs: list[tuple[str, DecodeJob]],
    groups: dict[str, dict[str, Any]],
    cache: _Cache,
    new_cache: _Cache,
    config: IngestConfig,
    pool: IsolatedPool,
    ledger: _Ledger,
) -> tuple[list[dict[str, Any]], int]:
    """Decode the jobs whose fingerprint is not cached; returns the records and the number
    of files behind reused images. Fills ``new_cache`` with every image kept."""
    out = config.out_dir
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    todo: list[tuple[str, DecodeJob]] = []
    for fp, job in jobs:
        rec = cache.units.get(fp)
        if rec is not None and rec.get("image_id") == job.image_id and job.out_path.is_file():
            records.append({**rec, "group": job.group})
        else:
            todo.append((fp, job))
    cached_files = sum(len(r.get("sources", [])) for r in records)
    log.info("%d image(s) unchanged since the last run, %d to decode", len(records), len(todo))
    with progress.task("Decoding images", total=len(todo), unit="images") as bar:
        results = pool.map(
            decode_task, [j for _, j in todo], chunk_size=1, on_result=lambda _i: bar.advance()
        )
    retry = set()  # groups with a failure that may be transient are not remembered
    for (_fp, job), (ok, val) in zip(todo, results, strict=True):
        if ok:
            records.append({**val, "group": job.group})
            continue
        for src in job.sources:
            ledger.reject(src, val.code, val.message)
            if job.group in groups:
                groups[job.group]["rejections"].append([src, val.code, val.message])
        if val.code in _TRANSIENT_CODES:
            retry.add(job.group)
    job_fp = {job.image_id: fp for fp, job in jobs}
    for rec in records:
        for src in rec.get("sources", []):
            ledger.use(src)
        new_cache.units[job_fp[rec["image_id"]]] = rec
    for gid, g in groups.items():
        if gid not in retry:
            new_cache.groups[gid] = g
    return records, cached_files


def _write_errors(path: Path, rows: list[dict[str, str]]) -> None:
    import csv

    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["source", "code", "message"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _prune_images(out: Path, keep: set[str]) -> None:
    """Remove images a previous run wrote that are no longer in the manifest."""
    images = out / IMAGES_DIR
    if not images.is_dir():
        return
    for p in images.iterdir():
        rel = f"{IMAGES_DIR}/{p.name}"
        if rel not in keep and (p.name.startswith("img-") or p.name.startswith(".img-")):
            with contextlib.suppress(OSError):
                p.unlink()


def _versions() -> dict[str, str]:
    out = {"medres": __version__, "python": platform.python_version()}
    for mod in ("pydicom", "nibabel", "numpy"):
        m = sys.modules.get(mod)
        if m is None:
            with contextlib.suppress(Exception):
                m = importlib.import_module(mod)
        out[mod] = getattr(m, "__version__", "") if m else ""
    return out


def _write_ingest_json(
    path: Path,
    config: IngestConfig,
    report: IngestReport,
    workers: int,
    table: Any,
    redactor: PathRedactor,
) -> None:
    settings = {
        "sources": [redactor.redact(p.name or str(p)) for p in config.sources],
        "source_paths": config.source_paths,
        "labels": config.labels.name if config.labels else None,
        "label_key": table.key_column if table is not None else None,
        "workers": workers,
        "val_frac": config.val_frac,
        "test_frac": config.test_frac,
        "seed": config.seed,
        "min_slices": config.min_slices,
        "compress": config.compress,
        "file_timeout_s": config.file_timeout_s,
        "worker_memory_mb": config.worker_memory_mb,
        "incremental": config.incremental,
        "isolate": config.isolate,
        "limits": asdict(config.limits),
    }
    atomic_write_json(
        path,
        {
            "format": "medres-ingest/1",
            "versions": _versions(),
            "settings": settings,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "timing": report.timing,
            "files": report.files,
            "images": report.n_images,
            "images_by_modality": report.images_by_modality,
            "rejections_by_code": report.rejections_by_code,
            "splits": report.splits,
            "label_columns": list(report.label_columns),
            "labels": None
            if table is None
            else {
                "key_column": table.key_column,
                "rows": table.n_rows,
                "unmatched_rows": report.unmatched_labels,
                "unlabelled_images": report.unlabelled_images,
            },
            "key_file": KEY_FILE,
        },
    )


__all__ = [
    "DecodeJob",
    "Failure",
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
