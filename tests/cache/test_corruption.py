"""Corruption suite: whatever happens to a cache's bytes, `verify` names it (exit 1, every problem listed) and
`train` refuses to start, or stops mid-run with one line naming the shard; never trains on wrong targets."""

import json
import os

import pytest
import zarr
from conftest import precompute_args, run_cli




@pytest.fixture
def cache(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "2"))[0] == 0
    return out


def shard_file(cache, array, shard):
    return cache / "views" / array / "c" / str(shard) / "0" / "0"


def truncate(cache):
    p = shard_file(cache, "ckf_dense", 1)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return ["views/ckf_dense", "shard 1"], "shard(s) [1]"


def flip(cache):
    p = shard_file(cache, "ckf_slot", 2)
    data = bytearray(p.read_bytes())
    data[30] ^= 0x55
    p.write_bytes(bytes(data))
    return ["views/ckf_slot", "shard 2"], "shard(s) [2]"


def delete(cache):
    os.remove(cache / "views" / "fingerprint" / "c" / "3")
    return ["shard 3", "files missing", "views/fingerprint"], "shard(s) [3] are missing"


def mismatch(cache):
    g = zarr.open_group(str(cache), mode="r+")
    m = dict(g.attrs["cskd_cache"])
    m["layout"] = dict(m["layout"], total_views=m["layout"]["total_views"] + 8)
    g.attrs["cskd_cache"] = m
    return ["do not match a plan", "views/fingerprint: shape (48,)"], None


def unfinished(cache):
    g = zarr.open_group(str(cache), mode="r+")
    g["views/shard_done"][4] = 0
    g.attrs["cskd_cache"] = dict(g.attrs["cskd_cache"], status="incomplete")
    return ["1 of 6 shards not written"], None


@pytest.mark.parametrize("damage", [truncate, flip, delete, mismatch, unfinished])
def test_verify_names_it_and_train_never_uses_it(tmp_path, image_folder, cache, damage):
    want, train_says = damage(cache)
    code, text = run_cli("verify", cache)
    assert code == 1 and "verify failed" in text, text
    for w in want:
        assert w in text, (w, text)
    code, text = run_cli("train", "--student", "deit_tiny_distilled_patch16_224", "--data", image_folder, "--cache",
                         cache, "--out", tmp_path / "run", "--epochs", "2", "--batch-size", "8", "--workers", "0")
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in text, text  # progress lines, then one error
    assert train_says is None or train_says in errors[0], text
    if train_says is None:  # refused before training
        assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_verify_lists_every_problem(cache):
    truncate(cache)
    flip(cache)
    delete(cache)
    code, text = run_cli("verify", cache)
    assert code == 1 and all(f"(shard {s})" in text or f"shard {s}:" in text for s in (1, 2, 3)), text


def test_a_read_only_cache_is_never_modified(tmp_path, image_folder, cache):
    """inspect, verify (with replay) and train read a cache without writing a byte of it."""
    def snapshot():
        out = {}
        for root, _, files in os.walk(cache):
            for f in files:
                p = os.path.join(root, f)
                out[p] = (os.stat(p).st_mtime_ns, open(p, "rb").read())
        return out

    before = snapshot()
    for cmd in (["inspect", cache], ["inspect", cache, "--json"], ["verify", cache, "--replay", "8", "--data",
                                                                   image_folder],
                ["train", "--student", "deit_tiny_distilled_patch16_224", "--data", image_folder, "--cache", cache,
                 "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "8", "--workers", "1"]):
        code, text = run_cli(*cmd)
        assert code == 0, text
    assert snapshot() == before
    json.loads(run_cli("inspect", cache, "--json")[1])
