"""Fuzzing ingest and score with seeded mutations of real DICOM and NIfTI files.

Promise: every input ends as an image or as a coded rejection. No uncaught exception
(decoder panics included), no case over 10 s or 1 GiB (the isolated workers run with a
10 s per-item limit and a 1 GiB address-space limit, so a case over either limit shows up
as a ``timeout`` failure), and no silent pixel loss (a file with an image SOP class and
pixel data is never skipped as ``not_image``; a decoded image holds Rows x Columns pixels
per frame).

How the cases run (cheap per case, so a few thousand fit in CI):

* mutated files are written to one folder; header scans go through ingest's
  :class:`~medres.workers.IsolatedPool` in chunks (``scan_task``, exactly what
  ``run_ingest`` sends to its workers);
* each header is grouped on its own in this process (``group_stacks``, which ingest runs in
  its main process: an exception there would abort a whole ingest, so it is checked
  strictly);
* every stack and NIfTI file is decoded through the pool (``decode_task``: decode + NIfTI
  write, as ingest does);
* a pool failure whose message starts with ``unexpected`` is an exception that the per-file
  functions did not turn into an :class:`~medres.errors.IngestError`: counted as a bug.

End to end, a mutated set goes through ``medres ingest`` and ``medres score`` (CLI
subprocesses): exit 0, no traceback, every file accounted for with a stable code.

Seeds: 24 of pydicom's bundled test files (all transfer syntaxes, colour, multi-frame,
non-image objects) plus synthetic radiographs (native, RLE, JPEG-LS), CT slices and NIfTI
files. CI mode: 80 cases per seed; long mode: every bundled file under 64 KiB, 400 cases
per seed and two base seeds.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from fuzz_mutations import case_rng, mutate
from pydicom.data import get_testdata_files

from medres.errors import IngestError
from medres.ingest import dicom
from medres.ingest.codes import Code
from medres.ingest.dicom import fields as dicom_fields
from medres.ingest.pipeline import SKIP_CODES
from medres.ingest.records import ImageRecord
from medres.ingest.tasks import DecodeJob, decode_task, scan_task
from medres.workers import IsolatedPool

pytestmark = pytest.mark.reliability

CODES = {c.value for c in Code}
TIME_LIMIT_S = 10.0
MEMORY_LIMIT_MB = 1024
CI_CASES_PER_SEED = 120
LONG_CASES_PER_SEED = 400
LONG_BASE_SEEDS = (0, 1)

PYDICOM_SEEDS = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
    "JPEG-lossy.dcm",
    "JPGExtended.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_small_odd.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "image_dfl.dcm",
    "liver_1frame.dcm",
    "no_meta.dcm",
    "ExplVR_BigEndNoMeta.dcm",
    "rtdose_rle_1frame.dcm",
    "test-SR.dcm",
    "693_J2KI.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
)
MAX_SEED_BYTES = 64 * 1024
# seeds that are not decodable images to begin with (non-image objects, or a lossy JPEG
# that the installed decoders refuse): they exercise the rejection paths
NOT_IMAGE_SEEDS = {
    "JPEG-lossy.dcm",
    "liver_1frame.dcm",
    "no_meta.dcm",
    "ExplVR_BigEndNoMeta.dcm",
    "rtdose_rle_1frame.dcm",
    "test-SR.dcm",
}


def _pydicom_seeds(long: bool) -> list[Path]:
    files = sorted({Path(f) for f in get_testdata_files()}, key=lambda p: p.name)
    files = [p for p in files if p.is_file() and p.stat().st_size <= MAX_SEED_BYTES]
    if long:
        return files
    by_name = {p.name: p for p in files}
    return [by_name[n] for n in PYDICOM_SEEDS if n in by_name]


@pytest.fixture(scope="session")
def seed_files(synth_factory, reliability_long: bool, tmp_path_factory) -> list[Path]:
    """The seed corpus: pydicom's files plus a few synthetic DICOM and NIfTI files."""
    seeds = _pydicom_seeds(reliability_long)
    for spec in (
        dict(kind="xray", n_patients=2, shape=(24, 20), seed=21),
        dict(kind="xray", n_patients=2, shape=(24, 20), compression="rle", seed=22),
        dict(kind="xray", n_patients=2, shape=(24, 20), compression="jpegls", seed=23),
        dict(kind="ct", n_patients=1, shape=(16, 16, 4), seed=24),
    ):
        res = synth_factory(**spec)
        seeds.append(sorted(res.data_dir.rglob("*.dcm"))[0])
    nii = synth_factory(kind="nifti", n_patients=1, shape=(12, 12, 4), seed=25)
    gz = sorted(nii.data_dir.rglob("*.nii.gz"))[0]
    seeds.append(gz)
    # an uncompressed .nii too, so mutations reach the NIfTI header rather than gzip
    raw = tmp_path_factory.mktemp("nii_seed") / "plain.nii"
    nib.save(nib.load(gz), raw)
    seeds.append(raw)
    return seeds


