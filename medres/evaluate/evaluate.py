"""``medres evaluate``: read predictions, compute metrics with CIs, write metrics.json + report.html.

Two inputs (see ``docs/architecture.md``, "Run directory"):

* a **run dir**: ``predictions_{split}.csv`` with ``label`` (or ``label_<name>`` for
  multi-label) and ``prob_<class>`` columns; ``model/model.json`` gives ``task``,
  ``classes`` and ``positive_class`` (without it they are inferred from the columns and
  the last class is the positive one);
* any **predictions CSV**: ``--label COL --positive VALUE --score COL [--score COL ...]``,
  one score column per model or human reader. Scores only need to rank cases (an ordinal
  rating is fine); calibration metrics are computed only for scores inside [0, 1].

Choices: a label equals ``--positive`` when the strings match after trimming or both
parse as the same number (``1`` == ``1.0``); every other non-empty label is negative.
Without ``--positive``, labels that are exactly {0, 1} or {false, true} use 1/true.
Empty or NaN labels and scores are errors unless ``drop_missing`` is set, in which case
the rows are dropped (counted in ``data.n_dropped``). Subgroup columns (``--by``) come
from the predictions file; for a run dir, a column training did not pass through is
joined from the manifest named in ``pipeline.yaml`` on ``image_id``. Numeric subgroup
columns with more than 8 distinct values (age) are cut into quartile bins, and columns
that look like identifiers (mostly distinct values) are refused. The
output never contains image or patient identifiers, only aggregate numbers, class names
and subgroup values.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medres import progress
from medres.errors import ConfigError, EvaluationError
from medres.evaluate import metrics as M
from medres.io import atomic_write_text

log = logging.getLogger(__name__)

METRICS_FORMAT = "medres-metrics/1"
_MISSING = {"", "nan", "na", "n/a", "none", "null"}
_MAX_LISTED = 12


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything ``run_evaluate`` needs; built once by the CLI (or by library callers)."""

    target: Path
    out: Path
    split: str = "test"
    label: str | None = None
    positive: str | None = None
    scores: tuple[str, ...] = ()
    by: tuple[str, ...] = ()
    n_boot: int = 2000
    seed: int = 0
    threshold: float | None = None
    ci_level: float = 0.95
    ci_transform: str = "none"
    ece_bins: int = 10
    sensitivity_targets: tuple[float, ...] = (0.90, 0.95)
    specificity_targets: tuple[float, ...] = (0.90, 0.95)
    drop_missing: bool = False
    title: str | None = None


@dataclass(frozen=True)
class EvaluateResult:
    """Paths written and the metrics dict (the content of metrics.json)."""

    out: Path
    metrics_path: Path
    report_path: Path
    metrics: dict[str, Any]

    @property
    def headline(self) -> dict[str, Any]:
        return self.metrics.get("headline", {})


