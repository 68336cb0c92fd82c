"""`cskd-cache fit-teacher` and `cskd-cache demo`, from the command line, at a tiny size."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES, TEACHER, precompute_args, run_cli
from PIL import Image

from cskd_cache.demo.readme import main as readme_main
from cskd_cache.demo.scenes import make_scenes, write_scene_shards



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


def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
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
    runs = {name: torch.load(out / "runs" / name / "checkpoint.pth", weights_only=True) for name in
            ("no", "deit", "cskd")}
    assert "train_cskd" in runs["cskd"]["history"][0] and "train_cskd" not in runs["deit"]["history"][0]
    assert "train_distill" not in runs["no"]["history"][0]
    # a second run reuses every finished stage (scenes, teacher, cache, each run), says so, touches none of them,
    # and reports the same accuracies and the seconds the stages took when they ran
    stage_files = [out / "data" / "train-000000.tar", out / "teacher.safetensors"] + \
        [out / "runs" / name / "checkpoint.pth" for name in ("no", "deit", "cskd")] + \
        [p for p in (out / "teacher-cache.zarr").rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in stage_files}
    code, printed = run_cli(*args)
    assert code == 0, printed
    assert {p: p.stat().st_mtime_ns for p in stage_files} == before
    stages = list(results["seconds"])
    assert [line for line in printed.splitlines() if line.startswith("reused: ")] == \
        [f"reused: {stage} (finished before with these settings, in {out})" for stage in stages]
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == results["runs"] and again["seconds"] == results["seconds"] and again["reused"] == stages
    assert results["reused"] == []
    # a folder moved elsewhere keeps its identity (demo.json), its teacher and every other stage included
    shutil.copytree(out, tmp_path / "moved")
    code, text = run_cli(*[tmp_path / "moved" if a == out else a for a in args])
    assert code == 0 and text.count("reused: ") == len(stages), text
    # the settings are the folder's identity: other settings there are refused before anything is touched, in a
    # message that names only flags `demo` has
    code, text = run_cli(*[a if a != "64" else "48" for a in args])  # --train-scenes 48
    assert code == 2 and len(text.strip().splitlines()) == 1, text
    assert "--train-scenes 64, not 48" in text and f"--out {out}-small" in text
    assert set(re.findall(r"--[a-z-]+", text)) <= demo_flags()
    assert {p: p.stat().st_mtime_ns for p in stage_files} == before
    # a setting with no flag (DemoConfig.size, set from Python) is named as a setting, not as a flag
    state = json.loads((out / "demo.json").read_text())
    state["settings"]["size"] = 32
    (out / "demo.json").write_text(json.dumps(state))
    code, text = run_cli(*args)
    assert code == 2 and "(size 32, not 64)" in text and set(re.findall(r"--[a-z-]+", text)) <= demo_flags(), text
    # the README's tables come from a command: the table the demo printed, its settings and the machine
    readme = subprocess.run([sys.executable, "-m", "cskd_cache.demo.readme", str(out / "results.json")],
                            capture_output=True, text=True, check=True).stdout
    assert readme.startswith("| student (same views, same steps) |") and results["machine"]["cpu"] in readme
    assert readme.split("\n\n`cskd-cache demo")[0] in printed  # what the demo printed, table for table
    key = "--train-scenes 64 --val-scenes 32 --teacher-epochs 1 --cache-epochs 1 --student-epochs 2 --batch-size 16"
    assert f"`cskd-cache demo --out demo {key}` on " in readme
    doc = tmp_path / "README.md"
    doc.write_text(f"# x\n<!-- demo-results {key} -->\nold table\n<!-- /demo-results -->\nafter\n")
    assert readme_main([str(out / "results.json"), str(doc)]) == 0  # in-process: the subprocess above ran the same
    assert doc.read_text() == f"# x\n<!-- demo-results {key} -->\n{readme.strip()}\n<!-- /demo-results -->\nafter\n"
    doc.write_text("<!-- demo-results -->\nthe default demo's table\n<!-- /demo-results -->\n")  # other settings
    capsys.readouterr()
    assert readme_main([str(out / "results.json"), str(doc)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {doc}: no '<!-- demo-results {key} -->'") and len(err.strip().splitlines()) == 1
    assert "default demo's table" in doc.read_text()


def demo_flags() -> set:
    from typer.main import get_command

    from cskd_cache_cli.app import app

    command = get_command(app).commands["demo"]
    return {o for p in command.params for o in p.opts if o.startswith("--")}


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "other.txt").write_text("someone's")
    code, text = run_cli("demo", "--out", tmp_path, "--train-scenes", "8")
    assert code == 2 and "holds no demo.json" in text and len(text.strip().splitlines()) == 1
    assert set(re.findall(r"--[a-z-]+", text)) <= demo_flags() and (tmp_path / "other.txt").exists()
