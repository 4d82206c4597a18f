"""Inputs that used to hang or be misreported (issue #16).

* A JPEG-LS frame with one byte changed (the long fuzz mode's case 370 at base seed 1 of
  a synthetic JPEG-LS radiograph) made pylibjpeg-libjpeg spin in C forever; with
  :mod:`medres.ingest.dicom.decoder_guards` CharLS (pyjpegls) decodes JPEG-LS and the
  case is ``decode_failed`` at once, named as a damaged file, not a missing decoder.
* Compressed pixel data cut short by the end of the file (the long fuzz mode's truncations
  of pydicom's JPEG-LS files) kept CharLS busy for seconds per file, past the per-file
  limit under load; it is ``truncated`` before any decoder runs (``cut_fragment``).
* A JPEG 2000 frame whose JP2 box chain holds a zero-length box made pydicom's
  ``get_j2k_parameters`` loop forever (found by the long fuzz mode on a mutated
  ``GDCMJ2K_TextGBR.dcm``: a ``timeout`` after the full 10 s per-file limit). With the guard
  of :mod:`medres.ingest.dicom.j2k_guard` it is ``decode_failed`` in milliseconds.
* A zero-byte or too-short ``.nii`` / ``.nii.gz`` / ``.hdr`` was ``not_dicom`` (junk);
  it is ``invalid_nifti`` with a message naming the file, the cause and the fix, in ingest
  and in score.
"""

from __future__ import annotations

import csv
import gzip
import re
import time
from pathlib import Path

import pytest
from fuzz_mutations import case_rng, mutate
from helpers.models import write_model_dir, write_nifti_folder
from typer.testing import CliRunner

from medres.cli import app
from medres.ingest import dicom
from medres.ingest.dicom.decoder_guards import (
    JP2_SIGNATURE,
    drop_hanging_jpegls_plugin,
    guarded,
    install,
    jp2_boxes_advance,
)
from medres.ingest.tasks import DecodeJob, decode_task, scan_task
from medres.workers import IsolatedPool

pytestmark = pytest.mark.reliability

runner = CliRunner()
# the long-mode case that hung: seed file, case index, base seed (see test_fuzz.py)
HUNG_CASE = ("GDCMJ2K_TextGBR.dcm", 162, 0)
# the JPEG-LS case that hung: a synthetic radiograph (test_fuzz.py's seed spec), case, base
HUNG_JPEGLS_SPEC = dict(kind="xray", n_patients=2, shape=(24, 20), compression="jpegls", seed=23)
HUNG_JPEGLS_CASE = (370, 1)


def _box(kind: bytes, body: bytes, length: int | None = None) -> bytes:
    n = len(body) + 8 if length is None else length
    return n.to_bytes(4, "big") + kind + body


def test_zero_length_box_before_the_codestream_is_caught() -> None:
    ftyp = _box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ")
    sig = JP2_SIGNATURE + b"\r\n\x87\n"  # the 12-byte signature box
    good = sig + ftyp + _box(b"jp2c", b"\xff\x4f\xff\x51")
    bad = sig + ftyp + _box(b"Zu\x00\x00", b"junk", length=0) + _box(b"jp2c", b"")
    assert jp2_boxes_advance(good) and jp2_boxes_advance(b"\xff\x4f\xff\x51")
    assert not jp2_boxes_advance(bad)
    calls: list[bytes] = []
    safe = guarded(lambda cs: calls.append(cs) or {"precision": 8})
    assert safe(bad) == {} and calls == []
    assert safe(good) == {"precision": 8} and calls == [good]


def test_install_wraps_where_pydicom_calls_it() -> None:
    from pydicom.pixels import utils
    from pydicom.pixels.decoders import base

    install()
    install()  # idempotent: one wrapper, around pydicom's own function
    assert base.get_j2k_parameters is utils.get_j2k_parameters
    assert not hasattr(base.get_j2k_parameters.__wrapped__, "__wrapped__")


def _pixel_value_start(data: bytes) -> int:
    """Where the value of an encapsulated (undefined length) Pixel Data element starts."""
    found = [m.end() for m in re.finditer(rb"\xe0\x7f\x10\x00O[BW]\x00\x00\xff\xff\xff\xff", data)]
    return found[-1] if found else -1


def _whole_fragments(data: bytes) -> bytes:
    """``data`` with the length of a fragment the file cuts short set to what it holds."""
    from medres.ingest.dicom.decode import cut_fragment

    start = _pixel_value_start(data)
    cut = cut_fragment(data[start:])
    if cut is None:
        return data
    at = len(data) - cut[2] - 4  # the cut item's length field
    return data[:at] + cut[2].to_bytes(4, "little") + data[at + 4 :]


