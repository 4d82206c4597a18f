"""Header fields: which DICOM elements the scan reads and how their values become a header.

Owns the field table (:data:`FIELDS`: tag, name, kind), :func:`extract` (the plain values
of those fields from a pydicom dataset read up to its pixel data), the parsers of DICOM
value representations (DS/IS numbers, AS ages, backslash-joined multi-values), the
functional groups of enhanced multi-frame objects, and :func:`header_from_values`, which
turns the plain values (from :func:`extract` or from the lean walk in :mod:`.fastscan`)
into a :class:`~medres.ingest.dicom.header.DicomHeader`, rejecting objects that hold no
image. Imports :mod:`.header`, :mod:`.fastscan` and pydicom.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.dicom.fastscan import charset_encoding
from medres.ingest.dicom.header import DicomHeader
from medres.ingest.dicom.mosaic import is_mosaic_type, mosaic_fields
from medres.ingest.dicom.volume_keys import doubles_text, frame_keys, volume_fields

_UNDEFINED = 0xFFFFFFFF
# SOP classes that carry no image although they may have Rows/Columns-like content.
NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",  # RT (plan, struct, dose handled as non-image)
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF/CDA
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, segmentation-ish
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
)


# --------------------------------------------------------------------------- value parsers
def _f(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _i(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _fn(v: Any, n: int) -> tuple[float, ...] | None:
    if v is None:
        return None
    try:
        seq = [v] if isinstance(v, (str, int, float)) else v
        vals = tuple(map(float, seq))
    except (TypeError, ValueError):
        return None
    if len(vals) != n or not all(map(math.isfinite, vals)):
        return None
    return vals


def _age(v: str) -> float | None:
    """DICOM AS ("045Y", "006M", "003W", "010D") -> years."""
    v = v.strip().upper()
    if len(v) < 2:
        return None
    unit = v[-1]
    num = _f(v[:-1]) if unit in "YMWD" else _f(v)
    if num is None:
        return None
    return round(num / {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}.get(unit, 1.0), 3)


def _first_item(seq: Any, keyword: str) -> Any:
    """``seq[0].keyword[0]`` for functional-group macros, or None."""
    try:
        inner = seq[0].get(keyword) if seq else None
        return inner[0] if inner else None
    except (IndexError, AttributeError, TypeError):
        return None


def _split(v: str | None) -> list[str]:
    return [x.strip() for x in v.split("\\")] if v else []


def _num(v: str | None) -> float | None:
    return _f(v.split("\\", 1)[0]) if v else None


# --------------------------------------------------------------------------- enhanced multi-frame
def functional_groups(ds: Any, nframes: int) -> dict[str, Any]:
    """Geometry and rescale of enhanced multi-frame objects (shared + per-frame groups)."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    per = ds.get("PerFrameFunctionalGroupsSequence")
    out: dict[str, Any] = {}

    def pick(item_kw: str, per_frame_item: Any) -> Any:
        v = _first_item([per_frame_item], item_kw) if per_frame_item is not None else None
        return v if v is not None else _first_item(shared, item_kw)

    first = per[0] if per else None
    orient = pick("PlaneOrientationSequence", first)
    if orient is not None:
        out["orientation"] = _fn(orient.get("ImageOrientationPatient"), 6)
    meas = pick("PixelMeasuresSequence", first)
    if meas is not None:
        out["pixel_spacing"] = _fn(meas.get("PixelSpacing"), 2)
        out["slice_thickness"] = _f(meas.get("SliceThickness"))
    positions: list[tuple[float, float, float]] = []
    rescale: list[tuple[float, float]] = []
    orientations: set[tuple[float, ...]] = set()
    if per and len(per) == nframes:
        for item in per:
            pos = pick("PlanePositionSequence", item)
            p = _fn(pos.get("ImagePositionPatient"), 3) if pos is not None else None
            if p is None:
                positions = []
                break
            positions.append(p)  # type: ignore[arg-type]
            o = pick("PlaneOrientationSequence", item)
            if o is not None:
                oo = _fn(o.get("ImageOrientationPatient"), 6)
                if oo is not None:
                    orientations.add(tuple(round(x, 4) for x in oo))
        for item in per:
            pvt = pick("PixelValueTransformationSequence", item)
            if pvt is None:
                rescale = []
                break
            s, b = _f(pvt.get("RescaleSlope")), _f(pvt.get("RescaleIntercept"))
            rescale.append((1.0 if s is None else s, 0.0 if b is None else b))
    out["positions"] = tuple(positions)
    out["rescale"] = tuple(rescale)
    out["mixed_orientation"] = len(orientations) > 1
    out["frame_keys"] = frame_keys(ds, per, shared) if per and len(per) == nframes else ()
    return out


