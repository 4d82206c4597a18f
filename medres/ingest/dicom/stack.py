"""Stacks -> canonical images: decode one stack, orient it, and the one-call conversion.

Owns :func:`load_stack` (a validated :class:`~medres.ingest.dicom.header.Stack` ->
:class:`~medres.ingest.image.LoadedImage` in medres' canonical orientation: LPS -> RAS,
then the closest RAS+ orientation by permuting and flipping axes only; duplicate slices
compared; values mapped once, F-contiguous) and :func:`convert_series` (header scan ->
group -> load -> write NIfTI for the files of one series). Imports :mod:`.header`,
:mod:`.scan`, :mod:`.series`, :mod:`.decode`, :mod:`medres.ingest.image`,
:mod:`medres.ingest.nifti`, :mod:`medres.ingest.orientation` and numpy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.dicom.decode import (
    apply_values,
    decode_all,
    fast_ok,
    mask_unused_bits,
    read_mosaic_tiles,
    read_native,
    run_guarded,
    stored_dtype,
)
from medres.ingest.dicom.header import DEFAULT_POLICY, GeometryPolicy, Slice, Stack, describe
from medres.ingest.dicom.resample import resample_slices
from medres.ingest.dicom.scan import scan_headers
from medres.ingest.dicom.series import group_stacks
from medres.ingest.dicom.volumes import VolumeAxis, not_separated_reason
from medres.ingest.image import LoadedImage, to_output_dtype
from medres.ingest.nifti import write_image

log = logging.getLogger(__name__)


def load_stack(stack: Stack, workers: int = 1) -> LoadedImage:
    """Decode a stack into a canonical :class:`LoadedImage` (see the package docstring).

    Uncompressed slices are read with ``readinto`` into one preallocated array (in
    ``workers`` threads when > 1; file reads and numpy release the GIL); compressed ones are
    decoded by pydicom. Raises ``IngestError`` (``decode_failed``, ``truncated``,
    ``duplicate_slices``, ``unsupported_transfer_syntax``, ...); never anything else.
    """
    src = describe(stack.headers)
    return run_guarded(lambda: _load_stack(stack, workers), src)


def _load_stack(stack: Stack, workers: int) -> LoadedImage:
    all_slices = list(stack.slices) + list(stack.dup_slices)
    fast = (
        all(fast_ok(h) for h in stack.headers)
        and len({stored_dtype(h) for h in stack.headers}) == 1
    )
    ds0 = None
    if any(h.mosaic_tile >= 0 for h in stack.headers):  # each mosaic file read once (.mosaic)
        raw, ds0 = read_mosaic_tiles(stack, all_slices)
    elif fast:
        raw = _read_all_native(stack, all_slices, workers)
    else:
        raw, ds0 = _decode_stack(stack, all_slices, workers)
    stored_range = None
    if raw.ndim == 3:  # stored values (colour ones were masked before any palette lookup)
        stored_range = mask_unused_bits(
            raw, [stack.headers[s.header_index].bits_stored for s in all_slices]
        )
    raw = _without_duplicates(stack, raw)
    if stack.n_volumes > 1:
        return _load_volumes(stack, raw, ds0, stored_range)
    values, affine, dims = _stack_values(stack, raw, ds0, stored_range)
    return _image(stack, values, affine, dims, list(stack.warnings))


def _stack_values(
    stack: Stack, raw: np.ndarray, ds0: object, stored_range: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """(canonical values, affine, spatial dims) of one volume's stored values ``raw``."""
    h0 = stack.first
    grid_n = round(stack.grid_positions[-1]) + 1 if stack.grid_positions else 0  # .resample
    orient, affine, dims = _canonical(stack, (grid_n, *raw.shape[1:]) if grid_n else raw.shape)
    value_view = (lambda a: a) if grid_n else orient  # uneven: values slice-first, then grid
    if raw.ndim == 4:  # colour: no modality LUT
        values = np.asfortranarray(to_output_dtype(value_view(raw)))
    else:
        values = apply_values(
            raw,
            stack.slices,
            h0,
            value_view,
            ds0 if h0.has_modality_lut_sequence else None,
            stored_range,
        )
    if grid_n:
        values = np.asfortranarray(orient(resample_slices(values, stack.grid_positions, grid_n)))
    if dims == 2:
        values = values[:, :, 0]
    return values, affine, dims


def _load_volumes(
    stack: Stack, raw: np.ndarray, ds0: object, stored_range: tuple[float, float] | None
) -> LoadedImage:
    """A 4D (X, Y, Z, T) image from the volume-major stored values of a multi-volume
    stack: each volume mapped and oriented as a 3D stack (spatial axes only); int16 when
    every volume is, else float32."""
    if raw.ndim != 3:
        raise IngestError(
            f"{describe(stack.headers)}: colour multi-volume series are not supported; "
            "export the volumes as separate series",
            code=Code.INCONSISTENT_GEOMETRY,
        )
    nv, nz = stack.n_volumes, stack.n_slices
    vols: list[np.ndarray] = []
    affine = np.eye(4)
    for v in range(nv):
        block = stack.slices[v * nz : (v + 1) * nz]
        one = replace(stack, slices=block, n_volumes=1, volume_axis=None)
        values, affine, _dims = _stack_values(one, raw[v * nz : (v + 1) * nz], ds0, stored_range)
        vols.append(values)
    dtype = np.int16 if all(a.dtype == np.int16 for a in vols) else np.float32
    out = np.empty((*vols[0].shape, nv), dtype=dtype, order="F")
    for v, a in enumerate(vols):
        out[..., v] = a
    img = _image(stack, out, affine, 3, list(stack.warnings))
    img.n_volumes = nv
    axis = stack.volume_axis
    if isinstance(axis, VolumeAxis):
        img.meta["volume_axis"] = axis.sidecar(affine)
    return img


