"""Scoring on a shared CPU (issue 18): the measured model thread count (ThreadTuner), the
lower-priority discovery thread and the kernel read-ahead of large in-process NIfTI files."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
import torch

from medres.score.engine import DISCOVERY_NICE, background
from medres.score.predict import Predictor, ThreadTuner


def _feed(t: ThreadTuner, per_item: dict[int, float], n: int) -> list[int]:
    picks = []
    for _ in range(n):
        k = t.pick()
        picks.append(k)
        t.record(k, per_item[k] * 8, 8)
    return picks


def test_tuner_times_both_counts_then_keeps_the_faster_and_rechecks():
    t = ThreadTuner(2, every=4)
    picks = _feed(t, {2: 1.0, 1: 0.25}, 9)  # one thread is faster (a busy machine)
    assert picks[:3] == [2, 2, 1]  # warm-up, then each count timed once
    assert picks[3] == 1 and picks[4] == 2  # the faster one; batch 4 re-checks the other
    assert picks[5:8] == [1, 1, 1] and picks[8] == 2
    assert t.best == 1


def test_tuner_keeps_all_threads_when_they_are_faster_and_follows_the_load():
    t = ThreadTuner(2, every=4)
    assert _feed(t, {2: 0.5, 1: 1.0}, 6) == [2, 2, 1, 2, 1, 2]
    # the machine gets busy: the re-checks see one thread faster, the tuner moves to it
    _feed(t, {2: 5.0, 1: 1.0}, 4)
    assert t.best == 1
    assert ThreadTuner(1).pick() == 1


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 2),
    )  # fmt: skip


def test_predictor_tunes_threads_on_cpu_without_changing_results_or_the_setting():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = np.random.default_rng(0).normal(size=(4, 1, 12, 12)).astype(np.float32)
        tuned, plain = Predictor(_net(), dims=2), Predictor(_net(), dims=2, tune_threads=False)
        outs = [tuned(x) for _ in range(5)]
        ref = plain(x)
        assert torch.get_num_threads() == 2  # the process's setting is left as it was
        assert tuned.tuner is not None and tuned.tuner.calls == 5
        assert set(tuned.tuner.per_item) == {1, 2}  # both counts were timed
        for o in outs:
            np.testing.assert_array_equal(o, ref)
        assert plain.tuner is None
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_discovery_thread_runs_at_a_lower_priority():
    def gen():
        yield os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert list(background(gen())) == [min(19, mine + DISCOVERY_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine  # the scoring thread keeps its own


def test_a_large_plain_nifti_is_read_ahead_when_routed_in_process(tmp_path, monkeypatch):
    import nibabel as nib

    from medres.score import decode
    from medres.score.items import ScoreItem

    path = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(path))
    calls: list[int] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, o, n, a: calls.append(a), raising=False)
    item = ScoreItem("k", "k", "v.nii", "nifti", (str(path),))
    dec = decode.MedresDecoder({"dims": 3, "image_size": [4, 4, 4], "in_channels": 1})
    assert dec.in_process(item) and calls == []  # small: no read-ahead
    monkeypatch.setattr(decode, "READAHEAD_BYTES", 0)
    assert dec.in_process(item) and calls == [os.POSIX_FADV_WILLNEED]
    assert not decode.bounded_plain_nifti(tmp_path / "missing.nii", readahead=True)
