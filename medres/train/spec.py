"""Pipeline specs: frozen dataclasses loaded once at the edge from plain YAML.

A pipeline is ``PipelineSpec{data, transforms, model, train, eval}``. YAML files are
plain data (``yaml.safe_load``; no tags, no code). Every field can be overridden from the
CLI with ``--set section.field=value`` (values are parsed as YAML scalars/lists, then
coerced to the field's type). Fields left at their "auto" value (``0``, ``""``,
``"auto"``, empty tuple) are resolved from the manifest by
:func:`medres.train.resolve.resolve_spec`; the resolved spec is what a run writes to
``pipeline.yaml``, so a run can be replayed from it exactly.

Choices: unknown sections/fields are errors (a typo must not silently train with a
default); tuples are written as YAML lists; ``None`` is never a field value, so every
field round-trips through YAML unchanged.

Owns the spec dataclasses, YAML load/dump, ``--set`` overrides and the field docs; imports
``medres.errors`` and ``medres.io`` only.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from medres.errors import ConfigError

__all__ = [
    "DataSpec",
    "EvalSpec",
    "ModelSpec",
    "PipelineSpec",
    "TrainSpec",
    "TransformSpec",
    "apply_overrides",
    "dump_pipeline",
    "load_pipeline",
    "parse_set_options",
    "spec_field_names",
]


@dataclass(frozen=True)
class DataSpec:
    """Which manifest rows and columns feed training, and how they are cached and sampled."""

    manifest: str = ""
    """Path to manifest.csv (the CLI --manifest flag sets it)."""
    label_columns: tuple[str, ...] = ()
    """Label columns; empty = ``label``, or every ``label_<name>`` column (multi-label)."""
    task: str = "auto"
    """auto | binary | multiclass | multilabel (auto: from the label columns and values)."""
    classes: tuple[str, ...] = ()
    """Class names in output order; empty = sorted unique labels (numeric order if numeric)."""
    positive_class: str = ""
    """Binary only: the class whose probability is the score; empty = the last class."""
    cache: str = "memory"
    """none | memory (monai CacheDataset) | disk (monai PersistentDataset)."""
    cache_dir: str = ""
    """Disk cache folder; empty = RUN_DIR/cache. Keyed by a hash of the preprocessing."""
    workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""
    balance: str = "none"
    """none | sampler (class-balanced WeightedRandomSampler) | weights (class-weighted loss)."""
    train_split: str = "train"
    """Value of the manifest ``split`` column used for training."""
    val_split: str = "val"
    """Split used for model selection and early stopping."""
    test_split: str = "test"
    """Split predicted with the best model into predictions_test.csv."""


@dataclass(frozen=True)
class TransformSpec:
    """Preprocessing and augmentation. The resolved spec is saved in model.json and replayed."""

    dims: int = 0
    """Spatial dims of the network input (2 or 3); 0 = model.dims."""
    in_channels: int = 0
    """Channels of the network input; 0 = model.in_channels."""
    orientation: str = "RAS"
    """3D: reorient to these axis codes (empty = keep; ingest already stores RAS+)."""
    spacing: tuple[float, ...] = ()
    """Resample to this voxel size in mm before resizing (empty = no resampling)."""
    intensity: str = "auto"
    """auto | ct_window | percentile | range | zscore | none (auto: CT window, MR percentile,
    range for ImageNet-style mean/std weights, else zscore)."""
    ct_window: tuple[float, ...] = (40.0, 400.0)
    """CT window (center, width) in HU, mapped to [0, 1] and clipped."""
    percentiles: tuple[float, ...] = (0.5, 99.5)
    """Percentile normalisation (lower, upper) mapped to [0, 1] and clipped (MR)."""
    image_size: tuple[int, ...] = ()
    """Network input size per spatial axis; empty = the median image size capped at 64 (2D) /
    48 (3D) on CPU and 224 / 96 on CUDA."""
    resize_mode: str = "resize"
    """resize (area interpolation to image_size) | crop_pad (centre crop / zero pad)."""
    slice_mode: str = "none"
    """2D network on 3D images: none | center | random (train random, eval centre slice)."""
    slice_axis: int = 2
    """Spatial axis sliced when slice_mode is set (2 = axial for RAS volumes)."""
    volume: str = "auto"
    """4D images (manifest n_volumes > 1: fMRI, DTI, multi-echo): first | mean | channels (the
    volumes become input channels; model.in_channels = n_volumes). auto: first when the
    training manifest has 4D images (logged); a model trained without them refuses 4D images
    with an error naming the image and this option."""
    mean: tuple[float, ...] = ()
    """Per-channel mean subtracted after intensity scaling; empty = the weights' (or none)."""
    std: tuple[float, ...] = ()
    """Per-channel std divided after intensity scaling; empty = the weights' (or none)."""
    augment: bool = True
    """Random augmentation during training (never at evaluation or scoring)."""
    flip_prob: float = 0.5
    """Probability of a flip along each axis in flip_axes."""
    flip_axes: tuple[int, ...] = (0,)
    """Spatial axes that may be flipped (0 = left-right)."""
    affine_prob: float = 0.5
    """Probability of a random affine (rotation + scaling)."""
    rotate_deg: float = 10.0
    """Maximum rotation in degrees (in-plane for 2D, about each axis for 3D)."""
    scale: float = 0.1
    """Maximum relative zoom of the random affine."""
    intensity_prob: float = 0.5
    """Probability of intensity jitter (random scale and shift)."""
    intensity_jitter: float = 0.1
    """Maximum relative intensity scale and absolute shift."""
    noise_prob: float = 0.2
    """Probability of additive Gaussian noise."""
    noise_std: float = 0.02
    """Standard deviation of that noise (in normalised units)."""
    augment_device: str = "auto"
    """auto | on | off: run the augmentation batched on the training device
    (medres.train.augment_batched) instead of per item in the loader (auto: on for CUDA)."""


