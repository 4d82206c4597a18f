"""Manifest rows -> labelled items -> cached MONAI datasets -> deterministic loaders.

Choices:

* Labels: ``label`` holds a class name per row (binary when two classes, multi-class
  otherwise); multi-label manifests have ``label_<name>`` 0/1 columns. Rows with an empty
  label or split are left out (logged), never guessed.
* Leakage guard: one pseudonymous ``patient_key`` in two splits refuses training.
* Caching: ``none`` (monai Dataset), ``memory`` (CacheDataset: the deterministic transform
  prefix is computed once) or ``disk`` (PersistentDataset under a folder named by a hash of
  the preprocessing, so a changed spec never reads a stale cache).
* Sampling: :class:`EpochSampler` draws the epoch's order (shuffled, or class-balanced with
  replacement) from ``(seed, epoch)`` only and shards it over DDP ranks. The augmentation
  RNGs are re-seeded from ``(seed, epoch, rank)`` at each epoch start (and, with workers,
  through the loader's generator), so an epoch's batches depend only on its number: this
  is what makes ``--resume`` bit-exact without saving iterator internals.

:func:`build_data` assembles the train/val loaders of a run (:class:`DataBundle`). Reads
manifests through :mod:`medres.dataset.manifest` (``Manifest``); imports
``medres.train.spec``/``transforms``, ``medres.runtime`` and core only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Sampler

from medres.dataset.manifest import Manifest, sort_classes
from medres.errors import ConfigError, ManifestError, TrainError
from medres.runtime import Runtime
from medres.train.spec import DataSpec, PipelineSpec

if TYPE_CHECKING:
    from medres.train.augment_batched import BatchedAugment

log = logging.getLogger(__name__)

__all__ = [
    "TASKS",
    "DataBundle",
    "EpochSampler",
    "LabelInfo",
    "build_data",
    "build_loader",
    "check_images",
    "check_leakage",
    "class_weights",
    "device_augment",
    "epoch_seed",
    "make_dataset",
    "make_items",
    "resolve_labels",
    "sample_weights",
    "seed_loader_epoch",
]

TASKS = ("binary", "multiclass", "multilabel")
AUGMENT_DEVICE_MODES = ("auto", "on", "off")
CACHE_MODES = ("none", "memory", "disk")
BALANCE_MODES = ("none", "sampler", "weights")


def check_leakage(rows: Sequence[dict[str, str]], manifest_name: str = "manifest.csv") -> None:
    """Raise TrainError when one patient key appears in two splits."""
    seen: dict[str, str] = {}
    for row in rows:
        pk, split = row.get("patient_key", ""), row.get("split", "")
        if not pk or not split:
            continue
        prev = seen.setdefault(pk, split)
        if prev != split:
            raise TrainError(
                f"{manifest_name}: patient {pk} is in both the {prev!r} and {split!r} splits "
                "(leakage); re-split by patient (medres ingest --val-frac/--test-frac) or fix "
                "the split column"
            )


def _row_dims(row: dict[str, str]) -> int | None:
    dims, shape = row.get("dims", ""), row.get("shape", "")
    if dims.strip().isdigit():
        return int(dims)
    return len(shape.split("x")) if shape else None


def check_images(manifest: Manifest, spec: DataSpec) -> None:
    """Before training: every image of the used splits exists and all are 2D or all 3D.

    Raises ManifestError naming the manifest line, ``image_id`` and ``image_path`` (the
    pseudonymous names ingest writes) of the first offending row.
    """
    name = Path(manifest.path).name
    splits = {spec.train_split, spec.val_split, spec.test_split}
    used = [(i, r) for i, r in enumerate(manifest.rows, start=2) if r.get("split", "") in splits]
    dims = Counter(d for _, r in used if (d := _row_dims(r)) is not None)
    common = dims.most_common(1)[0][0] if dims else None
    for line, row in used:
        where = f"{name} line {line} (image_id {row['image_id']})"
        if not manifest.resolve(row).is_file():
            raise ManifestError(
                f"{where}: image file {row['image_path']!r} is missing; re-run `medres ingest` "
                "into this folder, fix image_path, or remove the row"
            )
        d = _row_dims(row)
        if common is not None and d is not None and d != common:
            raise ManifestError(
                f"{where}: a {d}D image in a manifest of {common}D images; one run trains on "
                "2D or on 3D images only: split the manifest (or remove the row), or set "
                "data.train_split/val_split/test_split to splits of one kind"
            )


@dataclass(frozen=True)
class LabelInfo:
    """The resolved task: label columns, class names (output order) and positive class."""

    task: str
    label_columns: tuple[str, ...]
    classes: tuple[str, ...]
    positive_class: str = ""

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class) if self.positive_class else -1


def resolve_labels(manifest: Manifest, spec: DataSpec) -> LabelInfo:
    """Work out task, label columns and classes from ``spec`` and the manifest's values."""
    name = Path(manifest.path).name
    cols = tuple(spec.label_columns) or tuple(manifest.label_columns)
    if not cols:
        raise ManifestError(
            f"{name}: no label column; add `label` (or label_<name> 0/1 columns) via "
            "`medres ingest --labels CSV`"
        )
    missing = [c for c in cols if c not in manifest.columns]
    if missing:
        raise ConfigError(
            f"data.label_columns: {', '.join(missing)} not in {name}; columns are "
            f"{', '.join(manifest.columns)}"
        )
    task = spec.task
    if task == "auto":
        task = "multilabel" if (len(cols) > 1 or cols[0] != "label") else ""
    if task not in ("", *TASKS):
        raise ConfigError(f"data.task is {spec.task!r}; use auto, {', '.join(TASKS)}")
    if task == "multilabel":
        classes = tuple(spec.classes) or tuple(c.removeprefix("label_") for c in cols)
        if len(classes) != len(cols):
            raise ConfigError(
                f"data.classes has {len(classes)} names for {len(cols)} label columns; give one each"
            )
        return LabelInfo("multilabel", cols, classes)
    if len(cols) != 1:
        raise ConfigError(f"data.task {task} takes one label column; got {', '.join(cols)}")
    values = {r.get(cols[0], "") for r in manifest.rows} - {""}
    classes = tuple(spec.classes) or sort_classes(values)
    unknown = values - set(classes)
    if unknown:
        raise ConfigError(
            f"data.classes {list(classes)} misses label value(s) {sorted(unknown)[:5]} found in {name}"
        )
    if len(classes) < 2:
        raise TrainError(
            f"{name}: column {cols[0]} has {len(classes)} class(es); training needs at least two "
            "(check the labels CSV given to ingest)"
        )
    if not task:
        task = "binary" if len(classes) == 2 else "multiclass"
    if task == "binary" and len(classes) != 2:
        raise ConfigError(f"data.task binary needs two classes; found {len(classes)}")
    positive = ""
    if task == "binary":
        positive = spec.positive_class or classes[-1]
        if positive not in classes:
            raise ConfigError(
                f"data.positive_class {spec.positive_class!r} is not a class; classes are {list(classes)}"
            )
    return LabelInfo(task, cols, classes, positive)


