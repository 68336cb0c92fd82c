"""`cskd-cache train`: cache and online teachers give the same training, plain DeiT runs, misuse is refused."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import precompute_args, run_cli


STUDENT = "deit_tiny_distilled_patch16_224"
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # at 64 px: a 4x4 patch grid, pooled to the teacher's 2x2


@pytest.fixture
def cache(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "1"))[0] == 0
    return out


def train_args(data, out, *extra):
    return ["train", "--student", STUDENT, "--data", data, "--out", out, "--epochs", "2", "--batch-size", "8",
            "--workers", "0", "--warmup-epochs", "0", "--max-steps", "2", *extra]


def test_cache_and_online_teacher_train_identically(tmp_path, image_folder, teacher_checkpoint, cache):
    code, text = run_cli(*train_args(image_folder, tmp_path / "cached", "--cache", cache,
                                     "--val-data", image_folder))
    assert code == 0, text
    code, text = run_cli(*train_args(image_folder, tmp_path / "online", "--cache", cache, "--teacher-source",
                                     "online", "--teacher-checkpoint", teacher_checkpoint))
    assert code == 0, text
    a = torch.load(tmp_path / "cached" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "online" / "checkpoint.pth", weights_only=False)
    for k in a["model"]:  # same targets and losses on every step => bit-identical weights
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = [json.loads(line) for line in open(tmp_path / "cached" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["alpha"] == 1.0 and rows[1]["alpha"] == 0.5
    assert {"train_base", "train_distill", "train_cskd", "top1", "top5", "ema_top1"} <= rows[-1].keys()
    assert [r["train_total"] for r in rows] == [r["train_total"] for r in a["history"]] \
        == [r["train_total"] for r in b["history"]]


def test_plain_deit_and_resume(tmp_path, image_folder):
    out = tmp_path / "plain"
    code, text = run_cli(*train_args(image_folder, out, "--teacher-source", "none", "--input-size", "64",
                                     "--epochs", "1"))
    assert code == 0, text
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert "train_cskd" not in rows[0] and rows[0]["train_total"] == rows[0]["train_base"]
    code, text = run_cli(*train_args(image_folder, out, "--teacher-source", "none", "--input-size", "64",
                                     "--resume"))
    assert code == 0, text
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [0, 1]  # resumed at epoch 1, did not redo epoch 0


def test_refusals(tmp_path, image_folder, teacher_checkpoint, cache):
    other = tmp_path / "other"
    (image_folder).rename(other)
    (other / "class_1" / "img_000.png").rename(other / "class_1" / "renamed.png")
    code, text = run_cli(*train_args(other, tmp_path / "r", "--cache", cache))
    assert code == 2 and "another dataset" in text and "--match stem" in text and "--force" not in text
    code, text = run_cli(*train_args(other, tmp_path / "r", "--teacher-source", "cache"))
    assert code == 2 and "needs --cache" in text


def test_replay_drift_stops_training(tmp_path, image_folder, cache):
    from PIL import Image

    for p in (image_folder / "class_0").glob("*.png"):  # same keys, other pixels
        Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(p)
    code, text = run_cli(*train_args(image_folder, tmp_path / "d", "--cache", cache))
    assert code == 2 and "replay drift" in text


def test_refuses_what_does_not_fit(tmp_path, image_folder, teacher_checkpoint, cache):
    code, text = run_cli(*train_args(image_folder, tmp_path / "r", "--cache", cache, "--input-size", "96"))
    assert code == 2 and "--input-size 96" in text and "64 px" in text
    # 80 px: the teacher's map is 3x3 but the student's patch grid is 5x5, which cannot be pooled onto it
    c80 = tmp_path / "c80.zarr"
    args = precompute_args(image_folder, c80, teacher_checkpoint, "--input-size", "80")
    assert run_cli(*args)[0] == 0
    code, text = run_cli(*train_args(image_folder, tmp_path / "g", "--cache", c80))
    assert code == 2 and "5x5" in text and "3x3" in text
    # a run is only resumed with the flags it was started with
    out = tmp_path / "run"
    assert run_cli(*train_args(image_folder, out, "--cache", cache, "--epochs", "1"))[0] == 0
    code, text = run_cli(*train_args(image_folder, out, "--cache", cache, "--resume", "--lr", "0.1"))
    assert code == 2 and "--lr" in text and "--resume" in text
    # --force uses a cache made from other data (here: one image more), knowingly; never one missing its images
    Image.open(image_folder / "class_1" / "img_000.png").save(image_folder / "class_1" / "extra.png")
    assert run_cli(*train_args(image_folder, tmp_path / "f", "--cache", cache))[0] == 2
    code, text = run_cli(*train_args(image_folder, tmp_path / "f", "--cache", cache, "--force"))
    assert code == 0, text
    (image_folder / "class_1" / "img_000.png").rename(image_folder / "class_1" / "renamed.png")
    code, text = run_cli(*train_args(image_folder, tmp_path / "f2", "--cache", cache, "--force"))
    assert code == 2 and "lacks 1 of the" in text


def test_resume_is_exact(tmp_path, image_folder, cache):
    """Stopped after epoch 1 and resumed, a run ends bit for bit where an uninterrupted run does (drop path and
    EMA on, so random streams and every piece of state must come back). The run folder may move in between."""
    extra = ("--cache", cache, "--epochs", "3", "--drop-path", "0.1", "--ema-decay", "0.9")
    assert run_cli(*train_args(image_folder, tmp_path / "whole", *extra))[0] == 0
    assert run_cli(*train_args(image_folder, tmp_path / "parts", *extra, "--stop-after", "1"))[0] == 0
    first = [json.loads(line) for line in open(tmp_path / "parts" / "metrics.jsonl")]
    assert [r["epoch"] for r in first] == [0]
    (tmp_path / "parts").rename(tmp_path / "moved")  # e.g. copied off a cluster's scratch disk
    code, text = run_cli(*train_args(image_folder, tmp_path / "moved", *extra, "--resume"))
    assert code == 0 and "resuming" in text.lower(), text
    a = torch.load(tmp_path / "whole" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "moved" / "checkpoint.pth", weights_only=False)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert [r["train_total"] for r in a["history"]] == [r["train_total"] for r in b["history"]]


def test_torchrun_two_processes_train_like_one(tmp_path, image_folder, cache):
    """DDP under torchrun (2 CPU processes, gloo), 4 views each, equals one process with 8 views per step."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # torchrun's default; float sums depend on the thread count
    common = ["--cache", cache, "--val-data", image_folder, "--lr", "1e-3", "--epochs", "2"]
    one = train_args(image_folder, tmp_path / "one", *common)
    two = train_args(image_folder, tmp_path / "two", *common, "--batch-size", "4")
    r = subprocess.run([sys.executable, "-m", "cskd_cache", *map(str, one)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29519",
           "-m", "cskd_cache", *map(str, two)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "two" / "checkpoint.pth", weights_only=False)
    for k in a["model"]:  # gradients summed in another order: equal up to float rounding, which Adam's
        # normalisation lifts to ~2e-5 on near-zero gradients; one wrong view per step moves weights by ~lr (1e-3)
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-4, msg=k)
    ra, rb = a["history"][-1], b["history"][-1]
    assert ra["top1"] == rb["top1"] and ra["top5"] == rb["top5"]  # the two ranks' val shares summed
    assert abs(ra["train_total"] - rb["train_total"]) < 1e-4  # losses over both ranks' views


