"""`setup`: everything a training run decides before its first step: the views (from a cache, or planned), the
teacher side (cached outputs, an online teacher, or none), the loss, the student and its optimizer; and the state of
a run being resumed. The epoch loop (train.py) only uses what this returns."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from ..cache import store
from ..cache.encoding import Encoding
from ..cache.encodings import make_encoding
from ..cache.store import Cache
from ..data.matching import match_samples
from ..data.open import open_source
from ..data.plan import make_epoch_plan
from ..data.recipe import Recipe, build_eval_transform
from ..data.source import LabeledImages
from ..distributed import Dist
from ..errors import CacheError, DataError
from ..teacher.model import create_teacher, resolve_precision
from .checkpoint import refuse_overwrite
from .checkpoint import resume as _resume
from .config import TrainConfig, check_flags, lr_for
from .engine import TeacherTargets
from .losses import CSKDLoss
from .student import create_student


@dataclass
class Views:
    """What the run trains on: the images, their plan, and what the teacher side is for them."""

    source: object
    recipe: Recipe
    plan: object  # epoch -> EpochPlan
    plan_epochs: list  # the cached epochs training reads, cycled
    views_per_epoch: int
    stride: int  # views per epoch slot in the cache (epoch * stride + position)
    block: int  # views per block when a cycle reorders the cache (its chunk size)
    num_classes: int
    grid: tuple | None
    encoding: Encoding | None
    identity: dict  # what the teacher targets depend on (a cache's identity); a resume must match it
    cache: Cache | None = None


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


def setup(cfg: TrainConfig, dist: Dist) -> Run:
    """Data, cache, teacher, student, optimizer, loss; and the state of a run being resumed."""
    check_flags(cfg)
    refuse_overwrite(cfg)
    device = dist.device(cfg.device)
    source = open_source(cfg.data)
    cache = Cache.open(cfg.cache) if cfg.cache else None
    if cfg.teacher_source == "cache" and cache is None:
        raise CacheError("--teacher-source cache needs --cache (or use --teacher-source online / none)")
    val = _val_loader(cfg, recipe_of(cache, cfg), dist) if cfg.val_data else None  # fail early on a bad path
    views = _cached_views(cfg, cache, source, dist) if cache is not None else _planned_views(cfg, source)
    teacher = _online_teacher(cfg, views, device) if cfg.teacher_source == "online" else None
    criterion = _criterion(cfg, views.encoding, dist)
    # The same initial weights on every rank (DDP would broadcast rank 0's anyway), then DDP, then the EMA of
    # those weights: an EMA built before the broadcast would start from each rank's own init.
    torch.manual_seed(cfg.seed)
    student = create_student(cfg.student, views.num_classes, views.recipe.input_size, views.grid or (1, 1),
                             drop_path=cfg.drop_path, view_mean=views.recipe.mean, view_std=views.recipe.std).to(device)
    if cfg.teacher_source == "none":  # nothing trains the distillation head: frozen, so DDP expects no gradient
        student.model.head_dist.requires_grad_(False)
    model = torch.nn.parallel.DistributedDataParallel(student) if dist.world > 1 else student
    if cfg.compile:
        model = torch.compile(model)  # the training forward only; evaluation and the EMA use the plain module
    ema = ModelEmaV3(student, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = create_optimizer_v2(student, "adamw", lr=lr_for(cfg, dist.world), weight_decay=cfg.weight_decay)
    scheduler = _scheduler(cfg, optimizer, dist)
    vpe = views.views_per_epoch
    steps = vpe // (cfg.batch_size * dist.world)
    if steps == 0:
        raise CacheError(f"--batch-size {cfg.batch_size} x {dist.world} processes exceeds the {vpe} views of an epoch")
    run = Run(cfg=cfg, dist=dist, device=device, source=views.source, recipe=views.recipe,
              plan=lru_cache(maxsize=2)(views.plan), plan_epochs=views.plan_epochs, views_per_epoch=vpe,
              stride=views.stride, block=views.block, num_classes=views.num_classes, student=student, model=model,
              ema=ema, optimizer=optimizer, scheduler=scheduler, criterion=criterion,
              targets=TeacherTargets(views.encoding, criterion.needs, teacher), identity=views.identity,
              cache_url=cfg.cache if cfg.teacher_source == "cache" else None,
              cache_manifest=cache.manifest if cache is not None else {},
              fingerprint_kind=cache.fingerprint_kind if cache is not None else "sha1-int16",
              signature_kind=cache.signature_kind if cache is not None else "sketch64",
              steps=min(steps, cfg.max_steps) if cfg.max_steps else steps)
    _resume(run)
    run.val = val
    return run


def _scheduler(cfg: TrainConfig, optimizer, dist: Dist) -> CosineLRScheduler:
    """DeiT's schedule: linear warmup, then cosine to --min-lr, stepped per epoch. A warmup as long as the run
    never reaches the learning rate asked for: said, not left silent."""
    if dist.main and cfg.warmup_epochs >= cfg.epochs:
        peak = optimizer.param_groups[0]["lr"]
        print(f"warning: --warmup-epochs {cfg.warmup_epochs} >= --epochs {cfg.epochs}: the learning rate rises from "
              f"--warmup-lr {cfg.warmup_lr:g} for the whole run and never reaches {peak:.3g}; pass a --warmup-epochs "
              "below --epochs (DeiT: 5 of 300)")
    # timm warns that a one-epoch cosine has no effect; true, and nothing for the user to do
    log = logging.getLogger("timm.scheduler.cosine_lr")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(optimizer, t_initial=cfg.epochs, warmup_t=cfg.warmup_epochs,
                                 warmup_lr_init=cfg.warmup_lr, lr_min=cfg.min_lr)
    finally:
        log.setLevel(level)


def recipe_of(cache: Cache | None, cfg: TrainConfig) -> Recipe:
    """The views' recipe: the cache's, or DeiT's at --input-size and --replay."""
    if cache is None:
        return Recipe(input_size=cfg.input_size or 224, replay=cfg.replay or "pil").check()
    if cfg.replay is not None and cfg.replay != cache.recipe.replay:
        raise CacheError(f"--replay {cfg.replay}: --cache {cfg.cache} was made with --replay {cache.recipe.replay} "
                         f"(other pixels: the teacher's outputs belong to those); train with --replay "
                         f"{cache.recipe.replay}, or precompute a cache with --replay {cfg.replay}")
    return cache.recipe


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
                         f"{m['dataset']['fingerprint'][:12]} vs --data {fp[:12]}){_other_packaging(cache, source)}")
    if max(source.labels) >= m["num_classes"] and not cfg.force:
        raise CacheError(f"--data has {max(source.labels) + 1} classes but the cache's teacher has "
                         f"{m['num_classes']}; pass --force to use it anyway")
    if m["num_classes"] != len(source.classes) and m["dataset"].get("label_space") != "teacher" and not cfg.force:
        raise CacheError(f"--cache {cfg.cache} holds a {m['num_classes']}-class teacher's outputs but --data has "
                         f"{len(source.classes)} classes (the cache does not say they share a label space); "
                         "fine-tune the teacher on this dataset (cskd-cache fit-teacher) and precompute again, or "
                         "pass --force")


