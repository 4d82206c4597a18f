"""The scoring ledger: an embedded SQLite database (WAL) that makes scoring exactly-once.

Choices:

- One row per ``(item_key, model_hash)``, the table's PRIMARY KEY. An item is committed
  together with its scores in one transaction per batch, so a crash loses only the batch
  in flight and a re-run skips every committed item. Duplicates cannot exist, so the
  export dedups nothing.
- Rejections are committed too (``status = 'error'`` with an ingest code) so they are
  not retried forever; ``retry_errors`` lets a later commit replace an error row. An
  ``ok`` row is never overwritten (the upsert only fires on error rows).
- Scores are stored as JSON lists of floats: Python writes the shortest repr that
  round-trips, so scores read back bit-identical.
- WAL journal with ``synchronous=NORMAL``: a committed transaction survives a process
  crash (SIGKILL); only an OS crash/power loss may drop the last commits, which are then
  simply re-scored. Several processes (``torchrun`` ranks) may write one ledger; SQLite
  serialises the writers and ``busy_timeout`` makes them wait instead of failing.
- Raw identifiers (StudyInstanceUID, AccessionNumber) are stored only when the user
  opted in with ``--keep-ids``; otherwise those columns stay empty.
- ``scores.csv`` and ``errors.csv`` are exported from the ledger under a file lock and
  written atomically (temp file + ``os.replace``), so concurrent ranks never interleave
  and readers never see a partial file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from medres.errors import ScoringError
from medres.io import atomic_open, csv_writer

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.sqlite"
SCHEMA_VERSION = 1
STATUSES = ("ok", "error")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    model_hash TEXT PRIMARY KEY,
    classes TEXT NOT NULL,
    task TEXT NOT NULL DEFAULT '',
    info TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS items (
    item_key TEXT NOT NULL,
    model_hash TEXT NOT NULL REFERENCES models(model_hash),
    image_id TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    scores TEXT NOT NULL DEFAULT '[]',
    pred TEXT NOT NULL DEFAULT '',
    code TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT '',
    study_key TEXT NOT NULL DEFAULT '',
    series_key TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    accession TEXT NOT NULL DEFAULT '',
    committed_at REAL NOT NULL,
    PRIMARY KEY (item_key, model_hash)
);
"""

_COLUMNS = (
    "item_key",
    "model_hash",
    "image_id",
    "source",
    "status",
    "scores",
    "pred",
    "code",
    "message",
    "study_key",
    "series_key",
    "study_uid",
    "accession",
    "committed_at",
)


@dataclass(frozen=True)
class Record:
    """One scored (or rejected) item as stored in the ledger."""

    item_key: str
    image_id: str
    source: str
    status: str
    scores: tuple[float, ...] = ()
    pred: str = ""
    code: str = ""
    message: str = ""
    study_key: str = ""
    series_key: str = ""
    study_uid: str = ""
    accession: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """What the ledger knows about a model: its hash, class names and task."""

    model_hash: str
    classes: tuple[str, ...]
    task: str = ""
    threshold: float = 0.5
    positive: str = ""

    def label(self, probs: Sequence[float]) -> str:
        """The predicted label of one row of probabilities (see :func:`predict_label`)."""
        return predict_label(
            probs, self.classes, self.task, threshold=self.threshold, positive=self.positive or None
        )


def parse_shard(text: str | None) -> tuple[int, int]:
    """Parse ``--shard i/n`` (``i`` is 0-based, ``0 <= i < n``); ``None`` means ``0/1``."""
    if text is None or str(text).strip() == "":
        return (0, 1)
    try:
        i_s, n_s = str(text).split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise ScoringError(
            f"--shard {text!r}: expected I/N with integers, e.g. 0/2 and 1/2 for two shards"
        ) from None
    if n < 1 or not 0 <= i < n:
        raise ScoringError(
            f"--shard {text!r}: need 0 <= I < N (shards are 0-based), e.g. 0/{max(n, 2)}"
        )
    return (i, n)


