"""medres.evaluate.metrics against sklearn, brute-force O(n^2) DeLong, published values and simulation."""

from __future__ import annotations

import math
import time
from statistics import NormalDist

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score, roc_curve

from medres.evaluate import metrics as M


def _data(n: int, prevalence: float, seed: int, decimals: int | None = 1):
    """Binormal scores, optionally rounded so that many ties occur within and across classes."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prevalence
    y[:2] = [True, False]  # both classes always present
    s = rng.normal(0, 1, n) + 1.0 * y
    return y, (np.round(s, decimals) if decimals is not None else s)


# ---------------------------------------------------------------------------------------
# independent O(n^2) DeLong (DeLong, DeLong & Clarke-Pearson 1988), written from the paper
# ---------------------------------------------------------------------------------------
def _psi(x: float, z: float) -> float:
    return 1.0 if x > z else 0.5 if x == z else 0.0


def _brute_delong(scores: np.ndarray, y: np.ndarray):
    scores = np.atleast_2d(scores)
    k = scores.shape[0]
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    m, n = pos.size, neg.size
    v10 = np.zeros((k, m))  # placement of each positive among negatives
    v01 = np.zeros((k, n))  # placement of each negative among positives
    for r in range(k):
        for a, i in enumerate(pos):
            for b, j in enumerate(neg):
                p = _psi(scores[r, i], scores[r, j])
                v10[r, a] += p / n
                v01[r, b] += p / m
    aucs = v10.mean(axis=1)
    s10 = np.array(
        [
            [np.sum((v10[a] - aucs[a]) * (v10[b] - aucs[b])) / (m - 1) for b in range(k)]
            for a in range(k)
        ]
    )
    s01 = np.array(
        [
            [np.sum((v01[a] - aucs[a]) * (v01[b] - aucs[b])) / (n - 1) for b in range(k)]
            for a in range(k)
        ]
    )
    return aucs, s10 / m + s01 / n


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 50), (2, 4, 9)])
def test_midranks_equal_scipy_average_ranks(shape):
    x = np.round(np.random.default_rng(1).normal(0, 1, shape), 0)  # many ties
    np.testing.assert_array_equal(M.midranks(x), rankdata(x, method="average", axis=-1))


@pytest.mark.parametrize(
    ("n", "prevalence", "decimals"),
    [(50, 0.3, 1), (200, 0.1, 0), (300, 0.5, None), (101, 0.7, 2)],
)
def test_auc_equals_sklearn_with_ties(n, prevalence, decimals):
    y, s = _data(n, prevalence, seed=n, decimals=decimals)
    assert M.auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.delong(s, y).aucs[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_hanley_mcneil_rating_example():
    """Hanley & McNeil (1982), Radiology 143:29, Table 1: 5-point CT ratings, AUC 0.893."""
    neg = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
    pos = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    s = np.r_[neg, pos].astype(float)
    y = np.r_[np.zeros(neg.size, bool), np.ones(pos.size, bool)]
    assert round(M.auc(y, s), 3) == 0.893


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_covariance_matches_bruteforce_with_ties(seed):
    y, s1 = _data(60, 0.4, seed, decimals=0)  # heavy ties
    rng = np.random.default_rng(seed + 10)
    s2 = np.round(s1 + rng.normal(0, 1.0, s1.size), 1)
    s3 = rng.integers(1, 6, s1.size).astype(float) + y  # ordinal rating
    S = np.vstack([s1, s2, s3])
    fast = M.delong(S, y)
    aucs, cov = _brute_delong(S, y)
    np.testing.assert_allclose(fast.aucs, aucs, atol=1e-12)
    np.testing.assert_allclose(fast.cov, cov, rtol=1e-10, atol=1e-14)


def test_paired_test_matches_bruteforce():
    y, s1 = _data(70, 0.35, 7, decimals=1)
    rng = np.random.default_rng(3)
    s2 = np.round(s1 * 0.5 + rng.normal(0, 1, s1.size), 1)
    aucs, cov = _brute_delong(np.vstack([s1, s2]), y)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (aucs[0] - aucs[1]) / math.sqrt(var)
    p = 2 * (1 - NormalDist().cdf(abs(z)))
    t = M.delong_paired(M.delong(np.vstack([s1, s2]), y), 0, 1)
    assert t.z == pytest.approx(z, rel=1e-9)
    assert t.p_value == pytest.approx(p, rel=1e-9)
    half = 1.959963984540054 * math.sqrt(var)
    assert t.diff_ci == pytest.approx((aucs[0] - aucs[1] - half, aucs[0] - aucs[1] + half))
    # antisymmetric in the order of the pair
    r = M.delong_paired(M.delong(np.vstack([s1, s2]), y), 1, 0)
    assert r.z == pytest.approx(-t.z) and r.p_value == pytest.approx(t.p_value)


def test_paired_test_identical_columns_has_no_z():
    y, s = _data(40, 0.5, 1)
    t = M.delong_paired(M.delong(np.vstack([s, s]), y), 0, 1)
    assert t.z is None and t.p_value == 1.0 and t.auc_diff == 0.0


def test_delong_ci_on_auc_scale_clipped_like_proc():
    y, s = _data(80, 0.5, 4, decimals=None)
    dl = M.delong(s, y)
    a, v = float(dl.aucs[0]), dl.var(0)
    lo, hi = M.auc_ci(a, v, 0.95)
    assert lo == pytest.approx(a - 1.959963984540054 * math.sqrt(v))
    assert hi == pytest.approx(a + 1.959963984540054 * math.sqrt(v))
    # near-perfect separation: the AUC-scale interval is clipped at 1, the logit one stays inside
    y2 = np.r_[np.ones(10, bool), np.zeros(10, bool)]
    s2 = np.r_[np.arange(10) + 8.5, np.arange(10)].astype(float)  # one discordant pair
    dl2 = M.delong(s2, y2)
    a2 = float(dl2.aucs[0])
    assert a2 == pytest.approx(0.99)
    assert M.auc_ci(a2, dl2.var(0))[1] == 1.0
    llo, lhi = M.auc_ci(a2, dl2.var(0), transform="logit")
    assert 0 < llo < a2 < lhi < 1
    with pytest.raises(ValueError, match="known: none, logit"):
        M.auc_ci(a2, dl2.var(0), transform="probit")


def test_delong_undefined_variance_with_single_case_class():
    y = np.array([True, False, False, False])
    s = np.array([0.9, 0.1, 0.2, 0.3])
    dl = M.delong(s, y)
    assert dl.aucs[0] == 1.0 and math.isnan(dl.var(0))
    assert M.auc_ci(1.0, dl.var(0)) is None
    with pytest.raises(ValueError, match="one positive and one negative"):
        M.delong(s, np.zeros(4, bool))


def test_roc_points_at_unique_scores_match_sklearn():
    y, s = _data(120, 0.3, 5, decimals=0)
    c = M.curve(y, s)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    roc = c.roc()
    np.testing.assert_allclose(roc["fpr"], fpr)
    np.testing.assert_allclose(roc["tpr"], tpr)
    np.testing.assert_allclose(roc["thresholds"][1:], thr[1:])
    assert len(set(roc["thresholds"][1:])) == len(np.unique(s))
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(M.auc(y, s))


@pytest.mark.parametrize("decimals", [0, 1, None])
def test_average_precision_equals_sklearn(decimals):
    y, s = _data(150, 0.2, 11, decimals=decimals)
    assert M.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_wilson_matches_newcombe_1998():
    """Newcombe (1998), Stat Med 17:857, Table I, method 3 (score interval)."""
    for k, n, lo, hi in [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ]:
        ci = M.wilson(k, n)
        assert (round(ci[0], 4), round(ci[1], 4)) == (lo, hi)
    assert M.wilson(0, 0) is None
    r = M.rates(tp=0, fp=0, tn=5, fn=3)
    assert r["ppv"] is None and r["ppv_ci"] is None
    assert r["sensitivity"] == 0.0 and r["npv"] == pytest.approx(5 / 8)


def test_operating_points_against_brute_force():
    y, s = _data(200, 0.3, 12, decimals=1)
    ops = M.operating_points(y, s, threshold=0.25)
    thresholds = np.unique(s)

    def sens_spec(t):
        pred = s >= t
        return pred[y].mean(), (~pred[~y]).mean()

    j = [sum(sens_spec(t)) - 1 for t in thresholds]
    best = thresholds[np.flatnonzero(np.isclose(j, max(j)))].max()
    assert ops["youden"]["threshold"] == best
    for target in (0.90, 0.95):
        t = ops[f"sensitivity_{target:.2f}"]["threshold"]
        ok = [u for u in thresholds if sens_spec(u)[0] >= target]
        assert t == max(ok)
        assert ops[f"sensitivity_{target:.2f}"]["sensitivity"] >= target
        t = ops[f"specificity_{target:.2f}"]["threshold"]
        ok = [u for u in thresholds if sens_spec(u)[1] >= target]
        assert t == min(ok)
        assert ops[f"specificity_{target:.2f}"]["specificity"] >= target
    u = ops["user"]
    assert u["threshold"] == 0.25
    se, sp = sens_spec(0.25)
    assert u["sensitivity"] == pytest.approx(se) and u["specificity"] == pytest.approx(sp)
    assert u["tp"] + u["fn"] == y.sum() and u["tn"] + u["fp"] == (~y).sum()


def test_specificity_target_unreachable_calls_all_negative():
    # the top score is shared by one positive and five negatives: spec 0.95 needs t > max
    y = np.array([True] * 5 + [False] * 10)
    s = np.array([1.0, 0.5, 0.5, 0.4, 0.3] + [1.0] * 5 + [0.1] * 5)
    op = M.operating_points(y, s)["specificity_0.95"]
    assert op["threshold"] > 1.0 and op["specificity"] == 1.0 and op["sensitivity"] == 0.0
    assert op["ppv"] is None


def test_calibration_metrics():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0], float)
    p = np.array([0.05, 0.15, 0.15, 0.55, 0.95, 0.95, 1.0, 0.0])
    assert M.brier(y, p) == pytest.approx(brier_score_loss(y, p))
    # by hand, 10 equal-width bins: [0,.1): p .05,.0 y 0,0 -> gap .05;
    # [.1,.2): p .15,.15 y 0,1 -> |.30-1|=.70; [.5,.6): .55 vs 1 -> .45; [.9,1]: 2.9 vs 2 -> .9
    assert M.ece(y, p, 10) == pytest.approx((0.05 + 0.70 + 0.45 + 0.90) / 8)
    assert M.ece(y, p, 2, "quantile") == pytest.approx((abs(0.35 - 1) + abs(3.45 - 3)) / 8)
    bins = M.reliability(y, p, 10)
    assert [b["n"] for b in bins] == [2, 2, 0, 0, 0, 1, 0, 0, 0, 3]
    assert bins[2]["observed"] is None and bins[9]["observed"] == pytest.approx(2 / 3)
    assert M.is_probability(p) and not M.is_probability(np.array([1.0, 2.0, 5.0]))


def test_holm_adjustment():
    adj = M.holm([0.01, 0.04, None, 0.03])
    assert adj[0] == pytest.approx(0.03) and adj[1] == pytest.approx(0.06)
    assert adj[3] == pytest.approx(0.06) and adj[2] is None


# ---------------------------------------------------------------------------------------
# bootstrap
# ---------------------------------------------------------------------------------------
def test_bootstrap_weights_are_stratified_and_seeded():
    strata = np.array([0] * 7 + [1] * 13 + [2] * 4)
    blocks = list(M.bootstrap_weights(strata, 50, seed=3))
    w = np.vstack(blocks)
    assert w.shape == (50, strata.size)
    for v, count in ((0, 7), (1, 13), (2, 4)):
        np.testing.assert_array_equal(w[:, strata == v].sum(axis=1), count)
    again = np.vstack(list(M.bootstrap_weights(strata, 50, seed=3)))
    np.testing.assert_array_equal(w, again)
    other = np.vstack(list(M.bootstrap_weights(strata, 50, seed=4)))
    assert not np.array_equal(w, other)


def test_weighted_auc_equals_auc_of_explicit_resample():
    y, s = _data(90, 0.3, 21, decimals=1)
    w = np.vstack(list(M.bootstrap_weights(y, 20, seed=0)))
    tp, fp, _ = M.weighted_counts(w, y, s)
    got = M.auc_from_counts(tp, fp)
    for r in range(w.shape[0]):
        idx = np.repeat(np.arange(y.size), w[r].astype(int))
        assert got[r] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)


def test_bootstrap_is_paired_and_reproducible():
    y, s = _data(100, 0.4, 8)
    S = np.vstack([s, s])
    b1 = M.bootstrap_auc(y, S, 300, seed=1)
    b2 = M.bootstrap_auc(y, S, 300, seed=1)
    np.testing.assert_array_equal(b1.aucs, b2.aucs)
    np.testing.assert_array_equal(b1.aucs[:, 0], b1.aucs[:, 1])  # same resamples per column
    assert b1.tpr_at_grid.shape == (300, 2, 101)
    assert np.all(np.diff(b1.tpr_at_grid[:, 0, :], axis=1) >= 0)  # monotone ROC band


def test_bootstrap_2000_replicates_n1000_is_fast():
    y, s = _data(1000, 0.3, 9, decimals=2)
    M.bootstrap_auc(y, s, 50, seed=0)  # warm-up
    t0 = time.perf_counter()
    b = M.bootstrap_auc(y, s, 2000, seed=0)
    elapsed = time.perf_counter() - t0
    assert b.aucs.shape == (2000, 1)
    # the target is < 1 s; the bound leaves room for a loaded shared CI machine
    assert elapsed < 3.0, f"bootstrap took {elapsed:.2f} s"
    lo, hi = M.percentile_ci(b.aucs[:, 0])
    dl = M.delong(s, y)
    dlo, dhi = M.auc_ci(float(dl.aucs[0]), dl.var(0))
    assert abs(lo - dlo) < 0.01 and abs(hi - dhi) < 0.01


def _coverage(n_sims: int, n_pos: int, n_neg: int, n_boot: int, seed: int):
    """Fraction of simulated binormal data sets whose CIs contain the true AUC."""
    d = 1.0
    true_auc = NormalDist().cdf(d / math.sqrt(2))
    rng = np.random.default_rng(seed)
    hit_boot = hit_delong = 0
    y = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    for k in range(n_sims):
        s = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
        b = M.bootstrap_auc(y, s, n_boot, seed=k)
        lo, hi = M.percentile_ci(b.aucs[:, 0])
        hit_boot += lo <= true_auc <= hi
        dl = M.delong(s, y)
        dlo, dhi = M.auc_ci(float(dl.aucs[0]), dl.var(0))
        hit_delong += dlo <= true_auc <= dhi
    return hit_boot / n_sims, hit_delong / n_sims


def test_bootstrap_and_delong_coverage_fast():
    """200 simulated data sets (n=100): coverage ~95%; binomial SD ~1.5%, so 0.90-0.99.

    Measured with this seed: 0.925 for both (slight under-coverage is expected at n=100).
    """
    boot, delong_cov = _coverage(n_sims=200, n_pos=40, n_neg=60, n_boot=400, seed=2024)
    assert 0.90 <= boot <= 0.99, boot
    assert 0.90 <= delong_cov <= 0.99, delong_cov


@pytest.mark.slow
def test_bootstrap_coverage_large():
    """1000 data sets, 2000 replicates each (binomial SD 0.7%).

    Both intervals are known to under-cover slightly at this size (n=150, AUC 0.76):
    measured 0.938 (bootstrap) and 0.933 (DeLong) with this seed.
    """
    boot, delong_cov = _coverage(n_sims=1000, n_pos=60, n_neg=90, n_boot=2000, seed=7)
    assert 0.92 <= boot <= 0.97, boot
    assert 0.92 <= delong_cov <= 0.97, delong_cov


# ---------------------------------------------------------------------------------------
# exactness (issue #16): AUC under separation, Youden ties, tail p-values
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("m", "n"), [(1, 11), (2, 7), (2, 10), (3, 3), (5, 29), (17, 2)])
def test_perfect_separation_gives_exact_auc_and_a_collapsed_ci(m, n):
    y = np.r_[np.ones(m, bool), np.zeros(n, bool)]
    s = np.r_[np.arange(m) + 100.0, np.arange(n, dtype=float)]
    assert M.auc(y, s) == 1.0 and M.auc(y, -s) == 0.0  # not 0.9999999999999999
    for score, a in ((s, 1.0), (-s, 0.0)):
        dl = M.delong(score, y)
        assert dl.aucs[0] == a
        if m >= 2 and n >= 2:
            assert dl.var(0) == 0.0
            for transform in M.CI_TRANSFORMS:
                assert M.auc_ci(a, dl.var(0), 0.95, transform) == (a, a)
        else:
            assert M.auc_ci(a, dl.var(0)) is None  # undefined variance: None, never NaN


def test_auc_is_the_exact_mann_whitney_fraction_with_ties():
    rng = np.random.default_rng(16)
    for _ in range(50):
        m, n = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        pos, neg = rng.integers(0, 4, m), rng.integers(0, 4, n)
        wins = sum(int(a > b) for a in pos for b in neg)
        ties = sum(int(a == b) for a in pos for b in neg)
        y = np.r_[np.ones(m, bool), np.zeros(n, bool)]
        assert M.auc(y, np.r_[pos, neg].astype(float)) == (wins + ties / 2) / (m * n)


def test_youden_exact_tie_takes_the_highest_threshold():
    # thresholds 5 (sens 1/3, spec 1) and -1 (sens 1, spec 1/3) both have J = 1/3 exactly;
    # in floating point 1 - 2/3 > 1/3 - 0, which picked the lowest threshold
    y = np.array([True, True, True, False, False, False])
    s = np.array([-1.0, 0.0, 5.0, 2.0, -1.0, -2.0])
    op = M.operating_points(y, s)["youden"]
    assert op["threshold"] == 5.0
    assert (op["tp"], op["fp"]) == (1, 0)


def test_youden_without_a_useful_threshold_calls_all_negative():
    # every threshold has J = 0; the highest of the tied candidates is above every score
    y = np.array([True, False, True, False])
    op = M.operating_points(y, np.full(4, 0.5))["youden"]
    assert op["threshold"] > 0.5 and op["sensitivity"] == 0.0 and op["specificity"] == 1.0


def test_tiny_p_value_stays_positive_and_matches_the_normal_tail():
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    s1, s2 = y * 3.0 + rng.normal(0, 1, 600), rng.normal(0, 1, 600)
    t = M.delong_paired(M.delong(np.vstack([s1, s2]), y), 0, 1)
    assert t.z is not None and t.z > 20
    assert 0.0 < t.p_value < 1e-100  # 2 * (1 - cdf(z)) gave exactly 0.0
    assert t.p_value == pytest.approx(2 * NormalDist().pdf(t.z) / t.z, rel=0.01)  # Mills
    assert M.two_sided_p(-3.0) == M.two_sided_p(3.0) == pytest.approx(0.0026997960632601866)
    assert M.two_sided_p(0.0) == 1.0
