"""RandomResizedCrop's resize as Pillow computes it, for the tensor replay backend: exact, batched, any device.

`img.crop(box).resize((size, size), filter)` (what timm's RandomResizedCrop does on a PIL image) is Pillow's
two-pass fixed-point resampling (Resample.c): filter weights computed in float64, normalised, rounded to 22-bit
integers; each pass sums integer products over each output pixel's window and rounds to uint8. Here the weights
come from the host in Pillow's order of operations and the sums are int32, tap by tap, as Pillow's: the result is
Pillow's on every device (integers have no rounding), however views are batched, and with Pillow's amount of work.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

MODES = ("bicubic", "bilinear", "nearest")


def resized_crop(img: torch.Tensor, top: int, left: int, height: int, width: int, size: int,
                 interpolation: str = "bicubic") -> torch.Tensor:
    """One image [3, H, W]: crop, then resize to [3, size, size] as Pillow does (see `resized_crops`)."""
    return resized_crops([img], [0], np.array([[top, left, height, width]]), size, [interpolation])[0]


def resized_crops(images: list[torch.Tensor], which, boxes: np.ndarray, size: int, modes: list[str],
                  budget: int = 1 << 28) -> torch.Tensor:
    """Views [B, 3, size, size] uint8: view i is images[which[i]] cropped to boxes[i] = (top, left, height, width),
    resized with modes[i]: Pillow's pixels exactly (`img.crop(box).resize((size, size), filter)`, what timm's
    RandomResizedCrop does).

    Pillow resamples in two separable passes (each rounded to uint8): every output pixel sums its window's taps,
    pixel x 22-bit integer weight, in int32. So do we, tap by tap over a batch (the weights come from the host,
    computed in Pillow's order): integer sums are exact in any order, so the result is Pillow's on every device
    however views are batched. Views are resized together: crops zero-padded to their group's largest (zero pixels
    with zero weights add nothing), a few launches per tap and group instead of a dozen per view. Groups hold views
    of one pass order and about `budget` bytes of padded crops (a single larger view forms its own group)."""
    device = images[0].device
    out = torch.empty((len(boxes), 3, size, size), dtype=torch.uint8, device=device)
    box = [tuple(int(v) for v in b) for b in boxes]
    resample = []
    for i, (top, left, h, w) in enumerate(box):
        crop = images[which[i]][:, top:top + h, left:left + w]
        if h == size and w == size:
            out[i] = crop  # Pillow copies
        elif _mode(modes[i]) == "nearest":
            out[i] = _nearest(crop, size)
        else:
            resample.append(i)
    # Pillow 13's order (ImagingResampleInner): columns first, unless the height shrinks by more than twice what
    # the width does; the other order rounds the intermediate image differently
    rows_first = {i: box[i][2] - size > 0 and box[i][2] - size > 2 * (box[i][3] - size) for i in resample}
    for first in (False, True):
        group = sorted((i for i in resample if rows_first[i] == first), key=lambda i: -box[i][2] * box[i][3])
        while group:
            n, hs, ws = 1, box[group[0]][2], box[group[0]][3]  # the largest crops first, as many as fit padded
            while n < len(group):
                h2, w2 = max(hs, box[group[n]][2]), max(ws, box[group[n]][3])
                if (n + 1) * 12 * h2 * w2 > budget:  # 3 channels of int32
                    break
                n, hs, ws = n + 1, h2, w2
            chunk, group = group[:n], group[n:]
            views = _resample_group(images, [which[i] for i in chunk], [box[i] for i in chunk], size,
                                    [modes[i] for i in chunk], first)
            out.index_copy_(0, to_device(np.array(chunk, dtype=np.int64), device), views)
    return out


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without waiting for the device: pinned and non-blocking on CUDA (a plain copy from
    pageable memory, e.g. indexing with a Python list, waits for every queued kernel)."""
    t = torch.from_numpy(array)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _resample_group(images, which, boxes, size: int, modes: list[str], rows_first: bool) -> torch.Tensor:
    device = images[0].device
    hm, wm = max(b[2] for b in boxes), max(b[3] for b in boxes)
    x = torch.zeros((len(boxes), 3, hm, wm), dtype=torch.int32, device=device)
    for j, (top, left, h, w) in enumerate(boxes):
        x[j, :, :h, :w] = images[which[j]][:, top:top + h, left:left + w]
    # every view's taps in one host array and one copy: [n, column index / weight / row index / weight, size, k]
    cols = [_taps(b[3], size, m) for b, m in zip(boxes, modes)]
    rows = [_taps(b[2], size, m) for b, m in zip(boxes, modes)]
    k = max(t[0].shape[1] for t in cols + rows)
    host = np.zeros((len(boxes), 4, size, k), np.int32)  # padded taps: index 0, weight 0
    for j, ((ci, cw), (ri, rw)) in enumerate(zip(cols, rows)):
        host[j, 0, :, :ci.shape[1]], host[j, 1, :, :ci.shape[1]] = ci, cw
        host[j, 2, :, :ri.shape[1]], host[j, 3, :, :ri.shape[1]] = ri, rw
    taps = to_device(host, device)
    passes = [(taps[:, 2].long(), taps[:, 3], 2), (taps[:, 0].long(), taps[:, 1], 3)]  # rows, columns
    for index, weight, dim in (passes if rows_first else passes[::-1]):
        x = _pass(x, index, weight, dim)
    return x.to(torch.uint8)


