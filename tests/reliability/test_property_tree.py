"""Property test: random trees of files, names and archives through ingest (#16).

A seeded generator builds input trees of valid DICOM and NIfTI files, exact DICOM copies,
junk, empty and truncated files, in folders and in zip / tar / tar.gz archives (a zip
inside a tar, two zip members of one name), under names that are plain, Unicode (NFD,
CJK, emoji), long (200 characters) or carry the patient's identity (name, ID and
accession in folder and file names, also full-width and in another case). Every DICOM
carries the same patient (the canaries) in its header. For each tree ingest must:

* keep the accounting identity ``seen = used + rejected + skipped``, with ``seen`` equal to
  the number of generated inputs (files and archive members) and each input named exactly
  once in manifest.csv or errors.csv (by its expected name, unless that name carries
  identity and so is pseudonymised);
* write no identity canary (NFKC-casefolded) into any output file: the CSVs, ingest.json,
  the cache and the NIfTI headers.

Default mode: 3 trees of about 14 inputs (a few seconds). Long mode
(``MEDRES_RELIABILITY_LONG=1`` or ``--reliability-long``): 40 trees of about 40 inputs.
A failure names the seed: ``MEDRES_PROPERTY_SEED=<seed>`` replays that one tree.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import unicodedata
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers.models import write_dicom_2d
from pydicom.uid import generate_uid

from medres.ingest.pipeline import IngestConfig, run_ingest
from medres.io import csv_dict_reader

pytestmark = pytest.mark.reliability

PATIENT_ID = "MRN4711CANARY"
PATIENT_NAME = "Canarysson^Zoë"
ACCESSION = "ACC9911CANARY"
# what no output may contain, compared NFKC-casefolded
CANARIES = ("mrn4711canary", "canarysson", "acc9911canary")
# names carrying identity: the patient's own tokens in other spellings
PHI_NAMES = (
    PATIENT_ID,
    PATIENT_ID.lower(),
    "ＭＲＮ４７１１ＣＡＮＡＲＹ",  # full-width
    "Canarysson_Zoe\u0308",  # NFD
    f"{ACCESSION} chest",
    "CANARYSSON",
)
PLAIN_NAMES = ("scan", "series 2", "胸部", "röntgen", "x🩻ray", "L" * 200, "a.b.c", "-dash")


@dataclass
class Tree:
    """The generated inputs: ``expected`` maps each input's expected source name to
    whether that name carries identity (then it is pseudonymised and not looked up)."""

    expected: dict[str, bool] = field(default_factory=dict)
    dicoms: list[bytes] = field(default_factory=list)


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("proptree")
    dcm = write_dicom_2d(
        root / "t.dcm",
        study_uid="1.2.826.0.1.3680043.8.498.1",
        series_uid="1.2.826.0.1.3680043.8.498.1.1",
        size=8,
        patient_id=PATIENT_ID,
        accession=ACCESSION,
    )
    ds = pydicom.dcmread(dcm)
    ds.PatientName = PATIENT_NAME
    ds.save_as(dcm)
    nii = root / "t.nii"
    arr = np.random.default_rng(0).integers(0, 500, size=(8, 8)).astype(np.int16)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(nii))
    return {"dicom": dcm.read_bytes(), "nifti": nii.read_bytes()}


def _new_dicom(templates: dict[str, bytes]) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(templates["dicom"]))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _content(rng: random.Random, tree: Tree, templates: dict[str, bytes]) -> tuple[str, bytes]:
    """(suffix, bytes) of one random input."""
    kind = rng.choice(["dicom", "dicom", "dicom", "nifti", "nifti", "dup", "junk", "empty", "cut"])
    if kind == "dup" and tree.dicoms:
        return ".dcm", rng.choice(tree.dicoms)  # an exact copy: duplicate_input
    if kind in ("dicom", "dup"):
        data = _new_dicom(templates)
        tree.dicoms.append(data)
        return rng.choice([".dcm", "", ".DCM"]), data
    if kind == "nifti":
        return ".nii", templates["nifti"]
    if kind == "junk":
        return rng.choice([".txt", ".dcm", ""]), rng.randbytes(rng.randint(1, 600))
    if kind == "cut":
        return ".nii", templates["nifti"][: rng.randint(10, 340)]
    return rng.choice([".dcm", ".nii", ""]), b""


def _name(rng: random.Random, taken: set[str]) -> tuple[str, bool]:
    phi = rng.random() < 0.25
    base = rng.choice(PHI_NAMES if phi else PLAIN_NAMES)
    name = base
    while name in taken or unicodedata.normalize("NFC", name) in taken:
        name = f"{base}_{rng.randint(0, 9999)}"
    taken.add(name)
    return name, phi


def _archive_members(rng, tree, templates, n) -> list[tuple[str, bytes, bool]]:
    members, taken, names = [], set(), set()
    for _ in range(n):
        depth = rng.randint(0, 1)
        parts, phi = [], False
        for _ in range(depth):
            p, ph = _name(rng, set())
            parts.append(p[:60])
            phi |= ph
        leaf, ph = _name(rng, taken)
        suffix, data = _content(rng, tree, templates)
        name = "/".join([*parts, leaf[:60] + suffix])
        while name in names:  # cut long names may meet: keep member names distinct
            name = f"{len(names)}{name}"
        names.add(name)
        members.append((name, data, phi or ph))
    return members


def _write_archive(rng, path: Path, members, prefix: str, phi_path: bool, tree: Tree) -> None:
    kind = rng.choice(["zip", "zip_dup", "tar", "tgz", "nested"])
    path = path.with_name(path.name + {"zip": ".zip", "zip_dup": ".zip", "tar": ".tar",
                                       "tgz": ".tar.gz", "nested": ".tar"}[kind])  # fmt: skip
    rel = f"{prefix}{path.name}"
    if kind.startswith("zip"):
        with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, data, ph in members:
                zf.writestr(name, data)
                tree.expected[f"{rel}!{name}"] = phi_path or ph
            if kind == "zip_dup" and members:  # a second member of the same name
                name, data, ph = members[0]
                zf.writestr(name, data if not data.startswith(b"\x00" * 128) else b"x")
                tree.expected[f"{rel}!{name}#2"] = phi_path or ph
        return
    mode = "w:gz" if kind == "tgz" else "w"
    with tarfile.open(path, mode) as tf:
        if kind == "nested":
            inner = io.BytesIO()
            with zipfile.ZipFile(inner, "w") as zf:
                for name, data, ph in members:
                    zf.writestr(name, data)
                    tree.expected[f"{rel}!inner.zip!{name}"] = phi_path or ph
            members = [("inner.zip", inner.getvalue(), None)]
        for name, data, ph in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            if ph is not None:
                tree.expected[f"{rel}!{name}"] = phi_path or ph


def make_tree(root: Path, seed: int, n_inputs: int, templates: dict[str, bytes]) -> Tree:
    """A random input tree of about ``n_inputs`` inputs below ``root``."""
    rng = random.Random(seed)
    tree = Tree()
    folders: list[tuple[Path, str, bool]] = [(root, "", False)]
    taken: dict[Path, set[str]] = {}
    while len(tree.expected) < n_inputs:
        parent, prefix, phi_parent = rng.choice(folders)
        name, phi = _name(rng, taken.setdefault(parent, set()))
        phi |= phi_parent
        roll = rng.random()
        if roll < 0.2 and prefix.count("/") < 3:
            (parent / name).mkdir()
            folders.append((parent / name, f"{prefix}{name}/", phi))
        elif roll < 0.4:
            members = _archive_members(rng, tree, templates, rng.randint(1, 4))
            _write_archive(rng, parent / name, members, prefix, phi, tree)
        else:
            suffix, data = _content(rng, tree, templates)
            (parent / (name + suffix)).write_bytes(data)
            tree.expected[f"{prefix}{name}{suffix}"] = phi
    return tree


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv_dict_reader(fh))  # medres's CSVs escape formula starts


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _output_texts(out: Path):
    for p in out.rglob("*"):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.name.endswith(".nii"):
            data = data[:352]  # the header (descrip, aux_file, intent_name)
        elif p.name.endswith(".nii.gz"):
            continue  # compressed voxels: nothing textual
        yield p, data.decode("utf-8", "replace")


def check_tree(src: Path, out: Path, tree: Tree, seed: int) -> int:
    """Ingest ``src`` and assert the accounting identity and the canaries; returns
    the number of inputs."""
    run_ingest(IngestConfig((src,), out, isolate=False, workers=1))
    files = json.loads((out / "ingest.json").read_text())["files"]
    used = [r["source"] for r in _rows(out / "manifest.csv")]
    errors = [r["source"] for r in _rows(out / "errors.csv")]
    where = f"seed {seed} (replay: MEDRES_PROPERTY_SEED={seed})"
    assert files["seen"] == files["used"] + files["rejected"] + files["skipped"], (where, files)
    named = used + errors
    assert len(named) == len(set(named)), (where, sorted(named))
    assert files["seen"] == len(tree.expected) == len(named), (
        where, files, sorted(set(tree.expected) - set(named)), sorted(set(named) - set(tree.expected))
    )  # fmt: skip
    missing = [s for s, phi in tree.expected.items() if not phi and s not in named]
    assert not missing, (where, missing, sorted(named))
    for path, text in _output_texts(out):
        folded = _fold(text)
        leaked = [c for c in CANARIES if c in folded]
        assert not leaked, (where, str(path.relative_to(out)), leaked)
    return len(tree.expected)


def _plan(long: bool) -> list[tuple[int, int]]:
    """(seed, inputs) per tree."""
    if os.environ.get("MEDRES_PROPERTY_SEED"):
        return [(int(os.environ["MEDRES_PROPERTY_SEED"]), 40 if long else 14)]
    return [(seed, 40) for seed in range(100, 140)] if long else [(1, 14), (2, 14), (3, 14)]


def test_random_trees_keep_the_accounting_and_leak_no_identity(
    templates, tmp_path, reliability_long
):
    total = 0
    for seed, n in _plan(reliability_long):
        src, out = tmp_path / f"src{seed}", tmp_path / f"ds{seed}"
        src.mkdir()
        tree = make_tree(src, seed, n, templates)
        total += check_tree(src, out, tree, seed)
    assert total >= 14
