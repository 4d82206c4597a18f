"""The one supervised process pool for untrusted work (ingest decoding and score decoding).

:class:`IsolatedPool` runs module-level functions over items in worker processes that
survive crashing and hanging items: a worker that dies (segfault, ``os._exit``, OOM kill)
or spends more than ``timeout_s`` on one item is killed and replaced; the item it was on
fails with a coded :class:`Failure` (``decode_failed`` / ``timeout``) and the rest of its
chunk is re-queued. Each worker runs under an address-space cap (``memory_mb``), so an
input that allocates without bound fails as ``timeout`` ("memory limit") instead of taking
the machine down. Workers come from a ``forkserver`` (``spawn`` where there is none) with
the DICOM stack preloaded, never from a plain ``fork`` of the CLI process, whose progress
thread and logging locks a child could inherit held.

Two ways in: :meth:`IsolatedPool.map` (a list in, a list out: ingest) and
:meth:`IsolatedPool.submit` / :meth:`IsolatedPool.result` (chunks in flight while the
caller works on earlier answers: scoring overlaps decoding with the model). A worker
``initializer`` sets up per-worker state once (scoring's decoder).

A worker that hits a full disk (ENOSPC/EDQUOT) fails the whole call in the parent with
``OSError(ENOSPC)``, never the item as a bad input.

This module is part of the shared core: it imports only :mod:`medres.errors` and
:mod:`medres.io`.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait
from typing import Any

from medres.errors import IngestError, MedresError
from medres.io import is_disk_full

log = logging.getLogger(__name__)

# the stable error codes a worker failure gets (the same strings as medres.ingest.codes.Code)
# workers in a row that may die before they are ready before the pool gives up
_MAX_STARTUP_DEATHS = 5
DECODE_FAILED = "decode_failed"
TIMEOUT = "timeout"
# a worker that hits a full disk fails the whole map (raised again in the parent as ENOSPC):
# a full disk is the machine's fault, never the input's, so no item is marked as bad
DISK_FULL = "disk_full"
# modules the forkserver imports once, so that each forked worker starts warm
_PRELOAD = ("medres.ingest.tasks", "medres.ingest.dicom")


def default_workers() -> int:
    """CPU cores available to this process."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Failure:
    """An item that failed in a worker: a stable code and a one-line message."""

    code: str
    message: str


def _describe(exc: BaseException) -> Failure:
    if is_disk_full(exc):
        return Failure(DISK_FULL, "no space left on the output disk")
    if isinstance(exc, IngestError):
        return Failure(str(exc.code), str(exc))
    if isinstance(exc, MemoryError):
        return Failure(TIMEOUT, "the per-file memory limit was exceeded")
    # never echo the exception text: decoder messages can quote header values
    return Failure(DECODE_FAILED, f"unexpected {type(exc).__name__} while reading")


def _raise_if_disk_full(res: tuple[bool, Any]) -> None:
    """A worker's disk-full answer stops the caller: raised as ``OSError(ENOSPC)``."""
    ok, val = res
    if not ok and isinstance(val, Failure) and val.code == DISK_FULL:
        raise OSError(errno.ENOSPC, "No space left on device (in a worker process)")


def _resolve(ref: str) -> Callable[[Any], Any]:
    mod, _, name = ref.rpartition(":")
    return getattr(importlib.import_module(mod), name)


@dataclass(frozen=True)
class _Init:
    """A worker initializer: a module-level function (by name) and its arguments."""

    fn_ref: str
    args: tuple[Any, ...]


def _initialize(init: _Init | None) -> Failure | None:  # pragma: no cover - in workers
    """Run the initializer; a failure fails every item this worker is given."""
    if init is None:
        return None
    try:
        _resolve(init.fn_ref)(*init.args)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        failure = _describe(exc)
        return Failure(failure.code, f"the worker could not start: {failure.message}")
    return None


