"""The identity tokens a dataset's runs learned, kept next to its key: ``.medres_tokens.json``.

The message filter (:func:`medres.phi.filter_message`) knows the tokens of the DICOM
headers read in this process. Commands that read no header (``train``, ``evaluate``,
``export-model``, or an ingest/score that fails before its first header) would print a
folder named after a patient as given. So every run that learns tokens stores them here,
as the keyed hashes of :attr:`~medres.phi.PathRedactor.hashed_tokens` (never in clear), in
the folder that holds the key (``.medres_key``: an ingest's ``--out``, a scoring run's
``--out``), and every command first restores the tokens of the folders it is given
(:func:`learn_tokens`): a dataset, a run whose ``pipeline.yaml`` names a dataset, a scoring
run. A restored redactor joins the live ones, so every later error line, log record and
summary passes it.

File format: ``{"version": 1, "hashed_tokens": [...]}``; tokens only ever accumulate (the
union of what was stored and what this process learned under the same key).

Owns: :data:`TOKENS_FILE`, :func:`save_tokens` and :func:`learn_tokens`. Core module:
imports ``medres.io`` and its ``medres.phi`` siblings.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from medres.io import atomic_write_text
from medres.phi import redact
from medres.phi.keys import KEY_FILE

log = logging.getLogger(__name__)

TOKENS_FILE = ".medres_tokens.json"
_VERSION = 1


def _stored(folder: Path) -> list[str]:
    try:
        data = json.loads((folder / TOKENS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    tokens = data.get("hashed_tokens") if isinstance(data, dict) else None
    return [str(t) for t in tokens] if isinstance(tokens, list) else []


def save_tokens(folder: str | os.PathLike[str], key: bytes) -> None:
    """Store the hashed tokens that every live redactor under ``key`` learned, merged with
    those already stored in ``folder`` (atomic write; nothing is written without tokens)."""
    folder = Path(folder)
    learned = {t for r in list(redact._LIVE) if r.key == key for t in r.hashed_tokens}
    stored = set(_stored(folder))
    if not learned or learned <= stored:
        return
    body = {"version": _VERSION, "hashed_tokens": sorted(learned | stored)}
    atomic_write_text(folder / TOKENS_FILE, json.dumps(body) + "\n")


def _key(folder: Path) -> bytes | None:
    try:
        return bytes.fromhex((folder / KEY_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def learn_tokens(folder: str | os.PathLike[str]) -> bool:
    """Restore the tokens stored in ``folder`` (with its key) into a live redactor, so the
    message filter applies them; returns whether any were restored. A folder without a key
    or a tokens file, or with unreadable ones, is ignored (this only ever adds filtering)."""
    folder = Path(folder)
    tokens = _stored(folder)
    key = _key(folder) if tokens else None
    if not tokens or key is None:
        return False
    for live in list(redact._LIVE):
        if live.key == key and set(tokens) <= set(live.hashed_tokens):
            return True  # already applied
    redact.PathRedactor(key).add_hashed(tokens)
    log.debug("identity filter: %d stored tokens restored", len(tokens))
    return True
