"""``medres evaluate``: predictions in, ``metrics.json`` + ``report.html`` out.

The evaluation run (:func:`run_evaluate`): read the predictions
(:mod:`medres.evaluate.inputs`), compute the metrics of the task (binary: AUC with DeLong
and bootstrap CIs, operating points, calibration, paired comparisons, subgroups;
multi-class and multi-label: one-vs-rest AUCs, macro/micro summaries, confusion or
threshold metrics), make the result JSON-safe and write both files atomically. The
report is rendered before anything is written, so a failure never leaves half an output
pair. Calibration metrics are computed only for scores inside [0, 1]. The output never
contains image or patient identifiers, only aggregate numbers, class names and subgroup
values.

Owns the evaluators and the metrics.json layout (``format: medres-metrics/1``). May
import: the core, :mod:`medres.dataset` (through ``inputs``), the rest of
:mod:`medres.evaluate`, numpy and scikit-learn; never torch.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medres import progress
from medres.evaluate import metrics as M
from medres.evaluate.calibration import before_scaling, read_run_calibration, validation_threshold
from medres.evaluate.comparisons import compare_all
from medres.evaluate.config import EvaluateConfig, check_config
from medres.evaluate.inputs import Predictions, load_predictions
from medres.evaluate.subgroups import binary_subgroups, macro_subgroups
from medres.io import MIN_FREE_BYTES, atomic_write_text, check_output_dir, disk_guard

__all__ = [
    "METRICS_FORMAT",
    "EvaluateConfig",
    "EvaluateResult",
    "Predictions",
    "evaluate_predictions",
    "load_predictions",
    "run_evaluate",
    "sanitize",
]

log = logging.getLogger(__name__)

METRICS_FORMAT = "medres-metrics/1"


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


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------
def run_evaluate(config: EvaluateConfig) -> EvaluateResult:
    """Evaluate a run dir or predictions CSV and write ``metrics.json`` and ``report.html``."""
    from medres.evaluate.report import render_report

    check_config(config)
    check_output_dir(Path(config.out), MIN_FREE_BYTES)  # a file/read-only --out: before work
    with progress.task("evaluate", total=3, unit="step") as step:
        preds = load_predictions(config)
        step.advance()
        metrics = evaluate_predictions(preds, config)
        step.advance()
        text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"
        page = render_report(metrics)  # render before writing: no half-finished output pair
        step.advance()
    metrics_path, report_path = _write_outputs(Path(config.out), text, page)
    return EvaluateResult(Path(config.out), metrics_path, report_path, metrics)


def evaluate_predictions(preds: Predictions, config: EvaluateConfig) -> dict[str, Any]:
    """The metrics dict (JSON-safe) of validated predictions."""
    return sanitize(_EVALUATORS[preds.task](preds, config))


def _write_outputs(out: Path, text: str, page: str) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``report.html`` atomically into ``out`` (made if needed)."""
    check_output_dir(out, len(text.encode()) + len(page.encode()))  # file/read-only/space
    metrics_path = out / "metrics.json"
    report_path = out / "report.html"
    with disk_guard(out, len(text.encode()) + len(page.encode())):
        atomic_write_text(metrics_path, text)
        atomic_write_text(report_path, page)
    log.info("wrote %s and %s", metrics_path, report_path)
    return metrics_path, report_path


def _header(p: Predictions, cfg: EvaluateConfig) -> dict[str, Any]:
    """The fields every task's metrics.json starts with: format, settings, data counts."""
    from medres import __version__

    return {
        "format": METRICS_FORMAT,
        "medres_version": __version__,
        "title": cfg.title or p.data.as_dict().get("source", ""),
        "task": p.task,
        "n": int(p.y.shape[0]),
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
        "data": p.data.as_dict(),
    }


def _macro_headline(name: str, extra: dict[str, Any], cfg: EvaluateConfig) -> dict[str, Any]:
    """The report's headline for multi-class / multi-label: macro AUC with its CI."""
    return {
        "name": name,
        "metric": "macro_auc",
        "value": extra["summary"]["macro_auc"],
        "ci": extra["summary"]["macro_auc_ci_bootstrap"],
        "ci_method": "bootstrap" if cfg.n_boot else None,
    }


