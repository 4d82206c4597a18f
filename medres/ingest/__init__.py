"""Ingest: scans (DICOM files/series/archives, NIfTI) -> a dataset folder.

``medres ingest`` discovers inputs (:mod:`.discover`), scans headers and decodes images in
supervised workers (:mod:`.tasks`, over :mod:`medres.workers`), groups DICOM into
validated stacks (:mod:`.dicom`), reads NIfTI (:mod:`.nifti`), joins labels and makes
splits (:mod:`.labels`) and writes images/, manifest.csv, errors.csv and ingest.json
(:mod:`.pipeline`: orchestration; :mod:`.config`, :mod:`.accounting`, :mod:`.cache`,
:mod:`.plan`, :mod:`.records`, :mod:`.outputs`). Other stages use the public modules
(``tasks``, ``records``, ``dicom``, ``nifti``, ``discover``, ``identity``, ``codes``,
``labels``), never the orchestration. Imports: core and ``medres.dataset`` only; nothing
heavy is imported here.
"""
