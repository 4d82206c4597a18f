"""Siemens mosaic images: one DICOM frame holding a whole volume as a grid of tiles.

Siemens EPI (fMRI, DWI) stores each volume in one file whose ImageType contains
``MOSAIC``: ``N`` slices of ``Rows/g x Columns/g`` pixels laid out left to right, top to
bottom in a ``g x g`` grid with ``g = ceil(sqrt(N))`` (unused tiles at the end are blank).
This module owns the rules that turn such a file into an ordinary stack of slices:

- **Detection** (:func:`mosaic_fields`, at header-scan time): ``N`` is read from
  NumberOfImagesInMosaic (0019,100A) - a binary US in the files as written, text (IS) after
  some anonymisers, either way in implicit-VR files - else from the CSA image header's
  ``NumberOfImagesInMosaic`` (:mod:`.csa`). A mosaic that cannot be cut or placed is
  rejected with ``invalid_mosaic``: no count, the two counts disagreeing, a count whose grid
  does not divide Rows x Columns, no ImageOrientationPatient/ImagePositionPatient/
  PixelSpacing, no slice spacing, colour or multi-frame pixels, or a CSA SliceNormalVector
  that is not perpendicular to the image plane.
- **Slice direction**: ``cross(row, col)`` with the sign of the CSA SliceNormalVector (tiles
  are stored in the order of that vector, which points against ``cross(row, col)`` in some
  orientations); without a usable CSA normal, ``cross(row, col)``. Spacing:
  SpacingBetweenSlices, else SliceThickness (as dcm2niix).
- **Position** (:func:`expand_mosaics`, at grouping time): the ImagePositionPatient of a
  mosaic is that of the whole grid's first pixel as if the grid were one image centred like
  a tile (the "mosaic position bug"); the first tile's origin is
  ``ipp + row_cos * col_spacing * (Columns - tile_cols) / 2
  + col_cos * row_spacing * (Rows - tile_rows) / 2`` (nibabel's
  ``MosaicWrapper.image_position``, dcm2niix's ``nifti_dicom2mat`` offset), and tile ``k``
  lies ``k * spacing`` further along the slice direction. Each tile becomes a header of its
  own (``mosaic_tile = k``, the tile's Rows/Columns, its position) that keeps every per-file
  key (AcquisitionNumber, InstanceNumber, times, ...), so grouping, the multi-volume split
  and :mod:`.geometry` treat the tiles as any other slices.
- **Pixels** (:func:`tile_region`, used by :mod:`.decode`): each file's frame is read once
  and cut into its tiles.

Imports :mod:`.header`, :mod:`.csa` and the standard library (no numpy: it runs in the
header scan).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.dicom.csa import csa_float, csa_vector, parse_csa
from medres.ingest.dicom.header import DicomHeader

__all__ = [
    "MAX_MOSAIC_IMAGES",
    "expand_mosaics",
    "frame_header",
    "is_mosaic_type",
    "mosaic_fields",
    "mosaic_grid",
    "tile_region",
]

MAX_MOSAIC_IMAGES = 4096
_CSA_TAGS = ("NumberOfImagesInMosaic", "SliceNormalVector")
_BINARY_VRS = frozenset({"US", "SS", "UL", "SL"})
_NORMAL_MIN_COS = 0.999  # |cos| between the CSA normal and cross(row, col), about 2.6 deg


def is_mosaic_type(image_type: Iterable[str]) -> bool:
    """True when ImageType holds the value ``MOSAIC``."""
    return any(v.upper() == "MOSAIC" for v in image_type)


def mosaic_grid(n_images: int) -> int:
    """Tiles along each side of the grid that holds ``n_images`` tiles."""
    return math.isqrt(n_images - 1) + 1 if n_images > 0 else 0


# --------------------------------------------------------------------------- header scan
def mosaic_count(value: Any) -> int | None:
    """NumberOfImagesInMosaic from the scan's ``(VR, value)`` of (0019,100A): binary for
    US/SS/UL/SL, text for the string VRs; in implicit-VR (VR ``""``) or ``UN`` files, binary
    when that gives a plausible count, else text. ``None`` when absent or unreadable."""
    if not isinstance(value, tuple) or len(value) != 2:
        return None
    vr, raw = value
    if isinstance(raw, list | tuple):
        raw = raw[0] if raw else None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        return _int_text(raw.encode("latin-1", "replace"))
    if not isinstance(raw, bytes | bytearray) or not raw:
        return None
    if vr in _BINARY_VRS:
        width = 2 if vr in ("US", "SS") else 4
        if len(raw) < width:
            return None
        return int.from_bytes(raw[:width], "little", signed=vr in ("SS", "SL"))
    binary = int.from_bytes(raw, "little") if len(raw) in (2, 4) else None
    if vr in ("", "UN", None) and binary is not None and 0 < binary <= MAX_MOSAIC_IMAGES:
        return binary
    return _int_text(bytes(raw))


def _int_text(raw: bytes) -> int | None:
    text = raw.split(b"\\", 1)[0].strip(b" \x00")
    if not text or len(text) > 12 or not text.lstrip(b"+-").isdigit():
        return None
    return int(text)


def mosaic_fields(
    get: Callable[..., Any], geometry: dict[str, Any], rows: int, cols: int, src: str
) -> dict[str, Any]:
    """The mosaic fields of :class:`DicomHeader` for a file whose ImageType says MOSAIC
    (see the module docstring); raises ``IngestError(invalid_mosaic)`` when the file
    cannot be cut into a correct volume. ``get`` reads the scan's plain values;
    ``geometry`` holds the header's orientation, position and spacing fields."""

    def bad(why: str) -> IngestError:
        return IngestError(
            f"{src}: Siemens mosaic {why}; re-export the series from the scanner "
            "(or as single-slice images)",
            code=Code.INVALID_MOSAIC,
        )

    raw_csa = get("csa_image")
    csa_bytes = raw_csa[1] if isinstance(raw_csa, tuple) and len(raw_csa) == 2 else None
    csa = parse_csa(csa_bytes, _CSA_TAGS) if isinstance(csa_bytes, bytes | bytearray) else None
    n_tag = mosaic_count(get("mosaic_n"))
    n_csa = csa_float(csa, "NumberOfImagesInMosaic")
    if n_tag is not None and n_csa is not None and n_tag != n_csa:
        raise bad(f"NumberOfImagesInMosaic {n_tag} disagrees with the CSA header's {n_csa:g}")
    n = n_tag if n_tag is not None else (round(n_csa) if n_csa is not None else None)
    if n is None:
        raise bad("without NumberOfImagesInMosaic (0019,100A) or a readable CSA header")
    g = mosaic_grid(n) if 1 <= n <= MAX_MOSAIC_IMAGES else 0
    if not g or rows % g or cols % g:
        raise bad(f"NumberOfImagesInMosaic {n} does not fit a {rows}x{cols} grid of tiles")
    if (get("spp") or 1) != 1 or (_first_number(get("frames")) or 1) != 1:
        raise bad("with colour or multi-frame pixel data")
    orient, ipp, spacing = (
        geometry.get("image_orientation"),
        geometry.get("image_position"),
        geometry.get("pixel_spacing"),
    )
    if orient is None or ipp is None or spacing is None:
        raise bad("without ImageOrientationPatient, ImagePositionPatient or PixelSpacing")
    normal = _normal(orient, csa_vector(csa, "SliceNormalVector", 3))
    if normal is None:
        raise bad("whose CSA SliceNormalVector is not perpendicular to the image plane")
    step = next(
        (s for s in (_first_number(get("spacing_between")), geometry.get("slice_thickness"))
         if s is not None and s > 0),
        None,
    )  # fmt: skip
    if step is None and n > 1:
        raise bad("without SpacingBetweenSlices or SliceThickness")
    return {"mosaic_images": n, "mosaic_normal": normal, "mosaic_spacing": step}


