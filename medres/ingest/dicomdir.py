"""DICOMDIR: follow a media directory's references to the files it lists.

Owns :func:`follow_dicomdirs`, which :func:`medres.ingest.discover.discover` runs on the
inputs it found. A file named ``DICOMDIR`` (any case; in a folder, an archive, or given as
the SOURCE) that parses as a DICOM media directory (PS3.10 Basic Directory: a
``DirectoryRecordSequence``) is read with pydicom, and each record's ``ReferencedFileID``
is followed, relative to the DICOMDIR's folder:

* **Case-insensitively**: CD/DVD exports often store upper-case 8.3 names
  (``DICOM/ST000001/IM000001``) that the file system (or an unzip) lowered, and ISO 9660
  may add a version suffix (``IM000001.;1``); a component matches a folder entry whose
  name is equal ignoring case, a trailing ``;N`` and a trailing dot (an exact match wins).
* **Never outside the DICOMDIR's folder**: a component that is empty, ``.``, ``..``,
  absolute or holds a drive letter, or a path that resolves (through links) outside that
  folder, is rejected as ``archive_unsafe`` (one row per reference).
* **Every referenced file is accounted once**: a file the walk found too keeps its walk
  entry; one the walk did not find (the DICOMDIR was the SOURCE) is added, its ``source``
  relative to the DICOMDIR's folder; a file referenced twice counts once; a referenced
  file that does not exist is one ``unreadable`` row naming the reference.
* **The DICOMDIR itself is not an image**: it becomes a ``not_image`` skip (counted in
  ``seen`` and ``skipped``, never a junk/``not_dicom`` row). A file named DICOMDIR that
  is not a media directory (or larger than :data:`MAX_DICOMDIR_BYTES`) is left to the
  header scan like any other file.

The DICOMDIR is parsed in the main process (pydicom's pure-Python reader; no pixel data,
no decoder plugins), size-capped, and the number of references it may add is bounded by
the archive member limit. Imports: ``ingest.archives`` and ``ingest.codes``; pydicom
lazily (only when a DICOMDIR is met).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from medres.ingest.archives import InputFile, Rejected, clean_source
from medres.ingest.codes import Code

log = logging.getLogger(__name__)

MAX_DICOMDIR_BYTES = 256 * 1024**2
_BAD_COMPONENT = re.compile(r"^(?:|\.|\.\.)$|^[A-Za-z]:")
_VERSION = re.compile(r";\d*$")


@dataclass(frozen=True)
class _Ref:
    """One followed reference: where it lies now, or why it cannot be used."""

    rel: str  # the reference as a posix path (display)
    path: Path | None  # the file on disk (None: rejected)
    code: str = ""
    why: str = ""


def is_dicomdir(f: InputFile) -> bool:
    """Whether input ``f`` is named like a DICOMDIR (any case, ISO 9660 suffix allowed), by
    its ``source`` (an archive member may lie under a scratch name) or its path."""
    return "DICOMDIR" in (_norm(re.split(r"[/!]", f.source)[-1]), _norm(f.path.name))


def follow_dicomdirs(
    files: list[InputFile], rejected: list[Rejected], max_refs: int
) -> tuple[list[InputFile], list[Rejected]]:
    """``files`` with every DICOMDIR among them replaced by a ``not_image`` skip and its
    referenced files (those not already in ``files``) added; rejections of references
    (missing, escaping) are appended to ``rejected``. ``max_refs`` bounds the references
    followed per DICOMDIR (the rest are left unread, with a log line)."""
    if not any(is_dicomdir(f) for f in files):
        return files, rejected
    by_path = {_key(f.path): f for f in files}
    taken = {r.source for r in rejected}  # a member the extraction rejected: one row only
    out: list[InputFile] = []
    added: list[InputFile] = []
    for f in files:
        refs = _references(f, max_refs) if is_dicomdir(f) else None
        if refs is None:
            out.append(f)
            continue
        n_found = 0
        base = _base_source(f.source)
        for ref in refs:
            src = clean_source(base + ref.rel)
            if ref.path is None:
                if src not in taken:
                    taken.add(src)
                    rejected.append(Rejected(src, ref.code, f"{f.source}: {ref.why}"))
                continue
            n_found += 1
            if _key(ref.path) in by_path:
                continue  # found by the walk too: counted once, under its walk entry
            try:
                st = ref.path.stat()
            except OSError as exc:
                rejected.append(
                    Rejected(src, Code.UNREADABLE.value, f"cannot stat the file ({exc.strerror})")
                )
                continue
            new = InputFile(ref.path, src, st.st_size, f"{st.st_size}:{st.st_mtime_ns}")
            by_path[_key(ref.path)] = new
            added.append(new)
        rejected.append(
            Rejected(
                f.source,
                Code.NOT_IMAGE.value,
                f"{f.source}: DICOMDIR (media directory, not an image); {n_found} of its "
                f"{len(refs)} referenced files followed",
            )
        )
    return out + added, rejected


def _key(path: Path) -> str:
    return os.path.normcase(os.path.realpath(path))


def _base_source(source: str) -> str:
    """The ``source`` prefix of the DICOMDIR's folder (``a/b/`` or ``x.zip!`` or ``""``)."""
    return source[: max(source.rfind("/"), source.rfind("!")) + 1]


