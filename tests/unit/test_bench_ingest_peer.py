"""benchmarks/ingest.py against dcm2niix: the export generator, the cache and one tiny row."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ingest", ROOT / "benchmarks" / "ingest.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_export_generator_writes_valid_distinct_series_and_is_cached(tmp_path):
    import pydicom

    bench = _bench()
    made = []
    folder = bench._cached(
        tmp_path / "exp", 6, lambda f: made.append(1) or bench.make_export(f, 2, 3, 8)
    )
    files = sorted(folder.rglob("*.dcm"))
    assert len(files) == 6 and made == [1]
    dss = [pydicom.dcmread(f) for f in files]
    assert len({d.SeriesInstanceUID for d in dss}) == 2
    assert len({d.SOPInstanceUID for d in dss}) == 6
    assert all(len(d.SOPInstanceUID) <= 64 for d in dss)
    first = [d for d in dss if d.SeriesInstanceUID == dss[0].SeriesInstanceUID]
    assert sorted(float(d.ImagePositionPatient[2]) for d in first) == [-70.0, -65.0, -60.0]
    assert first[0].pixel_array.shape == (8, 8)
    bench._cached(tmp_path / "exp", 6, lambda f: made.append(1) or 0)
    assert made == [1]  # complete: reused, not made again


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not on PATH")
def test_peer_row_times_both_commands(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "res.json"
    argv = ["--peer-only", "--rows", "export", "--export-series", "2", "--peer-repeats", "1",
            "--cache", str(tmp_path / "cache"), "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    (row,) = json.loads(out.read_text())["peer"]
    assert row["case"] == "export" and row["files"] == 56
    assert row["images"] == {"medres": 2, "dcm2niix": 2}
    assert row["ratio"] > 0 and len(row["load"]) == 2
    assert "dcm2niix/medres time" in capsys.readouterr().out
