"""The streaming scoring loop: items -> decoding -> batched inference -> ledger.

Choices:

- **Where an item is decoded** is the decoder's call (``decoder.in_process(item)``, when
  it has one). Items it declares safe (plain uncompressed NIfTI: nibabel/numpy reads,
  no native decoder, memory bounded by the file size) are decoded inline, in this
  thread, just before their batch: on a CPU the model then gets every core, and no item
  pays for inter-process transfer, which costs more than decoding a small NIfTI. (A
  prefetching decode *thread* was measured and dropped: its torch ops start a second
  OpenMP team next to the model's and its Python holds the GIL the model's dispatch
  needs; on 2 cores the forward passes ran several times slower.) Every other item
  (DICOM, compressed, whatever a custom decoder does not vouch for) goes to worker
  **processes**, so a crashing decoder cannot take the run down.
- **Worker processes** use ``fork`` on Linux, like PyTorch's DataLoader (the workers
  never touch CUDA). Items are sent in chunks to amortise inter-process overhead; at
  most ``max(workers * prefetch, chunks per batch + workers)`` chunks are in flight
  (inline chunks count too, they keep the order), which bounds memory and keeps the
  model fed while it computes. The decoder's ``prepare()`` (imports, transform build)
  runs once before the workers are forked, so they inherit it. The pool starts before
  discovery does (``start_pool``), or on demand (``forkserver``) when no item was
  expected to need it. Results come back in submission order, so a run is
  deterministic. ``workers=0`` decodes every item inline (debugging, tests).
- **Items stream**: the loop pulls items from an iterator, so scoring starts before
  discovery ends. Items already in the ledger (or in another shard) never reach here.
- **Per-item failures are data, not exceptions**: a decoder failure becomes an
  ``error`` record with an ingest code (``decode_failed`` unless the reader raised an
  ``IngestError`` with its own code). A worker that dies (segfaulting decoder) breaks
  the pool; its chunk is retried item by item in a fresh pool and the culprit is
  recorded as ``decode_failed``.
- **Batches group items of equal shape** (the saved preprocessing normally resizes, so
  there is one shape); each batch is committed in one ledger transaction right after its
  forward pass. A crash loses only the batch in flight.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.score.ledger import Ledger, Record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreItem:
    """One unit of scoring work (a NIfTI file, a DICOM stack or a manifest row).

    ``key`` is the pseudonymous item key (also the output ``image_id``). ``identity`` is
    the raw stable identity used only to compute the shard; it is never written.
    ``kind`` is ``nifti``, ``dicom`` or ``error`` (rejected during discovery, with
    ``code``/``message``). ``payload`` is whatever the decoder needs (paths, picklable).
    """

    key: str
    identity: str
    source: str
    kind: str
    payload: Any = None
    study_key: str = ""
    series_key: str = ""
    study_uid: str = ""
    accession: str = ""
    code: str = ""
    message: str = ""


@dataclass
class Decoded:
    """What a worker returns for one item: the model input array or an error."""

    item: ScoreItem
    array: np.ndarray | None = None
    code: str = ""
    message: str = ""


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
    kept: list[tuple[float, int, ScoreItem, np.ndarray, np.ndarray]] = field(default_factory=list)

    def top(self) -> list[tuple[ScoreItem, np.ndarray, np.ndarray]]:
        """Kept ``(item, input, probs)``, highest rank first."""
        return [(it, x, p) for _, _, it, x, p in sorted(self.kept, key=lambda t: (-t[0], t[1]))]

    @property
    def items_per_s(self) -> float:
        return (self.scored + self.errors) / self.seconds if self.seconds > 0 else 0.0


# -- worker side -------------------------------------------------------------------------------
_WORKER_DECODER: Callable[[ScoreItem], np.ndarray] | None = None


def _init_worker(decoder: Callable[[ScoreItem], np.ndarray]) -> None:
    global _WORKER_DECODER
    _WORKER_DECODER = decoder
    import torch

    torch.set_num_threads(1)  # one thread per worker; the parallelism is across workers


def decode_one(decoder: Callable[[ScoreItem], np.ndarray], item: ScoreItem) -> Decoded:
    """Decode one item, turning any failure into a coded error (never raises)."""
    if item.kind == "error":
        return Decoded(item, code=item.code, message=item.message)
    try:
        arr = decoder(item)
        return Decoded(item, np.ascontiguousarray(arr, dtype=np.float32))
    except IngestError as exc:
        return Decoded(item, code=str(exc.code), message=str(exc))
    except BaseException as exc:  # decoders raise non-Exception panics
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        # the exception's text may hold absolute paths (PHI in folder names): type only
        return Decoded(
            item,
            code=Code.DECODE_FAILED.value,
            message=f"{item.source}: decoding failed ({type(exc).__name__}); "
            "the file may be corrupt, re-export it",
        )


def _decode_chunk(chunk: Sequence[ScoreItem]) -> list[Decoded]:
    assert _WORKER_DECODER is not None
    return [decode_one(_WORKER_DECODER, it) for it in chunk]


# -- model side ---------------------------------------------------------------------------------
class Predictor:
    """Batched forward: ``inference_mode``, channels_last, autocast by ``precision``.

    ``precision``: ``fp32`` (exact; no autocast), ``bf16`` (autocast to bfloat16 on CPU
    or CUDA), ``fp16`` (CUDA autocast), ``auto`` (fp16 AMP on CUDA, fp32 on CPU: bf16 on
    CPU is opt-in because it changes probabilities by up to ~1e-2, see the benchmark).
    ``to_probs`` maps logits to probabilities (the model's task decides how).
    """

    PRECISIONS = ("auto", "fp32", "bf16", "fp16")

    def __init__(
        self,
        model: Any,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        to_probs: Callable[[Any], Any] | None = None,
        channels_last: bool = True,
        dims: int | None = None,
    ) -> None:
        import torch

        from medres.errors import ConfigError

        if precision not in self.PRECISIONS:
            raise ConfigError(
                f"--precision {precision!r}: unknown; choose one of {', '.join(self.PRECISIONS)}"
            )
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if precision == "auto":
            precision = "fp16" if cuda else "fp32"
        if precision == "fp16" and not cuda:
            raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        self.precision = precision
        self.model = model.to(self.device).eval()
        self.channels_last = channels_last
        self._formatted: set[int] = set()
        self.to_probs = to_probs or default_to_probs
        if dims in (2, 3):  # convert the weights now, not inside the first timed batch
            self._format_model(dims + 2)

    def _memory_format(self, ndim: int) -> Any:
        import torch

        if not self.channels_last:
            return None
        return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)

    def _format_model(self, ndim: int) -> Any:
        fmt = self._memory_format(ndim)
        if fmt is not None and ndim not in self._formatted:
            self.model = self.model.to(memory_format=fmt)
            self._formatted.add(ndim)
        return fmt

    def _autocast(self) -> Any:
        import contextlib

        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch))
        fmt = self._format_model(x.ndim)
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        with torch.inference_mode(), self._autocast():
            logits = self.model(x)
        probs = self.to_probs(logits.float())
        return probs.detach().cpu().numpy().astype(np.float64)


def default_to_probs(logits: Any) -> Any:
    """Softmax over classes (binary models have two outputs, ``prob_0, prob_1``)."""
    import torch

    if logits.ndim == 2 and logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


# -- the loop ------------------------------------------------------------------------------------
def _chunks(
    items: Iterable[ScoreItem], size: int, here: Callable[[ScoreItem], bool] | None = None
) -> Iterator[tuple[bool, list[ScoreItem]]]:
    """``(in_process, chunk)``: at most ``size`` consecutive items that share a route.

    ``here(item)`` tells whether ``item`` may be decoded in this process (else: in a
    worker process); without it every item goes to the workers.
    """
    chunk: list[ScoreItem] = []
    route = False
    for it in items:
        r = bool(here(it)) if here is not None else False
        if chunk and r != route:
            yield route, chunk
            chunk = []
        route = r
        chunk.append(it)
        if len(chunk) >= size:
            yield route, chunk
            chunk = []
    if chunk:
        yield route, chunk


def _mp_context() -> mp.context.BaseContext:
    method = os.environ.get("MEDRES_MP_START") or ("fork" if sys.platform == "linux" else "spawn")
    return mp.get_context(method)


def _decode_list(
    decoder: Callable[[ScoreItem], np.ndarray], chunk: Sequence[ScoreItem]
) -> list[Decoded]:
    return [decode_one(decoder, it) for it in chunk]


class _Decoders:
    """Ordered, bounded, prefetching decode of item chunks.

    Chunks marked ``in_process`` are decoded inline when they are consumed, the others
    by ``workers`` processes (started by :meth:`start` or on first need, and fed ahead);
    with ``workers == 0`` every chunk is decoded inline.
    """

    def __init__(
        self,
        decoder: Callable[[ScoreItem], np.ndarray],
        workers: int,
        prefetch: int,
        per_batch: int = 1,
    ):
        self.decoder = decoder
        self.workers = workers
        # while the model runs on one batch, the chunks of the next one must already be
        # in flight (one slot is taken by the chunk being consumed), else the decoders idle
        self.max_inflight = max(1, workers * prefetch, per_batch + workers)
        self.pool: ProcessPoolExecutor | None = None

    def _new_pool(self, *, safe: bool = False) -> ProcessPoolExecutor:
        """A pool whose workers are all started before this returns.

        With ``fork`` the workers must be forked while no other thread of ours runs
        (a lock held by another thread at fork time stays locked in the child), so the
        first pool is warmed up before discovery starts; a pool made later, while
        discovery runs, uses ``forkserver`` (``safe``).
        """
        ctx = _mp_context()
        if safe and ctx.get_start_method() == "fork":
            ctx = mp.get_context("forkserver")
        pool = ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=_init_worker, initargs=(self.decoder,)
        )
        for f in [pool.submit(os.getpid) for _ in range(self.workers)]:
            f.result()
        return pool

    def start(self) -> None:
        """Start the workers (call before any other thread is started)."""
        if self.workers > 0 and self.pool is None:
            self.pool = self._new_pool()

    def _kill(self) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def run(self, chunks: Iterable[tuple[bool, list[ScoreItem]]]) -> Iterator[list[Decoded]]:
        if self.workers <= 0:
            for _, chunk in chunks:
                yield _decode_list(self.decoder, chunk)
            return
        pending: deque[tuple[bool, list[ScoreItem], Future | None]] = deque()
        try:
            for here, chunk in chunks:
                pending.append((here, chunk, self._submit(here, chunk)))
                while len(pending) >= self.max_inflight:
                    yield self._result(*pending.popleft(), pending)
            while pending:
                yield self._result(*pending.popleft(), pending)
        except BaseException:
            self._kill()  # never wait for workers on the error path
            raise
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def _submit(self, here: bool, chunk: list[ScoreItem]) -> Future | None:
        """The future of a worker-decoded chunk; ``None`` for one decoded inline."""
        if here:
            return None
        if self.pool is None:  # no item was expected to need the workers
            self.pool = self._new_pool(safe=True)
        try:
            return self.pool.submit(_decode_chunk, chunk)
        except BrokenProcessPool:
            self._kill()
            self.pool = self._new_pool(safe=True)
            return self.pool.submit(_decode_chunk, chunk)

    def _result(
        self,
        here: bool,
        chunk: list[ScoreItem],
        fut: Future | None,
        pending: deque[tuple[bool, list[ScoreItem], Future | None]],
    ) -> list[Decoded]:
        if fut is None:
            return _decode_list(self.decoder, chunk)
        try:
            return fut.result()
        except BrokenProcessPool:
            log.warning("a decode worker died; retrying its %d items one by one", len(chunk))
            out = self._isolate(chunk)
            # every other chunk in flight in the pool died with it: resubmit them
            for i, (h, c, _) in enumerate(list(pending)):
                if not h:
                    pending[i] = (h, c, self._submit(h, c))
            return out

    def _isolate(self, chunk: list[ScoreItem]) -> list[Decoded]:
        out = []
        for it in chunk:
            self._kill()
            self.pool = self._new_pool(safe=True)
            try:
                out.extend(self.pool.submit(_decode_chunk, [it]).result())
            except BrokenProcessPool:
                out.append(
                    Decoded(
                        it,
                        code=Code.DECODE_FAILED.value,
                        message="the decoder crashed the worker process on this input "
                        "(corrupt file?); it was skipped",
                    )
                )
        self._kill()
        self.pool = self._new_pool(safe=True)
        return out


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


def run_items(
    items: Iterable[ScoreItem],
    decoder: Callable[[ScoreItem], np.ndarray],
    predictor: Callable[[np.ndarray], np.ndarray],
    ledger: Ledger,
    model_hash: str,
    *,
    label_fn: Callable[[Sequence[float]], str],
    batch_size: int = 32,
    workers: int = 2,
    prefetch: int = 2,
    chunk_size: int | None = None,
    keep_ids: bool = False,
    keep_top: int | None = None,
    rank_fn: Callable[[np.ndarray], float] | None = None,
    on_progress: Callable[[int], None] | None = None,
    start_pool: bool = True,
) -> LoopStats:
    """Decode, predict and commit every item; returns counts and timings.

    ``label_fn`` maps one row of probabilities to the predicted label. ``keep_top``
    keeps the inputs of the ``keep_top`` items ranked highest by ``rank_fn(probs)`` (0 =
    all) in ``stats.kept`` (for Grad-CAM), with a bounded heap.

    The decoder may have ``prepare()`` (called once, before the workers are forked) and
    ``in_process(item) -> bool`` (items it can decode safely in this process; see the
    module docstring). ``start_pool=False`` starts the worker processes only if an item
    needs them (pass it when the caller knows that none will).
    """
    import heapq

    stats = LoopStats()
    t0 = time.perf_counter()
    chunk_size = chunk_size or max(1, min(batch_size, 16))
    decoders = _Decoders(decoder, workers, prefetch, per_batch=-(-batch_size // chunk_size))
    by_shape: dict[tuple[int, ...], list[Decoded]] = {}
    errors: list[Record] = []

    def flush(shape: tuple[int, ...]) -> None:
        group = by_shape.pop(shape, [])
        if not group:
            return
        tm = time.perf_counter()
        probs = predictor(np.stack([g.array for g in group]))
        stats.model_s += time.perf_counter() - tm
        recs = [
            _record(g.item, "ok", keep_ids=keep_ids, scores=p, pred=label_fn(list(p)))
            for g, p in zip(group, probs, strict=True)
        ]
        recs += errors
        tc = time.perf_counter()
        ledger.commit(model_hash, recs)
        stats.commit_s += time.perf_counter() - tc
        if keep_top is not None:
            for j, (g, p) in enumerate(zip(group, probs, strict=True)):
                rank = float(rank_fn(p) if rank_fn else p.max())
                entry = (rank, stats.scored + j, g.item, g.array, p)  # unique tie-breaker
                if keep_top == 0 or len(stats.kept) < keep_top:
                    heapq.heappush(stats.kept, entry)
                elif entry[0] > stats.kept[0][0]:
                    heapq.heapreplace(stats.kept, entry)
        stats.scored += len(group)
        stats.errors += len(errors)
        stats.batches += 1
        if on_progress:
            on_progress(len(recs))
        errors.clear()

    def flush_errors() -> None:
        if errors:
            n = len(errors)
            ledger.commit(model_hash, list(errors))
            stats.errors += n
            errors.clear()
            if on_progress:
                on_progress(n)

    ts = time.perf_counter()
    prepare = getattr(decoder, "prepare", None)
    if callable(prepare):  # imports and set-up once, inherited by the forked workers
        prepare()
    if start_pool:
        decoders.start()  # fork the workers before the discovery thread starts
    stats.start_s = time.perf_counter() - ts
    here = getattr(decoder, "in_process", None) if workers > 0 else None
    it_decoded = decoders.run(_chunks(items, chunk_size, here if callable(here) else None))
    while True:
        tw = time.perf_counter()
        try:
            results = next(it_decoded)
        except StopIteration:
            break
        finally:
            stats.decode_wait_s += time.perf_counter() - tw
        for d in results:
            if d.item.kind == "error" or d.array is None:
                code = d.code or d.item.code
                msg = d.message or d.item.message
                errors.append(_record(d.item, "error", keep_ids=keep_ids, code=code, message=msg))
                continue
            shape = tuple(d.array.shape)
            by_shape.setdefault(shape, []).append(d)
            if len(by_shape[shape]) >= batch_size:
                flush(shape)
        if len(errors) >= batch_size:
            flush_errors()
    for shape in list(by_shape):
        flush(shape)
    flush_errors()
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
