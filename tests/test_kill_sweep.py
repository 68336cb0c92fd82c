"""Kill sweep: SIGKILL precompute (at moments its progress on disk marks: mid-plan, after k of its shards, while
finalising) and train (at random moments), resume each time with the same command; the result equals an
uninterrupted run's, every array (plan included) and every weight. `pytest --kills 20` for the full sweep; CI runs
a few kills per run."""

import os
import random
import signal
import subprocess
import sys
import time

import torch
from conftest import make_images, precompute_args
from conftest import assert_same_cache

from cskd_cache.cache.store import read_manifest

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # float sums depend on the thread count


def _run(cmd, timeout=300) -> float:
    t = time.time()
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return time.time() - t


def _kill_after(cmd, seconds: float) -> int | None:
    """Start cmd, SIGKILL it after `seconds` (if it is still running); its return code if it finished first."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


def _kill_when(cmd, reached) -> int | None:
    """Start cmd, SIGKILL it as soon as `reached()` (progress it made, seen on disk) holds; its return code if it
    finished first. No clock decides where a kill lands, so a busy machine changes nothing but the wall time."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            if reached():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return None
            time.sleep(0.005)
        return proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _precompute_kill_points(out, kills: int, shards: int) -> list:
    """`kills` moments a precompute passes through, in order: mid-plan (creating the cache), after k shard
    markers for k spread over the run, and once every marker is written (finalising)."""
    markers = out / "views" / "shard_done" / "c"
    done = lambda: len(os.listdir(markers)) if markers.is_dir() else 0
    points = [("mid-plan", lambda: (out / "plan" / "seed" / "c" / "5").exists())]
    for i in range(1, kills - 1):
        k = max(1, round(i * shards / (kills - 1)))
        points.append((f"{k} shards", lambda k=k: done() >= k))
    points.append(("every shard", lambda: done() >= shards))
    return points[:max(1, kills)]


def test_precompute_kill_sweep(tmp_path, teacher_checkpoint, request):
    kills = request.config.getoption("--kills")
    images = make_images(tmp_path / "images", per_class=8)
    ref = tmp_path / "ref.zarr"
    base = lambda out: [sys.executable, "-m", "cskd_cache", *map(str, precompute_args(
        images, out, teacher_checkpoint, "--epochs", "8", "--repeats", "1"))]
    _run(base(ref))
    shards = read_manifest(str(ref))["layout"]["num_shards"]  # 32 views per epoch, 8 per shard: 32
    out = tmp_path / "killed.zarr"
    seen = []
    for name, reached in _precompute_kill_points(out, kills, shards):
        code = _kill_when(base(out), reached)
        m = read_manifest(str(out))
        seen.append((name, "finished" if code == 0 else "none" if m is None else m["status"]))
    assert _kill_after(base(out), 300) == 0  # the same command resumes and finishes
    assert_same_cache(out, ref)
    # every kill landed while the run was working (the last may meet it done: finalising is quick)
    assert all(s in ("creating", "incomplete") for _, s in seen[:max(1, len(seen) - 1)]), seen


def test_train_kill_sweep(tmp_path, teacher_checkpoint, request):
    kills = max(1, request.config.getoption("--kills") - 1)
    images = make_images(tmp_path / "images", per_class=8)
    cache = tmp_path / "c.zarr"
    _run([sys.executable, "-m", "cskd_cache", *map(str, precompute_args(images, cache, teacher_checkpoint))])
    train = lambda out, *extra: [sys.executable, "-m", "cskd_cache", "train", "--student",
                                 "deit_tiny_distilled_patch16_224", "--data", str(images), "--cache", str(cache),
                                 "--out", str(out), "--epochs", "4", "--batch-size", "8", "--workers", "0",
                                 "--warmup-epochs", "1", "--drop-path", "0.1", "--ema-decay", "0.9", *extra]
    duration = _run(train(tmp_path / "whole"))
    rng = random.Random(1)
    out = tmp_path / "killed"
    for i in range(kills):
        _kill_after(train(out, *(["--resume"] if i else [])), rng.uniform(0.3, 1.0) * duration)
    assert _kill_after(train(out, "--resume"), 300) == 0
    a = torch.load(tmp_path / "whole" / "checkpoint.pth", weights_only=True)
    b = torch.load(out / "checkpoint.pth", weights_only=True)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert [r["train_total"] for r in a["history"]] == [r["train_total"] for r in b["history"]]
    rows = [line for line in open(out / "metrics.jsonl")]  # the log agrees with the checkpoint, kills or not
    assert len(rows) == len(b["history"]) == 4
