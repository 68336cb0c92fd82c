"""CSKD as a timm training task, for timm's train.py-style loops (timm >= 1.0.23: `timm.task`).

Shaped like timm's `TokenDistillationTask`: the student is the trainable module, the teacher is a model name,
a module or a `DistillationTeacher`, `distill_type` is 'hard' or 'soft', and the loss weights are named the same
way (`task_loss_weight`, `distill_loss_weight`) plus `cskd_loss_weight` for the patch tokens. What CSKD adds: the
distillation head also reads every patch token, and the patch tokens learn the CKF targets at the current alpha.
The teacher's outputs come from a cache (pass `teacher=batch["teacher"]` to forward, with `encoding`) or from an
online teacher (`teacher_model`), through the same exact fusion.

    task = CSKDTask(student, encoding=views.encoding, epochs=300)          # from a cache
    task = CSKDTask(student, teacher_model="regnety_160", epochs=300)       # online
    task.set_epoch(epoch)
    out = task(x, target, teacher=batch.get("teacher"), spill=batch.get("spill"))
    out["loss"].backward()
"""

from __future__ import annotations

import torch
from timm.task import DistillationTeacher, TrainingTask
from torch import nn

from .encodings import Encoding, make_encoding
from .engine import TeacherTargets
from .errors import CacheError
from .losses import CSKDLoss, alpha_at
from .student import CSKDStudent
from .teacher import TEACHER_ALIASES, DenseTeacher


def _dense_teacher(teacher, student: CSKDStudent, pretrained_path: str | None, overlay: dict | None,
                   precision: str) -> DenseTeacher:
    if isinstance(teacher, DistillationTeacher):
        teacher = teacher.model
    if isinstance(teacher, str):
        import timm

        kw = {"pretrained_cfg_overlay": dict(overlay or {}, **({"file": pretrained_path} if pretrained_path else {}))}
        teacher = timm.create_model(TEACHER_ALIASES.get(teacher, teacher), pretrained=True,
                                    num_classes=student.model.num_classes, **kw)
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher_model must be a model name, an nn.Module or a DistillationTeacher, got {teacher!r}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return DenseTeacher(teacher, student.view_mean, student.view_std, precision)  # fed the student's views


class CSKDTask(TrainingTask):
    """CSKD: task loss on the class head, distillation on the distillation token, CKF targets on the patch tokens.

    Args:
        student_model: a CSKDStudent (`cskd_cache.create_student`, or `CachedViews.student`)
        teacher_model: None (outputs come from a cache: give `encoding`), a timm CNN name, an nn.Module, or a
            timm DistillationTeacher (its model is used, with the dense head applied at every position)
        encoding: the cache's Encoding (`Cache.encoding`, `CachedViews.encoding`), when teacher_model is None
        distill_type: 'hard' (DeiT's and CSKD's default) or 'soft'; cskd_type: 'hard' or 'soft'
        task_loss_weight, distill_loss_weight, cskd_loss_weight: 0.5, 0.5, 1.0 (the official configs)
        temperature: of the soft losses
        alpha_schedule, epochs: CKF's alpha = schedule(epoch / epochs), set with `set_epoch`
        teacher_precision: fp32 | fp16 | bf16 for an online teacher
    forward(input, target, teacher=None, spill=None, alpha=None) -> {'loss', 'output', 'task_loss', 'distill_loss',
        'cskd_loss'}: `target` is a hard label [B] or soft targets [B, K] (mixup/cutmix); `teacher` is the batch's
        encoded cache outputs (required without an online teacher)."""

    def __init__(self, student_model: CSKDStudent, teacher_model=None, encoding: Encoding | None = None, *,
                 teacher_pretrained_path: str | None = None, teacher_pretrained_cfg_overlay: dict | None = None,
                 distill_type: str = "hard", cskd_type: str = "hard", task_loss_weight: float = 0.5,
                 distill_loss_weight: float = 0.5, cskd_loss_weight: float = 1.0, temperature: float = 1.0,
                 alpha_schedule: str = "linear", epochs: int = 300, teacher_precision: str = "fp32",
                 device: torch.device | None = None, dtype: torch.dtype | None = None, verbose: bool = False):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if not isinstance(student_model, CSKDStudent):
            raise TypeError("student_model must be a CSKDStudent (cskd_cache.create_student wraps timm's DeiTs)")
        self.trainable_module = student_model
        self.criterion = CSKDLoss(distill_type, temperature, task_loss_weight, distill_loss_weight, cskd_loss_weight,
                                  cskd_type)
        self.teacher = None
        if teacher_model is not None:
            self.teacher = _dense_teacher(teacher_model, student_model, teacher_pretrained_path,
                                          teacher_pretrained_cfg_overlay, teacher_precision).to(self.device)
            P = student_model.teacher_grid[0] * student_model.teacher_grid[1]
            encoding = make_encoding("full", student_model.model.num_classes, P)  # exact: fuse and argmax
        elif encoding is None:
            raise CacheError("CSKDTask needs a teacher_model (online) or the cache's encoding")
        self.targets = TeacherTargets(encoding, self.criterion.needs, self.teacher)
        self.alpha_schedule, self.epochs, self.epoch = alpha_schedule, epochs, 0

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
