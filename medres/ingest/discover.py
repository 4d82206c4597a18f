"""Discovery: turn SOURCE arguments (folders, files, archives) into a flat list of inputs.

Owns walking folders and naming ``source`` strings; the safe extraction of archives
(limits, unsafe members) is :mod:`medres.ingest.archives`, re-exported here; following a
DICOMDIR's references is :mod:`medres.ingest.dicomdir`. Imports: ``medres.errors``,
``medres.phi`` (the key file name), ``ingest.codes``, ``ingest.archives``, ``ingest.dicomdir``.

Choices made here:

* **Nothing is classified by content in this module.** Discovery only lists and stats
  files; whether a file is DICOM (DICM preamble or a successful parse) or NIfTI is decided
  by the header-scan workers, so each file is opened once for its header, in parallel.
  Archives are the exception: they are recognised by name (``.zip``, ``.tar``,
  ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) and opened here.
* **``source`` strings never hold an absolute path.** With one SOURCE argument, a file's
  ``source`` is its path relative to that folder (a file argument gives its base name);
  with several SOURCE arguments each is prefixed with the argument's base name so that two
  roots cannot collide (``siteA/p1/1.dcm``). Archive members read
  ``archive.zip!member/path``. Folder names above the root (which may hold patient names)
  are never recorded.
* **Folders** are walked recursively in sorted order. Symlinked *directories* are not
  followed (no cycles, no escapes); symlinked *files* are followed because curated datasets
  are often symlink farms into a PACS export. The output folder is excluded when it lies
  inside a source folder.
* **Archives** are extracted into a scratch folder and nothing is written outside it:
  members with absolute paths, ``..`` components, links (symlinks and hardlinks), devices
  and FIFOs are rejected one by one (``archive_unsafe``) and the rest is used; exceeding the
  member-count, size or compression-ratio limits rejects the whole archive, detected while
  streaming so a bomb stops early. A member that cannot be read (encrypted, unsupported
  compression, corrupt) is rejected alone (``unreadable``); a tar stream cut short keeps
  the members before the cut. Two members of the same name, or a name longer than the file
  system allows, are both extracted (the later one under a scratch name of its own; its
  ``source`` gets ``#2``, ``#3``... so every input is accounted once).
* **Nested archives** (a zip inside a tar...) are opened too, up to :data:`MAX_DEPTH`
  levels, under the limits of the outermost archive (one member count and one byte total
  for all levels); a nested archive that breaks a limit or cannot be read is rejected alone
  (its own row), a deeper one is rejected as ``archive_unsafe``. ``source`` reads
  ``outer.tar!inner.zip!member``. **``.dcm.gz``** files (a gzip-compressed DICOM file, in a
  folder or an archive) are decompressed into scratch under the same limits.
* **DICOMDIR** (a media directory, in a folder, an archive or given as the SOURCE) is
  followed: its referenced files are inputs (matched case-insensitively, never outside its
  folder: an escaping reference is ``archive_unsafe``, a missing one ``unreadable``; a file
  found both ways counts once) and the DICOMDIR itself is a ``not_image`` skip, never a
  junk row (rules in :mod:`medres.ingest.dicomdir`).
* **Names that are not UTF-8** (Latin-1 bytes from old systems) are read; their ``source``
  shows the undecodable bytes as backslash escapes (``caf\\xe9.dcm``), so every writer can
  store it. Control characters show as ``?``.
* **Output folders are not inputs.** A folder below a SOURCE that holds a medres output
  (``.medres_key``, or ``manifest.csv`` with ``ingest.json``) is not entered, and in a
  SOURCE folder that is itself an output folder (or the ``--out`` folder) the entries
  medres writes there (``manifest.csv``, ``errors.csv``, ``ingest.json``, the key, cache,
  lock and scratch, ``images/img-*``) are passed over. Such files are not discovered at all:
  they count nowhere (not in ``seen``); one log line says how many folders were passed over.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medres.errors import ArchiveError, ConfigError
from medres.ingest.archives import (
    ARCHIVE_SUFFIXES,
    MAX_DEPTH,
    ArchiveLimits,
    InputFile,
    Rejected,
    clean_source,
    extract_archive,
    gunzip_file,
    is_archive,
    safe_member_path,
    short_name,
)
from medres.ingest.codes import Code
from medres.ingest.dicomdir import follow_dicomdirs
from medres.phi import KEY_FILE, TOKENS_FILE

__all__ = [
    "ARCHIVE_SUFFIXES",
    "MAX_DEPTH",
    "ArchiveLimits",
    "Discovery",
    "InputFile",
    "Rejected",
    "clean_source",
    "discover",
    "extract_archive",
    "is_archive",
    "root_prefixes",
    "safe_member_path",
]

log = logging.getLogger(__name__)


# what ingest/score write into their output folder (passed over when a SOURCE is one)
_OUTPUT_MARKERS = (KEY_FILE, "manifest.csv", "ingest.json")
_OUTPUT_ENTRIES = frozenset(
    {KEY_FILE, TOKENS_FILE, "manifest.csv", "errors.csv", "ingest.json",
     ".medres_cache.json", ".medres_lock", ".medres_scratch"}
)  # fmt: skip


@dataclass
class Discovery:
    """What :func:`discover` found: inputs to scan and inputs already rejected."""

    files: list[InputFile] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    archives: int = 0

    @property
    def seen(self) -> int:
        return len(self.files) + len(self.rejected)


def root_prefixes(sources: list[Path]) -> list[str]:
    """The ``source`` prefix of each SOURCE argument (see the module docstring).

    Raises :class:`ConfigError` when two arguments would give the same prefix.
    """
    if len(sources) == 1:
        return [""]
    names = [clean_source(p.name or p.resolve().name) for p in sources]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(
                f"SOURCE arguments {seen[name] + 1} and {i + 1} have the same base name {name!r}; "
                "their source paths would collide in the manifest - ingest them separately "
                "or give them different names"
            )
        seen[name] = i
    return names


def discover(
    sources: list[Path],
    scratch: Path,
    *,
    limits: ArchiveLimits | None = None,
    exclude: list[Path] | None = None,
    on_input: Callable[[], None] | None = None,
) -> Discovery:
    """List every input file under ``sources``, extracting archives safely into ``scratch``.

    ``exclude``: folders never entered (the output folder); ``on_input``: called once per
    file or archive found (progress). Raises :class:`ConfigError` for a SOURCE that does not
    exist; everything else becomes a rejection, never an abort.
    """
    limits = limits or ArchiveLimits()
    excluded = {p.resolve() for p in (exclude or [])}
    result = Discovery()
    for i, src in enumerate(sources):
        if not src.exists():
            raise ConfigError(
                f"SOURCE argument {i + 1} ({src.name!r}) does not exist; check the path"
            )
    prefixes = root_prefixes(sources)
    for i, (src, prefix) in enumerate(zip(sources, prefixes, strict=True)):
        if src.is_dir():
            for path, rel, st in _walk(src, excluded):
                _add_file(result, path, _join(prefix, rel), scratch / f"a{i}", limits, st)
                if on_input:
                    on_input()
        else:
            _add_file(result, src, clean_source(src.name), scratch / f"a{i}", limits)
            if on_input:
                on_input()
    result.files, result.rejected = follow_dicomdirs(
        result.files, result.rejected, limits.max_members
    )
    _unique_sources(result)
    return result


def _unique_sources(result: Discovery) -> None:
    """Give every input its own ``source`` (``#2``, ``#3``... on repeats): the ledger and
    the outputs are keyed by it, so a repeat would silently hide a file."""
    seen: set[str] = set()

    def unique(source: str) -> str:
        new, n = source, 1
        while new in seen:
            n += 1
            new = f"{source}#{n}"
        seen.add(new)
        return new

    for i, f in enumerate(result.files):
        if (s := unique(f.source)) != f.source:
            result.files[i] = InputFile(f.path, s, f.size, f.fingerprint)
    for i, r in enumerate(result.rejected):
        if (s := unique(r.source)) != r.source:
            result.rejected[i] = Rejected(s, r.code, r.message)


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _is_output_folder(folder: Path) -> bool:
    """A medres output folder (ingest or score): its key, or a manifest with ingest.json."""
    has = [(folder / m).is_file() for m in _OUTPUT_MARKERS]
    return has[0] or (has[1] and has[2])


def _owned(rel_parts: tuple[str, ...]) -> bool:
    """Whether a path relative to an output folder is something medres wrote there."""
    if len(rel_parts) == 1 and rel_parts[0] in _OUTPUT_ENTRIES:
        return True
    return (
        len(rel_parts) == 2
        and rel_parts[0] == "images"
        and rel_parts[1].startswith(("img-", ".img-"))
    )


def _walk(root: Path, excluded: set[Path]) -> Iterator[tuple[Path, str, os.stat_result]]:
    """Regular files (and file symlinks) under ``root``, sorted, with posix relative paths
    (cleaned, see :func:`clean_source`) and their ``stat`` (one per file: a 50,000-file
    export is walked in a second). Output folders are passed over (module docstring)."""
    found: list[tuple[Path, str, os.stat_result]] = []
    root_is_output = root.resolve() in excluded or _is_output_folder(root)
    passed = 0
    root_s = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        rel_dir = os.path.relpath(dirpath, root_s).replace(os.sep, "/")
        keep = []
        for name in sorted(dirnames):
            sub = d / name
            if sub.is_symlink():
                # the name is not logged: folder names may hold patient names or IDs
                log.debug("not following a directory symlink below a SOURCE folder")
                continue
            if (excluded and sub.resolve() in excluded) or _is_output_folder(sub):
                passed += 1
                continue
            if root_is_output and d == root and name in _OUTPUT_ENTRIES:
                continue
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            st = _regular_file(os.path.join(dirpath, name))
            if st is None:  # dangling link, fifo, socket, device
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if root_is_output and _owned(tuple(rel.split("/"))):
                continue
            found.append((d / name, clean_source(rel), st))
    if passed or root_is_output:
        log.info(
            "passed over %d medres output folder(s) below a SOURCE%s (their files are not inputs)",
            passed,
            " and the output files in the SOURCE folder itself" if root_is_output else "",
        )
    found.sort(key=lambda t: t[1])
    yield from found


def _regular_file(path: str) -> os.stat_result | None:
    """``os.stat(path)`` when it is a regular file (symlinks followed), else ``None``; the
    errors ``Path.is_file`` ignores are ignored, any other is raised."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno in _IGNORED_ERRNOS:
            return None
        raise
    except ValueError:  # a name the OS cannot take
        return None
    return st if stat.S_ISREG(st.st_mode) else None


_IGNORED_ERRNOS = frozenset((errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP))


def _add_file(
    result: Discovery,
    path: Path,
    source: str,
    scratch: Path,
    limits: ArchiveLimits,
    st: os.stat_result | None = None,
):
    try:
        st = path.stat() if st is None else st
    except OSError as exc:
        result.rejected.append(
            Rejected(source, Code.UNREADABLE.value, f"cannot stat the file ({exc.strerror})")
        )
        return
    if is_archive(path):
        result.archives += 1
        dest = scratch / f"{result.archives:05d}"
        try:
            files, rejected = extract_archive(path, dest, source, limits)
        except ArchiveError as exc:
            shutil.rmtree(dest, ignore_errors=True)
            result.rejected.append(Rejected(source, exc.code, str(exc)))
            return
        base_fp = f"{st.st_size}:{st.st_mtime_ns}"
        for f in files:
            result.files.append(InputFile(f.path, f.source, f.size, f"{base_fp}:{f.fingerprint}"))
        result.rejected.extend(rejected)
        return
    fp = f"{st.st_size}:{st.st_mtime_ns}"
    if path.name.lower().endswith(".dcm.gz"):
        scratch.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(prefix="gz", dir=scratch)) / short_name(path.name[:-3])
        try:
            got = gunzip_file(path, out, source, limits)
        except ArchiveError as exc:
            got = Rejected(source, exc.code, str(exc))
        if isinstance(got, Rejected):
            result.rejected.append(got)
        else:
            result.files.append(InputFile(got.path, source, got.size, fp))
        return
    result.files.append(InputFile(path, source, st.st_size, fp))
