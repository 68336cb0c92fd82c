"""The demo (and, later, the experiments and benchmarks): whole pipelines behind one command."""

from __future__ import annotations

from typing import Optional

import typer

from .app import _choices, app, default_workers, user_errors

ExperimentData = _choices("ExperimentData", "fashion-mnist", "elpv", "scenes")


@app.command()
@user_errors
def demo(
    out: str = typer.Option("cskd-demo", help="Folder for data, teacher, cache, runs, results.json, accuracy.png; "
                                              "the same command again reuses its finished stages, other settings "
                                              "need another folder."),
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
    from cskd_cache.demo.demo import DemoConfig, format_table, run_demo

    results = run_demo(DemoConfig(out=out, train_scenes=train_scenes, val_scenes=val_scenes,
                                  teacher_epochs=teacher_epochs, cache_epochs=cache_epochs,
                                  student_epochs=student_epochs, batch_size=batch_size, workers=workers,
                                  device=device, seed=seed))
    typer.echo(format_table(results))
    typer.echo(f"{out}/results.json, {out}/accuracy.png")


@app.command()
@user_errors
def experiment(
    dataset: ExperimentData = typer.Option("fashion-mnist", case_sensitive=False,
                                           help="fashion-mnist (apt-get install dataset-fashion-mnist) | elpv (pip "
                                                "install elpv-dataset) | scenes (the demo's digit scenes)."),
    out: Optional[str] = typer.Option(None, help="Folder for data, teacher, cache, runs, results.json/.md, plots "
                                                 "(default: cskd-experiment-DATASET, with -quick for --quick)."),
    quick: bool = typer.Option(False, help="The smallest size (seconds per run): checks that everything runs."),
    seeds: int = typer.Option(5, min=2, help="Seeds of the four arms and the reuse pair (paired: one seed, the same "
                                             "initial weights and views in every arm)."),
    workers: int = typer.Option(1, min=0, help="Data-loading worker processes (beside one compute thread on a CPU; "
                                               "more on a GPU machine)."),
    threads: int = typer.Option(1, min=1, help="torch's CPU threads (results depend on it: float sums follow the "
                                               "thread count)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: GPU when present)."),
):
    """Fidelity on real images: no distillation, DeiT, CSKD, CSKD local over paired seeds, and a view-reuse pair;
    best epoch on validation, reported on test."""
    from cskd_cache.demo.experiment import ExperimentConfig, run_experiment
    from cskd_cache.demo.report import format_report

    name = dataset.value
    out = out or f"cskd-experiment-{name}{'-quick' if quick else ''}"
    kw = {} if quick and seeds == 5 else {"seeds": tuple(range(seeds))}
    results = run_experiment(ExperimentConfig.for_dataset(name, out, quick=quick, workers=workers, threads=threads,
                                                          device=device,
                                                          **kw))
    typer.echo(format_report(results))
    typer.echo(f"{out}/results.json, {out}/results.md, {out}/accuracy_per_epoch.png, {out}/paired_differences.png")
