"""``medres score``: score folders, archives or a manifest with a trained model, resumably.

Choices:

- The model directory is loaded with ``medres.models.load_model_dir`` and its saved
  ``preprocessing`` is replayed by ``medres.train.batched.BatchedPreprocess`` on each
  batch of raw decoded images, on the scoring device: the deterministic part of
  ``build_transforms(..., train=False)``, equal to it within 1e-5, never a second copy
  (:mod:`medres.score.decode`, :mod:`medres.score.engine`).
- The model hash is sha256 over the weights file then ``model.json``; the ledger is
  keyed by (item key, model hash), so one OUT_DIR can hold several models' results and
  re-scoring with a retrained model never mixes scores.
- Sharding: ``--shard i/n`` keeps the items whose stable identity hash falls in shard
  ``i``; under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the rank and world size are
  used the same way, all ranks write the same ledger (SQLite serialises them) and every
  rank exports under a lock, so the last one to finish leaves the complete CSVs.
- Resuming: committed items (ok and error) are skipped; ``retry_errors`` re-tries the
  error rows.
- Untrusted inputs are decoded in :class:`medres.workers.IsolatedPool` workers under
  ``--file-timeout`` and ``--worker-memory-mb`` (the names ``medres ingest`` uses); a
  hang or an unbounded allocation becomes a ``timeout`` row in errors.csv.

Imports: everything below :mod:`medres.score` it needs (models, train.transforms via
decode, ingest's public modules via sources), :mod:`medres.runtime` for the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medres import progress
from medres.errors import ConfigError, ScoringError
from medres.io import MIN_FREE_BYTES, check_output_dir, check_output_kind, disk_guard
from medres.models.modeldir import ModelMeta
from medres.phi import KEY_FILE, SOURCE_PATH_MODES, load_or_create_key, save_tokens
from medres.score.cam import TopK, rank_fn
from medres.score.decode import MedresDecoder
from medres.score.dicom_out import Algorithm, DicomRef, write_ledger_srs
from medres.score.engine import LoopConfig, LoopStats, ScoreItem, background, run_items
from medres.score.ledger import (
    AGGREGATES,
    LEDGER_NAME,
    Ledger,
    MergeReport,
    ModelInfo,
    export_csvs,
    merge_ledgers,
    parse_shard,
    shard_of,
)
from medres.score.predict import Predictor, probs_for_task
from medres.score.sources import (
    ItemStream,
    discover_items,
    is_manifest_source,
    manifest_items,
)

log = logging.getLogger(__name__)

MODEL_FILES = ("weights.safetensors", "model.json")
# a decode worker holds torch and MONAI (about 1 GiB of address space) before any input
MIN_WORKER_MEMORY_MB = 1536


@dataclass(frozen=True)
class ScoreConfig:
    """Everything ``medres score`` needs; built once by the CLI."""

    model_dir: Path
    sources: tuple[Path, ...]
    out_dir: Path
    batch_size: int = 32
    workers: int = 2
    prefetch: int = 2
    precision: str = "auto"
    device: str = "auto"
    shard: str | None = None
    split: str | None = None
    keep_ids: bool = False
    retry_errors: bool = False
    aggregate: str | None = None
    cam: int | None = None  # None: no Grad-CAM; 0: all scored items; k: top-k by score
    cam_class: str | None = None
    dicom_out: bool = False  # one Comprehensive SR per DICOM study into OUT_DIR/dicom
    source_paths: str = "identity"  # medres.phi.PathRedactor mode for written sources
    file_timeout_s: float = 120.0  # per item in a decode worker
    worker_memory_mb: int | None = None  # address-space cap of a decode worker
    pacs: Any = None  # a medres.score.pacs_items.PacsRequest instead of ``sources``
    push: bool = False  # store the --dicom-out SRs back on the PACS (STOW-RS / C-STORE)


@dataclass
class ScoreSummary:
    """What one ``score`` call did (the CLI prints it)."""

    out_dir: Path
    model_hash: str
    shard: tuple[int, int]
    discovered: int = 0
    skipped_done: int = 0
    skipped_shard: int = 0
    scored: int = 0
    errors: int = 0
    total_ok: int = 0
    total_errors: int = 0
    seconds: float = 0.0
    items_per_s: float = 0.0
    precision: str = ""
    outputs: dict[str, Path] = field(default_factory=dict)


def model_hash(model_dir: str | os.PathLike[str]) -> str:
    """sha256 over the model dir's ``weights.safetensors`` then ``model.json`` bytes."""
    h = hashlib.sha256()
    for name in MODEL_FILES:
        p = Path(model_dir) / name
        if not p.is_file():
            raise ScoringError(
                f"{Path(model_dir).name}/{name}: missing; give the model/ folder written by "
                "`medres train` (RUN_DIR/model)"
            )
        with open(p, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def resolve_model_dir(path: Path) -> Path:
    """Accept RUN_DIR as well as RUN_DIR/model."""
    if (path / "model.json").is_file():
        return path
    if (path / "model" / "model.json").is_file():
        return path / "model"
    raise ScoringError(
        f"{path}: no model.json there or in {path.name}/model; give the model dir from `medres train`"
    )


def resolve_shard(text: str | None) -> tuple[int, int]:
    """``--shard`` or, under torchrun, (RANK, WORLD_SIZE); both at once is an error."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        if text:
            raise ConfigError("--shard cannot be combined with torchrun; use one or the other")
        return (int(os.environ.get("RANK", "0")), world)
    return parse_shard(text)


def load_model(model_dir: Path, device: str) -> tuple[Any, ModelMeta]:
    try:
        from medres.models import load_model_dir
    except ImportError:  # the package may not re-export it
        from medres.models.modeldir import load_model_dir
    return load_model_dir(model_dir, device=device)


def iter_items(config: ScoreConfig, key: bytes, scratch: Path, model_hash: str = "") -> ItemStream:
    """The items of ``config.sources``, listed now (see :class:`ItemStream`)."""
    if config.pacs is not None:  # a PACS query: listed and retrieved while iterated
        from medres.score.pacs_items import pacs_items

        return ItemStream(
            pacs_items(
                config.pacs, key=key, scratch=scratch, ledger_path=config.out_dir / LEDGER_NAME,
                model_hash=model_hash, dicom_out=config.dicom_out,
                retry_errors=config.retry_errors, keep_ids=config.keep_ids,
            ),
            False,
        )  # fmt: skip
    sources = list(config.sources)
    if not sources:
        raise ConfigError("no SOURCE given; pass folders, archives or a manifest.csv")
    for i, s in enumerate(sources):
        if not s.exists():
            raise ConfigError(
                f"SOURCE argument {i + 1} ({s.name!r}) does not exist; check the path"
            )
    if is_manifest_source(sources):
        return manifest_items(sources[0], split=config.split)
    if config.split:
        raise ConfigError("--split applies to a manifest.csv SOURCE only; drop it for folders")
    return discover_items(
        sources,
        key=key,
        scratch=scratch,
        exclude=[config.out_dir.resolve()],
        source_paths=config.source_paths,
    )


def _filtered(
    items: Iterator[ScoreItem],
    done: set[str],
    shard: tuple[int, int],
    summary: ScoreSummary,
    bar: Any = None,
    dicom_refs: dict[str, DicomRef] | None = None,
) -> Iterator[ScoreItem]:
    """Drop items of other shards and items already committed; sets the bar's total at the end.

    ``dicom_refs`` collects the :class:`~medres.score.dicom_out.DicomRef` of every DICOM
    item of this shard, scored now or earlier, for ``--dicom-out``.
    """
    seen: set[str] = set()
    for it in items:
        summary.discovered += 1
        if shard[1] > 1 and shard_of(it.identity, shard[1]) != shard[0]:
            summary.skipped_shard += 1
            continue
        if dicom_refs is not None and it.kind == "dicom":
            dicom_refs[it.key] = DicomRef(it.study_uid, it.study_key, str(it.payload.first.path))
        if it.key in done or it.key in seen:
            summary.skipped_done += 1
            continue
        seen.add(it.key)
        yield it
    if bar is not None:
        bar.update(total=len(seen))


def _validate(config: ScoreConfig) -> None:
    """Reject option values that cannot work, naming the option."""
    if config.batch_size < 1:
        raise ConfigError(f"--batch-size {config.batch_size}: must be >= 1")
    if config.workers < 0:
        raise ConfigError(f"--workers {config.workers}: must be >= 0")
    if config.cam is not None and config.cam < 0:
        raise ConfigError(f"--cam {config.cam}: give K >= 1 for the top K items, or 0 for all")
    if config.source_paths not in SOURCE_PATH_MODES:
        raise ConfigError(
            f"--source-paths {config.source_paths!r}: unknown; choose one of "
            f"{', '.join(SOURCE_PATH_MODES)}"
        )
    if config.aggregate and config.aggregate not in AGGREGATES:
        raise ConfigError(
            f"--aggregate {config.aggregate!r}: unknown; choose one of {', '.join(AGGREGATES)}"
        )
    if not config.file_timeout_s > 0:
        raise ConfigError(f"--file-timeout {config.file_timeout_s:g}: must be > 0 seconds")
    mem = config.worker_memory_mb
    if mem is not None and mem < MIN_WORKER_MEMORY_MB:
        raise ConfigError(
            f"--worker-memory-mb {mem} is too small; a decode worker holds torch and MONAI, "
            f"use at least {MIN_WORKER_MEMORY_MB}"
        )


@dataclass(frozen=True)
class _Job:
    """What one scoring run works with, resolved once by :func:`score`."""

    config: ScoreConfig
    model: Any
    meta: ModelMeta
    info: ModelInfo
    decoder: Any
    predictor: Predictor
    shard: tuple[int, int]
    device: str


def score(
    config: ScoreConfig, *, decoder: Any = None, model: Any = None, meta: ModelMeta | None = None
) -> ScoreSummary:
    """Score ``config.sources`` into ``config.out_dir`` (resumable); returns a summary.

    ``decoder``/``model``/``meta`` replace the defaults (tests, benchmarks).
    """
    from medres.runtime import resolve_device

    _validate(config)
    shard = resolve_shard(config.shard)
    device = str(resolve_device(config.device))
    check_output_dir(config.out_dir, MIN_FREE_BYTES)  # a file/read-only --out; disk space
    check_output_kind(config.out_dir, "score")  # not into a dataset or a run
    if model is None:
        mdir = resolve_model_dir(config.model_dir)
        mhash = model_hash(mdir)
        model, meta = load_model(mdir, device)
    elif meta is None:
        raise ScoringError(f"{config.model_dir}/model.json: no 'classes'; re-export the model")
    else:
        mhash = hashlib.sha256(repr(sorted(meta.to_json().items())).encode()).hexdigest()
    info = _model_info(config, meta, mhash)
    if decoder is None:
        _check_preprocessing(config.model_dir, meta)  # the model's fault, not every item's
        mem = config.worker_memory_mb
        decoder = MedresDecoder(
            meta.preprocessing, inline_max_bytes=mem * 2**20 if mem else None, device=device
        )
    predictor = Predictor(
        model,
        device=device,
        precision=config.precision,
        to_probs=probs_for_task(info.task, meta.effective_temperature),
        dims=meta.dims,
    )
    with disk_guard(config.out_dir):  # SQLite "disk is full", ENOSPC: one line, ledger kept
        return _score(_Job(config, model, meta, info, decoder, predictor, shard, device))


def _check_preprocessing(model_dir: Path, meta: ModelMeta) -> None:
    """A model.json whose saved preprocessing cannot be built is one line naming it."""
    from medres.errors import ConfigError, ModelError
    from medres.train.transforms import transform_spec_from

    try:
        transform_spec_from(meta.preprocessing)
    except ConfigError as err:
        raise ModelError(
            f"{model_dir}/model.json: field 'preprocessing': {str(err).rstrip('.')}; fix the "
            "field or re-save the model with `medres train`"
        ) from None


def _model_info(config: ScoreConfig, meta: ModelMeta, mhash: str) -> ModelInfo:
    classes = list(meta.classes)
    if not classes:
        raise ScoringError(f"{config.model_dir}/model.json: no 'classes'; re-export the model")
    return ModelInfo(
        mhash,
        tuple(classes),
        meta.task or "",
        threshold=float(meta.threshold or 0.5),
        positive=meta.positive_class or "",
    )


@contextlib.contextmanager
def _cpu_threads(device: str, workers: int) -> Iterator[None]:
    """On CPU the model gets (cores - decode processes) threads, at least 1, restored after.

    Decode processes and the model share the cores; more threads than cores makes
    OpenMP spin-wait and can cut throughput several-fold on a busy machine. Without
    decode processes (plain NIfTI inputs: decoded in this process, see
    :mod:`medres.score.decode`) the model gets every core.
    """
    import torch

    before = torch.get_num_threads()
    if device == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        torch.set_num_threads(max(1, min(before, cores - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _score(job: _Job) -> ScoreSummary:
    """The body of :func:`score` once the model and settings are resolved."""
    config, info = job.config, job.info
    out = config.out_dir
    key = load_or_create_key(out)
    summary = ScoreSummary(
        out_dir=out, model_hash=info.model_hash, shard=job.shard, precision=job.predictor.precision
    )
    top = TopK(config.cam, rank_fn(job.meta, config.cam_class)) if config.cam is not None else None
    with Ledger(out / LEDGER_NAME) as ledger:
        done = _open_ledger(job, ledger, key)
        stats, listing_s = _score_sources(job, ledger, key, done, summary, top)
        save_tokens(out, key)  # for commands that read no header (medres.phi.tokens)
        summary.outputs |= export_csvs(
            ledger, out, info.model_hash, keep_ids=config.keep_ids, aggregate=config.aggregate
        )
        counts = ledger.counts(info.model_hash)
    _fill(summary, stats, counts, listing_s)
    log.info(
        "scored %d, rejected %d in %.1f s (%.1f img/s); ledger: %d ok, %d errors",
        summary.scored, summary.errors, summary.seconds, summary.items_per_s,
        summary.total_ok, summary.total_errors,
    )  # fmt: skip
    return summary


def _open_ledger(job: _Job, ledger: Ledger, key: bytes) -> set[str]:
    """Check the pseudonym key, register the model; returns the keys to skip."""
    fingerprint = hashlib.sha256(b"medres-ledger\x00" + key).hexdigest()[:16]
    ledger.set_meta("key_fingerprint", fingerprint, check=True)
    ledger.register_model(job.info, extra={"arch": job.meta.arch})
    done = ledger.done_keys(job.info.model_hash, include_errors=not job.config.retry_errors)
    log.info(
        "model %s, %d items already in the ledger, shard %d/%d, precision %s, device %s",
        job.info.model_hash[:12], len(done), job.shard[0], job.shard[1],
        job.predictor.precision, job.device,
    )  # fmt: skip
    return done


def _score_sources(
    job: _Job,
    ledger: Ledger,
    key: bytes,
    done: set[str],
    summary: ScoreSummary,
    top: TopK | None,
) -> tuple[LoopStats, float]:
    """List the sources into a scratch folder, run the loop, write the SRs; returns the
    loop's stats and the seconds the listing took."""
    out = job.config.out_dir
    _clean_stale_scratch(out)
    scratch = Path(tempfile.mkdtemp(prefix=f".scratch-{os.getpid()}-", dir=out))
    try:
        refs: dict[str, DicomRef] | None = {} if job.config.dicom_out else None
        t_list = time.perf_counter()
        stream = iter_items(job.config, key, scratch, job.info.model_hash)
        listing_s = time.perf_counter() - t_list
        stats = _run_loop(job, ledger, stream, done, summary, refs, top)
        if top is not None and len(top):  # before the scratch goes away (the SCs' headers)
            summary.outputs["cam"] = _write_cams(job, top, refs)
        if refs:  # before the scratch (extracted archive members) goes away
            summary.outputs["dicom"] = write_ledger_srs(
                ledger,
                job.info.model_hash,
                refs,
                job.info.classes,
                out / "dicom",
                keep_ids=job.config.keep_ids,
                algorithm=_algorithm(job),
                push_to=job.config.pacs.url if job.config.push and job.config.pacs else None,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return stats, listing_s


def _algorithm(job: _Job) -> Algorithm:
    """The model as the SR and the SCs name it."""
    return Algorithm(f"medres {job.meta.arch}", job.info.model_hash[:16], job.info.positive)


def _write_cams(job: _Job, top: TopK, refs: dict[str, DicomRef] | None) -> Path:
    """The Grad-CAM PNGs (``OUT_DIR/cam``) and, with ``--dicom-out``, their Secondary
    Capture images next to the SRs (pushed with them by ``--push``)."""
    from medres.score.cam import write_cams

    config, out = job.config, job.config.out_dir
    cam_dir = write_cams(
        job.model, top.top(), out / "cam", meta=job.meta, class_name=config.cam_class,
        device=job.device,
    )  # fmt: skip
    if refs:
        from medres.score.cam_sc import write_cam_scs
        from medres.score.dicom_out import push_new

        scs = write_cam_scs(
            cam_dir, refs, out / "dicom", keep_ids=config.keep_ids, algorithm=_algorithm(job)
        )
        if scs and config.push and config.pacs:
            push_new(config.pacs.url, scs, out / "dicom" / ".pushed.json")
    return cam_dir


def _run_loop(
    job: _Job,
    ledger: Ledger,
    stream: ItemStream,
    done: set[str],
    summary: ScoreSummary,
    refs: dict[str, DicomRef] | None,
    top: TopK | None,
) -> LoopStats:
    config = job.config
    # decode processes only for inputs the decoder cannot read safely in-process
    pool = config.workers > 0 and not (
        stream.plain_nifti and callable(getattr(job.decoder, "in_process", None))
    )
    loop = LoopConfig(
        label_fn=job.info.label,
        batch_size=config.batch_size,
        workers=config.workers,
        prefetch=config.prefetch,
        keep_ids=config.keep_ids,
        start_pool=pool,
        timeout_s=config.file_timeout_s,
        memory_mb=config.worker_memory_mb,
    )
    with (
        _cpu_threads(job.device, config.workers if pool else 0),
        progress.task("scoring", total=None, unit="img") as bar,
    ):
        items = background(_filtered(stream, done, job.shard, summary, bar, refs))
        return run_items(
            items, job.decoder, job.predictor, ledger, job.info.model_hash, loop,
            on_scored=top, on_progress=bar.advance,
        )  # fmt: skip


def _ledger_path(p: Path) -> Path:
    if p.is_dir():
        p = p / LEDGER_NAME
    if not p.is_file():
        raise ScoringError(f"{p}: no scoring ledger; give OUT_DIRs written by `medres score`")
    return p


def merge(
    sources: list[Path],
    out_dir: Path,
    *,
    keep_ids: bool = False,
    aggregate: str | None = None,
    model_hash: str | None = None,
) -> MergeReport:
    """Unite the ledgers of ``sources`` (OUT_DIRs or ledger files) into ``out_dir``.

    The first source's ``.medres_key`` is copied so that a later ``score`` into
    ``out_dir`` resumes with the same pseudonyms; the merge itself refuses ledgers made
    under different keys. Exports the CSVs of ``model_hash`` (default: the only model).
    """
    if not sources:
        raise ConfigError("score-merge needs at least one OUT_DIR to merge")
    ledgers = [_ledger_path(Path(s)) for s in sources]
    check_output_dir(out_dir, MIN_FREE_BYTES)  # a file/read-only --out; disk space
    key_dst = out_dir / KEY_FILE
    key_src = ledgers[0].parent / KEY_FILE
    if not key_dst.exists() and key_src.is_file():
        shutil.copyfile(key_src, key_dst)
        os.chmod(key_dst, 0o600)
    report = merge_ledgers(out_dir / LEDGER_NAME, ledgers)
    with Ledger(out_dir / LEDGER_NAME) as led:
        mhash = led.model(model_hash).model_hash
        export_csvs(led, out_dir, mhash, keep_ids=keep_ids, aggregate=aggregate)
    return report


def _clean_stale_scratch(out: Path) -> None:
    """Remove archive scratch folders left by killed runs (their pid is gone)."""
    for p in out.glob(".scratch-*"):
        try:
            pid = int(p.name.split("-")[1])
            os.kill(pid, 0)
        except (ValueError, IndexError):
            continue
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            continue


def _fill(
    summary: ScoreSummary, stats: LoopStats, counts: dict[str, int], listing_s: float
) -> None:
    """Counts and timing; ``seconds`` is the listing of the sources plus the loop."""
    summary.scored = stats.scored
    summary.errors = stats.errors
    summary.seconds = stats.seconds + listing_s
    done = stats.scored + stats.errors
    summary.items_per_s = done / summary.seconds if summary.seconds > 0 else 0.0
    summary.total_ok = counts.get("ok", 0)
    summary.total_errors = counts.get("error", 0)
