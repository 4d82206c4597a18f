"""Scoring from a real PACS (Orthanc on a free localhost port) over DICOMweb and DIMSE.

Each test starts its own Orthanc (about 0.1 s) and uploads a tiny synthetic study set:
four CR studies (one of them with two series) and one DX study. Scores from the PACS are
compared with scoring the same files from disk under the same pseudonym key; resumes
count the WADO-RS series retrievals through a counting proxy; the pushed SRs are read
back from Orthanc over DICOMweb and parsed with highdicom. Skips with the reason when
Orthanc, its DICOMweb plugin or the client libraries are not installed.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from helpers.models import write_dicom_2d, write_model_dir
from helpers.orthanc import CountingProxy, OrthancServer, orthanc_unavailable

from medres.phi import KEY_FILE, load_or_create_key, pseudonym
from medres.score import ScoreConfig, score
from medres.score.pacs_items import split_sources

_WHY = orthanc_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")

ROOT = "1.2.826.0.1.3680043.8.498.7719"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"


def _write_set(folder: Path, n_cr: int = 4, extra_series_in_first: bool = True) -> list[Path]:
    """``n_cr`` CR studies (the first with two series) and one DX study."""
    paths = []
    specs = [(f"{ROOT}.{s}", f"{ROOT}.{s}.1", "CR") for s in range(1, n_cr + 1)]
    if extra_series_in_first:
        specs.append((f"{ROOT}.1", f"{ROOT}.1.2", "CR"))
    specs.append((f"{ROOT}.99", f"{ROOT}.99.1", "DX"))
    for i, (study, series, modality) in enumerate(specs):
        p = write_dicom_2d(
            folder / f"{i:03d}.dcm", study_uid=study, series_uid=series, seed=i,
            patient_id=f"PAT{i % 3}", accession=f"ACC{i:04d}",
        )  # fmt: skip
        if modality == "CR":
            ds = pydicom.dcmread(p)
            ds.Modality, ds.SOPClassUID = "CR", CR_IMAGE
            ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE
            ds.save_as(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("pacs_model") / "model")


@pytest.fixture(scope="module")
def disk(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CR files of the study set scored from disk (the reference); its OUT_DIR."""
    root = tmp_path_factory.mktemp("pacs_disk")
    out = root / "out"
    _score(model, _cr_folder(_write_set(root / "src"), root / "cr"), out)
    return out


