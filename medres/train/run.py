"""``run_train``: manifest + pipeline spec -> a complete run directory.

``run_train`` is a short sequence of named stages: read the manifest
(:mod:`medres.dataset.manifest`) and resolve the spec (:mod:`medres.train.resolve`), set
up the runtime (:mod:`medres.runtime`: device, DDP under torchrun, threads, seeds), build
the model (here), the data (:mod:`medres.train.data`) and the engine state, restore a
checkpoint when resuming (:mod:`medres.train.checkpoint`), ``engine.fit`` with per-epoch
checkpoints, then predict val/test with the best checkpoint and save the model directory
(:mod:`medres.train.outputs`). This module owns that sequence, the model set-up
(pretrained weights, channels_last, DDP/compile wrapping) and the per-epoch callbacks.

Run directory::

    pipeline.yaml          the resolved spec (replayable)
    history.csv            one row per epoch
    checkpoints/last.pt    full state (resume), checkpoints/best.pt (best weights)
    model/                 weights.safetensors + model.json (classes, task, preprocessing)
    predictions_val.csv, predictions_test.csv
    folds.csv              cross-validation runs (``model.folds``): each train+val row's fold
    tensorboard/           when tensorboard is installed

Ensembles (``model.ensemble``, :mod:`medres.train.ensemble`) and cross-validation ensembles
(``model.folds``, :mod:`medres.train.folds`) train their members one after the other here
(``checkpoints/member{k}/``) and save them as one network.

DDP (``torchrun --nproc-per-node N -m medres train ...``): gloo on CPU, nccl on CUDA; each
rank trains on its shard; only rank 0 writes files. Resume is exact on one machine in
deterministic mode: sampling and augmentation depend only on (seed, epoch), every other
RNG state is restored from the checkpoint, and so are the weight EMA and the
best-candidate record.

Reproducibility: on CPU the same data, spec and seed give bit-identical weights and
predictions on one machine: the automatic thread count follows the core count, never the
load (:func:`medres.runtime.auto_threads`), and ``train.threads`` pins it; see the README's
"Model selection, calibration and thresholds" for what CUDA does and does not guarantee.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from medres.dataset.manifest import Manifest
from medres.errors import ConfigError
from medres.runtime import Runtime, unwrap
from medres.train.outputs import TrainResult
from medres.train.resolve import build_spec, resolve_spec
from medres.train.spec import PipelineSpec, dump_pipeline

log = logging.getLogger(__name__)

__all__ = ["EpochCallback", "TrainResult", "build_spec", "resolve_spec", "run_train"]

EpochCallback = Callable[[int, dict[str, Any]], None]
"""``on_epoch_end(epoch, row)``: called after epoch ``epoch``'s checkpoint is written."""


# ------------------------------------------------------------------------------------ stages
def _read_inputs(spec: PipelineSpec) -> tuple[PipelineSpec, Manifest, Any]:
    """Read the manifest, refuse patient leakage, missing images and mixed 2D/3D, resolve
    the spec: (spec, manifest, labels)."""
    from medres.dataset.manifest import read_manifest
    from medres.train.data import check_images, check_leakage

    if not spec.data.manifest:
        raise ConfigError("data.manifest is not set; pass --manifest DIR/manifest.csv")
    manifest = read_manifest(spec.data.manifest)
    check_leakage(manifest.rows, Path(manifest.path).name)
    spec, labels = resolve_spec(spec, manifest)
    check_images(manifest, spec.data)
    _check_quality_settings(spec)
    return spec, manifest, labels


def _check_quality_settings(spec: PipelineSpec) -> None:
    """Refuse a bad threshold rule, EMA decay or AUC tolerance before anything is written."""
    from medres.train.calibrate import parse_threshold_rule
    from medres.train.ensemble import check_ensemble_settings
    from medres.train.folds import check_fold_settings

    parse_threshold_rule(spec.eval.threshold_rule, spec.eval.threshold)
    check_ensemble_settings(spec)
    check_fold_settings(spec)
    if not 0.0 <= spec.train.ema_decay < 1.0:
        raise ConfigError(
            f"train.ema_decay is {spec.train.ema_decay}; use a value in [0, 1), e.g. 0.998 "
            "(0 turns the weight EMA off)"
        )
    if not 0.0 <= spec.eval.auc_tolerance < 1.0:
        raise ConfigError(
            f"eval.auc_tolerance is {spec.eval.auc_tolerance}; use a value in [0, 1), e.g. 0.005"
        )


