"""pydicom's bundled test files: each yields pydicom's own decode (after the modality LUT,
MONOCHROME1 inversion, palette lookup) in medres' canonical layout, or a coded rejection.

The files cover big/little endian, implicit/explicit VR, deflate, RLE, JPEG baseline,
extended, lossless, JPEG-LS, JPEG 2000, YBR and palette colour, multi-frame, truncated and
non-image objects. No network: ``get_testdata_files`` lists the files installed with pydicom.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.pixels import apply_color_lut, apply_modality_lut

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.dicom import group_stacks, load_stack, scan_header

_FILES = sorted(p for p in (Path(f) for f in get_testdata_files()) if p.is_file())
_ROOT = Path(pydicom.data.__file__).parent
# codes that say "this is not a decodable image" - acceptable whenever pydicom cannot decode either
_REJECT_ANY = {Code.NOT_DICOM, Code.NOT_IMAGE, Code.NO_PIXEL_DATA, Code.TRUNCATED}


def _reference(path: Path) -> np.ndarray | None:
    """pydicom's decode -> (frames, rows, cols[, 3]) after the documented value steps."""
    try:
        ds = pydicom.dcmread(path, force=True)
        arr = np.asarray(ds.pixel_array)
    except BaseException:
        return None
    nf = int(ds.get("NumberOfFrames", 1) or 1)
    pi = str(ds.get("PhotometricInterpretation", "")).upper()
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if pi.startswith("PALETTE"):
        arr = apply_color_lut(arr, ds)
    elif spp == 1:
        per = ds.get("PerFrameFunctionalGroupsSequence")
        pvt = [item.get("PixelValueTransformationSequence") for item in per] if per else []
        if pvt and all(pvt) and nf > 1:
            frames = arr.reshape(nf, -1)
            arr = np.stack(
                [
                    f * float(p[0].RescaleSlope) + float(p[0].RescaleIntercept)
                    for f, p in zip(frames, pvt, strict=True)
                ]
            )
        else:
            arr = apply_modality_lut(arr, ds)
        if pi == "MONOCHROME1":
            bits = int(ds.BitsStored)
            signed = int(ds.PixelRepresentation) == 1
            lo_hi = np.array(
                [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1]
            )
            lo, hi = apply_modality_lut(lo_hi, ds).astype(float)
            arr = (lo + hi) - arr.astype(float)
    rows, cols = int(ds.Rows), int(ds.Columns)
    color = arr.size == nf * rows * cols * 3 and (spp == 3 or pi.startswith("PALETTE"))
    return arr.reshape((nf, rows, cols, 3) if color else (nf, rows, cols))


def _medres(path: Path):
    h = scan_header(path, path.name)
    stacks, rejections = group_stacks([h])
    if rejections:
        raise IngestError(rejections[0].message, code=rejections[0].code)
    assert len(stacks) == 1
    return stacks[0], load_stack(stacks[0])


@pytest.mark.parametrize("path", _FILES, ids=[str(p.relative_to(_ROOT)) for p in _FILES])
def test_pydicom_testfile(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
        ref = _reference(path)
        try:
            stack, img = _medres(path)
        except IngestError as exc:
            code = Code(exc.code)  # a stable code, never a bare exception
            assert str(exc) and "\n" not in str(exc)
            if ref is not None:  # pydicom decodes it: only "not an image" style rejections are fine
                assert code in _REJECT_ANY | {Code.NOT_IMAGE}, (code, str(exc))
            return
    assert ref is not None, "medres decoded a file that pydicom cannot decode"
    nf = ref.shape[0]
    color = ref.ndim == 4
    assert img.channels == (3 if color else 1)
    assert img.array.dtype in (np.int16, np.float32)
    if stack.kind == "image":
        if nf == 1:
            expected = ref[0].transpose((1, 0, 2) if color else (1, 0))
        else:
            expected = ref.transpose((2, 1, 0, 3) if color else (2, 1, 0))
        assert img.array.shape == expected.shape
        np.testing.assert_allclose(
            img.array.astype(np.float64), expected.astype(np.float64), rtol=1e-6, atol=1e-6
        )
        return
    # a volume from one enhanced multi-frame file: check voxels through the affine
    h = stack.first
    r = np.array(h.image_orientation[:3])
    c = np.array(h.image_orientation[3:])
    dr, dc = h.pixel_spacing
    inv = np.linalg.inv(img.affine)
    rng = np.random.default_rng(0)
    for s in stack.slices:
        for _ in range(5):
            j, i = int(rng.integers(h.rows)), int(rng.integers(h.cols))
            lps = np.array(s.position) + i * dc * r + j * dr * c
            idx = inv @ np.array([-lps[0], -lps[1], lps[2], 1.0])
            x, y, z = (round(v) for v in idx[:3])
            assert img.array[x, y, z] == pytest.approx(float(ref[s.frame, j, i]), rel=1e-6)
