"""Batched uint8 image kernels for the tensor replay backend: timm's RandAugment ops as torch ops.

Every function takes uint8 images [N, 3, H, W] on any device and per-sample parameters as 1-D tensors of length N
(a Python number is taken for every sample), and returns a new uint8 [N, 3, H, W]. A sample's result does not
depend on the rest of its batch: only elementwise ops, exact integer reductions and per-sample grid sampling, so
precompute and training may batch views differently and still see the same pixels. No host syncs (no .item(),
no branching on tensor values), so a CUDA stream runs them without waiting.

Fidelity to timm's PIL ops: point ops (invert, posterize, solarize, solarize_add, autocontrast, equalize) give
Pillow's pixels exactly; enhance ops (color, contrast, brightness, sharpness) rebuild Pillow's degenerate image
exactly and blend as Image.blend does (float32, truncated), so they are exact too; geometric ops compute Pillow's
AFFINE input points and fill decisions exactly, then interpolate with Pillow's own arithmetic (exact=True, what
the tensor backend runs: bit-identical, float64) or with grid_sample (close, not equal: another cubic; ~5-7x faster
on a CPU). The crop + resize is in data/resize.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Bumped whenever a kernel's pixels change (recorded in a tensor cache's manifest, named when its views drift):
# 1: torch's float antialiased resize, grid_sample for the geometric ops; 2: Pillow's arithmetic for both (integer
# resize, float64 taps): timm's PIL views exactly, the same bits on every device.
REVISION = 2
_MODES = ("bicubic", "bilinear", "nearest")
# Pillow truncates interpolated values; grid_sample's float32 result for a pixel Pillow finds exactly (flat areas,
# identity, whole-pixel shifts) can land 1e-5 below it, so truncate after this nudge (measured best of 0..0.03)
_TRUNC_NUDGE = 1e-3


def _per_sample(value, img: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A parameter as [N, 1, 1, 1] of `dtype` on the image's device (a Python number applies to every sample).

    A Python float goes straight to `dtype` (not through float32, torch's default): timm draws its parameters as
    Python floats and Pillow uses them as doubles, so pass float64 tensors for the geometric ops' parameters."""
    t = (value if torch.is_tensor(value) else torch.tensor(value, dtype=dtype)).to(img.device, dtype)
    return t.expand(img.shape[0]).reshape(-1, 1, 1, 1) if t.dim() == 0 else t.reshape(-1, 1, 1, 1)


def _check_mode(interpolation: str) -> str:
    if interpolation not in _MODES:
        raise ValueError(f"interpolation must be one of {_MODES}, got {interpolation!r}")
    return interpolation


# ------------------------------------------------------------------------------------------------------- flip

def hflip(img: torch.Tensor) -> torch.Tensor:
    return img.flip(-1)


# ------------------------------------------------------------------------------------------------- geometric

def affine(img: torch.Tensor, coeffs: torch.Tensor, fill=(128, 128, 128), interpolation: str = "bicubic",
           exact: bool = False) -> torch.Tensor:
    """Image.transform(size, AFFINE, coeffs, resample, fillcolor=fill) per sample: output pixel centre
    (x + .5, y + .5) samples the input at (a x + b y + c, d x + e y + f), pixel-edge coordinates.

    The input point is computed in float64 as Pillow computes it and decides alone whether the pixel takes `fill`
    (outside [0, W) x [0, H)); in-bounds points interpolate with clamped neighbours (padding "border"), as
    Pillow's filters clip their neighbour indices, and the result is truncated to uint8 as Pillow casts it.
    Bicubic/bilinear: torch's grid_sample in float32 (its cubic has a = -0.75, Pillow's transform a = -1), or with
    `exact=True` Pillow's own arithmetic (float64, 4x4 taps), bit-identical to Pillow, ~5-7x slower on a CPU (measured on 224-px batches).
    Nearest takes the pixel the point falls in (floor), as Pillow does, not grid_sample's rounding."""
    mode = _check_mode(interpolation)
    n, _, h, w = img.shape
    m = coeffs.to(img.device, torch.float64).reshape(n, 6, 1, 1)
    xs = torch.arange(w, device=img.device, dtype=torch.float64).add_(0.5).reshape(1, 1, w)
    ys = torch.arange(h, device=img.device, dtype=torch.float64).add_(0.5).reshape(1, h, 1)
    # (a * x + b * y) + c, as Pillow's affine_transform evaluates it, so edge decisions are Pillow's
    u = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]
    v = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    inside = ((u >= 0) & (u < w) & (v >= 0) & (v < h)).unsqueeze(1)
    if mode == "nearest":
        out = _gather(img, u.floor().long().clamp_(0, w - 1), v.floor().long().clamp_(0, h - 1))
    elif exact:
        out = _pillow_sample(img, u, v, mode)
    else:
        grid = torch.stack((u * (2.0 / w) - 1.0, v * (2.0 / h) - 1.0), dim=-1).to(torch.float32)
        out = F.grid_sample(img.float(), grid, mode=mode, padding_mode="border", align_corners=False)
        out = torch.trunc(out + _TRUNC_NUDGE).clamp_(0, 255).to(torch.uint8)
    fill_t = torch.tensor(fill, dtype=torch.uint8).to(img.device).reshape(1, 3, 1, 1)
    return torch.where(inside, out, fill_t)


