"""One training epoch and one evaluation, as DeiT's engine.py splits them; the teacher's side of a step.

A step: replayed views (and, from the cache, their encoded teacher outputs) -> mixed targets, CKF targets at this
step's alpha -> CSKD loss -> AdamW step -> EMA. Nothing in a step waits on the device: the loss parts are summed on
the device and read once per epoch, and the finiteness of the loss is checked every `check_every` steps.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from ..cache.encoding import Encoding
from ..errors import CacheError
from .losses import CSKDLoss, mixup_target


class TeacherTargets:
    """The teacher tensors a CSKDLoss needs for a batch (`criterion.needs`), decoded on the training device from
    the cache's encoded outputs, or computed by an online teacher on the same views. The online teacher goes
    through the `full` encoding (fp16 dense, fp32 global), whose targets equal every cache's exact targets."""

    def __init__(self, encoding: Encoding, needs: set[str], teacher: torch.nn.Module | None = None):
        self.encoding, self.needs, self.teacher = encoding, needs, teacher

    def __call__(self, batch: dict, x: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
        if not self.needs:
            return {}
        spill = None
        if self.teacher is not None:
            dense, glob = self.teacher(x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x)
            arrays, spill = self.encoding.encode(dense, glob)
        else:
            arrays = {k: v.to(x.device, non_blocking=True) for k, v in batch["teacher"].items()}
            if "spill" in batch:
                spill = {k: v.to(x.device, non_blocking=True) for k, v in batch["spill"].items()}
        enc, out = self.encoding, {}
        if "teacher_global_argmax" in self.needs:
            out["teacher_global_argmax"] = enc.global_argmax(arrays)
        if "teacher_global" in self.needs:
            out["teacher_global"] = enc.decode_global(arrays)
        if "ckf_targets" in self.needs:
            out["ckf_targets"] = enc.decode_targets(arrays, alpha, spill)
        if "ckf_logits" in self.needs:
            out["ckf_logits"] = enc.decode_fused(arrays, alpha)
        return out


def train_one_epoch(model, criterion: CSKDLoss, loader, optimizer, device: torch.device, epoch: int, *,
                    targets: TeacherTargets, alpha_at, num_classes: int, smoothing: float, ema=None,
                    clip_grad: float | None = None, show_progress: bool = True, check_every: int = 50,
                    finish=None) -> dict:
    """Train over one epoch's loader. alpha_at(step) gives CKF's alpha; `finish(batch, device)` turns the workers'
    uint8 pixels into the views (normalise, erase, mix: data/finish.py). Returns the summed loss parts (device
    tensors), the number of views, the seconds and the last alpha."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    bad = torch.zeros((), dtype=torch.bool, device=device)
    seen, t0, alpha, drift = 0, time.time(), alpha_at(0), [0, 0.0]
    bar = tqdm(loader, total=len(loader.batch_sampler), desc=f"epoch {epoch}", unit="batch",
               disable=None if show_progress else True)
    for step, batch in enumerate(bar):
        if "error" in batch:
            raise CacheError(batch["error"])
        x = finish(batch, device) if finish is not None else batch["image"].to(device, non_blocking=True)
        if "drift" in batch:  # after `finish`: views made on the device are checked there
            drift = [drift[0] + int(batch["drift"][0]), max(drift[1], float(batch["drift"][1]))]
        target = mixup_target(batch["label"].to(device, non_blocking=True),
                              batch["partner_label"].to(device, non_blocking=True),
                              batch["lam"].to(device, non_blocking=True), num_classes, smoothing)
        alpha = alpha_at(step)
        teacher_kw = targets(batch, x, alpha)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x, heads=criterion.heads)  # plain DeiT pays for its class head only
        loss, parts = criterion({k: v.float() for k, v in out.items()}, target, **teacher_kw)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        if ema is not None:
            ema.update(model.module if hasattr(model, "module") else model)
        for k, v in parts.items():
            sums[k] = sums[k] + v * len(x) if k in sums else v * len(x)
        seen += len(x)
        bad |= ~torch.isfinite(loss.detach())
        if (step + 1) % check_every == 0 or step + 1 == len(loader.batch_sampler):
            if bool(bad):  # one sync every check_every steps, not one per step
                raise CacheError(f"the loss is not finite (epoch {epoch}, by step {step}); lower --lr or set "
                                 "--clip-grad")
            bar.set_postfix(loss=f"{float(parts['total']):.3f}", img_s=f"{seen / (time.time() - t0):.0f}")
    return {"sums": sums, "seen": seen, "seconds": time.time() - t0, "alpha": alpha, "drift": drift}


@torch.no_grad()
def evaluate(model, loader, device, dist=None) -> dict:
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
