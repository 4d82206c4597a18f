"""Cross-validation ensembles (``model.folds`` / ``--folds K``): K members on K folds of
train+val, calibrated on their out-of-fold logits, saved as one averaged network.

Choices (each is written into ``folds.csv`` or model.json):

* **Folds.** The labelled rows of the manifest's train and val splits (``data.train_split``,
  ``data.val_split``) are pooled and split into K folds by sklearn's
  ``StratifiedGroupKFold(K, shuffle=True, random_state=train.seed)``: grouped by the
  pseudonymous ``patient_key`` (one patient is never in two folds; a row without one is its
  own group) and stratified by the label (the class; multi-label: the rarest positive
  label, or none). The same manifest and seed give the same folds. The official test split
  is untouched. ``folds.csv`` in the run dir holds each pooled row's fold (``image_id``,
  ``source``, ``patient_key``, the original ``split``, the label columns, ``fold``).
  Refused (one-line ConfigError) before anything is written: K outside 2..10, fewer
  patients than K, a class with fewer patients than K (a fold would have none of it),
  ``model.ensemble`` > 1 and ``--resume``.
* **Members.** Member ``k`` (seed ``train.seed + k``, as a seed ensemble's) trains on the
  folds other than ``k`` and selects its checkpoint on fold ``k`` by the usual rule
  (:mod:`medres.train.selection`); ``history.csv`` rows carry ``member`` = ``k`` = the fold
  it validated on. With ``--time-budget`` the members share the clock like a seed
  ensemble's (:func:`medres.train.ensemble.member_deadline`).
* **Out-of-fold logits.** Each pooled row is predicted by the one member that did not train
  on it (fold ``k`` by member ``k``).
* **Aligned offsets.** Members trained on different folds, each stopped at its own best
  epoch, put their logits at different offsets (measured on a synthetic radiograph set:
  member AUCs 0.97, 1.00, 1.00 on their folds, but 0.84 for the pooled out-of-fold
  logits, whose negatives of one member sat above the positives of another). One
  temperature and one threshold cannot fit such a pool, and the pool is not what the
  saved network outputs (there every case gets the same average of all members). So each
  member's logits get a per-class shift fitted on its own fold
  (:func:`~medres.train.calibrate.fit_shift`: the NLL of ``softmax(z + c)``, scale left
  alone so a separable fold cannot make one member dominate the average), folded into its
  ``fc`` bias (:func:`shift_members`; ``members[k].logit_shift`` in model.json;
  ``checkpoints/`` keep the raw weights). That set: pooled out-of-fold AUC 0.84 -> 0.98.
  Multi-label members are not shifted.
* **Calibration.** ``model.tta`` ``auto`` keeps the test-time flips unless they lower the
  (aligned) out-of-fold AUC by more than ``eval.auc_tolerance``. The temperature and the
  operating threshold (:mod:`medres.train.calibrate`) are fitted on the aligned
  out-of-fold logits, and ``predictions_val.csv`` holds them (calibrated; column
  ``fold``: the member that predicted the row, which never saw it; model.json
  ``folds.predictions_val`` says so). ``predictions_test.csv`` is the saved network (the
  K shifted members' mean logit) on the official test split.
* **Known caveat: the out-of-fold logits are single members', the saved network is their
  average.** Averaging the logits of members that disagree pulls them towards zero, so the
  ensemble is a little less confident than the member each out-of-fold logit came from,
  and a temperature fitted on those logits (typically > 1 for an over-confident member)
  leaves the ensemble slightly under-confident; the threshold, chosen on the members'
  probability scale, may sit slightly off for the ensemble. There is no held-out split
  the ensemble has not seen (every pooled row trained K - 1 of its members), so the fit
  uses the out-of-fold logits as the issue asks, and model.json reports what it can
  measure honestly: the out-of-fold AUC (``folds.oof_auc``; before the shifts:
  ``oof_auc_unaligned``) and the out-of-fold NLL/ECE before and after scaling
  (``calibration``, ``split: oof``). ``medres evaluate`` on the test split shows the
  ensemble's own calibration.

Imports ``medres.train`` siblings lazily, sklearn, numpy and core only.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medres.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "MAX_FOLDS",
    "FoldAssignment",
    "OutOfFold",
    "assign_folds",
    "check_fold_count",
    "check_fold_settings",
    "fold_fingerprint",
    "fold_manifest",
    "fold_record",
    "folds_summary",
    "join_out_of_fold",
    "member_choices",
    "plan_folds",
    "predict_fold",
    "shift_members",
    "write_folds_csv",
]

MAX_FOLDS = 10
GROUP_BY = "patient_key"


def check_fold_count(k: int) -> None:
    """Refuse a ``model.folds`` other than 0 (off) or 2..:data:`MAX_FOLDS`."""
    if k != 0 and not 2 <= k <= MAX_FOLDS:
        raise ConfigError(
            f"model.folds (--folds) is {k}; give 2 to {MAX_FOLDS} cross-validation folds "
            "(e.g. --folds 5), or 0 to train on the official split"
        )


def check_fold_settings(spec: Any, resume: bool = False) -> None:
    """Refuse a bad ``model.folds`` (and one combined with an ensemble or ``--resume``)."""
    k = spec.model.folds
    check_fold_count(k)
    if k == 0:
        return
    if spec.model.ensemble > 1:
        raise ConfigError(
            f"model.folds {k} cannot be combined with model.ensemble {spec.model.ensemble}: "
            "the folds already train K members; set model.ensemble=1 or drop --folds"
        )
    if resume:
        raise ConfigError(
            f"--resume of a cross-validation run (model.folds {k}) is not supported; "
            "start a new --out"
        )


@dataclass(frozen=True)
class FoldAssignment:
    """The fold of every pooled train+val row (manifest row index -> fold)."""

    k: int
    fold: Mapping[int, int]
    n_patients: int
    stratify_by: str
    group_by: str = GROUP_BY

    def items_of(self, k: int) -> list[int]:
        """Manifest row indices of fold ``k``."""
        return [i for i, f in self.fold.items() if f == k]


def _strata(items: Sequence[dict[str, Any]], labels: Any) -> np.ndarray:
    """Stratum per item: the class (multi-label: the rarest positive label, or none)."""
    if labels.task != "multilabel":
        return np.asarray([int(it["label"]) for it in items])
    y = np.asarray([it["label"] for it in items])
    freq = y.sum(axis=0)
    order = np.argsort(freq, kind="stable")  # rarest first
    none = labels.num_outputs
    return np.asarray([next((int(j) for j in order if row[j] > 0), none) for row in y])


def _groups(manifest: Any, items: Sequence[dict[str, Any]]) -> np.ndarray:
    keys, missing = [], 0
    for it in items:
        row = manifest.rows[it["index"]]
        pk = row.get(GROUP_BY, "")
        if not pk:
            missing += 1
            pk = "image:" + row["image_id"]
        keys.append(pk)
    if missing:
        log.warning("folds: %d row(s) without %s, each its own group", missing, GROUP_BY)
    return np.asarray(keys)


def _class_patients(
    items: Sequence[dict[str, Any]], groups: np.ndarray, labels: Any
) -> dict[str, int]:
    """Patients per class (multi-label: with a positive of that label) in ``items``."""
    out: dict[str, set[str]] = {c: set() for c in labels.classes}
    for it, g in zip(items, groups, strict=True):
        if labels.task == "multilabel":
            for j in np.flatnonzero(it["label"]):
                out[labels.classes[int(j)]].add(str(g))
        else:
            out[labels.classes[int(it["label"])]].add(str(g))
    return {c: len(v) for c, v in out.items()}


def _check_counts(k: int, groups: np.ndarray, per_class: dict[str, int]) -> None:
    n_patients = len(set(groups))
    if n_patients < k:
        fix = f"use --folds {n_patients} or fewer" if n_patients >= 2 else "add patients"
        raise ConfigError(
            f"model.folds (--folds) is {k} but train+val hold {n_patients} patient(s); one "
            f"patient is never in two folds: {fix}"
        )
    for name, n in per_class.items():
        if n < k:
            fix = f"use --folds {n} or fewer" if n >= 2 else "add cases of that class"
            raise ConfigError(
                f"model.folds (--folds) is {k} but class {name!r} has {n} patient(s) in "
                f"train+val; every fold needs one: {fix}"
            )


def assign_folds(manifest: Any, spec: Any, labels: Any) -> FoldAssignment:
    """The K patient-grouped, label-stratified folds of the pooled train+val rows."""
    from sklearn.model_selection import StratifiedGroupKFold

    from medres.train.data import make_items

    k = spec.model.folds
    d = spec.data
    items = make_items(manifest, d.train_split, labels) + make_items(manifest, d.val_split, labels)
    items.sort(key=lambda it: it["index"])
    groups = _groups(manifest, items)
    strata = _strata(items, labels)
    _check_counts(k, groups, _class_patients(items, groups, labels))
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=spec.train.seed)
    fold: dict[int, int] = {}
    for f, (_, held) in enumerate(cv.split(np.zeros(len(items)), strata, groups)):
        for j in held:
            fold[int(items[j]["index"])] = f
    for f in range(k):
        present = {int(strata[j]) for j, it in enumerate(items) if fold[it["index"]] == f}
        if len(present) < 2:
            log.warning("fold %d holds one stratum only; its validation AUC is undefined", f)
    by = "rarest positive label" if labels.task == "multilabel" else "label"
    log.info(
        "folds: %d rows of %d patients in %d folds (grouped by %s, stratified by %s): %s",
        len(items), len(set(groups)), k, GROUP_BY, by,
        ", ".join(str(sum(1 for v in fold.values() if v == f)) for f in range(k)),
    )  # fmt: skip
    return FoldAssignment(k, dict(sorted(fold.items())), len(set(groups)), by)


def fold_manifest(manifest: Any, a: FoldAssignment, k: int, data: Any) -> Any:
    """The manifest member ``k`` trains on: fold ``k`` is the val split, the other pooled
    rows the train split, unlabelled train/val rows left out, every other row unchanged."""
    pooled = {data.train_split, data.val_split}
    rows = []
    for i, row in enumerate(manifest.rows):
        if i in a.fold:
            row = {**row, "split": data.val_split if a.fold[i] == k else data.train_split}
        elif row.get("split", "") in pooled:
            row = {**row, "split": ""}
        rows.append(row)
    return replace(manifest, rows=rows)


def write_folds_csv(run_dir: Path, manifest: Any, labels: Any, a: FoldAssignment) -> None:
    """``folds.csv``: one row per pooled train+val row with its fold (pseudonymous columns)."""
    from medres.io import atomic_write_text, csv_writer

    cols = ["image_id", "source", GROUP_BY, "split", *labels.label_columns, "fold"]
    buf = io.StringIO()
    w = csv_writer(buf, lineterminator="\n")
    w.writerow(cols)
    for i, f in a.fold.items():
        row = manifest.rows[i]
        w.writerow([*(row.get(c, "") for c in cols[:-1]), f])
    atomic_write_text(run_dir / "folds.csv", buf.getvalue())


# ------------------------------------------------------------------------- out-of-fold logits
@dataclass(frozen=True)
class FoldPrediction:
    """Member ``k``'s logits on fold ``k`` (plain and, with test-time flips, flipped)."""

    k: int
    logits: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    tta_logits: np.ndarray | None = None


