"""The ``medres`` command line: a thin layer over the library.

:mod:`medres.cli.app` holds the Typer app, the error boundary, logging and ``main`` (the
``medres`` console script); one module per command group holds the commands
(``ingest``, ``train``, ``evaluate``, ``score``, ``data``, ``models``) and
:mod:`medres.cli.console` the consoles. The CLI may import any layer, lazily inside a
command for anything heavy.
"""

from medres.cli.app import app, main

__all__ = ["app", "main"]
