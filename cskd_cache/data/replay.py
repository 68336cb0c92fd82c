"""Augmentation replay: (image, view seed, pair parameters) -> the exact augmented tensor.

Stage one and stage two call the same functions, so a cached teacher output always belongs to the pixels the
student sees. The per-image part is timm's own training transform (DeiT's recipe); every random draw it makes
comes from Python's `random`, NumPy's global generator and torch's global generator, which we seed from the
view's seed around each call.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
import re
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment as timm_aa

from .errors import CacheError
from .plan import MODE_CUTMIX, MODE_MIXUP, PlanParams


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
    library_versions: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
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


def build_transform(recipe: Recipe):
    """timm's training transform for the recipe (RandomResizedCrop, flip, RandAugment, erasing, normalize)."""
    return _pillow_safe(create_transform(
        recipe.input_size, is_training=True, scale=recipe.scale, ratio=recipe.ratio, hflip=recipe.hflip,
        auto_augment=recipe.auto_augment, color_jitter=recipe.color_jitter, interpolation=recipe.interpolation,
        mean=recipe.mean, std=recipe.std, re_prob=recipe.re_prob, re_mode=recipe.re_mode,
        re_count=recipe.re_count,
    ))


class Renormalize(torch.nn.Module):
    """A view normalised with the recipe's mean/std -> the same pixels normalised with a model's own mean/std.

    The cached unit is the view: the recipe's pixels in the recipe's units. Every model sees those very pixels,
    each in its own units (this exact per-channel affine map; mixing commutes with it), so one replayed view serves
    a teacher and a student whose pretrained configs normalise differently (e.g. timm's test_resnet uses 0.5/0.5).
    What the view is NOT, for a model whose mean/std differ from the recipe's: what timm's transform built with
    that model's own mean/std would give. RandAugment fills uncovered areas with the recipe's mean colour, and random
    erasing draws N(0, 1) noise in the recipe's units; a transform with other mean/std would fill and erase with
    other values (tests/test_teacher.py measures both). For DeiT (teacher and student on ImageNet's mean/std) the
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


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed the three global generators timm draws from, and put the caller's states back afterwards."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # The CPU generator only: torch.manual_seed also queues CUDA seeding, which records a Python traceback on
    # every call (a third of the replay time at 64 px). timm's transforms draw from the CPU generator alone.
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py), np.random.set_state(npy), torch.random.set_rng_state(th)


def augment(transform, image: Image.Image, seed: int) -> torch.Tensor:
    """One image's augmented, normalized tensor [3, H, W]; the same (image, seed) always gives the same tensor."""
    with _seeded(int(seed)):
        return transform(image)


def mix_pair(xa: torch.Tensor, xb: torch.Tensor, lam: float, mode: int, box) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup in pair mode: each view is its own image mixed with its partner's, with the same lambda."""
    if mode == MODE_MIXUP:
        lam = torch.tensor(lam, dtype=xa.dtype)
        return xa * lam + xb * (1 - lam), xb * lam + xa * (1 - lam)
    if mode == MODE_CUTMIX:
        y0, y1, x0, x1 = (int(b) for b in box)
        ya, yb = xa.clone(), xb.clone()
        ya[:, y0:y1, x0:x1] = xb[:, y0:y1, x0:x1]
        yb[:, y0:y1, x0:x1] = xa[:, y0:y1, x0:x1]
        return ya, yb
    return xa, xb


def replay_pair(transform, image_a: Image.Image, image_b: Image.Image, seed_a: int, seed_b: int,
                lam: float, mode: int, box) -> tuple[torch.Tensor, torch.Tensor]:
    """The views at positions 2k and 2k+1 of a plan, exactly as the student and the teacher see them."""
    return mix_pair(augment(transform, image_a, seed_a), augment(transform, image_b, seed_b), lam, mode, box)


FINGERPRINTS = ("sha1-int16", "blake2b-int32")  # format 2's, format 1's


def fingerprint(view: torch.Tensor, kind: str = "sha1-int16") -> int:
    """A 64-bit hash of a view's pixels, quantised to 1/256 so that it names the image, not float noise.
    Format 2 hashes int16 values with SHA-1 (hardware-accelerated: 0.2 ms at 224 px, 15% of the replay path
    before; identity, not security, is what it checks); format-1 caches used blake2b over int32."""
    # NumPy, not torch: the same float32 product and round-half-even, without intra-op thread start-up per call.
    scaled = np.rint(view.float().numpy() * np.float32(256))
    if kind == "blake2b-int32":
        digest = hashlib.blake2b(scaled.astype(np.int32).tobytes(), digest_size=8).digest()
    else:
        digest = hashlib.sha1(np.clip(scaled, -32768, 32767).astype(np.int16).data).digest()[:8]
    return int.from_bytes(digest, "little", signed=True)


