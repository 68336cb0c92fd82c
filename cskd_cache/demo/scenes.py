"""The demo's dataset: real handwritten-digit scans (scikit-learn's bundled copy of the UCI digits) composed into
2x2 scenes, written as WebDataset shards so that the demo takes the same path as real data.

A scene's class is its majority digit: two cells hold that digit (two different scans), the other two hold two
other, different digits. A CNN whose global prediction is the mean of its per-position predictions solves this
by recognising each cell, so the teacher's dense map really carries spatial knowledge (which digit is where),
which is what CSKD hands to the student's patch tokens. Train, validation and test scenes use disjoint scans.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

from ..errors import CacheError

CLASSES = [str(d) for d in range(10)]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CacheError("the demo's dataset comes with scikit-learn: pip install 'cskd-cache[demo]'") from None
    d = load_digits()  # bundled with scikit-learn: 1797 scans, 8x8, values 0..16, no download
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


SPLITS = ("train", "val", "test")


def _split(labels: np.ndarray, held_out: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint scan indices for train, val and test scenes (a fixed permutation, so every run gets the same
    split): 70% train, the held-out 30% halved into validation and test."""
    order = np.random.default_rng(1234).permutation(len(labels))
    n_held = int(len(order) * held_out)
    return np.sort(order[n_held:]), np.sort(order[:n_held // 2]), np.sort(order[n_held // 2:n_held])


def render_scene(cells: list[np.ndarray], rng: np.random.Generator, size: int) -> Image.Image:
    """Four 8x8 scans -> one RGB scene: each digit scaled to ~3/4 of its cell, jittered and tinted, on noise."""
    cell = size // 2
    digit = max(4, (cell * 3) // 4)
    canvas = rng.uniform(0.0, 0.25, size=(size, size, 3)).astype(np.float32)
    for k, scan in enumerate(cells):
        big = np.asarray(Image.fromarray((scan * 255).astype(np.uint8)).resize((digit, digit), Image.BICUBIC))
        big = big.astype(np.float32)[..., None] / 255.0
        tint = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
        oy, ox = (k // 2) * cell + rng.integers(0, cell - digit + 1), (k % 2) * cell + rng.integers(0, cell - digit + 1)
        patch = canvas[oy:oy + digit, ox:ox + digit]
        canvas[oy:oy + digit, ox:ox + digit] = np.maximum(patch, big * tint)
    return Image.fromarray((np.clip(canvas, 0, 1) * 255).astype(np.uint8))


def make_scenes(n: int, split: str, seed: int, size: int = 64):
    """Yield (PIL image, class) for `n` scenes drawn from the train, val or test scans."""
    images, labels = _digits()
    pool = _split(labels)[SPLITS.index(split)]
    by_digit = [pool[labels[pool] == d] for d in range(10)]
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    for _ in range(n):
        major = int(rng.integers(10))
        others = rng.choice([d for d in range(10) if d != major], size=2, replace=False)
        scans = list(rng.choice(by_digit[major], size=2, replace=False)) + [rng.choice(by_digit[d]) for d in others]
        order = rng.permutation(4)  # which cell gets which scan
        yield render_scene([images[scans[i]] for i in order], rng, size), major


def _specs(out_dir: str, n_train: int, n_val: int, per_shard: int) -> dict[str, str]:
    """Each split's brace spec of its shards: train-{000000..000003}.tar, or the one file."""
    specs = {}
    for split, n in (("train", n_train), ("val", n_val)):
        shards = max(1, -(-n // per_shard))
        specs[split] = os.path.join(out_dir, f"{split}-{{000000..{shards - 1:06d}}}.tar" if shards > 1
                                    else f"{split}-000000.tar")
    return specs


def scene_specs(out_dir: str, n_train: int, n_val: int, seed: int = 0, size: int = 64,
                per_shard: int = 1000) -> tuple[str, str] | None:
    """The train and val specs of shards written before with exactly these settings, or None."""
    try:
        with open(os.path.join(out_dir, "scenes.json")) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    settings = {"n_train": n_train, "n_val": n_val, "seed": seed, "size": size, "per_shard": per_shard}
    specs = _specs(out_dir, n_train, n_val, per_shard)
    return (specs["train"], specs["val"]) if done == settings else None


def write_scene_shards(out_dir: str, n_train: int, n_val: int, seed: int = 0, size: int = 64,
                       per_shard: int = 1000) -> tuple[str, str]:
    """Write train-*.tar and val-*.tar WebDataset shards (png + cls) and classes.txt; return both brace specs.

    Reuses shards written before with the same settings (a manifest records them), so a rerun of the demo skips
    this step; shards are written under a temporary name and renamed, so a kill never leaves a short shard; the
    manifest is written last, so it only ever vouches for complete shards.
    """
    import webdataset as wds

    done = scene_specs(out_dir, n_train, n_val, seed, size, per_shard)
    if done is not None:
        return done
    os.makedirs(out_dir, exist_ok=True)
    manifest = os.path.join(out_dir, "scenes.json")
    if os.path.exists(manifest):
        os.remove(manifest)  # other settings: the shards are about to change under it
    for split, n in (("train", n_train), ("val", n_val)):
        scenes = make_scenes(n, split, seed, size)
        for s in range(max(1, -(-n // per_shard))):
            path = os.path.join(out_dir, f"{split}-{s:06d}.tar")
            with wds.TarWriter(path + ".tmp") as sink:
                for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                    img, label = next(scenes)
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    sink.write({"__key__": f"{split}_{i:06d}", "png": buf.getvalue(), "cls": label})
            os.replace(path + ".tmp", path)
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    settings = {"n_train": n_train, "n_val": n_val, "seed": seed, "size": size, "per_shard": per_shard}
    with open(manifest + ".tmp", "w") as f:
        json.dump(settings, f)
    os.replace(manifest + ".tmp", manifest)
    specs = _specs(out_dir, n_train, n_val, per_shard)
    return specs["train"], specs["val"]
