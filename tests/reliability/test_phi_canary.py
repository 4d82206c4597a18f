"""PHI canary: identities planted in DICOM headers never reach an output, log or error.

A synthetic radiograph set is written with ``phi_canary`` (PatientName, PatientID,
PatientBirthDate, AccessionNumber, InstitutionName, ReferringPhysicianName and
OtherPatientIDs all hold canary values), plus a truncated file and junk files (so error
rows are written too), and a labels CSV keyed by the canary PatientIDs with one row that
matches nothing. It goes through the CLI with ``--verbose``: ingest -> train (1 epoch) ->
evaluate -> score (with Grad-CAM PNGs). stdout and stderr of every command are kept.

Every file under the output folders is searched, after expansion: gzip members (.nii.gz),
zip members, PNG chunks (text chunks and inflated image data), base64 ``data:`` URIs in
HTML (embedded plots, recursively), sqlite databases with their WAL, safetensors and
torch checkpoints as raw bytes. Needles: the canary marker, the birth date in DICOM and
ISO forms and the canary name part, in ASCII, lower case and UTF-16.

The DICOM files are copied to neutral names first: synth lays out
``dicom/<PatientID>/...``; ingest and score pseudonymise path components that hold a
patient's identity (``--source-paths identity``), which has its own test below.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import gzip
import io
import os
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest

from medres.synth import PHI_CANARY_BIRTH_DATE, PHI_CANARY_MARKER

pytestmark = pytest.mark.reliability

NEEDLES_TEXT = (
    PHI_CANARY_MARKER,
    PHI_CANARY_BIRTH_DATE,
    f"{PHI_CANARY_BIRTH_DATE[:4]}-{PHI_CANARY_BIRTH_DATE[4:6]}-{PHI_CANARY_BIRTH_DATE[6:]}",
    "ZELDA",
)


def _needles() -> list[bytes]:
    out = []
    for n in NEEDLES_TEXT:
        for v in (n, n.lower()):
            out += [v.encode("ascii"), v.encode("utf-16-le")]
    return out


NEEDLES = _needles()
_DATA_URI = re.compile(rb"data:[\w/+.-]+;base64,([A-Za-z0-9+/=\s]+)")


def _png_views(data: bytes) -> list[bytes]:
    views, pos, idat = [], 8, b""
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IDAT":
            idat += body
        elif kind in (b"tEXt", b"iTXt", b"zTXt", b"eXIf"):
            views.append(body)
            _key, _, rest = body.partition(b"\0")
            for skip in (1, 2, 3, 4):  # zTXt: method byte; iTXt: flag, method, lang, key
                try:
                    views.append(zlib.decompress(rest[skip:]))
                    break
                except zlib.error:
                    continue
    if idat:
        with contextlib.suppress(zlib.error):
            views.append(zlib.decompress(idat))
    return views


def expand(data: bytes, depth: int = 0) -> list[bytes]:
    """``data`` and everything decodable inside it (gzip, zip, PNG, base64 data URIs)."""
    views = [data]
    if depth > 3:
        return views
    inner: list[bytes] = []
    if data[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError, zlib.error):
            inner.append(gzip.decompress(data))
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                inner += [zf.read(n) for n in zf.namelist()]
                inner += [n.encode() for n in zf.namelist()]
        except (zipfile.BadZipFile, OSError):
            pass
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        inner += _png_views(data)
    for m in _DATA_URI.finditer(data):
        with contextlib.suppress(ValueError):
            inner.append(base64.b64decode(re.sub(rb"\s", b"", m.group(1))))
    for blob in inner:
        views += expand(blob, depth + 1)
    return views


def _sqlite_dump(path: Path) -> bytes:
    """Every value of every table, as text (in addition to the raw file bytes)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        parts = []
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for t in tables:
            for row in con.execute(f'SELECT * FROM "{t}"'):
                parts.append(repr(row))
        return "\n".join(parts).encode()
    finally:
        con.close()


def find_canaries(roots: list[Path]) -> dict[str, list[str]]:
    """{file: [needles found]} over every file under ``roots`` (names included)."""
    hits: dict[str, list[str]] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            found = set()
            name = str(p.relative_to(root.parent)).encode()
            found |= {n for n in NEEDLES if n in name}
            if p.is_file():
                data = p.read_bytes()
                views = expand(data)
                if data[:16] == b"SQLite format 3\x00":
                    views.append(_sqlite_dump(p))
                for v in views:
                    found |= {n for n in NEEDLES if n in v}
            if found:
                hits[str(p)] = sorted(n.decode("latin-1") for n in found)
    return hits


