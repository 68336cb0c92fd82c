"""The view plan and augmentation replay: deterministic, batch-independent, and faithful to the DeiT recipe."""

import numpy as np
import pytest
import torch
from PIL import Image

from cskd_cache.data.plan import MODE_CUTMIX, MODE_MIXUP, MODE_NONE, PlanParams, make_epoch_plan
from cskd_cache.data.fingerprint import fingerprint
from cskd_cache.data.recipe import Recipe, build_transform
from cskd_cache.data.replay import augment, mix_pair, replay_pair


def test_plan_is_deterministic_and_epochs_differ():
    p = PlanParams(num_samples=101, epochs=3, seed=7)
    a, b = make_epoch_plan(p, 1), make_epoch_plan(p, 1)
    for f in ("sample", "seed", "partner", "lam", "mode", "box"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(make_epoch_plan(p, 0).sample, a.sample)
    assert not np.array_equal(make_epoch_plan(PlanParams(101, 3, seed=8), 1).seed, a.seed)


def test_plan_covers_every_sample_once_and_pairs_are_distinct():
    p = PlanParams(num_samples=100, epochs=1, seed=0)
    e = make_epoch_plan(p, 0)
    assert p.views_per_epoch == 100 and sorted(e.sample.tolist()) == list(range(100))
    assert np.array_equal(e.partner, np.arange(100) ^ 1)
    assert (e.sample[0::2] != e.sample[1::2]).all()
    assert len(set(e.seed.tolist())) == 100
    # odd datasets drop one view so that every view has a partner
    assert PlanParams(num_samples=101, epochs=1).views_per_epoch == 100


def test_repeated_augmentation_deit_style():
    p = PlanParams(num_samples=90, epochs=1, seed=1, repeats=3)
    e = make_epoch_plan(p, 0)
    counts = np.bincount(e.sample, minlength=90)
    assert len(e.sample) == 90 and set(counts[counts > 0].tolist()) == {3} and (counts > 0).sum() == 30
    first = e.sample[0]
    pos = e.positions_of(int(first))
    assert len(pos) == 3 and (np.diff(pos) == 2).all()  # repeats sit in neighbouring pairs: the same batch
    assert len(set(e.seed[pos].tolist())) == 3  # each repeat is its own augmentation


def test_mixing_decisions_match_timm_semantics():
    p = PlanParams(num_samples=4000, epochs=1, seed=3, input_size=64)
    e = make_epoch_plan(p, 0)
    assert (e.lam[0::2] == e.lam[1::2]).all() and (e.mode[0::2] == e.mode[1::2]).all()
    cut = e.mode == MODE_CUTMIX
    assert 0.4 < cut.mean() < 0.6 and (e.mode != MODE_NONE).all()  # switch prob 0.5, mix prob 1.0
    y0, y1, x0, x1 = e.box[cut].T.astype(int)
    area = (y1 - y0) * (x1 - x0)
    assert np.allclose(e.lam[cut], 1 - area / 64**2, atol=1e-6)  # timm's correct_lam
    assert (e.box[~cut] == 0).all()
    mix = e.mode == MODE_MIXUP
    assert abs(e.lam[mix].mean() - 0.5) < 0.03  # Beta(0.8, 0.8) is symmetric
    off = make_epoch_plan(PlanParams(num_samples=10, epochs=1, mixup_alpha=0, cutmix_alpha=0), 0)
    assert (off.mode == MODE_NONE).all() and (off.lam == 1).all()


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8))


def test_augment_replays_exactly_and_restores_global_rng(image):
    t = build_transform(Recipe(input_size=32))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = augment(t, image, 42)
    after = torch.rand(1)
    b = augment(t, image, 42)
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    assert torch.equal(before, after)  # replay does not disturb the caller's random stream
    assert not torch.equal(a, augment(t, image, 43))
    assert fingerprint(a) == fingerprint(b) != fingerprint(augment(t, image, 43))


def test_mix_pair_is_timm_pair_mode():
    xa, xb = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
    ya, yb = mix_pair(xa, xb, 0.3, MODE_MIXUP, (0, 0, 0, 0))
    assert torch.allclose(ya, 0.3 * xa + 0.7 * xb) and torch.allclose(yb, 0.3 * xb + 0.7 * xa)
    ya, yb = mix_pair(xa, xb, 0.75, MODE_CUTMIX, (2, 6, 0, 4))
    assert torch.equal(ya[:, 2:6, 0:4], xb[:, 2:6, 0:4]) and torch.equal(ya[:, :2], xa[:, :2])
    assert torch.equal(yb[:, 2:6, 0:4], xa[:, 2:6, 0:4])
    na, nb = mix_pair(xa, xb, 1.0, MODE_NONE, (0, 0, 0, 0))
    assert na is xa and nb is xb