def make_items(manifest: Manifest, split: str, labels: LabelInfo) -> list[dict[str, Any]]:
    """Dataset items (``image`` path, ``channels``, ``label``, ``index`` into manifest.rows)."""
    items: list[dict[str, Any]] = []
    skipped = 0
    for i, row in enumerate(manifest.rows):
        if row.get("split", "") != split:
            continue
        values = [row.get(c, "") for c in labels.label_columns]
        if any(v == "" for v in values):
            skipped += 1
            continue
        if labels.task == "multilabel":
            label: Any = np.asarray([float(v) for v in values], dtype=np.float32)
        else:
            label = labels.classes.index(values[0])
        channels = int(row.get("channels") or 1)
        items.append(
            {"image": str(manifest.resolve(row)), "channels": channels, "label": label, "index": i}
        )
    if skipped:
        log.warning("%s split: %d row(s) without a label left out", split, skipped)
    return items


def class_counts(items: Sequence[dict[str, Any]], labels: LabelInfo) -> np.ndarray:
    """Per-class counts (positives per label for multi-label)."""
    if labels.task == "multilabel":
        return (
            np.sum([it["label"] for it in items], axis=0) if items else np.zeros(labels.num_outputs)
        )
    c = Counter(int(it["label"]) for it in items)
    return np.asarray([c.get(k, 0) for k in range(labels.num_outputs)], dtype=np.float64)


