"""The `cskd-cache` command line. It only parses flags and calls the library; errors are one line, exit code 2."""

from __future__ import annotations

import functools
import json
import sys
from typing import Optional

import typer

from cskd_cache.errors import CacheError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline teacher-label cache for Cumulative Spatial Knowledge Distillation (CSKD).")


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn the library's user-facing errors (and a few OS ones) into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CacheError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted; run the same command again to resume", code=130)
        except OSError as e:
            _fail(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))

    return wrapper


@app.command()
@user_errors
def precompute(
    data: str = typer.Option(..., help="ImageFolder directory or WebDataset .tar shards (brace patterns, URLs)."),
    out: str = typer.Option(..., help="Cache to write (a Zarr v3 group); an unfinished one is resumed."),
    teacher: str = typer.Option("regnety_160", help="timm CNN name (regnety_160 = DeiT's teacher)."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained",
                                    help="Weights through timm / the Hugging Face hub (unless a checkpoint is given)."),
    teacher_checkpoint: Optional[str] = typer.Option(None, help="Local weights (.pth or .safetensors)."),
    epochs: int = typer.Option(1, help="Augmented epochs to cache. Training cycles them: a 300-epoch run from "
                                       "1 cached epoch sees each view 300 times (the paper: fresh views every "
                                       "epoch). More cached epochs = more distinct augmentations, at about 0.9 KB "
                                       "per view with ckf (about 1.1 GB per epoch of ImageNet-1k) and one teacher "
                                       "pass each."),
    encoding: str = typer.Option("ckf", help="ckf (exact CKF targets, default) | full | topk."),
    ckf_width: int = typer.Option(8, help="ckf: candidate slots per position before spilling."),
    topk: int = typer.Option(10, help="topk: dense classes kept per position."),
    global_topk: int = typer.Option(10, help="Global classes kept for the distillation token (ckf, topk)."),
    repeats: int = typer.Option(3, help="Repeated augmentation: each drawn sample R times per epoch, epoch length "
                                        "unchanged (DeiT and CSKD: 3; 1 = off)."),
    seed: int = typer.Option(0, help="Plan seed."),
    input_size: int = typer.Option(224, help="Augmented view size in pixels."),
    auto_augment: str = typer.Option("rand-m9-mstd0.5-inc1", help="timm auto-augment spec, or 'none'."),
    re_prob: float = typer.Option(0.25, help="Random erasing probability."),
    mixup: float = typer.Option(0.8, help="Mixup alpha (0 = off)."),
    cutmix: float = typer.Option(1.0, help="CutMix alpha (0 = off)."),
    mix_prob: float = typer.Option(1.0, help="Probability that a pair is mixed."),
    switch_prob: float = typer.Option(0.5, help="Probability of cutmix when both are on."),
    smoothing: float = typer.Option(0.1, help="Label smoothing of the mixed targets (recorded for training)."),
    batch_size: int = typer.Option(64, help="Views per teacher batch (even)."),
    workers: int = typer.Option(4, help="Data-loading worker processes."),
    chunk_views: int = typer.Option(64, help="Views per Zarr chunk."),
    shard_views: int = typer.Option(2048, help="Views per Zarr shard (the unit of work and of resume)."),
    skip_bad: bool = typer.Option(False, help="Check every image first; skip and list undecodable ones."),
    overwrite: bool = typer.Option(False, help="Replace a cache made with other settings."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: GPU when present)."),
    teacher_precision: str = typer.Option("auto", help="Teacher forward: auto (fp16 autocast on a GPU, as the "
                                                       "official code; fp32 on a CPU) | fp32 | fp16 | bf16."),
    max_shards: Optional[int] = typer.Option(None, hidden=True),
):
    """Run the teacher once over augmented views and store its dense and global outputs."""
    from cskd_cache.precompute import PrecomputeConfig
    from cskd_cache.precompute import precompute as run
    from cskd_cache.views import Recipe

    recipe = Recipe(input_size=input_size, auto_augment=None if auto_augment.lower() == "none" else auto_augment,
                    re_prob=re_prob, mixup_alpha=mixup, cutmix_alpha=cutmix, mix_prob=mix_prob,
                    switch_prob=switch_prob, label_smoothing=smoothing)
    cfg = PrecomputeConfig(data=data, out=out, teacher=teacher, pretrained=pretrained,
                           teacher_checkpoint=teacher_checkpoint, epochs=epochs, encoding=encoding,
                           ckf_width=ckf_width, topk=topk, global_topk=global_topk, repeats=repeats, seed=seed,
                           recipe=recipe, batch_size=batch_size, workers=workers, chunk_views=chunk_views,
                           shard_views=shard_views, skip_bad=skip_bad, overwrite=overwrite, device=device,
                           teacher_precision=teacher_precision, max_shards=max_shards)
    cache = run(cfg)
    state = "complete" if cache.complete else "incomplete (run the same command again to resume)"
    typer.echo(f"{out}: {cache.total_views} views, {cache.manifest['encoding']['name']} encoding, {state}")


