"""Scoring items from a PACS query, exactly once across crashed and repeated runs.

Choices:

- The query runs when the stream is iterated (in scoring's background listing thread);
  series are then retrieved one at a time (:func:`medres.ingest.pacs.stream_series`) into
  the run's scratch folder and turned into items by the same header scan and series
  grouping as files from disk (:func:`medres.score.sources.dicom_items`). Scoring of a
  series starts while the next one is being retrieved, and the decode happens in the
  same supervised worker pool as for files. Item keys are therefore the ones scoring the
  same files from disk gives (the stack identity: SeriesInstanceUID and stack), so the
  ledger keys PACS items by Series Instance UID, and ``source`` is the keyed series
  pseudonym (``ser-.../iNNNNN.dcm``): no UID or path with identity is written.
- A table ``pacs_series`` in the scoring ledger (same SQLite file; :class:`SeriesState`)
  remembers, per (series pseudonym, model), the instance count the PACS reported and the
  item keys the series gave. It is written when a series has been retrieved and listed,
  before its items are scored. A series whose row exists, whose instance count is
  unchanged and whose items are all committed is *complete* and is not retrieved again:
  a killed or repeated run fetches only what is not done.
- Changes on the server are detected from the same table: a new series in a study that
  an earlier run listed, or a series whose instance count changed. Both are logged (by
  pseudonym), retrieved and scored (new stacks get new rows; committed ones are never
  rewritten), and listed in ``OUT_DIR/pacs.json``.
- ``--dicom-out`` needs one header per scored series also for complete series: a header
  without pixel data is kept per item under ``OUT_DIR/.pacs/headers/`` (mode 0700).
  Without ``--keep-ids`` it holds only what the SR's evidence needs (the file meta and
  SOPClassUID, SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID, Modality and the
  image pixel description that highdicom checks a source image by): no
  patient, study or free-text attribute reaches the output folder. With ``--keep-ids``
  the whole header is kept, in ``.pacs/headers-ids/`` (the SR copies the patient and
  study modules), so a run in the other mode never finds a header of the wrong kind
  and retrieves the series again. A series without its cached header is retrieved again.

Imports: :mod:`medres.ingest.pacs`, :mod:`medres.ingest.archives` (``InputFile``),
:mod:`medres.phi`, :mod:`medres.score.items`, :mod:`medres.score.sources`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medres.ingest.archives import InputFile
from medres.ingest.pacs import PacsQuery, SeriesRef, find_series, open_client, stream_series
from medres.io import atomic_open
from medres.phi import pseudonym
from medres.score.items import ScoreItem

log = logging.getLogger(__name__)

REPORT_NAME = "pacs.json"
HEADERS_DIR = Path(".pacs") / "headers"
HEADERS_IDS_DIR = Path(".pacs") / "headers-ids"  # --keep-ids: whole headers
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pacs_series (
    series_key TEXT NOT NULL,
    model_hash TEXT NOT NULL,
    study_key TEXT NOT NULL,
    instances INTEGER NOT NULL,
    items TEXT NOT NULL,
    fetched_at REAL NOT NULL,
    PRIMARY KEY (series_key, model_hash)
);
"""


@dataclass(frozen=True)
class PacsRequest:
    """A PACS SOURCE of ``medres score``: its URL and the query."""

    url: str
    query: PacsQuery = field(default_factory=PacsQuery)


@dataclass(frozen=True)
class SeriesRow:
    """What an earlier run recorded of one series."""

    study_key: str
    instances: int
    items: tuple[tuple[str, str, str], ...]  # (item key, identity, source)


@dataclass
class PacsReport:
    """Counts of one run, written to ``OUT_DIR/pacs.json`` (pseudonyms only)."""

    source: str
    series_matched: int = 0
    studies_matched: int = 0
    series_fetched: int = 0
    series_skipped: int = 0
    instances_fetched: int = 0
    changed_studies: list[str] = field(default_factory=list)
    changed_series: list[str] = field(default_factory=list)


