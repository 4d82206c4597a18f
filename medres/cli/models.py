"""`medres models` and `medres export-model`: the model catalogue and model export.

Imports: typer, rich, :mod:`medres.cli.console`, :func:`medres.io.parse_size`;
``medres.models`` lazily inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medres.cli.console import out_console, say
from medres.cli.identity import learn_identity
from medres.io import parse_size


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

    from medres.models.catalog import model_table, weight_files_table

    rows = weight_files_table() if files else model_table(dims)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif files:
        _print_weight_files(rows)
    else:
        _print_models(rows)


def _print_weight_files(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from medres.models.hub import cache_dir

    table = Table(title=f"weight files (offline: put them in {cache_dir()})")
    for col in ("arch", "source", "file", "url", "cached"):
        table.add_column(col, overflow="fold")
    for r in rows:
        cached = "yes" if r["cached"] else "no"
        table.add_row(r["arch"], r["source"], r["file"], r["url"], cached)
    out_console.print(table)


def _print_models(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

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
    from medres.models.export import export_model

    learn_identity(run_dir, out)  # before anything is printed
    size = parse_size(input_size, "--input-size", example="224,224")
    result = export_model(run_dir, fmt, out, input_size=size)
    say(
        f"{result.format}: wrote {result.path} (input {list(result.input_shape)}, "
        f"max |diff| vs PyTorch {result.max_abs_diff:.1e})"
    )
