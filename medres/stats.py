"""Exact empirical ROC counts, rule-based thresholds and ECE: the statistics shared by
``medres.train`` (the validation threshold and calibration stored in ``model.json``) and
``medres.evaluate`` (reported operating points and calibration), so that the threshold a
model was trained with and the one ``medres evaluate`` reports come from one rule.

Pure numpy and the standard library; no I/O. The choices (documented in
:mod:`medres.evaluate.metrics`): a case is positive when ``score >= threshold``; the
candidates are every unique score plus a threshold just above every score (all negative);
targets are read as the decimals they print as and compared with integer counts exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = ["Curve", "curve", "ece", "rule_index", "target_fraction"]

RULE_KINDS = ("youden", "sensitivity", "specificity")


@dataclass(frozen=True)
class Curve:
    """Counts at every unique score (descending); a case is positive when score >= threshold."""

    thresholds: np.ndarray  # (m,) unique scores, descending
    tp: np.ndarray  # (m,) true positives at each threshold
    fp: np.ndarray  # (m,) false positives at each threshold
    n_positive: int
    n_negative: int

    @property
    def tpr(self) -> np.ndarray:
        return self.tp / self.n_positive

    @property
    def fpr(self) -> np.ndarray:
        return self.fp / self.n_negative

    @property
    def above(self) -> float:
        """A threshold just above every score: every case called negative."""
        return float(np.nextafter(self.thresholds[0], np.inf))

    def roc(self) -> dict[str, list[float]]:
        """ROC points from (0, 0) (threshold above every score) to (1, 1)."""
        return {
            "fpr": [0.0, *self.fpr.tolist()],
            "tpr": [0.0, *self.tpr.tolist()],
            "thresholds": [None, *self.thresholds.tolist()],  # None = above every score
        }

    def pr(self) -> dict[str, list[float]]:
        """Precision-recall points at every unique threshold (descending)."""
        prec = self.tp / (self.tp + self.fp)
        return {
            "recall": self.tpr.tolist(),
            "precision": prec.tolist(),
            "thresholds": self.thresholds.tolist(),
        }


def sorted_groups(score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order by descending score, index of the last case of each tie group, unique scores)."""
    order = np.argsort(-score, kind="stable")
    ss = score[order]
    ends = np.flatnonzero(np.r_[ss[1:] != ss[:-1], True])
    return order, ends, ss[ends]


def curve(y: np.ndarray, score: np.ndarray) -> Curve:
    """Empirical ROC/PR counts for boolean ``y`` and numeric ``score``."""
    yb = np.asarray(y, dtype=bool)
    s = np.asarray(score, dtype=float)
    order, ends, thr = sorted_groups(s)
    ys = yb[order]
    tp = np.cumsum(ys)[ends]
    fp = np.cumsum(~ys)[ends]
    return Curve(thr, tp, fp, int(yb.sum()), int((~yb).sum()))


def target_fraction(target: float) -> tuple[int, int]:
    """A target rate as the fraction of the decimal it prints as (0.9 -> (9, 10)).

    The denominator is capped at 10**6 (a 1/3 target typed as 0.3333333333333333 is 1/3),
    which keeps ``count * denominator`` inside int64 for up to 10**12 cases.
    """
    f = Fraction(repr(float(target))).limit_denominator(10**6)
    return f.numerator, f.denominator


def rule_index(c: Curve, kind: str, target: float | None = None) -> int:
    """Index into ``c.thresholds`` of the threshold a rule picks; -1 = above every score.

    * ``youden``: maximal ``sensitivity + specificity - 1``, compared exactly as the integer
      ``tp * n_negative - fp * n_positive``; among exact ties the highest threshold (the
      all-negative threshold, J = 0, is a candidate, as in pROC's ``coords(..., "best")``).
    * ``sensitivity``: the highest threshold whose sensitivity is >= ``target``.
    * ``specificity``: the lowest threshold whose specificity is >= ``target``
      (-1 when even the highest threshold has too many false positives).
    """
    tp, fp = c.tp.astype(np.int64), c.fp.astype(np.int64)
    if kind == "youden":
        j = np.r_[0, tp * c.n_negative - fp * c.n_positive]
        return int(np.argmax(j)) - 1  # the first maximum: the highest threshold among ties
    num, den = target_fraction(1.0 if target is None else target)
    if kind == "sensitivity":
        return int(np.argmax(tp * den >= num * c.n_positive))  # tp reaches n_pos at the end
    if kind == "specificity":
        ok = np.flatnonzero((c.n_negative - fp) * den >= num * c.n_negative)
        return int(ok[-1]) if ok.size else -1
    raise ValueError(f"unknown threshold rule {kind!r}; known: {', '.join(RULE_KINDS)}")


def ece(y: np.ndarray, prob: np.ndarray, n_bins: int = 10, strategy: str = "uniform") -> float:
    """Expected calibration error: sum_b (n_b / n) |mean prob_b - observed rate_b|.

    ``strategy="uniform"``: equal-width bins (the reported ``ece``). ``"quantile"``:
    equal-mass bins over the cases sorted by probability (``ece_adaptive``). NaN when empty.
    """
    p = np.asarray(prob, float)
    yv = np.asarray(y, float)
    n = p.size
    if n == 0:
        return float("nan")
    if strategy == "uniform":
        idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
        sum_p = np.bincount(idx, weights=p, minlength=n_bins)
        sum_y = np.bincount(idx, weights=yv, minlength=n_bins)
        return float(np.sum(np.abs(sum_p - sum_y)) / n)
    if strategy == "quantile":
        order = np.argsort(p, kind="stable")
        return float(
            sum(abs(p[c].sum() - yv[c].sum()) for c in np.array_split(order, n_bins) if c.size) / n
        )
    raise ValueError(f"unknown ECE strategy {strategy!r}; known: uniform, quantile")
