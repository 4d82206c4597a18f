"""Metrics within subgroups (the ``--by`` columns): AUC per score, or macro AUC per value.

Owns the ``subgroups`` block of metrics.json. The subgroup value of each row (quartile
bins for numeric columns) is read by :mod:`medres.evaluate.inputs`. May import:
:mod:`medres.evaluate.metrics`, :mod:`medres.evaluate.config` and
:mod:`medres.evaluate.inputs`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medres.evaluate import metrics as M
from medres.evaluate.config import EvaluateConfig
from medres.evaluate.inputs import Predictions


def binary_subgroups(p: Predictions, cfg: EvaluateConfig) -> dict[str, list[dict[str, Any]]]:
    """Per ``--by`` column and value: n, positives and each score's AUC with its DeLong CI."""
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
            "auc_ci": M.ci_pair(
                M.auc_ci(float(dl.aucs[i]), dl.var(i), cfg.ci_level, cfg.ci_transform)
            ),
        }
        for i in range(S.shape[0])
    ]


def macro_subgroups(p: Predictions, Y: np.ndarray) -> dict[str, list[dict[str, Any]]]:
    """Per ``--by`` column and value: macro one-vs-rest AUC over the classes scorable there."""
    out: dict[str, list[dict[str, Any]]] = {}
    for col, values in p.groups.items():
        arr = np.array(values, dtype=object)
        rows = []
        for v in sorted(set(values)):
            m = arr == v
            aucs = _scorable_aucs(p.scores[m], Y[m])
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


def _scorable_aucs(scores: np.ndarray, Y: np.ndarray) -> list[float]:
    """AUC of each column of ``Y`` that holds both classes."""
    aucs = []
    for k in range(Y.shape[1]):
        yk = Y[:, k]
        if 0 < yk.sum() < yk.size:
            aucs.append(float(M.delong(scores[:, k], yk).aucs[0]))
    return aucs
