"""`medres score` and `medres score-merge`: resumable scoring and the merge of shards.

Imports: typer, :mod:`medres.cli.console`; ``medres.score`` lazily inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medres.cli.console import out_console


def score_cmd(
    model_dir: Annotated[
        Path, typer.Argument(help="Model dir written by `medres train` (RUN_DIR/model or RUN_DIR).")
    ],
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Folders, files, .zip/.tar archives, one manifest.csv, or one PACS URL: "
            "dicomweb+http(s)://host:port/path or dimse://AET@host:port."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (ledger + CSVs).")],
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            "-j",
            help="Decode worker processes for DICOM and compressed inputs; plain .nii is read "
            "in the main process either way (0 = everything inline).",
        ),
    ] = 2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 32,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="fp32 | bf16 | fp16 | auto (auto: fp16 AMP on CUDA, fp32 on CPU).",
        ),
    ] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N].")] = "auto",
    shard: Annotated[
        str | None,
        typer.Option("--shard", help="Score only shard I of N (0-based, e.g. 0/2); merge later."),
    ] = None,
    split: Annotated[
        str | None, typer.Option("--split", help="Manifest SOURCE only: score rows of this split.")
    ] = None,
    keep_ids: Annotated[
        bool,
        typer.Option(
            "--keep-ids",
            help="Add StudyInstanceUID/AccessionNumber to scores.csv (raw identifiers, for PACS).",
        ),
    ] = False,
    retry_errors: Annotated[
        bool, typer.Option("--retry-errors", help="Re-try items the ledger holds as errors.")
    ] = False,
    aggregate: Annotated[
        str | None,
        typer.Option("--aggregate", help="Also write scores_study.csv: max | mean over a study."),
    ] = None,
    cam: Annotated[
        int | None,
        typer.Option("--cam", help="Grad-CAM PNGs for the top K items by score (0 = all)."),
    ] = None,
    cam_class: Annotated[
        str | None,
        typer.Option("--cam-class", help="Class to rank and explain by (default: positive/top)."),
    ] = None,
    dicom_out: Annotated[
        bool,
        typer.Option(
            "--dicom-out", help="Write one DICOM Comprehensive SR per study (needs highdicom)."
        ),
    ] = False,
    prefetch: Annotated[
        int, typer.Option("--prefetch", help="Decoded chunks in flight per worker.")
    ] = 2,
    file_timeout: Annotated[
        float,
        typer.Option("--file-timeout", help="Seconds a decode worker may spend on one item."),
    ] = 120.0,
    worker_memory_mb: Annotated[
        int | None,
        typer.Option("--worker-memory-mb", help="Address-space limit per decode worker (MiB)."),
    ] = None,
    query: Annotated[
        list[str] | None,
        typer.Option(
            "--query", help="PACS SOURCE: a DICOM attribute filter KEYWORD=VALUE (repeatable)."
        ),
    ] = None,
    study_date: Annotated[
        str, typer.Option("--study-date", help="PACS SOURCE: YYYYMMDD or YYYYMMDD-YYYYMMDD.")
    ] = "",
    accessions: Annotated[
        Path | None,
        typer.Option("--accessions", help="PACS SOURCE: a file with one accession per line."),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", help="PACS SOURCE: at most N studies (0: all).")
    ] = 0,
    push: Annotated[
        bool,
        typer.Option(
            "--push", help="Store the --dicom-out SRs back on the PACS (STOW-RS / C-STORE)."
        ),
    ] = False,
    source_paths: Annotated[
        str,
        typer.Option(
            "--source-paths",
            help="How input paths are written in scores/errors: identity (default: names "
            "holding a patient name/ID/UID become ~pseudonyms), all, or keep (de-identified "
            "data only). Keep it the same when resuming.",
        ),
    ] = "identity",
) -> None:
    """Score folders/archives of scans with a trained model; re-running resumes."""
    from medres.cli.identity import learn_identity
    from medres.score import ScoreConfig, score
    from medres.score.pacs_items import split_sources

    learn_identity(model_dir, out)  # a rerun's early errors are filtered too
    paths, pacs = split_sources(
        sources, query=query, study_date=study_date, accessions=accessions, limit=limit,
        push=push, dicom_out=dicom_out,
    )  # fmt: skip
    summary = score(
        ScoreConfig(
            model_dir=model_dir,
            sources=paths,
            pacs=pacs,
            push=push,
            out_dir=out,
            batch_size=batch_size,
            workers=workers,
            prefetch=prefetch,
            precision=precision,
            device=device,
            shard=shard,
            split=split,
            keep_ids=keep_ids,
            retry_errors=retry_errors,
            aggregate=aggregate,
            cam=cam,
            cam_class=cam_class,
            dicom_out=dicom_out,
            source_paths=source_paths,
            file_timeout_s=file_timeout,
            worker_memory_mb=worker_memory_mb,
        )
    )
    _print_score_summary(summary, out)


def _print_score_summary(summary: Any, out: Path) -> None:
    i, n = summary.shard
    shard_note = f", {summary.skipped_shard} in other shards ({i}/{n})" if n > 1 else ""
    from medres.phi import filter_message

    out_console.print(
        filter_message(
            f"scored {summary.scored}, rejected {summary.errors}, skipped {summary.skipped_done} "
            f"already done{shard_note} in {summary.seconds:.1f} s ({summary.items_per_s:.1f} "
            f"img/s, {summary.precision}); ledger: {summary.total_ok} ok, "
            f"{summary.total_errors} errors -> {summary.outputs.get('scores', out / 'scores.csv')}"
        )
    )


def score_merge_cmd(
    out_dirs: Annotated[
        list[Path], typer.Argument(help="Scoring OUT_DIRs (or ledger.sqlite files) to unite.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged ledger + CSVs.")],
    keep_ids: Annotated[
        bool, typer.Option("--keep-ids", help="Keep raw StudyInstanceUID/AccessionNumber columns.")
    ] = False,
    aggregate: Annotated[
        str | None, typer.Option("--aggregate", help="Also write scores_study.csv: max | mean.")
    ] = None,
) -> None:
    """Unite the ledgers of sharded runs (conflicts abort) and export scores.csv once."""
    from medres.score import merge

    report = merge(out_dirs, out, keep_ids=keep_ids, aggregate=aggregate)
    out_console.print(
        f"merged {len(out_dirs)} ledgers: {report.inserted} new, {report.identical} identical, "
        f"{report.replaced_errors} errors replaced -> {out / 'scores.csv'}"
    )
