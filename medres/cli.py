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

import click
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

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MedresError as exc:
            if _STATE["verbose"]:
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
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
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)


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


def _not_available(command: str) -> None:
    from medres.errors import NotAvailableError

    raise NotAvailableError(
        f"`medres {command}` is not available yet in medres {__version__}; "
        "see the README roadmap for the stages that have landed"
    )


# --- synth -------------------------------------------------------------------------------
@app.command("synth")
def synth_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
) -> None:
    """Write a synthetic DICOM/NIfTI study set with a learnable finding and labels.csv."""
    _not_available("synth")


# --- ingest ------------------------------------------------------------------------------
@app.command("ingest")
def ingest_cmd(
    sources: Annotated[list[Path], typer.Argument(help="Folders, files or archives.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset output folder.")],
) -> None:
    """Turn DICOM/NIfTI folders and archives into validated volumes plus a manifest."""
    _not_available("ingest")


# --- models ------------------------------------------------------------------------------
@app.command("models")
def models_cmd() -> None:
    """List the model architectures, their sizes and available weights."""
    _not_available("models")


# --- train -------------------------------------------------------------------------------
@app.command("train")
def train_cmd(
    pipeline: Annotated[Path | None, typer.Argument(help="Pipeline YAML (optional).")] = None,
) -> None:
    """Train a 2D/3D ResNet on an ingested manifest."""
    _not_available("train")


# --- evaluate ----------------------------------------------------------------------------
@app.command("evaluate")
def evaluate_cmd(
    target: Annotated[Path, typer.Argument(help="A run dir or a predictions CSV.")],
) -> None:
    """ROC/AUC with confidence intervals, operating points, calibration and an HTML report."""
    _not_available("evaluate")


# --- score -------------------------------------------------------------------------------
@app.command("score")
def score_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model dir written by `medres train`.")],
) -> None:
    """Score folders/archives of scans with a trained model; re-running resumes."""
    _not_available("score")


# --- demo --------------------------------------------------------------------------------
@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Demo output folder.")] = Path(
        "medres-demo"
    ),
) -> None:
    """Synthesize a study set, ingest, train, evaluate and score it end to end."""
    _not_available("demo")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - interactive
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
