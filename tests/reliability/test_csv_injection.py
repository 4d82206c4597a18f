"""CSV formula injection (issue #16): no cell of a CSV medres writes starts a spreadsheet
formula, and reading medres's CSVs back gives the original text.

A file named ``=cmd|' /C calc'!A0.dcm``, ``+1.dcm``, ``@SUM.dcm`` or ``-x.dcm`` is written
``'=cmd|...`` (the one cell rule of :mod:`medres.io`); numbers (``-0.5``, ``-1e-3``) are
never escaped; the manifest, errors, scores, predictions and labels readers strip the
escape again, so a source read back from manifest.csv is the file name on disk.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from helpers.models import write_dicom_2d, write_model_dir
from typer.testing import CliRunner

from medres.cli import app
from medres.dataset.manifest import read_manifest
from medres.io import CSV_TRIGGERS, csv_dict_reader, csv_dict_writer, csv_escape, csv_unescape

pytestmark = pytest.mark.reliability

runner = CliRunner()
DICOM_NAMES = ("=cmd|' C calc'!A0.dcm", "+1.dcm", "@SUM.dcm", "-x.dcm")
JUNK_NAMES = ("=HYPERLINK(x).dcm", "-2+3.txt", "@junk.bin", "+cmd.dat", "'quoted.txt")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _dangerous_cells(folder: Path) -> list[str]:
    """Every cell of every CSV below ``folder`` that a spreadsheet may run as a formula."""
    bad = []
    for path in sorted(folder.rglob("*.csv")):
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                bad += [
                    f"{path.name}: {c!r}"
                    for c in row
                    if c.startswith(CSV_TRIGGERS[:-1]) and not _is_number(c)
                ]
    return bad


@pytest.mark.parametrize(
    "text",
    ["=x", "'=x", "''", "'", "+1.dcm", "@SUM", "-x", "\tx", "\rx", "=", "a=b", "", "plain"],
)
def test_escape_round_trips(text: str) -> None:
    escaped = csv_escape(text)
    assert csv_unescape(escaped) == text
    assert not escaped.startswith(CSV_TRIGGERS[:-1])


@pytest.mark.parametrize("number", ["-0.5", "-1e-3", "+1", "-inf", "nan", "-.5", "-1E+09"])
def test_numbers_are_never_escaped(number: str) -> None:
    assert csv_escape(number) == number and csv_unescape(number) == number


def test_non_text_and_hand_written_quotes_are_left_alone() -> None:
    assert csv_escape(-0.5) == -0.5 and csv_escape(None) is None
    assert csv_unescape("'note") == "'note"  # not an escape of ours: kept
    assert csv_escape("-1_0") == "'-1_0"  # float() reads it, a spreadsheet may not


def test_dict_writer_and_reader_round_trip_header_and_cells() -> None:
    buf = io.StringIO()
    w = csv_dict_writer(buf, ["=col", "b"], lineterminator="\n")
    w.writeheader()
    w.writerow({"=col": "@SUM(A1)", "b": "-0.25"})
    assert buf.getvalue() == "'=col,b\n'@SUM(A1),-0.25\n"
    r = csv_dict_reader(io.StringIO(buf.getvalue()))
    assert r.fieldnames == ["=col", "b"]
    assert list(r) == [{"=col": "@SUM(A1)", "b": "-0.25"}]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Ingest of a folder whose DICOM and junk file names start with formula triggers."""
    root = tmp_path_factory.mktemp("csv_injection")
    src = root / "src"
    src.mkdir()
    for i, name in enumerate(DICOM_NAMES):
        uid = f"1.2.826.0.1.3680043.8.498.{700 + i}"
        write_dicom_2d(src / name, study_uid=uid, series_uid=uid + ".1", seed=i, patient_id=f"P{i}")
    for name in JUNK_NAMES:
        (src / name).write_bytes(b"not an image " * 4)
    out = root / "ds"
    res = runner.invoke(app, ["ingest", str(src), "--out", str(out), "--workers", "0"])
    assert res.exit_code == 0, res.output
    return {"root": root, "src": src, "out": out}


def test_ingest_csvs_start_no_formula(hostile: dict[str, Path]) -> None:
    assert _dangerous_cells(hostile["out"]) == []
    text = (hostile["out"] / "manifest.csv").read_text() + (
        hostile["out"] / "errors.csv"
    ).read_text()
    assert "'=cmd|' C calc'!A0.dcm" in text and "'@junk.bin" in text


def test_manifest_and_errors_read_back_exactly(hostile: dict[str, Path]) -> None:
    m = read_manifest(hostile["out"])
    assert sorted(r["source"] for r in m.rows) == sorted(DICOM_NAMES)
    with open(hostile["out"] / "errors.csv", newline="", encoding="utf-8") as fh:
        errors = {r["source"]: r["code"] for r in csv_dict_reader(fh)}
    assert errors == dict.fromkeys(JUNK_NAMES, "not_dicom")


def test_score_of_the_manifest_starts_no_formula(hostile: dict[str, Path]) -> None:
    """score reads manifest.csv (unescaped) and writes scores.csv (escaped once)."""
    model = write_model_dir(hostile["root"] / "model", image_size=(16, 16))
    out = hostile["root"] / "scores"
    manifest = hostile["out"] / "manifest.csv"
    res = runner.invoke(app, ["score", str(model), str(manifest), "--out", str(out), "-j", "0"])
    assert res.exit_code == 0, res.output
    assert _dangerous_cells(out) == []
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv_dict_reader(fh))
    assert sorted(r["source"] for r in rows) == sorted(DICOM_NAMES)
    assert all(r["status"] == "ok" for r in rows)


def test_evaluate_reads_escaped_predictions_back(tmp_path: Path) -> None:
    """evaluate's predictions reader strips the escape (subgroup values keep their text)."""
    from medres.evaluate.table import read_table
    from medres.io import atomic_open

    path = tmp_path / "predictions_test.csv"
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv_dict_writer(fh, ["image_id", "label", "prob_1", "manufacturer"])
        w.writeheader()
        w.writerow({"image_id": "a", "label": "1", "prob_1": "0.9", "manufacturer": "=Evil()"})
        w.writerow({"image_id": "b", "label": "0", "prob_1": "-0.5", "manufacturer": "-x"})
    assert "'=Evil()" in path.read_text()
    table = read_table(path)
    assert [r["manufacturer"] for r in table.rows] == ["=Evil()", "-x"]
    assert [r["prob_1"] for r in table.rows] == ["0.9", "-0.5"]