def _pass(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, dim: int) -> torch.Tensor:
    """One of Pillow's passes (ImagingResample{Horizontal,Vertical}_8bpc) along `dim` of int32 [n, 3, H, W]:
    out = clip8(2^21 + sum over taps of pixel x weight), index / weight [n, size, k]. As in Pillow the products and
    sums are int32 (|sum| < 2^31: a pixel is < 2^8, the weights of a window sum to 2^22)."""
    n, c, h, w = x.shape
    size = index.shape[1]
    acc = None
    for t in range(index.shape[2]):
        if dim == 3:
            at = index[:, None, None, :, t].expand(n, c, h, size)
            term = torch.gather(x, 3, at).mul_(weight[:, None, None, :, t])
        else:
            at = index[:, None, :, None, t].expand(n, c, size, w)
            term = torch.gather(x, 2, at).mul_(weight[:, None, :, None, t])
        acc = term if acc is None else acc.add_(term)
    acc.add_(1 << (_PRECISION_BITS - 1))
    return torch.bitwise_right_shift(acc, _PRECISION_BITS).clamp_(0, 255)  # Pillow's clip8: arithmetic shift


# Pillow's filters (Resample.c): support and weight, evaluated in float64 in Pillow's order of operations
def _bicubic_weight(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear_weight(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": (2.0, _bicubic_weight), "bilinear": (1.0, _bilinear_weight)}
_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images


@functools.lru_cache(maxsize=2048)  # crop sides repeat (whole pixels): ~100 us saved each; <= 130 KB an entry
def _taps(in_size: int, out_size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for a box (0, in_size): per output pixel the input
    indices and 22-bit integer weights of its window [out, k] (taps past the window weigh 0). Also for
    in_size == out_size, where Pillow skips the pass: the taps are then the identity, so the result is the same."""
    support, weight = _FILTERS[mode]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    k = np.arange(ksize)
    w = weight(((k[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(k[None, :] < xmax[:, None], w, 0.0)
    total = np.zeros(out_size)
    for j in range(ksize):  # summed in Pillow's order (numpy's sum is pairwise: other roundings)
        total = total + w[:, j]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * (1 << _PRECISION_BITS)), np.trunc(0.5 + w * (1 << _PRECISION_BITS)))
    index = np.minimum(xmin[:, None] + k[None, :], in_size - 1).astype(np.int32)
    fixed = fixed.astype(np.int32)
    index.flags.writeable = fixed.flags.writeable = False  # shared by the cache
    return index, fixed


def _nearest(crop: torch.Tensor, size: int) -> torch.Tensor:
    """Pillow's resize with NEAREST: an affine scale whose input coordinate is accumulated pixel by pixel
    (ImagingScaleAffine: xo = a2 + a0 / 2, then xo += a0), truncated."""
    def coords(n: int) -> torch.Tensor:
        step = n / size
        xo = np.add.accumulate(np.concatenate(([0.0 + step * 0.5], np.full(size - 1, step))))  # sequential sums
        return to_device(np.minimum(xo.astype(np.int64), n - 1), crop.device)
    return crop[:, coords(crop.shape[1])][:, :, coords(crop.shape[2])]


def _mode(interpolation: str) -> str:
    if interpolation not in MODES:
        raise ValueError(f"interpolation must be one of {MODES}, got {interpolation!r}")
    return interpolation
