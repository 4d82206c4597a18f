"""DICOM files -> validated series geometry -> canonical images.

Three stages, each usable on its own, one module each (plus the records they share):

- :mod:`.header` - the records: :class:`DicomHeader` (picklable, plain values),
  :class:`GeometryPolicy` (tolerances), :class:`Stack`, :class:`Rejection`.
- :mod:`.scan` (with :mod:`.fields` and the lean walk :mod:`.fastscan`) -
  :func:`scan_header` reads one file up to (not into) its pixel data; it also reads the
  header of the PixelData element, so it knows where the pixels start and how long they
  are, and rejects a file whose pixel data is gone or short, with a code.
- :mod:`.series` (with :mod:`.geometry`) - :func:`group_stacks` groups headers by study +
  series, splits a series into stacks (orientation, localizer), keeps the largest (the
  others are ``extra_stack``) and validates its geometry; :mod:`.volumes` (with
  :mod:`.volume_keys`) splits a stack whose positions repeat by ImageType (separate images)
  and into volumes (one 4D stack, ``n_volumes`` > 1).
- :mod:`.stack` (with :mod:`.decode`) - :func:`load_stack` decodes the pixels into one
  preallocated volume and returns a :class:`~medres.ingest.image.LoadedImage` in medres'
  canonical orientation; :func:`convert_series` does all of it for one series and writes
  NIfTI through :mod:`medres.ingest.nifti`.

Choices made (see docs/architecture.md, "Canonical image on disk"):

- Slices are sorted by their position along the slice normal ``cross(row, col)``, never by
  InstanceNumber. Radiography, ultrasound, secondary capture and other projection
  modalities are always images of their own (never stacked), a one-slice stack of a
  volumetric modality is a 2D image, and 2..``min_slices``-1 slices are ``too_few_slices``.
- 3D: voxel (i, j, k) = (column, row, slice). The DICOM affine in LPS is
  ``[row_cos * col_spacing, col_cos * row_spacing, step, first_position]`` where ``step``
  is the mean vector between consecutive slice positions. With gantry tilt ``step`` is not
  parallel to the slice normal: we *keep that sheared affine* (NIfTI sform represents it
  exactly; qform cannot, so it is left unset) and never resample; a ``gantry_tilt`` warning
  is attached. (dcm2niix resamples tilt by default; medres does not, because the sheared
  sform already puts every voxel at its exact world position and resampling would only
  blur it; a consumer that needs an orthogonal grid resamples through the sform.)
- Uneven or missing slices (policy ``uneven_spacing``, ``medres ingest --uneven-spacing``):
  by default the stack is resampled onto a regular grid at the smallest gap by linear
  interpolation after the modality LUT, with the exact affine of that grid and an
  ``uneven_spacing_resampled`` / ``missing_slices_interpolated`` warning naming the
  original gaps (rules in :mod:`.resample`); ``reject`` keeps the strict
  ``missing_slices`` / ``inconsistent_geometry`` rejection. LPS is converted to RAS (negate x and y), then the array is reoriented to the
  closest canonical RAS+ orientation by permuting and flipping axes only
  (``nibabel.orientations``), so every voxel keeps its exact world coordinate.
- 2D (one frame, or frames without a patient geometry such as ultrasound cine): array
  (X=columns, Y=rows[, frames]) and a diagonal affine holding the pixel spacing
  (PixelSpacing, else ImagerPixelSpacing, else 1.0 with a warning). Multi-frame 2D objects
  become a (X, Y, frames) volume with 1.0 spacing along frames and a ``frames_as_slices``
  warning.
- Siemens mosaics (ImageType ``MOSAIC``, rules in :mod:`.mosaic`, CSA header in
  :mod:`.csa`): the N tiles of a ``ceil(sqrt(N))`` grid (N from NumberOfImagesInMosaic
  (0019,100A), else the CSA header) become N slices: direction ``cross(row, col)`` signed
  by the CSA SliceNormalVector, spacing SpacingBetweenSlices else SliceThickness, first
  origin ``ipp + row_cos * dc * (Columns - tile_cols) / 2 + col_cos * dr * (Rows -
  tile_rows) / 2`` (dcm2niix's and nibabel's correction); each tile keeps its file's
  keys, so a series of mosaics (fMRI, DWI) splits into volumes like any other. Each file's
  frame is read once and cut; a mosaic that cannot be cut or placed is ``invalid_mosaic``.
- Values: the modality LUT is applied per slice (RescaleSlope/Intercept, per-frame
  functional groups for enhanced objects, or a Modality LUT Sequence), so CT is in HU.
  MONOCHROME1 is inverted after the LUT as ``lut(min) + lut(max) - value`` over the
  stored-bits range, so higher is brighter and the range is unchanged. Colour (RGB, YBR,
  palette) becomes RGB with a trailing channel axis of 3; no modality LUT applies to it.
  Stored dtype is int16 when every value is integral and fits, else float32.
- Decoding (:mod:`.decode`): uncompressed little-endian pixel data is read straight from
  the file into the preallocated volume at the offset found by the header scan (no second
  parse), then one pass applies the rescale and the canonical flips/permutation together,
  writing an F-contiguous array that the ``.nii`` writer dumps without another copy.
  Compressed pixel data is read from the same offset and handed to pydicom's decoder
  plugins (pylibjpeg, openjpeg, libjpeg, RLE, gdcm) with the image description from the
  header scan; only palette colour, Modality LUT Sequences, deflated or big-endian files,
  and any file the shortcut cannot decode go through a full ``dcmread`` + ``pixel_array``
  (which also classifies the error). With ``workers > 1``, compressed stacks whose
  estimated decode time pays for a process pool are decoded in
  :class:`medres.workers.IsolatedPool` processes; uncompressed reads use threads.
  (``medres ingest`` runs every decode in its own isolated worker pool, so a crashing C
  decoder kills a worker, not the run.) Any decoder failure, including panics that are not
  ``Exception`` subclasses (pydicom's Rust RLE decoder raises ``PanicException``), becomes
  ``IngestError(code=decode_failed)``.

This package imports :mod:`medres.errors`, :mod:`medres.workers`, :mod:`medres.ingest.codes`,
:mod:`medres.ingest.image` and :mod:`medres.ingest.nifti`; its modules import each other
(never this ``__init__``), in the order header -> csa -> mosaic -> fields/fastscan -> scan; header ->
resample -> geometry -> series; header -> decode (+ resample) -> stack.
"""

from __future__ import annotations

from medres.ingest.dicom.header import (
    DEFAULT_POLICY,
    DicomHeader,
    GeometryPolicy,
    Rejection,
    Stack,
)
from medres.ingest.dicom.scan import is_dicom, scan_header, scan_headers
from medres.ingest.dicom.series import group_stacks
from medres.ingest.dicom.stack import convert_series, load_stack

__all__ = [
    "DEFAULT_POLICY",
    "DicomHeader",
    "GeometryPolicy",
    "Rejection",
    "Stack",
    "convert_series",
    "group_stacks",
    "is_dicom",
    "load_stack",
    "scan_header",
    "scan_headers",
]