def _worker_main(
    conn: Any, state: Any, memory_mb: int | None, init: _Init | None = None
) -> None:  # pragma: no cover
    """Worker loop: receive (function, chunk of (index, item)), send batches of
    (index, ok, result). ``state`` (shared memory) holds the index of the item being worked
    on and its start time, so that the supervisor can blame the right item for a crash or a
    hang without a message per item."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor handles Ctrl-C
    if memory_mb:
        with contextlib.suppress(Exception):
            import resource

            lim = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    broken = _initialize(init)
    fns: dict[str, Callable[[Any], Any]] = {}
    conn.send(("ready", []))
    outbox = _Outbox(conn)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            outbox.close()
            return
        fn_ref, chunk = msg
        if broken is not None:
            outbox.put([(idx, False, broken) for idx, _ in chunk])
            continue
        try:
            if fn_ref not in fns:
                fns[fn_ref] = _resolve(fn_ref)
        except Exception as exc:  # import failure: every item of the chunk fails
            outbox.put([(idx, False, _describe(exc)) for idx, _ in chunk])
            continue
        if not _run_chunk(fns[fn_ref], chunk, state, outbox):
            return


def _run_chunk(
    fn: Callable[[Any], Any], chunk: list[tuple[int, Any]], state: Any, outbox: _Outbox
) -> bool:  # pragma: no cover - in workers
    """Work through one chunk, handing answers to ``outbox`` in batches (False: Ctrl-C)."""
    batch: list[tuple[Any, ...]] = []
    flushed = time.monotonic()
    for idx, item in chunk:
        state[1] = time.monotonic()
        state[0] = idx
        try:
            out: tuple[Any, ...] = (idx, True, fn(item))
        except KeyboardInterrupt:
            return False
        except BaseException as exc:  # decoder panics are BaseException
            out = (idx, False, _describe(exc))
        batch.append(out)
        if len(batch) >= _BATCH or time.monotonic() - flushed > _FLUSH_S:
            outbox.put(batch)
            batch, flushed = [], time.monotonic()
    state[0] = -1
    outbox.put(batch)
    return True


class _Outbox:  # pragma: no cover - in workers
    """Sends answer batches from a thread of the worker, so that the worker goes on with
    its queued items while the supervisor is busy elsewhere (a full pipe would otherwise
    stop it after its first large answer: scoring's decoded arrays)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.queue: queue.SimpleQueue[list[tuple[Any, ...]] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="medres-outbox", daemon=True)
        self.thread.start()

    def put(self, batch: list[tuple[Any, ...]]) -> None:
        self.queue.put(batch)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (batch := self.queue.get()) is not None:
            try:
                _send_batch(self.conn, batch)
            except OSError:  # the supervisor is gone
                return


_BATCH = 64
_FLUSH_S = 0.05


def _send_batch(conn: Any, batch: list[tuple[Any, ...]]) -> None:
    try:
        conn.send(("res", batch))
    except Exception:  # an unpicklable result: send them one by one
        for idx, ok, val in batch:
            try:
                conn.send(("res", [(idx, ok, val)]))
            except Exception as exc:
                conn.send(("res", [(idx, False, _describe(exc))]))


class _Worker:
    def __init__(self, ctx: Any, memory_mb: int | None, init: _Init | None) -> None:
        parent, child = ctx.Pipe(duplex=True)
        self.state = ctx.RawArray("d", [-1.0, 0.0])  # current item index, its start time
        self.proc = ctx.Process(
            target=_worker_main, args=(child, self.state, memory_mb, init), daemon=True
        )
        self.proc.start()
        child.close()
        self.conn = parent
        self.ready = False
        self.started = time.monotonic()
        # sent, not yet answered (insertion = chunk order): index -> (function ref, item)
        self.chunk: dict[int, tuple[str, Any]] = {}
        self.sent = time.monotonic()

    def current(self) -> int | None:
        """Index of the item the worker is on, when it belongs to its open chunk."""
        idx = int(self.state[0])
        return idx if idx in self.chunk else None

    def send(self, fn_ref: str, chunk: list[tuple[int, Any]]) -> None:
        self.chunk.update((idx, (fn_ref, item)) for idx, item in chunk)
        self.sent = time.monotonic()
        self.conn.send((fn_ref, chunk))

    def stop(self, kill: bool = False) -> None:
        if kill:
            with contextlib.suppress(Exception):
                self.proc.kill()
        else:
            with contextlib.suppress(Exception):
                self.conn.send(None)
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            with contextlib.suppress(Exception):
                self.proc.kill()
            self.proc.join(timeout=5)
        with contextlib.suppress(Exception):
            self.conn.close()


def _context(preload: Sequence[str] = ()) -> Any:
    """``forkserver`` where available (a clean server process, forked cheaply, with the
    DICOM stack preloaded), else ``spawn``; never plain ``fork`` (see the module docstring).

    ``preload`` adds modules to the server's preload list; it takes effect only when this
    call starts the server (the first pool of the process), later pools import them in
    each worker instead.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(dict.fromkeys([*_PRELOAD, *preload])))
        return ctx
    return mp.get_context("spawn")  # pragma: no cover - macOS/Windows


def _ref(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


class IsolatedPool:
    """Supervised worker processes that survive crashing and hanging items.

    ``map(fn, items)`` returns ``[(True, fn(item)) | (False, Failure)]`` in item order.
    For streaming, :meth:`submit` queues a chunk of items and returns a ticket at once and
    :meth:`result` blocks (supervising the workers) until that chunk is answered, so a
    caller keeps several chunks in flight while it works on earlier results.
    ``fn`` must be a module-level function (workers import it by name). Up to ``workers``
    processes take chunks of items and answer in batches; each publishes the index and
    start time of its current item in shared memory. A worker that dies, or spends more
    than ``timeout_s`` on one item, is killed: that item fails (``decode_failed`` /
    ``timeout``) and the unanswered rest of its chunk is re-queued to a fresh worker.
    Workers live until :meth:`close`, so several stages pay the start-up cost once.

    ``initializer`` (a module-level function) runs once in every worker with ``initargs``
    (pickled to it), under the memory cap, before its first item: per-worker state such
    as a decoder object. ``preload`` names modules for the forkserver to import once
    (see :func:`_context`). With ``isolate=False`` items run in this process (exceptions
    still become failures; a crash does not).
    """

    def __init__(
        self,
        workers: int = 1,
        *,
        timeout_s: float = 120.0,
        isolate: bool = True,
        memory_mb: int | None = None,
        startup_timeout_s: float = 120.0,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        preload: Sequence[str] = (),
    ) -> None:
        self.workers = max(1, workers)
        self.timeout_s = timeout_s
        self.isolate = isolate
        self.memory_mb = memory_mb
        self.startup_timeout_s = startup_timeout_s
        self._init = _Init(_ref(initializer), tuple(initargs)) if initializer else None
        self._ctx = _context(preload) if isolate else None
        self._pool: list[_Worker] = []
        self._startup_deaths = 0
        self._pending: deque[tuple[str, list[tuple[int, Any]]]] = deque()
        self._results: dict[int, tuple[bool, Any]] = {}
        self._tickets: dict[int, range] = {}
        self._requeued: Counter[int] = Counter()
        self._next = 0  # the next item index (unique over the pool's life)
        self._chunk_cap = 1  # items kept queued per worker: two chunks

    def __enter__(self) -> IsolatedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(kill=exc[0] is not None)

    def close(self, kill: bool = False) -> None:
        for w in self._pool:
            w.stop(kill=kill)
        self._pool.clear()
        self._pending.clear()

    def start(self, n: int | None = None) -> None:
        """Start ``n`` (default ``workers``) processes now, without waiting for them."""
        if self.isolate:
            while len(self._pool) < min(self.workers, n or self.workers):
                self._pool.append(_Worker(self._ctx, self.memory_mb, self._init))

    # -- streaming -----------------------------------------------------------------------
    def submit(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> int:
        """Queue one chunk of ``items`` for ``fn``; returns its ticket for :meth:`result`."""
        ticket = self._next
        idx = range(self._next, self._next + len(items))
        self._next += len(items)
        self._tickets[ticket] = idx
        if not self.isolate:
            for i, res in zip(idx, self._map_local(fn, items, None), strict=True):
                self._results[i] = res
        elif items:
            self._chunk_cap = max(self._chunk_cap, 2 * len(items))
            self._pending.append((_ref(fn), list(zip(idx, items, strict=True))))
            self._feed()
        return ticket

    def result(self, ticket: int) -> list[tuple[bool, Any]]:
        """The answers of a submitted chunk, in item order (blocks until all are in)."""
        idx = self._tickets.pop(ticket)
        while any(i not in self._results for i in idx):
            self._step()
        return [self._results.pop(i) for i in idx]

    # -- batch -----------------------------------------------------------------------------
    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        chunk_size: int = 1,
        on_result: Callable[[int], None] | None = None,
    ) -> list[tuple[bool, Any]]:
        if not self.isolate:
            return self._map_local(fn, items, on_result)
        chunk_size = max(1, chunk_size)
        self._chunk_cap = 2 * chunk_size
        first = self._next
        tickets = [
            self.submit(fn, items[s : s + chunk_size]) for s in range(0, len(items), chunk_size)
        ]
        stop = first + len(items)
        left = len(items)
        while left:
            for idx in self._step():
                if first <= idx < stop:
                    left -= 1
                    if on_result:
                        on_result(idx - first)
        return [res for t in tickets for res in self.result(t)]

    # -- supervision -----------------------------------------------------------------------
    def _finish(self, idx: int, res: tuple[bool, Any], done: list[int]) -> None:
        _raise_if_disk_full(res)
        if idx not in self._results:
            self._results[idx] = res
            done.append(idx)

    def _abandon(self, w: _Worker, failure: Failure, done: list[int]) -> None:
        """Fail the worker's current item; re-queue the unanswered others (an item
        re-queued three times fails too, so a crash between items cannot loop)."""
        cur = w.current()
        if cur is not None:
            self._finish(cur, (False, failure), done)
            w.chunk.pop(cur)
        again: dict[str, list[tuple[int, Any]]] = {}
        for idx, (fn_ref, item) in w.chunk.items():
            self._requeued[idx] += 1
            if self._requeued[idx] >= 3:
                self._finish(idx, (False, failure), done)
            else:
                again.setdefault(fn_ref, []).append((idx, item))
        for fn_ref, chunk in reversed(again.items()):
            self._pending.appendleft((fn_ref, chunk))
        w.chunk = {}

    def _feed(self) -> None:
        """Start workers for the queued chunks and hand out chunks to the ready ones."""
        busy = sum(1 for w in self._pool if w.chunk)
        want = max(1, min(self.workers, len(self._pending) + busy))
        while len(self._pool) < want:
            self._pool.append(_Worker(self._ctx, self.memory_mb, self._init))
        for w in self._pool:
            # keep up to two chunks queued per worker so that it never waits for the next
            while w.ready and self._pending and len(w.chunk) < self._chunk_cap:
                w.send(*self._pending.popleft())

    def _step(self) -> list[int]:
        """One round of supervision (waits up to 0.5 s); returns the indices answered."""
        done: list[int] = []
        self._feed()
        pool = self._pool
        mp_wait([w.conn for w in pool] + [w.proc.sentinel for w in pool], timeout=0.5)
        now = time.monotonic()
        for w in list(pool):
            dead = False
            try:
                while w.conn.poll():
                    _kind, batch = w.conn.recv()
                    w.ready = True
                    for idx, ok, val in batch:
                        w.chunk.pop(idx, None)
                        self._finish(idx, (ok, val), done)
            except (EOFError, OSError):
                dead = True
            if dead or not w.proc.is_alive():
                code = w.proc.exitcode
                self._check_startup_death(w, code)
                msg = f"the worker process crashed while reading it (exit code {code})"
                self._abandon(w, Failure(DECODE_FAILED, msg), done)
                w.stop(kill=True)
                pool.remove(w)
                continue
            self._check_time(w, now, done)
        return done

    def _check_startup_death(self, w: _Worker, code: int | None) -> None:
        """A worker that dies before it is ready blames no item: after a few in a row, stop
        (a worker that cannot import its task would otherwise be restarted forever)."""
        if w.ready:
            self._startup_deaths = 0
            return
        self._startup_deaths += 1
        if self._startup_deaths >= _MAX_STARTUP_DEATHS:
            w.stop(kill=True)
            self._pool.remove(w)
            raise MedresError(
                f"worker processes exited while starting ({self._startup_deaths} in a row, "
                f"exit code {code}); retry with --workers 1 or check that medres imports "
                "cleanly (`python -c 'import medres'`)"
            )

    def _check_time(self, w: _Worker, now: float, done: list[int]) -> None:
        """Kill a worker over the per-item limit; fail the pool when workers never start."""
        cur = w.current()
        if cur is not None and now - w.state[1] > self.timeout_s:
            log.warning(
                "an input exceeded the %.0f s limit; its worker was stopped", self.timeout_s
            )
            w.stop(kill=True)
            self._pool.remove(w)
            msg = f"reading it took longer than the {self.timeout_s:g} s per-file limit"
            self._abandon(w, Failure(TIMEOUT, msg), done)
        elif (not w.ready and now - w.started > self.startup_timeout_s) or (
            w.chunk and cur is None and now - w.sent > self.startup_timeout_s + self.timeout_s
        ):
            raise MedresError(
                "worker processes did not start or load their task; retry with "
                "--workers 1 or check that medres imports cleanly (`python -c 'import medres'`)"
            )

    @staticmethod
    def _map_local(
        fn: Callable[[Any], Any], items: Sequence[Any], on_result: Callable[[int], None] | None
    ) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        for i, item in enumerate(items):
            try:
                results.append((True, fn(item)))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                if is_disk_full(exc):
                    raise
                results.append((False, _describe(exc)))
            if on_result:
                on_result(i)
        return results


def isolated_map(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int = 1,
    timeout_s: float = 120.0,
    chunk_size: int = 1,
    isolate: bool = True,
    memory_mb: int | None = None,
    on_result: Callable[[int], None] | None = None,
) -> list[tuple[bool, Any]]:
    """One-off :class:`IsolatedPool` map (see there)."""
    with IsolatedPool(workers, timeout_s=timeout_s, isolate=isolate, memory_mb=memory_mb) as pool:
        return pool.map(fn, items, chunk_size=chunk_size, on_result=on_result)
