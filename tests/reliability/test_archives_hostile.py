"""Archives and file names that used to lose data or crash ingest (issues #15, #16).

Promise: every input is accounted for exactly once (``seen = used + rejected + skipped``,
each source once in manifest.csv or errors.csv): two members of the same name are both
read, an over-long member name costs at most that member, non-UTF-8 names are read and
written safely (ingest and score), an earlier output folder below a SOURCE is not an
input, nested archives and ``.dcm.gz`` files are read under the archive limits.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medres.cli import app
from medres.ingest.codes import Code
from medres.ingest.discover import MAX_DEPTH, ArchiveLimits
from medres.ingest.pipeline import IngestConfig, run_ingest
from medres.io import csv_dict_reader

pytestmark = pytest.mark.reliability

runner = CliRunner()


@pytest.fixture(scope="module")
def dicoms(synth_xray) -> list[bytes]:
    """Three different valid radiographs (different images, so none is a duplicate)."""
    return [p.read_bytes() for p in sorted(synth_xray.data_dir.rglob("*.dcm"))[:3]]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv_dict_reader(fh))  # medres's CSVs escape formula starts


def _ingest(src: Path, out: Path, **kw) -> tuple[dict, list[str], dict[str, str]]:
    """Run ingest; returns (file counts, manifest sources, errors source -> code), after
    checking the accounting identity and that no source appears twice."""
    run_ingest(IngestConfig((src,), out, isolate=False, workers=1, **kw))
    files = json.loads((out / "ingest.json").read_text())["files"]
    used = [r["source"] for r in _rows(out / "manifest.csv")]
    errors = {r["source"]: r["code"] for r in _rows(out / "errors.csv")}
    assert files["seen"] == files["used"] + files["rejected"] + files["skipped"], files
    assert files["seen"] == len(used) + len(errors), (files, used, errors)
    assert len(set(used)) == len(used) and not set(used) & set(errors)
    return files, used, errors


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    bio = io.BytesIO()
    with zipfile.ZipFile(bio, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return bio.getvalue()


def test_two_zip_members_of_the_same_name_are_both_read(dicoms, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with zipfile.ZipFile(src / "dup.zip", "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        zf.writestr("x.dcm", dicoms[0])
        zf.writestr("x.dcm", dicoms[1])
    files, used, errors = _ingest(src, tmp_path / "ds")
    assert files["seen"] == 2 and files["used"] == 2, files
    assert sorted(used) == ["dup.zip!x.dcm", "dup.zip!x.dcm#2"]
    assert errors == {}


def test_an_over_long_member_name_costs_nothing_else(dicoms, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    long_name = "d" * 300 + ".dcm"  # > 255 bytes: no file system can hold it as named
    (src / "long.zip").write_bytes(_zip_bytes({"ok.dcm": dicoms[0], long_name: dicoms[1]}))
    files, used, errors = _ingest(src, tmp_path / "ds")
    assert files["seen"] == 2, files
    assert "long.zip!ok.dcm" in used
    assert "long.zip" not in errors
    # the long member is read too (under a short scratch name); its source is kept
    assert f"long.zip!{long_name}" in used


def _latin1_tree(src: Path, dicoms: list[bytes]) -> None:
    src.mkdir()
    (src / os.fsdecode(b"caf\xe9.dcm")).write_bytes(dicoms[0])
    with tarfile.open(src / "t.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        _tar_add(tf, "na\xefve.dcm", dicoms[1])  # raw Latin-1 bytes in the header


def test_latin1_file_names_in_folders_and_tars_are_read(dicoms, tmp_path):
    src = tmp_path / "src"
    _latin1_tree(src, dicoms)
    with tarfile.open(src / "t.tar", encoding="utf-8", errors="surrogateescape") as tf:
        assert "\udcef" in tf.getnames()[0]  # the header really holds non-UTF-8 bytes
    for _ in range(2):  # and again on a rerun (cache, incremental)
        files, used, errors = _ingest(src, tmp_path / "ds")
        assert files["used"] == 2, (files, errors)
        assert sorted(used) == ["caf\\xe9.dcm", "t.tar!na\\xefve.dcm"]
        manifest = (tmp_path / "ds" / "manifest.csv").read_bytes()
        manifest.decode("utf-8")  # strict: valid UTF-8 throughout


def test_latin1_file_names_are_scored_without_a_crash(dicoms, tmp_path):
    from helpers.models import write_model_dir

    from medres.score import ScoreConfig, score

    src = tmp_path / "src"
    _latin1_tree(src, dicoms)
    model = write_model_dir(tmp_path / "model", image_size=(16, 16))
    out = tmp_path / "scores"
    for _ in range(2):  # a rerun reads its ledger back
        score(
            ScoreConfig(model, (src,), out, workers=0, batch_size=4, precision="fp32", device="cpu")
        )
        rows = _rows(out / "scores.csv")
        assert sorted(r["status"] for r in rows) == ["ok", "ok"], rows


def test_an_earlier_dataset_below_the_source_is_not_an_input(dicoms, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.dcm").write_bytes(dicoms[0])
    (src / "b.dcm").write_bytes(dicoms[1])
    first = runner.invoke(app, ["ingest", str(src), "--out", str(src / "ds"), "--workers", "1"])
    assert first.exit_code == 0, first.output
    assert list((src / "ds" / "images").glob("*.nii"))
    # now into the SOURCE folder itself, twice: neither src/ds nor src's own outputs are read
    for _ in range(2):
        r = runner.invoke(app, ["ingest", str(src), "--out", str(src), "--workers", "1"])
        assert r.exit_code == 0, r.output
        files = json.loads((src / "ingest.json").read_text())["files"]
        used = [row["source"] for row in _rows(src / "manifest.csv")]
        errors = _rows(src / "errors.csv")
        assert sorted(used) == ["a.dcm", "b.dcm"], (used, errors)
        assert errors == []
        assert files["seen"] == 2 == files["used"], files


def test_a_zip_inside_a_tar_and_dcm_gz_files_are_read(dicoms, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    inner = _zip_bytes({"in.dcm": dicoms[0]})
    with tarfile.open(src / "outer.tar", "w") as tf:
        _tar_add(tf, "inner.zip", inner)
        _tar_add(tf, "member.dcm.gz", gzip.compress(dicoms[1]))
    (src / "plain.dcm.gz").write_bytes(gzip.compress(dicoms[2]))
    files, used, errors = _ingest(src, tmp_path / "ds")
    assert sorted(used) == ["outer.tar!inner.zip!in.dcm", "outer.tar!member.dcm.gz", "plain.dcm.gz"]
    assert errors == {} and files["seen"] == 3


def test_nesting_is_bounded_and_shares_the_outer_limits(dicoms, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = _zip_bytes({"deep.dcm": dicoms[0]})
    for level in range(MAX_DEPTH):  # MAX_DEPTH + 1 levels in all: the innermost is refused
        data = _zip_bytes({f"l{level}.zip": data, f"ok{level}.dcm": dicoms[level % 3]})
    (src / "nest.zip").write_bytes(data)
    with tarfile.open(src / "corrupt_inside.tar", "w") as tf:
        _tar_add(tf, "bad.zip", b"PK\x03\x04 not a zip")
        _tar_add(tf, "bad.dcm.gz", b"\x1f\x8b not gzip")
    _files, used, errors = _ingest(src, tmp_path / "ds")
    deepest = "nest.zip!l2.zip!l1.zip!l0.zip"
    assert errors[deepest] == Code.ARCHIVE_UNSAFE.value, errors
    assert errors["corrupt_inside.tar!bad.zip"] == Code.UNREADABLE.value
    assert errors["corrupt_inside.tar!bad.dcm.gz"] == Code.UNREADABLE.value
    assert "nest.zip!ok2.dcm" in used and "nest.zip!l2.zip!l1.zip!ok0.dcm" in used
    # the member count of the outer archive covers the nested ones
    from medres.ingest.discover import discover

    found = discover([src / "nest.zip"], tmp_path / "scratch", limits=ArchiveLimits(max_members=3))
    assert [(r.source, r.code) for r in found.rejected] == [
        ("nest.zip!l2.zip", Code.ARCHIVE_UNSAFE.value)
    ]


def test_links_empty_files_odd_names_and_special_tar_members_are_accounted(dicoms, tmp_path):
    """A hostile tree: a folder link to its parent (a loop), a link to itself, zero-byte
    files, a newline and a spreadsheet formula in file names, and a tar holding a hard
    link, a device, a FIFO and an empty member. Ingest finishes; every regular file and
    every member is named once (links to folders and dangling links are not inputs)."""
    src = tmp_path / "src"
    (src / "loop").mkdir(parents=True)
    os.symlink("..", src / "loop" / "up")  # walking it would never end
    os.symlink("self", src / "self")  # ELOOP when opened
    (src / "a.dcm").write_bytes(dicoms[0])
    (src / "new\nline.dcm").write_bytes(dicoms[1])
    (src / "=cmd|' -C calc'!A0.dcm").write_bytes(dicoms[2])
    (src / "empty.dcm").write_bytes(b"")
    with tarfile.open(src / "odd.tar", "w") as tf:
        _tar_add(tf, "zero.dcm", b"")
        for name, kind in (("hard.dcm", tarfile.LNKTYPE), ("dev", tarfile.CHRTYPE),
                           ("fifo", tarfile.FIFOTYPE)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "zero.dcm" if kind == tarfile.LNKTYPE else ""
            tf.addfile(info)
    files, used, errors = _ingest(src, tmp_path / "ds")
    assert files["seen"] == 8, (files, used, errors)  # 4 files + 4 members; links are not
    assert sorted(used) == ["=cmd|' -C calc'!A0.dcm", "a.dcm", "new?line.dcm"], used
    assert {k: v for k, v in errors.items() if k.startswith("odd.tar!")} == {
        "odd.tar!zero.dcm": Code.NOT_DICOM,
        "odd.tar!hard.dcm": Code.ARCHIVE_UNSAFE,
        "odd.tar!dev": Code.ARCHIVE_UNSAFE,
        "odd.tar!fifo": Code.ARCHIVE_UNSAFE,
    }
    assert errors["empty.dcm"] == Code.NOT_DICOM
