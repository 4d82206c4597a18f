"""The streaming scoring loop: items -> decoding -> batched inference -> ledger.

Choices:

- **Items stream**: the loop pulls items from an iterator (discovery runs in a
  :func:`background` thread), so scoring starts before discovery ends. Items already in
  the ledger (or in another shard) never reach here.
- **Decoding** is :mod:`medres.score.decode`'s: plain bounded ``.nii`` files inline just
  before their batch, everything else in the supervised worker pool, in order.
- **Batches group items of equal shape** (the saved preprocessing normally resizes, so
  there is one shape); each batch is committed in one ledger transaction right after its
  forward pass, together with the error rows seen since the last one. A crash loses only
  the batch in flight.
- **What else is done with scored items** is the caller's: ``on_scored(decoded, probs)``
  sees every committed batch (Grad-CAM's top-K selection, :class:`medres.score.cam.TopK`).

Imports: :mod:`medres.score.decode`, :mod:`medres.score.items`, :mod:`medres.score.ledger`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medres.score.decode import Decoded, _Decoders, chunks
from medres.score.items import ScoreItem
from medres.score.ledger import Ledger, Record

log = logging.getLogger(__name__)

__all__ = ["Decoded", "LoopConfig", "LoopStats", "ScoreItem", "background", "run_items"]

OnScored = Callable[[Sequence[Decoded], np.ndarray], None]


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


class _Batcher:
    """Groups decoded items by shape, predicts full batches and commits them with the
    error rows gathered since the last commit."""

    def __init__(
        self,
        predictor: Callable[[np.ndarray], np.ndarray],
        ledger: Ledger,
        model_hash: str,
        config: LoopConfig,
        stats: LoopStats,
        on_scored: OnScored | None,
        on_progress: Callable[[int], None] | None,
    ) -> None:
        self.predictor, self.ledger, self.model_hash = predictor, ledger, model_hash
        self.config, self.stats = config, stats
        self.on_scored, self.on_progress = on_scored, on_progress
        self.by_shape: dict[tuple[int, ...], list[Decoded]] = {}
        self.errors: list[Record] = []

    def add(self, d: Decoded) -> None:
        if d.item.kind == "error" or d.array is None:
            code, msg = d.code or d.item.code, d.message or d.item.message
            rec = _record(d.item, "error", keep_ids=self.config.keep_ids, code=code, message=msg)
            self.errors.append(rec)
            return
        shape = tuple(d.array.shape)
        group = self.by_shape.setdefault(shape, [])
        group.append(d)
        if len(group) >= self.config.batch_size:
            self.flush(shape)

    def flush(self, shape: tuple[int, ...]) -> None:
        group = self.by_shape.pop(shape, [])
        if not group:
            return
        stats, label = self.stats, self.config.label_fn
        tm = time.perf_counter()
        probs = self.predictor(np.stack([g.array for g in group]))
        stats.model_s += time.perf_counter() - tm
        recs = [
            _record(g.item, "ok", keep_ids=self.config.keep_ids, scores=p, pred=label(list(p)))
            for g, p in zip(group, probs, strict=True)
        ]
        recs += self.errors
        self._commit(recs)
        if self.on_scored is not None:
            self.on_scored(group, probs)
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
    decoder: Callable[[ScoreItem], np.ndarray],
    predictor: Callable[[np.ndarray], np.ndarray],
    ledger: Ledger,
    model_hash: str,
    config: LoopConfig,
    *,
    on_scored: OnScored | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> LoopStats:
    """Decode, predict and commit every item; returns counts and timings.

    The decoder may have ``prepare()`` (called once here) and ``in_process(item) -> bool``
    (items it can decode safely in this process; see :mod:`medres.score.decode`).
    ``on_scored(decoded, probs)`` is called after each committed batch, ``on_progress(n)``
    with the number of rows each commit wrote.
    """
    stats = LoopStats()
    t0 = time.perf_counter()
    decoders = _start(decoder, config, stats)
    batcher = _Batcher(predictor, ledger, model_hash, config, stats, on_scored, on_progress)
    here = getattr(decoder, "in_process", None) if config.workers > 0 else None
    feed = decoders.run(chunks(items, config.chunk, here if callable(here) else None))
    for results in _timed(feed, stats):
        for d in results:
            batcher.add(d)
        batcher.flush_errors(at_least=config.batch_size)
    batcher.finish()
    stats.seconds = time.perf_counter() - t0
    log.debug(
        "loop %.3f s: pool start %.3f, decode wait %.3f, model %.3f, commit %.3f (%d batches)",
        stats.seconds, stats.start_s, stats.decode_wait_s, stats.model_s, stats.commit_s,
        stats.batches,
    )  # fmt: skip
    return stats


def background(iterable: Iterable[Any], maxsize: int = 256) -> Iterator[Any]:
    """Run ``iterable`` in a daemon thread, yielding its items through a bounded queue.

    Discovery runs here so that scoring starts before it ends; an exception in the
    thread is re-raised in the consumer.
    """
    import queue
    import threading

    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def produce() -> None:
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
