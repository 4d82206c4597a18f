"""The ``medres`` command line: thin wrappers that parse options and call one library function.

Exit codes: 0 success; 1 user error (one line on stderr, no traceback; ``--verbose`` shows
it); 2 usage error.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from medres import __version__, progress
from medres.errors import MedresError

log = logging.getLogger("medres")
err_console = Console(stderr=True)
out_console = Console()

_STATE: dict[str, Any] = {"verbose": False}


class _MedresGroup(TyperGroup):
    """Turns :class:`MedresError` into one line on stderr and exit code 1."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MedresError as exc:
            if _STATE["verbose"]:
                traceback.print_exc()
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_MedresGroup,
    name="medres",
    help="Medical-imaging deep learning: ingest DICOM/NIfTI, train 2D/3D ResNets, "
    "evaluate with confidence intervals, score archives resumably.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"medres {__version__}")
        raise typer.Exit()


def _setup_logging(verbose: bool, quiet: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("medres")
    root.handlers.clear()
    handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # third-party chatter stays quiet unless asked for
    for name in ("monai", "pydicom", "nibabel", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.CRITICAL)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging and full tracebacks.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
) -> None:
    _STATE["verbose"] = verbose
    _setup_logging(verbose, quiet)
    if not quiet:
        progress.enable(err_console)


# --- synth -------------------------------------------------------------------------------
@app.command("synth")
def synth_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    kind: Annotated[
        str,
        typer.Option(
            help="What to write: ct, mr (3D DICOM series), xray (DX/CR), us (ultrasound, RGB), "
            "sc (secondary capture, RGB), nifti (3D .nii.gz)."
        ),
    ] = "ct",
    patients: Annotated[int, typer.Option(help="Number of patients.")] = 20,
    studies_per_patient: Annotated[
        int, typer.Option(help="Studies per patient (the label is per patient).")
    ] = 1,
    prevalence: Annotated[float, typer.Option(help="Fraction of patients with the finding.")] = 0.5,
    shape: Annotated[
        str | None,
        typer.Option(
            help="rows,cols for 2D kinds or rows,cols,slices for 3D [default: 128,128,64 for "
            "CT/NIfTI, 128,128,48 for MR, 128,128 for 2D]."
        ),
    ] = None,
    spacing: Annotated[
        str | None,
        typer.Option(
            help="Row,col[,slice] spacing in mm [default: fits a typical field of view: "
            "350 mm CT, 300 mm MR, 400 mm radiograph]."
        ),
    ] = None,
    oblique: Annotated[
        float, typer.Option(help="Fraction of 3D series with a tilted (oblique) orientation.")
    ] = 0.0,
    difficulty: Annotated[
        float,
        typer.Option(help="0..1; higher = fainter lesion, more noise, anatomy and distractors."),
    ] = 0.5,
    lesion_contrast: Annotated[
        float,
        typer.Option(
            help="Multiplier of the nominal lesion contrast (CT 100 HU); negative = darker."
        ),
    ] = 1.0,
    lesion_radius: Annotated[
        str | None,
        typer.Option(help="min,max lesion radius in mm [default: 5-9% of the field of view]."),
    ] = None,
    classes: Annotated[
        int, typer.Option(help="2 = binary (lesion present); k>2: class c carries c lesions.")
    ] = 2,
    monochrome1_fraction: Annotated[
        float, typer.Option(help="Fraction of radiographs stored MONOCHROME1 (inverted).")
    ] = 0.3,
    compression: Annotated[
        str | None,
        typer.Option(help="Lossless transfer syntax: rle, jpegls or jpeg2000 [default: none]."),
    ] = None,
    multiframe: Annotated[
        bool,
        typer.Option(
            help="Enhanced multi-frame CT/MR (one file per series) instead of one per slice."
        ),
    ] = False,
    messy: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated defects to plant: shuffle_names, missing_slice, duplicate_slice, "
            "localizer, uneven_spacing, two_series, junk, truncated, no_preamble."
        ),
    ] = None,
    archive: Annotated[
        str | None, typer.Option(help="Also pack the data folder as zip, tar or tar.gz.")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Random seed; the same seed writes identical files.")
    ] = 0,
    phi_canary: Annotated[
        bool,
        typer.Option(
            help="Write canary PHI (PatientName/ID, BirthDate, Accession, Institution containing "
            "PHICANARY) into every file, for PHI-leak tests."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a previous synth output in --out.")
    ] = False,
) -> None:
    """Write a synthetic DICOM/NIfTI study set with a learnable finding and labels.csv."""
    from medres.synth import SynthSpec, generate, parse_names, parse_tuple

    spec = SynthSpec(
        kind=kind,
        n_patients=patients,
        studies_per_patient=studies_per_patient,
        prevalence=prevalence,
        shape=parse_tuple(shape, int, "--shape"),
        spacing=parse_tuple(spacing, float, "--spacing"),
        oblique=oblique,
        lesion_contrast=lesion_contrast,
        lesion_radius_mm=parse_tuple(lesion_radius, float, "--lesion-radius"),  # type: ignore[arg-type]
        difficulty=difficulty,
        n_classes=classes,
        monochrome1_fraction=monochrome1_fraction,
        compression=compression,
        multiframe=multiframe,
        messy=parse_names(messy),
        archive=archive,
        seed=seed,
        phi_canary=phi_canary,
    )
    res = generate(spec, out, overwrite=overwrite)
    n_pos = sum(1 for r in res.truth if r.label > 0)
    out_console.print(
        f"synth: {len(res.truth)} {kind} series ({n_pos} with the finding), {res.n_files} files "
        f"in {res.seconds:.1f} s -> {res.data_dir}"
    )
    out_console.print(f"labels: {res.labels_csv}   truth: {res.truth_csv}")
    if res.archive is not None:
        out_console.print(f"archive: {res.archive}")


