"""Error model.

Every error a user can cause is a :class:`MedresError` subclass whose message names the
file, field or UID, the cause and the fix, on one line and without patient identity. The
CLI catches ``MedresError`` only, prints the message on stderr and exits 1.

Owns: :class:`MedresError` and one subclass per stage. Imports: nothing (the lowest module).
"""

from __future__ import annotations


class MedresError(Exception):
    """Base class for errors a user can act on. ``str(err)`` is one line."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        # keep it one line, whatever the caller passed
        super().__init__(" ".join(str(message).split()))
        if code is not None:
            self.code = code


class ConfigError(MedresError):
    """A pipeline spec, CLI option or environment setting is invalid."""

    code = "config"


class OutputDirError(ConfigError):
    """An output folder (``--out``) is a file, lies below a file, or cannot be written."""

    code = "output_dir"


class DiskFullError(MedresError, OSError):
    """The disk (or quota) of an output folder is full; earlier outputs are left intact.

    Also an ``OSError`` with ``errno`` ENOSPC, so library callers that handle a full disk
    as an ``OSError`` keep working.
    """

    code = "disk_full"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.errno = 28  # ENOSPC (errno.ENOSPC on every platform medres runs on)


class ManifestError(MedresError):
    """A manifest or labels file is missing, malformed or inconsistent."""

    code = "manifest"


class IngestError(MedresError):
    """One input could not be turned into an image; ``code`` is a stable errors.csv code."""

    code = "ingest"


class ArchiveError(IngestError):
    """An archive is unsafe (path escape, bomb, too many members) or unreadable."""

    code = "archive_unsafe"


class WeightsError(MedresError):
    """Pretrained weights are missing, corrupted, unsafe or do not fit the model."""

    code = "weights"


class ModelError(MedresError):
    """A model name, model directory or architecture option is invalid."""

    code = "model"


class TrainError(MedresError):
    """Training cannot start or continue (leakage, empty split, bad resume state)."""

    code = "train"


class EvaluationError(MedresError):
    """Predictions cannot be evaluated (missing columns, one class only, ...)."""

    code = "evaluate"


class ScoringError(MedresError):
    """Scoring cannot start or continue (model dir, ledger, sources)."""

    code = "score"
