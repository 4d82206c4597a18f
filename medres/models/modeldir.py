"""The medres model directory and its typed metadata, :class:`ModelMeta`.

A model directory (``RUN_DIR/model/``, see docs/architecture.md) holds two files, both
written atomically (temp file then ``os.replace``), weights first:

* ``weights.safetensors``: the state dict (never a pickle);
* ``model.json``: :meth:`ModelMeta.to_json`, format ``medres-model/1``: the architecture
  (``arch``, ``dims``, ``in_channels``, ``num_classes``, ``stem``), ``medres_version``,
  ``weights_sha256`` and what the trainer records (``task``, ``classes``,
  ``positive_class``, ``label_columns``, ``weights_source``, ``preprocessing``,
  ``threshold``, ``threshold_rule``, ``temperature``, ``calibration``,
  ``selected_weights``, ``best_epoch``, ``val_auc``), and for an ensemble ``ensemble``
  (K members, left out when 1), ``tta_flips`` (test-time flipped axes) and ``members``
  (each member's seed, best epoch, selected weights and val AUC); weights keys are then
  ``members.{k}.*`` (:mod:`medres.models.ensemble`). A model.json without ``ensemble`` is
  one network.
* Probabilities are ``softmax(logits / temperature)`` (sigmoid for multi-label); a binary
  case is called positive when that probability of ``positive_class`` is >= ``threshold``.
  A model.json without these fields (older releases) means ``temperature`` 1 and
  ``threshold`` 0.5 (binary, multi-label) or the argmax (multi-class):
  :meth:`ModelMeta.effective_temperature` and :meth:`ModelMeta.effective_threshold`. Optional fields that are unset (None or
  empty) are left out of the file; keys this release does not know are kept in
  :attr:`ModelMeta.extra` and written back unchanged.

``model.json`` is validated once, when it is read (:meth:`ModelMeta.from_json`); every
consumer then reads attributes. ``preprocessing`` is the resolved transform spec as a
read-only mapping (its schema belongs to :mod:`medres.train.spec`, which this module does
not import).

Owns the model dir layout, :class:`ModelMeta`, :func:`read_model_meta`,
:func:`save_model_dir` and :func:`load_model_dir`. Imports core and
:mod:`medres.models.registry` at module level; torch only inside :func:`save_model_dir`
and :func:`load_model_dir`, so reading the metadata (``medres evaluate``) stays torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medres.errors import ModelError
from medres.io import atomic_write_json, sha256_file
from medres.models.registry import list_archs

if TYPE_CHECKING:
    from torch import device as TorchDevice
    from torch import nn

log = logging.getLogger(__name__)

MODEL_FORMAT = "medres-model/1"
WEIGHTS_FILE = "weights.safetensors"
MODEL_JSON = "model.json"
STEMS = ("standard", "small")
_ARCH_FIELDS = ("arch", "dims", "in_channels", "num_classes", "stem")
_RESAVE = "re-save the model with `medres train` or restore the model dir from its source"


# --- read-only JSON values ----------------------------------------------------------------


class FrozenMapping(Mapping[str, Any]):
    """A read-only, picklable mapping; nested dicts become FrozenMappings, lists tuples."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_data", {str(k): freeze(v) for k, v in (data or {}).items()})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("FrozenMapping is read-only")

    def __hash__(self) -> int:
        return hash(tuple(self._data.items()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenMapping, (thaw(self),))

    def __repr__(self) -> str:
        return f"FrozenMapping({self._data!r})"


def freeze(value: Any) -> Any:
    """``value`` with every mapping made a :class:`FrozenMapping` and every list a tuple."""
    if isinstance(value, FrozenMapping):
        return value
    if isinstance(value, Mapping):
        return FrozenMapping(value)
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain JSON form (dicts and lists) of a :func:`freeze`-d value."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


# --- the metadata record ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelMeta:
    """The contents of ``model.json`` (format ``medres-model/1``); see the module docs.

    ``classes`` are the output names in output order; ``positive_class`` is set for binary
    tasks; ``preprocessing`` is the saved transform spec (read-only); ``extra`` holds keys
    this release does not know.
    """

    arch: str
    dims: int
    in_channels: int
    num_classes: int
    stem: str = "standard"
    task: str | None = None
    classes: tuple[str, ...] = ()
    positive_class: str | None = None
    label_columns: tuple[str, ...] = ()
    weights_source: str | None = None
    preprocessing: Mapping[str, Any] = field(default_factory=FrozenMapping)
    threshold: float | None = None
    threshold_rule: str | None = None
    temperature: float | None = None
    calibration: Mapping[str, Any] = field(default_factory=FrozenMapping)
    selected_weights: str | None = None
    best_epoch: int | None = None
    val_auc: float | None = None
    ensemble: int = 1
    tta_flips: tuple[int, ...] = ()
    members: tuple[Mapping[str, Any], ...] = ()
    weights_sha256: str | None = None
    medres_version: str | None = None
    format: str = MODEL_FORMAT
    extra: Mapping[str, Any] = field(default_factory=FrozenMapping)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "classes", tuple(str(c) for c in self.classes))
        set_(self, "label_columns", tuple(str(c) for c in self.label_columns))
        set_(self, "tta_flips", tuple(int(a) for a in self.tta_flips))
        set_(self, "members", tuple(FrozenMapping(m) for m in self.members))
        if self.positive_class is not None:
            set_(self, "positive_class", str(self.positive_class))
        set_(self, "preprocessing", FrozenMapping(self.preprocessing))
        set_(self, "calibration", FrozenMapping(self.calibration))
        set_(self, "extra", FrozenMapping(self.extra))
        clash = sorted(set(self.extra) & _FIELD_NAMES)
        if clash:
            raise ModelError(f"ModelMeta.extra repeats the field(s) {', '.join(clash)}")

    @classmethod
    def from_json(cls, doc: Any, *, source: str | os.PathLike[str] = MODEL_JSON) -> ModelMeta:
        """Validate a parsed ``model.json``; a missing or wrong field is a :class:`ModelError`."""
        where = str(source)
        if not isinstance(doc, Mapping):
            raise ModelError(
                f"{where} must hold a JSON object, not {type(doc).__name__}; {_RESAVE}"
            )
        fmt = doc.get("format")
        if fmt != MODEL_FORMAT:
            raise ModelError(
                f"{where} has format {fmt!r}, this medres reads {MODEL_FORMAT!r}; re-save the "
                "model with a matching medres version"
            )
        values: dict[str, Any] = {}
        for name, (parse, required) in _PARSERS.items():
            if name not in doc:
                if required:
                    raise ModelError(f"{where} lacks the field {name!r}; {_RESAVE}")
                continue
            try:
                values[name] = parse(doc[name])
            except (TypeError, ValueError) as exc:
                raise ModelError(
                    f"{where}: field {name!r} is {doc[name]!r}: {exc}; fix the field or {_RESAVE}"
                ) from None
        extra = {k: v for k, v in doc.items() if k not in _FIELD_NAMES}
        return cls(**values, extra=extra)

    def to_json(self) -> dict[str, Any]:
        """The plain ``model.json`` dict; unset optional fields are left out."""
        doc: dict[str, Any] = {"format": self.format}
        if self.medres_version is not None:
            doc["medres_version"] = self.medres_version
        for f in dataclasses.fields(self):
            if f.name in ("format", "medres_version", "extra"):
                continue
            value = getattr(self, f.name)
            if f.name == "ensemble" and value == 1:  # one network: as older releases wrote
                continue
            if f.name in _ARCH_FIELDS or value not in (None, (), {}):
                doc[f.name] = thaw(value)
        doc.update(thaw(self.extra))
        return doc

    @property
    def effective_temperature(self) -> float:
        """The temperature to divide the logits by (1 when model.json has none)."""
        return self.temperature if self.temperature is not None else 1.0

    @property
    def effective_threshold(self) -> float:
        """The binary / multi-label decision threshold (0.5 when model.json has none)."""
        return self.threshold if self.threshold is not None else 0.5

    @classmethod
    def for_model(cls, model: nn.Module, **fields: Any) -> ModelMeta:
        """A ModelMeta whose architecture fields are read off ``model`` (from ``build_model``)."""
        from medres.models.resnet import model_config

        return cls(**model_config(model).to_dict(), **fields)


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError("expected a non-empty string")
    return value


