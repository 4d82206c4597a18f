"""Scoring throughput: medres score vs a naive per-file loop vs the model-only ceiling.

Workloads (synthetic NIfTI written to a temp folder, ResNet-18, untrained):

- ``small2d``: 28 px 2D images (loading dominates);
- ``2d224``: 224 px 2D images (the model dominates);
- ``3d``: 64^3 int16 volumes resized to 32^3 for a 3D ResNet-18 (loading dominates).

Variants, run alternately (medres, naive, ceiling, medres, ...), median of ``--repeats``:

- ``medres``: :func:`medres.score.score` into a fresh OUT_DIR (discovery, decoding,
  batched inference, ledger commits; the rate excludes the model load and the CSV
  export; ``e2e`` in the table includes both);
- ``naive``: for each file ``monai.transforms.LoadImage`` + the model's saved inference
  transforms + the model at batch 1 (what a hand-written script does);
- ``ceiling``: the model alone, forward passes over preloaded tensors in batches of
  ``--batch-size`` at the same precision (no loading at all).

Usage::

    python benchmarks/score.py                      # all workloads, fp32 (+ bf16 at 224 px)
    python benchmarks/score.py --workloads small2d --repeats 5 --json out.json
    python benchmarks/score.py --tiny               # smoke run (seconds)
    python benchmarks/score.py --workloads ct       # real-size CT row (benchmarks/score_ct.py)

Fairness: ``--threads`` (default: all cores) is the machine every variant gets. The
ceiling and the naive loop give all of it to torch; ``medres`` splits it itself (plain
``.nii`` inputs, as here, are decoded in its own process and the model gets every core;
DICOM or compressed inputs would get ``--workers`` decode processes and the model
``cores - workers`` threads), which is the real comparison. The 1-minute load average
is recorded after every repeat (``runs.load1``) and at the start and end: on a shared
machine, compare runs only at similar load. To compare two versions of medres, run the
same copy of this script from each tree (it imports the ``medres`` next to it).

Targets: medres >= 0.8x the ceiling on every workload; >= 3x the naive loop where loading
dominates; at 224 px the gain comes from bf16, whose max |delta p| vs fp32 is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/helpers

from helpers.models import write_model_dir, write_nifti_folder

from medres.score import ScoreConfig, score


@dataclass(frozen=True)
class Workload:
    name: str
    dims: int
    stored: tuple[int, ...]
    model_size: tuple[int, ...]
    n: int
    n_naive: int


WORKLOADS = {
    "small2d": Workload("small2d", 2, (28, 28), (28, 28), 1000, 200),
    "2d224": Workload("2d224", 2, (224, 224), (224, 224), 128, 32),
    "3d": Workload("3d", 3, (64, 64, 64), (32, 32, 32), 96, 16),
}
# a busy shared machine: same shapes, fewer items (still two batches or more per run, so
# that the steady state weighs more than the start-up, which medres's rate includes)
SMALL = {
    "small2d": Workload("small2d", 2, (28, 28), (28, 28), 500, 100),
    "2d224": Workload("2d224", 2, (224, 224), (224, 224), 64, 12),
    "3d": Workload("3d", 3, (64, 64, 64), (32, 32, 32), 64, 8),
}
TINY = {
    "small2d": Workload("small2d", 2, (28, 28), (28, 28), 64, 16),
    "2d224": Workload("2d224", 2, (64, 64), (64, 64), 16, 8),
    "3d": Workload("3d", 3, (24, 24, 24), (16, 16, 16), 8, 4),
}


@dataclass
class Result:
    workload: str
    precision: str
    medres: float = 0.0
    medres_end_to_end: float = 0.0
    naive: float = 0.0
    ceiling: float = 0.0
    runs: dict[str, list[float]] = field(default_factory=dict)
    max_abs_delta_p_vs_fp32: float | None = None

    def ratios(self) -> dict[str, float]:
        return {
            "medres/ceiling": self.medres / self.ceiling if self.ceiling else float("nan"),
            "medres/naive": self.medres / self.naive if self.naive else float("nan"),
        }


def _autocast(precision: str):
    import contextlib

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_medres(
    model_dir: Path, imgs: Path, work: Path, precision: str, batch: int, workers: int
) -> tuple[float, int]:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = ScoreConfig(
        model_dir, (imgs,), out, batch_size=batch, workers=workers, precision=precision
    )
    t0 = time.perf_counter()
    s = score(cfg)
    dt = time.perf_counter() - t0
    # the loop rate: pool start, discovery, decoding, inference and ledger commits
    # (model load and the CSV export are excluded, as the ceiling excludes them)
    return s.items_per_s, s.scored / dt


def run_naive(model, pre: dict, files: list[Path], precision: str) -> float:
    from monai.transforms import LoadImage

    from medres.train.transforms import build_transforms

    load = LoadImage(image_only=True, ensure_channel_first=True)
    tf = build_transforms(pre, train=False, load=False)
    t0 = time.perf_counter()
    with torch.inference_mode(), _autocast(precision):
        for f in files:
            x = tf({"image": load(str(f))})["image"]
            model(torch.as_tensor(x)[None].float())
    return len(files) / (time.perf_counter() - t0)


def preload(pre: dict, files: list[Path]) -> torch.Tensor:
    from medres.ingest.nifti import load_nifti
    from medres.train.transforms import build_transforms, image_to_metatensor

    tf = build_transforms(pre, train=False, load=False)
    xs = [
        torch.as_tensor(tf({"image": image_to_metatensor(load_nifti(f))})["image"]) for f in files
    ]
    return torch.stack(xs).float()


def run_ceiling(model, x: torch.Tensor, precision: str, batch: int) -> tuple[float, np.ndarray]:
    fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
    m = model.to(memory_format=fmt)
    outs = []
    t0 = time.perf_counter()
    with torch.inference_mode(), _autocast(precision):
        for i in range(0, len(x), batch):
            xb = x[i : i + batch].contiguous(memory_format=fmt)
            outs.append(torch.softmax(m(xb).float(), 1))
    dt = time.perf_counter() - t0
    return len(x) / dt, torch.cat(outs).numpy()


def bench(wl: Workload, root: Path, args: argparse.Namespace) -> list[Result]:
    from medres.models.modeldir import load_model_dir

    work = root / wl.name
    model_dir = write_model_dir(
        work / "model", dims=wl.dims, image_size=wl.model_size, stem="standard"
    )
    imgs = work / "imgs"
    files = write_nifti_folder(imgs, wl.n, wl.stored)
    model, meta = load_model_dir(model_dir)
    pre = meta.preprocessing
    x = preload(pre, files)
    precisions = ["fp32"] + (["bf16"] if wl.name == "2d224" or args.bf16_all else [])
    results = []
    ref = None
    for prec in precisions:
        r = Result(wl.name, prec, runs={"medres": [], "naive": [], "ceiling": []})
        r.runs["medres_end_to_end"] = []
        r.runs["load1"] = []
        run_ceiling(model, x[: args.batch_size], prec, args.batch_size)  # warm-up
        for rep in range(args.repeats):
            v, e2e = run_medres(model_dir, imgs, work, prec, args.batch_size, args.workers)
            r.runs["medres"].append(v)
            r.runs["medres_end_to_end"].append(e2e)
            r.runs["naive"].append(run_naive(model, pre, files[: wl.n_naive], prec))
            c, probs = run_ceiling(model, x, prec, args.batch_size)
            r.runs["ceiling"].append(c)
            r.runs["load1"].append(os.getloadavg()[0])
            print(
                f"  {wl.name} {prec} rep {rep + 1}: medres {v:,.0f}  naive "
                f"{r.runs['naive'][-1]:,.0f}  ceiling {c:,.0f} img/s  "
                f"(load {r.runs['load1'][-1]:.1f})",
                flush=True,
            )
        if prec == "fp32":
            ref = probs
        elif ref is not None:
            r.max_abs_delta_p_vs_fp32 = float(np.abs(probs - ref).max())
        for k in ("medres", "medres_end_to_end", "naive", "ceiling"):
            setattr(r, k, statistics.median(r.runs[k]))
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="small2d,2d224,3d")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = cores)")
    ap.add_argument("--bf16-all", action="store_true", help="bf16 on every workload")
    ap.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    ap.add_argument("--small", action="store_true", help="fewer items (busy machine)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.repeats < 5 and not args.tiny:
        print(f"warning: --repeats {args.repeats} < 5; medians of fewer runs are noisy")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    table = TINY if args.tiny else SMALL if args.small else WORKLOADS
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    results: list[Result] = []
    ct = None  # the real-size CT row (benchmarks/score_ct.py; opt-in: --workloads ...,ct)
    with tempfile.TemporaryDirectory(prefix="medres-bench-score-") as tmp:
        for name in args.workloads.split(","):
            if name == "ct":
                from score_ct import bench_ct

                ct = bench_ct(Path(tmp), max(1, min(args.repeats, 3)), args.tiny)
                continue
            results.extend(bench(table[name], Path(tmp), args))
    print(f"\n{'workload':10} {'prec':5} {'medres':>9} {'naive':>9} {'ceiling':>9} "
          f"{'/ceiling':>9} {'/naive':>7} {'e2e':>8}  max|dp| vs fp32")  # fmt: skip
    for r in results:
        q = r.ratios()
        d = "" if r.max_abs_delta_p_vs_fp32 is None else f"{r.max_abs_delta_p_vs_fp32:.2e}"
        print(
            f"{r.workload:10} {r.precision:5} {r.medres:9,.0f} {r.naive:9,.0f} {r.ceiling:9,.0f} "
            f"{q['medres/ceiling']:9.2f} {q['medres/naive']:7.2f} {r.medres_end_to_end:8,.0f}  {d}"
        )
    if ct is not None:
        from score_ct import print_ct

        print_ct(ct)
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if args.json:
        args.json.write_text(
            json.dumps([asdict(r) | {"ratios": r.ratios()} for r in results], indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