@dataclass(frozen=True)
class Predictions:
    """Validated predictions, ready for the metric functions.

    binary: ``y`` bool (n,), ``scores`` (k, n), ``names`` = score/model names.
    multiclass: ``y`` int (n,) class index, ``scores`` (n, K), ``names`` = classes.
    multilabel: ``y`` bool (n, K), ``scores`` (n, K), ``names`` = label names.
    """

    task: str
    names: tuple[str, ...]
    y: np.ndarray
    scores: np.ndarray
    positive: str | None
    groups: dict[str, list[str]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------
def _macro_headline(name: str, extra: dict[str, Any], cfg: EvaluateConfig) -> dict[str, Any]:
    """The report's headline for multi-class / multi-label: macro AUC with its CI."""
    return {
        "name": name,
        "metric": "macro_auc",
        "value": extra["summary"]["macro_auc"],
        "ci": extra["summary"]["macro_auc_ci_bootstrap"],
        "ci_method": "bootstrap" if cfg.n_boot else None,
    }


def run_evaluate(config: EvaluateConfig) -> EvaluateResult:
    """Evaluate a run dir or predictions CSV and write ``metrics.json`` and ``report.html``."""
    from medres.evaluate.report import render_report

    _check_config(config)
    with progress.task("evaluate", total=3, unit="step") as step:
        preds = load_predictions(config)
        step.advance()
        metrics = sanitize(_EVALUATORS[preds.task](preds, config))
        step.advance()
        text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"
        page = render_report(metrics)  # render before writing: no half-finished output pair
        step.advance()
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise EvaluationError(f"--out {out}: is a file; pass a folder for the outputs") from None
    except OSError as exc:
        raise EvaluationError(
            f"--out {out}: cannot be created ({exc.strerror}); pick a writable folder"
        ) from None
    metrics_path = out / "metrics.json"
    report_path = out / "report.html"
    atomic_write_text(metrics_path, text)
    atomic_write_text(report_path, page)
    log.info("wrote %s and %s", metrics_path, report_path)
    return EvaluateResult(out, metrics_path, report_path, metrics)


def _check_config(cfg: EvaluateConfig) -> None:
    if cfg.n_boot < 0:
        raise ConfigError(f"--n-boot {cfg.n_boot}: must be >= 0 (0 turns the bootstrap off)")
    if 0 < cfg.n_boot < 100:
        log.warning("--n-boot %d is small; percentile CIs need ~1000+ replicates", cfg.n_boot)
    if not 0.5 <= cfg.ci_level < 1.0:
        raise ConfigError(f"--ci-level {cfg.ci_level}: must be in [0.5, 1), e.g. 0.95")
    if cfg.ci_transform not in M.CI_TRANSFORMS:
        raise ConfigError(
            f"--ci-transform {cfg.ci_transform!r} is unknown; known: {', '.join(M.CI_TRANSFORMS)}"
        )
    if cfg.ece_bins < 2:
        raise ConfigError(f"--ece-bins {cfg.ece_bins}: must be >= 2 (10 is the usual choice)")
    for t in (*cfg.sensitivity_targets, *cfg.specificity_targets):
        if not 0.0 < t <= 1.0:
            raise ConfigError(f"operating-point target {t}: must be in (0, 1]")
    if cfg.threshold is not None and not math.isfinite(cfg.threshold):
        raise ConfigError(f"--threshold {cfg.threshold}: must be a finite number")


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------
def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise EvaluationError(f"{path}: file not found; pass a run dir or a predictions CSV")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
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
    return fields, rows


def _manifest_columns(
    run: Path, fields: list[str], by: tuple[str, ...]
) -> dict[str, dict[str, str]]:
    """Values of ``--by`` columns missing from the predictions, joined from the run's manifest.

    The manifest path comes from ``RUN_DIR/pipeline.yaml`` (``data.manifest``, absolute or
    relative to the working directory or the run dir); rows are matched on ``image_id``.
    Returns ``{column: {image_id: value}}``; columns that cannot be found are left out, so
    the caller's "no column" error names them.
    """
    wanted = [c for c in by if c not in fields]
    if not wanted or "image_id" not in fields:
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


def _read_with_extra(
    path: Path, extra: dict[str, dict[str, str]] | None
) -> tuple[list[str], list[dict[str, str]]]:
    fields, rows = _read_csv(path)
    for col, values in (extra or {}).items():
        fields = [*fields, col]
        for r in rows:
            r[col] = values.get(r.get("image_id", ""), "")
    return fields, rows


def _listed(values: list[str]) -> str:
    shown = ", ".join(values[:_MAX_LISTED])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _MAX_LISTED else "")


def _require(path: Path, fields: list[str], column: str, option: str) -> None:
    if column not in fields:
        raise EvaluationError(
            f"{path.name}: no column {column!r} (columns: {_listed(fields)}); "
            f"pass {option} with one of them"
        )


def _is_missing(v: str) -> bool:
    return v.strip().lower() in _MISSING


