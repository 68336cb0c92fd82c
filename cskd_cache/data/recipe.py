"""The augmentation recipe (DeiT's by default) and the transforms timm builds from it; how models see the views.

A recipe is stored in full in every cache, and a cache is only ever used with its own. Views are the recipe's pixels
in the recipe's units; `Renormalize` maps them into each model's own units.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment as timm_aa

from ..errors import CacheError
from .plan import PlanParams


@dataclass(frozen=True)
class Recipe:
    """DeiT/CSKD training augmentation. Stored in full in every cache; a cache is only used with its recipe."""

    input_size: int = 224
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3  # timm ignores it when auto_augment is set, as DeiT does; kept for the record
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    # How the recipe's pixels are made: PIL in the loader workers (timm's transform itself), or "tensor": timm's
    # draws applied by torch kernels on the training device (data/tensor_replay.py). Another backend gives other
    # pixels, so it is part of what a cache is; recorded only when it is not "pil" (older caches stay the same).
    replay: str = "pil"
    # With "tensor": where JPEGs are decoded. "device": on the training device (nvJPEG on CUDA, whose pixels differ
    # a little from libjpeg-turbo's); "worker": libjpeg-turbo in the loader workers, so the views are timm's PIL
    # views on every device (more worker CPU). Other pixels, so part of the recipe; recorded only when "worker".
    decode: str = "device"
    library_versions: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["replay"] == "pil":
            del d["replay"]
        if d["decode"] == "device":
            del d["decode"]
        d["library_versions"] = library_versions()
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "the cache") -> "Recipe":
        """A recipe as recorded in a manifest (library versions ignored). Unknown fields are refused: they would
        be augmentation settings this version cannot replay."""
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k != "library_versions"}
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise CacheError(f"{where} uses augmentation settings this cskd-cache does not know "
                             f"({', '.join(unknown)}); upgrade cskd-cache to the version that made it")
        return cls(**d)

    def check(self) -> "Recipe":
        """Refuse values that are not a recipe (before they are recorded in a manifest), naming the CLI flag."""
        probs = {"--re-prob": self.re_prob, "--mix-prob": self.mix_prob, "--switch-prob": self.switch_prob,
                 "hflip": self.hflip}
        bad = [f"{k} {v} (a probability: 0 to 1)" for k, v in probs.items() if not 0.0 <= v <= 1.0]
        bad += [f"{k} {v} (>= 0)" for k, v in (("--mixup", self.mixup_alpha), ("--cutmix", self.cutmix_alpha),
                                              ("color_jitter", self.color_jitter)) if v < 0]
        if not 0.0 <= self.label_smoothing < 1.0:
            bad.append(f"--smoothing {self.label_smoothing} (0 to below 1)")
        if self.input_size < 16:
            bad.append(f"--input-size {self.input_size} (at least 16 pixels)")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0 or not 0.0 < self.ratio[0] <= self.ratio[1]:
            bad.append(f"scale {self.scale} / ratio {self.ratio}")
        if self.replay not in ("pil", "tensor"):
            bad.append(f"--replay {self.replay!r} (pil or tensor)")
        if self.decode not in ("device", "worker"):
            bad.append(f"--decode {self.decode!r} (device or worker)")
        elif self.decode == "worker" and self.replay != "tensor":
            bad.append("--decode worker (it chooses where --replay tensor decodes; pil decodes in the workers)")
        if self.re_count < 1:
            bad.append(f"re_count {self.re_count} (>= 1)")
        if bad:
            raise CacheError("invalid augmentation recipe: " + "; ".join(bad))
        aa = self.auto_augment
        if aa is not None:
            # timm skips RandAugment sections it cannot parse ('rand-m9-zz' is plain rand-m10): be strict
            if aa.startswith("rand") and not all(re.fullmatch(r"(mstd|mmax|inc|m|n|p)\d[\d.]*|t.*", part)
                                                 for part in aa.split("-")[1:]) or aa.startswith("rand") and \
                    aa.split("-")[0] != "rand":
                raise CacheError(f"--auto-augment {aa!r}: not a timm RandAugment spec (e.g. rand-m9-mstd0.5-inc1; "
                                 "sections m, n, mstd, mmax, inc, p, t), or 'none'")
            try:
                build_transform(self)
            except Exception as e:  # noqa: BLE001 - timm asserts on unknown policies
                raise CacheError(f"--auto-augment {aa!r}: timm cannot build it ({type(e).__name__}: {e}); use "
                                 "e.g. rand-m9-mstd0.5-inc1, original, augmix-m5, or 'none'") from None
        return self

    def plan_params(self, num_samples: int, epochs: int, seed: int, repeats: int) -> PlanParams:
        return PlanParams(
            num_samples=num_samples, epochs=epochs, seed=seed, repeats=repeats,
            mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha, mix_prob=self.mix_prob,
            switch_prob=self.switch_prob, input_size=self.input_size,
        )


def library_versions() -> dict:
    """Versions whose changes can alter augmented pixels; a drift is then caught by view fingerprints."""
    import PIL
    import timm
    import torchvision

    return {"torch": torch.__version__.split("+")[0], "torchvision": torchvision.__version__.split("+")[0],
            "timm": timm.__version__, "pillow": PIL.__version__, "numpy": np.__version__}


def posterize(img: Image.Image, bits_to_keep, **_) -> Image.Image:
    """timm's posterize op with the meaning every Pillow gave bits 0 until Pillow 13: all bits cleared (black).

    DeiT's `rand-m9-mstd0.5-inc1` draws magnitudes up to 10, which PosterizeIncreasing maps to 0 bits; Pillow 13
    raises on that (1 view in ~700 on real photos), Pillow <= 12 returned mask ~255 applied to every value, i.e. 0.
    Bits 1..8 go to Pillow itself, so the views are the same under every supported Pillow."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits >= 1:
        return ImageOps.posterize(img, bits)
    return img.point([0] * 256 * len(img.getbands()))


