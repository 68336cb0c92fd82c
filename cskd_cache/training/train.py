"""Stage two: train a DeiT student with CSKD, reading teacher outputs from the cache (or running the teacher).

One code path for three teacher sources: `cache` decodes the cached encoding, `online` runs the teacher on the
same replayed views (its targets equal the cache's exactly), `none` trains plain DeiT. `train()` reads like
DeiT's main.py: set the run up (`setup`), then per epoch `train_one_epoch`, `evaluate`, and a checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from ..data.fingerprint import replay_tolerance
from ..data.order import MAX_MEASURED_REUSE, epoch_views, reuse_factor
from ..data.recipe import library_drift
from ..data.replay import PairDataset
from ..data.views import pair_dataset
from ..distributed import Dist, init_distributed
from ..errors import CacheError
from .checkpoint import save as _save
from .config import TrainConfig
from .engine import evaluate, train_one_epoch
from .loader import RankBatches, epoch_loader
from .losses import alpha_at
from .setup import Run, recipe_of, setup  # noqa: F401 - the names callers of `train` use

CHECK_FIRST_STEPS = 8  # every view of a run's first steps is fingerprinted (then a rotating sample)


def train(cfg: TrainConfig, dist: Dist | None = None) -> list[dict]:
    """The whole training run; returns the per-epoch metrics it also writes to OUT/metrics.jsonl."""
    dist = dist or init_distributed()
    run = setup(cfg, dist)
    os.makedirs(cfg.out, exist_ok=True)
    reuse = reuse_factor(cfg.epochs, len(run.plan_epochs))
    if dist.main and run.start_epoch < cfg.epochs:
        held = len(run.plan_epochs)
        use = f"each view used {reuse:g} times" if reuse >= 1 else \
            f"{cfg.epochs} of the {held} cached epochs are used, each view once"
        print(f"views: {held} augmented epochs of {run.views_per_epoch} views for {cfg.epochs} training epochs of "
              f"{run.steps} steps x {cfg.batch_size * dist.world}: {use}"
              + (" (the official condition is 1: fresh views every epoch)" if reuse > 1 else ""))
        if reuse > MAX_MEASURED_REUSE:
            print(f"warning: each view used {reuse:g} times; the paper sees a fresh view every epoch, and "
                  "docs/results.md measured lower accuracy with many uses per view. `cskd-cache precompute "
                  f"--epochs {cfg.epochs}` with the cache's own flags extends it to fresh views (at least "
                  f"{-(-cfg.epochs // MAX_MEASURED_REUSE)} for {MAX_MEASURED_REUSE} uses per view)")
    dataset = pair_dataset(run.source, run.recipe, run.fingerprint_kind, run.signature_kind)
    board = _board(cfg) if dist.main else None
    if dist.main:
        write_args(cfg)
    for epoch in range(run.start_epoch, min(cfg.epochs, cfg.stop_after or cfg.epochs)):
        started = time.time()
        row = _one_epoch(run, dataset, epoch)
        row["reuse_factor"] = reuse
        if run.val is not None:
            row.update(evaluate(run.student, run.val, run.device, dist))
            if run.ema is not None:
                row.update({f"ema_{k}": v for k, v in evaluate(run.ema.module, run.val, run.device, dist).items()})
            # what the paper reports: the best top-1 of the raw model over epochs
            row["best_top1"] = max([r["top1"] for r in run.history] + [row["top1"]])
        row["seconds"] = time.time() - started  # the epoch's wall time, evaluation included
        run.history.append(row)
        if dist.main:
            print(json.dumps(row))
            _save(run, epoch, row)
            if board is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        board.add_scalar(k, v, epoch)
                board.flush()
        dist.barrier()
    if dist.main and run.history and "best_top1" in run.history[-1]:
        best = max(run.history, key=lambda r: r["top1"])
        ema = f", EMA {run.history[-1]['ema_top1']:.2f} last" if "ema_top1" in run.history[-1] else ""
        print(f"best top-1 {best['top1']:.2f} at epoch {best['epoch']} (raw model, as the paper reports){ema}")
    return run.history


def _board(cfg: TrainConfig):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CacheError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(os.path.join(cfg.out, "tensorboard"))


def write_args(cfg: TrainConfig) -> None:
    """OUT/args.yaml: every flag as resolved, as timm's train.py writes it (and `--config` reads it back)."""
    import yaml

    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "args.yaml"), "w") as f:
        yaml.safe_dump(asdict(cfg), f, sort_keys=False)


def _one_epoch(run: Run, dataset: PairDataset, epoch: int) -> dict:
    cfg, dist = run.cfg, run.dist
    run.scheduler.step(epoch)
    # Each (seed, epoch, rank) has its own random stream (drop path, dropout), so a resumed run draws exactly
    # what an uninterrupted one would, on every rank, without saving generator states.
    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, dist.rank]).generate_state(1)[0]))
    views = epoch_views(epoch, run.plan_epochs, run.views_per_epoch, cfg.batch_size * dist.world, run.steps,
                        run.block, cfg.seed, run.stride)
    if run.loader is None:  # one loader for the run: its workers (and their open cache) live across epochs
        # replayed views are checked against the cache only: an online teacher sees them as they are
        run.batches = RankBatches(run.plan, views, run.stride, cfg.batch_size, dist.rank, dist.world,
                                  check_every=cfg.check_every if run.cache_url else 0)
        run.loader = epoch_loader(dataset, run.batches, run.cache_url, cfg.workers, run.device.type == "cuda",
                                  cfg.replay_tolerance)
    run.batches.views, run.batches.epoch = views, epoch
    run.batches.check_steps = CHECK_FIRST_STEPS if epoch == run.start_epoch else 0  # a run's (or resume's) start
    loader = run.loader
    per_step = lambda step: alpha_at(epoch, step, run.steps, cfg.epochs, cfg.alpha_schedule, cfg.alpha_per_step)
    stats = train_one_epoch(run.model, run.criterion, loader, run.optimizer, run.device, epoch,
                            targets=run.targets, alpha_at=per_step, num_classes=run.num_classes,
                            smoothing=run.recipe.label_smoothing, ema=run.ema, clip_grad=cfg.clip_grad,
                            show_progress=dist.main, finish=functools.partial(loader.collate_fn.finish, dataset))
    names = list(stats["sums"])
    totals = torch.stack([torch.tensor(float(stats["seen"]), device=run.device)] +
                         [stats["sums"][k].double().to(run.device) for k in names]).double()
    if dist.world > 1:  # losses over all ranks' views, not rank 0's alone
        torch.distributed.all_reduce(totals)
    totals = totals.tolist()  # the epoch's one read of the loss sums
    seen = int(totals[0])
    drifted, far = stats["drift"]
    if drifted and dist.main:
        tol = replay_tolerance(cfg.replay_tolerance, run.signature_kind)
        print(f"warning: {drifted} replayed views of epoch {epoch} differ slightly from the pixels the teacher saw "
              f"(at most {far:.3f}, within --replay-tolerance {tol}){library_drift(run.cache_manifest)}")
    return {"epoch": epoch, "alpha": stats["alpha"], "lr": run.optimizer.param_groups[0]["lr"],
            "img_per_s": seen / stats["seconds"], "teacher_source": cfg.teacher_source,
            "cached_epoch": run.plan_epochs[epoch % len(run.plan_epochs)], "cycle": epoch // len(run.plan_epochs),
            "replay_drifted": drifted,
            **{f"train_{k}": v / max(seen, 1) for k, v in zip(names, totals[1:])}}


