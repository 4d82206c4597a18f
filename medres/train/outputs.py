"""The run directory: its layout checks, history, predictions and the model directory.

Owns what ``run_train`` writes besides checkpoints: ``history.csv`` (one row per epoch),
``predictions_<split>.csv`` (one row per image: labels, ``prob_<class>``, ``pred`` and the
manifest's passthrough columns), TensorBoard logs and ``model/`` (weights + model.json,
via :func:`medres.models.save_model_dir`), plus :func:`finish`, which predicts val/test
with the best checkpoint, fits the temperature and the operating threshold on the
validation logits (:mod:`medres.train.calibrate`), writes both CSVs with the calibrated
probabilities and ``pred`` at that threshold, and records both in model.json. Imports ``medres.train`` siblings, ``medres.models``,
``medres.dataset.manifest``, ``medres.runtime`` and core only; every file is written
atomically.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medres.dataset.manifest import Manifest
from medres.errors import TrainError
from medres.io import atomic_write_text, csv_dict_writer, csv_writer
from medres.runtime import Runtime
from medres.train.data import DataBundle, LabelInfo
from medres.train.spec import PipelineSpec

log = logging.getLogger(__name__)

__all__ = [
    "PASSTHROUGH",
    "TrainResult",
    "TrainedRun",
    "finish",
    "history_csv",
    "open_tensorboard",
    "prepare_run_dir",
    "write_history",
    "write_predictions",
]

PASSTHROUGH = ("modality", "manufacturer", "body_part", "sex", "age", "patient_key", "study_key")


@dataclass(frozen=True)
class TrainedRun:
    """What prediction needs from a fitted run: its data, labels, model and engine state."""

    manifest: Manifest
    labels: LabelInfo
    model: torch.nn.Module
    state: Any
    """The engine's ``TrainState`` (amp dtype, channels_last, epochs, history)."""
    data: DataBundle
    rt: Runtime
    members: tuple[dict[str, Any], ...] = ()
    """Ensemble members' records (:func:`medres.train.ensemble.member_record`)."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    model_dir: Path
    epochs_completed: int
    best_epoch: int
    best_val_auc: float
    val_auc: float
    test_auc: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 0
    """DDP rank of this process; only rank 0 wrote files and holds the AUCs."""


def prepare_run_dir(run_dir: Path, resume: bool, rt: Runtime) -> Path:
    """Refuse a wrong ``--resume`` either way (writes nothing); returns last.pt's path."""
    from medres.train.checkpoint import LAST

    last = run_dir / "checkpoints" / LAST
    if resume and not last.is_file():
        raise TrainError(
            f"{run_dir}: nothing to resume (checkpoints/{LAST} is missing); run without --resume"
        )
    if not resume and (last.is_file() or (run_dir / "model").exists()):
        raise TrainError(
            f"{run_dir}: already holds a training run; pass --resume to continue it or choose a new --out"
        )
    return last


def open_tensorboard(spec: PipelineSpec, run_dir: Path, rt: Runtime) -> Any:
    """A SummaryWriter under RUN_DIR/tensorboard (rank 0, when installed), else None."""
    if not (spec.train.tensorboard and rt.main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.debug("tensorboard not installed; no TensorBoard logs")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def history_csv(history: list[dict[str, Any]]) -> str:
    """The CSV text of ``history`` (floats to 8 significant digits)."""
    if not history:
        return ""
    names = list(dict.fromkeys(k for row in history for k in row))  # rows of older releases
    buf = io.StringIO()
    w = csv_dict_writer(buf, names, lineterminator="\n", restval="")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / "history.csv", history_csv(history))


def _pred_label(p: np.ndarray, labels: LabelInfo, threshold: float) -> str:
    if labels.task == "multilabel":
        return ";".join(c for c, v in zip(labels.classes, p, strict=True) if v >= threshold)
    if labels.task == "binary":
        pos = labels.positive_index
        return labels.classes[pos] if p[pos] >= threshold else labels.classes[1 - pos]
    return labels.classes[int(np.argmax(p))]


