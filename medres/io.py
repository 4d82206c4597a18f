"""Small shared helpers: atomic writes, output folders, disk space, hashing, size options.

Owns: :func:`atomic_open` (and the text/JSON writers on it; :func:`batched_fsync` lets a
run's last writes share one disk flush), :func:`sha256_file`,
:func:`output_lock` and :func:`parse_size` (the one ``"N,N,N"`` / ``"NxNxN"`` rule of CLI
size options), and the one output-folder and disk-space rule of every command that writes:

* :func:`check_output_dir` at the start: ``--out`` must not be a file, lie below a file or
  be read-only (a real probe write, so a read-only mount and a root user are both told the
  truth), and its disk must hold the space the command needs;
* :func:`disk_guard` around the writes: an ``OSError`` ENOSPC/EDQUOT (also when wrapped, as
  ``torch.save`` does) or SQLite's "database or disk is full" becomes one
  :class:`~medres.errors.DiskFullError` line naming the folder, the space free and needed.
  :func:`output_lock` holds one for its whole body. Every writer writes through a temp file
  and ``os.replace``, so a full disk leaves the previous outputs as they were and the same
  command resumes once space is freed.

And the one CSV cell rule (spreadsheet formula injection, OWASP): every CSV medres writes
goes through :func:`csv_writer` / :func:`csv_dict_writer`, which put a ``'`` before a text
cell that starts with ``= + - @``, a tab, a carriage return or ``'`` itself (so a file named
``=cmd|' /C calc'!A0.dcm`` is written ``'=cmd|...``), except a plain number (``-0.5``,
``-1e-3``, ``-inf``, ``nan``); every reader of those files (:func:`csv_reader` /
:func:`csv_dict_reader`) strips that ``'`` again, so round trips are exact.

Core module: imports the standard library and ``medres.errors`` only.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from medres.errors import ConfigError, DiskFullError, OutputDirError

# errno values that mean "no space": the disk is full, or the user's quota is
_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e)
# the errno values of a folder that cannot be written (permissions, read-only mount)
_READONLY_ERRNOS = frozenset((errno.EACCES, errno.EPERM, errno.EROFS))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on success fsync it and ``os.replace`` it into place.

    A crash at any point leaves either the old file or the new one, never a partial file.
    Inside :func:`batched_fsync` the fsync and the replace wait for the end of that block.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    batch = getattr(_BATCH, "pending", None)
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            if batch is None:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if batch is None:
            os.replace(tmp, path)
        else:
            batch.append((tmp, path))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_BATCH = threading.local()


@contextlib.contextmanager
def batched_fsync() -> Iterator[None]:
    """Let the :func:`atomic_open` writes of this thread inside the block share their fsyncs.

    Each file is written to its temp file as usual; at the end of the block (also when it
    raises) all of them are fsynced at once, in parallel (the file system commits them
    together: one disk flush instead of one per file, ~5 ms each on a VM disk), then moved
    into place in the order they were written. Every file is still replaced only after its
    data is on disk, so a crash leaves each one old or new. Code inside the block must not
    read back a file it wrote there (it is not in place yet). Nested blocks join the outer.
    """
    if getattr(_BATCH, "pending", None) is not None:
        yield
        return
    pending: list[tuple[str, Path]] = []
    _BATCH.pending = pending
    try:
        yield
    finally:
        _BATCH.pending = None
        _commit(pending)


def _fsync_path(path: str, errors: list[BaseException]) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        errors.append(exc)


def _commit(pending: list[tuple[str, Path]]) -> None:
    """fsync the temp files of ``pending`` in parallel, then replace them in order; when an
    fsync fails none is replaced; the temp files not moved into place are removed."""
    try:
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=_fsync_path, args=(tmp, errors), daemon=True)
            for tmp, _ in pending[1:]
        ]
        for t in threads:
            t.start()
        if pending:
            _fsync_path(pending[0][0], errors)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        while pending:
            tmp, path = pending[0]
            os.replace(tmp, path)
            pending.pop(0)
    finally:
        for tmp, _ in pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


LOCK_NAME = ".medres_lock"
PROBE_PREFIX = ".medres_probe."
# the least free space a command starts with: its small outputs (CSV, JSON, the lock)
MIN_FREE_BYTES = 1 << 20


# ------------------------------------------------------------------ output dirs, disk space
def is_disk_full(exc: BaseException | None) -> bool:
    """True when ``exc`` (or an exception it was raised from) means the disk is full.

    ENOSPC/EDQUOT ``OSError``; SQLite's ``database or disk is full``; and any exception whose
    ``__cause__``/``__context__`` chain holds one (``torch.save`` wraps the ``OSError`` of a
    file handle in a ``RuntimeError``).
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and "disk is full" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _size(n: int) -> str:
    """``n`` bytes as a short human size (``"1.5 GiB"``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes free to this user on the disk of ``path`` (or of its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full_error(folder: str | os.PathLike[str], need_bytes: int = 0) -> DiskFullError:
    """The one-line :class:`DiskFullError` for ``folder`` (free space read now)."""
    free = free_bytes(folder)
    need = f", about {_size(need_bytes)} needed" if need_bytes > 0 else ""
    have = "unknown space" if free is None else f"{_size(free)}"
    return DiskFullError(
        f"no space left on the disk of {str(folder)!r} ({have} free{need}); the earlier "
        "outputs there are intact: free some space (or pass another --out) and run the same "
        "command again, it resumes"
    )


@contextlib.contextmanager
def disk_guard(
    folder: str | os.PathLike[str], need_bytes: int | Callable[[], int] = 0
) -> Iterator[None]:
    """Turn a disk-full error raised inside the block into :func:`disk_full_error`.

    ``need_bytes`` may be a callable, evaluated only when the disk is full (an estimate that
    costs a walk over the inputs is paid only then). Other errors pass unchanged.
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        need = need_bytes() if callable(need_bytes) else need_bytes
        raise disk_full_error(folder, int(need or 0)) from None


