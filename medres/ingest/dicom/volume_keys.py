"""The records and header values of multi-volume (4D) series.

Owns :class:`VolumeAxis` (what the 4th axis of a 4D stack holds, and its sidecar JSON),
:func:`volume_fields` (classic header values -> the volume-key fields of
:class:`~medres.ingest.dicom.header.DicomHeader`: temporal position, echo, trigger and
acquisition times, diffusion b-value and gradient, with the bounded vendor fallbacks listed
in :mod:`.volumes`), :func:`frame_keys` (one :class:`FrameKey` per frame of an enhanced
multi-frame object, from its functional groups), :func:`parse_tm` and
:func:`doubles_text`. Imports numpy only (plain values in, plain values out).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_POSITION_POINTERS = frozenset({0x00209057, 0x00200032})  # InStackPositionNumber, IPP


@dataclass(frozen=True)
class VolumeAxis:
    """The 4th axis of a multi-volume stack: its kind, the key that made it, and the
    per-volume values where known (empty tuple = unknown)."""

    kind: str
    key: str
    key_values: tuple[str, ...]
    times_s: tuple[float, ...] = ()
    bvalues: tuple[float, ...] = ()
    gradients_lps: tuple[tuple[float, float, float], ...] = ()
    echo_times_ms: tuple[float, ...] = ()
    repetition_time_s: float | None = None

    def sidecar(self, affine_ras: np.ndarray) -> dict[str, Any]:
        """The sidecar JSON body for an image whose canonical affine is ``affine_ras``."""
        out: dict[str, Any] = {
            "format": "medres-volumes/1",
            "volume_axis": self.kind,
            "n_volumes": len(self.key_values),
            "key": self.key,
            "key_values": list(self.key_values),
            "repetition_time_s": self.repetition_time_s,
        }
        if self.times_s:
            out["times_s"] = [round(t, 6) for t in self.times_s]
        if self.echo_times_ms:
            out["echo_times_ms"] = list(self.echo_times_ms)
        if self.bvalues:
            out["b_values"] = list(self.bvalues)
        if self.gradients_lps:
            ras = [(-g[0], -g[1], g[2]) for g in self.gradients_lps]
            axes = np.asarray(affine_ras, float)[:3, :3]
            unit = axes / np.linalg.norm(axes, axis=0)
            out["gradients_ras"] = [[_r(v) for v in g] for g in ras]
            out["gradients_voxel"] = [[_r(v) for v in unit.T @ np.asarray(g)] for g in ras]
        return out


def _r(v: float) -> float:
    return round(float(v), 6) + 0.0  # no -0.0


@dataclass(frozen=True)
class FrameKey:
    """The volume keys of one frame of an enhanced multi-frame object."""

    temporal_index: int | None = None
    dimension_index: tuple[int, ...] | None = None  # without the spatial dimensions
    bvalue: float | None = None
    gradient: tuple[float, float, float] | None = None
    echo_time: float | None = None
    trigger_time: float | None = None
    frame_type: tuple[str, ...] = ()


# --------------------------------------------------------------------------- header values
def _num(v: Any) -> float | None:
    try:
        f = float(str(v).split("\\", 1)[0])
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _nums(v: Any, n: int) -> tuple[float, ...] | None:
    if v is None or v == "":
        return None
    try:
        vals = tuple(float(x) for x in str(v).split("\\"))
    except ValueError:
        return None
    return vals if len(vals) == n and all(math.isfinite(x) for x in vals) else None


def parse_tm(v: Any) -> float | None:
    """DICOM TM (``HHMMSS.FFFFFF``, also the old ``HH:MM:SS``) -> seconds after midnight."""
    s = str(v or "").strip().replace(":", "")
    if len(s) < 2 or not s.split(".", 1)[0].isdigit():
        return None
    try:
        hh = int(s[0:2])
        mm = int(s[2:4]) if len(s) >= 4 else 0
        ss = float(s[4:]) if len(s) > 4 else 0.0
    except ValueError:
        return None
    return hh * 3600 + mm * 60 + ss


def volume_fields(get: Callable[..., Any]) -> dict[str, Any]:
    """The :class:`DicomHeader` volume-key fields from the plain header values."""
    maker = str(get("manufacturer", "")).upper()
    bval = _num(get("diffusion_bvalue"))
    grad = _nums(get("diffusion_gradient"), 3)
    if bval is None and maker.startswith("GE"):
        b = _num(get("ge_bvalue"))
        bval = None if b is None else b % 1_000_000_000  # some versions add 1e9
    if maker.startswith("SIEMENS"):
        bval = bval if bval is not None else _num(get("siemens_bvalue"))
        grad = grad or _nums(get("siemens_gradient"), 3)
    echo = _num(get("echo_numbers"))
    temporal = _num(get("temporal_position"))
    return {
        "temporal_position": None if temporal is None else int(temporal),
        "echo_number": None if echo is None else int(echo),
        "echo_time": _num(get("echo_time")),
        "repetition_time": _num(get("repetition_time")),
        "trigger_time": _num(get("trigger_time")),
        "acquisition_time": parse_tm(get("acquisition_time")),
        "content_time": parse_tm(get("content_time")),
        "diffusion_bvalue": bval,
        "diffusion_gradient": grad,  # type: ignore[dict-item]
    }


def frame_keys(ds: Any, per: Any, shared: Any) -> tuple[FrameKey, ...]:
    """One :class:`FrameKey` per item of the PerFrameFunctionalGroupsSequence ``per``."""
    if not per:
        return ()
    drop = []
    for k, item in enumerate(ds.get("DimensionIndexSequence") or ()):
        if int(item.get("DimensionIndexPointer", 0) or 0) in _POSITION_POINTERS:
            drop.append(k)
    return tuple(_frame_key(item, shared, drop) for item in per)


def _pick(item: Any, shared: Any, kw: str) -> Any:
    for src in (item, shared[0] if shared else None):
        try:
            seq = src.get(kw) if src is not None else None
            if seq:
                return seq[0]
        except (AttributeError, IndexError, TypeError):
            continue
    return None


def _frame_key(item: Any, shared: Any, drop: Sequence[int]) -> FrameKey:
    content = _pick(item, shared, "FrameContentSequence")
    temporal = dims = None
    if content is not None:
        t = content.get("TemporalPositionIndex")
        temporal = None if t is None else int(t)
        div = content.get("DimensionIndexValues")
        if div is not None:
            vals = [int(v) for v in (div if isinstance(div, Sequence) else [div])]
            dims = tuple(v for k, v in enumerate(vals) if k not in drop)
    diff = _pick(item, shared, "MRDiffusionSequence")
    bval = grad = None
    if diff is not None:
        bval = _num(diff.get("DiffusionBValue"))
        gseq = diff.get("DiffusionGradientDirectionSequence")
        if gseq:
            g = gseq[0].get("DiffusionGradientOrientation")
            grad = _nums("\\".join(str(x) for x in g), 3) if g is not None else None
    echo = _pick(item, shared, "MREchoSequence")
    cardiac = _pick(item, shared, "CardiacSynchronizationSequence")
    ftype: list[str] = []
    for kw in ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence"):
        ft = _pick(item, shared, kw)
        if ft is not None:
            ftype = [str(x) for x in (ft.get("FrameType") or [])]
            ftype.append(str(ft.get("ComplexImageComponent") or ""))
            break
    return FrameKey(
        temporal_index=temporal,
        dimension_index=dims,
        bvalue=bval,
        gradient=grad,  # type: ignore[arg-type]
        echo_time=None if echo is None else _num(echo.get("EffectiveEchoTime")),
        trigger_time=None if cardiac is None else _num(cardiac.get("TriggerDelayTime")),
        frame_type=tuple(ftype),
    )


def doubles_text(v: Any, little: bool = True) -> str:
    """FD values (raw little-endian bytes, or numbers) as backslash-joined text ('' when
    they cannot be read)."""
    import struct

    if isinstance(v, bytes | bytearray):
        if not v or len(v) % 8:
            return ""
        return "\\".join(
            repr(x) for x in struct.unpack(f"{'<' if little else '>'}{len(v) // 8}d", v)
        )
    if isinstance(v, int | float):
        return repr(float(v))
    try:
        return "\\".join(repr(float(x)) for x in v)
    except (TypeError, ValueError):
        return ""
