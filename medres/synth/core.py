"""Planning, rendering, writing and ground truth of synthetic study sets."""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import logging
import os
import shutil
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medres import progress
from medres.errors import ConfigError, ManifestError
from medres.io import atomic_write_json, atomic_write_text
from medres.synth import phantom as P
from medres.synth import spec as S
from medres.synth import writers as W
from medres.synth.spec import SynthSpec

log = logging.getLogger(__name__)

PHI_CANARY_MARKER = "PHICANARY"
PHI_CANARY_BIRTH_DATE = "19010101"

MANUFACTURERS = {
    "ct": [
        ("SIEMENS", "SOMATOM Definition AS"),
        ("GE MEDICAL SYSTEMS", "Revolution CT"),
        ("Philips", "iCT 256"),
        ("Canon Medical Systems", "Aquilion ONE"),
    ],
    "mr": [
        ("SIEMENS", "Avanto"),
        ("GE MEDICAL SYSTEMS", "SIGNA Artist"),
        ("Philips Medical Systems", "Ingenia"),
    ],
    "xray": [
        ("Carestream Health", "DRX-Evolution"),
        ("FUJIFILM Corporation", "FCR"),
        ("AGFA", "DX-D 400"),
    ],
    "us": [("GE Healthcare", "LOGIQ E10"), ("Philips", "EPIQ 7"), ("SIEMENS", "ACUSON Sequoia")],
    "sc": [("medres-synth", "PACS screenshot")],
}
TRUTH_FIELDS = [
    "patient_id",
    "study_uid",
    "series_uid",
    "label",
    "kind",
    "modality",
    "defect",
    "defect_detail",
    "n_lesions",
    "lesion_x",
    "lesion_y",
    "lesion_z",
    "lesion_radius_mm",
    "lesion_value",
    "lesions",
    "shape",
    "spacing",
    "oblique",
    "photometric",
    "manufacturer",
    "accession",
    "series_index",
    "n_files",
    "paths",
]


@dataclass(frozen=True)
class SeriesPlan:
    """Everything about one series that is drawn from the seed (pixels are rendered later)."""

    index: int
    kind: str
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    age: str
    other_ids: str
    study_uid: str
    study_id: str
    study_date: str
    study_time: str
    accession: str
    institution: str
    referring: str
    study_description: str
    series_uid: str
    series_number: int
    series_description: str
    frame_uid: str
    label: int
    modality: str
    manufacturer: str
    model_name: str
    body_part: str
    kernel: str
    geometry: P.Geometry
    anatomy: P.Anatomy
    lesions: tuple[P.Lesion, ...]
    distractors: tuple[P.Lesion, ...]
    intercept: float
    slope: float
    has_rescale: bool
    photometric: str
    ascending: bool
    oblique: bool
    folder: str
    defect: str = ""
    defect_detail: str = ""
    defect_slice: int = -1
    noise_key: int = 0


@dataclass(frozen=True)
class TruthRow:
    """One planted series/image as written to ``truth.csv`` (lesion centres in world LPS mm)."""

    patient_id: str
    study_uid: str
    series_uid: str
    label: int
    kind: str
    modality: str
    defect: str
    defect_detail: str
    n_lesions: int
    lesion_x: float | None
    lesion_y: float | None
    lesion_z: float | None
    lesion_radius_mm: float | None
    lesion_value: float | None
    lesions: tuple[tuple[float, float, float, float], ...]
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    oblique: bool
    photometric: str
    manufacturer: str
    accession: str
    series_index: int
    n_files: int
    paths: tuple[str, ...]

    def to_csv(self) -> dict[str, str]:
        def f(v: float | None) -> str:
            return "" if v is None else f"{v:.4f}"

        formatted = {
            "lesion_x": f(self.lesion_x),
            "lesion_y": f(self.lesion_y),
            "lesion_z": f(self.lesion_z),
            "lesion_radius_mm": f(self.lesion_radius_mm),
            "lesion_value": f(self.lesion_value),
            "lesions": ";".join(" ".join(f"{v:.4f}" for v in les) for les in self.lesions),
            "shape": "x".join(str(v) for v in self.shape),
            "spacing": "x".join(f"{v:g}" for v in self.spacing),
            "oblique": "1" if self.oblique else "0",
            "paths": ";".join(self.paths),
        }
        return {k: formatted[k] if k in formatted else str(getattr(self, k)) for k in TRUTH_FIELDS}

    @classmethod
    def from_csv(cls, d: dict[str, str]) -> TruthRow:
        def f(v: str) -> float | None:
            return None if v == "" else float(v)

        return cls(
            patient_id=d["patient_id"],
            study_uid=d["study_uid"],
            series_uid=d["series_uid"],
            label=int(d["label"]),
            kind=d["kind"],
            modality=d["modality"],
            defect=d["defect"],
            defect_detail=d["defect_detail"],
            n_lesions=int(d["n_lesions"]),
            lesion_x=f(d["lesion_x"]),
            lesion_y=f(d["lesion_y"]),
            lesion_z=f(d["lesion_z"]),
            lesion_radius_mm=f(d["lesion_radius_mm"]),
            lesion_value=f(d["lesion_value"]),
            lesions=tuple(tuple(float(v) for v in s.split()) for s in d["lesions"].split(";") if s),  # type: ignore[misc]
            shape=tuple(int(v) for v in d["shape"].split("x")),
            spacing=tuple(float(v) for v in d["spacing"].split("x")),
            oblique=d["oblique"] == "1",
            photometric=d["photometric"],
            manufacturer=d["manufacturer"],
            accession=d["accession"],
            series_index=int(d["series_index"]),
            n_files=int(d["n_files"]),
            paths=tuple(p for p in d["paths"].split(";") if p),
        )


