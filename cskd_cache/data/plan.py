"""The view plan: which sample, augmentation seed and mixup/cutmix pairing every cached view gets.

A plan is decided once, from its parameters alone, and stored in the cache, so that it does not depend on
batch size, worker count or the number of GPUs. Views live at (epoch, position). Positions 2k and 2k+1
form a mixing pair, exactly like timm's Mixup in "pair" mode: both share lambda, mode and cutmix box, and
each view is its own image mixed with its partner's (view 2k = lam * a + (1 - lam) * b, and the reverse).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import CacheError

MODE_NONE, MODE_MIXUP, MODE_CUTMIX = 0, 1, 2


@dataclass(frozen=True)
class PlanParams:
    num_samples: int
    epochs: int
    seed: int = 0
    repeats: int = 1  # repeated augmentation (DeiT's RASampler): each drawn sample appears `repeats` times
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    input_size: int = 224  # cutmix boxes are in pixels of the augmented view

    def __post_init__(self):
        if self.num_samples < 2:
            raise CacheError(f"a plan needs at least 2 samples (views are mixed in pairs), got {self.num_samples}")
        if self.epochs < 1 or self.repeats < 1:
            raise CacheError(f"epochs and repeats must be >= 1, got {self.epochs} and {self.repeats}")

    @property
    def views_per_epoch(self) -> int:
        return self.num_samples - self.num_samples % 2  # pairs need an even count; DeiT drops a remainder too

    @property
    def total_views(self) -> int:
        return self.epochs * self.views_per_epoch

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EpochPlan:
    """Per-position arrays of one epoch (length views_per_epoch)."""

    sample: np.ndarray   # int64 sample id
    seed: np.ndarray     # int64 augmentation seed of the view
    partner: np.ndarray  # int64 position of the mixing partner (p ^ 1)
    lam: np.ndarray      # float32 weight of the view's own image
    mode: np.ndarray     # int8 MODE_*
    box: np.ndarray      # int16 [V, 4] cutmix box (y0, y1, x0, x1), zeros when not cutmix

    def positions_of(self, sample_id: int) -> np.ndarray:
        """All positions of one sample in this epoch (several with repeated augmentation)."""
        return np.flatnonzero(self.sample == sample_id)


def _cutmix_box(lam: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mirror of timm's rand_bbox + correct_lam: a box of area ~(1-lam), clipped, lam re-derived from the area."""
    cut = (size * np.sqrt(1.0 - lam)).astype(np.int64)
    cy = rng.integers(0, size, size=lam.shape)
    cx = rng.integers(0, size, size=lam.shape)
    y0, y1 = np.clip(cy - cut // 2, 0, size), np.clip(cy + cut // 2, 0, size)
    x0, x1 = np.clip(cx - cut // 2, 0, size), np.clip(cx + cut // 2, 0, size)
    corrected = 1.0 - (y1 - y0) * (x1 - x0) / float(size * size)
    return np.stack([y0, y1, x0, x1], axis=-1), corrected


def _partner_order(half: int, r: int) -> np.ndarray:
    """Which second-half entry partners first-half entry k. Pairing k with k (as for r = 1) would give the r
    repeats of a sample the r repeats of one other sample as partners. Instead, repeat j of group i (k = r*i + j)
    takes the second half's repeat j of group i + j: the partners of one sample's repeats are r entries more
    than r apart, hence r different samples, and both sides' repeats stay within a few pairs of each other (same
    batch). A bijection on the first r * (half // r) entries; the few left over keep k. The identity for r = 1,
    so plans without repeats are unchanged. A pure function of its arguments: it draws nothing."""
    k = np.arange(half, dtype=np.int64)
    groups = half // r
    if r > 1 and groups:
        i, j = np.divmod(k[: groups * r], r)
        k[: groups * r] = r * ((i + j) % groups) + j
    return k


def make_epoch_plan(params: PlanParams, epoch: int) -> EpochPlan:
    """Deterministic in (params, epoch) alone: numpy's PCG64 seeded by SeedSequence([seed, epoch])."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([params.seed, epoch])))
    n, v, r = params.num_samples, params.views_per_epoch, params.repeats
    perm = rng.permutation(n)
    # DeiT's repeated augmentation: the first ceil(n / r) samples, each r times, epoch length unchanged.
    seq = np.repeat(perm[: math.ceil(n / r)], r)[:v]
    half = v // 2
    # Pair the first half with the second: a sample's repeats land in neighbouring pairs, i.e. in the same
    # batch, which is what repeated augmentation is for, and every repeat gets its own partner.
    sample = np.empty(v, dtype=np.int64)
    sample[0::2], sample[1::2] = seq[:half], seq[half:][_partner_order(half, r)]
    seed = rng.integers(0, 2**63 - 1, size=v, dtype=np.int64)
    positions = np.arange(v, dtype=np.int64)

    # One mixing decision per pair, drawn unconditionally so every draw has a fixed place in the stream.
    use_cutmix = rng.random(half) < params.switch_prob
    if params.cutmix_alpha <= 0:
        use_cutmix[:] = False
    elif params.mixup_alpha <= 0:
        use_cutmix[:] = True
    lam_mix = rng.beta(max(params.mixup_alpha, 1e-6), max(params.mixup_alpha, 1e-6), size=half)
    lam_cut = rng.beta(max(params.cutmix_alpha, 1e-6), max(params.cutmix_alpha, 1e-6), size=half)
    apply = rng.random(half) < params.mix_prob
    if params.mixup_alpha <= 0 and params.cutmix_alpha <= 0:
        apply[:] = False
    box, lam_box = _cutmix_box(lam_cut, params.input_size, rng)
    pair_mode = np.where(apply, np.where(use_cutmix, MODE_CUTMIX, MODE_MIXUP), MODE_NONE).astype(np.int8)
    pair_lam = np.where(pair_mode == MODE_CUTMIX, lam_box, np.where(pair_mode == MODE_MIXUP, lam_mix, 1.0))
    box[pair_mode != MODE_CUTMIX] = 0
    return EpochPlan(
        sample=sample,
        seed=seed,
        partner=positions ^ 1,
        lam=np.repeat(pair_lam, 2).astype(np.float32),
        mode=np.repeat(pair_mode, 2),
        box=np.repeat(box, 2, axis=0).astype(np.int16),
    )
