"""Classification metrics with confidence intervals: ROC/AUC, DeLong, bootstrap, calibration.

Pure numpy functions on arrays; no file I/O (``medres.evaluate.inputs`` reads inputs,
``medres.evaluate.evaluate`` writes ``metrics.json``). May import: numpy and the standard
library only (scikit-learn stays in the evaluators and the tests). The statistical
choices, so that a reviewer can check them against the references:

* **AUC** is the Mann-Whitney statistic ``U / (n1 n0)`` with tied positive/negative pairs
  counting 1/2, computed from the exact rank sum (one rounding: exactly 1.0 or 0.0 under
  perfect separation). It equals ``sklearn.metrics.roc_auc_score`` and the trapezoidal area under
  the empirical ROC curve.
* **ROC points** sit at every unique score value; a case is called positive when
  ``score >= threshold``. Tied scores therefore move the curve diagonally, never through
  an order-dependent staircase.
* **DeLong variance** uses the fast midrank algorithm of Sun & Xu (2014, IEEE Signal
  Processing Letters 21:1389), O(k n log n) for k score columns: the placement values
  (structural components) come from midranks (:func:`midranks`, equal to
  ``scipy.stats.rankdata(method="average")``) within positives, within negatives and
  overall, so ties get the Mann-Whitney 1/2. Covariances use ``ddof=1`` as in DeLong et
  al. (1988) and pROC.
* **DeLong CI** default: on the AUC scale, ``AUC +/- z sqrt(V)`` clipped to [0, 1], which is
  what pROC's ``ci.auc(method="delong")`` reports. Under perfect separation the variance
  is 0 and the interval is [1, 1] (or [0, 0]); it is ``None`` (never NaN) when a class has
  fewer than 2 cases. ``transform="logit"`` builds the interval
  on ``logit(AUC)`` with the delta-method SE ``sqrt(V) / (AUC (1 - AUC))`` and maps it back;
  it stays inside (0, 1) and is better behaved near 1 with small samples.
* **Paired DeLong test** for two score columns on the same cases:
  ``z = (A1 - A2) / sqrt(V1 + V2 - 2 Cov12)``, two-sided normal p-value from the survival
  function (``erfc``, so a large ``|z|`` gives a tiny positive p, not 0); the CI of the
  difference is ``(A1 - A2) +/- z sqrt(Var)`` (not clipped), as pROC's ``roc.test``.
* **Bootstrap**: stratified (positives and negatives, or each class, resampled separately
  so every replicate keeps the observed class counts), seeded (``numpy.random.default_rng``),
  percentile CI. It is vectorised: a replicate is a row of multiplicity weights, and the
  weighted ROC counts of all replicates come from one cumulative sum over the cases
  sorted by score. Replicates are shared by all score columns, so bootstrap differences
  are paired.
* **Proportions** (sensitivity, specificity, PPV, NPV, accuracy) get Wilson score
  intervals; a proportion with an empty denominator is ``None``, never NaN.
* **Calibration** (Brier, ECE, reliability diagram) is computed only for scores inside
  [0, 1]; other scores (an ordinal reader rating, logits) are ranked but not calibrated.
  ECE uses equal-width bins ``[0, 1/B), ..., [(B-1)/B, 1]`` weighted by bin size (Naeini
  et al. 2015; Guo et al. 2017); the adaptive (equal-mass) ECE is reported alongside.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from medres.stats import Curve as Curve  # re-exported: callers use metrics.Curve
from medres.stats import curve, rule_index, sorted_groups
from medres.stats import ece as ece  # re-exported: callers use metrics.ece

log = logging.getLogger(__name__)

CI_TRANSFORMS = ("none", "logit")

# Cap on the number of float64 cells (replicates x cases) handled at once by the bootstrap.
_BOOT_CELLS = 2_000_000


def z_value(level: float) -> float:
    """Two-sided standard-normal quantile for a confidence ``level`` (0.95 -> 1.959964)."""
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------
# AUC and DeLong
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeLong:
    """AUCs of k score columns on the same cases and their DeLong covariance matrix."""

    aucs: np.ndarray  # (k,)
    cov: np.ndarray  # (k, k); NaN when a class has fewer than 2 cases
    n_positive: int
    n_negative: int

    def var(self, i: int = 0) -> float:
        return float(self.cov[i, i])


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count 1/2); raises ValueError when a class is absent."""
    return float(delong(score, y).aucs[0])


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank, along the last axis (O(n log n)).

    Same result as ``scipy.stats.rankdata(x, method="average", axis=-1)``; written here
    (Sun & Xu's ``compute_midrank``, vectorised) to keep ``scipy.stats``, slow to import,
    out of the CLI start-up.
    """
    a = np.asarray(x, dtype=float)
    flat = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
    out = np.empty(flat.shape)
    for i, row in enumerate(flat):
        order = np.argsort(row, kind="mergesort")
        s = row[order]
        starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
        ends = np.r_[starts[1:], s.size]
        out[i, order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return out.reshape(a.shape)


def delong(scores: np.ndarray, y: np.ndarray) -> DeLong:
    """Fast DeLong (Sun & Xu 2014): AUCs and covariance for ``scores`` of shape (k, n) or (n,).

    ``y`` is boolean (True = positive). Placement values use midranks, so ties are
    handled exactly as in the Mann-Whitney statistic.
    """
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    yb = np.asarray(y, dtype=bool)
    if s.shape[1] != yb.shape[0]:
        raise ValueError(f"scores have {s.shape[1]} cases but labels {yb.shape[0]}")
    x_pos, x_neg = s[:, yb], s[:, ~yb]
    m, n = x_pos.shape[1], x_neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError("AUC needs at least one positive and one negative case")
    tx = midranks(x_pos)
    ty = midranks(x_neg)
    tz = midranks(np.concatenate([x_pos, x_neg], axis=1))
    # U = wins + ties / 2 from the rank sum; midranks are half-integers, so the sum and U are
    # exact and one division gives the correctly rounded AUC (exactly 1.0 / 0.0 when separated)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    # structural components: share of negatives below each positive (ties 1/2) and
    # share of positives above each negative (ties 1/2)
    v_pos = (tz[:, :m] - tx) / n
    v_neg = 1.0 - (tz[:, m:] - ty) / m
    k = s.shape[0]
    if m < 2 or n < 2:
        cov = np.full((k, k), np.nan)
    else:
        cov = np.cov(v_pos, ddof=1).reshape(k, k) / m + np.cov(v_neg, ddof=1).reshape(k, k) / n
    return DeLong(aucs=aucs, cov=cov, n_positive=m, n_negative=n)


def auc_ci(
    auc_value: float, var: float, level: float = 0.95, transform: str = "none"
) -> tuple[float, float] | None:
    """Normal-approximation CI for an AUC with variance ``var``; ``None`` if ``var`` is NaN.

    ``transform="none"``: ``AUC +/- z sqrt(var)`` clipped to [0, 1] (pROC's DeLong CI).
    ``transform="logit"``: the interval is built on ``logit(AUC)`` and mapped back; for an
    AUC of exactly 0 or 1 the logit is infinite and the (degenerate) interval is [AUC, AUC].
    """
    if transform not in CI_TRANSFORMS:
        raise ValueError(f"unknown CI transform {transform!r}; known: {', '.join(CI_TRANSFORMS)}")
    if not math.isfinite(var):
        return None
    se = math.sqrt(max(var, 0.0))
    z = z_value(level)
    if transform == "logit":
        if auc_value <= 0.0 or auc_value >= 1.0:
            return (float(auc_value), float(auc_value))
        lg = math.log(auc_value / (1.0 - auc_value))
        se_l = se / (auc_value * (1.0 - auc_value))
        return (_expit(lg - z * se_l), _expit(lg + z * se_l))
    return (float(max(0.0, auc_value - z * se)), float(min(1.0, auc_value + z * se)))


def _expit(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@dataclass(frozen=True)
class PairedTest:
    """Paired DeLong test of two AUCs measured on the same cases."""

    auc_a: float
    auc_b: float
    auc_diff: float
    var_diff: float
    z: float | None
    p_value: float | None
    diff_ci: tuple[float, float] | None


def delong_paired(dl: DeLong, i: int, j: int, level: float = 0.95) -> PairedTest:
    """Test ``AUC_i == AUC_j``: ``z = (A_i - A_j) / sqrt(V_i + V_j - 2 Cov_ij)``, two-sided.

    When the variance of the difference is zero (identical rankings) z is undefined: the
    result has ``z=None`` and ``p_value=1.0`` if the AUCs are equal.
    """
    a, b = float(dl.aucs[i]), float(dl.aucs[j])
    diff = a - b
    var = float(dl.cov[i, i] + dl.cov[j, j] - 2.0 * dl.cov[i, j])
    if not math.isfinite(var):
        return PairedTest(a, b, diff, var, None, None, None)
    var = max(var, 0.0)
    zq = z_value(level)
    ci = (diff - zq * math.sqrt(var), diff + zq * math.sqrt(var))
    if var <= 1e-15:
        p = 1.0 if diff == 0.0 else 0.0  # AUCs are exact: equal U, equal float
        return PairedTest(a, b, diff, var, None, p, ci)
    z = diff / math.sqrt(var)
    return PairedTest(a, b, diff, var, z, two_sided_p(z), ci)


def two_sided_p(z: float) -> float:
    """Two-sided standard-normal p-value ``2 P(Z > |z|)``, via ``erfc`` so that it stays
    positive (and not 0.0) far into the tail: ``1 - cdf`` loses everything past ``|z| ~ 8.3``.
    """
    return math.erfc(abs(z) / math.sqrt(2.0))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (``None`` entries are skipped)."""
    idx = [k for k, p in enumerate(p_values) if p is not None]
    order = sorted(idx, key=lambda k: p_values[k])  # type: ignore[arg-type,return-value]
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    m = len(order)
    for rank, k in enumerate(order):
        adj = min(1.0, (m - rank) * float(p_values[k]))  # type: ignore[arg-type]
        running = max(running, adj)
        out[k] = running
    return out


# ---------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------
def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """AP = sum_k (R_k - R_{k-1}) P_k over unique thresholds (sklearn's definition)."""
    c = curve(y, score)
    prec = c.tp / (c.tp + c.fp)
    rec = c.tp / c.n_positive
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))


