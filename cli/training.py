"""Stage two and the teacher: `train`, `fit-teacher`."""

from __future__ import annotations

import json
from typing import Optional

import typer

from .app import (MATCH_HELP, REPLAY_HELP, AlphaSchedule, FixedPrecision, LossType, Match, Replay, TeacherSource, app,
                  config_option, default_workers, plain, user_errors)

_STUDENTS = "deit_ti | deit_s | deit_b (timm's distilled DeiTs), deit_demo (DeiT-Ti at width 96, depth 4), or any " \
            "timm ViT with a distillation token"


@app.command()
@user_errors
def train(
    config: Optional[str] = config_option(),
    student: str = typer.Option("deit_s", help=_STUDENTS + "."),
    data: str = typer.Option(..., help="Training data: the dataset the cache was made from."),
    out: str = typer.Option(..., "--out", "--output", help="Run folder: checkpoint.pth, metrics.jsonl."),
    cache: Optional[str] = typer.Option(None, help="Teacher cache (path or URL)."),
    val_data: Optional[str] = typer.Option(None, help="Validation data (ImageFolder or WebDataset)."),
    epochs: int = typer.Option(300, min=1, help="Training epochs (the cache's epochs are cycled)."),
    teacher_source: TeacherSource = typer.Option("cache", case_sensitive=False,
                                       help="cache | online (run the teacher on the same views) | none (plain "
                                            "DeiT)."),
    teacher: Optional[str] = typer.Option(None, help="online: timm teacher (default: the cache's)."),
    teacher_checkpoint: Optional[str] = typer.Option(None, help="online: local teacher weights."),
    teacher_precision: Optional[FixedPrecision] = typer.Option(None, case_sensitive=False,
                                                    help="online: fp32 | fp16 | bf16 (default: the cache's; else "
                                                         "fp16 on a GPU, fp32 on a CPU)."),
    alpha_schedule: AlphaSchedule = typer.Option("linear", case_sensitive=False,
                                       help="CKF alpha decay: linear | x2 | cos, or local (constant 1: the paper's "
                                            "ablation)."),
    alpha_per_step: bool = typer.Option(False, help="Update alpha every step (paper: once per epoch)."),
    distill: LossType = typer.Option("hard", case_sensitive=False,
                                help="Distillation-token loss: hard | soft."),
    cskd_loss: LossType = typer.Option("hard", case_sensitive=False,
                                  help="Patch-token loss: hard (CE on CKF targets, the paper's default) | soft (KL "
                                       "on the fused logits; needs a full or topk cache)."),
    tau: float = typer.Option(1.0, help="Temperature of the soft losses."),
    base_weight: float = typer.Option(0.5, min=0.0, help="Weight of CE(class head, mixed labels)."),
    distill_weight: float = typer.Option(0.5, min=0.0, help="Weight of the distillation-token loss."),
    cskd_weight: float = typer.Option(1.0, min=0.0, help="Weight of the patch-token (CKF) loss; 0 gives DeiT hard "
                                                         "distillation."),
    batch_size: int = typer.Option(64, min=2, help="Views per process per step (even)."),
    lr: Optional[float] = typer.Option(None, help="Default 5e-4 x global batch / 512."),
    weight_decay: float = typer.Option(0.05, min=0.0, help="AdamW weight decay (not on pos_embed, tokens, biases, "
                                                           "norms)."),
    warmup_epochs: int = typer.Option(5, min=0, help="Linear warmup epochs from --warmup-lr."),
    warmup_lr: float = typer.Option(1e-6, min=0.0, help="Learning rate at the start of warmup."),
    min_lr: float = typer.Option(1e-5, min=0.0, help="Floor of the cosine schedule."),
    drop_path: float = typer.Option(0.0, min=0.0, max=1.0, help="Stochastic depth (official CSKD configs: 0)."),
    ema_decay: float = typer.Option(0.99996, min=0.0, max=1.0, help="Model EMA decay (0 = off)."),
    clip_grad: Optional[float] = typer.Option(None, help="Clip the gradient norm."),
    workers: int = typer.Option(default_workers(), min=0, help="Data-loading worker processes (default: the cores "
                                                               "available, at most 8)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: GPU when present)."),
    resume: bool = typer.Option(False, help="Continue the run in --out (same flags; --epochs may grow)."),
    force: bool = typer.Option(False, help="Use a cache that does not fit --data (knowingly)."),
    match: Match = typer.Option("key", case_sensitive=False, help=MATCH_HELP),
    compile: bool = typer.Option(False, help="torch.compile the student's training forward: pays off on a GPU over "
                                             "a long run (on a CPU, compiling costs more than it saves)."),
    tensorboard: bool = typer.Option(False, help="Also write TensorBoard event files to OUT/tensorboard."),
    replay_tolerance: Optional[float] = typer.Option(
        None, min=0.0, help="Largest drift of a replayed view's signature from the one cached (normalised units) that "
                            "is tolerated and counted (default: 0.025 for format-3 caches, 0.05 for older ones); 0 = "
                            "exact pixels only."),
    check_every: int = typer.Option(8, min=1, help="Replayed views whose pixels are checked against the cache: every "
                                                   "view of the first steps, then one pair in N (each view once in N "
                                                   "epochs); 1 checks every view."),
    seed: int = typer.Option(0, help="Seed of initial weights, drop path and cycle orders."),
    repeats: int = typer.Option(3, min=1, help="Without a cache: repeated augmentation of the plan (a cache brings "
                                               "its own)."),
    plan_epochs: Optional[int] = typer.Option(None, min=1, help="Without a cache: augmented epochs of the plan, "
                                                                "cycled (default: --epochs, fresh views every epoch)."),
    input_size: Optional[int] = typer.Option(None, min=16, help="Without a cache: view size (default 224)."),
    replay: Optional[Replay] = typer.Option(None, case_sensitive=False,
                                            help=REPLAY_HELP + " Default: the cache's; pil without one."),
    max_steps: Optional[int] = typer.Option(None, min=1, help="Cap steps per epoch (quick runs)."),
    stop_after: Optional[int] = typer.Option(None, min=1, help="Stop after this many epochs; --resume continues."),
):
    """Train a DeiT student with CSKD from the cache (or an online teacher, or none)."""
    from cskd_cache.distributed import init_distributed
    from cskd_cache.training.train import TrainConfig
    from cskd_cache.training.train import train as run

    dist = init_distributed()
    flags = plain({k: v for k, v in locals().items() if k not in ("run", "TrainConfig", "dist", "init_distributed",
                                                                  "config")})
    history = run(TrainConfig(**flags), dist)
    if history and dist.main:
        typer.echo(f"{out}: {len(history)} epochs, last {json.dumps(history[-1])}")


