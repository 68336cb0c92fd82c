"""Issue 8's reproduced failures, each with its test: unsafe loading, two writers, interrupted creation, resumes
that refused benign changes or accepted wrong ones, non-UTF-8 names, tracebacks, overwritten runs, bad values."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from conftest import NUM_CLASSES, make_images, one_line, precompute_args, run_cli

from cskd_cache.data.open import open_source
from cskd_cache.cache.store import Cache, read_manifest

STUDENT = "deit_tiny_distilled_patch16_224"


class Evil:
    """Unpickling this runs code: what a crafted checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoints_from_strangers_never_run_code(tmp_path, image_folder):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "evil": Evil(marker), "epoch": 0, "config": {}}, out / "checkpoint.pth")
    code, text = run_cli("train", "--student", STUDENT, "--data", image_folder, "--out", out, "--teacher-source",
                         "none", "--input-size", "64", "--resume", "--workers", "0", "--batch-size", "8")
    one_line(code, text, "not a readable checkpoint")
    weights = tmp_path / "t.pth"
    with open(str(weights) + ".state.pth", "wb") as f:
        pickle.dump({"evil": Evil(marker)}, f)
    code, text = run_cli("fit-teacher", "--data", image_folder, "--out", weights, "--teacher", "test_resnet",
                         "--no-pretrained", "--epochs", "1", "--input-size", "64", "--workers", "0")
    one_line(code, text, "not a readable resume state")
    assert not marker.exists()  # nothing ran


def _slow_precompute(images, out, ckpt, *extra):
    """A precompute that takes a few seconds (16 epochs of small shards), in its own process."""
    args = precompute_args(images, out, ckpt, "--epochs", "16", *extra)
    return subprocess.Popen([sys.executable, "-m", "cskd_cache", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_shards(out, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        c = read_manifest(str(out))
        if c and c.get("status") == "incomplete" and int(Cache.open(str(out)).done_shards().sum()) >= n:
            return
        time.sleep(0.05)


def test_one_writer_per_cache_and_a_crashed_writer_does_not_block(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "c.zarr"
    other = tmp_path / "other.pth"
    torch.manual_seed(1)
    import timm

    torch.save(timm.create_model("test_resnet", num_classes=NUM_CLASSES).state_dict(), other)
    first = _slow_precompute(image_folder, out, teacher_checkpoint)
    _wait_for_shards(out, 2, first)
    assert first.poll() is None, first.communicate()
    code, text = run_cli(*precompute_args(image_folder, out, other, "--epochs", "16", "--overwrite"))
    one_line(code, text, "being written by another precompute", f"pid {first.pid}")
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    cache = Cache.open(str(out))
    assert cache.complete and cache.manifest["teacher"]["checkpoint_sha256"] is not None
    # a writer killed with SIGKILL leaves the lock file, but not the lock
    second = _slow_precompute(image_folder, out, other, "--overwrite")
    _wait_for_shards(out, 1, second)
    second.send_signal(signal.SIGKILL)
    second.wait()
    assert os.path.exists(str(out) + ".lock")
    code, text = run_cli(*precompute_args(image_folder, out, other, "--epochs", "16"))
    assert code == 0 and "complete" in text, text


def test_shards_of_another_run_never_count(tmp_path, image_folder, teacher_checkpoint):
    """Every shard marker carries its run's id: a marker another run left (a second writer, a replaced cache)
    makes the shard undone, verify names it, and precompute computes it again."""
    out = tmp_path / "c.zarr"
    args = precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "2")
    assert run_cli(*args, "--max-shards", "4")[0] == 0  # being written: shards 0-3 done
    group = zarr.open_group(str(out), mode="r+")
    group["views/shard_done"][2] = 12345  # a stranger's marker
    cache = Cache.open(str(out))
    assert cache.foreign_shards().tolist() == [2] and cache.done_shards().tolist()[:4] == [True, True, False, True]
    code, text = run_cli("verify", out)
    assert code == 1 and "written by another run" in text
    code, text = run_cli(*args)
    assert code == 0 and Cache.open(str(out)).complete
    # a finished cache reads all markers from its snapshot (one read): a foreign one there counts as undone too
    group = zarr.open_group(str(out), mode="r+")
    group["views/shard_run"][1] = 777
    assert not Cache.open(str(out)).complete and Cache.open(str(out)).foreign_shards().tolist() == [1]


def test_an_interrupted_overwrite_never_leaves_a_cache_that_blocks(tmp_path, image_folder, teacher_checkpoint,
                                                                   monkeypatch):
    """--overwrite deletes the old cache by renaming it aside first: killed in the middle, --out is free (or
    still the whole old cache), and the next run, with or without --overwrite, goes on."""
    import shutil


    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint))[0] == 0

    def killed_rmtree(path, ignore_errors=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    code, text = run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--encoding", "full",
                                          "--overwrite"))
    assert code == 130
    assert not out.exists() and list(tmp_path.glob("c.zarr.deleting-*"))  # aside, recognisable, not in the way
    monkeypatch.undo()
    code, text = run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--encoding", "full"))
    assert code == 0 and Cache.open(str(out)).manifest["encoding"]["name"] == "full"


