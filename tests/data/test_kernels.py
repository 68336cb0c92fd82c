"""The tensor backend's kernels against timm's PIL ops, on real photos (small: 48x40, so the file runs in seconds).

Point and enhance ops must give Pillow's pixels; geometric ops Pillow's pixels with exact=True and pixels close to
them with grid_sample; every op must give a sample the same pixels in any batch.
"""

import math

import numpy as np
import pytest
import timm.data.auto_augment as aa
import torch
from PIL import Image, ImageOps

from cskd_cache.data import kernels as K
from cskd_cache.data import resize as R
from cskd_cache.data.recipe import posterize as recipe_posterize

FILL = (124, 116, 104)  # DeiT's img_mean fill
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.fixture(scope="module")
def photos():
    import skimage.data

    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((48, 40), Image.BICUBIC)
            for name in PHOTOS]


def tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def batch(imgs) -> torch.Tensor:
    return torch.stack([tensor(i) for i in imgs])


def array(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def assert_pillow(pil_op, kernel, imgs, params):
    """kernel(batch of every (image, param), params) equals pil_op(image, param) bit for bit."""
    pairs = [(img, p) for img in imgs for p in params]
    got = kernel(batch([img for img, _ in pairs]), torch.tensor([p for _, p in pairs]))
    for (img, p), out in zip(pairs, got):
        assert np.array_equal(array(out), np.asarray(pil_op(img, p))), (pil_op, p)


def test_point_ops_give_pillows_pixels_for_every_parameter(photos):
    assert np.array_equal(array(K.invert(batch(photos))[1]), np.asarray(ImageOps.invert(photos[1])))
    assert_pillow(recipe_posterize, K.posterize, photos, list(range(9)))
    assert_pillow(ImageOps.solarize, K.solarize, photos, list(range(257)))
    assert_pillow(aa.solarize_add, K.solarize_add, photos, list(range(0, 111, 5)) + [255])
    assert_pillow(lambda img, t: aa.solarize_add(img, 60, thresh=t),
                  lambda x, t: K.solarize_add(x, 60, thresh=t), photos[:2], [0, 1, 100, 200, 256])


def odd_images():
    """Images the histogram ops special-case: a constant channel, two values, one value, a tiny image whose
    equalize table runs past 255 (step 1), a narrow range."""
    rng = np.random.default_rng(0)
    constant = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    constant[..., 1] = 77
    two = np.where(rng.random((40, 48, 1)) < 0.3, 40, 200).repeat(3, axis=2).astype(np.uint8)
    flat = np.full((40, 48, 3), 9, np.uint8)
    tiny = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    tiny[:36] = 0  # 1,920 pixels, 1,728 of them 0: step = (1920 - top count) // 255 is 7, small
    narrow = rng.integers(100, 104, (40, 48, 3), dtype=np.uint8)
    return [Image.fromarray(a) for a in (constant, two, flat, tiny, narrow)]


@pytest.mark.parametrize("name", ["autocontrast", "equalize"])
def test_histogram_ops_give_pillows_pixels(photos, name):
    imgs = photos + odd_images() + [Image.fromarray(np.array(photos[0])[:4, :5])]  # 20 pixels: step 0
    pil_op = {"autocontrast": ImageOps.autocontrast, "equalize": ImageOps.equalize}[name]
    for img in imgs:
        got = getattr(K, name)(tensor(img)[None])[0]
        assert np.array_equal(array(got), np.asarray(pil_op(img))), (name, img.size)


def test_equalize_clips_tables_past_255():
    """Pillow's table can exceed 255 (lut = (step // 2 + pixels below) // step); Image.point clips it."""
    img = Image.fromarray(np.array([[0] * 300 + [1, 2]], np.uint8).reshape(2, 151, 1).repeat(3, axis=2))
    out = np.asarray(ImageOps.equalize(img))
    assert out.max() == 255 and np.array_equal(array(K.equalize(tensor(img)[None])[0]), out)


ENHANCE = ("color", "contrast", "brightness", "sharpness")
FACTORS = [0.0, 0.1, 0.33, 0.5, 0.77, 1.0, 1.18, 1.5, 1.9, 2.5]


@pytest.mark.parametrize("name", ENHANCE)
def test_enhance_ops_give_pillows_pixels(photos, name):
    """Pillow's degenerate image, rebuilt exactly, blended in float32 and truncated as Image.blend does: equal on
    x86-64 (a Pillow built with fused multiply-add, e.g. on arm64, may round a pixel the other way: max 1 there)."""
    pairs = [(img, f) for img in photos + odd_images()[:2] for f in FACTORS]
    got = getattr(K, name)(batch([img for img, _ in pairs]), torch.tensor([f for _, f in pairs]))
    diffs = [np.abs(array(out).astype(int) - np.asarray(getattr(aa, name)(img, f)).astype(int))
             for (img, f), out in zip(pairs, got)]
    d = np.stack(diffs)
    assert d.max() <= 1 and (d == 0).mean() >= 0.9999, (name, d.max(), (d == 0).mean())


GEOMETRIC = [  # (timm op, kernel, parameters): timm's ranges, incl. the extremes DeiT's m9 reaches
    (aa.rotate, K.rotate, [30.0, -30.0, 13.7, -4.2]),
    (aa.shear_x, K.shear_x, [0.3, -0.3, 0.11]),
    (aa.shear_y, K.shear_y, [0.3, -0.2, 0.07]),
    (aa.translate_x_rel, K.translate_x, [0.45, -0.45, 0.1234]),
    (aa.translate_y_rel, K.translate_y, [0.45, -0.3, 0.1234]),  # 0.45 * 40 = 18: a whole-pixel shift
]
RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def geometric_diffs(photos, pil_op, kernel, params, mode, exact):
    x = batch(photos)
    out = []
    for p in params:
        got = kernel(x, torch.full((len(photos),), p, dtype=torch.float64), FILL, mode, exact=exact)
        for img, g in zip(photos, got):
            want = np.asarray(pil_op(img, p, fillcolor=FILL, resample=RESAMPLE[mode])).astype(int)
            out.append(np.abs(array(g).astype(int) - want))
    return np.stack(out)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("pil_op,kernel,params", GEOMETRIC, ids=[g[1].__name__ for g in GEOMETRIC])
def test_geometric_ops_exact_give_pillows_pixels(photos, pil_op, kernel, params, mode):
    """exact=True: Pillow's input points, fill decisions, taps and float64 arithmetic, so Pillow's pixels."""
    d = geometric_diffs(photos, pil_op, kernel, params, mode, exact=True)
    assert d.max() == 0, (kernel.__name__, mode, d.mean(), d.max())


@pytest.mark.parametrize("pil_op,kernel,params", GEOMETRIC, ids=[g[1].__name__ for g in GEOMETRIC])
def test_geometric_ops_nearest_take_pillows_pixel(photos, pil_op, kernel, params):
    """Nearest: the pixel the input point falls in (floor). Pillow's nearest affine steps through the image in
    16.16 fixed point, which for rotations picks the neighbour on a few pixels (measured: <= 0.2%). A shift by
    1.5 pixels (1/32 of 48) puts every point on a pixel edge, where floor and rounding part."""
    for p in params + ([1 / 32] if kernel is K.translate_x else []):
        got = kernel(batch(photos), torch.full((4,), p, dtype=torch.float64), FILL, "nearest")
        for img, g in zip(photos, got):
            same = (array(g) == np.asarray(pil_op(img, p, fillcolor=FILL, resample=Image.NEAREST))).all(axis=2)
            assert same.mean() >= (0.995 if kernel is K.rotate else 1.0), (kernel.__name__, p, same.mean())


# measured on these photos (48x40; grid_sample's a = -0.75 cubic vs Pillow's a = -1), worst parameter per op:
# mean |diff| rotate 0.909, shear_x 0.593, shear_y 0.495, translate_x 0.435, translate_y 0.241;
# within 2 levels rotate 90.11%, shear_x 94.53%, shear_y 96.28%, translate_x 95.53%, translate_y 99.26%
# (at 224x224 about half the difference: rotate 0.44 / 96.95%). Bilinear is Pillow's filter: mean <= 0.03, max 1.
BOUNDS = {"rotate": (0.97, 0.885), "shear_x": (0.65, 0.93), "shear_y": (0.55, 0.95), "translate_x": (0.5, 0.94),
          "translate_y": (0.4, 0.97)}


@pytest.mark.parametrize("pil_op,kernel,params", GEOMETRIC, ids=[g[1].__name__ for g in GEOMETRIC])
def test_geometric_ops_are_close_to_pillow(photos, pil_op, kernel, params):
    """grid_sample (the default): same points and fill as Pillow, another cubic; each parameter on its own, so
    the hard cases (rotate 30, shear 0.3, translate 0.45) meet the bound alone. Bilinear is Pillow's own filter,
    truncated as Pillow truncates: within a level (rounding instead would miss by one on ~40% of pixels)."""
    mean_bound, within_bound = BOUNDS[kernel.__name__]
    for p in params:
        d = geometric_diffs(photos, pil_op, kernel, [p], "bicubic", exact=False)
        assert d.mean() <= mean_bound and (d <= 2).mean() >= within_bound, (kernel.__name__, p, d.mean(),
                                                                             (d <= 2).mean())
        d = geometric_diffs(photos, pil_op, kernel, [p], "bilinear", exact=False)
        assert d.mean() <= 0.05 and d.max() <= 1, (kernel.__name__, p, d.mean(), d.max())


def test_fill_is_decided_by_the_input_point(photos):
    """A shift by exactly 10 pixels: columns read from x < 0 are fill, the rest the image, no blending at the seam
    (a sampled mask would blend the fill into the first column)."""
    x = batch(photos[:1])
    out = K.translate_x(x, -10 / 48, FILL, "bicubic")[0]
    assert (out[:, :, :10] == torch.tensor(FILL, dtype=torch.uint8).reshape(3, 1, 1)).all()
    assert torch.equal(out[:, :, 10:], x[0, :, :, :-10])


def test_rotation_matrix_is_pillows():
    """Image.rotate's matrix: degrees % 360, -radians, cos and sin rounded by Python's round(x, 15) (torch's
    round(decimals=15) misrounds ~8% of them), the translation about (w/2, h/2)."""
    def pillow(deg, w, h):
        angle = -math.radians(deg % 360.0)
        a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
        return [a, b, a * -w / 2 + b * -h / 2 + 0.0 + w / 2, -b, a, -b * -w / 2 + a * -h / 2 + 0.0 + h / 2]

    rng = np.random.default_rng(0)
    degrees = [float(d) for d in rng.uniform(-30, 30, 2000)] + [0.0, 90.0, 180.0, -270.0, 400.5]
    got = K.rotate_coeffs(torch.tensor(degrees, dtype=torch.float64), 48, 40)[:, [0, 1, 2, 3, 4, 5]]
    want = torch.tensor([pillow(d, 48, 40) for d in degrees], dtype=torch.float64)
    assert (got - want).abs().max() < 1e-13
    # torch's cos/sin and libm's may differ in the last bit (4 angles in 25,000): allow 1 in 250 here
    assert (got == want).all(dim=1).double().mean() >= 0.996


def all_ops():
    """Every batched op as (fn(images, parameters), 4 different parameters, one per sample)."""
    f64 = torch.float64
    ops = {"invert": (lambda x, p: K.invert(x), None), "hflip": (lambda x, p: K.hflip(x), None),
           "autocontrast": (lambda x, p: K.autocontrast(x), None), "equalize": (lambda x, p: K.equalize(x), None),
           "posterize": (K.posterize, torch.tensor([0, 3, 5, 8])),
           "solarize": (K.solarize, torch.tensor([0, 90, 128, 256])),
           "solarize_add": (K.solarize_add, torch.tensor([0, 30, 77, 110]))}
    for name, params in (("color", [0.1, 0.7, 1.3, 1.9]), ("contrast", [0.2, 0.9, 1.1, 1.8]),
                         ("brightness", [0.1, 0.5, 1.4, 1.9]), ("sharpness", [0.1, 0.6, 1.2, 1.9])):
        ops[name] = (getattr(K, name), torch.tensor(params))
    for name, params in (("rotate", [30.0, -30.0, 7.5, -13.1]), ("shear_x", [0.3, -0.3, 0.1, -0.05]),
                         ("shear_y", [0.25, -0.3, 0.02, 0.3]), ("translate_x", [0.45, -0.45, 0.2, -0.01]),
                         ("translate_y", [0.45, -0.1, 0.3, -0.45])):
        for mode, exact in (("bicubic", False), ("bilinear", False), ("nearest", False), ("bicubic", True)):
            fn = lambda x, p, n=name, m=mode, e=exact: getattr(K, n)(x, p, FILL, m, exact=e)
            ops[f"{name}/{mode}{'/exact' if exact else ''}"] = (fn, torch.tensor(params, dtype=f64))
    return ops


def test_every_op_gives_a_sample_the_same_pixels_in_any_batch(photos):
    """A batch of 4 photos with 4 parameters == each photo alone with its parameter, bit for bit; each op returns a
    new uint8 tensor of the input's shape."""
    x = batch(photos)
    for name, (op, params) in all_ops().items():
        together = op(x, params)
        assert together.dtype == torch.uint8 and together.shape == x.shape, name
        assert together.data_ptr() != x.data_ptr(), name
        for i in range(4):
            alone = op(x[i:i + 1].clone(), None if params is None else params[i:i + 1].clone())
            assert torch.equal(together[i], alone[0]), (name, i)
        # and the reverse batch order: sample i is last there
        reverse = op(x.flip(0).contiguous(), None if params is None else params.flip(0).contiguous())
        assert torch.equal(reverse.flip(0), together), name


def test_resized_crop_and_parameters_as_numbers(photos):
    """A Python number is every sample's parameter; resized_crop takes one image and returns [3, size, size]."""
    x = batch(photos)
    assert torch.equal(K.solarize(x, 100), K.solarize(x, torch.full((4,), 100)))
    assert torch.equal(K.rotate(x, 12.5, FILL), K.rotate(x, torch.full((4,), 12.5, dtype=torch.float64), FILL))
    # a Python float is a double, as in Pillow (not torch's default float32: -0.2 would move the fill's edge)
    assert torch.equal(K.shear_y(x, -0.2, FILL), K.shear_y(x, torch.full((4,), -0.2, dtype=torch.float64), FILL))
    out = R.resized_crop(x[0], 3, 4, 20, 30, 16, "bilinear")
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="interpolation"):
        K.rotate(x, 1.0, FILL, "lanczos")


def test_a_tensor_cache_of_other_kernels_is_named_when_its_views_drift():
    """A kernel change alters a tensor cache's pixels like a library upgrade: the drift messages name it."""
    from cskd_cache.data.recipe import library_drift, library_versions

    made_before = {"recipe": {"library_versions": library_versions()}, "params": {"width": 19}}  # no revision: 1
    assert f"tensor kernels revision 1 then, {K.REVISION} now" in library_drift(made_before)
    made_now = {"recipe": {"library_versions": library_versions()},
                "params": {"width": 19, "kernels": ["rotate"], "kernels_revision": K.REVISION}}
    pil = {"recipe": {"library_versions": library_versions()}}
    assert library_drift(made_now) == library_drift(pil) == "; the same library versions as now"
