"""Quality benchmark: real MedMNIST v2 data -> ingest -> plan -> train -> evaluate.

For each data set the official split is exported the way a user's scans arrive
(BreastMNIST as one DICOM file per image, ultrasound, written with pydicom; AdrenalMNIST3D
as one NIfTI volume per case; a labels CSV keyed by patient ID or by path, with the
official split), ingested with ``medres ingest``, planned with ``medres plan`` under the
stated ``--time-budget`` and trained with ``medres train --manifest M --out R
--time-budget B`` and nothing else. The test AUC and ACC (MedMNIST's evaluator: binary AUC
on the score of class 1, ACC at the model's decision rule) are printed next to the
published table (MedMNIST v2 paper, Table; see ``../shared/data/README.md``) together with
the plan's estimated and the measured time, and appended to ``benchmarks/RESULTS.md`` with
the machine and its load (the CPU may be shared: ``os.getloadavg`` before and after).

Usage::

    python benchmarks/quality.py                              # both sets, 15 min each
    python benchmarks/quality.py --sets breastmnist --budget 4
    python benchmarks/quality.py --data ~/zenodo_medmnist     # the same .npz files from Zenodo
    python benchmarks/quality.py --quick                      # smoke test: tiny subsets, seconds

``--data DIR`` is a folder holding ``breastmnist.npz`` / ``adrenalmnist3d_64.npz`` (Zenodo
record 10519652, md5 checked against MedMNIST's ``info.py``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "medmnist"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


@dataclass(frozen=True)
class BenchSet:
    """One MedMNIST file: how it is exported and what the paper reports."""

    name: str
    file: str
    md5: str
    kind: str  # "dicom2d" | "nifti3d"
    target_auc: float
    published: tuple[tuple[str, float, float], ...]  # (method, test AUC, test ACC)


SETS: dict[str, BenchSet] = {
    "breastmnist": BenchSet(
        "breastmnist",
        "breastmnist.npz",
        "750601b1f35ba3300ea97c75c52ff8f6",
        "dicom2d",
        0.92,
        (
            ("ResNet-18 (28)", 0.901, 0.863),
            ("ResNet-18 (224)", 0.891, 0.833),
            ("ResNet-50 (28)", 0.857, 0.812),
            ("ResNet-50 (224)", 0.866, 0.842),
            ("auto-sklearn", 0.836, 0.803),
            ("AutoKeras", 0.871, 0.831),
            ("Google AutoML Vision", 0.919, 0.861),
        ),
    ),
    "adrenalmnist3d_64": BenchSet(
        "adrenalmnist3d_64",
        "adrenalmnist3d_64.npz",
        "17721accfe9fb005146a47d33bc54b2f",
        "nifti3d",
        0.87,
        (
            ("ResNet-18+3D (28^3)", 0.827, 0.721),
            ("ResNet-18+ACS (28^3)", 0.839, 0.754),
            ("ResNet-50+3D (28^3)", 0.828, 0.745),
            ("auto-sklearn (28^3)", 0.828, 0.802),
        ),
    ),
}
SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------- export
def md5_file(path: Path) -> str:
    """Hex MD5 of a file (MedMNIST publishes MD5s)."""
    h = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_npz(path: Path, limit: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images, labels)}``; ``limit`` > 0 keeps that many per split (stratified
    by taking the first ``limit // 2`` of each class) for quick runs."""
    d = np.load(path)
    out = {}
    for split in SPLITS:
        x, y = d[f"{split}_images"], d[f"{split}_labels"].reshape(-1)
        if limit:
            keep = np.concatenate([np.flatnonzero(y == c)[: max(limit // 2, 1)] for c in (0, 1)])
            keep.sort()
            x, y = x[keep], y[keep]
        out[split] = (x, y)
    return out


def _dicom_us(path: Path, image: np.ndarray, index: int) -> None:
    """One ultrasound DICOM (8-bit MONOCHROME2, explicit VR little endian) via pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # US Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = f"BM{index:05d}"
    ds.Modality = "US"
    ds.BodyPartExamined = "BREAST"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [1.0, 1.0]
    ds.PixelData = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def export_dicom2d(data: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> Path:
    """One DICOM per image under ``out/dicom``; labels CSV keyed by patient ID."""
    src = out / "dicom"
    src.mkdir(parents=True, exist_ok=True)
    labels = out / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "label", "split"])
        i = 0
        for split, (x, y) in data.items():
            for img, lab in zip(x, y, strict=True):
                _dicom_us(src / f"{i:05d}.dcm", img, i)
                w.writerow([f"BM{i:05d}", int(lab), split])
                i += 1
    return labels


def export_nifti3d(data: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> Path:
    """One NIfTI per volume under ``out/nifti/SPLIT``; labels CSV keyed by path."""
    import nibabel as nib

    src = out / "nifti"
    src.mkdir(parents=True, exist_ok=True)
    labels = out / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        for split, (x, y) in data.items():
            (src / split).mkdir(parents=True, exist_ok=True)
            for i, (vol, lab) in enumerate(zip(x, y, strict=True)):
                name = f"{split}/{split}_{i:05d}.nii"
                nib.save(nib.Nifti1Image(np.asarray(vol, np.uint8), np.eye(4)), src / name)
                w.writerow([name, int(lab), split])
    return labels


# ---------------------------------------------------------------------------------- run
def _medres(*args: str, log_path: Path) -> float:
    """Run ``python -m medres ARGS``; return the wall time; raise with the log tail on failure."""
    t0 = time.perf_counter()
    with log_path.open("a") as fh:
        fh.write("$ medres " + " ".join(args) + "\n")
        fh.flush()
        rc = subprocess.call([sys.executable, "-m", "medres", *args], stdout=fh, stderr=fh)
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"medres {args[0]} failed (rc {rc}); log {log_path}:\n{tail}")
    return time.perf_counter() - t0


def _test_metrics(run_dir: Path) -> dict[str, float]:
    """Test AUC (score of class 1) and ACC (the ``pred`` column) from predictions_test.csv."""
    from sklearn.metrics import roc_auc_score

    with (run_dir / "predictions_test.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    prob_col = next(c for c in rows[0] if c.startswith("prob_") and c.endswith("1"))
    y = np.array([int(float(r["label"])) for r in rows])
    p = np.array([float(r[prob_col]) for r in rows])
    pred = np.array([int(float(r["pred"])) for r in rows])
    acc05 = float(np.mean((p >= 0.5).astype(int) == y))
    return {
        "auc": float(roc_auc_score(y, p)),
        "acc": float(np.mean(pred == y)),
        "acc_at_0.5": acc05,
        "n_test": len(rows),
    }


def ablation(run_dir: Path, manifest: Path) -> dict[str, float]:
    """Test AUC of each part of the saved network: every ensemble member alone, the
    ensemble without and with its test-time flips (a plain network: itself, flipped)."""
    import torch
    from sklearn.metrics import roc_auc_score

    from medres.dataset.manifest import read_manifest
    from medres.models import load_model_dir
    from medres.models.ensemble import Ensemble
    from medres.train.transforms import build_transforms

    net, meta = load_model_dir(run_dir / "model")
    m = read_manifest(str(manifest))
    rows = m.select("test")
    tf = build_transforms(meta.preprocessing, train=False)
    x = torch.stack(
        [tf({"image": str(m.resolve(r)), "channels": int(r.get("channels") or 1)})["image"]
         for r in rows]
    ).float()  # fmt: skip
    y = np.array([int(float(r["label"])) for r in rows])
    members = list(net.members) if isinstance(net, Ensemble) else [net]
    flips = tuple(net.tta_flips) if isinstance(net, Ensemble) else (0,)

    def auc(model: Any) -> float:
        with torch.no_grad():
            z = torch.cat([model(x[i : i + 64]) for i in range(0, len(x), 64)])
        return float(roc_auc_score(y, torch.softmax(z, 1)[:, 1].numpy()))

    out = {f"member{k}": auc(mm) for k, mm in enumerate(members)}
    out["ensemble_no_tta"] = auc(Ensemble(members, ()))
    out[f"ensemble_tta{list(flips)}"] = auc(Ensemble(members, flips))
    return out


def _plan_estimate(plan_yaml: Path) -> float:
    """The plan's estimated minutes (its ``# estimated_minutes:`` comment line)."""
    for line in plan_yaml.read_text().splitlines():
        if line.startswith("# estimated_minutes:"):
            return float(line.split(":", 1)[1].split()[0])
    return float("nan")


def run_set(
    bench: BenchSet,
    data_dir: Path,
    work: Path,
    budget: float,
    quick: bool,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Export, ingest, plan, train one set; return its result record."""
    npz = data_dir / bench.file
    if not npz.is_file():
        raise SystemExit(f"{npz} not found: pass --data DIR holding {bench.file} (Zenodo 10519652)")
    if not quick and md5_file(npz) != bench.md5:
        raise SystemExit(f"{npz}: md5 differs from MedMNIST's {bench.md5}; use the official file")
    data = load_npz(npz, limit=16 if quick else 0)
    if quick and bench.kind == "nifti3d":  # 64^3 volumes: quick mode shrinks them
        data = {s: (x[:, ::8, ::8, ::8], y) for s, (x, y) in data.items()}
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "log.txt"
    export = export_dicom2d if bench.kind == "dicom2d" else export_nifti3d
    labels = export(data, work)
    src = work / ("dicom" if bench.kind == "dicom2d" else "nifti")
    ds, run = work / "dataset", work / "run"
    t_ingest = _medres(
        "ingest", str(src), "--out", str(ds), "--labels", str(labels), log_path=log_path
    )
    manifest = ds / "manifest.csv"
    plan_yaml = work / "plan.yaml"
    b = str(budget)
    t_plan = _medres(
        "plan", str(manifest), "--time-budget", b, "--out", str(plan_yaml), log_path=log_path
    )
    load0 = os.getloadavg()
    t_train = _medres(
        "train",
        "--manifest",
        str(manifest),
        "--out",
        str(run),
        "--time-budget",
        b,
        *extra,
        log_path=log_path,
    )
    load1 = os.getloadavg()
    parts = ablation(run, manifest) if bench.kind == "dicom2d" else {}
    history = list(csv.DictReader((run / "history.csv").open()))
    return {
        "set": bench.name,
        "budget_min": budget,
        "quick": quick,
        **_test_metrics(run),
        "estimated_min": _plan_estimate(plan_yaml),
        "train_min": t_train / 60,
        "ingest_s": t_ingest,
        "plan_s": t_plan,
        "epochs": len(history),
        "load_before": [round(v, 2) for v in load0],
        "load_after": [round(v, 2) for v in load1],
        "plan": plan_yaml.read_text(),
        "train_args": list(extra),
        "ablation": parts,
    }


# ------------------------------------------------------------------------------- report
def machine() -> str:
    """One line: CPU model, cores, torch version."""
    import torch

    from medres.runtime import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}"


def table(res: dict[str, Any]) -> str:
    """Markdown table: medres next to the published rows."""
    bench = SETS[res["set"]]
    lines = ["| method | test AUC | test ACC |", "|---|---|---|"]
    lines.append(
        f"| **medres, `--time-budget {res['budget_min']:g}`** | **{res['auc']:.3f}** | "
        f"**{res['acc']:.3f}** (at 0.5: {res['acc_at_0.5']:.3f}) |"
    )
    lines += [f"| {m} | {auc:.3f} | {acc:.3f} |" for m, auc, acc in bench.published]
    return "\n".join(lines)


def summary(res: dict[str, Any]) -> str:
    """The run's time, estimate, epochs and load in one paragraph."""
    ok = "meets" if res["auc"] >= SETS[res["set"]].target_auc else "BELOW"
    est, meas = res["estimated_min"], res["train_min"]
    err = (est - meas) / meas * 100 if meas else float("nan")
    args = " ".join(res.get("train_args") or [])
    parts = ", ".join(f"{k} {v:.4f}" for k, v in (res.get("ablation") or {}).items())
    return (
        (f"train args `{args}`; " if args else "")
        + (f"test AUC by part (not used for any choice): {parts}; " if parts else "")
        + f"{res['set']}: test AUC {res['auc']:.4f} ({ok} the target "
        f"{SETS[res['set']].target_auc}), ACC {res['acc']:.4f}; train {meas:.2f} min for a "
        f"{res['budget_min']:g} min budget (plan estimate {est:.2f} min, {err:+.0f}%), "
        f"{res['epochs']} epochs; load average before {res['load_before']}, after "
        f"{res['load_after']}"
    )


def append_results(results: list[dict[str, Any]], path: Path = RESULTS) -> None:
    """Append one dated section with every set's table, summary and plan."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts = [f"\n## Quality benchmark ({stamp})\n", f"Machine: {machine()}.\n"]
    for res in results:
        plan = "\n".join(ln for ln in res["plan"].splitlines() if ln.startswith("#") or ":" in ln)
        parts += [
            f"\n### {res['set']}{' (quick)' if res['quick'] else ''}\n",
            table(res) + "\n",
            "\n" + summary(res) + "\n",
            "\n<details><summary>plan.yaml</summary>\n\n```yaml\n" + plan + "\n```\n</details>\n",
        ]
    with path.open("a", encoding="utf-8") as fh:
        fh.write("".join(parts))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 when every set ran (the AUC targets are reported, not
    asserted)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated: " + ", ".join(SETS))
    ap.add_argument("--budget", type=float, default=15.0, help="--time-budget minutes per set")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the .npz files")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="tiny subsets and budget (smoke test)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ap.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument(
        "--train-args", default="", help="extra `medres train` options (e.g. a variant: "
        "'--set model.ensemble=3'), recorded with the results",
    )  # fmt: skip
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETS]
    if unknown:
        ap.error(f"unknown set(s) {', '.join(unknown)}; choose from {', '.join(SETS)}")
    budget = 0.3 if args.quick else args.budget
    results = []
    with tempfile.TemporaryDirectory(prefix="medres-quality-") as tmp:
        base = args.work or Path(tmp)
        for name in names:
            extra = tuple(args.train_args.split())
            res = run_set(SETS[name], args.data, base / name, budget, args.quick, extra)
            results.append(res)
            print(f"\n{name}\n" + table(res) + "\n" + summary(res), flush=True)
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items()} for r in results], indent=2))
    if not args.no_append and not args.quick:
        append_results(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
