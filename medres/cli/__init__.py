"""The ``medres`` command line: a thin layer over the library (see ``medres.cli.app``)."""

from medres.cli.app import app, main

__all__ = ["app", "main"]
