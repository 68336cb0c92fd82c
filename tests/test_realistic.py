"""The sizes a user runs: a real ImageNet teacher (1000 classes, a 7x7 grid at 224 px), real photos, the full
default recipe, through the CLI. Tests at 3-4 classes cannot see what only large class counts do (a ckf global table
that is not full, fp16 class ids, spilled positions)."""

import json
import re

import numpy as np
import pytest
from conftest import run_cli

from cskd_cache.cache.store import Cache


@pytest.mark.parametrize("replay", ["pil", "tensor"])
def test_a_real_1000_class_cache_verifies_and_trains(tmp_path, imagenet_shards, lite0, replay):
    name, ckpt = lite0
    out = tmp_path / "c.zarr"
    code, text = run_cli("precompute", "--data", imagenet_shards, "--out", out, "--teacher", name,
                         "--teacher-checkpoint", ckpt, "--epochs", "2", "--workers", "0", "--batch-size", "16",
                         "--chunk-views", "16", "--shard-views", "32",
                         "--replay", replay)  # every recipe default: 224 px, full DeiT
    assert code == 0, text
    cache = Cache.open(str(out))
    assert cache.complete and cache.manifest["grid"] == [7, 7] and cache.manifest["num_classes"] == 1000
    rows = [e * cache.stride + p for e in range(2) for p in range(cache.views_per_epoch)]  # not the slot padding
    table = np.asarray(cache.group["views/global_class"][:])[rows]
    # the per-view global table is padded (class -1, value NaN) wherever a view has fewer classes than its width:
    # what verify once called "unwritten" in every chunk of every real cache
    assert (table == -1).any() and (table[:, :10] >= 0).all()
    code, text = run_cli("verify", out, "--replay", "8", "--data", imagenet_shards)
    assert code == 0, text
    assert re.search(r"8 replayed views( \(tensor replay on cpu\))? match their fingerprints", text), text
    code, text = run_cli("train", "--student", "deit_tiny_distilled_patch16_224", "--data", imagenet_shards,
                         "--cache", out, "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "8",
                         "--workers", "1", "--max-steps", "2", "--warmup-epochs", "0", "--check-every", "1")
    assert code == 0, text
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert row["replay_drifted"] == 0  # every view of both steps: the very pixels the teacher saw


def test_spilled_positions_train_exactly_end_to_end(tmp_path, lite0):
    """Positions with more CKF candidates than --ckf-width go to spill/ rows. 64 classes, a 4x4 grid and width 1
    spill on purpose: precompute, verify, then training cycled over the cache must equal the online teacher and a
    `full` cache bit for bit (the targets of spilled positions come from their rows)."""
    import skimage.data
    import torch
    from conftest import precompute_args
    from PIL import Image
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in ("chelsea", "coffee", "astronaut")]
    data = tmp_path / "images"
    for c in range(64):  # 64 classes of real photo crops
        photo = photos[c % 3]
        w, h = photo.size
        side = int(rng.integers(min(w, h) // 3, min(w, h)))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        (data / f"class_{c:02d}").mkdir(parents=True)
        photo.crop((x0, y0, x0 + side, y0 + side)).resize((96, 96)).save(data / f"class_{c:02d}" / "0.jpg")
    # a real teacher's features with a 64-class head (the first 64 ImageNet classes): its dense maps vary by
    # position, so at width 1 about half the positions spill
    _, lite0_path = lite0
    state = load_file(str(lite0_path))
    state = {k: (v[:64].contiguous() if k.startswith("classifier.") else v) for k, v in state.items()}
    ckpt = tmp_path / "lite0-64.safetensors"
    save_file(state, str(ckpt))
    caches = {}
    for enc in ("ckf", "full"):
        caches[enc] = tmp_path / f"{enc}.zarr"
        code, text = run_cli(*precompute_args(data, caches[enc], ckpt, "--input-size", "128", "--encoding", enc,
                                              "--ckf-width", "1", "--shard-views", "32", "--chunk-views", "8",
                                              "--teacher", "efficientnet_lite0"))
        assert code == 0, text
    ckf = Cache.open(str(caches["ckf"]))
    assert ckf.manifest["grid"] == [4, 4] and ckf.manifest["spill_shards"]
    count = np.asarray(ckf.group["views/ckf_count"][:])
    assert (count == 255).sum() > 50  # many spilled positions
    code, text = run_cli("verify", caches["ckf"], "--replay", "8", "--data", data)
    assert code == 0, text
    runs = {}
    for name, extra in {"ckf": ("--cache", caches["ckf"]), "full": ("--cache", caches["full"]),
                        "online": ("--cache", caches["ckf"], "--teacher-source", "online", "--teacher-checkpoint",
                                   ckpt)}.items():
        out = tmp_path / f"run-{name}"
        code, text = run_cli("train", "--student", "deit_tiny_distilled_patch16_224", "--data", data, "--out", out,
                             "--epochs", "2", "--batch-size", "8", "--workers", "0", "--max-steps", "3",
                             "--warmup-epochs", "0", *extra)  # 1 cached epoch, 2 training epochs: cycled
        assert code == 0, text
        runs[name] = torch.load(out / "checkpoint.pth", weights_only=True)
    for name in ("full", "online"):
        assert all(torch.equal(runs["ckf"]["model"][k], runs[name]["model"][k]) for k in runs["ckf"]["model"]), name
    assert runs["ckf"]["history"][1]["cycle"] == 1
