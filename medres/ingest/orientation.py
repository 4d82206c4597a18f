"""Closest-canonical orientation of an affine: nibabel's ``io_orientation``,
``inv_ornt_aff`` and ``apply_orientation`` without importing nibabel.

Importing nibabel costs ~0.25 s (and imports pydicom and scipy with it: ~0.6 s in all on
the project's CI-class machine), more than ingesting a small DICOM series; the DICOM
reader needs only these three functions to put a stack into medres' canonical RAS+
layout (permute and flip axes only, never resample). They follow nibabel 5's
``nibabel.orientations`` line for line (MIT licence, (c) the NiBabel developers);
``tests/unit/test_orientation.py`` checks them against nibabel on oblique, flipped and
sheared affines. Imports numpy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["apply_orientation", "inv_ornt_aff", "io_orientation"]


def io_orientation(affine: np.ndarray, tol: float | None = None) -> np.ndarray:
    """``(p, 2)`` orientation of the input axes of ``affine`` in terms of its output axes:
    per input axis, the closest output axis and 1 (same direction) or -1 (opposite);
    ``nan`` rows for dropped axes. Ties are broken as nibabel does (axes with the largest
    share first, then each chosen output axis removed)."""
    affine = np.asarray(affine, dtype=float)
    q, p = affine.shape[0] - 1, affine.shape[1] - 1
    rzs = affine[:q, :p]
    zooms = np.sqrt(np.sum(rzs * rzs, axis=0))
    zooms[zooms == 0] = 1
    rs = rzs / zooms
    u, s, vt = np.linalg.svd(rs, full_matrices=False)
    if tol is None:
        tol = s.max() * max(rs.shape) * np.finfo(s.dtype).eps
    keep = s > tol
    r = np.dot(u[:, keep], vt[keep])
    ornt = np.full((p, 2), np.nan)
    for in_ax in np.argsort(np.min(-(r**2), axis=0), kind="stable"):
        col = r[:, in_ax]
        if not np.allclose(col, 0):
            out_ax = int(np.argmax(np.abs(col)))
            ornt[in_ax, 0] = out_ax
            ornt[in_ax, 1] = -1 if col[out_ax] < 0 else 1
            r[out_ax, :] = 0
    return ornt


def apply_orientation(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """``arr`` (a view) with the flips and the transpose of ``ornt`` applied to its first
    ``len(ornt)`` axes."""
    t_arr = np.asarray(arr)
    ornt = np.asarray(ornt)
    n = ornt.shape[0]
    if t_arr.ndim < n or np.any(np.isnan(ornt[:, 0])):
        raise ValueError("orientation does not fit the array (fewer axes, or dropped axes)")
    for ax, flip in enumerate(ornt[:, 1]):
        if flip == -1:
            t_arr = np.flip(t_arr, axis=ax)
    full = np.arange(t_arr.ndim)
    full[:n] = np.argsort(ornt[:, 0])
    return t_arr.transpose(full)


def inv_ornt_aff(ornt: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The affine mapping voxel indices of the reoriented array (``apply_orientation``
    of an array of ``shape``) back to indices of the original."""
    ornt = np.asarray(ornt)
    if np.any(np.isnan(ornt)):
        raise ValueError("an orientation with dropped axes cannot be inverted")
    p = ornt.shape[0]
    dims = np.array(shape)[:p]
    undo_reorder = np.eye(p + 1)[[int(v) for v in ornt[:, 0]] + [p], :]
    undo_flip = np.diag([*list(ornt[:, 1]), 1.0])
    center = -(dims - 1) / 2.0
    undo_flip[:p, p] = (ornt[:, 1] * center) - center
    return np.dot(undo_flip, undo_reorder)
