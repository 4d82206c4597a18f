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


@pytest.fixture(autouse=True)
def _fresh_identity_filter(monkeypatch: pytest.MonkeyPatch):
    """Each test starts with no live identity redactors, as each CLI command does in its
    own process: tokens learned by an earlier test (a patient named "Disk Error") must not
    pseudonymise this test's tmp_path."""
    import collections

    from medres.phi import redact

    monkeypatch.setattr(redact, "_LIVE", collections.deque(maxlen=redact._LIVE_MAX))
    yield


# --- synthetic study sets (medres.synth) -------------------------------------------------
# Session-scoped and cached per spec: tests must treat these folders as read-only (copy
# them to tmp_path before planting further damage).


@pytest.fixture(scope="session")
def synth_factory(tmp_path_factory: pytest.TempPathFactory):
    """``synth_factory(kind="ct", n_patients=4, shape=(32, 32, 12), ...)`` -> SynthResult.

    The same spec is generated once per session; different specs get their own folder.
    """
    from medres.synth import SynthSpec, generate

    cache: dict = {}

    def make(**kwargs):
        spec = SynthSpec(**kwargs)
        if spec not in cache:
            cache[spec] = generate(spec, tmp_path_factory.mktemp(f"synth_{spec.kind}"))
        return cache[spec]

    return make


@pytest.fixture(scope="session")
def synth_ct(synth_factory):
    """Tiny CT set: 6 patients, 32x32x12, half of the series oblique, one file per slice."""
    return synth_factory(kind="ct", n_patients=6, shape=(32, 32, 12), oblique=0.5, seed=11)


@pytest.fixture(scope="session")
def synth_xray(synth_factory):
    """Tiny radiograph set: 8 patients, 48x40, half MONOCHROME1, DX and CR mixed."""
    return synth_factory(
        kind="xray", n_patients=8, shape=(48, 40), monochrome1_fraction=0.5, seed=12
    )


@pytest.fixture(scope="session")
def synth_nifti(synth_factory):
    """Tiny NIfTI set: 4 patients, 32x32x12 .nii.gz volumes with RAS affines."""
    return synth_factory(kind="nifti", n_patients=4, shape=(32, 32, 12), seed=13)


@pytest.fixture(scope="session")
def synth_ct_messy(synth_factory):
    """Tiny CT set (10 patients) with every per-series defect planted once, plus junk files."""
    return synth_factory(
        kind="ct",
        n_patients=10,
        shape=(24, 24, 10),
        seed=14,
        messy=(
            "missing_slice",
            "duplicate_slice",
            "localizer",
            "uneven_spacing",
            "two_series",
            "junk",
            "truncated",
            "no_preamble",
        ),
    )


@pytest.fixture(autouse=True)
def _progress_bars_on_terminals_only(monkeypatch: pytest.MonkeyPatch):
    """The CLI switches progress bars on (``progress.enable``) at every invocation. Under
    ``CliRunner`` stderr is a captured buffer, and bars rendered there would be mixed into
    the output tests assert on: let ``enable`` take effect only on a real terminal."""
    from rich.console import Console

    from medres import progress

    enable = progress.enable

    def enable_on_terminal(console: Console | None = None) -> None:
        console = console or Console(stderr=True)
        if console.is_terminal:
            enable(console)

    monkeypatch.setattr(progress, "enable", enable_on_terminal)
    yield


@pytest.fixture(autouse=True)
def _restore_medres_logger():
    """The CLI configures the `medres` logger (handlers, no propagation), also from
    module-scoped fixtures; reset it around every test so caplog sees library logs."""
    import logging

    from medres import progress

    def reset() -> None:
        lg = logging.getLogger("medres")
        lg.handlers.clear()
        lg.setLevel(logging.NOTSET)
        lg.propagate = True
        progress.disable()

    reset()
    yield
    reset()
