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
"""

from medres.synth.core import (
    PHI_CANARY_BIRTH_DATE,
    PHI_CANARY_MARKER,
    GroundTruth,
    SeriesPlan,
    SynthResult,
    TruthRow,
    generate,
    ground_truth,
    load_result,
    plan_series,
    render,
)
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
