"""``run_train``: manifest + pipeline spec -> a complete run directory.

Stages (each a small function): resolve the spec from the manifest, set up the runtime
(device, seeds, DDP under torchrun), build data, model and optimiser, restore a checkpoint
when resuming, ``engine.fit`` with per-epoch checkpoints, then predict val/test with the
best checkpoint and save the model directory.

Run directory::

    pipeline.yaml          the resolved spec (replayable)
    history.csv            one row per epoch
    checkpoints/last.pt    full state (resume), checkpoints/best.pt (best weights)
    model/                 weights.safetensors + model.json (classes, task, preprocessing)
    predictions_val.csv, predictions_test.csv
    tensorboard/           when tensorboard is installed

DDP (``torchrun --nproc-per-node N -m medres train ...``): gloo on CPU, nccl on CUDA; each
rank trains on its shard; only rank 0 writes files. Resume is exact on one machine in
deterministic mode: sampling and augmentation depend only on (seed, epoch), every other
RNG state is restored from the checkpoint.

Testing hook: ``MEDRES_TRAIN_KILL_AFTER_EPOCH=k`` makes the process SIGKILL itself right
after the checkpoint of epoch ``k`` is written (used by the resume test).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import signal
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medres.errors import ConfigError, TrainError
from medres.train.spec import PipelineSpec, dump_pipeline

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "build_spec", "resolve_spec", "run_train"]

KILL_ENV = "MEDRES_TRAIN_KILL_AFTER_EPOCH"
PASSTHROUGH = ("modality", "manufacturer", "body_part", "sex", "age", "patient_key", "study_key")
# automatic image-size caps (2D, 3D): small on CPU so the defaults train in minutes
DEFAULT_SIZE = {"cpu": {2: 64, 3: 48}, "cuda": {2: 224, 3: 96}}


@dataclass
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


def build_spec(
    pipeline: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None
) -> PipelineSpec:
    """Load the pipeline YAML (or the defaults) and apply ``{"section.field": value}`` overrides."""
    from medres.train.spec import apply_overrides, load_pipeline

    spec = load_pipeline(pipeline) if pipeline else PipelineSpec()
    return apply_overrides(spec, overrides or {})


# --------------------------------------------------------------------------- spec resolution
def _majority(values: list[str], default: str) -> str:
    vals = [v for v in values if v]
    return Counter(vals).most_common(1)[0][0] if vals else default


def _image_dims(rows: list[dict[str, str]]) -> int:
    dims = _majority([r.get("dims", "") for r in rows], "")
    if dims:
        return int(dims)
    shape = _majority([r.get("shape", "") for r in rows], "")
    return len(shape.split("x")) if shape else 2


def _median_shape(rows: list[dict[str, str]], n: int) -> list[int] | None:
    shapes = [
        [int(v) for v in r["shape"].split("x")]
        for r in rows
        if r.get("shape") and len(r["shape"].split("x")) >= n
    ]
    if not shapes:
        return None
    return [int(statistics.median(s[i] for s in shapes)) for i in range(n)]


def _auto_intensity(rows: list[dict[str, str]], weights_norm: str | None) -> str:
    """CT: HU window; MR: percentiles; others: z-score from scratch, [0, 1] for mean/std weights.

    Radiographs/US/SC trained from scratch get a per-image z-score: on the synthetic
    radiographs (300 patients, difficulty 0.5, ResNet-18 at 64 px, 12 epochs) it reached val
    AUC 0.97 where min-max ``range`` plateaued at 0.73 (same data, seed and augmentation).
    Weights that expect ``mean_std`` input (ImageNet) keep ``range`` then mean/std.
    """
    if weights_norm == "zscore_nonzero":
        return "zscore"
    modality = _majority([r.get("modality", "").upper() for r in rows], "")
    if modality in ("CT", "MR"):
        return "ct_window" if modality == "CT" else "percentile"
    return "range" if weights_norm == "mean_std" else "zscore"


def _check_ranges(spec: PipelineSpec) -> None:
    t = spec.train
    checks = [
        (t.epochs >= 1, "train.epochs", "at least 1"),
        (t.batch_size >= 1, "train.batch_size", "at least 1"),
        (t.lr > 0, "train.lr", "positive"),
        (t.grad_accum >= 1, "train.grad_accum", "at least 1"),
        (t.grad_clip >= 0, "train.grad_clip", "0 (off) or positive"),
        (0 <= t.label_smoothing < 1, "train.label_smoothing", "in [0, 1)"),
        (t.warmup_epochs >= 0, "train.warmup_epochs", "0 or positive"),
        (t.early_stopping >= 0, "train.early_stopping", "0 (off) or positive"),
        (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "train.device", "auto, cpu or cuda"),
        (spec.data.workers >= 0, "data.workers", "0 or positive"),
        (spec.data.balance in ("none", "sampler", "weights"), "data.balance", "none, sampler or weights"),
        (spec.data.cache in ("none", "memory", "disk"), "data.cache", "none, memory or disk"),
        (spec.model.channels_last in ("auto", "on", "off"), "model.channels_last", "auto, on or off"),
        (spec.model.freeze_backbone_epochs >= 0, "model.freeze_backbone_epochs", "0 or positive"),
        (spec.model.backbone_lr_mult > 0, "model.backbone_lr_mult", "positive"),
        (spec.eval.metric in ("auc", "loss"), "eval.metric", "auc or loss"),
        (spec.eval.batch_size >= 0, "eval.batch_size", "0 (= train.batch_size) or positive"),
    ]  # fmt: skip
    for ok, name, want in checks:
        if not ok:
            section, _, fld = name.partition(".")
            value = getattr(getattr(spec, section), fld)
            raise ConfigError(
                f"{name} is {value!r}; it must be {want} (pipeline YAML or --set {name}=...)"
            )


def resolve_spec(spec: PipelineSpec, manifest: Any) -> tuple[PipelineSpec, Any]:
    """Fill every auto field from the manifest; returns (resolved spec, LabelInfo)."""
    from medres.models import resolve_stem, weights_meta
    from medres.train.data import resolve_labels

    _check_ranges(spec)
    labels = resolve_labels(manifest, spec.data)
    train_rows = manifest.select(spec.data.train_split) or manifest.rows
    img_dims = _image_dims(train_rows)
    m, t = spec.model, spec.transforms
    dims = m.dims or t.dims or img_dims
    if dims not in (2, 3):
        raise ConfigError(f"model.dims is {dims}; use 2 or 3")
    if t.dims and t.dims != dims:
        raise ConfigError(
            f"transforms.dims {t.dims} contradicts model.dims {dims}; set only model.dims"
        )
    if dims == 3 and img_dims == 2:
        raise ConfigError(
            f"model.dims is 3 but {Path(manifest.path).name} holds 2D images; use --dims 2"
        )
    slice_mode = t.slice_mode
    if dims == 2 and img_dims == 3 and slice_mode == "none":
        slice_mode = "center"
        log.info("2D network on 3D images: using the centre slice (transforms.slice_mode)")
    channels = int(_majority([r.get("channels", "") for r in train_rows], "1"))
    in_ch = m.in_channels or t.in_channels or channels
    wmeta = weights_meta(m.weights, m.arch, in_channels=in_ch)
    size = tuple(t.image_size)
    if len(size) == 1:
        size = size * dims
    if not size:
        if img_dims == dims:
            med = _median_shape(train_rows, dims)
        else:  # 2D slices out of 3D volumes: the in-plane axes
            med3 = _median_shape(train_rows, 3)
            med = [s for i, s in enumerate(med3) if i != t.slice_axis] if med3 else None
        on_cuda = spec.train.device.startswith("cuda") or (
            spec.train.device == "auto" and torch.cuda.is_available()
        )
        cap = DEFAULT_SIZE["cuda" if on_cuda else "cpu"][dims]
        size = tuple(min(cap, s) for s in med) if med else (cap,) * dims
    mean, std = tuple(t.mean), tuple(t.std)
    if not mean and wmeta.get("normalization") == "mean_std" and wmeta.get("mean"):
        mean, std = tuple(wmeta["mean"]), tuple(wmeta["std"])
    intensity = (
        t.intensity
        if t.intensity != "auto"
        else _auto_intensity(train_rows, wmeta.get("normalization"))
    )
    stem = resolve_stem(m.stem, list(size))
    resolved = replace(
        spec,
        data=replace(
            spec.data,
            task=labels.task,
            label_columns=labels.label_columns,
            classes=labels.classes,
            positive_class=labels.positive_class,
        ),
        model=replace(m, dims=dims, in_channels=in_ch, stem=stem),
        transforms=replace(
            t,
            dims=dims,
            in_channels=in_ch,
            image_size=tuple(int(s) for s in size),
            intensity=intensity,
            mean=mean,
            std=std,
            slice_mode=slice_mode,
        ),
        eval=replace(spec.eval, batch_size=spec.eval.batch_size or spec.train.batch_size),
    )
    from medres.train.transforms import transform_spec_from

    transform_spec_from(resolved.transforms)  # validates
    return resolved, labels


# ------------------------------------------------------------------------------------ runtime
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _setup_runtime(spec: PipelineSpec) -> Runtime:
    want = spec.train.device
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "train.device is cuda but no CUDA device is visible; use --device cpu or auto"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = want.startswith("cuda") or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        idx = int(want.split(":")[1]) if ":" in want else local
        device = torch.device("cuda", idx)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    threads = spec.train.threads or (
        _auto_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world))) if device.type == "cpu" else 0
    )
    if threads > 0:
        torch.set_num_threads(threads)
    return Runtime(device=device, rank=rank, world=world, local_rank=local)


def _auto_threads(procs_on_node: int) -> int:
    """CPU threads per process: the idle cores shared among this node's processes.

    Measured on a 2-core machine at load ~5: ResNet-18 64^2 epochs took 6 s with one thread
    and 35 s with torch's default of two (OpenMP threads spinning against other processes),
    so oversubscription is avoided even at the cost of an idle core on a quiet machine.
    """
    cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0])
    except OSError:  # pragma: no cover - platforms without getloadavg
        busy = 0
    return max(1, min(torch.get_num_threads(), cores - busy) // max(procs_on_node, 1))


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


# --------------------------------------------------------------------------------------- data
@dataclass
class DataBundle:
    train: Any
    val: Any
    train_items: list[dict[str, Any]]
    val_items: list[dict[str, Any]]
    class_weights: torch.Tensor | None


def _cache_root(spec: PipelineSpec, run_dir: Path) -> Path:
    from medres.train.data import preprocessing_hash
    from medres.train.transforms import preprocessing_dict

    base = Path(spec.data.cache_dir) if spec.data.cache_dir else run_dir / "cache"
    return base / preprocessing_hash(preprocessing_dict(spec.transforms))


def _build_data(
    spec: PipelineSpec, manifest: Any, labels: Any, rt: Runtime, run_dir: Path
) -> DataBundle:
    from medres.train.data import (
        EpochSampler,
        build_loader,
        class_counts,
        make_dataset,
        make_items,
        sample_weights,
    )
    from medres.train.transforms import build_transforms

    d = spec.data
    train_items = make_items(manifest, d.train_split, labels)
    val_items = make_items(manifest, d.val_split, labels)
    name = Path(manifest.path).name
    for split, items in ((d.train_split, train_items), (d.val_split, val_items)):
        if not items:
            raise TrainError(
                f"{name}: no labelled rows in split {split!r}; re-run ingest with a labels CSV "
                "and --val-frac > 0, or set data.train_split/data.val_split"
            )
    cache_root = _cache_root(spec, run_dir)
    train_ds = make_dataset(
        train_items,
        build_transforms(spec.transforms, train=True),
        cache=d.cache,
        cache_dir=cache_root / "train",
    )
    val_ds = make_dataset(
        val_items,
        build_transforms(spec.transforms, train=False),
        cache=d.cache,
        cache_dir=cache_root / "eval",
    )
    weights = sample_weights(train_items, labels) if d.balance == "sampler" else None
    pin = rt.device.type == "cuda"
    train = build_loader(
        train_ds,
        EpochSampler(
            len(train_items), weights=weights, seed=spec.train.seed, rank=rt.rank, world=rt.world
        ),
        batch_size=spec.train.batch_size,
        workers=d.workers,
        pin_memory=pin,
    )
    val = build_loader(
        val_ds,
        EpochSampler(len(val_items), shuffle=False),
        batch_size=spec.eval.batch_size,
        workers=d.workers,
        pin_memory=pin,
    )
    cw = None
    if d.balance == "weights":
        counts = np.maximum(class_counts(train_items, labels), 1.0)
        if labels.task == "multilabel":
            cw = torch.as_tensor((len(train_items) - counts) / counts, dtype=torch.float32)
        else:
            cw = torch.as_tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)
    return DataBundle(train, val, train_items, val_items, cw)


# -------------------------------------------------------------------------------------- model
def _build_model(
    spec: PipelineSpec, labels: Any, rt: Runtime
) -> tuple[torch.nn.Module, dict[str, Any]]:
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


# ---------------------------------------------------------------------------------- run dir io
def _history_csv(history: list[dict[str, Any]]) -> str:
    if not history:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]), lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _comparable(spec_dict: dict[str, Any]) -> dict[str, Any]:
    """The parts of a resolved spec that a resumed run must share with the original."""
    keep = {"model", "transforms"}
    out = {s: v for s, v in spec_dict.items() if s in keep}
    out["data"] = {
        k: spec_dict["data"][k] for k in ("task", "label_columns", "classes", "manifest")
    }
    out["train"] = {
        k: spec_dict["train"][k] for k in ("batch_size", "lr", "optimizer", "scheduler", "seed")
    }
    return out


def _diff(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            d = _diff(a[k], b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else prefix.rstrip(".")


def _write_predictions(
    path: Path,
    manifest: Any,
    labels: Any,
    split: str,
    probs: np.ndarray,
    idx: np.ndarray,
    threshold: float,
) -> None:
    from medres.io import atomic_write_text

    cols = [
        "image_id",
        "split",
        *labels.label_columns,
        *(f"prob_{c}" for c in labels.classes),
        "pred",
        *PASSTHROUGH,
    ]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for p, i in zip(probs, idx, strict=True):
        row = manifest.rows[int(i)]
        if labels.task == "multilabel":
            pred = ";".join(c for c, v in zip(labels.classes, p, strict=True) if v >= threshold)
        elif labels.task == "binary":
            pos = labels.positive_index
            pred = labels.classes[pos] if p[pos] >= threshold else labels.classes[1 - pos]
        else:
            pred = labels.classes[int(np.argmax(p))]
        w.writerow(
            [
                row["image_id"],
                split,
                *(row.get(c, "") for c in labels.label_columns),
                *(f"{float(v):.8g}" for v in p),
                pred,
                *(row.get(c, "") for c in PASSTHROUGH),
            ]
        )
    atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------------- run
def _prepare_run_dir(run_dir: Path, resume: bool, rt: Runtime) -> Path:
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
    if rt.main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return last


def _kill_after(epoch: int) -> None:
    want = os.environ.get(KILL_ENV, "")
    if want and int(want) == epoch:
        log.warning("%s=%s: killing this process with SIGKILL (test hook)", KILL_ENV, want)
        os.kill(os.getpid(), signal.SIGKILL)


def _tensorboard(spec: PipelineSpec, run_dir: Path, rt: Runtime) -> Any:
    if not (spec.train.tensorboard and rt.main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.debug("tensorboard not installed; no TensorBoard logs")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def run_train(
    spec: PipelineSpec, out_dir: str | os.PathLike[str], *, resume: bool = False
) -> TrainResult:
    """Train ``spec`` on its manifest and write the run directory ``out_dir``.

    Raises ConfigError/ManifestError/TrainError/WeightsError for user-fixable problems
    (leakage, empty splits, a run dir that already holds a run, bad resume state, ...).
    """
    from medres.models import set_backbone_trainable
    from medres.train import checkpoint as ckpt
    from medres.train.data import check_leakage, load_manifest, seed_loader_epoch
    from medres.train.engine import (
        TrainState,
        fit,
        make_loss,
        make_optimizer,
        make_scheduler,
        resolve_amp,
        unwrap,
    )

    t_start = time.perf_counter()
    run_dir = Path(out_dir)
    if not spec.data.manifest:
        raise ConfigError("data.manifest is not set; pass --manifest DIR/manifest.csv")
    manifest = load_manifest(spec.data.manifest)
    check_leakage(manifest.rows, Path(manifest.path).name)
    spec, labels = resolve_spec(spec, manifest)
    rt = _setup_runtime(spec)
    if rt.distributed and spec.model.freeze_backbone_epochs:
        raise ConfigError(
            "model.freeze_backbone_epochs is not supported under torchrun DDP; set it to 0 "
            "or train on one process"
        )
    last_path = _prepare_run_dir(run_dir, resume, rt)
    if rt.main:
        dump_pipeline(spec, run_dir / "pipeline.yaml")
    _seed_everything(spec.train.seed, spec.train.deterministic)

    model, wmeta = _build_model(spec, labels, rt)
    data = _build_data(spec, manifest, labels, rt, run_dir)
    wrapped = _wrap(model, spec, rt)
    optimizer = make_optimizer(model, spec.train, spec.model.backbone_lr_mult)
    steps_per_epoch = math.ceil(len(data.train) / spec.train.grad_accum)
    scheduler = make_scheduler(optimizer, spec.train, steps_per_epoch)
    amp_dtype = resolve_amp(spec.train.amp, rt.device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    cw = data.class_weights.to(rt.device) if data.class_weights is not None else None
    state = TrainState(
        model=wrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=make_loss(
            labels.task, label_smoothing=spec.train.label_smoothing, class_weights=cw
        ).to(rt.device),
        device=rt.device,
        task=labels.task,
        amp_dtype=amp_dtype,
        scaler=scaler,
        grad_accum=spec.train.grad_accum,
        grad_clip=spec.train.grad_clip,
        channels_last=_channels_last(spec, rt),
    )
    spec_dict = spec.to_dict()
    if resume:
        _restore(
            state, ckpt.load_checkpoint(last_path, map_location=rt.device), spec_dict, last_path
        )
    tb = _tensorboard(spec, run_dir, rt)
    freeze = spec.model.freeze_backbone_epochs

    def before_epoch(epoch: int) -> None:
        seed_loader_epoch(data.train, spec.train.seed, epoch, rt.rank)
        seed_loader_epoch(data.val, spec.train.seed, epoch, 0)
        if freeze:
            set_backbone_trainable(model, epoch >= freeze)

    def on_epoch_end(st: TrainState, row: dict[str, Any], is_best: bool) -> None:
        if rt.main:
            if is_best:
                ckpt.save_checkpoint(
                    run_dir / "checkpoints" / ckpt.BEST,
                    {
                        "model": unwrap(st.model).state_dict(),
                        "epoch": st.epoch,
                        "score": st.best_metric,
                    },
                )
            ckpt.save_checkpoint(last_path, _state_payload(st, spec_dict))
            from medres.io import atomic_write_text

            atomic_write_text(run_dir / "history.csv", _history_csv(st.history))
            if tb is not None:
                for k, v in row.items():
                    if isinstance(v, float) and k != "epoch":
                        tb.add_scalar(k, v, st.epoch)
                tb.flush()
        if rt.distributed:
            import torch.distributed as dist

            dist.barrier()
        _kill_after(st.epoch)

    fit(
        state,
        data.train,
        data.val,
        epochs=spec.train.epochs,
        metric=spec.eval.metric,
        early_stopping=spec.train.early_stopping,
        positive_index=max(labels.positive_index, 0),
        before_epoch=before_epoch,
        on_epoch_end=on_epoch_end,
    )
    if tb is not None:
        tb.close()
    result = None
    if rt.main:
        result = _finish(spec, manifest, labels, model, wmeta, state, data, rt, run_dir, t_start)
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if result is None:  # non-zero ranks
        result = TrainResult(
            run_dir, run_dir / "model", state.epoch, state.best_epoch, float("nan"), float("nan"),
            float("nan"), time.perf_counter() - t_start, state.history, rank=rt.rank,
        )  # fmt: skip
    return result


def _state_payload(st: Any, spec_dict: dict[str, Any]) -> dict[str, Any]:
    from medres.train.checkpoint import capture_rng
    from medres.train.engine import unwrap

    return {
        "epoch": st.epoch,
        "step": st.step,
        "model": unwrap(st.model).state_dict(),
        "optimizer": st.optimizer.state_dict(),
        "scheduler": st.scheduler.state_dict(),
        "scaler": st.scaler.state_dict() if st.scaler is not None else None,
        "rng": capture_rng(),
        "sampler": {"epoch": st.epoch},
        "best": {"score": st.best_metric, "epoch": st.best_epoch, "bad_epochs": st.bad_epochs},
        "history": st.history,
        "pipeline": spec_dict,
    }


def _restore(st: Any, saved: dict[str, Any], spec_dict: dict[str, Any], path: Path) -> None:
    from medres.train.checkpoint import restore_rng
    from medres.train.engine import unwrap

    diff = _diff(_comparable(saved.get("pipeline") or {}), _comparable(spec_dict))
    if diff:
        raise TrainError(
            f"{path}: the run was trained with a different {diff}; resume with the original "
            "pipeline and flags (only train.epochs and runtime options may change)"
        )
    try:
        unwrap(st.model).load_state_dict(saved["model"])
        st.optimizer.load_state_dict(saved["optimizer"])
        st.scheduler.load_state_dict(saved["scheduler"])
        if st.scaler is not None and saved.get("scaler"):
            st.scaler.load_state_dict(saved["scaler"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise TrainError(
            f"{path}: checkpoint does not fit this model ({type(exc).__name__}); start a new run without --resume"
        ) from None
    st.epoch, st.step = int(saved["epoch"]), int(saved["step"])
    st.best_metric = float(saved["best"]["score"])
    st.best_epoch = int(saved["best"]["epoch"])
    st.bad_epochs = int(saved["best"]["bad_epochs"])
    st.history = list(saved["history"])
    restore_rng(saved["rng"])
    log.info("resumed from %s after epoch %d", path, st.epoch)


def _finish(
    spec: PipelineSpec,
    manifest: Any,
    labels: Any,
    model: torch.nn.Module,
    wmeta: dict[str, Any],
    state: Any,
    data: DataBundle,
    rt: Runtime,
    run_dir: Path,
    t_start: float,
) -> TrainResult:
    """Best checkpoint -> predictions_val/test.csv and the model dir."""
    from medres.models import save_model_dir
    from medres.train.checkpoint import BEST, load_checkpoint
    from medres.train.data import EpochSampler, build_loader, make_dataset, make_items
    from medres.train.engine import compute_metric, predict_probs
    from medres.train.transforms import build_transforms, preprocessing_dict

    best_path = run_dir / "checkpoints" / BEST
    if best_path.is_file():
        model.load_state_dict(load_checkpoint(best_path, map_location=rt.device)["model"])
    else:
        log.warning("no best checkpoint (validation metric never defined); using the last weights")
    pos = max(labels.positive_index, 0)
    aucs: dict[str, float] = {}
    eval_tf = build_transforms(spec.transforms, train=False)
    for split, out_name in (
        (spec.data.val_split, "predictions_val.csv"),
        (spec.data.test_split, "predictions_test.csv"),
    ):
        items = (
            data.val_items if split == spec.data.val_split else make_items(manifest, split, labels)
        )
        ds = (
            data.val.dataset
            if split == spec.data.val_split
            else make_dataset(items, eval_tf, cache="none")
        )
        loader = build_loader(
            ds,
            EpochSampler(len(items), shuffle=False),
            batch_size=spec.eval.batch_size,
            workers=spec.data.workers,
        )
        probs, y, idx, _ = predict_probs(
            model, loader, task=labels.task, device=rt.device, amp_dtype=state.amp_dtype,
            channels_last=state.channels_last, description=f"predict {split}",
        )  # fmt: skip
        if not items:
            probs = np.zeros((0, labels.num_outputs))
        _write_predictions(
            run_dir / out_name, manifest, labels, split, probs, idx, spec.eval.threshold
        )
        aucs[split] = compute_metric(labels.task, probs, y, pos) if items else float("nan")
    preprocessing = preprocessing_dict(spec.transforms, weights=wmeta)
    meta = {
        "task": labels.task,
        "classes": list(labels.classes),
        "label_columns": list(labels.label_columns),
        "weights_source": spec.model.weights,
        "preprocessing": preprocessing,
        "threshold": spec.eval.threshold,
        "best_epoch": state.best_epoch,
        "val_auc": None if math.isnan(aucs[spec.data.val_split]) else aucs[spec.data.val_split],
    }
    if labels.task == "binary":
        meta["positive_class"] = labels.positive_class
    model_dir = save_model_dir(run_dir / "model", model, meta)
    best_auc = max(
        (r["val_auc"] for r in state.history if not math.isnan(r["val_auc"])), default=float("nan")
    )
    return TrainResult(
        run_dir=run_dir,
        model_dir=Path(model_dir),
        epochs_completed=state.epoch,
        best_epoch=state.best_epoch,
        best_val_auc=best_auc,
        val_auc=aucs[spec.data.val_split],
        test_auc=aucs[spec.data.test_split],
        seconds=time.perf_counter() - t_start,
        history=state.history,
    )
