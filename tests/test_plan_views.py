"""The view plan and augmentation replay: deterministic, batch-independent, and faithful to the DeiT recipe."""

import numpy as np
import pytest
import torch
from PIL import Image

from cskd_cache.plan import MODE_CUTMIX, MODE_MIXUP, MODE_NONE, PlanParams, make_epoch_plan
from cskd_cache.views import Recipe, augment, build_transform, fingerprint, mix_pair, replay_pair


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