@dataclass(frozen=True)
class ModelSpec:
    """Network architecture and pretrained weights (built by medres.models)."""

    arch: str = "resnet18"
    """resnet18 | resnet34 | resnet50 | resnet101 | resnet152."""
    dims: int = 0
    """2 or 3; 0 = the manifest's image dims."""
    in_channels: int = 0
    """Input channels; 0 = the manifest's channels (pretrained first convs are adapted)."""
    weights: str = "none"
    """none | imagenet | medicalnet | PATH to a weights file."""
    stem: str = "auto"
    """auto | standard | small (small: stride-1 first conv, no max-pool, for small images)."""
    freeze_backbone_epochs: int = 0
    """Train only the head for this many epochs, then fine-tune everything."""
    backbone_lr_mult: float = 1.0
    """Backbone learning rate = train.lr x this (e.g. 0.1 when fine-tuning pretrained)."""
    channels_last: str = "auto"
    """auto | on | off: channels_last memory format (auto: on for CUDA)."""
    compile: bool = False
    """Wrap the model with torch.compile."""
    ensemble: int = 1
    """Members trained one after the other (seeds train.seed, +1, ...); their logits are
    averaged in one model dir (the plan picks K from the budget)."""
    folds: int = 0
    """0 = off; K (2-10): K members trained on cross-validation folds of train+val (grouped
    by patient_key, stratified by label; member k validates on fold k), calibrated on the
    out-of-fold logits and saved as one averaged model dir (medres.train.folds)."""
    tta: str = "auto"
    """auto | on | off: average the logits over the transforms.flip_axes flips at test time
    (auto: when the training used them, unless validation AUC drops)."""


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation and runtime."""

    epochs: int = 20
    """Number of epochs."""
    batch_size: int = 16
    """Samples per step per process."""
    lr: float = 2e-3
    """Peak learning rate of the head (backbone: x model.backbone_lr_mult)."""
    optimizer: str = "adamw"
    """adamw | sgd (SGD uses Nesterov momentum 0.9)."""
    weight_decay: float = 1e-4
    """Decoupled weight decay; never applied to biases and norm layers."""
    scheduler: str = "cosine"
    """cosine | onecycle | constant (all with linear warmup)."""
    warmup_epochs: float = 1.0
    """Linear warmup length in epochs (fractions allowed)."""
    label_smoothing: float = 0.0
    """Label smoothing of the loss (0 = off)."""
    grad_accum: int = 1
    """Optimizer step every N batches."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this value (0 = off)."""
    early_stopping: int = 0
    """Stop after this many epochs without improvement of eval.metric (0 = off)."""
    device: str = "auto"
    """auto | cpu | cuda (auto: cuda when available)."""
    amp: str = "auto"
    """auto | bf16 | fp16 | none (auto: CUDA bf16 if supported else fp16 with a scaler; CPU bf16
    only with AMX)."""
    seed: int = 0
    """Seed for weights init, shuffling and augmentation."""
    ema_decay: float = 0.998
    """EMA of the weights (0 = off): decay per optimizer step, warmed up as (1+n)/(10+n)."""
    deterministic: bool = False
    """torch deterministic algorithms (bit-reproducible on one machine; slower on CUDA)."""
    threads: int = 0
    """torch intra-op CPU threads (0 = auto: the idle cores, shared by the processes on the node)."""
    tensorboard: bool = True
    """Write TensorBoard logs to RUN_DIR/tensorboard when tensorboard is installed."""


