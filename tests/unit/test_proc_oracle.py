"""medres.evaluate.metrics against R's pROC (the reference implementation) on small, tied data.

Generates ~150 datasets (integer-rounded scores, so heavy ties within and across classes;
tiny classes with 2-3 positives; perfect and reversed separation; constant scores) and
compares, per dataset, medres's AUC, 95% DeLong CI, Youden operating point and paired
DeLong p-value with pROC's ``auc``, ``ci.auc(method="delong")``,
``coords(..., "best", best.method="youden")`` and ``roc.test(method="delong",
paired=TRUE)``. One Rscript process handles every dataset (data in and results out as
CSV files), so the test takes a few seconds. Skipped, with the reason, when Rscript or
the pROC package is missing (CI installs ``r-cran-proc``).

Conventions: pROC reports thresholds as midpoints between scores (and -Inf / Inf) while
medres reports the score itself with ``score >= threshold``, so operating points are
compared by their (sensitivity, specificity) pair. pROC returns every tied Youden point;
medres documents the highest threshold among exact ties, i.e. the tied point with the
highest specificity.
"""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from medres.evaluate import metrics as M

TOL = 1e-6

_R_SCRIPT = r"""
suppressMessages(library(pROC))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
out <- list(); best <- list()
for (id in unique(d$id)) {
  x <- d[d$id == id, ]
  r1 <- roc(x$y, x$s1, levels = c(0, 1), direction = "<", quiet = TRUE)
  r2 <- roc(x$y, x$s2, levels = c(0, 1), direction = "<", quiet = TRUE)
  ci <- as.numeric(ci.auc(r1, conf.level = 0.95, method = "delong"))
  p <- tryCatch(suppressWarnings(
    roc.test(r1, r2, method = "delong", paired = TRUE)$p.value), error = function(e) NA)
  out[[length(out) + 1]] <- data.frame(id = id, auc1 = as.numeric(auc(r1)),
    lo = ci[1], hi = ci[3], auc2 = as.numeric(auc(r2)), p = p)
  b <- coords(r1, "best", best.method = "youden", ret = c("sensitivity", "specificity"),
              transpose = FALSE)
  a <- coords(r1, "all", ret = c("threshold", "sensitivity", "specificity"), transpose = FALSE)
  best[[length(best) + 1]] <- rbind(
    data.frame(id = id, best = 1, thr = NA, sens = b$sensitivity, spec = b$specificity),
    data.frame(id = id, best = 0, thr = a$threshold, sens = a$sensitivity,
               spec = a$specificity))
}
write.csv(do.call(rbind, out), args[2], row.names = FALSE)
write.csv(do.call(rbind, best), args[3], row.names = FALSE)
"""


def _proc_missing() -> str | None:
    if shutil.which("Rscript") is None:
        return "Rscript is not installed (install R and the pROC package: r-cran-proc)"
    r = subprocess.run(
        ["Rscript", "-e", "library(pROC)"], capture_output=True, text=True, timeout=60
    )
    if r.returncode != 0:
        return "the R package pROC is not installed (apt: r-cran-proc; R: install.packages)"
    return None