# A signature summarises a view's pixels in a few bytes so that a replay that does not match its fingerprint
# exactly can be measured: harmless drift (another Pillow rounds a few pixels differently) or another view (a wrong
# crop, flip, partner or image). Format 3 stores `sketch64`; format-2 caches `cells4x4` (read as they are).
# Rates of both on real photos, full recipe: `python -m benchmarks.drift`, docs/reliability.md.

def _cells4x4(view: torch.Tensor) -> np.ndarray:
    """Format 2 (48 bytes): the mean of each channel over a 4 x 4 grid of cells, int8 in steps of 1/48."""
    cells = torch.nn.functional.adaptive_avg_pool2d(view.float()[None], 4)[0]
    return np.clip(np.round(cells.numpy().ravel() * 48), -127, 127).astype(np.int8)


def _cells4x4_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest difference of a cell mean (normalised units). Low-pass: it accepts a quarter of 4-px crop shifts."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(-1) / 48


# sketch64 (format 3): 8x8-pixel block means, count-sketched into 64 buckets.
# WHY block means: another Pillow differs where its crop-resize rounds differently, by +-1..12 levels in scattered
# pixels (RandAugment's point ops amplify some into sparse jumps); a moved crop, another partner or another image
# changes content, which is spatially coherent. Averaging 8x8 pixels divides uncorrelated per-pixel noise by 8 and
# keeps coherent change (8 px measured best of 1..56 px at 224 and 64 px).
# WHY a count sketch: 3 x 28 x 28 block means do not fit in 64 bytes. Each goes, with a sign, into one of 64
# buckets; the sketch of a difference is the difference of sketches, and with random signs its mean square over
# buckets estimates the mean square block-mean difference (relative error ~18% with 64 buckets).
# WHY wrap-around int8 in steps of 1/256: only small differences need resolving; a large one wraps to a random byte,
# still far beyond any tolerance (the distance then saturates near 0.29).
# WHY a fixed integer hash (splitmix64) for bucket and sign: stored signatures are compared years later, so the map
# must not depend on NumPy's random streams.
_SKETCH_BLOCK, _SKETCH_BUCKETS, _SKETCH_STEP = 8, 64, 1 / 256


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=16)
def _sketch_plan(c: int, h: int, w: int):
    """Per block of a [c, h, w] view: its bucket and weight (sign / block area * sqrt(buckets / blocks), so that
    the RMS over buckets of a sketch difference estimates the RMS block-mean difference)."""
    b = _SKETCH_BLOCK
    rows, cols = np.arange(0, h, b), np.arange(0, w, b)
    area = np.minimum(b, h - rows)[:, None] * np.minimum(b, w - cols)[None, :]  # edge blocks may be smaller
    n = c * len(rows) * len(cols)
    z = _splitmix64(np.arange(n, dtype=np.uint64) + np.uint64(0x5EED_D21F7))
    bucket = (z >> np.uint64(58)).astype(np.intp)  # top 6 bits: 0..63
    sign = np.where((z >> np.uint64(57)) & np.uint64(1), 1.0, -1.0)
    return rows, cols, bucket, sign / np.tile(area.ravel(), c) * np.sqrt(_SKETCH_BUCKETS / n)