@app.command("fit-teacher")
@user_errors
def fit_teacher(
    data: str = typer.Option(..., help="Training data (ImageFolder or WebDataset shards)."),
    out: str = typer.Option(..., "--out", "--output", help="Weights to write: *.safetensors or *.pth (for "
                                                           "precompute --teacher-checkpoint)."),
    teacher: str = typer.Option("regnety_160", help="timm CNN name."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained",
                                    help="Fine-tune timm's weights (hub) or train from scratch."),
    init_checkpoint: Optional[str] = typer.Option(None, help="Fine-tune these local weights (.safetensors/.pth of "
                                                             "the --teacher architecture, loaded weights-only; a "
                                                             "classifier of another class count is replaced) "
                                                             "instead of the hub's."),
    val_data: Optional[str] = typer.Option(None, help="Validation data: top-1 after every epoch."),
    epochs: int = typer.Option(10, min=1, help="Training epochs."),
    batch_size: int = typer.Option(64, min=1, help="Images per step."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate (cosine schedule)."),
    weight_decay: float = typer.Option(0.05, min=0.0, help="AdamW weight decay."),
    warmup_epochs: int = typer.Option(1, min=0, help="Warmup epochs."),
    smoothing: float = typer.Option(0.1, min=0.0, max=0.99, help="Label smoothing."),
    input_size: int = typer.Option(224, min=16, help="Training crop size in pixels."),
    workers: int = typer.Option(default_workers(), min=0, help="Data-loading worker processes."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: GPU when present)."),
    seed: int = typer.Option(0, help="Seed of the classifier init and the data order."),
):
    """Fit (or fine-tune) a timm CNN teacher on your dataset before caching it; an interrupted run resumes."""
    from cskd_cache.teacher.fit import FitTeacherConfig
    from cskd_cache.teacher.fit import fit_teacher as run

    report = run(FitTeacherConfig(**{k: v for k, v in locals().items() if k not in ("run", "FitTeacherConfig")}))
    last = report["history"][-1] if report["history"] else {}
    typer.echo(f"{out}: {report['teacher']} with {report['num_classes']} classes, "
               f"{len(report['history'])} epochs, last {json.dumps(last)}")


@app.command()
@user_errors
def evaluate(
    checkpoint: str = typer.Option(..., help="A run's checkpoint.pth (loaded weights-only)."),
    val_data: str = typer.Option(..., help="Validation data (ImageFolder or WebDataset shards)."),
    batch_size: int = typer.Option(64, min=1, help="Images per batch."),
    workers: int = typer.Option(default_workers(), min=0, help="Data-loading worker processes."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: GPU when present)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Top-1/top-5 of the class head, the distillation head, the patch tokens and CSKD's mean of the three, for
    the model and its EMA."""
    from cskd_cache.training.evaluate import evaluate_checkpoint, format_accuracy

    result = evaluate_checkpoint(checkpoint, val_data, batch_size, workers, device)
    typer.echo(json.dumps(result, indent=2) if as_json else format_accuracy(result))


@app.command()
@user_errors
def plot(runs: list[str] = typer.Argument(..., help="Run folders (cskd-cache train --out)."),
         out: str = typer.Option("curves.png", "--out", "--output", help="The PNG to write.")):
    """Training loss, top-1 (model and EMA) and CKF's alpha per epoch, for one or more runs side by side."""
    from cskd_cache.demo.plots import plot_runs

    typer.echo(plot_runs(runs, out))
