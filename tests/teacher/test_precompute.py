"""`cskd-cache precompute / inspect / verify` from the command line: the cache is exact, resumable and refuses
misuse."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from conftest import all_arrays, assert_same_cache, NUM_CLASSES, make_images, precompute_args, run_cli
from typer.testing import CliRunner

from cskd_cache_cli.app import app
from cskd_cache.data.open import open_source
from cskd_cache.cache.store import Cache
from cskd_cache.teacher.model import create_teacher
from cskd_cache.data.replay import PairDataset, pair_items

runner = CliRunner()


def test_precompute_inspect_verify(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "c.zarr"
    code, text = run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "2"))
    assert code == 0, text
    assert "48 views" in text and "complete" in text
    cache = Cache.open(str(out))
    m = cache.manifest
    assert cache.complete and m["status"] == "complete"
    assert m["grid"] == [2, 2] and m["num_classes"] == NUM_CLASSES
    assert m["dataset"]["fingerprint"] == open_source(str(image_folder)).fingerprint()
    assert m["teacher"]["name"] == "test_resnet" and m["teacher"]["global_equals_output"] is True
    assert m["recipe"]["input_size"] == 64 and "timm" in m["recipe"]["library_versions"]
    assert m["encoding"]["name"] == "ckf" and m["encoding"]["values"].startswith("logits")
    assert m["layout"]["num_shards"] == 6 and cache.done_shards().all()

    code, text = run_cli("inspect", out, "--json")
    info = json.loads(text)
    assert code == 0 and info["status"] == "complete" and info["shards_done"] == 6
    assert info["arrays"]["ckf_slot"]["shape"] == [48, 2 * 2, NUM_CLASSES]  # ckf width clipped to K
    assert info["bytes_per_view"]["stored"] > 0
    code, text = run_cli("inspect", out)
    assert code == 0 and "test_resnet" in text and "grid 2x2" in text
    assert "epochs complete: 0-1" in text and "recipe       input_size 64" in text  # what a user asks first
    assert "B/view" in text and "skipped      0 undecodable images" in text
    code, text = run_cli("verify", out, "--replay", "12", "--data", image_folder)
    assert code == 0 and "12 replayed views match" in text, text


def test_cached_targets_are_the_teachers_on_the_replayed_views(tmp_path, image_folder, teacher_checkpoint):
    """The stored outputs are exactly the teacher's outputs on the view the plan names (replayed independently)."""
    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--encoding", "full"))[0] == 0
    cache = Cache.open(str(out))
    teacher, _ = create_teacher("test_resnet", checkpoint=str(teacher_checkpoint))
    ds = PairDataset(open_source(str(image_folder)), cache.recipe, cache.fingerprint_kind)
    items = pair_items(cache.epoch_plan, np.arange(6, 10), cache.stride)
    x = torch.cat([ds[it]["image"] for it in items])
    dense, glob = teacher(x)
    arrays, spill = cache.read_views(6, 10)
    assert spill is None
    assert np.array_equal(arrays["dense"], dense.numpy().astype(np.float16))
    assert np.allclose(arrays["global"], glob.numpy(), atol=1e-6)
    assert np.array_equal(cache.read_fingerprints(6, 10), torch.cat([ds[it]["fingerprint"] for it in items]))


@pytest.mark.parametrize("encoding", ["ckf", "topk"])
def test_encodings_decode_to_the_full_caches_targets(tmp_path, image_folder, teacher_checkpoint, encoding):
    full, other = tmp_path / "full.zarr", tmp_path / f"{encoding}.zarr"
    assert run_cli(*precompute_args(image_folder, full, teacher_checkpoint, "--encoding", "full"))[0] == 0
    assert run_cli(*precompute_args(image_folder, other, teacher_checkpoint, "--encoding", encoding,
                                    "--topk", "4"))[0] == 0
    a, b = Cache.open(str(full)), Cache.open(str(other))
    fa, _ = a.read_views(0, 24)
    fb, sb = b.read_views(0, 24)
    ta, tb = ({k: torch.from_numpy(v) for k, v in f.items()} for f in (fa, fb))
    for alpha in (1.0, 0.7, 0.5, 0.2, 0.0):
        assert torch.equal(a.encoding.decode_targets(ta, alpha), b.encoding.decode_targets(tb, alpha, None))
    assert torch.equal(a.encoding.global_argmax(ta), b.encoding.global_argmax(tb))