def _norm(name: str) -> str:
    """A file name as DICOMDIR references compare it: upper case, no ``;N``, no final dot."""
    return _VERSION.sub("", name).rstrip(".").upper()


def _references(f: InputFile, max_refs: int) -> list[_Ref] | None:
    """The followed references of DICOMDIR ``f``, or None when it is not a media directory."""
    try:
        if f.path.stat().st_size > MAX_DICOMDIR_BYTES:
            log.warning("a DICOMDIR over %d MiB is not followed", MAX_DICOMDIR_BYTES >> 20)
            return None
        ids = _referenced_ids(f.path)
    except Exception:  # not a readable media directory: the header scan classifies it
        log.debug("file named DICOMDIR is not a readable media directory", exc_info=True)
        return None
    if ids is None:
        return None
    if len(ids) > max_refs:
        log.warning("a DICOMDIR lists %d files; following the first %d", len(ids), max_refs)
        ids = ids[:max_refs]
    root = f.path.parent
    refs: list[_Ref] = []
    seen: set[str] = set()
    listings: dict[Path, dict[str, str]] = {}
    for parts in ids:
        ref = _resolve(root, parts, listings)
        k = _key(ref.path) if ref.path is not None else ref.rel
        if k not in seen:
            seen.add(k)
            refs.append(ref)
    return refs


def _referenced_ids(path: Path) -> list[tuple[str, ...]] | None:
    """Every ReferencedFileID of a media directory (components), in record order; None
    when the file has no DirectoryRecordSequence."""
    import pydicom

    with warnings.catch_warnings():  # odd values (a '..' in a CS) are judged below, not warned
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True, defer_size=1 << 20)
        records = ds.get("DirectoryRecordSequence")
        if records is None:
            return None
        ids: list[tuple[str, ...]] = []
        for rec in records:
            value = rec.get("ReferencedFileID")
            if value is None:
                continue
            comps = [value] if isinstance(value, str) else list(value)
            ids.append(tuple(p for c in comps for p in str(c).replace("\\", "/").split("/")))
    return ids


def _resolve(root: Path, parts: tuple[str, ...], listings: dict[Path, dict[str, str]]) -> _Ref:
    """Reference ``parts`` below ``root``, matched case-insensitively, never escaping
    (``listings``: folder entries by normalised name, filled as folders are met)."""
    rel = "/".join(parts)
    if not parts or any(_BAD_COMPONENT.match(p.strip()) for p in parts):
        return _Ref(
            rel,
            None,
            Code.ARCHIVE_UNSAFE.value,
            f"ReferencedFileID {clean_source(rel)!r} escapes the DICOMDIR's folder; not read",
        )
    cur = root
    for i, comp in enumerate(parts):
        nxt = _match(cur, comp, listings)
        if nxt is None:
            return _Ref(
                rel,
                None,
                Code.UNREADABLE.value,
                f"referenced file {clean_source(rel)!r} is missing (no "
                f"{clean_source('/'.join(parts[: i + 1]))!r}); copy the whole export",
            )
        cur = nxt
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(cur)]) != real_root:
        return _Ref(
            rel,
            None,
            Code.ARCHIVE_UNSAFE.value,
            f"ReferencedFileID {clean_source(rel)!r} links outside the DICOMDIR's folder; not read",
        )
    if not cur.is_file():
        return _Ref(
            rel,
            None,
            Code.UNREADABLE.value,
            f"referenced file {clean_source(rel)!r} is not a regular file",
        )
    shown = cur.relative_to(root).as_posix()  # the name on disk (its real case)
    return _Ref(shown, cur)


def _match(folder: Path, comp: str, listings: dict[Path, dict[str, str]]) -> Path | None:
    """``folder / comp`` when it exists, else the entry equal to ``comp`` ignoring case,
    an ISO 9660 ``;N`` suffix and a trailing dot (the first in sorted order)."""
    exact = folder / comp
    if os.path.lexists(exact):
        return exact
    if folder not in listings:
        try:
            names = sorted(os.listdir(folder), reverse=True)
        except OSError:
            names = []
        listings[folder] = {_norm(n): n for n in names}  # reversed: the first name wins
    name = listings[folder].get(_norm(comp))
    return folder / name if name is not None else None
