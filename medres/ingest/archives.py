"""Safe extraction of archives (zip, tar, nested archives, ``.dcm.gz``) into a scratch folder.

Owns the archive limits, the input records discovery returns (:class:`InputFile`,
:class:`Rejected`), the printable form of untrusted names (:func:`clean_source`) and the
extraction rules described in :mod:`medres.ingest.discover` (unsafe members, limits,
repeated and over-long names, nesting). Imports: ``medres.errors`` and ``ingest.codes``.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from medres.errors import ArchiveError
from medres.ingest.codes import Code

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_COPY_CHUNK = 1 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_DEPTH = 3  # archive levels opened: outer archive + 2 nested
_NAME_MAX = 255  # bytes per path component (ext4, xfs, apfs, ntfs)
_PATH_MAX = 3000  # bytes per scratch path, well below PATH_MAX


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


def clean_source(text: str) -> str:
    """A one-line printable, UTF-8-encodable form of an (attacker-controlled) name.

    Bytes that were not UTF-8 (surrogate escapes from the file system or a tar header)
    become backslash escapes (``caf\\xe9``); control characters become ``?``.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        raw = text.encode("utf-8", "backslashreplace")
    return _CONTROL.sub("?", raw.decode("utf-8", "backslashreplace"))


def is_archive(path: Path) -> bool:
    """Archive by name: the suffixes in :data:`ARCHIVE_SUFFIXES` (case-insensitive)."""
    name = path.name.lower()
    return any(name.endswith(s) for s in ARCHIVE_SUFFIXES)


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
    archive: Path,
    dest: Path,
    source: str,
    limits: ArchiveLimits,
    *,
    shared: _Shared | None = None,
    depth: int = 1,
) -> tuple[list[InputFile], list[Rejected]]:
    """Extract ``archive`` into ``dest`` (created) and list its files.

    Returns the extracted files (``source`` = ``<source>!<member>``, ``fingerprint`` from the
    member's size and CRC/mtime) and the members rejected one by one; nested archives and
    ``.dcm.gz`` members are opened too (``depth``: this archive's level; ``shared``: the
    totals of the outermost one). Raises :class:`ArchiveError` when a limit is exceeded or
    the archive cannot be read at all; the caller removes ``dest`` then.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shared = shared or _Shared(limits)
    try:
        if archive.name.lower().endswith(".zip"):
            return _extract_zip(archive, dest, source, shared, depth)
        return _extract_tar(archive, dest, source, shared, depth)
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


class _Shared:
    """Totals of an outermost archive and everything nested in it (one set of limits)."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.total = 0
        self.members = 0

    def count(self, source: str, n: int = 1) -> None:
        self.members += n
        if self.members > self.limits.max_members:
            raise _limit_error(source, f"more than {self.limits.max_members} members")


class _Budget:
    """Running totals of bytes written for one archive, checked while streaming."""

    def __init__(self, source: str, shared: _Shared, compressed_size: int) -> None:
        self.source = source
        self.shared = shared
        self.limits = shared.limits
        self.compressed = max(compressed_size, 1)
        self.total = 0

    def add(self, n: int) -> None:
        self.total += n
        self.shared.total += n
        if self.shared.total > self.limits.max_total_bytes:
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