def test_replay_pair_deit_recipe(image):
    t = build_transform(Recipe(input_size=32))
    a1, b1 = replay_pair(t, image, image, 1, 2, 0.6, MODE_MIXUP, (0, 0, 0, 0))
    a2, b2 = replay_pair(t, image, image, 1, 2, 0.6, MODE_MIXUP, (0, 0, 0, 0))
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and not torch.equal(a1, b1)


def test_recipe_round_trip_and_defaults():
    r = Recipe()
    d = r.to_dict()
    assert d["auto_augment"] == "rand-m9-mstd0.5-inc1" and d["re_prob"] == 0.25 and d["re_mode"] == "pixel"
    assert d["mixup_alpha"] == 0.8 and d["cutmix_alpha"] == 1.0 and d["switch_prob"] == 0.5
    assert d["interpolation"] == "bicubic" and d["color_jitter"] == 0.3 and d["label_smoothing"] == 0.1
    assert set(d["library_versions"]) >= {"torch", "timm", "torchvision", "pillow", "numpy"}
    assert Recipe.from_dict({k: v for k, v in d.items() if k != "library_versions"}) == r


@pytest.mark.parametrize("n", [90, 300, 1001])
def test_repeats_get_their_own_partners(n):
    """The reproduced bug: with --repeats 3 all three repeats of most samples were mixed with one partner."""
    e = make_epoch_plan(PlanParams(num_samples=n, epochs=1, seed=4, repeats=3), 0)
    partners: dict[int, list[int]] = {}
    for a, b in zip(e.sample[0::2].tolist(), e.sample[1::2].tolist()):
        partners.setdefault(a, []).append(b)
        partners.setdefault(b, []).append(a)
    shared = sum(len(p) - len(set(p)) for p in partners.values())
    assert shared <= 2, shared  # at most the group that straddles the two halves
    assert (e.sample[0::2] != e.sample[1::2]).all()
    spread = [s for s in partners if np.ptp(e.positions_of(s)) > 24]
    assert sum(len(e.positions_of(s)) != 3 for s in partners) <= 1  # the epoch may cut the last group short
    # repeats stay close together (the same batch) on both sides of the pairs, but for the r - 1 groups whose
    # partner rotation wraps around the epoch and the one that straddles the rotation's end
    assert len(spread) <= 3, spread


def test_repeats_one_plan_is_unchanged():
    """Without repeats the plan is what format-1 caches hold: pairing k with k (no partner reordering)."""
    from cskd_cache.data.plan import _partner_order

    assert np.array_equal(_partner_order(51, 1), np.arange(51))
    e = make_epoch_plan(PlanParams(num_samples=40, epochs=1, seed=0), 0)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([0, 0])))
    perm = rng.permutation(40)
    assert np.array_equal(e.sample[0::2], perm[:20]) and np.array_equal(e.sample[1::2], perm[20:])


def test_epoch_order_reaches_every_view_and_cycles_differ():
    """A cache cycled over training: cycle 0 is plan order; later cycles visit chunk-sized blocks of pairs in a
    new order, so the dropped tail differs and batches are not the previous cycle's."""
    from cskd_cache.data.order import epoch_views, reuse_factor

    vpe, gb, block = 100, 16, 8
    steps = vpe // gb  # 6 steps: 4 views of each epoch are dropped
    cycles = [epoch_views(e, 1, vpe, gb, steps, block, seed=0) for e in range(6)]
    assert np.array_equal(cycles[0], np.arange(96))
    for v in cycles:
        assert len(v) == 96 and len(set(v.tolist())) == 96
        assert (v[0::2] % 2 == 0).all() and (v[1::2] == v[0::2] + 1).all()
    assert set(np.concatenate(cycles).tolist()) == set(range(100))  # the tail is not the same every cycle
    b0 = {frozenset(cycles[0][s * gb:(s + 1) * gb].tolist()) for s in range(steps)}
    b1 = {frozenset(cycles[1][s * gb:(s + 1) * gb].tolist()) for s in range(steps)}
    assert not b0 & b1
    # two cached epochs: epochs 0 and 1 read cached epochs 0 and 1 in plan order, epoch 2 cycles cached epoch 0
    assert np.array_equal(epoch_views(1, 2, vpe, gb, steps, block, 0), 100 + np.arange(96))
    e2 = epoch_views(2, 2, vpe, gb, steps, block, 0)
    assert e2.min() >= 0 and e2.max() < 100 and not np.array_equal(e2, np.arange(96))
    assert np.array_equal(e2, epoch_views(2, 2, vpe, gb, steps, block, 0))  # a pure function: resumes are exact
    assert reuse_factor(300, 30) == 10.0
