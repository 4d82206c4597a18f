"""Batch scoring with a resumable, exactly-once SQLite ledger (``medres score``).

Public API: :func:`score` with :class:`ScoreConfig`, :func:`merge` (ledgers),
:class:`Ledger`, :func:`parse_shard`, :func:`shard_of`.

Modules, lowest first: ``items`` (ScoreItem, Decoded), ``ledger`` (SQLite ledger, CSV
export, merge), ``sources`` (SOURCE arguments -> items, through ingest's public API),
``decode`` (inline vs isolated decoding, the model's saved preprocessing, the ordered feed
from :class:`medres.workers.IsolatedPool`), ``predict`` (batched forward), ``engine``
(the loop: batches, commits), ``cam`` (Grad-CAM and the top-K collector), ``dicom_out``
(DICOM SRs), ``pipeline`` (``score``/``merge``: options, model, ledger, outputs). This
package may import every stage below it (ingest's public modules only, never
``medres.ingest.pipeline``); nothing below imports it.
"""

from __future__ import annotations

from medres.score.ledger import (
    Ledger,
    MergeReport,
    Record,
    export_csvs,
    merge_ledgers,
    parse_shard,
    shard_of,
)
from medres.score.pipeline import ScoreConfig, ScoreSummary, merge, model_hash, score

__all__ = [
    "Ledger",
    "MergeReport",
    "Record",
    "ScoreConfig",
    "ScoreSummary",
    "export_csvs",
    "merge",
    "merge_ledgers",
    "model_hash",
    "parse_shard",
    "score",
    "shard_of",
]
