"""Stage two: train a DeiT student with CSKD, reading teacher outputs from the cache (or running the teacher).

One code path for three teacher sources: `cache` decodes the cached encoding, `online` runs the teacher on the
same replayed views (its targets equal the cache's exactly), `none` trains plain DeiT. `train()` reads like
DeiT's main.py: set the run up (`setup`), then per epoch `train_one_epoch`, `evaluate`, and a checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from . import store
from .data import LabeledImages, match_samples, open_source
from .distributed import Dist, init_distributed
from .checkpoint import resume as _resume, save as _save
from .encodings import make_encoding
from .engine import TeacherTargets, evaluate, train_one_epoch
from .errors import CacheError
from .loader import RankBatches, epoch_loader, library_drift
from .losses import CSKD_TYPES, DISTILL_TYPES, CSKDLoss, alpha_at
from .order import MAX_MEASURED_REUSE, epoch_views, reuse_factor
from .plan import make_epoch_plan
from .store import Cache
from .student import create_student
from .teacher import create_teacher, resolve_precision
from .views import PairDataset, Recipe, build_eval_transform, replay_tolerance


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
    teacher_precision: str | None = None  # online: default the cache's (else fp16 on a GPU, fp32 on a CPU)
    alpha_schedule: str = "linear"
    alpha_per_step: bool = False
    distill: str = "hard"
    cskd_loss: str = "hard"  # hard CKF targets (paper default) | soft (KL on the fused logits, official option)
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
    repeats: int = 3  # no cache: repeated augmentation of the plan (a cache brings its own)
    max_steps: int | None = None  # per epoch, for quick runs
    stop_after: int | None = None  # stop (resumably) once this many epochs are done: budgets, resume tests
    input_size: int | None = None  # no cache: the view size (default 224); a cache brings its own recipe
    match: str = "key"  # how --data's images are matched to the cache's samples: key | stem | content
    replay_tolerance: float | None = None  # signature distance a replayed view may drift by (None: the cache's
    # signature's default; 0: exact pixels only)
    compile: bool = False  # torch.compile the student's training forward (pays off on a GPU, in long runs)
    tensorboard: bool = False  # also write OUT/tensorboard event files


@dataclass
class Run:
    """Everything `setup` decides; the epoch loop only uses it."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    source: object
    recipe: Recipe
    plan: object  # epoch -> EpochPlan
    plan_epochs: list  # the cached epochs training reads, cycled
    views_per_epoch: int
    stride: int  # views per epoch slot in the cache (epoch * stride + position)
    block: int  # views per block when a cycle reorders the cache (its chunk size)
    num_classes: int
    student: torch.nn.Module
    model: torch.nn.Module  # the student, or its DDP wrapper
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    criterion: CSKDLoss
    targets: TeacherTargets
    identity: dict  # what the teacher targets depend on (a cache's identity); a resume must match it
    cache_url: str | None = None
    steps: int = 0
    start_epoch: int = 0
    history: list = field(default_factory=list)
    val: object = None
    loader: object = None  # created by the first epoch, reused by the next ones
    fingerprint_kind: str = "sha1-int16"
    signature_kind: str = "sketch64"
    cache_manifest: dict = field(default_factory=dict)
    batches: object = None


def _check_cache(cfg: TrainConfig, cache: Cache, source) -> None:
    m = cache.manifest
    problems = cache.layout_problems()
    if problems:
        raise CacheError(f"--cache {cfg.cache} does not match its own manifest ({problems[0]}); it is damaged: run "
                         f"`cskd-cache verify {cfg.cache}`")
    if not cache.usable_epochs:
        foreign = cache.foreign_shards()
        why = f" ({len(foreign)} shards were written by another run)" if len(foreign) else ""
        raise CacheError(f"--cache {cfg.cache} is incomplete{why}; finish it with the same precompute command")
    fp = source.fingerprint()
    if cfg.match == "key" and m["dataset"]["fingerprint"] != fp and not cfg.force:
        raise CacheError(f"--cache {cfg.cache} was made from another dataset (fingerprint "
                         f"{m['dataset']['fingerprint'][:12]} vs --data {fp[:12]}); pass --force to use it anyway")
    if max(source.labels) >= m["num_classes"] and not cfg.force:
        raise CacheError(f"--data has {max(source.labels) + 1} classes but the cache's teacher has "
                         f"{m['num_classes']}; pass --force to use it anyway")
    if m["num_classes"] != len(source.classes) and m["dataset"].get("label_space") != "teacher" and not cfg.force:
        raise CacheError(f"--cache {cfg.cache} holds a {m['num_classes']}-class teacher's outputs but --data has "
                         f"{len(source.classes)} classes (the cache does not say they share a label space); "
                         "fine-tune the teacher on this dataset (cskd-cache fit-teacher) and precompute again, or "
                         "pass --force")


