"""``medres score``: score folders, archives or a manifest with a trained model, resumably.

Choices:

- The model directory is loaded with ``medres.models.load_model_dir`` and its saved
  ``preprocessing`` is replayed with ``medres.train.transforms.build_transforms(...,
  train=False, load=False)`` on ``image_to_metatensor(LoadedImage)``: the same code
  path as training and evaluation, never a second copy.
- The model hash is sha256 over the weights file then ``model.json``; the ledger is
  keyed by (item key, model hash), so one OUT_DIR can hold several models' results and
  re-scoring with a retrained model never mixes scores.
- Sharding: ``--shard i/n`` keeps the items whose stable identity hash falls in shard
  ``i``; under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the rank and world size are
  used the same way, all ranks write the same ledger (SQLite serialises them) and every
  rank exports under a lock, so the last one to finish leaves the complete CSVs.
- Resuming: committed items (ok and error) are skipped; ``retry_errors`` re-tries the
  error rows.
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

import numpy as np

from medres import progress
from medres.errors import ConfigError, ScoringError
from medres.phi import KEY_FILE, SOURCE_PATH_MODES, load_or_create_key
from medres.score.engine import (
    LoopStats,
    Predictor,
    ScoreItem,
    background,
    default_to_probs,
    run_items,
)
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
from medres.score.sources import (
    ItemStream,
    discover_items,
    is_manifest_source,
    is_plain_nifti,
    manifest_items,
)

log = logging.getLogger(__name__)

MODEL_FILES = ("weights.safetensors", "model.json")


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


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0") or 0)
            return f"cuda:{local % torch.cuda.device_count()}"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
    return device


class MedresDecoder:
    """Worker-side decoding: ingest's readers + the model's saved inference transforms.

    Picklable (only the preprocessing dict travels); the MONAI transform is built lazily
    in each worker.

    Speed: the transforms run with MONAI's metadata tracking off (``set_track_meta(False)``)
    unless the preprocessing resamples to a ``spacing`` (the only step after the first
    that reads the affine). The input stays a ``MetaTensor``, so the orientation step
    still reads its affine; every later step then works on plain tensors, which halves
    the transform cost and gives identical values (MetaTensor bookkeeping never changes
    voxels). Scoring keeps no metadata, so nothing is lost.
    """

    def __init__(self, preprocessing: dict[str, Any]) -> None:
        self.preprocessing = preprocessing
        self._tf: Any = None
        self._track_meta = bool(preprocessing.get("spacing"))

    def __getstate__(self) -> dict[str, Any]:
        return {
            "preprocessing": self.preprocessing,
            "_tf": None,
            "_track_meta": self._track_meta,
        }

    def load(self, item: ScoreItem) -> Any:
        """The item's :class:`~medres.ingest.image.LoadedImage` via ingest's readers."""
        if item.kind == "dicom":
            from medres.ingest.dicom import load_stack

            return load_stack(item.payload)
        from medres.ingest.nifti import load_nifti

        return load_nifti(Path(item.payload[0]), item.payload[1] if len(item.payload) > 1 else "")

    def in_process(self, item: ScoreItem) -> bool:
        """Whether ``item`` may be decoded in the scoring process rather than a worker.

        True for an uncompressed ``.nii`` file: ingest's NIfTI reader is nibabel and
        numpy (no native decoder that can crash the interpreter) and what it reads is
        bounded by the file size. DICOM (native pixel decoders) and compressed files
        (a gzip bomb) go to the isolated workers.
        """
        if item.kind == "error":
            return True  # nothing to decode
        return item.kind == "nifti" and is_plain_nifti(str(item.payload[0]))

    def prepare(self) -> None:
        """Import the readers and build the transforms (the engine calls this before it
        forks the workers, so that they inherit both instead of each paying for them)."""
        import medres.ingest.nifti  # noqa: F401
        from medres.train.transforms import build_transforms

        if self._tf is None:
            self._tf = build_transforms(self.preprocessing, train=False, load=False)

    def __call__(self, item: ScoreItem) -> np.ndarray:
        from medres.train.transforms import image_to_metatensor

        self.prepare()
        img = self.load(item)
        # C order before the float32 cast: the transposing copy moves 2-byte voxels, not 4
        img.array = np.ascontiguousarray(img.array)
        with _track_meta(self._track_meta):
            out = self._tf({"image": image_to_metatensor(img)})
        x = out["image"]
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, np.float32)


@contextlib.contextmanager
def _track_meta(on: bool) -> Iterator[None]:
    """MONAI's global metadata tracking set to ``on`` for the block, restored after."""
    from monai.data import get_track_meta, set_track_meta

    before = get_track_meta()
    set_track_meta(on)
    try:
        yield
    finally:
        set_track_meta(before)


