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
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import statistics
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
    args = ap.parse_args(argv)
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
        cases = [("uncompressed", False)] + ([] if args.no_rle else [("rle", True)])
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
