"""The synthetic study-set specification and its registries (kinds, defects, codecs).

Owns: :class:`SynthSpec` (frozen; :meth:`SynthSpec.validated` checks it), :data:`KINDS`,
:data:`DEFECTS`, :data:`COMPRESSIONS`, :data:`ARCHIVES` and the option parsers of
``medres synth``. Imports: ``medres.errors``, ``medres.io`` (pydicom lazily); nothing else
of the package, it is the lowest synth module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from medres.errors import ConfigError
from medres.io import parse_size


@dataclass(frozen=True)
class KindInfo:
    """What one ``kind`` of synthetic data is: dimensionality, modality and SOP class."""

    name: str
    dims: int
    modality: str
    sop_class: str
    description: str
    default_shape: tuple[int, ...]
    default_fov_mm: tuple[float, ...]


# SOP class UIDs (PS3.4 B.5)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"

KINDS: dict[str, KindInfo] = {
    k.name: k
    for k in (
        KindInfo(
            "ct",
            3,
            "CT",
            CT_IMAGE,
            "3D CT series, int16 + rescale to HU",
            (128, 128, 64),
            (350.0, 350.0, 160.0),
        ),
        KindInfo(
            "mr",
            3,
            "MR",
            MR_IMAGE,
            "3D MR-like series, uint16, some with rescale",
            (128, 128, 48),
            (300.0, 300.0, 192.0),
        ),
        KindInfo(
            "xray",
            2,
            "DX",
            DX_IMAGE,
            "2D radiographs (DX/CR), 12-bit, MONOCHROME1/2",
            (128, 128),
            (400.0, 400.0),
        ),
        KindInfo("us", 2, "US", US_IMAGE, "2D ultrasound, RGB", (128, 128), (160.0, 160.0)),
        KindInfo(
            "sc",
            2,
            "OT",
            SC_IMAGE,
            "2D secondary capture (rendered CT slice), RGB",
            (128, 128),
            (350.0, 350.0),
        ),
        KindInfo(
            "nifti",
            3,
            "CT",
            "",
            "3D CT-like NIfTI volumes (.nii.gz), RAS affine",
            (128, 128, 64),
            (350.0, 350.0, 160.0),
        ),
    )
}

# Default lesion-contrast gain per kind (``lesion_contrast`` multiplies it). 3D CT volumes
# get 2x: a sphere of 5-9 % FOV fills ~0.3 % of a CT volume but ~1.5 % of a radiograph, and
# at 1x (+70 HU at difficulty 0.5) a from-scratch 3D ResNet-18 at 64^3 stayed near chance;
# at 2x it reached val AUC 0.94 by epoch 4 (120 patients, batch 8). Radiographs get 1.3x:
# at 1x and difficulty 0.5 a from-scratch 2D ResNet-18 (300 patients, 64 px, 12 epochs)
# ended between 0.89 and 0.97 val AUC depending on the seed; at 1.3x 0.96-0.98 by epoch 5-7.
CONTRAST_GAIN: dict[str, float] = {"ct": 2.0, "nifti": 2.0, "xray": 1.3}

# Defects: name -> (applies to which kinds, description). Every series-level defect is
# planted in exactly one recorded series (truth.csv ``defect`` column).
_ALL_DICOM = frozenset({"ct", "mr", "xray", "us", "sc"})
_VOLUME_DICOM = frozenset({"ct", "mr"})
DEFECTS: dict[str, tuple[frozenset[str], str]] = {
    "shuffle_names": (
        _ALL_DICOM,
        "all files get random extension-less names in nested random folders (global)",
    ),
    "missing_slice": (_VOLUME_DICOM, "one interior slice file of one series is not written"),
    "duplicate_slice": (
        _VOLUME_DICOM,
        "one slice file of one series is written twice (byte copy, same SOPInstanceUID)",
    ),
    "localizer": (
        _VOLUME_DICOM,
        "a coronal LOCALIZER image with the same SeriesInstanceUID is mixed into one series",
    ),
    "uneven_spacing": (
        _VOLUME_DICOM,
        "slice positions of one series above its middle are shifted by half a slice",
    ),
    "two_series": (
        _ALL_DICOM,
        "a second series of the same study is written into the same folder as the first",
    ),
    "junk": (
        _ALL_DICOM | {"nifti"},
        "non-DICOM files (README, .DS_Store, Thumbs.db, fake JPEG, random bytes) beside the data",
    ),
    "truncated": (
        _ALL_DICOM | {"nifti"},
        "one file of one series is cut to 60% of its length",
    ),
    "no_preamble": (
        _ALL_DICOM,
        "one series is written without preamble/file meta (implicit VR, legacy export)",
    ),
}
GLOBAL_DEFECTS = frozenset({"shuffle_names", "junk"})

# compression name -> transfer syntax UID (all lossless, so pixels round-trip exactly)
COMPRESSIONS: dict[str, str] = {
    "rle": "1.2.840.10008.1.2.5",
    "jpegls": "1.2.840.10008.1.2.4.80",
    "jpeg2000": "1.2.840.10008.1.2.4.90",
}
ARCHIVES = ("zip", "tar", "tar.gz")


def available_compressions() -> list[str]:
    """Compression names whose pydicom encoder has an installed plugin here."""
    from pydicom.pixels import get_encoder

    return [name for name, uid in COMPRESSIONS.items() if get_encoder(uid).is_available]


@dataclass(frozen=True)
class SynthSpec:
    """What to synthesise. Frozen; validate with :meth:`validated` (``generate`` does).

    Choices made:

    * ``shape`` is (rows, cols) for 2D kinds and (rows, cols, slices) for 3D kinds; ``None``
      takes the kind's default (CT 128x128x64, MR 128x128x48, 2D 128x128).
    * ``spacing`` is (row spacing, column spacing[, slice spacing]) in mm, i.e. DICOM
      PixelSpacing order; ``None`` fits the kind's typical field of view (CT 350 mm
      in-plane, 160 mm along z; radiographs 400 mm).
    * ``lesion_contrast`` multiplies each modality's nominal lesion contrast (CT +100 HU,
      MR +400, X-ray +900 of 4095, US hypoechoic -70 grey levels) and the kind's default
      gain (:data:`CONTRAST_GAIN`: 2 for 3D CT/NIfTI volumes, whose lesion is a far smaller
      fraction of the image, 1.3 for radiographs); negative inverts it.
    * ``lesion_radius_mm`` ``None`` means 5-9 % of the smaller in-plane field of view, so
      the finding keeps its relative size (and learnability) whatever the shape.
    * ``difficulty`` (0..1) scales everything that hides the lesion together: effective
      contrast x(1 - 0.6 d), noise x(0.5 + 2 d), anatomy jitter and the number of
      lesion-like distractors (small bright vessels, dark cysts).
    * ``n_classes`` 2 is binary (lesion present); k > 2 makes class c carry c lesions.
    * ``phi_canary`` writes canary identities containing :data:`PHI_CANARY_MARKER` into
      PatientName, PatientID, PatientBirthDate (``19010101``), AccessionNumber,
      InstitutionName, ReferringPhysicianName and OtherPatientIDs of every file.
    """

    kind: str = "ct"
    n_patients: int = 20
    studies_per_patient: int = 1
    prevalence: float = 0.5
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    oblique: float = 0.0
    lesion_contrast: float = 1.0
    lesion_radius_mm: tuple[float, float] | None = None
    difficulty: float = 0.5
    n_classes: int = 2
    monochrome1_fraction: float = 0.3
    compression: str | None = None
    multiframe: bool = False
    messy: tuple[str, ...] = ()
    archive: str | None = None
    seed: int = 0
    phi_canary: bool = False

    @property
    def info(self) -> KindInfo:
        return KINDS[self.kind]

    @property
    def dims(self) -> int:
        return self.info.dims

    def resolved_shape(self) -> tuple[int, ...]:
        return tuple(self.shape) if self.shape is not None else self.info.default_shape

    def resolved_spacing(self) -> tuple[float, ...]:
        if self.spacing is not None:
            return tuple(float(s) for s in self.spacing)
        shape = self.resolved_shape()
        fov = self.info.default_fov_mm
        return tuple(round(f / n, 4) for f, n in zip(fov, shape, strict=True))

    def resolved_radius(self) -> tuple[float, float]:
        if self.lesion_radius_mm is not None:
            lo, hi = self.lesion_radius_mm
            return float(lo), float(hi)
        shape, sp = self.resolved_shape(), self.resolved_spacing()
        fov = min(shape[0] * sp[0], shape[1] * sp[1])
        return 0.05 * fov, 0.09 * fov

    def resolved_contrast(self) -> float:
        """``lesion_contrast`` times the kind's default gain (:data:`CONTRAST_GAIN`, else 1)."""
        return float(self.lesion_contrast) * CONTRAST_GAIN.get(self.kind, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynthSpec:
        d = dict(d)
        for key in ("shape", "spacing", "lesion_radius_mm", "messy"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})

    def validated(self) -> SynthSpec:
        """Return ``self`` after checking every field; raise :class:`ConfigError` otherwise."""
        self._check_counts()
        self._check_geometry()
        self._check_compression()
        self._check_messy()
        if self.archive is not None and self.archive not in ARCHIVES:
            raise ConfigError(
                f"synth archive {self.archive!r} is unknown; use one of {', '.join(ARCHIVES)}"
            )
        return self

    def _check_counts(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"synth kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if self.n_patients < 1:
            raise ConfigError(f"synth n_patients={self.n_patients} must be >= 1")
        if self.studies_per_patient < 1:
            raise ConfigError(f"synth studies_per_patient={self.studies_per_patient} must be >= 1")
        if not 0.0 <= self.prevalence <= 1.0:
            raise ConfigError(f"synth prevalence={self.prevalence} must be in [0, 1]")
        if not 0.0 <= self.difficulty <= 1.0:
            raise ConfigError(f"synth difficulty={self.difficulty} must be in [0, 1]")
        for name in ("oblique", "monochrome1_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"synth {name}={getattr(self, name)} must be in [0, 1]")
        if self.n_classes < 2 or self.n_classes > 6:
            raise ConfigError(f"synth n_classes={self.n_classes} must be between 2 and 6")

    def _check_geometry(self) -> None:
        shape = self.resolved_shape()
        if len(shape) != self.dims:
            want = "rows,cols,slices" if self.dims == 3 else "rows,cols"
            raise ConfigError(
                f"synth shape {shape} has {len(shape)} values; kind {self.kind!r} needs {want}"
            )
        if min(shape[:2]) < 8 or (self.dims == 3 and shape[2] < 4):
            raise ConfigError(
                f"synth shape {shape} is too small; use >= 8 pixels in-plane and >= 4 slices"
            )
        if max(shape) > 2048:
            raise ConfigError(f"synth shape {shape} is too large; use <= 2048 per axis")
        spacing = self.resolved_spacing()
        if len(spacing) != self.dims or min(spacing) <= 0:
            raise ConfigError(
                f"synth spacing {spacing} must have {self.dims} positive values (mm), "
                "row spacing first"
            )
        lo, hi = self.resolved_radius()
        if not 0 < lo <= hi:
            raise ConfigError(f"synth lesion_radius_mm ({lo}, {hi}) must satisfy 0 < min <= max")

    def _check_compression(self) -> None:
        if self.compression is None:
            return
        shape = self.resolved_shape()
        if self.compression not in COMPRESSIONS:
            raise ConfigError(
                f"synth compression {self.compression!r} is unknown; use one of "
                f"{', '.join(COMPRESSIONS)}"
            )
        if self.kind == "nifti":
            raise ConfigError("synth compression applies to DICOM kinds only, not 'nifti'")
        if self.compression not in available_compressions():
            raise ConfigError(
                f"synth compression {self.compression!r} has no installed encoder; "
                f"available here: {', '.join(available_compressions()) or 'none'}"
            )
        if self.compression == "jpeg2000" and min(shape[:2]) < 64:
            raise ConfigError(
                f"synth compression 'jpeg2000' needs rows and cols >= 64 (OpenJPEG's default "
                f"6 resolution levels), got shape {shape}; enlarge --shape or use rle"
            )

    def _check_messy(self) -> None:
        if self.multiframe and self.kind not in ("ct", "mr"):
            raise ConfigError(f"synth multiframe applies to 'ct' and 'mr', not {self.kind!r}")
        for name in self.messy:
            if name not in DEFECTS:
                raise ConfigError(
                    f"synth messy defect {name!r} is unknown; use any of {', '.join(DEFECTS)}"
                )
            kinds, _ = DEFECTS[name]
            if self.kind not in kinds:
                raise ConfigError(
                    f"synth messy defect {name!r} does not apply to kind {self.kind!r}; "
                    f"it applies to {', '.join(sorted(kinds))}"
                )
            if self.multiframe and name in (
                "missing_slice",
                "duplicate_slice",
                "localizer",
                "uneven_spacing",
            ):
                raise ConfigError(
                    f"synth messy defect {name!r} needs one file per slice; drop --multiframe"
                )
        if len(set(self.messy)) != len(self.messy):
            raise ConfigError(f"synth messy {self.messy} lists a defect twice")
        n_series = self.n_patients * self.studies_per_patient
        n_planted = len([m for m in self.messy if m not in GLOBAL_DEFECTS])
        if n_planted > n_series:
            raise ConfigError(
                f"synth messy plants {n_planted} defects but only {n_series} series exist; "
                "raise n_patients or drop defects"
            )


def parse_tuple(text: str | None, kind: type, option: str) -> tuple | None:
    """Parse ``"128,128,64"`` (CLI style) into a tuple of ``kind``; empty/None gives None.

    Kept for callers of ``medres.synth.parse_tuple``; the rule is :func:`medres.io.parse_size`.
    """
    return parse_size(text, option, kind=kind)


def parse_names(text: str | None) -> tuple[str, ...]:
    """Parse ``"missing_slice, junk"`` into ``("missing_slice", "junk")``."""
    if not text:
        return ()
    return tuple(v.strip() for v in text.split(",") if v.strip())
