"""Shared fixtures: tiny synthetic data made on the fly, no network."""

from __future__ import annotations

import os

import pytest

# Tests never download anything; keep torch caches inside the test tmp dir.
os.environ.setdefault("MEDRES_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_torch_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    yield


@pytest.fixture(autouse=True)
def _few_threads():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)
