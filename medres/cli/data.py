"""`medres synth`, `medres export` and `medres demo`: synthetic study sets, manifest
exports and the end-to-end demo.

Imports: typer, rich, :mod:`medres.cli.console`, :func:`medres.io.parse_size`;
``medres.synth``, ``medres.dataset`` and ``medres.demo`` lazily inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medres.cli.console import out_console, say
from medres.cli.identity import learn_identity
from medres.io import parse_size


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
    from medres.synth import SynthSpec, generate, parse_names

    spec = SynthSpec(
        kind=kind,
        n_patients=patients,
        studies_per_patient=studies_per_patient,
        prevalence=prevalence,
        shape=parse_size(shape, "--shape"),
        spacing=parse_size(spacing, "--spacing", kind=float),
        oblique=oblique,
        lesion_contrast=lesion_contrast,
        lesion_radius_mm=parse_size(lesion_radius, "--lesion-radius", kind=float),  # type: ignore[arg-type]
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
    _print_synth_summary(generate(spec, out, overwrite=overwrite), kind)


def _print_synth_summary(res: Any, kind: str) -> None:
    n_pos = sum(1 for r in res.truth if r.label > 0)
    out_console.print(
        f"synth: {len(res.truth)} {kind} series ({n_pos} with the finding), {res.n_files} files "
        f"in {res.seconds:.1f} s -> {res.data_dir}"
    )
    out_console.print(f"labels: {res.labels_csv}   truth: {res.truth_csv}")
    if res.archive is not None:
        out_console.print(f"archive: {res.archive}")


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

    learn_identity(manifest, out)  # before anything is printed
    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    result = export_dataset(
        manifest, fmt, out, classes=class_list, absolute_paths=absolute_paths, link=link
    )
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    say(f"{result.format}: wrote {result.path} ({counts})")


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
    _print_demo_summary(res, dims)


def _print_demo_summary(res: Any, dims: int) -> None:
    """One row per stage (seconds, result), then where the report, metrics and scores are."""
    from rich.table import Table

    table = Table(title=f"medres demo ({dims}D) in {sum(res.timings.values()):.0f} s")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    rows = {
        "synth": "training set + held-out zip archive",
        "ingest": f"{res.n_images} images",
        "train": f"best val AUC {res.val_auc:.3f}" if res.val_auc is not None else "",
        "evaluate": _demo_auc(res),
        "score": f"{res.n_scored} scored, {res.n_score_errors} rejected",
    }
    for stage, seconds in res.timings.items():
        table.add_row(stage, f"{seconds:.1f}", rows.get(stage, ""))
    out_console.print(table)
    out_console.print(f"report:  {res.report}")
    out_console.print(f"metrics: {res.metrics}")
    out_console.print(f"scores:  {res.scores}")


def _demo_auc(res: Any) -> str:
    if res.auc is None:
        return "n/a"
    auc = f"test AUC {res.auc:.3f}"
    if res.auc_ci:
        auc += f" (95% CI {res.auc_ci[0]:.3f}-{res.auc_ci[1]:.3f}, n={res.n_test})"
    return auc
