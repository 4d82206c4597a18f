"""The incremental cache ``.medres_cache.json``: what lets a re-run skip unchanged inputs.

Each image's inputs give a fingerprint (:func:`image_fingerprint`: relative source paths
and the discovery fingerprints of their files). The cache keeps, per cache group (a DICOM
series or a NIfTI file, named by pseudonyms: :func:`group_id`), the fingerprints of all its
files and the rejections inside it, and per image fingerprint its
:class:`~medres.ingest.records.ImageRecord`. A group whose files are all present and
unchanged and whose images exist is trusted whole (:func:`trusted_groups`,
:func:`reuse_trusted`). On disk every source is a keyed hash (paths may hold PHI) and
rejection messages are redacted; :func:`load_cache` maps the hashes back to the current
inputs' paths. A change of version (the cache format's ``_CACHE_VERSION``, bumped whenever
the identity filter changes, or medres's), ``--min-slices`` or ``--compress`` voids the cache.
Imports: core, ``ingest.config``, ``ingest.accounting``, ``ingest.discover``,
``ingest.records``, ``ingest.tasks``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medres import __version__
from medres.ingest.accounting import Ledger
from medres.ingest.codes import Code
from medres.ingest.config import IngestConfig
from medres.ingest.discover import InputFile
from medres.ingest.records import ImageRecord
from medres.ingest.tasks import common_source
from medres.io import atomic_open
from medres.phi import PathRedactor, pseudonym

log = logging.getLogger(__name__)

CACHE_NAME = ".medres_cache.json"
# 4: identity tokens are NFKC-casefolded whole tokens and free-text header values are
# filtered (issue #16); a cache of an earlier version holds tokens hashed the old way and
# records filtered the old way, so it is rebuilt, never reused
_CACHE_VERSION = 4
_SRC_MARK = "\x1f\x1f"  # a rejection message's own source, in the cache
# failures that may not happen again (load, memory, a crashed worker): never cached
TRANSIENT_CODES = frozenset({Code.TIMEOUT.value, Code.DECODE_FAILED.value, Code.UNREADABLE.value})


@dataclass
class CacheGroup:
    """One cache group: ``inputs`` maps each of its sources to its file fingerprint;
    ``rejections`` holds (source, code, message) for its files that were not used."""

    inputs: dict[str, str] = field(default_factory=dict)
    rejections: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class Cache:
    """``units`` maps an image fingerprint to its record; ``groups`` maps a cache group id
    to its :class:`CacheGroup`; ``tokens`` are :attr:`PathRedactor.hashed_tokens`."""

    units: dict[str, ImageRecord] = field(default_factory=dict)
    groups: dict[str, CacheGroup] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)


# a trusted group's images: (image fingerprint, record) pairs, by group id
Trusted = dict[str, list[tuple[str, ImageRecord]]]


def cache_settings(config: IngestConfig) -> str:
    """What a cached image depends on besides its inputs (a change voids the cache)."""
    return (
        f"{__version__}|min_slices={config.min_slices}|compress={config.compress}"
        f"|uneven={config.uneven_spacing}"
    )


def image_fingerprint(parts: Sequence[tuple[str, str]], config: IngestConfig) -> str:
    """The fingerprint of one image from its (source, file fingerprint) pairs."""
    h = hashlib.sha256()
    h.update(f"{_CACHE_VERSION}|{__version__}|{config.min_slices}|{config.compress}".encode())
    for src, fp in sorted(parts):
        h.update(f"\n{src}\t{fp}".encode())
    return h.hexdigest()


def group_id(header: Any, key: bytes) -> str:
    """The PHI-free cache group of a DICOM header: its (study, series) pseudonyms."""
    return f"dicom|{pseudonym(header.study_uid, key)}|{pseudonym(header.series_uid, key)}"


def _src_id(source: str, key: bytes) -> str:
    """How the cache names a source: a keyed hash (the path may hold PHI)."""
    return pseudonym(source, key, "src-")


def load_cache(out: Path, settings: str, files: Sequence[InputFile], key: bytes) -> Cache:
    """The previous run's cache with its hashed sources mapped back to the current inputs'
    paths (a hash no current file has stays as is and so never matches). An unreadable,
    outdated or malformed cache gives an empty one."""
    try:
        data = json.loads((out / CACHE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Cache()
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return Cache()
    if data.get("settings") != settings:
        return Cache()
    units, groups, tokens = data.get("units"), data.get("groups"), data.get("path_tokens")
    if not isinstance(units, dict) or not isinstance(groups, dict):
        return Cache()
    raw = {_src_id(f.source, key): f.source for f in files}
    try:
        cache = Cache(
            {fp: _load_record(rec, raw) for fp, rec in units.items()},
            {gid: _load_group(g, raw) for gid, g in groups.items()},
        )
    except (AttributeError, KeyError, TypeError, ValueError):
        return Cache()
    cache.tokens = [str(t) for t in tokens] if isinstance(tokens, list) else []
    return cache


def _load_record(data: Any, raw: dict[str, str]) -> ImageRecord:
    rec = ImageRecord.from_cache(data)
    sources = tuple(raw.get(s, s) for s in rec.sources)
    return replace(rec, sources=sources, source=common_source(sources) if sources else "")


def _load_group(data: Any, raw: dict[str, str]) -> CacheGroup:
    inputs = {raw.get(s, s): fp for s, fp in (data.get("inputs") or {}).items()}
    rejections = [
        (raw.get(s, s), code, str(msg).replace(_SRC_MARK, raw.get(s, s)))
        for s, code, msg in data.get("rejections", [])
    ]
    return CacheGroup(inputs, rejections)


def save_cache(out: Path, cache: Cache, settings: str, key: bytes, redactor: PathRedactor) -> None:
    """Write the cache with every source as a keyed hash and rejection messages redacted
    (their own source as a marker restored on load), plus the redactor's hashed tokens."""
    ids: dict[str, str] = {}  # a source is named in its unit and in its group: hash it once

    def src_id(s: str) -> str:
        found = ids.get(s)
        if found is None:
            found = ids[s] = _src_id(s, key)
        return found

    units = {
        fp: {**rec.to_cache(), "source": "", "sources": [src_id(s) for s in rec.sources]}
        for fp, rec in cache.units.items()
    }
    groups = {
        gid: {
            "inputs": {src_id(s): v for s, v in g.inputs.items()},
            "rejections": [
                [src_id(s), code, redactor.redact_text(str(msg).replace(s, _SRC_MARK))]
                for s, code, msg in g.rejections
            ],
        }
        for gid, g in cache.groups.items()
    }
    data = {
        "version": _CACHE_VERSION,
        "settings": settings,
        "units": units,
        "groups": groups,
        "path_tokens": redactor.hashed_tokens,
    }
    text = json.dumps(data)  # the C encoder (json.dump writes through the Python one)
    with atomic_open(out / CACHE_NAME, "w", encoding="utf-8") as fh:
        fh.write(text)


