"""PACS source URLs, queries and the series they match (typed records, no network).

Choices:

- A PACS SOURCE is a URL: ``dicomweb+http(s)://host[:port]/path`` (QIDO-RS / WADO-RS /
  STOW-RS under that root) or ``dimse://AET@host:port`` (C-FIND / C-GET / C-STORE to the
  called AE title ``AET``). Credentials never go in the URL (they would end up in shell
  history and logs): see :mod:`medres.ingest.pacs.auth`.
- A query is a few DICOM attribute filters (``--query KEY=VALUE``, keywords as in the
  standard, e.g. ``Modality=CR``), a study date range (``--study-date 20240101-20241231``),
  an accession list from a file (one per line) and a limit on the number of studies.
  Series-level keys (:data:`SERIES_KEYS`) filter series; all others filter studies;
  ``Modality`` filters both (as ``ModalitiesInStudy`` on studies).
- Accession numbers and patient attributes are identifiers: they are sent to the PACS
  and never logged or written.

Imports: :mod:`medres.errors` only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from medres.errors import MedresError

SCHEMES = ("dicomweb+http", "dicomweb+https", "dimse")
SERIES_KEYS = frozenset(
    {
        "Modality",
        "SeriesInstanceUID",
        "SeriesNumber",
        "SeriesDescription",
        "BodyPartExamined",
        "ProtocolName",
    }
)
_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_DATE = re.compile(r"^(\d{8})?-?(\d{8})?$")


class PacsError(MedresError):
    """The PACS cannot be reached, refused a request or answered something unusable."""

    code = "pacs"


class TransientError(Exception):
    """A failure worth retrying (network, server overload); raised by the protocol clients
    and turned into :class:`PacsError` by ``retrieve.with_retries`` once retries run out."""


def is_pacs_url(text: str) -> bool:
    """True when a SOURCE argument is a PACS URL (``dicomweb+http(s)://`` or ``dimse://``)."""
    return any(str(text).lower().startswith(s + "://") for s in SCHEMES)


@dataclass(frozen=True)
class PacsSource:
    """Where the PACS is: ``protocol`` is ``dicomweb`` or ``dimse``.

    ``url`` is the DICOMweb root (plain ``http(s)://``); ``called_aet`` the DIMSE AE title.
    ``display`` is what logs and messages show (host, port and path: no credentials).
    """

    protocol: str
    host: str
    port: int
    url: str = ""
    called_aet: str = ""

    @property
    def display(self) -> str:
        if self.protocol == "dimse":
            return f"dimse://{self.called_aet}@{self.host}:{self.port}"
        return "dicomweb+" + self.url


def parse_source(text: str) -> PacsSource:
    """Parse a PACS URL; a malformed one raises :class:`PacsError` naming the fix."""
    parts = urlsplit(str(text))
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise PacsError(
            f"{text!r}: not a PACS URL; use dicomweb+http://host:port/path or dimse://AET@host:port"
        )
    if parts.password is not None or (scheme != "dimse" and parts.username is not None):
        raise PacsError(
            "PACS URL: credentials in the URL are refused (they leak into shell history and "
            "logs); set MEDRES_PACS_USER/MEDRES_PACS_PASSWORD or use a netrc file"
        )
    if not parts.hostname:
        raise PacsError(f"PACS URL {scheme}://...: no host; e.g. {scheme}://127.0.0.1:8042/...")
    try:
        port = parts.port
    except ValueError:
        raise PacsError(f"PACS URL {scheme}://{parts.hostname}: bad port") from None
    if scheme == "dimse":
        if not parts.username or port is None:
            raise PacsError(
                f"PACS URL dimse://{parts.hostname}: give the called AE title and port, "
                "e.g. dimse://ORTHANC@127.0.0.1:4242"
            )
        return PacsSource("dimse", parts.hostname, port, called_aet=parts.username)
    http = scheme.split("+", 1)[1]
    port = port or (443 if http == "https" else 80)
    url = f"{http}://{parts.hostname}:{port}{parts.path.rstrip('/')}"
    return PacsSource("dicomweb", parts.hostname, port, url=url)


@dataclass(frozen=True)
class PacsQuery:
    """Which studies and series to fetch. ``limit`` counts studies (0: no limit)."""

    study_filters: tuple[tuple[str, str], ...] = ()
    series_filters: tuple[tuple[str, str], ...] = ()
    study_date: str = ""
    accessions: tuple[str, ...] = field(default=(), repr=False)  # identifiers: not shown
    limit: int = 0

    def study_searches(self) -> list[dict[str, str]]:
        """One QIDO/C-FIND study filter set per accession (one set without accessions)."""
        base = dict(self.study_filters)
        if self.study_date:
            base["StudyDate"] = self.study_date
        modality = dict(self.series_filters).get("Modality")
        if modality:
            base["ModalitiesInStudy"] = modality
        if not self.accessions:
            return [base]
        return [{**base, "AccessionNumber": a} for a in self.accessions]


def build_query(
    filters: list[str] | tuple[str, ...] = (),
    *,
    study_date: str = "",
    accessions_file: Path | None = None,
    limit: int = 0,
) -> PacsQuery:
    """A :class:`PacsQuery` from CLI values (``KEY=VALUE`` strings); errors name the option."""
    study: list[tuple[str, str]] = []
    series: list[tuple[str, str]] = []
    for f in filters:
        k, sep, v = str(f).partition("=")
        k, v = k.strip(), v.strip()
        if not sep or not _KEYWORD.match(k) or not v:
            raise PacsError(
                f"--query {f!r}: expected KEYWORD=VALUE with a DICOM keyword, e.g. Modality=CR"
            )
        (series if k in SERIES_KEYS else study).append((k, v))
    if study_date and not (_DATE.match(study_date) and any(c.isdigit() for c in study_date)):
        raise PacsError(
            f"--study-date {study_date!r}: expected YYYYMMDD or a range YYYYMMDD-YYYYMMDD"
        )
    if limit < 0:
        raise PacsError(f"--limit {limit}: must be >= 0 (0: no limit)")
    return PacsQuery(
        tuple(study), tuple(series), study_date, _read_accessions(accessions_file), limit
    )


def _read_accessions(path: Path | None) -> tuple[str, ...]:
    if path is None:
        return ()
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise PacsError(
            f"--accessions {Path(path).name}: cannot read ({exc.strerror}); give a text file "
            "with one accession number per line"
        ) from None
    values = tuple(dict.fromkeys(s.strip() for s in lines if s.strip() and s[0] != "#"))
    if not values:
        raise PacsError(f"--accessions {Path(path).name}: no accession numbers in the file")
    return values


@dataclass(frozen=True)
class SeriesRef:
    """One series the query matched (raw UIDs: never written without ``--keep-ids``)."""

    study_uid: str
    series_uid: str
    modality: str = ""
    instances: int = -1  # NumberOfSeriesRelatedInstances; -1 when the PACS did not say