def _to_float(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def _label_equal(value: str, positive: str) -> bool:
    a, b = value.strip(), positive.strip()
    if a == b:
        return True
    fa, fb = _to_float(a), _to_float(b)
    return fa is not None and fb is not None and fa == fb


def _parse_scores(path: Path, rows: list[dict[str, str]], column: str) -> np.ndarray:
    """Floats (NaN where missing); non-numeric or infinite values raise EvaluationError."""
    out = np.empty(len(rows))
    for i, r in enumerate(rows):
        v = r.get(column, "")
        if _is_missing(v):
            out[i] = np.nan
            continue
        f = _to_float(v)
        if f is None or math.isinf(f):
            what = "not a number" if f is None else "infinite"
            raise EvaluationError(
                f"{path.name}: score column {column!r} row {i + 2} is {what}; "
                "scores must be finite numbers (probabilities, logits or ordinal ratings)"
            )
        out[i] = f
    return out


def _drop_missing(
    path: Path, cfg: EvaluateConfig, missing: np.ndarray, what: dict[str, np.ndarray]
) -> np.ndarray:
    """Keep-mask; raise when rows are missing and ``drop_missing`` is off."""
    if not missing.any():
        return np.ones(missing.shape[0], dtype=bool)
    if not cfg.drop_missing:
        for name, mask in what.items():
            if mask.any():
                first = int(np.argmax(mask)) + 2
                raise EvaluationError(
                    f"{path.name}: column {name!r} is empty or NaN in {int(mask.sum())} rows "
                    f"(first at row {first}); fill them or pass --drop-missing to skip those rows"
                )
    log.warning("dropping %d rows with a missing label or score", int(missing.sum()))
    return ~missing


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
    return _load_binary_csv(target, cfg, cfg.label, cfg.positive, cfg.scores, model_name=None)


def _load_run_dir(run: Path, cfg: EvaluateConfig) -> Predictions:
    path = run / f"predictions_{cfg.split}.csv"
    if not path.is_file():
        found = sorted(p.name for p in run.glob("predictions_*.csv"))
        raise EvaluationError(
            f"{run}: no {path.name} (found: {_listed(found) or 'none'}); "
            "pass --split with one of those splits or a run dir written by `medres train`"
        )
    meta: dict[str, Any] = {}
    meta_path = run / "model" / "model.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EvaluationError(
                f"{meta_path}: not valid JSON; restore it from the run or re-run `medres train`"
            ) from None
        if not isinstance(meta, dict):
            raise EvaluationError(
                f"{meta_path}: expected a JSON object; restore it or re-run `medres train`"
            )
    else:
        log.warning("%s missing; inferring classes from the prob_ columns", meta_path)
    fields, _ = _read_csv(path)
    extra = _manifest_columns(run, fields, cfg.by)
    label_cols = [f for f in fields if f.startswith("label_")]
    prob_classes = [f[len("prob_") :] for f in fields if f.startswith("prob_")]
    classes = [str(c) for c in meta.get("classes") or prob_classes]
    if not classes:
        raise EvaluationError(
            f"{path.name}: no prob_<class> columns and no model/model.json classes; "
            "pass a run dir written by `medres train`, or a CSV with --label and --score"
        )
    task = meta.get("task") or (
        "multilabel" if label_cols else "binary" if len(classes) == 2 else "multiclass"
    )
    name = str(meta.get("arch") or run.name)
    # the trainer records its label columns; a single-label run normally uses `label`
    meta_cols = [str(c) for c in meta.get("label_columns") or []]
    single = meta_cols[0] if len(meta_cols) == 1 and meta_cols[0] in fields else "label"
    split_counts = _split_counts(run)
    if task == "binary":
        positive = cfg.positive or str(meta.get("positive_class") or classes[-1])
        preds = _load_binary_csv(
            path, cfg, single, positive, (f"prob_{positive}",), model_name=name, extra=extra
        )
    elif task == "multiclass":
        preds = _load_multiclass(path, cfg, classes, single, extra=extra)
    elif task == "multilabel":
        if len(meta_cols) == len(classes):
            pairs = list(zip(classes, meta_cols, strict=True))
        else:
            names = [c for c in classes if f"label_{c}" in fields] or [
                c[len("label_") :] for c in label_cols
            ]
            pairs = [(c, f"label_{c}") for c in names]
        preds = _load_multilabel(path, cfg, pairs, extra=extra)
    else:
        raise EvaluationError(
            f"{meta_path}: task {task!r} is unknown; known: {', '.join(_EVALUATORS)}"
        )
    preds.data["source"] = f"run dir {run.name}, split {cfg.split}"
    preds.data["model"] = name
    if split_counts:
        preds.data["splits"] = split_counts
    return preds


