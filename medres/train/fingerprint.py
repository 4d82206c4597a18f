"""Fingerprints: what the plan knows about the data (the manifest) and the machine (timings).

:func:`data_fingerprint` reads only the manifest (no image is opened): dims, channels,
the majority modality and body part, the median shape and spacing, split sizes, the
number of patients, the task, the classes and their training counts.

:func:`measure_step` times a few forward/backward/optimizer steps of one candidate network
(arch, dims, stem, input size, batch) on random input, and the evaluation forward; the
result is cached per machine (CPU model, threads, torch version, device) in
``$MEDRES_CACHE_DIR/steptime.json`` (default ``~/.cache/medres``) for 15 minutes (a `medres plan` then `medres train`), while the
load average stays within a factor 1.25 of the one at measurement (a shared machine is as
fast as its load lets it be). :func:`measure_data` times the real preprocessing and
augmentation of a few training images with a candidate :class:`TransformSpec`.

Imports core, ``medres.dataset``, ``medres.models`` and ``medres.train.data``/``spec``/
``transforms``.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medres.dataset.manifest import Manifest
from medres.train.spec import DataSpec, TransformSpec

log = logging.getLogger(__name__)

__all__ = [
    "DataFingerprint",
    "StepTiming",
    "data_fingerprint",
    "machine_key",
    "measure_data",
    "measure_step",
]

CACHE_MAX_AGE_S = 15 * 60.0


@dataclass(frozen=True)
class DataFingerprint:
    """The manifest's summary that the plan reasons from."""

    manifest: str
    dims: int
    channels: int
    modality: str
    body_part: str
    median_shape: tuple[int, ...]
    median_spacing: tuple[float, ...]
    n_train: int
    n_val: int
    n_test: int
    n_patients: int
    task: str
    classes: tuple[str, ...]
    class_counts: tuple[int, ...]
    """Training count per class (positives per label for multi-label)."""
    intensity_levels: int = 0
    """Median number of distinct voxel values in a few training images, capped at 256 (0 =
    not read); 2 means binary masks, which a z-score over non-zero voxels turns into 0."""

    @property
    def imbalance(self) -> float:
        """Largest over smallest training class count (inf when a class is absent)."""
        counts = [c for c in self.class_counts]
        if not counts:
            return 1.0
        return float("inf") if min(counts) == 0 else max(counts) / min(counts)

    @property
    def min_side(self) -> int:
        """Smallest side of the median shape (in-plane for 2D)."""
        return min(self.median_shape) if self.median_shape else 0

    @property
    def anisotropy(self) -> float:
        """Largest over smallest median voxel size (1 = isotropic)."""
        sp = [s for s in self.median_spacing if s > 0]
        return max(sp) / min(sp) if sp else 1.0

    def summary(self) -> str:
        """One line for logs and the plan's header."""
        shape = "x".join(map(str, self.median_shape)) or "?"
        spacing = "x".join(f"{s:g}" for s in self.median_spacing) or "?"
        counts = ", ".join(f"{c}={n}" for c, n in zip(self.classes, self.class_counts, strict=True))
        return (
            f"{self.dims}D {self.modality or 'unknown modality'}, {self.channels} channel(s), "
            f"median shape {shape} spacing {spacing} mm; {self.task}, train {counts} "
            f"(imbalance {self.imbalance:.1f}); splits {self.n_train}/{self.n_val}/{self.n_test}, "
            f"{self.n_patients} patients"
        )


def _majority(values: list[str]) -> str:
    vals = [v for v in values if v]
    return Counter(vals).most_common(1)[0][0] if vals else ""


def _median_tuple(values: list[str], cast: type) -> tuple[Any, ...]:
    parsed = []
    for v in values:
        try:
            parsed.append([cast(float(x)) for x in v.split("x")])
        except ValueError:
            continue
    if not parsed:
        return ()
    n = Counter(len(p) for p in parsed).most_common(1)[0][0]
    parsed = [p for p in parsed if len(p) == n]
    return tuple(cast(statistics.median(p[i] for p in parsed)) for i in range(n))


def data_fingerprint(manifest: Manifest, spec: DataSpec | None = None) -> DataFingerprint:
    """Summarise ``manifest`` for planning (the rows of ``spec.train_split`` where it matters)."""
    from medres.train.data import class_counts, make_items, resolve_labels

    spec = spec or DataSpec()
    labels = resolve_labels(manifest, spec)
    train_rows = manifest.select(spec.train_split) or manifest.rows
    dims = _majority([r.get("dims", "") for r in train_rows])
    shape = _median_tuple([r.get("shape", "") for r in train_rows], int)
    n_dims = int(dims) if dims else (len(shape) if shape else 2)
    counts = class_counts(make_items(manifest, spec.train_split, labels), labels)
    patients = {r.get("patient_key") or r.get("image_id", "") for r in manifest.rows}
    return DataFingerprint(
        manifest=str(manifest.path),
        dims=n_dims,
        channels=int(_majority([r.get("channels", "") for r in train_rows]) or 1),
        modality=_majority([r.get("modality", "").upper() for r in train_rows]),
        body_part=_majority([r.get("body_part", "").upper() for r in train_rows]),
        median_shape=shape[:n_dims],
        median_spacing=_median_tuple([r.get("spacing", "") for r in train_rows], float)[:n_dims],
        n_train=len(manifest.select(spec.train_split)),
        n_val=len(manifest.select(spec.val_split)),
        n_test=len(manifest.select(spec.test_split)),
        n_patients=len(patients),
        task=labels.task,
        classes=tuple(labels.classes),
        class_counts=tuple(int(c) for c in counts),
        intensity_levels=intensity_levels(manifest, spec.train_split),
    )