def shard_of(identity: str, n: int) -> int:
    """Stable shard index of an item: first 8 bytes of sha256(identity) modulo ``n``.

    Uses an unkeyed hash of the item's identity so that every machine computes the same
    partition whatever its secret key; the hash itself is never stored.
    """
    if n <= 1:
        return 0
    digest = hashlib.sha256(identity.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n


def _connect(path: Path, *, timeout: float = 60.0) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    con.execute("PRAGMA foreign_keys=ON")
    return con


def _db_row(r: Record, model_hash: str, now: float) -> tuple[object, ...]:
    """One ``items`` row in ``_COLUMNS`` order."""
    return (
        r.item_key,
        model_hash,
        r.image_id,
        r.source,
        r.status,
        json.dumps([float(s) for s in r.scores]),
        r.pred,
        r.code,
        r.message,
        r.study_key,
        r.series_key,
        r.study_uid,
        r.accession,
        now,
    )


class Ledger:
    """An open ledger file. Use as a context manager; not shared across processes.

    Each process (worker rank) opens its own ``Ledger``; SQLite coordinates them.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise ScoringError(f"{self.path}: no ledger there; give an OUT_DIR that was scored")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = _connect(self.path)
            with self._tx():
                for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                    self._con.execute(stmt)
                self._con.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            version = self.meta("schema_version")
        except sqlite3.DatabaseError as exc:
            if "disk is full" in str(exc).lower():
                raise  # not a bad ledger: the caller's disk_guard names the folder
            raise ScoringError(
                f"{self.path}: not a readable medres ledger ({exc}); "
                "move it away or score into a fresh --out folder"
            ) from None
        if version != str(SCHEMA_VERSION):
            raise ScoringError(
                f"{self.path}: ledger schema {version}, this medres reads {SCHEMA_VERSION}; "
                "score into a fresh --out folder"
            )

    # -- plumbing ---------------------------------------------------------------------
    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE takes the write lock up front)."""
        self._con.execute("BEGIN IMMEDIATE")
        try:
            yield self._con
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        self._con.execute("COMMIT")

    # -- meta ---------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self._con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str, *, check: bool = False) -> None:
        """Set ``meta[key]``; with ``check`` refuse to change an existing different value."""
        with self._tx() as con:
            old = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if old is not None and check and old[0] != value:
                raise ScoringError(
                    f"{self.path}: ledger has {key}={old[0][:16]}, this run {value[:16]}; "
                    "score into a fresh --out folder or reuse the same key/settings"
                )
            con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def register_model(self, info: ModelInfo, extra: dict | None = None) -> None:
        """Record a model's classes; a hash already present must have the same classes."""
        with self._tx() as con:
            row = con.execute(
                "SELECT classes FROM models WHERE model_hash = ?", (info.model_hash,)
            ).fetchone()
            if row is not None:
                if tuple(json.loads(row[0])) != tuple(info.classes):
                    raise ScoringError(
                        f"{self.path}: model {info.model_hash[:12]} is registered with classes "
                        f"{json.loads(row[0])}, not {list(info.classes)}; use a fresh --out folder"
                    )
                return
            con.execute(
                "INSERT INTO models(model_hash, classes, task, info) VALUES (?, ?, ?, ?)",
                (
                    info.model_hash,
                    json.dumps(list(info.classes)),
                    info.task,
                    json.dumps(
                        {"threshold": info.threshold, "positive": info.positive, **(extra or {})},
                        default=str,
                    ),
                ),
            )

    def models(self) -> list[ModelInfo]:
        rows = self._con.execute(
            "SELECT model_hash, classes, task, info FROM models ORDER BY rowid"
        ).fetchall()
        out = []
        for h, c, t, info in rows:
            extra = json.loads(info or "{}")
            out.append(
                ModelInfo(
                    h,
                    tuple(json.loads(c)),
                    t,
                    float(extra.get("threshold", 0.5)),
                    str(extra.get("positive", "") or ""),
                )
            )
        return out

    def model(self, model_hash: str | None = None) -> ModelInfo:
        """The model ``model_hash`` or, when ``None``, the only model in the ledger."""
        models = self.models()
        if model_hash is None:
            if len(models) != 1:
                raise ScoringError(
                    f"{self.path}: ledger holds {len(models)} models; name one by its hash"
                )
            return models[0]
        for m in models:
            if m.model_hash == model_hash or m.model_hash.startswith(model_hash):
                return m
        raise ScoringError(
            f"{self.path}: model {model_hash[:12]} not in ledger; known: "
            f"{', '.join(m.model_hash[:12] for m in models) or 'none'}"
        )

    # -- items ----------------------------------------------------------------------------
    def done_keys(self, model_hash: str, *, include_errors: bool = True) -> set[str]:
        """Item keys already committed for ``model_hash`` (error rows optional)."""
        sql = "SELECT item_key FROM items WHERE model_hash = ?"
        if not include_errors:
            sql += " AND status = 'ok'"
        return {r[0] for r in self._con.execute(sql, (model_hash,))}

    def commit(self, model_hash: str, records: Sequence[Record]) -> int:
        """Commit ``records`` in ONE transaction; returns the number of rows written.

        A key already committed as ``ok`` is left untouched (exactly-once); a key
        committed as ``error`` is replaced (that is what ``--retry-errors`` relies on).
        """
        if not records:
            return 0
        now = time.time()
        rows = []
        for r in records:
            if r.status not in STATUSES:
                raise ValueError(f"status must be one of {STATUSES}, got {r.status!r}")
            rows.append(_db_row(r, model_hash, now))
        placeholders = ", ".join("?" * len(_COLUMNS))
        updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[2:])
        sql = (
            f"INSERT INTO items({', '.join(_COLUMNS)}) VALUES ({placeholders}) "
            f"ON CONFLICT(item_key, model_hash) DO UPDATE SET {updates} "
            "WHERE items.status = 'error'"
        )
        with self._tx() as con:
            before = con.total_changes
            con.executemany(sql, rows)
            return con.total_changes - before

    def records(self, model_hash: str) -> Iterator[Record]:
        """All committed records of ``model_hash``, ordered by image_id then key."""
        cur = self._con.execute(
            "SELECT item_key, image_id, source, status, scores, pred, code, message, "
            "study_key, series_key, study_uid, accession FROM items WHERE model_hash = ? "
            "ORDER BY image_id, item_key",
            (model_hash,),
        )
        for row in cur:
            yield Record(
                item_key=row[0],
                image_id=row[1],
                source=row[2],
                status=row[3],
                scores=tuple(json.loads(row[4])),
                pred=row[5],
                code=row[6],
                message=row[7],
                study_key=row[8],
                series_key=row[9],
                study_uid=row[10],
                accession=row[11],
            )

    def counts(self, model_hash: str) -> dict[str, int]:
        rows = self._con.execute(
            "SELECT status, COUNT(*) FROM items WHERE model_hash = ? GROUP BY status",
            (model_hash,),
        )
        out = {s: 0 for s in STATUSES}
        out.update(dict(rows.fetchall()))
        return out


