"""Streaming retrieval from a PACS: series by series into a scratch folder, with retries.

Choices:

- :func:`open_client` picks the protocol client (:mod:`~medres.ingest.pacs.dicomweb` or
  :mod:`~medres.ingest.pacs.dimse`); both offer ``find_series``, ``retrieve_series``,
  ``store`` and ``close``.
- :func:`stream_series` is a generator: it queries, then retrieves one series at a time
  and yields it (:class:`RetrievedSeries`) before fetching the next, so the caller
  (scoring, ingest) works on a series while the next one is still on the server. A
  ``skip`` callback drops series before any byte of them is fetched (resume).
- Every network call goes through :func:`with_retries`: transient failures (connection
  refused or reset, timeouts, HTTP 429/5xx, a refused DIMSE association) are retried with
  exponential backoff (0.5 s, 1 s, 2 s, ...); the last failure raises :class:`PacsError`
  with the PACS address and the fix (re-run: what was done is kept).
- Files are named by position (``s00001/i00001.dcm``), never by UID or patient.

Imports: :mod:`medres.ingest.pacs.query`, :mod:`medres.ingest.pacs.auth`, the protocol
clients lazily.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from medres.ingest.pacs.query import (
    PacsError,
    PacsQuery,
    PacsSource,
    SeriesRef,
    TransientError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
ATTEMPTS = 4
BACKOFF_S = 0.5


class PacsClient(Protocol):
    """What scoring and ingest need from a PACS (both protocols implement it)."""

    source: PacsSource

    def find_series(self, query: PacsQuery) -> Iterator[SeriesRef]: ...

    def retrieve_series(self, ref: SeriesRef, dest: Path) -> list[Path]: ...

    def store(self, paths: list[Path]) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RetrievedSeries:
    """One series on local disk: its reference, its files and its position in the run."""

    ref: SeriesRef
    files: tuple[Path, ...]
    index: int


def with_retries(
    what: str,
    fn: Callable[[], T],
    source: PacsSource,
    *,
    attempts: int = ATTEMPTS,
    backoff_s: float | None = None,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """``fn()``, retried on :class:`TransientError` with exponential backoff (first delay
    ``backoff_s``, default :data:`BACKOFF_S`)."""
    backoff_s = BACKOFF_S if backoff_s is None else backoff_s
    sleep = sleep or time.sleep
    for i in range(attempts):
        try:
            return fn()
        except TransientError as exc:
            if i == attempts - 1:
                raise PacsError(
                    f"{source.display}: {what} failed after {attempts} attempts ({exc}); "
                    "check that the PACS is up and reachable, then re-run (finished work is kept)"
                ) from None
            delay = backoff_s * 2**i
            log.warning("%s: %s failed (%s); retrying in %.1f s", source.display, what, exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def open_client(source: PacsSource | str, **options: Any) -> PacsClient:
    """A connected-on-demand client for ``source`` (a URL or :class:`PacsSource`)."""
    from medres.ingest.pacs.query import parse_source

    src = parse_source(source) if isinstance(source, str) else source
    if src.protocol == "dicomweb":
        from medres.ingest.pacs.dicomweb import DicomwebClient

        return DicomwebClient(src, **options)
    from medres.ingest.pacs.dimse import DimseClient

    return DimseClient(src, **options)


def find_series(client: PacsClient, query: PacsQuery) -> list[SeriesRef]:
    """All series of the query (one listing, retried as a whole)."""
    refs = with_retries("query", lambda: list(client.find_series(query)), client.source)
    log.info(
        "%s: the query matched %d series in %d studies",
        client.source.display, len(refs), len({r.study_uid for r in refs}),
    )  # fmt: skip
    return refs


def stream_series(
    client: PacsClient,
    refs: list[SeriesRef],
    scratch: Path,
    *,
    skip: Callable[[SeriesRef], bool] | None = None,
) -> Iterator[RetrievedSeries]:
    """Retrieve ``refs`` one series at a time into ``scratch/sNNNNN/``; yields each when
    its files are on disk. Series for which ``skip(ref)`` is true are not fetched."""
    for i, ref in enumerate(refs, start=1):
        if skip is not None and skip(ref):
            continue
        dest = scratch / f"s{i:05d}"
        files = with_retries(
            f"retrieving series {i}/{len(refs)}",
            lambda ref=ref, dest=dest: client.retrieve_series(ref, dest),
            client.source,
        )
        if not files:
            log.warning("%s: series %d/%d has no instances", client.source.display, i, len(refs))
        yield RetrievedSeries(ref, tuple(files), i)


def retrieve_to_folder(source: str, query: PacsQuery, dest: Path) -> list[Path]:
    """Fetch every series of ``query`` into ``dest`` (for ``medres ingest``); returns files."""
    client = open_client(source)
    try:
        refs = find_series(client, query)
        files: list[Path] = []
        for got in stream_series(client, refs, dest):
            files.extend(got.files)
        return files
    finally:
        client.close()


def push(source: str | PacsSource, paths: list[Path]) -> int:
    """Store ``paths`` (DICOM files) on the PACS (STOW-RS or C-STORE); returns how many."""
    if not paths:
        return 0
    client = open_client(source)
    try:
        return with_retries(
            f"storing {len(paths)} object(s)", lambda: client.store(paths), client.source
        )
    finally:
        client.close()


def local_sources(
    sources: list[str], scratch: Path, query: PacsQuery | None = None
) -> tuple[Path, ...]:
    """SOURCE arguments for ``medres ingest``: paths as they are, each PACS URL replaced by a
    folder under ``scratch`` (``pacs``, ``pacs2``, ...) holding what its query matched."""
    from medres.ingest.pacs.query import is_pacs_url

    out: list[Path] = []
    n = 0
    for s in sources:
        if not is_pacs_url(s):
            out.append(Path(s))
            continue
        n += 1
        dest = scratch / ("pacs" if n == 1 else f"pacs{n}")
        retrieve_to_folder(s, query or PacsQuery(), dest)
        out.append(dest)
    return tuple(out)
