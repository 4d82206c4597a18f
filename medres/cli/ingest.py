"""`medres ingest`: DICOM/NIfTI sources -> dataset folder (options, summary table).

Imports: typer, rich, :mod:`medres.cli.console`; ``medres.ingest`` lazily inside the command
(numpy's OpenBLAS limited to one thread first: :func:`_one_blas_thread`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medres.cli.console import out_console


def ingest_cmd(
    sources: Annotated[
        list[str],
        typer.Argument(help="Folders, files, .zip/.tar/.tar.gz archives or PACS URLs."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset output folder.")],
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="CSV with one key column (patient_id|study_uid|series_uid|accession|path), "
            "a label column (or label_<name> columns) and an optional split column.",
        ),
    ] = None,
    label_key: Annotated[
        str | None,
        typer.Option("--label-key", help="Key column of --labels when it has several."),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", "-j", help="Worker processes (0 = one per idle core).")
    ] = 0,
    val_frac: Annotated[
        float, typer.Option("--val-frac", help="Fraction of patients for validation.")
    ] = 0.15,
    test_frac: Annotated[
        float, typer.Option("--test-frac", help="Fraction of patients for test.")
    ] = 0.15,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the patient split.")] = 0,
    min_slices: Annotated[
        int, typer.Option("--min-slices", help="Reject 3D stacks with fewer slices.")
    ] = 3,
    compress: Annotated[
        bool,
        typer.Option(
            "--compress/--no-compress",
            help="Write .nii.gz (smaller, ~5x slower to write) instead of .nii.",
        ),
    ] = False,
    file_timeout: Annotated[
        float, typer.Option("--file-timeout", help="Seconds allowed per file/stack.")
    ] = 120.0,
    worker_memory_mb: Annotated[
        int | None,
        typer.Option("--worker-memory-mb", help="Address-space limit per worker (MiB)."),
    ] = None,
    incremental: Annotated[
        bool,
        typer.Option(
            "--incremental/--no-incremental", help="Reuse images whose inputs did not change."
        ),
    ] = True,
    max_archive_members: Annotated[
        int, typer.Option("--max-archive-members", help="Most members one archive may hold.")
    ] = 200_000,
    max_archive_gb: Annotated[
        float, typer.Option("--max-archive-gb", help="Most GiB one archive may expand to.")
    ] = 64.0,
    max_archive_ratio: Annotated[
        float,
        typer.Option("--max-archive-ratio", help="Highest compression ratio (bomb guard)."),
    ] = 200.0,
    source_paths: Annotated[
        str,
        typer.Option(
            "--source-paths",
            help="How input paths are written in manifest/errors: identity (default: folder "
            "and file names holding a patient name/ID/UID become ~pseudonyms), all (every "
            "component pseudonymised), keep (as they are; de-identified data only).",
        ),
    ] = "identity",
    uneven_spacing: Annotated[
        str,
        typer.Option(
            "--uneven-spacing",
            help="Slices not evenly spaced (or missing): resample (default: onto a regular "
            "grid at the smallest gap, linear, with a warning) or reject (missing_slices / "
            "inconsistent_geometry).",
        ),
    ] = "resample",
    query: Annotated[
        list[str] | None,
        typer.Option("--query", help="PACS SOURCE: a filter KEYWORD=VALUE (repeatable)."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="PACS SOURCE: at most N studies.")] = 0,
) -> None:
    """Turn DICOM/NIfTI folders and archives into validated volumes plus a manifest."""
    _one_blas_thread()  # before numpy's first import
    import shutil

    from medres.cli.identity import learn_identity
    from medres.ingest.discover import ArchiveLimits
    from medres.ingest.pacs import build_query, local_sources
    from medres.ingest.pipeline import IngestConfig, run_ingest

    learn_identity(out)  # a rerun's early errors are filtered too
    scratch = out / ".pacs-retrieve"  # PACS SOURCEs are retrieved here, removed after
    paths = local_sources(sources, scratch, build_query(query or [], limit=limit))
    config = IngestConfig(
        sources=paths,
        out_dir=out,
        labels=labels,
        label_key=label_key,
        workers=workers,
        val_frac=val_frac,
        test_frac=test_frac,
        seed=seed,
        min_slices=min_slices,
        compress=compress,
        file_timeout_s=file_timeout,
        worker_memory_mb=worker_memory_mb,
        incremental=incremental,
        source_paths=source_paths,
        uneven_spacing=uneven_spacing,
        limits=ArchiveLimits(
            max_members=max_archive_members,
            max_total_bytes=int(max_archive_gb * 1024**3),
            max_ratio=max_archive_ratio,
        ),
    )
    try:
        report = run_ingest(config)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _print_ingest_summary(report)


def _one_blas_thread() -> None:
    """Ingest does no linear algebra worth BLAS threads, while OpenBLAS starts a thread per
    core when numpy is first imported (measured on 2 busy cores: numpy's import 135 -> 80 ms,
    the whole ``medres ingest`` of a 150-file CT 0.44 -> 0.36 s). One thread, unless the user
    set ``OPENBLAS_NUM_THREADS``; no effect once numpy is loaded (tests, ``medres demo``)."""
    import os
    import sys

    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _print_ingest_summary(report: Any) -> None:
    from rich.table import Table

    from medres.phi import filter_message

    table = Table(title=filter_message(f"medres ingest -> {report.out_dir}"), show_header=True)
    table.add_column("")
    table.add_column("count", justify="right")
    for modality, n in report.images_by_modality.items():
        table.add_row(f"images {modality}", str(n))
    for code, n in report.rejections_by_code.items():
        table.add_row(f"not used: {code}", str(n))
    f = report.files
    table.add_row(
        "files seen / used / rejected / skipped",
        f"{f['seen']} / {f['used']} / {f['rejected']} / {f['skipped']}",
    )
    if f.get("cached"):
        table.add_row("files unchanged (cached images)", str(f["cached"]))
    table.add_row("splits", " ".join(f"{k}={v}" for k, v in sorted(report.splits.items())))
    if report.label_columns:
        table.add_row("unmatched label rows", str(report.unmatched_labels))
        table.add_row("unlabelled images", str(report.unlabelled_images))
    table.add_row("time", f"{report.elapsed_s:.1f} s")
    out_console.print(table)