# -- export ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _export_lock(out_dir: Path) -> Iterator[None]:
    """Serialise exports of one OUT_DIR across processes (advisory ``flock``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".export.lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fmt(x: float) -> str:
    return "" if math.isnan(x) else repr(float(x))


SCORE_BASE_COLUMNS = ("image_id", "source")
ERROR_COLUMNS = ("image_id", "source", "code", "message")


def score_columns(classes: Sequence[str], *, keep_ids: bool = False) -> list[str]:
    """Columns of ``scores.csv``: image_id, source, prob_<class>..., pred, status[, ids]."""
    cols = [*SCORE_BASE_COLUMNS, *(f"prob_{c}" for c in classes), "pred", "status"]
    if keep_ids:
        cols += ["StudyInstanceUID", "AccessionNumber"]
    return cols


def export_csvs(
    ledger: Ledger,
    out_dir: str | os.PathLike[str],
    model_hash: str,
    *,
    keep_ids: bool = False,
    aggregate: str | None = None,
) -> dict[str, Path]:
    """Write ``scores.csv`` and ``errors.csv`` (and ``scores_study.csv`` when aggregating).

    One ``scores.csv`` row per committed item, sorted by ``image_id``. Raw identifiers are
    written only with ``keep_ids`` (and only if they were stored with ``--keep-ids``).
    ``aggregate`` is ``None`` or ``"max"``/``"mean"``: per-study aggregation over the
    series of a study (``study_key``); items without a study key form their own study.
    """
    out = Path(out_dir)
    info = ledger.model(model_hash)
    classes = list(info.classes)
    paths = {"scores": out / "scores.csv", "errors": out / "errors.csv"}
    with _export_lock(out):
        records = list(ledger.records(info.model_hash))
        with atomic_open(paths["scores"], "w", encoding="utf-8", newline="") as fh:
            w = csv_writer(fh)
            w.writerow(score_columns(classes, keep_ids=keep_ids))
            for r in records:
                probs = list(r.scores) if r.status == "ok" else []
                row = [r.image_id, r.source]
                row += [_fmt(p) for p in probs] or [""] * len(classes)
                row += [r.pred, r.status]
                if keep_ids:
                    row += [r.study_uid, r.accession]
                w.writerow(row)
        with atomic_open(paths["errors"], "w", encoding="utf-8", newline="") as fh:
            w = csv_writer(fh)
            w.writerow(ERROR_COLUMNS)
            for r in records:
                if r.status == "error":
                    w.writerow([r.image_id, r.source, r.code, r.message])
        if aggregate:
            paths["scores_study"] = out / "scores_study.csv"
            _export_study(records, info, aggregate, paths["scores_study"])
    return paths


AGGREGATES = ("max", "mean")


def aggregate_study(
    records: Iterable[Record], n_classes: int, how: str
) -> dict[str, tuple[list[float], int]]:
    """Aggregate ``ok`` records per ``study_key`` (or ``image_id`` when unknown)."""
    if how not in AGGREGATES:
        raise ScoringError(f"--aggregate {how!r}: unknown; choose one of {', '.join(AGGREGATES)}")
    groups: dict[str, list[tuple[float, ...]]] = {}
    for r in records:
        if r.status != "ok":
            continue
        groups.setdefault(r.study_key or r.image_id, []).append(r.scores)
    out: dict[str, tuple[list[float], int]] = {}
    for study, rows in groups.items():
        cols = list(zip(*rows, strict=True)) if rows else [()] * n_classes
        agg = [max(c) if how == "max" else sum(c) / len(c) for c in cols]
        out[study] = (agg, len(rows))
    return out


def _export_study(records: list[Record], info: ModelInfo, how: str, path: Path) -> None:
    classes = list(info.classes)
    agg = aggregate_study(records, len(classes), how)
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv_writer(fh)
        w.writerow(["study_key", "n_items", *(f"prob_{c}" for c in classes), "pred"])
        for study in sorted(agg):
            probs, n = agg[study]
            w.writerow([study, n, *(_fmt(p) for p in probs), info.label(probs)])


def predict_label(
    probs: Sequence[float],
    classes: Sequence[str],
    task: str = "",
    *,
    threshold: float = 0.5,
    positive: str | None = None,
) -> str:
    """The predicted label, by the rule training writes ``pred`` with.

    binary: the positive class when its probability >= ``threshold``, else the other;
    multilabel: ``;``-joined classes >= ``threshold``; otherwise the argmax.
    """
    if not probs:
        return ""
    if task == "multilabel":
        return ";".join(c for c, p in zip(classes, probs, strict=True) if p >= threshold)
    if task == "binary" and len(classes) == 2:
        pos = list(classes).index(positive) if positive in classes else 1
        return str(classes[pos] if probs[pos] >= threshold else classes[1 - pos])
    best = max(range(len(probs)), key=lambda i: probs[i])
    return str(classes[best])


# -- merge -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeReport:
    """What :func:`merge_ledgers` did."""

    inserted: int
    identical: int
    replaced_errors: int


def merge_ledgers(
    dest: str | os.PathLike[str], sources: Sequence[str | os.PathLike[str]], *, atol: float = 0.0
) -> MergeReport:
    """Unite ``sources`` into the ledger at ``dest`` (created if missing), in one transaction.

    Checks: all ledgers share the key fingerprint (pseudonyms comparable) and a model
    hash present in several has the same classes. An item in both with ``ok`` status
    must carry the same scores (within ``atol``) and prediction, else nothing is merged
    and a :class:`ScoringError` names the item's pseudonymous key. An ``ok`` row beats an
    ``error`` row of the same item.
    """
    dest_path = Path(dest)
    inserted = identical = replaced = 0
    with Ledger(dest_path) as out:
        for src in sources:
            src_path = Path(src)
            if src_path.resolve() == dest_path.resolve():
                continue
            with Ledger(src_path, create=False) as led:
                fp = led.meta("key_fingerprint")
                if fp is not None:
                    out_fp = out.meta("key_fingerprint")
                    if out_fp is not None and out_fp != fp:
                        raise ScoringError(
                            f"{src_path}: scored under a different secret key than {dest_path}; "
                            "copy one OUT_DIR/.medres_key to every shard and re-score"
                        )
                    out.set_meta("key_fingerprint", fp)
                for m in led.models():
                    out.register_model(m)
                records = {m.model_hash: list(led.records(m.model_hash)) for m in led.models()}
            with out._tx() as con:
                for model_hash, recs in records.items():
                    for r in recs:
                        row = con.execute(
                            "SELECT status, scores, pred FROM items "
                            "WHERE item_key = ? AND model_hash = ?",
                            (r.item_key, model_hash),
                        ).fetchone()
                        if row is None or (row[0] == "error" and r.status == "ok"):
                            replaced += row is not None
                            inserted += row is None
                            _upsert(con, model_hash, r)
                            continue
                        if row[0] == "ok" and r.status == "ok":
                            old = json.loads(row[1])
                            same = len(old) == len(r.scores) and all(
                                abs(a - b) <= atol for a, b in zip(old, r.scores, strict=True)
                            )
                            if not same or row[2] != r.pred:
                                raise ScoringError(
                                    f"{src_path}: item {r.image_id} has scores {r.scores} "
                                    f"but {dest_path} has {old}; ledgers disagree, merge aborted "
                                    "(were they scored with different settings?)"
                                )
                        identical += 1
    log.info("merged %d ledgers: %d new, %d identical", len(sources), inserted, identical)
    return MergeReport(inserted=inserted, identical=identical, replaced_errors=replaced)


def _upsert(con: sqlite3.Connection, model_hash: str, r: Record) -> None:
    con.execute(
        f"INSERT OR REPLACE INTO items({', '.join(_COLUMNS)}) "
        f"VALUES ({', '.join('?' * len(_COLUMNS))})",
        _db_row(r, model_hash, time.time()),
    )