@dataclass(frozen=True)
class EvalSpec:
    """Model selection and prediction."""

    metric: str = "auc"
    """auc | loss: validation metric for best-checkpoint selection and early stopping."""
    batch_size: int = 0
    """Batch size for validation/prediction (0 = train.batch_size)."""
    threshold: float = 0.5
    """Multi-label decision threshold, and the binary one when ``threshold_rule`` is fixed."""
    threshold_rule: str = "youden"
    """youden | sensitivity:0.9 | specificity:0.9 | fixed: the binary operating threshold,
    chosen on the calibrated validation predictions and stored in model.json."""
    auc_tolerance: float = 0.005
    """Checkpoint choice: val AUCs within this of the best are ties, broken by val loss."""
    calibrate: bool = True
    """Fit a temperature on the validation split (binary and multi-class)."""


@dataclass(frozen=True)
class PipelineSpec:
    """The whole pipeline: what to read, how to preprocess, what to train, how to select."""

    data: DataSpec = field(default_factory=DataSpec)
    transforms: TransformSpec = field(default_factory=TransformSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain dict (tuples as lists) suitable for YAML/JSON."""
        return {s.name: _section_to_dict(getattr(self, s.name)) for s in fields(self)}

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "pipeline") -> PipelineSpec:
        """Build from a plain mapping; unknown sections or fields raise ConfigError."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{source}: top level must be a mapping of sections "
                f"({', '.join(SECTIONS)}); got {type(raw).__name__}"
            )
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ConfigError(
                f"{source}: unknown section(s) {', '.join(map(str, unknown))}; "
                f"known sections: {', '.join(SECTIONS)}"
            )
        kwargs = {}
        for name, section_cls in SECTIONS.items():
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section '{name}' must be a mapping of field: value")
            kwargs[name] = section_from_dict(section_cls, values, source=f"{source}: {name}")
        return cls(**kwargs)


SECTIONS: dict[str, type] = {
    "data": DataSpec,
    "transforms": TransformSpec,
    "model": ModelSpec,
    "train": TrainSpec,
    "eval": EvalSpec,
}


