"""The ``medres`` Typer app: error boundary, logging set-up and the ``main`` entry point.

Each command lives in the module of its group (:mod:`medres.cli.ingest`, ``train``,
``evaluate``, ``score``, ``data`` for synth/export/demo, ``models`` for
models/export-model) as a plain function; :func:`_register` adds them to :data:`app` in
the order ``medres --help`` lists them. A command parses its options, builds one typed
config, calls one library function and prints a summary.

Exit codes: 0 success; 1 user error (one line on stderr, no traceback; ``--verbose`` shows
it); 2 usage error.

Imports: typer, rich, ``medres.errors``, ``medres.progress`` and the command modules of this
package, which import the library lazily inside each command (start-up stays free of
torch/monai).
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from medres import __version__, progress
from medres.cli import data, evaluate, ingest, models, score, train
from medres.cli.console import err_console
from medres.errors import MedresError

log = logging.getLogger("medres")

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


def _register() -> None:
    """Add every command to :data:`app`; this order is the order of ``medres --help``."""
    commands = (
        ("synth", data.synth_cmd),
        ("ingest", ingest.ingest_cmd),
        ("models", models.models_cmd),
        ("train", train.train_cmd),
        ("evaluate", evaluate.evaluate_cmd),
        ("score", score.score_cmd),
        ("score-merge", score.score_merge_cmd),
        ("demo", data.demo_cmd),
        ("export", data.export_cmd),
        ("export-model", models.export_model_cmd),
    )
    for name, fn in commands:
        app.command(name)(fn)


_register()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - interactive
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
