"""The settings of one evaluation (:class:`EvaluateConfig`) and their validation.

Owns the frozen config that the CLI (or a library caller) builds once and passes down to
:mod:`medres.evaluate.inputs` and :mod:`medres.evaluate.evaluate`. May import: the core
(``medres.errors``) and :mod:`medres.evaluate.metrics`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from medres.errors import ConfigError
from medres.evaluate import metrics as M

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything ``run_evaluate`` needs; built once by the CLI (or by library callers)."""

    target: Path
    out: Path
    split: str = "test"
    label: str | None = None
    positive: str | None = None
    scores: tuple[str, ...] = ()
    by: tuple[str, ...] = ()
    n_boot: int = 2000
    seed: int = 0
    threshold: float | None = None
    ci_level: float = 0.95
    ci_transform: str = "none"
    ece_bins: int = 10
    sensitivity_targets: tuple[float, ...] = (0.90, 0.95)
    specificity_targets: tuple[float, ...] = (0.90, 0.95)
    drop_missing: bool = False
    title: str | None = None


def check_config(cfg: EvaluateConfig) -> None:
    """Raise :class:`~medres.errors.ConfigError` for settings out of range."""
    if cfg.n_boot < 0:
        raise ConfigError(f"--n-boot {cfg.n_boot}: must be >= 0 (0 turns the bootstrap off)")
    if 0 < cfg.n_boot < 100:
        log.warning("--n-boot %d is small; percentile CIs need ~1000+ replicates", cfg.n_boot)
    if not 0.5 <= cfg.ci_level < 1.0:
        raise ConfigError(f"--ci-level {cfg.ci_level}: must be in [0.5, 1), e.g. 0.95")
    if cfg.ci_transform not in M.CI_TRANSFORMS:
        raise ConfigError(
            f"--ci-transform {cfg.ci_transform!r} is unknown; known: {', '.join(M.CI_TRANSFORMS)}"
        )
    if cfg.ece_bins < 2:
        raise ConfigError(f"--ece-bins {cfg.ece_bins}: must be >= 2 (10 is the usual choice)")
    for t in (*cfg.sensitivity_targets, *cfg.specificity_targets):
        if not 0.0 < t <= 1.0:
            raise ConfigError(f"operating-point target {t}: must be in (0, 1]")
    if cfg.threshold is not None and not math.isfinite(cfg.threshold):
        raise ConfigError(f"--threshold {cfg.threshold}: must be a finite number")