def tree_bytes(paths: Any) -> int:
    """Total size of the files at or below ``paths`` (a space estimate; unreadable parts
    count 0)."""
    total = 0
    for root in paths:
        root = Path(root)
        try:
            if root.is_file():
                total += root.stat().st_size
                continue
            for dirpath, _dirs, files in os.walk(root):
                for name in files:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(dirpath, name)).st_size
        except OSError:
            continue
    return total


def largest_file(folder: str | os.PathLike[str]) -> int:
    """Size of the largest file below ``folder`` (0 when none): the room one more atomic
    rewrite of it needs."""
    best = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                best = max(best, os.lstat(os.path.join(dirpath, name)).st_size)
    return best


def _first_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _probe_write(folder: Path, option: str) -> None:
    """Create and remove a small file in ``folder``: the only true writability test."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
        try:
            os.write(fd, b"medres")
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as exc:
        if exc.errno in _FULL_ERRNOS:
            raise disk_full_error(folder) from None
        raise OutputDirError(
            f"{option} {str(folder)!r} cannot be written ({exc.strerror or exc}); choose a "
            "folder you can write to (not a read-only mount)"
        ) from None


def check_output_dir(
    path: str | os.PathLike[str], need_bytes: int = 0, *, option: str = "--out"
) -> Path:
    """Create ``path`` as an output folder and prove it can be written; returns it.

    Raises :class:`~medres.errors.OutputDirError` (one line naming ``option``) when ``path``
    is an existing file, lies below a file, or cannot be created or written (permissions, a
    read-only mount; checked with a real probe file, so it holds for root too), and
    :class:`~medres.errors.DiskFullError` when its disk has less than ``need_bytes`` free.
    """
    out = Path(path)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputDirError(
            f"{option} {str(out)!r} is a file, not a folder; pass a folder (new, or the earlier "
            "output of the same command)"
        )
    base = _first_existing(out)
    if base != out and not base.is_dir():
        raise OutputDirError(
            f"{option} {str(out)!r} lies below the file {str(base)!r}; no folder can be made "
            "there: pass a path whose parents are folders"
        )
    missing, p = [], out  # the folders this call makes, deepest first
    while p != base and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        _CREATED.extend(missing)  # removed again if the command fails leaving them empty
    except OSError as exc:
        if exc.errno in _FULL_ERRNOS:
            raise disk_full_error(base, need_bytes) from None
        raise OutputDirError(
            f"{option} {str(out)!r} cannot be created in {str(base)!r} "
            f"({exc.strerror or exc}); choose a folder you can write to"
        ) from None
    _probe_write(out, option)
    free = free_bytes(out)
    if need_bytes > 0 and free is not None and free < need_bytes:
        raise disk_full_error(out, need_bytes)
    return out


# the output folders check_output_dir made in this command (deepest first, per call)
_CREATED: list[Path] = []


def forget_created_dirs() -> None:
    """Start a command: no folder made so far is this command's to remove."""
    _CREATED.clear()