def intensity_levels(manifest: Manifest, split: str = "train", n: int = 4) -> int:
    """Median count of distinct values (capped at 256) in ``n`` images of ``split``; 0 when
    none can be read (the plan then keeps the automatic intensity rule)."""
    import numpy as np

    from medres.train.transforms import load_image_tensor

    counts = []
    for row in (manifest.select(split) or manifest.rows)[:n]:
        try:
            arr = np.asarray(load_image_tensor(manifest.resolve(row)))
        except Exception as exc:  # a probe only: check_images reports unreadable files
            log.debug("intensity probe skipped an image (%s)", type(exc).__name__)
            continue
        counts.append(min(len(np.unique(arr[:: max(1, arr.size // 200000)])), 256))
    return int(statistics.median(counts)) if counts else 0


# ------------------------------------------------------------------------------ timings
@dataclass(frozen=True)
class StepTiming:
    """Measured seconds per sample of one candidate network on this machine."""

    arch: str
    dims: int
    stem: str
    size: int
    channels: int
    batch_size: int
    train_s: float
    """Seconds per training sample (forward + backward + AdamW step)."""
    eval_s: float
    """Seconds per evaluated sample (forward, no grad)."""
    load: float = 0.0
    """1-minute load average when measured (a shared CPU is slower under load)."""
    cached: bool = False


def machine_key(device: str, threads: int) -> str:
    """What a timing depends on besides the network: CPU/GPU model, threads, torch."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        hw = torch.cuda.get_device_name(0)
    else:
        from medres.runtime import cpu_model

        hw = cpu_model()
    return f"{hw}|{device}|{threads}t|torch {torch.__version__}"


def _cache_path() -> Path:
    base = os.environ.get("MEDRES_CACHE_DIR") or str(Path.home() / ".cache" / "medres")
    return Path(base) / "steptime.json"


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict[str, Any]) -> None:
    from medres.io import atomic_write_json

    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, cache)
    except OSError as exc:  # a read-only home must not stop planning
        log.debug("step-time cache not written (%s)", exc)


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def _still_valid(hit: dict[str, Any]) -> bool:
    """A cached timing holds for 15 minutes while the load is about what it was when measured
    (within a factor 1.25 of load + 1: a shared CPU's speed follows its load)."""
    if time.time() - hit.get("time", 0) >= CACHE_MAX_AGE_S:
        return False
    ratio = (_load() + 1.0) / (float(hit.get("load", 0.0)) + 1.0)
    return 1 / 1.25 <= ratio <= 1.25


def _time_steps(model: Any, x: Any, y: Any, steps: int) -> tuple[float, float]:
    """(train seconds per step, eval seconds per step): one warm-up, then the median."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        model(x)
        t0 = time.perf_counter()
        model(x)
        ev = time.perf_counter() - t0
    return statistics.median(times), ev


def measure_step(
    arch: str,
    dims: int,
    stem: str,
    size: int,
    *,
    channels: int = 1,
    batch_size: int = 8,
    device: str = "cpu",
    steps: int = 2,
    use_cache: bool = True,
) -> StepTiming:
    """Time ``steps`` training steps (after one warm-up) of a 2-class network on random input.

    Uses the current torch thread setting; cached per :func:`machine_key`.
    """
    import torch

    from medres.models import build_model

    threads = torch.get_num_threads()
    key = f"{machine_key(device, threads)}|{arch}|{dims}d|{stem}|{size}|{channels}ch|b{batch_size}"
    cache = _read_cache() if use_cache else {}
    hit = cache.get(key)
    if hit and _still_valid(hit):
        return StepTiming(
            **{k: v for k, v in hit.items() if k not in ("time", "cached")}, cached=True
        )
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(arch, dims, channels, 2, stem=stem).to(dev)
    x = torch.randn(batch_size, channels, *(size,) * dims, device=dev)
    y = torch.randint(0, 2, (batch_size,), device=dev)
    train_step, eval_step = _time_steps(model, x, y, steps)
    load = _load()
    timing = StepTiming(
        arch, dims, stem, size, channels, batch_size,
        train_step / batch_size, eval_step / batch_size, round(load, 2),
    )  # fmt: skip
    log.info(
        "measured %s %dD %s stem at %d: %.4f s/sample train, %.4f eval (load %.1f)",
        arch, dims, stem, size, timing.train_s, timing.eval_s, load,
    )  # fmt: skip
    if use_cache:
        cache = _read_cache()
        cache[key] = {**asdict(timing), "cached": False, "time": time.time()}
        _write_cache(cache)
    return timing


def measure_data(
    manifest: Manifest, spec: TransformSpec, split: str = "train", n: int = 6
) -> tuple[float, float]:
    """(seconds per sample to load + preprocess, seconds per sample to augment) on ``n``
    real images of ``split`` with the resolved ``spec`` (``image_size`` etc. set)."""
    from medres.train.transforms import build_transforms

    rows = manifest.select(split)[:n] or manifest.rows[:n]
    if not rows:
        return 0.0, 0.0
    items = [
        {"image": str(manifest.resolve(r)), "channels": int(r.get("channels") or 1)} for r in rows
    ]
    pre = build_transforms(spec, train=False)
    full = build_transforms(spec, train=True)
    t0 = time.perf_counter()
    for it in items:
        pre(dict(it))
    t_pre = (time.perf_counter() - t0) / len(items)
    t0 = time.perf_counter()
    for it in items:
        full(dict(it))
    t_full = (time.perf_counter() - t0) / len(items)
    return t_pre, max(t_full - t_pre, 0.0)