def _first_number(v: Any) -> float | None:
    try:
        f = float(str(v).split("\\", 1)[0]) if v not in (None, "") else None
    except ValueError:
        return None
    return f if f is not None and math.isfinite(f) else None


def _normal(
    orient: tuple[float, ...], csa_normal: tuple[float, ...] | None
) -> tuple[float, float, float] | None:
    """The unit ``cross(row, col)``, its sign taken from ``csa_normal`` when present;
    ``None`` when the cosines are degenerate or the CSA normal is not along it."""
    r, c = orient[:3], orient[3:6]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if norm < 1e-6:
        return None
    unit = (n[0] / norm, n[1] / norm, n[2] / norm)
    if csa_normal is None:
        return unit
    cnorm = math.sqrt(sum(v * v for v in csa_normal))
    if cnorm < 1e-6:
        return unit  # an all-zero vector carries no sign: as if absent
    cos = sum(a * b for a, b in zip(unit, csa_normal, strict=True)) / cnorm
    if abs(cos) < _NORMAL_MIN_COS:
        return None
    return unit if cos > 0 else (-unit[0], -unit[1], -unit[2])


# --------------------------------------------------------------------------- grouping
def expand_mosaics(headers: Iterable[DicomHeader]) -> list[DicomHeader]:
    """``headers`` with every mosaic replaced by one header per tile (see the module
    docstring); other headers unchanged, order kept."""
    out: list[DicomHeader] = []
    for h in headers:
        out.extend(_tiles(h) if h.mosaic_images > 0 and h.mosaic_tile < 0 else (h,))
    return out