@app.command()
@user_errors
def inspect(cache: str = typer.Argument(..., help="Cache path or URL."),
            as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Print a cache's manifest, array shapes, bytes per view and completeness."""
    from cskd_cache.verify import describe_cache, format_description

    info = describe_cache(cache)
    typer.echo(json.dumps(info, indent=2, default=str) if as_json else format_description(info))


@app.command()
@user_errors
def verify(cache: str = typer.Argument(..., help="Cache path or URL."),
           replay: int = typer.Option(0, help="Also replay this many views and compare pixel fingerprints "
                                            "(needs --data)."),
           data: Optional[str] = typer.Option(None, help="Dataset, for --replay.")):
    """Read every chunk (crc32c checked), check completeness, optionally replay views."""
    from cskd_cache.verify import verify_cache

    report = verify_cache(cache, replay=replay, data=data)
    typer.echo(report)


@app.command()
@user_errors
def train(
    student: str = typer.Option("deit_s", help="deit_ti | deit_s | deit_b, or any timm ViT with a distillation token."),
    data: str = typer.Option(..., help="Training data: the dataset the cache was made from."),
    out: str = typer.Option(..., help="Run folder: checkpoint.pth, metrics.jsonl."),
    cache: Optional[str] = typer.Option(None, help="Teacher cache (path or URL)."),
    val_data: Optional[str] = typer.Option(None, help="Validation data (ImageFolder or WebDataset)."),
    epochs: int = typer.Option(300),
    teacher_source: str = typer.Option("cache", help="cache | online | none."),
    teacher: Optional[str] = typer.Option(None, help="online: timm teacher (default: the cache's)."),
    teacher_checkpoint: Optional[str] = typer.Option(None, help="online: local teacher weights."),
    teacher_precision: Optional[str] = typer.Option(None, help="online: fp32 | fp16 | bf16 (default: the cache's; "
                                                                "else fp16 on a GPU, fp32 on a CPU)."),
    alpha_schedule: str = typer.Option("linear", help="CKF alpha decay: linear | x2 | cos."),
    alpha_per_step: bool = typer.Option(False, help="Update alpha every step (paper: once per epoch)."),
    distill: str = typer.Option("hard", help="Distillation-token loss: hard | soft."),
    cskd_loss: str = typer.Option("hard", help="Patch-token loss: hard (CE on CKF targets, the paper's default) | "
                                               "soft (KL on the fused logits; needs a full or topk cache)."),
    tau: float = typer.Option(1.0, help="Soft distillation temperature."),
    base_weight: float = typer.Option(0.5), distill_weight: float = typer.Option(0.5),
    cskd_weight: float = typer.Option(1.0, help="0 gives DeiT hard distillation without spatial targets."),
    batch_size: int = typer.Option(64, help="Views per process per step (even)."),
    lr: Optional[float] = typer.Option(None, help="Default 5e-4 x global batch / 512."),
    weight_decay: float = typer.Option(0.05), warmup_epochs: int = typer.Option(5),
    min_lr: float = typer.Option(1e-5), drop_path: float = typer.Option(0.0),
    ema_decay: float = typer.Option(0.99996, help="Model EMA decay (0 = off)."),
    clip_grad: Optional[float] = typer.Option(None), workers: int = typer.Option(4),
    device: Optional[str] = typer.Option(None), resume: bool = typer.Option(False),
    force: bool = typer.Option(False, help="Use a cache that does not fit --data (knowingly)."),
    seed: int = typer.Option(0),
    repeats: int = typer.Option(3, help="Without a cache: repeated augmentation of the plan (a cache brings its own)."),
    input_size: Optional[int] = typer.Option(None, help="Without a cache: view size (default 224)."),
    max_steps: Optional[int] = typer.Option(None, help="Cap steps per epoch (quick runs)."),
    stop_after: Optional[int] = typer.Option(None, help="Stop after this many epochs; --resume continues."),
):
    """Train a DeiT student with CSKD from the cache (or an online teacher, or none)."""
    from cskd_cache.train import TrainConfig
    from cskd_cache.train import train as run

    history = run(TrainConfig(**{k: v for k, v in locals().items() if k not in ("run", "TrainConfig")}))
    if history:
        typer.echo(f"{out}: {len(history)} epochs, last {json.dumps(history[-1])}")


@app.command("fit-teacher")
@user_errors
def fit_teacher(
    data: str = typer.Option(..., help="Training data (ImageFolder or WebDataset shards)."),
    out: str = typer.Option(..., help="Weights to write: *.safetensors or *.pth (for --teacher-checkpoint)."),
    teacher: str = typer.Option("regnety_160", help="timm CNN name."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained",
                                    help="Fine-tune timm's weights (hub) or train from scratch."),
    val_data: Optional[str] = typer.Option(None, help="Validation data: top-1 after every epoch."),
    epochs: int = typer.Option(10), batch_size: int = typer.Option(64), lr: float = typer.Option(1e-3),
    weight_decay: float = typer.Option(0.05), warmup_epochs: int = typer.Option(1),
    smoothing: float = typer.Option(0.1, help="Label smoothing."),
    input_size: int = typer.Option(224, help="Training crop size in pixels."),
    workers: int = typer.Option(4), device: Optional[str] = typer.Option(None), seed: int = typer.Option(0),
):
    """Fit (or fine-tune) a timm CNN teacher on your dataset before caching it; an interrupted run resumes."""
    from cskd_cache.fit_teacher import FitTeacherConfig
    from cskd_cache.fit_teacher import fit_teacher as run

    report = run(FitTeacherConfig(**{k: v for k, v in locals().items() if k not in ("run", "FitTeacherConfig")}))
    last = report["history"][-1] if report["history"] else {}
    typer.echo(f"{out}: {report['teacher']} with {report['num_classes']} classes, "
               f"{len(report['history'])} epochs, last {json.dumps(last)}")


@app.command()
@user_errors
def demo(
    out: str = typer.Option("cskd-demo", help="Folder for data, teacher, cache, runs, results.json, accuracy.png."),
    train_scenes: int = typer.Option(4000), val_scenes: int = typer.Option(500),
    teacher_epochs: int = typer.Option(5), cache_epochs: int = typer.Option(2),
    student_epochs: int = typer.Option(10), batch_size: int = typer.Option(32),
    workers: int = typer.Option(2), device: Optional[str] = typer.Option(None), seed: int = typer.Option(0),
):
    """The whole pipeline on digit scenes, nothing to download: fit-teacher, precompute, train three ways."""
    from cskd_cache.demo import DemoConfig, format_table, run_demo

    results = run_demo(DemoConfig(out=out, train_scenes=train_scenes, val_scenes=val_scenes,
                                  teacher_epochs=teacher_epochs, cache_epochs=cache_epochs,
                                  student_epochs=student_epochs, batch_size=batch_size, workers=workers,
                                  device=device, seed=seed))
    typer.echo(format_table(results))
    typer.echo(f"{out}/results.json, {out}/accuracy.png")


def main() -> None:
    app(prog_name="cskd-cache")


if __name__ == "__main__":
    sys.exit(main())