# ---------------------------------------------------------------------------------------
# Proportions and operating points
# ---------------------------------------------------------------------------------------
def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval for ``k`` successes out of ``n``; ``None`` when ``n == 0``."""
    if n <= 0:
        return None
    z = z_value(level)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def proportion(k: int, n: int) -> float | None:
    """``k / n``, or ``None`` when ``n == 0`` (never NaN)."""
    return k / n if n > 0 else None


def rates(tp: int, fp: int, tn: int, fn: int, level: float = 0.95) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV and accuracy with Wilson CIs, plus the counts."""
    out: dict[str, Any] = {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}
    for name, k, n in (
        ("sensitivity", tp, tp + fn),
        ("specificity", tn, tn + fp),
        ("ppv", tp, tp + fp),
        ("npv", tn, tn + fn),
        ("accuracy", tp + tn, tp + tn + fp + fn),
    ):
        out[name] = proportion(k, n)
        out[f"{name}_ci"] = wilson(k, n, level)
    return out


def confusion_at(y: np.ndarray, score: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(tp, fp, tn, fn) when ``score >= threshold`` is called positive."""
    yb = np.asarray(y, dtype=bool)
    pred = np.asarray(score, dtype=float) >= threshold
    tp = int(np.sum(pred & yb))
    fp = int(np.sum(pred & ~yb))
    return tp, fp, int(np.sum(~yb)) - fp, int(np.sum(yb)) - tp


def operating_points(
    y: np.ndarray,
    score: np.ndarray,
    *,
    sensitivity_targets: Sequence[float] = (0.90, 0.95),
    specificity_targets: Sequence[float] = (0.90, 0.95),
    threshold: float | None = None,
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Operating points chosen *and measured* on the same data (optimistic by design).

    * ``youden``: the threshold maximising ``sensitivity + specificity - 1``; among exact
      ties the highest threshold (fewest positive calls). The candidates are every unique
      score and a threshold just above every score (all called negative, J = 0), as in
      pROC's ``coords(..., "best")``; J is compared exactly, as the integer
      ``tp * n_negative - fp * n_positive``.
    * ``sensitivity_0.90``: the highest threshold whose sensitivity is >= 0.90, i.e. the
      best specificity that keeps the target sensitivity.
    * ``specificity_0.90``: the lowest threshold whose specificity is >= 0.90 (best
      sensitivity at the target). When even the top score gives too many false
      positives, the threshold lies just above every score (all called negative).
    * ``user``: the given ``threshold``.

    Targets are read as the decimals they print as (0.9 is 9/10) and compared with the
    integer counts exactly, never through a float tolerance. Every point reports its
    threshold, the rule ``score >= threshold``, the counts, sensitivity/specificity/PPV/
    NPV/accuracy and their Wilson CIs.
    """
    yb = np.asarray(y, dtype=bool)
    s = np.asarray(score, dtype=float)
    c = curve(yb, s)
    chosen: dict[str, tuple[float, float | None]] = {}

    def at(k: int) -> float:
        return c.above if k < 0 else float(c.thresholds[k])

    chosen["youden"] = (at(rule_index(c, "youden")), None)
    for t in sensitivity_targets:
        chosen[f"sensitivity_{t:.2f}"] = (at(rule_index(c, "sensitivity", t)), float(t))
    for t in specificity_targets:
        chosen[f"specificity_{t:.2f}"] = (at(rule_index(c, "specificity", t)), float(t))
    if threshold is not None:
        chosen["user"] = (float(threshold), None)
    out: dict[str, dict[str, Any]] = {}
    for name, (t_value, target) in chosen.items():
        tp, fp, tn, fn = confusion_at(yb, s, t_value)
        point: dict[str, Any] = {"threshold": t_value, "rule": "score >= threshold"}
        if target is not None:
            point["target"] = target
        point.update(rates(tp, fp, tn, fn, level))
        out[name] = point
    return out


# ---------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------
def is_probability(score: np.ndarray) -> bool:
    """True when every score lies in [0, 1] (calibration metrics make sense)."""
    s = np.asarray(score, dtype=float)
    return bool(s.size and np.all((s >= 0.0) & (s <= 1.0)))


def brier(y: np.ndarray, prob: np.ndarray) -> float:
    """Mean squared difference between the probability and the 0/1 outcome."""
    return float(np.mean((np.asarray(prob, float) - np.asarray(y, float)) ** 2))


def reliability(y: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width bins on [0, 1] (the last bin includes 1.0): count, mean prob, observed rate."""
    p = np.asarray(prob, float)
    yv = np.asarray(y, float)
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    bins = []
    for b in range(n_bins):
        m = idx == b
        n_b = int(m.sum())
        bins.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "n": n_b,
                "mean_predicted": float(p[m].mean()) if n_b else None,
                "observed": float(yv[m].mean()) if n_b else None,
                "observed_ci": wilson(int(yv[m].sum()), n_b),
            }
        )
    return bins


# ---------------------------------------------------------------------------------------
# Vectorised stratified bootstrap
# ---------------------------------------------------------------------------------------
def bootstrap_weights(strata: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield blocks of multiplicity weights (replicates x cases), resampled within strata.

    Each replicate draws, for every stratum, as many cases with replacement as the
    stratum holds; weight = how often a case was drawn. Blocks keep replicates x cases
    under ~2 million cells; the block size depends on n only, so the draws depend only on
    ``seed`` and the data.
    """
    strata = np.asarray(strata)
    n = strata.shape[0]
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == v) for v in np.unique(strata)]
    block = max(1, min(n_boot, _BOOT_CELLS // max(n, 1)))
    done = 0
    while done < n_boot:
        b = min(block, n_boot - done)
        w = np.zeros((b, n))
        rows = np.arange(b)[:, None]
        for g in groups:
            draws = rng.integers(0, g.size, size=(b, g.size))
            counts = np.bincount((draws + rows * g.size).ravel(), minlength=b * g.size)
            w[:, g] = counts.reshape(b, g.size)
        done += b
        yield w


def weighted_counts(
    w: np.ndarray, y: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted cumulative (tp, fp) at every unique score, descending, for each weight row."""
    yb = np.asarray(y, dtype=bool)
    order, ends, thr = sorted_groups(np.asarray(score, float))
    ws = w[:, order]
    pos = yb[order]
    tp = np.cumsum(ws * pos, axis=1)[:, ends]
    fp = np.cumsum(ws * ~pos, axis=1)[:, ends]
    return tp, fp, thr


def auc_from_counts(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC (ties 1/2) per row from cumulative counts at descending thresholds."""
    p_tot = tp[:, -1]
    n_tot = fp[:, -1]
    dtp = np.diff(tp, axis=1, prepend=0.0)
    dfp = np.diff(fp, axis=1, prepend=0.0)
    tp_prev = tp - dtp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(dfp * (tp_prev + 0.5 * dtp), axis=1) / (p_tot * n_tot)


@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap replicates of the AUC of k score columns (paired: same resamples)."""

    aucs: np.ndarray  # (n_boot, k)
    fpr_grid: np.ndarray  # (g,)
    tpr_at_grid: np.ndarray  # (n_boot, k, g): ROC sensitivity at each 1 - specificity


def bootstrap_auc(
    y: np.ndarray,
    scores: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    strata: np.ndarray | None = None,
    grid_points: int = 101,
) -> Bootstrap:
    """Stratified bootstrap of the AUC (and ROC sensitivity on an FPR grid) for (k, n) scores.

    ``y`` is boolean, shape (n,) shared by all score rows or (k, n) with one label row per
    score row (one-vs-rest classes, multi-label). ``strata`` defaults to ``y`` (positives
    and negatives resampled separately); the multi-class code passes the class index so
    every class keeps its count.
    """
    s = np.atleast_2d(np.asarray(scores, float))
    k = s.shape[0]
    yb = np.asarray(y, dtype=bool)
    if strata is None:
        if yb.ndim != 1:
            raise ValueError("pass strata when labels differ per score row")
        strata = yb
    ys = np.broadcast_to(yb, s.shape)
    grid = np.linspace(0.0, 1.0, grid_points)
    aucs = np.empty((n_boot, k))
    tpr_grid = np.empty((n_boot, k, grid_points))
    start = 0
    for w in bootstrap_weights(strata, n_boot, seed):
        b = w.shape[0]
        for c in range(k):
            tp, fp, _ = weighted_counts(w, ys[c], s[c])
            aucs[start : start + b, c] = auc_from_counts(tp, fp)
            tpr_grid[start : start + b, c] = _tpr_on_grid(tp, fp, grid)
        start += b
    return Bootstrap(aucs=aucs, fpr_grid=grid, tpr_at_grid=tpr_grid)


def _tpr_on_grid(tp: np.ndarray, fp: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Sensitivity at each FPR of ``grid`` (the highest ROC point with FPR <= grid value)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp / tp[:, -1:]
        fpr = fp / fp[:, -1:]
    out = np.empty((tp.shape[0], grid.size))
    for r in range(tp.shape[0]):
        k = np.searchsorted(fpr[r], grid + 1e-12, side="right") - 1
        out[r] = np.where(k >= 0, tpr[r][np.maximum(k, 0)], 0.0)
    return out


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of finite bootstrap ``samples``; ``None`` when none is finite."""
    v = np.asarray(samples, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    lo, hi = np.quantile(v, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def ci_pair(ci: tuple[float, float] | None) -> list[float] | None:
    """A CI as metrics.json writes it: ``[lo, hi]`` floats, or ``None``."""
    return None if ci is None else [float(ci[0]), float(ci[1])]