@pytest.fixture
def pacs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh Orthanc holding the study set; yields (server, file paths)."""
    import medres.ingest.pacs.retrieve as retrieve

    monkeypatch.setattr(retrieve, "BACKOFF_S", 0.01)
    files = _write_set(tmp_path / "src")
    try:
        srv = OrthancServer.start(tmp_path / "orthanc")
    except RuntimeError as exc:
        pytest.skip(f"Orthanc could not start: {exc}")
    try:
        srv.upload(files)
        yield srv, files
    finally:
        srv.stop()


def _cr_folder(files: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True)
    for p in files:
        if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CR":
            shutil.copy(p, dest / p.name)
    return dest


def _score(model: Path, source: str | Path, out: Path, **kw: object) -> object:
    paths, pacs = split_sources([str(source)], query=kw.pop("query", None))  # type: ignore[arg-type]
    config = ScoreConfig(
        model_dir=model, sources=paths, pacs=pacs, out_dir=out, workers=kw.pop("workers", 0),  # type: ignore[arg-type]
        precision="fp32", device="cpu", **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    return score(config)


def _scores(out: Path) -> dict[str, tuple[float, float]]:
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["status"] == "ok" for r in rows), rows
    return {r["image_id"]: (float(r["prob_0"]), float(r["prob_1"])) for r in rows}


def _same_key(src: Path, dst: Path) -> None:
    load_or_create_key(src)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / KEY_FILE, dst / KEY_FILE)


def _max_dp(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(abs(x - y) for k in a for x, y in zip(a[k], b[k], strict=True))


def _pacs_report(out: Path) -> dict:
    import json

    return json.loads((out / "pacs.json").read_text())


def test_dicomweb_equals_disk_and_pushed_srs_read_back(
    pacs, model: Path, disk: Path, tmp_path: Path
) -> None:
    srv, _ = pacs
    web = tmp_path / "web"
    _same_key(disk, web)
    summary = _score(model, srv.dicomweb_url, web, query=["Modality=CR"], dicom_out=True, push=True)
    assert summary.scored == 5  # five CR series, the DX study is not matched
    assert _max_dp(_scores(web), _scores(disk)) <= 1e-6
    # the SRs are on the PACS: one per CR study, TID 1500, readable by highdicom
    import highdicom as hd
    from dicomweb_client.api import DICOMwebClient
    from pydicom.sr.codedict import codes

    api = DICOMwebClient(srv.dicomweb_url.removeprefix("dicomweb+"))
    sr_series = api.search_for_series(search_filters={"Modality": "SR"})
    assert len(sr_series) == 4
    by_sop = {}
    for s in sr_series:
        study, series = s["0020000D"]["Value"][0], s["0020000E"]["Value"][0]
        for ds in api.retrieve_series(study, series):
            report = hd.sr.ComprehensiveSR.from_dataset(ds)
            assert ds.PatientID == "" and ds.AccessionNumber == ""  # no identity pushed
            for g in report.content.get_image_measurement_groups():
                (m,) = g.get_measurements(name=codes.DCM.Probability)
                (img,) = m.referenced_images
                by_sop[img.referenced_sop_instance_uid] = (m.value, g.finding_type.meaning)
    assert len(by_sop) == 5
    ledger = sqlite3.connect(web / "ledger.sqlite")
    probs = sorted(
        float(r[0].strip("[]").split(",")[1]) for r in ledger.execute("SELECT scores FROM items")
    )
    assert sorted(v for v, _ in by_sop.values()) == pytest.approx(probs, abs=1e-6)
    assert {f for _, f in by_sop.values()} <= {"0", "1"}
    # a repeated run fetches nothing and pushes no duplicate SR
    again = _score(model, srv.dicomweb_url, web, query=["Modality=CR"], dicom_out=True, push=True)
    assert again.scored == 0 and _pacs_report(web)["series_fetched"] == 0
    assert len(api.search_for_series(search_filters={"Modality": "SR"})) == 4


def test_gradcam_secondary_captures_join_their_studies(pacs, model: Path, tmp_path: Path) -> None:
    """``--cam 2 --dicom-out --push``: two SC images of the overlays, in the source studies,
    without identity; a repeated run stores no duplicate."""
    import matplotlib.image as mpimg
    from dicomweb_client.api import DICOMwebClient

    srv, _ = pacs
    out = tmp_path / "out"
    kw = {"query": ["Modality=CR"], "dicom_out": True, "push": True, "cam": 2}
    _score(model, srv.dicomweb_url, out, **kw)
    pngs = sorted((out / "cam").glob("*.png"))
    scs = sorted((out / "dicom").glob("cam-*.dcm"))
    assert len(pngs) == 2 and [p.name for p in scs] == [f"cam-{p.stem}.dcm" for p in pngs]
    api = DICOMwebClient(srv.dicomweb_url.removeprefix("dicomweb+"))
    found = api.search_for_instances(search_filters={"SOPClassUID": SC_IMAGE})
    assert len(found) == 2
    source_studies = {f"{ROOT}.{s}" for s in range(1, 5)}
    for f in found:
        study, series, sop = (f[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
        ds = api.retrieve_instance(study, series, sop)
        assert study in source_studies  # filed into the study it explains
        assert ds.PatientID == "" and ds.AccessionNumber == "" and ds.PatientName == ""
        assert ds.PhotometricInterpretation == "RGB" and ds.BurnedInAnnotation == "NO"
        png = next(p for p in pngs if (out / "dicom" / f"cam-{p.stem}.dcm").is_file())
        assert ds.pixel_array.shape == (*mpimg.imread(png).shape[:2], 3)
    _score(model, srv.dicomweb_url, out, **kw)
    assert len(api.search_for_instances(search_filters={"SOPClassUID": SC_IMAGE})) == 2


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_dimse_equals_disk(pacs, model: Path, disk: Path, tmp_path: Path, workers: int) -> None:
    """Over DIMSE (C-FIND + C-GET); with workers=1 decoded in the supervised worker pool."""
    srv, _ = pacs
    dimse = tmp_path / "dimse"
    _same_key(disk, dimse)
    summary = _score(model, srv.dimse_url, dimse, query=["Modality=CR"], workers=workers)
    assert summary.scored == 5
    assert _max_dp(_scores(dimse), _scores(disk)) <= 1e-6
    again = _score(model, srv.dimse_url, dimse, query=["Modality=CR"])
    assert again.scored == 0 and again.skipped_done == 5
    assert _pacs_report(dimse)["series_fetched"] == 0


def test_resume_refetches_only_unfinished_series_and_detects_new_series(
    pacs, model: Path, tmp_path: Path
) -> None:
    srv, _ = pacs
    out = tmp_path / "out"
    with CountingProxy(srv.rest) as proxy:
        proxy.fail_next = 2  # two transient 503s: retried with backoff
        _score(model, proxy.dicomweb_url, out, query=["Modality=CR"])
        assert len(proxy.series_retrievals()) == 5
        before = _scores(out)
        # a crash before two series were committed: their rows are not in the ledger
        key = load_or_create_key(out)
        lost = {f"{ROOT}.2.1", f"{ROOT}.3.1"}
        con = sqlite3.connect(out / "ledger.sqlite")
        with con:
            con.execute(
                "DELETE FROM items WHERE series_key IN (?, ?)",
                tuple(pseudonym(u, key, "ser-") for u in sorted(lost)),
            )
        con.close()
        # the server changed: a new series in study 1
        new = write_dicom_2d(
            tmp_path / "new.dcm", study_uid=f"{ROOT}.1", series_uid=f"{ROOT}.1.3", seed=42
        )
        ds = pydicom.dcmread(new)
        ds.Modality = "CR"
        ds.save_as(new)
        srv.upload([new])
        proxy.log.clear()
        summary = _score(model, proxy.dicomweb_url, out, query=["Modality=CR"])
        assert set(proxy.series_retrievals()) == lost | {f"{ROOT}.1.3"}
    report = _pacs_report(out)
    assert report["changed_studies"] == [pseudonym(f"{ROOT}.1", key, "stu-")]
    assert summary.scored == 3 and report["series_skipped"] == 3
    after = _scores(out)
    assert len(after) == 6 and {k: after[k] for k in before} == before
    con = sqlite3.connect(out / "ledger.sqlite")
    (n,) = con.execute("SELECT COUNT(*) - COUNT(DISTINCT item_key) FROM items").fetchone()
    assert n == 0


def test_cli_over_dicomweb_writes_and_logs_no_identifiers(
    pacs, model: Path, tmp_path: Path
) -> None:
    """``-v`` (debug logging, the client libraries' too) prints no UID, patient or accession."""
    from typer.testing import CliRunner

    from medres.cli import app

    srv, _ = pacs
    out = tmp_path / "out"
    args = ["-v", "score", str(model), srv.dicomweb_url, "--query", "Modality=CR",
            "--out", str(out), "--workers", "0", "--dicom-out"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "scored 5" in res.output
    written = res.output + "".join(
        (out / n).read_text() for n in ("scores.csv", "errors.csv", "pacs.json")
    )
    for needle in (ROOT, "PAT0", "PAT1", "ACC0"):
        assert needle not in written, needle
    # every byte medres left in OUT_DIR (ledger, cached SR evidence headers, the SRs):
    # no patient ID or accession; UIDs only in the SRs and their evidence headers
    files = [f for f in out.rglob("*") if f.is_file()]
    assert any(".pacs" in f.parts for f in files)  # the evidence cache was written
    for f in files:
        data = f.read_bytes()
        for needle in (b"PAT0", b"PAT1", b"PAT2", b"ACC0"):
            assert needle not in data, (f, needle)


def test_ingest_from_dimse(pacs, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medres.cli import app

    srv, _ = pacs
    out = tmp_path / "ds"
    args = ["ingest", srv.dimse_url, "--query", "Modality=CR", "--out", str(out), "--workers", "0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 and {r["modality"] for r in rows} == {"CR"}
    assert not (out / ".pacs-retrieve").exists()  # the retrieved copy is removed


def test_pacs_source_errors_are_one_line(model: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medres.cli import app

    runner = CliRunner()
    cases = [
        (["dicomweb+http://u:pw@127.0.0.1:1/dicom-web"], "credentials in the URL"),
        (["dimse://127.0.0.1:104"], "AE title"),
        (["dicomweb+http://127.0.0.1:1/x", "--query", "Modality"], "--query"),
        ([str(tmp_path), "--query", "Modality=CR"], "PACS SOURCE"),
        (["dicomweb+http://127.0.0.1:1/x", "--push"], "--push"),
    ]
    for args, needle in cases:
        res = runner.invoke(app, ["score", str(model), *args, "--out", str(tmp_path / "o")])
        assert res.exit_code == 1, res.output
        assert needle in res.output and "Traceback" not in res.output
        assert "pw" not in res.output.replace("pw@", "")  # the password is never echoed


def _committed(out: Path) -> int:
    db = out / "ledger.sqlite"
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _complete_series(out: Path) -> set[str]:
    """Series pseudonyms whose items were all committed (what a resume must not fetch)."""
    import json

    if not (out / "ledger.sqlite").exists():
        return set()
    con = sqlite3.connect(out / "ledger.sqlite")
    try:
        done = {r[0] for r in con.execute("SELECT item_key FROM items")}
        rows = con.execute("SELECT series_key, items FROM pacs_series").fetchall()
    except sqlite3.Error:
        return set()
    finally:
        con.close()
    return {k for k, items in rows if all(i[0] in done for i in json.loads(items))}


@pytest.mark.slow
def test_kill9_at_three_points_then_resume(model: Path, tmp_path: Path) -> None:
    """SIGKILL the CLI scorer (and its workers) at 3 random points over DICOMweb, resume:
    one row per item, scores equal to an uninterrupted run, completed series never fetched
    again (WADO-RS retrievals counted by the proxy)."""
    files = []
    for s in range(12):
        files.append(
            write_dicom_2d(
                tmp_path / "src" / f"{s}.dcm", study_uid=f"{ROOT}.5{s}",
                series_uid=f"{ROOT}.5{s}.1", seed=s,
            )
        )  # fmt: skip
    srv = OrthancServer.start(tmp_path / "orthanc")
    rng = random.Random(7)
    out, ref = tmp_path / "out", tmp_path / "ref"
    try:
        srv.upload(files)
        _score(model, srv.dicomweb_url, ref)
        _same_key(ref, out)
        key = load_or_create_key(out)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with CountingProxy(srv.rest) as proxy:
            cmd = [
                sys.executable, "-m", "medres", "-q", "score", str(model), proxy.dicomweb_url,
                "--out", str(out), "--workers", "1", "--batch-size", "1", "--precision", "fp32",
            ]  # fmt: skip
            for target in [*sorted(rng.sample(range(1, 11), 3)), None]:
                complete = _complete_series(out)
                proxy.log.clear()
                proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
                while proc.poll() is None:
                    if target is not None and _committed(out) >= target:
                        time.sleep(rng.uniform(0, 0.05))
                        os.killpg(proc.pid, signal.SIGKILL)
                        break
                    time.sleep(0.01)
                proc.wait()
                if target is None:
                    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
                fetched = {pseudonym(u, key, "ser-") for u in proxy.series_retrievals()}
                assert not fetched & complete, "a completed series was fetched again"
    finally:
        srv.stop()
    assert _max_dp(_scores(out), _scores(ref)) <= 1e-6  # batch 1 vs 32: float rounding only
    con = sqlite3.connect(out / "ledger.sqlite")
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT item_key) FROM items").fetchone() == (
        12,
        12,
    )
