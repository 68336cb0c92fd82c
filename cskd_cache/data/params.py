"""A view's augmentation parameters, drawn exactly as timm's transform draws them, without touching a pixel.

Every random draw of DeiT's transform depends on the view's seed and on sizes only (the image's, then the recipe's
input size): the crop box, the flip, RandAugment's ops with their magnitudes and interpolation, the erasing boxes and
their noise. So we run timm's own transform objects under the view's seeded generators, with each pixel operation
replaced by a recorder (wrap, don't fork: the draws stay timm's, whatever version is installed). The tensor backend
(`tensor_replay.py`) applies the record with torch ops on the training device; `apply_pil` applies it with timm's own
PIL functions, which is how the tests prove the record is the draw (it gives timm's views bit for bit).

A record is one int32 row per view (`Drawer.columns()` names them): crop top, left, height, width, interpolation;
flip; per RandAugment layer: kernel (-1: the op was skipped by its probability), interpolation, the level argument
as float64 bits (two int32 words: float32 would round timm's argument, and PIL's output with it); erasing: box
count, then (top, left, height, width) per box. The erasing noise is not stored: it is drawn from the view's seed,
as timm draws it.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from ..errors import CacheError
from .recipe import Recipe, build_transform, posterize

# The kernels the tensor backend implements, by the timm function they stand for. The codes are stored in caches:
# append only, never reorder.
KERNELS = ("auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
           "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel")
_TIMM_FN = {getattr(timm_aa, name): i for i, name in enumerate(KERNELS)}
_TIMM_FN[posterize] = KERNELS.index("posterize")  # the recipe's Pillow-safe posterize (recipe.py) is the same op
_GEOMETRIC = {KERNELS.index(n) for n in ("rotate", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel")}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")  # codes 0, 1, 2
_PIL_INTERP = {Image.Resampling.NEAREST: 0, Image.Resampling.BILINEAR: 1, Image.Resampling.BICUBIC: 2}
_MODE_INTERP = {InterpolationMode.NEAREST: 0, InterpolationMode.BILINEAR: 1, InterpolationMode.BICUBIC: 2}
NO_OP = -1


class _Shape:
    """Stands in for an image while timm draws a crop: torchvision reads its size from a tensor's shape, so a
    zero-stride tensor of the image's shape costs nothing."""

    def __new__(cls, width: int, height: int) -> torch.Tensor:
        return torch.empty((1,), dtype=torch.uint8).expand(3, height, width)


class _Recorder:
    """Replaces one RandAugment op's pixel function: records (kernel, interpolation, level argument) into the
    list that travels through RandAugment in place of the image, drawing what the real function would draw."""

    def __init__(self, kernel: int):
        self.kernel = kernel

    def __call__(self, record: list, *args, **kwargs) -> list:
        interp = 0
        if self.kernel in _GEOMETRIC:  # timm's geometric ops pick their resample here (a draw when it is a list)
            interp = _PIL_INTERP[timm_aa._interpolation(dict(kwargs))]
        record.append((self.kernel, interp, float(args[0]) if args else 0.0))
        return record


