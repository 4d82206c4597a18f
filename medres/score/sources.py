"""Turn SOURCE arguments into a stream of :class:`~medres.score.items.ScoreItem`.

Choices:

- Reuses ingest's discovery (``medres.ingest.discover``: folders, files, archives, safe
  extraction, PHI-safe ``source`` strings) and ingest's DICOM header scan and
  series-to-stack grouping: there is one code path for what counts as an image.
- A single ``.csv`` SOURCE is a manifest: its rows keep their ``image_id`` (the item
  key), ``--split`` selects rows.
- Item keys are pseudonyms under ``OUT_DIR/.medres_key`` (``medres.phi``): for a DICOM
  stack of (SeriesInstanceUID, stack index), for a NIfTI file of (source path, size).
  The shard of an item is computed from the same identity with an unkeyed hash, so
  machines with different keys still split the work identically.
- The listing (walk, archive extraction, manifest read) happens when the stream is made,
  so scoring knows before decoding anything whether it needs isolated decode workers
  (:attr:`ItemStream.plain_nifti`).
- NIfTI files are yielded as soon as they are listed; DICOM files are grouped into
  stacks once their headers are read, so scoring of NIfTI/early items starts while
  the DICOM headers are still being scanned.
- ``source`` paths (ledger, scores.csv, errors.csv, messages) go through
  :class:`medres.phi.PathRedactor` (``--source-paths``, default ``identity``) with the
  identity tokens of *all* DICOM headers of the run, so every run (resumed, sharded)
  redacts a path the same way. Item keys still derive from raw paths (unchanged by the
  mode). With ``identity``/``all`` and DICOM inputs, discovery rejections and NIfTI files
  are therefore yielded after the header scan, not before (a NIfTI-only run streams).

Imports: ingest's public API only (``discover``, ``tasks``, ``dicom``, ``identity``,
``codes``; never ``medres.ingest.pipeline``), :mod:`medres.phi`, :mod:`medres.dataset`
(manifests), :mod:`medres.score.items`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medres.errors import ScoringError
from medres.ingest.codes import Code
from medres.ingest.identity import IMAGE_ID_PREFIX, stack_identity, unique_image_id
from medres.phi import PathRedactor, pseudonym
from medres.score.items import ScoreItem

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITEM_PREFIX = IMAGE_ID_PREFIX


def is_nifti(name: str) -> bool:
    low = name.lower()
    return any(low.endswith(s) for s in NIFTI_SUFFIXES)


def is_manifest_source(sources: list[Path]) -> bool:
    """One SOURCE that is a ``.csv`` file is read as a manifest."""
    return len(sources) == 1 and sources[0].suffix.lower() == ".csv" and sources[0].is_file()


def item_key(identity: str, key: bytes) -> str:
    """The pseudonymous item key (and output ``image_id``) of a raw identity."""
    return pseudonym(identity, key, prefix=ITEM_PREFIX)


def is_plain_nifti(name: str) -> bool:
    """An uncompressed ``.nii`` name (decoded in-process by scoring; see ``in_process``)."""
    return name.lower().endswith(".nii")


@dataclass
class ItemStream:
    """The items of the SOURCE arguments: listed when made, produced while iterated.

    The listing (folder walk, archive extraction, manifest read) is done by the
    constructor functions below, so ``plain_nifti`` is known before any item is decoded:
    True when every input is an uncompressed ``.nii`` file (no DICOM, nothing
    compressed, no file to classify by content), i.e. when scoring needs no isolated
    decode workers. Iterating reads DICOM headers, groups stacks and yields the items.
    """

    items: Iterator[ScoreItem]
    plain_nifti: bool

    def __iter__(self) -> Iterator[ScoreItem]:
        return self.items


def manifest_items(path: Path, *, split: str | None = None) -> ItemStream:
    """Items from a manifest's rows (``image_id`` kept; ``split`` filters rows)."""
    from medres.dataset.manifest import read_manifest

    man = read_manifest(path)
    rows = man.select(split) if split else man.rows
    if split and not rows:
        raise ScoringError(
            f"{path.name}: no rows with split={split!r}; check --split (train/val/test)"
        )
    paths = [man.resolve(row) for row in rows]

    def produce() -> Iterator[ScoreItem]:
        for row, p in zip(rows, paths, strict=True):
            yield ScoreItem(
                key=row["image_id"],
                identity=row["image_id"],
                source=row.get("source", "") or row["image_path"],
                kind="nifti",
                payload=(str(p), row.get("source", "") or row["image_path"]),
                study_key=row.get("study_key", ""),
                series_key=row.get("series_key", ""),
            )

    return ItemStream(produce(), all(is_plain_nifti(p.name) for p in paths))


