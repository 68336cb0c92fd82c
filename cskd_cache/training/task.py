"""CSKD as a timm training task, for timm's train.py-style loops (timm >= 1.0.23: `timm.task`).

Shaped like timm's `TokenDistillationTask`: the student is the trainable module, the teacher is a model name,
a module or a `DistillationTeacher`, `distill_type` is 'hard' or 'soft', and the loss weights are named the same
way (`task_loss_weight`, `distill_loss_weight`) plus `cskd_loss_weight` for the patch tokens. What CSKD adds: the
distillation head also reads every patch token, and the patch tokens learn the CKF targets at the current alpha.
The teacher's outputs come from a cache (pass `teacher=batch["teacher"]` to forward, with `encoding`) or from an
online teacher (`teacher_model`), through the same exact fusion.

    task = CSKDTask(student, cache=views, epochs=300)                      # from a cache
    task = CSKDTask(student, teacher_model="regnety_160", epochs=300)       # online
    task.set_epoch(epoch)
    out = task(x, target, teacher=batch.get("teacher"), spill=batch.get("spill"))
    out["loss"].backward()
"""

from __future__ import annotations

import torch
from timm.task import DistillationTeacher, TrainingTask
from torch import nn

from ..cache.encoding import Encoding
from ..cache.encodings import make_encoding
from ..cache.store import Cache
from ..errors import CacheError
from ..teacher.model import (TEACHER_ALIASES, DenseTeacher, create_teacher, require_hub, resolve_precision,
                             state_dict_sha256)
from .engine import TeacherTargets
from .losses import CSKDLoss, alpha_at
from .student import CSKDStudent


def _open_cache(cache):
    """A Cache from a Cache, a CachedViews or a path/URL."""
    if cache is None or isinstance(cache, Cache):
        return cache
    if hasattr(cache, "cache") and isinstance(cache.cache, Cache):  # CachedViews
        return cache.cache
    return Cache.open(str(cache))


