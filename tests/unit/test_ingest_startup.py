"""`medres ingest` start-up: what it imports and whether it starts worker processes.

Each check runs in a fresh interpreter (the test process itself has torch loaded by the
fixtures) and reports ``sys.modules`` and the number of pool workers started.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from helpers.dicom_series import write_ct_series

HEAVY = ("torch", "monai", "sklearn", "scipy", "pandas", "matplotlib")
READERS = ("pydicom", "nibabel")

# runs the CLI in-process, counts IsolatedPool worker starts, prints a JSON report
_PROBE = textwrap.dedent(
    """
    import json, sys
    import medres.workers as w
    started = []
    _init = w._Worker.__init__
    def counting(self, *a, **k):
        started.append(1)
        _init(self, *a, **k)
    w._Worker.__init__ = counting
    from medres.cli.app import app
    try:
        app(sys.argv[1:], standalone_mode=False)
        rc = 0
    except SystemExit as exc:
        rc = exc.code or 0
    mods = sorted({m.split(".")[0] for m in sys.modules})
    print("@@" + json.dumps({"rc": rc, "modules": mods, "workers": len(started)}))
    """
)


def _probe(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    assert line, proc.stderr[-2000:]
    return json.loads(line[-1][2:])


def test_cli_import_and_help_import_no_ml_stack():
    res = _probe("ingest", "--help")
    assert res["rc"] == 0
    assert not set(HEAVY + READERS) & set(res["modules"]), res["modules"]
    assert res["workers"] == 0


def test_small_plain_dicom_ingest_runs_in_process_without_heavy_imports(tmp_path):
    src = write_ct_series(tmp_path / "ct")
    res = _probe("-q", "ingest", str(src), "--out", str(tmp_path / "out"))
    assert res["rc"] == 0
    assert not set(HEAVY + READERS) & set(res["modules"]), res["modules"]
    assert res["workers"] == 0  # no pool for a small plain series
    manifest = (tmp_path / "out" / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 2 and ",16x16x4," in manifest[1]


def test_compressed_dicom_is_still_decoded_in_the_supervised_pool(tmp_path):
    pytest.importorskip("pydicom")
    src = write_ct_series(tmp_path / "rle", rle=True)
    res = _probe("-q", "ingest", str(src), "--out", str(tmp_path / "out"))
    assert res["rc"] == 0
    assert res["workers"] >= 1  # compressed pixel data: C decoders run in workers only
    assert not set(HEAVY) & set(res["modules"]), res["modules"]
    assert len((tmp_path / "out" / "manifest.csv").read_text().splitlines()) == 2