def discover_items(
    sources: list[Path],
    *,
    key: bytes,
    scratch: Path,
    exclude: list[Path] | None = None,
    source_paths: str = "identity",
) -> ItemStream:
    """Items from folders/files/archives via ingest's discovery and DICOM grouping.

    The discovery (walk, archive extraction) runs now; headers are scanned while the
    stream is iterated.
    """
    from medres.ingest.discover import discover, root_prefixes

    redactor = PathRedactor(key, source_paths, root_names=[p for p in root_prefixes(sources) if p])
    found = discover(sources, scratch, exclude=exclude)
    candidates = [f for f in found.files if not is_nifti(f.source)]

    def listed() -> Iterator[ScoreItem]:
        for rej in found.rejected:
            yield _rejected(rej.source, rej.code, rej.message, key, redactor)
        for f in found.files:
            if is_nifti(f.source):
                yield nifti_item(f.path, f.source, f.size, key, redactor)

    def produce() -> Iterator[ScoreItem]:
        early = not candidates or redactor.mode == "keep"  # nothing to learn from headers
        if early:
            yield from listed()
        if candidates:
            yield from dicom_items(
                candidates, key=key, redactor=redactor, after_scan=None if early else listed
            )

    plain = not candidates and all(is_plain_nifti(f.source) for f in found.files)
    return ItemStream(produce(), plain)


def nifti_item(
    path: Path, source: str, size: int, key: bytes, redactor: PathRedactor | None = None
) -> ScoreItem:
    """A NIfTI file: identity = (source path, size), so a replaced file is re-scored."""
    ident = f"nifti\x00{source}\x00{size}"
    shown = redactor.redact(source) if redactor is not None else source
    return ScoreItem(
        key=item_key(ident, key),
        identity=ident,
        source=shown,
        kind="nifti",
        payload=(str(path), shown),
    )


def dicom_items(
    files: list,
    *,
    key: bytes,
    redactor: PathRedactor | None = None,
    after_scan: Callable[[], Iterator[ScoreItem]] | None = None,
) -> Iterator[ScoreItem]:
    """Classify by content and group DICOM files into stacks with ingest's code.

    ``medres.ingest.tasks.scan_task`` tells NIfTI (by content) from DICOM and reads
    the DICOM header; ``medres.ingest.dicom.group_stacks`` groups and validates series.
    A series may span folders, so stacks are formed after all headers are read (headers
    only: fast); NIfTI files were already yielded and are being scored meanwhile.

    With a ``redactor``, the tokens of every header are added before anything of these
    files is yielded; headers then carry the redacted ``source`` into grouping and
    decoding, so stack sources and their messages are redacted too. ``after_scan`` yields
    items held back until the tokens were known.
    """
    import dataclasses

    from medres.errors import IngestError
    from medres.ingest import dicom
    from medres.ingest.tasks import common_source, scan_task

    headers = []
    held: list[Any] = []  # NIfTI by content: yielded once the tokens are known
    failed: list[tuple[str, str, str]] = []
    for f in files:
        try:
            res = scan_task((f.path, f.source))
        except IngestError as exc:
            failed.append((f.source, str(exc.code), str(exc)))
            continue
        except BaseException as exc:  # a header parser panic must not stop scoring
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            failed.append((f.source, Code.UNREADABLE.value, f"{f.source}: header unreadable"))
            continue
        if res.kind == "nifti":
            held.append(f)
        else:
            headers.append(res.header)
            if redactor is not None:
                redactor.add_header(res.header)
    if redactor is not None:
        headers = [dataclasses.replace(h, source=redactor.redact(h.source)) for h in headers]
    if after_scan is not None:
        yield from after_scan()
    for src, code, message in failed:
        yield _rejected(src, code, message, key, redactor)
    for f in held:
        yield nifti_item(f.path, f.source, f.size, key, redactor)
    if not headers:
        return
    stacks, rejections = dicom.group_stacks(headers)
    for rej in rejections:
        yield _rejected(rej.source, str(rej.code), rej.message, key, redactor)
    taken: set[str] = set()
    for stack in stacks:
        k, ident = unique_image_id(stack_identity(stack), key, taken)  # ingest's image_id
        h = stack.first
        yield ScoreItem(
            key=k,
            identity=ident,
            source=common_source(stack.sources),
            kind="dicom",
            payload=stack,
            study_key=pseudonym(h.study_uid, key, "stu-"),
            series_key=pseudonym(h.series_uid, key, "ser-"),
            study_uid=h.study_uid,
            accession=h.accession,
        )


def _rejected(
    source: str, code: str, message: str, key: bytes, redactor: PathRedactor | None = None
) -> ScoreItem:
    ident = f"rejected\x00{source}"
    if redactor is not None:
        message = redactor.redact_text(message, (source,))
        source = redactor.redact(source)
    return ScoreItem(
        key=item_key(ident, key),
        identity=ident,
        source=source,
        kind="error",
        code=code,
        message=message,
    )