def _datasets() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(y, s1, s2) triples; every class has at least 2 cases (DeLong needs 2)."""
    rng = np.random.default_rng(20261202)
    out = []
    for k in range(150):
        kind = k % 5
        if kind == 3:  # perfect separation (or reversed), small and tied within classes
            n_pos, n_neg = int(rng.integers(2, 6)), int(rng.integers(2, 8))
            y = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
            s1 = np.r_[rng.integers(5, 8, n_pos), rng.integers(0, 4, n_neg)].astype(float)
            if k % 2:
                s1 = -s1
            s2 = np.round(s1 + rng.normal(0, 2, y.size))
        else:
            n_pos = int(rng.integers(2, 4)) if kind in (0, 1) else int(rng.integers(4, 20))
            n_neg = int(rng.integers(2, 25))
            y = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
            shift = rng.uniform(-0.5, 2.0)
            s1 = np.round(rng.normal(0, 1, y.size) * 1.5 + shift * y)  # integer scores: ties
            s2 = np.round(s1 + rng.normal(0, 1.5, y.size))
            if kind == 4 and k % 10 == 4:
                s2 = np.full(y.size, 1.0)  # constant score: AUC 0.5, every point tied
        perm = rng.permutation(y.size)
        out.append((y[perm], s1[perm], s2[perm]))
    return out


@pytest.fixture(scope="module")
def proc_results(tmp_path_factory):
    reason = _proc_missing()
    if reason:
        pytest.skip(reason)
    data = _datasets()
    d = tmp_path_factory.mktemp("proc")
    with (d / "data.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "y", "s1", "s2"])
        for i, (y, s1, s2) in enumerate(data):
            for yi, a, b in zip(y.astype(int), s1, s2, strict=True):
                w.writerow([i, int(yi), repr(float(a)), repr(float(b))])
    (d / "proc.R").write_text(_R_SCRIPT)
    r = subprocess.run(
        [
            "Rscript",
            str(d / "proc.R"),
            str(d / "data.csv"),
            str(d / "out.csv"),
            str(d / "best.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {int(row["id"]): row for row in _read(d / "out.csv")}
    best: dict[int, dict[str, list[tuple[float, float]]]] = {}
    for row in _read(d / "best.csv"):
        kind = "best" if row["best"] == "1" else "all"
        point = (float(row["sens"]), float(row["spec"]))
        best.setdefault(int(row["id"]), {"best": [], "all": []})[kind].append(point)
    return data, rows, best


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(text: str) -> float:
    return float("nan") if text in ("NA", "NaN", "") else float(text)


def test_auc_and_delong_ci_match_proc(proc_results):
    data, rows, _ = proc_results
    separated = 0
    for i, (y, s1, s2) in enumerate(data):
        dl = M.delong(np.vstack([s1, s2]), y)
        a1 = float(dl.aucs[0])
        assert a1 == pytest.approx(float(rows[i]["auc1"]), abs=TOL), i
        assert float(dl.aucs[1]) == pytest.approx(float(rows[i]["auc2"]), abs=TOL), i
        lo, hi = M.auc_ci(a1, dl.var(0), 0.95)
        assert (lo, hi) == pytest.approx((float(rows[i]["lo"]), float(rows[i]["hi"])), abs=TOL)
        assert 0.0 <= lo <= a1 <= hi <= 1.0
        if a1 in (0.0, 1.0):  # exact, and the interval collapses instead of going NaN
            separated += 1
            assert (lo, hi) == (a1, a1)
    assert separated >= 25


def test_youden_point_matches_proc_highest_threshold_tie(proc_results):
    """medres's Youden point is pROC's maximum of sens + spec, ties taken as the highest
    threshold. pROC's own ``"best"`` compares sens + spec in floating point, so it drops
    some exact ties (0.2 + 1.0 vs 0.4 + 0.8): the oracle is therefore pROC's full ROC
    point list (``coords(..., "all")``, thresholds descending in specificity) with ties
    taken within 1e-9, and pROC's ``"best"`` must be a subset of those ties.
    """
    data, _, coords = proc_results
    with_ties = proc_dropped = 0
    for i, (y, s1, _) in enumerate(data):
        op = M.operating_points(y, s1)["youden"]
        points = coords[i]["all"]
        j_max = max(se + sp for se, sp in points)
        ties = [(se, sp) for se, sp in points if se + sp > j_max - 1e-9]
        with_ties += len(ties) > 1
        proc_dropped += len(coords[i]["best"]) < len(ties)
        for se, sp in coords[i]["best"]:
            assert se + sp == pytest.approx(j_max, abs=1e-9), i
        top = max(ties, key=lambda t: (t[1], -t[0]))  # highest threshold: highest specificity
        assert (op["sensitivity"], op["specificity"]) == pytest.approx(top, abs=TOL), (i, ties)
    assert with_ties >= 10  # the exact-tie rule is really exercised
    assert proc_dropped >= 1  # and so is pROC's float-tie difference (documented above)


def test_paired_delong_p_value_matches_proc(proc_results):
    data, rows, _ = proc_results
    compared = 0
    for i, (y, s1, s2) in enumerate(data):
        t = M.delong_paired(M.delong(np.vstack([s1, s2]), y), 0, 1, 0.95)
        p_r = _num(rows[i]["p"])
        if t.z is None:  # zero variance of the difference: pROC's z is 0/0 or +-Inf
            assert t.p_value in (0.0, 1.0)
            continue
        assert math.isfinite(p_r), i
        assert t.p_value == pytest.approx(p_r, abs=TOL), i
        assert 0.0 < t.p_value <= 1.0
        compared += 1
    assert compared >= 100
