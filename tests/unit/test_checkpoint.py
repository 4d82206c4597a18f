"""Checkpoints: RNG capture/restore, weights_only loading, atomicity, clear errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from medres.errors import TrainError
from medres.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint


class Payload:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def _draws():
    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),
        np.random.randn(1).tolist(),
        random.random(),
    )


def test_rng_round_trip_reproduces_the_next_draws():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn(1)  # leave a cached gaussian in numpy's state
    state = capture_rng()
    first = _draws()
    _draws()  # move every generator on
    restore_rng(state)
    assert _draws() == first


def test_checkpoint_is_weights_only_loadable(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    opt.step()
    sched.step()
    state = {
        "epoch": 3,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": capture_rng(),
        "history": [{"epoch": 1, "val_auc": float("nan")}],
    }
    path = save_checkpoint(tmp_path / "ck" / "last.pt", state)
    raw = torch.load(path, weights_only=True)  # plain torch, no allow-listing needed
    assert raw["epoch"] == 3
    back = load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v)
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(back["optimizer"])
    restore_rng(back["rng"])
    assert not list((tmp_path / "ck").glob("*.tmp"))  # no temp files left behind


def test_rewrite_is_atomic_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"epoch": 2, "bad": Boom()})
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"not a checkpoint", "not a readable medres checkpoint"), (None, "not found")],
)
def test_bad_checkpoints_raise_train_error(tmp_path, content, needle):
    path = tmp_path / "last.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TrainError, match=needle):
        load_checkpoint(path)


def test_foreign_torch_file_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"model": {}}, path)  # no medres format tag
    with pytest.raises(TrainError, match="not a medres-checkpoint/1"):
        load_checkpoint(path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "medres-checkpoint/1", "obj": Payload()}, path)
    with pytest.raises(TrainError, match="not a readable"):
        load_checkpoint(path)
