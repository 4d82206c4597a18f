"""The self-configuring plan: data fingerprint + measured machine speed -> a pipeline spec.

:func:`make_plan` turns a :class:`~medres.train.fingerprint.DataFingerprint` and the
device into a :class:`Plan`: a complete :class:`~medres.train.spec.PipelineSpec` plus the
reason for every choice and the estimated wall time. ``Plan.to_yaml()`` is a pipeline
file (every chosen field with its reason as a comment) that ``medres train`` reads back.

Rules (each is written into the plan with the numbers that triggered it):

* **Input size and stem.** 2D: the median in-plane size, capped at 64 on CPU / 224 on
  CUDA; images under 64 px are also tried up-sampled (1.5x, 2x, at most 64) with the small
  stem (stride 1, no max-pool), which keeps spatial detail for MedMNIST-like inputs. 3D:
  the median size capped at 64 (CPU) / 128 (CUDA), and 48 and 32 below it, always with the
  standard stem (the small stem costs 8-14x more in 3D). The largest candidate whose
  measured epoch time still allows the minimum number of epochs in the budget wins.
* **Depth.** ResNet-18 unless the training set is large (>= 20,000 images) and ResNet-34
  still fits; deeper nets from scratch overfit small medical sets.
* **Ensemble and test-time flips** (:mod:`medres.train.ensemble`): K members when K >= 2
  full trainings fit the budget (at most 5), else one network; ``model.tta`` auto when the
  augmentation flips images. ``--folds K`` (:mod:`medres.train.folds`; never chosen by
  the plan): K cross-validation members share the budget instead, timed on a fold's
  train/val sizes, with each member's caching and the K-member predictions in the fixed
  time.
* **Epochs.** Without a budget, a default from the data size (``clip(20000 / n_train,
  12, 60)`` in 2D, ``clip(6000 / n_train, 10, 40)`` in 3D) and the resulting time is
  reported; with a budget, as many epochs as fit (at most 3x the default).
* **Optimisation.** AdamW, cosine decay with a short linear warm-up, peak LR scaled with
  the square root of the batch size, weight decay 0.05 for small sets (< 5,000 images)
  else 0.01, label smoothing 0.05 (single-label tasks); the weight EMA when the spec has it.
* **Augmentation by modality.** No left-right flip on radiographs/mammograms (CR, DX, MG:
  laterality is meaningful), small rotations; ultrasound: left-right flip only (the probe
  is at the top), rotations up to 15 degrees, stronger intensity jitter, no noise (speckle
  already is); microscopy/photographs (SM, XC, GM, OP, unknown RGB): flips on both axes and
  any rotation; CT/MR volumes: left-right flip, rotations 10 degrees. Augmentation is
  stronger for small sets.
* **Class imbalance.** Ratio < 3: nothing; 3-20: class-weighted loss; > 20: a class-balanced
  sampler.
* **Time.** ``startup + cache + epochs x (n_train x (step + augment) + n_val x eval) +
  final predictions``, from :func:`~medres.train.fingerprint.measure_step` and
  :func:`~medres.train.fingerprint.measure_data`; a budget keeps 8% in reserve and the
  training loop stops at the budget (see :func:`epoch_deadline`).

Imports ``medres.train.fingerprint``/``spec``/``resolve`` and core.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from medres.dataset.manifest import Manifest
from medres.errors import ConfigError
from medres.train.fingerprint import DataFingerprint, StepTiming
from medres.train.spec import SECTIONS, PipelineSpec, spec_field_names

log = logging.getLogger(__name__)

__all__ = ["Choice", "DeadlineLoader", "Plan", "default_epochs", "make_plan", "plan_for_manifest"]

RADIOGRAPH = {"CR", "DX", "MG", "RF", "XA", "PX", "IO"}
ULTRASOUND = {"US", "IVUS"}
ROTATION_FREE = {"SM", "XC", "GM", "OP", "ES"}
STARTUP_S = 10.0  # interpreter, imports, model build, run-dir set-up
FINAL_FIXED_S = 10.0  # calibration, model dir, predictions files (a loaded CPU: more)
RESERVE = 0.08  # share of a budget kept for noise
OPTIMISM = 1.25  # planned epochs over those that fit at the measured speed (see _pick)


@dataclass(frozen=True)
class Choice:
    """One planned field: ``key`` is ``section.field``."""

    key: str
    value: Any
    reason: str


@dataclass(frozen=True)
class Candidate:
    """One network/size option with its measured costs (seconds)."""

    arch: str
    size: int
    stem: str
    timing: StepTiming
    aug_s: float
    pre_s: float

    def epoch_s(self, fp: DataFingerprint) -> float:
        """One epoch: train steps + augmentation + validation of the live and the EMA weights."""
        return fp.n_train * (self.timing.train_s + self.aug_s) + 2 * fp.n_val * self.timing.eval_s

    def final_s(self, fp: DataFingerprint) -> float:
        """After the last epoch: loading test, val/test predictions, calibration, outputs."""
        return (
            fp.n_test * self.pre_s + 2 * (fp.n_val + fp.n_test) * self.timing.eval_s + FINAL_FIXED_S
        )

    def fixed_s(self, fp: DataFingerprint) -> float:
        """Start-up, caching train and val, and :meth:`final_s`."""
        return STARTUP_S + (fp.n_train + fp.n_val) * self.pre_s + self.final_s(fp)


@dataclass(frozen=True)
class Plan:
    """A pipeline spec with the reason for each choice and its time estimate."""

    spec: PipelineSpec
    choices: tuple[Choice, ...]
    fingerprint: DataFingerprint
    budget_min: float
    """The requested budget (0 = none given)."""
    estimated_s: float
    epoch_s: float
    fixed_s: float
    final_s: float
    """Seconds needed after the last epoch (see :func:`epoch_deadline`)."""
    measure_s: float = 0.0
    """Seconds spent measuring (counted in a budget when measured at train time)."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def estimated_min(self) -> float:
        return self.estimated_s / 60.0

    def summary(self) -> str:
        """A few lines for the console."""
        t = self.spec.train
        size = "x".join(map(str, self.spec.transforms.image_size))
        budget = f"budget {self.budget_min:g} min" if self.budget_min else "no budget"
        return (
            f"plan: {self.spec.model.arch} {self.spec.model.dims}D, {self.spec.model.stem} stem, "
            f"{size}, batch {t.batch_size}, {t.epochs} epochs"
            + (f" x {self.spec.model.ensemble} members" if self.spec.model.ensemble > 1 else "")
            + (f" x {self.spec.model.folds} folds" if self.spec.model.folds else "")
            + f", {t.optimizer} lr {t.lr:g} "
            f"{t.scheduler}; estimated {self.estimated_min:.1f} min "
            f"({self.epoch_s:.1f} s/epoch + {self.fixed_s:.0f} s fixed; {budget})"
        )

    def to_yaml(self) -> str:
        """A pipeline file: header comments, then every chosen field with its reason."""
        head = [
            "# medres plan (medres plan / medres train without a pipeline)",
            f"# data: {self.fingerprint.summary()}",
            f"# estimated_minutes: {self.estimated_min:.2f}",
            f"# budget_minutes: {self.budget_min:g}" + ("" if self.budget_min else " (none)"),
            f"# per epoch {self.epoch_s:.1f} s, fixed {self.fixed_s:.0f} s "
            f"(start-up, caching, final predictions)",
        ] + [f"# {n}" for n in self.notes]
        by_section: dict[str, list[Choice]] = {s: [] for s in SECTIONS}
        for c in self.choices:
            by_section[c.key.split(".", 1)[0]].append(c)
        lines = head
        for section, items in by_section.items():
            if not items:
                continue
            lines.append(f"{section}:")
            for c in items:
                value = yaml.safe_dump(c.value, default_flow_style=True).strip()
                value = value.removesuffix("...").strip()
                lines.append(f"  {c.key.split('.', 1)[1]}: {value}  # {c.reason}")
        return "\n".join(lines) + "\n"


