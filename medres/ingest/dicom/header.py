"""The records of DICOM ingest: header, geometry policy, stack, rejection.

Owns the plain, picklable data types that the scan (:mod:`.scan`), the grouping
(:mod:`.series`, :mod:`.geometry`) and the decode (:mod:`.decode`, :mod:`.stack`) pass
between them, the constants that classify a header (transfer syntaxes, projection
modalities), and the helpers that turn a set of headers into a :class:`Rejection`.
Imports only :mod:`medres.ingest.codes` (no pydicom, no numpy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medres.ingest.codes import Code

# Uncompressed transfer syntaxes whose pixel bytes can be read straight from the file.
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
NATIVE_LE = frozenset({IMPLICIT_LE, EXPLICIT_LE})
# modalities whose images are 2D by nature (never stacked into volumes)
PROJECTION_MODALITIES = frozenset(
    {"CR", "DX", "MG", "IO", "PX", "XA", "RF", "US", "ES", "XC", "OP", "SM", "GM", "DG"}
)
SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture (incl. multi-frame SC)
# exceptions that are never turned into a coded error
NO_CATCH = (KeyboardInterrupt, SystemExit, GeneratorExit)


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
    - ``uneven_spacing``: ``"resample"`` (default) puts a stack with irregular or missing
      slices onto a regular grid (:mod:`.resample`, with a warning naming the gaps);
      ``"reject"`` keeps the strict ``missing_slices`` / ``inconsistent_geometry`` rejection.
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
    uneven_spacing: str = "resample"  # "resample" | "reject"


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
    # Siemens mosaic (.mosaic, .csa): tiles in the frame (0: not a mosaic), the slice
    # direction (unit, sign from the CSA SliceNormalVector) and the slice spacing; a tile
    # header made by .mosaic.expand_mosaics has mosaic_tile >= 0 and the tile's Rows/Columns
    mosaic_images: int = 0
    mosaic_normal: tuple[float, float, float] | None = None
    mosaic_spacing: float | None = None
    mosaic_tile: int = -1
    # keys that tell the volumes of a multi-volume series apart (.volumes); None = absent
    temporal_position: int | None = None  # TemporalPositionIdentifier
    echo_number: int | None = None  # EchoNumbers (first value)
    echo_time: float | None = None  # EchoTime, ms
    repetition_time: float | None = None  # RepetitionTime, ms
    trigger_time: float | None = None  # TriggerTime, ms
    acquisition_time: float | None = None  # AcquisitionTime, s after midnight
    content_time: float | None = None  # ContentTime, s after midnight
    diffusion_bvalue: float | None = None  # DiffusionBValue, else GE/Siemens private
    diffusion_gradient: tuple[float, float, float] | None = None  # LPS, unit or zero
    # enhanced multi-frame: one .volumes.FrameKey per frame (empty otherwise)
    frame_keys: tuple[object, ...] = ()

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
            and self.modality not in PROJECTION_MODALITIES
            and not self.sop_class_uid.startswith(SC_PREFIX)
        )

    @property
    def is_native(self) -> bool:
        return self.transfer_syntax in NATIVE_LE

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
class Slice:
    """One frame of a stack: which header and frame, its position and rescale."""

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
    slices: tuple[Slice, ...] = ()
    affine_lps: tuple[tuple[float, ...], ...] | None = None
    warnings: tuple[str, ...] = ()
    duplicates: tuple[tuple[int, int], ...] = ()  # (kept slice idx, duplicate header/frame)
    dup_slices: tuple[Slice, ...] = ()
    # uneven spacing: kept slices' positions in output-grid index units (first 0.0, last
    # n_out - 1); load_stack interpolates onto 0..n_out-1 (.resample). Empty: regular.
    grid_positions: tuple[float, ...] = ()
    # multi-volume (4D): ``slices`` hold n_volumes blocks of equal size, volume-major, each
    # block in the same spatial order; ``volume_axis`` is a .volumes.VolumeAxis
    n_volumes: int = 1
    volume_axis: object | None = None

    @property
    def key(self) -> str:
        return f"{self.study_uid}|{self.series_uid}|{self.stack_id}"

    @property
    def n_slices(self) -> int:
        return len(self.slices) // max(1, self.n_volumes)

    @property
    def sources(self) -> list[str]:
        # distinct files (the tiles of a mosaic share one)
        return list(dict.fromkeys(h.source for h in self.headers))

    @property
    def first(self) -> DicomHeader:
        return self.headers[0]


def as_code(code: object) -> Code:
    """The stable code of an error (``unreadable`` for an uncoded one)."""
    try:
        return Code(str(code))
    except ValueError:
        return Code.UNREADABLE


def describe(headers: Sequence[DicomHeader]) -> str:
    """The display name of a set of files: the first source, plus how many others."""
    first = min(headers, key=lambda h: h.source).source
    n = len({h.source for h in headers})  # files, not mosaic tiles
    return first if n == 1 else f"{first} (+{n - 1} files of its series)"


def reject(headers: Sequence[DicomHeader], code: Code, why: str) -> Rejection:
    """A rejection of ``headers`` (named by :func:`describe`) with ``code``."""
    first = min(headers, key=lambda h: h.source)
    return Rejection(
        source=first.source,
        code=code,
        message=f"{describe(headers)}: {why}",
        path=str(first.path),
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        n_files=len({h.source for h in headers}),
    )