def _run(args: list[str], cwd: Path, log: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="200")
    r = subprocess.run(
        [sys.executable, "-m", "medres", "-v", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log.write_text(f"$ medres -v {' '.join(args)}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def canary_run(synth_factory, tmp_path_factory) -> dict:
    """The whole pipeline on the canary set; returns the folders to search and the logs."""
    res = synth_factory(
        kind="xray", n_patients=12, shape=(32, 32), phi_canary=True, messy=("junk", "truncated"),
        seed=31,
    )  # fmt: skip
    work = tmp_path_factory.mktemp("phi")
    src = work / "in"
    src.mkdir()
    for i, f in enumerate(sorted(p for p in res.data_dir.rglob("*") if p.is_file())):
        shutil.copy(f, src / f"f{i:03d}{f.suffix}")
    with open(res.labels_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert any(PHI_CANARY_MARKER in r["patient_id"] for r in rows)  # the labels hold PHI too
    labels = work / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        w.writerow({**rows[0], "patient_id": f"{PHI_CANARY_MARKER}99999"})  # unmatched
    logs = work / "logs"
    logs.mkdir()
    steps = [
        ("ingest", ["ingest", "in", "--labels", "labels.csv", "--out", "ds", "--workers", "1"]),
        ("train", ["train", "--manifest", "ds/manifest.csv", "--out", "run", "--epochs", "1",
                   "--batch-size", "4", "--image-size", "32", "--device", "cpu",
                   "--weights", "none"]),
        ("evaluate", ["evaluate", "run", "--out", "ev", "--n-boot", "50"]),
        ("score", ["score", "run/model", "in", "--out", "sc", "--workers", "0", "--cam", "2",
                   "--device", "cpu"]),
        # a user error about a canary file: its message must not echo PHI either
        ("score_error", ["score", "run/model", "in/missing.dcm", "--out", "sc2"]),
    ]  # fmt: skip
    codes = {}
    for name, args in steps:
        codes[name] = _run(args, work, logs / f"{name}.log").returncode
    return {"work": work, "codes": codes, "logs": logs, "synth": res}


def test_pipeline_ran_on_the_canary_set(canary_run):
    assert canary_run["codes"] == {
        "ingest": 0, "train": 0, "evaluate": 0, "score": 0, "score_error": 1,
    }, [p.read_text()[-1500:] for p in canary_run["logs"].iterdir()]  # fmt: skip
    work = canary_run["work"]
    with open(work / "ds" / "errors.csv", newline="") as fh:
        assert {r["code"] for r in csv.DictReader(fh)} >= {"truncated", "not_dicom"}
    assert list((work / "sc" / "cam").glob("*.png"))
    # the logs are verbose: the search below really covers debug logging
    assert any("DEBUG" in p.read_text() for p in canary_run["logs"].iterdir())


def test_the_search_finds_planted_canaries(canary_run, tmp_path):
    """Control: the search sees the canaries in the inputs and through each encoding."""
    assert find_canaries([canary_run["work"] / "in"])
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "a.nii.gz").write_bytes(gzip.compress(PHI_CANARY_MARKER.encode()))
    html = b"<img src='data:image/png;base64," + base64.b64encode(
        gzip.compress(PHI_CANARY_BIRTH_DATE.encode())
    )
    (probe / "r.html").write_bytes(html + b"'>")
    con = sqlite3.connect(probe / "l.sqlite")
    con.execute("CREATE TABLE t(x)")
    con.execute("INSERT INTO t VALUES (?)", ("zelda",))
    con.commit()
    con.close()
    assert set(find_canaries([probe])) == {
        str(probe / n) for n in ("a.nii.gz", "r.html", "l.sqlite")
    }


@pytest.mark.parametrize("folder", ["ds", "run", "ev", "sc", "sc2", "logs"])
def test_no_canary_in_outputs_logs_or_errors(canary_run, folder):
    root = canary_run["work"] / folder
    if folder == "sc2" and not root.exists():
        pytest.skip("the failing score wrote nothing")
    assert root.exists()
    assert find_canaries([root]) == {}


def test_no_canary_from_patient_named_folders(canary_run, tmp_path):
    """synth lays out ``dicom/<PatientID>/...``: ingest and score pseudonymise those folder
    names (``--source-paths identity``, the default) in every output and log."""
    res = canary_run["synth"]
    assert find_canaries([res.data_dir])  # control: the folder names do hold the canary
    logs = tmp_path / "logs"
    logs.mkdir()
    r = _run(["ingest", str(res.data_dir), "--out", "ds", "--workers", "1"], tmp_path,
             logs / "ingest.log")  # fmt: skip
    assert r.returncode == 0, r.stderr
    model = canary_run["work"] / "run" / "model"
    r = _run(["score", str(model), str(res.data_dir), "--out", "sc", "--workers", "0",
              "--device", "cpu"], tmp_path, logs / "score.log")  # fmt: skip
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "ds" / "manifest.csv", newline="") as fh:
        sources = [row["source"] for row in csv.DictReader(fh)]
    assert sources and all("~" in s for s in sources)  # redacted, not dropped
    assert find_canaries([tmp_path / "ds", tmp_path / "sc", logs]) == {}