def _cpu_threads(spec: PipelineSpec) -> int:
    """``train.threads``; with ``train.deterministic`` and threads 0, a count that does not
    depend on the machine's load (the automatic count does, and a different thread count
    changes float reductions, hence the weights, in the last bits)."""
    from medres.runtime import dist_env

    if spec.train.threads or not spec.train.deterministic or spec.train.device.startswith("cuda"):
        return spec.train.threads
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1) // dist_env().local_world)


def _start_runtime(spec: PipelineSpec) -> Runtime:
    from medres.runtime import setup_runtime

    rt = setup_runtime(spec.train.device, threads=_cpu_threads(spec), setting="train.device")
    if rt.device.type == "cpu":
        log.info(
            "CPU threads: %d (from the core count, not the load, so same-seed runs are "
            "bit-identical; on a busy machine pin it with --set train.threads=N)",
            torch.get_num_threads(),
        )
    if rt.distributed and spec.model.freeze_backbone_epochs:
        raise ConfigError(
            "model.freeze_backbone_epochs is not supported under torchrun DDP; set it to 0 "
            "or train on one process"
        )
    return rt


def _build_model(
    spec: PipelineSpec, labels: Any, rt: Runtime
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network on ``rt.device`` with its pretrained weights; (model, weights meta)."""
    from medres.models import build_model, load_pretrained, weights_meta

    m = spec.model
    model = build_model(
        m.arch,
        m.dims,
        m.in_channels,
        labels.num_outputs,
        stem=m.stem,
        image_size=list(spec.transforms.image_size),
    )
    if m.weights not in ("", "none"):
        report = load_pretrained(model, m.weights, arch=m.arch, dims=m.dims)
        wmeta = dict(report.meta)
    else:
        wmeta = weights_meta("none", m.arch, in_channels=m.in_channels)
    model.to(rt.device)
    return model, wmeta


def _channels_last(spec: PipelineSpec, rt: Runtime) -> bool:
    cl = spec.model.channels_last
    return cl == "on" or (cl == "auto" and rt.device.type == "cuda")


def _wrap(model: torch.nn.Module, spec: PipelineSpec, rt: Runtime) -> torch.nn.Module:
    """channels_last memory format, DistributedDataParallel, ``torch.compile`` as asked."""
    if _channels_last(spec, rt):
        model = model.to(
            memory_format=torch.channels_last if spec.model.dims == 2 else torch.channels_last_3d
        )
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    if spec.model.compile:
        model = torch.compile(model)
    return model


def _make_state(
    spec: PipelineSpec, model: torch.nn.Module, data: Any, labels: Any, rt: Runtime
) -> Any:
    """The engine's TrainState: wrapped model, optimiser, schedule, loss, AMP."""
    from medres.train.engine import (
        TrainState,
        make_loss,
        make_optimizer,
        make_scheduler,
        resolve_amp,
    )

    wrapped = _wrap(model, spec, rt)
    optimizer = make_optimizer(model, spec.train, spec.model.backbone_lr_mult)
    steps_per_epoch = math.ceil(len(data.train) / spec.train.grad_accum)
    amp_dtype = resolve_amp(spec.train.amp, rt.device)
    cw = data.class_weights.to(rt.device) if data.class_weights is not None else None
    loss_fn = make_loss(labels.task, label_smoothing=spec.train.label_smoothing, class_weights=cw)
    ema = None
    if spec.train.ema_decay > 0:
        from medres.train.ema import WeightEma

        ema = WeightEma(model, spec.train.ema_decay)
    return TrainState(
        model=wrapped,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, spec.train, steps_per_epoch),
        loss_fn=loss_fn.to(rt.device),
        device=rt.device,
        task=labels.task,
        amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        grad_accum=spec.train.grad_accum,
        grad_clip=spec.train.grad_clip,
        channels_last=_channels_last(spec, rt),
        ema=ema,
    )


