"""Small shared helpers: atomic writes, hashing, output-folder locks, size options.

Owns: :func:`atomic_open` (and the text/JSON writers on it), :func:`sha256_file`,
:func:`output_lock` and :func:`parse_size` (the one ``"N,N,N"`` / ``"NxNxN"`` rule of CLI
size options). Core module: imports the standard library and ``medres.errors`` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from medres.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on success fsync it and ``os.replace`` it into place.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


LOCK_NAME = ".medres_lock"


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike[str], command: str = "ingest") -> Iterator[None]:
    """One ``medres <command>`` at a time per output folder (``.medres_lock`` holds its pid).

    A lock whose owner is gone (no such pid) is stale and taken over; a live owner raises
    :class:`~medres.errors.ConfigError`. The lock file is removed on exit.
    """
    out = Path(out_dir)
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
