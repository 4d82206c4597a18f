"""Reading what ``medres evaluate`` evaluates: a run dir's predictions or a predictions CSV.

Two inputs (see ``docs/architecture.md``, "Run directory"):

* a **run dir**: ``predictions_{split}.csv`` with ``label`` (or ``label_<name>`` for
  multi-label) and ``prob_<class>`` columns; ``model/model.json`` gives ``task``,
  ``classes`` and ``positive_class`` (without it they are inferred from the columns and
  the last class is the positive one);
* any **predictions CSV**: ``--label COL --positive VALUE --score COL [--score COL ...]``,
  one score column per model or human reader. Scores only need to rank cases (an ordinal
  rating is fine).

Choices: a label equals ``--positive`` when the strings match after trimming or both
parse as the same number (``1`` == ``1.0``); every other non-empty label is negative.
Without ``--positive``, labels that are exactly {0, 1} or {false, true} use 1/true.
Empty or NaN labels and scores are errors unless ``drop_missing`` is set, in which case
the rows are dropped (counted in ``data.n_dropped``). Subgroup columns (``--by``) come
from the predictions file; for a run dir, a column training did not pass through is
joined from the manifest named in ``pipeline.yaml`` on ``image_id``. Numeric subgroup
columns with more than 8 distinct values (age) are cut into quartile bins, and columns
that look like identifiers (mostly distinct values) are refused.

``model.json`` is read through :class:`medres.models.modeldir.ModelMeta` (torch-free).

Owns the typed input records (:class:`BinaryColumns`, :class:`RunModel`,
:class:`RunSource`, :class:`DataSummary`, :class:`Predictions`) and
:func:`load_predictions`; cell parsing is :mod:`medres.evaluate.table`'s. May import: the
core, :mod:`medres.dataset.manifest`, :mod:`medres.models.modeldir`,
:mod:`medres.evaluate.config` and :mod:`medres.evaluate.table`; never torch.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medres.errors import EvaluationError, ModelError
from medres.evaluate.config import EvaluateConfig
from medres.evaluate.table import (
    Table,
    is_missing,
    keep_mask,
    kept_rows,
    label_equal,
    listed,
    parse_scores,
    read_table,
    require,
    subgroup_columns,
    to_float,
    with_columns,
)
from medres.io import csv_dict_reader
from medres.models.modeldir import ModelMeta

log = logging.getLogger(__name__)

TASKS = ("binary", "multiclass", "multilabel")


# ---------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BinaryColumns:
    """Which columns of a binary predictions table hold the label and the scores.

    ``positive`` is the label value of the positive class (``None``: infer 1 / true);
    ``model_name`` names the single score of a run dir (``None``: the score columns name
    themselves).
    """

    label: str
    positive: str | None
    scores: tuple[str, ...]
    model_name: str | None = None


@dataclass(frozen=True)
class RunModel:
    """What evaluation reads from a run's ``model/model.json``; every field may be absent."""

    path: Path
    task: str | None = None
    classes: tuple[str, ...] = ()
    positive_class: str | None = None
    arch: str | None = None
    label_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunSource:
    """Where run-dir predictions came from: shown in ``data`` of metrics.json."""

    source: str
    model: str
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSummary:
    """The ``data`` block of metrics.json: counts only, never identifiers."""

    source: str
    n: int
    n_dropped: int
    class_counts: dict[str, int]
    label_column: str | None = None
    score_columns: tuple[str, ...] | None = None
    splits: dict[str, dict[str, Any]] | None = None
    run: RunSource | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "n": self.n, "n_dropped": self.n_dropped}
        if self.label_column is not None:
            out["label_column"] = self.label_column
        if self.score_columns is not None:
            out["score_columns"] = list(self.score_columns)
        out["class_counts"] = self.class_counts
        if self.splits is not None:
            out["splits"] = self.splits
        if self.run is not None:
            out.update(source=self.run.source, model=self.run.model)
            if self.run.splits:
                out["splits"] = self.run.splits
        return out