def _before_epoch(
    spec: PipelineSpec, model: torch.nn.Module, data: Any, rt: Runtime
) -> Callable[[int], None]:
    """Re-seed sampling/augmentation from (seed, epoch); (un)freeze the backbone."""
    from medres.models import set_backbone_trainable
    from medres.train.data import seed_loader_epoch

    freeze = spec.model.freeze_backbone_epochs

    def before_epoch(epoch: int) -> None:
        seed_loader_epoch(data.train, spec.train.seed, epoch, rt.rank)
        seed_loader_epoch(data.val, spec.train.seed, epoch, 0)
        if freeze:
            set_backbone_trainable(model, epoch >= freeze)

    return before_epoch


def _log_scalars(tb: Any, row: dict[str, Any], epoch: int) -> None:
    for k, v in row.items():
        if isinstance(v, float) and k != "epoch":
            tb.add_scalar(k, v, epoch)
    tb.flush()


def _epoch_end(
    spec_dict: dict[str, Any],
    run_dir: Path,
    rt: Runtime,
    tb: Any,
    user: EpochCallback | None,
    member: tuple[int, int, list[dict[str, Any]]] = (0, 1, []),
) -> Callable[[Any, dict[str, Any], bool], None]:
    """Rank 0 writes best.pt, last.pt (in the member's folder), history.csv (every member's
    rows so far; ``member`` is (index, K, earlier members' rows)) and TensorBoard; all
    ranks sync."""
    from medres.runtime import barrier
    from medres.train import checkpoint as ckpt
    from medres.train.ensemble import member_dir
    from medres.train.outputs import write_history

    k, n_members, prior = member
    folder = member_dir(run_dir, k)

    def on_epoch_end(st: Any, row: dict[str, Any], is_best: bool) -> None:
        if n_members > 1:
            row["member"] = k
        if rt.main:
            if is_best:
                model = st.ema.module if st.best_source == "ema" else unwrap(st.model)
                best = {
                    "model": model.state_dict(),
                    "epoch": st.epoch,
                    "score": st.best_metric,
                    "source": st.best_source,
                }
                ckpt.save_checkpoint(folder / ckpt.BEST, best)
            ckpt.save_checkpoint(folder / ckpt.LAST, ckpt.state_payload(st, spec_dict))
            write_history(run_dir, prior + st.history)
            if tb is not None:
                _log_scalars(tb, row, len(prior) + st.epoch)
        if rt.distributed:
            barrier()
        if user is not None:
            user(st.epoch, row)

    return on_epoch_end


# --------------------------------------------------------------------------------------- run
@contextlib.contextmanager
def _run_dir_lock(run_dir: Path, rt: Runtime) -> Iterator[None]:
    """Rank 0 holds ``output_lock(run_dir, "train")`` for the whole run; every rank learns
    whether it got it (one all-reduce), so a refused lock stops all ranks, none waits."""
    from medres.io import MIN_FREE_BYTES, check_output_dir, largest_file, output_lock

    with contextlib.ExitStack() as stack:
        error: ConfigError | None = None
        if rt.main:
            check_output_dir(run_dir, MIN_FREE_BYTES)  # a file/read-only --out; disk space

            def need() -> int:  # a full disk later: a checkpoint rewrite needs its size again
                return 2 * largest_file(run_dir)

            try:
                stack.enter_context(output_lock(run_dir, command="train", need_bytes=need))
            except ConfigError as exc:
                error = exc
        if rt.distributed:
            import torch.distributed as dist

            flag = torch.tensor([0 if error is None else 1], device=rt.device)
            dist.all_reduce(flag)
            if error is None and int(flag.item()):
                error = ConfigError(f"rank 0 could not lock --out {run_dir.name!r}; see its error")
        if error is not None:
            raise error
        yield


def _check_resume(spec: PipelineSpec, last_path: Path, rt: Runtime) -> dict[str, Any]:
    """Load last.pt and refuse an incompatible resume before anything is written."""
    from medres.train import checkpoint as ckpt

    saved = ckpt.load_checkpoint(last_path, map_location=rt.device)
    ckpt.check_resume(saved, spec.to_dict(), last_path)
    return saved