def _other_packaging(cache: Cache, source) -> str:
    """What to pass when --data's keys are not the cache's: the same images under other names are found with
    --match (tried here by file stem: cheap); --force would pair cached targets with whatever images it finds."""
    keys, labels = cache.sample_keys(), cache.sample_labels()
    for how, say in (("key", "--data holds every cached sample under its key (and other samples): pass --force "
                             "to train on the cached ones"),
                     ("stem", "--match stem finds every cached sample in --data by file name (another packaging of "
                              "the same images): pass --match stem")):
        try:
            match_samples(keys, labels, source, how)
            return f"; {say}"
        except DataError:
            pass
    content = " or --match content (by file contents: this cache stored them)" if cache.sample_hashes() is not None \
        else " (or --match content, with a cache made with precompute --content-hash)"
    return (f"; if --data holds the same images packaged otherwise, pass --match stem (by file name){content}; "
            "else precompute a cache from --data")


def _cached_views(cfg: TrainConfig, cache: Cache, source, dist: Dist) -> Views:
    """The cache's views, over the samples of --data that it was made from (matched by key, stem or content)."""
    _check_cache(cfg, cache, source)
    # --force cannot help a missing sample: the cached views were made from images --data does not have
    ids, report = match_samples(cache.sample_keys(), cache.sample_labels(), source, cfg.match,
                                cache.sample_hashes() if cfg.match == "content" else None)
    if dist.main and cfg.match != "key":
        print(report)
    recipe = recipe_of(cache, cfg)
    if cfg.input_size is not None and cfg.input_size != recipe.input_size:
        raise CacheError(f"--input-size {cfg.input_size} does not fit --cache {cfg.cache}, whose views are "
                         f"{recipe.input_size} px; drop --input-size, or precompute a cache at {cfg.input_size} px")
    return Views(source=source.subset(ids), recipe=recipe, plan=cache.epoch_plan, plan_epochs=cache.usable_epochs,
                 views_per_epoch=cache.views_per_epoch, stride=cache.stride,
                 block=cache.manifest["layout"]["chunk_views"], num_classes=cache.manifest["num_classes"],
                 grid=tuple(cache.manifest["grid"]), encoding=cache.encoding, identity=store.identity(cache.manifest),
                 cache=cache)


