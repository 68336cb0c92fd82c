"""Augmentation replay: (image, view seed, pair parameters) -> the exact augmented view.

Stage one and stage two call the same functions, so a cached teacher output always belongs to the pixels the
student sees. The per-image part is timm's own training transform (DeiT's recipe); every random draw it makes
comes from Python's `random`, NumPy's global generator and torch's global generator, which we seed from the
view's seed around each call.

In the data-loading workers a view is made up to its final pixels (uint8, after crop, flip and RandAugment) and
its random-erasing draws (boxes and noise, by timm's own code); `finish.py` turns a batch of them into normalised,
erased, mixed float views on the training device. A worker finishes a view itself only where it must check it
(its fingerprint, at precompute and on a rotating sample in training), with the very same code.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

from ..errors import BadImageError, CacheError
from .finish import Finisher
from .fingerprint import SIGNATURES, fingerprint, signature
from .plan import MODE_CUTMIX, MODE_MIXUP
from .recipe import Recipe, build_transform


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed the three global generators timm draws from, and put the caller's states back afterwards (not in a
    DataLoader worker: its generators serve replay alone, and saving and restoring them costs ~70 us a view)."""
    if torch.utils.data.get_worker_info() is not None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.random.default_generator.manual_seed(seed)
        yield
        return
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


class _ErasingDraws:
    """Stands in for a view tensor while timm's RandomErasing draws: records each box and the values it writes
    (pixel-mode noise from the seeded generator, or a colour), instead of writing them."""

    def __init__(self):
        self.boxes: list[tuple[int, int, int, int]] = []
        self.values: list[torch.Tensor] = []

    def __setitem__(self, key, value: torch.Tensor) -> None:
        _, ys, xs = key
        h, w = ys.stop - ys.start, xs.stop - xs.start
        self.boxes.append((ys.start, xs.start, h, w))
        self.values.append(value.to(torch.float32).expand(3, h, w).reshape(-1))


class ViewMaker:
    """timm's training transform for a recipe (`build_transform`), cut where a view's pixels are final: the PIL part
    (RandomResizedCrop, flip, RandAugment) runs here and gives uint8 pixels; RandomErasing draws here (its boxes and
    noise come from the view's seeded generators, in timm's order) but is applied by `finish`, with ToTensor and
    Normalize. Recipes whose transform ends otherwise are refused: their views could not be finished elsewhere."""

    def __init__(self, recipe: Recipe):
        primary, secondary, final = build_transform(recipe, separate=True)
        self.pil = transforms.Compose([*primary.transforms, *secondary.transforms])
        kinds = [type(t).__name__ for t in final.transforms]
        if kinds[:2] != ["MaybeToTensor", "Normalize"] or any(not isinstance(t, RandomErasing)
                                                               for t in final.transforms[2:]):
            raise CacheError(f"this recipe's transform ends with {kinds}; cskd-cache replays ToTensor, Normalize and "
                             "RandomErasing after the PIL steps")
        self.erasing = final.transforms[2] if len(final.transforms) > 2 else None

    def __call__(self, image: Image.Image, seed: int) -> tuple[torch.Tensor, _ErasingDraws]:
        """-> (pixels uint8 [3, H, W], the erasing draws). Deterministic in (image, seed)."""
        with _seeded(int(seed)):
            img = self.pil(image)
            draws = _ErasingDraws()
            if self.erasing is not None:
                # timm's own draws and noise; `_erase` is what RandomErasing.__call__ runs on a [C, H, W] view
                self.erasing._erase(draws, 3, img.size[1], img.size[0], torch.float32)
        # to_tensor's layout: HWC bytes -> CHW (its .float().div(255) happens in `finish`)
        return torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous(), draws