def load_model(model_dir: Path, device: str) -> tuple[Any, dict[str, Any]]:
    try:
        from medres.models import load_model_dir
    except ImportError:  # the package may not re-export it
        from medres.models.modeldir import load_model_dir
    return load_model_dir(model_dir, device=device)


def iter_items(config: ScoreConfig, key: bytes, scratch: Path) -> ItemStream:
    """The items of ``config.sources``, listed now (see :class:`ItemStream`)."""
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
    dicom_refs: dict[str, tuple[str, str, str]] | None = None,
) -> Iterator[ScoreItem]:
    """Drop items of other shards and items already committed; sets the bar's total at the end.

    ``dicom_refs`` collects (study UID, study key, a header path) of every DICOM item of
    this shard, scored now or earlier, for ``--dicom-out``.
    """
    seen: set[str] = set()
    for it in items:
        summary.discovered += 1
        if shard[1] > 1 and shard_of(it.identity, shard[1]) != shard[0]:
            summary.skipped_shard += 1
            continue
        if dicom_refs is not None and it.kind == "dicom":
            dicom_refs[it.key] = (it.study_uid, it.study_key, str(it.payload.first.path))
        if it.key in done or it.key in seen:
            summary.skipped_done += 1
            continue
        seen.add(it.key)
        yield it
    if bar is not None:
        bar.update(total=len(seen))


def score(
    config: ScoreConfig, *, decoder: Any = None, model: Any = None, meta: dict | None = None
) -> ScoreSummary:
    """Score ``config.sources`` into ``config.out_dir`` (resumable); returns a summary.

    ``decoder``/``model``/``meta`` replace the defaults (tests, benchmarks).
    """
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
    shard = resolve_shard(config.shard)
    device = resolve_device(config.device)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        mdir = resolve_model_dir(config.model_dir)
        mhash = model_hash(mdir)
        model, meta = load_model(mdir, device)
    else:
        mhash = hashlib.sha256(repr(sorted((meta or {}).items())).encode()).hexdigest()
    meta = meta or {}
    classes = [str(c) for c in meta.get("classes", [])]
    if not classes:
        raise ScoringError(f"{config.model_dir}/model.json: no 'classes'; re-export the model")
    task = str(meta.get("task", ""))
    if decoder is None:
        decoder = MedresDecoder(meta.get("preprocessing", {}))
    dims = meta.get("dims") or meta.get("preprocessing", {}).get("dims")
    predictor = Predictor(
        model,
        device=device,
        precision=config.precision,
        to_probs=probs_for_task(task),
        dims=int(dims) if dims else None,
    )
    return _score(config, model, meta, mhash, decoder, predictor, shard, device)


