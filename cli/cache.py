"""Stage one and looking at caches: `precompute`, `inspect`, `verify`."""

from __future__ import annotations

import json
from typing import Optional

import typer

from .app import (DECODE_HELP, MATCH_HELP, REPLAY_HELP, Decode, Encoding, Match, Precision, Replay, app,
                  config_option, default_workers, fail, user_errors)


@app.command()
@user_errors
def precompute(
    config: Optional[str] = config_option(),
    data: str = typer.Option(..., help="ImageFolder directory or WebDataset .tar shards (brace patterns, URLs)."),
    out: str = typer.Option(..., "--out", "--output", help="Cache to write (a Zarr v3 group); an unfinished one is "
                                                           "resumed."),
    teacher: str = typer.Option("regnety_160", help="timm CNN name (regnety_160 = DeiT's teacher)."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained",
                                    help="Weights through timm / the Hugging Face hub (unless a checkpoint is given)."),
    teacher_checkpoint: Optional[str] = typer.Option(None, help="Local weights (.pth or .safetensors)."),
    epochs: int = typer.Option(300, min=1, help="Augmented epochs to cache. 300 (default): one per training epoch "
                                                "of DeiT's recipe, fresh views every epoch, the paper's condition. "
                                                "Fewer is a trade-off: training cycles them, each view used "
                                                "(training epochs / cached epochs) times. Each epoch costs one "
                                                "teacher pass and about 0.72 GB (ckf, ImageNet-1k); a cache can be "
                                                "extended later."),
    encoding: Encoding = typer.Option("ckf", case_sensitive=False,
                                 help="ckf (exact CKF targets, default) | full | topk."),
    ckf_width: int = typer.Option(8, min=1, help="ckf: candidate slots per position before spilling."),
    topk: int = typer.Option(10, min=1, help="topk: dense classes kept per position."),
    global_topk: int = typer.Option(10, min=1, help="Global classes kept for the distillation token (ckf, topk)."),
    repeats: int = typer.Option(3, min=1, help="Repeated augmentation: each drawn sample R times per epoch, epoch "
                                               "length unchanged (DeiT and CSKD: 3; 1 = off)."),
    seed: int = typer.Option(0, help="Plan seed."),
    input_size: int = typer.Option(224, min=16, help="Augmented view size in pixels."),
    replay: Replay = typer.Option("pil", case_sensitive=False, help=REPLAY_HELP),
    decode: Decode = typer.Option("device", case_sensitive=False, help=DECODE_HELP),
    auto_augment: str = typer.Option("rand-m9-mstd0.5-inc1", "--auto-augment", "--aa",
                                     help="timm auto-augment spec, or 'none'."),
    re_prob: float = typer.Option(0.25, "--re-prob", "--reprob", min=0.0, max=1.0,
                                  help="Random erasing probability."),
    mixup: float = typer.Option(0.8, min=0.0, help="Mixup alpha (0 = off)."),
    cutmix: float = typer.Option(1.0, min=0.0, help="CutMix alpha (0 = off)."),
    mix_prob: float = typer.Option(1.0, "--mix-prob", "--mixup-prob", min=0.0, max=1.0,
                                   help="Probability that a pair is mixed."),
    switch_prob: float = typer.Option(0.5, "--switch-prob", "--mixup-switch-prob", min=0.0, max=1.0,
                                      help="Probability of cutmix when both are on."),
    smoothing: float = typer.Option(0.1, min=0.0, max=0.99, help="Label smoothing of the mixed targets (recorded "
                                                                 "for training)."),
    batch_size: Optional[int] = typer.Option(None, min=2, help="Views per teacher batch (even; default 256 on a "
                                                                "GPU, 64 on a CPU)."),
    workers: int = typer.Option(default_workers(), min=0, help="Data-loading worker processes (default: the "
                                                               "cores available, at most 8)."),
    chunk_views: int = typer.Option(64, min=2, help="Views per Zarr chunk (even)."),
    shard_views: int = typer.Option(2048, min=2, help="Views per Zarr shard (the unit of work and of resume)."),
    skip_bad: bool = typer.Option(False, help="Check every image first; skip and list undecodable ones."),
    overwrite: bool = typer.Option(False, help="Replace a cache made with other settings."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: GPU when present)."),
    teacher_precision: Precision = typer.Option("auto", case_sensitive=False,
                                          help="Teacher forward: auto (fp16 autocast on a GPU, as the official "
                                               "code; fp32 on a CPU) | fp32 | fp16 | bf16."),
    compile: bool = typer.Option(False, help="torch.compile the teacher: pays off on a GPU over a long run (on a "
                                             "CPU, compiling costs more than it saves)."),
    same_label_space: bool = typer.Option(False, help="--data's labels are the teacher's class ids (e.g. ImageNet "
                                                      "images with ImageNet labels): accept a teacher whose class "
                                                      "count differs from the dataset's."),
    content_hash: bool = typer.Option(False, help="Store each image file's sha256, so that train --match content "
                                                  "finds the images in any other packaging."),
    only_epochs: Optional[str] = typer.Option(None, help="Compute only these epochs (e.g. 15-29): a partial cache, "
                                                         "to merge with the rest later (cskd-cache merge)."),
    max_shards: Optional[int] = typer.Option(None, hidden=True),
):
    """Run the teacher once over augmented views and store its dense and global outputs."""
    from cskd_cache.distributed import init_distributed
    from cskd_cache.teacher.precompute import PrecomputeConfig
    from cskd_cache.teacher.precompute import precompute as run
    from cskd_cache.data.recipe import Recipe

    encoding, teacher_precision = encoding.value, teacher_precision.value
    recipe = Recipe(input_size=input_size, auto_augment=None if auto_augment.lower() == "none" else auto_augment,
                    re_prob=re_prob, mixup_alpha=mixup, cutmix_alpha=cutmix, mix_prob=mix_prob,
                    switch_prob=switch_prob, label_smoothing=smoothing, replay=replay.value,
                    decode=decode.value)
    cfg = PrecomputeConfig(data=data, out=out, teacher=teacher, pretrained=pretrained,
                           teacher_checkpoint=teacher_checkpoint, epochs=epochs, encoding=encoding,
                           ckf_width=ckf_width, topk=topk, global_topk=global_topk, repeats=repeats, seed=seed,
                           recipe=recipe, batch_size=batch_size, workers=workers, chunk_views=chunk_views,
                           shard_views=shard_views, skip_bad=skip_bad, overwrite=overwrite, device=device,
                           teacher_precision=teacher_precision, content_hash=content_hash, compile=compile,
                           same_label_space=same_label_space,
                           only_epochs=only_epochs, max_shards=max_shards)
    dist = init_distributed()
    cache = run(cfg, dist)
    if dist.main:  # one report per job, not one per rank
        state = "complete" if cache.complete else (
            f"partial (epochs {only_epochs})" if cache.manifest.get("status") == "partial" else
            "incomplete (run the same command again to resume)")
        skipped = cache.manifest.get("bad_samples") or []
        if skipped:
            typer.echo(f"skipped {len(skipped)} undecodable images: " + ", ".join(repr(k) for k in skipped[:20]) +
                       (f" (+{len(skipped) - 20} more; see inspect)" if len(skipped) > 20 else ""))
        typer.echo(f"{out}: {cache.num_views} views, {cache.manifest['encoding']['name']} encoding, {state}")