def _pillow_safe(transform):
    """Swap timm's posterize for ours in every auto-augment op of a composed transform (wrap, don't fork timm).
    AugmentOp binds its function at construction, so this touches only the transform we build."""
    for t in getattr(transform, "transforms", [transform]):
        ops = list(getattr(t, "ops", []) or [])
        for sub in getattr(t, "policy", []) or []:  # AutoAugment: a list of sub-policies
            ops.extend(sub)
        for op in ops:
            if getattr(op, "aug_fn", None) is timm_aa.posterize:
                op.aug_fn = posterize
    return transform


def build_transform(recipe: Recipe, separate: bool = False):
    """timm's training transform for the recipe (RandomResizedCrop, flip, RandAugment, normalize, erasing); with
    `separate`, timm's three parts (primary, secondary, final: ToTensor, Normalize, RandomErasing)."""
    out = create_transform(
        recipe.input_size, is_training=True, scale=recipe.scale, ratio=recipe.ratio, hflip=recipe.hflip,
        auto_augment=recipe.auto_augment, color_jitter=recipe.color_jitter, interpolation=recipe.interpolation,
        mean=recipe.mean, std=recipe.std, re_prob=recipe.re_prob, re_mode=recipe.re_mode,
        re_count=recipe.re_count, separate=separate)
    return tuple(_pillow_safe(t) for t in out) if separate else _pillow_safe(out)


class Renormalize(torch.nn.Module):
    """A view normalised with the recipe's mean/std -> the same pixels normalised with a model's own mean/std.

    The cached unit is the view: the recipe's pixels in the recipe's units. Every model sees those very pixels,
    each in its own units (this exact per-channel affine map; mixing commutes with it), so one replayed view serves
    a teacher and a student whose pretrained configs normalise differently (e.g. timm's test_resnet uses 0.5/0.5).
    What the view is NOT, for a model whose mean/std differ from the recipe's: what timm's transform built with
    that model's own mean/std would give. RandAugment fills uncovered areas with the recipe's mean colour, and random
    erasing draws N(0, 1) noise in the recipe's units; a transform with other mean/std would fill and erase with
    other values (tests/teacher/test_teacher.py measures both). For DeiT (teacher and student on ImageNet's mean/std) the
    map is the identity."""

    def __init__(self, view_mean, view_std, model_mean, model_std):
        super().__init__()
        vm, vs = torch.tensor(view_mean, dtype=torch.float64), torch.tensor(view_std, dtype=torch.float64)
        mm, ms = torch.tensor(model_mean, dtype=torch.float64), torch.tensor(model_std, dtype=torch.float64)
        self.identity = bool(torch.equal(vm, mm) and torch.equal(vs, ms))  # bit-exact pass-through when equal
        self.register_buffer("scale", (vs / ms).float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((vm - mm) / ms).float().view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.identity else x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def model_normalization(model: torch.nn.Module) -> tuple[tuple, tuple]:
    """(mean, std) from a timm model's pretrained config (ImageNet's when it has none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))


def build_eval_transform(recipe: Recipe):
    return create_transform(recipe.input_size, is_training=False, interpolation=recipe.interpolation,
                            mean=recipe.mean, std=recipe.std, crop_pct=0.875)


def library_drift(manifest: dict) -> str:
    """The libraries whose version differs from the ones a cache was made with, for drift messages."""
    from .kernels import REVISION  # data/kernels.py imports nothing of ours

    then, now = manifest["recipe"].get("library_versions", {}), library_versions()
    diff = [f"{k} {then[k]} then, {now.get(k)} now" for k in sorted(then) if then[k] != now.get(k)]
    made = manifest.get("params", {}).get("kernels_revision", 1)  # params: a --replay tensor cache
    if "params" in manifest and made != REVISION:
        diff.append(f"cskd-cache's tensor kernels revision {made} then, {REVISION} now")
    return f"; {', '.join(diff)}" if diff else "; the same library versions as now"
