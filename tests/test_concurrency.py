"""Concurrency: several trainers read one cache at once; precompute's ranks may finish in any order."""

import os
import subprocess
import sys

import torch
from conftest import precompute_args, run_cli
from conftest import assert_same_cache

from cskd_cache.distributed import Dist
from cskd_cache.teacher.precompute import PrecomputeConfig, precompute
from cskd_cache.cache.store import Cache
from cskd_cache.data.recipe import Recipe

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def test_several_trainers_read_one_cache_at_once(tmp_path, image_folder, teacher_checkpoint):
    cache = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, cache, teacher_checkpoint))[0] == 0
    cmd = lambda out, workers: [sys.executable, "-m", "cskd_cache", "train", "--student",
                                "deit_tiny_distilled_patch16_224", "--data", str(image_folder), "--cache", str(cache),
                                "--out", str(out), "--epochs", "2", "--batch-size", "8", "--workers", str(workers),
                                "--warmup-epochs", "0"]
    procs = [subprocess.Popen(cmd(tmp_path / f"run{i}", 2), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    # the reference: the same run alone, loading in its main process (no workers, nothing read concurrently)
    r = subprocess.run(cmd(tmp_path / "solo", 0), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    solo = torch.load(tmp_path / "solo" / "checkpoint.pth", weights_only=True)
    ckpts = [torch.load(tmp_path / f"run{i}" / "checkpoint.pth", weights_only=True) for i in range(3)]
    for k in solo["model"]:  # same flags, same seed: each concurrent run is the solo run, bit for bit
        assert all(torch.equal(c["model"][k], solo["model"][k]) for c in ckpts), k
    assert Cache.open(str(cache)).complete


def test_precompute_ranks_may_finish_in_any_order(tmp_path, image_folder, teacher_checkpoint):
    """Rank 1 writes all its shards before rank 0 has written more than one: the cache that rank 0 finalises
    equals a single process's."""
    def cfg(out, max_shards=None):
        return PrecomputeConfig(data=str(image_folder), out=str(out), teacher="test_resnet",
                                teacher_checkpoint=str(teacher_checkpoint), epochs=2, recipe=Recipe(input_size=64,
                                auto_augment=None), batch_size=8, workers=0, chunk_views=4, shard_views=8,
                                max_shards=max_shards)

    out = tmp_path / "ranks.zarr"
    precompute(cfg(out, max_shards=1), Dist(rank=0, world=2))  # creates the cache, writes shard 0
    precompute(cfg(out), Dist(rank=1, world=2))  # shards 1, 3, 5: all of rank 1's
    c = Cache.open(str(out))
    assert c.done_shards().tolist() == [True, True, False, True, False, True] and not c.complete
    precompute(cfg(out), Dist(rank=0, world=2))  # rank 0 last: writes 2 and 4, then finalises
    precompute(cfg(tmp_path / "one.zarr"), Dist())
    assert_same_cache(out, tmp_path / "one.zarr")