def test_webdataset_shards_and_brace_patterns(tmp_path, image_folder, teacher_checkpoint):
    src = open_source(str(image_folder))
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"train-{s:03d}.tar")) as w:
            for i in range(s, len(src), 2):
                w.write({"__key__": f"s{i:04d}", "png": src.read_bytes(i), "cls": str(src.labels[i]).encode()})
    out = tmp_path / "w.zarr"
    code, text = run_cli(*precompute_args(tmp_path / "train-{000..001}.tar", out, teacher_checkpoint))
    assert code == 0, text
    m = Cache.open(str(out)).manifest
    assert m["dataset"]["kind"] == "webdataset" and m["dataset"]["num_samples"] == 24


def _kill_midway(cmd, out, env):
    """Start precompute in a real process and kill -9 it once some but not all shards are written."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dir = out / "views" / "shard_done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done_dir.exists() and len(os.listdir(done_dir)) >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_then_resume_gives_the_identical_cache(tmp_path, teacher_checkpoint):
    images = make_images(tmp_path / "images", per_class=8)
    args = precompute_args(images, tmp_path / "killed.zarr", teacher_checkpoint, "--epochs", "4")
    # float sums follow the thread count: every run here is a process of its own with the same count
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "cskd_cache", *args]
    _kill_midway(cmd, tmp_path / "killed.zarr", env)
    killed = Cache.open(str(tmp_path / "killed.zarr"))
    n_done = int(killed.done_shards().sum())
    assert not killed.complete and 0 < n_done < killed.num_shards  # really interrupted midway
    code, text = run_cli("inspect", tmp_path / "killed.zarr")
    assert "incomplete" in text
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0  # the same command resumes
    assert Cache.open(str(tmp_path / "killed.zarr")).complete
    ref = precompute_args(images, tmp_path / "ref.zarr", teacher_checkpoint, "--epochs", "4")
    assert subprocess.run([sys.executable, "-m", "cskd_cache", *ref], env=env, capture_output=True).returncode == 0
    assert_same_cache(tmp_path / "killed.zarr", tmp_path / "ref.zarr")


def test_stopped_run_resumes_without_recomputing_finished_shards(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "c.zarr"
    args = precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "2")
    code, text = run_cli(*args, "--max-shards", "2")
    assert code == 0 and "incomplete" in text
    cache = Cache.open(str(out))
    assert cache.done_shards().sum() == 2 and not cache.complete
    before = np.asarray(cache.group["views/ckf_dense"][0:16]).copy()
    marker = out / "views" / "ckf_dense" / "c" / "0" / "0" / "0"
    mtime = marker.stat().st_mtime_ns
    assert run_cli(*args)[0] == 0
    assert marker.stat().st_mtime_ns == mtime  # finished shard 0 was not rewritten
    assert np.array_equal(before, np.asarray(Cache.open(str(out)).group["views/ckf_dense"][0:16]), equal_nan=True)


def test_torchrun_two_processes_write_their_own_shards(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "ddp.zarr"
    args = precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "cskd_cache", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # torchrun's default; float sums depend on the thread count
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Cache.open(str(out)).complete
    one = precompute_args(image_folder, tmp_path / "one.zarr", teacher_checkpoint, "--epochs", "2")
    assert subprocess.run([sys.executable, "-m", "cskd_cache", *one], env=env, capture_output=True).returncode == 0
    assert_same_cache(out, tmp_path / "one.zarr")


def test_refuses_a_cache_made_with_other_settings(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint))[0] == 0
    other_teacher = tmp_path / "other.pth"
    torch.manual_seed(1)
    import timm

    torch.save(timm.create_model("test_resnet", num_classes=NUM_CLASSES).state_dict(), other_teacher)
    cases = [
        (precompute_args(image_folder, out, other_teacher), "another teacher"),
        (precompute_args(image_folder, out, teacher_checkpoint, "--encoding", "full"), "another encoding"),
        (precompute_args(image_folder, out, teacher_checkpoint, "--re-prob", "0.5"), "augmentation recipe"),
        (precompute_args(image_folder, out, teacher_checkpoint, "--seed", "3"), "another plan"),
    ]
    for args, why in cases:
        code, text = run_cli(*args)
        assert code == 2 and why in text and "--overwrite" in text and "Traceback" not in text, text
    (image_folder / "class_0" / "img_000.png").rename(image_folder / "class_0" / "img_999.png")
    code, text = run_cli(*precompute_args(image_folder, out, teacher_checkpoint))
    assert code == 2 and "another dataset" in text
    code, text = run_cli(*precompute_args(image_folder, out, other_teacher, "--overwrite"))
    assert code == 0 and Cache.open(str(out)).complete


def test_bad_input_gets_one_line_errors(tmp_path, image_folder, teacher_checkpoint):
    cases = [
        (precompute_args(tmp_path / "nope", tmp_path / "a.zarr", teacher_checkpoint), "no such file"),
        (precompute_args(image_folder, tmp_path / "b.zarr", teacher_checkpoint, "--batch-size", "3"),
         "--batch-size"),
        (["precompute", "--data", image_folder, "--out", tmp_path / "c.zarr", "--teacher", "no_such_net",
          "--pretrained"], "unknown timm model"),
        (["precompute", "--data", image_folder, "--out", tmp_path / "d.zarr", "--teacher", "test_vit",
          "--teacher-checkpoint", teacher_checkpoint, "--input-size", "64"], "teacher-checkpoint"),
    ]
    (tmp_path / "notacache").mkdir()
    (tmp_path / "notacache" / "precious.txt").write_text("keep me")
    cases.append((precompute_args(image_folder, tmp_path / "notacache", teacher_checkpoint), "not a cskd-cache"))
    for args, what in cases:
        code, text = run_cli(*args)
        assert code == 2 and what in text and len(text.strip().splitlines()) == 1, text
    assert (tmp_path / "notacache" / "precious.txt").exists()
    code, text = run_cli("inspect", tmp_path / "missing.zarr")
    assert code == 2 and "no cskd-cache" in text


def test_corrupt_image_fails_naming_it_or_is_skipped(tmp_path, image_folder, teacher_checkpoint):
    bad = image_folder / "class_2" / "img_003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    # --repeats 1: every image is drawn in every epoch (with DeiT's 3 repeats, a third of them are)
    code, text = run_cli(*precompute_args(image_folder, tmp_path / "a.zarr", teacher_checkpoint, "--repeats", "1"))
    assert code == 2 and "class_2/img_003.png" in text and "--skip-bad" in text
    assert not Cache.open(str(tmp_path / "a.zarr")).complete  # never looks whole
    code, text = run_cli(*precompute_args(image_folder, tmp_path / "b.zarr", teacher_checkpoint, "--skip-bad"))
    assert code == 0, text
    cache = Cache.open(str(tmp_path / "b.zarr"))
    assert cache.manifest["bad_samples"] == ["class_2/img_003.png"] and cache.complete
    assert "class_2/img_003.png" not in cache.sample_keys() and len(cache.sample_keys()) == 23


def test_full_disk_is_a_clear_error_and_leaves_an_incomplete_cache(tmp_path, image_folder, teacher_checkpoint,
                                                                    monkeypatch):
    import errno

    from cskd_cache.cache import write

    real = write.write_shard
    calls = {"n": 0}

    def failing(cache, shard, *a):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(cache, shard, *a)

    monkeypatch.setattr(write, "write_shard", failing)
    out = tmp_path / "c.zarr"
    code, text = run_cli(*precompute_args(image_folder, out, teacher_checkpoint))
    assert code == 2 and "No space left on device" in text and "resume" in text
    cache = Cache.open(str(out))
    assert not cache.complete and cache.manifest["status"] == "incomplete"
    monkeypatch.setattr(write, "write_shard", real)
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint))[0] == 0
    assert Cache.open(str(out)).complete


def test_flipped_byte_is_caught_by_verify(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint))[0] == 0
    shard = out / "views" / "global_value" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, text = run_cli("verify", out)
    assert code == 1 and "views/global_value" in text


def test_remote_store_is_readable(tmp_path, image_folder, teacher_checkpoint):
    """Any fsspec URL works for reading: copy a finished cache into memory:// and open it there."""
    import fsspec

    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint))[0] == 0
    fs = fsspec.filesystem("memory")
    fs.put(str(out), "/remote/c.zarr", recursive=True)
    code, text = run_cli("verify", "memory://remote/c.zarr")
    assert code == 0, text
    remote = Cache.open("memory://remote/c.zarr")
    assert remote.complete
    assert np.array_equal(remote.read_fingerprints(0, 24), Cache.open(str(out)).read_fingerprints(0, 24))