class PairDataset(torch.utils.data.Dataset):
    """Replays mixing pairs. Items are the pair's plan entries (see `pair_items`), handed in by the sampler, a batch
    at a time (`__getitems__`): each image is decoded once per batch, however many of its repeats the batch holds
    (repeated augmentation puts a sample's repeats in the same step). A pair carries its views' pixels and erasing
    draws, its mixing (lam, mode, box: view 2k is lam * own + (1 - lam) * partner) and its labels; a pair marked for
    checking also carries its finished views' fingerprints and signatures (`checked`), made with the device's code."""

    def __init__(self, source, recipe: Recipe, fingerprint_kind: str = "sha1-int16", signature_kind: str = "sketch64"):
        self.source, self.recipe, self.fingerprint_kind = source, recipe, fingerprint_kind
        self.signature_kind = signature_kind
        self.maker = ViewMaker(recipe)
        self.finish = Finisher(recipe.mean, recipe.std)

    def __getitems__(self, items: list[tuple]) -> list[dict]:
        images: dict[int, Image.Image] = {}
        try:
            return [self._pair(item, images) for item in items]
        except BadImageError as e:  # carried as data: DataLoader cannot re-raise exceptions with custom args
            return [{"error": str(e)}]

    def __getitem__(self, item: tuple) -> dict:
        """One pair, finished here (verify's replay; training and precompute fetch batches)."""
        pair = self.__getitems__([item])[0]
        return pair if "error" in pair else dict(pair, image=self.finish(pair))

    def _pair(self, item: tuple, images: dict) -> dict:
        view, sample_a, sample_b, seed_a, seed_b, lam, mode, box, check = item
        for s in (sample_a, sample_b):
            if s not in images:
                images[s] = self.source.load(int(s))
        (pa, ea), (pb, eb) = self.maker(images[sample_a], seed_a), self.maker(images[sample_b], seed_b)
        ya, yb = self.source.labels[int(sample_a)], self.source.labels[int(sample_b)]
        boxes = [b for e in (ea, eb) for b in e.boxes]
        pair = {"view": torch.tensor([view, view + 1]), "pixels": torch.stack([pa, pb]),
                "erase_view": torch.tensor([0] * len(ea.boxes) + [1] * len(eb.boxes), dtype=torch.int64),
                "erase_box": torch.tensor(boxes, dtype=torch.int64).view(-1, 4),
                "erase_noise": torch.cat([*ea.values, *eb.values]) if boxes else torch.zeros(0),
                "label": torch.tensor([ya, yb]), "partner_label": torch.tensor([yb, ya]),
                "lam": torch.tensor([lam, lam], dtype=torch.float32), "mode": torch.tensor([mode, mode]),
                "box": torch.tensor([box, box], dtype=torch.int64), "checked": torch.tensor([check, check])}
        width = SIGNATURES[self.signature_kind][2]
        fps, sigs = torch.zeros(2, dtype=torch.int64), torch.zeros(2, width, dtype=torch.int8)
        if check:  # the views as the device will finish them (same code), hashed
            x = self.finish(pair)
            fps = torch.tensor([fingerprint(v, self.fingerprint_kind) for v in x], dtype=torch.int64)
            sigs = torch.from_numpy(np.stack([signature(v, self.signature_kind) for v in x]))
        return dict(pair, fingerprint=fps, signature=sigs)

    def __len__(self) -> int:  # items come from the sampler; length is not meaningful
        return 0


def pair_items(plan, views, epoch_stride: int, check=True) -> list[tuple]:
    """Plan entries of the pairs that make up `views` (global view indices epoch * epoch_stride + position, whole
    pairs in order: 2k, 2k+1). `plan(epoch)` gives an EpochPlan. `check`: whether each pair's views are
    fingerprinted (one flag for all, or one per pair)."""
    views = np.asarray(views, dtype=np.int64)
    if len(views) % 2 or (views[0::2] % 2).any() or (views[1::2] != views[0::2] + 1).any():
        raise ValueError("views must be whole mixing pairs (2k, 2k + 1)")
    checks = np.broadcast_to(np.asarray(check, dtype=bool), (len(views) // 2,))
    items = []
    for v, c in zip(views[0::2].tolist(), checks.tolist()):
        epoch, p = divmod(v, epoch_stride)
        ep = plan(epoch)
        items.append((v, int(ep.sample[p]), int(ep.sample[p + 1]), int(ep.seed[p]), int(ep.seed[p + 1]),
                      float(ep.lam[p]), int(ep.mode[p]), tuple(int(b) for b in ep.box[p]), c))
    return items


def collate_pairs(items: list[dict]) -> dict:
    """Pairs -> one batch of views in order; erasing draws keep pointing at their views."""
    errors = [it["error"] for it in items if "error" in it]
    if errors:
        return {"error": errors[0]}
    out = {k: [t for it in items for t in it[k]] if isinstance(items[0][k], list) else torch.cat([it[k] for it in items])
           for k in items[0]}
    starts = np.cumsum([0] + [len(it["view"]) for it in items[:-1]])
    out["erase_view"] = torch.cat([it["erase_view"] + int(s) for it, s in zip(items, starts)])
    return out