def _opt_string(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise TypeError("expected a string")
    return str(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("expected an integer")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("expected an integer")
    return int(value)


def _count(low: int, high: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        n = _integer(value)
        if n < low or (high is not None and n > high):
            raise ValueError(f"expected {low}" + (f"..{high}" if high else " or more"))
        return n

    return parse


def _opt_int(value: Any) -> int | None:
    return None if value is None else _integer(value)


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("expected a number")
    return float(value)


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError("expected a list of names")
    return tuple(_opt_string(v) or "" for v in value)


def _arch(value: Any) -> str:
    name = _string(value).lower()
    if name not in list_archs():
        raise ValueError(f"not a known architecture ({', '.join(list_archs())})")
    return name


def _stem(value: Any) -> str:
    if value not in STEMS:
        raise ValueError(f"expected one of {', '.join(STEMS)}")
    return str(value)


def _temperature(value: Any) -> float | None:
    t = _opt_float(value)
    if t is not None and not (t > 0 and t < float("inf")):
        raise ValueError("expected a positive finite number")
    return t


def _mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError("expected a JSON object")
    return value


def _axes(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError("expected a list of spatial axes")
    axes = tuple(_integer(v) for v in value)
    if any(a < 0 or a > 2 for a in axes):
        raise ValueError("expected spatial axes 0, 1 or 2")
    return axes


def _mappings(value: Any) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError("expected a list of JSON objects")
    return tuple(_mapping(v) for v in value)


#: field -> (parser, required); ``format`` is checked before these.
_PARSERS: dict[str, tuple[Any, bool]] = {
    "arch": (_arch, True),
    "dims": (_count(2, 3), True),
    "in_channels": (_count(1), True),
    "num_classes": (_count(1), True),
    "stem": (_stem, False),
    "task": (_opt_string, False),
    "classes": (_names, False),
    "positive_class": (_opt_string, False),
    "label_columns": (_names, False),
    "weights_source": (_opt_string, False),
    "preprocessing": (_mapping, False),
    "threshold": (_opt_float, False),
    "threshold_rule": (_opt_string, False),
    "temperature": (_temperature, False),
    "calibration": (_mapping, False),
    "selected_weights": (_opt_string, False),
    "best_epoch": (_opt_int, False),
    "val_auc": (_opt_float, False),
    "ensemble": (_count(1, 64), False),
    "tta_flips": (_axes, False),
    "members": (_mappings, False),
    "weights_sha256": (_opt_string, False),
    "medres_version": (_opt_string, False),
}
_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(ModelMeta)) - {"extra"}


# --- the directory ------------------------------------------------------------------------


def find_model_dir(path: str | os.PathLike[str]) -> Path:
    """The model dir at ``path``: the dir itself, its ``model.json``, or ``RUN_DIR/model``."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == MODEL_JSON:
        p = p.parent
    if not (p / MODEL_JSON).is_file() and (p / "model" / MODEL_JSON).is_file():
        p = p / "model"
    if not (p / MODEL_JSON).is_file():
        raise ModelError(
            f"{p} is not a medres model dir: {MODEL_JSON} is missing; pass RUN_DIR/model"
        )
    return p


def read_model_meta(path: str | os.PathLike[str]) -> ModelMeta:
    """The validated :class:`ModelMeta` of a model dir (or run dir); never imports torch."""
    return read_model_json(path)[1]


def read_model_json(path: str | os.PathLike[str]) -> tuple[Path, ModelMeta]:
    """(model dir, its validated :class:`ModelMeta`). ``path`` may be the model dir or a run dir."""
    folder = find_model_dir(path)
    mj = folder / MODEL_JSON
    try:
        doc = json.loads(mj.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{mj} is not valid JSON ({exc}); {_RESAVE}") from None
    return folder, ModelMeta.from_json(doc, source=mj)


def save_model_dir(path: str | os.PathLike[str], model: nn.Module, meta: ModelMeta) -> Path:
    """Write ``weights.safetensors`` + ``model.json`` into ``path``; returns the folder.

    The architecture fields of ``meta`` must match the model (else :class:`ModelError`);
    ``medres_version`` defaults to this release and ``weights_sha256`` is computed here.
    Build ``meta`` with :meth:`ModelMeta.for_model`.
    """
    from safetensors.torch import save_file

    from medres import __version__
    from medres.models.resnet import model_config
    from medres.runtime import unwrap

    if not isinstance(meta, ModelMeta):
        raise TypeError(f"save_model_dir needs a ModelMeta, not {type(meta).__name__}")
    for key, value in model_config(model).to_dict().items():
        if getattr(meta, key) != value:
            raise ModelError(
                f"model.json field {key!r}={getattr(meta, key)!r} contradicts the model "
                f"({value!r}); build the ModelMeta with ModelMeta.for_model(model)"
            )
    _check_plain_json(meta)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS_FILE}.", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": MODEL_FORMAT})
        os.replace(tmp, out / WEIGHTS_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    final = dataclasses.replace(
        meta,
        format=MODEL_FORMAT,
        medres_version=meta.medres_version or __version__,
        weights_sha256=sha256_file(out / WEIGHTS_FILE),
    )
    atomic_write_json(out / MODEL_JSON, final.to_json())
    log.info("saved model %s (%s, %dD) to %s", final.arch, final.stem, final.dims, out)
    return out


def _check_plain_json(meta: ModelMeta) -> None:
    try:
        json.dumps(meta.to_json(), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ModelError(
            f"model meta is not plain JSON ({exc}); pass lists/str/numbers only"
        ) from None


def load_model_dir(
    path: str | os.PathLike[str], device: str | TorchDevice = "cpu"
) -> tuple[nn.Module, ModelMeta]:
    """Rebuild the model of a model dir (or ``RUN_DIR``) in eval mode; returns ``(model, meta)``.

    Only ``weights.safetensors`` is read (no unpickling); its sha256 is checked against
    ``model.json``'s ``weights_sha256`` and the state dict must match the architecture
    exactly (strict load).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from medres.models.resnet import build_model

    folder, meta = read_model_json(path)
    wfile = folder / WEIGHTS_FILE
    if not wfile.is_file():
        raise ModelError(
            f"{folder} has no {WEIGHTS_FILE}; re-save the model (pickles are not read)"
        )
    if meta.weights_sha256 and sha256_file(wfile) != meta.weights_sha256:
        raise ModelError(
            f"{wfile} does not match the sha256 in {MODEL_JSON}: the weights are corrupted or "
            "were replaced; restore the model dir from its source"
        )
    try:
        model = build_model(
            meta.arch, meta.dims, meta.in_channels, meta.num_classes, stem=meta.stem,
            ensemble=meta.ensemble, tta_flips=meta.tta_flips,
        )  # fmt: skip
    except (TypeError, ValueError, ModelError) as exc:
        raise ModelError(
            f"{folder / MODEL_JSON} has an invalid field ({exc}); re-save it"
        ) from None
    try:
        state = load_file(str(wfile), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{wfile} is not a valid safetensors file ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelError(
            f"{wfile} does not fit the architecture in {MODEL_JSON} ({first}); re-save the model"
        ) from None
    model.to(device).eval()
    return model, meta
