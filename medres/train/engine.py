"""The training engine: ``fit`` -> ``train_one_epoch`` -> ``evaluate``. No printing, no files.

Choices:

* Loss: cross-entropy over ``num_classes`` logits for binary and multi-class (binary has
  two outputs so ``prob_0``/``prob_1`` come from one softmax), BCE-with-logits for
  multi-label. Label smoothing and class weights (``data.balance=weights``) apply to both.
* Optimiser: AdamW or SGD (Nesterov, momentum 0.9) over backbone/head parameter groups;
  no weight decay on biases and norm parameters; the backbone at ``lr x backbone_lr_mult``.
* Schedule: per optimizer step, linear warmup then cosine to 0, one-cycle (cosine up to the
  peak over the warmup, then cosine down to lr/1e4) or constant. A ``LambdaLR`` over a
  closure, so its state_dict holds numbers only.
* AMP: ``bf16`` autocast (CUDA; CPU when asked or, for ``auto``, when the CPU has AMX),
  ``fp16`` autocast with a GradScaler (CUDA). Gradient accumulation divides the loss; clipping unscales first.
* EMA: with ``state.ema`` (:class:`medres.train.ema.WeightEma`) the moving average of the
  weights is updated after every optimizer step and validated each epoch next to the live
  weights; both are candidates for the checkpoint.
* Selection (:func:`is_better`): validation AUC (macro one-vs-rest for multi-class, mean
  over labels for multi-label) with the validation loss as tie-break. A candidate (the
  live or the EMA weights after an epoch) becomes the best when its AUC beats the best's
  by more than ``auc_tolerance``, or when its AUC is within ``auc_tolerance`` of the
  highest AUC seen so far and its loss is lower. So an early epoch that happens to reach
  the top AUC with a poor loss is replaced by a later one of (about) the same AUC and a
  better loss, and the chosen AUC never falls more than the tolerance below the best
  seen. With ``metric=loss`` (or an undefined AUC) the lowest loss wins. The best is
  reported to ``on_epoch_end`` which writes checkpoints. Early stopping counts epochs
  in which no candidate became the best.
* DDP: every rank evaluates the whole validation set after the BatchNorm buffers are
  broadcast from rank 0, so all ranks take the same early-stopping decision without
  extra communication. Train loss is averaged over ranks.
* Divergence: a non-finite training loss, or non-finite weights after an epoch, stops
  training with a :class:`~medres.errors.TrainError` before that epoch is checkpointed
  (the weights are the same on every rank, so every rank stops at the same epoch).

Imports ``medres.train.spec``/``checkpoint`` (the finiteness check)/``selection``, ``medres.models``
(parameter groups), ``medres.runtime`` (autocast, unwrap), ``medres.progress`` and
``medres.errors`` only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medres import progress
from medres.errors import ConfigError, TrainError
from medres.runtime import autocast, cpu_has_amx, unwrap
from medres.train.checkpoint import non_finite
from medres.train.selection import is_better, select_best, selection_score
from medres.train.spec import TrainSpec

log = logging.getLogger(__name__)

__all__ = [
    "EvalOutput",
    "TrainState",
    "autocast",
    "check_finite_weights",
    "compute_metric",
    "evaluate",
    "fit",
    "is_better",
    "make_loss",
    "make_optimizer",
    "make_scheduler",
    "predict_logits",
    "predict_probs",
    "selection_score",
    "train_one_epoch",
]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "onecycle", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "none")


# ---------------------------------------------------------------------------------- building
class MultiLabelLoss(nn.Module):
    """BCE-with-logits with optional label smoothing and per-label positive weights."""

    def __init__(self, smoothing: float = 0.0, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.smoothing = smoothing
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.float()
        if self.smoothing:
            target = target * (1 - self.smoothing) + self.smoothing / 2
        return nn.functional.binary_cross_entropy_with_logits(
            logits.float(), target, pos_weight=self.pos_weight
        )


def make_loss(
    task: str, *, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None
) -> nn.Module:
    """Cross-entropy (binary, multiclass) or BCE (multilabel)."""
    if task == "multilabel":
        return MultiLabelLoss(label_smoothing, class_weights)
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)


def _param_groups(
    model: nn.Module, lr: float, backbone_mult: float, wd: float
) -> list[dict[str, Any]]:
    try:
        from medres.models import param_groups

        return param_groups(model, lr, backbone_lr_scale=backbone_mult, weight_decay=wd)
    except ImportError:  # models package not importable yet: same split by name
        groups: dict[str, dict[str, Any]] = {}
        for name, p in model.named_parameters():
            part = (
                "head" if name.split(".")[-2:-1] == ["fc"] or ".fc." in f".{name}" else "backbone"
            )
            scale = 1.0 if part == "head" else backbone_mult
            key = part if p.ndim > 1 else f"{part}_no_decay"
            g = groups.setdefault(
                key,
                {"name": key, "params": [], "lr": lr * scale, "lr_scale": scale,
                 "weight_decay": wd if p.ndim > 1 else 0.0},
            )  # fmt: skip
            g["params"].append(p)
        return list(groups.values())


def make_optimizer(
    model: nn.Module, spec: TrainSpec, backbone_lr_mult: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW or SGD over backbone/head groups (no decay on biases and norms)."""
    groups = _param_groups(model, spec.lr, backbone_lr_mult, spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=spec.lr, momentum=0.9, nesterov=True, weight_decay=spec.weight_decay
        )
    raise ConfigError(f"train.optimizer is {spec.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based)."""
    total = max(total, 1)
    if kind == "onecycle":
        warm = max(warmup, 1)
        if step < warm:
            return 1e-2 + (1 - 1e-2) * 0.5 * (1 - math.cos(math.pi * (step + 1) / warm))
        t = (step - warm) / max(total - warm, 1)
        return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    t = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, spec: TrainSpec, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR: warmup then cosine / one-cycle / constant."""
    if spec.scheduler not in SCHEDULERS:
        raise ConfigError(
            f"train.scheduler is {spec.scheduler!r}; use one of {', '.join(SCHEDULERS)}"
        )
    total = steps_per_epoch * spec.epochs
    warmup = round(spec.warmup_epochs * steps_per_epoch)
    kind = spec.scheduler

    def fn(step: int) -> float:
        return lr_factor(step, total, warmup, kind)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None = full precision)."""
    if amp not in AMP_MODES:
        raise ConfigError(f"train.amp is {amp!r}; use one of {', '.join(AMP_MODES)}")
    if amp == "none":
        return None
    if device.type == "cuda":
        if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if amp == "fp16":
        raise ConfigError("train.amp fp16 needs CUDA; use bf16 or none on CPU")
    # CPU: bf16 autocast pays off only with AMX tiles (Sapphire Rapids and later); without
    # them oneDNN emulates or converts and float32 is as fast and more accurate.
    if amp == "auto":
        return torch.bfloat16 if cpu_has_amx() else None
    return torch.bfloat16 if amp == "bf16" else None


# ------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Everything ``fit`` mutates; checkpointed by the caller at each epoch end."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: nn.Module
    device: torch.device
    task: str
    amp_dtype: torch.dtype | None = None
    scaler: Any = None
    grad_accum: int = 1
    grad_clip: float = 0.0
    channels_last: bool = False
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_metric: float = float("nan")
    """Selection score of the best candidate: its AUC, or minus its loss."""
    best_epoch: int = 0
    bad_epochs: int = 0
    ema: Any = None
    """A :class:`medres.train.ema.WeightEma`, or None (no EMA)."""
    best_auc: float = float("nan")
    best_loss: float = float("nan")
    max_auc: float = float("nan")
    """The highest validation AUC of any candidate so far."""
    best_source: str = "live"
    """Which weights were the best: ``live`` or ``ema``."""
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EvalOutput:
    """Validation/prediction outputs in loader order."""

    probs: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    loss: float
    metric: float


def _to_device(
    batch: dict[str, Any], state: TrainState, augment: Any = None, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    x = batch["image"].to(state.device, non_blocking=True)
    if augment is not None:  # batched on-device augmentation (loader.device_augment)
        x = augment(x, epoch=state.epoch, start=start)
    if state.channels_last:
        x = x.contiguous(
            memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        )
    y = torch.as_tensor(batch["label"]).to(state.device, non_blocking=True)
    return x, y


def _dist() -> tuple[bool, int]:
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return on, (dist.get_world_size() if on else 1)


def train_one_epoch(
    state: TrainState, loader: Iterable[dict[str, Any]], *, total: int | None = None
) -> dict[str, float]:
    """One pass over ``loader``; returns ``train_loss``, ``lr`` and timing figures.

    A ``loader.device_augment`` (:class:`medres.train.augment_batched.BatchedAugment`) is
    applied to each batch on the device, seeded by the epoch and the samples' positions."""
    model = state.model
    model.train()
    opt = state.optimizer
    opt.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64)
    n_seen = 0
    t0 = time.perf_counter()
    wait = 0.0
    n_batches = total if total is not None else len(loader)  # type: ignore[arg-type]
    augment = getattr(loader, "device_augment", None)
    it = iter(loader)
    with progress.task(f"epoch {state.epoch + 1}", total=n_batches, unit="batch") as bar:
        i = 0
        while True:
            tw = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - tw
            x, y = _to_device(batch, state, augment, n_seen)
            with autocast(state.device, state.amp_dtype):
                logits = model(x)
            loss = state.loss_fn(logits.float(), y)
            scaled = loss / state.grad_accum
            if state.scaler is not None:
                state.scaler.scale(scaled).backward()
            else:
                scaled.backward()
            i += 1
            if i % state.grad_accum == 0 or i == n_batches:
                _optimizer_step(state)
            value = loss.detach().double().cpu()
            if not torch.isfinite(value):
                raise _diverged(state, f"the training loss is {float(value)} at batch {i}")
            loss_sum += value * x.shape[0]
            n_seen += x.shape[0]
            bar.advance()
    on, _world = _dist()
    stats = torch.stack([loss_sum, torch.tensor(float(n_seen), dtype=torch.float64)])
    if on:
        import torch.distributed as dist

        t = stats.to(state.device)
        dist.all_reduce(t)
        stats = t.cpu()
        _sync_buffers(model)
        if state.ema is not None:
            state.ema.broadcast_buffers()
    elapsed = time.perf_counter() - t0
    return {
        "train_loss": float(stats[0] / max(stats[1].item(), 1.0)),
        "lr": float(opt.param_groups[-1]["lr"]),
        "train_time_s": elapsed,
        "data_wait_frac": wait / elapsed if elapsed > 0 else 0.0,
    }


_DIVERGED_FIX = (
    "training stopped and this epoch was not saved; lower --lr (or --set train.grad_clip=1), "
    "check the input images for NaN or extreme values, or use --set train.amp=none"
)


def _diverged(state: TrainState, what: str) -> TrainError:
    """The one-line error of a run that diverged during epoch ``state.epoch + 1``."""
    return TrainError(
        f"epoch {state.epoch + 1}, step {state.step}: {what} (not finite: training diverged); "
        + _DIVERGED_FIX
    )


def check_finite_weights(state: TrainState) -> None:
    """Raise TrainError when a weight or buffer of ``state.model`` holds NaN/inf."""
    bad = non_finite(unwrap(state.model).state_dict())
    if bad:
        raise _diverged(state, f"model weight {bad} holds NaN/inf")


def _optimizer_step(state: TrainState) -> None:
    opt = state.optimizer
    if state.grad_clip > 0:
        if state.scaler is not None:
            state.scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, state.grad_clip)
    if state.scaler is not None:
        state.scaler.step(opt)
        state.scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.step += 1
    if state.ema is not None:
        state.ema.update(unwrap(state.model))