@dataclass(frozen=True)
class SynthResult:
    """What :func:`generate` wrote. Paths in ``truth`` rows are relative to ``out_dir``."""

    spec: SynthSpec
    out_dir: Path
    data_dir: Path
    labels_csv: Path
    truth_csv: Path
    truth: tuple[TruthRow, ...]
    archive: Path | None
    junk: tuple[Path, ...]
    n_files: int
    seconds: float

    def row(self, series_uid: str) -> TruthRow:
        for r in self.truth:
            if r.series_uid == series_uid:
                return r
        raise ManifestError(
            f"the requested series is not in {self.truth_csv}; pick a series_uid from that file"
        )

    def files(self, series_uid: str) -> list[Path]:
        return [self.out_dir / p for p in self.row(series_uid).paths]


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


def lps_sr_c_to_ras_xyz(aff_src: np.ndarray) -> np.ndarray:
    """Turn an (s, r, c)->LPS affine into the (c, r, s)->RAS affine NIfTI uses."""
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1  # (c, r, s) -> (s, r, c)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff_src @ perm


# ----------------------------------------------------------------------------- planning
def _labels(spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    n = spec.n_patients
    n_pos = round(spec.prevalence * n)
    k = spec.n_classes - 1
    labels = np.zeros(n, dtype=int)
    labels[:n_pos] = 1 + (np.arange(n_pos) % k)
    return rng.permutation(labels)


def _uid(*parts: object) -> str:
    return W._uid(*parts)


def _place(
    rng: np.random.Generator,
    kind: str,
    g: P.Geometry,
    an: P.Anatomy,
    r: float,
    taken: list[P.Lesion],
) -> tuple[float, float, float]:
    fx, fy, fz = g.fov()
    for _ in range(500):
        z = 0.0
        if kind == "xray":
            side = rng.choice([-1, 1])
            ex, ey = 0.15 * fx - r, 0.3 * fy - r
            if ex <= 0 or ey <= 0:
                break
            x = an.cx + side * 0.2 * fx + rng.uniform(-ex, ex)
            y = an.cy - 0.05 * fy + rng.uniform(-ey, ey)
            ok = ((x - an.cx - side * 0.2 * fx) / ex) ** 2 + (
                (y - an.cy + 0.05 * fy) / ey
            ) ** 2 <= 1
        elif kind == "us":
            depth = rng.uniform(0.3, 0.75) * fy
            ang = np.radians(rng.uniform(-25, 25))
            x = depth * np.sin(ang)
            y = -fy / 2 + 0.02 * fy + depth * np.cos(ang)
            ok = (
                depth - r > 0.15 * fy
                and depth + r < 0.85 * fy
                and abs(np.degrees(ang)) + np.degrees(r / depth) < 32
            )
        else:
            ea, eb = 0.88 * an.a - r, 0.88 * an.b - r
            if ea <= 0 or eb <= 0:
                break
            x = an.cx + rng.uniform(-ea, ea)
            y = an.cy + rng.uniform(-eb, eb)
            spine = np.hypot(x - an.cx, y - an.cy - 0.62 * an.b) > 0.2 * an.b + r
            ok = ((x - an.cx) / ea) ** 2 + ((y - an.cy) / eb) ** 2 <= 1 and bool(spine)
            if g.slices > 1:
                half = fz / 2 - r - g.slice_sp
                z = rng.uniform(-half, half) if half > 0 else 0.0
        if ok and all(
            np.hypot(np.hypot(x - t.x, y - t.y), z - t.z) > r + t.radius + 2.0 for t in taken
        ):
            return float(x), float(y), float(z)
    raise ConfigError(
        f"synth could not place a {r:.1f} mm lesion inside the {kind} phantom; "
        "lower lesion_radius_mm or raise shape/spacing"
    )


def _anatomy(spec: SynthSpec, g: P.Geometry, rng: np.random.Generator) -> P.Anatomy:
    d = spec.difficulty
    fx, fy, _ = g.fov()
    jit = 0.04 + 0.08 * d
    u = lambda: rng.uniform(-1, 1)  # noqa: E731
    kind = "ct" if spec.kind in ("nifti", "sc") else spec.kind
    noise = P.NOMINAL_NOISE[kind] * (0.5 + 2 * d)
    if kind == "xray":
        a, b, tex, gain = 0.42 * fx, 0.45 * fy, 30 + 120 * d, rng.uniform(0.9, 1.1)
    elif kind == "us":
        a, b, tex, gain = 0.3 * fx, 0.2 * fy, 10 + 30 * d, rng.uniform(0.85, 1.15)
        noise = min(1.0, noise)
    else:
        a, b = 0.40 * fx, 0.30 * fy
        tex = (5 + 25 * d) if kind == "ct" else (20 + 80 * d)
        gain = 1 + 0.2 * u() if kind == "mr" else 1.0
    return P.Anatomy(
        a=float(a * (1 + jit * u())),
        b=float(b * (1 + jit * u())),
        cx=float(0.03 * fx * u()),
        cy=float(0.03 * fy * u()),
        shift=tuple(float((5 + 15 * d) * u()) for _ in range(6)),
        texture=float(tex),
        noise=float(noise),
        gain=float(gain),
    )


def _geometry(spec: SynthSpec, oblique: bool, rng: np.random.Generator) -> P.Geometry:
    shape, sp = spec.resolved_shape(), spec.resolved_spacing()
    if spec.dims == 2:
        return P.Geometry(
            shape[0],
            shape[1],
            1,
            sp[0],
            sp[1],
            1.0,
            (1.0, 0.0, 0.0),
            (0.0, 0.0, -1.0),
            (0.0, 0.0, 0.0),
        )
    rows, cols, slices = shape
    row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    if oblique:
        axis = rng.standard_normal(3)
        rot = P.rotation(axis, rng.uniform(10, 25))
        row_dir, col_dir = rot @ row_dir, rot @ col_dir
    g0 = P.Geometry(
        rows, cols, slices, sp[0], sp[1], sp[2], tuple(row_dir), tuple(col_dir), (0.0, 0.0, 0.0)
    )
    centre = np.array([rng.uniform(-10, 10), rng.uniform(-10, 10), rng.uniform(-300, 100)])
    mid = g0.affine_lps()[:3, :3] @ np.array([(slices - 1) / 2, (rows - 1) / 2, (cols - 1) / 2])
    origin = np.round(centre - mid, 4)
    return dataclasses.replace(g0, origin=tuple(float(v) for v in origin))


def _identity(spec: SynthSpec, p: int, s: int, rng: np.random.Generator) -> dict[str, str]:
    canary = spec.phi_canary
    age = int(rng.integers(25, 90))
    year = int(rng.integers(2012, 2025))
    date = f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    return {
        "patient_id": f"{PHI_CANARY_MARKER}{p + 1:05d}"
        if canary
        else f"SYN{spec.seed % 10000:04d}{p + 1:05d}",
        "patient_name": f"{PHI_CANARY_MARKER}^ZELDA^{p + 1}"
        if canary
        else f"SYNTH^PATIENT{p + 1:05d}",
        "birth_date": PHI_CANARY_BIRTH_DATE if canary else f"{year - age}0101",
        "sex": "MF"[int(rng.integers(0, 2))],
        "age": f"{age:03d}Y",
        "other_ids": f"{PHI_CANARY_MARKER}-OTHER-{p + 1:05d}" if canary else "",
        "study_date": date,
        "study_time": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
        "accession": f"{PHI_CANARY_MARKER}{p + 1:05d}{s}"
        if canary
        else f"A{spec.seed % 1000:03d}{p + 1:05d}{s}",
        "institution": f"{PHI_CANARY_MARKER} GENERAL HOSPITAL" if canary else "SYNTHETIC HOSPITAL",
        "referring": f"{PHI_CANARY_MARKER}^DOCTOR" if canary else "",
    }


def _lesions(
    spec: SynthSpec, g: P.Geometry, an: P.Anatomy, n: int, rng: np.random.Generator
) -> tuple[list[P.Lesion], list[P.Lesion]]:
    kind = "ct" if spec.kind in ("nifti", "sc") else spec.kind
    d = spec.difficulty
    lo, hi = spec.resolved_radius()
    contrast = P.NOMINAL_CONTRAST[kind] * spec.resolved_contrast() * (1 - 0.6 * d)
    base = P.SOFT_VALUE[kind]
    taken: list[P.Lesion] = []
    lesions: list[P.Lesion] = []
    for _ in range(n):
        r = float(rng.uniform(lo, hi))
        x, y, z = _place(rng, kind, g, an, r, taken)
        les = P.Lesion(x, y, z, r, float(base + contrast * rng.uniform(0.7, 1.0)))
        lesions.append(les)
        taken.append(les)
    distractors: list[P.Lesion] = []
    for i in range(round(1 + 6 * d)):
        bright = i % 2 == 0
        r = float(lo * (rng.uniform(0.3, 0.5) if bright else rng.uniform(0.5, 0.9)))
        try:
            x, y, z = _place(rng, kind, g, an, r, taken)
        except ConfigError:
            continue
        if bright:
            value = base + 0.9 * contrast
        else:
            value = {"ct": 5.0, "mr": 120.0, "xray": -0.3 * contrast, "us": 20.0}[kind]
        les = P.Lesion(x, y, z, r, float(value), distractor=True)
        distractors.append(les)
        taken.append(les)
    return lesions, distractors


def plan_series(spec: SynthSpec) -> list[SeriesPlan]:
    """Draw every series of the set from ``spec.seed`` (cheap; no pixels; memoised per spec)."""
    return list(_plan_series_cached(spec.validated()))


@functools.lru_cache(maxsize=8)
def _plan_series_cached(spec: SynthSpec) -> tuple[SeriesPlan, ...]:
    master = np.random.default_rng([spec.seed, 0])
    labels = _labels(spec, master)
    n_series = spec.n_patients * spec.studies_per_patient
    n_obl = round(spec.oblique * n_series) if spec.dims == 3 else 0
    oblique = set(master.permutation(n_series)[:n_obl].tolist())
    n_m1 = round(spec.monochrome1_fraction * n_series) if spec.kind == "xray" else 0
    mono1 = set(master.permutation(n_series)[:n_m1].tolist())
    planted = [m for m in spec.messy if m not in S.GLOBAL_DEFECTS]
    defect_of = dict(
        zip(master.permutation(n_series)[: len(planted)].tolist(), planted, strict=True)
    )
    kind_key = "ct" if spec.kind == "nifti" else spec.kind
    plans: list[SeriesPlan] = []
    for p in range(spec.n_patients):
        for s in range(spec.studies_per_patient):
            i = p * spec.studies_per_patient + s
            rng = np.random.default_rng([spec.seed, 1, i])
            ident = _identity(spec, p, s, rng)
            g = _geometry(spec, i in oblique, rng)
            an = _anatomy(spec, g, rng)
            lesions, distractors = _lesions(spec, g, an, int(labels[p]), rng)
            maker, model = MANUFACTURERS[kind_key][int(rng.integers(len(MANUFACTURERS[kind_key])))]
            intercept, slope, has_rescale = 0.0, 1.0, False
            if spec.kind in ("ct", "nifti"):
                intercept, has_rescale = (
                    float(rng.choice([-1024.0, -1024.0, -1024.0, -1000.0, 0.0])),
                    True,
                )
                if spec.kind == "nifti":
                    intercept = 0.0  # NIfTI stores HU directly (scl_slope 1, scl_inter 0)
            elif spec.kind == "mr" and rng.random() < 0.35:
                slope, has_rescale = float(np.round(rng.uniform(0.5, 3.0), 4)), True
            modality = spec.info.modality
            if spec.kind == "xray" and rng.random() < 0.4:
                modality = "CR"
            photometric = "MONOCHROME1" if i in mono1 else "MONOCHROME2"
            if spec.kind in ("us", "sc"):
                photometric = "RGB"
            study_uid = _uid(spec.seed, "study", p, s, ident["patient_id"])
            series_uid = _uid(spec.seed, "series", p, s, ident["patient_id"])
            defect = defect_of.get(i, "")
            dslice = g.slices // 2 if spec.dims == 3 else 0
            detail = {
                "missing_slice": f"slice {dslice} (0-based along the normal) not written",
                "duplicate_slice": f"slice {dslice} written twice",
                "localizer": "coronal localizer with the same series UID added",
                "uneven_spacing": f"slices above {dslice} shifted by {0.5 * g.slice_sp:g} mm",
                "truncated": "one file cut to 60% of its length",
                "no_preamble": "written without preamble and file meta, implicit VR",
                "two_series": "shares its folder with a second series of the same study",
            }.get(defect, "")
            plans.append(
                SeriesPlan(
                    index=i,
                    kind=spec.kind,
                    **ident,
                    study_uid=study_uid,
                    study_id=f"{s + 1}",
                    study_description={
                        "ct": "CT CHEST ABDOMEN",
                        "nifti": "CT CHEST ABDOMEN",
                        "mr": "MR ABDOMEN",
                        "xray": "XR CHEST PA",
                        "us": "US ABDOMEN",
                        "sc": "CT KEY IMAGES",
                    }[spec.kind],
                    series_uid=series_uid,
                    series_number=2 if spec.dims == 3 else 1,
                    series_description={
                        "ct": "Abdomen 3.0 B30f",
                        "nifti": "Abdomen",
                        "mr": "T1 AX",
                        "xray": "PA",
                        "us": "Liver",
                        "sc": "Screenshot",
                    }[spec.kind],
                    frame_uid=_uid(spec.seed, "for", p, s),
                    label=int(labels[p]),
                    modality=modality,
                    manufacturer=maker,
                    model_name=model,
                    body_part={"xray": "CHEST", "us": "ABDOMEN"}.get(spec.kind, "CHEST"),
                    kernel=str(rng.choice(["B30f", "STANDARD", "FC08", "B"])),
                    geometry=g,
                    anatomy=an,
                    lesions=tuple(lesions),
                    distractors=tuple(distractors),
                    intercept=intercept,
                    slope=slope,
                    has_rescale=has_rescale,
                    photometric=photometric,
                    ascending=bool(rng.random() < 0.5),
                    oblique=i in oblique,
                    folder=f"{ident['patient_id']}/ST{s + 1:03d}/SE{2 if spec.dims == 3 else 1:03d}",
                    defect=defect,
                    defect_detail=detail,
                    defect_slice=dslice,
                    noise_key=i,
                )
            )
    # two_series: a second series of the same study written into the same folder
    for i, pl in enumerate(plans[:n_series]):
        if pl.defect == "two_series":
            plans.append(
                dataclasses.replace(
                    pl,
                    index=len(plans),
                    series_uid=_uid(pl.series_uid, "second"),
                    series_number=pl.series_number + 1,
                    series_description=pl.series_description + " (2)",
                    noise_key=n_series + i,
                    ascending=not pl.ascending,
                )
            )
    return tuple(plans)


# ---------------------------------------------------------------------------- rendering
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


# ----------------------------------------------------------------------------- writing
class _Namer:
    """File names: tidy ``folder/IM00001.dcm`` or, with shuffle_names, random nested ones."""

    def __init__(self, root: Path, plan: SeriesPlan, spec: SynthSpec, shuffle: bool) -> None:
        self.root, self.plan, self.shuffle = root, plan, shuffle
        self.rng = np.random.default_rng([spec.seed, 3, plan.noise_key])

    def __call__(self, inst: int, suffix: str) -> Path:
        if self.shuffle:
            h = self.rng.bytes(10).hex()
            return self.root / h[:2] / h[2:4] / h[4:]
        # the second series of a `two_series` study shares the folder: give it its own names
        prefix = "IMB" if self.plan.series_description.endswith(" (2)") else "IM"
        return self.root / self.plan.folder / f"{prefix}{inst:05d}{suffix}.dcm"


def _write_one(spec: SynthSpec, plan: SeriesPlan, root: Path, shuffle: bool) -> list[Path]:
    stored, _ = render(spec, plan)
    namer = _Namer(root, plan, spec, shuffle)
    if spec.kind == "nifti":
        paths = W.write_nifti(
            plan, stored, root / plan.patient_id / f"{plan.patient_id}_study{plan.study_id}.nii.gz"
        )
    elif spec.dims == 3 and spec.multiframe:
        paths = W.write_multiframe(plan, stored, namer, spec.compression)
    elif spec.dims == 3:
        paths = W.write_volume(plan, stored, namer, spec.compression)
    else:
        inst = 2 if plan.series_description.endswith("(2)") else 1
        paths = W.write_2d(plan, stored, namer, spec.compression, inst=inst)
    if plan.defect == "truncated":
        victim = paths[len(paths) // 2]
        data = victim.read_bytes()
        victim.write_bytes(data[: int(len(data) * 0.6)])
    return paths


def _write_junk(spec: SynthSpec, root: Path, plans: list[SeriesPlan], shuffle: bool) -> list[Path]:
    rng = np.random.default_rng([spec.seed, 4])
    folder = (
        root / (plans[0].folder if not shuffle and spec.kind != "nifti" else "") if plans else root
    )
    if spec.kind == "nifti":
        folder = root / plans[0].patient_id
    items = {
        root / "README.TXT": b"Exported by SYNTHETIC PACS viewer. Not for diagnostic use.\r\n",
        root / ".DS_Store": b"\x00\x00\x00\x01Bud1" + rng.bytes(500),
        folder / "Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + rng.bytes(1000),
        folder / "preview.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + rng.bytes(800) + b"\xff\xd9",
        folder / "DATA0001": rng.bytes(2048),
        folder / "EMPTY": b"",
    }
    for path, data in items.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return list(items)


def _archive(data_dir: Path, out_dir: Path, kind: str) -> Path:
    """Pack ``data_dir`` (member names start with its folder name) reproducibly."""
    files = sorted(p for p in data_dir.rglob("*") if p.is_file())
    base = data_dir.name
    if kind == "zip":
        path = out_dir / f"{base}.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for f in files:
                info = zipfile.ZipInfo(
                    f"{base}/{f.relative_to(data_dir).as_posix()}", date_time=(2020, 1, 1, 0, 0, 0)
                )
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, f.read_bytes())
        return path
    path = out_dir / (f"{base}.tar" if kind == "tar" else f"{base}.tar.gz")
    buf = open(path, "wb")  # noqa: SIM115 - wrapped by gzip below when needed
    import gzip

    fh = (
        gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=1)
        if kind == "tar.gz"
        else buf
    )
    try:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for f in files:
                data = f.read_bytes()
                info = tarfile.TarInfo(f"{base}/{f.relative_to(data_dir).as_posix()}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tf.addfile(info, io.BytesIO(data))
    finally:
        if fh is not buf:
            fh.close()
        buf.close()
    return path


def _truth_row(spec: SynthSpec, plan: SeriesPlan, paths: list[Path], out_dir: Path) -> TruthRow:
    g = plan.geometry
    world = [
        (*plan.geometry.local_to_world(np.array([le.x, le.y, le.z])).tolist(), le.radius)
        for le in plan.lesions
    ]
    first = plan.lesions[0] if plan.lesions else None
    return TruthRow(
        patient_id=plan.patient_id,
        study_uid=plan.study_uid,
        series_uid=plan.series_uid,
        label=plan.label,
        kind=spec.kind,
        modality=plan.modality,
        defect=plan.defect,
        defect_detail=plan.defect_detail,
        n_lesions=len(plan.lesions),
        lesion_x=world[0][0] if world else None,
        lesion_y=world[0][1] if world else None,
        lesion_z=world[0][2] if world else None,
        lesion_radius_mm=first.radius if first else None,
        lesion_value=first.value if first else None,
        lesions=tuple(tuple(round(v, 4) for v in w) for w in world),  # type: ignore[misc]
        shape=(g.rows, g.cols, g.slices) if spec.dims == 3 else (g.rows, g.cols),
        spacing=(g.row_sp, g.col_sp, g.slice_sp) if spec.dims == 3 else (g.row_sp, g.col_sp),
        oblique=plan.oblique,
        photometric=plan.photometric,
        manufacturer=plan.manufacturer,
        accession=plan.accession,
        series_index=plan.index,
        n_files=len(paths),
        paths=tuple(p.relative_to(out_dir).as_posix() for p in paths),
    )


def _prepare_out(out_dir: Path, root: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"synth output {out_dir} is not a folder; pass a folder path to --out")
    produced = [
        root,
        out_dir / "labels.csv",
        out_dir / "truth.csv",
        out_dir / "synth.json",
        *(out_dir / f"{root.name}.{ext}" for ext in S.ARCHIVES),
    ]
    existing = [p for p in produced if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"synth output {existing[0]} already exists; choose an empty --out folder or pass --overwrite"
        )
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    root.mkdir(parents=True, exist_ok=True)


def generate(
    spec: SynthSpec, out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> SynthResult:
    """Write a synthetic study set to ``out_dir`` and return what was written.

    Layout: ``out_dir/dicom/<PatientID>/STnnn/SEnnn/IMnnnnn.dcm`` (``nifti/<PatientID>/*.nii.gz``
    for NIfTI), ``labels.csv`` (patient_id,label; per patient), ``truth.csv`` (one row per
    written series, see :class:`TruthRow`), ``synth.json`` (the spec, counts, junk files) and
    ``dicom.zip``/``.tar``/``.tar.gz`` when ``spec.archive`` is set. Same spec and seed give
    byte-identical files.
    """
    out = Path(out_dir)
    try:
        return _generate(spec.validated(), out, overwrite)
    except OSError as exc:
        raise ConfigError(
            f"synth could not write under {out}: {exc.strerror or exc}; "
            "check free disk space and permissions"
        ) from exc


def _generate(spec: SynthSpec, out: Path, overwrite: bool) -> SynthResult:
    t0 = time.perf_counter()
    root = out / ("nifti" if spec.kind == "nifti" else "dicom")
    _prepare_out(out, root, overwrite)
    plans = plan_series(spec)
    shuffle = "shuffle_names" in spec.messy
    rows: list[TruthRow] = []
    n_files = 0
    for plan in progress.track(plans, "synth", unit="series"):
        paths = _write_one(spec, plan, root, shuffle)
        n_files += len(paths)
        rows.append(_truth_row(spec, plan, paths, out))
    junk = _write_junk(spec, root, plans, shuffle) if "junk" in spec.messy else []
    labels: dict[str, int] = {}
    for pl in plans:
        labels.setdefault(pl.patient_id, pl.label)
    atomic_write_text(
        out / "labels.csv", "patient_id,label\n" + "".join(f"{k},{v}\n" for k, v in labels.items())
    )
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=TRUTH_FIELDS, lineterminator="\n")
    wr.writeheader()
    for r in rows:
        wr.writerow(r.to_csv())
    atomic_write_text(out / "truth.csv", buf.getvalue())
    archive = _archive(root, out, spec.archive) if spec.archive else None
    seconds = time.perf_counter() - t0
    atomic_write_json(
        out / "synth.json",
        {
            "format": "medres-synth/1",
            "spec": spec.to_dict(),
            "n_series": len(rows),
            "n_files": n_files,
            "n_patients": len(labels),
            "junk": [p.relative_to(out).as_posix() for p in junk],
            "archive": archive.relative_to(out).as_posix() if archive else None,
            "data_dir": root.relative_to(out).as_posix(),
        },
    )
    log.info("synth: %d series, %d files in %.1f s -> %s", len(rows), n_files, seconds, root)
    return SynthResult(
        spec,
        out,
        root,
        out / "labels.csv",
        out / "truth.csv",
        tuple(rows),
        archive,
        tuple(junk),
        n_files,
        seconds,
    )


def load_result(out_dir: str | os.PathLike[str]) -> SynthResult:
    """Re-open a set written by :func:`generate` (reads ``synth.json`` and ``truth.csv``)."""
    out = Path(out_dir)
    meta_path = out / "synth.json"
    if not meta_path.exists():
        raise ManifestError(f"{meta_path} is missing; point at a folder written by `medres synth`")
    meta = json.loads(meta_path.read_text())
    spec = SynthSpec.from_dict(meta["spec"])
    with open(out / "truth.csv", newline="") as fh:
        rows = tuple(TruthRow.from_csv(r) for r in csv.DictReader(fh))
    return SynthResult(
        spec,
        out,
        out / meta["data_dir"],
        out / "labels.csv",
        out / "truth.csv",
        rows,
        out / meta["archive"] if meta.get("archive") else None,
        tuple(out / p for p in meta.get("junk", [])),
        int(meta["n_files"]),
        0.0,
    )