@app.command()
@user_errors
def inspect(cache: str = typer.Argument(..., help="Cache path or URL."),
            as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
            requirements: bool = typer.Option(False, "--requirements", help="Print the library versions the "
                                                                            "replay depends on, pinned (pip -r).")):
    """Print a cache's manifest, array shapes, bytes per view and completeness."""
    from cskd_cache.cache import inspect as v

    info = v.describe_cache(cache)
    if requirements:
        typer.echo(v.requirements(info["manifest"]))
        return
    typer.echo(json.dumps(info, indent=2, default=str) if as_json else v.format_description(info))


@app.command()
@user_errors
def verify(cache: str = typer.Argument(..., help="Cache path or URL."),
           replay: int = typer.Option(0, min=0, help="Also replay this many views (spread over the cache) and "
                                                     "compare their pixel fingerprints (needs --data)."),
           data: Optional[str] = typer.Option(None, help="Dataset the cache was made from, for --replay and "
                                                         "--teacher-check."),
           match: Match = typer.Option("key", case_sensitive=False, help=MATCH_HELP),
           replay_tolerance: Optional[float] = typer.Option(
               None, min=0.0, help="Drift of a replayed view's signature that is reported but not a failure (default: "
                                   "0.025 for format-3 caches, 0.05 for older ones; 0: exact pixels only)."),
           teacher_check: int = typer.Option(0, min=0, help="Re-run the cache's teacher on this many replayed "
                                                            "views and compare with the stored outputs."),
           teacher_checkpoint: Optional[str] = typer.Option(None, help="--teacher-check: the teacher's weights "
                                                                       "(their sha256 must match the cache's)."),
           pretrained: bool = typer.Option(False, help="--teacher-check: take the teacher from timm / the hub."),
           teacher_tolerance: float = typer.Option(0.02, min=0.0, max=1.0, help="--teacher-check: fraction of CKF "
                                                                                "targets that may differ."),
           device: Optional[str] = typer.Option(None, help="Where --replay tensor views are made and the "
                                                          "--teacher-check teacher runs: cpu, cuda, cuda:1 ... "
                                                          "(default: GPU when present, as training).")):
    """Read every chunk (crc32c checked), check completeness and the plan, optionally replay views.
    Exit 0: the cache is sound; 1: it is not (every problem listed); 2: the command could not run."""
    from cskd_cache.cache.verify import verify_cache
    from cskd_cache.teacher.check import check_teacher

    if teacher_check and not (teacher_checkpoint or pretrained):
        fail("--teacher-check needs the teacher: --teacher-checkpoint PATH or --pretrained")
    report = verify_cache(cache, replay=replay, data=data, match=match.value, tolerance=replay_tolerance,
                          device=device)
    if teacher_check and report["summary"]:  # a cache whose arrays do not match its manifest is not re-run
        check_teacher(report, cache, data, teacher_check, teacher_checkpoint, pretrained, match.value, device,
                      teacher_tolerance)
    if report["problems"]:
        typer.echo(f"{cache}: verify failed, {len(report['problems'])} problem(s):", err=True)
        for p in report["problems"]:
            typer.echo(f"  {p}", err=True)
        raise typer.Exit(1)
    typer.echo(report["summary"])