def _tiles(h: DicomHeader) -> list[DicomHeader]:
    """The tile headers of mosaic ``h`` (checked by :func:`mosaic_fields`)."""
    g = mosaic_grid(h.mosaic_images)
    tr, tc = h.rows // g, h.cols // g
    assert h.image_orientation and h.image_position and h.pixel_spacing and h.mosaic_normal
    r, c = h.image_orientation[:3], h.image_orientation[3:6]
    dr, dc = h.pixel_spacing
    shift_c, shift_r = dc * (h.cols - tc) / 2.0, dr * (h.rows - tr) / 2.0
    p0 = [h.image_position[i] + r[i] * shift_c + c[i] * shift_r for i in range(3)]
    step = [v * (h.mosaic_spacing or 0.0) for v in h.mosaic_normal]
    return [
        dataclasses.replace(
            h,
            rows=tr,
            cols=tc,
            image_position=(p0[0] + k * step[0], p0[1] + k * step[1], p0[2] + k * step[2]),
            mosaic_tile=k,
        )
        for k in range(h.mosaic_images)
    ]


# --------------------------------------------------------------------------- pixels
def frame_header(h: DicomHeader) -> DicomHeader:
    """The header of the whole stored frame of tile header ``h`` (``h`` itself when it is
    not a tile): Rows/Columns of the grid, as the decoders need them."""
    if h.mosaic_tile < 0:
        return h
    g = mosaic_grid(h.mosaic_images)
    return dataclasses.replace(h, rows=h.rows * g, cols=h.cols * g, mosaic_tile=-1)


def tile_region(h: DicomHeader) -> tuple[slice, slice]:
    """(rows, columns) of tile header ``h`` within its file's frame (the whole frame when
    ``h`` is not a tile)."""
    if h.mosaic_tile < 0:
        return slice(0, h.rows), slice(0, h.cols)
    g = mosaic_grid(h.mosaic_images)
    r0, c0 = (h.mosaic_tile // g) * h.rows, (h.mosaic_tile % g) * h.cols
    return slice(r0, r0 + h.rows), slice(c0, c0 + h.cols)