@dataclass(frozen=True)
class Predictions:
    """Validated predictions, ready for the metric functions.

    binary: ``y`` bool (n,), ``scores`` (k, n), ``names`` = score/model names.
    multiclass: ``y`` int (n,) class index, ``scores`` (n, K), ``names`` = classes.
    multilabel: ``y`` bool (n, K), ``scores`` (n, K), ``names`` = label names.
    ``groups``: subgroup value per row for each ``--by`` column.
    """

    task: str
    names: tuple[str, ...]
    y: np.ndarray
    scores: np.ndarray
    positive: str | None
    groups: dict[str, list[str]]
    data: DataSummary


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------
def load_predictions(cfg: EvaluateConfig) -> Predictions:
    """Read and validate a run dir (``predictions_{split}.csv``) or a predictions CSV."""
    target = Path(cfg.target)
    if not target.exists():
        raise EvaluationError(
            f"{target}: no such file or directory; pass a run dir or a predictions CSV"
        )
    if target.is_dir() and not cfg.scores:
        return _load_run_dir(target, cfg)
    if target.is_dir():
        target = target / f"predictions_{cfg.split}.csv"
    if cfg.label is None or not cfg.scores:
        raise EvaluationError(
            f"{target.name}: a predictions CSV needs --label COL and at least one --score COL "
            "(or pass a run dir written by `medres train`)"
        )
    cols = BinaryColumns(cfg.label, cfg.positive, cfg.scores)
    return _load_binary(read_table(target), cfg, cols)