def test_a_crash_while_creating_or_writing_a_plan_never_gives_a_usable_cache(tmp_path, image_folder,
                                                                            teacher_checkpoint, monkeypatch):
    """A crash while the group and samples are created leaves a cache that says 'creating' (never opens; the next
    run starts over). Plans are written with their epochs' first shards: a crash while an epoch's plan is written
    leaves that shard unmarked (the cache is incomplete, training refuses it) and the next run finishes it to the
    uninterrupted run's cache, array for array. (The reproduced bug: a crash between plan epochs once left a cache
    that resumed to 'complete' with all-zero plans.)"""
    from cskd_cache.cache import write

    out = tmp_path / "c.zarr"
    args = precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "3")
    real_array = write._write_array
    monkeypatch.setattr(write, "_write_array", lambda group, name, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
                        if name == "samples/label" else real_array(group, name, *a, **k))
    code, text = run_cli(*args)
    assert code == 130 and "resume" in text
    assert write.read_manifest(str(out))["status"] == "creating"
    code, text = run_cli("inspect", out)
    assert code == 2 and "never fully created" in text
    monkeypatch.setattr(write, "_write_array", real_array)

    real, calls = write.write_epoch_plan, {"n": 0}

    def crashing(group, epoch, plan):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill) does while epoch 1's plan is written
        return real(group, epoch, plan)

    monkeypatch.setattr(write, "write_epoch_plan", crashing)
    code, text = run_cli(*args)
    assert code == 130 and "resume" in text
    cache = Cache.open(str(out))
    assert cache.manifest["status"] == "incomplete" and 0 < int(cache.done_shards().sum()) < cache.num_shards
    assert not cache.done_shards()[list(cache.epoch_shards(1))[0]]  # the shard whose plan was cut off
    code, text = run_cli("train", "--student", "deit_tiny_distilled_patch16_224", "--data", image_folder, "--cache",
                         out, "--out", tmp_path / "run", "--epochs", "1", "--workers", "0", "--batch-size", "8")
    assert code == 2 and "incomplete" in text
    monkeypatch.setattr(write, "write_epoch_plan", real)
    assert run_cli(*args)[0] == 0
    assert run_cli(*precompute_args(image_folder, tmp_path / "ref.zarr", teacher_checkpoint, "--epochs", "3"))[0] == 0
    assert_same_cache(out, tmp_path / "ref.zarr")