# --- ingest ------------------------------------------------------------------------------
@app.command("ingest")
def ingest_cmd(
    sources: Annotated[
        list[Path], typer.Argument(help="Folders, files or .zip/.tar/.tar.gz archives.")
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
        int, typer.Option("--workers", "-j", help="Worker processes (0 = one per core).")
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
) -> None:
    """Turn DICOM/NIfTI folders and archives into validated volumes plus a manifest."""
    from medres.ingest.discover import ArchiveLimits
    from medres.ingest.pipeline import IngestConfig, run_ingest

    config = IngestConfig(
        sources=tuple(sources),
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
        limits=ArchiveLimits(
            max_members=max_archive_members,
            max_total_bytes=int(max_archive_gb * 1024**3),
            max_ratio=max_archive_ratio,
        ),
    )
    report = run_ingest(config)
    _print_ingest_summary(report)


def _print_ingest_summary(report: Any) -> None:
    from rich.table import Table

    table = Table(title=f"medres ingest -> {report.out_dir}", show_header=True)
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


# --- models ------------------------------------------------------------------------------
@app.command("models")
def models_cmd(
    dims: Annotated[
        int | None, typer.Option("--dims", help="Only 2D (2) or 3D (3) models.")
    ] = None,
    files: Annotated[
        bool,
        typer.Option(
            "--files",
            help="List the pretrained weight files instead: URL, cache path and the "
            "MEDRES_WEIGHTS_URL_<KEY> override (for offline/air-gapped sites).",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the rows as JSON on stdout.")
    ] = False,
) -> None:
    """List the model architectures, their sizes, cost and available weights."""
    import json

    from rich.table import Table

    from medres.models.catalog import model_table, weight_files_table

    rows = weight_files_table() if files else model_table(dims)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if files:
        from medres.models.weights import cache_dir

        table = Table(title=f"weight files (offline: put them in {cache_dir()})")
        for col in ("arch", "source", "file", "url", "cached"):
            table.add_column(col, overflow="fold")
        for r in rows:
            cached = "yes" if r["cached"] else "no"
            table.add_row(r["arch"], r["source"], r["file"], r["url"], cached)
        out_console.print(table)
        return
    table = Table(title="medres models (GFLOPs per image: 2D at 3x224^2, 3D at 1x128^3)")
    for col, justify in (
        ("name", "left"),
        ("dims", "right"),
        ("params", "right"),
        ("GFLOPs", "right"),
        ("weights", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(
            r["name"],
            f"{r['dims']}D",
            f"{r['params'] / 1e6:.1f}M",
            f"{r['gflops']:.1f}",
            ", ".join(r["weights"]),
        )
    out_console.print(table)


# --- train -------------------------------------------------------------------------------
@app.command("train")
def train_cmd(
    pipeline: Annotated[
        Path | None, typer.Argument(help="Pipeline YAML (optional; see pipelines/README.md).")
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option("--manifest", "-m", help="DIR/manifest.csv written by ingest.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory to write.")] = None,
    arch: Annotated[
        str | None, typer.Option("--arch", help="resnet18|resnet34|resnet50|resnet101|resnet152.")
    ] = None,
    dims: Annotated[
        int | None, typer.Option("--dims", help="2 or 3 (default: the manifest's).")
    ] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", help="imagenet|none|medicalnet|PATH.")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Number of epochs.")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Samples per step per process.")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    image_size: Annotated[
        str | None, typer.Option("--image-size", help="N, or N,N[,N] per spatial axis.")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto|cpu|cuda.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from RUN_DIR/checkpoints/last.pt.")
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override any pipeline field: section.field=value (repeatable)."
        ),
    ] = None,
) -> None:
    """Train a 2D/3D ResNet on an ingested manifest."""
    from medres.errors import ConfigError
    from medres.train.run import build_spec, run_train
    from medres.train.spec import parse_set_options

    overrides = parse_set_options(set_)
    flags = {
        "data.manifest": str(manifest) if manifest else None,
        "model.arch": arch,
        "model.dims": dims,
        "model.weights": weights,
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "train.lr": lr,
        "transforms.image_size": image_size,
        "train.device": device,
        "train.seed": seed,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if out is None:
        raise ConfigError("--out is required: the run directory to write (e.g. --out runs/r1)")
    spec = build_spec(pipeline, overrides)
    result = run_train(spec, out, resume=resume)
    if result.rank == 0:
        out_console.print(
            f"run {result.run_dir}: best epoch {result.best_epoch}/{result.epochs_completed}, "
            f"val AUC {result.val_auc:.4f}, test AUC {result.test_auc:.4f}, "
            f"{result.seconds:.0f}s"
        )


# --- evaluate ----------------------------------------------------------------------------
@app.command("evaluate")
def evaluate_cmd(
    target: Annotated[Path, typer.Argument(help="A run dir or a predictions CSV.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder for metrics.json and report.html.")
    ],
    split: Annotated[
        str, typer.Option("--split", help="Run dir only: evaluate predictions_{split}.csv.")
    ] = "test",
    label: Annotated[
        str | None, typer.Option("--label", help="CSV only: the column holding the true class.")
    ] = None,
    positive: Annotated[
        str | None,
        typer.Option("--positive", help="The positive class value (0/1 and false/true inferred)."),
    ] = None,
    score: Annotated[
        list[str] | None,
        typer.Option(
            "--score", help="CSV only: a score column (model or reader rating); repeat to compare."
        ),
    ] = None,
    by: Annotated[
        list[str] | None,
        typer.Option("--by", help="Subgroup column (manufacturer, sex, site, ...); repeatable."),
    ] = None,
    n_boot: Annotated[
        int, typer.Option("--n-boot", help="Stratified bootstrap replicates (0 turns it off).")
    ] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", help="Extra operating point for probability scores."),
    ] = None,
    ci_level: Annotated[float, typer.Option("--ci-level", help="Confidence level.")] = 0.95,
    ci_transform: Annotated[
        str, typer.Option("--ci-transform", help="DeLong CI scale: none (as pROC) or logit.")
    ] = "none",
    ece_bins: Annotated[int, typer.Option("--ece-bins", help="Equal-width ECE bins.")] = 10,
    drop_missing: Annotated[
        bool,
        typer.Option("--drop-missing", help="Drop rows with an empty/NaN label or score."),
    ] = False,
) -> None:
    """ROC/AUC with confidence intervals, operating points, calibration and an HTML report."""
    from medres.evaluate.evaluate import EvaluateConfig, run_evaluate

    result = run_evaluate(
        EvaluateConfig(
            target=target,
            out=out,
            split=split,
            label=label,
            positive=positive,
            scores=tuple(score or ()),
            by=tuple(by or ()),
            n_boot=n_boot,
            seed=seed,
            threshold=threshold,
            ci_level=ci_level,
            ci_transform=ci_transform,
            ece_bins=ece_bins,
            drop_missing=drop_missing,
        )
    )
    _print_evaluation(result.metrics)
    out_console.print(f"wrote {result.metrics_path} and {result.report_path}", markup=False)


def _print_evaluation(m: dict[str, Any]) -> None:
    """A table of AUCs with their CIs (per score column, or per class / label)."""
    from rich.table import Table
    from rich.text import Text

    def ci(v: Any) -> str:
        return f"[{v[0]:.3f}, {v[1]:.3f}]" if v else "-"

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    rows = m.get("models") or m.get("per_class") or m.get("per_label") or {}
    kind = "score" if m.get("task") == "binary" else "class"
    table = Table(title=f"{m.get('task')} evaluation, n = {m.get('n')}")
    for col in (kind, "AUC", "DeLong CI", "bootstrap CI"):
        table.add_column(col, justify="left" if col == kind else "right")
    for name, v in rows.items():
        cells = (num(v.get("auc")), ci(v.get("auc_ci")), ci(v.get("auc_ci_bootstrap")))
        table.add_row(Text(str(name)), *cells)
    if "macro_auc" in m:
        table.add_row("macro", num(m["macro_auc"]), "-", ci(m.get("macro_auc_ci_bootstrap")))
    out_console.print(table)
    for c in m.get("comparisons", []):
        p = "-" if c["p_value"] is None else f"{c['p_value']:.4g}"
        out_console.print(
            f"{c['a']} vs {c['b']}: AUC difference {c['auc_diff']:+.3f} "
            f"CI {ci(c['diff_ci'])}, paired DeLong p = {p}",
            markup=False,
            soft_wrap=True,
        )


# --- score -------------------------------------------------------------------------------
@app.command("score")
def score_cmd(
    model_dir: Annotated[
        Path, typer.Argument(help="Model dir written by `medres train` (RUN_DIR/model or RUN_DIR).")
    ],
    sources: Annotated[
        list[Path],
        typer.Argument(help="Folders, files, .zip/.tar archives, or one manifest.csv."),
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
    from medres.score import ScoreConfig, score

    summary = score(
        ScoreConfig(
            model_dir=model_dir,
            sources=tuple(sources),
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
        )
    )
    i, n = summary.shard
    shard_note = f", {summary.skipped_shard} in other shards ({i}/{n})" if n > 1 else ""
    out_console.print(
        f"scored {summary.scored}, rejected {summary.errors}, skipped {summary.skipped_done} "
        f"already done{shard_note} in {summary.seconds:.1f} s ({summary.items_per_s:.1f} img/s, "
        f"{summary.precision}); ledger: {summary.total_ok} ok, {summary.total_errors} errors "
        f"-> {summary.outputs.get('scores', out / 'scores.csv')}"
    )


# --- score-merge -------------------------------------------------------------------------
@app.command("score-merge")
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


# --- demo --------------------------------------------------------------------------------
@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Demo output folder.")] = Path(
        "medres-demo"
    ),
    dims: Annotated[
        int, typer.Option("--dims", help="2: DICOM radiographs (fast); 3: CT volumes (slower).")
    ] = 2,
    patients: Annotated[
        int, typer.Option("--patients", help="Training-set patients (0: 400 in 2D, 160 in 3D).")
    ] = 0,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs (0: 15 in 2D, 12 in 3D).")] = 0,
    image_size: Annotated[
        int, typer.Option("--image-size", help="Model input size per axis (0: 64 in 2D, 32 in 3D).")
    ] = 0,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random seed for data and training.")] = 0,
    workers: Annotated[
        int, typer.Option("--workers", help="Ingest worker processes (0: one per core).")
    ] = 0,
) -> None:
    """Synthesize a study set, ingest, train, evaluate and score it end to end."""
    from rich.table import Table

    from medres.demo import DemoConfig, run_demo

    res = run_demo(
        DemoConfig(
            out=out,
            dims=dims,
            patients=patients,
            epochs=epochs,
            image_size=image_size,
            device=device,
            seed=seed,
            workers=workers,
        )
    )
    table = Table(title=f"medres demo ({dims}D) in {sum(res.timings.values()):.0f} s")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    auc = "n/a"
    if res.auc is not None:
        auc = f"test AUC {res.auc:.3f}"
        if res.auc_ci:
            auc += f" (95% CI {res.auc_ci[0]:.3f}-{res.auc_ci[1]:.3f}, n={res.n_test})"
    rows = {
        "synth": "training set + held-out zip archive",
        "ingest": f"{res.n_images} images",
        "train": f"best val AUC {res.val_auc:.3f}" if res.val_auc is not None else "",
        "evaluate": auc,
        "score": f"{res.n_scored} scored, {res.n_score_errors} rejected",
    }
    for stage, seconds in res.timings.items():
        table.add_row(stage, f"{seconds:.1f}", rows.get(stage, ""))
    out_console.print(table)
    out_console.print(f"report:  {res.report}")
    out_console.print(f"metrics: {res.metrics}")
    out_console.print(f"scores:  {res.scores}")


# --- export ------------------------------------------------------------------------------
@app.command("export")
def export_cmd(
    manifest: Annotated[
        Path, typer.Argument(help="manifest.csv written by `medres ingest` (or its folder).")
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="monai-datalist (Decathlon-style JSON for load_decathlon_datalist) or "
            "nnunet (nnU-Net v2 raw dataset, imaging side only).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="monai-datalist: a .json file (a folder gets datalist.json); "
            "nnunet: the dataset folder, named DatasetNNN_Name.",
        ),
    ],
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes",
            help="Comma-separated class order for label indices (default: numeric or "
            "alphabetical order of the labels).",
        ),
    ] = None,
    absolute_paths: Annotated[
        bool,
        typer.Option(
            "--absolute-paths",
            help="monai-datalist: absolute image paths (default: relative to the JSON).",
        ),
    ] = False,
    link: Annotated[
        str,
        typer.Option(
            "--link",
            help="nnunet: copy (default), hardlink (falls back to copy) or symlink the images.",
        ),
    ] = "copy",
) -> None:
    """Export a manifest for MONAI (datalist JSON) or nnU-Net v2 (dataset.json + imagesTr/).

    nnU-Net is a segmentation tool: for classification manifests only the imaging side is
    exported and the class labels go to classification_labels.csv beside dataset.json.
    """
    from medres.dataset.export import export_dataset

    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    result = export_dataset(
        manifest, fmt, out, classes=class_list, absolute_paths=absolute_paths, link=link
    )
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    out_console.print(f"{result.format}: wrote {result.path} ({counts})", highlight=False)


