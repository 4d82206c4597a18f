"""Ensembles and test-time flips: how many members the plan trains, and the pieces
``run_train`` needs to train them one after the other and join them into one network.

Choices (each is written into the plan or model.json with its numbers):

* **Members: seeds on the official split, not folds.** Member ``k`` trains on the same
  training split with seed ``train.seed + k`` (its own initialisation, sampling order and
  augmentation); the official validation split selects each member's checkpoint (EMA rule,
  :mod:`medres.train.selection`) and then calibrates the *ensemble*: the temperature and
  the operating threshold are fitted on the averaged validation logits of exactly the
  network that is saved. Cross-validation folds (``model.folds``, opt-in,
  :mod:`medres.train.folds`) train each member on more of the data (train+val less one
  fold) but calibrate on out-of-fold logits of single members, not of the averaged network
  (whose logits are less extreme), and re-split a manifest whose split the user may have
  fixed, so the plan does not choose them. Member 0 is exactly the single network a run
  with K = 1 trains.
* **K from the measured time.** With a ``--time-budget``, K is the largest number (at most
  :data:`MAX_MEMBERS`) of *full* trainings (the no-budget default epochs each) that fit the
  budget at the measured epoch time, after the fixed costs and the K-fold prediction cost;
  the members then share the budget equally (each gets up to 3x the default epochs, the LR
  of each follows its share of the clock). When fewer than two full trainings fit, one
  network gets the whole budget. Without a budget K = 1. ``model.ensemble`` overrides.
* **Test-time flips** (``model.tta``): ``auto`` averages the logits over every subset of
  ``transforms.flip_axes`` when the training augmentation used those flips (they are
  label-preserving for the modality by the plan's rule), unless that lowers the
  validation AUC by more than ``eval.auc_tolerance``; ``on`` always, ``off`` never.
* **Time**: the members of a budget run share what is left of the epoch deadline equally
  (:func:`member_deadline`), so an overrun of one member shortens the later ones.

Imports ``medres.train`` siblings lazily, ``medres.models`` and core only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from medres.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "MAX_MEMBERS",
    "check_ensemble_settings",
    "final_network",
    "load_member_best",
    "member_deadline",
    "member_dir",
    "member_spec",
    "plan_members",
    "tta_axes",
    "tta_mode",
]

MAX_MEMBERS = 5
MEMBER_FIXED_S = 3.0  # model build, optimiser, first-batch warm-up of each member
TTA_MODES = ("auto", "on", "off")


def tta_mode(spec: Any) -> str:
    """``model.tta`` as auto/on/off (YAML reads a bare ``on``/``off`` as true/false)."""
    mode = str(spec.model.tta).strip().lower()
    return {"true": "on", "false": "off"}.get(mode, mode)


def check_ensemble_settings(spec: Any) -> None:
    """Refuse a bad ``model.ensemble`` / ``model.tta`` before anything is written."""
    k = spec.model.ensemble
    if not 1 <= k <= 64:
        raise ConfigError(
            f"model.ensemble is {k}; give the number of members, 1 (one network) to 64"
        )
    if tta_mode(spec) not in TTA_MODES:
        raise ConfigError(f"model.tta is {spec.model.tta!r}; use {', '.join(TTA_MODES)}")


def tta_axes(spec: Any) -> tuple[int, ...]:
    """The flip axes averaged at test time by ``model.tta`` (see the module docs)."""
    t = spec.transforms
    mode = tta_mode(spec)
    if mode == "off":
        return ()
    if mode == "auto" and not (t.augment and t.flip_prob > 0):
        return ()
    return tuple(sorted({int(a) for a in t.flip_axes}))


def n_views(flip_axes: Any) -> int:
    """Forward passes per member with test-time flips over ``flip_axes``."""
    return 2 ** len(set(flip_axes))


# ------------------------------------------------------------------------------------- plan
def prediction_extra_s(fp: Any, eval_s: float, members: int, views: int) -> float:
    """Seconds the final predictions cost beyond one network's single pass: K x views passes
    over val and test, and the val pass without flips (the ``auto`` check)."""
    extra = 2 * (fp.n_val + fp.n_test) * eval_s * (members * views - 1)
    return extra + (fp.n_val * eval_s * members if views > 1 else 0.0)


def plan_members(
    fp: Any,
    cand: Any,
    budget_s: float,
    epochs_default: int,
    single: tuple[int, str],
    views: int,
    optimism: float,
) -> tuple[int, int, str]:
    """(members, epochs per member, reason); ``single`` is the one-network (epochs, reason)."""
    if not budget_s:
        return 1, single[0], single[1] + "; one network (no budget: no ensemble)"
    usable = budget_s * (1 - 0.08)
    epoch_s = cand.epoch_s(fp)
    full_s = epochs_default * epoch_s + MEMBER_FIXED_S
    for k in range(MAX_MEMBERS, 1, -1):
        fixed = cand.fixed_s(fp) + prediction_extra_s(fp, cand.timing.eval_s, k, views)
        if fixed + k * full_s <= usable:
            share = (usable - fixed) / k - MEMBER_FIXED_S
            epochs = int(min(3 * epochs_default, optimism * share // epoch_s))
            return k, max(epochs, epochs_default), (
                f"ensemble of {k}: {k} full trainings ({epochs_default} epochs x "
                f"{epoch_s:.1f} s) fit {budget_s / 60:.1f} min (at most {MAX_MEMBERS}); each "
                f"member gets 1/{k} of the time, {optimism}x what fits it"
            )  # fmt: skip
    fits = (usable - cand.fixed_s(fp)) / full_s
    return 1, single[0], (
        f"{single[1]}; one network: {max(fits, 0):.1f} full trainings ({epochs_default} "
        f"epochs x {epoch_s:.1f} s) fit, an ensemble needs 2"
    )  # fmt: skip


# -------------------------------------------------------------------------------------- run
def member_spec(spec: Any, k: int) -> Any:
    """Member ``k``'s spec: seed ``train.seed + k`` (member 0 is the single-network run)."""
    return replace(spec, train=replace(spec.train, seed=spec.train.seed + k))


