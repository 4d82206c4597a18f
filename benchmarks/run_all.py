"""Run every hot-path benchmark, each timing medres against its peer in the same run.

One entry point for the suite::

    python benchmarks/run_all.py            # default sizes (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick    # smaller sizes, a few minutes
    python benchmarks/run_all.py --record   # also append the table to benchmarks/RESULTS.md

Each benchmark script alternates medres and its peer and reports medians of >= 5
repeats (see the scripts); this runner records the machine load before and after each
one, reads their JSON and prints one table of ratios against the targets:

| benchmark | ratio | target |
| --- | --- | --- |
| ingest (uncompressed / RLE) | SimpleITK / dicom2nifti / MONAI time per file over medres | >= 1.0 / >= 3 / >= 3 |
| ingest vs dcm2niix (CT series, 50k-file export, dcm_qa_nih) | dcm2niix / medres wall time of the whole command | >= 1.0 (and a 150-file series <= 0.5 s) |
| header scan | medres scan / bare ``stop_before_pixels`` loop | <= 1.3 |
| train step (2D, 3D) | medres engine samples/s over a bare PyTorch loop | >= 0.85 |
| train input | share of the epoch spent waiting for data (cache on) | <= 20 % |
| score (small 2D, 224 2D, 3D) | medres over model-only ceiling; over a naive per-file loop | >= 0.8; >= 3 where loading dominates |

Absolute times on a shared machine are noisy: compare the ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass
class Row:
    benchmark: str
    case: str
    measure: str
    value: float | None
    target: str
    ok: bool | None

    def cells(self) -> list[str]:
        if self.value is None:
            v = "n/a"
        elif self.value and abs(self.value) < 0.01:
            v = f"{self.value:.1e}"  # e.g. a max |dp| of 7e-4 must not print as 0.00
        else:
            v = f"{self.value:.2f}"
        mark = {True: "yes", False: "NO", None: "-"}[self.ok]
        return [self.benchmark, self.case, self.measure, v, self.target, mark]


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - non-Unix
        return float("nan")


def _run(script: str, args: list[str], out_json: Path) -> tuple[dict[str, Any] | list, dict]:
    cmd = [sys.executable, str(HERE / script), *args, "--json", str(out_json)]
    before = _load()
    print(f"$ {' '.join(cmd[1:])}  (load {before:.1f})", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, check=False)
    after = _load()
    info = {"cmd": " ".join(cmd[1:]), "rc": proc.returncode, "load": [before, after]}
    if proc.returncode != 0 or not out_json.exists():
        return {}, info
    return json.loads(out_json.read_text()), info


def _ge(v: float | None, t: float) -> bool | None:
    return None if v is None else v >= t


def ingest_rows(res: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    scan = res.get("scan")
    if scan:
        r = scan.get("ratio")
        rows.append(
            Row("ingest", "header scan", "medres/bare", r, "<= 1.3", r is not None and r <= 1.3)
        )
    for peer in res.get("peer", []):  # whole commands against dcm2niix (issue 15)
        r = peer.get("ratio")
        case = f"{peer.get('case')} ({peer.get('files')} files, load {peer['load'][0]:.1f})"
        rows.append(Row("ingest", case, "dcm2niix/medres time", r, ">= 1", _ge(r, 1.0)))
        if peer.get("case") == "ct":
            wall = peer.get("best_s", {}).get("medres")
            ok = None if wall is None else wall <= 0.5
            rows.append(Row("ingest", case, "medres wall s", wall, "<= 0.5", ok))
    for case in ("uncompressed", "rle"):
        c = res.get(case)
        if not c:
            continue
        ms = c.get("ms_per_file", {})
        med = ms.get("medres")
        for peer, target in (("sitk", 1.0), ("dicom2nifti", 3.0), ("monai", 3.0)):
            if med and ms.get(peer):
                ratio = ms[peer] / med
                rows.append(
                    Row(
                        "ingest",
                        case,
                        f"{peer}/medres time",
                        ratio,
                        f">= {target:g}",
                        ratio >= target,
                    )
                )
    return rows


def train_rows(res: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for r in res.get("engine", []):
        v = r.get("ratio")
        v = None if v is None else float(v)
        rows.append(
            Row("train", str(r.get("case")), "medres/bare samples/s", v, ">= 0.85", _ge(v, 0.85))
        )
    for d in res.get("input", []):
        v = d.get("data_wait_frac")
        v = None if v is None else 100 * float(v)
        ok = None if v is None else v <= 20
        rows.append(Row("train", str(d.get("case")), "data wait % of epoch", v, "<= 20", ok))
    return rows


LOADING_DOMINATES = {"small2d", "3d"}


def score_rows(res: list[dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    for r in res:
        wl = f"{r.get('workload')} ({r.get('precision')})"
        ratios = r.get("ratios", {})
        c = ratios.get("medres/ceiling")
        rows.append(Row("score", wl, "medres/ceiling", c, ">= 0.8", _ge(c, 0.8)))
        n = ratios.get("medres/naive")
        need = 3.0 if r.get("workload") in LOADING_DOMINATES else 1.0
        rows.append(Row("score", wl, "medres/naive", n, f">= {need:g}", _ge(n, need)))
        if r.get("max_abs_delta_p_vs_fp32") is not None:
            d = float(r["max_abs_delta_p_vs_fp32"])
            rows.append(Row("score", wl, "max |dp| vs fp32", d, "stated", None))
    return rows


def table(rows: list[Row]) -> str:
    head = ["benchmark", "case", "measure", "value", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="medres benchmark suite: ratios against peers")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    ap.add_argument("--only", default="ingest,train,score", help="comma list of benchmarks")
    ap.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    ap.add_argument("--json", type=Path, help="write all rows here")
    args = ap.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    plans: dict[str, tuple[str, list[str]]] = {
        "ingest": (
            "ingest.py",
            ["--slices", "100", "--size", "256", "--repeats", "5", "--quick"] if args.quick else [],
        ),
        "train": (
            "train_step.py",
            ["--size2d", "112", "--size3d", "48", "--repeats", "5"] if args.quick else [],
        ),
        "score": ("score.py", ["--small", "--repeats", "5"] if args.quick else []),
    }
    adapters = {"ingest": ingest_rows, "train": train_rows, "score": score_rows}
    rows: list[Row] = []
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (script, extra) in plans.items():
            if name not in only:
                continue
            res, info = _run(script, extra, Path(tmp) / f"{name}.json")
            runs[name] = info
            if not res:
                rows.append(Row(name, "-", f"failed (rc {info['rc']})", None, "-", False))
                continue
            rows.extend(adapters[name](res))  # type: ignore[operator]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    loads = ", ".join(f"{k} {v['load'][0]:.1f}->{v['load'][1]:.1f}" for k, v in runs.items())
    text = (
        f"### {stamp} ({'quick' if args.quick else 'full'})\n\n"
        f"Machine: {machine}; load average before->after: {loads}\n\n{table(rows)}\n"
    )
    print()
    print(text)
    if args.record:
        results = HERE / "RESULTS.md"
        prev = results.read_text() if results.exists() else "# Benchmark results\n\n"
        results.write_text(prev.rstrip() + "\n\n" + text)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "when": stamp,
                    "machine": machine,
                    "runs": runs,
                    "rows": [r.__dict__ for r in rows],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