@dataclass
class CaseResult:
    case: str
    stage: str  # scan | group | decode | ok
    code: str
    message: str


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


def _write_cases(seeds: list[Path], n: int, base_seed: int, folder: Path) -> dict[str, str]:
    """Write ``n`` mutated cases per seed; returns case file name -> mutators applied."""
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    for s_i, seed in enumerate(seeds):
        data = seed.read_bytes()
        for i in range(n):
            out, names = mutate(data, case_rng(seed.name, i, base_seed))
            name = f"s{s_i:03d}_c{i:04d}{_suffix(seed)}"
            (folder / name).write_bytes(out)
            made[name] = f"{seed.name}#{i}@{base_seed}:{'+'.join(names)}"
    return made


def _is_image_with_pixels(path: Path) -> bool:
    """Independent check with pydicom: an image SOP class that carries pixel data."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=False)
            sop = str(ds.get("SOPClassUID", "") or "")
            has_pixels = "PixelData" in ds
    except BaseException:
        return False
    if not sop or any(sop.startswith(p) for p in dicom_fields.NON_IMAGE_PREFIXES):
        return False
    return has_pixels and dicom_fields.is_image_class(sop)


def _check_image(rec: ImageRecord, header, out_path: Path) -> str | None:
    """A decoded image must be complete: the NIfTI holds every pixel of the header."""
    arr = np.asarray(nib.load(out_path).dataobj)
    shape = [int(s) for s in rec.shape.split("x")]
    channels = int(rec.channels)
    want = int(np.prod(shape)) * (channels if channels > 1 else 1)
    if arr.size != want:
        return f"NIfTI holds {arr.size} values, manifest shape says {want}"
    if header is not None and sorted(shape[:2]) != sorted([header.cols, header.rows]):
        return f"shape {shape} does not match Rows x Columns {header.rows} x {header.cols}"
    if header is not None:
        frames = header.number_of_frames
        if int(np.prod(shape)) != header.rows * header.cols * frames:
            return f"{np.prod(shape)} pixels decoded, header needs {header.rows}x{header.cols}x{frames}"
    return None


def run_cases(folder: Path, out: Path, key: bytes = b"k" * 32) -> tuple[list[CaseResult], dict]:
    """Scan, group and decode every file of ``folder`` the way ``run_ingest`` does."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    out.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    stats: Counter[str] = Counter()
    policy = dicom.GeometryPolicy(min_slices=1)
    t0 = time.monotonic()
    with IsolatedPool(2, timeout_s=TIME_LIMIT_S, memory_mb=MEMORY_LIMIT_MB) as pool:
        scans = pool.map(scan_task, [(p, p.name) for p in files], chunk_size=32)
        stats["scan_s"] = round(time.monotonic() - t0)
        jobs: list[tuple[str, DecodeJob, object]] = []
        for path, (ok, val) in zip(files, scans, strict=True):
            if not ok:
                results.append(CaseResult(path.name, "scan", val.code, val.message))
                continue
            if val.kind == "nifti":
                payload = (path, path.name)
                jobs.append((path.name, _job("nifti", payload, path, out, key), None))
                continue
            try:
                stacks, rejections = dicom.group_stacks([val.header], policy)
            except IngestError as exc:  # allowed, but group_stacks should return rejections
                results.append(CaseResult(path.name, "group", str(exc.code), str(exc)))
                continue
            except BaseException as exc:
                results.append(
                    CaseResult(path.name, "group", "uncaught", f"unexpected {type(exc).__name__}")
                )
                continue
            for rej in rejections:
                results.append(CaseResult(path.name, "group", str(rej.code), rej.message))
            for n, stack in enumerate(stacks):
                job = _job("dicom", stack, path, out, key, n)
                jobs.append((path.name, job, val.header))
        t1 = time.monotonic()
        decoded = pool.map(decode_task, [j for _, j, _ in jobs], chunk_size=1)
        stats["decode_s"] = round(time.monotonic() - t1)
    for (name, job, header), (ok, val) in zip(jobs, decoded, strict=True):
        if not ok:
            results.append(CaseResult(name, "decode", val.code, val.message))
            continue
        problem = _check_image(val, header, job.out_path)
        results.append(CaseResult(name, "ok", "pixel_loss" if problem else "", problem or ""))
    stats["files"] = len(files)
    stats["decode_jobs"] = len(jobs)
    return results, dict(stats)


def _job(kind: str, payload, path: Path, out: Path, key: bytes, n: int = 0) -> DecodeJob:
    image_id = f"img-{path.name.replace('.', '_')}-{n}"
    return DecodeJob(
        kind, payload, image_id, out / f"{image_id}.nii.gz", f"images/{image_id}.nii.gz",
        key, 1, (path.name,),
    )  # fmt: skip


def _violations(results: list[CaseResult], folder: Path, made: dict[str, str]) -> list[str]:
    bad = []
    for r in results:
        why = None
        if r.code == "uncaught" or r.message.startswith("unexpected"):
            why = "uncaught exception"
        elif r.code == Code.TIMEOUT.value:
            why = f"over {TIME_LIMIT_S:g} s or {MEMORY_LIMIT_MB} MiB"
        elif r.code == "pixel_loss":
            why = "silent pixel loss"
        elif r.code and r.code not in CODES:
            why = "unknown code"
        elif r.code in SKIP_CODES and _is_image_with_pixels(folder / r.case):
            why = f"image with pixel data skipped as {r.code}"
        elif r.message and "\n" in r.message:
            why = "multi-line message"
        if why:
            bad.append(f"{made.get(r.case, r.case)} [{r.stage}] {why}: {r.code} {r.message}")
    return bad


def _fuzz(seeds: list[Path], n: int, base_seed: int, tmp: Path) -> dict:
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    folder = tmp / f"cases{base_seed}"
    made = _write_cases(seeds, n, base_seed, folder)
    results, stats = run_cases(folder, tmp / f"images{base_seed}")
    bad = _violations(results, folder, made)
    outcomes = Counter(r.code or "image" for r in results)
    # every case ends somewhere: an image or at least one coded rejection
    assert {r.case for r in results} == set(made), "cases without an outcome"
    assert not bad, f"{len(bad)} of {len(made)} cases broke a promise:\n" + "\n".join(bad[:40])
    return {"cases": len(made), "outcomes": dict(outcomes), **stats}


def test_fuzz_ingest_per_file(seed_files, reliability_long, tmp_path, record_property):
    """A few thousand mutated files: every one an image or a coded rejection, in limits."""
    n = LONG_CASES_PER_SEED if reliability_long else CI_CASES_PER_SEED
    base_seeds = LONG_BASE_SEEDS if reliability_long else (0,)
    t0 = time.monotonic()
    for base in base_seeds:
        summary = _fuzz(seed_files, n, base, tmp_path)
        record_property(f"fuzz_seed{base}", json.dumps(summary))
        logging.getLogger(__name__).info("fuzz base seed %d: %s", base, summary)
        assert summary["cases"] == n * len(seed_files)
        # the corpus exercises both sides: images survive some mutations, most are rejected
        assert summary["outcomes"].get("image", 0) > 0
        assert sum(v for k, v in summary["outcomes"].items() if k != "image") > 0
    record_property("fuzz_seconds", round(time.monotonic() - t0, 1))


def test_unmutated_seeds_decode(seed_files, reliability_long, tmp_path):
    """Control: the seed corpus itself decodes (so the fuzz cases start from real images)."""
    folder = tmp_path / "seeds"
    folder.mkdir()
    names = {}
    for i, s in enumerate(seed_files):
        names[f"seed{i:03d}{_suffix(s)}"] = s.name
        shutil.copy(s, folder / f"seed{i:03d}{_suffix(s)}")
    results, _ = run_cases(folder, tmp_path / "images")
    decoded = {names[r.case] for r in results if r.stage == "ok" and not r.code}
    assert reliability_long or decoded == {s.name for s in seed_files} - NOT_IMAGE_SEEDS, [
        (names[r.case], r.code) for r in results if r.code
    ]
    assert not _violations(results, folder, names)


# ---------------------------------------------------------------------------------------
# end to end: a mutated set through the CLI


def _medres(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "medres", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def mutated_set(seed_files, tmp_path_factory) -> Path:
    """~10 mutated copies per seed plus the intact seeds, in one folder."""
    tmp = tmp_path_factory.mktemp("e2e")
    folder = tmp / "in"
    _write_cases(seed_files, 10, 99, folder)
    for i, s in enumerate(seed_files):
        shutil.copy(s, folder / f"seed{i:03d}{_suffix(s)}")
    return folder


def test_ingest_cli_on_mutated_set(mutated_set: Path, tmp_path: Path):
    out = tmp_path / "ds"
    r = _medres("-v", "ingest", str(mutated_set), "--out", str(out), "--workers", "2",
                "--file-timeout", "10", "--worker-memory-mb", "1024", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout
    info = json.loads((out / "ingest.json").read_text())
    files = info["files"]
    n_files = len(list(mutated_set.iterdir()))
    assert files["seen"] == n_files
    assert files["used"] + files["rejected"] + files["skipped"] == n_files
    with open(out / "errors.csv", newline="") as fh:
        errors = list(csv.DictReader(fh))
    assert len(errors) == files["rejected"] + files["skipped"]
    assert len({e["source"] for e in errors}) == len(errors)
    assert {e["code"] for e in errors} <= CODES
    assert Code.TIMEOUT.value not in {e["code"] for e in errors}
    assert not any(e["message"].startswith("unexpected") for e in errors), [
        e for e in errors if e["message"].startswith("unexpected")
    ]
    with open(out / "manifest.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == info["images"] > 0


def test_score_cli_on_mutated_set(mutated_set: Path, tmp_path: Path):
    from helpers.models import write_model_dir

    model = write_model_dir(tmp_path / "model", image_size=(16, 16))
    out = tmp_path / "scores"
    args = ("-v", "score", str(model), str(mutated_set), "--out", str(out), "--workers", "1",
            "--batch-size", "16", "--precision", "fp32", "--device", "cpu")  # fmt: skip
    r = _medres(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(out / "errors.csv", newline="") as fh:
        errors = list(csv.DictReader(fh))
    assert rows and {r["status"] for r in rows} <= {"ok", "error"}
    assert any(r["status"] == "ok" for r in rows)
    assert len(errors) == sum(r["status"] == "error" for r in rows)
    assert {e["code"] for e in errors} <= CODES
    # every file is behind a row: its own, or a stack's (common source) for DICOM series
    sources = {r["source"] for r in rows}
    n_files = len(list(mutated_set.iterdir()))
    assert len(sources) <= n_files
    assert sum(r["status"] == "ok" for r in rows) + len(errors) == len(rows)
