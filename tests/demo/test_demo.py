"""`cskd-cache fit-teacher` and `cskd-cache demo`, from the command line, at a tiny size."""

import json

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES, TEACHER, precompute_args, run_cli
from PIL import Image

from cskd_cache.scenes import make_scenes, write_scene_shards



@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_fit_teacher_writes_weights_precompute_loads(tmp_path, image_folder, suffix):
    out = tmp_path / f"teacher{suffix}"
    code, text = run_cli("fit-teacher", "--data", image_folder, "--val-data", image_folder, "--out", out,
                         "--teacher", TEACHER, "--no-pretrained", "--epochs", "2", "--batch-size", "8",
                         "--input-size", "64", "--workers", "0")
    assert code == 0, text
    report = json.loads((tmp_path / f"teacher{suffix}.json").read_text())
    assert report["num_classes"] == NUM_CLASSES and [r["epoch"] for r in report["history"]] == [0, 1]
    assert 0 <= report["history"][-1]["val_top1"] <= 100
    assert not (tmp_path / f"teacher{suffix}.state.pth").exists()  # resume state is removed once done
    code, text = run_cli(*precompute_args(image_folder, tmp_path / "c.zarr", out))
    assert code == 0, text


def test_fit_teacher_refusals(tmp_path, image_folder):
    code, text = run_cli("fit-teacher", "--data", image_folder, "--out", tmp_path / "t.bin", "--teacher", TEACHER)
    assert code == 2 and "*.safetensors or *.pth" in text
    code, text = run_cli("fit-teacher", "--data", image_folder, "--out", tmp_path / "t.pth", "--teacher", "nope_net")
    assert code == 2 and "unknown timm model" in text
    code, text = run_cli("fit-teacher", "--data", image_folder, "--out", tmp_path / "t.pth",
                         "--teacher", "resnet18", "--pretrained", "--input-size", "64", "--workers", "0")
    assert code == 2 and "--no-pretrained" in text and len(text.strip().splitlines()) == 1  # hub offline


def test_scenes_are_majority_digits_from_disjoint_scans(tmp_path):
    a = [(np.asarray(img), y) for img, y in make_scenes(5, "train", seed=0)]
    b = [(np.asarray(img), y) for img, y in make_scenes(5, "train", seed=0)]
    assert all(np.array_equal(x, z) and y == w for (x, y), (z, w) in zip(a, b))  # reproducible
    assert a[0][0].shape == (64, 64, 3) and all(0 <= y < 10 for _, y in a)
    train, val = write_scene_shards(str(tmp_path), n_train=30, n_val=10, per_shard=16)
    assert train.endswith("train-{000000..000001}.tar") and val.endswith("val-000000.tar")
    assert (tmp_path / "classes.txt").read_text().split() == [str(d) for d in range(10)]
    before = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    write_scene_shards(str(tmp_path), n_train=30, n_val=10, per_shard=16)  # same settings: reused, not rewritten
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == before


def test_demo_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", out, "--train-scenes", "64", "--val-scenes", "32", "--teacher-epochs", "1",
            "--cache-epochs", "1", "--student-epochs", "2", "--batch-size", "16", "--workers", "0"]
    code, text = run_cli(*args)
    assert code == 0, text
    for row in ("no distillation", "DeiT hard distillation", "CSKD", "fit-teacher", "precompute", "total"):
        assert row in text
    results = json.loads((out / "results.json").read_text())
    assert list(results["runs"]) == ["no distillation", "DeiT hard distillation", "CSKD"]
    for r in results["runs"].values():
        assert len(r["top1_per_epoch"]) == 2 and r["best_top1"] == max(r["top1_per_epoch"])
    with Image.open(out / "accuracy.png") as img:
        assert img.format == "PNG" and img.size[0] > 100
    # the three runs saw the same views and the same initial weights; only the teacher's part differs
    runs = {name: torch.load(out / "runs" / name / "checkpoint.pth", weights_only=False) for name in
            ("no", "deit", "cskd")}
    assert "train_cskd" in runs["cskd"]["history"][0] and "train_cskd" not in runs["deit"]["history"][0]
    assert "train_distill" not in runs["no"]["history"][0]
    # a second run reuses every finished stage and reports the same accuracies
    code, text = run_cli(*args)
    assert code == 0, text
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == results["runs"] and again["seconds"]["fit-teacher"] < results["seconds"]["fit-teacher"]


def test_experiment_quick_runs_every_arm_and_resumes(tmp_path):
    """`cskd-cache experiment --quick`: every kind of arm at a tiny size; ckf and full train to the same weights;
    tables, JSON and plots are written; a second run reuses everything."""
    out = tmp_path / "exp"
    code, text = run_cli("experiment", "--quick", "--out", out)
    assert code == 0, text
    results = json.loads((out / "results.json").read_text())
    assert results["ckf_equals_full"] is True
    t = results["teacher_dense_vs_global"]
    assert t["positions"] == 96 * 4 and 0 <= t["agree"] <= 1 and 0 < t["top_prob_agree"] <= 1  # 2x2 grid
    assert 0 <= results["topk_target_mismatch"] <= 1
    assert all(r["seconds"] > 0 for r in results["runs"].values())
    s = results["summary"]
    assert set(s["main"]) == {"no distillation", "DeiT hard distillation", "CSKD"}
    assert s["main"]["CSKD"]["best"]["n"] == 2 and set(s["alpha"]) == {"linear", "local"}
    assert set(s["encoding"]) == {"ckf", "full", "topk"} and set(map(int, s["cached_epochs"]["CSKD"])) == {1, 2}
    for png in ("accuracy_per_epoch.png", "accuracy_vs_cached_epochs.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG"
    assert "best top-1 % (mean +- std)" in (out / "results.md").read_text()
    code, text = run_cli("experiment", "--quick", "--out", out)
    assert code == 0, text
    again = json.loads((out / "results.json").read_text())
    assert {k: v["best_top1"] for k, v in again["runs"].items()} == {k: v["best_top1"] for k, v in
                                                                     results["runs"].items()}
    # a reused run reports its own epochs' time, not the seconds it took to find it finished
    assert {k: v["seconds"] for k, v in again["runs"].items()} == {k: v["seconds"] for k, v in results["runs"].items()}
    assert "has trained all 2 epochs already" in text
