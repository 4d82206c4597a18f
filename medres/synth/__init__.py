"""Synthetic study sets that look like hospital exports, with a learnable finding.

``generate(SynthSpec(kind="ct", n_patients=20), out_dir)`` writes DICOM (one file per
slice, or Enhanced multi-frame), 2D radiographs/ultrasound/secondary captures or NIfTI
volumes, plus ``labels.csv`` (patient_id,label), ``truth.csv`` (one row per written
series: UIDs, label, defect, lesion centres in world LPS mm, paths) and ``synth.json``.

Choices made:

* Everything is drawn from ``spec.seed`` through per-series random streams, so a series'
  pixels do not depend on how many others exist, and the same spec writes byte-identical
  files (UIDs are hashes of the seed; no clocks; archives use fixed timestamps).
* :func:`ground_truth` recomputes a series' intended pixels from the seed instead of keeping
  volumes in memory or on disk: cheap, and exact because rendering is deterministic.
* The phantom is a torso (fat rim, soft tissue, lungs, liver, kidneys, aorta, spine) in
  CT/MR, a chest PA radiograph, an abdominal ultrasound fan or a rendered CT screenshot.
  The finding is a soft-edged sphere/disc painted with a known value (CT +100 HU over soft
  tissue at ``lesion_contrast=1``, faded by ``difficulty``) placed inside the body; small
  bright and dark distractors and smooth texture keep it from being trivial.
* Messy exports (:data:`DEFECTS`) are planted in recorded series (``truth.csv`` ``defect``),
  junk files are listed in ``synth.json``.

Modules, lowest first (each imports only those above it, plus the core ``medres.errors``,
``medres.io`` and ``medres.progress``): ``spec`` (what to make, registries), ``phantom``
(geometry, anatomy, pixel painters), ``plan`` (which series, patients, labels, lesions and
defects), ``truth`` (``truth.csv``, ``labels.csv``, :class:`SynthResult`), ``render``
(pixels of a plan, :func:`ground_truth`), ``writers`` (DICOM/NIfTI files) and ``build``
(:func:`generate`). The synth layer sits on the core only.
"""

from medres.synth.build import generate
from medres.synth.plan import (
    PHI_CANARY_BIRTH_DATE,
    PHI_CANARY_MARKER,
    SeriesPlan,
    plan_series,
)
from medres.synth.render import GroundTruth, ground_truth, render
from medres.synth.spec import (
    ARCHIVES,
    COMPRESSIONS,
    DEFECTS,
    KINDS,
    SynthSpec,
    available_compressions,
    parse_names,
    parse_tuple,
)
from medres.synth.truth import SynthResult, TruthRow, load_result

__all__ = [
    "ARCHIVES",
    "COMPRESSIONS",
    "DEFECTS",
    "KINDS",
    "PHI_CANARY_BIRTH_DATE",
    "PHI_CANARY_MARKER",
    "GroundTruth",
    "SeriesPlan",
    "SynthResult",
    "SynthSpec",
    "TruthRow",
    "available_compressions",
    "generate",
    "ground_truth",
    "load_result",
    "parse_names",
    "parse_tuple",
    "plan_series",
    "render",
]