# --------------------------------------------------------------------------- the field table
# (tag, field, kind): "s" ASCII text (UI, CS, DS, IS, AS), "p" text in the dataset's
# character set (LO, SH), "u" one unsigned short (US), "d" binary doubles (FD), joined by "\\",
# "b" (VR or "", raw value) of private elements whose VR varies (mosaic count, CSA header)
FIELDS: tuple[tuple[int, str, str], ...] = (
    (0x00080005, "charset", "s"),
    (0x00080008, "image_type", "s"),
    (0x00080016, "sop_class", "s"),
    (0x00080018, "sop_instance", "s"),
    (0x00080050, "accession", "p"),
    (0x00080060, "modality", "s"),
    (0x00080070, "manufacturer", "p"),
    (0x00100010, "patient_name", "p"),
    (0x00100020, "patient_id", "p"),
    (0x00100030, "birth_date", "s"),
    (0x00100040, "sex", "s"),
    (0x00101000, "other_patient_ids", "p"),
    (0x00101010, "age", "s"),
    (0x00180015, "body_part", "p"),
    (0x00180050, "thickness", "s"),
    (0x00180088, "spacing_between", "s"),
    (0x00181164, "imager_spacing", "s"),
    (0x0019100A, "mosaic_n", "b"),
    (0x0020000D, "study", "s"),
    (0x0020000E, "series", "s"),
    (0x00200012, "acquisition", "s"),
    (0x00200013, "instance", "s"),
    (0x00200032, "position", "s"),
    (0x00200037, "orientation", "s"),
    (0x00200052, "frame_of_reference", "s"),
    (0x00291010, "csa_image", "b"),
    (0x00280002, "spp", "u"),
    (0x00280004, "photometric", "s"),
    (0x00280006, "planar", "u"),
    (0x00280008, "frames", "s"),
    (0x00280010, "rows", "u"),
    (0x00280011, "cols", "u"),
    (0x00280030, "spacing", "s"),
    (0x00280100, "bits_allocated", "u"),
    (0x00280101, "bits_stored", "u"),
    (0x00280103, "pixel_representation", "u"),
    (0x00281052, "intercept", "s"),
    (0x00281053, "slope", "s"),
    # multi-volume keys (parsed by .volume_keys.volume_fields)
    (0x00080032, "acquisition_time", "s"),
    (0x00080033, "content_time", "s"),
    (0x00180080, "repetition_time", "s"),
    (0x00180081, "echo_time", "s"),
    (0x00180086, "echo_numbers", "s"),
    (0x00181060, "trigger_time", "s"),
    (0x00189087, "diffusion_bvalue", "d"),
    (0x00189089, "diffusion_gradient", "d"),
    (0x0019100C, "siemens_bvalue", "s"),
    (0x0019100E, "siemens_gradient", "d"),
    (0x00200100, "temporal_position", "s"),
    (0x00431039, "ge_bvalue", "s"),
)


FIELD_BY_TAG = {f[0]: f for f in FIELDS}