def _split_counts(run: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(run.glob("predictions_*.csv")):
        try:
            with p.open(newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        counts = Counter(r.get("label", "") for r in rows if "label" in r)
        out[p.stem[len("predictions_") :]] = {
            "n": len(rows),
            "labels": dict(sorted(counts.items())),
        }
    return out


def _groups(
    path: Path, fields: list[str], rows: list[dict[str, str]], by: tuple[str, ...]
) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for col in by:
        _require(path, fields, col, "--by")
        values = _group_values([r.get(col, "") for r in rows])
        distinct = len(set(values))
        if distinct > 50 or (distinct > 10 and distinct > len(values) / 2):
            raise EvaluationError(
                f"{path.name}: --by {col!r} has {distinct} distinct values in {len(values)} rows; "
                "it looks like an identifier, pick a column with a few repeated values "
                "(manufacturer, sex, site)"
            )
        out[col] = values
    return out


def _group_values(values: list[str]) -> list[str]:
    """Subgroup label per row; numeric columns with > 8 distinct values become quartile bins."""
    clean = [v.strip() if not _is_missing(v) else "(missing)" for v in values]
    nums = [_to_float(v) for v in clean if v != "(missing)"]
    if nums and all(x is not None for x in nums) and len(set(nums)) > 8:
        arr = np.array(nums, dtype=float)
        edges = np.unique(np.quantile(arr, [0, 0.25, 0.5, 0.75, 1.0]))
        labels = []
        for v in clean:
            if v == "(missing)":
                labels.append(v)
                continue
            x = float(v)
            k = min(int(np.searchsorted(edges, x, side="right")) - 1, len(edges) - 2)
            k = max(k, 0)
            closing = "]" if k == len(edges) - 2 else ")"
            labels.append(f"[{edges[k]:g}, {edges[k + 1]:g}{closing}")
        return labels
    return clean


def _load_binary_csv(
    path: Path,
    cfg: EvaluateConfig,
    label: str,
    positive: str | None,
    scores: tuple[str, ...],
    model_name: str | None,
    extra: dict[str, dict[str, str]] | None = None,
) -> Predictions:
    fields, rows = _read_with_extra(path, extra)
    _require(path, fields, label, "--label")
    dupes = [s for s, c in Counter(scores).items() if c > 1]
    if dupes:
        raise EvaluationError(f"--score {dupes[0]!r} given twice; list each score column once")
    for s in scores:
        _require(path, fields, s, "--score")
    labels = [r.get(label, "") for r in rows]
    label_missing = np.array([_is_missing(v) for v in labels])
    values = sorted({v.strip() for v, m in zip(labels, label_missing, strict=True) if not m})
    if positive is None:
        low = {v.lower() for v in values}
        if low <= {"0", "1"} or low <= {"false", "true"}:
            positive = "1" if low <= {"0", "1"} else next(v for v in values if v.lower() == "true")
        else:
            raise EvaluationError(
                f"{path.name}: column {label!r} has labels {_listed(values)}; "
                "pass --positive VALUE to say which one is the positive class"
            )
    y = np.array(
        [not m and _label_equal(v, positive) for v, m in zip(labels, label_missing, strict=True)]
    )
    if not any(_label_equal(v, positive) for v in values):
        raise EvaluationError(
            f"{path.name}: --positive {positive!r} does not occur in column {label!r} "
            f"(labels: {_listed(values)}); pass one of those values"
        )
    arr = np.vstack([_parse_scores(path, rows, s) for s in scores])
    score_missing = np.isnan(arr)
    missing = label_missing | score_missing.any(axis=0)
    what = {label: label_missing, **{s: score_missing[i] for i, s in enumerate(scores)}}
    keep = _drop_missing(path, cfg, missing, what)
    y, arr = y[keep], arr[:, keep]
    rows = [r for r, k in zip(rows, keep, strict=True) if k]
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "positive" if n_pos else "negative"
        raise EvaluationError(
            f"{path.name}: every usable row of column {label!r} is {only} "
            f"(positive = {positive!r}); AUC needs both classes, evaluate a split that has both"
        )
    names = tuple(scores) if model_name is None else (model_name,)
    data: dict[str, Any] = {
        "source": path.name,
        "n": int(y.size),
        "n_dropped": int((~keep).sum()),
        "label_column": label,
        "score_columns": list(scores),
        "class_counts": {"positive": n_pos, "negative": int(y.size - n_pos)},
    }
    if "split" in fields:
        data["splits"] = _csv_split_counts(rows, y)
    return Predictions(
        task="binary",
        names=names,
        y=y,
        scores=arr,
        positive=str(positive),
        groups=_groups(path, fields, rows, cfg.by),
        data=data,
    )


def _csv_split_counts(rows: list[dict[str, str]], y: np.ndarray) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r, yi in zip(rows, y, strict=True):
        d = out.setdefault(r.get("split", "").strip() or "(none)", {"n": 0, "n_positive": 0})
        d["n"] += 1
        d["n_positive"] += int(yi)
    return out


def _load_multiclass(
    path: Path,
    cfg: EvaluateConfig,
    classes: list[str],
    label: str = "label",
    extra: dict[str, dict[str, str]] | None = None,
) -> Predictions:
    fields, rows = _read_with_extra(path, extra)
    _require(path, fields, label, "a run dir whose predictions have")
    for c in classes:
        _require(path, fields, f"prob_{c}", "a run dir whose predictions have")
    index = {c: i for i, c in enumerate(classes)}
    labels = [r.get(label, "").strip() for r in rows]
    unknown = sorted({v for v in labels if v not in index and not _is_missing(v)})
    if unknown:
        raise EvaluationError(
            f"{path.name}: labels {_listed(unknown)} are not among the model's classes "
            f"({_listed(classes)}); fix the label column or model/model.json classes"
        )
    label_missing = np.array([_is_missing(v) for v in labels])
    probs = np.vstack([_parse_scores(path, rows, f"prob_{c}") for c in classes]).T
    prob_missing = np.isnan(probs)
    what = {
        label: label_missing,
        **{f"prob_{c}": prob_missing[:, i] for i, c in enumerate(classes)},
    }
    keep = _drop_missing(path, cfg, label_missing | prob_missing.any(axis=1), what)
    rows = [r for r, k in zip(rows, keep, strict=True) if k]
    y = np.array([index[v] for v, k in zip(labels, keep, strict=True) if k], dtype=int)
    probs = probs[keep]
    counts = np.bincount(y, minlength=len(classes))
    if (counts > 0).sum() < 2:
        raise EvaluationError(
            f"{path.name}: only one class is present in {label!r}; AUC needs at least two, "
            "evaluate a split that has several classes"
        )
    data = {
        "source": path.name,
        "n": int(y.size),
        "n_dropped": int((~keep).sum()),
        "class_counts": {c: int(n) for c, n in zip(classes, counts, strict=True)},
    }
    return Predictions(
        "multiclass", tuple(classes), y, probs, None, _groups(path, fields, rows, cfg.by), data
    )


def _load_multilabel(
    path: Path,
    cfg: EvaluateConfig,
    pairs: list[tuple[str, str]],
    extra: dict[str, dict[str, str]] | None = None,
) -> Predictions:
    """``pairs``: (name, label column) per label; scores are ``prob_<name>``."""
    fields, rows = _read_with_extra(path, extra)
    if not pairs:
        raise EvaluationError(
            f"{path.name}: a multi-label run needs label_<name> columns; none found"
        )
    names = [c for c, _ in pairs]
    for c, col in pairs:
        _require(path, fields, col, "a run dir whose predictions have")
        _require(path, fields, f"prob_{c}", "a run dir whose predictions have")
    lab = np.full((len(rows), len(pairs)), np.nan)
    for j, (_, col) in enumerate(pairs):
        for i, r in enumerate(rows):
            v = r.get(col, "")
            if _is_missing(v):
                continue
            f = _to_float(v)
            if f not in (0.0, 1.0):
                raise EvaluationError(
                    f"{path.name}: column {col!r} row {i + 2} is not 0 or 1; "
                    "multi-label columns hold 0/1"
                )
            lab[i, j] = f
    probs = np.vstack([_parse_scores(path, rows, f"prob_{c}") for c in names]).T
    miss_l, miss_p = np.isnan(lab), np.isnan(probs)
    what = {
        **{col: miss_l[:, j] for j, (_, col) in enumerate(pairs)},
        **{f"prob_{c}": miss_p[:, j] for j, c in enumerate(names)},
    }
    keep = _drop_missing(path, cfg, miss_l.any(axis=1) | miss_p.any(axis=1), what)
    rows = [r for r, k in zip(rows, keep, strict=True) if k]
    y = lab[keep].astype(bool)
    probs = probs[keep]
    both = [c for j, c in enumerate(names) if 0 < y[:, j].sum() < y.shape[0]]
    if not both:
        raise EvaluationError(
            f"{path.name}: no label_<name> column has both 0 and 1; AUC needs both classes, "
            "evaluate a split where some labels are present and some absent"
        )
    data = {
        "source": path.name,
        "n": int(y.shape[0]),
        "n_dropped": int((~keep).sum()),
        "class_counts": {c: int(y[:, j].sum()) for j, c in enumerate(names)},
    }
    return Predictions(
        "multilabel", tuple(names), y, probs, None, _groups(path, fields, rows, cfg.by), data
    )


# ---------------------------------------------------------------------------------------
# evaluators
# ---------------------------------------------------------------------------------------
def _ci_pair(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [float(ci[0]), float(ci[1])]


def _auc_block(
    dl: M.DeLong, i: int, boot: M.Bootstrap | None, cfg: EvaluateConfig
) -> dict[str, Any]:
    a = float(dl.aucs[i])
    var = dl.var(i)
    return {
        "auc": a,
        "auc_ci": _ci_pair(M.auc_ci(a, var, cfg.ci_level, cfg.ci_transform)),
        "auc_ci_method": "delong",
        "auc_ci_transform": cfg.ci_transform,
        "auc_se": math.sqrt(var) if math.isfinite(var) else None,
        "auc_ci_bootstrap": None
        if boot is None
        else _ci_pair(M.percentile_ci(boot.aucs[:, i], cfg.ci_level)),
    }


def _roc_band(boot: M.Bootstrap | None, i: int, level: float) -> dict[str, Any] | None:
    if boot is None:
        return None
    t = boot.tpr_at_grid[:, i, :]
    lo, hi = np.nanquantile(t, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    return {"fpr": boot.fpr_grid.tolist(), "tpr_lo": lo.tolist(), "tpr_hi": hi.tolist()}


def _calibration(y: np.ndarray, s: np.ndarray, cfg: EvaluateConfig) -> dict[str, Any]:
    if not M.is_probability(s):
        return {
            "brier": None,
            "ece": None,
            "ece_adaptive": None,
            "calibration_note": "scores are not all in [0, 1] (e.g. a reader rating or logits); "
            "Brier, ECE and the reliability diagram apply to probabilities only",
        }
    return {
        "brier": M.brier(y, s),
        "ece": M.ece(y, s, cfg.ece_bins, "uniform"),
        "ece_adaptive": M.ece(y, s, cfg.ece_bins, "quantile"),
        "ece_bins": cfg.ece_bins,
        "ece_method": "equal-width bins weighted by bin size; ece_adaptive uses equal-mass bins",
    }


def _primary_threshold(
    s: np.ndarray, ops: dict[str, Any], cfg: EvaluateConfig
) -> tuple[float, str]:
    """Threshold of the confusion matrix: --threshold, else 0.5, for probabilities; else Youden.

    A probability threshold means nothing on a rating or logit scale, so ``--threshold``
    applies only to score columns within [0, 1].
    """
    if M.is_probability(s):
        if cfg.threshold is not None:
            return cfg.threshold, "user threshold (--threshold)"
        return 0.5, "0.5 (probability scores)"
    return float(ops["youden"]["threshold"]), "Youden threshold (scores are not probabilities)"


def _evaluate_binary(p: Predictions, cfg: EvaluateConfig) -> dict[str, Any]:
    y, S = p.y, p.scores
    dl = M.delong(S, y)
    boot = M.bootstrap_auc(y, S, cfg.n_boot, cfg.seed) if cfg.n_boot > 0 else None
    models: dict[str, Any] = {}
    curves: dict[str, Any] = {"roc": {}, "roc_band": {}, "pr": {}, "reliability": {}}
    for i, name in enumerate(p.names):
        s = S[i]
        c = M.curve(y, s)
        prob = M.is_probability(s)
        ops = M.operating_points(
            y,
            s,
            sensitivity_targets=cfg.sensitivity_targets,
            specificity_targets=cfg.specificity_targets,
            threshold=cfg.threshold if prob else None,
            level=cfg.ci_level,
        )
        t, basis = _primary_threshold(s, ops, cfg)
        tp, fp, tn, fn = M.confusion_at(y, s, t)
        m = _auc_block(dl, i, boot, cfg)
        if cfg.threshold is not None and not prob:
            m["threshold_note"] = "--threshold not applied: scores are not probabilities"
        m.update(
            {
                "average_precision": M.average_precision(y, s),
                "prevalence": float(y.mean()),
                "probability_scores": M.is_probability(s),
                **_calibration(y, s, cfg),
                "operating_points": ops,
                "operating_points_note": "thresholds chosen and measured on these same cases "
                "(optimistic); confirm them on independent data",
                "confusion_matrix": {
                    "threshold": t,
                    "basis": basis,
                    "labels": ["negative", "positive"],
                    "matrix": [[tn, fp], [fn, tp]],
                    "rows": "true class",
                    "columns": "predicted class",
                },
            }
        )
        models[name] = m
        curves["roc"][name] = c.roc()
        curves["roc_band"][name] = _roc_band(boot, i, cfg.ci_level)
        curves["pr"][name] = c.pr()
        if M.is_probability(s):
            curves["reliability"][name] = M.reliability(y, s, cfg.ece_bins)
    comparisons = _comparisons(p.names, dl, boot, cfg)
    first = p.names[0]
    out = _header(p, cfg)
    out.update(
        {
            "n_positive": int(y.sum()),
            "positive": p.positive,
            "models": models,
            "comparisons": comparisons,
            "subgroups": _binary_subgroups(p, cfg),
            "headline": {
                "name": first,
                "metric": "auc",
                "value": models[first]["auc"],
                "ci": models[first]["auc_ci"],
                "ci_method": "delong",
            },
            "curves": curves,
        }
    )
    return out


def _header(p: Predictions, cfg: EvaluateConfig) -> dict[str, Any]:
    from medres import __version__

    n = int(p.y.shape[0])
    return {
        "format": METRICS_FORMAT,
        "medres_version": __version__,
        "title": cfg.title or p.data.get("source", ""),
        "task": p.task,
        "n": n,
        "settings": {
            "ci_level": cfg.ci_level,
            "ci_transform": cfg.ci_transform,
            "n_boot": cfg.n_boot,
            "bootstrap": "stratified by class, percentile intervals" if cfg.n_boot else None,
            "seed": cfg.seed,
            "threshold": cfg.threshold,
            "ece_bins": cfg.ece_bins,
            "split": cfg.split if Path(cfg.target).is_dir() else None,
        },
        "data": p.data,
    }


def _comparisons(
    names: tuple[str, ...], dl: M.DeLong, boot: M.Bootstrap | None, cfg: EvaluateConfig
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, j in itertools.combinations(range(len(names)), 2):
        t = M.delong_paired(dl, i, j, cfg.ci_level)
        row: dict[str, Any] = {
            "a": names[i],
            "b": names[j],
            "method": "delong_paired",
            "auc_a": t.auc_a,
            "auc_b": t.auc_b,
            "auc_diff": t.auc_diff,
            "z": t.z,
            "p_value": t.p_value,
            "diff_ci": _ci_pair(t.diff_ci),
            "diff_ci_bootstrap": None
            if boot is None
            else _ci_pair(M.percentile_ci(boot.aucs[:, i] - boot.aucs[:, j], cfg.ci_level)),
        }
        out.append(row)
    for row, adj in zip(out, M.holm([r["p_value"] for r in out]), strict=True):
        row["p_value_holm"] = adj
    return out


def _subgroup_auc(y: np.ndarray, S: np.ndarray, cfg: EvaluateConfig) -> list[dict[str, Any]]:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return [
            {"auc": None, "auc_ci": None, "note": "one class only in this subgroup"}
            for _ in range(S.shape[0])
        ]
    dl = M.delong(S, y)
    return [
        {
            "auc": float(dl.aucs[i]),
            "auc_ci": _ci_pair(
                M.auc_ci(float(dl.aucs[i]), dl.var(i), cfg.ci_level, cfg.ci_transform)
            ),
        }
        for i in range(S.shape[0])
    ]


def _binary_subgroups(p: Predictions, cfg: EvaluateConfig) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for col, values in p.groups.items():
        arr = np.array(values, dtype=object)
        rows = []
        for v in sorted(set(values)):
            m = arr == v
            ys = p.y[m]
            res = _subgroup_auc(ys, p.scores[:, m], cfg)
            rows.append(
                {
                    "value": v,
                    "n": int(m.sum()),
                    "n_positive": int(ys.sum()),
                    "models": dict(zip(p.names, res, strict=True)),
                }
            )
        out[col] = rows
    return out


def _ovr_metrics(
    p: Predictions, Y: np.ndarray, strata: np.ndarray, cfg: EvaluateConfig
) -> tuple[dict[str, Any], dict[str, Any], M.Bootstrap | None]:
    """Per-class one-vs-rest AUCs with DeLong and bootstrap CIs; Y is (n, K) bool."""
    K = len(p.names)
    boot = (
        M.bootstrap_auc(Y.T, p.scores.T, cfg.n_boot, cfg.seed, strata=strata)
        if cfg.n_boot > 0
        else None
    )
    per: dict[str, Any] = {}
    curves: dict[str, Any] = {"roc": {}, "roc_band": {}, "pr": {}}
    for k, name in enumerate(p.names):
        yk, sk = Y[:, k], p.scores[:, k]
        npos = int(yk.sum())
        if npos == 0 or npos == yk.size:
            per[name] = {"n_positive": npos, "auc": None, "auc_ci": None, "note": "one class only"}
            continue
        dl = M.delong(sk, yk)
        block = _auc_block(dl, 0, None, cfg)
        if boot is not None:
            block["auc_ci_bootstrap"] = _ci_pair(M.percentile_ci(boot.aucs[:, k], cfg.ci_level))
        block["n_positive"] = npos
        block["average_precision"] = M.average_precision(yk, sk)
        per[name] = block
        c = M.curve(yk, sk)
        curves["roc"][name] = c.roc()
        curves["pr"][name] = c.pr()
        curves["roc_band"][name] = _roc_band(boot, k, cfg.ci_level)
    valid = [k for k in range(K) if per[p.names[k]]["auc"] is not None]
    macro = float(np.mean([per[p.names[k]]["auc"] for k in valid]))
    macro_ci = None
    if boot is not None:
        macro_ci = _ci_pair(M.percentile_ci(boot.aucs[:, valid].mean(axis=1), cfg.ci_level))
    from sklearn.metrics import roc_auc_score

    summary = {
        "macro_auc": macro,
        "macro_auc_ci_bootstrap": macro_ci,
        "micro_auc": float(roc_auc_score(Y.ravel(), p.scores.ravel())),
        "micro_auc_note": "pooled over (case, class) pairs, which are not independent; no CI",
    }
    return per, {"summary": summary, "curves": curves}, boot


def _evaluate_multiclass(p: Predictions, cfg: EvaluateConfig) -> dict[str, Any]:
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    K = len(p.names)
    Y = np.eye(K, dtype=bool)[p.y]
    per, extra, _ = _ovr_metrics(p, Y, p.y, cfg)
    pred = np.argmax(p.scores, axis=1)
    cm = confusion_matrix(p.y, pred, labels=list(range(K)))
    correct = int(np.sum(pred == p.y))
    for k, name in enumerate(p.names):
        n_k = int(cm[k].sum())
        per[name]["recall"] = M.proportion(int(cm[k, k]), n_k)
        per[name]["recall_ci"] = M.wilson(int(cm[k, k]), n_k, cfg.ci_level)
    out = _header(p, cfg)
    out.update(
        {
            "classes": list(p.names),
            "per_class": per,
            **extra["summary"],
            "accuracy": correct / p.y.size,
            "accuracy_ci": M.wilson(correct, int(p.y.size), cfg.ci_level),
            "balanced_accuracy": float(balanced_accuracy_score(p.y, pred)),
            "confusion_matrix": {
                "labels": list(p.names),
                "matrix": cm.tolist(),
                "rows": "true class",
                "columns": "predicted class (argmax of prob_<class>)",
            },
            "subgroups": _macro_subgroups(p, Y),
            "headline": _macro_headline("macro one-vs-rest", extra, cfg),
            "curves": extra["curves"],
        }
    )
    return out


def _evaluate_multilabel(p: Predictions, cfg: EvaluateConfig) -> dict[str, Any]:
    Y = p.y
    patterns = np.array(["".join("1" if b else "0" for b in row) for row in Y])
    per, extra, _ = _ovr_metrics(p, Y, patterns, cfg)
    t = cfg.threshold if cfg.threshold is not None else 0.5
    pred = p.scores >= t
    for k, name in enumerate(p.names):
        tp, fp, tn, fn = M.confusion_at(Y[:, k], p.scores[:, k], t)
        per[name]["at_threshold"] = {"threshold": t, **M.rates(tp, fp, tn, fn, cfg.ci_level)}
    out = _header(p, cfg)
    out.update(
        {
            "labels": list(p.names),
            "per_label": per,
            **extra["summary"],
            "threshold": t,
            "subset_accuracy": float(np.mean(np.all(pred == Y, axis=1))),
            "hamming_loss": float(np.mean(pred != Y)),
            "subgroups": _macro_subgroups(p, Y),
            "headline": _macro_headline("macro over labels", extra, cfg),
            "curves": extra["curves"],
        }
    )
    return out


def _macro_subgroups(p: Predictions, Y: np.ndarray) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for col, values in p.groups.items():
        arr = np.array(values, dtype=object)
        rows = []
        for v in sorted(set(values)):
            m = arr == v
            aucs = []
            for k in range(Y.shape[1]):
                yk = Y[m, k]
                if 0 < yk.sum() < yk.size:
                    aucs.append(float(M.delong(p.scores[m, k], yk).aucs[0]))
            rows.append(
                {
                    "value": v,
                    "n": int(m.sum()),
                    "macro_auc": float(np.mean(aucs)) if aucs else None,
                    "n_classes_scored": len(aucs),
                }
            )
        out[col] = rows
    return out


_EVALUATORS: dict[str, Callable[[Predictions, EvaluateConfig], dict[str, Any]]] = {
    "binary": _evaluate_binary,
    "multiclass": _evaluate_multiclass,
    "multilabel": _evaluate_multilabel,
}


def sanitize(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, tuples to lists, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return sanitize(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj
