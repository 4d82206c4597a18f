"""DICOM series -> NIfTI on disk: medres vs SimpleITK, dicom2nifti and MONAI.

The same synthetic CT series (default 200 slices of 512x512 int16, a realistic header of
~90 elements, HU rescale) is written uncompressed and as an RLE Lossless copy, then turned
into one NIfTI file by:

- ``medres``: :func:`medres.ingest.dicom.convert_series` (header scan -> group/validate ->
  load -> write), ``--workers`` processes/threads;
- ``sitk``: SimpleITK ``ImageSeriesReader`` (GDCM, C++) + ``WriteImage``;
- ``dicom2nifti``: ``dicom_series_to_nifti`` (pydicom + nibabel, reorients);
- ``monai``: ``LoadImage(reader="PydicomReader")`` + ``nibabel.save`` of its array/affine.

Plus the header scan alone: medres ``scan_headers`` (1 worker) vs a bare
``pydicom.dcmread(stop_before_pixels=True)`` loop.

Runs alternate between tools (tool order rotates each repeat, page cache warm) and each
figure is the median of ``--repeats`` runs, reported per file (ms) with ratios
``tool / medres`` (> 1 means medres is faster).

Usage::

    python benchmarks/ingest.py                       # 200 x 512 x 512, 5 repeats, .nii
    python benchmarks/ingest.py --slices 40 --size 256 --repeats 3 --ext .nii.gz
    python benchmarks/ingest.py --tools medres,sitk --no-rle

Targets (issue 3): medres per file <= SimpleITK; >= 3x faster than dicom2nifti and MONAI;
header scan within 1.3x of the bare ``stop_before_pixels`` loop.

**The whole command against dcm2niix** (issue 15; skipped with a note when ``dcm2niix`` is
not on PATH, ``--no-peer`` skips it): ``medres -q ingest SRC --out OUT`` and
``dcm2niix -z n -b y -o OUT SRC`` as subprocesses, wall clock of the whole command
(interpreter start-up, imports, worker pool, writing included), alternating, page cache
warm, fresh output folders, best and median of ``--peer-repeats`` runs, on

- (a) ``ct``: one 512x512 CT series of ``--peer-slices`` (150) files;
- (b) ``export``: a synthetic MR export of ``--export-series`` (1,800) series of 28 slices
  of 64x64 in patient/series folders (50,400 files; ``--quick``: 200 series), generated
  once and cached under ``--cache`` (default ``$TMPDIR/medres-bench-cache``);
- (c) ``dcm_qa_nih``: ``../shared/data/dcm_qa_nih/In`` (GE and Siemens MR; skipped when
  absent).

Like with like: both write uncompressed ``.nii`` (medres' default; dcm2niix ``-z n``) plus
their metadata (dcm2niix its BIDS sidecars, medres manifest/errors/ingest.json);
``--peer-gz`` compares ``--compress`` with ``-z y -1`` instead (both gzip level 1). The ratio printed is
``dcm2niix time / medres time`` (>= 1.0: medres no slower; target of issue 15 on every
row, and a 150-file series in under 0.5 s), with the machine's load average
(``os.getloadavg``) before and after each row. ``--quick`` shrinks the export and the
repeats only; rows (a) and (c) keep their sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOOLS = ("medres", "sitk", "dicom2nifti", "monai")


# ------------------------------------------------------------------------------ data
def make_series(folder: Path, n: int, size: int, rle: bool, seed: int = 0) -> list[Path]:
    """A CT-like series: body ellipse with organs + noise, int16 stored, intercept -1024."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    body = (xx / 0.45) ** 2 + (yy / 0.35) ** 2 < 1
    organ = ((xx - 0.1) / 0.12) ** 2 + ((yy + 0.05) / 0.1) ** 2 < 1
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(n):
        img = np.where(body, 1024 + 40, 24).astype(np.int16)
        img[organ] += int(60 + 40 * np.sin(k / 10))
        img += rng.normal(0, 12, img.shape).astype(np.int16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        for kw, v in {
            "StudyDate": "20240101",
            "SeriesDate": "20240101",
            "AcquisitionDate": "20240101",
            "ContentDate": "20240101",
            "StudyTime": "101010",
            "SeriesTime": "101200",
            "AcquisitionTime": "101201",
            "ContentTime": "101202",
            "AccessionNumber": "ACC123",
            "Modality": "CT",
            "Manufacturer": "ACME",
            "InstitutionName": "General Hospital",
            "ReferringPhysicianName": "Doe^John",
            "StationName": "CT01",
            "StudyDescription": "CT CHEST",
            "SeriesDescription": "AXIAL 1.25 STD",
            "ManufacturerModelName": "Scanner 9000",
            "PatientName": "Test^Patient",
            "PatientID": "P0001",
            "PatientBirthDate": "19600101",
            "PatientSex": "M",
            "PatientAge": "064Y",
            "BodyPartExamined": "CHEST",
            "SliceThickness": "1.25",
            "KVP": "120",
            "DataCollectionDiameter": "500",
            "SoftwareVersions": "1.0",
            "ReconstructionDiameter": "360",
            "DistanceSourceToDetector": "1040",
            "DistanceSourceToPatient": "570",
            "GantryDetectorTilt": "0",
            "TableHeight": "150",
            "RotationDirection": "CW",
            "ExposureTime": "500",
            "XRayTubeCurrent": "200",
            "Exposure": "100",
            "FilterType": "BODY",
            "GeneratorPower": "24000",
            "FocalSpots": "1.2",
            "ConvolutionKernel": "STANDARD",
            "PatientPosition": "FFS",
            "StudyInstanceUID": study,
            "SeriesInstanceUID": series,
            "StudyID": "1",
            "SeriesNumber": "3",
            "AcquisitionNumber": "1",
            "InstanceNumber": str(k + 1),
            "FrameOfReferenceUID": frame,
            "PositionReferenceIndicator": "SN",
            "SliceLocation": f"{-k * 1.25:.2f}",
            "SamplesPerPixel": 1,
            "PhotometricInterpretation": "MONOCHROME2",
            "Rows": size,
            "Columns": size,
            "BitsAllocated": 16,
            "BitsStored": 16,
            "HighBit": 15,
            "PixelRepresentation": 1,
            "WindowCenter": "40",
            "WindowWidth": "400",
            "RescaleIntercept": "-1024",
            "RescaleSlope": "1",
            "RescaleType": "HU",
        }.items():
            setattr(ds, kw, v)
        ds.ImagePositionPatient = ["-180.0", "-180.0", f"{-k * 1.25:.2f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = ["0.703125", "0.703125"]
        ds.PixelData = img.tobytes()
        if rle:
            try:
                ds.compress(RLELossless, encoding_plugin="pylibjpeg")
            except Exception:  # plugin missing: pydicom's own encoder
                ds.compress(RLELossless)
        p = folder / f"IM{k:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    del pydicom
    return paths


# ------------------------------------------------------------------------------ tools
def run_medres(paths: list[Path], out: Path, workers: int) -> None:
    from medres.ingest.dicom import convert_series

    convert_series(paths, out, workers=workers)


def run_sitk(paths: list[Path], out: Path, workers: int) -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(workers)
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(paths[0].parent))
    reader.SetFileNames(names)
    img = reader.Execute()
    sitk.WriteImage(img, str(out))


def run_dicom2nifti(paths: list[Path], out: Path, workers: int) -> None:
    import dicom2nifti
    import dicom2nifti.settings as settings

    settings.disable_validate_slice_increment()
    with contextlib.redirect_stdout(io.StringIO()):
        dicom2nifti.dicom_series_to_nifti(str(paths[0].parent), str(out), reorient_nifti=True)


def run_monai(paths: list[Path], out: Path, workers: int) -> None:
    import nibabel as nib
    from monai.transforms import LoadImage

    img = LoadImage(reader="PydicomReader", image_only=True)(str(paths[0].parent))
    nib.save(nib.Nifti1Image(np.asarray(img), np.asarray(img.affine)), str(out))


RUNNERS: dict[str, Callable[[list[Path], Path, int], None]] = {
    "medres": run_medres,
    "sitk": run_sitk,
    "dicom2nifti": run_dicom2nifti,
    "monai": run_monai,
}


def scan_bare(paths: list[Path]) -> None:
    import pydicom

    for p in paths:
        pydicom.dcmread(p, stop_before_pixels=True)


def scan_medres(paths: list[Path]) -> None:
    from medres.ingest.dicom import scan_headers

    headers, rejected = scan_headers(paths, workers=1)
    if rejected or len(headers) != len(paths):
        raise RuntimeError(rejected[0].message)


# ------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_case(
    name: str, paths: list[Path], tools: list[str], args: argparse.Namespace, tmp: Path
) -> dict:
    times: dict[str, list[float]] = {t: [] for t in tools}
    outs = {t: tmp / f"{name}_{t}{args.ext}" for t in tools}
    for t in tools:  # warm-up: imports, page cache
        RUNNERS[t](paths, outs[t], args.workers)
    for r in range(args.repeats):
        order = tools[r % len(tools) :] + tools[: r % len(tools)]
        for t in order:
            outs[t].unlink(missing_ok=True)
            times[t].append(timed(lambda t=t: RUNNERS[t](paths, outs[t], args.workers)))
    n = len(paths)
    res = {t: statistics.median(v) / n * 1e3 for t, v in times.items()}
    print(
        f"\n{name}: {n} files of {args.size}x{args.size}, workers={args.workers}, out {args.ext}, "
        f"median of {args.repeats}"
    )
    base = res.get("medres")
    for t in tools:
        ratio = f"{res[t] / base:6.2f}x" if base else ""
        print(f"  {t:12s} {res[t]:8.2f} ms/file   {ratio}  (tool / medres)")
    if "medres" in tools and "sitk" in tools:
        _check_equal(outs["medres"], outs["sitk"])
    return {"case": name, "ms_per_file": res}


def _check_equal(a: Path, b: Path) -> None:
    """The medres and SimpleITK outputs hold the same voxels at the same world positions."""
    import nibabel as nib

    ia, ib = nib.as_closest_canonical(nib.load(a)), nib.as_closest_canonical(nib.load(b))
    same = np.array_equal(np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj))
    aff = np.allclose(ia.affine, ib.affine, atol=1e-3)
    print(f"  medres vs SimpleITK output: voxels equal={same}, affine equal={aff}")


def bench_scan(paths: list[Path], repeats: int) -> dict:
    scan_bare(paths)
    scan_medres(paths)
    bare, med = [], []
    for r in range(repeats):
        pair = [("bare", scan_bare), ("medres", scan_medres)]
        for name, fn in pair if r % 2 == 0 else pair[::-1]:
            (bare if name == "bare" else med).append(timed(lambda fn=fn: fn(paths)))
    n = len(paths)
    b, m = statistics.median(bare) / n * 1e3, statistics.median(med) / n * 1e3
    print(
        f"\nheader scan (1 worker): bare stop_before_pixels {b:.3f} ms/file, "
        f"medres scan_header {m:.3f} ms/file, ratio {m / b:.2f} (target <= 1.3)"
    )
    return {"bare_ms": b, "medres_ms": m, "ratio": m / b}


# ------------------------------------------------------------------------------ vs dcm2niix
REPO = Path(__file__).resolve().parents[1]
DCM_QA_NIH = REPO.parent / "shared" / "data" / "dcm_qa_nih" / "In"


def _uid(rng: np.random.Generator) -> str:
    """A 2.25 (UUID-derived) style UID of fixed length (25 characters) without the digit 9,
    so that it never holds the template's ``99999`` placeholder."""
    return "2.25." + "".join(str(d) for d in rng.integers(1, 9, 20))


def _mr_template(size: int, uids: dict[str, str], patient: int, series_no: int) -> bytes:
    """The bytes of one MR slice file up to its pixel values, with fixed-width placeholders
    (``99999`` instance number, ``+999.99`` z position, ``<series>.99999`` SOP instance)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPInstanceUID = uids["series"] + ".99999"
    ds = Dataset()
    ds.file_meta = meta
    for kw, v in {
        "SpecificCharacterSet": "ISO_IR 100",
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
        "SOPClassUID": MRImageStorage,
        "SOPInstanceUID": uids["series"] + ".99999",
        "StudyDate": "20240101",
        "SeriesDate": "20240101",
        "StudyTime": "101010",
        "SeriesTime": f"1015{series_no:02d}",
        "Modality": "MR",
        "Manufacturer": "ACME",
        "InstitutionName": "General Hospital",
        "StationName": "MR01",
        "StudyDescription": "MR BRAIN",
        "SeriesDescription": f"T2 AX {series_no}",
        "ManufacturerModelName": "Magnet 3T",
        "PatientName": f"Test^P{patient}",
        "PatientID": f"P{patient:05d}",
        "PatientBirthDate": "19700101",
        "PatientSex": "F",
        "PatientAge": "054Y",
        "BodyPartExamined": "HEAD",
        "ScanningSequence": "SE",
        "SequenceVariant": "SK",
        "MRAcquisitionType": "2D",
        "SliceThickness": "5",
        "RepetitionTime": "4000",
        "EchoTime": "90",
        "MagneticFieldStrength": "3",
        "SpacingBetweenSlices": "5",
        "ProtocolName": "t2_tse_tra",
        "PatientPosition": "HFS",
        "StudyInstanceUID": uids["study"],
        "SeriesInstanceUID": uids["series"],
        "StudyID": "1",
        "SeriesNumber": str(series_no),
        "AcquisitionNumber": "1",
        "InstanceNumber": "99999",
        "FrameOfReferenceUID": uids["frame"],
        "ImagePositionPatient": ["-115", "-115", "+999.99"],
        "SliceLocation": "+999.99",
        "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"],
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": size,
        "Columns": size,
        "BitsAllocated": 16,
        "BitsStored": 12,
        "HighBit": 11,
        "PixelRepresentation": 0,
        "PixelSpacing": ["3.59375", "3.59375"],
        "WindowCenter": "300",
        "WindowWidth": "600",
    }.items():
        setattr(ds, kw, v)
    ds.PixelData = b"\0" * (2 * size * size)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    return raw[: len(raw) - 2 * size * size]


def make_export(folder: Path, n_series: int, n_slices: int, size: int, seed: int = 0) -> int:
    """A synthetic MR export: ``Pnnnn/Snn/IMnnnn.dcm``, six series per patient, each
    ``n_slices`` uncompressed 12-bit slices of ``size``^2; returns the number of files.

    One pydicom-written template per series, its fixed-width placeholders replaced per slice
    (tens of thousands of files in seconds)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    head = (((xx / 0.4) ** 2 + (yy / 0.45) ** 2) < 1).astype(np.uint16) * 600
    n = 0
    study = ""
    for s in range(n_series):
        patient, sn = divmod(s, 6)
        if sn == 0:
            study = _uid(rng)
        uids = {"study": study, "series": _uid(rng), "frame": _uid(rng)}
        d = folder / f"P{patient:04d}" / f"S{sn + 1:02d}"
        d.mkdir(parents=True, exist_ok=True)
        hdr = _mr_template(size, uids, patient, sn + 1)
        placeholder = (uids["series"] + ".99999").encode()
        noise = rng.integers(0, 40, (n_slices, size, size), dtype=np.uint16)
        for k in range(n_slices):
            h = (
                hdr.replace(placeholder, f"{uids['series']}.{10001 + k}".encode())
                .replace(b"99999", f"{k + 1:5d}".encode())
                .replace(b"+999.99", f"{-70.0 + 5.0 * k:+07.2f}".encode())
            )
            pixels = (head + noise[k]).astype("<u2").tobytes()
            (d / f"IM{k + 1:04d}.dcm").write_bytes(h + pixels)
            n += 1
    return n


def _cached(folder: Path, n_files: int, make: Callable[[Path], int]) -> Path:
    """``folder`` holding ``n_files`` DICOM files: reused when complete, else made again."""
    stamp = folder.parent / f"{folder.name}.complete"  # outside: ingest would read it
    if stamp.is_file() and stamp.read_text().strip() == str(n_files):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    made = make(folder)
    stamp.write_text(str(made))
    print(f"made {made} files in {time.perf_counter() - t0:.1f} s: {folder}", flush=True)
    return folder


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - non-Unix
        return float("nan")


def _peer_commands(src: Path, out: Path, gz: bool) -> dict[str, list[str]]:
    medres = [sys.executable, "-m", "medres", "-q", "ingest", str(src), "--out", str(out / "m")]
    if gz:
        medres.append("--compress")
    d2n = [
        "dcm2niix",
        "-z",
        "y" if gz else "n",
        *(["-1"] if gz else []),  # gzip level 1, as medres --compress
        "-b",
        "y",
        "-f",
        "%j_%s",
        "-o",
        str(out / "d"),
        str(src),
    ]
    return {"medres": medres, "dcm2niix": d2n}


def _env(cache: Path) -> dict[str, str]:
    """The environment of the timed commands: bytecode caching on (``PYTHONPYCACHEPREFIX``
    under the cache folder), as in an installed package; a ``PYTHONDONTWRITEBYTECODE=1``
    environment would make every run compile medres' sources again (0.1-0.4 s)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(cache / "pycache")
    return env


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run_cmd(tool: str, cmd: list[str], out: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one whole command into a fresh output folder; CPU (user + sys
    of the process and the children it waited for) is less sensitive to a loaded machine,
    but leaves out medres' pool workers (children of its forkserver): compare it on rows
    medres runs in process."""
    target = out / ("m" if tool == "medres" else "d")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)  # dcm2niix needs its -o folder to exist
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO, env=env)
    dt, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{tool} failed (rc {proc.returncode}): {' | '.join(tail)}")
    return dt, cpu


def _outputs(out: Path) -> dict[str, int]:
    """How many images each tool wrote (a sanity check printed with the row)."""
    m = out / "m" / "manifest.csv"
    n_m = max(0, len(m.read_text().splitlines()) - 1) if m.is_file() else 0
    n_d = sum(1 for p in (out / "d").rglob("*") if p.name.endswith((".nii", ".nii.gz")))
    return {"medres": n_m, "dcm2niix": n_d}


def bench_peer(name: str, src: Path, n_files: int, args: argparse.Namespace, tmp: Path) -> dict:
    """One row: medres ingest vs dcm2niix on ``src``, whole commands, alternating."""
    out = tmp / f"peer_{name}"
    cmds = _peer_commands(src, out, args.peer_gz)
    env = _env(args.cache)
    load_before = _load()
    times: dict[str, list[float]] = {t: [] for t in cmds}
    cpus: dict[str, list[float]] = {t: [] for t in cmds}
    for t in cmds:  # warm-up: page cache, pyc files
        _run_cmd(t, cmds[t], out, env)
    for r in range(args.peer_repeats):
        for t in list(cmds)[:: 1 if r % 2 == 0 else -1]:
            wall, cpu = _run_cmd(t, cmds[t], out, env)
            times[t].append(wall)
            cpus[t].append(cpu)
    made = _outputs(out)
    load_after = _load()
    best = {t: min(v) for t, v in times.items()}
    med = {t: statistics.median(v) for t, v in times.items()}
    cpu_best = {t: min(v) for t, v in cpus.items()}
    ratio = best["dcm2niix"] / best["medres"]
    print(
        f"\n{name}: {n_files} files, whole command, best (median) of {args.peer_repeats}, "
        f"load {load_before:.1f}->{load_after:.1f}"
    )
    for t in cmds:
        print(
            f"  {t:9s} {best[t]:7.3f} s ({med[t]:.3f})  cpu {cpu_best[t]:.3f} s  "
            f"images written: {made[t]}"
        )
    print(f"  dcm2niix/medres time: {ratio:.2f}  (>= 1.0: medres no slower)")
    return {
        "case": name,
        "files": n_files,
        "best_s": best,
        "median_s": med,
        "cpu_s": cpu_best,
        "images": made,
        "ratio": ratio,
        "load": [load_before, load_after],
    }


def peer_rows(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Rows (a), (b), (c) against dcm2niix (see the module docstring)."""
    if shutil.which("dcm2niix") is None:
        print("\ndcm2niix not on PATH: the peer rows are skipped (apt-get install dcm2niix)")
        return []
    cache = args.cache
    wanted = set(args.rows.split(","))
    rows = []
    if "ct" in wanted:
        n_ct = args.peer_slices
        ct = _cached(
            cache / f"ct_{n_ct}x512",
            n_ct,
            lambda f: len(make_series(f, n_ct, 512, rle=False)),
        )
        rows.append(bench_peer("ct", ct, n_ct, args, tmp))
    if "export" in wanted:
        n_series = min(200, args.export_series) if args.quick else args.export_series
        n_exp = n_series * 28
        export = _cached(
            cache / f"export_{n_series}x28x64", n_exp, lambda f: make_export(f, n_series, 28, 64)
        )
        rows.append(bench_peer("export", export, n_exp, args, tmp))
    if "dcm_qa_nih" not in wanted:
        return rows
    if DCM_QA_NIH.is_dir():
        n_qa = sum(1 for p in DCM_QA_NIH.rglob("*") if p.is_file())
        rows.append(bench_peer("dcm_qa_nih", DCM_QA_NIH, n_qa, args, tmp))
    else:
        print(f"\n{DCM_QA_NIH} absent: row (c) skipped")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ext", default=".nii", choices=[".nii", ".nii.gz"])
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--no-rle", action="store_true", help="skip the RLE copy")
    ap.add_argument("--data", type=Path, help="reuse/keep the generated series here")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--quick", action="store_true", help="smaller export, fewer peer repeats")
    ap.add_argument("--no-peer", action="store_true", help="skip the rows against dcm2niix")
    ap.add_argument("--peer-only", action="store_true", help="only the rows against dcm2niix")
    ap.add_argument("--rows", default="ct,export,dcm_qa_nih", help="peer rows to run")
    ap.add_argument("--peer-slices", type=int, default=150, help="files of row (a)")
    ap.add_argument("--export-series", type=int, default=1800, help="series of row (b)")
    ap.add_argument("--peer-repeats", type=int, default=0, help="default 5 (--quick: 3)")
    ap.add_argument("--peer-gz", action="store_true", help="--compress vs dcm2niix -z y")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "medres-bench-cache",
        help="generated peer corpora are kept here",
    )
    args = ap.parse_args(argv)
    args.peer_repeats = args.peer_repeats or (3 if args.quick else 5)
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    tools = [t for t in args.tools.split(",") if t]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        ap.error(f"unknown tools {sorted(unknown)}; known: {', '.join(TOOLS)}")
    tmp = Path(tempfile.mkdtemp(prefix="medres_bench_"))
    data = args.data or tmp / "data"
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        if not args.no_peer:
            results["peer"] = peer_rows(args, tmp)
            results["peer_machine"] = {"cores": os.cpu_count()}
        cases = [("uncompressed", False)] + ([] if args.no_rle else [("rle", True)])
        if args.peer_only:
            cases = []
        for name, rle in cases:
            folder = data / f"{name}_{args.slices}x{args.size}"
            paths = sorted(folder.glob("*.dcm"))
            if len(paths) != args.slices:
                shutil.rmtree(folder, ignore_errors=True)
                t0 = time.perf_counter()
                paths = make_series(folder, args.slices, args.size, rle)
                print(f"made {name} series in {time.perf_counter() - t0:.1f} s: {folder}")
            if name == "uncompressed":
                results["scan"] = bench_scan(paths, args.repeats)
            results[name] = bench_case(name, paths, tools, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