@contextlib.contextmanager
def _cpu_threads(device: str, workers: int) -> Iterator[None]:
    """On CPU the model gets (cores - decode processes) threads, at least 1, restored after.

    Decode processes and the model share the cores; more threads than cores makes
    OpenMP spin-wait and can cut throughput several-fold on a busy machine. Without
    decode processes (plain NIfTI inputs: decoded by a thread of this process, see
    :mod:`medres.score.engine`) the model gets every core.
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


def _score(
    config: ScoreConfig,
    model: Any,
    meta: dict[str, Any],
    mhash: str,
    decoder: Any,
    predictor: Predictor,
    shard: tuple[int, int],
    device: str,
) -> ScoreSummary:
    """The body of :func:`score` once the model and settings are resolved."""
    out = config.out_dir
    classes = [str(c) for c in meta.get("classes", [])]
    task = str(meta.get("task", ""))
    key = load_or_create_key(out)
    fingerprint = hashlib.sha256(b"medres-ledger\x00" + key).hexdigest()[:16]
    summary = ScoreSummary(
        out_dir=out, model_hash=mhash, shard=shard, precision=predictor.precision
    )

    with Ledger(out / LEDGER_NAME) as ledger:
        ledger.set_meta("key_fingerprint", fingerprint, check=True)
        info = ModelInfo(
            mhash,
            tuple(classes),
            task,
            threshold=float(meta.get("threshold", 0.5) or 0.5),
            positive=str(meta.get("positive_class", "") or ""),
        )
        ledger.register_model(info, extra={"arch": meta.get("arch")})
        done = ledger.done_keys(mhash, include_errors=not config.retry_errors)
        log.info(
            "model %s, %d items already in the ledger, shard %d/%d, precision %s, device %s",
            mhash[:12], len(done), shard[0], shard[1], predictor.precision, device,
        )  # fmt: skip
        _clean_stale_scratch(out)
        scratch = Path(tempfile.mkdtemp(prefix=f".scratch-{os.getpid()}-", dir=out))
        try:
            refs: dict[str, tuple[str, str, str]] | None = {} if config.dicom_out else None
            t_list = time.perf_counter()
            stream = iter_items(config, key, scratch)
            listing_s = time.perf_counter() - t_list
            # decode processes only for inputs the decoder cannot read safely in-process
            pool = config.workers > 0 and not (
                stream.plain_nifti and callable(getattr(decoder, "in_process", None))
            )
            with (
                _cpu_threads(device, config.workers if pool else 0),
                progress.task("scoring", total=None, unit="img") as bar,
            ):
                items = background(_filtered(stream, done, shard, summary, bar, refs))
                stats = run_items(
                    items,
                    decoder,
                    predictor,
                    ledger,
                    mhash,
                    label_fn=info.label,
                    batch_size=config.batch_size,
                    workers=config.workers,
                    prefetch=config.prefetch,
                    keep_ids=config.keep_ids,
                    keep_top=config.cam,
                    rank_fn=_rank_fn(meta, config.cam_class),
                    on_progress=bar.advance,
                    start_pool=pool,
                )
            if refs:  # before the scratch (extracted archive members) goes away
                summary.outputs["dicom"] = _write_srs(ledger, mhash, refs, info, out / "dicom")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        summary.outputs |= export_csvs(
            ledger, out, mhash, keep_ids=config.keep_ids, aggregate=config.aggregate
        )
        counts = ledger.counts(mhash)
    _fill(summary, stats, counts, listing_s)
    if config.cam is not None and stats.kept:
        from medres.score.cam import write_cams

        summary.outputs["cam"] = write_cams(
            model, stats.top(), out / "cam", meta=meta, class_name=config.cam_class, device=device
        )
    log.info(
        "scored %d, rejected %d in %.1f s (%.1f img/s); ledger: %d ok, %d errors",
        summary.scored, summary.errors, summary.seconds, summary.items_per_s,
        summary.total_ok, summary.total_errors,
    )  # fmt: skip
    return summary


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
    out_dir.mkdir(parents=True, exist_ok=True)
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


def probs_for_task(task: str) -> Any:
    """Logits -> probabilities as training does: sigmoid for multilabel, else softmax."""
    if task != "multilabel":
        return default_to_probs

    def sigmoid(logits: Any) -> Any:
        import torch

        return torch.sigmoid(logits)

    return sigmoid


def _write_srs(
    ledger: Ledger, mhash: str, refs: dict[str, tuple[str, str, str]], info: ModelInfo, out: Path
) -> Path:
    from medres.score.dicom_out import SeriesResult, write_study_srs

    results = [
        SeriesResult(
            refs[r.item_key][0], refs[r.item_key][1], refs[r.item_key][2], r.scores, r.pred
        )
        for r in ledger.records(mhash)
        if r.status == "ok" and r.item_key in refs
    ]
    write_study_srs(results, out, info.classes)
    return out


def _rank_fn(meta: dict[str, Any], class_name: str | None) -> Any:
    """Items are ranked for ``--cam`` by the positive (or chosen) class, else their top class."""
    from medres.score.cam import rank_class

    idx = rank_class(meta, class_name)
    if idx is None:
        return lambda p: float(np.max(p))
    return lambda p: float(p[idx])


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
