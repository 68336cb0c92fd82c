"""Stage two: train a DeiT student with CSKD, reading teacher outputs from the cache (or running the teacher).

One code path for three teacher sources: `cache` decodes the cached encoding, `online` runs the teacher on the
same replayed views and passes its outputs through the same encoding (so both give identical targets), `none`
trains plain DeiT. Views come from the plan in order, replayed by the function stage one used.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from tqdm import tqdm

from .data import LabeledImages, open_source
from .distributed import Dist, init_distributed
from .encodings import make_encoding
from .errors import CacheError
from .losses import CSKDLoss, alpha_at, mixup_target
from .plan import make_epoch_plan
from .store import BlockReader, Cache, to_torch
from .student import create_student
from .teacher import create_teacher
from .views import PairDataset, Recipe, build_eval_transform, collate_pairs, pair_items


@dataclass
class TrainConfig:
    student: str
    data: str
    out: str
    cache: str | None = None
    val_data: str | None = None
    epochs: int = 300
    teacher_source: str = "cache"  # cache | online | none
    teacher: str | None = None  # online mode (default: the cache's teacher)
    teacher_checkpoint: str | None = None
    alpha_schedule: str = "linear"
    alpha_per_step: bool = False
    distill: str = "hard"
    tau: float = 1.0
    base_weight: float = 0.5
    distill_weight: float = 0.5
    cskd_weight: float = 1.0
    batch_size: int = 64
    lr: float | None = None  # default 5e-4 * batch / 512 (DeiT)
    weight_decay: float = 0.05
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    drop_path: float = 0.0
    ema_decay: float = 0.99996  # 0 disables
    clip_grad: float | None = None
    workers: int = 4
    device: str | None = None
    resume: bool = False
    force: bool = False
    seed: int = 0
    plan_epochs: int | None = None  # no cache: how many plan epochs to cycle (default: epochs)
    max_steps: int | None = None  # per epoch, for quick runs
    stop_after: int | None = None  # stop (resumably) once this many epochs are done: budgets, resume tests
    input_size: int | None = None  # no cache: the view size (default 224); a cache brings its own recipe


def _check_cache(cfg: TrainConfig, cache: Cache, source) -> None:
    m = cache.manifest
    if not cache.complete:
        raise CacheError(f"--cache {cfg.cache} is incomplete; finish it with the same precompute command")
    fp = source.fingerprint()
    if m["dataset"]["fingerprint"] != fp and not cfg.force:
        raise CacheError(f"--cache {cfg.cache} was made from another dataset (fingerprint "
                         f"{m['dataset']['fingerprint'][:12]} vs --data {fp[:12]}); pass --force to use it anyway")
    if max(source.labels) >= m["num_classes"] and not cfg.force:
        raise CacheError(f"--data has {max(source.labels) + 1} classes but the cache's teacher has "
                         f"{m['num_classes']}; pass --force to use it anyway")


def _cache_recipe(cfg: TrainConfig, cache: Cache) -> Recipe:
    """The recipe the cache's views were made with; the student trains on exactly those views."""
    d = {k: v for k, v in cache.manifest["recipe"].items() if k != "library_versions"}
    unknown = sorted(set(d) - set(Recipe.__dataclass_fields__))
    if unknown:
        raise CacheError(f"--cache {cfg.cache} uses augmentation settings this cskd-cache does not know "
                         f"({', '.join(unknown)}); upgrade cskd-cache to the version that made it")
    recipe = Recipe.from_dict(d)
    if cfg.input_size is not None and cfg.input_size != recipe.input_size:
        raise CacheError(f"--input-size {cfg.input_size} does not fit --cache {cfg.cache}, whose views are "
                         f"{recipe.input_size} px; drop --input-size, or precompute a cache at {cfg.input_size} px")
    return recipe


# Flags that may change between a run and its --resume: they do not alter what is computed (data and cache may
# move; their identity is checked by fingerprint).
# --epochs may grow (training extended: the cosine and alpha schedules stretch from the resumed epoch on).
_RESUME_FREE = {"workers", "device", "resume", "force", "data", "cache", "val_data", "epochs", "stop_after"}


def _check_resume(cfg: TrainConfig, saved: dict, path: str) -> None:
    for key, value in asdict(cfg).items():
        if key in _RESUME_FREE or key not in saved or saved[key] == value:
            continue
        flag = "--" + key.replace("_", "-")
        raise CacheError(f"--resume: {path} was trained with {flag} {saved[key]}, not {value}; "
                         f"pass the same flags, or a new --out to start another run")


def _lr(cfg: TrainConfig, world: int) -> float:
    return cfg.lr if cfg.lr is not None else 5e-4 * cfg.batch_size * world / 512


