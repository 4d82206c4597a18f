"""Pixels of a planned series: :func:`render` (stored array + modality values) and
:func:`ground_truth`, which re-renders any written series from the seed.

Rendering is deterministic (noise from the stream ``[seed, 2, noise_key]``), so nothing
is cached: the intended image is recomputed whenever it is asked for.

Imports: numpy and, within the package, :mod:`~medres.synth.spec`,
:mod:`~medres.synth.phantom`, :mod:`~medres.synth.plan` and :mod:`~medres.synth.truth`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from medres.synth import phantom as P
from medres.synth.phantom import lps_sr_c_to_ras_xyz
from medres.synth.plan import SeriesPlan, plan_series
from medres.synth.spec import SynthSpec
from medres.synth.truth import SynthResult, load_result


@dataclass(frozen=True)
class GroundTruth:
    """The intended pixels of one series, recomputed from the seed.

    ``array`` has DICOM axes (slices, rows, cols) sorted along the slice normal (2D images:
    one slice; RGB images get a trailing channel axis). Values are the stored values after
    the modality LUT (CT: HU = stored * slope + intercept; MR: stored * slope when the
    series has a rescale) and, for MONOCHROME1, after inversion (``4095 - stored``) so that
    higher is brighter. ``affine_lps`` maps (s, r, c, 1) to LPS mm.
    """

    array: np.ndarray
    affine_lps: np.ndarray
    spacing: tuple[float, ...]  # (slice, row, col) mm, the array's axis order
    photometric: str

    def xyz_ras(self) -> tuple[np.ndarray, np.ndarray]:
        """(array (X=cols, Y=rows, Z=slices)[, C], affine voxel->RAS+) before any reorientation."""
        arr = np.moveaxis(self.array, (0, 1, 2), (2, 1, 0))
        return arr, lps_sr_c_to_ras_xyz(self.affine_lps)


def render(
    spec: SynthSpec, plan: SeriesPlan, *, with_lesions: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(stored array as written, values after the modality LUT/inversion) of one series.

    Stored arrays: CT/NIfTI int16 (HU - intercept), MR uint16 (value / slope), X-ray uint16
    12-bit (MONOCHROME1: 4095 - value), US/SC uint8 RGB (rows, cols, 3). 3D arrays are
    (slices, rows, cols) in slice order along the normal.
    """
    rng = np.random.default_rng([spec.seed, 2, plan.noise_key])
    g = plan.geometry
    lesions = list(plan.distractors) + (list(plan.lesions) if with_lesions else [])
    if spec.kind in ("ct", "nifti", "mr", "sc"):
        vol = P.render_torso(g, plan.anatomy, lesions, "mr" if spec.kind == "mr" else "ct", rng)
        if spec.kind == "mr":
            stored = np.clip(np.round(vol / plan.slope), 0, 4095).astype(np.uint16)
            return stored, stored.astype(np.float32) * np.float32(plan.slope)
        hu = np.clip(np.round(vol), -1024, 3071)
        if spec.kind == "sc":
            grey = np.clip((hu[0] + 160.0) / 400.0 * 255.0, 0, 255).round().astype(np.uint8)
            rgb = np.repeat(grey[:, :, None], 3, axis=2)
            P.sc_overlay(rgb)
            return rgb, rgb.copy()
        stored = (hu - plan.intercept).astype(np.int16)
        return stored, stored.astype(np.float32) * np.float32(plan.slope) + np.float32(
            plan.intercept
        )
    if spec.kind == "xray":
        val = np.round(P.render_xray(g, plan.anatomy, lesions, rng)[0]).astype(np.uint16)
        stored = (4095 - val).astype(np.uint16) if plan.photometric == "MONOCHROME1" else val
        return stored, val.astype(np.float32)
    img = np.round(P.render_us(g, plan.anatomy, lesions, rng)[0]).astype(np.uint8)
    rgb = np.repeat(img[:, :, None], 3, axis=2)
    P.us_overlay(rgb)
    return rgb, rgb.copy()


def ground_truth(
    result: SynthResult | str | os.PathLike[str], series_uid: str, *, with_lesions: bool = True
) -> GroundTruth:
    """The intended image of ``series_uid``, recomputed from the seed (nothing is cached).

    ``with_lesions=False`` renders the same series (same noise) without its true lesions, so
    ``ground_truth(...) - ground_truth(..., with_lesions=False)`` is non-zero exactly at the
    lesions. Defects (missing or shifted slices) are not applied: this is the intended volume.
    """
    res = result if isinstance(result, SynthResult) else load_result(result)
    row = res.row(series_uid)
    plan = plan_series(res.spec)[row.series_index]
    _, values = render(res.spec, plan, with_lesions=with_lesions)
    g = plan.geometry
    if values.ndim == 2 or (values.ndim == 3 and values.shape[-1] == 3 and res.spec.dims == 2):
        values = values[None]
    return GroundTruth(values, g.affine_lps(), (g.slice_sp, g.row_sp, g.col_sp), plan.photometric)
