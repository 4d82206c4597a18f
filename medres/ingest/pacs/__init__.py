"""PACS sources: query and retrieve studies over DICOMweb or DIMSE, store results back.

A stage-neutral part of ingest (``medres ingest`` and ``medres score`` both use it).
Modules: :mod:`~medres.ingest.pacs.query` (URLs, queries, :class:`SeriesRef`, the error
type), :mod:`~medres.ingest.pacs.auth` (credentials from the environment / netrc),
:mod:`~medres.ingest.pacs.retrieve` (retries, streaming retrieval, push),
:mod:`~medres.ingest.pacs.dicomweb` (QIDO-RS/WADO-RS/STOW-RS) and
:mod:`~medres.ingest.pacs.dimse` (C-FIND/C-GET/C-STORE). The client libraries
(``dicomweb-client``, ``pynetdicom``: extra ``medres[pacs]``) are imported only when a
PACS SOURCE is used. Retrieved files are ordinary DICOM files in a scratch folder: the
callers decode them through the same supervised path as files from disk.
"""

from medres.ingest.pacs.query import (
    PacsError,
    PacsQuery,
    PacsSource,
    SeriesRef,
    build_query,
    is_pacs_url,
    parse_source,
)
from medres.ingest.pacs.retrieve import (
    RetrievedSeries,
    find_series,
    local_sources,
    open_client,
    push,
    retrieve_to_folder,
    stream_series,
    with_retries,
)

__all__ = [
    "PacsError",
    "PacsQuery",
    "PacsSource",
    "RetrievedSeries",
    "SeriesRef",
    "build_query",
    "find_series",
    "is_pacs_url",
    "local_sources",
    "open_client",
    "parse_source",
    "push",
    "retrieve_to_folder",
    "stream_series",
    "with_retries",
]