def test_a_damaged_plan_is_found_repaired_and_refused(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "c.zarr"
    args = precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "2")
    assert run_cli(*args, "--max-shards", "4")[0] == 0  # epoch 0 written, epoch 1 not yet
    group = zarr.open_group(str(out), mode="r+")
    group["plan/sample"][1] = 0  # what an interrupted plan write of the old format left
    group["plan/lam"][0] = 0  # and a plan whose shards were already written from it
    code, text = run_cli("verify", out)
    assert code == 1 and "plan of epochs [0, 1]" in text
    code, text = run_cli(*args)
    assert code == 0 and "plan of epochs [0, 1]" in text and "rewritten" in text, text
    assert run_cli(*precompute_args(image_folder, tmp_path / "ref.zarr", teacher_checkpoint, "--epochs", "2"))[0] == 0
    assert_same_cache(out, tmp_path / "ref.zarr")  # the shards of the damaged epochs were computed again
    group = zarr.open_group(str(out), mode="r+")
    group["plan/seed"][1, 3] += 1
    code, text = run_cli("train", "--student", "deit_tiny_distilled_patch16_224", "--data", image_folder,
                         "--cache", out, "--out", tmp_path / "run", "--epochs", "2", "--batch-size", "8",
                         "--workers", "0", "--max-steps", "1")
    assert code == 2 and "plan of epoch 1 does not match" in text, text


