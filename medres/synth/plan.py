"""Planning of a synthetic study set: which patients, studies and series to make, with
their labels, identities, scanners, geometry, anatomy, lesions and planted defects.

Everything is drawn from ``spec.seed`` through per-series random streams, so a series'
plan does not depend on how many others exist; no pixels are made here
(:mod:`medres.synth.render` paints them from a :class:`SeriesPlan`).

Imports: numpy, pydicom's UID generator, ``medres.errors`` and, within the package,
:mod:`~medres.synth.spec` and :mod:`~medres.synth.phantom`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
from pydicom.uid import generate_uid

from medres.errors import ConfigError
from medres.synth import phantom as P
from medres.synth import spec as S
from medres.synth.spec import SynthSpec

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
STUDY_DESCRIPTIONS = {
    "ct": "CT CHEST ABDOMEN",
    "nifti": "CT CHEST ABDOMEN",
    "mr": "MR ABDOMEN",
    "xray": "XR CHEST PA",
    "us": "US ABDOMEN",
    "sc": "CT KEY IMAGES",
}
SERIES_DESCRIPTIONS = {
    "ct": "Abdomen 3.0 B30f",
    "nifti": "Abdomen",
    "mr": "T1 AX",
    "xray": "PA",
    "us": "Liver",
    "sc": "Screenshot",
}


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


# ----------------------------------------------------------------------------- drawing
def uid(*parts: object) -> str:
    """A DICOM UID that is a hash of ``parts`` (same parts, same UID; no clocks)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _labels(spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    n = spec.n_patients
    n_pos = round(spec.prevalence * n)
    k = spec.n_classes - 1
    labels = np.zeros(n, dtype=int)
    labels[:n_pos] = 1 + (np.arange(n_pos) % k)
    return rng.permutation(labels)


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


@dataclass(frozen=True)
class _SetDraws:
    """What the set-level random stream decides: labels and which series are special."""

    labels: np.ndarray  # one label per patient
    oblique: frozenset[int]  # series indices with a tilted orientation
    mono1: frozenset[int]  # series indices stored MONOCHROME1
    defect_of: dict[int, str]  # series index -> planted defect


def _set_draws(spec: SynthSpec) -> _SetDraws:
    master = np.random.default_rng([spec.seed, 0])
    labels = _labels(spec, master)
    n_series = spec.n_patients * spec.studies_per_patient
    n_obl = round(spec.oblique * n_series) if spec.dims == 3 else 0
    oblique = frozenset(master.permutation(n_series)[:n_obl].tolist())
    n_m1 = round(spec.monochrome1_fraction * n_series) if spec.kind == "xray" else 0
    mono1 = frozenset(master.permutation(n_series)[:n_m1].tolist())
    planted = [m for m in spec.messy if m not in S.GLOBAL_DEFECTS]
    defect_of = dict(
        zip(master.permutation(n_series)[: len(planted)].tolist(), planted, strict=True)
    )
    return _SetDraws(labels, oblique, mono1, defect_of)


def _scanner(spec: SynthSpec, rng: np.random.Generator) -> dict[str, object]:
    """Manufacturer, rescale, modality, kernel and slice order (draws in this order)."""
    kind_key = "ct" if spec.kind == "nifti" else spec.kind
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
    return {
        "manufacturer": maker,
        "model_name": model,
        "intercept": intercept,
        "slope": slope,
        "has_rescale": has_rescale,
        "modality": modality,
        "kernel": str(rng.choice(["B30f", "STANDARD", "FC08", "B"])),
        "ascending": bool(rng.random() < 0.5),
    }


def _defect_detail(defect: str, dslice: int, g: P.Geometry) -> str:
    """The ``truth.csv`` ``defect_detail`` text of a planted defect ("" for none)."""
    return {
        "missing_slice": f"slice {dslice} (0-based along the normal) not written",
        "duplicate_slice": f"slice {dslice} written twice",
        "localizer": "coronal localizer with the same series UID added",
        "uneven_spacing": f"slices above {dslice} shifted by {0.5 * g.slice_sp:g} mm",
        "truncated": "one file cut to 60% of its length",
        "no_preamble": "written without preamble and file meta, implicit VR",
        "two_series": "shares its folder with a second series of the same study",
    }.get(defect, "")


def _plan_one(spec: SynthSpec, draws: _SetDraws, p: int, s: int) -> SeriesPlan:
    """Study ``s`` of patient ``p``, drawn from its own stream ``[seed, 1, index]``."""
    i = p * spec.studies_per_patient + s
    rng = np.random.default_rng([spec.seed, 1, i])
    ident = _identity(spec, p, s, rng)
    g = _geometry(spec, i in draws.oblique, rng)
    an = _anatomy(spec, g, rng)
    lesions, distractors = _lesions(spec, g, an, int(draws.labels[p]), rng)
    scanner = _scanner(spec, rng)
    photometric = "MONOCHROME1" if i in draws.mono1 else "MONOCHROME2"
    if spec.kind in ("us", "sc"):
        photometric = "RGB"
    defect = draws.defect_of.get(i, "")
    dslice = g.slices // 2 if spec.dims == 3 else 0
    series_number = 2 if spec.dims == 3 else 1
    return SeriesPlan(
        index=i,
        kind=spec.kind,
        **ident,
        study_uid=uid(spec.seed, "study", p, s, ident["patient_id"]),
        study_id=f"{s + 1}",
        study_description=STUDY_DESCRIPTIONS[spec.kind],
        series_uid=uid(spec.seed, "series", p, s, ident["patient_id"]),
        series_number=series_number,
        series_description=SERIES_DESCRIPTIONS[spec.kind],
        frame_uid=uid(spec.seed, "for", p, s),
        label=int(draws.labels[p]),
        body_part={"xray": "CHEST", "us": "ABDOMEN"}.get(spec.kind, "CHEST"),
        geometry=g,
        anatomy=an,
        lesions=tuple(lesions),
        distractors=tuple(distractors),
        photometric=photometric,
        oblique=i in draws.oblique,
        folder=f"{ident['patient_id']}/ST{s + 1:03d}/SE{series_number:03d}",
        defect=defect,
        defect_detail=_defect_detail(defect, dslice, g),
        defect_slice=dslice,
        noise_key=i,
        **scanner,  # type: ignore[arg-type]
    )


def _second_series(plans: list[SeriesPlan]) -> list[SeriesPlan]:
    """two_series: a second series of the same study, written into the same folder."""
    n_series = len(plans)
    extra: list[SeriesPlan] = []
    for i, pl in enumerate(plans):
        if pl.defect == "two_series":
            extra.append(
                dataclasses.replace(
                    pl,
                    index=n_series + len(extra),
                    series_uid=uid(pl.series_uid, "second"),
                    series_number=pl.series_number + 1,
                    series_description=pl.series_description + " (2)",
                    noise_key=n_series + i,
                    ascending=not pl.ascending,
                )
            )
    return extra


def plan_series(spec: SynthSpec) -> list[SeriesPlan]:
    """Draw every series of the set from ``spec.seed`` (cheap; no pixels; memoised per spec)."""
    return list(_plan_series_cached(spec.validated()))


@functools.lru_cache(maxsize=8)
def _plan_series_cached(spec: SynthSpec) -> tuple[SeriesPlan, ...]:
    draws = _set_draws(spec)
    plans = [
        _plan_one(spec, draws, p, s)
        for p in range(spec.n_patients)
        for s in range(spec.studies_per_patient)
    ]
    return tuple(plans + _second_series(plans))
