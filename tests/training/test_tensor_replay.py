"""`--replay tensor` through the CLI: a cache made with it trains bit for bit like the online teacher on the same
backend, every replayed view is the very pixels the teacher saw (fingerprints equal, whatever the batch, the worker
or the thread count), the stored parameters are checked, and the other backend is refused."""

import json

import numpy as np
import torch
import zarr
from conftest import all_arrays, one_line, precompute_args, run_cli

from cskd_cache.cache.store import Cache
from cskd_cache.data.open import open_source
from cskd_cache.data import kernels
from cskd_cache.data.params import KERNELS, Drawer
from cskd_cache.data.recipe import library_drift
from cskd_cache.data.replay import _ErasingDraws, _seeded, pair_items
from cskd_cache.data.views import pair_dataset

STUDENT = "deit_tiny_distilled_patch16_224"


def tensor_cache(data, out, ckpt, *extra):
    """The full DeiT recipe (RandAugment, erasing, mixup/cutmix) on real photos, 64 px views."""
    args = [a for a in precompute_args(data, out, ckpt, "--epochs", "2", "--shard-views", "16", "--replay", "tensor",
                                       *extra)]
    i = args.index("--auto-augment")
    del args[i:i + 2]  # the default RandAugment: every kernel is met
    return run_cli(*args)


def train_args(data, out, *extra):
    return ["train", "--student", STUDENT, "--data", data, "--out", out, "--epochs", "2", "--batch-size", "8",
            "--warmup-epochs", "0", "--max-steps", "3", "--check-every", "1", *extra]


