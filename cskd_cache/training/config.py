"""`train`'s settings (every flag of the command) and their checks, made where they enter."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CacheError
from .losses import CSKD_TYPES, DISTILL_TYPES


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
    replay: str | None = None  # replay backend, pil | tensor (None: the cache's; pil without a cache)
    match: str = "key"  # how --data's images are matched to the cache's samples: key | stem | content
    replay_tolerance: float | None = None  # signature distance a replayed view may drift by (None: the cache's
    # signature's default; 0: exact pixels only)
    check_every: int = 8  # fingerprint every view of the first steps, then a pair in `check_every` (1: all)
    compile: bool = False  # torch.compile the student's training forward (pays off on a GPU, in long runs)
    tensorboard: bool = False  # also write OUT/tensorboard event files


def lr_for(cfg: TrainConfig, world: int) -> float:
    return cfg.lr if cfg.lr is not None else 5e-4 * cfg.batch_size * world / 512


def check_flags(cfg: TrainConfig) -> None:
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
    if cfg.check_every < 1:
        raise CacheError(f"--check-every must be >= 1 (1 checks every view), got {cfg.check_every}")
    if cfg.replay_tolerance is not None and cfg.replay_tolerance < 0:
        raise CacheError(f"--replay-tolerance must be >= 0, got {cfg.replay_tolerance}")
    if not 0.0 <= cfg.drop_path <= 1.0 or not 0.0 <= cfg.ema_decay <= 1.0:
        raise CacheError("--drop-path and --ema-decay must be between 0 and 1")
    if cfg.input_size is not None and cfg.input_size < 16:
        raise CacheError(f"--input-size must be >= 16, got {cfg.input_size}")


