"""DICOM files -> validated series geometry -> canonical images.

Three stages, each usable on its own:

1. :func:`scan_header` reads one file up to (not into) its pixel data and returns a
   picklable :class:`DicomHeader`. Well-formed files are walked by the lean parser in
   :mod:`medres.ingest.dicom.fastscan` (about 3x faster than
   ``dcmread(stop_before_pixels=True)``, tested equal to it); everything else goes
   through pydicom. It also reads the 8/12-byte header of the PixelData element, so it
   knows whether pixel data exists, where it starts and how long it is, without decoding
   it. A file whose PixelData is gone (e.g. a compressed file cut short)
   or shorter than ``rows*cols*frames*samples*bits/8`` is rejected here, with a code.
2. :func:`group_stacks` groups headers by study + series and splits a series into stacks
   (orientation cluster, localizer image type, repeated acquisitions). The largest stack is
   kept; the others are reported as ``extra_stack``. It validates the geometry of every
   stack it keeps with a :class:`GeometryPolicy` (tolerances documented there).
3. :func:`load_stack` decodes the pixels into one preallocated volume and returns a
   :class:`~medres.ingest.image.LoadedImage` in medres' canonical orientation.

Choices made (see docs/architecture.md, "Canonical image on disk"):

- Slices are sorted by their position along the slice normal ``cross(row, col)``, never by
  InstanceNumber. Radiography, ultrasound, secondary capture and other projection
  modalities are always images of their own (never stacked), a one-slice stack of a
  volumetric modality is a 2D image, and 2..``min_slices``-1 slices are ``too_few_slices``.
- 3D: voxel (i, j, k) = (column, row, slice). The DICOM affine in LPS is
  ``[row_cos * col_spacing, col_cos * row_spacing, step, first_position]`` where ``step``
  is the mean vector between consecutive slice positions. With gantry tilt ``step`` is not
  parallel to the slice normal: we *keep that sheared affine* (NIfTI sform represents it
  exactly; qform cannot, so it is left unset) and never resample; a ``gantry_tilt`` warning
  is attached. LPS is converted to RAS (negate x and y), then the array is reoriented to the
  closest canonical RAS+ orientation by permuting and flipping axes only
  (``nibabel.orientations``), so every voxel keeps its exact world coordinate.
- 2D (one frame, or frames without a patient geometry such as ultrasound cine): array
  (X=columns, Y=rows[, frames]) and a diagonal affine holding the pixel spacing
  (PixelSpacing, else ImagerPixelSpacing, else 1.0 with a warning). Multi-frame 2D objects
  become a (X, Y, frames) volume with 1.0 spacing along frames and a ``frames_as_slices``
  warning.
- Values: the modality LUT is applied per slice (RescaleSlope/Intercept, per-frame
  functional groups for enhanced objects, or a Modality LUT Sequence), so CT is in HU.
  MONOCHROME1 is inverted after the LUT as ``lut(min) + lut(max) - value`` over the
  stored-bits range, so higher is brighter and the range is unchanged. Colour (RGB, YBR,
  palette) becomes RGB with a trailing channel axis of 3; no modality LUT applies to it.
  Stored dtype is int16 when every value is integral and fits, else float32.
- Decoding: uncompressed little-endian pixel data is read straight from the file into the
  preallocated volume at the offset found by the header scan (no second parse), then one
  pass applies the rescale and the canonical flips/permutation together, writing an
  F-contiguous array that the ``.nii`` writer dumps without another copy. Compressed
  (encapsulated) pixel data is read from the same offset and handed to pydicom's decoder
  plugins (pylibjpeg, openjpeg, libjpeg, RLE, gdcm) with the image description from the
  header scan, again without re-parsing; only palette colour, Modality LUT Sequences,
  deflated or big-endian files, and any file the shortcut cannot decode go through a full
  ``dcmread`` + ``pixel_array`` (which also classifies the error). With ``workers > 1``,
  compressed stacks whose estimated decode time pays for a process pool are decoded in
  worker processes; uncompressed reads use threads. (``medres ingest`` runs every decode in
  its isolated worker pool, so a crashing C decoder kills a worker, not the run.)
  Any decoder failure, including panics that are not ``Exception`` subclasses (pydicom's
  Rust RLE decoder raises ``PanicException``), becomes ``IngestError(code=decode_failed)``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import struct
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.pixels import get_decoder

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.dicom.fastscan import charset_encoding, fast_scan
from medres.ingest.image import LoadedImage

log = logging.getLogger(__name__)

__all__ = [
    "DicomHeader",
    "GeometryPolicy",
    "Rejection",
    "Stack",
    "convert_series",
    "group_stacks",
    "is_dicom",
    "load_stack",
    "scan_header",
    "scan_headers",
]

# Uncompressed transfer syntaxes whose pixel bytes can be read straight from the file.
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_NATIVE_LE = {_IMPLICIT_LE, _EXPLICIT_LE}
_PIXEL_TAGS = {
    0x7FE00010: "PixelData",
    0x7FE00008: "FloatPixelData",
    0x7FE00009: "DoubleFloatPixelData",
}
_UNDEFINED = 0xFFFFFFFF
# SOP classes that carry no image although they may have Rows/Columns-like content.
_NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",  # RT (plan, struct, dose handled as non-image)
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF/CDA
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, segmentation-ish
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
)
# modalities whose images are 2D by nature (never stacked into volumes)
_PROJECTION_MODALITIES = frozenset(
    {"CR", "DX", "MG", "IO", "PX", "XA", "RF", "US", "ES", "XC", "OP", "SM", "GM", "DG"}
)
_SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture (incl. multi-frame SC)
# first two bytes of a preamble-less dataset: group 0002 or 0008, little or big endian
_FIRST_GROUPS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
_NO_CATCH = (KeyboardInterrupt, SystemExit, GeneratorExit)


# --------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class GeometryPolicy:
    """Tolerances for series geometry. All distances in mm.

    - ``spacing_rtol`` / ``spacing_atol``: a gap between consecutive slices is "regular" when
      it is within ``max(spacing_atol, spacing_rtol * median_gap)`` of the median gap.
      Irregular gaps that are an integer multiple (2..``max_missing_factor``) of the median
      within that tolerance mean ``missing_slices``; other irregular gaps mean
      ``inconsistent_geometry``.
    - ``duplicate_tol``: slices closer than this along the normal share a position; equal
      pixels are merged (warning), different pixels give ``duplicate_slices``.
    - ``orientation_tol``: largest difference of any ImageOrientationPatient cosine within
      one stack (else ``mixed_orientation``); ``orientation_split_deg``: orientations further
      apart than this are different stacks (localizers, secondary reformats).
    - ``collinear_tol``: largest distance of a slice origin from the line through the stack
      (else ``inconsistent_geometry``).
    - ``tilt_warn_deg``: the angle between the slice step and the normal above which a
      ``gantry_tilt`` warning is added (the sheared affine is kept either way).
    - ``pixel_spacing_tol``: PixelSpacing values within one stack may differ this much.
    - ``min_slices``: a volumetric stack with 2..min_slices-1 slices is ``too_few_slices``
      (one slice is a 2D image).
    """

    spacing_rtol: float = 0.1
    spacing_atol: float = 0.01
    max_missing_factor: int = 4
    duplicate_tol: float = 1e-3
    orientation_tol: float = 1e-3
    orientation_split_deg: float = 5.0
    collinear_tol: float = 0.1
    tilt_warn_deg: float = 0.1
    pixel_spacing_tol: float = 1e-3
    min_slices: int = 3


DEFAULT_POLICY = GeometryPolicy()


@dataclass(frozen=True)
class DicomHeader:
    """Everything about one DICOM file needed to group, sort, validate and decode it.

    Picklable (plain values only). ``path`` is where the bytes are; ``source`` is the display
    string (e.g. ``archive.zip!a/b.dcm``) used in messages. ``pixel_offset`` /
    ``pixel_length`` locate the PixelData value in the file (-1 when unknown, length -1 when
    encapsulated). ``frame_positions`` / ``frame_rescale`` come from the functional groups of
    enhanced multi-frame objects (empty otherwise).
    """

    path: Path
    source: str
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    patient_id: str = ""
    accession: str = ""
    # identity used only to redact source paths (medres.phi.PathRedactor); never written
    patient_name: str = ""
    birth_date: str = ""
    other_patient_ids: tuple[str, ...] = ()
    modality: str = ""
    manufacturer: str = ""
    body_part: str = ""
    sex: str = ""
    age: float | None = None
    image_type: tuple[str, ...] = ()
    rows: int = 0
    cols: int = 0
    pixel_spacing: tuple[float, float] | None = None
    imager_pixel_spacing: tuple[float, float] | None = None
    image_position: tuple[float, float, float] | None = None
    image_orientation: tuple[float, float, float, float, float, float] | None = None
    slice_thickness: float | None = None
    number_of_frames: int = 1
    samples_per_pixel: int = 1
    photometric: str = ""
    planar_configuration: int = 0
    bits_allocated: int = 0
    bits_stored: int = 0
    pixel_representation: int = 0
    transfer_syntax: str = ""
    acquisition_number: int | None = None
    instance_number: int | None = None
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    has_modality_lut_sequence: bool = False
    frame_of_reference_uid: str = ""
    has_pixel_data: bool = False
    pixel_keyword: str = "PixelData"
    pixel_offset: int = -1
    pixel_length: int = -1
    file_size: int = 0
    frame_positions: tuple[tuple[float, float, float], ...] = ()
    frame_rescale: tuple[tuple[float, float], ...] = ()

    @property
    def is_localizer(self) -> bool:
        return any(v.upper() == "LOCALIZER" for v in self.image_type)

    @property
    def is_color(self) -> bool:
        return self.samples_per_pixel > 1 or self.photometric.startswith(("PALETTE", "YBR", "RGB"))

    @property
    def has_geometry(self) -> bool:
        """True when patient position/orientation exist (classic or per-frame)."""
        return self.image_orientation is not None and (
            self.image_position is not None or bool(self.frame_positions)
        )

    @property
    def is_slice(self) -> bool:
        """One frame of a volume: single-frame, with position and orientation, and not a
        projection/2D modality (radiography, ultrasound, secondary capture...), which are
        always images of their own even when they carry patient geometry."""
        return (
            self.has_geometry
            and self.number_of_frames == 1
            and self.modality not in _PROJECTION_MODALITIES
            and not self.sop_class_uid.startswith(_SC_PREFIX)
        )

    @property
    def is_native(self) -> bool:
        return self.transfer_syntax in _NATIVE_LE

    def expected_pixel_bytes(self) -> int:
        """Bytes of native pixel data the header implies (YBR_FULL_422 is subsampled: 2
        samples per pixel)."""
        spp = (
            2
            if self.photometric == "YBR_FULL_422" and self.samples_per_pixel == 3
            else self.samples_per_pixel
        )
        bits = self.rows * self.cols * self.number_of_frames * spp * self.bits_allocated
        return (bits + 7) // 8


@dataclass(frozen=True)
class Rejection:
    """One input (file or stack) that was not turned into an image, with its stable code."""

    source: str
    code: Code
    message: str
    path: str = ""
    study_uid: str = ""
    series_uid: str = ""
    n_files: int = 1


@dataclass(frozen=True)
class _Slice:
    header_index: int
    frame: int
    position: tuple[float, float, float] | None
    slope: float
    intercept: float


@dataclass(frozen=True)
class Stack:
    """A set of frames that make one image: a volume sorted along the slice normal, or one
    (possibly multi-frame) instance without patient geometry.

    ``key`` identifies the stack within its series (stable across runs: study, series,
    ``stack_id``) so that ingest can derive a PHI-free image id from it. ``slices`` are in
    output order; ``duplicates`` maps an output slice to further slices at the same position
    whose pixels must be equal (checked while loading).
    """

    headers: tuple[DicomHeader, ...]
    kind: str  # "volume" | "image" (2D or multi-frame without geometry)
    study_uid: str
    series_uid: str
    stack_id: str
    slices: tuple[_Slice, ...] = ()
    affine_lps: tuple[tuple[float, ...], ...] | None = None
    warnings: tuple[str, ...] = ()
    duplicates: tuple[tuple[int, int], ...] = ()  # (kept slice idx, duplicate header/frame)
    dup_slices: tuple[_Slice, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.study_uid}|{self.series_uid}|{self.stack_id}"

    @property
    def n_slices(self) -> int:
        return len(self.slices)

    @property
    def sources(self) -> list[str]:
        return [h.source for h in self.headers]

    @property
    def first(self) -> DicomHeader:
        return self.headers[0]


# --------------------------------------------------------------------------- detection
def is_dicom(path: Path) -> bool:
    """True when ``path`` holds DICOM by content: the ``DICM`` preamble, or a preamble-less
    file that starts with a plausible group 0002/0008 element and parses."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
            if len(head) == 132 and head[128:132] == b"DICM":
                return True
            if len(head) < 8:
                return False
            if head[:2] not in _FIRST_GROUPS:
                return False
            import pydicom

            fh.seek(0)
            ds = pydicom.dcmread(fh, force=True, stop_before_pixels=True)
            return len(ds) > 0 and any(
                k in ds
                for k in ("SOPClassUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID")
            )
    except _NO_CATCH:
        raise
    except BaseException:
        return False