def sample_weights(items: Sequence[dict[str, Any]], labels: LabelInfo) -> torch.Tensor:
    """Per-item weights giving every class the same expected share (multi-label: rarest label)."""
    counts = np.maximum(class_counts(items, labels), 1.0)
    if labels.task == "multilabel":
        inv = 1.0 / counts
        w = [
            max([inv[j] for j in np.flatnonzero(it["label"])] or [1.0 / len(items)]) for it in items
        ]
    else:
        w = [1.0 / counts[int(it["label"])] for it in items]
    return torch.as_tensor(w, dtype=torch.float64)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 31-bit seed derived from (seed, epoch, rank)."""
    h = hashlib.sha256(f"{seed}:{epoch}:{rank}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


class EpochSampler(Sampler[int]):
    """Deterministic per-epoch order, optionally class-weighted, sharded over ranks.

    Every rank draws the same global order from ``(seed, epoch)`` and takes every
    ``world``-th index starting at ``rank`` (padded by wrapping so shards are equal).
    """

    def __init__(
        self,
        n: int,
        *,
        shuffle: bool = True,
        weights: torch.Tensor | None = None,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.n, self.shuffle, self.weights = n, shuffle, weights
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self) -> Iterator[int]:
        total = len(self) * self.world
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, -1))
        if self.weights is not None:
            idx = torch.multinomial(self.weights, total, replacement=True, generator=g).tolist()
        elif self.shuffle:
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        if len(idx) < total:
            idx += idx[: total - len(idx)] if idx else []
        return iter(idx[self.rank : total : self.world])


_AUGMENT_KEYS = {
    "augment",
    "flip_prob",
    "flip_axes",
    "affine_prob",
    "rotate_deg",
    "scale",
    "intensity_prob",
    "intensity_jitter",
    "noise_prob",
    "noise_std",
    "augment_device",
}


def preprocessing_hash(preprocessing: dict[str, Any]) -> str:
    """Short content hash of the deterministic preprocessing (the disk-cache key)."""
    keep = {k: v for k, v in preprocessing.items() if k not in _AUGMENT_KEYS}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def make_dataset(
    items: list[dict[str, Any]],
    transform: Any,
    *,
    cache: str,
    cache_dir: Path | None = None,
    cache_workers: int = 0,
) -> torch.utils.data.Dataset:
    """A MONAI Dataset / CacheDataset / PersistentDataset over ``items``."""
    from monai.data import CacheDataset, Dataset, PersistentDataset

    if cache not in CACHE_MODES:
        raise ConfigError(f"data.cache is {cache!r}; use one of {', '.join(CACHE_MODES)}")
    if cache == "memory":
        # copy_cache=False: no transform after the cached prefix mutates its input in place
        return CacheDataset(
            items,
            transform,
            cache_rate=1.0,
            num_workers=max(cache_workers, 1) if cache_workers else 1,
            progress=False,
            copy_cache=False,
        )
    if cache == "disk":
        if cache_dir is None:
            raise ConfigError(
                "data.cache is disk but no cache folder was given; set data.cache_dir"
            )
        cache_dir.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(items, transform, cache_dir=cache_dir)
    return Dataset(items, transform)


def build_loader(
    dataset: torch.utils.data.Dataset,
    sampler: EpochSampler,
    *,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
    train: bool = False,
) -> torch.utils.data.DataLoader:
    """A MONAI DataLoader over ``sampler`` with its own (per-epoch re-seeded) generator.

    ``train``: an epoch whose last batch would hold one sample drops it (BatchNorm cannot
    train on one sample: ``Expected more than 1 value per channel``; e.g. 34 images of a
    fold at batch 11). The sampler shuffles every epoch, so a different sample sits out
    each time; every other last batch is kept."""
    from monai.data import DataLoader

    g = torch.Generator().manual_seed(0)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=g,
        drop_last=train and len(sampler) % batch_size == 1 and len(sampler) > 1,
        persistent_workers=False,
    )


def seed_loader_epoch(
    loader: torch.utils.data.DataLoader, seed: int, epoch: int, rank: int
) -> None:
    """Make the epoch's sampling and augmentation a function of (seed, epoch, rank) only."""
    from monai.data.utils import set_rnd

    s = epoch_seed(seed, epoch, rank)
    if isinstance(loader.sampler, EpochSampler):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(s)  # workers seed their transforms from this
    set_rnd(loader.dataset, s)  # in-process loading (workers=0)