def test_tensor_cache_trains_like_the_online_teacher(tmp_path, real_photos, teacher_checkpoint):
    out = tmp_path / "t.zarr"
    code, text = tensor_cache(real_photos, out, teacher_checkpoint)
    assert code == 0, text
    cache = Cache.open(str(out))
    assert cache.complete and cache.manifest["format_version"] == 4 and cache.recipe.replay == "tensor"
    assert cache.manifest["params"]["width"] == Drawer(cache.recipe).width
    assert cache.manifest["params"]["kernels"] == list(KERNELS) and cache.manifest["params"]["kernels_revision"] == \
        kernels.REVISION  # the op names the rows index, and which kernels made the pixels
    assert library_drift(cache.manifest) == "; the same library versions as now"  # nothing to blame on a drift
    # the stored parameters are the views' draws (timm's, from each view's seed and its image's size)
    source, drawer, plan = open_source(str(real_photos)), Drawer(cache.recipe), cache.epoch_plan(1)
    stored = np.asarray(zarr.open_group(str(out), mode="r")["views/params"][cache.stride: cache.stride + 8])
    for p in range(8):
        with _seeded(int(plan.seed[p])):
            want = drawer.draw(*source.load(int(plan.sample[p])).size, _ErasingDraws())
        assert np.array_equal(stored[p], want)

    # cache (1 worker: its draws are seeded without restoring) == online (in process), bit for bit
    code, text = run_cli(*train_args(real_photos, tmp_path / "cached", "--cache", out, "--workers", "1"))
    assert code == 0, text
    code, text = run_cli(*train_args(real_photos, tmp_path / "online", "--cache", out, "--workers", "0",
                                     "--teacher-source", "online", "--teacher-checkpoint", teacher_checkpoint))
    assert code == 0, text
    a = torch.load(tmp_path / "cached" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "online" / "checkpoint.pth", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = [json.loads(line) for line in open(tmp_path / "cached" / "metrics.jsonl")]
    assert [r["replay_drifted"] for r in rows] == [0, 0]  # every view checked: the teacher's very pixels

    # verify replays pairs one at a time (other batches than precompute's): all exact
    code, text = run_cli("verify", out, "--replay", "48", "--data", real_photos, "--device", "cpu")
    assert code == 0 and "48 replayed views (tensor replay on cpu) match their fingerprints" in text, text
    one_line(*run_cli("verify", out, "--replay", "2", "--data", real_photos, "--device", "gpu0"), "--device", "gpu0")
    one_line(*run_cli(*train_args(real_photos, tmp_path / "pil", "--cache", out, "--replay", "pil")),
             "--replay pil", "--replay tensor")
    code, text = run_cli("inspect", out)
    assert "replay tensor" in text and "params" in text, text


def test_pixels_do_not_depend_on_threads(tmp_path, real_photos, teacher_checkpoint):
    """A cache made on a machine with other core counts replays exactly: the kernels compute each pixel alone."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert tensor_cache(real_photos, tmp_path / "one.zarr", teacher_checkpoint, "--epochs", "1")[0] == 0
        torch.set_num_threads(2)
        assert tensor_cache(real_photos, tmp_path / "two.zarr", teacher_checkpoint, "--epochs", "1")[0] == 0
    finally:
        torch.set_num_threads(threads)
    a, b = all_arrays(tmp_path / "one.zarr"), all_arrays(tmp_path / "two.zarr")
    assert np.array_equal(a["views/fingerprint"], b["views/fingerprint"])


def test_changed_draws_are_caught_on_every_view(tmp_path, real_photos, teacher_checkpoint):
    out = tmp_path / "t.zarr"
    assert tensor_cache(real_photos, out, teacher_checkpoint, "--epochs", "1")[0] == 0
    arr = zarr.open_group(str(out), mode="r+")["views/params"]
    row = np.asarray(arr[5])
    row[1] += 1  # another crop: what a changed timm would draw
    arr[5] = row
    code, text = run_cli(*train_args(real_photos, tmp_path / "run", "--cache", out, "--check-every", "8",
                                     "--workers", "0", "--epochs", "1"))
    assert code != 0 and "augmentation parameters differ" in text, text


def test_recipes_without_kernels_are_refused(tmp_path, real_photos, teacher_checkpoint):
    one_line(*tensor_cache(real_photos, tmp_path / "x.zarr", teacher_checkpoint, "--auto-augment", "original"),
             "--replay pil", "AutoAugment")
    assert not (tmp_path / "x.zarr").exists()


def test_plain_deit_on_the_tensor_backend(tmp_path, real_photos):
    """Without a cache, --replay picks the backend (here with no teacher at all)."""
    code, text = run_cli(*train_args(real_photos, tmp_path / "none", "--teacher-source", "none", "--replay", "tensor",
                                     "--input-size", "64", "--epochs", "1", "--workers", "0"))
    assert code == 0, text
    assert json.load(open(tmp_path / "none" / "metrics.jsonl"))["train_total"] > 0


def test_worker_decode_gives_the_same_views_and_is_recorded(tmp_path, real_photos, teacher_checkpoint):
    """--decode worker decodes in the loader workers (libjpeg-turbo, Pillow's decoder), so its views are the device
    decode's on a CPU (and timm's PIL views on any device): the same fingerprints, recorded as another recipe, and the
    batches carry pixels instead of JPEG bytes."""
    a, b = tmp_path / "device.zarr", tmp_path / "worker.zarr"
    assert tensor_cache(real_photos, a, teacher_checkpoint, "--epochs", "1")[0] == 0
    code, text = tensor_cache(real_photos, b, teacher_checkpoint, "--epochs", "1", "--decode", "worker",
                              "--workers", "1")
    assert code == 0, text
    assert np.array_equal(all_arrays(a)["views/fingerprint"], all_arrays(b)["views/fingerprint"])
    assert Cache.open(str(b)).recipe.decode == "worker" and "decode" not in Cache.open(str(a)).manifest["recipe"]
    cache = Cache.open(str(b))
    dataset = pair_dataset(open_source(str(real_photos)), cache.recipe)
    batch = dataset.__getitems__(pair_items(cache.epoch_plan, range(6), cache.stride))[0]
    assert len(batch["data"]) == 0 and all(t.dtype == torch.uint8 and t.shape[0] == 3 for t in batch["decoded"])
    code, text = run_cli(*train_args(real_photos, tmp_path / "run", "--cache", b, "--workers", "1", "--epochs", "1"))
    assert code == 0, text
    code, text = run_cli("verify", b, "--replay", "8", "--data", real_photos, "--device", "cpu")
    assert code == 0 and "8 replayed views (tensor replay on cpu) match" in text, text
    one_line(*run_cli(*precompute_args(real_photos, tmp_path / "x.zarr", teacher_checkpoint, "--decode", "worker")),
             "--decode worker")
