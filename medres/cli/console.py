"""The consoles the CLI owns: ``out_console`` (stdout: summaries, tables) and
``err_console`` (stderr: logs, progress bars).

Library code never prints; only the command modules of ``medres.cli`` write here.
Imports: rich only.
"""

from __future__ import annotations

from rich.console import Console

err_console = Console(stderr=True)
out_console = Console()
