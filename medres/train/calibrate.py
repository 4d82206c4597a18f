"""Post-training calibration on the validation split: a temperature and an operating threshold.

After training, ``medres train`` predicts the validation split with the selected weights
and fits, on those logits:

* **Temperature scaling** (Guo et al., 2017) for binary and multi-class models: one scalar
  ``T`` with ``p = softmax(z / T)``, minimising the validation negative log-likelihood
  (unweighted, whatever the training loss weights were) with L-BFGS over ``log T`` in
  float64, bounded to ``[0.05, 20]``. Scaling by one positive scalar never changes the
  ranking (AUC) or the argmax, only the confidence. A weak prior on ``log T`` keeps a
  separable validation split from driving ``T`` to its lower bound. Multi-label models keep ``T = 1``
  (not calibrated), as do runs whose validation split has fewer than two classes.
* **The operating threshold** (binary) on the calibrated validation probability of the
  positive class, by :class:`ThresholdRule`: ``youden`` (default: maximise
  sensitivity + specificity - 1), ``sensitivity:0.9`` (the best specificity that keeps
  validation sensitivity >= 0.9), ``specificity:0.9`` (the best sensitivity that keeps
  specificity >= 0.9) or ``fixed`` (``eval.threshold``). The candidates and the exact
  integer comparisons are :func:`medres.stats.rule_index`, the same function
  :func:`medres.evaluate.metrics.operating_points` uses (a case is positive when
  ``p >= threshold``; among ties the highest threshold). The stored threshold is then
  moved halfway down to the next lower validation score, which leaves every validation
  count unchanged and keeps a margin for unseen cases instead of sitting on one
  validation case's score.

Both go into ``model.json`` (``temperature``, ``threshold``, ``threshold_rule``,
``calibration``); ``medres score`` and the predictions CSVs apply them. Owns
:class:`ThresholdRule`, :class:`Calibration` and the fits; imports numpy, torch (lazily)
``medres.errors`` and ``medres.stats`` only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from medres.errors import ConfigError
from medres.stats import curve, ece, rule_index

log = logging.getLogger(__name__)

__all__ = [
    "T_BOUNDS",
    "Calibration",
    "ThresholdRule",
    "apply_temperature",
    "choose_threshold",
    "ece",
    "fit_calibration",
    "fit_shift",
    "fit_temperature",
    "nll",
    "parse_threshold_rule",
]

T_BOUNDS = (0.05, 20.0)
RULES = ("youden", "sensitivity:R", "specificity:R", "fixed")


@dataclass(frozen=True)
class ThresholdRule:
    """How the binary operating threshold is chosen on validation (see the module docs)."""

    kind: str  # youden | sensitivity | specificity | fixed
    target: float | None = None  # the rate for sensitivity/specificity
    fixed: float = 0.5  # the threshold of ``fixed``

    def __str__(self) -> str:
        if self.kind in ("sensitivity", "specificity"):
            return f"{self.kind}:{self.target:g}"
        return "fixed" if self.kind == "fixed" else "youden"


def parse_threshold_rule(text: str, fixed: float = 0.5) -> ThresholdRule:
    """``youden`` | ``sensitivity:0.9`` | ``specificity:0.9`` | ``fixed`` -> a rule."""
    raw = str(text).strip().lower()
    how = f"use one of {', '.join(RULES)} with R in (0, 1], e.g. sensitivity:0.9"
    if raw in ("youden", "fixed"):
        return ThresholdRule(raw, None, float(fixed))
    kind, _, value = raw.partition(":")
    if kind in ("sensitivity", "specificity"):
        try:
            target = float(value)
        except ValueError:
            target = float("nan")
        if 0.0 < target <= 1.0:
            return ThresholdRule(kind, target, float(fixed))
    raise ConfigError(f"eval.threshold_rule (--threshold-rule) is {text!r}; {how}")


# ------------------------------------------------------------------------------- temperature
def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def apply_temperature(logits: np.ndarray, temperature: float, task: str) -> np.ndarray:
    """Probabilities of ``logits / T``: sigmoid for multilabel, else softmax (float64)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if task == "multilabel":
        return 1.0 / (1.0 + np.exp(-z))
    return np.exp(_log_softmax(z))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of integer ``labels`` under ``softmax(logits / T)``."""
    lp = _log_softmax(np.asarray(logits, dtype=np.float64) / float(temperature))
    return float(-np.mean(lp[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]))


def _objective(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
    """Mean NLL plus the weak prior on log T (see :func:`fit_temperature`)."""
    return nll(logits, labels, t) + math.log(t) ** 2 / (2.0 * max(len(labels), 1))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of ``labels`` (L-BFGS on log T, bounded).

    The objective is the mean NLL plus ``(log T)^2 / (2 n)``: a standard-normal prior on
    ``log T`` (a MAP estimate). It is negligible unless the validation cases are (nearly)
    separated, where the plain NLL keeps falling as ``T -> 0`` and would make every
    probability 0 or 1 on the strength of a few dozen cases.
    """
    import torch

    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    lo, hi = math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        lt = log_t.clamp(lo, hi)
        loss = torch.nn.functional.cross_entropy(z / lt.exp(), y) + lt**2 / (2.0 * len(y))
        loss.backward()
        return loss

    opt.step(closure)
    t = float(math.exp(min(max(float(log_t.detach()), lo), hi)))
    # L-BFGS may stop on a flat stretch: never return a temperature worse than T = 1
    return t if _objective(logits, labels, t) <= _objective(logits, labels, 1.0) else 1.0