def member_dir(run_dir: Path, k: int) -> Path:
    """Member ``k``'s checkpoint folder: ``checkpoints/`` for member 0, else
    ``checkpoints/member{k}/``."""
    base = run_dir / "checkpoints"
    return base if k == 0 else base / f"member{k}"


def member_deadline(now: float, deadline: float, remaining: int) -> float:
    """Member's epoch deadline: an equal share of what is left until ``deadline``."""
    if not math.isfinite(deadline):
        return deadline
    return now + max(deadline - now, 0.0) / max(remaining, 1)


def load_member_best(model: Any, folder: Path, device: Any) -> None:
    """Load ``folder/best.pt``'s weights into ``model`` (the last weights when missing)."""
    from medres.train.checkpoint import BEST, load_checkpoint

    best = folder / BEST
    if best.is_file():
        model.load_state_dict(load_checkpoint(best, map_location=device)["model"])
    else:
        log.warning("no best checkpoint (validation metric never defined); using the last weights")


def final_network(members: list[Any], flips: tuple[int, ...]) -> Any:
    """The network to calibrate and save: the member itself (K = 1, no flips), else an
    :class:`~medres.models.ensemble.Ensemble`."""
    if len(members) == 1 and not flips:
        return members[0]
    from medres.models.ensemble import Ensemble

    return Ensemble(members, flips).to(next(members[0].parameters()).device)


def member_record(k: int, spec: Any, state: Any) -> dict[str, Any]:
    """What model.json's ``members`` says about member ``k``."""
    return {
        "seed": spec.train.seed,
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "selected_weights": state.best_source,
        "val_score": None if math.isnan(state.best_metric) else round(state.best_metric, 6),
        "member": k,
    }