def _gather(img: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
    """img[n, :, yi[n], xi[n]] for in-range integer maps [N, H, W]."""
    n, c, h, w = img.shape
    index = (yi * w + xi).reshape(n, 1, h * w).expand(n, c, h * w)
    return img.reshape(n, c, h * w).gather(2, index).reshape(n, c, h, w)


def _cubic(v1, v2, v3, v4, d):
    """Pillow's BICUBIC macro (Geometry.c), term by term in float64: the a = -1 cubic through v2 (d = 0) and v3."""
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _pillow_sample(img: torch.Tensor, u: torch.Tensor, v: torch.Tensor, mode: str) -> torch.Tensor:
    """Pillow's bilinear/bicubic transform filters: taps around (u - .5, v - .5) with clipped indices, rows first
    (interpolated along x), then along y, float64, truncated."""
    h, w = img.shape[-2:]
    fx, fy = torch.floor(u - 0.5), torch.floor(v - 0.5)
    dx, dy = (u - 0.5 - fx).unsqueeze(1), (v - 0.5 - fy).unsqueeze(1)
    fx, fy = fx.long(), fy.long()
    taps = (0, 1) if mode == "bilinear" else (-1, 0, 1, 2)
    cols = [(fx + k).clamp_(0, w - 1) for k in taps]
    rows = []
    for k in taps:
        yi = (fy + k).clamp_(0, h - 1)
        vals = [_gather(img, xi, yi).to(torch.float64) for xi in cols]
        rows.append(vals[0] + (vals[1] - vals[0]) * dx if mode == "bilinear" else _cubic(*vals, dx))
    out = rows[0] + (rows[1] - rows[0]) * dy if mode == "bilinear" else _cubic(*rows, dy)
    return torch.trunc(out).clamp_(0, 255).to(torch.uint8)


def _affine_coeffs(img, rows) -> torch.Tensor:
    """[N, 6] float64 from six per-sample [N] columns or numbers."""
    n = img.shape[0]
    cols = [(r if torch.is_tensor(r) else torch.tensor(float(r))).to(img.device, torch.float64).expand(n) for r in rows]
    return torch.stack(cols, dim=1)


def _split(x: torch.Tensor):
    """Veltkamp's split of float64 x into hi + lo, each with 26 significant bits (so their products are exact)."""
    c = x * 134217729.0  # 2**27 + 1
    hi = c - (c - x)
    return hi, x - hi


_E15_HI = 1e15 * 134217729.0 - (1e15 * 134217729.0 - 1e15)  # 10**15 split as _split does (35 significant bits)
_E15_LO = 1e15 - _E15_HI


def _round15(x: torch.Tensor) -> torch.Tensor:
    """Python's round(x, 15) for |x| <= 1: k = the EXACT x * 10**15 rounded half to even, then k / 10**15.
    y = fl(x * 10**15) < 2**50 lies within half its ulp (<= 1/16) of the exact product and half-integers are on its
    grid, so round(y) is k unless y is itself a tie (about 1 angle in 12; torch.round(x, decimals=15) gets those
    wrong): then the product's exact error (Dekker's, plain mul/add, no fused multiply-add) says which side the
    exact product lies on."""
    y = x * 1e15
    xh, xl = _split(x)
    err = ((xh * _E15_HI - y) + xh * _E15_LO + xl * _E15_HI) + xl * _E15_LO
    k = torch.round(y)
    tie = (y - torch.floor(y)) == 0.5
    k = torch.where(tie & (err > 0), torch.floor(y) + 1, torch.where(tie & (err < 0), torch.floor(y), k))
    return k / torch.full_like(k, 1e15)  # a true division (torch divides by a Python number via its reciprocal)


def rotate_coeffs(degrees, width: int, height: int, device=None) -> torch.Tensor:
    """The [N, 6] float64 matrix Image.rotate(degrees, expand=False) builds: about (w/2, h/2), angle = -radians of
    degrees % 360, cos and sin rounded to 15 digits as Python rounds them, then the translation."""
    deg = (degrees if torch.is_tensor(degrees) else torch.tensor(degrees)).to(device, torch.float64).reshape(-1)
    angle = -(torch.remainder(deg, 360.0) * (math.pi / 180.0))
    cos, sin = _round15(torch.cos(angle)), _round15(torch.sin(angle))
    a, b, d, e = cos, sin, -sin, cos
    cx, cy = width / 2, height / 2
    c = a * -cx + b * -cy + 0.0 + cx
    f = d * -cx + e * -cy + 0.0 + cy
    return torch.stack((a, b, c, d, e, f), dim=1)


def rotate(img, degrees, fill=(128, 128, 128), interpolation: str = "bicubic", exact: bool = False):
    """Image.rotate(degrees, resample, fillcolor=fill), expand=False (timm's rotate)."""
    h, w = img.shape[-2:]
    coeffs = rotate_coeffs(_per_sample(degrees, img, torch.float64).reshape(-1), w, h, img.device)
    return affine(img, coeffs, fill, interpolation, exact)


def _column(value, img) -> torch.Tensor:
    return _per_sample(value, img, torch.float64).reshape(-1)


def shear_x(img, factor, fill=(128, 128, 128), interpolation: str = "bicubic", exact: bool = False):
    """timm's shear_x: coefficients (1, factor, 0, 0, 1, 0)."""
    return affine(img, _affine_coeffs(img, (1, _column(factor, img), 0, 0, 1, 0)), fill, interpolation, exact)


def shear_y(img, factor, fill=(128, 128, 128), interpolation: str = "bicubic", exact: bool = False):
    """timm's shear_y: coefficients (1, 0, 0, factor, 1, 0)."""
    return affine(img, _affine_coeffs(img, (1, 0, 0, _column(factor, img), 1, 0)), fill, interpolation, exact)


def translate_x(img, pct, fill=(128, 128, 128), interpolation: str = "bicubic", exact: bool = False):
    """timm's translate_x_rel: the input is read pct * W pixels to the right."""
    pixels = _column(pct, img) * img.shape[-1]
    return affine(img, _affine_coeffs(img, (1, 0, pixels, 0, 1, 0)), fill, interpolation, exact)


def translate_y(img, pct, fill=(128, 128, 128), interpolation: str = "bicubic", exact: bool = False):
    """timm's translate_y_rel: the input is read pct * H pixels further down."""
    pixels = _column(pct, img) * img.shape[-2]
    return affine(img, _affine_coeffs(img, (1, 0, 0, 0, 1, pixels)), fill, interpolation, exact)


# ------------------------------------------------------------------------------------------------- point ops

def invert(img: torch.Tensor) -> torch.Tensor:
    return 255 - img


def posterize(img, bits) -> torch.Tensor:
    """Keep the `bits` high bits (0..8): lut[i] = i & ~(2**(8 - bits) - 1), Pillow's formula, which gives bits 0
    the meaning cskd_cache.data.recipe.posterize gives it (all bits cleared)."""
    shift = 8 - _per_sample(bits, img, torch.int32)
    mask = (255 << shift) & 255
    return img & mask.to(torch.uint8)


def solarize(img, thresh) -> torch.Tensor:
    """ImageOps.solarize: values >= thresh (0..256) become 255 - v."""
    t = _per_sample(thresh, img, torch.int32)
    return torch.where(img.to(torch.int32) >= t, 255 - img, img)


def solarize_add(img, add, thresh=128) -> torch.Tensor:
    """timm's solarize_add: values < thresh become min(255, v + add)."""
    v = img.to(torch.int32)
    added = (v + _per_sample(add, img, torch.int32)).clamp_(max=255)
    return torch.where(v < _per_sample(thresh, img, torch.int32), added, v).to(torch.uint8)


def _apply_lut(img: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per (sample, channel) lookup tables [N, 3, 256] applied to [N, 3, H, W]."""
    n, c, h, w = img.shape
    out = lut.to(torch.uint8).gather(2, img.reshape(n, c, h * w).long())
    return out.reshape(n, c, h, w)


def autocontrast(img: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast(img) (cutoff 0) per channel: lut[i] = int(i * scale + offset) clamped, scale =
    255 / (hi - lo), offset = -lo * scale, in float64 as Python computes it; a channel with hi <= lo is unchanged."""
    n, c = img.shape[:2]
    flat = img.reshape(n, c, -1)
    lo = flat.amin(dim=2, keepdim=True).to(torch.float64)
    hi = flat.amax(dim=2, keepdim=True).to(torch.float64)
    spread = hi - lo
    # 255.0 / tensor would multiply by the tensor's reciprocal (another rounding): divide two tensors, as Python does
    scale = torch.full_like(spread, 255.0) / torch.where(spread > 0, spread, torch.ones_like(spread))
    offset = -lo * scale
    ix = torch.arange(256, device=img.device, dtype=torch.float64).reshape(1, 1, 256)
    lut = torch.trunc(ix * scale + offset).clamp_(0, 255)  # Python's int() truncates toward zero
    lut = torch.where(spread > 0, lut, ix)
    return _apply_lut(img, lut)


def _histograms(img: torch.Tensor) -> torch.Tensor:
    """[N, 3, 256] int64 pixel counts per (sample, channel)."""
    n, c = img.shape[:2]
    flat = img.reshape(n * c, -1).long()
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=img.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    return hist.reshape(n, c, 256)


def equalize(img: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize per channel, Pillow's integer algorithm: step = (pixels - count of the highest value)
    // 255; lut[i] = (step // 2 + pixels below i) // step; step 0 (incl. one value only) leaves the channel."""
    hist = _histograms(img)
    total = hist.sum(dim=2, keepdim=True)
    top = img.reshape(*img.shape[:2], -1).amax(dim=2, keepdim=True).long()
    step = (total - hist.gather(2, top)) // 255
    below = hist.cumsum(dim=2) - hist  # pixels with a smaller value
    safe = torch.where(step > 0, step, torch.ones_like(step))
    lut = (safe // 2 + below) // safe
    ix = torch.arange(256, device=img.device).reshape(1, 1, 256)
    lut = torch.where(step > 0, lut, ix).clamp_(0, 255)  # Image.point clips lut entries to 0..255
    return _apply_lut(img, lut)


# ----------------------------------------------------------------------------------------------- enhance ops

def _luma(img: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L, [N, 1, H, W] int32: (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16."""
    v = img.to(torch.int32)
    return (v[:, 0:1] * 19595 + v[:, 1:2] * 38470 + v[:, 2:3] * 7471 + 0x8000) >> 16


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor) -> torch.Tensor:
    """Image.blend(degenerate, img, factor): degenerate + factor * (img - degenerate) in float32 (Pillow's alpha is a
    C float), truncated toward zero and clipped, as Pillow's Blend.c casts to UINT8 (it does not round)."""
    alpha = _per_sample(factor, img, torch.float32)
    deg = degenerate.to(torch.float32)
    out = deg + alpha * (img.to(torch.float32) - deg)
    return torch.trunc(out).clamp_(0, 255).to(torch.uint8)


def color(img, factor) -> torch.Tensor:
    """ImageEnhance.Color: blend with the image's L (grey) version."""
    return _blend(_luma(img), img, factor)


def contrast(img, factor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with a constant grey, int(mean of the L image + 0.5) (exact integer sum)."""
    luma = _luma(img)
    pixels = luma.shape[-1] * luma.shape[-2]
    total = luma.reshape(luma.shape[0], -1).sum(dim=1, dtype=torch.int64).to(torch.float64)
    mean = torch.floor(total / torch.full_like(total, pixels) + 0.5).reshape(-1, 1, 1, 1)  # Python's sum / count
    return _blend(mean, img, factor)


def brightness(img, factor) -> torch.Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return _blend(torch.zeros((), device=img.device), img, factor)


_SMOOTH = (1.0, 1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 1.0)


def _smooth(img: torch.Tensor) -> torch.Tensor:
    """ImageFilter.SMOOTH as Pillow's 3x3 filter computes it: float32 kernel k / 13, each row summed left to right,
    rows added to 0.5 from the bottom one up, truncated; border pixels copied."""
    k = [float(np.float32(v) / np.float32(13.0)) for v in _SMOOTH]  # Pillow divides the kernel by its scale in C float
    x = img.to(torch.float32)
    acc = torch.full_like(x[..., 1:-1, 1:-1], 0.5)
    for r, dy in enumerate((1, 0, -1)):  # kernel row 0 meets the row below (Pillow's in1), row 2 the row above
        rows = x[..., 1 + dy:x.shape[-2] - 1 + dy, :]
        left, mid, right = rows[..., :-2], rows[..., 1:-1], rows[..., 2:]
        acc = acc + (left * k[3 * r] + mid * k[3 * r + 1] + right * k[3 * r + 2])
    out = img.clone()
    out[..., 1:-1, 1:-1] = torch.trunc(acc).clamp_(0, 255).to(torch.uint8)
    return out


def sharpness(img, factor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (factor > 1 sharpens)."""
    return _blend(_smooth(img), img, factor)
