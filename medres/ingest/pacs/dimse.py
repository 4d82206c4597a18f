"""DIMSE client: C-FIND (study root), C-GET of a series, C-STORE of results.

Built on ``pynetdicom`` (optional extra ``medres[pacs]``). Choices:

- C-GET rather than C-MOVE: the instances come back on our own association, so no
  storage SCP, no open port and no AE registration of our host on the PACS for the
  return path are needed. The C-GET association proposes the storage SOP classes of
  :data:`STORAGE_CLASSES` with SCP role selection; the PACS transcodes other
  transfer syntaxes to one we propose (lossless: the pixels stay the stored ones).
- One C-FIND and one C-GET association are kept open for the whole run (re-opened after
  a failure), not one per request.
- Our calling AE title is ``MEDRES_PACS_AET`` (default ``MEDRES``); the called one is the
  URL's (``dimse://AET@host:port``).
- A refused/aborted association and network timeouts are
  :class:`~medres.ingest.pacs.query.TransientError` (retried by the caller); a
  C-GET with failed sub-operations is a :class:`PacsError` naming the counts.

Imports: :mod:`medres.ingest.pacs.query`, ``.auth``; pynetdicom and pydicom
lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medres.ingest.pacs.auth import calling_aet
from medres.ingest.pacs.query import (
    PacsError,
    PacsQuery,
    PacsSource,
    SeriesRef,
    TransientError,
)

log = logging.getLogger(__name__)

STORAGE_CLASSES = (
    "ComputedRadiographyImageStorage",
    "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing",
    "DigitalMammographyXRayImageStorageForPresentation",
    "CTImageStorage",
    "EnhancedCTImageStorage",
    "MRImageStorage",
    "EnhancedMRImageStorage",
    "PositronEmissionTomographyImageStorage",
    "NuclearMedicineImageStorage",
    "UltrasoundImageStorage",
    "UltrasoundMultiFrameImageStorage",
    "XRayAngiographicImageStorage",
    "SecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "ComprehensiveSRStorage",
    "EnhancedSRStorage",
)
RESULT_CLASSES = ("ComprehensiveSRStorage", "EnhancedSRStorage", "SecondaryCaptureImageStorage")
_PENDING = (0xFF00, 0xFF01)


def require_pynetdicom() -> Any:
    """The ``pynetdicom`` module, or a :class:`PacsError` naming the extra."""
    try:
        import pynetdicom
    except ImportError:
        raise PacsError("a dimse:// SOURCE needs pynetdicom: pip install 'medres[pacs]'") from None
    return pynetdicom


def _syntaxes() -> list[str]:
    from pydicom import uid

    return [
        uid.ExplicitVRLittleEndian,
        uid.ImplicitVRLittleEndian,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEG2000Lossless,
        uid.RLELossless,
    ]


class DimseClient:
    """One DICOM node (see the module doc); ``timeout_s`` for association and DIMSE."""

    def __init__(self, source: PacsSource, *, timeout_s: float = 60.0) -> None:
        require_pynetdicom()
        # its INFO/DEBUG lines dump C-FIND identifiers (patient, accession): not in our logs
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        self.source = source
        self.aet = calling_aet()
        self.timeout_s = timeout_s
        self._assocs: dict[str, Any] = {}  # "find" / "get": kept open across requests
        self._sink: tuple[Path, list[Path]] | None = None  # where C-GET stores go now

    def _ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        return ae

    def _associate(self, ae: Any, **kwargs: Any) -> Any:
        assoc = ae.associate(
            self.source.host, self.source.port, ae_title=self.source.called_aet, **kwargs
        )
        if not assoc.is_established:
            raise TransientError("association rejected or aborted")
        return assoc

    def _cached(self, kind: str, make: Any) -> Any:
        """The open association of ``kind``, (re)made by ``make()`` when there is none."""
        assoc = self._assocs.get(kind)
        if assoc is None or not assoc.is_established:
            assoc = self._assocs[kind] = make()
        return assoc

    def _drop(self, kind: str) -> None:
        assoc = self._assocs.pop(kind, None)
        if assoc is not None and assoc.is_established:
            assoc.abort()

    def _find(self, identifier: Any) -> list[Any]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        def make() -> Any:
            ae = self._ae()
            ae.add_requested_context(FIND)
            return self._associate(ae)

        assoc = self._cached("find", make)
        try:
            found = []
            for status, ident in assoc.send_c_find(identifier, FIND):
                if not status:
                    raise TransientError("C-FIND: no response (timeout or abort)")
                code = int(status.Status)
                if code in _PENDING and ident is not None:
                    found.append(ident)
                elif code not in _PENDING and code != 0:
                    raise PacsError(
                        f"{self.source.display}: C-FIND failed with status 0x{code:04X}; "
                        "check the --query keys and the PACS's query settings"
                    )
            return found
        except BaseException:
            self._drop("find")
            raise

    def find_series(self, query: PacsQuery) -> Iterator[SeriesRef]:
        """C-FIND at STUDY level (``query.limit`` studies at most), then SERIES level."""
        from pydicom import Dataset

        seen: set[str] = set()
        for filters in query.study_searches():
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = ""
            for k, v in filters.items():
                setattr(ds, k, v)
            for st in sorted(self._find(ds), key=lambda d: str(d.get("StudyInstanceUID", ""))):
                uid = str(st.get("StudyInstanceUID", ""))
                if not uid or uid in seen:
                    continue
                if query.limit and len(seen) >= query.limit:
                    return
                seen.add(uid)
                yield from self._series_of(uid, dict(query.series_filters))

    def _series_of(self, study_uid: str, filters: dict[str, str]) -> Iterator[SeriesRef]:
        from pydicom import Dataset

        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = ""
        ds.Modality = ""
        ds.NumberOfSeriesRelatedInstances = ""
        for k, v in filters.items():
            setattr(ds, k, v)
        refs = []
        for s in self._find(ds):
            n = s.get("NumberOfSeriesRelatedInstances", None)
            refs.append(
                SeriesRef(
                    study_uid,
                    str(s.get("SeriesInstanceUID", "")),
                    str(s.get("Modality", "")),
                    int(n) if n not in (None, "") else -1,
                )
            )
        yield from sorted((r for r in refs if r.series_uid), key=lambda r: r.series_uid)

    def retrieve_series(self, ref: SeriesRef, dest: Path) -> list[Path]:
        """C-GET of one series; instances are written to ``dest/iNNNNN.dcm`` as they arrive."""
        from pydicom import Dataset
        from pynetdicom import build_role, evt, sop_class
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.glob("i*.dcm"):  # a retried attempt starts over
            old.unlink()
        paths: list[Path] = []

        def make() -> Any:
            ae = self._ae()
            ae.add_requested_context(GET)
            roles = []
            for name in STORAGE_CLASSES:
                uid = getattr(sop_class, name)
                ae.add_requested_context(uid, _syntaxes())
                roles.append(build_role(uid, scp_role=True))
            handlers = [(evt.EVT_C_STORE, self._on_store)]
            return self._associate(ae, ext_neg=roles, evt_handlers=handlers)

        assoc = self._cached("get", make)
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = ref.study_uid
        ds.SeriesInstanceUID = ref.series_uid
        self._sink = (dest, paths)
        try:
            final = None
            for status, _ in assoc.send_c_get(ds, GET):
                if not status:
                    raise TransientError("C-GET: no response (timeout or abort)")
                final = status
        except BaseException:
            self._drop("get")
            raise
        finally:
            self._sink = None
        self._check_get(final)
        return paths

    def _on_store(self, event: Any) -> int:
        """A C-STORE sub-operation of our C-GET: write the instance where it belongs."""
        if self._sink is None:
            return 0xA700  # nothing asked for: refuse
        dest, paths = self._sink
        p = dest / f"i{len(paths) + 1:05d}.dcm"
        p.write_bytes(event.encoded_dataset())
        paths.append(p)
        return 0x0000

    def _check_get(self, status: Any) -> None:
        code = int(status.Status) if status is not None else -1
        failed = int(status.get("NumberOfFailedSuboperations", 0) or 0) if status else 0
        if code == 0 and not failed:
            return
        if code in (0xA701, 0xA702):  # out of resources
            raise TransientError(f"C-GET status 0x{code:04X}")
        raise PacsError(
            f"{self.source.display}: C-GET failed (status 0x{code & 0xFFFF:04X}, {failed} "
            "sub-operations failed); check that the PACS allows C-GET from our AE title "
            "(MEDRES_PACS_AET)"
        )

    def store(self, paths: list[Path]) -> int:
        """C-STORE the DICOM files (SRs, secondary captures); returns how many were stored."""
        import pydicom
        from pynetdicom import sop_class

        ae = self._ae()
        for name in RESULT_CLASSES:
            ae.add_requested_context(getattr(sop_class, name), _syntaxes()[:2])
        assoc = self._associate(ae)
        try:
            for p in paths:
                status = assoc.send_c_store(pydicom.dcmread(p))
                if not status:
                    raise TransientError("C-STORE: no response (timeout or abort)")
                if int(status.Status) not in (0x0000, 0xB000, 0xB006, 0xB007):
                    raise PacsError(
                        f"{self.source.display}: C-STORE of {p.name} failed with status "
                        f"0x{int(status.Status):04X}; check the PACS accepts SR storage"
                    )
        finally:
            assoc.release()
        return len(paths)

    def close(self) -> None:
        """Release the kept-open C-FIND / C-GET associations."""
        for assoc in self._assocs.values():
            if assoc.is_established:
                assoc.release()
        self._assocs.clear()
