"""`medres train`: pipeline file + flag overrides -> a run directory.

Imports: typer, :mod:`medres.cli.console`; ``medres.train`` lazily inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medres.cli.console import say
from medres.cli.identity import learn_identity


def train_cmd(
    pipeline: Annotated[
        Path | None, typer.Argument(help="Pipeline YAML (optional; see pipelines/README.md).")
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option("--manifest", "-m", help="DIR/manifest.csv written by ingest.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory to write.")] = None,
    arch: Annotated[
        str | None, typer.Option("--arch", help="resnet18|resnet34|resnet50|resnet101|resnet152.")
    ] = None,
    dims: Annotated[
        int | None, typer.Option("--dims", help="2 or 3 (default: the manifest's).")
    ] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", help="imagenet|none|medicalnet|PATH.")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Number of epochs.")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Samples per step per process.")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    image_size: Annotated[
        str | None, typer.Option("--image-size", help="N, or N,N[,N] per spatial axis.")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto|cpu|cuda.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    threshold_rule: Annotated[
        str | None,
        typer.Option(
            "--threshold-rule",
            help="Binary operating threshold chosen on validation: youden (default), "
            "sensitivity:0.9, specificity:0.9 or fixed (eval.threshold).",
        ),
    ] = None,
    time_budget: Annotated[
        float | None,
        typer.Option(
            "--time-budget",
            help="Minutes for the whole run: the plan fits it, training stops at it.",
        ),
    ] = None,
    folds: Annotated[
        int | None,
        typer.Option(
            "--folds",
            help="Cross-validation ensemble (model.folds): K models (2-10) on K folds of "
            "train+val grouped by patient and stratified by label, calibrated on the "
            "out-of-fold predictions, saved as one model dir; the test split is untouched.",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from RUN_DIR/checkpoints/last.pt.")
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override any pipeline field: section.field=value (repeatable)."
        ),
    ] = None,
) -> None:
    """Train a 2D/3D ResNet on an ingested manifest (without a pipeline: the `medres plan`)."""
    import time

    from medres.errors import ConfigError
    from medres.models.statedict import check_weights_file
    from medres.train.plan import spec_for_train, train_deadline
    from medres.train.run import run_train

    t_start = time.perf_counter()
    learn_identity(manifest, pipeline, out)  # before anything is printed

    overrides = _overrides(
        set_,
        {
            "data.manifest": str(manifest) if manifest else None,
            "model.arch": arch,
            "model.dims": dims,
            "model.weights": weights,
            "train.epochs": epochs,
            "train.batch_size": batch_size,
            "train.lr": lr,
            "transforms.image_size": image_size,
            "train.device": device,
            "train.seed": seed,
            "eval.threshold_rule": threshold_rule,
            "model.folds": folds,
        },
    )
    if out is None:
        raise ConfigError("--out is required: the run directory to write (e.g. --out runs/r1)")
    if resume and pipeline is None and (out / "pipeline.yaml").is_file():
        pipeline = out / "pipeline.yaml"  # the run's resolved spec, not a fresh plan
    check_weights_file(weights)  # before the plan measures anything
    spec, plan = spec_for_train(pipeline, overrides, time_budget or 0.0)
    learn_identity(spec.data.manifest)
    if plan is not None:
        changed = _overridden(plan.spec, spec)
        say(
            plan.summary()
            + (
                f"; you set {', '.join(changed)} (the plan's estimate is for its own values)"
                if changed
                else ""
            )
        )
    deadline = train_deadline(plan, time_budget or 0.0, t_start)
    result = run_train(spec, out, resume=resume, deadline=deadline)
    if result.rank == 0 and plan is not None:
        from medres.io import atomic_write_text

        atomic_write_text(out / "plan.yaml", plan.to_yaml())
    if result.rank == 0:
        val = f"{spec.model.folds}-fold out-of-fold AUC" if spec.model.folds else "val AUC"
        say(
            f"run {result.run_dir}: best epoch {result.best_epoch}/{result.epochs_completed}, "
            f"{val} {result.val_auc:.4f}, test AUC {result.test_auc:.4f}, "
            f"{result.seconds:.0f}s"
        )


def _overrides(set_options: list[str] | None, flags: dict[str, Any]) -> dict[str, Any]:
    """``--set section.field=value`` options, then every flag that was given (flags win)."""
    from medres.train.spec import parse_set_options

    overrides = parse_set_options(set_options)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return overrides


def _overridden(planned: Any, used: Any) -> list[str]:
    """``section.field=value`` for each field the command line changed from the plan."""
    a, b = planned.to_dict(), used.to_dict()
    out = []
    for section, fields in b.items():
        if not isinstance(fields, dict):
            continue
        for name, value in fields.items():
            if a.get(section, {}).get(name) != value:
                shown = "x".join(map(str, value)) if isinstance(value, list) else value
                out.append(f"{section}.{name}={shown}")
    return out