@dataclass(frozen=True)
class OutOfFold:
    """Every pooled row's logit from the member that did not train on it (manifest order)."""

    logits: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    fold: np.ndarray
    flips: tuple[int, ...]
    """The test-time flips kept (on the out-of-fold AUC) for the saved network."""
    member_auc: tuple[float, ...]
    auc: float
    tta_stats: dict[str, Any] = field(default_factory=dict)
    shifts: tuple[np.ndarray, ...] = ()
    """Each member's logit shift (folded into its ``fc`` bias by :func:`shift_members`)."""
    auc_unaligned: float = float("nan")
    """The pooled out-of-fold AUC before the shifts."""

    def as_split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, labels, manifest indices), as a predicted split."""
        return self.logits, self.labels, self.index


def predict_fold(
    model: Any, data: Any, state: Any, labels: Any, flips: tuple[int, ...], k: int, rt: Any
) -> FoldPrediction:
    """Member ``k`` (best weights loaded) on its held-out fold (``data.val``)."""
    from medres.train.engine import predict_logits
    from medres.train.ensemble import final_network

    kw = {
        "task": labels.task, "device": rt.device, "amp_dtype": state.amp_dtype,
        "channels_last": state.channels_last, "description": f"predict fold {k}",
    }  # fmt: skip
    z, y, idx, _ = predict_logits(model, data.val, **kw)
    zt = None
    if flips:
        zt = predict_logits(final_network([model], flips), data.val, **kw)[0]
    return FoldPrediction(k, z, y, idx, zt)


def _auc(logits: np.ndarray, y: np.ndarray, labels: Any) -> float:
    from medres.train.engine import compute_metric, logits_to_probs

    if not len(y):
        return float("nan")
    p = logits_to_probs(logits, labels.task)
    return compute_metric(labels.task, p, y, max(labels.positive_index, 0))


def _aligned(
    preds: Sequence[FoldPrediction], labels: Any, tta: bool
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """The folds' logits (fold order) with each member's offset shift (fitted on its fold,
    :func:`~medres.train.calibrate.fit_shift`; none for multi-label), and the shifts."""
    from medres.train.calibrate import fit_shift

    out, shifts = [], []
    for p in preds:
        z = np.asarray(p.tta_logits if tta else p.logits, dtype=np.float64)
        c = np.zeros(z.shape[1]) if labels.task == "multilabel" else fit_shift(z, p.labels)
        out.append(z + c)
        shifts.append(c)
    return np.concatenate(out), tuple(shifts)


def join_out_of_fold(
    preds: Sequence[FoldPrediction], labels: Any, flips: tuple[int, ...], spec: Any
) -> OutOfFold:
    """Join the folds' offset-aligned predictions in manifest order; keep the flips per
    ``model.tta`` (compared on the pooled out-of-fold AUC)."""
    from medres.train.ensemble import tta_mode

    index = np.concatenate([p.index for p in preds])
    order = np.argsort(index, kind="stable")
    y = np.concatenate([p.labels for p in preds])[order]
    fold = np.concatenate([np.full(len(p.index), p.k) for p in preds])[order]
    raw = np.concatenate([p.logits for p in preds])[order]
    plain, shifts = _aligned(preds, labels, tta=False)
    chosen, kept, stats = plain[order], (), {}
    if flips:
        tta, tta_shifts = _aligned(preds, labels, tta=True)
        a_tta, a_plain = _auc(tta[order], y, labels), _auc(chosen, y, labels)
        keep = tta_mode(spec) == "on" or not (a_plain - a_tta > spec.eval.auc_tolerance)
        log.info(
            "test-time flips %s: out-of-fold AUC %.4f with, %.4f without -> %s",
            list(flips), a_tta, a_plain, "kept" if keep else "dropped",
        )  # fmt: skip
        stats = {"val_auc_tta": _nan_none(a_tta), "val_auc_no_tta": _nan_none(a_plain)}
        stats["tta_kept"] = keep
        if keep:
            chosen, kept, shifts = tta[order], flips, tta_shifts
    member_auc = tuple(_auc(chosen[fold == p.k], y[fold == p.k], labels) for p in preds)
    auc, auc_raw = _auc(chosen, y, labels), _auc(raw, y, labels)
    log.info(
        "out-of-fold AUC %.4f over %d rows (folds: %s; %.4f before aligning the members' "
        "offsets)", auc, len(y), ", ".join(f"{a:.4f}" for a in member_auc), auc_raw,
    )  # fmt: skip
    return OutOfFold(chosen, y, index[order], fold, kept, member_auc, auc, stats, shifts, auc_raw)


def shift_members(members: Sequence[Any], shifts: Sequence[np.ndarray]) -> None:
    """Fold each member's offset shift into its classifier bias (``fc``), in place, so the
    saved network averages the aligned logits the calibration was fitted on."""
    import torch

    with torch.no_grad():
        for m, c in zip(members, shifts, strict=True):
            bias = m.fc.bias
            bias.add_(torch.as_tensor(c, dtype=bias.dtype, device=bias.device))


# --------------------------------------------------------------------------------- model.json
def _nan_none(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else round(float(x), 6)


def fold_record(
    record: dict[str, Any], a: FoldAssignment, k: int, oof: OutOfFold
) -> dict[str, Any]:
    """A member's model.json record with its fold: ``fold``, rows trained/validated on, the
    out-of-fold AUC of its selected weights on fold ``k`` and its logit shift."""
    n_val = len(a.items_of(k))
    shift = [round(float(v), 6) for v in oof.shifts[k]] if oof.shifts else []
    return {**record, "fold": k, "n_train": len(a.fold) - n_val, "n_val": n_val,
            "oof_auc": _nan_none(oof.member_auc[k]), "logit_shift": shift}  # fmt: skip


def folds_summary(
    a: FoldAssignment, oof: OutOfFold, records: Sequence[Mapping[str, Any]], seed: int
) -> dict[str, Any]:
    """model.json's ``folds`` object: the assignment, each member's selection score on its
    fold (``member_val_score``: the metric its checkpoint was chosen by) and out-of-fold
    AUC (``member_oof_auc``: its selected weights, flips as saved), and the pooled
    out-of-fold AUC (``oof_auc``, before the temperature: the same for binary tasks; a
    multi-class AUC may move slightly with it, model.json ``val_auc`` is after)."""
    return {
        "k": a.k,
        "group_by": a.group_by,
        "stratify_by": a.stratify_by,
        "seed": seed,
        "n_rows": len(a.fold),
        "n_patients": a.n_patients,
        "fold_sizes": [len(a.items_of(f)) for f in range(a.k)],
        "member_val_score": [r.get("val_score") for r in records],
        "member_oof_auc": [_nan_none(x) for x in oof.member_auc],
        "oof_auc": _nan_none(oof.auc),
        "oof_auc_unaligned": _nan_none(oof.auc_unaligned),
        "predictions_val": "out-of-fold: each train+val row predicted by the member that "
        "did not train on it (column fold); folds.csv holds the assignment",
    }


# --------------------------------------------------------------------------------------- plan
def fold_fingerprint(fp: Any, k: int) -> Any:
    """``fp`` as one fold member sees it: train+val pooled, 1/k of it validating."""
    pooled = fp.n_train + fp.n_val
    n_val = math.ceil(pooled / k)
    return replace(fp, n_train=pooled - n_val, n_val=n_val)


def plan_folds(
    fp: Any, cand: Any, budget_s: float, epochs_default: int, k: int, views: int,
    optimism: float,
) -> tuple[int, float, float, str]:  # fmt: skip
    """``medres plan/train --folds K``: (epochs per member, seconds per member epoch, fixed
    seconds, reason); without a budget each member trains the default epochs. The fixed time adds
    the caching of each member's data and the K-member predictions; with a budget the K
    members share it equally (each up to 3x the default epochs)."""
    from medres.train.ensemble import MEMBER_FIXED_S, prediction_extra_s

    epoch_s = cand.epoch_s(fold_fingerprint(fp, k))
    fixed = (
        cand.fixed_s(fp)
        + (k - 1) * (fp.n_train + fp.n_val) * cand.pre_s
        + prediction_extra_s(fp, cand.timing.eval_s, k, views)
        + k * MEMBER_FIXED_S
    )
    if not budget_s:
        return epochs_default, epoch_s, fixed, f"{k} folds x {epochs_default} epochs (no budget)"
    share = (budget_s * (1 - 0.08) - fixed) / k
    epochs = max(1, int(min(3 * epochs_default, optimism * share // epoch_s)))
    why = (
        f"{k} folds: each member gets 1/{k} of {budget_s / 60:.1f} min, {epochs} epochs x "
        f"{epoch_s:.1f} s ({optimism}x what fits)"
    )
    if epochs < epochs_default:
        why += f"; under the default {epochs_default}: fewer folds or a larger budget"
    return epochs, epoch_s, fixed, why


def member_choices(
    fp: Any,
    cand: Any,
    budget_s: float,
    epochs: tuple[int, int, str],
    views: int,
    optimism: float,
    folds: int = 0,
) -> tuple[int, int, float, float, str, list[tuple[str, Any, str]]]:
    """The plan's members: (K, epochs per member, epoch s, fixed s, reason, the
    ``model.ensemble`` / ``model.folds`` choices as (key, value, reason)). ``epochs`` is (the
    no-budget default, one network's epochs, its reason); ``folds`` (``--folds K``) makes K
    fold members share the budget (:func:`plan_folds`), else a seed ensemble or one network
    (:func:`medres.train.ensemble.plan_members`)."""
    from medres.train.ensemble import plan_members, prediction_extra_s

    default, single, why = epochs
    if folds:
        n, epoch_s, fixed_s, why = plan_folds(fp, cand, budget_s, default, folds, views, optimism)
        return folds, n, epoch_s, fixed_s, why, [
            ("model.ensemble", 1, "--folds trains the members"), ("model.folds", folds, why)
        ]  # fmt: skip
    k, n, why = plan_members(fp, cand, budget_s, default, (single, why), views, optimism)
    fixed_s = cand.fixed_s(fp) + prediction_extra_s(fp, cand.timing.eval_s, k, views)
    reason = why.rsplit("; ", 1)[-1] if k == 1 else why
    return k, n, cand.epoch_s(fp), fixed_s, why, [("model.ensemble", k, reason)]