def write_predictions(
    path: Path,
    manifest: Manifest,
    labels: LabelInfo,
    split: str | None,
    probs: np.ndarray,
    idx: np.ndarray,
    threshold: float,
    extra: dict[str, Sequence[Any]] | None = None,
) -> None:
    """``predictions_<split>.csv``: one row per predicted manifest row; ``extra`` columns
    (one value per row) go last. ``split`` None: each row's own manifest split."""
    extra = extra or {}
    cols = [
        "image_id",
        "split",
        *labels.label_columns,
        *(f"prob_{c}" for c in labels.classes),
        "pred",
        *PASSTHROUGH,
        *extra,
    ]
    buf = io.StringIO()
    w = csv_writer(buf, lineterminator="\n")
    w.writerow(cols)
    for n, (p, i) in enumerate(zip(probs, idx, strict=True)):
        row = manifest.rows[int(i)]
        w.writerow(
            [
                row["image_id"],
                row.get("split", "") if split is None else split,
                *(row.get(c, "") for c in labels.label_columns),
                *(f"{float(v):.8g}" for v in p),
                _pred_label(p, labels, threshold),
                *(row.get(c, "") for c in PASSTHROUGH),
                *(values[n] for values in extra.values()),
            ]
        )
    atomic_write_text(path, buf.getvalue())


