"""Multi-volume series: tell the volumes of a series apart when slice positions repeat.

An fMRI run, a DTI series, a multi-echo or cardiac cine series holds several volumes at the
same slice positions. :func:`split_volumes` finds which header key tells them apart and
:func:`volume_set_stack` validates each volume with :mod:`.geometry` and joins them into one
4D :class:`~medres.ingest.dicom.header.Stack` (``n_volumes`` > 1, slices volume-major).

**Keys, in the order tried** (the first that separates the slices wins). A key separates
when every slice has a value and grouping by it leaves each group with every position once
and all groups with the same positions (within ``duplicate_tol``):

1. ``TemporalPositionIdentifier`` (0020,0100); enhanced: ``TemporalPositionIndex``.
2. Diffusion: ``DiffusionBValue`` (0018,9087) + ``DiffusionGradientOrientation``
   (0018,9089), else the vendor private values (bounded: GE (0043,1039) b-value; Siemens
   (0019,100C) B_value + (0019,100E) gradient); enhanced: ``MRDiffusionSequence``.
3. ``EchoNumbers`` (0018,0086); enhanced: ``EffectiveEchoTime``.
4. ``TriggerTime`` (0018,1060) (cardiac phases); enhanced: ``TriggerDelayTime``.
5. ``AcquisitionNumber`` (0020,0012) (also one file per time point of a multi-file mosaic).
6. ``AcquisitionTime`` (0008,0032), then ``ContentTime`` (0008,0033).
7. Enhanced only: ``DimensionIndexValues`` without the spatial dimensions
   (``InStackPositionNumber`` / ``ImagePositionPatient`` pointers; ``StackID`` kept).
8. **Position order**: the k-th occurrence of each position, in InstanceNumber order (frame
   order for enhanced objects), is volume k. This is GE's classic fMRI (one
   AcquisitionNumber, one AcquisitionTime for 150 files of 15 slices x 10 volumes) and what
   dcm2niix does (it sorts by InstanceNumber and cuts every ``n_slices`` images).
9. Keys 1-7 that group without separating (two b=0 volumes among DTI directions),
   combined with the position order inside each group.

When nothing separates them, the slices stay one stack as before (same-position slices
with equal pixels are merged with a warning); different pixels are rejected at load as
``duplicate_slices``, whose message names every key tried and why it did not separate. Volumes are ordered by their key value (for 8: k), except for diffusion,
whose volumes keep acquisition order (the smallest InstanceNumber / frame index). Position
order is refused when two slices at one position share an InstanceNumber (their order
would be a guess).

**Geometry**: each volume goes through :func:`~.geometry.validated_volume` (sorting, gap
and line checks, the uneven-spacing grid of :mod:`.resample`), and every volume must have
the first one's size, slice count, affine (within ``collinear_tol``) and grid; else
``inconsistent_geometry`` naming the volume. A volume of one slice (cardiac cine: one
position, many TriggerTimes) keeps that slice's patient geometry, the step being the slice
normal times SliceThickness (1 mm when absent).

**ImageType is not a 4th dimension**: slices that share positions but differ in ImageType
(magnitude and phase, a field map beside its magnitude; enhanced: ``FrameType`` /
``ComplexImageComponent``) are different images, as dcm2niix writes them to separate
files; :func:`image_type_groups` splits them first and each group becomes its own image
(stack id ``type=...``). Likewise a series with several echoes *and* several volumes per
echo (multi-echo fMRI) is one 4D image per echo (``|echo=N``): there is no 5th axis.
A single image type and echo keep the stack id of a plain 3D stack, so image ids do not
change.

**Sidecar** (:meth:`.volume_keys.VolumeAxis.sidecar`, ``images/<image_id>.json``): ``format``
(``medres-volumes/1``), ``volume_axis``, ``n_volumes``, ``key`` (the key that separated
the volumes, e.g. ``position order`` or ``DiffusionBValue+Gradient+position order``),
``key_values`` (per volume; for the position order its 0-based occurrence index),
``repetition_time_s`` (or null), and where known ``times_s``, ``echo_times_ms``,
``b_values``, ``gradients_ras``, ``gradients_voxel``.

**The 4th axis** (:class:`VolumeAxis`, written to the sidecar JSON by
:mod:`medres.ingest.nifti`): ``diffusion`` when b-values or gradients vary across volumes,
``echo`` when echo numbers/times vary, ``time`` for the time-like keys, else ``other``;
per-volume values where known: times (s, from the first volume: TriggerTime, else
AcquisitionTime, else k x RepetitionTime), b-values (s/mm2) and gradient directions,
echo times (ms). Gradients are kept in DICOM patient LPS here; the sidecar gives them in
the image's RAS+ world frame (x and y negated) and on the canonical voxel axes. GE's
private gradient tags are in a vendor frame and are not used.

The header values behind the keys are parsed by :mod:`.volume_keys`. Imports :mod:`.header`,
:mod:`.geometry`, :mod:`.volume_keys`, :mod:`medres.errors` and numpy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.dicom.geometry import normal, validated_volume
from medres.ingest.dicom.header import DicomHeader, GeometryPolicy, Slice, Stack
from medres.ingest.dicom.volume_keys import FrameKey, VolumeAxis

_TIME_KEYS = frozenset(
    {
        "TemporalPositionIdentifier",
        "TriggerTime",
        "AcquisitionNumber",
        "AcquisitionTime",
        "ContentTime",
        "position order",
    }
)


# --------------------------------------------------------------------------- the keys
KeyFn = Callable[[DicomHeader, Slice], Any]


def _fk(h: DicomHeader, s: Slice) -> FrameKey:
    fk = h.frame_keys[s.frame] if s.frame < len(h.frame_keys) else None
    return fk if isinstance(fk, FrameKey) else FrameKey()


def _diffusion(b: float | None, g: tuple[float, ...] | None) -> Any:
    if b is None:
        return None
    return (round(b, 1), tuple(round(x, 4) for x in g) if g is not None else None)


CLASSIC_KEYS: tuple[tuple[str, KeyFn], ...] = (
    ("TemporalPositionIdentifier", lambda h, s: h.temporal_position),
    ("DiffusionBValue+Gradient", lambda h, s: _diffusion(h.diffusion_bvalue, h.diffusion_gradient)),
    ("EchoNumbers", lambda h, s: h.echo_number),
    ("TriggerTime", lambda h, s: h.trigger_time),
    ("AcquisitionNumber", lambda h, s: h.acquisition_number),
    ("AcquisitionTime", lambda h, s: h.acquisition_time),
    ("ContentTime", lambda h, s: h.content_time),
)
ENHANCED_KEYS: tuple[tuple[str, KeyFn], ...] = (
    ("TemporalPositionIdentifier", lambda h, s: _fk(h, s).temporal_index),
    ("DiffusionBValue+Gradient", lambda h, s: _diffusion(_fk(h, s).bvalue, _fk(h, s).gradient)),
    ("EchoNumbers", lambda h, s: _fk(h, s).echo_time),
    ("TriggerTime", lambda h, s: _fk(h, s).trigger_time),
    ("DimensionIndexValues", lambda h, s: _fk(h, s).dimension_index),
)


# --------------------------------------------------------------------------- splitting
def position_ids(
    hs: Sequence[DicomHeader], slices: Sequence[Slice], tol: float
) -> list[int] | None:
    """Per slice, the index of its position along the slice normal (positions within
    ``tol`` share one); None when every position occurs once (a plain 3D stack)."""
    o = hs[slices[0].header_index].image_orientation or (1, 0, 0, 0, 1, 0)
    n = normal(o)
    d = np.array([float(np.dot(s.position, n)) for s in slices])  # type: ignore[arg-type]
    order = np.argsort(d, kind="stable")
    ids = [0] * len(slices)
    pid, last = 0, None
    for i in order:
        if last is not None and d[i] - last >= tol:
            pid += 1
        if last is None or d[i] - last >= tol:
            last = d[i]
        ids[int(i)] = pid
    return ids if pid + 1 < len(slices) else None


def _separates(groups: Sequence[Sequence[int]], pids: Sequence[int]) -> str:
    """'' when ``groups`` (slice indices) are volumes: >= 2, each position once per group,
    the same positions in every group; else why not."""
    if len(groups) < 2:
        return "one value for every slice"
    ref = None
    for g in groups:
        ps = [pids[i] for i in g]
        if len(set(ps)) != len(ps):
            return "positions still repeat within a value"
        if ref is None:
            ref = sorted(ps)
        elif sorted(ps) != ref:
            return "values hold different slice positions"
    return ""


def _group_by(values: Sequence[Any], idx: Sequence[int]) -> dict[Any, list[int]]:
    out: dict[Any, list[int]] = defaultdict(list)
    for i in idx:
        out[values[i]].append(i)
    return out


def _occurrence(
    idx: Sequence[int], pids: Sequence[int], ordinal: Sequence[Any]
) -> list[int] | None:
    """Per slice in ``idx`` (same order), how many slices at its position came before it in
    ``ordinal`` order; None when two slices at one position share an ordinal (their order
    would be a guess)."""
    seen: dict[int, int] = defaultdict(int)
    last: dict[int, Any] = {}
    out = {}
    for i in sorted(idx, key=lambda i: ordinal[i]):
        p = pids[i]
        if p in last and last[p] == ordinal[i]:
            return None
        last[p] = ordinal[i]
        out[i] = seen[p]
        seen[p] += 1
    return [out[i] for i in idx]


@dataclass(frozen=True)
class Split:
    """How a set of slices splits into volumes: the key's name and, per volume (in output
    order), its key value and the indices of its slices."""

    key: str
    values: tuple[Any, ...]
    volumes: tuple[tuple[int, ...], ...]


def _ordinals(hs: Sequence[DicomHeader], slices: Sequence[Slice]) -> list[tuple[Any, ...]] | None:
    """Acquisition order of each slice: (InstanceNumber, frame); None when a classic slice
    lacks InstanceNumber."""
    out = []
    for s in slices:
        h = hs[s.header_index]
        if h.number_of_frames == 1 and h.instance_number is None:
            return None
        out.append((h.instance_number or 0, s.frame))
    return out


def _ordered(key: str, groups: dict[Any, list[int]], ordinal: Sequence[Any] | None) -> Split:
    """The volumes of ``groups`` in output order (see the module docstring)."""
    base = key.split("+position order", 1)[0]

    def first(idx: list[int]) -> Any:
        return min(ordinal[i] for i in idx) if ordinal is not None else min(idx)

    if base in _TIME_KEYS or base in ("EchoNumbers", "DimensionIndexValues"):
        items = sorted(groups.items(), key=lambda kv: (kv[0], first(kv[1])))
    else:
        items = sorted(groups.items(), key=lambda kv: first(kv[1]))
    return Split(key, tuple(k for k, _ in items), tuple(tuple(v) for _, v in items))


def split_volumes(
    hs: Sequence[DicomHeader],
    slices: Sequence[Slice],
    policy: GeometryPolicy,
    keys: Sequence[tuple[str, KeyFn]] = CLASSIC_KEYS,
) -> tuple[Split | None, list[str]]:
    """How ``slices`` (of ``hs``) split into volumes, and the keys tried with why each did
    not separate them. ``(None, [])`` when no position repeats; ``(None, tried)`` when no
    key separates them (the caller keeps the slices as one stack, whose same-position
    slices must then hold equal pixels)."""
    pids = position_ids(hs, slices, policy.duplicate_tol)
    if pids is None:
        return None, []
    idx = list(range(len(slices)))
    ordinal = _ordinals(hs, slices)
    tried: list[str] = []
    partial: list[tuple[str, list[Any]]] = []
    for name, fn in keys:
        vals = [fn(hs[s.header_index], s) for s in slices]
        if any(v is None for v in vals):
            tried.append(f"{name} (absent)")
            continue
        groups = _group_by(vals, idx)
        why = _separates(list(groups.values()), pids)
        if not why:
            return _ordered(name, groups, ordinal), tried
        tried.append(f"{name} ({why})")
        if len(groups) >= 2:
            partial.append((name, vals))
    if ordinal is None:
        tried.append("position order (InstanceNumber absent)")
        return None, tried
    occ = _occurrence(idx, pids, ordinal)
    groups = _group_by(occ, idx) if occ is not None else {}
    why = _separates(list(groups.values()), pids) if occ is not None else _TIED
    if not why:
        return _ordered("position order", groups, ordinal), tried
    tried.append(f"position order ({why})")
    for name, vals in partial:
        combined = _within(vals, idx, pids, ordinal)
        if combined is None:
            continue
        groups = _group_by(combined, idx)
        if not _separates(list(groups.values()), pids):
            return _ordered(f"{name}+position order", groups, ordinal), tried
    if partial:
        tried.append("each of those + position order (no separation)")
    return None, tried


_TIED = "InstanceNumber repeats at one position"


def _within(
    vals: Sequence[Any], idx: Sequence[int], pids: Sequence[int], ordinal: Sequence[Any]
) -> list[tuple[Any, int]] | None:
    """Per slice, (its key value, its position order within that value); None on ties."""
    occ = [0] * len(idx)
    for members in _group_by(vals, idx).values():
        ks = _occurrence(members, pids, ordinal)
        if ks is None:
            return None
        for i, k in zip(members, ks, strict=True):
            occ[i] = k
    return list(zip(vals, occ, strict=True))


def image_type_groups(
    hs: Sequence[DicomHeader], slices: Sequence[Slice]
) -> dict[tuple[str, ...], list[int]]:
    """Slice indices by ImageType (enhanced: FrameType + ComplexImageComponent), in first
    appearance order."""
    out: dict[tuple[str, ...], list[int]] = {}
    for i, s in enumerate(slices):
        h = hs[s.header_index]
        t = _fk(h, s).frame_type if h.frame_keys else tuple(v.upper() for v in h.image_type)
        out.setdefault(t, []).append(i)
    return out


# --------------------------------------------------------------------------- stacks
Built = tuple[list[DicomHeader], "Stack | IngestError"]


def series_stacks(
    study: str, series: str, hs: list[DicomHeader], policy: GeometryPolicy
) -> list[Built]:
    """The stacks of the single-frame slices ``hs`` (one orientation cluster), each with
    the headers behind it; a stack that fails validation is its ``IngestError``."""
    slices = [
        Slice(i, 0, h.image_position, h.rescale_slope, h.rescale_intercept)
        for i, h in enumerate(hs)
    ]
    return _stacks(study, series, hs, slices, "", policy, CLASSIC_KEYS)


def frame_stacks(study: str, series: str, h: DicomHeader, policy: GeometryPolicy) -> list[Built]:
    """The stacks of one enhanced multi-frame object with per-frame positions (one per frame
    type; 4D when its frames hold several volumes)."""
    nf = h.number_of_frames
    slices = [
        Slice(
            0,
            f,
            h.frame_positions[f],
            *(h.frame_rescale[f] if h.frame_rescale else (h.rescale_slope, h.rescale_intercept)),
        )
        for f in range(nf)
    ]
    return _stacks(study, series, [h], slices, h.sop_instance_uid, policy, ENHANCED_KEYS)


def _stacks(
    study: str,
    series: str,
    hs: list[DicomHeader],
    slices: list[Slice],
    stack_id: str,
    policy: GeometryPolicy,
    keys: Sequence[tuple[str, KeyFn]],
) -> list[Built]:
    if position_ids(hs, slices, policy.duplicate_tol) is None:
        return [(hs, _built(validated_volume, study, series, hs, slices, stack_id, policy))]
    groups = _image_groups(hs, slices, policy, dict(keys)["EchoNumbers"])
    out: list[Built] = []
    for label, idx in groups.items():
        sid = stack_id if len(groups) == 1 else f"{stack_id}|{label}"
        sub = [slices[i] for i in idx]
        used = [hs[i] for i in sorted({s.header_index for s in sub})]
        split, _tried = split_volumes(hs, sub, policy, keys)
        if split is None:  # one stack: same-position slices must hold equal pixels
            out.append((used, _built(validated_volume, study, series, hs, sub, sid, policy)))
        else:
            out.append((used, _built(volume_set_stack, study, series, hs, sub, split, sid, policy)))
    return out


def _image_groups(
    hs: Sequence[DicomHeader], slices: Sequence[Slice], policy: GeometryPolicy, echo: KeyFn
) -> dict[str, list[int]]:
    """Slice indices per separate image: by ImageType, then by echo when every echo still
    repeats positions (multi-echo fMRI: one 4D image per echo, as dcm2niix's ``_e2``)."""
    out: dict[str, list[int]] = {}
    for itype, idx in image_type_groups(hs, slices).items():
        label = "type=" + "/".join(itype)
        vals = [echo(hs[slices[i].header_index], slices[i]) for i in idx]
        by_echo = _group_by(vals, range(len(idx))) if None not in vals else {}
        if len(by_echo) > 1 and all(
            position_ids(hs, [slices[idx[k]] for k in ks], policy.duplicate_tol) is not None
            for ks in by_echo.values()
        ):
            for e, ks in sorted(by_echo.items()):
                out[f"{label}|echo={_text(e)}"] = [idx[k] for k in ks]
        else:
            out[label] = idx
    return out


def _built(fn: Callable[..., Stack], *args: Any) -> Stack | IngestError:
    """``fn(*args)``, or the ``IngestError`` it raised."""
    try:
        return fn(*args)
    except IngestError as exc:
        return exc


def not_separated_reason(stack: Stack, policy: GeometryPolicy) -> str:
    """Why the same-position slices of ``stack`` were not split into volumes: the keys
    tried (for the ``duplicate_slices`` message)."""
    slices = list(stack.slices) + list(stack.dup_slices)
    keys = ENHANCED_KEYS if stack.first.frame_keys else CLASSIC_KEYS
    try:
        _split, tried = split_volumes(list(stack.headers), slices, policy, keys)
    except Exception:  # a message helper never fails the load
        return ""
    return "; ".join(tried)


def volume_set_stack(
    study: str,
    series: str,
    hs: Sequence[DicomHeader],
    slices: Sequence[Slice],
    split: Split,
    stack_id: str,
    policy: GeometryPolicy,
) -> Stack:
    """One 4D stack from the volumes of ``split``: each volume validated by
    :func:`~.geometry.validated_volume`, all with the same grid (positions, orientation,
    spacing, size), joined volume-major over one header list."""
    parts: list[Stack] = []
    for vol in split.volumes:
        vs = [slices[i] for i in vol]
        used = sorted({s.header_index for s in vs})
        local = {g: k for k, g in enumerate(used)}
        mine = [Slice(local[s.header_index], s.frame, s.position, s.slope, s.intercept) for s in vs]
        part = validated_volume(study, series, [hs[g] for g in used], mine, stack_id, policy)
        parts.append(_as_volume(part, policy) if part.kind == "image" else part)
    _check_same_grid(parts, split, policy)
    order: dict[int, int] = {}
    headers: list[DicomHeader] = []
    joined: list[Slice] = []
    for part in parts:
        for s in part.slices:
            h = part.headers[s.header_index]
            gi = order.setdefault(id(h), len(headers))
            if gi == len(headers):
                headers.append(h)
            joined.append(Slice(gi, s.frame, s.position, s.slope, s.intercept))
    p0 = parts[0]
    warnings = list(dict.fromkeys(w for p in parts for w in p.warnings))
    return Stack(
        headers=tuple(headers),
        kind="volume",
        study_uid=study,
        series_uid=series,
        stack_id=stack_id,
        slices=tuple(joined),
        affine_lps=p0.affine_lps,
        warnings=tuple(warnings),
        grid_positions=p0.grid_positions,
        n_volumes=len(parts),
        volume_axis=volume_axis(parts, split),
    )


def _as_volume(part: Stack, policy: GeometryPolicy) -> Stack:
    """A one-slice volume (cine: one position, many phases) with its patient geometry:
    the step is the slice normal times SliceThickness (1 mm when unknown)."""
    from dataclasses import replace

    from medres.ingest.dicom.geometry import spacing_2d

    h = part.first
    o = h.image_orientation
    pos = part.slices[0].position
    if o is None or pos is None:
        raise IngestError("volume slice without patient geometry", code=Code.INCONSISTENT_GEOMETRY)
    (dr, dc), _ = spacing_2d(h)
    aff = np.eye(4)
    aff[:3, 0] = np.asarray(o[:3], float) * dc
    aff[:3, 1] = np.asarray(o[3:6], float) * dr
    aff[:3, 2] = normal(o) * (h.slice_thickness or 1.0)
    aff[:3, 3] = pos
    return replace(part, kind="volume", affine_lps=tuple(tuple(float(v) for v in r) for r in aff))


def _check_same_grid(parts: Sequence[Stack], split: Split, policy: GeometryPolicy) -> None:
    """Every volume has the first one's size, slice count, affine and resampling grid."""
    p0 = parts[0]
    a0 = np.array(p0.affine_lps, dtype=float)
    for k, p in enumerate(parts[1:], start=1):
        h, h0 = p.first, p0.first
        why = ""
        if (h.rows, h.cols) != (h0.rows, h0.cols) or p.n_slices != p0.n_slices:
            why = f"{h.rows}x{h.cols}x{p.n_slices} vs {h0.rows}x{h0.cols}x{p0.n_slices}"
        elif not np.allclose(np.array(p.affine_lps, dtype=float), a0, atol=policy.collinear_tol):
            why = "different slice positions, orientation or spacing"
        elif p.grid_positions != p0.grid_positions or p.duplicates:
            why = "different slice spacing"
        if why:
            raise IngestError(
                f"volume {k + 1} ({split.key} {split.values[k]}) differs from volume 1 in its "
                f"grid ({why}); re-export the series",
                code=Code.INCONSISTENT_GEOMETRY,
            )


def volume_axis(parts: Sequence[Stack], split: Split) -> VolumeAxis:
    """The :class:`VolumeAxis` of the volumes ``parts`` made by ``split``."""
    firsts = [(p.first, p.slices[0]) for p in parts]
    fks = [_fk(h, s) if h.frame_keys else None for h, s in firsts]
    bvals = [
        fk.bvalue if fk else h.diffusion_bvalue for (h, _), fk in zip(firsts, fks, strict=True)
    ]
    grads = [
        fk.gradient if fk else h.diffusion_gradient for (h, _), fk in zip(firsts, fks, strict=True)
    ]
    echoes = [fk.echo_time if fk else h.echo_time for (h, _), fk in zip(firsts, fks, strict=True)]
    echo_nums = [h.echo_number for h, _ in firsts]
    tr = firsts[0][0].repetition_time
    has_b = all(b is not None for b in bvals)
    g3 = [g if g is not None else (0.0, 0.0, 0.0) for g in grads]
    base = split.key.split("+", 1)[0]
    diffusion = has_b and (len(set(bvals)) > 1 or len(set(g3)) > 1)
    if diffusion:
        kind = "diffusion"
    elif base == "EchoNumbers" or len(set(echoes)) > 1 or len(set(echo_nums)) > 1:
        kind = "echo"
    elif split.key in _TIME_KEYS or base in _TIME_KEYS:
        kind = "time"
    else:
        kind = "other"
    return VolumeAxis(
        kind=kind,
        key=split.key,
        key_values=tuple(_text(v) for v in split.values),
        times_s=_times(parts, kind, tr) if kind == "time" else (),
        bvalues=tuple(float(b) for b in bvals) if diffusion else (),  # type: ignore[arg-type]
        gradients_lps=tuple(g3) if diffusion and any(g is not None for g in grads) else (),  # type: ignore[arg-type]
        echo_times_ms=tuple(float(e) for e in echoes) if all(e is not None for e in echoes) else (),  # type: ignore[arg-type]
        repetition_time_s=None if tr is None else tr / 1000.0,
    )


def _times(parts: Sequence[Stack], kind: str, tr: float | None) -> tuple[float, ...]:
    """Per-volume start times (s) from the first volume: TriggerTime, else the earliest
    AcquisitionTime of each volume when they differ, else k x RepetitionTime."""
    trig = [p.first.trigger_time for p in parts]
    if all(t is not None for t in trig) and len(set(trig)) > 1:
        return tuple((t - trig[0]) / 1000.0 for t in trig)  # type: ignore[operator]
    acq = [[h.acquisition_time for h in p.headers] for p in parts]
    if all(a is not None for v in acq for a in v):
        starts = [min(v) for v in acq]  # type: ignore[type-var]
        if len(set(starts)) == len(starts):
            return tuple(s - starts[0] for s in starts)  # type: ignore[operator]
    if tr is not None and tr > 0:
        return tuple(k * tr / 1000.0 for k in range(len(parts)))
    return ()


def _text(v: Any) -> str:
    if isinstance(v, tuple):
        return "/".join(_text(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return "" if v is None else str(v)