def train(cfg: TrainConfig, dist: Dist | None = None) -> list[dict]:
    """The whole training run; returns the per-epoch metrics it also writes to OUT/metrics.jsonl."""
    dist = dist or init_distributed()
    device = dist.device(cfg.device)
    if cfg.teacher_source not in ("cache", "online", "none"):
        raise CacheError("--teacher-source must be cache, online or none")
    if cfg.batch_size % 2:
        raise CacheError("--batch-size must be even (views come in mixing pairs)")
    source = open_source(cfg.data)
    cache = Cache.open(cfg.cache) if cfg.cache else None
    if cfg.teacher_source == "cache" and cache is None:
        raise CacheError("--teacher-source cache needs --cache (or use --teacher-source online / none)")
    teacher = None
    if cache is not None:
        _check_cache(cfg, cache, source)
        index = {k: i for i, k in enumerate(source.keys)}
        keys = cache.sample_keys()
        missing = [k for k in keys if k not in index]
        if missing:  # --force cannot help: the cached views were made from images --data does not have
            raise CacheError(f"--data lacks {len(missing)} of the {len(keys)} images --cache {cfg.cache} was made "
                             f"from (e.g. {missing[0]!r}); train on the data the cache was made from")
        source = source.subset([index[k] for k in keys])
        recipe = _cache_recipe(cfg, cache)
        num_classes, grid, encoding = cache.manifest["num_classes"], tuple(cache.manifest["grid"]), cache.encoding
        plan, plan_epochs, vpe = cache.epoch_plan, cache.manifest["plan"]["epochs"], cache.views_per_epoch
    else:
        recipe = Recipe(input_size=cfg.input_size or 224)
        num_classes = len(source.classes)
        params = recipe.plan_params(len(source), cfg.plan_epochs or cfg.epochs, cfg.seed, 1)
        plan, plan_epochs, vpe = (lambda e: make_epoch_plan(params, e)), params.epochs, params.views_per_epoch
        grid, encoding = None, None
    if cfg.teacher_source == "online":
        name = cfg.teacher or (cache.manifest["teacher"]["name"] if cache else None)
        if not name:
            raise CacheError("--teacher-source online needs --teacher (or a --cache that names one)")
        teacher, info = create_teacher(name, checkpoint=cfg.teacher_checkpoint, pretrained=not cfg.teacher_checkpoint)
        teacher = teacher.to(device)
        if cache is not None and info["weights_sha256"] != cache.manifest["teacher"]["weights_sha256"] and not cfg.force:
            raise CacheError("the online teacher's weights differ from the cache's teacher; pass --force")
        grid = grid or teacher.grid(recipe.input_size)
        num_classes = info["num_classes"] if cache is None else num_classes
        encoding = encoding or make_encoding("full", num_classes, grid[0] * grid[1])
    if cache is not None and plan_epochs < cfg.epochs and dist.main:
        print(f"note: the cache holds {plan_epochs} augmented epochs; training cycles them over {cfg.epochs} epochs")

    torch.manual_seed(cfg.seed + dist.rank)
    student = create_student(cfg.student, num_classes, recipe.input_size, grid or (1, 1), drop_path=cfg.drop_path)
    student = student.to(device)
    ema = ModelEmaV3(student, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    model = torch.nn.parallel.DistributedDataParallel(student) if dist.world > 1 else student
    optimizer = create_optimizer_v2(student, "adamw", lr=_lr(cfg, dist.world), weight_decay=cfg.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs, warmup_t=cfg.warmup_epochs,
                                  warmup_lr_init=cfg.warmup_lr, lr_min=cfg.min_lr)
    mode = "none" if cfg.teacher_source == "none" else "cskd"
    criterion = CSKDLoss(cfg.distill, cfg.tau, base_weight=1.0 if mode == "none" else cfg.base_weight,
                         distill_weight=0.0 if mode == "none" else cfg.distill_weight,
                         cskd_weight=0.0 if mode == "none" else cfg.cskd_weight)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path, metrics_path = os.path.join(cfg.out, "checkpoint.pth"), os.path.join(cfg.out, "last.json")
    start_epoch, history = 0, []
    if cfg.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)  # our own file
        _check_resume(cfg, ck.get("config", {}), ckpt_path)
        student.load_state_dict(ck["model"]), optimizer.load_state_dict(ck["optimizer"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        start_epoch, history = ck["epoch"] + 1, ck["history"]

    labels = torch.tensor(source.labels, dtype=torch.int64)
    dataset = PairDataset(source, recipe)
    global_batch = cfg.batch_size * dist.world
    steps = vpe // global_batch
    if steps == 0:
        raise CacheError(f"--batch-size {cfg.batch_size} x {dist.world} processes exceeds the {vpe} views of an epoch")
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    plan = lru_cache(maxsize=2)(plan)
    reader = BlockReader(cache) if cfg.teacher_source == "cache" else None
    val = _val_loader(cfg, recipe, dist) if cfg.val_data else None
    for epoch in range(start_epoch, min(cfg.epochs, cfg.stop_after or cfg.epochs)):
        scheduler.step(epoch)
        # Each (seed, epoch, rank) has its own random stream (drop path, dropout), so a resumed run draws exactly
        # what an uninterrupted one would, on every rank, without saving generator states.
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, dist.rank]).generate_state(1)[0]))
        pe = epoch % plan_epochs
        first = pe * vpe
        batches = [pair_items(plan, first + s * global_batch + dist.rank * cfg.batch_size,
                              first + s * global_batch + (dist.rank + 1) * cfg.batch_size, vpe) for s in range(steps)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers,
                                             collate_fn=collate_pairs, pin_memory=device.type == "cuda")
        model.train()
        sums, seen, t0 = {}, 0, time.time()
        bar = tqdm(loader, total=steps, desc=f"epoch {epoch}", unit="batch", disable=None if dist.main else True)
        for step, batch in enumerate(bar):
            if "error" in batch:
                raise CacheError(f"--data: {batch['error']}")
            v0 = int(batch["view"][0])
            v1 = v0 + len(batch["view"])
            x = batch["image"].to(device, non_blocking=True)
            ep = plan(pe)
            pos = np.arange(v0 - first, v1 - first)
            lam = torch.from_numpy(ep.lam[pos]).to(device)
            y_a, y_b = labels[ep.sample[pos]].to(device), labels[ep.sample[pos ^ 1]].to(device)
            target = mixup_target(y_a, y_b, lam, num_classes, recipe.label_smoothing)
            alpha = alpha_at(epoch, step, steps, cfg.epochs, cfg.alpha_schedule, cfg.alpha_per_step)
            teacher_kw = {}
            if mode != "none":
                arrays, spill = _teacher_outputs(cfg, reader, teacher, encoding, x, v0, v1, batch, device)
                teacher_kw = dict(teacher_global=encoding.decode_global(arrays),
                                  teacher_global_argmax=encoding.global_argmax(arrays),
                                  ckf_targets=encoding.decode_targets(arrays, alpha, spill))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(x)
            loss, parts = criterion({k: v.float() for k, v in out.items()}, target, **teacher_kw)
            if not math.isfinite(loss.item()):
                raise CacheError(f"loss is {loss.item()} at epoch {epoch} step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
            optimizer.step()
            if ema is not None:
                ema.update(student)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(x)
            seen += len(x)
            bar.set_postfix(loss=f"{parts['total']:.3f}", img_s=f"{seen * dist.world / (time.time() - t0):.0f}")
        seconds = time.time() - t0
        if dist.world > 1:  # losses over all ranks' views, not rank 0's alone
            totals = torch.tensor([seen, *sums.values()], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(totals)
            seen, sums = int(totals[0]), dict(zip(sums, totals[1:].tolist()))
        row = {"epoch": epoch, "alpha": alpha, "lr": optimizer.param_groups[0]["lr"],
               "img_per_s": seen / seconds, "teacher_source": cfg.teacher_source,
               **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()}}
        if val is not None:
            row.update(evaluate(student, val, device, dist))
            if ema is not None:
                row.update({f"ema_{k}": v for k, v in evaluate(ema.module, val, device, dist).items()})
        history.append(row)
        if dist.main:
            print(json.dumps(row))
            with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            torch.save({"model": student.state_dict(), "optimizer": optimizer.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None, "epoch": epoch,
                        "history": history, "config": asdict(cfg)},
                       ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)  # a kill never leaves a half-written checkpoint
            with open(metrics_path, "w") as f:
                json.dump(row, f)
        dist.barrier()
    return history


def _teacher_outputs(cfg, reader, teacher, encoding, x, v0, v1, batch, device):
    """Encoded teacher outputs for views [v0, v1): read from the cache, or the online teacher's, encoded alike."""
    if cfg.teacher_source == "cache":
        arrays, want, spill = reader.read(v0, v1)
        if not np.array_equal(want, batch["fingerprint"].numpy()):
            bad = v0 + int(np.flatnonzero(want != batch["fingerprint"].numpy())[0])
            raise CacheError(f"replay drift at view {bad}: the augmented pixels differ from those the teacher saw "
                             "(augmentation code, library versions or images changed since the cache was made; "
                             f"it recorded {reader.cache.manifest['recipe']['library_versions']})")
        return to_torch(arrays, device), (None if spill is None else to_torch(spill, device))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        dense, glob = teacher(x)
    arrays, spill = encoding.encode(dense.float(), glob.float())
    return arrays, spill


def _val_loader(cfg: TrainConfig, recipe: Recipe, dist: Dist):
    """This rank's share of the validation set (every world-th image), at the recipe's eval transform."""
    source = open_source(cfg.val_data)
    transform = build_eval_transform(recipe)
    ids = list(range(dist.rank, len(source), dist.world))
    return torch.utils.data.DataLoader(LabeledImages(source, transform, ids), batch_size=cfg.batch_size,
                                       num_workers=cfg.workers)


@torch.no_grad()
def evaluate(model, loader, device, dist: Dist | None = None) -> dict:
    """Top-1/top-5 of the CSKD prediction (mean of class head, distillation head and mean dense logits),
    summed over all ranks' shares of the validation set."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, images
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model.predict(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts += torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(dim=1).sum(),
                               torch.tensor(len(y), device=device)]).double()
    if dist is not None and dist.world > 1:
        torch.distributed.all_reduce(counts)
    c1, c5, n = counts.tolist()
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1)}