def _lr(cfg: TrainConfig, world: int) -> float:
    return cfg.lr if cfg.lr is not None else 5e-4 * cfg.batch_size * world / 512


def _check_flags(cfg: TrainConfig) -> None:
    if cfg.teacher_source not in ("cache", "online", "none"):
        raise CacheError("--teacher-source must be cache, online or none")
    if cfg.batch_size < 2 or cfg.batch_size % 2:
        raise CacheError("--batch-size must be an even number >= 2 (views come in mixing pairs)")
    if cfg.distill not in DISTILL_TYPES:
        raise CacheError(f"--distill {cfg.distill!r}: use one of {', '.join(DISTILL_TYPES)}")
    if cfg.cskd_loss not in CSKD_TYPES:
        raise CacheError(f"--cskd-loss {cfg.cskd_loss!r}: use one of {', '.join(CSKD_TYPES)}")
    for flag, v in (("--epochs", cfg.epochs), ("--repeats", cfg.repeats), ("--max-steps", cfg.max_steps or 1),
                    ("--stop-after", cfg.stop_after or 1), ("--plan-epochs", cfg.plan_epochs or 1)):
        if v < 1:
            raise CacheError(f"{flag} must be >= 1, got {v}")
    for flag, v in (("--tau", cfg.tau), ("--lr", cfg.lr if cfg.lr is not None else 1.0),
                    ("--clip-grad", cfg.clip_grad if cfg.clip_grad is not None else 1.0)):
        if not v > 0:
            raise CacheError(f"{flag} must be > 0, got {v}")
    for flag, v in (("--weight-decay", cfg.weight_decay), ("--warmup-epochs", cfg.warmup_epochs),
                    ("--min-lr", cfg.min_lr), ("--warmup-lr", cfg.warmup_lr), ("--base-weight", cfg.base_weight),
                    ("--distill-weight", cfg.distill_weight), ("--cskd-weight", cfg.cskd_weight),
                    ("--workers", cfg.workers)):
        if v < 0:
            raise CacheError(f"{flag} must be >= 0, got {v}")
    if cfg.replay_tolerance is not None and cfg.replay_tolerance < 0:
        raise CacheError(f"--replay-tolerance must be >= 0, got {cfg.replay_tolerance}")
    if not 0.0 <= cfg.drop_path <= 1.0 or not 0.0 <= cfg.ema_decay <= 1.0:
        raise CacheError("--drop-path and --ema-decay must be between 0 and 1")
    if cfg.input_size is not None and cfg.input_size < 16:
        raise CacheError(f"--input-size must be >= 16, got {cfg.input_size}")


