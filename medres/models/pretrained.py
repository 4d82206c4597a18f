"""``load_pretrained``: put published or local weights into a medres model, adapting them.

The loader resolves a ``--weights`` source to a file (:mod:`medres.models.weights` for the
table, :mod:`medres.models.hub` to fetch and verify it), reads it without executing code
(:mod:`medres.models.statedict`) and adapts it key by key to the model
(:func:`medres.models.adapt.adapt_state_dict`: first conv, stem size, 2D -> 3D, a new head,
MedicalNet's shortcuts). Everything it adapted, left out or ignored is in the returned
:class:`LoadReport` and in the log.

It refuses (``WeightsError``) what would silently build a different network: a backbone
tensor with another shape, backbone tensors the model lacks (a deeper file into a
shallower model) or backbone tensors missing from the file.

Owns :func:`load_pretrained` and :class:`LoadReport`. Imports core and medres.models only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medres.errors import ModelError, WeightsError
from medres.models import adapt
from medres.models.hub import fetch_weights
from medres.models.resnet import model_config
from medres.models.statedict import read_state_dict
from medres.models.weights import (
    NAMED_SOURCES,
    canonical_source,
    get_weight_spec,
    is_named_source,
    weights_meta,
)
from medres.runtime import unwrap

log = logging.getLogger(__name__)

_MEDICALNET_NOTE = (
    "MedicalNet trained layer3/layer4 with stride 1 and dilation 2/4 for segmentation; "
    "medres uses stride 2 without dilation (as MONAI): the kernels transfer, the receptive "
    "fields differ"
)


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did; ``meta`` is :func:`weights_meta` of the source."""

    source: str
    file: str | None = None
    loaded: int = 0
    adapted: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    new_head: bool = False
    notes: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        if self.file is None:
            return f"weights: {self.source} (random initialisation)"
        parts = [f"{self.loaded} tensors from {Path(self.file).name}"]
        if self.adapted:
            parts.append(f"{len(self.adapted)} adapted")
        if self.new_head:
            parts.append("new classifier head")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} ignored")
        return f"weights: {self.source}: " + ", ".join(parts)


def load_pretrained(
    model: nn.Module,
    source: str,
    *,
    arch: str | None = None,
    dims: int | None = None,
    inflate: str = "i3d",
) -> LoadReport:
    """Load ``source`` (``imagenet``, ``imagenet-v2``, ``medicalnet``, ``none`` or a path) into ``model``.

    ``arch``/``dims`` are checked against the model when given. ``inflate`` (``"i3d"`` or
    ``"center"``) chooses how 2D kernels become 3D. A path may be a torchvision-style
    ``.pth`` (read with ``weights_only=True`` after a pickle scan), a ``.safetensors`` file
    or a medres model dir. Returns a :class:`LoadReport`; raises :class:`WeightsError`.
    """
    config = model_config(model)
    if arch is not None and arch.lower() != config.arch:
        raise ModelError(f"arch {arch!r} does not match the model ({config.arch}); build it again")
    if dims is not None and int(dims) != config.dims:
        raise ModelError(f"dims={dims} does not match the model ({config.dims}D); build it again")
    if inflate not in adapt.INFLATE_MODES:
        raise WeightsError(
            f"unknown inflation {inflate!r}: use one of {', '.join(adapt.INFLATE_MODES)}"
        )
    src = canonical_source(source)
    if src == "none":
        meta = weights_meta("none", config.arch, in_channels=config.in_channels)
        return LoadReport(source="none", meta=meta)
    notes: list[str] = []
    if is_named_source(src):
        spec = get_weight_spec(src, config.arch)
        if spec.dims == 3 and config.dims == 2:
            raise WeightsError(
                f"{spec.source} weights are 3D only: use --dims 3, or --weights imagenet for 2D"
            )
        path = fetch_weights(spec)
        if spec.source == "medicalnet":
            notes.append(_MEDICALNET_NOTE)
        label = src
    else:
        path = Path(source).expanduser()
        label = str(path)
        if not path.exists():
            raise WeightsError(
                f"--weights {source!r} is neither a known source ({', '.join(NAMED_SOURCES)}) "
                "nor an existing .pth/.safetensors file or medres model dir; fix the name or path"
            )
    state = read_state_dict(path)
    adapted, changes, new_head, folded = adapt.adapt_state_dict(
        state, unwrap(model), inflate=inflate, label=label
    )
    target = unwrap(model).state_dict()
    with torch.no_grad():
        result = unwrap(model).load_state_dict(adapted, strict=False)
    missing = tuple(k for k in result.missing_keys if not k.endswith("num_batches_tracked"))
    unexpected = tuple(sorted(k for k in state if k not in target and k not in folded))
    report = LoadReport(
        source=label,
        file=str(path),
        loaded=len(adapted),
        adapted=tuple(changes),
        missing=missing,
        unexpected=unexpected,
        new_head=new_head,
        notes=tuple(notes),
        meta=weights_meta(source, config.arch, in_channels=config.in_channels),
    )
    _log_report(report)
    return report


def _log_report(report: LoadReport) -> None:
    log.info(report.summary())
    for line in report.adapted:
        log.info("  adapted %s", line)
    for note in report.notes:
        log.info("  note: %s", note)
    if report.new_head:
        log.info("  classifier head (fc) initialised anew for this task")
    if report.missing:
        log.debug("  left at initialisation: %s", ", ".join(report.missing))
    if report.unexpected:
        log.info(
            "  ignored %d tensors the model has no use for (e.g. %s)",
            len(report.unexpected),
            report.unexpected[0],
        )