def test_skip_bad_on_the_out_that_failed(tmp_path, image_folder, teacher_checkpoint):
    (image_folder / "class_1" / "img_002.png").write_bytes(b"not an image")
    out = tmp_path / "c.zarr"
    args = precompute_args(image_folder, out, teacher_checkpoint, "--repeats", "1")
    code, text = run_cli(*args)
    one_line(code, text, "class_1/img_002.png", "--skip-bad")
    code, text = run_cli(*args, "--skip-bad")  # what the error told the user to do, on the same --out
    assert code == 0, text
    assert "skipped 1 undecodable images: 'class_1/img_002.png'" in text
    assert Cache.open(str(out)).complete


def test_non_utf8_file_names(tmp_path, teacher_checkpoint):
    """A Latin-1 file name (as torchvision's ImageFolder reads it) is a key like any other."""
    images = make_images(tmp_path / "images", per_class=3)
    raw = os.fsencode(str(images / "class_0")) + b"/caf\xe9.png"
    with open(raw, "wb") as f:
        f.write((images / "class_0" / "img_000.png").read_bytes())
    source = open_source(str(images))
    key = next(k for k in source.keys if "caf" in k)
    assert os.fsencode(os.path.join(str(images), key)) == raw
    out = tmp_path / "c.zarr"
    code, text = run_cli(*precompute_args(images, out, teacher_checkpoint, "--repeats", "1"))
    assert code == 0, text
    cache = Cache.open(str(out))
    assert key in cache.sample_keys() and cache.manifest["dataset"]["fingerprint"] == source.fingerprint()
    code, text = run_cli("train", "--student", STUDENT, "--data", images, "--cache", out, "--out", tmp_path / "r",
                         "--epochs", "1", "--batch-size", "4", "--workers", "0", "--max-steps", "1")
    assert code == 0, text


def test_more_than_1000_samples_replay_and_missing_ones_are_named(tmp_path, teacher_checkpoint):
    """verify --replay checked only the first 1000 keys and then failed with a KeyError."""
    images = make_images(tmp_path / "images", per_class=251, size=16)  # 1004 samples
    out = tmp_path / "c.zarr"
    args = precompute_args(images, out, teacher_checkpoint, "--input-size", "32", "--repeats", "1",
                           "--batch-size", "128", "--chunk-views", "64", "--shard-views", "512")
    assert run_cli(*args)[0] == 0
    code, text = run_cli("verify", out, "--replay", "7", "--data", images)
    assert code == 0 and "8 replayed views match" in text, text  # N views, rounded up to whole pairs
    (images / "class_3" / "img_250.png").unlink()
    code, text = run_cli("verify", out, "--replay", "4", "--data", images)
    one_line(code, text, "lacks 1 of the 1004", "class_3/img_250.png")


