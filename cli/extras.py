"""The demo (and, later, the experiments and benchmarks): whole pipelines behind one command."""

from __future__ import annotations

from typing import Optional

import typer

from .app import app, default_workers, user_errors


@app.command()
@user_errors
def demo(
    out: str = typer.Option("cskd-demo", help="Folder for data, teacher, cache, runs, results.json, accuracy.png."),
    train_scenes: int = typer.Option(4000, min=4, help="Training scenes to compose."),
    val_scenes: int = typer.Option(500, min=1, help="Validation scenes."),
    teacher_epochs: int = typer.Option(5, min=1, help="Epochs of fit-teacher."),
    cache_epochs: int = typer.Option(2, min=1, help="Augmented epochs to cache."),
    student_epochs: int = typer.Option(10, min=1, help="Epochs of each of the three student trainings."),
    batch_size: int = typer.Option(32, min=2, help="Views per step (even)."),
    workers: int = typer.Option(min(2, default_workers()), min=0, help="Data-loading worker processes."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: GPU when present)."),
    seed: int = typer.Option(0, help="Seed of scenes, plan and initial weights."),
):
    """The whole pipeline on digit scenes, nothing to download: fit-teacher, precompute, train three ways."""
    from cskd_cache.demo import DemoConfig, format_table, run_demo

    results = run_demo(DemoConfig(out=out, train_scenes=train_scenes, val_scenes=val_scenes,
                                  teacher_epochs=teacher_epochs, cache_epochs=cache_epochs,
                                  student_epochs=student_epochs, batch_size=batch_size, workers=workers,
                                  device=device, seed=seed))
    typer.echo(format_table(results))
    typer.echo(f"{out}/results.json, {out}/accuracy.png")


@app.command()
@user_errors
def experiment(
    out: str = typer.Option("cskd-experiment", help="Folder for data, teacher, caches, runs, results.json/.md, plots."),
    quick: bool = typer.Option(False, help="The smallest size (seconds per arm): checks that everything runs."),
    workers: int = typer.Option(0, min=0, help="Data-loading worker processes (0, the main process, is fastest for "
                                               "these small scenes on a CPU; more on a GPU machine)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: GPU when present)."),
):
    """Fidelity: no distillation vs DeiT vs CSKD over seeds, alpha schedules, cached epochs, encodings."""
    from cskd_cache.experiment import ExperimentConfig, format_tables, run_experiment

    cfg = ExperimentConfig.quick(out, device=device) if quick else ExperimentConfig(out=out, workers=workers,
                                                                                   device=device)
    results = run_experiment(cfg)
    typer.echo(format_tables(results))
    typer.echo(f"{out}/results.json, {out}/results.md, {out}/accuracy_per_epoch.png, "
               f"{out}/accuracy_vs_cached_epochs.png")