def default_epochs(fp: DataFingerprint) -> int:
    """Epochs without a budget: fewer for larger sets (about the same number of steps)."""
    n = max(fp.n_train, 1)
    if fp.dims == 3:
        return int(min(max(round(6000 / n), 10), 40))
    return int(min(max(round(20000 / n), 12), 60))


def _round8(x: float) -> int:
    return max(8, round(x / 8.0) * 8)


def size_candidates(fp: DataFingerprint, cuda: bool) -> list[tuple[int, str]]:
    """(size, stem) options, largest first."""
    side = fp.min_side or (64 if fp.dims == 2 else 48)
    if fp.dims == 2:
        cap = 224 if cuda else 64
        base = min(side, cap)
        sizes = {base}
        if base < 64:
            sizes |= {min(_round8(base * 1.5), 64), min(_round8(base * 2), 64)}
        return [(s, "small" if s < 64 else "standard") for s in sorted(sizes, reverse=True)]
    cap = 128 if cuda else 64
    base = min(side, cap)
    sizes = {base} | {s for s in (96, 64, 48, 32) if s < base}
    return [(s, "standard" if s >= 24 else "small") for s in sorted(sizes, reverse=True)]


def _batch_size(fp: DataFingerprint, cuda: bool) -> int:
    if fp.dims == 3:
        bs = 16 if cuda else 8
    else:
        bs = (128 if cuda else 64) if fp.n_train >= 5000 else (64 if cuda else 32)
    return int(max(2, min(bs, fp.n_train // 4 or 2)))


def _augmentation(fp: DataFingerprint) -> list[Choice]:
    """Modality-fit augmentation; stronger for small sets."""
    mod = fp.modality
    strong = fp.n_train < 2000
    p_aff = 0.7 if strong else 0.5
    if fp.dims == 2 and mod in RADIOGRAPH:
        flips, rot, why = [], 7.0, f"{mod}: no flips (laterality matters), small rotations"
    elif fp.dims == 2 and mod in ULTRASOUND:
        flips, rot, why = [0], 15.0, "ultrasound: left-right flip only (probe at the top)"
    elif fp.dims == 2 and (mod in ROTATION_FREE or (not mod and fp.channels == 3)):
        flips, rot, why = [0, 1], 180.0, f"{mod or 'RGB'}: no canonical orientation"
    elif fp.dims == 3:
        flips, rot, why = [0], 10.0, f"{mod or '3D'} volumes: left-right flip, small rotations"
    else:
        flips, rot, why = [0], 10.0, f"{mod or 'unknown modality'}: left-right flip"
    us = mod in ULTRASOUND
    size_note = f"{fp.n_train} training images: {'stronger' if strong else 'moderate'}"
    return [
        Choice("transforms.augment", True, "random augmentation during training"),
        Choice("transforms.flip_axes", flips, why),
        Choice("transforms.flip_prob", 0.5, "each allowed flip half the time"),
        Choice("transforms.affine_prob", p_aff, size_note),
        Choice("transforms.rotate_deg", rot, why),
        Choice("transforms.scale", 0.15 if strong else 0.1, size_note),
        Choice("transforms.intensity_prob", 0.5, "gain/offset differ between scanners"),
        Choice("transforms.intensity_jitter", 0.2 if us else 0.1, "US gain varies more" if us else "moderate"),
        Choice("transforms.noise_prob", 0.0 if us else 0.2, "no added noise on speckle" if us else "mild noise"),
    ]  # fmt: skip


def _imbalance(fp: DataFingerprint) -> Choice:
    r = fp.imbalance
    if fp.task == "multilabel" or r < 3:
        return Choice("data.balance", "none", f"class ratio {r:.1f} < 3 (or multi-label)")
    if r <= 20:
        return Choice("data.balance", "weights", f"class ratio {r:.1f}: class-weighted loss")
    return Choice("data.balance", "sampler", f"class ratio {r:.1f} > 20: balanced sampler")


def _optimisation(fp: DataFingerprint, bs: int, epochs: int, why_epochs: str) -> list[Choice]:
    base_bs = 8 if fp.dims == 3 else 32
    base_lr = 1e-3 if fp.dims == 3 else 2e-3
    lr = float(f"{base_lr * math.sqrt(bs / base_bs):.2g}")
    small = fp.n_train < 5000
    warm = round(min(max(0.05 * epochs, 0.5), 3.0), 2)
    out = [
        Choice("train.epochs", epochs, why_epochs),
        Choice("train.batch_size", bs, f"{'3D' if fp.dims == 3 else '2D'} on this device; <= n_train/4"),
        Choice("train.optimizer", "adamw", "from scratch: AdamW with decoupled weight decay"),
        Choice("train.lr", lr, f"{base_lr:g} at batch {base_bs}, scaled by sqrt(batch/{base_bs})"),
        Choice("train.scheduler", "cosine", "cosine decay to 0 over the planned epochs (graceful at the budget)"),
        Choice("train.warmup_epochs", warm, "5% of the epochs (0.5-3)"),
        Choice("train.weight_decay", 0.05 if small else 0.01, f"{fp.n_train} training images: {'strong' if small else 'light'} regularisation"),
        Choice("train.label_smoothing", 0.0 if fp.task == "multilabel" else 0.05, "mild smoothing (the temperature is fitted on val afterwards)"),
        Choice("train.early_stopping", 0, "off: the cosine schedule runs out; the best val checkpoint is kept"),
    ]  # fmt: skip
    if "ema_decay" in spec_field_names()["train"]:
        steps = max(1, epochs * math.ceil(fp.n_train / bs))
        decay = round(min(0.999, max(0.99, 1 - 10 / steps)), 4)
        out.append(
            Choice("train.ema_decay", decay, f"weight EMA over ~{steps // 10} of {steps} steps")
        )
    return out


def _data_choices(fp: DataFingerprint, cand: Candidate, cuda: bool, cores: int) -> list[Choice]:
    voxels = cand.size**fp.dims * fp.channels
    gb = (fp.n_train + fp.n_val) * voxels * 4 / 1e9
    cache = "memory" if gb < 8 else "disk"
    workers = 0 if (not cuda and cores <= 4) else min(4, max(1, cores // 2))
    return [
        Choice("data.manifest", fp.manifest, "the manifest that was fingerprinted"),
        Choice("data.cache", cache, f"preprocessed train+val {gb:.2f} GB"),
        Choice("data.workers", workers, f"{cores} cores" + (": augment in the training process" if not workers else "")),
        _imbalance(fp),
    ]  # fmt: skip


def _model_choices(fp: DataFingerprint, cand: Candidate) -> list[Choice]:
    side = fp.min_side
    why_size = (
        f"median {'in-plane ' if fp.dims == 2 else ''}side {side}: "
        + ("up-sampled " if cand.size > side else "resized ")
        + f"to {cand.size} (largest size with enough epochs in the time)"
    )
    why_stem = (
        "small stem (stride 1, no max-pool): keeps the detail of small images"
        if cand.stem == "small"
        else "standard stem (stride 4 before layer1): affordable at this size"
    )
    why_arch = (
        "ResNet-18: from scratch on a small set; deeper nets overfit"
        if cand.arch == "resnet18"
        else f"{cand.arch}: large training set and it fits the time"
    )
    return [
        Choice("transforms.image_size", [cand.size] * fp.dims, why_size),
        Choice("transforms.resize_mode", "resize", "area interpolation to image_size"),
        _intensity_choice(fp),
        Choice("model.arch", cand.arch, why_arch),
        Choice("model.dims", fp.dims, f"{fp.dims}D images"),
        Choice("model.stem", cand.stem, why_stem),
        Choice("model.weights", "none", "no pretrained weights are bundled offline"),
    ]  # fmt: skip


def _intensity_choice(fp: DataFingerprint) -> Choice:
    if 0 < fp.intensity_levels <= 2:
        return Choice(
            "transforms.intensity", "range",
            "binary images (masks): min-max to [0, 1]; a z-score of the non-zero voxels is 0",
        )  # fmt: skip
    why = f"{fp.modality or 'no modality'}: CT window / MR percentiles / else z-score"
    return Choice("transforms.intensity", "auto", why)


def _spacing_choice(fp: DataFingerprint) -> Choice:
    if fp.dims == 3 and fp.anisotropy > 3:
        return Choice(
            "transforms.spacing", [],
            f"anisotropy {fp.anisotropy:.1f}: kept; volumes are resized to the input size",
        )  # fmt: skip
    return Choice("transforms.spacing", [], "resize to image_size only (no resampling in mm)")


def _pick(
    fp: DataFingerprint, cands: list[Candidate], budget_s: float, epochs_default: int
) -> tuple[Candidate, int, str]:
    """(candidate, epochs, reason) for the largest candidate that fits the minimum epochs."""
    if not budget_s:
        fitting = [c for c in cands if c.fixed_s(fp) + epochs_default * c.epoch_s(fp) <= 1800]
        c = fitting[0] if fitting else cands[-1]
        return (
            c,
            epochs_default,
            f"no budget: {epochs_default} epochs for {fp.n_train} training images",
        )
    usable = budget_s * (1 - RESERVE)
    min_epochs = max(8, math.ceil(0.6 * epochs_default))
    for c in cands:
        # OPTIMISM x what fits: the schedule follows the clock (budget_scheduler) and the
        # loop stops at the deadline, so a run faster than measured still fills the budget
        fit = int(OPTIMISM * (usable - c.fixed_s(fp)) // c.epoch_s(fp))
        if fit >= min_epochs:
            n = min(fit, 3 * epochs_default)
            return (
                c,
                n,
                f"{n} epochs: {OPTIMISM}x what fits {budget_s / 60:.1f} min at the measured speed "
                f"(at most 3x the default {epochs_default}); the LR follows the clock, the "
                "loop stops at the deadline",
            )
    c = min(cands, key=lambda k: k.epoch_s(fp))
    fit = max(1, int(OPTIMISM * (usable - c.fixed_s(fp)) // c.epoch_s(fp)))
    return (
        c,
        fit,
        f"only {fit} epoch(s) fit {budget_s / 60:.1f} min at the measured speed (the minimum "
        f"wanted is {min_epochs}): the cheapest candidate",
    )


def make_plan(
    fp: DataFingerprint,
    candidates: list[Candidate],
    *,
    budget_min: float = 0.0,
    cuda: bool = False,
    cores: int = 2,
    measure_s: float = 0.0,
    folds: int = 0,
) -> Plan:
    """The plan for ``fp`` given measured ``candidates`` (largest first); pure. ``folds``
    (``--folds K``): K cross-validation members share the budget (no seed ensemble)."""
    if budget_min < 0 or not math.isfinite(budget_min):
        raise ConfigError(f"--time-budget is {budget_min}; give minutes > 0 (e.g. 15)")
    if not candidates:
        raise ConfigError(f"{fp.manifest}: no network candidate could be measured")
    from medres.train.ensemble import n_views, prediction_extra_s
    from medres.train.folds import member_choices

    budget_s = budget_min * 60.0 - measure_s if budget_min else 0.0
    epochs_default = default_epochs(fp)
    b_s = max(budget_s, 1.0) if budget_min else 0.0
    cand, epochs, why = _pick(fp, candidates, b_s, epochs_default)
    aug = _augmentation(fp)
    flips = next(c.value for c in aug if c.key == "transforms.flip_axes")
    views = n_views(flips)
    k, epochs, epoch_s, fixed_s, why, chosen = member_choices(
        fp, cand, b_s, (epochs_default, epochs, why), views, OPTIMISM, folds
    )
    members = [Choice(*c) for c in chosen]
    tta = Choice(
        "model.tta", "auto" if flips else "off",
        f"average the logits over the {views} flip views of {flips} used in training, unless "
        "validation AUC drops" if flips else "no flips in training: no test-time flips",
    )  # fmt: skip
    bs = _batch_size(fp, cuda)
    choices = (
        _data_choices(fp, cand, cuda, cores)
        + _model_choices(fp, cand)
        + [*members, tta]
        + [_spacing_choice(fp)]
        + aug
        + _optimisation(fp, bs, epochs, why if k == 1 else f"{epochs} epochs per member")
        + [
            Choice("eval.metric", "auc", "model selection on validation AUC"),
            Choice("eval.batch_size", 2 * bs, "no gradients: twice the training batch"),
        ]
    )
    spec = _spec_from(choices)
    extra_s = prediction_extra_s(fp, cand.timing.eval_s, k, views)
    notes = [
        f"measured {cand.arch} {fp.dims}D {cand.stem} stem at {cand.size}: "
        f"{cand.timing.train_s * 1000:.1f} ms/sample train, {cand.timing.eval_s * 1000:.1f} eval, "
        f"augment {cand.aug_s * 1000:.1f} ms (load average {cand.timing.load:g}"
        f"{', cached' if cand.timing.cached else ''})",
    ] + [f"candidate {c.arch} {c.stem} {c.size}: {c.epoch_s(fp):.1f} s/epoch" for c in candidates]
    return Plan(
        spec=spec, choices=tuple(choices), fingerprint=fp, budget_min=budget_min,
        estimated_s=measure_s + fixed_s + _train_s(k * epochs, epoch_s, budget_s, fixed_s),
        epoch_s=epoch_s, fixed_s=fixed_s, final_s=cand.final_s(fp) + extra_s,
        measure_s=measure_s, notes=tuple(notes),
    )  # fmt: skip


def _train_s(epochs: int, epoch_s: float, budget_s: float, fixed_s: float) -> float:
    """Seconds of epochs: the planned ones, or what the deadline leaves of the budget."""
    planned = epochs * epoch_s
    if not budget_s:
        return planned
    by_deadline = max(budget_s - fixed_s, epoch_s)  # the loop stops at the deadline
    return min(planned, by_deadline)


def _spec_from(choices: list[Choice]) -> PipelineSpec:
    from medres.train.spec import apply_overrides

    return apply_overrides(PipelineSpec(), {c.key: c.value for c in choices})


def _measure_candidates(
    manifest: Manifest, fp: DataFingerprint, device: str, budget_s: float, cuda: bool
) -> list[Candidate]:
    """Measure candidates smallest first; stop once one is too slow for the minimum epochs
    (larger ones are slower still)."""
    from medres.train.fingerprint import measure_data, measure_step
    from medres.train.resolve import resolve_spec

    arch = "resnet18"
    out: list[Candidate] = []
    min_epochs = max(8, math.ceil(0.6 * default_epochs(fp)))
    limit = budget_s * (1 - RESERVE) if budget_s else 1800.0
    for size, stem in reversed(size_candidates(fp, cuda)):
        # 3D at the training batch: at batch 4 a 3D step cost 1.8x per sample (plan +78%)
        mb = _batch_size(fp, cuda) if fp.dims == 3 else min(_batch_size(fp, cuda), 16)
        timing = measure_step(
            arch, fp.dims, stem, size, channels=fp.channels, batch_size=mb, device=device
        )
        probe = _spec_from(
            _model_choices(fp, Candidate(arch, size, stem, timing, 0, 0)) + _augmentation(fp)
        )
        probe = replace(probe, data=replace(probe.data, manifest=fp.manifest))
        resolved, _ = resolve_spec(probe, manifest)
        pre_s, aug_s = measure_data(manifest, resolved.transforms)
        cand = Candidate(arch, size, stem, timing, aug_s, pre_s)
        out.append(cand)
        epochs = min_epochs if budget_s else default_epochs(fp)
        if cand.fixed_s(fp) + epochs * cand.epoch_s(fp) > limit:
            break
    return list(reversed(out))


def plan_for_manifest(
    manifest_path: str,
    *,
    budget_min: float = 0.0,
    device: str = "auto",
    threads: int = 0,
    folds: int = 0,
) -> Plan:
    """Fingerprint ``manifest_path``, measure the candidates on ``device`` and plan
    (``folds``: for a ``--folds K`` cross-validation run)."""
    import os
    import time

    from medres.dataset.manifest import read_manifest
    from medres.runtime import setup_runtime
    from medres.train.fingerprint import data_fingerprint

    if budget_min < 0 or not math.isfinite(budget_min):
        raise ConfigError(f"--time-budget is {budget_min}; give minutes > 0 (e.g. 15)")
    from medres.train.folds import check_fold_count

    check_fold_count(folds)
    t0 = time.perf_counter()
    manifest = read_manifest(manifest_path)
    fp = data_fingerprint(manifest)
    rt = setup_runtime(device, threads=threads, setting="train.device")
    cuda = rt.device.type == "cuda"
    cands = _measure_candidates(manifest, fp, str(rt.device), budget_min * 60.0, cuda)
    measured = time.perf_counter() - t0
    plan = make_plan(
        fp, cands, budget_min=budget_min, cuda=cuda, cores=os.cpu_count() or 1,
        measure_s=measured, folds=folds,
    )  # fmt: skip
    log.info("%s", plan.summary())
    return plan


def epoch_deadline(plan: Plan, start: float) -> float:
    """``time.perf_counter()`` value after which no further epoch may start: the budget
    from ``start`` less the time the final predictions and calibration need."""
    if not plan.budget_min:
        return math.inf
    return start + plan.budget_min * 60.0 * (1 - RESERVE / 2) - plan.final_s


def spec_for_train(
    pipeline: str | None, overrides: dict[str, Any], budget_min: float = 0.0
) -> tuple[PipelineSpec, Plan | None]:
    """The spec ``medres train`` runs: the pipeline file when one is given, else the plan
    for ``overrides["data.manifest"]`` (within ``budget_min``); overrides win either way."""
    from medres.train.resolve import build_spec
    from medres.train.spec import apply_overrides

    manifest = overrides.get("data.manifest", "")
    if pipeline or not manifest:
        return build_spec(pipeline, overrides), None
    plan = plan_for_manifest(
        str(manifest),
        budget_min=budget_min,
        device=str(overrides.get("train.device", "auto")),
        threads=int(overrides.get("train.threads", 0) or 0),
        folds=int(overrides.get("model.folds", 0) or 0),
    )
    return apply_overrides(plan.spec, overrides), plan


def train_deadline(plan: Plan | None, budget_min: float, start: float) -> float:
    """The epoch deadline of a ``--time-budget`` run that started at ``start``: from the
    plan's final-stage estimate, or keeping 10% of the budget with a pipeline file."""
    if not budget_min:
        return math.inf
    if plan is not None:
        return epoch_deadline(plan, start)
    return start + budget_min * 60.0 * 0.9


def budget_scheduler(optimizer: Any, spec: Any, steps_per_epoch: int, deadline: float) -> Any:
    """The planned warm-up + cosine/one-cycle schedule, driven by ``max(step share, time
    share)``: the time share runs from now to ``deadline`` (``time.perf_counter()``), so a
    run slower than planned still anneals the LR by the budget and stops gracefully; a
    faster one ends with the planned epochs. (Budget runs therefore follow the clock and
    are not bit-reproducible; runs without a budget are.)"""
    import time

    import torch

    from medres.train.engine import lr_factor

    total = max(1, steps_per_epoch * spec.epochs)
    warmup = round(spec.warmup_epochs * steps_per_epoch)
    t0 = time.perf_counter()
    span = max(deadline - t0, 1e-6)

    def fn(step: int) -> float:
        if step >= warmup:
            step = max(step, int(total * (time.perf_counter() - t0) / span))
        return lr_factor(step, total, warmup, spec.scheduler)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


class DeadlineLoader:
    """The training loader, cut short once ``deadline`` (``time.perf_counter()``) has
    passed: an epoch longer than the time left ends early (then validation runs and the
    loop stops), so one slow epoch cannot overrun a ``--time-budget``."""

    def __init__(self, loader: Any, deadline: float) -> None:
        self.loader = loader
        self.deadline = deadline

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        import time

        for i, batch in enumerate(self.loader):
            yield batch
            if time.perf_counter() > self.deadline:
                log.info("time budget: epoch cut after %d of %d batches", i + 1, len(self))
                return
