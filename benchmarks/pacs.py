"""PACS throughput: studies/s scored from Orthanc (DICOMweb, DIMSE) vs the same files from disk.

Workload: ``--studies`` synthetic 2D studies (one radiograph each, ``--size`` px, written by
``tests/helpers``), uploaded to a throwaway Orthanc on free localhost ports
(``tests/helpers/orthanc.py``), scored with an untrained ResNet-18 at fp32. Variants, run
alternately after one unmeasured warm-up run, median of ``--repeats``: ``disk`` (``medres score`` over the folder), ``dicomweb``
(``dicomweb+http://...`` QIDO-RS + WADO-RS) and ``dimse`` (C-FIND + C-GET), each into a
fresh OUT_DIR with the same ``--workers``. The rate is studies / seconds of the whole
``score`` call (query, retrieval, decode, inference, ledger, CSV export; the model load
too, identical for all variants). The ratio PACS / disk is printed; on one machine it
measures what the PACS path adds (HTTP/DIMSE transfer, per-series requests, writing the
scratch copy).

Usage::

    python benchmarks/pacs.py                       # 200 studies, 3 repeats
    python benchmarks/pacs.py --studies 40 --repeats 1 --json out.json

Needs Orthanc + its DICOMweb plugin and ``medres[pacs]`` (exits with the reason without).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/helpers

from helpers.models import write_dicom_2d, write_model_dir
from helpers.orthanc import OrthancServer, orthanc_unavailable

from medres.score import ScoreConfig, score
from medres.score.pacs_items import split_sources

ROOT = "1.2.826.0.1.3680043.8.498.8812"


def _run(model: Path, source: str, out: Path, workers: int) -> float:
    """Seconds of one full ``score`` call into a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    paths, pacs = split_sources([source])
    t = time.perf_counter()
    summary = score(
        ScoreConfig(
            model_dir=model, sources=paths, pacs=pacs, out_dir=out, workers=workers,
            precision="fp32", device="cpu",
        )
    )  # fmt: skip
    seconds = time.perf_counter() - t
    if summary.errors:
        raise SystemExit(f"{source}: {summary.errors} items rejected; see {out}/errors.csv")
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints a table and the PACS/disk ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=200)
    ap.add_argument("--size", type=int, default=64, help="image rows = cols")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    why = orthanc_unavailable()
    if why:
        print(f"skipped: {why}")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="medres-bench-pacs-"))
    srv = None
    try:
        model = write_model_dir(tmp / "model", image_size=(args.size, args.size))
        files = [
            write_dicom_2d(
                tmp / "src" / f"{i:05d}.dcm", study_uid=f"{ROOT}.{i}",
                series_uid=f"{ROOT}.{i}.1", size=args.size, seed=i,
            )
            for i in range(args.studies)
        ]  # fmt: skip
        srv = OrthancServer.start(tmp / "orthanc")
        srv.upload(files)
        sources = {"disk": str(tmp / "src"), "dicomweb": srv.dicomweb_url, "dimse": srv.dimse_url}
        runs: dict[str, list[float]] = {k: [] for k in sources}
        _run(model, sources["disk"], tmp / "warmup", args.workers)  # imports, first-call costs
        for _ in range(args.repeats):
            for name, src in sources.items():
                runs[name].append(_run(model, src, tmp / f"out_{name}", args.workers))
        rates = {k: args.studies / statistics.median(v) for k, v in runs.items()}
    finally:
        if srv is not None:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.studies} studies of {args.size}x{args.size}, workers={args.workers}, "
          f"median of {args.repeats}")  # fmt: skip
    for name, rate in rates.items():
        print(f"  {name:9s} {rate:8.1f} studies/s")
    for name in ("dicomweb", "dimse"):
        print(f"  ratio {name}/disk = {rates[name] / rates['disk']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "runs_s": runs, "studies_per_s": rates}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