def setup(cfg: TrainConfig, dist: Dist) -> Run:
    """Data, cache, teacher, student, optimizer, loss; and the state of a run being resumed."""
    _check_flags(cfg)
    device = dist.device(cfg.device)
    source = open_source(cfg.data)
    cache = Cache.open(cfg.cache) if cfg.cache else None
    if cfg.teacher_source == "cache" and cache is None:
        raise CacheError("--teacher-source cache needs --cache (or use --teacher-source online / none)")
    val = _val_loader(cfg, recipe_of(cache, cfg), dist) if cfg.val_data else None  # fail early on a bad path
    if cache is not None:
        _check_cache(cfg, cache, source)
        # --force cannot help a missing sample: the cached views were made from images --data does not have
        ids, report = match_samples(cache.sample_keys(), cache.sample_labels(), source, cfg.match,
                                    cache.sample_hashes() if cfg.match == "content" else None)
        if dist.main and cfg.match != "key":
            print(report)
        source = source.subset(ids)
        recipe = recipe_of(cache, cfg)
        if cfg.input_size is not None and cfg.input_size != recipe.input_size:
            raise CacheError(f"--input-size {cfg.input_size} does not fit --cache {cfg.cache}, whose views are "
                             f"{recipe.input_size} px; drop --input-size, or precompute a cache at "
                             f"{cfg.input_size} px")
        num_classes, grid, encoding = cache.manifest["num_classes"], tuple(cache.manifest["grid"]), cache.encoding
        plan, plan_epochs, vpe, stride = cache.epoch_plan, cache.usable_epochs, cache.views_per_epoch, cache.stride
        block, identity = cache.manifest["layout"]["chunk_views"], store.identity(cache.manifest)
    else:
        recipe = recipe_of(cache, cfg)
        num_classes = len(source.classes)
        params = recipe.plan_params(len(source), cfg.plan_epochs or cfg.epochs, cfg.seed, cfg.repeats)
        plan, vpe = (lambda e: make_epoch_plan(params, e)), params.views_per_epoch
        plan_epochs, stride = list(range(params.epochs)), vpe
        grid, encoding, block = None, None, 64
        # plan epochs follow --epochs, which a resume may extend; an epoch's plan does not depend on their count
        identity = {"plan": {k: v for k, v in params.to_dict().items() if k != "epochs"},
                    "recipe": store.identity({"recipe": recipe.to_dict()})["recipe"]}

    teacher = None
    if cfg.teacher_source == "online":
        name = cfg.teacher or (cache.manifest["teacher"]["name"] if cache else None)
        if not name:
            raise CacheError("--teacher-source online needs --teacher (or a --cache that names one)")
        precision = cfg.teacher_precision or (cache.manifest["teacher"].get("precision") if cache else None)
        recorded = cache.manifest["teacher"].get("checkpoint") if cache else None
        teacher, info = create_teacher(name, checkpoint=cfg.teacher_checkpoint, pretrained=not cfg.teacher_checkpoint,
                                       view_mean=recipe.mean, view_std=recipe.std,
                                       precision=resolve_precision(precision, device), recorded=recorded)
        teacher = teacher.to(device)
        same = cache is None or info["weights_sha256"] == cache.manifest["teacher"]["weights_sha256"]
        if not same and not cfg.force:
            raise CacheError("the online teacher's weights differ from the cache's teacher; pass --force")
        grid = grid or teacher.grid(recipe.input_size)
        num_classes = info["num_classes"] if cache is None else num_classes
        if cache is None and num_classes != len(source.classes) and not cfg.force:
            raise CacheError(f"the online teacher has {num_classes} classes but --data has {len(source.classes)}; "
                             "fine-tune it on this dataset first (cskd-cache fit-teacher), or pass --force if the "
                             "dataset's labels are the teacher's class ids")
        encoding = make_encoding("full", num_classes, grid[0] * grid[1])  # exact: fuse and argmax directly
        if cache is None:
            identity["teacher"] = {k: info[k] for k in ("name", "weights_sha256", "precision")}

    mode = "none" if cfg.teacher_source == "none" else "cskd"
    criterion = CSKDLoss(cfg.distill, cfg.tau, base_weight=1.0 if mode == "none" else cfg.base_weight,
                         distill_weight=0.0 if mode == "none" else cfg.distill_weight,
                         cskd_weight=0.0 if mode == "none" else cfg.cskd_weight, cskd_type=cfg.cskd_loss)
    if "ckf_logits" in criterion.needs and encoding.soft_ckf == "none":
        raise CacheError(f"--cskd-loss soft needs dense logits of every class, which the {encoding.name} encoding "
                         "does not keep; precompute with --encoding full (exact) or topk (approximate), or use "
                         "--cskd-loss hard")
    if dist.main and mode != "none" and cfg.teacher_source == "cache":
        approx = [what for what, need, exact in (
            ("soft distillation", "teacher_global", encoding.exact_global),
            ("soft CKF", "ckf_logits", encoding.soft_ckf == "exact")) if need in criterion.needs and not exact]
        if approx:
            print(f"note: {' and '.join(approx)} from a {encoding.name} cache use(s) its top-k approximation of the "
                  "teacher's distribution (stored probabilities exact, the rest spread evenly); --encoding full "
                  "is exact")

    # The same initial weights on every rank (DDP would broadcast rank 0's anyway), then DDP, then the EMA of
    # those weights: an EMA built before the broadcast would start from each rank's own init.
    torch.manual_seed(cfg.seed)
    student = create_student(cfg.student, num_classes, recipe.input_size, grid or (1, 1), drop_path=cfg.drop_path,
                             view_mean=recipe.mean, view_std=recipe.std).to(device)
    if mode == "none":  # no teacher, nothing trains the distillation head: frozen, so DDP expects no gradient for it
        student.model.head_dist.requires_grad_(False)
    model = torch.nn.parallel.DistributedDataParallel(student) if dist.world > 1 else student
    if cfg.compile:
        model = torch.compile(model)  # the training forward only; evaluation and the EMA use the plain module
    ema = ModelEmaV3(student, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = create_optimizer_v2(student, "adamw", lr=_lr(cfg, dist.world), weight_decay=cfg.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs, warmup_t=cfg.warmup_epochs,
                                  warmup_lr_init=cfg.warmup_lr, lr_min=cfg.min_lr)
    steps = vpe // (cfg.batch_size * dist.world)
    if steps == 0:
        raise CacheError(f"--batch-size {cfg.batch_size} x {dist.world} processes exceeds the {vpe} views of an epoch")
    run = Run(cfg=cfg, dist=dist, device=device, source=source, recipe=recipe, plan=lru_cache(maxsize=2)(plan),
              plan_epochs=plan_epochs, views_per_epoch=vpe, stride=stride, block=block, num_classes=num_classes,
              student=student,
              model=model, ema=ema, optimizer=optimizer, scheduler=scheduler, criterion=criterion,
              targets=TeacherTargets(encoding, criterion.needs, teacher), identity=identity,
              cache_url=cfg.cache if cfg.teacher_source == "cache" else None,
              cache_manifest=cache.manifest if cache is not None else {},
              fingerprint_kind=cache.fingerprint_kind if cache is not None else "sha1-int16",
              signature_kind=cache.signature_kind if cache is not None else "sketch64",
              steps=min(steps, cfg.max_steps) if cfg.max_steps else steps)
    _resume(run)
    run.val = val
    return run


def recipe_of(cache: Cache | None, cfg: TrainConfig) -> Recipe:
    """The views' recipe: the cache's, or DeiT's at --input-size."""
    return cache.recipe if cache is not None else Recipe(input_size=cfg.input_size or 224)


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
    dataset = PairDataset(run.source, run.recipe, run.fingerprint_kind, run.signature_kind)
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
        run.batches = RankBatches(run.plan, views, run.stride, cfg.batch_size, dist.rank, dist.world)
        run.loader = epoch_loader(dataset, run.batches, run.cache_url, cfg.workers, run.device.type == "cuda",
                                  cfg.replay_tolerance)
    run.batches.views = views
    loader = run.loader
    per_step = lambda step: alpha_at(epoch, step, run.steps, cfg.epochs, cfg.alpha_schedule, cfg.alpha_per_step)
    stats = train_one_epoch(run.model, run.criterion, loader, run.optimizer, run.device, epoch,
                            targets=run.targets, alpha_at=per_step, num_classes=run.num_classes,
                            smoothing=run.recipe.label_smoothing, ema=run.ema, clip_grad=cfg.clip_grad,
                            show_progress=dist.main)
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


def _val_loader(cfg: TrainConfig, recipe: Recipe, dist: Dist):
    """This rank's share of the validation set (every world-th image), at the recipe's eval transform."""
    source = open_source(cfg.val_data, flag="--val-data")
    transform = build_eval_transform(recipe)
    ids = list(range(dist.rank, len(source), dist.world))
    return torch.utils.data.DataLoader(LabeledImages(source, transform, ids), batch_size=cfg.batch_size,
                                       num_workers=cfg.workers)