# --------------------------------------------------------------------------- header scan
def _s(ds: Any, keyword: str) -> str:
    v = ds.get(keyword)
    if v is None:
        return ""
    return str(v).strip()


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
        seq = [v] if isinstance(v, str | int | float) else v
        vals = tuple(float(x) for x in seq)
    except (TypeError, ValueError):
        return None
    if len(vals) != n or not all(math.isfinite(x) for x in vals):
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


def _functional_groups(ds: Any, nframes: int) -> dict[str, Any]:
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
    return out


def _read_pixel_element(fh: BinaryIO, little: bool) -> tuple[str, int, int] | None:
    """At the start of a pixel data element: (keyword, value offset, length) or None at EOF."""
    start = fh.tell()
    head = fh.read(8)
    if len(head) < 8:
        return None
    end = "<" if little else ">"
    group, elem = struct.unpack(end + "HH", head[:4])
    tag = group << 16 | elem
    if tag not in _PIXEL_TAGS:
        return None
    # trust the bytes, not the declared syntax: some files say explicit and are implicit
    if head[4:6] not in (b"OB", b"OW", b"OF", b"OD", b"UN", b"OV", b"OL"):
        (length,) = struct.unpack(end + "L", head[4:8])
        return _PIXEL_TAGS[tag], start + 8, length
    more = fh.read(4)
    if len(more) < 4:
        return None
    (length,) = struct.unpack(end + "L", more)
    return _PIXEL_TAGS[tag], start + 12, length


