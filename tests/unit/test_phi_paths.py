"""PathRedactor (medres.phi) and its use by ingest and score: no identity in path names."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from medres.errors import ConfigError
from medres.ingest.dicom import DicomHeader
from medres.phi import PathRedactor, pseudonym

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def _redactor(mode: str = "identity", key: bytes = KEY, **kw) -> PathRedactor:
    r = PathRedactor(key, mode, **kw)
    r.add_header(
        DicomHeader(
            path=Path("x.dcm"),
            source="x.dcm",
            patient_id="PID12345",
            patient_name="SMITH^JOHN^Q",
            accession="ACC777",
            birth_date="19600102",
            other_patient_ids=("MRN-4242",),
            study_uid="1.2.3.4.5",
            series_uid="1.2.3.4.6",
        )
    )
    return r


def _pseudo(component: str, key: bytes = KEY) -> str:
    return "~" + pseudonym(component, key)


@pytest.mark.parametrize(
    "folder",
    ["SMITH^JOHN", "Smith_John", "smith john", "SMITH, JOHN", "john", "x-Smith-2020",
     "pid12345", "PID-12345_ct", "acc777", "1960-01-02", "MRN4242", "1.2.3.4.5", "s_1.2.3.4.6"],
)  # fmt: skip
def test_identity_components_are_pseudonymised_whatever_their_spelling(folder):
    r = _redactor()
    assert r.redact(f"{folder}/ct/IM001.dcm") == f"{_pseudo(folder)}/ct/IM001.dcm"


def test_unrelated_components_and_short_name_parts_are_kept():
    r = _redactor()  # "Q" (the middle initial) is shorter than 3 characters: not a token
    for src in ("site/ct/IM001.dcm", "Q/series2/a.nii.gz", "JO/HN.dcm", "1.2.3.4.dcm"):
        assert r.redact(src) == src


def test_file_names_and_archive_members_are_redacted_component_by_component():
    r = _redactor()
    src = "batch/SMITH_JOHN.zip!exports/PID12345/ST001/img_smith.dcm"
    want = (
        f"batch/{_pseudo('SMITH_JOHN.zip')}!exports/{_pseudo('PID12345')}/ST001/"
        f"{_pseudo('img_smith.dcm')}"
    )
    assert r.redact(src) == want


def test_deterministic_idempotent_and_keyed():
    src = "PID12345/ST001/1.dcm"
    a, b = _redactor().redact(src), _redactor().redact(src)
    assert a == b and a != src
    assert _redactor().redact(a) == a  # already redacted components are left alone
    assert _redactor(key=OTHER_KEY).redact(src) != a  # keyed: not re-derivable without key
    assert re.fullmatch(r"~[0-9a-f]{16}/ST001/1\.dcm", a)


def test_modes_all_and_keep():
    r_all = _redactor("all", root_names=["siteA"])
    assert r_all.redact("siteA/p1/IM1.dcm") == f"siteA/{_pseudo('p1')}/{_pseudo('IM1.dcm')}"
    # a root named after the patient is not kept, even in mode all
    assert r_all.redact("SMITH/IM1.dcm").startswith(_pseudo("SMITH") + "/")
    r_keep = _redactor("keep")
    assert r_keep.redact("SMITH^JOHN/PID12345/1.dcm") == "SMITH^JOHN/PID12345/1.dcm"
    assert r_keep.redact_text("SMITH^JOHN/1.dcm: bad") == "SMITH^JOHN/1.dcm: bad"
    with pytest.raises(ConfigError, match=r"--source-paths 'some'.*identity, all, keep"):
        PathRedactor(KEY, "some")


def test_state_holds_no_token_and_restores_the_same_redaction():
    r = _redactor()
    state = r.hashed_tokens
    dumped = json.dumps(state).lower()
    for raw in ("smith", "john", "pid12345", "acc777", "19600102", "mrn4242", "12345"):
        assert raw not in dumped
    fresh = PathRedactor(KEY)
    assert fresh.redact("Smith_John/a.dcm") == "Smith_John/a.dcm"  # no tokens yet
    fresh.add_hashed(state)
    assert fresh.redact("Smith_John/a.dcm") == r.redact("Smith_John/a.dcm") != "Smith_John/a.dcm"


def test_redact_text_replaces_the_source_and_any_identifying_word():
    r = _redactor()
    src = "SMITH JOHN/ct/1.dcm"
    msg = f"{src}: duplicate of PID12345/ct/9.dcm; re-copy it"
    out = r.redact_text(msg, [src])
    assert out.startswith(r.redact(src) + ": duplicate of " + _pseudo("PID12345") + "/ct/9.dcm")
    assert "smith" not in out.lower() and "12345" not in out


# --------------------------------------------------------------------------- ingest
def _ct_series(folder: Path, pid: str, name: str, n: int = 3) -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = (
            meta.MediaStorageSOPClassUID,
            meta.MediaStorageSOPInstanceUID,
        )
        ds.PatientID, ds.PatientName = pid, name
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = "CT"
        ds.Rows = ds.Columns = 8
        ds.PixelSpacing = [0.5, 0.5]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.0 * k]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.full((8, 8), k, dtype=np.int16).tobytes()
        pydicom.dcmwrite(folder / f"IM{k:04d}", ds, enforce_file_format=True)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _all_text(out: Path) -> str:
    return "\n".join(
        p.read_bytes().decode("latin-1")
        for p in out.rglob("*")
        if p.is_file() and "images" not in p.parts
    )


@pytest.fixture
def named_tree(tmp_path: Path) -> Path:
    src = tmp_path / "export"
    _ct_series(src / "DOE^JANE" / "CT1", "QXPID0001", "DOE^JANE")
    _ct_series(src / "QXPID0002" / "CT1", "QXPID0002", "ROE^RICHARD")
    (src / "Richard Roe").mkdir()
    (src / "Richard Roe" / "notes.txt").write_text("not an image")  # junk: redacted too
    (src / "plain").mkdir()
    (src / "plain" / "junk.bin").write_bytes(b"\0" * 10)
    return src


def test_ingest_redacts_manifest_errors_cache_and_keeps_path_labels(named_tree, tmp_path):
    from medres.ingest.pipeline import IngestConfig, run_ingest

    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nDOE^JANE/CT1,1\nQXPID0002,0\n")  # raw paths, joined raw
    out = tmp_path / "ds"
    cfg = IngestConfig(sources=(named_tree,), out_dir=out, labels=labels, isolate=False)
    run_ingest(cfg)
    man = _rows(out / "manifest.csv")
    errs = _rows(out / "errors.csv")
    assert sorted(r["label"] for r in man) == ["0", "1"]
    assert {r["source"] for r in errs} == {
        f"{_pseudo('Richard Roe', _key(out))}/notes.txt",
        "plain/junk.bin",
    }
    assert {r["source"] for r in man} == {
        f"{_pseudo('DOE^JANE', _key(out))}/CT1",
        f"{_pseudo('QXPID0002', _key(out))}/CT1",
    }
    text = _all_text(out).lower()
    for raw in ("doe", "jane", "qxpid", "richard", "roe^"):
        # as a word (issue #16: "does" in a message is not the name part "doe")
        assert not re.search(rf"(?<![a-z]){re.escape(raw)}(?![a-z])", text), raw
    # incremental: the second run reads no header but writes the same files
    before = {n: (out / n).read_text() for n in ("manifest.csv", "errors.csv")}
    rep = run_ingest(cfg)
    assert rep.files["cached"] == 6
    assert {n: (out / n).read_text() for n in before} == before
    # keep: paths as they are
    run_ingest(IngestConfig(sources=(named_tree,), out_dir=out, isolate=False, source_paths="keep"))
    assert {r["source"] for r in _rows(out / "manifest.csv")} == {"DOE^JANE/CT1", "QXPID0002/CT1"}


def _key(out: Path) -> bytes:
    from medres.phi import load_or_create_key

    return load_or_create_key(out)


def test_ingest_mode_all_and_unknown_mode(named_tree, tmp_path):
    from medres.ingest.pipeline import IngestConfig, run_ingest

    out = tmp_path / "ds"
    run_ingest(IngestConfig(sources=(named_tree,), out_dir=out, isolate=False, source_paths="all"))
    errs = {r["source"] for r in _rows(out / "errors.csv")}
    k = _key(out)
    assert f"{_pseudo('plain', k)}/{_pseudo('junk.bin', k)}" in errs
    info = json.loads((out / "ingest.json").read_text())
    assert info["settings"]["source_paths"] == "all"
    with pytest.raises(ConfigError, match="--source-paths"):
        run_ingest(IngestConfig(sources=(named_tree,), out_dir=out, source_paths="hide"))


def test_score_sources_are_redacted_with_the_tokens_of_all_headers(named_tree, tmp_path):
    from medres.score.sources import discover_items

    items = list(discover_items([named_tree], key=KEY, scratch=tmp_path / "s"))
    by_kind = {(it.kind, it.source) for it in items}
    assert by_kind == {
        ("dicom", f"{_pseudo('DOE^JANE')}/CT1"),
        ("dicom", f"{_pseudo('QXPID0002')}/CT1"),
        ("error", f"{_pseudo('Richard Roe')}/notes.txt"),
        ("error", "plain/junk.bin"),
    }
    for it in items:
        assert "richard" not in it.message.lower()
    keep = list(discover_items([named_tree], key=KEY, scratch=tmp_path / "s", source_paths="keep"))
    assert {it.key for it in keep} == {it.key for it in items}  # keys do not depend on mode
    assert "DOE^JANE/CT1" in {it.source for it in keep}


@pytest.mark.parametrize("command", ["ingest", "score"])
def test_cli_rejects_an_unknown_mode_in_one_line(named_tree, tmp_path, command):
    from typer.testing import CliRunner

    from medres.cli import app

    args = [str(named_tree), "--out", str(tmp_path / "o"), "--source-paths", "hide"]
    if command == "score":
        args = [str(tmp_path / "no-model"), *args]
    r = CliRunner().invoke(app, [command, *args])
    assert r.exit_code == 1, r.output
    assert "--source-paths 'hide'" in r.output and "Traceback" not in r.output


# --------------------------------------------------------------------------- Unicode, CJK, text
def test_nfd_and_full_width_spellings_are_pseudonymised():
    import unicodedata

    r = PathRedactor(KEY)
    r.add_values(["MRN0009"], ["MÜLLER^JÖRG"])
    for folder in (unicodedata.normalize("NFD", "Müller_Jörg"), "ＭＲＮ０００９", "mrn０００９_ct"):
        assert r.redact(f"{folder}/1.dcm") == f"{_pseudo(folder)}/1.dcm"
    # the header written in NFD / full width matches an NFC / ASCII folder too
    r2 = PathRedactor(KEY)
    r2.add_values(["ＭＲＮ０００９"], [unicodedata.normalize("NFD", "MÜLLER^JÖRG")])
    assert r2.redact("Müller/MRN0009/1.dcm") == f"{_pseudo('Müller')}/{_pseudo('MRN0009')}/1.dcm"


def test_cjk_name_parts_of_two_characters_and_the_joined_name_are_tokens():
    r = PathRedactor(KEY)
    r.add_values(names=["Yamada^Taro=山田^太郎=やまだ^たろう", "Li^X"])
    for folder in (
        "山田",
        "太郎",
        "山田太郎",
        "患者_山田太郎",
        "やまだたろう",
        "TaroYamada",
        "YAMADATARO",
    ):
        assert r.redact(f"{folder}/1.dcm") == f"{_pseudo(folder)}/1.dcm", folder
    # a single CJK character and Latin parts under 3 characters are no tokens
    for src in ("山/1.dcm", "Li/1.dcm", "X/1.dcm"):
        assert r.redact(src) == src


def test_text_keeps_dicom_tag_notation_and_matches_whole_tokens_only():
    r = PathRedactor(KEY)
    r.add_values(["0010", "PID77"], ["SMITH^JOHN"])
    msg = "bad (0002,0010) in 00100.dcm of 41234 and 0010-a; pid77 JohnSmith"
    out = r.redact_text(msg)
    assert out.startswith("bad (0002,0010) in 00100.dcm of 41234 and ")
    assert _pseudo("0010-a") in out and _pseudo("pid77") in out and _pseudo("JohnSmith") in out
    assert "pid77" not in out.lower() and "smith" not in out.lower()


def test_redact_value_filters_header_free_text_in_every_mode():
    for mode in ("identity", "all", "keep"):
        r = _redactor(mode)
        assert r.redact_value("SIEMENS") == "SIEMENS"
        assert r.redact_value("CHEST") == "CHEST"
        out = r.redact_value("SMITH^JOHN")
        assert out == _pseudo("SMITH^JOHN") and "smith" not in out.lower()
        assert "12345" not in r.redact_value("GE PID12345")