def test_weight_decay_spares_pos_embed_and_tokens(tmp_path, image_folder):
    """DeiT and the official code do not decay pos_embed, cls_token and dist_token (nor biases and norms)."""
    from cskd_cache.distributed import Dist
    from cskd_cache.training.train import TrainConfig, setup

    run = setup(TrainConfig(student=STUDENT, data=str(image_folder), out=str(tmp_path / "r"), teacher_source="none",
                            input_size=64, epochs=1, batch_size=8, workers=0), Dist())
    names = {id(p): n for n, p in run.student.named_parameters()}
    decayed = {names[id(p)] for g in run.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    spared = {names[id(p)] for g in run.optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"model.pos_embed", "model.cls_token", "model.dist_token"} <= spared
    assert "model.blocks.0.attn.qkv.weight" in decayed and "model.head.weight" in decayed
    # without a teacher nothing trains the distillation head: frozen, in no group (DDP needs every trained
    # parameter to get a gradient)
    assert "model.head_dist.weight" not in decayed | spared and not run.student.model.head_dist.weight.requires_grad
    assert not any(n.endswith(".bias") or ".norm" in n for n in decayed)


def test_every_teacher_source_trains_under_torchrun(tmp_path, image_folder, teacher_checkpoint, cache):
    """Two gloo processes, each teacher source: cache (CSKD), online and none (plain DeiT, whose distillation head
    gets no gradient: DDP once failed at step 1). Every rank holds the same EMA: it is built from the weights DDP
    broadcast (rank 1 starts from other weights here, so an EMA built before the broadcast would differ)."""
    base = dict(student=STUDENT, data=str(image_folder), epochs=1, batch_size=4, workers=0, warmup_epochs=0,
                max_steps=2, ema_decay=0.5, seed=3)
    cfgs = [dict(base, out=str(tmp_path / "cache"), cache=str(cache)),
            dict(base, out=str(tmp_path / "online"), cache=str(cache), teacher_source="online",
                 teacher_checkpoint=str(teacher_checkpoint)),
            dict(base, out=str(tmp_path / "none"), teacher_source="none", input_size=64)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    probe = os.path.join(TESTS, "ddp_probe.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29521", probe,
           json.dumps(cfgs)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("cache", "online", "none"):
        ranks = [json.loads((tmp_path / name / f"rank{i}.json").read_text()) for i in (0, 1)]
        assert ranks[0]["ema"] == ranks[1]["ema"], name
        assert ranks[0]["history"][0]["train_total"] == ranks[1]["history"][0]["train_total"], name
    a = torch.load(tmp_path / "cache" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "online" / "checkpoint.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # cache == online under DDP too
    rows = [json.loads(line) for line in open(tmp_path / "none" / "metrics.jsonl")]
    assert rows[0]["train_total"] == rows[0]["train_base"] and "train_distill" not in rows[0]


def test_resume_refuses_another_cache(tmp_path, image_folder, teacher_checkpoint, cache):
    other = tmp_path / "other.zarr"
    assert run_cli(*precompute_args(image_folder, other, teacher_checkpoint, "--epochs", "1", "--seed", "5"))[0] == 0
    out = tmp_path / "run"
    assert run_cli(*train_args(image_folder, out, "--cache", cache, "--stop-after", "1"))[0] == 0
    code, text = run_cli(*train_args(image_folder, out, "--cache", other, "--resume"))
    assert code == 2 and "another plan" in text and "--resume" in text, text
    code, text = run_cli(*train_args(image_folder, out, "--cache", cache))  # a run is never overwritten silently
    assert code == 2 and "already holds a run" in text and "--resume" in text
    code, text = run_cli(*train_args(image_folder, out, "--cache", cache, "--resume"))
    assert code == 0, text


def test_cycled_cache_reports_reuse_and_best_top1(tmp_path, image_folder, cache):
    """1 cached epoch, 3 training epochs: metrics say which cached epoch and cycle each epoch read, the reuse
    factor is printed and recorded, and the paper's figure (best top-1 of the raw model) is reported."""
    out = tmp_path / "run"
    code, text = run_cli(*train_args(image_folder, out, "--cache", cache, "--epochs", "3", "--val-data", image_folder))
    assert code == 0, text
    assert "each view used 3 times" in text and "best top-1" in text and "raw model" in text
    assert "warning" not in text  # 3 uses per view: noted, not warned
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [(r["cached_epoch"], r["cycle"], r["reuse_factor"]) for r in rows] == [(0, 0, 3.0), (0, 1, 3.0), (0, 2, 3.0)]
    assert [r["best_top1"] for r in rows] == [max(r["top1"] for r in rows[:i + 1]) for i in range(3)]
    code, text = run_cli(*train_args(image_folder, tmp_path / "long", "--cache", cache, "--epochs", "6",
                                     "--stop-after", "1"))
    assert code == 0 and "warning: each view used 6 times" in text and "precompute --epochs 6" in text, text
    assert "at least 2 for 5 uses per view" in text


def test_soft_ckf_loss_where_the_encoding_allows_it(tmp_path, image_folder, teacher_checkpoint, cache):
    code, text = run_cli(*train_args(image_folder, tmp_path / "a", "--cache", cache, "--cskd-loss", "soft"))
    assert code == 2 and "--cskd-loss soft" in text and "--encoding full" in text
    full = tmp_path / "full.zarr"
    assert run_cli(*precompute_args(image_folder, full, teacher_checkpoint, "--encoding", "full"))[0] == 0
    code, text = run_cli(*train_args(image_folder, tmp_path / "b", "--cache", full, "--cskd-loss", "soft",
                                     "--distill", "soft"))
    assert code == 0, text
    assert "approximation" not in text  # full is exact
    code, text = run_cli(*train_args(image_folder, tmp_path / "c", "--cache", cache, "--distill", "soft"))
    assert code == 0 and "approximation" not in text, text  # 4 classes: the global top-10 holds them all
    top2 = tmp_path / "top2.zarr"
    assert run_cli(*precompute_args(image_folder, top2, teacher_checkpoint, "--global-topk", "2"))[0] == 0
    code, text = run_cli(*train_args(image_folder, tmp_path / "c2", "--cache", top2, "--distill", "soft"))
    assert code == 0 and "soft distillation from a ckf cache" in text and "approximation" in text, text
    # online soft CKF runs the teacher and fuses exactly, whatever the cache's encoding
    code, text = run_cli(*train_args(image_folder, tmp_path / "d", "--cache", cache, "--cskd-loss", "soft",
                                     "--teacher-source", "online", "--teacher-checkpoint", teacher_checkpoint))
    assert code == 0, text
    rows = [json.loads(line) for line in open(tmp_path / "d" / "metrics.jsonl")]
    assert rows[0]["train_cskd"] > 0


@pytest.mark.parametrize("encoding", ["ckf", "topk"])
def test_format_1_caches_stay_readable(tmp_path, encoding):
    """Caches written by cskd-cache 0.1 (format 1: no log-sum-exps, repeats 1) are inspected, verified and
    trained from; absent classes decode by the old rule."""
    from conftest import make_images

    from cskd_cache.cache.store import Cache

    images = make_images(tmp_path / "images", per_class=4)  # the images the stored cache was made from
    path = os.path.join(TESTS, "fixtures", f"format1-{encoding}.zarr")
    cache = Cache.open(path)
    assert cache.manifest["format_version"] == 1 and not cache.encoding.lse
    assert "global_lse" not in cache.encoding.arrays()
    code, text = run_cli("verify", path, "--replay", "8", "--data", images)
    assert code == 0 and "8 replayed views match" in text, text
    code, text = run_cli(*train_args(images, tmp_path / "run", "--cache", path, "--distill", "soft"))
    assert code == 0, text


def test_format_2_caches_train_as_before(tmp_path):
    """A cache made by cskd-cache 0.2 (format 2: the 48-byte cells4x4 signature, one-byte ckf slots, full DeiT
    recipe at 64 px) is verified with its own signature and trains as it did then: the per-epoch losses that 0.2
    recorded when it trained this very run (tests/fixtures/format2-ckf.expected.json; bit for bit on the machine that
    made it, to float rounding elsewhere)."""
    from conftest import make_images

    from cskd_cache.cache.store import Cache

    images = make_images(tmp_path / "images", per_class=4)  # the images the stored cache was made from
    path = os.path.join(TESTS, "fixtures", "format2-ckf.zarr")
    cache = Cache.open(path)
    assert cache.manifest["format_version"] == 2 and cache.signature_kind == "cells4x4"
    assert cache.encoding.arrays()["ckf_slot"].dtype == "uint8" and cache.replay_specs["signature"][0] == (48,)
    code, text = run_cli("verify", path, "--replay", "8", "--data", images)
    assert code == 0 and "8 replayed views match" in text, text
    out = tmp_path / "run"
    code, text = run_cli("train", "--student", STUDENT, "--data", images, "--cache", path, "--out", out, "--epochs",
                         "3", "--batch-size", "8", "--workers", "0", "--warmup-epochs", "0", "--max-steps", "2")
    assert code == 0, text
    want = json.load(open(os.path.join(TESTS, "fixtures", "format2-ckf.expected.json")))
    got = [json.loads(line)["train_total"] for line in open(out / "metrics.jsonl")]
    assert got == pytest.approx(want["train_total"], rel=1e-5, abs=0)


def test_compiled_student_trains(tmp_path, image_folder, cache):
    """--compile (torch.compile of the training forward; inductor on a CPU here) trains and checkpoints the
    plain module's weights."""
    out = tmp_path / "compiled"  # a narrower, shallower DeiT-Ti: inductor's compile time grows with the graph
    code, text = run_cli(*train_args(image_folder, out, "--cache", cache, "--epochs", "1", "--max-steps", "1",
                                     "--compile", "--student", "deit_demo"))
    assert code == 0, text
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in ck["model"])
    assert np.isfinite(ck["history"][0]["train_total"])
