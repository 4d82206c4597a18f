"""The stable set of rejection codes used in ``errors.csv`` (ingest and score).

These strings are a public contract: scripts filter on them. Add codes, never rename.
This module owns the codes and their one-line descriptions; it imports nothing of medres.
"""

from __future__ import annotations

from enum import Enum


class Code(str, Enum):
    NOT_DICOM = "not_dicom"  # neither DICOM (by content) nor NIfTI
    UNREADABLE = "unreadable"  # I/O error, permission, vanished file
    TRUNCATED = "truncated"  # file ends early / header cannot be parsed completely
    NO_PIXEL_DATA = "no_pixel_data"  # image SOP class without (decodable) PixelData
    NOT_IMAGE = "not_image"  # valid DICOM that is not an image (SR, PR, RT...): skipped
    DECODE_FAILED = "decode_failed"  # pixel decoder raised (incl. non-Exception panics)
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    MISSING_SLICES = "missing_slices"
    DUPLICATE_SLICES = "duplicate_slices"
    MIXED_ORIENTATION = "mixed_orientation"
    INCONSISTENT_GEOMETRY = "inconsistent_geometry"  # rows/cols/pixel spacing/spacing differ
    EXTRA_STACK = "extra_stack"  # localizer or secondary acquisition split off a series
    TOO_FEW_SLICES = "too_few_slices"
    INVALID_NIFTI = "invalid_nifti"
    ARCHIVE_UNSAFE = "archive_unsafe"  # path escape, link out, device file, bomb, limits
    TIMEOUT = "timeout"  # per-file time/memory limit exceeded
    DUPLICATE_INPUT = "duplicate_input"  # same SOPInstanceUID seen twice (identical copies)
    INVALID_MOSAIC = "invalid_mosaic"  # Siemens mosaic whose tiles cannot be cut or placed
    UNSUPPORTED_VALUES = "unsupported_values"  # complex data, floats beyond float32's range
    WRONG_DIMS = "wrong_dims"  # score: a 2D image for a 3D model or the other way round

    def __str__(self) -> str:
        return self.value


CODE_DESCRIPTIONS: dict[str, str] = {
    "not_dicom": "Neither DICOM (checked by content) nor NIfTI; ignored input such as junk files.",
    "unreadable": "The file could not be read (permissions, I/O error, vanished).",
    "truncated": "The file ends early; its header or pixel data is incomplete.",
    "no_pixel_data": "An image SOP class without pixel data, or pixel data too short for its header.",
    "not_image": "A valid DICOM object that holds no image (structured report, presentation state, ...).",
    "decode_failed": "The pixel decoder failed (corrupt compressed stream).",
    "unsupported_transfer_syntax": "No installed decoder handles the transfer syntax.",
    "missing_slices": "Gaps along the slice normal larger than the series spacing.",
    "duplicate_slices": "Two slices at the same position with different pixels.",
    "mixed_orientation": "Slices of one stack disagree on ImageOrientationPatient.",
    "inconsistent_geometry": "Rows/columns/pixel spacing differ or slice spacing is uneven.",
    "extra_stack": "A localizer or secondary acquisition split off the main stack of a series.",
    "too_few_slices": "A 3D series with fewer slices than required.",
    "invalid_nifti": "A NIfTI file with a corrupt header, zero-size or non-finite affine.",
    "archive_unsafe": "An archive member escapes the destination, is a link/device, or exceeds limits.",
    "timeout": "Decoding one input exceeded the per-file time or memory limit.",
    "duplicate_input": "The same SOP instance was seen twice; the later file in path order was skipped (its message says when its pixel data differ from the kept file's).",
    "invalid_mosaic": "A Siemens mosaic whose tile count, grid or geometry is missing or inconsistent.",
    "unsupported_values": "Voxel values medres cannot store as they are: complex numbers, or floats beyond the float32 range.",
    "wrong_dims": "Scoring: the image is 2D and the model 3D, or the other way round (no slice is picked silently).",
}