def _manifest_columns(run: Path, table: Table, by: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Values of ``--by`` columns missing from the predictions, joined from the run's manifest.

    The manifest path comes from ``RUN_DIR/pipeline.yaml`` (``data.manifest``, absolute or
    relative to the working directory or the run dir); rows are matched on ``image_id``.
    Returns ``{column: {image_id: value}}``; columns that cannot be found are left out, so
    the caller's "no column" error names them.
    """
    wanted = [c for c in by if c not in table.fields]
    if not wanted or "image_id" not in table.fields:
        return {}
    try:
        import yaml

        from medres.dataset.manifest import read_manifest

        spec = yaml.safe_load((run / "pipeline.yaml").read_text(encoding="utf-8")) or {}
        manifest = Path(str((spec.get("data") or {}).get("manifest") or ""))
        if not manifest.parts:
            return {}
        if not manifest.is_absolute() and not manifest.exists():
            manifest = run / manifest
        m = read_manifest(manifest)
    except Exception as exc:  # an unreadable spec or manifest: use the predictions only
        log.debug("no manifest join for --by (%s)", type(exc).__name__)
        return {}
    out: dict[str, dict[str, str]] = {}
    for col in wanted:
        if col in m.columns:
            out[col] = {r["image_id"]: r.get(col, "") for r in m.rows}
            log.info("--by %s: values joined from the manifest on image_id", col)
    return out


# ---------------------------------------------------------------------------------------
# run dirs
# ---------------------------------------------------------------------------------------
def read_run_model(run: Path) -> RunModel:
    """The evaluation fields of ``RUN_DIR/model/model.json`` (all empty when it is missing).

    A model.json written by ``medres train`` is read as a
    :class:`~medres.models.modeldir.ModelMeta`; a hand-made or partial one (a run dir
    assembled by hand, say with only ``task`` and ``classes``) is still accepted, and the
    fields evaluation needs are taken from it as they are.
    """
    meta_path = run / "model" / "model.json"
    if not meta_path.is_file():
        log.warning("%s missing; inferring classes from the prob_ columns", meta_path)
        return RunModel(meta_path)
    try:
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EvaluationError(
            f"{meta_path}: not valid JSON; restore it from the run or re-run `medres train`"
        ) from None
    if not isinstance(doc, dict):
        raise EvaluationError(
            f"{meta_path}: expected a JSON object; restore it or re-run `medres train`"
        )
    try:
        meta = ModelMeta.from_json(doc, source=meta_path)
    except ModelError as exc:
        log.debug("%s is not a complete medres model.json (%s); reading it as is", meta_path, exc)
        return _partial_run_model(meta_path, doc)
    return RunModel(
        path=meta_path,
        task=meta.task or None,
        classes=meta.classes,
        positive_class=meta.positive_class or None,
        arch=meta.arch,
        label_columns=meta.label_columns,
    )


def _partial_run_model(path: Path, doc: dict[str, Any]) -> RunModel:
    """The evaluation fields of a hand-made model.json; every one may be absent."""
    return RunModel(
        path=path,
        task=doc.get("task") or None,
        classes=tuple(str(c) for c in doc.get("classes") or ()),
        positive_class=str(doc["positive_class"]) if doc.get("positive_class") else None,
        arch=str(doc["arch"]) if doc.get("arch") else None,
        label_columns=tuple(str(c) for c in doc.get("label_columns") or ()),
    )


def _load_run_dir(run: Path, cfg: EvaluateConfig) -> Predictions:
    path = run / f"predictions_{cfg.split}.csv"
    if not path.is_file():
        found = sorted(p.name for p in run.glob("predictions_*.csv"))
        raise EvaluationError(
            f"{run}: no {path.name} (found: {listed(found) or 'none'}); "
            "pass --split with one of those splits or a run dir written by `medres train`"
        )
    model = read_run_model(run)
    raw = read_table(path)
    fields = raw.fields  # column decisions use the predictions' own header
    table = with_columns(raw, _manifest_columns(run, raw, cfg.by))
    label_cols = [f for f in fields if f.startswith("label_")]
    classes = list(model.classes) or [f[len("prob_") :] for f in fields if f.startswith("prob_")]
    if not classes:
        raise EvaluationError(
            f"{path.name}: no prob_<class> columns and no model/model.json classes; "
            "pass a run dir written by `medres train`, or a CSV with --label and --score"
        )
    task = model.task or (
        "multilabel" if label_cols else "binary" if len(classes) == 2 else "multiclass"
    )
    name = model.arch or run.name
    # the trainer records its label columns; a single-label run normally uses `label`
    meta_cols = list(model.label_columns)
    single = meta_cols[0] if len(meta_cols) == 1 and meta_cols[0] in fields else "label"
    if task == "binary":
        positive = cfg.positive or model.positive_class or classes[-1]
        cols = BinaryColumns(single, positive, (f"prob_{positive}",), model_name=name)
        preds = _load_binary(table, cfg, cols)
    elif task == "multiclass":
        preds = _load_multiclass(table, cfg, classes, single)
    elif task == "multilabel":
        preds = _load_multilabel(table, cfg, _multilabel_pairs(fields, classes, meta_cols))
    else:
        raise EvaluationError(f"{model.path}: task {task!r} is unknown; known: {', '.join(TASKS)}")
    source = RunSource(f"run dir {run.name}, split {cfg.split}", name, _split_counts(run))
    return replace(preds, data=replace(preds.data, run=source))


def _multilabel_pairs(
    fields: tuple[str, ...], classes: list[str], meta_cols: list[str]
) -> list[tuple[str, str]]:
    """(name, label column) per label: the trainer's label columns, else ``label_<class>``."""
    if len(meta_cols) == len(classes):
        return list(zip(classes, meta_cols, strict=True))
    names = [c for c in classes if f"label_{c}" in fields] or [
        c[len("label_") :] for c in fields if c.startswith("label_")
    ]
    return [(c, f"label_{c}") for c in names]


def _split_counts(run: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(run.glob("predictions_*.csv")):
        try:
            with p.open(newline="", encoding="utf-8-sig") as fh:
                rows = list(csv_dict_reader(fh))
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        counts = Counter(r.get("label", "") for r in rows if "label" in r)
        out[p.stem[len("predictions_") :]] = {
            "n": len(rows),
            "labels": dict(sorted(counts.items())),
        }
    return out


# ---------------------------------------------------------------------------------------
# binary
# ---------------------------------------------------------------------------------------
def _infer_positive(table: Table, label: str, values: list[str]) -> str:
    """Labels exactly {0, 1} or {false, true} make 1 / true positive; others need --positive."""
    low = {v.lower() for v in values}
    if low <= {"0", "1"}:
        return "1"
    if low <= {"false", "true"}:
        return next(v for v in values if v.lower() == "true")
    raise EvaluationError(
        f"{table.path.name}: column {label!r} has labels {listed(values)}; "
        "pass --positive VALUE to say which one is the positive class"
    )


def _check_binary_columns(table: Table, cols: BinaryColumns) -> None:
    require(table, cols.label, "--label")
    dupes = [s for s, c in Counter(cols.scores).items() if c > 1]
    if dupes:
        raise EvaluationError(f"--score {dupes[0]!r} given twice; list each score column once")
    for s in cols.scores:
        require(table, s, "--score")


def _binary_labels(table: Table, cols: BinaryColumns) -> tuple[np.ndarray, np.ndarray, str]:
    """(y, label_missing, positive) of the label column."""
    labels = [r.get(cols.label, "") for r in table.rows]
    label_missing = np.array([is_missing(v) for v in labels])
    values = sorted({v.strip() for v, m in zip(labels, label_missing, strict=True) if not m})
    positive = cols.positive
    if positive is None:
        positive = _infer_positive(table, cols.label, values)
    y = np.array(
        [not m and label_equal(v, positive) for v, m in zip(labels, label_missing, strict=True)]
    )
    if not any(label_equal(v, positive) for v in values):
        raise EvaluationError(
            f"{table.path.name}: --positive {positive!r} does not occur in column "
            f"{cols.label!r} (labels: {listed(values)}); pass one of those values"
        )
    return y, label_missing, positive


def _load_binary(table: Table, cfg: EvaluateConfig, cols: BinaryColumns) -> Predictions:
    _check_binary_columns(table, cols)
    y, label_missing, positive = _binary_labels(table, cols)
    arr = np.vstack([parse_scores(table, s) for s in cols.scores])
    score_missing = np.isnan(arr)
    missing = label_missing | score_missing.any(axis=0)
    what = {cols.label: label_missing, **{s: score_missing[i] for i, s in enumerate(cols.scores)}}
    keep = keep_mask(table, cfg, missing, what)
    y, arr = y[keep], arr[:, keep]
    rows = kept_rows(table, keep)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "positive" if n_pos else "negative"
        raise EvaluationError(
            f"{table.path.name}: every usable row of column {cols.label!r} is {only} "
            f"(positive = {positive!r}); AUC needs both classes, evaluate a split that has both"
        )
    data = DataSummary(
        source=table.path.name,
        n=int(y.size),
        n_dropped=int((~keep).sum()),
        class_counts={"positive": n_pos, "negative": int(y.size - n_pos)},
        label_column=cols.label,
        score_columns=tuple(cols.scores),
        splits=_csv_split_counts(rows, y) if "split" in table.fields else None,
    )
    return Predictions(
        task="binary",
        names=tuple(cols.scores) if cols.model_name is None else (cols.model_name,),
        y=y,
        scores=arr,
        positive=str(positive),
        groups=subgroup_columns(table, rows, cfg.by),
        data=data,
    )


def _csv_split_counts(rows: list[dict[str, str]], y: np.ndarray) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r, yi in zip(rows, y, strict=True):
        d = out.setdefault(r.get("split", "").strip() or "(none)", {"n": 0, "n_positive": 0})
        d["n"] += 1
        d["n_positive"] += int(yi)
    return out


# ---------------------------------------------------------------------------------------
# multi-class and multi-label run dirs
# ---------------------------------------------------------------------------------------
def _load_multiclass(
    table: Table, cfg: EvaluateConfig, classes: list[str], label: str = "label"
) -> Predictions:
    name = table.path.name
    require(table, label, "a run dir whose predictions have")
    for c in classes:
        require(table, f"prob_{c}", "a run dir whose predictions have")
    index = {c: i for i, c in enumerate(classes)}
    labels = [r.get(label, "").strip() for r in table.rows]
    unknown = sorted({v for v in labels if v not in index and not is_missing(v)})
    if unknown:
        raise EvaluationError(
            f"{name}: labels {listed(unknown)} are not among the model's classes "
            f"({listed(classes)}); fix the label column or model/model.json classes"
        )
    label_missing = np.array([is_missing(v) for v in labels])
    probs = np.vstack([parse_scores(table, f"prob_{c}") for c in classes]).T
    prob_missing = np.isnan(probs)
    what = {
        label: label_missing,
        **{f"prob_{c}": prob_missing[:, i] for i, c in enumerate(classes)},
    }
    keep = keep_mask(table, cfg, label_missing | prob_missing.any(axis=1), what)
    rows = kept_rows(table, keep)
    y = np.array([index[v] for v, k in zip(labels, keep, strict=True) if k], dtype=int)
    probs = probs[keep]
    counts = np.bincount(y, minlength=len(classes))
    if (counts > 0).sum() < 2:
        raise EvaluationError(
            f"{name}: only one class is present in {label!r}; AUC needs at least two, "
            "evaluate a split that has several classes"
        )
    data = DataSummary(
        source=name,
        n=int(y.size),
        n_dropped=int((~keep).sum()),
        class_counts={c: int(n) for c, n in zip(classes, counts, strict=True)},
    )
    return Predictions(
        "multiclass", tuple(classes), y, probs, None, subgroup_columns(table, rows, cfg.by), data
    )


def _multilabel_matrix(table: Table, pairs: list[tuple[str, str]]) -> np.ndarray:
    """(n, K) of 0/1 labels, NaN where missing; other values raise EvaluationError."""
    lab = np.full((len(table.rows), len(pairs)), np.nan)
    for j, (_, col) in enumerate(pairs):
        for i, r in enumerate(table.rows):
            v = r.get(col, "")
            if is_missing(v):
                continue
            f = to_float(v)
            if f not in (0.0, 1.0):
                raise EvaluationError(
                    f"{table.path.name}: column {col!r} row {i + 2} is not 0 or 1; "
                    "multi-label columns hold 0/1"
                )
            lab[i, j] = f
    return lab


def _load_multilabel(
    table: Table, cfg: EvaluateConfig, pairs: list[tuple[str, str]]
) -> Predictions:
    """``pairs``: (name, label column) per label; scores are ``prob_<name>``."""
    name = table.path.name
    if not pairs:
        raise EvaluationError(f"{name}: a multi-label run needs label_<name> columns; none found")
    names = [c for c, _ in pairs]
    for c, col in pairs:
        require(table, col, "a run dir whose predictions have")
        require(table, f"prob_{c}", "a run dir whose predictions have")
    lab = _multilabel_matrix(table, pairs)
    probs = np.vstack([parse_scores(table, f"prob_{c}") for c in names]).T
    miss_l, miss_p = np.isnan(lab), np.isnan(probs)
    what = {
        **{col: miss_l[:, j] for j, (_, col) in enumerate(pairs)},
        **{f"prob_{c}": miss_p[:, j] for j, c in enumerate(names)},
    }
    keep = keep_mask(table, cfg, miss_l.any(axis=1) | miss_p.any(axis=1), what)
    rows = kept_rows(table, keep)
    y = lab[keep].astype(bool)
    probs = probs[keep]
    if not any(0 < y[:, j].sum() < y.shape[0] for j in range(len(names))):
        raise EvaluationError(
            f"{name}: no label_<name> column has both 0 and 1; AUC needs both classes, "
            "evaluate a split where some labels are present and some absent"
        )
    data = DataSummary(
        source=name,
        n=int(y.shape[0]),
        n_dropped=int((~keep).sum()),
        class_counts={c: int(y[:, j].sum()) for j, c in enumerate(names)},
    )
    return Predictions(
        "multilabel", tuple(names), y, probs, None, subgroup_columns(table, rows, cfg.by), data
    )