# ---------------------------------------------------------------------------------------
# shared blocks
# ---------------------------------------------------------------------------------------
def _auc_block(
    dl: M.DeLong, i: int, boot: M.Bootstrap | None, cfg: EvaluateConfig
) -> dict[str, Any]:
    a = float(dl.aucs[i])
    var = dl.var(i)
    return {
        "auc": a,
        "auc_ci": M.ci_pair(M.auc_ci(a, var, cfg.ci_level, cfg.ci_transform)),
        "auc_ci_method": "delong",
        "auc_ci_transform": cfg.ci_transform,
        "auc_se": math.sqrt(var) if math.isfinite(var) else None,
        "auc_ci_bootstrap": None
        if boot is None
        else M.ci_pair(M.percentile_ci(boot.aucs[:, i], cfg.ci_level)),
    }


def _roc_band(boot: M.Bootstrap | None, i: int, level: float) -> dict[str, Any] | None:
    if boot is None:
        return None
    t = boot.tpr_at_grid[:, i, :]
    lo, hi = np.nanquantile(t, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    return {"fpr": boot.fpr_grid.tolist(), "tpr_lo": lo.tolist(), "tpr_hi": hi.tolist()}


# ---------------------------------------------------------------------------------------
# binary
# ---------------------------------------------------------------------------------------
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


def _confusion_block(y: np.ndarray, s: np.ndarray, t: float, basis: str) -> dict[str, Any]:
    tp, fp, tn, fn = M.confusion_at(y, s, t)
    return {
        "threshold": t,
        "basis": basis,
        "labels": ["negative", "positive"],
        "matrix": [[tn, fp], [fn, tp]],
        "rows": "true class",
        "columns": "predicted class",
    }


def _binary_model(
    y: np.ndarray, s: np.ndarray, i: int, dl: M.DeLong, boot: M.Bootstrap | None,
    cfg: EvaluateConfig,
) -> dict[str, Any]:  # fmt: skip
    """The ``models[name]`` block of one score column."""
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
    m = _auc_block(dl, i, boot, cfg)
    if cfg.threshold is not None and not prob:
        m["threshold_note"] = "--threshold not applied: scores are not probabilities"
    m.update(
        {
            "average_precision": M.average_precision(y, s),
            "prevalence": float(y.mean()),
            "probability_scores": prob,
            **_calibration(y, s, cfg),
            "operating_points": ops,
            "operating_points_note": "thresholds chosen and measured on these same cases "
            "(optimistic); confirm them on independent data",
            "confusion_matrix": _confusion_block(y, s, t, basis),
        }
    )
    return m


def _add_run_calibration(
    y: np.ndarray, s: np.ndarray, model: dict[str, Any], curves: dict[str, Any],
    name: str, cfg: EvaluateConfig,
) -> None:  # fmt: skip
    """A run dir's validation-chosen threshold and calibration before scaling (if recorded)."""
    cal = read_run_calibration(Path(cfg.target))
    if cal is None or not M.is_probability(s):
        return
    if cal.threshold is not None:
        model["validation_threshold"] = validation_threshold(y, s, cal, cfg.ci_level)
        model["validation_threshold"]["same_cases"] = cfg.split == cal.stats.get("split", "val")
        if cfg.threshold is None:
            basis = f"threshold chosen on validation ({cal.rule}; model.json)"
            model["confusion_matrix"] = _confusion_block(y, s, cal.threshold, basis)
    block, rel = before_scaling(y, s, cal, cfg.ece_bins)
    model["calibration_before"] = block
    curves["reliability_before_scaling"] = {name: rel}


def _evaluate_binary(p: Predictions, cfg: EvaluateConfig) -> dict[str, Any]:
    y, S = p.y, p.scores
    dl = M.delong(S, y)
    boot = M.bootstrap_auc(y, S, cfg.n_boot, cfg.seed) if cfg.n_boot > 0 else None
    models: dict[str, Any] = {}
    curves: dict[str, Any] = {"roc": {}, "roc_band": {}, "pr": {}, "reliability": {}}
    for i, name in enumerate(p.names):
        s = S[i]
        c = M.curve(y, s)
        models[name] = _binary_model(y, s, i, dl, boot, cfg)
        curves["roc"][name] = c.roc()
        curves["roc_band"][name] = _roc_band(boot, i, cfg.ci_level)
        curves["pr"][name] = c.pr()
        if M.is_probability(s):
            curves["reliability"][name] = M.reliability(y, s, cfg.ece_bins)
    first = p.names[0]
    if len(p.names) == 1:
        _add_run_calibration(y, S[0], models[first], curves, first, cfg)
    out = _header(p, cfg)
    out.update(
        {
            "n_positive": int(y.sum()),
            "positive": p.positive,
            "models": models,
            "comparisons": compare_all(p.names, dl, boot, cfg),
            "subgroups": binary_subgroups(p, cfg),
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


# ---------------------------------------------------------------------------------------
# multi-class and multi-label
# ---------------------------------------------------------------------------------------
def _ovr_class(
    yk: np.ndarray, sk: np.ndarray, k: int, boot: M.Bootstrap | None, cfg: EvaluateConfig
) -> dict[str, Any]:
    """One class's one-vs-rest block (``None`` AUC when the class is all or nothing)."""
    npos = int(yk.sum())
    if npos == 0 or npos == yk.size:
        return {"n_positive": npos, "auc": None, "auc_ci": None, "note": "one class only"}
    block = _auc_block(M.delong(sk, yk), 0, None, cfg)
    if boot is not None:
        block["auc_ci_bootstrap"] = M.ci_pair(M.percentile_ci(boot.aucs[:, k], cfg.ci_level))
    block["n_positive"] = npos
    block["average_precision"] = M.average_precision(yk, sk)
    return block


def _macro_summary(
    p: Predictions, Y: np.ndarray, per: dict[str, Any], boot: M.Bootstrap | None,
    cfg: EvaluateConfig,
) -> dict[str, Any]:  # fmt: skip
    """Macro AUC (mean over scorable classes, bootstrap CI) and pooled micro AUC."""
    from sklearn.metrics import roc_auc_score

    valid = [k for k in range(len(p.names)) if per[p.names[k]]["auc"] is not None]
    macro = float(np.mean([per[p.names[k]]["auc"] for k in valid]))
    macro_ci = None
    if boot is not None:
        macro_ci = M.ci_pair(M.percentile_ci(boot.aucs[:, valid].mean(axis=1), cfg.ci_level))
    return {
        "macro_auc": macro,
        "macro_auc_ci_bootstrap": macro_ci,
        "micro_auc": float(roc_auc_score(Y.ravel(), p.scores.ravel())),
        "micro_auc_note": "pooled over (case, class) pairs, which are not independent; no CI",
    }


def _ovr_metrics(
    p: Predictions, Y: np.ndarray, strata: np.ndarray, cfg: EvaluateConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-class one-vs-rest AUCs with DeLong and bootstrap CIs; Y is (n, K) bool."""
    boot = (
        M.bootstrap_auc(Y.T, p.scores.T, cfg.n_boot, cfg.seed, strata=strata)
        if cfg.n_boot > 0
        else None
    )
    per: dict[str, Any] = {}
    curves: dict[str, Any] = {"roc": {}, "roc_band": {}, "pr": {}}
    for k, name in enumerate(p.names):
        yk, sk = Y[:, k], p.scores[:, k]
        per[name] = _ovr_class(yk, sk, k, boot, cfg)
        if per[name]["auc"] is None:
            continue
        c = M.curve(yk, sk)
        curves["roc"][name] = c.roc()
        curves["pr"][name] = c.pr()
        curves["roc_band"][name] = _roc_band(boot, k, cfg.ci_level)
    summary = _macro_summary(p, Y, per, boot, cfg)
    return per, {"summary": summary, "curves": curves}


def _evaluate_multiclass(p: Predictions, cfg: EvaluateConfig) -> dict[str, Any]:
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    K = len(p.names)
    Y = np.eye(K, dtype=bool)[p.y]
    per, extra = _ovr_metrics(p, Y, p.y, cfg)
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
            "subgroups": macro_subgroups(p, Y),
            "headline": _macro_headline("macro one-vs-rest", extra, cfg),
            "curves": extra["curves"],
        }
    )
    return out


def _evaluate_multilabel(p: Predictions, cfg: EvaluateConfig) -> dict[str, Any]:
    Y = p.y
    patterns = np.array(["".join("1" if b else "0" for b in row) for row in Y])
    per, extra = _ovr_metrics(p, Y, patterns, cfg)
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
            "subgroups": macro_subgroups(p, Y),
            "headline": _macro_headline("macro over labels", extra, cfg),
            "curves": extra["curves"],
        }
    )
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