# ------------------------------------------------------------------------------- run bundle
@dataclass(frozen=True)
class DataBundle:
    """The loaders and items of one run (train: sharded per rank; val: whole set)."""

    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    train_items: list[dict[str, Any]]
    val_items: list[dict[str, Any]]
    class_weights: torch.Tensor | None


def cache_root(spec: PipelineSpec, run_dir: Path) -> Path:
    """``data.cache_dir`` (or RUN_DIR/cache) / the preprocessing hash."""
    from medres.train.transforms import preprocessing_dict

    base = Path(spec.data.cache_dir) if spec.data.cache_dir else run_dir / "cache"
    return base / preprocessing_hash(preprocessing_dict(spec.transforms))


def class_weights(items: Sequence[dict[str, Any]], labels: LabelInfo) -> torch.Tensor:
    """Loss weights: inverse class frequency, or negatives/positives per label (multi-label)."""
    counts = np.maximum(class_counts(items, labels), 1.0)
    if labels.task == "multilabel":
        return torch.as_tensor((len(items) - counts) / counts, dtype=torch.float32)
    return torch.as_tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)


def _split_items(
    manifest: Manifest, spec: DataSpec, labels: LabelInfo
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    train_items = make_items(manifest, spec.train_split, labels)
    val_items = make_items(manifest, spec.val_split, labels)
    name = Path(manifest.path).name
    for split, items in ((spec.train_split, train_items), (spec.val_split, val_items)):
        if not items:
            raise TrainError(
                f"{name}: no labelled rows in split {split!r}; re-run ingest with a labels CSV "
                "and --val-frac > 0, or set data.train_split/data.val_split"
            )
    return train_items, val_items


def device_augment(spec: PipelineSpec, rt: Runtime) -> BatchedAugment | None:
    """The batched on-device augmentation of the run, or None (augment per item in the loader).

    ``transforms.augment_device``: ``on``, ``off``, or ``auto``: on for CUDA. On CPU the
    batched path is ~40x cheaper per batch at 28 px (benchmarks/RESULTS.md) but draws other
    random numbers than MONAI's, so the CPU default stays the per-item path until a quality
    run shows the same AUC.
    """
    from medres.train.augment_batched import BatchedAugment

    mode = spec.transforms.augment_device
    mode = {"True": "on", "False": "off"}.get(str(mode), mode)  # YAML reads on/off as booleans
    if mode not in AUGMENT_DEVICE_MODES:
        raise ConfigError(
            f"transforms.augment_device is {mode!r}; use one of {', '.join(AUGMENT_DEVICE_MODES)}"
        )
    on = mode == "on" or (mode == "auto" and rt.device.type == "cuda")
    if not (on and spec.transforms.augment):
        return None
    return BatchedAugment(spec.transforms, spec.train.seed, rank=rt.rank, world=rt.world)


def build_data(
    spec: PipelineSpec, manifest: Manifest, labels: LabelInfo, rt: Runtime, run_dir: Path
) -> DataBundle:
    """Train/val datasets (cached per ``data.cache``) and their deterministic loaders.

    With :func:`device_augment` the train items go through the deterministic transforms
    only (cached) and the train loader carries the augmenter as ``loader.device_augment``;
    :func:`medres.train.engine.train_one_epoch` applies it to each batch on the device.
    """
    from medres.train.transforms import build_transforms

    d = spec.data
    train_items, val_items = _split_items(manifest, d, labels)
    root = cache_root(spec, run_dir)
    aug = device_augment(spec, rt)
    train_tf = spec.transforms if aug is None else replace(spec.transforms, augment=False)
    train_ds = make_dataset(
        train_items,
        build_transforms(train_tf, train=True),
        cache=d.cache,
        cache_dir=root / "train",
    )
    val_ds = make_dataset(
        val_items,
        build_transforms(spec.transforms, train=False),
        cache=d.cache,
        cache_dir=root / "eval",
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
        train=True,
    )
    val = build_loader(
        val_ds,
        EpochSampler(len(val_items), shuffle=False),
        batch_size=spec.eval.batch_size,
        workers=d.workers,
        pin_memory=pin,
    )
    if aug is not None:
        train.device_augment = aug  # type: ignore[attr-defined]
        log.info("augmentation: batched on %s (transforms.augment_device)", rt.device.type)
    cw = class_weights(train_items, labels) if d.balance == "weights" else None
    return DataBundle(train, val, train_items, val_items, cw)