def trusted_groups(cache: Cache, files: Sequence[InputFile], out: Path) -> Trusted:
    """Cache groups whose every input is present and unchanged and whose images exist:
    their headers need not be read again (unless a new file joins the series)."""
    current = {f.source: f.fingerprint for f in files}
    by_group: Trusted = {}
    broken: set[str] = set()
    for fp, rec in cache.units.items():
        if not (out / rec.image_path).is_file():
            broken.add(rec.group)
        by_group.setdefault(rec.group, []).append((fp, rec))
    trusted = {}
    for gid, g in cache.groups.items():  # groups without images: series rejected whole
        if gid in broken:
            continue
        if g.inputs and all(current.get(src) == fp for src, fp in g.inputs.items()):
            trusted[gid] = by_group.get(gid, [])
    return trusted


def reuse_trusted(trusted: Trusted, cache: Cache, ledger: Ledger) -> Cache:
    """Records and rejections of trusted groups, carried over without reading anything."""
    kept = Cache()
    for gid, units in trusted.items():
        g = cache.groups[gid]
        kept.groups[gid] = g
        for fp, rec in units:
            kept.units[fp] = rec
            for src in rec.sources:
                ledger.use(src)
        for src, code, message in g.rejections:
            ledger.reject(src, code, message)
    if trusted:
        log.info("%d series/files unchanged since the last run: headers not re-read", len(trusted))
    return kept
