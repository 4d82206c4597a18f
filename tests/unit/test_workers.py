"""medres.workers.IsolatedPool: the one supervised pool (crash, timeout, start-up failures)."""

from __future__ import annotations

import os
import time

import pytest

from medres.errors import MedresError
from medres.workers import Failure, IsolatedPool


def test_workers_that_die_while_starting_stop_the_pool_with_one_line():
    t0 = time.monotonic()
    with (
        pytest.raises(MedresError, match="exited while starting"),
        IsolatedPool(1, initializer=os._exit, initargs=(3,)) as pool,
    ):
        pool.map(abs, [1, 2, 3])
    assert time.monotonic() - t0 < 60


def test_a_crashing_item_fails_alone_and_the_rest_are_answered():
    with IsolatedPool(1, timeout_s=30) as pool:
        out = pool.map(os._exit, [0], chunk_size=1) + pool.map(abs, [-1, -2])
    assert out[0][0] is False and isinstance(out[0][1], Failure)
    assert out[0][1].code == "decode_failed"
    assert out[1:] == [(True, 1), (True, 2)]


def test_an_item_over_the_time_limit_is_coded_timeout():
    with IsolatedPool(1, timeout_s=1) as pool:
        out = pool.map(time.sleep, [30, 0])
    assert out[0][0] is False and out[0][1].code == "timeout"
    assert out[1] == (True, None)
