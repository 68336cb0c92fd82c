"""On a CPU the tensor backend makes timm's PIL views bit for bit: the JPEG decoder is Pillow's libjpeg-turbo, the
resize Pillow's fixed-point arithmetic in integers, the geometric ops Pillow's float64 taps, the point and colour
ops Pillow's own arithmetic. So a view's pixels do not depend on the backend, only (on CUDA) on nvJPEG's decoder."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cskd_cache.data.params import KERNELS, Drawer, ops_of
from cskd_cache.data.recipe import Recipe
from cskd_cache.data.replay import ViewMaker, _ErasingDraws, _seeded
from cskd_cache.data.tensor_replay import DeviceViews


def jpegs():
    """Camera-like JPEGs (quality 90) of a few real photographs, in two sizes and orientations."""
    import skimage.data

    out = []
    for name, size in (("astronaut", (200, 150)), ("chelsea", (97, 130)), ("coffee", (180, 120)),
                       ("rocket", (120, 160))):
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.BICUBIC).save(
            buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@pytest.mark.parametrize("recipe", [Recipe(input_size=48), Recipe(input_size=40, auto_augment="rand-m15-n3-mstd1.0"),
                                    Recipe(input_size=40, auto_augment="rand-m9-mstd0.5-inc1", interpolation="random")])
def test_device_views_are_timms_pil_views_on_a_cpu(recipe):
    data = jpegs()
    images = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
    drawer, maker = Drawer(recipe), ViewMaker(recipe)
    samples = [seed % len(data) for seed in range(160)]
    rows, want = [], []
    for seed, s in enumerate(samples):
        with _seeded(seed):
            rows.append(drawer.draw(*images[s].size, _ErasingDraws()))
        want.append(maker(images[s], seed)[0])  # timm's transform with PIL, as the pil backend runs it
    batch = {"sample": torch.tensor(samples), "data": torch.frombuffer(bytearray(b"".join(data[s] for s in samples)),
                                                                       dtype=torch.uint8),
             "data_len": torch.tensor([len(data[s]) for s in samples]), "params": torch.from_numpy(np.stack(rows))}
    got = DeviceViews(recipe, drawer)(batch, torch.device("cpu"))
    for i in range(len(samples)):
        assert torch.equal(got[i], want[i]), (i, ops_of(rows[i], drawer.layers))
    if recipe.auto_augment == "rand-m15-n3-mstd1.0":
        assert {name for r in rows for name, _, _ in ops_of(r, drawer.layers)} == set(KERNELS)  # every op met