def extract(ds: Any) -> dict[str, Any]:
    """The plain header values the scan needs, decoded straight from pydicom's raw elements.

    pydicom converts an element on first access, which costs more per element than parsing
    it; the scan needs ~30 plain values, so text and US numbers are decoded here in one loop
    (multi-valued text stays backslash-joined). Elements pydicom already converted, and text
    in a character set other than ASCII/Latin-1/UTF-8, go through pydicom's own conversion.
    """
    from pydicom.dataelem import RawDataElement  # here: the lean walk never needs pydicom

    # one pass over the dataset with plain-int keys (looking tags up in pydicom's dict calls
    # its Python-level BaseTag.__eq__ for every hit); tag order puts the charset first
    d = ds._dict
    wanted = [
        (e, FIELD_BY_TAG[t])
        for t, e in zip(map(int, d), d.values(), strict=True)
        if t in FIELD_BY_TAG
    ]
    if any(a[1][0] > b[1][0] for a, b in itertools.pairwise(wanted)):  # unsorted file
        wanted.sort(key=lambda item: item[1][0])
    out: dict[str, Any] = {}
    enc: str | None = "latin-1"
    for e, (tag, name, kind) in wanted:
        if kind == "d":  # FD doubles, raw or already converted
            raw = e.__class__ is RawDataElement
            out[name] = doubles_text(e.value, not raw or e.is_little_endian)
            continue
        if e.__class__ is RawDataElement and (kind != "p" or enc is not None):
            v = e.value
            if kind == "b":
                out[name] = (e.VR or "", bytes(v) if v else b"")
                continue
            if kind == "u":
                if v is not None and len(v) == 2:
                    out[name] = int.from_bytes(v, "little" if e.is_little_endian else "big")
                    continue
            else:
                out[name] = (
                    v.decode(enc if kind == "p" else "latin-1", "replace").strip(" \x00")
                    if v
                    else ""
                )
                if name == "charset":
                    enc = charset_encoding(out[name])
                continue
        try:
            v = ds[tag].value
        except Exception:
            continue
        if kind == "b":
            out[name] = (ds[tag].VR or "", v)
            continue
        if kind == "u":
            out[name] = _i(v[0] if isinstance(v, list | tuple) else v)
        elif v is None:
            out[name] = ""
        elif isinstance(v, str | bytes) or not hasattr(v, "__iter__") or name == "patient_name":
            out[name] = (v.decode("latin-1") if isinstance(v, bytes) else str(v)).strip(" \x00")
        else:
            out[name] = "\\".join(str(x) for x in v)
        if name == "charset":
            enc = charset_encoding(out[name])
    return out


# --------------------------------------------------------------------------- values -> header
def header_from_values(
    x: dict[str, Any],
    path: Path,
    src: str,
    tsyntax: str,
    pix: tuple[str, int, int] | None,
    size: int,
    *,
    media_sop_class: str,
    has_lut_sequence: bool,
    functional_groups: Callable[[int], dict[str, Any]] | None,
    has_per_frame: bool = False,
) -> DicomHeader:
    """Build the header from the plain values :func:`extract` (or the lean walk) produced.

    ``pix`` is (keyword, value offset, length) of the pixel data element, or None when
    there is none. ``functional_groups(nframes)`` reads the enhanced multi-frame groups
    (only called for multi-frame objects or when a per-frame group exists); the lean walk
    passes ``None`` because it declines such files.
    """
    get = x.get
    sop_class = get("sop_class", "") or media_sop_class
    rows = get("rows") or 0
    cols = get("cols") or 0
    nf = _num(get("frames"))
    nframes = int(nf) if nf is not None and nf >= 1 else 1
    _require_image(sop_class, rows, cols, pix, src)
    fg: dict[str, Any] = {}
    if (nframes > 1 or has_per_frame) and functional_groups is not None:
        fg = functional_groups(nframes)
    keyword, offset, length = _pixel_location(pix)
    geometry = _geometry(get, fg, src)
    mosaic = (
        mosaic_fields(get, geometry, rows, cols, src)
        if is_mosaic_type(_split(get("image_type")))
        else {}
    )
    return DicomHeader(
        path=path,
        source=src,
        sop_class_uid=sop_class,
        rows=rows,
        cols=cols,
        number_of_frames=nframes,
        transfer_syntax=tsyntax,
        has_modality_lut_sequence=has_lut_sequence,
        has_pixel_data=pix is not None,
        pixel_keyword=keyword,
        pixel_offset=offset,
        pixel_length=length,
        file_size=size,
        **_identity(get),
        **geometry,
        **mosaic,
        **_pixel_format(get),
        **volume_fields(get),
    )


