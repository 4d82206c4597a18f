"""Paired comparisons of score columns on the same cases: DeLong test, bootstrap CI, Holm.

Owns the ``comparisons`` list of a binary metrics.json. May import:
:mod:`medres.evaluate.metrics` and :mod:`medres.evaluate.config`.
"""

from __future__ import annotations

import itertools
from typing import Any

from medres.evaluate import metrics as M
from medres.evaluate.config import EvaluateConfig


def compare_all(
    names: tuple[str, ...], dl: M.DeLong, boot: M.Bootstrap | None, cfg: EvaluateConfig
) -> list[dict[str, Any]]:
    """Every pair of score columns: AUC difference, paired DeLong z / p, Holm-adjusted p."""
    out = [
        _compare(names, i, j, dl, boot, cfg)
        for i, j in itertools.combinations(range(len(names)), 2)
    ]
    for row, adj in zip(out, M.holm([r["p_value"] for r in out]), strict=True):
        row["p_value_holm"] = adj
    return out


def _compare(
    names: tuple[str, ...],
    i: int,
    j: int,
    dl: M.DeLong,
    boot: M.Bootstrap | None,
    cfg: EvaluateConfig,
) -> dict[str, Any]:
    t = M.delong_paired(dl, i, j, cfg.ci_level)
    return {
        "a": names[i],
        "b": names[j],
        "method": "delong_paired",
        "auc_a": t.auc_a,
        "auc_b": t.auc_b,
        "auc_diff": t.auc_diff,
        "z": t.z,
        "p_value": t.p_value,
        "diff_ci": M.ci_pair(t.diff_ci),
        "diff_ci_bootstrap": None
        if boot is None
        else M.ci_pair(M.percentile_ci(boot.aucs[:, i] - boot.aucs[:, j], cfg.ci_level)),
    }
