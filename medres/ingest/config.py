"""What one ingest run is asked to do (:class:`IngestConfig`) and what it reports
(:class:`IngestReport`), the checks on a config made before any heavy work, and the names
of the dataset folder's layout. Imports: core, ``ingest.discover``, ``ingest.labels``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medres.errors import ConfigError
from medres.ingest.discover import ArchiveLimits
from medres.ingest.labels import check_fractions
from medres.phi import SOURCE_PATH_MODES

UNEVEN_MODES = ("resample", "reject")  # --uneven-spacing, GeometryPolicy.uneven_spacing

IMAGES_DIR = "images"
SCRATCH_DIR = ".medres_scratch"


@dataclass(frozen=True)
class IngestConfig:
    """Everything ``medres ingest`` needs; built once by the CLI (or by library users).

    ``workers``: worker processes (0 = one per idle core, see ``pipeline.idle_workers``;
    1 still isolates in one worker;
    ``isolate=False`` runs everything in this process, for tests and debugging).
    ``min_slices``: 3D stacks with fewer slices are rejected (``too_few_slices``).
    ``file_timeout_s``: per header/decode item; ``worker_memory_mb``: address-space limit
    per worker (``None`` = none). ``incremental``: reuse unchanged images of a previous run.
    ``source_paths``: how ``source`` paths are written (:class:`medres.phi.PathRedactor`
    mode: ``identity``, ``all`` or ``keep``). ``uneven_spacing``: ``resample`` (default:
    irregular or missing slices onto a regular grid, with a warning) or ``reject`` (the
    strict ``missing_slices`` / ``inconsistent_geometry`` rejection); see
    :mod:`medres.ingest.dicom.resample`.
    """

    sources: tuple[Path, ...]
    out_dir: Path
    labels: Path | None = None
    label_key: str | None = None
    workers: int = 0
    val_frac: float = 0.15
    test_frac: float = 0.15
    seed: int = 0
    min_slices: int = 3
    compress: bool = False
    file_timeout_s: float = 120.0
    worker_memory_mb: int | None = None
    incremental: bool = True
    isolate: bool = True
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)
    source_paths: str = "identity"
    uneven_spacing: str = "resample"


@dataclass(frozen=True)
class IngestReport:
    """What one ingest run produced; the CLI prints it as the summary table."""

    out_dir: Path
    manifest_path: Path
    errors_path: Path
    n_images: int
    images_by_modality: dict[str, int]
    rejections_by_code: dict[str, int]
    files: dict[str, int]
    splits: dict[str, int]
    label_columns: tuple[str, ...]
    unmatched_labels: int
    unlabelled_images: int
    timing: dict[str, float]
    elapsed_s: float


def check_config(config: IngestConfig) -> None:
    """Raise :class:`ConfigError` for a bad option or a missing SOURCE (naming the fix)."""
    if not config.sources:
        raise ConfigError("no SOURCE given; pass folders, files or archives to ingest")
    check_fractions(config.val_frac, config.test_frac)
    if config.source_paths not in SOURCE_PATH_MODES:
        raise ConfigError(
            f"--source-paths {config.source_paths!r} is not known; use one of "
            f"{', '.join(SOURCE_PATH_MODES)}"
        )
    if config.uneven_spacing not in UNEVEN_MODES:
        raise ConfigError(
            f"--uneven-spacing {config.uneven_spacing!r} is not known; use "
            f"{' or '.join(UNEVEN_MODES)}"
        )
    if config.workers < 0:
        raise ConfigError(f"--workers {config.workers} must be 0 (one per core) or more")
    if config.min_slices < 1:
        raise ConfigError(f"--min-slices {config.min_slices} must be at least 1")
    if config.worker_memory_mb is not None and config.worker_memory_mb < 256:
        raise ConfigError(
            f"--worker-memory-mb {config.worker_memory_mb} is too small; use at least 256 "
            "(a worker needs ~200 MiB before it reads any file)"
        )
    if config.file_timeout_s <= 0:
        raise ConfigError("--file-timeout must be positive (seconds)")
    # --out itself (a file, below a file, read-only, disk space): medres.io.check_output_dir
    for i, src in enumerate(config.sources):
        if not src.exists():
            raise ConfigError(
                f"SOURCE argument {i + 1} ({src.name!r}) does not exist; check the path"
            )
