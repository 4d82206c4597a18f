"""Checkpoint selection: which validation candidate is the best so far (see ``engine``).

A candidate is the live or the EMA weights after an epoch, with its validation AUC and
loss. :func:`is_better` is the rule documented in :mod:`medres.train.engine` (AUC first,
the loss as tie-break within ``auc_tolerance``; the lowest loss for ``metric=loss``);
:func:`select_best` folds one epoch's candidates into the engine state. Pure Python.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["is_better", "select_best", "selection_score"]


def selection_score(metric: str, ev: Any) -> float:
    """Higher is better: the AUC, or minus the loss (also when the AUC is undefined)."""
    if metric == "auc" and not math.isnan(ev.metric):
        return ev.metric
    return -ev.loss


def is_better(
    state: Any, auc: float, loss: float, *, metric: str = "auc", tol: float = 0.005
) -> bool:
    """Whether a candidate with validation ``auc``/``loss`` beats ``state``'s best.

    ``state.max_auc`` must already include the candidate's AUC. The rule is in the module
    docs; NaN losses never win, and a defined AUC beats an undefined one.
    """
    have_best = not (math.isnan(state.best_auc) and math.isnan(state.best_loss))
    if not have_best:
        return not (math.isnan(auc) and math.isnan(loss))
    if metric == "auc" and not math.isnan(auc):
        if math.isnan(state.best_auc):
            return True
        if auc > state.best_auc + tol:
            return True
        return auc >= state.max_auc - tol and loss < state.best_loss
    if metric == "auc" and not math.isnan(state.best_auc):
        return False  # an undefined AUC never replaces a defined one
    return not math.isnan(loss) and (math.isnan(state.best_loss) or loss < state.best_loss)


def select_best(state: Any, candidates: list[tuple[str, Any]], metric: str, tol: float) -> bool:
    """Fold this epoch's candidates into ``state``'s best; True when one became the best."""
    improved = False
    for source, ev in candidates:
        if not math.isnan(ev.metric):
            state.max_auc = (
                ev.metric if math.isnan(state.max_auc) else max(state.max_auc, ev.metric)
            )
        if is_better(state, ev.metric, ev.loss, metric=metric, tol=tol):
            state.best_auc, state.best_loss, state.best_source = ev.metric, ev.loss, source
            state.best_metric = selection_score(metric, ev)
            improved = True
    return improved
