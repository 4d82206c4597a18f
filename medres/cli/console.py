"""The consoles the CLI owns: ``out_console`` (stdout: summaries, tables) and
``err_console`` (stderr: logs, progress bars).

Library code never prints; only the command modules of ``medres.cli`` write here.
:func:`say` prints a summary line through the identity filter
(:func:`medres.phi.filter_message`): the way every command's closing lines are printed.
Imports: rich, ``medres.phi``.
"""

from __future__ import annotations

from rich.console import Console

from medres.phi import filter_message

err_console = Console(stderr=True)
out_console = Console()


def say(text: str) -> None:
    """Print ``text`` on stdout, verbatim (no markup), after the identity filter."""
    out_console.print(filter_message(text), markup=False, highlight=False, soft_wrap=True)