def _read_all_native(stack: Stack, all_slices: list[Slice], workers: int) -> np.ndarray:
    """(slices, rows, cols) stored values of uncompressed files, read straight into one
    preallocated array (threads when ``workers > 1`` and there are more than 8 slices)."""
    h0 = stack.first
    dtype = stored_dtype(h0)
    raw = np.empty((len(all_slices), h0.rows, h0.cols), dtype=dtype)
    if h0.number_of_frames > 1:  # one multi-frame file: read all frames once, then pick
        frames = np.empty((h0.number_of_frames, h0.rows, h0.cols), dtype=dtype)
        read_native(h0, frames)
        for k, s in enumerate(all_slices):
            raw[k] = frames[s.frame]
        return raw

    def read(k: int) -> None:
        read_native(stack.headers[all_slices[k].header_index], raw[k])

    if workers > 1 and len(all_slices) > 8:
        from concurrent.futures import ThreadPoolExecutor  # only here (~6 ms of start-up)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(read, range(len(all_slices))))
    else:
        for k in range(len(all_slices)):
            read(k)
    return raw


def _decode_stack(stack: Stack, all_slices: list[Slice], workers: int) -> tuple[np.ndarray, object]:
    """(slices, rows, cols[, C]) decoded values and the first dataset (or None)."""
    decoded = decode_all(stack, all_slices, workers)
    ds0 = decoded.pop(-1, None)
    shapes = {a.shape[1:] for a in decoded.values()}
    if len(shapes) != 1:
        raise IngestError(
            f"{describe(stack.headers)}: decoded slices differ in shape {sorted(shapes)}; re-export the series",
            code=Code.INCONSISTENT_GEOMETRY,
        )
    return np.stack([decoded[s.header_index][s.frame] for s in all_slices]), ds0


def _without_duplicates(stack: Stack, raw: np.ndarray) -> np.ndarray:
    """The kept slices of ``raw`` once every duplicate slice is checked equal to its kept
    one (``duplicate_slices`` otherwise)."""
    if not stack.duplicates:
        return raw
    n = len(stack.slices)
    for kept, di in stack.duplicates:
        if not np.array_equal(raw[kept], raw[n + di]):
            tried = not_separated_reason(stack, DEFAULT_POLICY)
            raise IngestError(
                f"{describe(stack.headers)}: two slices at the same position hold different pixels "
                "and no key tells the volumes apart"
                + (f" (tried: {tried})" if tried else "")
                + "; split the series into one folder per volume before ingest",
                code=Code.DUPLICATE_SLICES,
            )
    return raw[:n]


def _canonical(
    stack: Stack, raw_shape: tuple[int, ...]
) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray, int]:
    """The view mapping (slices, rows, cols[, C]) to canonical (X, Y, Z[, C]), the affine of
    that layout and the number of spatial dims (2 for a single 2D frame)."""
    n, rows, cols = raw_shape[:3]
    assert stack.affine_lps is not None
    aff = np.array(stack.affine_lps, dtype=float)

    def to_ijk(a: np.ndarray) -> np.ndarray:
        return a.transpose((2, 1, 0, 3) if a.ndim == 4 else (2, 1, 0))

    if stack.kind != "volume":
        return to_ijk, aff, (2 if n == 1 else 3)
    from medres.ingest.orientation import apply_orientation, inv_ornt_aff, io_orientation

    aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff  # LPS -> RAS
    ornt = io_orientation(aff)
    aff = aff @ inv_ornt_aff(ornt, (cols, rows, n))

    def orient(a: np.ndarray) -> np.ndarray:
        return apply_orientation(to_ijk(a), ornt)

    return orient, aff, 3


def _image(
    stack: Stack, values: np.ndarray, affine: np.ndarray, dims: int, warnings: list[str]
) -> LoadedImage:
    h = stack.first
    color = values.ndim == dims + 1 and stack.n_volumes == 1
    return LoadedImage(
        array=values,
        affine=affine,
        dims=dims,
        channels=int(values.shape[-1]) if color else 1,
        modality=h.modality,
        manufacturer=h.manufacturer,
        body_part=h.body_part,
        sex=h.sex,
        age=h.age,
        patient_id=h.patient_id,
        study_uid=h.study_uid,
        series_uid=h.series_uid,
        accession=h.accession,
        sources=stack.sources,
        n_slices=stack.n_slices,
        warnings=warnings,
        meta={
            "transfer_syntax": h.transfer_syntax,
            "photometric": h.photometric,
            "sop_class_uid": h.sop_class_uid,
            "slice_thickness": h.slice_thickness,
        },
    )


# --------------------------------------------------------------------------- one call
def convert_series(
    paths: Sequence[Path],
    out_path: Path,
    workers: int = 1,
    policy: GeometryPolicy = DEFAULT_POLICY,
) -> LoadedImage:
    """Header scan -> group -> load -> write: the files of one series to one NIfTI file.

    The main stack of the first series found is written to ``out_path`` (``.nii`` or
    ``.nii.gz``). Raises ``IngestError`` with the code of the first rejection when no stack
    can be made. ``workers`` > 1 scans headers in processes and reads slices in threads.
    """
    headers, rejected = scan_headers([Path(p) for p in paths], workers=workers)
    stacks, rej2 = group_stacks(headers, policy)
    rejected += rej2
    if not stacks:
        if rejected:
            r = rejected[0]
            raise IngestError(r.message, code=r.code)
        raise IngestError("no DICOM files given; pass the files of one series", code=Code.NOT_DICOM)
    for r in rejected:
        log.warning("%s [%s]", r.message, r.code)
    img = load_stack(stacks[0], workers=workers)
    write_image(img, Path(out_path))
    return img
