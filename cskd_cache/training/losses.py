"""CSKD's training loss and its CKF alpha schedule (Zhao et al., ICCV 2023; official configs' defaults).

total = base_weight * CE(cls, mixup/cutmix soft targets)
      + distill_weight * distill(dist, teacher global)            DeiT's hard (default) or soft distillation
      + cskd_weight * CE(pooled dense student logits, Y)           Y = CKF hard targets, one per teacher position
The paper writes this as (1 - a) * base + a * deit + w * cskd with a = 0.5, w = 1.0.
Argument names follow timm's TokenDistillationTask (distill_type 'hard'/'soft', temperature).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CacheError

ALPHA_SCHEDULES = ("linear", "x2", "cos", "local")
DISTILL_TYPES = ("hard", "soft")
CSKD_TYPES = ("hard", "soft")
LOSS_MODES = ("cskd", "deit", "none")


def ckf_alpha(progress: float, schedule: str = "linear") -> float:
    """CKF weight of the dense teacher at progress = epoch / epochs: 1 (local) at the start, 0 (global) at the end."""
    x = min(max(float(progress), 0.0), 1.0)
    if schedule == "linear":  # the paper's default
        a = 1.0 - x
    elif schedule == "x2":
        a = (1.0 - x) ** 2
    elif schedule == "cos":
        a = math.cos(math.pi / 2 * x) if x < 1.0 else 0.0  # cos(pi/2) is 6e-17 in floats; the end is global
    elif schedule == "local":  # the paper's ablation: dense targets throughout (constant alpha = 1)
        a = 1.0
    else:
        raise CacheError(f"unknown CKF alpha schedule {schedule!r}; use one of {', '.join(ALPHA_SCHEDULES)}")
    return a


def alpha_at(epoch: int, step_in_epoch: int, steps_per_epoch: int, epochs: int, schedule: str,
             per_step: bool = False) -> float:
    """Alpha for one training step. Official: once per epoch from the integer epoch index, so epoch 299 of 300 uses
    1/300 (linear) and alpha never reaches 0. per_step=True moves it smoothly within the epoch instead."""
    if epochs < 1 or steps_per_epoch < 1:
        raise CacheError(f"epochs and steps_per_epoch must be >= 1, got {epochs} and {steps_per_epoch}")
    progress = epoch + (step_in_epoch / steps_per_epoch if per_step else 0.0)
    return ckf_alpha(progress / epochs, schedule)


def mixup_target(labels_a: Tensor, labels_b: Tensor, lam: float | Tensor, num_classes: int,
                 smoothing: float = 0.0) -> Tensor:
    """Soft targets [B, K] as timm.data.mixup.mixup_target builds them (there labels_b = labels_a.flip(0)):
    lam * smooth(a) + (1 - lam) * smooth(b), off = smoothing / K, on = 1 - smoothing + off. lam may be a float or a
    per-sample [B] tensor (per-sample mixup/cutmix boxes)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off

    def smooth(labels: Tensor) -> Tensor:
        y = torch.full((labels.numel(), num_classes), off, device=labels.device)
        return y.scatter_(1, labels.long().view(-1, 1), on)

    if isinstance(lam, Tensor):
        lam = lam.to(device=labels_a.device, dtype=torch.float32).view(-1, 1)
    return smooth(labels_a) * lam + smooth(labels_b) * (1.0 - lam)


