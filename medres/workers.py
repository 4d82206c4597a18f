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

This module is part of the shared core: it imports only :mod:`medres.errors`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing as mp
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait
from typing import Any

from medres.errors import IngestError, MedresError

log = logging.getLogger(__name__)

# the stable error codes a worker failure gets (the same strings as medres.ingest.codes.Code)
DECODE_FAILED = "decode_failed"
TIMEOUT = "timeout"
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
    if isinstance(exc, IngestError):
        return Failure(str(exc.code), str(exc))
    if isinstance(exc, MemoryError):
        return Failure(TIMEOUT, "the per-file memory limit was exceeded")
    # never echo the exception text: decoder messages can quote header values
    return Failure(DECODE_FAILED, f"unexpected {type(exc).__name__} while reading")


def _resolve(ref: str) -> Callable[[Any], Any]:
    mod, _, name = ref.rpartition(":")
    return getattr(importlib.import_module(mod), name)


def _worker_main(conn: Any, state: Any, memory_mb: int | None) -> None:  # pragma: no cover
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
    fns: dict[str, Callable[[Any], Any]] = {}
    conn.send(("ready", []))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        fn_ref, chunk = msg
        try:
            if fn_ref not in fns:
                fns[fn_ref] = _resolve(fn_ref)
        except Exception as exc:  # import failure: every item of the chunk fails
            conn.send(("res", [(idx, False, _describe(exc)) for idx, _ in chunk]))
            continue
        fn = fns[fn_ref]
        batch: list[tuple[Any, ...]] = []
        flushed = time.monotonic()
        for idx, item in chunk:
            state[1] = time.monotonic()
            state[0] = idx
            try:
                out: tuple[Any, ...] = (idx, True, fn(item))
            except KeyboardInterrupt:
                return
            except BaseException as exc:  # decoder panics are BaseException
                out = (idx, False, _describe(exc))
            batch.append(out)
            if len(batch) >= _BATCH or time.monotonic() - flushed > _FLUSH_S:
                _send_batch(conn, batch)
                batch, flushed = [], time.monotonic()
        state[0] = -1
        _send_batch(conn, batch)


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
    def __init__(self, ctx: Any, memory_mb: int | None) -> None:
        parent, child = ctx.Pipe(duplex=True)
        self.state = ctx.RawArray("d", [-1.0, 0.0])  # current item index, its start time
        self.proc = ctx.Process(
            target=_worker_main, args=(child, self.state, memory_mb), daemon=True
        )
        self.proc.start()
        child.close()
        self.conn = parent
        self.ready = False
        self.started = time.monotonic()
        self.chunk: dict[int, Any] = {}  # sent, not yet answered (insertion = chunk order)
        self.sent = time.monotonic()

    def current(self) -> int | None:
        """Index of the item the worker is on, when it belongs to its open chunk."""
        idx = int(self.state[0])
        return idx if idx in self.chunk else None

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


def _context() -> Any:
    """``forkserver`` where available (a clean server process, forked cheaply, with the
    DICOM stack preloaded), else ``spawn``; never plain ``fork`` (see the module docstring)."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(_PRELOAD))
        return ctx
    return mp.get_context("spawn")  # pragma: no cover - macOS/Windows


class IsolatedPool:
    """Supervised worker processes that survive crashing and hanging items.

    ``map(fn, items)`` returns ``[(True, fn(item)) | (False, Failure)]`` in item order.
    ``fn`` must be a module-level function (workers import it by name). Up to ``workers``
    ``spawn``-ed processes take chunks of items and answer in batches; each publishes the
    index and start time of its current item in shared memory. A worker that dies, or
    spends more than ``timeout_s`` on one item, is killed: that item fails
    (``decode_failed`` / ``timeout``) and the unanswered rest of its chunk is re-queued to a
    fresh worker. Workers live until :meth:`close`, so several stages pay the start-up cost
    once. With ``isolate=False`` items run in this process (exceptions still become
    failures; a crash does not).
    """

    def __init__(
        self,
        workers: int = 1,
        *,
        timeout_s: float = 120.0,
        isolate: bool = True,
        memory_mb: int | None = None,
        startup_timeout_s: float = 120.0,
    ) -> None:
        self.workers = max(1, workers)
        self.timeout_s = timeout_s
        self.isolate = isolate
        self.memory_mb = memory_mb
        self.startup_timeout_s = startup_timeout_s
        self._ctx = _context()
        self._pool: list[_Worker] = []

    def __enter__(self) -> IsolatedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(kill=exc[0] is not None)

    def close(self, kill: bool = False) -> None:
        for w in self._pool:
            w.stop(kill=kill)
        self._pool.clear()

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
        n = len(items)
        results: list[tuple[bool, Any] | None] = [None] * n
        fn_ref = f"{fn.__module__}:{fn.__qualname__}"
        chunk_size = max(1, chunk_size)
        pending: deque[list[tuple[int, Any]]] = deque(
            [(i, items[i]) for i in range(s, min(s + chunk_size, n))]
            for s in range(0, n, chunk_size)
        )
        n_workers = max(1, min(self.workers, len(pending)))
        pool = self._pool
        done = 0

        def finish(i: int, res: tuple[bool, Any]) -> None:
            nonlocal done
            if results[i] is None:
                results[i] = res
                done += 1
                if on_result:
                    on_result(i)

        requeued: Counter[int] = Counter()

        def abandon(w: _Worker, failure: Failure) -> None:
            """Fail the worker's current item; re-queue the unanswered others (an item
            re-queued three times fails too, so a crash between items cannot loop)."""
            cur = w.current()
            if cur is not None:
                finish(cur, (False, failure))
                w.chunk.pop(cur)
            again = []
            for idx, item in w.chunk.items():
                requeued[idx] += 1
                if requeued[idx] >= 3:
                    finish(idx, (False, failure))
                else:
                    again.append((idx, item))
            if again:
                pending.appendleft(again)
            w.chunk = {}

        while done < n:
            while len(pool) < n_workers:
                pool.append(_Worker(self._ctx, self.memory_mb))
            for w in pool:
                # keep up to two chunks queued per worker so that it never waits for the next
                while w.ready and pending and len(w.chunk) < 2 * chunk_size:
                    chunk = pending.popleft()
                    w.chunk.update(chunk)
                    w.sent = time.monotonic()
                    w.conn.send((fn_ref, chunk))
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
                            finish(idx, (ok, val))
                except (EOFError, OSError):
                    dead = True
                if dead or not w.proc.is_alive():
                    code = w.proc.exitcode
                    abandon(
                        w,
                        Failure(
                            DECODE_FAILED,
                            f"the worker process crashed while reading it (exit code {code})",
                        ),
                    )
                    w.stop(kill=True)
                    pool.remove(w)
                    continue
                cur = w.current()
                if cur is not None and now - w.state[1] > self.timeout_s:
                    log.warning(
                        "an input exceeded the %.0f s limit; its worker was stopped", self.timeout_s
                    )
                    w.stop(kill=True)
                    pool.remove(w)
                    abandon(
                        w,
                        Failure(
                            TIMEOUT,
                            f"reading it took longer than the {self.timeout_s:g} s per-file limit",
                        ),
                    )
                elif (not w.ready and now - w.started > self.startup_timeout_s) or (
                    w.chunk
                    and cur is None
                    and now - w.sent > self.startup_timeout_s + self.timeout_s
                ):
                    raise MedresError(
                        "ingest worker processes did not start or load their task; retry with "
                        "--workers 1 or check that medres imports cleanly (`python -c 'import medres'`)"
                    )
        return results  # type: ignore[return-value]

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
