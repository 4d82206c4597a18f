"""Reliability suite: hostile inputs, crashes, unsafe weights and PHI leaks.

Two modes:

* **CI mode** (default; ``python -m pytest`` or ``pytest -m reliability``): a few thousand
  fuzz cases and every other check at its smallest useful size; a few minutes on 2 cores.
* **Long mode**: ``MEDRES_RELIABILITY_LONG=1`` (always works) or ``--reliability-long``
  (only when ``tests/reliability`` is named on the command line, because pytest reads
  options only from the conftest files of the paths it starts from). More fuzz cases
  per seed file, more seeds, and the ``slow`` reliability tests of other folders.

This conftest also gathers the reliability tests that live with their stages (crash,
resume, archive and weights-safety tests in ``tests/unit`` and ``tests/integration``): it
adds the ``reliability`` marker to them so that ``pytest -m reliability`` runs the whole
set. Their files stay with their owners.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

LONG_ENV = "MEDRES_RELIABILITY_LONG"
HERE = Path(__file__).resolve().parent
TESTS = HERE.parent

# tests that live with their stages and prove a promise of the "Guarantees" list
# (node-id prefixes, relative to the repository root)
GATHERED = (
    "tests/integration/test_score_crash.py::",
    "tests/integration/test_score_cli.py::test_score_folder_then_resume",
    "tests/integration/test_ingest_cli.py::test_isolated_pool_survives_crash_timeout_and_panics",
    "tests/integration/test_ingest_cli.py::test_synth_messy_defects_are_caught_with_their_codes",
    "tests/unit/test_models_safety.py::",
    "tests/unit/test_checkpoint.py::test_pickled_objects_are_refused",
    "tests/unit/test_checkpoint.py::test_foreign_torch_file_is_refused",
    "tests/unit/test_checkpoint.py::test_rewrite_is_atomic_and_keeps_old_file_on_failure",
    "tests/unit/test_discover.py::test_zip_",
    "tests/unit/test_discover.py::test_tar_",
    "tests/unit/test_discover.py::test_member_count_limit_rejects_whole_archive",
    "tests/unit/test_pydicom_testfiles.py::",
    # issue #16 reproductions that live with their stages (train runs, statistics, redactor)
    "tests/integration/test_train_hardening.py::",
    "tests/unit/test_metrics.py::test_perfect_separation_gives_exact_auc_and_a_collapsed_ci",
    "tests/unit/test_metrics.py::test_auc_is_the_exact_mann_whitney_fraction_with_ties",
    "tests/unit/test_metrics.py::test_youden_exact_tie_takes_the_highest_threshold",
    "tests/unit/test_metrics.py::test_tiny_p_value_stays_positive_and_matches_the_normal_tail",
    "tests/unit/test_proc_oracle.py::",
    "tests/unit/test_phi_paths.py::test_nfd_and_full_width_spellings_are_pseudonymised",
    "tests/unit/test_phi_paths.py::test_cjk_name_parts_of_two_characters_and_the_joined_name",
    "tests/unit/test_phi_paths.py::test_text_keeps_dicom_tag_notation_and_matches_whole_tokens",
)

# tests/integration helpers (train_data.make_dataset) are imported by name
if str(TESTS / "integration") not in sys.path:
    sys.path.insert(0, str(TESTS / "integration"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-long",
        action="store_true",
        default=False,
        help=f"run the long reliability mode (same as {LONG_ENV}=1)",
    )


def long_mode(config: pytest.Config) -> bool:
    """True in the long mode (environment variable or command-line flag)."""
    flag = False
    try:
        flag = bool(config.getoption("--reliability-long"))
    except ValueError:  # option not registered (conftest not an initial one)
        flag = False
    return flag or os.environ.get(LONG_ENV, "") not in ("", "0")


@pytest.fixture(scope="session")
def reliability_long(pytestconfig: pytest.Config) -> bool:
    return long_mode(pytestconfig)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    long = long_mode(config)
    markexpr = config.getoption("markexpr", "") or ""
    for item in items:
        if item.nodeid.startswith(GATHERED):
            item.add_marker(pytest.mark.reliability)
        # `-m reliability` replaces addopts' `-m "not slow"`: keep the CI mode short by
        # skipping slow reliability tests unless the long mode (or `-m slow`) asks for them
        if (
            not long
            and "slow" not in markexpr
            and item.get_closest_marker("slow") is not None
            and item.get_closest_marker("reliability") is not None
        ):
            item.add_marker(
                pytest.mark.skip(reason=f"long reliability mode only (set {LONG_ENV}=1)")
            )
