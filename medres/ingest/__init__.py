"""Ingest: discover inputs, group DICOM into series, validate geometry, decode, write NIfTI."""
