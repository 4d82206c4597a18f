"""`medres plan`: a manifest (+ a time budget) -> the self-configured pipeline, printed and
written as plan.yaml.

Imports: typer, :mod:`medres.cli.console`; ``medres.train.plan`` lazily inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medres.cli.console import say
from medres.cli.identity import learn_identity


def plan_cmd(
    manifest: Annotated[Path, typer.Argument(help="DIR/manifest.csv written by ingest.")],
    time_budget: Annotated[
        float | None,
        typer.Option("--time-budget", help="Minutes the whole `medres train` may take."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the plan here (plan.yaml).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda.")] = "auto",
    folds: Annotated[
        int | None,
        typer.Option(
            "--folds",
            help="Plan a cross-validation ensemble of K members (as `medres train --folds K`).",
        ),
    ] = None,
) -> None:
    """Fingerprint the data, time candidate networks here and print the training plan."""
    from medres.io import atomic_write_text
    from medres.train.plan import plan_for_manifest

    learn_identity(manifest, out)  # before anything is printed
    plan = plan_for_manifest(
        str(manifest), budget_min=time_budget or 0.0, device=device, folds=folds or 0
    )
    text = plan.to_yaml()
    say(text)
    say(plan.summary())
    if out is not None:
        atomic_write_text(out, text)
        say(f"wrote {out}")