def _planned_views(cfg: TrainConfig, source) -> Views:
    """No cache: DeiT's recipe at --input-size, planned like a cache would be (the online teacher runs on them)."""
    recipe = recipe_of(None, cfg)
    params = recipe.plan_params(len(source), cfg.plan_epochs or cfg.epochs, cfg.seed, cfg.repeats)
    vpe = params.views_per_epoch
    # plan epochs follow --epochs, which a resume may extend; an epoch's plan does not depend on their count
    identity = {"plan": {k: v for k, v in params.to_dict().items() if k != "epochs"},
                "recipe": store.identity({"recipe": recipe.to_dict()})["recipe"]}
    return Views(source=source, recipe=recipe, plan=lambda e: make_epoch_plan(params, e),
                 plan_epochs=list(range(params.epochs)), views_per_epoch=vpe, stride=vpe, block=64,
                 num_classes=len(source.classes), grid=None, encoding=None, identity=identity)


def _online_teacher(cfg: TrainConfig, views: Views, device: torch.device):
    """The teacher run on the replayed views: the cache's (same weights, its precision) or --teacher. Its outputs go
    through the `full` encoding, whose CKF targets equal every cache's exact ones. Completes `views`."""
    cache, recipe = views.cache, views.recipe
    name = cfg.teacher or (cache.manifest["teacher"]["name"] if cache else None)
    if not name:
        raise CacheError("--teacher-source online needs --teacher (or a --cache that names one)")
    precision = cfg.teacher_precision or (cache.manifest["teacher"].get("precision") if cache else None)
    recorded = cache.manifest["teacher"].get("checkpoint") if cache else None
    teacher, info = create_teacher(name, checkpoint=cfg.teacher_checkpoint, pretrained=not cfg.teacher_checkpoint,
                                   view_mean=recipe.mean, view_std=recipe.std,
                                   precision=resolve_precision(precision, device), recorded=recorded)
    teacher = teacher.to(device)
    if device.type == "cuda":  # as precompute runs it: convolutions in channels_last are faster under autocast
        teacher = teacher.to(memory_format=torch.channels_last)
    if cache is not None and info["weights_sha256"] != cache.manifest["teacher"]["weights_sha256"] and not cfg.force:
        raise CacheError("the online teacher's weights differ from the cache's teacher; pass --force")
    views.grid = views.grid or teacher.grid(recipe.input_size)
    if cache is None:
        views.num_classes = info["num_classes"]
        if views.num_classes != len(views.source.classes) and not cfg.force:
            raise CacheError(f"the online teacher has {views.num_classes} classes but --data has "
                             f"{len(views.source.classes)}; fine-tune it on this dataset first (cskd-cache "
                             "fit-teacher), or pass --force if the dataset's labels are the teacher's class ids")
        views.identity["teacher"] = {k: info[k] for k in ("name", "weights_sha256", "precision")}
    views.encoding = make_encoding("full", views.num_classes, views.grid[0] * views.grid[1])  # fuse and argmax
    return teacher


def _criterion(cfg: TrainConfig, encoding: Encoding | None, dist: Dist) -> CSKDLoss:
    """The official weights, or plain DeiT's loss without a teacher; refused or noted where the encoding cannot
    give a soft loss exactly."""
    if cfg.teacher_source == "none":
        return CSKDLoss(cfg.distill, cfg.tau, base_weight=1.0, distill_weight=0.0, cskd_weight=0.0,
                        cskd_type=cfg.cskd_loss)
    criterion = CSKDLoss(cfg.distill, cfg.tau, base_weight=cfg.base_weight, distill_weight=cfg.distill_weight,
                         cskd_weight=cfg.cskd_weight, cskd_type=cfg.cskd_loss)
    if "ckf_logits" in criterion.needs and encoding.soft_ckf == "none":
        raise CacheError(f"--cskd-loss soft needs dense logits of every class, which the {encoding.name} encoding "
                         "does not keep; precompute with --encoding full (exact) or topk (approximate), or use "
                         "--cskd-loss hard")
    if dist.main and cfg.teacher_source == "cache":
        approx = [what for what, need, exact in (
            ("soft distillation", "teacher_global", encoding.exact_global),
            ("soft CKF", "ckf_logits", encoding.soft_ckf == "exact")) if need in criterion.needs and not exact]
        if approx:
            print(f"note: {' and '.join(approx)} from a {encoding.name} cache use(s) its top-k approximation of the "
                  "teacher's distribution (stored probabilities exact, the rest spread evenly); a cache made with "
                  "precompute --encoding full is exact")
    return criterion


def _val_loader(cfg: TrainConfig, recipe: Recipe, dist: Dist):
    """This rank's share of the validation set (every world-th image), at the recipe's eval transform."""
    source = open_source(cfg.val_data, flag="--val-data")
    transform = build_eval_transform(recipe)
    ids = list(range(dist.rank, len(source), dist.world))
    return torch.utils.data.DataLoader(LabeledImages(source, transform, ids), batch_size=cfg.batch_size,
                                       num_workers=cfg.workers)
