"""Augmentation replay: (image, view seed, pair parameters) -> the exact augmented tensor.

Stage one and stage two call the same functions, so a cached teacher output always belongs to the pixels the
student sees. The per-image part is timm's own training transform (DeiT's recipe); every random draw it makes
comes from Python's `random`, NumPy's global generator and torch's global generator, which we seed from the
view's seed around each call.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from PIL import Image

from ..errors import BadImageError
from .fingerprint import fingerprint, signature
from .plan import MODE_CUTMIX, MODE_MIXUP
from .recipe import Recipe, build_transform


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


class PairDataset(torch.utils.data.Dataset):
    """Replays mixing pairs. Items are the pair's plan entries (see `pair_items`), handed in by the sampler.
    Each pair also carries its labels and lambda: view 2k's target is lam * own + (1 - lam) * partner."""

    def __init__(self, source, recipe: Recipe, fingerprint_kind: str = "sha1-int16", signature_kind: str = "sketch64"):
        self.source, self.recipe, self.fingerprint_kind = source, recipe, fingerprint_kind
        self.signature_kind = signature_kind
        self.transform = build_transform(recipe)

    def __getitem__(self, item: tuple) -> dict:
        view, sample_a, sample_b, seed_a, seed_b, lam, mode, box = item
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