def remove_created_dirs_if_empty() -> None:
    """After a failed command: remove the output folders :func:`check_output_dir` made in
    it that are still empty (``os.rmdir`` removes only an empty folder: nothing written
    is ever lost), so a refused run leaves no empty ``--out`` behind."""
    for folder in _CREATED:
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    _CREATED.clear()


# what each command's --out holds once it ran (a file no other command writes)
_OUTPUT_MARKERS: dict[str, tuple[str, ...]] = {
    "ingest": ("ingest.json",),
    "train": ("history.csv", "checkpoints/last.pt", "model/model.json"),
    "score": ("ledger.sqlite",),
}
_OUTPUT_NAMES = {"ingest": "dataset", "train": "run", "score": "scores"}


def check_output_kind(path: str | os.PathLike[str], command: str) -> None:
    """Refuse an ``--out`` that holds another command's output (a run written into a
    dataset, a dataset into a run, scores into either): their files would mix and a later
    run of either command would read the other's. One line naming the file found."""
    out = Path(path)
    for other, markers in _OUTPUT_MARKERS.items():
        if other == command:
            continue
        for marker in markers:
            if (out / marker).is_file():
                name = _OUTPUT_NAMES.get(command, command)
                own = out.with_name(f"{out.name}-{name}") if out.name else out / name
                raise OutputDirError(
                    f"--out {str(out)!r} holds the {_OUTPUT_NAMES[other]} of `medres {other}` "
                    f"({marker}); give `medres {command}` a folder of its own (e.g. {str(own)!r})"
                )


@contextlib.contextmanager
def output_lock(
    out_dir: str | os.PathLike[str],
    command: str = "ingest",
    need_bytes: int | Callable[[], int] = 0,
) -> Iterator[None]:
    """One ``medres <command>`` at a time per output folder (``.medres_lock`` holds its pid).

    A lock whose owner is gone (no such pid) is stale and taken over; a live owner raises
    :class:`~medres.errors.ConfigError`. The lock file is removed on exit. The body runs
    under :func:`disk_guard` (a full disk becomes one line naming ``out_dir`` and
    ``need_bytes``, an estimate of the space the command needs).
    """
    out = Path(out_dir)
    check_output_kind(out, command)  # not into another command's output
    lock = out / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # stale: its owner is gone
                continue
            except PermissionError:
                pass
            raise ConfigError(
                f"another `medres {command}` (pid {pid}) is writing to --out {out.name!r}; wait "
                f"for it to finish, or delete {LOCK_NAME} there if it is gone"
            ) from None
    else:  # pragma: no cover - lost the race twice
        raise ConfigError(f"cannot lock --out {out.name!r}; retry")
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    try:
        with disk_guard(out, need_bytes):
            yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def parse_size(
    text: str | None, option: str, *, kind: type = int, example: str | None = None
) -> tuple | None:
    """Parse ``"128,128,64"`` or ``"128x128x64"`` (CLI style) into a tuple of ``kind``.

    ``None`` or blank text gives ``None``; empty items are skipped. A value that is not a
    ``kind`` raises :class:`~medres.errors.ConfigError` naming ``option`` (e.g.
    ``"--shape"``) and showing ``example`` (default ``128,128,64`` for ints, else
    ``0.8,0.8,2.5``).
    """
    if text is None or not str(text).strip():
        return None
    try:
        return tuple(kind(v.strip()) for v in str(text).replace("x", ",").split(",") if v.strip())
    except ValueError:
        example = example or ("128,128,64" if kind is int else "0.8,0.8,2.5")
        raise ConfigError(
            f"{option} {text!r} is not a list of {kind.__name__} values separated by ',' or "
            f"'x'; write it like {example}"
        ) from None


