"""The ``medres`` Typer app: error boundary, logging set-up and the ``main`` entry point.

Each command lives in the module of its group (:mod:`medres.cli.ingest`, ``train``,
``evaluate``, ``score``, ``data`` for synth/export/demo, ``models`` for
models/export-model) as a plain function; :func:`_register` adds them to :data:`app` in
the order ``medres --help`` lists them. A command parses its options, builds one typed
config, calls one library function and prints a summary.

Exit codes: 0 success; 1 user error (one line on stderr, no traceback; ``--verbose`` shows
it), a full disk included (one line naming the folder and the space free); 2 usage error
(wrong or missing options: one line naming the option and the command's ``--help``, the
click convention); 130 interrupted (Ctrl-C: one line; every output is written atomically, so
the same command resumes). ``-h`` is ``--help`` everywhere.

Every error line and log record passes ``medres.phi.filter_message`` (the identity filter).

Imports: typer, rich, ``medres.errors``, ``medres.phi``, ``medres.progress`` and the command modules of this
package, which import the library lazily inside each command (start-up stays free of
torch/monai); option values are converted by :mod:`medres.cli.params` (no pydantic).
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from medres import __version__, progress
from medres.cli import data, evaluate, ingest, models, params, score, train
from medres.cli import plan as plan_cli
from medres.cli.console import err_console
from medres.errors import MedresError
from medres.phi import IdentityLogFilter, filter_message

log = logging.getLogger("medres")

_STATE: dict[str, Any] = {"verbose": False}


# click's UsageError as typer raises it (typer >= 0.29 vendors click; older ones use click)
_UsageError: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError"
)


class _UsageLine(_UsageError):  # type: ignore[misc,valid-type]
    """A usage error shown as one line (exit 2) instead of click's usage block."""

    def __init__(self, message: str, ctx: Any = None, where: str = "medres") -> None:
        super().__init__(message, ctx=ctx)
        self.where = ctx.command_path if ctx is not None else where

    def show(self, file: Any = None) -> None:
        message = filter_message(self.format_message().rstrip("."))
        typer.echo(f"error: {message}; see '{self.where} --help'", err=True)


def _one_line(exc: Any, where: str = "medres") -> Exception:
    if type(exc).__name__ == "NoArgsIsHelpError" or isinstance(exc, _UsageLine):
        return exc  # bare `medres`: the help page
    return _UsageLine(exc.format_message(), ctx=exc.ctx, where=where)


def _out_option(args: list[str]) -> str | None:
    """The ``--out``/``-o`` value of a command line (names the folder of a full disk)."""
    for i, arg in enumerate(args):
        if arg in ("--out", "-o") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return None


def _fail(message: str, code: int) -> typer.Exit:
    if _STATE["verbose"]:
        traceback.print_exc()
    typer.echo(f"error: {filter_message(message)}", err=True)  # the one identity filter
    return typer.Exit(code)


class _MedresGroup(TyperGroup):
    """The error boundary: :class:`MedresError` and a full disk -> one line, exit 1; a
    usage error -> one line, exit 2; Ctrl-C -> one line, exit 130."""

    def make_context(self, info_name: str | None, args: list[str], **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, **extra)
        except _UsageError as exc:
            raise _one_line(exc) from None

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> Any:
        ctx.meta["medres.args"] = list(args)  # names the folder of a full disk
        return super().resolve_command(ctx, args)

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        params.install(self, ctx)  # plain values without pydantic (medres.cli.params)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context) -> Any:
        """:meth:`_invoke`; when it fails (an error, Ctrl-C, a full disk), the ``--out``
        folders this command made and left empty are removed again (:mod:`medres.io`)."""
        from medres import io

        io.forget_created_dirs()
        try:
            return self._invoke(ctx)
        except BaseException as exc:
            if not (isinstance(exc, typer.Exit) and exc.exit_code == 0):
                io.remove_created_dirs_if_empty()
            raise

    def _invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _UsageError as exc:
            args = ctx.meta.get("medres.args") or [""]
            raise _one_line(exc, f"{ctx.command_path} {args[0]}".strip()) from None
        except MedresError as exc:
            raise _fail(str(exc), 1) from None
        except KeyboardInterrupt:
            raise _fail(
                "interrupted (Ctrl-C); outputs are written atomically, so the earlier ones "
                "are intact: run the same command again to resume",
                130,
            ) from None
        except Exception as exc:
            from medres.io import disk_full_error, is_disk_full

            if not is_disk_full(exc):
                raise
            folder = (
                _out_option(ctx.meta.get("medres.args", []))
                or getattr(exc, "filename", None)
                or "the output folder"
            )
            raise _fail(str(disk_full_error(folder)), 1) from None


class _MedresCommand(TyperCommand):
    """A command whose plain option values are converted without pydantic
    (:mod:`medres.cli.params`: 60-100 ms of every command's start-up)."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        params.install(self, ctx)
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_MedresGroup,
    name="medres",
    help="Medical-imaging deep learning: ingest DICOM/NIfTI, train 2D/3D ResNets, "
    "evaluate with confidence intervals, score archives resumably.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
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
    handler.addFilter(IdentityLogFilter())  # no record shows a token the run has learned
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
        ("plan", plan_cli.plan_cmd),
        ("train", train.train_cmd),
        ("evaluate", evaluate.evaluate_cmd),
        ("score", score.score_cmd),
        ("score-merge", score.score_merge_cmd),
        ("demo", data.demo_cmd),
        ("export", data.export_cmd),
        ("export-model", models.export_model_cmd),
    )
    for name, fn in commands:
        app.command(name, cls=_MedresCommand)(fn)


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
