"""What ``medres train`` fixed on validation, measured on the evaluated split.

A run dir's ``model/model.json`` records a temperature (``softmax(logits / T)``) and, for
binary models, an operating threshold chosen on the validation split (see
:mod:`medres.train.calibrate`). The predictions CSVs hold the temperature-scaled
probabilities. For a binary run dir this module adds to the evaluated model's block:

* ``validation_threshold``: the stored threshold applied to these cases, with its
  sensitivity, specificity, PPV, NPV and Wilson CIs. It was chosen without these cases,
  so it is the honest operating point; the ``operating_points`` chosen on the evaluated
  cases themselves are optimistic.
* ``calibration_before``: Brier and ECE of the probabilities *before* temperature scaling,
  recovered exactly from the scaled ones (``logit p_raw = T logit p``), next to the
  block's ``brier``/``ece`` (after scaling), plus a reliability curve for the report.

Imports numpy, :mod:`medres.evaluate.metrics` and :mod:`medres.models.modeldir` (no torch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medres.errors import ModelError
from medres.evaluate import metrics as M
from medres.models.modeldir import read_model_meta, thaw

log = logging.getLogger(__name__)

__all__ = ["RunCalibration", "before_scaling", "read_run_calibration", "validation_threshold"]


@dataclass(frozen=True)
class RunCalibration:
    """The validation-fitted temperature and threshold of a run's model.json."""

    temperature: float
    threshold: float | None
    rule: str | None
    stats: dict[str, Any]


def read_run_calibration(target: Path) -> RunCalibration | None:
    """The calibration of ``target``'s model.json (a run dir), or None (a CSV, an old run)."""
    if not Path(target).is_dir():
        return None
    try:
        meta = read_model_meta(target)
    except ModelError as exc:
        log.debug("no calibration read from %s (%s)", target, exc)
        return None
    if meta.temperature is None and meta.threshold_rule is None:
        return None  # written before calibration existed: nothing was chosen on validation
    return RunCalibration(
        meta.effective_temperature,
        meta.threshold if meta.threshold_rule else None,
        meta.threshold_rule,
        thaw(meta.calibration),
    )


def validation_threshold(
    y: np.ndarray, s: np.ndarray, cal: RunCalibration, level: float
) -> dict[str, Any]:
    """The stored (validation-chosen) threshold measured on these cases."""
    if cal.threshold is None:
        raise ValueError("this run's model.json holds no validation-chosen threshold")
    tp, fp, tn, fn = M.confusion_at(y, s, cal.threshold)
    return {
        "threshold": cal.threshold,
        "rule": "score >= threshold",
        "chosen_on": "validation",
        "threshold_rule": cal.rule,
        **M.rates(tp, fp, tn, fn, level),
    }


def _uncalibrated(s: np.ndarray, temperature: float) -> np.ndarray:
    p = np.clip(np.asarray(s, dtype=np.float64), 1e-15, 1 - 1e-15)
    z = (np.log(p) - np.log1p(-p)) * temperature
    return 1.0 / (1.0 + np.exp(-z))


def before_scaling(
    y: np.ndarray, s: np.ndarray, cal: RunCalibration, n_bins: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(Brier/ECE before temperature scaling, its reliability bins) of scaled probs ``s``."""
    raw = _uncalibrated(s, cal.temperature)
    block = {
        "temperature": cal.temperature,
        "brier": M.brier(y, raw),
        "ece": M.ece(y, raw, n_bins, "uniform"),
        "ece_adaptive": M.ece(y, raw, n_bins, "quantile"),
        "validation": cal.stats or None,
    }
    return block, M.reliability(y, raw, n_bins)
