"""Per-file accounting: every discovered file ends ``used``, ``rejected`` or ``skipped``.

:class:`Ledger` holds one status per source; ``errors.csv`` is its rows for files not used
and ``ingest.json`` its counts. :func:`grouping_rejections` attributes the rejections of
DICOM grouping (which name a series' first file and a file count) to single files.
Imports: core and ``ingest.codes``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from medres.ingest.codes import Code
from medres.phi import PathRedactor

log = logging.getLogger(__name__)

# benign: a file that is not an image, a second copy, a split-off stack
SKIP_CODES = frozenset({Code.NOT_IMAGE.value, Code.DUPLICATE_INPUT.value, Code.EXTRA_STACK.value})


@dataclass
class Ledger:
    """Per-file status: every discovered source ends used, rejected or skipped."""

    # source -> (state, code, message)
    status: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    seen: int = 0

    def reject(self, source: str, code: str, message: str) -> None:
        """Record a rejection (a skip for :data:`SKIP_CODES`); the first verdict stands."""
        code = str(code)
        state = "skipped" if code in SKIP_CODES else "rejected"
        self.status.setdefault(source, (state, code, message))

    def use(self, source: str) -> None:
        """``source`` is behind an image in the manifest (overrides any rejection)."""
        self.status[source] = ("used", "", "")

    def account_rest(self, sources: Iterable[str]) -> None:
        """Reject any of ``sources`` no stage accounted for, so that the invariant
        seen == used + rejected + skipped holds whatever happened."""
        for src in sources:
            if src not in self.status:
                log.warning("an input was not accounted for by any stage; reported as rejected")
                self.reject(src, Code.DECODE_FAILED.value, f"{src}: not processed")

    def counts(self) -> dict[str, int]:
        c = Counter(s for s, _, _ in self.status.values())
        return {
            "seen": self.seen,
            "used": c["used"],
            "rejected": c["rejected"],
            "skipped": c["skipped"],
        }

    def error_rows(self, redactor: PathRedactor | None = None) -> list[dict[str, str]]:
        """One row per file not used; sources and messages redacted by ``redactor``."""
        rows = [
            {"source": src, "code": code, "message": msg}
            for src, (state, code, msg) in sorted(self.status.items())
            if state != "used"
        ]
        if redactor is not None:
            for r in rows:
                r["message"] = redactor.redact_text(r["message"], (r["source"],))
                r["source"] = redactor.redact(r["source"])
        return rows


def grouping_rejections(
    headers: Sequence[Any], stacks: Sequence[Any], rejections: Sequence[Any]
) -> list[tuple[str, str, str]]:
    """One (source, code, message) per file that grouping did not put in a kept stack.

    A grouping rejection names its first file and ``n_files``; the other files of its
    series that no kept stack uses are attributed to the series' rejections in order
    (``sources`` on a rejection, when present, is used as is).
    """
    kept = {src for st in stacks for src in st.sources}
    left: dict[tuple[str, str], list[str]] = {}
    for h in sorted(headers, key=lambda h: h.source):
        if h.source not in kept:
            left.setdefault((h.study_uid, h.series_uid), []).append(h.source)
    out: list[tuple[str, str, str]] = []
    capacity: list[tuple[Any, int]] = []
    for rej in rejections:
        series = left.get((rej.study_uid, rej.series_uid), [])
        explicit = getattr(rej, "sources", None)
        wanted = list(explicit) if explicit else [rej.source]
        for src in wanted:
            if src in series:
                series.remove(src)
            out.append((src, str(rej.code), rej.message))
        capacity.append((rej, 0 if explicit else max(0, int(rej.n_files) - 1)))
    for rej, cap in capacity:
        series = left.get((rej.study_uid, rej.series_uid), [])
        while cap > 0 and series:
            out.append((series.pop(0), str(rej.code), rej.message))
            cap -= 1
    for series in left.values():
        for src in series:  # not claimed by any rejection: should not happen, but account
            log.debug("file not in any kept stack nor rejection; reported as extra_stack")
            out.append(
                (src, Code.EXTRA_STACK.value, f"{src}: not part of the kept stack of its series")
            )
    return out
