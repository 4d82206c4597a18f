"""Discovery: turn SOURCE arguments (folders, files, archives) into a flat list of inputs.

Owns walking folders, naming ``source`` strings, and the safe extraction of archives
(limits, unsafe members). Imports: ``medres.errors`` and ``ingest.codes`` only.

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
  the members before the cut. Nested archives are not opened (they fail as ``not_dicom``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from medres.errors import ArchiveError, ConfigError
from medres.ingest.codes import Code

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_COPY_CHUNK = 1 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ArchiveLimits:
    """Limits applied to every archive; exceeding one rejects the archive (``archive_unsafe``).

    ``max_ratio`` is uncompressed/compressed size, checked per zip member (members larger
    than ``ratio_min_bytes``) and for the archive as a whole; 200 is far above what DICOM
    reaches (a few x for raw pixels, ~50x for blank frames) and far below a bomb (1000x+).
    """

    max_members: int = 200_000
    max_total_bytes: int = 64 * 1024**3
    max_member_bytes: int = 8 * 1024**3
    max_ratio: float = 200.0
    ratio_min_bytes: int = 1 << 20


@dataclass(frozen=True)
class InputFile:
    """One file to scan. ``path`` is where it lies on disk now (scratch for archive members);
    ``source`` is the PHI-safe display path; ``fingerprint`` changes when its content may have.
    """

    path: Path
    source: str
    size: int
    fingerprint: str


@dataclass(frozen=True)
class Rejected:
    """An input rejected during discovery (one ``errors.csv`` row)."""

    source: str
    code: str
    message: str


@dataclass
class Discovery:
    """What :func:`discover` found: inputs to scan and inputs already rejected."""

    files: list[InputFile] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    archives: int = 0

    @property
    def seen(self) -> int:
        return len(self.files) + len(self.rejected)


def clean_source(text: str) -> str:
    """A one-line printable form of an (attacker-controlled) member name."""
    return _CONTROL.sub("?", text)


def is_archive(path: Path) -> bool:
    """Archive by name: the suffixes in :data:`ARCHIVE_SUFFIXES` (case-insensitive)."""
    name = path.name.lower()
    return any(name.endswith(s) for s in ARCHIVE_SUFFIXES)


def root_prefixes(sources: list[Path]) -> list[str]:
    """The ``source`` prefix of each SOURCE argument (see the module docstring).

    Raises :class:`ConfigError` when two arguments would give the same prefix.
    """
    if len(sources) == 1:
        return [""]
    names = [p.name or p.resolve().name for p in sources]
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
            for path, rel in _walk(src, excluded):
                _add_file(result, path, _join(prefix, rel), scratch / f"a{i}", limits)
                if on_input:
                    on_input()
        else:
            _add_file(result, src, src.name, scratch / f"a{i}", limits)
            if on_input:
                on_input()
    return result


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _walk(root: Path, excluded: set[Path]) -> Iterator[tuple[Path, str]]:
    """Regular files (and file symlinks) under ``root``, sorted, with posix relative paths."""
    found: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            sub = d / name
            if sub.is_symlink():
                # the name is not logged: folder names may hold patient names or IDs
                log.debug("not following a directory symlink below a SOURCE folder")
                continue
            if excluded and sub.resolve() in excluded:
                continue
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = d / name
            if not p.is_file():  # dangling link, fifo, socket, device
                continue
            found.append((p, p.relative_to(root).as_posix()))
    found.sort(key=lambda t: t[1])
    yield from found


def _add_file(result: Discovery, path: Path, source: str, scratch: Path, limits: ArchiveLimits):
    try:
        st = path.stat()
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
    result.files.append(InputFile(path, source, st.st_size, f"{st.st_size}:{st.st_mtime_ns}"))


# ---------------------------------------------------------------------------------------
# archives


def safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path a member may be written to, or ``None`` when it would escape.

    Rejects absolute paths (``/x``, ``\\x``, ``C:x``), any ``..`` component and empty names;
    backslashes count as separators (zip files made on Windows).
    """
    norm = name.replace("\\", "/")
    if not norm or norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return None
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return PurePosixPath(*parts)


