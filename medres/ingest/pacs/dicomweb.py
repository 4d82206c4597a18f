"""DICOMweb client: QIDO-RS search, WADO-RS series retrieval, STOW-RS store.

Built on ``dicomweb-client`` (optional extra ``medres[pacs]``) over a ``requests``
session that carries the credentials of :mod:`medres.ingest.pacs.auth` (basic or bearer).
Instances are retrieved in the transfer syntax the archive holds (``transfer-syntax=*``:
no transcoding on the server, so the pixels are the stored ones) and streamed part by
part to disk. Connection errors, timeouts and HTTP 429/5xx become
:class:`~medres.ingest.pacs.query.TransientError` (retried by the caller); other
HTTP errors are :class:`PacsError` at once (401/403 name the credential variables).

Imports: :mod:`medres.ingest.pacs.query`, ``.auth``; dicomweb-client,
requests and pydicom lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from medres.ingest.pacs.auth import credentials_for
from medres.ingest.pacs.query import (
    PacsError,
    PacsQuery,
    PacsSource,
    SeriesRef,
    TransientError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
# DICOM JSON tags read from QIDO results
STUDY_UID, SERIES_UID, MODALITY, N_INSTANCES = "0020000D", "0020000E", "00080060", "00201209"
ANY_SYNTAX = (("application/dicom", "*"),)
PAGE = 500  # QIDO results per request


def require_dicomweb() -> Any:
    """The ``dicomweb_client`` module, or a :class:`PacsError` naming the extra."""
    try:
        import dicomweb_client
    except ImportError:
        raise PacsError(
            "a dicomweb+http(s):// SOURCE needs dicomweb-client: pip install 'medres[pacs]'"
        ) from None
    return dicomweb_client


def _value(obj: dict, tag: str, default: Any = "") -> Any:
    vals = (obj.get(tag) or {}).get("Value") or []
    return vals[0] if vals else default


class DicomwebClient:
    """One DICOMweb server (see the module doc); ``timeout_s`` per HTTP request."""

    def __init__(self, source: PacsSource, *, timeout_s: float = 60.0) -> None:
        require_dicomweb()
        import requests

        # its INFO/DEBUG lines carry study/series UIDs (identifiers): keep them out of logs
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
        from dicomweb_client.api import DICOMwebClient

        self.source = source
        creds = credentials_for(source.host)
        session = requests.Session()
        if creds.token:
            session.headers["Authorization"] = f"Bearer {creds.token}"
        elif creds.user:
            session.auth = (creds.user, creds.password)
        log.info("%s: DICOMweb, authentication %s", source.display, creds.kind)
        self._session = session
        self._api = DICOMwebClient(source.url, session=session, timeout=timeout_s)
        if hasattr(self._api, "set_http_retry_params"):  # one retry policy: ours
            self._api.set_http_retry_params(retry=False)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run a request, translating failures (transient ones are retried by the caller)."""
        import requests

        try:
            return fn()
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientError(f"{type(exc).__name__}: {str(exc)[:200]}") from None
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 429 or status >= 500:
                raise TransientError(f"HTTP {status}") from None
            if status in (401, 403):
                raise PacsError(
                    f"{self.source.display}: HTTP {status} (not authorised); set "
                    "MEDRES_PACS_USER/MEDRES_PACS_PASSWORD or MEDRES_PACS_TOKEN, or add the "
                    "host to your netrc file"
                ) from None
            raise PacsError(
                f"{self.source.display}: HTTP {status}; check the DICOMweb root path "
                "(e.g. /dicom-web) and the --query keys"
            ) from None

    def find_series(self, query: PacsQuery) -> Iterator[SeriesRef]:
        """QIDO-RS: the matching studies (``query.limit`` of them at most), then their series."""
        seen: set[str] = set()
        for filters in query.study_searches():
            for st in self._paged(self._api.search_for_studies, STUDY_UID, search_filters=filters):
                uid = _value(st, STUDY_UID)
                if not uid or uid in seen:
                    continue
                if query.limit and len(seen) >= query.limit:
                    return
                seen.add(uid)
                yield from self._series_of(uid, dict(query.series_filters))

    def _paged(self, search: Callable[..., list[dict]], uid_tag: str, **kwargs: Any) -> list[dict]:
        """All results of a QIDO search, :data:`PAGE` at a time (``limit``/``offset``); stops
        at a short page or at a page that repeats (servers that ignore ``offset``)."""
        rows: list[dict] = []
        seen: set[str] = set()
        while True:
            page = self._call(lambda: search(limit=PAGE, offset=len(rows), **kwargs))
            new = [r for r in page if _value(r, uid_tag) not in seen]
            seen.update(_value(r, uid_tag) for r in new)
            rows.extend(new)
            if len(page) < PAGE or not new:
                return rows

    def _series_of(self, study_uid: str, filters: dict[str, str]) -> Iterator[SeriesRef]:
        rows = self._paged(
            self._api.search_for_series,
            SERIES_UID,
            study_instance_uid=study_uid,
            search_filters=filters,
            fields=[N_INSTANCES, MODALITY],
        )
        refs = [
            SeriesRef(
                study_uid,
                _value(r, SERIES_UID),
                str(_value(r, MODALITY)),
                int(_value(r, N_INSTANCES, -1)),
            )
            for r in rows
            if _value(r, SERIES_UID)
        ]
        yield from sorted(refs, key=lambda r: r.series_uid)

    def retrieve_series(self, ref: SeriesRef, dest: Path) -> list[Path]:
        """WADO-RS: the series' instances, written to ``dest/iNNNNN.dcm`` as they arrive."""
        dest.mkdir(parents=True, exist_ok=True)

        def fetch() -> list[Path]:
            for old in dest.glob("i*.dcm"):  # a retried attempt starts over
                old.unlink()
            paths = []
            parts = self._api.iter_series(ref.study_uid, ref.series_uid, media_types=ANY_SYNTAX)
            for i, ds in enumerate(parts, start=1):
                p = dest / f"i{i:05d}.dcm"
                ds.save_as(p, enforce_file_format=True)
                paths.append(p)
            return paths

        return self._call(fetch)

    def store(self, paths: list[Path]) -> int:
        """STOW-RS: store the DICOM files; returns how many were sent."""
        import pydicom

        datasets = [pydicom.dcmread(p) for p in paths]
        self._call(lambda: self._api.store_instances(datasets))
        return len(datasets)

    def close(self) -> None:
        self._session.close()
