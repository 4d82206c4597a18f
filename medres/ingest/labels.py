"""Labels: read a labels CSV, join it onto image records, assign patient-grouped splits.

Imports: core only (``medres.errors``, ``medres.phi``).

Choices made here:

* **The join never keeps raw identifiers.** A labels file's key column holds raw IDs
  (``patient_id``, ``study_uid``, ``series_uid``, ``accession``); each value is turned into
  the same keyed-hash pseudonym that images carry (:func:`id_keys`) as soon as the file is
  read, and the join compares pseudonyms. Raw values never leave :func:`read_labels`, and
  no error message quotes them (line numbers instead).
* **``path`` keys** are paths relative to the source root, as in the manifest's ``source``
  (``p01/ct/1.dcm``, ``scan.nii.gz``, ``batch.zip!p01/1.dcm``). A path may name a file or any
  folder above it (``p01`` labels every image under ``p01``); the most specific match wins.
* **Label columns**: ``label`` (single-label, any string class) or several ``label_<name>``
  columns (multi-label, 0/1 each). Other columns are ignored (never copied: they may hold
  names).
* **Splits**: a ``split`` column (train/val/test) is honoured; every remaining patient is
  assigned by :func:`assign_splits`: stratified by the patient's label, grouped by
  ``patient_key`` (images without one form their own group), shuffled with ``seed``. A
  patient whose given splits disagree is an error, never silently split. Because patients
  are ordered by their keyed pseudonyms before shuffling, the same seed gives the same split
  for the same dataset folder (same key), not across datasets with different keys.
"""

from __future__ import annotations

import csv
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medres.errors import ConfigError, ManifestError
from medres.io import csv_dict_reader
from medres.phi import pseudonym

log = logging.getLogger(__name__)

KEY_COLUMNS: tuple[str, ...] = ("patient_id", "study_uid", "series_uid", "accession", "path")
# raw id column -> (image record field, pseudonym prefix)
ID_KEYS: dict[str, tuple[str, str]] = {
    "patient_id": ("patient_key", "pat-"),
    "study_uid": ("study_key", "stu-"),
    "series_uid": ("series_key", "ser-"),
    "accession": ("accession_key", "acc-"),
}
SPLITS: tuple[str, ...] = ("train", "val", "test")


def id_keys(
    key: bytes,
    *,
    patient_id: str = "",
    study_uid: str = "",
    series_uid: str = "",
    accession: str = "",
) -> dict[str, str]:
    """Pseudonyms for an image's raw identifiers (``patient_key``, ... ``accession_key``)."""
    raw = {
        "patient_id": patient_id,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "accession": accession,
    }
    return {field_: pseudonym(raw[col], key, prefix) for col, (field_, prefix) in ID_KEYS.items()}


def normalize_path(p: str) -> str:
    """``./a\\b/`` -> ``a/b``: the form ``path`` keys and ``source`` values are compared in."""
    p = p.strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return p.strip("/")


def path_candidates(source: str) -> list[str]:
    """``source`` and every folder (or archive) above it, most specific first."""
    s = normalize_path(source)
    out = [s]
    for i in range(len(s) - 1, 0, -1):
        if s[i] in "/!":
            out.append(s[:i])
    return out


@dataclass(frozen=True)
class LabelEntry:
    """One labels row after the join key was pseudonymised."""

    line: int
    labels: dict[str, str]
    split: str = ""


@dataclass
class LabelTable:
    """A parsed labels file: ``entries`` maps the (pseudonymised) join key to its labels."""

    key_column: str
    label_columns: tuple[str, ...]
    entries: dict[str, LabelEntry] = field(default_factory=dict)
    has_split: bool = False
    n_rows: int = 0

    def lookup(self, record: Mapping[str, object] | object) -> tuple[str, LabelEntry] | None:
        """The entry for an image record (``patient_key`` ... and ``sources``), or ``None``.

        ``record``: an :class:`~medres.ingest.records.ImageRecord` or a mapping of its fields.
        """
        if self.key_column == "path":
            best: tuple[int, str, LabelEntry] | None = None
            for src in _field(record, "sources") or []:  # type: ignore[union-attr]
                for depth, cand in enumerate(path_candidates(str(src))):
                    e = self.entries.get(cand)
                    if e is not None and (best is None or depth < best[0]):
                        best = (depth, cand, e)
                        break
            return None if best is None else (best[1], best[2])
        k = str(_field(record, ID_KEYS[self.key_column][0]) or "")
        e = self.entries.get(k) if k else None
        return None if e is None else (k, e)