def _sync_buffers(model: nn.Module) -> None:
    """Broadcast BatchNorm running stats from rank 0 so every rank evaluates the same model."""
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b.data, 0)


def compute_metric(
    task: str, probs: np.ndarray, labels: np.ndarray, positive_index: int = 1
) -> float:
    """AUC: binary (positive class), multi-class macro one-vs-rest, multi-label mean; NaN if undefined."""
    from sklearn.metrics import roc_auc_score

    if len(labels) == 0:
        return float("nan")
    try:
        if task == "multilabel":
            aucs = [
                roc_auc_score(labels[:, j], probs[:, j])
                for j in range(labels.shape[1])
                if len(np.unique(labels[:, j])) == 2
            ]
            return float(np.mean(aucs)) if aucs else float("nan")
        present = np.unique(labels)
        if task == "binary":
            if len(present) < 2:
                return float("nan")
            return float(roc_auc_score(labels == positive_index, probs[:, positive_index]))
        if len(present) < probs.shape[1]:
            return float("nan")
        return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    except ValueError:
        return float("nan")


def _batches(loader: Iterable[dict[str, Any]], description: str) -> Iterator[dict[str, Any]]:
    yield from progress.track(loader, description, unit="batch")


def logits_to_probs(logits: np.ndarray, task: str) -> np.ndarray:
    """Sigmoid (multilabel) or softmax of float logits, as float32 (the engine's probabilities)."""
    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    p = torch.sigmoid(t) if task == "multilabel" else torch.softmax(t, dim=1)
    return p.numpy()


