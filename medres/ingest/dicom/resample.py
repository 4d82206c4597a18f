"""Uneven slice spacing: plan a regular grid along the slice direction and resample onto it.

Owns the rule medres follows when the slices of a stack are not evenly spaced (a GE head
CT with 2.5 mm and 5 mm sections, a series with a missing file) and
:attr:`~medres.ingest.dicom.header.GeometryPolicy.uneven_spacing` is ``"resample"`` (the
default; ``"reject"`` keeps the strict ``missing_slices`` / ``inconsistent_geometry``
rejection of :mod:`.geometry`):

- **Target spacing: the smallest gap**, as dcm2niix does (``nii_saveNII3Deq``): no region is
  sampled more coarsely than it was acquired, and a series that is regular except for
  missing slices comes out on its own step, every present slice copied unchanged and only
  the missing positions interpolated. The number of intervals is
  ``ceil(extent / smallest gap)`` (so the spacing is the smallest gap, shrunk by at most a
  fraction so that the grid ends exactly on the last slice: nothing is cut or
  extrapolated), capped at ``2 * slices - 1`` (dcm2niix's cap of twice the input slices,
  so one odd tiny gap cannot blow the volume up; the spacing is then ``extent / cap``). The
  median would be the other choice; it downsamples the dense sections, which is why it is
  not used.
- **Values: linear interpolation along the slice line between the two neighbouring slices**,
  after decoding and the modality LUT (so CT is interpolated in HU), in float32. A slice
  that lies on a grid position (within ``duplicate_tol``) is copied, not interpolated.
  Stored dtype: when the decoded values were integral (int16, e.g. CT in HU) the result is
  rounded back to integers (dcm2niix rounds too; the rounding, at most 0.5, is far below
  the interpolation error) and stored as int16 by the usual rule; otherwise it stays
  float32.
- **The affine stays exact**: origin = the first slice's position, step = (last position -
  first position) / intervals, so every grid slice sits on the line through the acquired
  slices (with gantry tilt that line is sheared, as for regular stacks: see the package
  docstring; tilt itself is never resampled).
- **Missing slices are handled the same way** (dcm2niix also equalises them): the gap is an
  integer multiple of the step, so the grid is the series' own step and the interpolated
  slices are the missing ones. That is made-up data, so the warning says so and counts
  them (``missing_slices_interpolated:...``); uneven series get
  ``uneven_spacing_resampled:...`` naming the smallest and largest gap and how many
  distinct gaps there were. A gap wider than :data:`MAX_GAP_FACTOR` times the median gap is
  not bridged (``inconsistent_geometry``): that is two stacks in one series, not a gap.

Imports :mod:`.header`, :mod:`medres.errors`, :mod:`medres.ingest.codes`,
:mod:`medres.ingest.image` and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.dicom.header import GeometryPolicy
from medres.ingest.image import to_output_dtype

MAX_GAP_FACTOR = 10.0  # a gap wider than this many median gaps is never interpolated
_INTERVAL_SLACK = 0.01  # extent/gap within 1% above an integer: that integer of intervals


def median(values: np.ndarray) -> float:
    """``float(np.median(values))`` of a 1-D float array (NaN when it holds a NaN or nothing),
    without the ``numpy.ma`` import that ``np.median`` costs on its first call (~15 ms of
    every ``medres ingest``)."""
    a = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if a.size == 0 or np.isnan(a[-1]):
        return math.nan
    mid = a.size // 2
    return float(a[mid]) if a.size % 2 else float((a[mid - 1] + a[mid]) / 2.0)


@dataclass(frozen=True)
class SliceGrid:
    """A regular grid for an unevenly spaced stack.

    ``positions``: each kept slice's position in grid index units (first 0.0, last
    ``n_out - 1``; integral where a slice lies on a grid position); ``intervals`` =
    ``n_out - 1``; ``spacing``: grid spacing along the slice normal (mm); ``warning``: the
    image warning naming the original spacings.
    """

    positions: tuple[float, ...]
    n_out: int
    spacing: float
    warning: str

    @property
    def intervals(self) -> int:
        return self.n_out - 1


def plan_grid(d: Sequence[float], policy: GeometryPolicy, missing: bool = False) -> SliceGrid:
    """The regular grid for sorted slice positions ``d`` (mm along the normal, distinct).

    ``missing``: the irregular gaps are whole multiples of the step (slices absent); the
    warning then counts the interpolated slices. Raises ``IngestError``
    (``inconsistent_geometry``) for a gap wider than :data:`MAX_GAP_FACTOR` median gaps.
    """
    pos = np.asarray(d, dtype=float)
    gaps = np.diff(pos)
    med, smallest, largest = median(gaps), float(gaps.min()), float(gaps.max())
    if largest > MAX_GAP_FACTOR * med:
        raise IngestError(
            f"a slice gap of {largest:.3g} mm is more than {MAX_GAP_FACTOR:g}x the median gap "
            f"({med:.3g} mm): two stacks in one series, not interpolated; split or re-export "
            "the series",
            code=Code.INCONSISTENT_GEOMETRY,
        )
    extent = float(pos[-1] - pos[0])
    intervals = max(1, math.ceil(extent / smallest - _INTERVAL_SLACK))
    intervals = min(intervals, 2 * len(pos) - 1)
    spacing = extent / intervals
    idx = (pos - pos[0]) / spacing
    snap = np.abs(idx - np.round(idx)) * spacing <= policy.duplicate_tol
    idx = np.where(snap, np.round(idx), idx)
    idx[0], idx[-1] = 0.0, float(intervals)
    n_out = intervals + 1
    if missing:
        warning = (
            f"missing_slices_interpolated:{n_out - len(pos)} of {n_out} slices interpolated "
            f"(gaps up to {largest:.4g} mm in a {spacing:.4g} mm series)"
        )
    else:
        warning = (
            f"uneven_spacing_resampled:gaps {smallest:.4g}..{largest:.4g} mm "
            f"({_distinct(gaps, policy.spacing_atol)} distinct), resampled to "
            f"{spacing:.4g} mm ({len(pos)} -> {n_out} slices)"
        )
    return SliceGrid(tuple(float(v) for v in idx), n_out, spacing, warning)


def _distinct(gaps: np.ndarray, tol: float) -> int:
    """How many distinct gap values (sorted gaps further apart than ``tol`` start a new one)."""
    g = np.sort(gaps)
    return 1 + int(np.sum(np.diff(g) > tol))


def resample_slices(values: np.ndarray, positions: Sequence[float], n_out: int) -> np.ndarray:
    """``values`` (slices along axis 0, at grid index ``positions``) on grid 0..n_out-1.

    Linear interpolation between the two neighbouring slices in float32; a slice whose
    position is integral is copied. Integral input (int dtype) is rounded back to integers
    and stored by :func:`~medres.ingest.image.to_output_dtype`; other input stays float32.
    """
    p = np.asarray(positions, dtype=float)
    if len(p) != values.shape[0] or p[0] != 0.0 or p[-1] != n_out - 1 or np.any(np.diff(p) <= 0):
        raise ValueError("grid positions must rise from 0 to n_out - 1, one per slice")
    integral = values.dtype.kind in "iu"
    out = np.empty((n_out, *values.shape[1:]), dtype=np.float32)
    for k in range(n_out):
        j = min(int(np.searchsorted(p, k, side="right")) - 1, len(p) - 1)
        if p[j] == k:
            out[k] = values[j]
            continue
        w = np.float32((k - p[j]) / (p[j + 1] - p[j]))
        np.multiply(values[j], np.float32(1.0) - w, out=out[k], casting="unsafe")
        out[k] += values[j + 1].astype(np.float32) * w
    if integral:
        np.rint(out, out=out)
        return to_output_dtype(out)
    return out