def test_a_batch_may_span_several_epochs(tmp_path, image_folder, teacher_checkpoint):
    """24 images, batches of 64 views, 3 epochs: one batch crosses two epoch boundaries (an IndexError before)."""
    out = tmp_path / "c.zarr"
    code, text = run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "3", "--batch-size",
                                          "64", "--chunk-views", "8", "--shard-views", "72"))
    assert code == 0, text
    assert run_cli("verify", out, "--replay", "36", "--data", image_folder)[0] == 0


def test_manifest_records_normalisation_precision_and_defaults(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint))[0] == 0
    m = Cache.open(str(out)).manifest
    assert m["teacher"]["mean"] == [0.5] * 3 and m["teacher"]["std"] == [0.5] * 3  # test_resnet's own config
    assert m["recipe"]["mean"] == [0.485, 0.456, 0.406]  # how the views themselves are normalised
    assert m["teacher"]["precision"] == "fp32" and m["plan"]["repeats"] == 3  # CPU; DeiT's repeats
    code, text = run_cli("inspect", out)
    assert "exact: hard CKF targets, hard distillation" in text and "lossy" not in text
    r = runner.invoke(app, ["precompute", "--help"])
    flat = "".join(ch for ch in r.output if ch.isalnum() or ch == ".")  # rich wraps help text in boxes
    assert "300default" in flat and "freshviewseveryepoch" in flat and "0.72GB" in flat


def test_unknown_recipe_fields_and_benign_changes(tmp_path, image_folder, teacher_checkpoint):
    """One recipe reader for precompute, verify and train: a field this version cannot replay is refused;
    library versions and the data's location are not part of a cache's identity."""
    out = tmp_path / "c.zarr"
    args = precompute_args(image_folder, out, teacher_checkpoint)
    assert run_cli(*args, "--max-shards", "1")[0] == 0
    group = zarr.open_group(str(out), mode="r+")
    m = dict(group.attrs["cskd_cache"])
    m["recipe"] = dict(m["recipe"], library_versions=dict(m["recipe"]["library_versions"], pillow="13.0.1"))
    group.attrs["cskd_cache"] = m
    moved = tmp_path / "moved"
    image_folder.rename(moved)
    code, text = run_cli(*precompute_args(moved, out, teacher_checkpoint))  # resumes: same identity
    assert code == 0 and "complete" in text, text
    group = zarr.open_group(str(out), mode="r+")
    group.attrs["cskd_cache"] = dict(group.attrs["cskd_cache"], recipe=dict(m["recipe"], gridmask=0.5))
    for cmd in (["verify", out, "--replay", "2", "--data", moved],
                ["train", "--student", "deit_tiny_distilled_patch16_224", "--data", moved, "--cache", out, "--out",
                 tmp_path / "r", "--workers", "0"]):
        code, text = run_cli(*cmd)
        assert code == 2 and "gridmask" in text and "upgrade cskd-cache" in text, text


def test_rerunning_on_a_finished_cache_keeps_it_whole(tmp_path, image_folder, teacher_checkpoint):
    """(Found by the kill sweep: a rerun on a complete cache once overwrote its marker snapshot with zeros.)"""
    out = tmp_path / "c.zarr"
    args = precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "2")
    assert run_cli(*args)[0] == 0
    before = all_arrays(out)
    code, text = run_cli(*args)
    assert code == 0 and "complete" in text and "incomplete" not in text, text
    assert Cache.open(str(out)).complete and run_cli("verify", out)[0] == 0
    after = all_arrays(out)
    assert all(np.array_equal(before[k], after[k], equal_nan=before[k].dtype.kind == "f") for k in before)