def _section_to_dict(section: Any) -> dict[str, Any]:
    out = {}
    for f in fields(section):
        v = getattr(section, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def spec_field_names() -> dict[str, list[str]]:
    """``{section: [field, ...]}`` for every section of :class:`PipelineSpec`."""
    return {name: [f.name for f in fields(cls)] for name, cls in SECTIONS.items()}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (inner, _ell) = typing.get_args(tp)
        if isinstance(value, str):
            text = value.replace("x", ",") if inner in (int, float) else value
            value = [v.strip() for v in text.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {inner.__name__}, got {value!r}")
        return tuple(_coerce(v, inner, where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {
            "true",
            "yes",
            "on",
            "1",
            "false",
            "no",
            "off",
            "0",
        }:
            return value.lower() in {"true", "yes", "on", "1"}
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover


def section_from_dict(cls: type, values: dict[str, Any], *, source: str) -> Any:
    """Build one section dataclass from a mapping, coercing values to the field types."""
    hints = _hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {', '.join(map(str, unknown))}; known fields: {', '.join(known)}"
        )
    kw = {k: _coerce(v, hints[k], f"{source}.{k}") for k, v in values.items()}
    return cls(**kw)


# bounds of a pipeline YAML (a real one: ~2 KiB, depth 3, a few dozen values)
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_VALUES = 10_000


def check_yaml_shape(text: str, source: str) -> None:
    """Refuse YAML nested deeper than :data:`MAX_YAML_DEPTH` or expanding (aliases counted
    at their full size, so a "billion laughs" document) to more than
    :data:`MAX_YAML_VALUES` values, before anything is built: PyYAML's event parser is
    iterative, its composer is recursive and its aliases are expanded by whoever walks
    the result."""
    sizes: dict[str, int] = {}  # anchor -> expanded values
    open_: list[list[Any]] = []  # [anchor, expanded values so far] per open collection
    total = 0
    for ev in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        if isinstance(ev, yaml.CollectionStartEvent):
            open_.append([ev.anchor, 1])
            if len(open_) > MAX_YAML_DEPTH:
                raise ConfigError(
                    f"{source}: YAML nested deeper than {MAX_YAML_DEPTH} levels; a pipeline "
                    "is sections of fields (see pipelines/README.md)"
                )
            total += 1
            continue
        if isinstance(ev, yaml.CollectionEndEvent):
            anchor, n = open_.pop()
            if anchor:
                sizes[anchor] = n
        elif isinstance(ev, yaml.AliasEvent):
            n = sizes.get(ev.anchor, 1)
            total += n
        elif isinstance(ev, yaml.ScalarEvent):
            n = 1
            if ev.anchor:
                sizes[ev.anchor] = 1
            total += 1
        else:
            continue
        if open_:
            open_[-1][1] += n
        if total > MAX_YAML_VALUES:
            raise ConfigError(
                f"{source}: YAML expands to more than {MAX_YAML_VALUES} values (aliases "
                "repeat whole subtrees); a pipeline has a few dozen fields: remove the aliases"
            )


def load_pipeline(path: str | os.PathLike[str]) -> PipelineSpec:
    """Read a pipeline YAML with ``yaml.safe_load`` into a :class:`PipelineSpec`.

    Bounded (:func:`check_yaml_shape`): at most :data:`MAX_YAML_BYTES`, nesting and alias
    expansion refused with one line before anything is built.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline file not found; pass an existing YAML file or omit it")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(
            f"{path}: {path.stat().st_size} bytes, more than a pipeline file can be "
            f"({MAX_YAML_BYTES} bytes); pass the pipeline YAML (see pipelines/README.md)"
        )
    try:
        text = path.read_text(encoding="utf-8")
        check_yaml_shape(text, str(path))
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', 'parse error')}); fix the syntax"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; pass a YAML pipeline file") from None
    return PipelineSpec.from_dict(raw, source=str(path))


def dump_pipeline(spec: PipelineSpec, path: str | os.PathLike[str] | None = None) -> str:
    """YAML text of ``spec`` (sections and fields in declaration order); written atomically."""
    text = yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=None)
    if path is not None:
        from medres.io import atomic_write_text

        atomic_write_text(path, text)
    return text


def parse_set_options(items: list[str] | None) -> dict[str, Any]:
    """Parse ``section.field=value`` strings; values are YAML scalars or lists."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(
                f"--set {item!r}: expected section.field=value (e.g. --set train.lr=0.001)"
            )
        key, _, raw = item.partition("=")
        try:
            check_yaml_shape(raw, f"--set {key.strip()}")
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out


def apply_overrides(spec: PipelineSpec, overrides: dict[str, Any]) -> PipelineSpec:
    """Return a copy of ``spec`` with ``{"section.field": value}`` overrides applied."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, sep, name = key.partition(".")
        if not sep or section not in SECTIONS:
            raise ConfigError(
                f"override {key!r}: expected section.field with section one of {', '.join(SECTIONS)}"
            )
        cls = SECTIONS[section]
        known = [f.name for f in fields(cls)]
        if name not in known:
            raise ConfigError(
                f"override {key!r}: unknown field '{name}' in {section}; known fields: {', '.join(known)}"
            )
        grouped.setdefault(section, {})[name] = _coerce(value, _hints(cls)[name], f"override {key}")
    changes = {s: replace(getattr(spec, s), **kv) for s, kv in grouped.items()}
    return replace(spec, **changes)


def is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def field_docs() -> dict[str, list[tuple[str, str, str]]]:
    """``{section: [(field, default as YAML, docstring), ...]}`` read from this module's source.

    The docstring under each field is the single source of the field documentation;
    ``pipelines/README.md`` is generated from it (:func:`fields_markdown`) and a test keeps
    the two in sync.
    """
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            body = node.body
            for i, stmt in enumerate(body[:-1]):
                nxt = body[i + 1]
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    docs.setdefault(node.name, {})[stmt.target.id] = " ".join(
                        nxt.value.value.split()
                    )
    out: dict[str, list[tuple[str, str, str]]] = {}
    for section, cls in SECTIONS.items():
        default = _section_to_dict(cls())
        out[section] = [
            (
                f.name,
                yaml.safe_dump(default[f.name], default_flow_style=True)
                .strip()
                .removesuffix("..."),
                docs.get(cls.__name__, {}).get(f.name, ""),
            )
            for f in fields(cls)
        ]
    return out


def fields_markdown() -> str:
    """Markdown tables of every section and field (the reference part of pipelines/README.md)."""
    lines: list[str] = []
    for section, rows in field_docs().items():
        lines += [f"### `{section}`", "", "| field | default | meaning |", "|---|---|---|"]
        for name, default, doc in rows:
            lines.append(f"| `{section}.{name}` | `{default.strip()}` | {doc.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)