class SeriesState:
    """The ``pacs_series`` table of the ledger file (its own connection, any thread)."""

    def __init__(self, ledger_path: Path, model_hash: str) -> None:
        self.model_hash = model_hash
        self._con = sqlite3.connect(str(ledger_path), timeout=60, isolation_level=None)
        self._con.execute("PRAGMA busy_timeout=60000")
        self._con.executescript(_SCHEMA)

    def rows(self) -> dict[str, SeriesRow]:
        cur = self._con.execute(
            "SELECT series_key, study_key, instances, items FROM pacs_series WHERE model_hash = ?",
            (self.model_hash,),
        )
        return {
            k: SeriesRow(st, n, tuple(tuple(x) for x in json.loads(items)))
            for k, st, n, items in cur
        }

    def committed(self, *, include_errors: bool) -> set[str]:
        sql = "SELECT item_key FROM items WHERE model_hash = ?"
        if not include_errors:
            sql += " AND status = 'ok'"
        try:
            return {r[0] for r in self._con.execute(sql, (self.model_hash,))}
        except sqlite3.OperationalError:  # no items table yet
            return set()

    def committed_among(self, keys: set[str]) -> set[str]:
        """Which of ``keys`` have a row (ok or error) in the ledger now."""
        found: set[str] = set()
        todo = sorted(keys)
        try:
            for i in range(0, len(todo), 500):
                part = todo[i : i + 500]
                sql = "SELECT item_key FROM items WHERE model_hash = ? AND item_key IN (%s)"
                cur = self._con.execute(sql % ",".join("?" * len(part)), (self.model_hash, *part))
                found.update(r[0] for r in cur)
        except sqlite3.OperationalError:  # no items table yet
            return set()
        return found

    def record(self, series_key: str, row: SeriesRow) -> None:
        self._con.execute(
            "INSERT OR REPLACE INTO pacs_series VALUES (?, ?, ?, ?, ?, ?)",
            (
                series_key,
                self.model_hash,
                row.study_key,
                row.instances,
                json.dumps([list(x) for x in row.items]),
                time.time(),
            ),
        )

    def close(self) -> None:
        self._con.close()


@dataclass(frozen=True)
class _HeaderFile:
    path: Path


@dataclass(frozen=True)
class HeaderStack:
    """The payload of an already-scored PACS item: only its cached header (for the SR)."""

    first: _HeaderFile


@dataclass
class _Run:
    """Everything :func:`pacs_items` works with while it iterates."""

    request: PacsRequest
    key: bytes
    scratch: Path
    state: SeriesState
    headers: Path | None
    include_errors: bool
    keep_ids: bool
    report: PacsReport
    rows: dict[str, SeriesRow] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    pending: list[tuple[Path, frozenset[str]]] = field(default_factory=list)  # scratch dirs


def pacs_items(
    request: PacsRequest,
    *,
    key: bytes,
    scratch: Path,
    ledger_path: Path,
    model_hash: str,
    dicom_out: bool = False,
    retry_errors: bool = False,
    keep_ids: bool = False,
) -> Iterator[ScoreItem]:
    """The items of a PACS query (see the module doc); a generator: nothing is sent to the
    PACS before the first item is asked for."""
    from medres.ingest.pacs import parse_source

    out = ledger_path.parent
    src = parse_source(request.url)
    state = SeriesState(ledger_path, model_hash)
    headers = out / (HEADERS_IDS_DIR if keep_ids else HEADERS_DIR) if dicom_out else None
    report = PacsReport(src.display)
    run = _Run(request, key, scratch, state, headers, not retry_errors, keep_ids, report)
    client = open_client(src)
    try:
        yield from _produce(run, client)
    finally:
        client.close()
        state.close()
        with atomic_open(out / REPORT_NAME, "w") as fh:
            json.dump(run.report.__dict__, fh, indent=1)


def _produce(run: _Run, client: object) -> Iterator[ScoreItem]:
    refs = find_series(client, run.request.query)  # type: ignore[arg-type]
    run.rows, run.done = run.state.rows(), run.state.committed(include_errors=run.include_errors)
    run.report.series_matched = len(refs)
    run.report.studies_matched = len({r.study_uid for r in refs})
    _detect_changes(run, refs)
    complete = [r for r in refs if _complete(run, r)]
    run.report.series_skipped = len(complete)
    if complete:
        log.info("%d of %d series are already scored: not retrieved", len(complete), len(refs))
    for ref in complete:
        yield from _done_items(run, ref)
    keys = {id(r) for r in complete}
    for got in stream_series(client, refs, run.scratch, skip=lambda r: id(r) in keys):  # type: ignore[arg-type]
        run.report.series_fetched += 1
        run.report.instances_fetched += len(got.files)
        items = list(_series_items(run, got.ref, got.files))
        if got.files:
            run.pending.append((got.files[0].parent, frozenset(i.key for i in items)))
        _sweep(run)
        yield from items


def _sweep(run: _Run) -> None:
    """Delete the scratch folder of every retrieved series whose items are all committed
    (scored or rejected): the disk holds only what is in flight, not the whole query."""
    import shutil

    if not run.pending:
        return
    done = run.state.committed_among(set().union(*(k for _, k in run.pending)))
    keep = []
    for folder, ks in run.pending:
        if ks <= done:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            keep.append((folder, ks))
    run.pending = keep


def _series_key(run: _Run, ref: SeriesRef) -> str:
    return pseudonym(ref.series_uid, run.key, "ser-")


def _study_key(run: _Run, ref: SeriesRef) -> str:
    return pseudonym(ref.study_uid, run.key, "stu-")


