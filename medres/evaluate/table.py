"""One predictions CSV as a typed :class:`Table`, and the parsing of its cells.

Owns: reading the CSV (UTF-8, header row, every cell a string), what counts as a missing
cell (empty, NaN, NA, none, null), label matching (``1`` == ``1.0``), score parsing,
the drop-missing rule, and the subgroup value of each row for ``--by`` columns (numeric
columns with more than 8 distinct values become quartile bins; identifier-like columns
are refused). Errors are :class:`~medres.errors.EvaluationError` naming the file, the
column and the fix. May import: the core and :mod:`medres.evaluate.config`.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medres.errors import EvaluationError
from medres.evaluate.config import EvaluateConfig
from medres.io import csv_dict_reader

log = logging.getLogger(__name__)

_MISSING = {"", "nan", "na", "n/a", "none", "null"}
_MAX_LISTED = 12


@dataclass(frozen=True)
class Table:
    """One predictions CSV: its header (trimmed) and rows (every cell a string)."""

    path: Path
    fields: tuple[str, ...]
    rows: list[dict[str, str]]


# ---------------------------------------------------------------------------------------
# reading CSV cells
# ---------------------------------------------------------------------------------------
def read_table(path: Path) -> Table:
    """Read a UTF-8 CSV with a header; errors name the file and the fix."""
    if not path.is_file():
        raise EvaluationError(f"{path}: file not found; pass a run dir or a predictions CSV")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv_dict_reader(fh)
            rows = list(reader)
            fields = [f.strip() for f in (reader.fieldnames or [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationError(
            f"{path}: not a readable UTF-8 CSV ({type(exc).__name__}); export it as CSV"
        ) from None
    except OSError as exc:
        raise EvaluationError(
            f"{path}: cannot be read ({exc.strerror}); check the path and its permissions"
        ) from None
    if not fields:
        raise EvaluationError(f"{path}: empty file or no header row; write a CSV with a header")
    rows = [{(k or "").strip(): (v or "") for k, v in r.items()} for r in rows]
    if not rows:
        raise EvaluationError(f"{path}: header only, no rows to evaluate")
    return Table(path, tuple(fields), rows)


def with_columns(table: Table, extra: dict[str, dict[str, str]]) -> Table:
    """``table`` plus columns joined on ``image_id`` (``{column: {image_id: value}}``)."""
    fields = table.fields
    for col, values in extra.items():
        fields = (*fields, col)
        for r in table.rows:
            r[col] = values.get(r.get("image_id", ""), "")
    return Table(table.path, fields, table.rows)


def listed(values: list[str] | tuple[str, ...]) -> str:
    shown = ", ".join(values[:_MAX_LISTED])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _MAX_LISTED else "")


def require(table: Table, column: str, option: str) -> None:
    if column not in table.fields:
        raise EvaluationError(
            f"{table.path.name}: no column {column!r} (columns: {listed(table.fields)}); "
            f"pass {option} with one of them"
        )


def is_missing(v: str) -> bool:
    return v.strip().lower() in _MISSING


def to_float(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def label_equal(value: str, positive: str) -> bool:
    a, b = value.strip(), positive.strip()
    if a == b:
        return True
    fa, fb = to_float(a), to_float(b)
    return fa is not None and fb is not None and fa == fb


def parse_scores(table: Table, column: str) -> np.ndarray:
    """Floats (NaN where missing); non-numeric or infinite values raise EvaluationError."""
    out = np.empty(len(table.rows))
    for i, r in enumerate(table.rows):
        v = r.get(column, "")
        if is_missing(v):
            out[i] = np.nan
            continue
        f = to_float(v)
        if f is None or math.isinf(f):
            what = "not a number" if f is None else "infinite"
            raise EvaluationError(
                f"{table.path.name}: score column {column!r} row {i + 2} is {what}; "
                "scores must be finite numbers (probabilities, logits or ordinal ratings)"
            )
        out[i] = f
    return out


def keep_mask(
    table: Table, cfg: EvaluateConfig, missing: np.ndarray, what: dict[str, np.ndarray]
) -> np.ndarray:
    """Keep-mask; raise when rows are missing and ``drop_missing`` is off."""
    if not missing.any():
        return np.ones(missing.shape[0], dtype=bool)
    if not cfg.drop_missing:
        for name, mask in what.items():
            if mask.any():
                first = int(np.argmax(mask)) + 2
                raise EvaluationError(
                    f"{table.path.name}: column {name!r} is empty or NaN in {int(mask.sum())} "
                    f"rows (first at row {first}); fill them or pass --drop-missing to skip "
                    "those rows"
                )
    log.warning("dropping %d rows with a missing label or score", int(missing.sum()))
    return ~missing


def kept_rows(table: Table, keep: np.ndarray) -> list[dict[str, str]]:
    return [r for r, k in zip(table.rows, keep, strict=True) if k]


# ---------------------------------------------------------------------------------------
# subgroup columns (--by)
# ---------------------------------------------------------------------------------------
def subgroup_columns(
    table: Table, rows: list[dict[str, str]], by: tuple[str, ...]
) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for col in by:
        require(table, col, "--by")
        values = group_values([r.get(col, "") for r in rows])
        distinct = len(set(values))
        if distinct > 50 or (distinct > 10 and distinct > len(values) / 2):
            raise EvaluationError(
                f"{table.path.name}: --by {col!r} has {distinct} distinct values in "
                f"{len(values)} rows; it looks like an identifier, pick a column with a few "
                "repeated values (manufacturer, sex, site)"
            )
        out[col] = values
    return out


def group_values(values: list[str]) -> list[str]:
    """Subgroup label per row; numeric columns with > 8 distinct values become quartile bins."""
    clean = [v.strip() if not is_missing(v) else "(missing)" for v in values]
    nums = [to_float(v) for v in clean if v != "(missing)"]
    if nums and all(x is not None for x in nums) and len(set(nums)) > 8:
        edges = np.unique(np.quantile(np.array(nums, dtype=float), [0, 0.25, 0.5, 0.75, 1.0]))
        return [v if v == "(missing)" else quartile_label(float(v), edges) for v in clean]
    return clean


def quartile_label(x: float, edges: np.ndarray) -> str:
    k = min(int(np.searchsorted(edges, x, side="right")) - 1, len(edges) - 2)
    k = max(k, 0)
    closing = "]" if k == len(edges) - 2 else ")"
    return f"[{edges[k]:g}, {edges[k + 1]:g}{closing}"