def fit_shift(logits: np.ndarray, labels: np.ndarray, prior_sd: float = 10.0) -> np.ndarray:
    """The per-class logit shift ``c`` minimising the NLL of ``softmax(z + c)`` (L-BFGS,
    float64), with a weak ``N(0, prior_sd^2)`` prior on each entry; zeros when ``labels``
    hold fewer than two classes. The scale is left alone, so on (nearly) separated cases
    the minimum stays finite; ``softmax`` ignores a common shift, which the prior pins.
    Used to align the offsets of cross-validation members (:mod:`medres.train.folds`)."""
    import torch

    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if len(y) == 0 or len(torch.unique(y)) < 2:
        return np.zeros(z.shape[1] if z.ndim == 2 else 0)
    c = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([c], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")
    scale = 2.0 * prior_sd**2 * len(y)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z + c, y) + (c**2).sum() / scale
        loss.backward()
        return loss

    opt.step(closure)
    return c.detach().numpy().copy()


# --------------------------------------------------------------------------------- threshold
def choose_threshold(y: np.ndarray, score: np.ndarray, rule: ThresholdRule) -> float:
    """The operating threshold of ``rule`` on (``y`` boolean, ``score``); see the module docs."""
    if rule.kind == "fixed":
        return float(rule.fixed)
    c = curve(y, np.asarray(score, dtype=np.float64))
    if c.n_positive == 0 or c.n_negative == 0:
        log.warning("threshold: validation has one class only; using %g", rule.fixed)
        return float(rule.fixed)
    k = rule_index(c, rule.kind, rule.target)
    if k < 0:
        return c.above
    thr = c.thresholds
    lower = thr[k + 1] if k + 1 < len(thr) else 0.0  # the next lower score (or 0)
    return float((thr[k] + lower) / 2.0)


# ------------------------------------------------------------------------------------- fit
@dataclass(frozen=True)
class Calibration:
    """What :func:`fit_calibration` found on validation (stored in model.json)."""

    temperature: float
    threshold: float | None  # binary: on the calibrated positive probability; else None
    rule: str
    stats: dict[str, Any]


def _calibration_ece(probs: np.ndarray, labels: np.ndarray, task: str, pos: int) -> float:
    """Binary: ECE of the positive probability; multi-class: top-label ECE."""
    if task == "binary":
        return ece(labels == pos, probs[:, pos])
    return ece(probs.argmax(axis=1) == labels, probs.max(axis=1))


def fit_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    task: str,
    positive_index: int,
    rule: ThresholdRule,
    enabled: bool = True,
) -> Calibration:
    """Temperature (binary/multi-class, when ``enabled``) then the binary threshold."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    stats: dict[str, Any] = {"n": len(y), "split": "val"}
    if task == "multilabel" or len(y) == 0:
        return Calibration(1.0, None, str(rule), {**stats, "method": "none"})
    y = y.astype(np.int64)
    t = 1.0
    if enabled and len(np.unique(y)) >= 2:
        t = fit_temperature(z, y)
        stats["method"] = "temperature scaling (L-BFGS on the validation NLL)"
    else:
        stats["method"] = "none" if not enabled else "none (one class in validation)"
    before, after = apply_temperature(z, 1.0, task), apply_temperature(z, t, task)
    stats.update(
        nll_before=nll(z, y, 1.0),
        nll_after=nll(z, y, t),
        ece_before=_calibration_ece(before, y, task, positive_index),
        ece_after=_calibration_ece(after, y, task, positive_index),
    )
    threshold = None
    if task == "binary":
        threshold = choose_threshold(y == positive_index, after[:, positive_index], rule)
    log.info(
        "calibration on %d validation cases: T = %.4g (NLL %.4f -> %.4f, ECE %.4f -> %.4f)%s",
        len(y), t, stats["nll_before"], stats["nll_after"], stats["ece_before"],
        stats["ece_after"], "" if threshold is None else f", threshold {threshold:.4g} ({rule})",
    )  # fmt: skip
    return Calibration(t, threshold, str(rule), stats)
