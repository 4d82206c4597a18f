"""Batch scoring with a resumable, exactly-once SQLite ledger (``medres score``).

Public API: :func:`score` with :class:`ScoreConfig`, :func:`merge` (ledgers),
:class:`Ledger`, :func:`parse_shard`, :func:`shard_of`.
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