def _detect_changes(run: _Run, refs: list[SeriesRef]) -> None:
    """New series in studies seen before, and series whose instance count changed."""
    known = {row.study_key for row in run.rows.values()}
    new_by_study: dict[str, int] = {}
    for ref in refs:
        row = run.rows.get(_series_key(run, ref))
        if row is None:
            stk = _study_key(run, ref)
            if stk in known:
                new_by_study[stk] = new_by_study.get(stk, 0) + 1
        elif ref.instances >= 0 and row.instances != ref.instances:
            run.report.changed_series.append(_series_key(run, ref))
            log.warning(
                "series %s changed on the PACS (%d -> %d instances): retrieved and scored again",
                _series_key(run, ref), row.instances, ref.instances,
            )  # fmt: skip
    for stk, n in sorted(new_by_study.items()):
        run.report.changed_studies.append(stk)
        log.warning(
            "study %s changed on the PACS since the last run: %d new series; they are scored "
            "now (and its SR is rewritten with --dicom-out)", stk, n,
        )  # fmt: skip


def _complete(run: _Run, ref: SeriesRef) -> bool:
    row = run.rows.get(_series_key(run, ref))
    if row is None or (ref.instances >= 0 and row.instances != ref.instances):
        return False
    if not all(k in run.done for k, _, _ in row.items):
        return False
    return run.headers is None or all((run.headers / f"{k}.dcm").is_file() for k, _, _ in row.items)


def _done_items(run: _Run, ref: SeriesRef) -> Iterator[ScoreItem]:
    """Placeholders for the items of a complete series (skipped as done by scoring; with
    ``--dicom-out`` they carry the cached header so the study's SR lists them)."""
    row = run.rows[_series_key(run, ref)]
    for k, ident, source in row.items:
        payload = HeaderStack(_HeaderFile(run.headers / f"{k}.dcm")) if run.headers else None
        yield ScoreItem(
            key=k,
            identity=ident,
            source=source,
            kind="dicom",
            payload=payload,
            study_key=row.study_key,
            series_key=_series_key(run, ref),
            study_uid=ref.study_uid,
        )


def _series_items(run: _Run, ref: SeriesRef, files: tuple[Path, ...]) -> Iterator[ScoreItem]:
    """Items of one retrieved series (ingest's grouping), recorded before they are yielded."""
    from medres.score.sources import dicom_items

    sk = _series_key(run, ref)
    inputs = [InputFile(p, f"{sk}/{p.name}", p.stat().st_size, f"{sk}/{p.name}") for p in files]
    items = list(dicom_items(inputs, key=run.key)) if inputs else []
    if run.headers is not None:
        _cache_headers(run.headers, items, run.keep_ids)
    n = ref.instances if ref.instances >= 0 else len(files)
    row = SeriesRow(_study_key(run, ref), n, tuple((i.key, i.identity, i.source) for i in items))
    run.state.record(sk, row)
    yield from items


def _cache_headers(folder: Path, items: list[ScoreItem], keep_ids: bool) -> None:
    """A pixel-free header per DICOM item (the SR's evidence on later runs); without
    ``keep_ids`` only what :func:`medres.score.dicom_out.slim_header` keeps (the one
    identity rule of every source header medres writes)."""
    import pydicom

    from medres.score.dicom_out import slim_header

    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    for it in items:
        if it.kind != "dicom":
            continue
        ds = pydicom.dcmread(it.payload.first.path, stop_before_pixels=True)
        if not keep_ids:
            ds = slim_header(ds)
        with atomic_open(folder / f"{it.key}.dcm", "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)


def split_sources(
    sources: list[str],
    *,
    query: list[str] | None = None,
    study_date: str = "",
    accessions: Path | None = None,
    limit: int = 0,
    push: bool = False,
    dicom_out: bool = False,
) -> tuple[tuple[Path, ...], PacsRequest | None]:
    """SOURCE arguments -> (paths, PACS request): one PACS URL alone, or paths only.

    The query options (``--query``, ``--study-date``, ``--accessions``, ``--limit``)
    need a PACS SOURCE; errors name the option.
    """
    from medres.errors import ConfigError
    from medres.ingest.pacs import build_query, is_pacs_url, parse_source

    urls = [s for s in sources if is_pacs_url(s)]
    if push and not (urls and dicom_out):
        raise ConfigError("--push stores the --dicom-out SRs on the PACS SOURCE: give both")
    paths = tuple(Path(s) for s in sources if not is_pacs_url(s))
    if not urls:
        if query or study_date or accessions is not None or limit:
            raise ConfigError(
                "--query/--study-date/--accessions/--limit need a PACS SOURCE "
                "(dicomweb+http://host:port/path or dimse://AET@host:port)"
            )
        return paths, None
    if len(urls) > 1 or paths:
        raise ConfigError(
            "give one PACS SOURCE on its own (score folders and a PACS in separate runs)"
        )
    parse_source(urls[0])  # a malformed URL fails here, before the model is loaded
    q = build_query(query or [], study_date=study_date, accessions_file=accessions, limit=limit)
    return (), PacsRequest(urls[0], q)
