"""Engine: schedules, losses, metrics, accumulation, early stopping, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medres.errors import ConfigError, TrainError
from medres.train.data import EpochSampler, LabelInfo, check_leakage, sample_weights
from medres.train.engine import (
    TrainState,
    compute_metric,
    evaluate,
    fit,
    lr_factor,
    make_loss,
    make_optimizer,
    make_scheduler,
    resolve_amp,
    train_one_epoch,
)
from medres.train.spec import TrainSpec


class TinyNet(nn.Module):
    """A 'backbone' conv + an ``fc`` head, like the ResNets (no BatchNorm: exact sums)."""

    def __init__(self, out: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _batches(n: int = 32, bs: int = 8, seed: int = 0, multilabel: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (torch.arange(n) % 2).long()
    x[y == 1] += 1.5  # learnable: positives are brighter
    if multilabel:
        y = torch.stack([y, 1 - y], dim=1).float()
    return [
        {"image": x[i : i + bs], "label": y[i : i + bs], "index": torch.arange(i, min(i + bs, n))}
        for i in range(0, n, bs)
    ]


def _state(model: nn.Module, spec: TrainSpec, steps: int, task: str = "binary") -> TrainState:
    opt = make_optimizer(model, spec)
    return TrainState(
        model=model,
        optimizer=opt,
        scheduler=make_scheduler(opt, spec, steps),
        loss_fn=make_loss(task, label_smoothing=spec.label_smoothing),
        device=torch.device("cpu"),
        task=task,
        grad_accum=spec.grad_accum,
        grad_clip=spec.grad_clip,
    )


@pytest.mark.parametrize("kind", ["cosine", "onecycle", "constant"])
def test_lr_schedules_warm_up_then_decay(kind):
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, kind) for s in range(total)]
    assert all(0 < v <= 1.0 + 1e-9 for v in f)
    assert f[0] < f[warm - 1] < 1.0 + 1e-9  # increasing warmup
    assert max(f) == pytest.approx(1.0, abs=0.02)
    if kind == "constant":
        assert f[-1] == 1.0
    else:
        assert f[-1] < 0.01  # annealed to ~0 at the end
        assert all(a >= b - 1e-12 for a, b in zip(f[warm + 1 :], f[warm + 2 :], strict=False))


def test_scheduler_steps_per_optimizer_step_and_state_is_plain():
    model = TinyNet()
    spec = TrainSpec(epochs=2, warmup_epochs=0.5, lr=0.1)
    st = _state(model, spec, steps=4)
    train_one_epoch(st, _batches())
    assert st.step == 4
    assert st.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(4, 8, 2, "cosine"))
    sd = st.scheduler.state_dict()
    assert all(v is None for v in sd.get("lr_lambdas", [None]))  # nothing pickled


def test_training_reduces_loss_and_evaluate_gives_auc():
    torch.manual_seed(0)
    model = TinyNet()
    spec = TrainSpec(epochs=6, lr=0.05, warmup_epochs=0)
    st = _state(model, spec, steps=4)
    data = _batches()
    before = evaluate(st, data).loss
    for _ in range(6):
        train_one_epoch(st, data)
    ev = evaluate(st, data)
    assert ev.loss < before
    assert ev.metric > 0.9
    assert ev.probs.shape == (32, 2)
    np.testing.assert_allclose(ev.probs.sum(1), 1.0, rtol=1e-5)
    assert sorted(ev.indices.tolist()) == list(range(32))


def test_grad_accumulation_matches_a_big_batch():
    torch.manual_seed(0)
    a, b = TinyNet(), TinyNet()
    b.load_state_dict(a.state_dict())
    sa = _state(
        a, TrainSpec(epochs=1, lr=0.1, optimizer="sgd", warmup_epochs=0, scheduler="constant"), 1
    )
    sb = _state(
        b,
        TrainSpec(
            epochs=1, lr=0.1, optimizer="sgd", warmup_epochs=0, scheduler="constant", grad_accum=4
        ),
        1,
    )
    train_one_epoch(sa, _batches(n=32, bs=32))
    train_one_epoch(sb, _batches(n=32, bs=8))
    assert sa.step == sb.step == 1
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_grad_clipping_limits_the_update():
    torch.manual_seed(0)
    a, b = TinyNet(), TinyNet()
    b.load_state_dict(a.state_dict())
    w0 = a.fc.weight.detach().clone()
    common = {
        "epochs": 1,
        "lr": 1.0,
        "optimizer": "sgd",
        "warmup_epochs": 0,
        "scheduler": "constant",
        "weight_decay": 0,
    }
    sa = _state(a, TrainSpec(**common), 1)
    sb = _state(b, TrainSpec(**common, grad_clip=1e-3), 1)
    data = _batches(n=8, bs=8)
    train_one_epoch(sa, data)
    train_one_epoch(sb, data)
    assert (b.fc.weight - w0).norm() < (a.fc.weight - w0).norm()
    # first Nesterov step: update = lr * (1 + momentum) * clipped gradient
    assert (b.fc.weight - w0).norm() <= 1.9e-3 + 1e-6


def test_early_stopping_and_best_epoch():
    torch.manual_seed(0)
    model = TinyNet()
    spec = TrainSpec(
        epochs=20, lr=0.0, warmup_epochs=0, scheduler="constant"
    )  # lr 0: never improves
    st = _state(model, spec, steps=4)
    seen = []
    fit(
        st,
        _batches(),
        _batches(seed=1),
        epochs=20,
        early_stopping=2,
        on_epoch_end=lambda s, r, b: seen.append(b),
    )
    assert st.epoch == 3  # best at 1, then 2 epochs without improvement
    assert st.best_epoch == 1
    assert seen == [True, False, False]
    assert [r["epoch"] for r in st.history] == [1, 2, 3]


def test_multilabel_loss_and_metric():
    torch.manual_seed(0)
    model = TinyNet()
    spec = TrainSpec(epochs=5, lr=0.05, warmup_epochs=0)
    st = _state(model, spec, steps=4, task="multilabel")
    data = _batches(multilabel=True)
    for _ in range(5):
        train_one_epoch(st, data)
    ev = evaluate(st, data)
    assert ev.probs.shape == (32, 2)
    assert not np.allclose(ev.probs.sum(1), 1.0)  # independent sigmoids
    assert ev.metric > 0.9
    smooth = make_loss("multilabel", label_smoothing=0.2)
    logits = torch.tensor([[20.0, -20.0]])
    assert (
        float(smooth(logits, torch.tensor([[1.0, 0.0]]))) > 1.0
    )  # smoothed targets punish certainty


def test_compute_metric_cases():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.35, 0.65], [0.2, 0.8]])
    assert compute_metric("binary", p, y, 1) == 1.0
    assert compute_metric("binary", p, y, 0) == 1.0  # positive class 0: its own probability
    assert math.isnan(compute_metric("binary", p[:2], y[:2], 1))  # one class only
    y3 = np.array([0, 1, 2, 0, 1, 2])
    p3 = np.eye(3)[y3] * 0.8 + 0.2 / 3
    assert compute_metric("multiclass", p3, y3) == 1.0


def test_class_weighted_loss_changes_with_weights():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([1, 1])
    plain = float(make_loss("binary")(logits, y))
    weighted = float(make_loss("binary", class_weights=torch.tensor([1.0, 3.0]))(logits, y))
    assert plain == pytest.approx(weighted)  # all targets are class 1: a weighted mean is unchanged
    logits2, y2 = torch.tensor([[2.0, 0.0], [0.0, 0.5]]), torch.tensor([0, 1])
    plain2 = float(make_loss("binary")(logits2, y2))
    weighted2 = float(make_loss("binary", class_weights=torch.tensor([1.0, 3.0]))(logits2, y2))
    assert weighted2 > plain2  # the harder class-1 sample counts three times


def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_shards_cover_everything():
    s = EpochSampler(10, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(0)
    assert list(s) == e0 and e0 != e1
    assert sorted(e0) == list(range(10))
    shards = [EpochSampler(10, seed=3, rank=r, world=3) for r in range(3)]
    got = [i for sh in shards for i in sh]
    assert len(got) == 12 and set(got) == set(range(10))  # padded to equal shards


def test_balanced_sampler_equalises_classes():
    labels = LabelInfo("binary", ("label",), ("0", "1"), "1")
    items = [{"label": 0}] * 90 + [{"label": 1}] * 10
    w = sample_weights(items, labels)
    s = EpochSampler(100, weights=w, seed=0)
    draws = []
    for e in range(20):
        s.set_epoch(e)
        draws += [items[i]["label"] for i in s]
    assert 0.4 < np.mean(draws) < 0.6


def test_leakage_guard_names_the_pseudonymous_key():
    rows = [
        {"patient_key": "pat-1", "split": "train"},
        {"patient_key": "pat-2", "split": "val"},
        {"patient_key": "pat-1", "split": "test"},
    ]
    with pytest.raises(TrainError, match=r"patient pat-1 .*leakage.*re-split"):
        check_leakage(rows)
    check_leakage(rows[:2])


def test_amp_resolution_on_cpu():
    cpu = torch.device("cpu")
    from medres.runtime import cpu_has_amx as _cpu_has_amx

    assert resolve_amp("auto", cpu) is (torch.bfloat16 if _cpu_has_amx() else None)
    assert resolve_amp("none", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        resolve_amp("fp16", cpu)
    with pytest.raises(ConfigError, match=r"train\.amp"):
        resolve_amp("fp8", cpu)


def test_a_one_sample_last_training_batch_is_dropped_and_only_that():
    """BatchNorm cannot train on one sample ("Expected more than 1 value per channel"): 34
    images at batch 11 (a cross-validation fold) crashed `medres train` in its first epoch."""
    from medres.train.data import build_loader

    data = torch.utils.data.TensorDataset(torch.arange(40.0))

    def sizes(n: int, batch: int, train: bool) -> list[int]:
        loader = build_loader(
            data, EpochSampler(n, seed=0), batch_size=batch, workers=0, train=train
        )
        return [len(b[0]) for b in loader]

    assert sizes(34, 11, train=True) == [11, 11, 11]  # the 34th sits out this epoch
    assert sizes(34, 11, train=False) == [11, 11, 11, 1]  # evaluation sees every item
    assert sizes(35, 11, train=True) == [11, 11, 11, 2]  # a 2-sample batch trains
    assert sizes(1, 4, train=True) == [1]  # nothing to drop to
    model = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4)).train()
    for (x,) in build_loader(data, EpochSampler(34, seed=0), batch_size=11, workers=0, train=True):
        model(x[:, None])  # no one-sample batch reaches BatchNorm