def _require_image(
    sop_class: str, rows: int, cols: int, pix: tuple[str, int, int] | None, src: str
) -> None:
    """Reject objects that hold no image (``not_image``) or no pixels (``no_pixel_data``)."""
    if any(sop_class.startswith(p) for p in NON_IMAGE_PREFIXES) or (
        rows == 0 and cols == 0 and pix is None and not is_image_class(sop_class)
    ):
        raise IngestError(
            f"{src}: DICOM object holds no image (SOP class {sop_class or 'unknown'}); skipped",
            code=Code.NOT_IMAGE,
        )
    if rows == 0 and cols == 0 and pix is None:
        raise IngestError(
            f"{src}: image object without Rows/Columns/PixelData (empty, or the file was cut "
            "short); re-export or re-copy the file",
            code=Code.NO_PIXEL_DATA,
        )


def _pixel_location(pix: tuple[str, int, int] | None) -> tuple[str, int, int]:
    """(keyword, offset, length) of the pixel data value; -1 when unknown or encapsulated."""
    if pix is None:
        return "PixelData", -1, -1
    keyword, offset, length = pix
    return keyword, offset, -1 if length == _UNDEFINED else length


def _identity(get: Callable[..., Any]) -> dict[str, Any]:
    """Study, series, instance and patient fields of :class:`DicomHeader`."""
    acq = _num(get("acquisition"))
    inst = _num(get("instance"))
    return {
        "sop_instance_uid": get("sop_instance", ""),
        "study_uid": get("study", ""),
        "series_uid": get("series", ""),
        "patient_id": get("patient_id", ""),
        "accession": get("accession", ""),
        "patient_name": get("patient_name", ""),
        "birth_date": get("birth_date", ""),
        "other_patient_ids": tuple(v for v in _split(get("other_patient_ids")) if v),
        "modality": get("modality", "").upper(),
        "manufacturer": get("manufacturer", ""),
        "body_part": get("body_part", "").upper(),
        "sex": get("sex", "").upper()[:1],
        "age": _age(get("age", "")),
        "image_type": tuple(_split(get("image_type"))),
        "acquisition_number": None if acq is None else int(acq),
        "instance_number": None if inst is None else int(inst),
    }


def _geometry(get: Callable[..., Any], fg: dict[str, Any], src: str) -> dict[str, Any]:
    """Patient geometry fields (classic elements first, else the functional groups)."""
    if fg.get("mixed_orientation"):
        raise IngestError(
            f"{src}: frames of this multi-frame object disagree on ImageOrientationPatient; "
            "re-export it as a single-orientation series",
            code=Code.MIXED_ORIENTATION,
        )
    position = _fn(_split(get("position")), 3)
    positions = fg.get("positions", ())
    if positions and position is None:
        position = positions[0]
    return {
        "image_orientation": _fn(_split(get("orientation")), 6) or fg.get("orientation"),
        "pixel_spacing": _fn(_split(get("spacing")), 2) or fg.get("pixel_spacing"),
        "imager_pixel_spacing": _fn(_split(get("imager_spacing")), 2),
        "image_position": position,
        "slice_thickness": _num(get("thickness")) or fg.get("slice_thickness"),
        "frame_of_reference_uid": get("frame_of_reference", ""),
        "frame_positions": positions,
        "frame_rescale": fg.get("rescale", ()),
        "frame_keys": fg.get("frame_keys", ()),
    }


def _pixel_format(get: Callable[..., Any]) -> dict[str, Any]:
    """Image pixel module fields and the classic rescale of :class:`DicomHeader`."""
    slope = _num(get("slope"))
    inter = _num(get("intercept"))
    bits_allocated = get("bits_allocated") or 0
    return {
        "samples_per_pixel": get("spp") or 1,
        "photometric": get("photometric", "").upper(),
        "planar_configuration": get("planar") or 0,
        "bits_allocated": bits_allocated,
        "bits_stored": get("bits_stored") or bits_allocated,
        "pixel_representation": get("pixel_representation") or 0,
        "rescale_slope": 1.0 if slope is None or slope == 0 else slope,
        "rescale_intercept": 0.0 if inter is None else inter,
    }


def is_image_class(sop_class: str) -> bool:
    """True for SOP classes whose registered name says they store an image."""
    from pydicom.uid import UID

    return "Image" in UID(sop_class).name if sop_class else False
