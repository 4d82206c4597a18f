"""Stored pixel words -> values: unused high bits, sign extension, missing transfer syntax.

PS3.5 8.1.1: the bits of a word above BitsStored are not pixel data. Every test writes a
tiny file with pydicom whose unused bits hold junk, converts it with ``convert_series`` and
compares the written image voxel by voxel with pydicom's ``pixel_array`` (which masks to
BitsStored and sign-extends signed data, whatever HighBit says).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, iter_pixels
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medres.ingest.dicom import convert_series, scan_header

ROWS, COLS = 6, 7


def _dataset(words: np.ndarray, *, bits_stored: int, signed: int, high_bit: int | None = None):
    """A secondary-capture dataset (no patient geometry) holding ``words`` as they are."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = words.shape[-2:]
    if words.ndim == 3:
        ds.NumberOfFrames = words.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = words.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1 if high_bit is None else high_bit
    ds.PixelRepresentation = signed
    ds.PixelData = words.tobytes()
    return ds


def _junk_words(shape: tuple[int, ...], bits: int, signed: bool, seed: int = 0) -> np.ndarray:
    """16-bit words whose low ``bits`` hold random values (negative ones when ``signed``)
    and whose high bits hold random junk (never all clear)."""
    rng = np.random.default_rng(seed)
    lo = -(1 << (bits - 1)) if signed else 0
    hi = (1 << (bits - 1)) if signed else (1 << bits)
    values = rng.integers(lo, hi, size=shape)
    junk = rng.integers(1, 1 << (16 - bits), size=shape)
    words = (values & ((1 << bits) - 1)) | (junk << bits)
    return words.astype(np.uint16).view(np.int16 if signed else np.uint16)


def _convert(ds: Dataset, tmp_path: Path, name: str = "x") -> tuple[np.ndarray, np.ndarray]:
    """(pixel_array of the written file, the image medres wrote) in the same layout."""
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    ref = pydicom.dcmread(path).pixel_array
    out = tmp_path / f"{name}.nii"
    img = convert_series([path], out)
    on_disk = np.asanyarray(nib.load(out).dataobj)
    assert np.array_equal(on_disk, img.array)
    assert on_disk.dtype == img.array.dtype
    ref = ref.transpose(2, 1, 0) if ref.ndim == 3 else ref.T
    return ref, img.array


@pytest.mark.parametrize(("bits", "signed"), [(12, False), (12, True), (10, True)])
def test_junk_high_bits_masked_like_pixel_array(tmp_path: Path, bits: int, signed: bool) -> None:
    words = _junk_words((ROWS, COLS), bits, signed)
    ref, got = _convert(_dataset(words, bits_stored=bits, signed=int(signed)), tmp_path)
    assert not np.array_equal(ref, words.T)  # the file really holds junk bits
    assert np.array_equal(got, ref)
    assert got.dtype == np.int16
    if signed:
        assert got.min() < 0


def test_eight_in_eight_untouched(tmp_path: Path) -> None:
    words = np.arange(ROWS * COLS, dtype=np.uint8).reshape(ROWS, COLS) * 6
    ref, got = _convert(_dataset(words, bits_stored=8, signed=0), tmp_path)
    assert np.array_equal(got, ref) and np.array_equal(got, words.T)
    assert got.max() == words.max()


def test_high_bit_not_bits_stored_minus_one_as_pydicom(tmp_path: Path) -> None:
    words = _junk_words((ROWS, COLS), 12, False, seed=3)
    ds = _dataset(words, bits_stored=12, signed=0, high_bit=15)
    ref, got = _convert(ds, tmp_path)
    assert np.array_equal(got, ref) and got.max() <= 4095


def test_rle_with_junk_bits(tmp_path: Path) -> None:
    words = _junk_words((ROWS, COLS), 12, True, seed=5)
    ds = _dataset(words, bits_stored=12, signed=1)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ref, got = _convert(ds, tmp_path)
    unmasked = next(iter_pixels(tmp_path / "x.dcm", correct_unused_bits=False))
    assert np.array_equal(unmasked, words)  # the RLE stream kept the junk
    assert scan_header(tmp_path / "x.dcm").pixel_length == -1
    assert np.array_equal(got, ref) and got.dtype == np.int16


def test_multi_frame_with_junk_bits(tmp_path: Path) -> None:
    words = _junk_words((3, ROWS, COLS), 12, False, seed=7)
    ref, got = _convert(_dataset(words, bits_stored=12, signed=0), tmp_path)
    assert got.shape == (COLS, ROWS, 3)
    assert np.array_equal(got, ref) and got.dtype == np.int16


# ------------------------------------------------------------------ no TransferSyntaxUID
def _without_transfer_syntax(ds: Dataset, path: Path, implicit: bool) -> Path:
    """Write ``ds`` with a preamble and a file meta that lacks TransferSyntaxUID."""
    del ds.file_meta.TransferSyntaxUID
    ds.preamble = b"\0" * 128
    ds.save_as(path, implicit_vr=implicit, little_endian=True)
    assert "TransferSyntaxUID" not in pydicom.dcmread(path).file_meta
    return path


def _palette(words: np.ndarray) -> Dataset:
    ds = _dataset(words, bits_stored=8, signed=0)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ramp = np.arange(256, dtype=np.uint16)
    for colour, lut in (("Red", ramp * 256), ("Green", (255 - ramp) * 256), ("Blue", ramp * 128)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
    return ds


@pytest.mark.parametrize("implicit", [True, False])
def test_missing_transfer_syntax_inferred_from_read_palette(tmp_path: Path, implicit) -> None:
    words = (np.arange(ROWS * COLS) * 5 % 256).astype(np.uint8).reshape(ROWS, COLS)
    path = _without_transfer_syntax(_palette(words), tmp_path / "pal.dcm", implicit)
    img = convert_series([path], tmp_path / "pal.nii")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ref = apply_color_lut(ds.pixel_array, ds)
    assert img.channels == 3 and np.array_equal(img.array, ref.transpose(1, 0, 2))


def test_missing_transfer_syntax_monochrome_with_junk(tmp_path: Path) -> None:
    words = _junk_words((ROWS, COLS), 12, True, seed=11)
    path = _without_transfer_syntax(
        _dataset(words, bits_stored=12, signed=1), tmp_path / "m.dcm", True
    )
    assert scan_header(path).transfer_syntax == ImplicitVRLittleEndian
    img = convert_series([path], tmp_path / "m.nii")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert np.array_equal(img.array, ds.pixel_array.T) and img.array.dtype == np.int16


def test_volume_slices_with_different_bits_stored(tmp_path: Path) -> None:
    """Each slice is masked to its own BitsStored (native read of a CT series)."""
    study, series = generate_uid(), generate_uid()
    paths, refs = [], []
    for k, bits in enumerate((12, 10, 12, 11)):
        ds = _dataset(
            _junk_words((ROWS, COLS), bits, True, seed=20 + k), bits_stored=bits, signed=1
        )
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        ds.Modality = "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.5 * k]
        ds.PixelSpacing = [0.5, 0.5]
        paths.append(tmp_path / f"s{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
        refs.append(pydicom.dcmread(paths[-1]).pixel_array)
    img = convert_series(paths, tmp_path / "v.nii", workers=2)
    assert img.array.dtype == np.int16 and img.array.shape == (COLS, ROWS, 4)
    for k, ref in enumerate(refs):
        assert np.array_equal(img.array[::-1, ::-1, k], ref.T)
