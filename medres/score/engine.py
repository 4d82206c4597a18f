"""The streaming scoring loop: items -> decoding -> batched inference -> ledger.

Choices:

- **Items stream**: the loop pulls items from an iterator (discovery runs in a
  :func:`background` thread), so scoring starts before discovery ends. Items already in
  the ledger (or in another shard) never reach here.
- **Decoding** is :mod:`medres.score.decode`'s: plain bounded ``.nii`` files inline just
  before their batch, everything else in the supervised worker pool, in order.
- **One preprocessing path, batched on the device**: decoding returns raw images
  (:class:`~medres.train.batched.RawImage`); a batch is preprocessed right before the
  forward pass by the decoder's :class:`~medres.train.batched.BatchedPreprocess` on the
  scoring device (cuda when scoring on cuda), which groups the batch by its key (raw
  shape, dtype, channels, affine) and computes each item independently of its
  batch-mates (per-item statistics, per-plane spatial steps). It equals the per-item
  MONAI chain (``build_transforms(pre, train=False, load=False)``) within 1e-5
  (``tests/unit/test_batched_preprocess.py``; end to end through ``medres score``:
  ``tests/integration/test_score_batched.py``). An item whose preprocessing fails
  becomes a ``decode_failed`` row; the rest of its batch is scored.
- **Batches bucket items by model-input shape** (``(in_channels, *image_size)`` for a raw
  image, the array's shape for one preprocessed already: by a worker, see
  :mod:`medres.score.decode`, or by a custom decoder). A bucket is scored when it holds
  ``batch_size`` items or :data:`RAW_BATCH_BYTES` of raw voxels (memory stays bounded
  with large volumes), and committed in one ledger transaction right after its forward
  pass, together with the error rows seen since the last one. A crash loses only the
  batch in flight.
- **Sharing a CPU with the model** (measured, issue 18): on a CPU every op of the model's
  forward ends at an OpenMP barrier, and an op waits for any of its threads that another
  runnable thread preempted; on 2 cores a 2-thread forward ran 3-5x slower than a 1-thread
  one while another process was busy. So the predictor measures its thread count per batch
  (:class:`~medres.score.predict.ThreadTuner`), the discovery thread runs at a lower
  priority (:func:`_lower_priority`), and decoding ahead uses no core of this process:
  large in-process NIfTI files are only handed to the kernel's read-ahead when routed
  (:func:`medres.score.decode.bounded_plain_nifti`), then read just before their batch.
- **What else is done with scored items** is the caller's: ``on_scored(decoded, probs)``
  sees every committed batch, each ``Decoded.array`` replaced by its model input (a host
  array, as the model saw it: Grad-CAM's top-K selection, :class:`medres.score.cam.TopK`).

Imports: :mod:`medres.score.decode`, :mod:`medres.score.items`, :mod:`medres.score.ledger`,
:mod:`medres.ingest.codes`; torch lazily.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from medres.ingest.codes import Code
from medres.score.decode import Decoded, _Decoders, chunks
from medres.score.items import ScoreItem
from medres.score.ledger import Ledger, Record

log = logging.getLogger(__name__)

__all__ = ["Decoded", "LoopConfig", "LoopStats", "ScoreItem", "background", "run_items"]

OnScored = Callable[[Sequence[Decoded], np.ndarray], None]
# a bucket of raw images is preprocessed and scored once their raw bytes reach this, even
# before it holds a batch: 64 raw CTs (150 MB each) are never held at once
RAW_BATCH_BYTES = 1 << 30


@dataclass(frozen=True)
class LoopConfig:
    """How :func:`run_items` runs.

    ``label_fn`` maps one row of probabilities to the predicted label. ``workers`` decode
    processes (0: everything inline), ``prefetch`` chunks in flight per worker,
    ``chunk_size`` items per chunk (default ``min(batch_size, 16)``). ``start_pool=False``
    starts the worker processes only if an item needs them (pass it when the caller
    knows that none will). ``timeout_s`` / ``memory_mb``: the per-item limits of a worker.
    """

    label_fn: Callable[[Sequence[float]], str]
    batch_size: int = 32
    workers: int = 2
    prefetch: int = 2
    chunk_size: int | None = None
    keep_ids: bool = False
    start_pool: bool = True
    timeout_s: float = 120.0
    memory_mb: int | None = None

    @property
    def chunk(self) -> int:
        return self.chunk_size or max(1, min(self.batch_size, 16))


@dataclass
class LoopStats:
    """Counts and timings of one :func:`run_items` call."""

    scored: int = 0
    errors: int = 0
    batches: int = 0
    seconds: float = 0.0
    start_s: float = 0.0
    decode_wait_s: float = 0.0
    preprocess_s: float = 0.0
    model_s: float = 0.0
    commit_s: float = 0.0

    @property
    def items_per_s(self) -> float:
        return (self.scored + self.errors) / self.seconds if self.seconds > 0 else 0.0


def _record(
    d: ScoreItem, status: str, *, keep_ids: bool, scores=(), pred="", code="", message=""
) -> Record:
    return Record(
        item_key=d.key,
        image_id=d.key,
        source=d.source,
        status=status,
        scores=tuple(float(s) for s in scores),
        pred=pred,
        code=code,
        message=message,
        study_key=d.study_key,
        series_key=d.series_key,
        study_uid=d.study_uid if keep_ids else "",
        accession=d.accession if keep_ids else "",
    )


def _raw(d: Decoded) -> bool:
    """Whether ``d`` holds a raw image (a ``RawImage``: preprocessed with its batch)."""
    return hasattr(d.array, "affine") and hasattr(d.array, "channels")


def _raw_bytes(d: Decoded) -> int:
    return int(getattr(getattr(d.array, "array", None), "nbytes", 0)) if _raw(d) else 0


class _Batcher:
    """Buckets decoded items by model-input shape, preprocesses and predicts full batches,
    and commits them with the error rows gathered since the last commit.

    ``prep`` (a :class:`~medres.train.batched.BatchedPreprocess` on the scoring device)
    turns the raw images of a batch into model inputs; it groups them internally by its
    key (raw shape, dtype, channels, affine). A raw image goes to the bucket of
    ``prep.out_shape``, an array already preprocessed to the bucket of its shape, so a
    worker-preprocessed item and a raw one share a forward pass.
    """

    def __init__(
        self,
        predictor: Callable[[Any], np.ndarray],
        ledger: Ledger,
        model_hash: str,
        config: LoopConfig,
        stats: LoopStats,
        on_scored: OnScored | None,
        on_progress: Callable[[int], None] | None,
        prep: Any = None,
    ) -> None:
        self.predictor, self.ledger, self.model_hash = predictor, ledger, model_hash
        self.config, self.stats = config, stats
        self.on_scored, self.on_progress = on_scored, on_progress
        self.prep = prep
        self.by_shape: dict[tuple[int, ...], list[Decoded]] = {}
        self.raw_bytes: dict[tuple[int, ...], int] = {}
        self.errors: list[Record] = []

    def _error(self, item: ScoreItem, code: str, message: str) -> None:
        rec = _record(item, "error", keep_ids=self.config.keep_ids, code=code, message=message)
        self.errors.append(rec)

    def add(self, d: Decoded) -> None:
        if d.item.kind == "error" or d.array is None:
            self._error(d.item, d.code or d.item.code, d.message or d.item.message)
            return
        raw = _raw(d)
        if raw and self.prep is None:
            raise TypeError("a raw image reached a scoring loop without a BatchedPreprocess")
        shape = tuple(self.prep.out_shape) if raw else tuple(d.array.shape)
        group = self.by_shape.setdefault(shape, [])
        group.append(d)
        self.raw_bytes[shape] = self.raw_bytes.get(shape, 0) + _raw_bytes(d)
        if len(group) >= self.config.batch_size or self.raw_bytes[shape] >= RAW_BATCH_BYTES:
            self.flush(shape)

    def _inputs(self, group: list[Decoded]) -> tuple[Any, list[Decoded]]:
        """The model-input batch of ``group`` (in order) and the items it holds; an item
        whose preprocessing fails becomes an error row (the others are kept)."""
        ready = [i for i, g in enumerate(group) if not _raw(g)]
        if len(ready) == len(group):
            return np.stack([g.array for g in group]), group
        import torch

        try:
            x = self.prep([g.array for g in group if _raw(g)])
        except Exception:  # find the item(s) that cannot be preprocessed, keep the rest
            return self._one_by_one(group)
        if not ready:
            return x, group
        out = torch.empty((len(group), *x.shape[1:]), dtype=x.dtype, device=x.device)
        ready_set = set(ready)
        raw_idx = [i for i in range(len(group)) if i not in ready_set]
        out[raw_idx] = x
        stacked = torch.from_numpy(np.stack([group[i].array for i in ready]))
        out[ready] = stacked.to(x.device)
        return out, group

    def _one_by_one(self, group: list[Decoded]) -> tuple[Any, list[Decoded]]:
        import torch

        from medres.errors import MedresError

        xs, kept = [], []
        for g in group:
            try:
                x = self.prep([g.array])[0] if _raw(g) else torch.from_numpy(g.array)
            except Exception as exc:
                why = str(exc) if isinstance(exc, MedresError) else type(exc).__name__
                msg = f"{g.item.source}: preprocessing failed ({why})"
                self._error(g.item, Code.DECODE_FAILED.value, msg)
                continue
            xs.append(x.to(self.prep.device))
            kept.append(g)
        return (torch.stack(xs) if xs else None), kept

    def flush(self, shape: tuple[int, ...]) -> None:
        group = self.by_shape.pop(shape, [])
        self.raw_bytes.pop(shape, None)
        if not group:
            return
        stats, label = self.stats, self.config.label_fn
        tm = time.perf_counter()
        x, group = self._inputs(group)
        stats.preprocess_s += time.perf_counter() - tm
        if not group:
            self.flush_errors()
            return
        tm = time.perf_counter()
        probs = self.predictor(x)
        stats.model_s += time.perf_counter() - tm
        recs = [
            _record(g.item, "ok", keep_ids=self.config.keep_ids, scores=p, pred=label(list(p)))
            for g, p in zip(group, probs, strict=True)
        ]
        recs += self.errors
        self._commit(recs)
        if self.on_scored is not None:  # the model inputs (CAM), as the model saw them
            xs = x.detach().cpu().numpy() if hasattr(x, "detach") else x
            self.on_scored([replace(g, array=xi) for g, xi in zip(group, xs, strict=True)], probs)
        stats.scored += len(group)
        stats.errors += len(self.errors)
        stats.batches += 1
        self._progress(len(recs))
        self.errors.clear()

    def flush_errors(self, at_least: int = 1) -> None:
        if self.errors and len(self.errors) >= at_least:
            n = len(self.errors)
            self._commit(list(self.errors))
            self.stats.errors += n
            self.errors.clear()
            self._progress(n)

    def finish(self) -> None:
        for shape in list(self.by_shape):
            self.flush(shape)
        self.flush_errors()

    def _commit(self, recs: list[Record]) -> None:
        tc = time.perf_counter()
        self.ledger.commit(self.model_hash, recs)
        self.stats.commit_s += time.perf_counter() - tc

    def _progress(self, n: int) -> None:
        if self.on_progress is not None:
            self.on_progress(n)


def _start(decoder: Any, config: LoopConfig, stats: LoopStats) -> _Decoders:
    """Prepare the decoder here and start the worker pool when asked to (timed)."""
    ts = time.perf_counter()
    decoders = _Decoders(
        decoder,
        config.workers,
        config.prefetch,
        per_batch=-(-config.batch_size // config.chunk),
        timeout_s=config.timeout_s,
        memory_mb=config.memory_mb,
    )
    prepare = getattr(decoder, "prepare", None)
    if callable(prepare):  # imports and set-up once, for the items decoded here
        prepare()
    if config.start_pool:
        decoders.start()  # the workers warm up while discovery runs
    stats.start_s = time.perf_counter() - ts
    return decoders


def _timed(results: Iterator[list[Decoded]], stats: LoopStats) -> Iterator[list[Decoded]]:
    """``results``, adding the time spent waiting for each to ``stats.decode_wait_s``."""
    while True:
        tw = time.perf_counter()
        try:
            batch = next(results)
        except StopIteration:
            return
        finally:
            stats.decode_wait_s += time.perf_counter() - tw
        yield batch


def run_items(
    items: Iterable[ScoreItem],
    decoder: Callable[[ScoreItem], Any],
    predictor: Callable[[Any], np.ndarray],
    ledger: Ledger,
    model_hash: str,
    config: LoopConfig,
    *,
    on_scored: OnScored | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> LoopStats:
    """Decode, predict and commit every item; returns counts and timings.

    The decoder may have ``prepare()`` (called once here), ``in_process(item) -> bool``
    (items it can decode safely in this process; see :mod:`medres.score.decode`) and
    ``batched`` (a ``BatchedPreprocess``: needed when it returns raw images).
    ``predictor`` takes a (B, C, *spatial) batch, a numpy array or a tensor on its device.
    ``on_scored(decoded, probs)`` is called after each committed batch, ``on_progress(n)``
    with the number of rows each commit wrote.
    """
    stats = LoopStats()
    t0 = time.perf_counter()
    decoders = _start(decoder, config, stats)
    prep = getattr(decoder, "batched", None)  # the batched preprocessing, on the device
    batcher = _Batcher(predictor, ledger, model_hash, config, stats, on_scored, on_progress, prep)
    here = getattr(decoder, "in_process", None) if config.workers > 0 else None
    feed = decoders.run(chunks(items, config.chunk, here if callable(here) else None))
    for results in _timed(feed, stats):
        for d in results:
            batcher.add(d)
        batcher.flush_errors(at_least=config.batch_size)
    batcher.finish()
    stats.seconds = time.perf_counter() - t0
    log.debug(
        "loop %.3f s: pool start %.3f, decode wait %.3f, preprocess %.3f, model %.3f, "
        "commit %.3f (%d batches)",
        stats.seconds, stats.start_s, stats.decode_wait_s, stats.preprocess_s, stats.model_s,
        stats.commit_s, stats.batches,
    )  # fmt: skip
    return stats


# the discovery thread's niceness above the process's: it yields the cores to the model's
# OpenMP team, whose every op waits at a barrier for a preempted thread (medres.score.predict)
DISCOVERY_NICE = 5


def _lower_priority() -> None:
    """Lower this thread's scheduling priority by :data:`DISCOVERY_NICE` (Linux: a thread
    has its own nice value; elsewhere, or when refused, nothing happens)."""
    import threading

    tid = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + DISCOVERY_NICE))
    except (AttributeError, OSError):  # no per-thread priorities here: run as is
        log.debug("discovery thread priority left as it is")


def background(iterable: Iterable[Any], maxsize: int = 256) -> Iterator[Any]:
    """Run ``iterable`` in a daemon thread, yielding its items through a bounded queue.

    Discovery runs here so that scoring starts before it ends, at a lower priority than
    the model (:func:`_lower_priority`); an exception in the thread is re-raised in the
    consumer.
    """
    import queue
    import threading

    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def produce() -> None:
        _lower_priority()
        try:
            for x in iterable:
                while not stop.is_set():
                    try:
                        q.put(("item", x), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as exc:  # re-raised in the consumer
            q.put(("raise", exc))

    th = threading.Thread(target=produce, name="medres-discovery", daemon=True)
    th.start()
    try:
        while True:
            kind, x = q.get()
            if kind == "item":
                yield x
            elif kind == "raise":
                raise x
            else:
                return
    finally:
        stop.set()