def _field(record: Mapping[str, object] | object, name: str) -> object:
    """A record's field, whether it is an ``ImageRecord`` or a mapping."""
    if isinstance(record, Mapping):
        return record.get(name, "")
    return getattr(record, name, "")


def read_labels(path: Path, key: bytes, key_column: str | None = None) -> LabelTable:
    """Parse and validate a labels CSV; see the module docstring for the format.

    Raises :class:`ManifestError` for a missing/ambiguous key column, no label column,
    bad split names, non-0/1 multi-label values or conflicting duplicate rows.
    """
    name = path.name
    if not path.is_file():
        raise ManifestError(f"labels file {name!r} not found; check the --labels path")
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv_dict_reader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            raw_rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(
            f"labels file {name}: cannot be read as UTF-8 CSV ({type(exc).__name__}); "
            "save it as CSV with a header row"
        ) from None
    kc = _key_column(columns, name, key_column)
    label_cols = _label_columns(columns, name)
    table = LabelTable(kc, label_cols, has_split="split" in columns)
    for lineno, raw in enumerate(raw_rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        raw_key = row.get(kc, "")
        if not raw_key:
            raise ManifestError(
                f"labels file {name} line {lineno}: empty {kc}; every row needs its key"
            )
        labels = {c: row.get(c, "") for c in label_cols}
        if all(v == "" for v in labels.values()):
            log.warning("labels file %s line %d has no label value; row ignored", name, lineno)
            continue
        if len(label_cols) > 1 or label_cols[0] != "label":
            bad = [c for c, v in labels.items() if v not in ("0", "1", "")]
            if bad:
                raise ManifestError(
                    f"labels file {name} line {lineno}: multi-label column {bad[0]} must be 0 or 1"
                )
        split = row.get("split", "").lower()
        if split not in ("", *SPLITS):
            raise ManifestError(
                f"labels file {name} line {lineno}: split must be train, val or test (or empty)"
            )
        jk = normalize_path(raw_key) if kc == "path" else pseudonym(raw_key, key, ID_KEYS[kc][1])
        entry = LabelEntry(lineno, labels, split)
        prev = table.entries.get(jk)
        if prev is not None:
            if prev.labels != entry.labels or prev.split != entry.split:
                raise ManifestError(
                    f"labels file {name}: lines {prev.line} and {lineno} give the same {kc} "
                    "different labels or splits; keep one row per key"
                )
            continue
        table.entries[jk] = entry
        table.n_rows += 1
    if not table.entries:
        raise ManifestError(f"labels file {name}: no labelled rows; fill the label column(s)")
    return table


def _key_column(columns: Sequence[str], name: str, wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in KEY_COLUMNS:
            raise ConfigError(
                f"--label-key {wanted!r} is not a key column; use one of {', '.join(KEY_COLUMNS)}"
            )
        if wanted not in columns:
            raise ManifestError(f"labels file {name}: has no {wanted!r} column (from --label-key)")
        return wanted
    present = [c for c in KEY_COLUMNS if c in columns]
    if not present:
        raise ManifestError(
            f"labels file {name}: no key column; add one of {', '.join(KEY_COLUMNS)}"
        )
    if len(present) > 1:
        raise ManifestError(
            f"labels file {name}: several key columns ({', '.join(present)}); choose one with "
            "--label-key"
        )
    return present[0]


def _label_columns(columns: Sequence[str], name: str) -> tuple[str, ...]:
    multi = tuple(c for c in columns if c.startswith("label_") and len(c) > len("label_"))
    if "label" in columns and multi:
        raise ManifestError(
            f"labels file {name}: has both 'label' and label_<name> columns; use 'label' for "
            "one class per image or only label_<name> columns (0/1) for multi-label"
        )
    if "label" in columns:
        return ("label",)
    if multi:
        return multi
    raise ManifestError(
        f"labels file {name}: no 'label' column; add one (or label_<name> columns for multi-label)"
    )


@dataclass(frozen=True)
class JoinResult:
    """Outcome of :func:`join_labels`: per-record labels/split and the summary counts."""

    labels: list[dict[str, str]]
    given_splits: list[str]
    unmatched_rows: int
    unlabelled_images: int


def join_labels(records: Sequence[Mapping[str, object] | object], table: LabelTable) -> JoinResult:
    """Attach labels (and any given split) to each image record (see :meth:`LabelTable.lookup`)."""
    used: set[str] = set()
    labels: list[dict[str, str]] = []
    given: list[str] = []
    unlabelled = 0
    for rec in records:
        hit = table.lookup(rec)
        if hit is None:
            labels.append({c: "" for c in table.label_columns})
            given.append("")
            unlabelled += 1
            continue
        used.add(hit[0])
        labels.append(dict(hit[1].labels))
        given.append(hit[1].split)
    return JoinResult(labels, given, len(table.entries) - len(used), unlabelled)


def check_fractions(val_frac: float, test_frac: float) -> None:
    """Raise :class:`ConfigError` unless 0 <= val, test and val + test < 1."""
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ConfigError(
            f"--val-frac {val_frac:g} and --test-frac {test_frac:g} must each be in [0, 1) "
            "and sum to less than 1"
        )


def assign_splits(
    groups: Sequence[str],
    strata: Sequence[str],
    given: Sequence[str] | None = None,
    *,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    seed: int = 0,
) -> list[str]:
    """Split items into train/val/test so that items of one group share a split.

    ``groups``: group per item (patient key); ``strata``: class per item (e.g. its label,
    empty for unlabelled); ``given``: a split already fixed for some items (empty
    otherwise). A group takes its given split; other groups are stratified by their most
    common stratum and divided per stratum (rounded, with at least one val and one test
    group once a stratum has three groups and the fraction is positive; at least one train).
    Raises :class:`ManifestError` when a group's given splits disagree.
    """
    check_fractions(val_frac, test_frac)
    n = len(groups)
    if len(strata) != n or (given is not None and len(given) != n):
        raise ValueError("groups, strata and given must have the same length")
    given = given or [""] * n
    fixed: dict[str, str] = {}
    for g, s in zip(groups, given, strict=True):
        if not s:
            continue
        if fixed.setdefault(g, s) != s:
            raise ManifestError(
                f"patient {g} has images in split {fixed[g]!r} and {s!r} in the labels file; "
                "put all of a patient's rows in one split (otherwise results leak)"
            )
    votes: dict[str, Counter[str]] = defaultdict(Counter)
    for g, s in zip(groups, strata, strict=True):
        votes[g][s] += 1
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for g in sorted(votes):
        if g in fixed:
            continue
        stratum = sorted(votes[g].items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        by_stratum[stratum].append(g)
    rng = random.Random(seed)
    assigned = dict(fixed)
    for stratum in sorted(by_stratum):
        members = by_stratum[stratum]
        rng.shuffle(members)
        n_val, n_test = _counts(len(members), val_frac, test_frac)
        for i, g in enumerate(members):
            assigned[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return [assigned[g] for g in groups]


def _counts(n: int, val_frac: float, test_frac: float) -> tuple[int, int]:
    n_test = round(n * test_frac)
    n_val = round(n * val_frac)
    if n >= 3:
        n_test = max(n_test, 1 if test_frac > 0 else 0)
        n_val = max(n_val, 1 if val_frac > 0 else 0)
    while n_val + n_test > max(n - 1, 0):
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test