def extract_archive(
    archive: Path, dest: Path, source: str, limits: ArchiveLimits
) -> tuple[list[InputFile], list[Rejected]]:
    """Extract ``archive`` into ``dest`` (created) and list its files.

    Returns the extracted files (``source`` = ``<source>!<member>``, ``fingerprint`` from the
    member's size and CRC/mtime) and the members rejected one by one. Raises
    :class:`ArchiveError` when a limit is exceeded or the archive cannot be read at all;
    the caller removes ``dest`` then.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            return _extract_zip(archive, dest, source, limits)
        return _extract_tar(archive, dest, source, limits)
    except ArchiveError:
        raise
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError, ValueError) as exc:
        raise ArchiveError(
            f"{source}: the archive cannot be read ({type(exc).__name__}); "
            "check that it is complete and not corrupted",
            code=Code.UNREADABLE.value,
        ) from None


def _limit_error(source: str, what: str) -> ArchiveError:
    return ArchiveError(
        f"{source}: archive rejected, {what}; extract it yourself if you trust it or raise "
        "the limit (--max-archive-members / --max-archive-gb / --max-archive-ratio)",
        code=Code.ARCHIVE_UNSAFE.value,
    )


class _Budget:
    """Running totals of bytes written for one archive, checked while streaming."""

    def __init__(self, source: str, limits: ArchiveLimits, compressed_size: int) -> None:
        self.source = source
        self.limits = limits
        self.compressed = max(compressed_size, 1)
        self.total = 0

    def add(self, n: int) -> None:
        self.total += n
        if self.total > self.limits.max_total_bytes:
            raise _limit_error(
                self.source, f"more than {self.limits.max_total_bytes} bytes uncompressed"
            )
        if (
            self.total > self.limits.ratio_min_bytes
            and self.total / self.compressed > self.limits.max_ratio
        ):
            raise _limit_error(
                self.source,
                f"compression ratio above {self.limits.max_ratio:g} (possible zip bomb)",
            )


def _copy_limited(src, out_path: Path, member_limit: int, budget: _Budget, source: str) -> int:
    written = 0
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        while block := src.read(_COPY_CHUNK):
            written += len(block)
            if written > member_limit:
                raise _limit_error(source, "a member is larger than its header says or the limit")
            budget.add(len(block))
            out.write(block)
    return written


def _target(dest: Path, rel: PurePosixPath, source: str) -> Path:
    out = dest.joinpath(*rel.parts)
    # belt and braces: the resolved parent must stay inside dest (no link can exist there,
    # as only regular files and real directories are ever created)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.parent.resolve().is_relative_to(dest.resolve()):
        raise _limit_error(source, "a member path escapes the destination")
    return out


def _extract_zip(archive: Path, dest: Path, source: str, limits: ArchiveLimits):
    files: list[InputFile] = []
    rejected: list[Rejected] = []
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise _limit_error(
                source, f"{len(infos)} members exceed the limit {limits.max_members}"
            )
        declared = sum(i.file_size for i in infos)
        if declared > limits.max_total_bytes:
            raise _limit_error(source, f"{declared} bytes uncompressed exceed the limit")
        for info in infos:
            if info.file_size > max(limits.ratio_min_bytes, 1) and info.file_size > (
                limits.max_ratio * max(info.compress_size, 1)
            ):
                raise _limit_error(
                    source,
                    f"compression ratio above {limits.max_ratio:g} (possible zip bomb)",
                )
        budget = _Budget(source, limits, archive.stat().st_size)
        for info in infos:
            msource = f"{source}!{clean_source(info.filename)}"
            if info.is_dir():
                continue
            mode = info.external_attr >> 16
            rel = safe_member_path(info.filename)
            reason = None
            if rel is None:
                reason = "its path escapes the archive folder (absolute or '..')"
            elif stat.S_ISLNK(mode):
                reason = "it is a symbolic link"
            elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: permission bits only
                reason = "it is not a regular file"
            elif info.file_size > limits.max_member_bytes:
                raise _limit_error(source, f"a member exceeds {limits.max_member_bytes} bytes")
            if reason is not None or rel is None:
                rejected.append(_unsafe_member(msource, reason or "unsafe name"))
                continue
            got = _extract_member(
                lambda info=info: zf.open(info),
                dest, rel, info.file_size, budget, source, msource,
                f"{info.file_size}:{info.CRC:08x}",
            )  # fmt: skip
            (files if isinstance(got, InputFile) else rejected).append(got)  # type: ignore[arg-type]
    return files, rejected


def _check_tar_member_count(archive: Path, source: str, limits: ArchiveLimits) -> None:
    """Count members from headers only (nothing written) and stop at the limit.

    Tar has no central directory, so without this pass an over-limit archive would be
    extracted up to the limit before being rejected. The pass reads headers and skips data
    (a seek for plain tar; compressed tars are decompressed once more, bounded by the limit).
    """
    count = 0
    try:
        with tarfile.open(archive, mode="r:*") as tf:
            while tf.next() is not None:
                count += 1
                if count > limits.max_members:
                    raise _limit_error(source, f"more than {limits.max_members} members")
                tf.members.clear()  # keep memory flat on huge archives
    except _MEMBER_ERRORS:
        return  # corrupt/cut archives are handled (and reported) by the extraction pass


def _extract_tar(archive: Path, dest: Path, source: str, limits: ArchiveLimits):
    files: list[InputFile] = []
    rejected: list[Rejected] = []
    budget = _Budget(source, limits, archive.stat().st_size)
    _check_tar_member_count(archive, source, limits)
    count = 0
    with tarfile.open(archive, mode="r:*") as tf:
        while True:
            try:
                member = tf.next()
            except _MEMBER_ERRORS as exc:
                if count == 0:
                    raise
                rejected.append(
                    Rejected(
                        source,
                        Code.UNREADABLE.value,
                        f"{source}: the archive is cut short or corrupt after {count} members "
                        f"({type(exc).__name__}); the members before were used, re-copy it",
                    )
                )
                break
            if member is None:
                break
            count += 1
            if count > limits.max_members:
                raise _limit_error(source, f"more than {limits.max_members} members")
            msource = f"{source}!{clean_source(member.name)}"
            if member.isdir():
                continue
            rel = safe_member_path(member.name)
            reason = None
            if rel is None:
                reason = "its path escapes the archive folder (absolute or '..')"
            elif member.issym() or member.islnk():
                reason = "it is a link"
            elif not member.isreg():
                reason = "it is a device, FIFO or other special file"
            elif member.size > limits.max_member_bytes:
                raise _limit_error(source, f"a member exceeds {limits.max_member_bytes} bytes")
            else:
                try:  # the stdlib's own 'data' filter as a second opinion
                    tarfile.data_filter(member, str(dest))
                except tarfile.FilterError as exc:
                    reason = f"the tar 'data' filter refused it ({type(exc).__name__})"
            if reason is not None or rel is None:
                rejected.append(_unsafe_member(msource, reason or "unsafe name"))
                continue
            got = _extract_member(
                lambda member=member: tf.extractfile(member),
                dest, rel, member.size, budget, source, msource,
                f"{member.size}:{int(member.mtime)}",
            )  # fmt: skip
            (files if isinstance(got, InputFile) else rejected).append(got)  # type: ignore[arg-type]
    return files, rejected


# per-member failures: encrypted, unsupported compression, corrupt or truncated data, name
# clashes on disk. They reject the member (and, for a tar stream, the rest of the archive).
# zipfile.BadZipFile is not among them: a member whose data disagrees with its header
# (size/CRC) means the headers lie, and the whole archive is rejected.
_MEMBER_ERRORS = (
    OSError,
    EOFError,
    RuntimeError,
    NotImplementedError,
    tarfile.TarError,
    zlib.error,
)


def _extract_member(
    open_member: Callable[[], Any],
    dest: Path,
    rel: PurePosixPath,
    declared: int,
    budget: _Budget,
    source: str,
    msource: str,
    fingerprint: str,
) -> InputFile | Rejected:
    """Stream one member to ``dest/rel``; limits raise, read failures reject the member."""
    out = None
    try:
        out = _target(dest, rel, source)
        if out.exists():
            return _unsafe_member(msource, "it duplicates an earlier member name")
        fh = open_member()
        if fh is None:
            return _unsafe_member(msource, "it has no data")
        with fh:
            size = _copy_limited(fh, out, declared, budget, source)
    except ArchiveError:
        if out is not None:
            with contextlib.suppress(OSError):
                out.unlink()
        raise
    except _MEMBER_ERRORS as exc:
        if out is not None and out.is_file():
            with contextlib.suppress(OSError):
                out.unlink()
        return Rejected(
            msource,
            Code.UNREADABLE.value,
            f"{msource}: archive member cannot be read ({type(exc).__name__}: encrypted, "
            "unsupported compression, corrupt or cut short); re-create the archive",
        )
    return InputFile(out, msource, size, fingerprint)


def _unsafe_member(msource: str, reason: str) -> Rejected:
    return Rejected(
        msource,
        Code.ARCHIVE_UNSAFE.value,
        f"archive member not extracted: {reason}; nothing was written for it",
    )
