"""The files an ingest run writes besides its images: ``manifest.csv`` (rows from image
records, labels and splits; ``source`` redacted), ``errors.csv``, ``ingest.json``, and the
pruning of images a previous run wrote that are no longer in the manifest. Every write is
atomic. Imports: core, ``medres.dataset.manifest``, ``ingest.config``, ``ingest.labels``,
``ingest.records``.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from medres import __version__
from medres.dataset.manifest import write_manifest
from medres.ingest.config import IMAGES_DIR, IngestConfig, IngestReport
from medres.ingest.labels import LabelTable
from medres.ingest.records import ImageRecord
from medres.io import atomic_open, atomic_write_json, csv_dict_writer
from medres.phi import KEY_FILE, PathRedactor

ERRORS_NAME = "errors.csv"
INGEST_JSON = "ingest.json"


def manifest_rows(
    records: Sequence[ImageRecord],
    labels: Sequence[dict[str, str]],
    splits: Sequence[str],
    redactor: PathRedactor,
) -> list[dict[str, str]]:
    """One manifest row per record: its fields, ``source`` redacted, labels and split."""
    rows = []
    for rec, lab, sp in zip(records, labels, splits, strict=True):
        row = rec.manifest_row()
        row["source"] = redactor.redact(row["source"])
        row.update(lab)
        row["split"] = sp
        rows.append(row)
    return rows


def write_outputs(
    out: Path,
    manifest_path: Path,
    rows: list[dict[str, str]],
    label_columns: Sequence[str],
    error_rows: list[dict[str, str]],
) -> None:
    """Write manifest.csv (always, header only when empty, so a stale one never survives),
    errors.csv, and remove images no row points to."""
    write_manifest(manifest_path, rows, label_columns)
    write_errors(out / ERRORS_NAME, error_rows)
    prune_images(out, {r["image_path"] for r in rows})


def write_errors(path: Path, rows: list[dict[str, str]]) -> None:
    """``errors.csv``: one (source, code, message) row per file not used."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv_dict_writer(fh, ["source", "code", "message"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def prune_images(out: Path, keep: set[str]) -> None:
    """Remove images a previous run wrote that are no longer in the manifest (a 4D image's
    sidecar ``img-x.json`` goes with its image)."""
    from medres.ingest.nifti import sidecar_path

    images = out / IMAGES_DIR
    if not images.is_dir():
        return
    keep = keep | {f"{IMAGES_DIR}/{sidecar_path(Path(k)).name}" for k in keep}
    for p in images.iterdir():
        rel = f"{IMAGES_DIR}/{p.name}"
        if rel not in keep and (p.name.startswith("img-") or p.name.startswith(".img-")):
            with contextlib.suppress(OSError):
                p.unlink()


def _versions() -> dict[str, str]:
    """Versions of medres, Python and the readers, from the installed metadata: a reader the
    run did not need (pydicom, nibabel: ~0.5 s) is not imported just to name its version."""
    from importlib import metadata

    out = {"medres": __version__, "python": platform.python_version()}
    for mod in ("pydicom", "nibabel", "numpy"):
        m = sys.modules.get(mod)
        version = getattr(m, "__version__", "") if m is not None else ""
        if not version:
            with contextlib.suppress(Exception):
                version = metadata.version(mod)
        out[mod] = version
    return out


def _settings(
    config: IngestConfig, workers: int, table: LabelTable | None, redactor: PathRedactor
) -> dict[str, object]:
    """The run's settings as recorded (SOURCE arguments by redacted base name only)."""
    return {
        "sources": [redactor.redact(p.name or str(p)) for p in config.sources],
        "source_paths": config.source_paths,
        "labels": config.labels.name if config.labels else None,
        "label_key": table.key_column if table is not None else None,
        "workers": workers,
        "val_frac": config.val_frac,
        "test_frac": config.test_frac,
        "seed": config.seed,
        "min_slices": config.min_slices,
        "uneven_spacing": config.uneven_spacing,
        "compress": config.compress,
        "file_timeout_s": config.file_timeout_s,
        "worker_memory_mb": config.worker_memory_mb,
        "incremental": config.incremental,
        "isolate": config.isolate,
        "limits": asdict(config.limits),
    }


def write_ingest_json(
    path: Path,
    config: IngestConfig,
    report: IngestReport,
    workers: int,
    table: LabelTable | None,
    redactor: PathRedactor,
) -> None:
    """``ingest.json``: versions, settings, timing, file counts and the summary of a run."""
    atomic_write_json(
        path,
        {
            "format": "medres-ingest/1",
            "versions": _versions(),
            "settings": _settings(config, workers, table, redactor),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "timing": report.timing,
            "files": report.files,
            "images": report.n_images,
            "images_by_modality": report.images_by_modality,
            "rejections_by_code": report.rejections_by_code,
            "splits": report.splits,
            "label_columns": list(report.label_columns),
            "labels": None
            if table is None
            else {
                "key_column": table.key_column,
                "rows": table.n_rows,
                "unmatched_rows": report.unmatched_labels,
                "unlabelled_images": report.unlabelled_images,
            },
            "key_file": KEY_FILE,
        },
    )
