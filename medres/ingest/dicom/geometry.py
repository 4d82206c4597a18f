"""Stack geometry: validate the slices of one stack and build its affine (LPS).

Owns the checks of :class:`~medres.ingest.dicom.header.GeometryPolicy`, applied to the
slices of one stack: same size, orientation, pixel spacing and sample format; sorted along
the slice normal ``cross(row, col)``; duplicate positions merged (their pixels are compared
when loading); at least ``min_slices``; regular gaps, else (policy ``uneven_spacing``) a
regular grid planned by :mod:`.resample` that :func:`~.stack.load_stack` interpolates onto,
or the strict ``missing_slices`` / ``inconsistent_geometry`` rejection; origins on one line;
a ``gantry_tilt`` warning for a step that is not parallel to the normal (the sheared affine
is kept, never resampled). It also builds the stacks of single instances (2D images,
multi-frame 2D, enhanced volumes). Imports :mod:`.header`, :mod:`.resample` and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.dicom.header import DicomHeader, GeometryPolicy, Slice, Stack
from medres.ingest.dicom.resample import SliceGrid, median, plan_grid

Affine = tuple[tuple[float, ...], ...]


def normal(orient: Sequence[float]) -> np.ndarray:
    """The unit slice normal ``cross(row, col)`` of an ImageOrientationPatient (zero when
    the cosines are parallel or zero)."""
    r = np.asarray(orient[:3], dtype=float)
    c = np.asarray(orient[3:6], dtype=float)
    n = np.cross(r, c)
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else n


def spacing_2d(h: DicomHeader) -> tuple[tuple[float, float], list[str]]:
    """(row spacing, column spacing) from PixelSpacing, else ImagerPixelSpacing, else 1.0."""
    for sp in (h.pixel_spacing, h.imager_pixel_spacing):
        if sp is not None and sp[0] > 0 and sp[1] > 0:
            return (sp[0], sp[1]), []
    return (1.0, 1.0), ["no_pixel_spacing:assumed_1.0mm"]


def _affine_2d(dr: float, dc: float) -> Affine:
    """The diagonal affine of a 2D image (X=columns, Y=rows)."""
    return ((dc, 0.0, 0.0, 0.0), (0.0, dr, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 1.0))


# --------------------------------------------------------------------------- one instance
def single_stack(study: str, series: str, h: DicomHeader, policy: GeometryPolicy) -> Stack:
    """One instance: 2D image, multi-frame 2D (frames as slices) or enhanced volume."""
    nf = h.number_of_frames
    if nf > 1 and h.image_orientation is not None and len(h.frame_positions) == nf:
        slices = [
            Slice(
                0,
                f,
                h.frame_positions[f],
                *(
                    h.frame_rescale[f]
                    if h.frame_rescale
                    else (h.rescale_slope, h.rescale_intercept)
                ),
            )
            for f in range(nf)
        ]
        return validated_volume(study, series, [h], slices, h.sop_instance_uid, policy)
    (dr, dc), warnings = spacing_2d(h)
    slices = [Slice(0, f, None, h.rescale_slope, h.rescale_intercept) for f in range(nf)]
    if h.frame_rescale and len(h.frame_rescale) == nf:
        slices = [Slice(0, f, None, *h.frame_rescale[f]) for f in range(nf)]
    if nf > 1:
        warnings.append("frames_as_slices")
    return Stack(
        headers=(h,),
        kind="image",
        study_uid=study,
        series_uid=series,
        stack_id=h.sop_instance_uid or str(h.path),
        slices=tuple(slices),
        affine_lps=_affine_2d(dr, dc),
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------- volumes
def validated_volume(
    study: str,
    series: str,
    hs: list[DicomHeader],
    slices: list[Slice],
    stack_id: str,
    policy: GeometryPolicy,
) -> Stack:
    """Check, sort and merge ``slices`` of ``hs`` into a volume (one kept slice: a 2D
    image); raises ``IngestError`` with the code of the first failed check."""
    h0 = hs[0]
    o0 = h0.image_orientation
    assert o0 is not None
    for h in hs[1:]:
        _check_like(h, h0, policy)
    n = _slice_normal(o0)
    (dr, dc), warnings = spacing_2d(h0)
    kept, kept_d, dups, dup_slices = _merge_duplicates(*_sorted_along(slices, n), policy)
    nk = len(kept)
    if 1 < nk < policy.min_slices:
        raise IngestError(
            f"only {nk} slices (policy minimum {policy.min_slices}); not a usable volume",
            code=Code.TOO_FEW_SLICES,
        )
    if nk == 1:  # one slice: a 2D image like any other (diagonal affine, X=cols, Y=rows)
        k = kept[0]
        return Stack(
            headers=(hs[k.header_index],),
            kind="image",
            study_uid=study,
            series_uid=series,
            stack_id=stack_id,
            slices=(Slice(0, k.frame, k.position, k.slope, k.intercept),),
            affine_lps=_affine_2d(dr, dc),
            warnings=tuple(warnings),
        )
    tol, grid = _regular_or_grid(np.array(kept_d), policy)
    pos = np.array([s.position for s in kept], dtype=float)
    if grid is None:
        step = _collinear_step(pos, max(policy.collinear_tol, tol))
    else:  # uneven: the grid's step along the line through the slices (.resample)
        step = _line_step(pos, grid.intervals, policy.collinear_tol)
        warnings.append(grid.warning)
    tilt = _tilt_deg(step, n)
    if tilt > policy.tilt_warn_deg:
        warnings.append(f"gantry_tilt:{tilt:.2f}deg")
    if dups:
        warnings.append(f"duplicate_positions:{len(dups)}")
    used = sorted({s.header_index for s in kept} | {s.header_index for s in dup_slices})
    remap = {old: new for new, old in enumerate(used)}

    def re(s: Slice) -> Slice:
        return Slice(remap[s.header_index], s.frame, s.position, s.slope, s.intercept)

    return Stack(
        headers=tuple(hs[i] for i in used),
        kind="volume",
        study_uid=study,
        series_uid=series,
        stack_id=stack_id,
        slices=tuple(re(s) for s in kept),
        affine_lps=_volume_affine(o0, dr, dc, step, pos[0]),
        warnings=tuple(warnings),
        duplicates=tuple(dups),
        dup_slices=tuple(re(s) for s in dup_slices),
        grid_positions=grid.positions if grid is not None else (),
    )


def _check_like(h: DicomHeader, h0: DicomHeader, policy: GeometryPolicy) -> None:
    """``h`` has the size, orientation, pixel spacing and sample format of ``h0``."""
    if (h.rows, h.cols) != (h0.rows, h0.cols):
        raise IngestError(
            f"slices differ in size ({h0.rows}x{h0.cols} vs {h.rows}x{h.cols}); "
            "re-export the series or remove the odd slices",
            code=Code.INCONSISTENT_GEOMETRY,
        )
    o, o0 = h.image_orientation, h0.image_orientation
    assert o is not None and o0 is not None
    if max(abs(a - b) for a, b in zip(o, o0, strict=True)) > policy.orientation_tol:
        raise IngestError(
            "slices disagree on ImageOrientationPatient beyond "
            f"{policy.orientation_tol}; re-export the series",
            code=Code.MIXED_ORIENTATION,
        )
    if (h.pixel_spacing is None) != (h0.pixel_spacing is None) or (
        h.pixel_spacing is not None
        and h0.pixel_spacing is not None
        and max(abs(a - b) for a, b in zip(h.pixel_spacing, h0.pixel_spacing, strict=True))
        > policy.pixel_spacing_tol
    ):
        raise IngestError(
            "slices disagree on PixelSpacing; re-export the series",
            code=Code.INCONSISTENT_GEOMETRY,
        )
    if (h.samples_per_pixel, h.bits_allocated) != (h0.samples_per_pixel, h0.bits_allocated):
        raise IngestError(
            "slices disagree on SamplesPerPixel/BitsAllocated; re-export the series",
            code=Code.INCONSISTENT_GEOMETRY,
        )


def _slice_normal(orient: Sequence[float]) -> np.ndarray:
    n = normal(orient)
    if not np.any(n):
        raise IngestError(
            "ImageOrientationPatient row and column cosines are parallel or zero; fix the header",
            code=Code.INCONSISTENT_GEOMETRY,
        )
    return n


def _sorted_along(slices: list[Slice], n: np.ndarray) -> tuple[list[Slice], np.ndarray]:
    """``slices`` sorted (stably) by their position along the normal, and those positions."""
    d = np.array([float(np.dot(s.position, n)) for s in slices])  # type: ignore[arg-type]
    order = np.argsort(d, kind="stable")
    return [slices[i] for i in order], d[order]


def _merge_duplicates(
    slices: list[Slice], d: np.ndarray, policy: GeometryPolicy
) -> tuple[list[Slice], list[float], list[tuple[int, int]], list[Slice]]:
    """(kept slices, their positions, (kept index, duplicate index) pairs, duplicates):
    slices closer than ``duplicate_tol`` to the previous kept one are its duplicates."""
    kept: list[Slice] = [slices[0]]
    kept_d: list[float] = [float(d[0])]
    dups: list[tuple[int, int]] = []
    dup_slices: list[Slice] = []
    for s, dd in zip(slices[1:], d[1:], strict=True):
        if dd - kept_d[-1] < policy.duplicate_tol:
            dups.append((len(kept) - 1, len(dup_slices)))
            dup_slices.append(s)
        else:
            kept.append(s)
            kept_d.append(float(dd))
    return kept, kept_d, dups, dup_slices


def _regular_or_grid(d: np.ndarray, policy: GeometryPolicy) -> tuple[float, SliceGrid | None]:
    """(gap tolerance, None) for regular positions ``d``; for irregular ones the strict
    rejection (policy ``uneven_spacing="reject"``) or the regular grid to resample onto."""
    tol, problem = _gap_problem(np.diff(d), policy)
    if problem is None:
        return tol, None
    if policy.uneven_spacing == "reject":
        raise problem
    return tol, plan_grid(d, policy, missing=problem.code == Code.MISSING_SLICES)


def _gap_problem(gaps: np.ndarray, policy: GeometryPolicy) -> tuple[float, IngestError | None]:
    """(gap tolerance, the ``missing_slices`` / ``inconsistent_geometry`` error that
    irregular gaps mean under the strict rule, or None when they are regular)."""
    med = median(gaps)
    tol = max(policy.spacing_atol, policy.spacing_rtol * med)
    irregular = np.abs(gaps - med) > tol
    if not np.any(irregular):
        return tol, None
    ratios = gaps[irregular] / med
    missing = np.all(
        (np.abs(ratios - np.round(ratios)) * med <= tol)
        & (np.round(ratios) >= 2)
        & (np.round(ratios) <= policy.max_missing_factor)
    )
    if missing:
        n_missing = int(np.sum(np.round(ratios) - 1))
        return tol, IngestError(
            f"{n_missing} slice(s) missing (gap of {float(np.max(gaps)):.3g} mm in a series "
            f"spaced {med:.3g} mm); add the missing files, re-export the series, or ingest "
            "with --uneven-spacing resample to interpolate them",
            code=Code.MISSING_SLICES,
        )
    return tol, IngestError(
        f"uneven slice spacing ({float(gaps.min()):.3g}..{float(gaps.max()):.3g} mm, "
        f"median {med:.3g}, tolerance {tol:.3g}); ingest with --uneven-spacing resample or "
        "re-export the series",
        code=Code.INCONSISTENT_GEOMETRY,
    )


def _collinear_step(pos: np.ndarray, tol: float) -> np.ndarray:
    """The mean step between consecutive origins, which must all lie on the line
    ``pos[0] + k * step`` within ``tol``."""
    nk = len(pos)
    step = (pos[-1] - pos[0]) / (nk - 1)
    resid = pos - (pos[0] + np.outer(np.arange(nk), step))
    if float(np.max(np.linalg.norm(resid, axis=1))) > tol:
        raise IngestError(
            "slice positions do not lie on one line; re-export the series",
            code=Code.INCONSISTENT_GEOMETRY,
        )
    return step


def _line_step(pos: np.ndarray, intervals: int, tol: float) -> np.ndarray:
    """The grid step ``(last - first) / intervals`` of unevenly spaced origins, which must
    all lie on the line through the first and the last within ``tol``."""
    span = pos[-1] - pos[0]
    u = span / np.linalg.norm(span)
    rel = pos - pos[0]
    resid = rel - np.outer(rel @ u, u)
    if float(np.max(np.linalg.norm(resid, axis=1))) > tol:
        raise IngestError(
            "slice positions do not lie on one line; re-export the series",
            code=Code.INCONSISTENT_GEOMETRY,
        )
    return span / intervals


def _tilt_deg(step: np.ndarray, n: np.ndarray) -> float:
    """Angle between the slice step and the slice normal (gantry tilt)."""
    cos = float(np.clip(abs(np.dot(step, n)) / np.linalg.norm(step), -1.0, 1.0))
    return math.degrees(math.acos(cos))


def _volume_affine(
    o0: Sequence[float], dr: float, dc: float, step: np.ndarray, origin: np.ndarray
) -> Affine:
    """``[row_cos * col_spacing, col_cos * row_spacing, step, origin]`` in LPS."""
    aff = np.eye(4)
    aff[:3, 0] = np.asarray(o0[:3], float) * dc
    aff[:3, 1] = np.asarray(o0[3:6], float) * dr
    aff[:3, 2] = step
    aff[:3, 3] = origin
    return tuple(tuple(float(v) for v in row) for row in aff)