def test_a_run_is_never_overwritten_and_resume_says_when_there_is_none(tmp_path, image_folder):
    args = ["train", "--student", STUDENT, "--data", image_folder, "--teacher-source", "none", "--input-size", "64",
            "--epochs", "1", "--batch-size", "8", "--workers", "0", "--max-steps", "1"]
    code, text = run_cli(*args, "--out", tmp_path / "r", "--resume")
    assert code == 0 and "no run in" in text and "starting a new one" in text
    code, text = run_cli(*args, "--out", tmp_path / "r")
    one_line(code, text, "already holds a run", "--resume")
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [0]


@pytest.mark.parametrize("extra, needles", [
    (["--mixup", "-1"], ["--mixup"]),
    (["--re-prob", "2"], ["--re-prob"]),
    (["--reprob", "1.5"], ["--reprob"]),
    (["--auto-augment", "rand-m9-zz"], ["--auto-augment", "rand-m9-zz"]),
    (["--auto-augment", "bogus"], ["--auto-augment", "bogus"]),
    (["--encoding", "zip"], ["--encoding", "zip"]),
    (["--repeats", "0"], ["--repeats"]),
    (["--ckf-width", "0"], ["--ckf-width"]),
    (["--input-size", "0"], ["--input-size"]),
    (["--device", "cuda"], ["--device cuda", "no CUDA GPU"]),
    (["--device", "tpu9"], ["--device"]),
    (["--batch-size", "7"], ["--batch-size"]),
    (["--epochs", "two"], ["--epochs"]),
    (["--teacher-precision", "int8"], ["--teacher-precision"]),
])
def test_bad_values_are_refused_where_they_enter(tmp_path, image_folder, teacher_checkpoint, extra, needles):
    out = tmp_path / "c.zarr"
    code, text = run_cli(*precompute_args(image_folder, out, teacher_checkpoint), *extra)
    one_line(code, text, *needles)
    assert read_manifest(str(out)) is None  # nothing invalid was recorded


def test_choices_are_case_insensitive_and_recorded_canonically(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "c.zarr"
    code, text = run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--encoding", "CKF"))
    assert code == 0, text
    assert Cache.open(str(out)).manifest["encoding"]["name"] == "ckf"


def test_val_data_is_named_as_val_data(tmp_path, image_folder):
    code, text = run_cli("train", "--student", STUDENT, "--data", image_folder, "--val-data", tmp_path / "nope",
                         "--out", tmp_path / "r", "--teacher-source", "none", "--input-size", "64", "--workers", "0")
    one_line(code, text, "--val-data", "nope")


def test_a_redone_shard_keeps_no_stale_spill_and_is_flushed_before_its_marker(tmp_path, image_folder,
                                                                               teacher_checkpoint, monkeypatch):
    from cskd_cache.cache import write

    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--max-shards", "1"))[0] == 0
    cache = Cache.open(str(out), mode="r+")
    s = 0
    a, b = cache.shard_range(s)
    arrays, _ = cache.read_views(a, b)
    fps = cache.read_replay(a, b)
    P = cache.encoding.positions
    fake = {"view": np.array([1]), "pos": np.array([0]), "dense": np.zeros((1, NUM_CLASSES), np.float16),
            "global": np.zeros((1, NUM_CLASSES), np.float32)}
    write.write_shard(cache, s, arrays, fps, fake)  # a first attempt that spilled (on another device, say)
    assert f"spill/s{s:06d}" in zarr.open_group(str(out), mode="r") and P == 4
    events = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    real_set = zarr.Array.__setitem__

    def spy(self, key, value):
        if self.path == "views/shard_done":
            events.append(("marker", None))
        return real_set(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    write.write_shard(cache, s, arrays, fps, None)  # redone, and this time nothing spilled
    assert f"spill/s{s:06d}" not in zarr.open_group(str(out), mode="r")
    marker = events.index(("marker", None))
    flushed = [p for kind, p in events[:marker] if kind == "fsync"]
    assert any("views/fingerprint/c" in p for p in flushed) and any("views/ckf_slot/c" in p for p in flushed)