class Drawer:
    """Draws views' parameters for a recipe. Refuses, with the reason, a recipe whose transform the tensor backend
    cannot express (AutoAugment or AugMix policies, colour jitter, ops it has no kernel for): those work with
    `--replay pil`."""

    def __init__(self, recipe: Recipe):
        primary, secondary, final = build_transform(recipe, separate=True)
        self.recipe = recipe
        steps = [*primary.transforms, *secondary.transforms]
        kinds = [type(t).__name__ for t in steps]
        if not steps or not isinstance(steps[0], RandomResizedCropAndInterpolation):
            raise CacheError(f"--replay tensor: this recipe's transform starts with {kinds[:1]}, not timm's "
                             "RandomResizedCrop; use --replay pil")
        self.crop, self.flip, self.randaug, self.jitter = steps[0], None, None, None
        for t in steps[1:]:
            if isinstance(t, transforms.RandomHorizontalFlip) and self.flip is None and self.randaug is None:
                self.flip = t
            elif isinstance(t, transforms.ColorJitter) and self.randaug is None and self.jitter is None and \
                    all(r is None for r in (t.brightness, t.contrast, t.saturation, t.hue)):
                self.jitter = t  # timm adds it at 0 when there is no auto-augment: no change, but it draws
            elif isinstance(t, RandAugment) and self.randaug is None:
                self.randaug = t
            else:
                raise CacheError(f"--replay tensor cannot express {type(t).__name__} (recipe steps {kinds}; "
                                 f"--auto-augment {recipe.auto_augment!r}): the tensor backend replays "
                                 "RandomResizedCrop, horizontal flip and timm's RandAugment ('rand-...'); use --replay pil")
        self.layers, self.fill = 0, (0, 0, 0)
        if self.randaug is not None:
            self.fill = tuple(self.randaug.ops[0].kwargs["fillcolor"])  # timm's img_mean: what its ops fill with
            self.layers = self.randaug.num_layers
            for op in self.randaug.ops:
                if op.aug_fn not in _TIMM_FN:
                    raise CacheError(f"--replay tensor has no kernel for RandAugment's {op.name}; use --replay pil")
                op.aug_fn = _Recorder(_TIMM_FN[op.aug_fn])  # our own transform instance: timm's stays untouched
        self.erasing = final.transforms[2] if len(final.transforms) > 2 else None
        if self.erasing is not None and not isinstance(self.erasing, RandomErasing):
            raise CacheError(f"--replay tensor: the transform ends with {type(self.erasing).__name__}; "
                             "use --replay pil")
        self.boxes = self.erasing.max_count if self.erasing is not None else 0
        self.width = len(self.columns())

    def columns(self) -> list[str]:
        """The record's column names, in order (stored in the manifest: the record describes itself)."""
        ops = [f"op{i}_{c}" for i in range(self.layers) for c in ("kernel", "interpolation", "arg_lo", "arg_hi")]
        boxes = [f"erase{k}_{c}" for k in range(self.boxes) for c in ("top", "left", "height", "width")]
        return ["crop_top", "crop_left", "crop_height", "crop_width", "crop_interpolation", "flip", *ops,
                "erase_count", *boxes]

    def describe(self) -> dict:
        return {"width": self.width, "dtype": "int32", "columns": self.columns(), "kernels": list(KERNELS),
                "interpolations": list(INTERPOLATIONS), "no_op": NO_OP,
                "arg": "float64 from the two int32 words arg_lo, arg_hi (little-endian)"}

    def draw(self, width: int, height: int, erasing_draws) -> np.ndarray:
        """The record of one view of a width x height image, drawn from the global generators (the caller seeds
        them: replay._seeded). `erasing_draws` (replay._ErasingDraws) receives timm's erasing boxes and noise."""
        row = np.zeros(self.width, dtype=np.int32)
        top, left, h, w = self.crop.get_params(_Shape(width, height), self.crop.scale, self.crop.ratio)
        interp = self.crop.interpolation
        if isinstance(interp, (tuple, list)):
            interp = random.choice(interp)
        row[0:5] = top, left, h, w, _MODE_INTERP[interp]
        if self.flip is not None:
            row[5] = bool(torch.rand(1) < self.flip.p)  # torchvision's RandomHorizontalFlip.forward, its one draw
        if self.jitter is not None:  # its draw (an op order), so that what follows draws what timm's does
            self.jitter.get_params(self.jitter.brightness, self.jitter.contrast, self.jitter.saturation,
                                   self.jitter.hue)
        if self.randaug is not None:
            record = self.randaug([])  # timm's RandAugment.__call__: op choice, probability, magnitude, level
            ops = np.zeros((self.layers, 4), dtype=np.int32)
            ops[:, 0] = NO_OP
            for i, (kernel, op_interp, arg) in zip(range(self.layers), record):
                ops[i] = kernel, op_interp, *np.array([arg], np.float64).view(np.int32)
            # RandAugment records only the ops it applied, in order; the skipped ones stay NO_OP at the end
            row[6:6 + 4 * self.layers] = ops.ravel()
        if self.erasing is not None:
            size = self.recipe.input_size
            self.erasing._erase(erasing_draws, 3, size, size, torch.float32)  # timm's own draws, in timm's order
            at = 6 + 4 * self.layers
            row[at] = len(erasing_draws.boxes)
            for k, box in enumerate(erasing_draws.boxes):
                row[at + 1 + 4 * k: at + 5 + 4 * k] = box
        return row


def ops_of(row: np.ndarray, layers: int) -> list[tuple[str, str, float]]:
    """The RandAugment ops a record applies, in order: (kernel name, interpolation name, level argument)."""
    out = []
    for i in range(layers):
        kernel, interp = int(row[6 + 4 * i]), int(row[7 + 4 * i])
        if kernel != NO_OP:
            arg = float(np.ascontiguousarray(row[8 + 4 * i: 10 + 4 * i], dtype=np.int32).view(np.float64)[0])
            out.append((KERNELS[kernel], INTERPOLATIONS[interp], arg))
    return out


def apply_pil(image: Image.Image, row: np.ndarray, recipe: Recipe, layers: int, fill: tuple) -> Image.Image:
    """A record applied with timm's own PIL functions (the reference the tests hold the record to: the result is
    timm's transform's output for the view's seed, bit for bit)."""
    from torchvision.transforms import functional as F

    top, left, h, w, interp = (int(v) for v in row[:5])
    mode = [InterpolationMode.NEAREST, InterpolationMode.BILINEAR, InterpolationMode.BICUBIC][interp]
    img = F.resized_crop(image, top, left, h, w, [recipe.input_size, recipe.input_size], mode)
    if row[5]:
        img = F.hflip(img)
    pil_interp = [Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC]
    fns = {name: getattr(timm_aa, name) for name in KERNELS}
    fns["posterize"] = posterize
    for name, op_interp, arg in ops_of(row, layers):
        args = () if name in ("auto_contrast", "equalize", "invert") else \
            (int(arg),) if name in ("posterize", "solarize", "solarize_add") else (arg,)
        img = fns[name](img, *args, fillcolor=fill, resample=pil_interp[INTERPOLATIONS.index(op_interp)])
    return img


def header_size(data: bytes) -> tuple[int, int]:
    """An encoded image's (width, height) from its header, without decoding it."""
    import io

    with Image.open(io.BytesIO(data)) as img:
        return img.size