def test_the_mutated_j2k_that_hung_is_decode_failed_at_once(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    name, index, base_seed = HUNG_CASE
    seed = get_testdata_file(name)
    if seed is None:
        pytest.skip(f"pydicom's test file {name} is not installed")
    data, _ = mutate(Path(seed).read_bytes(), case_rng(name, index, base_seed))
    data = _whole_fragments(data)  # the mutation also cut a fragment: only the box loop stays
    case = tmp_path / "case.dcm"
    case.write_bytes(data)
    ok, err, took = _decode_in_pool(case, tmp_path)
    assert not ok and err.code == "decode_failed", err
    assert took < 4.0


def _decode_in_pool(case: Path, tmp_path: Path, limit_s: float = 4.0):
    header = scan_task((case, case.name)).header
    (stack,), _ = dicom.group_stacks([header], dicom.GeometryPolicy(min_slices=1))
    job = DecodeJob(
        "dicom", stack, "img-x", tmp_path / "img-x.nii.gz", "images/img-x.nii.gz",
        b"k" * 32, 1, (case.name,),
    )  # fmt: skip
    t0 = time.monotonic()
    with IsolatedPool(1, timeout_s=limit_s, memory_mb=1024) as pool:
        ((ok, err),) = pool.map(decode_task, [job])
    return ok, err, time.monotonic() - t0


def test_jpegls_decoders_leave_out_the_plugin_that_hangs() -> None:
    from pydicom.pixels.decoders import JPEGLSLosslessDecoder, JPEGLSNearLosslessDecoder

    pytest.importorskip("jpeg_ls", reason="pyjpegls (a medres dependency) is not installed")
    install()
    drop_hanging_jpegls_plugin()  # again: nothing left to change, nothing breaks
    for decoder in (JPEGLSLosslessDecoder, JPEGLSNearLosslessDecoder):
        assert "pyjpegls" in decoder.available_plugins
        assert "pylibjpeg" not in decoder.available_plugins
        assert decoder.is_available


def test_the_mutated_jpegls_that_hung_is_decode_failed_at_once(
    synth_factory, tmp_path: Path
) -> None:
    pytest.importorskip("jpeg_ls", reason="pyjpegls (a medres dependency) is not installed")
    res = synth_factory(**HUNG_JPEGLS_SPEC)
    seed = sorted(res.data_dir.rglob("*.dcm"))[0]
    index, base_seed = HUNG_JPEGLS_CASE
    data, names = mutate(seed.read_bytes(), case_rng(seed.name, index, base_seed))
    assert names == ("byteset",)  # the case is the one the fuzz found
    case = tmp_path / "case.dcm"
    case.write_bytes(data)
    ok, err, took = _decode_in_pool(case, tmp_path)
    assert not ok and err.code == "decode_failed", err
    assert "damaged" in err.message and "no installed decoder" not in err.message
    assert took < 4.0
    # the unmutated seed still decodes (CharLS does JPEG-LS now)
    ok, err, _ = _decode_in_pool(seed, tmp_path)
    assert ok, err


def _items(*bodies: bytes, end: bool = True) -> bytes:
    out = b"".join(b"\xfe\xff\x00\xe0" + len(b).to_bytes(4, "little") + b for b in bodies)
    return out + (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00" if end else b"")


def test_cut_fragment_finds_only_real_cuts() -> None:
    from medres.ingest.dicom.decode import cut_fragment

    whole = _items(b"", b"\xff\xd8" + b"x" * 40)
    assert cut_fragment(whole) is None
    assert cut_fragment(_items(b"", b"abcd", end=False)) is None  # no delimiter: still whole
    assert cut_fragment(whole + b"\x00" * 8) is None  # trailing padding after the delimiter
    assert cut_fragment(b"\x10\x00\x10\x00junk") is None  # unknown: the decoders judge
    assert cut_fragment(whole[:30]) == (1, 42, 14)
    assert cut_fragment(whole[:5]) == (0, 8, 5)  # the offset table's item header itself
    assert cut_fragment(_items(b"\x00" * 8)[:12]) == (0, 8, 4)


@pytest.mark.parametrize("name", ["JPEGLSNearLossless_16.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_cut_compressed_pixel_data_is_truncated_at_once(name: str, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    seed = get_testdata_file(name)
    if seed is None:
        pytest.skip(f"pydicom's test file {name} is not installed")
    data = Path(seed).read_bytes()
    start = _pixel_value_start(data)
    assert start > 12
    case = tmp_path / "cut.dcm"
    case.write_bytes(data[: start + (len(data) - start) // 2])  # a fragment loses its end
    ok, err, took = _decode_in_pool(case, tmp_path)
    assert not ok and err.code == "truncated", err
    assert "pixel data ends early" in err.message and "re-copy" in err.message
    assert took < 2.0


def _write_broken_nifti(src: Path) -> dict[str, str]:
    """Broken NIfTI-named files -> a word their message must hold."""
    src.mkdir(parents=True)
    (src / "empty.nii").write_bytes(b"")
    (src / "empty.nii.gz").write_bytes(b"")
    (src / "short.nii").write_bytes(b"\x00" * 100)
    (src / "tiny.nii.gz").write_bytes(gzip.compress(b"\x5c\x01\x00\x00"))
    (src / "cut.hdr").write_bytes(b"\x00" * 10)
    (src / "lost.img").write_bytes(b"\x00" * 64)  # a pair's data without its .hdr
    (src / "junk.txt").write_bytes(b"junk")  # still not_dicom
    write_nifti_folder(src / "ok", 1, (16, 16))  # one good image: ingest exits 0
    return {
        "empty.nii": "empty file (0 bytes), a NIfTI header needs 348",
        "empty.nii.gz": "empty file (0 bytes)",
        "short.nii": "100 bytes, a NIfTI header needs 348",
        "tiny.nii.gz": "4 bytes after decompression",
        "cut.hdr": "10 bytes",
        "lost.img": "without its .hdr",
    }


def _errors(path: Path) -> dict[str, tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["source"]: (r["code"], r["message"]) for r in csv.DictReader(fh)}


def test_empty_and_short_nifti_files_are_invalid_nifti(tmp_path: Path) -> None:
    want = _write_broken_nifti(tmp_path / "src")
    model = write_model_dir(tmp_path / "model", image_size=(16, 16))
    ingest = runner.invoke(app, ["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "ds")])
    assert ingest.exit_code == 0, ingest.output
    score = runner.invoke(
        app, ["score", str(model), str(tmp_path / "src"), "--out", str(tmp_path / "sc"), "-j", "0"]
    )
    assert score.exit_code == 0, score.output
    for errors in (
        _errors(tmp_path / "ds" / "errors.csv"),
        _errors(tmp_path / "sc" / "errors.csv"),
    ):
        assert errors.pop("junk.txt")[0] == "not_dicom"
        assert set(errors) == set(want), errors
        for name, (code, message) in errors.items():
            assert code == "invalid_nifti", (name, code, message)
            assert message.startswith(f"{name}: ") and want[name] in message, message
            assert "\n" not in message


def _pair(folder: Path, value: float) -> None:
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    data = np.full((8, 8, 4), value, dtype=np.float32)
    nib.save(nib.Nifti1Pair(data, np.eye(4)), folder / "vol.img")


def test_a_pairs_img_is_used_with_its_hdr_and_tracked_by_the_cache(tmp_path: Path) -> None:
    """A ``.hdr``/``.img`` pair is one image from both files: the ``.img`` was a
    ``not_dicom`` row ("remove it", which would break the image) and a changed ``.img``
    behind an unchanged ``.hdr`` was not noticed by the incremental cache."""
    import os

    import nibabel as nib

    src, out = tmp_path / "src", tmp_path / "ds"
    _pair(src, 1.0)
    res = runner.invoke(app, ["ingest", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert _errors(out / "errors.csv") == {}
    info = __import__("json").loads((out / "ingest.json").read_text())
    assert info["files"]["seen"] == info["files"]["used"] == 2, info["files"]
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["source"] == "vol.hdr"
    # new voxel values in the .img, same size, the .hdr untouched: re-read, not reused
    img = src / "vol.img"
    before = img.stat()
    _pair(tmp_path / "new", 7.0)
    img.write_bytes((tmp_path / "new" / "vol.img").read_bytes())
    os.utime(img, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    res = runner.invoke(app, ["ingest", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert float(nib.load(out / row["image_path"]).get_fdata().max()) == 7.0


def test_a_pairs_img_whose_hdr_is_broken_names_the_hdr(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _pair(src, 1.0)
    (src / "vol.hdr").write_bytes(b"\x00" * 10)  # the header is cut short
    write_nifti_folder(src / "ok", 1, (16, 16))  # one good image: ingest exits 0
    res = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "ds")])
    assert res.exit_code == 0, res.output
    errors = _errors(tmp_path / "ds" / "errors.csv")
    assert errors["vol.hdr"][0] == "invalid_nifti"
    code, message = errors["vol.img"]
    assert code == "invalid_nifti" and "data file of vol.hdr" in message, message