def _teacher_model(teacher, num_classes: int, pretrained_path: str | None, overlay: dict | None) -> nn.Module:
    """The teacher as an nn.Module with the student's classes. A local file is loaded weights-only and strictly
    (its classifier says its classes); hub weights keep their own head. A teacher whose classes differ from the
    student's is refused: timm would put a random head on it, silently (its targets would be noise)."""
    if isinstance(teacher, DistillationTeacher):
        teacher = teacher.model
    if isinstance(teacher, str):
        if pretrained_path:
            teacher = create_teacher(teacher, checkpoint=pretrained_path)[0].model
        else:
            import timm

            require_hub("teacher_model", instead="teacher_pretrained_path=PATH")
            kw = {"pretrained_cfg_overlay": dict(overlay)} if overlay else {}
            teacher = timm.create_model(TEACHER_ALIASES.get(teacher, teacher), pretrained=True, **kw)
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher_model must be a model name, an nn.Module or a DistillationTeacher, got {teacher!r}")
    have = getattr(teacher, "num_classes", None)
    if have is not None and have != num_classes:
        raise CacheError(f"the teacher has {have} classes, the student {num_classes}; fine-tune the teacher on this "
                         "dataset first (cskd-cache fit-teacher) and give its weights (teacher_pretrained_path)")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class CSKDTask(TrainingTask):
    """CSKD: task loss on the class head, distillation on the distillation token, CKF targets on the patch tokens.

    Args:
        student_model: a CSKDStudent (`cskd_cache.create_student`, or `CachedViews.student`)
        teacher_model: None (outputs come from a cache: give `cache` or `encoding`), a timm CNN name (hub weights,
            or `teacher_pretrained_path` for a local .pth/.safetensors, loaded weights-only), an nn.Module, or a
            timm DistillationTeacher (its model is used, with the dense head applied at every position). Its
            classes must be the student's (a hub head of another size is refused, never replaced at random).
        cache: the cache the batches come from (a `Cache`, a `CachedViews` or its path): gives the encoding, and
            the teacher precision and weights an online teacher must match
        encoding: the cache's Encoding, when `cache` is not given
        distill_type: 'hard' (DeiT's and CSKD's default) or 'soft'; cskd_type: 'hard' or 'soft'
        task_loss_weight, distill_loss_weight, cskd_loss_weight: 0.5, 0.5, 1.0 (the official configs)
        temperature: of the soft losses
        alpha_schedule, epochs: CKF's alpha = schedule(epoch / epochs), set with `set_epoch`
        teacher_precision: fp32 | fp16 | bf16 for an online teacher; default: the cache's, else fp16 autocast on a
            GPU (the official code's) and fp32 on a CPU
    forward(input, target, teacher=None, spill=None, alpha=None) -> {'loss', 'output', 'task_loss', 'distill_loss',
        'cskd_loss'}: `target` is a hard label [B] or soft targets [B, K] (mixup/cutmix); `teacher` is the batch's
        encoded cache outputs (required without an online teacher). Like timm's TokenDistillationTask, `train()`
        keeps the teacher in eval mode (timm's loop calls it every epoch) and `prepare_distributed` wraps the student
        alone in DDP."""

    def __init__(self, student_model: CSKDStudent, teacher_model=None, encoding: Encoding | None = None, *,
                 cache=None, teacher_pretrained_path: str | None = None,
                 teacher_pretrained_cfg_overlay: dict | None = None,
                 distill_type: str = "hard", cskd_type: str = "hard", task_loss_weight: float = 0.5,
                 distill_loss_weight: float = 0.5, cskd_loss_weight: float = 1.0, temperature: float = 1.0,
                 alpha_schedule: str = "linear", epochs: int = 300, teacher_precision: str | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None, verbose: bool = False):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if not isinstance(student_model, CSKDStudent):
            raise TypeError("student_model must be a CSKDStudent (cskd_cache.create_student wraps timm's DeiTs)")
        self.trainable_module = student_model
        self.criterion = CSKDLoss(distill_type, temperature, task_loss_weight, distill_loss_weight, cskd_loss_weight,
                                  cskd_type)
        cache = _open_cache(cache)
        if cache is not None:
            encoding = encoding or cache.encoding
        num_classes = student_model.model.num_classes
        self.teacher = None
        if teacher_model is not None:
            precision = teacher_precision or (cache.manifest["teacher"].get("precision") if cache else None)
            model = _teacher_model(teacher_model, num_classes, teacher_pretrained_path,
                                   teacher_pretrained_cfg_overlay)
            self.teacher = DenseTeacher(model, student_model.view_mean, student_model.view_std,  # fed its views
                                        resolve_precision(precision, self.device)).to(self.device)
            if cache is not None and state_dict_sha256(model) != cache.manifest["teacher"]["weights_sha256"]:
                raise CacheError("the online teacher's weights are not the cache's teacher; its targets would differ "
                                 "from the cached ones (give the cache's teacher, or no cache)")
            P = student_model.teacher_grid[0] * student_model.teacher_grid[1]
            encoding = make_encoding("full", num_classes, P)  # exact: fuse and argmax
        elif encoding is None:
            raise CacheError("CSKDTask needs a teacher_model (online) or the cache (cache=, or its encoding)")
        if encoding.num_classes != num_classes:
            raise CacheError(f"the cache's teacher has {encoding.num_classes} classes, the student {num_classes}; "
                             "build the student from the cache (CachedViews.student)")
        self.targets = TeacherTargets(encoding, self.criterion.needs, self.teacher)
        self.alpha_schedule, self.epochs, self.epoch = alpha_schedule, epochs, 0

    def train(self, mode: bool = True) -> "CSKDTask":
        """Training mode for the student; the teacher stays in eval mode (BatchNorm with its running statistics,
        never updating them), whatever timm's loop asks of the task every epoch."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> "CSKDTask":
        """Wrap the student in DistributedDataParallel; the frozen teacher stays unwrapped (as timm's tasks)."""
        self.trainable_module = torch.nn.parallel.DistributedDataParallel(self.trainable_module,
                                                                          device_ids=device_ids, **ddp_kwargs)
        return self

    def set_epoch(self, epoch: int) -> None:
        """CKF's alpha follows the epoch (once per epoch, as the paper)."""
        self.epoch = epoch

    @property
    def alpha(self) -> float:
        return alpha_at(self.epoch, 0, 1, self.epochs, self.alpha_schedule)

    def forward(self, input: torch.Tensor, target: torch.Tensor, teacher: dict | None = None,
                spill: dict | None = None, alpha: float | None = None) -> dict[str, torch.Tensor]:
        if self.teacher is None and teacher is None:
            raise CacheError("CSKDTask.forward needs the batch's cached teacher outputs (teacher=batch['teacher'])")
        batch = {"teacher": teacher} if teacher is not None else {}
        if spill is not None:
            batch["spill"] = spill
        alpha = self.alpha if alpha is None else alpha
        teacher_kw = self.targets(batch, input, alpha)
        out = self.trainable_module(input)
        if target.dim() == 1:  # hard labels: one-hot, as timm's tasks take either
            target = torch.nn.functional.one_hot(target.long(), out["cls"].shape[-1]).to(out["cls"].dtype)
        loss, parts = self.criterion({k: v.float() for k, v in out.items()}, target, **teacher_kw)
        return {"loss": loss, "output": out["cls"], "task_loss": parts["base"],
                "distill_loss": parts.get("distill", loss.new_zeros(())), "cskd_loss": parts.get("cskd",
                                                                                              loss.new_zeros(()))}

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False):
        """Validation uses CSKD's prediction: the mean of class head, distillation head and mean dense logits."""
        module = module if module is not None else self.get_trainable_module(ema=ema)
        if module is None:
            return None
        inner = getattr(module, "module", module)  # an EMA wrapper keeps the model in .module
        return _Predict(inner)


class _Predict(nn.Module):
    def __init__(self, student: CSKDStudent):
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student.predict(x)
