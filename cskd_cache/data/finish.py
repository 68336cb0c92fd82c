"""The float steps of a view, batched on the training device: to float, normalise, erase, mix.

Workers hand over each view's pixels as uint8 (4x fewer bytes than float32 between processes and to the device),
its random-erasing boxes with their noise (drawn in the worker from the view's seeded generator, by timm's own
code), and its pair's mixing (from the plan); the device does the rest. These are op for op the steps timm's
transform (ToTensor, Normalize, RandomErasing) and timm's Mixup in pair mode do per view, and every one of them is
an elementwise IEEE operation or a copy, so the views are the same bits whether they are finished one by one in a
worker or a batch at a time on the device (tests/data/test_finish.py). Both stages call `finish`, so the teacher and
the student see the same pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .plan import MODE_CUTMIX, MODE_MIXUP


def to_float(pixels: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] -> normalised float32, as torchvision's to_tensor (x.float() / 255) and normalize (sub_ mean,
    div_ std, [C, 1, 1] float32 tensors) compute it."""
    return pixels.to(torch.float32).div(255).sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def erase(x: Tensor, view: Tensor, box: Tensor, noise: Tensor) -> Tensor:
    """Random erasing, as drawn: view i's box (top, left, h, w) takes the next 3*h*w noise values (timm's pixel mode).
    In place, in the order drawn (a view's later box overwrites an earlier one, as in timm)."""
    if not len(view):
        return x
    noise = noise.to(x.device, non_blocking=True)
    at = 0
    for v, (top, left, h, w) in zip(view.tolist(), box.tolist()):  # ~a quarter of the views; boxes differ in size
        n = x.shape[1] * h * w
        x[v, :, top:top + h, left:left + w] = noise[at:at + n].view(x.shape[1], h, w)
        at += n
    return x


def mix(x: Tensor, lam: Tensor, mode: Tensor, box: Tensor) -> Tensor:
    """timm's Mixup in pair mode over pairs (2k, 2k+1): mixup blends (lam * own + (1 - lam) * partner, lam float32),
    cutmix copies the partner's box (y0, y1, x0, x1), other pairs stay. Views are whole pairs in order."""
    a, b = x[0::2], x[1::2]
    cut = mode[0::2] == MODE_CUTMIX  # decided on the CPU tensors the batch carries: no wait for the device
    any_cut = bool(cut.any())
    lam, mode, box, cut = (t.to(x.device, non_blocking=True) for t in (lam[0::2], mode[0::2], box[0::2], cut))
    l4 = lam.to(torch.float32).view(-1, 1, 1, 1)
    blend = (mode == MODE_MIXUP).view(-1, 1, 1, 1)
    ya = torch.where(blend, a * l4 + b * (1 - l4), a)
    yb = torch.where(blend, b * l4 + a * (1 - l4), b)
    if any_cut:
        H, W = x.shape[-2:]
        ys, xs = torch.arange(H, device=x.device).view(1, H, 1), torch.arange(W, device=x.device).view(1, 1, W)
        y0, y1, x0, x1 = (box[:, i].long().view(-1, 1, 1) for i in range(4))
        inside = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1) & cut.view(-1, 1, 1))[:, None]
        ya, yb = torch.where(inside, b, ya), torch.where(inside, a, yb)
    out = torch.empty_like(x)
    out[0::2], out[1::2] = ya, yb
    return out


class Finisher:
    """The recipe's float steps for batches from the replay datasets (`batch` keys: pixels, erase_view, erase_box,
    erase_noise, lam, mode, box), on any device."""

    def __init__(self, mean, std):
        # float32 tensors from the recipe's Python floats, exactly as timm builds Normalize's
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self._on: dict = {}

    def _stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._on:
            self._on[device] = (self.mean.to(device), self.std.to(device))
        return self._on[device]

    def __call__(self, batch: dict, device: torch.device | str = "cpu", mixed: bool = True) -> Tensor:
        device = torch.device(device)
        x = to_float(batch["pixels"].to(device, non_blocking=True), *self._stats(device))
        x = erase(x, batch["erase_view"], batch["erase_box"], batch["erase_noise"])
        return mix(x, batch["lam"], batch["mode"], batch["box"]) if mixed else x