def _predict_logits(
    spec: PipelineSpec, split: str, run: TrainedRun
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, labels, manifest indices) of one split with the loaded (best) weights."""
    from medres.train.data import EpochSampler, build_loader, make_dataset, make_items
    from medres.train.engine import predict_logits
    from medres.train.transforms import build_transforms

    manifest, labels, data, rt = run.manifest, run.labels, run.data, run.rt
    if split == spec.data.val_split:
        items, ds = data.val_items, data.val.dataset
    else:
        items = make_items(manifest, split, labels)
        ds = make_dataset(items, build_transforms(spec.transforms, train=False), cache="none")
    loader = build_loader(
        ds,
        EpochSampler(len(items), shuffle=False),
        batch_size=spec.eval.batch_size,
        workers=spec.data.workers,
    )
    logits, y, idx, _ = predict_logits(
        run.model, loader, task=labels.task, device=rt.device, amp_dtype=run.state.amp_dtype,
        channels_last=run.state.channels_last, description=f"predict {split}",
    )  # fmt: skip
    if not items:
        logits = np.zeros((0, labels.num_outputs))
    return logits, y, idx


def _calibrate(spec: PipelineSpec, labels: LabelInfo, val: tuple[np.ndarray, ...]) -> Any:
    """Temperature and operating threshold fitted on the validation logits."""
    from medres.train.calibrate import fit_calibration, parse_threshold_rule

    rule = parse_threshold_rule(spec.eval.threshold_rule, spec.eval.threshold)
    logits, y, _ = val
    return fit_calibration(
        logits, y, task=labels.task, positive_index=max(labels.positive_index, 0), rule=rule,
        enabled=spec.eval.calibrate,
    )  # fmt: skip


def _write_split(
    spec: PipelineSpec,
    split: str,
    run: TrainedRun,
    out: Path,
    pred: tuple[np.ndarray, ...],
    cal: Any,
    oof: Any = None,
) -> float:
    """Calibrated ``predictions_<split>.csv``; returns the split's AUC (NaN when undefined).
    With ``oof`` (:class:`~medres.train.folds.OutOfFold`) the rows are out-of-fold: each
    keeps its manifest split and gets a ``fold`` column."""
    from medres.train.calibrate import apply_temperature
    from medres.train.engine import compute_metric

    labels = run.labels
    logits, y, idx = pred
    probs = apply_temperature(logits, cal.temperature, labels.task)
    threshold = cal.threshold if cal.threshold is not None else spec.eval.threshold
    if oof is None:
        write_predictions(out, run.manifest, labels, split, probs, idx, threshold)
    else:
        extra = {"fold": [int(f) for f in oof.fold]}
        write_predictions(out, run.manifest, labels, None, probs, idx, threshold, extra)
    pos = max(labels.positive_index, 0)
    return compute_metric(labels.task, probs, y, pos) if len(idx) else float("nan")


def _model_meta(
    spec: PipelineSpec,
    run: TrainedRun,
    wmeta: dict[str, Any],
    val_auc: float,
    cal: Any,
    extra: dict[str, Any] | None = None,
) -> Any:
    """The ``ModelMeta`` of model.json: the architecture from the model, the rest from training."""
    from medres.models import ModelMeta
    from medres.train.transforms import preprocessing_dict

    labels, state = run.labels, run.state
    binary = labels.task == "binary"
    many = len(run.members) > 1
    sources = ",".join(str(m["selected_weights"]) for m in run.members)
    return ModelMeta.for_model(
        run.model,
        task=labels.task,
        classes=tuple(labels.classes),
        label_columns=tuple(labels.label_columns),
        weights_source=spec.model.weights,
        preprocessing=preprocessing_dict(spec.transforms, weights=wmeta),
        threshold=cal.threshold if binary else spec.eval.threshold,
        threshold_rule=cal.rule if binary else None,
        temperature=cal.temperature,
        calibration=cal.stats,
        selected_weights=sources if many else state.best_source,
        best_epoch=None if many else state.best_epoch,
        members=run.members if many else (),
        val_auc=None if math.isnan(val_auc) else val_auc,
        positive_class=labels.positive_class if binary else None,
        extra=extra or {},
    )


def _choose_tta(spec: PipelineSpec, run: TrainedRun) -> tuple[TrainedRun, dict[str, Any]]:
    """``model.tta`` ``auto``: keep the test-time flips unless they lower the validation AUC
    by more than ``eval.auc_tolerance``; returns the run to save and what was measured."""
    from medres.train.engine import compute_metric, logits_to_probs
    from medres.train.ensemble import final_network, tta_mode

    flips = tuple(getattr(run.model, "tta_flips", ()))
    if not flips:
        return run, {}
    plain = dataclasses.replace(run, model=final_network(list(run.model.members), ()))
    pos = max(run.labels.positive_index, 0)
    aucs = {}
    for name, r in (("tta", run), ("no_tta", plain)):
        z, y, _ = _predict_logits(spec, spec.data.val_split, r)
        p = logits_to_probs(z, run.labels.task) if len(y) else z
        aucs[name] = compute_metric(run.labels.task, p, y, pos) if len(y) else float("nan")
    keep = tta_mode(spec) == "on" or not (aucs["no_tta"] - aucs["tta"] > spec.eval.auc_tolerance)
    log.info(
        "test-time flips %s: val AUC %.4f with, %.4f without -> %s",
        list(flips), aucs["tta"], aucs["no_tta"], "kept" if keep else "dropped",
    )  # fmt: skip
    stats = {"val_auc_tta": aucs["tta"], "val_auc_no_tta": aucs["no_tta"], "tta_kept": keep}
    stats = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in stats.items()}
    return (run if keep else plain), stats


def _best_val_auc(history: Sequence[dict[str, Any]]) -> float:
    vals = (r["val_auc"] for r in history if not math.isnan(r["val_auc"]))
    return max(vals, default=float("nan"))


def finish(
    spec: PipelineSpec,
    run: TrainedRun,
    wmeta: dict[str, Any],
    run_dir: Path,
    t_start: float,
    oof: Any = None,
    extra_meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Best checkpoint -> calibration on val -> predictions_val/test.csv and the model dir.

    Rank 0 only. The probabilities in both CSVs are temperature-scaled and ``pred`` uses
    the validation-chosen threshold (binary), exactly as ``medres score`` will. With
    ``oof`` (a cross-validation run, :mod:`medres.train.folds`) the out-of-fold logits
    stand in for the validation split (test-time flips already chosen on them):
    calibration is fitted on them and they are predictions_val.csv; ``extra_meta`` goes
    into model.json as it is.
    """
    from medres.models import save_model_dir
    from medres.train.checkpoint import non_finite

    state = run.state
    val_split, test_split = spec.data.val_split, spec.data.test_split
    if oof is None:
        run, tta_stats = _choose_tta(spec, run)
        preds = {split: _predict_logits(spec, split, run) for split in (val_split, test_split)}
    else:
        tta_stats = dict(oof.tta_stats)
        preds = {val_split: oof.as_split(), test_split: _predict_logits(spec, test_split, run)}
    cal = _calibrate(spec, run.labels, preds[val_split])
    if oof is not None:  # fitted on the pooled train+val rows, each predicted out of fold
        cal = dataclasses.replace(cal, stats={**cal.stats, "split": "oof"})
    if tta_stats:
        cal = dataclasses.replace(cal, stats={**cal.stats, **tta_stats})
    aucs = {}
    for split, name in ((val_split, "val"), (test_split, "test")):
        out = run_dir / f"predictions_{name}.csv"
        fold_rows = oof if split == val_split else None
        aucs[split] = _write_split(spec, split, run, out, preds[split], cal, fold_rows)
    val_auc = aucs[val_split]
    bad = non_finite(run.model.state_dict())
    if bad:
        raise TrainError(
            f"model weight {bad} holds NaN/inf (training diverged); the model dir was not "
            "written; lower --lr, check the input images, or use --set train.amp=none"
        )
    meta = _model_meta(spec, run, wmeta, val_auc, cal, extra_meta)
    model_dir = save_model_dir(run_dir / "model", run.model, meta)
    return TrainResult(
        run_dir=run_dir,
        model_dir=Path(model_dir),
        epochs_completed=state.epoch,
        best_epoch=state.best_epoch,
        best_val_auc=_best_val_auc(state.history),
        val_auc=val_auc,
        test_auc=aucs[test_split],
        seconds=time.perf_counter() - t_start,
        history=state.history,
    )
