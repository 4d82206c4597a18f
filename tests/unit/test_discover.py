"""Discovery of inputs and hostile archives: nothing is ever written outside the scratch dir."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from medres.errors import ConfigError
from medres.ingest.discover import (
    ArchiveLimits,
    clean_source,
    discover,
    safe_member_path,
)

pytestmark = pytest.mark.reliability


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture
def work(tmp_path):
    """A fresh layout: tmp/in (sources), tmp/scratch; returns (tmp, snapshot of tmp)."""
    (tmp_path / "in").mkdir()
    return tmp_path


def _outside_scratch(tmp: Path, before: set[str]) -> set[str]:
    """Paths created during the test that are not inside scratch/."""
    return {p for p in _tree(tmp) - before if not p.startswith("scratch")}


def test_folder_walk_is_sorted_relative_and_skips_output_and_dir_links(work):
    src = work / "in" / "Doe^John"  # folder names above the root never appear in sources
    (src / "b").mkdir(parents=True)
    (src / "a").mkdir()
    (src / "b" / "2.dcm").write_bytes(b"2")
    (src / "a" / "1").write_bytes(b"1")
    (src / "out" / "images").mkdir(parents=True)
    (src / "out" / "images" / "x.nii.gz").write_bytes(b"x")
    outside = work / "outside"
    outside.mkdir()
    (outside / "secret.dcm").write_bytes(b"s")
    os.symlink(outside, src / "link_dir")
    os.symlink(src / "a" / "1", src / "file_link")
    found = discover([src], work / "scratch", exclude=[src / "out"])
    assert [f.source for f in found.files] == ["a/1", "b/2.dcm", "file_link"]
    assert all("Doe" not in f.source for f in found.files)
    assert found.seen == 3
    f0 = found.files[0]
    assert f0.size == 1 and f0.path == src / "a" / "1"


def test_several_roots_are_prefixed_and_collisions_refused(work):
    for name in ("siteA", "siteB"):
        (work / "in" / name).mkdir()
        (work / "in" / name / "1.dcm").write_bytes(b"x")
    (work / "in" / "one.nii.gz").write_bytes(b"n")
    found = discover(
        [work / "in" / "siteA", work / "in" / "siteB", work / "in" / "one.nii.gz"],
        work / "scratch",
    )
    assert [f.source for f in found.files] == ["siteA/1.dcm", "siteB/1.dcm", "one.nii.gz"]
    (work / "other" / "siteA").mkdir(parents=True)
    with pytest.raises(ConfigError, match="same base name 'siteA'"):
        discover([work / "in" / "siteA", work / "other" / "siteA"], work / "scratch")
    with pytest.raises(ConfigError, match="does not exist"):
        discover([work / "in" / "nope"], work / "scratch")


def test_fingerprint_changes_with_content(work):
    f = work / "in" / "x.dcm"
    f.write_bytes(b"abc")
    fp1 = discover([f], work / "scratch").files[0].fingerprint
    assert discover([f], work / "scratch").files[0].fingerprint == fp1
    time.sleep(0.01)
    f.write_bytes(b"abcd")
    assert discover([f], work / "scratch").files[0].fingerprint != fp1


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("a/b.dcm", True),
        ("./a//b.dcm", True),
        ("../evil", False),
        ("a/../../evil", False),
        ("/etc/passwd", False),
        ("\\windows\\evil", False),
        ("C:evil", False),
        ("a\\..\\..\\evil", False),
        ("", False),
    ],
)
def test_safe_member_path(name, ok):
    assert (safe_member_path(name) is not None) is ok


def _zip(path: Path, members: dict[str, bytes], *, compress=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compress)
    return path


def test_zip_members_extracted_with_bang_sources(work):
    arc = _zip(work / "in" / "batch.zip", {"p1/a.dcm": b"A", "p1/b.dcm": b"BB", "p2/": b""})
    found = discover([work / "in"], work / "scratch")
    assert [f.source for f in found.files] == ["batch.zip!p1/a.dcm", "batch.zip!p1/b.dcm"]
    assert [f.path.read_bytes() for f in found.files] == [b"A", b"BB"]
    assert all(f.path.is_relative_to(work / "scratch") for f in found.files)
    assert found.archives == 1 and not found.rejected
    assert arc.exists()


def test_zip_slip_absolute_and_symlink_members_are_rejected_and_not_written(work):
    before = _tree(work)
    arc = work / "in" / "evil.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("../evil", b"pwned")
        zf.writestr("ok/../../evil2", b"pwned")
        zf.writestr("/tmp/medres_abs_evil", b"pwned")
        zf.writestr("C:\\evil3", b"pwned")
        link = zipfile.ZipInfo("link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("good/1.dcm", b"G")
    t = time.monotonic()
    found = discover([arc], work / "scratch")
    assert time.monotonic() - t < 5
    assert [f.source for f in found.files] == ["evil.zip!good/1.dcm"]
    codes = {r.source: r.code for r in found.rejected}
    assert codes == {
        "evil.zip!../evil": "archive_unsafe",
        "evil.zip!ok/../../evil2": "archive_unsafe",
        "evil.zip!/tmp/medres_abs_evil": "archive_unsafe",
        "evil.zip!C:\\evil3": "archive_unsafe",
        "evil.zip!link": "archive_unsafe",
    }
    assert all("\n" not in r.message for r in found.rejected)
    assert _outside_scratch(work, before) == {"in/evil.zip"}
    assert not Path("/tmp/medres_abs_evil").exists()
    scratch_files = [p for p in (work / "scratch").rglob("*") if p.is_file()]
    assert [p.read_bytes() for p in scratch_files] == [b"G"]


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if data else None)


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz"])
def test_tar_links_devices_and_escapes_are_rejected(work, suffix):
    before = _tree(work)
    arc = work / "in" / f"evil{suffix}"
    mode = "w:gz" if suffix != ".tar" else "w"
    with tarfile.open(arc, mode) as tf:
        _tar_add(tf, "good/1.dcm", b"G")
        _tar_add(tf, "sym", type=tarfile.SYMTYPE, linkname="../../outside_target")
        _tar_add(tf, "abs_sym", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _tar_add(tf, "hard", type=tarfile.LNKTYPE, linkname="/etc/passwd")
        _tar_add(tf, "dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        _tar_add(tf, "fifo", type=tarfile.FIFOTYPE)
        _tar_add(tf, "../escape.dcm", b"E")
        _tar_add(tf, "/abs.dcm", b"E")
        # a file written "through" the symlink: must not land outside
        _tar_add(tf, "sym/through.dcm", b"E")
    found = discover([arc], work / "scratch")
    # "sym/through.dcm" lands in a real folder "sym" inside scratch: the link was never made
    assert [f.source for f in found.files] == [
        f"evil{suffix}!good/1.dcm",
        f"evil{suffix}!sym/through.dcm",
    ]
    assert found.files[1].path.parent.is_relative_to(work / "scratch")
    rejected = {r.source.split("!", 1)[1]: r.code for r in found.rejected}
    assert set(rejected) == {"sym", "abs_sym", "hard", "dev", "fifo", "../escape.dcm", "/abs.dcm"}
    assert set(rejected.values()) == {"archive_unsafe"}
    assert _outside_scratch(work, before) == {f"in/evil{suffix}"}
    for p in (work / "scratch").rglob("*"):
        assert not p.is_symlink()
        assert p.is_dir() or p.is_file()


def test_zip_bomb_ratio_is_rejected_quickly_and_cleaned_up(work):
    before = _tree(work)
    arc = _zip(
        work / "in" / "bomb.zip", {"zeros.dcm": bytes(8 << 20)}, compress=zipfile.ZIP_DEFLATED
    )
    assert arc.stat().st_size < 100_000
    t = time.monotonic()
    found = discover([arc], work / "scratch")
    assert time.monotonic() - t < 5
    assert found.files == []
    assert [(r.source, r.code) for r in found.rejected] == [("bomb.zip", "archive_unsafe")]
    assert "ratio" in found.rejected[0].message
    assert _outside_scratch(work, before) == {"in/bomb.zip"}
    assert not any(p.is_file() for p in (work / "scratch").rglob("*"))


def test_zip_bomb_with_lying_header_is_stopped_while_streaming(work):
    """A member whose declared size is small but which inflates to much more."""
    arc = work / "in" / "liar.zip"
    _zip(arc, {"z.dcm": bytes(4 << 20)}, compress=zipfile.ZIP_DEFLATED)
    # patch the declared sizes (local header and central directory) to look harmless
    data = bytearray(arc.read_bytes())
    real = (4 << 20).to_bytes(4, "little")
    fake = (1000).to_bytes(4, "little")
    assert data.count(real) == 2
    arc.write_bytes(bytes(data).replace(real, fake))
    found = discover([arc], work / "scratch", limits=ArchiveLimits(max_ratio=1e9))
    assert found.files == []
    assert [r.code for r in found.rejected] in (["archive_unsafe"], ["unreadable"])
    assert not any(p.is_file() for p in (work / "scratch").rglob("*"))


def test_tar_gz_bomb_is_stopped_by_the_total_ratio(work):
    arc = work / "in" / "bomb.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        _tar_add(tf, "zeros.dcm", bytes(8 << 20))
    found = discover([arc], work / "scratch")
    assert found.files == []
    assert [(r.source, r.code) for r in found.rejected] == [("bomb.tar.gz", "archive_unsafe")]
    assert not any(p.is_file() for p in (work / "scratch").rglob("*"))


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_member_count_limit_rejects_whole_archive(work, kind):
    members = {f"m{i}.dcm": b"x" for i in range(30)}
    if kind == "zip":
        arc = _zip(work / "in" / "many.zip", members)
    else:
        arc = work / "in" / "many.tar"
        with tarfile.open(arc, "w") as tf:
            for name, data in members.items():
                _tar_add(tf, name, data)
    found = discover([arc], work / "scratch", limits=ArchiveLimits(max_members=10))
    assert found.files == []
    assert len(found.rejected) == 1
    assert found.rejected[0].code == "archive_unsafe"
    assert "--max-archive-members" in found.rejected[0].message
    ok = discover([arc], work / "scratch2", limits=ArchiveLimits(max_members=30))
    assert len(ok.files) == 30


def test_total_size_limit_and_corrupt_archive(work):
    arc = _zip(work / "in" / "big.zip", {"a.dcm": bytes(5000), "b.dcm": bytes(5000)})
    found = discover([arc], work / "scratch", limits=ArchiveLimits(max_total_bytes=8000))
    assert [r.code for r in found.rejected] == ["archive_unsafe"]
    bad = work / "in" / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    found = discover([bad], work / "scratch")
    assert [(r.source, r.code) for r in found.rejected] == [("broken.zip", "unreadable")]
    assert "\n" not in found.rejected[0].message


def test_clean_source_removes_control_characters():
    assert clean_source("a\nb\x00c\td") == "a?b?c?d"


def test_unreadable_members_are_rejected_one_by_one(work):
    """An encrypted zip member is refused alone; the other members are used."""
    arc = _zip(work / "in" / "enc.zip", {"a.dcm": b"A" * 100, "b.dcm": b"B" * 100})
    data = bytearray(arc.read_bytes())
    # set the 'encrypted' flag of member b.dcm in its local header and central directory
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = data.find(sig, data.find(sig) + 1)  # the second entry of each kind
        data[pos + flag_at] |= 0x01
    arc.write_bytes(bytes(data))
    found = discover([arc], work / "scratch")
    assert [f.source for f in found.files] == ["enc.zip!a.dcm"]
    assert [(r.source, r.code) for r in found.rejected] == [("enc.zip!b.dcm", "unreadable")]
    assert [p.name for p in (work / "scratch").rglob("*") if p.is_file()] == ["a.dcm"]


def test_truncated_tar_gz_keeps_the_members_before_the_cut(work):
    arc = work / "in" / "cut.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        for i in range(4):
            _tar_add(tf, f"m{i}.dcm", os.urandom(40_000))  # incompressible
    arc.write_bytes(arc.read_bytes()[: int(arc.stat().st_size * 0.6)])
    found = discover([arc], work / "scratch")
    assert 1 <= len(found.files) <= 2
    assert all(f.path.stat().st_size == 40_000 for f in found.files)
    assert ("cut.tar.gz", "unreadable") in [(r.source, r.code) for r in found.rejected]
    assert found.seen == len(found.files) + len(found.rejected)
