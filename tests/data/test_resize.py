"""The tensor backend's crop + resize (data/resize.py) is Pillow's, bit for bit: the same pixels as timm's PIL path
(torchvision's resized_crop on a PIL image), whatever the crop, the size, the filter or the batch."""

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from cskd_cache.data import resize as R

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def array(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def test_resized_crop_is_pillows_exactly():
    """Pillow's fixed-point resize redone in integers: the same pixels as timm's PIL path (torchvision's
    resized_crop on a PIL image), for shrinking and enlarging crops, both pass orders of Pillow 13 (rows first
    when the height shrinks more than twice the width), one-pass crops and the copy."""
    import skimage.data

    rng = np.random.default_rng(0)
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((200, 150), Image.BICUBIC)
        w, h = img.size
        boxes = [(10, 20, 100, 90, 48), (0, 0, h, w, 224), (30, 40, 17, 23, 32), (0, 0, h, 40, 24),
                 (5, 5, 60, 60, 60), (0, 3, 37, 60, 37), (2, 0, h - 2, w // 5, 16)]
        for _ in range(12):
            bh, bw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
            boxes.append((int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw,
                          int(rng.choice([224, 64, 33]))))
        for top, left, height, width, size in boxes:
            for mode in ("bicubic", "bilinear", "nearest"):
                got = R.resized_crop(tensor(img), top, left, height, width, size, mode)
                want = TF.resized_crop(img, top, left, height, width, [size, size], TF.InterpolationMode(mode))
                assert np.array_equal(array(got), np.asarray(want)), (top, left, height, width, size, mode)


def test_resized_crops_of_a_batch_are_each_views_alone():
    """Views resized together (crops zero-padded to the group's largest, both pass orders, groups split by the
    memory budget) equal each view resized alone and Pillow's: a view's pixels never depend on its batch."""
    import skimage.data

    imgs = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB").resize((120, 90), Image.BICUBIC)
            for n in PHOTOS[:3]]
    rng = np.random.default_rng(3)
    boxes, which, modes = [], [], []
    for i in range(40):
        h, w = int(rng.integers(5, 91)), int(rng.integers(5, 121))
        boxes.append((int(rng.integers(0, 91 - h)), int(rng.integers(0, 121 - w)), h, w))
        which.append(i % 3)
        modes.append(("bicubic", "bilinear", "nearest")[i % 3 if i % 7 else 0])
    boxes[0], boxes[1] = (0, 0, 32, 32), (0, 0, 90, 20)  # a copy; rows first (height shrinks far more)
    together = R.resized_crops([tensor(i) for i in imgs], which, np.array(boxes), 32, modes)
    split = R.resized_crops([tensor(i) for i in imgs], which, np.array(boxes), 32, modes, budget=3 * 8 * 60 * 60)
    assert torch.equal(together, split)
    for i, (top, left, h, w) in enumerate(boxes):
        want = TF.resized_crop(imgs[which[i]], top, left, h, w, [32, 32], TF.InterpolationMode(modes[i]))
        assert np.array_equal(array(together[i]), np.asarray(want)), (i, boxes[i], modes[i])
