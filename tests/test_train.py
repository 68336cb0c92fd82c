"""`cskd-cache train`: cache and online teachers give the same training, plain DeiT runs, misuse is refused."""

import json

import numpy as np
import pytest
import torch
from conftest import precompute_args
from typer.testing import CliRunner

from cli.app import app

runner = CliRunner()
STUDENT = "deit_tiny_distilled_patch16_224"  # at 64 px: a 4x4 patch grid, pooled to the teacher's 2x2


def run_cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


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
    assert code == 2 and "another dataset" in text and "--force" in text
    code, text = run_cli(*train_args(other, tmp_path / "r", "--teacher-source", "cache"))
    assert code == 2 and "needs --cache" in text


def test_replay_drift_stops_training(tmp_path, image_folder, cache):
    from PIL import Image

    for p in (image_folder / "class_0").glob("*.png"):  # same keys, other pixels
        Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(p)
    code, text = run_cli(*train_args(image_folder, tmp_path / "d", "--cache", cache))
    assert code == 2 and "replay drift" in text