def scan_header(path: Path, source: str = "", *, require_pixels: bool = True) -> DicomHeader:
    """Read one DICOM file's header (no pixel decoding) into a :class:`DicomHeader`.

    Raises ``IngestError`` with ``code`` = ``unreadable`` (I/O), ``not_dicom`` (not DICOM by
    content), ``truncated`` (header or pixel data cut short), ``not_image`` (a valid object
    without an image: SR, presentation state, ...), ``no_pixel_data`` (an image without
    pixel data, or pixel data shorter than rows*cols*frames*samples*bits/8). With
    ``require_pixels=False`` the last case returns a header with ``has_pixel_data=False``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    src = source or str(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise IngestError(
            f"{src}: cannot be read ({exc.strerror or exc}); check that the file exists and is readable",
            code=Code.UNREADABLE,
        ) from None
    with fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            fast = fast_scan(fh, size, _FIELD_BY_TAG)  # checks the DICM preamble itself
            if fast is not None:
                pix = None
                if fast.pixel_element >= 0:
                    fh.seek(fast.pixel_element)
                    pix = _read_pixel_element(fh, True)
                hdr = _header_from_values(
                    fast.values,
                    path,
                    src,
                    fast.transfer_syntax,
                    pix,
                    size,
                    media_sop_class=fast.media_sop_class,
                    has_lut_sequence=fast.has_lut_sequence,
                    functional_groups=None,
                )
            else:
                fh.seek(0)
                pre = fh.read(132)
                force = not (len(pre) == 132 and pre[128:132] == b"DICM")
                if force and (len(pre) < 8 or pre[:2] not in _FIRST_GROUPS):
                    raise InvalidDicomError("no DICM preamble and no plausible first element")
                fh.seek(0)
                ds = pydicom.dcmread(fh, stop_before_pixels=True, force=force)
                hdr = _header_from_dataset(ds, fh, path, src, size)
        except IngestError:
            raise
        except InvalidDicomError:
            raise IngestError(
                f"{src}: not a DICOM file (no DICM preamble and does not parse); remove it or ignore this line",
                code=Code.NOT_DICOM,
            ) from None
        except OSError as exc:
            raise IngestError(
                f"{src}: read failed ({exc.strerror or exc}); check the storage and permissions",
                code=Code.UNREADABLE,
            ) from None
        except _NO_CATCH:
            raise
        except BaseException as exc:
            kind = (
                "truncated"
                if size < 1024 or "EOF" in repr(exc) or "end of" in str(exc).lower()
                else "unparsable"
            )
            raise IngestError(
                f"{src}: DICOM header is {kind} ({type(exc).__name__}); re-export or re-copy the file",
                code=Code.TRUNCATED,
            ) from None
    _check_pixels(hdr, require_pixels)
    return hdr


# (tag, field, kind): "s" ASCII text (UI, CS, DS, IS, AS), "p" text in the dataset's
# character set (LO, SH), "u" one unsigned short (US)
_FIELDS: tuple[tuple[int, str, str], ...] = (
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
    (0x00181164, "imager_spacing", "s"),
    (0x0020000D, "study", "s"),
    (0x0020000E, "series", "s"),
    (0x00200012, "acquisition", "s"),
    (0x00200013, "instance", "s"),
    (0x00200032, "position", "s"),
    (0x00200037, "orientation", "s"),
    (0x00200052, "frame_of_reference", "s"),
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
)


_FIELD_BY_TAG = {f[0]: f for f in _FIELDS}


def _extract(ds: Any) -> dict[str, Any]:
    """The plain header values the scan needs, decoded straight from pydicom's raw elements.

    pydicom converts an element on first access, which costs more per element than parsing
    it; the scan needs ~30 plain values, so text and US numbers are decoded here in one loop
    (multi-valued text stays backslash-joined). Elements pydicom already converted, and text
    in a character set other than ASCII/Latin-1/UTF-8, go through pydicom's own conversion.
    """
    # one pass over the dataset with plain-int keys (looking tags up in pydicom's dict calls
    # its Python-level BaseTag.__eq__ for every hit); tag order puts the charset first
    d = ds._dict
    wanted = [
        (e, _FIELD_BY_TAG[t])
        for t, e in zip(map(int, d), d.values(), strict=True)
        if t in _FIELD_BY_TAG
    ]
    if any(a[1][0] > b[1][0] for a, b in itertools.pairwise(wanted)):  # unsorted file
        wanted.sort(key=lambda item: item[1][0])
    out: dict[str, Any] = {}
    enc: str | None = "latin-1"
    for e, (tag, name, kind) in wanted:
        if e.__class__ is RawDataElement and (kind != "p" or enc is not None):
            v = e.value
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


def _split(v: str | None) -> list[str]:
    return [x.strip() for x in v.split("\\")] if v else []


def _num(v: str | None) -> float | None:
    return _f(v.split("\\", 1)[0]) if v else None


def _header_from_dataset(ds: Any, fh: BinaryIO, path: Path, src: str, size: int) -> DicomHeader:
    """The header of a dataset pydicom read up to its pixel data (``fh`` is positioned
    there)."""
    implicit, little = ds.original_encoding
    tsyntax = ""
    meta = ds.file_meta if "file_meta" in ds.__dict__ else None
    if meta is not None:
        e = meta._dict.get(0x00020010)
        v = e.value if e is not None else ""
        v = v.decode("latin-1") if isinstance(v, bytes) else str(v or "")
        tsyntax = v.strip(" \x00")
    if not tsyntax:
        tsyntax = _IMPLICIT_LE if implicit else (_EXPLICIT_LE if little else _EXPLICIT_BE)
    pix = None
    if tsyntax != _DEFLATED and implicit is not None:
        pix = _read_pixel_element(fh, bool(little))
    elif tsyntax == _DEFLATED:
        pix = ("PixelData", -1, -1)  # inside the inflated stream: decode via pydicom
    return _header_from_values(
        _extract(ds),
        path,
        src,
        tsyntax,
        pix,
        size,
        media_sop_class=_meta_get(ds, "MediaStorageSOPClassUID"),
        has_lut_sequence=0x00283000 in ds._dict,
        functional_groups=lambda nframes: _functional_groups(ds, nframes),
        has_per_frame=0x52009230 in ds._dict,
    )


def _header_from_values(
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
    """Build the header from the plain values ``_extract`` (or the lean walk) produced.

    ``functional_groups(nframes)`` reads the enhanced multi-frame groups (only called for
    multi-frame objects or when a per-frame group exists); the lean walk passes ``None``
    because it declines such files.
    """
    get = x.get
    sop_class = get("sop_class", "")
    if not sop_class:
        sop_class = media_sop_class
    rows = get("rows") or 0
    cols = get("cols") or 0
    nf = _num(get("frames"))
    nframes = int(nf) if nf is not None and nf >= 1 else 1
    if any(sop_class.startswith(p) for p in _NON_IMAGE_PREFIXES) or (
        rows == 0 and cols == 0 and pix is None and not _is_image_class(sop_class)
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
    fg: dict[str, Any] = {}
    if (nframes > 1 or has_per_frame) and functional_groups is not None:
        fg = functional_groups(nframes)
    orientation = _fn(_split(get("orientation")), 6) or fg.get("orientation")
    pixel_spacing = _fn(_split(get("spacing")), 2) or fg.get("pixel_spacing")
    position = _fn(_split(get("position")), 3)
    positions = fg.get("positions", ())
    if fg.get("mixed_orientation"):
        raise IngestError(
            f"{src}: frames of this multi-frame object disagree on ImageOrientationPatient; "
            "re-export it as a single-orientation series",
            code=Code.MIXED_ORIENTATION,
        )
    if positions and position is None:
        position = positions[0]
    slope = _num(get("slope"))
    inter = _num(get("intercept"))
    offset, length = -1, -1
    keyword = "PixelData"
    if pix is not None:
        keyword, offset, length = pix
        if length == _UNDEFINED:
            length = -1
    acq = _num(get("acquisition"))
    inst = _num(get("instance"))
    bits_allocated = get("bits_allocated") or 0
    return DicomHeader(
        path=path,
        source=src,
        sop_instance_uid=get("sop_instance", ""),
        sop_class_uid=sop_class,
        study_uid=get("study", ""),
        series_uid=get("series", ""),
        patient_id=get("patient_id", ""),
        accession=get("accession", ""),
        patient_name=get("patient_name", ""),
        birth_date=get("birth_date", ""),
        other_patient_ids=tuple(x for x in _split(get("other_patient_ids")) if x),
        modality=get("modality", "").upper(),
        manufacturer=get("manufacturer", ""),
        body_part=get("body_part", "").upper(),
        sex=get("sex", "").upper()[:1],
        age=_age(get("age", "")),
        image_type=tuple(_split(get("image_type"))),
        rows=rows,
        cols=cols,
        pixel_spacing=pixel_spacing,  # type: ignore[arg-type]
        imager_pixel_spacing=_fn(_split(get("imager_spacing")), 2),  # type: ignore[arg-type]
        image_position=position,  # type: ignore[arg-type]
        image_orientation=orientation,  # type: ignore[arg-type]
        slice_thickness=_num(get("thickness")) or fg.get("slice_thickness"),
        number_of_frames=nframes,
        samples_per_pixel=get("spp") or 1,
        photometric=get("photometric", "").upper(),
        planar_configuration=get("planar") or 0,
        bits_allocated=bits_allocated,
        bits_stored=get("bits_stored") or bits_allocated,
        pixel_representation=get("pixel_representation") or 0,
        transfer_syntax=tsyntax,
        acquisition_number=None if acq is None else int(acq),
        instance_number=None if inst is None else int(inst),
        rescale_slope=1.0 if slope is None or slope == 0 else slope,
        rescale_intercept=0.0 if inter is None else inter,
        has_modality_lut_sequence=has_lut_sequence,
        frame_of_reference_uid=get("frame_of_reference", ""),
        has_pixel_data=pix is not None,
        pixel_keyword=keyword,
        pixel_offset=offset,
        pixel_length=length,
        file_size=size,
        frame_positions=positions,
        frame_rescale=fg.get("rescale", ()),
    )


def _is_image_class(sop_class: str) -> bool:
    """True for SOP classes whose registered name says they store an image."""
    from pydicom.uid import UID

    return "Image" in UID(sop_class).name if sop_class else False


def _meta_get(ds: Any, keyword: str) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get(keyword, "") or "").strip() if meta is not None else ""


def _check_pixels(hdr: DicomHeader, require: bool) -> None:
    src = hdr.source
    if not hdr.has_pixel_data:
        if require:
            raise IngestError(
                f"{src}: image object without PixelData (missing, or the file was cut short); "
                "re-export or re-copy the file",
                code=Code.NO_PIXEL_DATA,
            )
        return
    if hdr.rows <= 0 or hdr.cols <= 0 or hdr.bits_allocated <= 0:
        raise IngestError(
            f"{src}: Rows/Columns/BitsAllocated missing or zero; the header is incomplete, re-export the file",
            code=Code.NO_PIXEL_DATA,
        )
    if hdr.pixel_offset < 0:
        return  # deflated: length only known after inflating
    remaining = hdr.file_size - hdr.pixel_offset
    if hdr.pixel_length >= 0:  # native (uncompressed) pixel data
        if hdr.pixel_length > remaining:
            raise IngestError(
                f"{src}: pixel data declares {hdr.pixel_length} bytes but the file ends after "
                f"{max(remaining, 0)}; the file is truncated, re-copy it",
                code=Code.TRUNCATED,
            )
        expected = hdr.expected_pixel_bytes()
        if hdr.pixel_keyword == "PixelData" and hdr.pixel_length < expected:
            raise IngestError(
                f"{src}: pixel data has {hdr.pixel_length} bytes, fewer than the "
                f"{expected} that Rows x Columns x frames x samples x bits need; re-export the file",
                code=Code.NO_PIXEL_DATA,
            )
    elif remaining < 16:
        raise IngestError(
            f"{src}: encapsulated pixel data is empty or cut short; re-copy the file",
            code=Code.TRUNCATED,
        )


def scan_headers(
    paths: Sequence[Path],
    sources: Sequence[str] | None = None,
    workers: int = 1,
) -> tuple[list[DicomHeader], list[Rejection]]:
    """Scan many files; per-file errors become rejections.

    The lean header walk costs about 0.1 ms a file, less than starting and feeding worker
    processes for a few hundred files, so ``workers`` processes are used only from
    ``_SCAN_POOL_MIN_FILES`` files on (``medres ingest`` scans in its own isolated pool).
    """
    srcs = list(sources) if sources is not None else [str(p) for p in paths]
    items = list(zip(paths, srcs, strict=True))
    if workers > 1 and len(items) >= _SCAN_POOL_MIN_FILES:
        chunk = max(8, len(items) // (workers * 4))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_scan_safe, items, chunksize=chunk))
    else:
        results = [_scan_safe(it) for it in items]
    headers = [r for r in results if isinstance(r, DicomHeader)]
    rejections = [r for r in results if isinstance(r, Rejection)]
    return headers, rejections


def _as_code(code: object) -> Code:
    """The stable code of an error (``unreadable`` for an uncoded one)."""
    try:
        return Code(str(code))
    except ValueError:
        return Code.UNREADABLE


def _scan_safe(item: tuple[Path, str]) -> DicomHeader | Rejection:
    path, src = item
    try:
        return scan_header(Path(path), src)
    except IngestError as exc:
        return Rejection(source=src, code=_as_code(exc.code), message=str(exc), path=str(path))


# --------------------------------------------------------------------------- grouping
def _normal(orient: Sequence[float]) -> np.ndarray:
    r = np.asarray(orient[:3], dtype=float)
    c = np.asarray(orient[3:6], dtype=float)
    n = np.cross(r, c)
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else n


def _angle_deg(a: Sequence[float], b: Sequence[float]) -> float:
    """Largest angle between the row or column cosines of two orientations."""
    out = 0.0
    for s in (slice(0, 3), slice(3, 6)):
        u, v = np.asarray(a[s], float), np.asarray(b[s], float)
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        if nu == 0 or nv == 0:
            return 180.0
        cos = float(np.clip(np.dot(u, v) / (nu * nv), -1.0, 1.0))
        out = max(out, math.degrees(math.acos(cos)))
    return out


def _describe(headers: Sequence[DicomHeader]) -> str:
    first = min(headers, key=lambda h: h.source).source
    return first if len(headers) == 1 else f"{first} (+{len(headers) - 1} files of its series)"


def group_stacks(
    headers: Sequence[DicomHeader], policy: GeometryPolicy = DEFAULT_POLICY
) -> tuple[list[Stack], list[Rejection]]:
    """Group headers into stacks and validate each stack's geometry.

    Series are keyed by (StudyInstanceUID, SeriesInstanceUID). Within a series:

    - the same SOPInstanceUID twice -> the later path is ``duplicate_input``;
    - instances without patient geometry, and multi-frame instances, are stacks of their
      own (one image each); in a series that also has a volume they are ``extra_stack``;
    - the remaining slices are clustered by orientation (``orientation_split_deg``), by
      LOCALIZER image type, and, when positions repeat across acquisitions, by
      AcquisitionNumber. The largest cluster is the series' stack; the others are
      ``extra_stack``;
    - the kept stack is validated (see :class:`GeometryPolicy`); a failing stack becomes a
      rejection with ``mixed_orientation``, ``inconsistent_geometry``, ``missing_slices`` or
      ``too_few_slices``.
    """
    by_series: dict[tuple[str, str], list[DicomHeader]] = defaultdict(list)
    for h in headers:
        by_series[(h.study_uid, h.series_uid)].append(h)
    stacks: list[Stack] = []
    rejections: list[Rejection] = []
    for (study, series), hs in sorted(by_series.items()):
        try:
            s, r = _group_series(study, series, hs, policy)
        except Exception as exc:  # one odd series never aborts the others
            log.debug("grouping failed", exc_info=True)
            s, r = (
                [],
                [
                    _reject(
                        hs,
                        Code.INCONSISTENT_GEOMETRY,
                        f"series geometry cannot be read ({type(exc).__name__}); re-export the series",
                    )
                ],
            )
        stacks.extend(s)
        rejections.extend(r)
    return stacks, rejections


def _reject(headers: Sequence[DicomHeader], code: Code, why: str) -> Rejection:
    first = min(headers, key=lambda h: h.source)
    return Rejection(
        source=first.source,
        code=code,
        message=f"{_describe(headers)}: {why}",
        path=str(first.path),
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        n_files=len(headers),
    )


def _group_series(
    study: str, series: str, hs: list[DicomHeader], policy: GeometryPolicy
) -> tuple[list[Stack], list[Rejection]]:
    rejections: list[Rejection] = []
    seen: dict[str, DicomHeader] = {}
    unique: list[DicomHeader] = []
    for h in sorted(hs, key=lambda h: (str(h.path), h.source)):
        if h.sop_instance_uid and h.sop_instance_uid in seen:
            rejections.append(
                _reject(
                    [h],
                    Code.DUPLICATE_INPUT,
                    f"same SOP instance as {seen[h.sop_instance_uid].source}; copy skipped",
                )
            )
            continue
        if h.sop_instance_uid:
            seen[h.sop_instance_uid] = h
        unique.append(h)

    singles = [h for h in unique if not h.is_slice]
    slices = [h for h in unique if h.is_slice]
    stacks: list[Stack] = []

    # volume candidates: cluster by orientation, localizer flag
    clusters: list[list[DicomHeader]] = []
    refs: list[tuple[tuple[float, ...], bool]] = []
    for h in sorted(slices, key=lambda h: str(h.path)):
        o = h.image_orientation
        assert o is not None  # has_geometry
        for idx, (ref, loc) in enumerate(refs):
            if loc == h.is_localizer and _angle_deg(ref, o) <= policy.orientation_split_deg:
                clusters[idx].append(h)
                break
        else:
            refs.append((o, h.is_localizer))
            clusters.append([h])
    clusters = [c2 for c in clusters for c2 in _split_acquisitions(c, policy)]
    # main: largest, non-localizer first
    clusters.sort(key=lambda c: (c[0].is_localizer, -len(c), min(str(h.path) for h in c)))
    if clusters:
        main = clusters[0]
        for extra in clusters[1:]:
            rejections.append(
                _reject(
                    extra,
                    Code.EXTRA_STACK,
                    f"{len(extra)} slice(s) split off the main stack "
                    "(other orientation, localizer or repeated acquisition); not ingested",
                )
            )
        try:
            stacks.append(_volume_stack(study, series, main, policy))
        except IngestError as exc:
            rejections.append(_reject(main, _as_code(exc.code), str(exc)))
        for h in singles:
            rejections.append(
                _reject(
                    [h],
                    Code.EXTRA_STACK,
                    "instance without slice geometry or multi-frame beside a volume series; not ingested",
                )
            )
        return stacks, rejections
    for h in singles:
        try:
            stacks.append(_single_stack(study, series, h, policy))
        except IngestError as exc:
            rejections.append(_reject([h], _as_code(exc.code), str(exc)))
    return stacks, rejections


def _split_acquisitions(
    cluster: list[DicomHeader], policy: GeometryPolicy
) -> list[list[DicomHeader]]:
    """Split a cluster by AcquisitionNumber only when positions repeat and the split removes
    the repeats (e.g. two passes of the same volume in one series)."""
    if len(cluster) < 2:
        return [cluster]
    n = _normal(cluster[0].image_orientation or (1, 0, 0, 0, 1, 0))
    d = sorted(float(np.dot(h.image_position, n)) for h in cluster)  # type: ignore[arg-type]
    if not any(b - a < policy.duplicate_tol for a, b in itertools.pairwise(d)):
        return [cluster]
    groups: dict[int | None, list[DicomHeader]] = defaultdict(list)
    for h in cluster:
        groups[h.acquisition_number].append(h)
    if len(groups) < 2:
        return [cluster]
    return list(groups.values())


def _spacing_2d(h: DicomHeader) -> tuple[tuple[float, float], list[str]]:
    """(row spacing, column spacing) from PixelSpacing, else ImagerPixelSpacing, else 1.0."""
    for sp in (h.pixel_spacing, h.imager_pixel_spacing):
        if sp is not None and sp[0] > 0 and sp[1] > 0:
            return (sp[0], sp[1]), []
    return (1.0, 1.0), ["no_pixel_spacing:assumed_1.0mm"]


def _single_stack(study: str, series: str, h: DicomHeader, policy: GeometryPolicy) -> Stack:
    """One instance: 2D image, multi-frame 2D (frames as slices) or enhanced volume."""
    if (
        h.number_of_frames > 1
        and h.image_orientation is not None
        and len(h.frame_positions) == h.number_of_frames
    ):
        slices = [
            _Slice(
                0,
                f,
                h.frame_positions[f],
                *(
                    h.frame_rescale[f]
                    if h.frame_rescale
                    else (h.rescale_slope, h.rescale_intercept)
                ),
            )
            for f in range(h.number_of_frames)
        ]
        return _validated_volume(study, series, [h], slices, h.sop_instance_uid, policy)
    (dr, dc), warnings = _spacing_2d(h)
    slices = [
        _Slice(0, f, None, h.rescale_slope, h.rescale_intercept) for f in range(h.number_of_frames)
    ]
    if h.frame_rescale and len(h.frame_rescale) == h.number_of_frames:
        slices = [_Slice(0, f, None, *h.frame_rescale[f]) for f in range(h.number_of_frames)]
    if h.number_of_frames > 1:
        warnings.append("frames_as_slices")
    affine = ((dc, 0.0, 0.0, 0.0), (0.0, dr, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 1.0))
    return Stack(
        headers=(h,),
        kind="image",
        study_uid=study,
        series_uid=series,
        stack_id=h.sop_instance_uid or str(h.path),
        slices=tuple(slices),
        affine_lps=affine,
        warnings=tuple(warnings),
    )


def _volume_stack(study: str, series: str, hs: list[DicomHeader], policy: GeometryPolicy) -> Stack:
    slices = [
        _Slice(i, 0, h.image_position, h.rescale_slope, h.rescale_intercept)
        for i, h in enumerate(hs)
    ]
    return _validated_volume(study, series, hs, slices, "", policy)


def _validated_volume(
    study: str,
    series: str,
    hs: list[DicomHeader],
    slices: list[_Slice],
    stack_id: str,
    policy: GeometryPolicy,
) -> Stack:
    h0 = hs[0]
    o0 = h0.image_orientation
    assert o0 is not None
    for h in hs[1:]:
        if (h.rows, h.cols) != (h0.rows, h0.cols):
            raise IngestError(
                f"slices differ in size ({h0.rows}x{h0.cols} vs {h.rows}x{h.cols}); "
                "re-export the series or remove the odd slices",
                code=Code.INCONSISTENT_GEOMETRY,
            )
        o = h.image_orientation
        assert o is not None
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
    n = _normal(o0)
    if not np.any(n):
        raise IngestError(
            "ImageOrientationPatient row and column cosines are parallel or zero; fix the header",
            code=Code.INCONSISTENT_GEOMETRY,
        )
    (dr, dc), warnings = _spacing_2d(h0)
    d = np.array([float(np.dot(s.position, n)) for s in slices])  # type: ignore[arg-type]
    order = np.argsort(d, kind="stable")
    slices = [slices[i] for i in order]
    d = d[order]
    # duplicates: same position along the normal
    kept: list[_Slice] = [slices[0]]
    kept_d: list[float] = [float(d[0])]
    dups: list[tuple[int, int]] = []
    dup_slices: list[_Slice] = []
    for s, dd in zip(slices[1:], d[1:], strict=True):
        if dd - kept_d[-1] < policy.duplicate_tol:
            dups.append((len(kept) - 1, len(dup_slices)))
            dup_slices.append(s)
        else:
            kept.append(s)
            kept_d.append(float(dd))
    nk = len(kept)
    if 1 < nk < policy.min_slices:
        raise IngestError(
            f"only {nk} slices (policy minimum {policy.min_slices}); not a usable volume",
            code=Code.TOO_FEW_SLICES,
        )
    pos = np.array([s.position for s in kept], dtype=float)
    if nk == 1:  # one slice: a 2D image like any other (diagonal affine, X=cols, Y=rows)
        one = _Slice(0, kept[0].frame, kept[0].position, kept[0].slope, kept[0].intercept)
        h = hs[kept[0].header_index]
        affine = (
            (dc, 0.0, 0.0, 0.0),
            (0.0, dr, 0.0, 0.0),
            (0.0, 0.0, 1.0, 0.0),
            (0.0, 0.0, 0.0, 1.0),
        )
        return Stack(
            headers=(h,),
            kind="image",
            study_uid=study,
            series_uid=series,
            stack_id=stack_id,
            slices=(one,),
            affine_lps=affine,
            warnings=tuple(warnings),
        )
    gaps = np.diff(np.array(kept_d))
    med = float(np.median(gaps))
    tol = max(policy.spacing_atol, policy.spacing_rtol * med)
    irregular = np.abs(gaps - med) > tol
    if np.any(irregular):
        ratios = gaps[irregular] / med
        missing = np.all(
            (np.abs(ratios - np.round(ratios)) * med <= tol)
            & (np.round(ratios) >= 2)
            & (np.round(ratios) <= policy.max_missing_factor)
        )
        if missing:
            n_missing = int(np.sum(np.round(ratios) - 1))
            raise IngestError(
                f"{n_missing} slice(s) missing (gap of {float(np.max(gaps)):.3g} mm in a series "
                f"spaced {med:.3g} mm); add the missing files or re-export the series",
                code=Code.MISSING_SLICES,
            )
        raise IngestError(
            f"uneven slice spacing ({float(gaps.min()):.3g}..{float(gaps.max()):.3g} mm, "
            f"median {med:.3g}, tolerance {tol:.3g}); resample or re-export the series",
            code=Code.INCONSISTENT_GEOMETRY,
        )
    step = (pos[-1] - pos[0]) / (nk - 1)
    # all origins on the line pos0 + k*step
    resid = pos - (pos[0] + np.outer(np.arange(nk), step))
    if float(np.max(np.linalg.norm(resid, axis=1))) > max(policy.collinear_tol, tol):
        raise IngestError(
            "slice positions do not lie on one line; re-export the series",
            code=Code.INCONSISTENT_GEOMETRY,
        )
    cos = float(np.clip(abs(np.dot(step, n)) / np.linalg.norm(step), -1.0, 1.0))
    tilt = math.degrees(math.acos(cos))
    if tilt > policy.tilt_warn_deg:
        warnings.append(f"gantry_tilt:{tilt:.2f}deg")
    if dups:
        warnings.append(f"duplicate_positions:{len(dups)}")
    r = np.asarray(o0[:3], float)
    c = np.asarray(o0[3:6], float)
    aff = np.eye(4)
    aff[:3, 0] = r * dc
    aff[:3, 1] = c * dr
    aff[:3, 2] = step
    aff[:3, 3] = pos[0]
    used = sorted({s.header_index for s in kept} | {s.header_index for s in dup_slices})
    remap = {old: new for new, old in enumerate(used)}
    hs_used = [hs[i] for i in used]

    def re(s: _Slice) -> _Slice:
        return _Slice(remap[s.header_index], s.frame, s.position, s.slope, s.intercept)

    return Stack(
        headers=tuple(hs_used),
        kind="volume" if nk > 1 else "image",
        study_uid=study,
        series_uid=series,
        stack_id=stack_id,
        slices=tuple(re(s) for s in kept),
        affine_lps=tuple(tuple(float(v) for v in row) for row in aff),
        warnings=tuple(warnings),
        duplicates=tuple(dups),
        dup_slices=tuple(re(s) for s in dup_slices),
    )


# --------------------------------------------------------------------------- decoding
def _stored_dtype(h: DicomHeader) -> np.dtype:
    if h.pixel_keyword == "FloatPixelData":
        return np.dtype("<f4")
    if h.pixel_keyword == "DoubleFloatPixelData":
        return np.dtype("<f8")
    kind = "i" if h.pixel_representation == 1 else "u"
    return np.dtype(f"<{kind}{h.bits_allocated // 8}")


def _fast_ok(h: DicomHeader) -> bool:
    return (
        h.is_native
        and h.pixel_offset >= 0
        and h.pixel_length >= 0
        and h.samples_per_pixel == 1
        and h.bits_allocated in (8, 16, 32, 64)
        and h.photometric in ("MONOCHROME1", "MONOCHROME2")
        and not h.has_modality_lut_sequence
        and h.pixel_length >= h.expected_pixel_bytes()
    )


def _read_native(h: DicomHeader, out: np.ndarray) -> None:
    """Read ``out.size`` stored values from the file straight into ``out`` (C-contiguous)."""
    with open(h.path, "rb") as fh:
        fh.seek(h.pixel_offset)
        n = fh.readinto(memoryview(out).cast("B"))
    if n != out.nbytes:
        raise IngestError(
            f"{h.source}: pixel data ends early; re-copy the file", code=Code.TRUNCATED
        )


def _decode(h: DicomHeader) -> tuple[np.ndarray, Any]:
    """Decode all frames with pydicom -> (frames, rows, cols[, 3]) and the dataset."""
    import pydicom

    try:
        ds = pydicom.dcmread(h.path, force=True)
    except _NO_CATCH:
        raise
    except BaseException as exc:
        raise IngestError(
            f"{h.source}: cannot re-read file ({type(exc).__name__}); re-copy it",
            code=Code.TRUNCATED,
        ) from None
    try:
        arr = ds.pixel_array
    except _NO_CATCH:
        raise
    except NotImplementedError as exc:
        raise IngestError(
            f"{h.source}: no installed decoder handles transfer syntax {h.transfer_syntax} ({exc}); "
            "install the pydicom plugins (pylibjpeg, gdcm) or re-export uncompressed",
            code=Code.UNSUPPORTED_TRANSFER_SYNTAX,
        ) from None
    except BaseException as exc:
        msg = str(exc).split("\n")[0][:160]
        low = msg.lower()
        unsupported = any(
            k in low for k in ("no pixel data decoders", "missing dependencies", "missing required")
        )
        code = Code.UNSUPPORTED_TRANSFER_SYNTAX if unsupported else Code.DECODE_FAILED
        raise IngestError(
            f"{h.source}: pixel decoding failed ({type(exc).__name__}: {msg}); the compressed data is corrupt or unsupported, re-export the file",
            code=code,
        ) from None
    nf = h.number_of_frames
    arr = np.asarray(arr)
    if h.photometric.startswith("PALETTE"):
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, ds)
        except _NO_CATCH:
            raise
        except BaseException as exc:
            raise IngestError(
                f"{h.source}: palette colour lookup failed ({type(exc).__name__}); re-export as RGB",
                code=Code.DECODE_FAILED,
            ) from None
    color = arr.ndim == (4 if nf > 1 else 3)
    if not color:
        arr = arr.reshape(nf, h.rows, h.cols)
    else:
        arr = arr.reshape(nf, h.rows, h.cols, arr.shape[-1])
    return arr, ds


def _decode_encapsulated(h: DicomHeader) -> np.ndarray | None:
    """Decode compressed frames straight from the bytes located by the header scan (no second
    header parse): (frames, rows, cols[, 3]), or None when this shortcut does not apply or
    fails (the caller then decodes through the full dataset, which also classifies errors)."""
    if h.pixel_offset < 0 or h.pixel_length != -1 or h.photometric.startswith("PALETTE"):
        return None
    if h.has_modality_lut_sequence:
        return None
    try:
        decoder = get_decoder(h.transfer_syntax)
        with open(h.path, "rb") as fh:
            fh.seek(h.pixel_offset)
            buf = fh.read()
        kw: dict[str, Any] = {
            "rows": h.rows,
            "columns": h.cols,
            "samples_per_pixel": h.samples_per_pixel,
            "number_of_frames": h.number_of_frames,
            "bits_allocated": h.bits_allocated,
            "bits_stored": h.bits_stored,
            "pixel_representation": h.pixel_representation,
            "photometric_interpretation": h.photometric,
            "pixel_keyword": "PixelData",
        }
        if h.samples_per_pixel > 1:
            kw["planar_configuration"] = h.planar_configuration
        arr, _ = decoder.as_array(buf, **kw)
    except _NO_CATCH:
        raise
    except BaseException:
        return None
    nf = h.number_of_frames
    color = arr.ndim == (4 if nf > 1 else 3)
    return arr.reshape((nf, h.rows, h.cols, arr.shape[-1]) if color else (nf, h.rows, h.cols))


def _lut_sequence(ds: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    if ds is None or not ds.get("ModalityLUTSequence"):
        return None
    from pydicom.pixels import apply_modality_lut

    return lambda a: apply_modality_lut(a, ds)


def _bits_range(h: DicomHeader) -> tuple[float, float]:
    b = h.bits_stored or h.bits_allocated
    if h.pixel_representation == 1:
        return -(2.0 ** (b - 1)), 2.0 ** (b - 1) - 1
    return 0.0, 2.0**b - 1


def _to_output_dtype(a: np.ndarray) -> np.ndarray:
    """int16 when every value is integral and fits, else float32."""
    if a.dtype == np.int16:
        return a
    if a.size == 0:
        return a.astype(np.int16)
    if a.dtype.kind in "iub":
        lo, hi = a.min(), a.max()
        if lo >= -32768 and hi <= 32767:
            return a.astype(np.int16)
        return a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        return a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if lo >= -32768 and hi <= 32767 and np.array_equal(a, np.round(a)):
        return a.astype(np.int16)
    return a.astype(np.float32)


def _apply_values(
    raw: np.ndarray,
    slices: Sequence[_Slice],
    h0: DicomHeader,
    orient: Callable[[np.ndarray], np.ndarray],
    ds: Any = None,
) -> np.ndarray:
    """Modality LUT per slice (axis 0 of ``raw``), MONOCHROME1 inversion, output dtype.

    ``orient`` maps a (slices, rows, cols)-shaped array to a view in canonical layout; the
    result is written once, F-contiguous, in that layout (the value pass doubles as the
    reorientation copy, and the NIfTI writer can then write it without another copy).
    """
    lut = _lut_sequence(ds)
    slopes = np.array([s.slope for s in slices], dtype=np.float64)
    inters = np.array([s.intercept for s in slices], dtype=np.float64)
    mono1 = h0.photometric == "MONOCHROME1"
    per_slice = (-1, 1, 1)
    view = orient(raw)
    if lut is not None:
        out = lut(view)
        if mono1:
            lo, hi = (float(v) for v in lut(np.array(_bits_range(h0), dtype=raw.dtype)))
            out = (lo + hi) - out.astype(np.float64)
        return np.asfortranarray(_to_output_dtype(out))
    integral = (
        raw.dtype.kind in "iu"
        and bool(np.all(slopes == 1.0))
        and bool(np.all(inters == np.round(inters)))
    )
    if integral and not mono1:
        # unused high bits are not masked (as pydicom), so only the dtype bounds the values
        blo, bhi = float(np.iinfo(raw.dtype).min), float(np.iinfo(raw.dtype).max)
        lo, hi = blo + inters.min(), bhi + inters.max()
        if not (lo >= -32768 and hi <= 32767) and raw.size:
            # the stored-bits range does not settle it: look at the actual values
            lo, hi = float(raw.min()) + inters.min(), float(raw.max()) + inters.max()
        if lo >= -32768 and hi <= 32767:
            out = np.empty(view.shape, dtype=np.int16, order="F")
            if np.all(inters == inters[0]):
                np.add(
                    view,
                    np.int16(inters[0]) if raw.dtype == np.int16 else np.int32(inters[0]),
                    out=out,
                    casting="unsafe",
                )
            else:
                np.add(
                    view,
                    orient(inters.astype(np.int32).reshape(per_slice)),
                    out=out,
                    casting="unsafe",
                )
            return out
    out = view.astype(np.float64, order="F") * orient(slopes.reshape(per_slice))
    out += orient(inters.reshape(per_slice))
    if mono1:
        blo, bhi = _bits_range(h0)
        lo_hi = (blo + bhi) * slopes + 2 * inters
        out = orient(lo_hi.reshape(per_slice)) - out
    return np.asfortranarray(_to_output_dtype(out))


def _run_guarded(fn: Callable[[], Any], src: str) -> Any:
    try:
        return fn()
    except (IngestError, *_NO_CATCH):
        raise
    except MemoryError:
        raise IngestError(
            f"{src}: out of memory while decoding; ingest with fewer workers", code=Code.TIMEOUT
        ) from None
    except BaseException as exc:
        raise IngestError(
            f"{src}: decoding failed ({type(exc).__name__}); the pixel data is corrupt, re-export the file",
            code=Code.DECODE_FAILED,
        ) from None


def load_stack(stack: Stack, workers: int = 1) -> LoadedImage:
    """Decode a stack into a canonical :class:`LoadedImage` (see the module docstring).

    Uncompressed slices are read with ``readinto`` into one preallocated array (in
    ``workers`` threads when > 1; file reads and numpy release the GIL); compressed ones are
    decoded by pydicom. Raises ``IngestError`` (``decode_failed``, ``truncated``,
    ``duplicate_slices``, ``unsupported_transfer_syntax``, ...); never anything else.
    """
    src = _describe(stack.headers)
    return _run_guarded(lambda: _load_stack(stack, workers), src)


def _load_stack(stack: Stack, workers: int) -> LoadedImage:
    h0 = stack.first
    all_slices = list(stack.slices) + list(stack.dup_slices)
    fast = (
        all(_fast_ok(h) for h in stack.headers)
        and len({_stored_dtype(h) for h in stack.headers}) == 1
    )
    ds0 = None
    if fast:
        dtype = _stored_dtype(h0)
        raw = np.empty((len(all_slices), h0.rows, h0.cols), dtype=dtype)
        if h0.number_of_frames > 1:  # one multi-frame file: read all frames once, then pick
            frames = np.empty((h0.number_of_frames, h0.rows, h0.cols), dtype=dtype)
            _read_native(h0, frames)
            for k, s in enumerate(all_slices):
                raw[k] = frames[s.frame]
        else:

            def read(k: int) -> None:
                _read_native(stack.headers[all_slices[k].header_index], raw[k])

            if workers > 1 and len(all_slices) > 8:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    list(pool.map(read, range(len(all_slices))))
            else:
                for k in range(len(all_slices)):
                    read(k)
    else:
        decoded = _decode_all(stack, all_slices, workers)
        ds0 = decoded.pop(-1, None)
        shapes = {a.shape[1:] for a in decoded.values()}
        if len(shapes) != 1:
            raise IngestError(
                f"{_describe(stack.headers)}: decoded slices differ in shape {sorted(shapes)}; re-export the series",
                code=Code.INCONSISTENT_GEOMETRY,
            )
        raw = np.stack([decoded[s.header_index][s.frame] for s in all_slices])
    n = len(stack.slices)
    warnings = list(stack.warnings)
    if stack.duplicates:
        for kept, di in stack.duplicates:
            if not np.array_equal(raw[kept], raw[n + di]):
                raise IngestError(
                    f"{_describe(stack.headers)}: two slices at the same position hold different pixels "
                    "(e.g. several phases or echoes in one series); split the series before ingest",
                    code=Code.DUPLICATE_SLICES,
                )
        raw = raw[:n]
    orient, affine, dims = _canonical(stack, raw.shape)
    if raw.ndim == 4:  # colour: no modality LUT
        values = np.asfortranarray(_to_output_dtype(orient(raw)))
    else:
        values = _apply_values(
            raw, stack.slices, h0, orient, ds0 if h0.has_modality_lut_sequence else None
        )
    if dims == 2:
        values = values[:, :, 0]
    return _image(stack, values, affine, dims, warnings)


def _decode_all(stack: Stack, all_slices: list[_Slice], workers: int) -> dict[int, Any]:
    """pydicom-decode every header a slice needs; key -1 holds the first dataset (for a
    Modality LUT). ``workers`` processes are used when the estimated serial decode time
    (:func:`_decode_seconds`) exceeds ``_POOL_WORTH_S``, below which the pool's start-up and
    the pickling of frames cost more than they save."""
    need = sorted({s.header_index for s in all_slices})
    out: dict[int, Any] = {}
    if workers > 1 and len(need) > 8 and _decode_seconds(stack, need) > _POOL_WORTH_S:
        chunk = max(4, len(need) // (workers * 4))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            arrays = list(
                pool.map(_decode_array, [stack.headers[i] for i in need], chunksize=chunk)
            )
        for i, a in zip(need, arrays, strict=True):
            if isinstance(a, IngestError):
                raise a
            out[i] = a
        if stack.first.has_modality_lut_sequence:
            out[-1] = _decode(stack.first)[1]
        return out
    for i in need:
        h = stack.headers[i]
        fast = _decode_encapsulated(h)
        if fast is not None:
            out[i] = fast
            continue
        arr, ds = _decode(h)
        out[i] = arr
        out.setdefault(-1, ds)
    if stack.first.has_modality_lut_sequence and -1 not in out:
        out[-1] = _decode(stack.first)[1]
    return out


# Serial decode cost per output byte (seconds), by transfer syntax, measured on one core
# of the project's CI-class machine with pydicom's plugins (pylibjpeg, openjpeg, libjpeg).
_DECODE_S_PER_BYTE = {
    "1.2.840.10008.1.2.5": 2.5e-9,  # RLE Lossless
    "1.2.840.10008.1.2.4.50": 5e-9,  # JPEG baseline
    "1.2.840.10008.1.2.4.51": 5e-9,  # JPEG extended
}
_DEFAULT_DECODE_S_PER_BYTE = 2e-8  # JPEG lossless, JPEG-LS, JPEG 2000, HTJ2K, ...
# A process pool (start-up, pickling the frames back) pays off above this much serial work.
_POOL_WORTH_S = 0.5
# Header scans (~0.1 ms a file with the lean walk) go to processes from this many files.
_SCAN_POOL_MIN_FILES = 2000


def _decode_seconds(stack: Stack, need: Sequence[int]) -> float:
    """Estimated serial decode time of the compressed files ``need`` of ``stack``."""
    total = 0.0
    for i in need:
        h = stack.headers[i]
        per = _DECODE_S_PER_BYTE.get(h.transfer_syntax, _DEFAULT_DECODE_S_PER_BYTE)
        nbytes = h.rows * h.cols * h.number_of_frames * h.samples_per_pixel
        total += per * nbytes * max(1, h.bits_allocated // 8)
    return total


def _decode_array(h: DicomHeader) -> np.ndarray | IngestError:
    """Process-pool worker: the decoded frames, or the coded error (exceptions pickle)."""
    try:
        fast = _decode_encapsulated(h)
        return fast if fast is not None else _run_guarded(lambda: _decode(h)[0], h.source)
    except IngestError as exc:
        return exc


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
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

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
    color = values.ndim == dims + 1
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
        n_slices=len(stack.slices),
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
    from medres.ingest.nifti import write_image

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