class CSKDLoss(nn.Module):
    """total = base_weight * soft-target CE(cls, mixed smoothed targets) + distill_weight * distill(dist, teacher
    global) + cskd_weight * CE(pooled dense [B,K,h,w], Y [B,h*w] or [B,h,w]) averaged over positions and batch.

    distill_type 'hard': CE(dist, argmax teacher global). 'soft': DeiT's KL(log_softmax(dist/T), log_softmax(teacher/T),
    reduction='sum', log_target=True) * T*T / dist.numel(). Note: that is timm TokenDistillationTask's soft loss
    (reduction='batchmean') divided by K. A term whose weight is 0 is skipped; a term with a weight and without the
    teacher tensor it needs is an error (`needs` says which tensors to pass), never silently dropped.
    cskd_type 'hard' (default): CE against the CKF targets Y. 'soft' (the official code's other option): KL between
    the pooled dense logits and the fused CKF logits at temperature T, summed over classes and positions, times
    T*T, divided by the batch size.
    """

    def __init__(self, distill_type: str = "hard", temperature: float = 1.0, base_weight: float = 0.5,
                 distill_weight: float = 0.5, cskd_weight: float = 1.0, cskd_type: str = "hard") -> None:
        super().__init__()
        if distill_type not in DISTILL_TYPES:
            raise CacheError(f"unknown distill_type {distill_type!r}; use one of {', '.join(DISTILL_TYPES)}")
        if cskd_type not in CSKD_TYPES:
            raise CacheError(f"unknown cskd_type {cskd_type!r}; use one of {', '.join(CSKD_TYPES)}")
        if temperature <= 0:
            raise CacheError(f"temperature must be > 0, got {temperature}")
        self.distill_type, self.cskd_type, self.temperature = distill_type, cskd_type, float(temperature)
        self.base_weight, self.distill_weight = float(base_weight), float(distill_weight)
        self.cskd_weight = float(cskd_weight)

    @classmethod
    def for_mode(cls, mode: str, distill_type: str = "hard", temperature: float = 1.0,
                 cskd_type: str = "hard") -> "CSKDLoss":
        """cskd: 0.5/0.5/1.0 (official configs); deit: 0.5/0.5/0 (DeiT distilled); none: 1/0/0 (plain DeiT)."""
        weights = {"cskd": (0.5, 0.5, 1.0), "deit": (0.5, 0.5, 0.0), "none": (1.0, 0.0, 0.0)}
        if mode not in weights:
            raise CacheError(f"unknown loss mode {mode!r}; use one of {', '.join(LOSS_MODES)}")
        return cls(distill_type, temperature, *weights[mode], cskd_type=cskd_type)

    @property
    def needs(self) -> set[str]:
        """Which teacher tensors forward() will use: what a caller has to decode, and nothing more."""
        out = set()
        if self.distill_weight:
            out.add("teacher_global" if self.distill_type == "soft" else "teacher_global_argmax")
        if self.cskd_weight:
            out.add("ckf_logits" if self.cskd_type == "soft" else "ckf_targets")
        return out

    @property
    def heads(self) -> tuple[str, ...]:
        """Which student outputs forward() will use: the student computes only those (see CSKDStudent.forward)."""
        return ("cls",) + (("dist",) if self.distill_weight else ()) + (("dense",) if self.cskd_weight else ())

    def distill(self, dist: Tensor, teacher_global: Tensor | None, teacher_global_argmax: Tensor | None) -> Tensor:
        if self.distill_type == "hard":
            # A cached argmax wins: it was taken on the fp32 logits, a fp16 copy can tie differently.
            target = teacher_global_argmax if teacher_global_argmax is not None else teacher_global.argmax(-1)
            return F.cross_entropy(dist, target.long())
        if teacher_global is None:
            raise CacheError("soft distillation needs the teacher's global logits, but only their argmax was given")
        T = self.temperature
        return F.kl_div(F.log_softmax(dist / T, dim=-1), F.log_softmax(teacher_global.float() / T, dim=-1),
                        reduction="sum", log_target=True) * (T * T) / dist.numel()

    @staticmethod
    def spatial(dense: Tensor, ckf_targets: Tensor) -> Tensor:
        """Mean CE over every (sample, position); positions are row-major on the teacher grid, as the teacher's."""
        B, K, h, w = dense.shape
        if ckf_targets.numel() != B * h * w:
            raise ValueError(f"ckf_targets {tuple(ckf_targets.shape)} do not match dense logits {tuple(dense.shape)}")
        return F.cross_entropy(dense, ckf_targets.reshape(B, h, w).long())

    def spatial_soft(self, dense: Tensor, ckf_logits: Tensor) -> Tensor:
        """The official soft CKF loss; ckf_logits [B, h*w, K] (positions row-major) or [B, K, h, w]."""
        B, K, h, w = dense.shape
        if ckf_logits.dim() == 3:
            ckf_logits = ckf_logits.transpose(1, 2).reshape(B, K, h, w)
        if tuple(ckf_logits.shape) != (B, K, h, w):
            raise ValueError(f"ckf_logits {tuple(ckf_logits.shape)} do not match dense logits {tuple(dense.shape)}")
        T = self.temperature
        return F.kl_div(F.log_softmax(dense / T, dim=1), F.log_softmax(ckf_logits.float() / T, dim=1),
                        reduction="sum", log_target=True) * (T * T) / B

    def forward(self, out: dict[str, Tensor], mixed_target: Tensor, teacher_global: Tensor | None = None,
                teacher_global_argmax: Tensor | None = None, ckf_targets: Tensor | None = None,
                ckf_logits: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """out: CSKDStudent's training dict. Returns the weighted total and its unweighted parts (+ 'total'),
        detached and still on the device: reading them (.item(), .tolist()) is the caller's choice of sync."""
        # F.cross_entropy with probability targets is timm's SoftTargetCrossEntropy: mean of -sum(t * log_softmax).
        given = {"teacher_global": teacher_global, "teacher_global_argmax": teacher_global_argmax,
                 "ckf_targets": ckf_targets, "ckf_logits": ckf_logits}
        missing = sorted(n for n in self.needs if given[n] is None)
        if self.distill_weight and self.distill_type == "hard" and teacher_global is not None:
            missing = [n for n in missing if n != "teacher_global_argmax"]  # the argmax of the logits will do
        if missing:
            raise CacheError(f"CSKDLoss with distill_weight {self.distill_weight}, cskd_weight {self.cskd_weight} "
                             f"({self.distill_type} distillation, {self.cskd_type} CKF) needs {', '.join(missing)}; "
                             "pass the tensors `criterion.needs` names (CachedViews.teacher(batch, alpha, "
                             "needs=criterion) decodes exactly those)")
        parts = {"base": F.cross_entropy(out["cls"], mixed_target)}
        total = self.base_weight * parts["base"]
        if self.distill_weight:
            parts["distill"] = self.distill(out["dist"], teacher_global, teacher_global_argmax)
            total = total + self.distill_weight * parts["distill"]
        if self.cskd_weight:
            parts["cskd"] = self.spatial(out["dense"], ckf_targets) if self.cskd_type == "hard" else \
                self.spatial_soft(out["dense"], ckf_logits)
            total = total + self.cskd_weight * parts["cskd"]
        parts["total"] = total
        return total, {k: v.detach().float() for k, v in parts.items()}