def _sketch64(view: torch.Tensor) -> np.ndarray:
    x = np.ascontiguousarray(view.float().numpy(), dtype=np.float32)
    c, h, w = x.shape
    rows, cols, bucket, weight = _sketch_plan(c, h, w)
    b = _SKETCH_BLOCK
    if h % b == 0 and w % b == 0:  # fast path: sum a block's rows (contiguous), then its columns
        sums = x.reshape(c * h // b, b, w).sum(1).reshape(-1, b).sum(1)
    else:
        sums = np.add.reduceat(np.add.reduceat(x, rows, axis=1), cols, axis=2).ravel()
    s = np.bincount(bucket, weights=sums * weight, minlength=_SKETCH_BUCKETS)
    return (np.round(s / _SKETCH_STEP).astype(np.int64) & 0xFF).astype(np.uint8).view(np.int8)


def _sketch64_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated RMS difference of 8x8 block means (normalised units)."""
    d = (a.astype(np.int16) - b.astype(np.int16) + 128) % 256 - 128  # wrapped difference, in steps
    return np.sqrt((d.astype(np.float64) ** 2).mean(-1)) * _SKETCH_STEP


# kind -> (signature, distance, bytes, default tolerance). Tolerances: where real Pillow 10.4-vs-13 drift passes.
SIGNATURES = {"cells4x4": (_cells4x4, _cells4x4_distance, 48, 0.05),
              "sketch64": (_sketch64, _sketch64_distance, 64, 0.025)}


def signature(view: torch.Tensor, kind: str = "sketch64") -> np.ndarray:
    return SIGNATURES[kind][0](view)


def signature_distance(a: np.ndarray, b: np.ndarray, kind: str = "sketch64") -> np.ndarray:
    """How far two views' pixels are apart, from their signatures ([..., bytes]), in normalised units. 0 only says
    the signatures agree: exactness is the fingerprint's job (see `replay_matches`)."""
    return SIGNATURES[kind][1](a, b)


def replay_tolerance(tolerance: float | None, kind: str) -> float:
    """The tolerance a check uses: the given one, or the signature kind's default."""
    return SIGNATURES[kind][3] if tolerance is None else float(tolerance)


def replay_matches(same_fingerprint, distance, tolerance: float):
    """The replay check, per view: the very pixels (fingerprints equal), or, only when the tolerance is above 0, a
    signature distance within it. WHY the explicit 0: a drift can leave every bucket unchanged, so `distance <= 0`
    alone would let changed pixels through at --replay-tolerance 0."""
    return np.asarray(same_fingerprint) | ((tolerance > 0) & (np.asarray(distance) <= tolerance))


class PairDataset(torch.utils.data.Dataset):
    """Replays mixing pairs. Items are the pair's plan entries (see `pair_items`), handed in by the sampler.
    Each pair also carries its labels and lambda: view 2k's target is lam * own + (1 - lam) * partner."""

    def __init__(self, source, recipe: Recipe, fingerprint_kind: str = "sha1-int16", signature_kind: str = "sketch64"):
        self.source, self.recipe, self.fingerprint_kind = source, recipe, fingerprint_kind
        self.signature_kind = signature_kind
        self.transform = build_transform(recipe)

    def __getitem__(self, item: tuple) -> dict:
        view, sample_a, sample_b, seed_a, seed_b, lam, mode, box = item
        from .errors import BadImageError

        try:
            img_a, img_b = self.source.load(int(sample_a)), self.source.load(int(sample_b))
        except BadImageError as e:  # carried as data: DataLoader cannot re-raise exceptions with custom args
            return {"error": str(e)}
        xa, xb = replay_pair(self.transform, img_a, img_b, seed_a, seed_b, float(lam), int(mode), box)
        ya, yb = self.source.labels[int(sample_a)], self.source.labels[int(sample_b)]
        return {"view": torch.tensor([view, view + 1]), "image": torch.stack([xa, xb]),
                "fingerprint": torch.tensor([fingerprint(xa, self.fingerprint_kind),
                                            fingerprint(xb, self.fingerprint_kind)],
                                            dtype=torch.int64),
                "signature": torch.from_numpy(np.stack([signature(xa, self.signature_kind),
                                                        signature(xb, self.signature_kind)])),
                "label": torch.tensor([ya, yb]), "partner_label": torch.tensor([yb, ya]),
                "lam": torch.tensor([lam, lam], dtype=torch.float32)}

    def __len__(self) -> int:  # items come from the sampler; length is not meaningful
        return 0


def pair_items(plan, views, epoch_stride: int) -> list[tuple]:
    """Plan entries of the pairs that make up `views` (global view indices epoch * epoch_stride + position, whole
    pairs in order: 2k, 2k+1). `plan(epoch)` gives an EpochPlan."""
    views = np.asarray(views, dtype=np.int64)
    if len(views) % 2 or (views[0::2] % 2).any() or (views[1::2] != views[0::2] + 1).any():
        raise ValueError("views must be whole mixing pairs (2k, 2k + 1)")
    items = []
    for v in views[0::2].tolist():
        epoch, p = divmod(v, epoch_stride)
        ep = plan(epoch)
        items.append((v, int(ep.sample[p]), int(ep.sample[p + 1]), int(ep.seed[p]), int(ep.seed[p + 1]),
                      float(ep.lam[p]), int(ep.mode[p]), tuple(int(b) for b in ep.box[p])))
    return items


def collate_pairs(items: list[dict]) -> dict:
    errors = [it["error"] for it in items if "error" in it]
    if errors:
        return {"error": errors[0]}
    return {k: torch.cat([it[k] for it in items]) for k in items[0]}
