"""`medres evaluate`: a run dir or predictions CSV -> metrics.json + report.html.

Imports: typer, rich, :mod:`medres.cli.console`; ``medres.evaluate`` lazily inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medres.cli.console import out_console, say
from medres.cli.identity import learn_identity


def evaluate_cmd(
    target: Annotated[Path, typer.Argument(help="A run dir or a predictions CSV.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder for metrics.json and report.html.")
    ],
    split: Annotated[
        str, typer.Option("--split", help="Run dir only: evaluate predictions_{split}.csv.")
    ] = "test",
    label: Annotated[
        str | None, typer.Option("--label", help="CSV only: the column holding the true class.")
    ] = None,
    positive: Annotated[
        str | None,
        typer.Option("--positive", help="The positive class value (0/1 and false/true inferred)."),
    ] = None,
    score: Annotated[
        list[str] | None,
        typer.Option(
            "--score", help="CSV only: a score column (model or reader rating); repeat to compare."
        ),
    ] = None,
    by: Annotated[
        list[str] | None,
        typer.Option("--by", help="Subgroup column (manufacturer, sex, site, ...); repeatable."),
    ] = None,
    n_boot: Annotated[
        int, typer.Option("--n-boot", help="Stratified bootstrap replicates (0 turns it off).")
    ] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", help="Extra operating point for probability scores."),
    ] = None,
    ci_level: Annotated[float, typer.Option("--ci-level", help="Confidence level.")] = 0.95,
    ci_transform: Annotated[
        str, typer.Option("--ci-transform", help="DeLong CI scale: none (as pROC) or logit.")
    ] = "none",
    ece_bins: Annotated[int, typer.Option("--ece-bins", help="Equal-width ECE bins.")] = 10,
    drop_missing: Annotated[
        bool,
        typer.Option("--drop-missing", help="Drop rows with an empty/NaN label or score."),
    ] = False,
) -> None:
    """ROC/AUC with confidence intervals, operating points, calibration and an HTML report."""
    from medres.evaluate.evaluate import EvaluateConfig, run_evaluate

    learn_identity(target, out)  # before anything is printed
    result = run_evaluate(
        EvaluateConfig(
            target=target,
            out=out,
            split=split,
            label=label,
            positive=positive,
            scores=tuple(score or ()),
            by=tuple(by or ()),
            n_boot=n_boot,
            seed=seed,
            threshold=threshold,
            ci_level=ci_level,
            ci_transform=ci_transform,
            ece_bins=ece_bins,
            drop_missing=drop_missing,
        )
    )
    _print_evaluation(result.metrics)
    say(f"wrote {result.metrics_path} and {result.report_path}")


def _print_evaluation(m: dict[str, Any]) -> None:
    """A table of AUCs with their CIs (per score column, or per class / label)."""
    from rich.table import Table
    from rich.text import Text

    def ci(v: Any) -> str:
        return f"[{v[0]:.3f}, {v[1]:.3f}]" if v else "-"

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    rows = m.get("models") or m.get("per_class") or m.get("per_label") or {}
    kind = "score" if m.get("task") == "binary" else "class"
    table = Table(title=f"{m.get('task')} evaluation, n = {m.get('n')}")
    for col in (kind, "AUC", "DeLong CI", "bootstrap CI"):
        table.add_column(col, justify="left" if col == kind else "right")
    for name, v in rows.items():
        cells = (num(v.get("auc")), ci(v.get("auc_ci")), ci(v.get("auc_ci_bootstrap")))
        table.add_row(Text(str(name)), *cells)
    if "macro_auc" in m:
        table.add_row("macro", num(m["macro_auc"]), "-", ci(m.get("macro_auc_ci_bootstrap")))
    out_console.print(table)
    for c in m.get("comparisons", []):
        p = "-" if c["p_value"] is None else f"{c['p_value']:.4g}"
        out_console.print(
            f"{c['a']} vs {c['b']}: AUC difference {c['auc_diff']:+.3f} "
            f"CI {ci(c['diff_ci'])}, paired DeLong p = {p}",
            markup=False,
            soft_wrap=True,
        )