def short_name(name: str) -> str:
    """A short ASCII file name that keeps ``name``'s ending (which tells ``.nii`` files)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[-100:].lstrip(".") or "member"


def _fits(dest: Path, rel: PurePosixPath) -> bool:
    """Whether ``dest/rel`` can be created as named (component and path lengths)."""
    try:
        parts = [os.fsencode(p) for p in rel.parts]
    except UnicodeEncodeError:
        return False
    return all(len(p) <= _NAME_MAX for p in parts) and (
        len(os.fsencode(str(dest))) + sum(len(p) + 1 for p in parts) <= _PATH_MAX
    )


def _target(dest: Path, rel: PurePosixPath, source: str) -> Path:
    """Where a member is written: its own path, or (a repeated name, or a name longer than
    the file system allows) a short name in a fresh folder of its own inside ``dest``."""
    out = dest.joinpath(*rel.parts)
    if not _fits(dest, rel) or out.exists() or out.is_symlink():
        return Path(tempfile.mkdtemp(prefix=".m", dir=dest)) / short_name(rel.name)
    # belt and braces: the resolved parent must stay inside dest (no link can exist there,
    # as only regular files and real directories are ever created)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a file of an earlier member holds a folder name of this one
        return Path(tempfile.mkdtemp(prefix=".m", dir=dest)) / short_name(rel.name)
    if not out.parent.resolve().is_relative_to(dest.resolve()):
        raise _limit_error(source, "a member path escapes the destination")
    return out


def _extract_zip(archive: Path, dest: Path, source: str, shared: _Shared, depth: int):
    files: list[InputFile] = []
    rejected: list[Rejected] = []
    limits = shared.limits
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if shared.members + len(infos) > limits.max_members:
            raise _limit_error(
                source, f"{len(infos)} members exceed the limit {limits.max_members}"
            )
        shared.members += len(infos)
        declared = sum(i.file_size for i in infos)
        if shared.total + declared > limits.max_total_bytes:
            raise _limit_error(source, f"{declared} bytes uncompressed exceed the limit")
        for info in infos:
            if info.file_size > max(limits.ratio_min_bytes, 1) and info.file_size > (
                limits.max_ratio * max(info.compress_size, 1)
            ):
                raise _limit_error(
                    source,
                    f"compression ratio above {limits.max_ratio:g} (possible zip bomb)",
                )
        budget = _Budget(source, shared, archive.stat().st_size)
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
            _collect(got, dest, shared, depth, files, rejected)
    return files, rejected


def _check_tar_member_count(archive: Path, source: str, shared: _Shared) -> None:
    """Count members from headers only (nothing written) and stop at the limit.

    Tar has no central directory, so without this pass an over-limit archive would be
    extracted up to the limit before being rejected. The pass reads headers and skips data
    (a seek for plain tar; compressed tars are decompressed once more, bounded by the limit).
    """
    count, limits = shared.members, shared.limits
    try:
        with tarfile.open(archive, mode="r:*") as tf:
            while tf.next() is not None:
                count += 1
                if count > limits.max_members:
                    raise _limit_error(source, f"more than {limits.max_members} members")
                tf.members.clear()  # keep memory flat on huge archives
    except _MEMBER_ERRORS:
        return  # corrupt/cut archives are handled (and reported) by the extraction pass


def _extract_tar(archive: Path, dest: Path, source: str, shared: _Shared, depth: int):
    files: list[InputFile] = []
    rejected: list[Rejected] = []
    limits = shared.limits
    budget = _Budget(source, shared, archive.stat().st_size)
    _check_tar_member_count(archive, source, shared)
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
            shared.count(source)
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
            _collect(got, dest, shared, depth, files, rejected)
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


def _collect(
    got: InputFile | Rejected,
    dest: Path,
    shared: _Shared,
    depth: int,
    files: list[InputFile],
    rejected: list[Rejected],
) -> None:
    """File an extracted member; a nested archive or a ``.dcm.gz`` member is opened first
    (a failure there rejects that member alone, with its own row)."""
    if isinstance(got, Rejected):
        rejected.append(got)
        return
    low = got.source.lower()
    if is_archive(Path(low)):
        if depth >= MAX_DEPTH:
            got.path.unlink(missing_ok=True)
            rejected.append(_unsafe_member(got.source, f"archives nested over {MAX_DEPTH} deep"))
            return
        sub = Path(tempfile.mkdtemp(prefix=".n", dir=dest))
        try:
            inner, bad = extract_archive(
                got.path, sub, got.source, shared.limits, shared=shared, depth=depth + 1
            )
        except ArchiveError as exc:
            shutil.rmtree(sub, ignore_errors=True)
            rejected.append(Rejected(got.source, exc.code, str(exc)))
            return
        finally:
            got.path.unlink(missing_ok=True)
        fp = got.fingerprint
        files.extend(InputFile(f.path, f.source, f.size, f"{fp}:{f.fingerprint}") for f in inner)
        rejected.extend(bad)
        return
    if low.endswith(".dcm.gz"):
        out = Path(tempfile.mkdtemp(prefix=".g", dir=dest)) / short_name(got.path.name[:-3])
        try:
            plain = gunzip_file(got.path, out, got.source, shared.limits, shared)
        except ArchiveError as exc:
            plain = Rejected(got.source, exc.code, str(exc))
        got.path.unlink(missing_ok=True)
        if isinstance(plain, Rejected):
            rejected.append(plain)
        else:
            files.append(InputFile(plain.path, got.source, plain.size, got.fingerprint))
        return
    files.append(got)


def gunzip_file(
    src: Path, out: Path, source: str, limits: ArchiveLimits, shared: _Shared | None = None
) -> InputFile | Rejected:
    """Decompress one gzip file to ``out`` under the limits (size, ratio, shared total).

    Unreadable gzip data gives a :class:`Rejected`; a limit raises :class:`ArchiveError`.
    """
    shared = shared or _Shared(limits)
    budget = _Budget(source, shared, src.stat().st_size)
    try:
        with gzip.open(src, "rb") as fh:
            size = _copy_limited(fh, out, limits.max_member_bytes, budget, source)
    except ArchiveError:
        out.unlink(missing_ok=True)
        raise
    except (OSError, EOFError, zlib.error) as exc:
        with contextlib.suppress(OSError):
            out.unlink(missing_ok=True)
        return Rejected(
            source,
            Code.UNREADABLE.value,
            f"{source}: the gzip data cannot be read ({type(exc).__name__}); re-copy the file",
        )
    return InputFile(out, source, size, "")