def _train_member(
    spec: PipelineSpec,
    k: int,
    ctx: dict[str, Any],
    saved: dict[str, Any] | None,
    deadline: float,
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Train ensemble member ``k`` (seed ``train.seed + k``; member 0 is the single-network
    run) on ``ctx["manifest"]`` (a fold's, in a cross-validation run) and load its best
    weights: (model, engine state, weights meta)."""
    from medres.runtime import seed_everything
    from medres.train import checkpoint as ckpt
    from medres.train.data import build_data
    from medres.train.engine import fit
    from medres.train.ensemble import load_member_best, member_dir

    rt, run_dir, labels = ctx["rt"], ctx["run_dir"], ctx["labels"]
    seed_everything(spec.train.seed, spec.train.deterministic)
    model, wmeta = _build_model(spec, labels, rt)
    if ctx.get("data") is None:  # built once, after member 0's model (as a single run)
        ctx["data"] = build_data(spec, ctx["manifest"], labels, rt, run_dir)
    data = ctx["data"]
    state = _make_state(spec, model, data, labels, rt)
    train_loader = data.train
    if math.isfinite(deadline):  # --time-budget: the LR follows the clock; epochs end at it
        from medres.train.plan import DeadlineLoader, budget_scheduler

        steps = math.ceil(len(data.train) / spec.train.grad_accum)
        state.scheduler = budget_scheduler(state.optimizer, spec.train, steps, deadline)
        if not rt.distributed:  # ranks must agree on the batch count
            train_loader = DeadlineLoader(data.train, deadline)
    spec_dict = spec.to_dict()
    if saved is not None:
        ckpt.restore_state(state, saved, spec_dict, ctx["last_path"])
    member = (k, ctx.get("n_members", spec.model.ensemble), ctx["rows"])
    fit(
        state, train_loader, data.val, epochs=spec.train.epochs, metric=spec.eval.metric,
        early_stopping=spec.train.early_stopping, positive_index=max(labels.positive_index, 0),
        auc_tolerance=spec.eval.auc_tolerance, before_epoch=_before_epoch(spec, model, data, rt),
        on_epoch_end=_epoch_end(spec_dict, run_dir, rt, ctx["tb"], ctx["user"], member),
        deadline=deadline,
    )  # fmt: skip
    if rt.main:
        load_member_best(model, member_dir(run_dir, k), rt.device)
    return model, state, wmeta


def _train_members(
    spec: PipelineSpec, ctx: dict[str, Any], saved: dict[str, Any] | None, deadline: float
) -> tuple[list[torch.nn.Module], list[dict[str, Any]], Any, dict[str, Any], list[Any]]:
    """Train the ``model.ensemble`` (or ``model.folds``) members one after the other; a fold
    member trains on its fold's manifest and predicts its held-out fold (rank 0): (members,
    records, last engine state, weights meta, fold predictions)."""
    from medres.train.ensemble import member_deadline, member_record, member_spec, tta_axes
    from medres.train.folds import fold_manifest, predict_fold

    folds, rt = ctx["folds"], ctx["rt"]
    n = ctx["n_members"]
    members, records, fold_preds, state, wmeta = [], [], [], None, {}
    for k in range(n):
        mspec = member_spec(spec, k)
        if folds is not None:  # fold k is this member's val split; data built anew
            ctx["manifest"] = fold_manifest(ctx["official"], folds, k, spec.data)
            ctx["data"] = None
        end = member_deadline(time.perf_counter(), deadline, n - k)
        model, state, wmeta = _train_member(mspec, k, ctx, saved if k == 0 else None, end)
        members.append(model)
        records.append(member_record(k, mspec, state))
        if folds is not None and rt.main:
            pred = predict_fold(model, ctx["data"], state, ctx["labels"], tta_axes(spec), k, rt)
            fold_preds.append(pred)
        ctx["rows"] = ctx["rows"] + state.history
    return members, records, state, wmeta, fold_preds


def _train_locked(
    spec: PipelineSpec,
    inputs: tuple[Manifest, Any, Any],
    rt: Runtime,
    run_dir: Path,
    resume: bool,
    on_epoch_end: EpochCallback | None,
    t_start: float,
    deadline: float = math.inf,
) -> tuple[TrainResult | None, Any]:
    """The run under the lock: train the members, then (rank 0) calibrate and save them as
    one network (on the out-of-fold logits of a cross-validation run): (the result on rank
    0, else None; the last member's engine state)."""
    from medres.train.ensemble import final_network, tta_axes
    from medres.train.outputs import TrainedRun, finish, open_tensorboard, prepare_run_dir

    manifest, labels, folds = inputs
    last_path = prepare_run_dir(run_dir, resume, rt)
    saved = _check_resume(spec, last_path, rt) if resume else None
    if rt.main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        dump_pipeline(spec, run_dir / "pipeline.yaml")
        if folds is not None:
            from medres.train.folds import write_folds_csv

            write_folds_csv(run_dir, manifest, labels, folds)
    ctx: dict[str, Any] = {
        "rt": rt, "run_dir": run_dir, "labels": labels, "manifest": manifest, "rows": [],
        "last_path": last_path, "user": on_epoch_end, "tb": open_tensorboard(spec, run_dir, rt),
        "official": manifest, "folds": folds,
        "n_members": folds.k if folds is not None else spec.model.ensemble,
    }  # fmt: skip
    try:
        members, records, state, wmeta, fold_preds = _train_members(spec, ctx, saved, deadline)
    finally:
        if ctx["tb"] is not None:
            ctx["tb"].close()
    if not rt.main:
        return None, state
    state.history = ctx["rows"]
    oof, extra = None, None
    flips = tta_axes(spec)
    if folds is not None:
        from medres.train.folds import (
            fold_record,
            folds_summary,
            join_out_of_fold,
            shift_members,
        )

        oof = join_out_of_fold(fold_preds, labels, flips, spec)
        shift_members(members, oof.shifts)
        flips = oof.flips
        records = [fold_record(r, folds, k, oof) for k, r in enumerate(records)]
        extra = {"folds": folds_summary(folds, oof, records, spec.train.seed)}
    net = final_network(members, flips)
    run = TrainedRun(manifest, labels, net, state, ctx["data"], rt, tuple(records))
    return finish(spec, run, wmeta, run_dir, t_start, oof, extra), state


def run_train(
    spec: PipelineSpec,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    on_epoch_end: EpochCallback | None = None,
    deadline: float = math.inf,
) -> TrainResult:
    """Train ``spec`` on its manifest and write the run directory ``out_dir``.

    ``deadline`` (``time.perf_counter()`` value; ``--time-budget``): no epoch starts that
    would end after it (see :func:`medres.train.plan.epoch_deadline`).

    ``on_epoch_end(epoch, row)`` (optional) runs on every rank after each epoch, once its
    checkpoint and ``history.csv`` row are on disk; ``row`` is that history row.

    Every input check (manifest rows and image files, the spec, ``--resume`` compatibility)
    runs before the first file is written, and rank 0 holds the run dir's
    :func:`~medres.io.output_lock` for the whole run (a second ``medres train`` into the
    same ``--out`` fails at once).

    Raises ConfigError/ManifestError/TrainError/WeightsError for user-fixable problems
    (leakage, empty splits, a run dir that already holds a run, bad resume state, a
    diverged run, ...).
    """
    from medres.runtime import shutdown_distributed

    t_start = time.perf_counter()
    run_dir = Path(out_dir)
    spec, manifest, labels = _read_inputs(spec)
    if resume and spec.model.ensemble > 1:
        raise ConfigError(
            f"--resume of an ensemble (model.ensemble {spec.model.ensemble}) is not supported; "
            "start a new --out, or resume a single network (model.ensemble 1)"
        )
    folds = None
    if spec.model.folds:
        from medres.train.folds import assign_folds, check_fold_settings

        check_fold_settings(spec, resume)
        folds = assign_folds(manifest, spec, labels)
    rt = _start_runtime(spec)
    with _run_dir_lock(run_dir, rt):
        result, st = _train_locked(
            spec, (manifest, labels, folds), rt, run_dir, resume, on_epoch_end, t_start, deadline
        )
    if rt.distributed:
        shutdown_distributed()
    if result is None:  # non-zero ranks
        result = TrainResult(
            run_dir, run_dir / "model", st.epoch, st.best_epoch, float("nan"), float("nan"),
            float("nan"), time.perf_counter() - t_start, st.history, rank=rt.rank,
        )  # fmt: skip
    return result
