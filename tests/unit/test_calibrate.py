"""Calibration, thresholds, EMA and checkpoint selection: the model-quality mechanics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medres.errors import ConfigError
from medres.evaluate import metrics as M
from medres.train.calibrate import (
    T_BOUNDS,
    apply_temperature,
    choose_threshold,
    ece,
    fit_calibration,
    fit_temperature,
    nll,
    parse_threshold_rule,
)
from medres.train.ema import WeightEma, ema_decay_at
from medres.train.selection import is_better, select_best


def _sample(logits: np.ndarray, t: float, seed: int = 0) -> np.ndarray:
    """Labels drawn from softmax(logits / t): a model whose true temperature is t."""
    rng = np.random.default_rng(seed)
    p = apply_temperature(logits, t, "multiclass")
    u = rng.random(len(p))[:, None]
    return (u > np.cumsum(p, axis=1)).sum(axis=1)


@pytest.mark.parametrize(("classes", "true_t"), [(2, 0.5), (2, 3.0), (4, 2.0)])
def test_temperature_fit_recovers_a_known_temperature(classes, true_t):
    rng = np.random.default_rng(classes)
    logits = rng.normal(0, 3, size=(6000, classes))
    y = _sample(logits, true_t)
    t = fit_temperature(logits, y)
    assert t == pytest.approx(true_t, rel=0.08)
    assert nll(logits, y, t) < nll(logits, y, 1.0)
    # scaling never changes the ranking: argmax and per-class order are the same
    scaled = apply_temperature(logits, t, "multiclass")
    assert (scaled.argmax(1) == logits.argmax(1)).all()


def test_separable_validation_does_not_drive_t_to_its_bound():
    z = np.c_[np.zeros(40), np.r_[np.full(20, -4.0), np.full(20, 4.0)]]
    y = np.r_[np.zeros(20, int), np.ones(20, int)]
    t = fit_temperature(z, y)
    assert T_BOUNDS[0] * 2 < t < 1.0  # sharper than T=1, but the prior keeps it finite


def test_ece_matches_a_hand_computed_example():
    # bins of width 0.1: {0.05, 0.05} -> |0.1 - 0| ; {0.45, 0.55 in different bins};
    p = np.array([0.05, 0.05, 0.45, 0.55, 0.95, 0.95])
    y = np.array([0, 1, 0, 1, 1, 1])
    # bin0: sum p 0.1, sum y 1 -> 0.9; bin4: 0.45 vs 0 -> 0.45; bin5: 0.55 vs 1 -> 0.45;
    # bin9: 1.9 vs 2 -> 0.1; total 1.9 / 6
    assert ece(y, p) == pytest.approx(1.9 / 6)
    assert ece(y, p) == pytest.approx(M.ece(y, p, 10, "uniform"))


@pytest.mark.parametrize(
    ("text", "kind", "target"),
    [("youden", "youden", None), ("Sensitivity:0.9", "sensitivity", 0.9),
     ("specificity:0.95", "specificity", 0.95), ("fixed", "fixed", None)],
)  # fmt: skip
def test_threshold_rules_parse(text, kind, target):
    rule = parse_threshold_rule(text, fixed=0.3)
    assert (rule.kind, rule.target) == (kind, target)
    assert parse_threshold_rule(str(rule)).kind == kind


@pytest.mark.parametrize("bad", ["", "sens:0.9", "sensitivity:1.5", "specificity:x", "best"])
def test_bad_threshold_rules_are_config_errors(bad):
    with pytest.raises(ConfigError, match="threshold_rule"):
        parse_threshold_rule(bad)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rule", ["youden", "sensitivity:0.9", "specificity:0.9"])
def test_threshold_selection_gives_the_counts_of_evaluate_operating_points(seed, rule):
    rng = np.random.default_rng(seed)
    y = rng.random(80) < 0.35
    s = np.round(np.clip(rng.normal(0.3 + 0.35 * y, 0.2), 0, 1), 2)  # ties included
    t = choose_threshold(y, s, parse_threshold_rule(rule))
    name = {"youden": "youden"}.get(rule, rule.replace(":0.9", "_0.90"))
    op = M.operating_points(y, s)[name]
    assert M.confusion_at(y, s, t) == (op["tp"], op["fp"], op["tn"], op["fn"])
    assert t <= op["threshold"]  # moved down into the gap below the chosen score


def test_threshold_lies_halfway_into_the_gap_and_fixed_is_fixed():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert choose_threshold(y, s, parse_threshold_rule("youden")) == pytest.approx(0.6)
    assert choose_threshold(y, s, parse_threshold_rule("fixed", 0.25)) == 0.25
    assert choose_threshold(y, s, parse_threshold_rule("sensitivity:1")) == pytest.approx(0.225)


def test_fit_calibration_binary_and_multilabel():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 4, size=(500, 2))
    y = _sample(z, 2.0)
    cal = fit_calibration(
        z, y, task="binary", positive_index=1, rule=parse_threshold_rule("youden")
    )
    assert cal.temperature == pytest.approx(2.0, rel=0.25)
    assert cal.stats["ece_after"] <= cal.stats["ece_before"]
    assert 0.0 < cal.threshold < 1.0 and cal.rule == "youden"
    ml = fit_calibration(z, y, task="multilabel", positive_index=-1, rule=cal_rule())
    assert ml.temperature == 1.0 and ml.threshold is None
    off = fit_calibration(z, y, task="binary", positive_index=1, rule=cal_rule(), enabled=False)
    assert off.temperature == 1.0 and off.threshold is not None


def cal_rule():
    return parse_threshold_rule("youden")


# ------------------------------------------------------------------------------------ EMA
def test_ema_averages_weights_and_bn_buffers_and_round_trips():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = WeightEma(net, decay=0.5)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(2.0)
        net[1].num_batches_tracked.fill_(7)
    ema.update(net)  # decay min(0.5, 1/10) = 0.1
    d = ema_decay_at(0.5, 0)
    assert d == pytest.approx(0.1)
    assert torch.allclose(ema.module[0].weight, d * w0 + (1 - d) * (w0 + 1))
    assert torch.allclose(ema.module[1].running_mean, torch.full((4,), (1 - d) * 2.0))
    assert int(ema.module[1].num_batches_tracked) == 7  # integer buffers are copied
    other = WeightEma(net, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    assert torch.equal(other.module[0].weight, ema.module[0].weight)


# ------------------------------------------------------------------------------ selection
def _state():
    return SimpleNamespace(
        best_auc=math.nan, best_loss=math.nan, max_auc=math.nan, best_source="live",
        best_metric=math.nan,
    )  # fmt: skip


def _ev(auc, loss):
    return SimpleNamespace(metric=auc, loss=loss)


def test_selection_prefers_a_later_epoch_of_equal_auc_and_lower_loss():
    st = _state()
    # the case: epoch 5 reaches AUC 1.0 with loss 0.97, later epochs 0.013
    assert select_best(st, [("live", _ev(1.0, 0.97))], "auc", 0.005)
    assert select_best(st, [("live", _ev(0.999, 0.10)), ("ema", _ev(1.0, 0.013))], "auc", 0.005)
    assert (st.best_source, st.best_loss) == ("ema", 0.013)
    # a clearly worse AUC never wins on loss, a clearly better one always wins
    assert not select_best(st, [("live", _ev(0.98, 0.001))], "auc", 0.005)
    assert select_best(st, [("live", _ev(1.0, 0.012))], "auc", 0.005)


def test_selection_never_drifts_more_than_the_tolerance_below_the_best_auc():
    st = _state()
    for auc, loss in [(0.90, 0.5), (0.896, 0.4), (0.892, 0.3), (0.888, 0.2)]:
        select_best(st, [("live", _ev(auc, loss))], "auc", 0.005)
    assert st.best_auc >= st.max_auc - 0.005
    assert st.best_auc == 0.896


def test_selection_by_loss_and_undefined_auc():
    st = _state()
    assert select_best(st, [("live", _ev(math.nan, 0.5))], "auc", 0.005)
    assert select_best(st, [("live", _ev(0.7, 0.9))], "auc", 0.005)  # defined AUC wins
    assert not is_better(st, math.nan, 0.1, metric="auc")
    st = _state()
    select_best(st, [("live", _ev(0.99, 0.5))], "loss", 0.005)
    assert select_best(st, [("live", _ev(0.5, 0.4))], "loss", 0.005)
    assert st.best_metric == -0.4