def predict_probs(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    *,
    task: str,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    loss_fn: nn.Module | None = None,
    channels_last: bool = False,
    description: str = "predict",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(probs, labels, manifest indices, mean loss) over ``loader`` in eval mode."""
    logits, labels, idx, loss = predict_logits(
        model, loader, task=task, device=device, amp_dtype=amp_dtype, loss_fn=loss_fn,
        channels_last=channels_last, description=description,
    )  # fmt: skip
    if logits.size == 0:
        return logits, labels, idx, loss
    return logits_to_probs(logits, task), labels, idx, loss


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    *,
    task: str,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    loss_fn: nn.Module | None = None,
    channels_last: bool = False,
    description: str = "predict",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(float32 logits, labels, manifest indices, mean loss) over ``loader`` in eval mode."""
    del task  # the logits do not depend on it; kept for a signature like predict_probs
    model.eval()
    probs, labels, idx = [], [], []
    loss_sum, n = 0.0, 0
    for batch in _batches(loader, description):
        x = batch["image"].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(
                memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d
            )
        y = torch.as_tensor(batch["label"]).to(device)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        if loss_fn is not None:
            loss_sum += float(loss_fn(logits, y)) * x.shape[0]
        n += x.shape[0]
        probs.append(logits.cpu().numpy())
        labels.append(y.cpu().numpy())
        idx.append(torch.as_tensor(batch["index"]).cpu().numpy())
    if not probs:
        return np.zeros((0, 0)), np.zeros((0,)), np.zeros((0,), dtype=int), float("nan")
    return np.concatenate(probs), np.concatenate(labels), np.concatenate(idx), loss_sum / max(n, 1)


def evaluate(
    state: TrainState,
    loader: Iterable[dict[str, Any]],
    positive_index: int = 1,
    model: nn.Module | None = None,
) -> EvalOutput:
    """Validation loss and AUC of ``model`` (default: the current live model)."""
    probs, labels, idx, loss = predict_probs(
        unwrap(state.model) if model is None else model,
        loader,
        task=state.task,
        device=state.device,
        amp_dtype=state.amp_dtype,
        loss_fn=state.loss_fn,
        channels_last=state.channels_last,
        description="validate",
    )
    return EvalOutput(
        probs, labels, idx, loss, compute_metric(state.task, probs, labels, positive_index)
    )


def _validate(
    state: TrainState, val_loader: Any, positive_index: int
) -> list[tuple[str, EvalOutput]]:
    """The epoch's candidates: the live weights, then the EMA's (when there is one)."""
    out = [("live", evaluate(state, val_loader, positive_index))]
    if state.ema is not None:
        out.append(("ema", evaluate(state, val_loader, positive_index, model=state.ema.module)))
    return out


def _history_row(
    state: TrainState, tr: dict[str, float], cands: list[tuple[str, EvalOutput]], t0: float
) -> dict[str, Any]:
    ev = cands[0][1]
    row: dict[str, Any] = {
        "epoch": state.epoch,
        "step": state.step,
        "lr": tr["lr"],
        "train_loss": tr["train_loss"],
        "val_loss": ev.loss,
        "val_auc": ev.metric,
    }
    if len(cands) > 1:
        row.update(ema_val_loss=cands[1][1].loss, ema_val_auc=cands[1][1].metric)
    row.update(
        best_epoch=state.best_epoch,
        best_source=state.best_source,
        epoch_time_s=round(time.perf_counter() - t0, 3),
        data_wait_frac=round(tr["data_wait_frac"], 4),
    )
    return row


def fit(
    state: TrainState,
    train_loader: Any,
    val_loader: Any,
    *,
    epochs: int,
    metric: str = "auc",
    early_stopping: int = 0,
    positive_index: int = 1,
    auc_tolerance: float = 0.005,
    before_epoch: Callable[[int], None] | None = None,
    on_epoch_end: Callable[[TrainState, dict[str, Any], bool], None] | None = None,
    deadline: float = math.inf,
) -> TrainState:
    """Train from ``state.epoch`` to ``epochs``; ``on_epoch_end(state, row, is_best)`` persists.

    ``deadline`` (a ``time.perf_counter()`` value, from ``--time-budget``): no epoch starts
    that would end after it, judged by the last epoch's time.

    ``before_epoch(epoch)`` re-seeds sampling/augmentation; ``metric`` is ``auc`` or ``loss``
    (AUC falls back to loss when undefined, e.g. one class in validation). After each
    epoch the live weights (and the EMA's, when ``state.ema`` is set) are validated and
    chosen by :func:`is_better`; ``state.best_source`` says which weights won, and
    ``state.best_metric`` holds their selection score (see :func:`selection_score`).
    """
    if metric not in ("auc", "loss"):
        raise ConfigError(f"eval.metric is {metric!r}; use auc or loss")
    while state.epoch < epochs:
        if early_stopping and state.bad_epochs >= early_stopping:
            log.info("early stopping: no improvement for %d epochs", state.bad_epochs)
            break
        if before_epoch is not None:
            before_epoch(state.epoch)
        t0 = time.perf_counter()
        tr = train_one_epoch(state, train_loader)
        check_finite_weights(state)
        cands = _validate(state, val_loader, positive_index)
        is_best = select_best(state, cands, metric, auc_tolerance)
        state.epoch += 1
        if is_best:
            state.best_epoch, state.bad_epochs = state.epoch, 0
        else:
            state.bad_epochs += 1
        row = _history_row(state, tr, cands, t0)
        state.history.append(row)
        log.info(
            "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_auc %.4f%s%s  (%.1fs)",
            state.epoch, epochs, row["train_loss"], row["val_loss"], row["val_auc"],
            f"  ema {row['ema_val_loss']:.4f}/{row['ema_val_auc']:.4f}" if state.ema else "",
            f"  *best* ({state.best_source})" if is_best else "", row["epoch_time_s"],
        )  # fmt: skip
        if on_epoch_end is not None:
            on_epoch_end(state, row, is_best)
        if state.epoch < epochs and time.perf_counter() + (time.perf_counter() - t0) > deadline:
            log.info("time budget: stopping after epoch %d of %d", state.epoch, epochs)
            break
    return state