# ---------------------------------------------------------------------------------------
# CSV cells: the one spreadsheet-escaping rule of every CSV medres writes and reads
# ---------------------------------------------------------------------------------------
# a cell a spreadsheet may run as a formula starts with one of these (OWASP); "'" is the
# escape itself, so a text that starts with it is escaped too and the rule round-trips
CSV_TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "'")
# a plain number (what float() reads, without its spaces and underscores): never escaped
_NUMBER = re.compile(
    r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf|infinity|nan)", re.IGNORECASE
)


def csv_escape(value: Any) -> Any:
    """One cell as written: a text starting with a :data:`CSV_TRIGGERS` character gets a
    leading ``'`` unless it is a plain number (``-0.5``, ``-1e-3``, ``-inf``); anything
    that is not a ``str`` (numbers, ``None``) is returned as it is."""
    if isinstance(value, str) and value.startswith(CSV_TRIGGERS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_unescape(text: str) -> str:
    """Undo :func:`csv_escape`: ``csv_unescape(csv_escape(s)) == s`` for every text ``s``.

    Strips one leading ``'`` when what follows starts with a trigger character; other
    cells (a hand-written ``'note``) are left as they are.
    """
    if isinstance(text, str) and text[:1] == "'" and text[1:].startswith(CSV_TRIGGERS):
        return text[1:]
    return text


class _EscapingWriter:
    """A ``csv.writer`` whose rows pass :func:`csv_escape` cell by cell."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.dialect = inner.dialect

    def writerow(self, row: Iterable[Any]) -> Any:
        return self._inner.writerow([csv_escape(v) for v in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


class _UnescapingReader:
    """A ``csv.reader`` whose rows pass :func:`csv_unescape` cell by cell."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.dialect = inner.dialect

    @property
    def line_num(self) -> int:
        return self._inner.line_num

    def __iter__(self) -> _UnescapingReader:
        return self

    def __next__(self) -> list[str]:
        return [csv_unescape(v) for v in next(self._inner)]


def csv_writer(fh: IO[str], **kwargs: Any) -> Any:
    """``csv.writer(fh, **kwargs)`` with every cell escaped (:func:`csv_escape`)."""
    return _EscapingWriter(csv.writer(fh, **kwargs))


def csv_dict_writer(fh: IO[str], fieldnames: Sequence[str], **kwargs: Any) -> csv.DictWriter:
    """``csv.DictWriter`` with every cell, header included, escaped (:func:`csv_escape`)."""
    w = csv.DictWriter(fh, fieldnames, **kwargs)
    w.writer = _EscapingWriter(w.writer)
    return w


def csv_reader(fh: Iterable[str], **kwargs: Any) -> Any:
    """``csv.reader`` with every cell unescaped (:func:`csv_unescape`)."""
    return _UnescapingReader(csv.reader(fh, **kwargs))


def csv_dict_reader(fh: Iterable[str], **kwargs: Any) -> csv.DictReader:
    """``csv.DictReader`` with every cell, header included, unescaped (:func:`csv_unescape`)."""
    r = csv.DictReader(fh, **kwargs)
    r.reader = _UnescapingReader(r.reader)
    return r