# --- export-model ------------------------------------------------------------------------
@app.command("export-model")
def export_model_cmd(
    run_dir: Annotated[
        Path, typer.Argument(help="Run dir written by `medres train` (or its model/ folder).")
    ],
    fmt: Annotated[
        str,
        typer.Option("--format", "-f", help="torchscript, onnx or monai-bundle."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="torchscript/onnx: the file (a folder gets model.ts/model.onnx); "
            "monai-bundle: the bundle folder.",
        ),
    ],
    input_size: Annotated[
        str | None,
        typer.Option(
            "--input-size",
            help="Spatial input size N[,N[,N]] (default: the image size in model.json).",
        ),
    ] = None,
) -> None:
    """Export a trained model to TorchScript, ONNX (dynamic batch) or a MONAI bundle.

    The export is reloaded and its outputs compared with the PyTorch model's (to 1e-4).
    """
    from medres.errors import ConfigError
    from medres.models.export import export_model

    size = None
    if input_size:
        try:
            size = [int(s) for s in input_size.replace("x", ",").split(",") if s.strip()]
        except ValueError:
            raise ConfigError(
                f"--input-size {input_size!r} is not N[,N[,N]]; give integers, e.g. 224,224"
            ) from None
    result = export_model(run_dir, fmt, out, input_size=size)
    out_console.print(
        f"{result.format}: wrote {result.path} (input {list(result.input_shape)}, "
        f"max |diff| vs PyTorch {result.max_abs_diff:.1e})",
        highlight=False,
    )


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - interactive
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
