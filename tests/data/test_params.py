"""The tensor backend's parameter records are timm's own draws: applied with timm's PIL functions, a record gives
timm's transform's view bit for bit, over the full DeiT recipe on real photos (every RandAugment op occurs)."""

import numpy as np
import pytest
import torch
from PIL import Image

from cskd_cache.data.params import KERNELS, Drawer, apply_pil, header_size, ops_of
from cskd_cache.data.recipe import Recipe
from cskd_cache.data.replay import ViewMaker, _ErasingDraws, _seeded
from cskd_cache.errors import CacheError


def photos():
    import skimage.data

    out = []
    for name, size in (("astronaut", (160, 120)), ("chelsea", (97, 130)), ("coffee", (140, 90))):
        img = getattr(skimage.data, name)()
        out.append(Image.fromarray(img).convert("RGB").resize(size, Image.BICUBIC))
    return out


@pytest.mark.parametrize("recipe", [Recipe(input_size=48), Recipe(input_size=40, auto_augment="rand-m15-n3-mstd1.0"),
                                    Recipe(input_size=40, auto_augment=None, color_jitter=0.0, re_prob=1.0)])
def test_a_record_is_timms_draw(recipe):
    images, drawer, maker = photos(), Drawer(recipe), ViewMaker(recipe)
    seen = set()
    for seed in range(240):
        img = images[seed % len(images)]
        pixels, erasing = maker(img, seed)  # timm's transform, PIL, as the pil backend runs it
        draws = _ErasingDraws()
        with _seeded(seed):
            row = drawer.draw(*img.size, draws)
        assert row.shape == (drawer.width,) and row.dtype == np.int32
        got = np.asarray(apply_pil(img, row, recipe, drawer.layers, drawer.fill))
        assert np.array_equal(got, pixels.permute(1, 2, 0).numpy()), (seed, ops_of(row, drawer.layers))
        assert draws.boxes == erasing.boxes and all(torch.equal(a, b) for a, b in zip(draws.values, erasing.values))
        at = 6 + 4 * drawer.layers
        assert row[at] == len(draws.boxes) and [tuple(row[at + 1 + 4 * k: at + 5 + 4 * k]) for k in
                                                range(row[at])] == draws.boxes
        seen |= {name for name, _, _ in ops_of(row, drawer.layers)}
    if recipe.auto_augment:
        assert seen == set(KERNELS)  # every op met, so every op's draw is held to timm's


def test_draws_are_the_same_from_any_generator_state():
    drawer = Drawer(Recipe(input_size=48))
    a = []
    for state in (1, 2):
        torch.manual_seed(state), np.random.seed(state)
        with _seeded(7):
            a.append(drawer.draw(300, 200, _ErasingDraws()))
    assert np.array_equal(*a)
    with _seeded(8):
        assert not np.array_equal(drawer.draw(300, 200, _ErasingDraws()), a[0])


@pytest.mark.parametrize("aa,why", [("original", "AutoAugment"), ("augmix-m5", "AugMix"), (None, "ColorJitter")])
def test_recipes_the_kernels_cannot_express_are_refused(aa, why):
    recipe = Recipe(input_size=48, auto_augment=aa, replay="tensor")
    with pytest.raises(CacheError, match="--replay pil"):
        Drawer(recipe)


def test_header_size_reads_no_pixels(tmp_path):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (33, 21)).save(buf, "JPEG")
    assert header_size(buf.getvalue()) == (33, 21)
