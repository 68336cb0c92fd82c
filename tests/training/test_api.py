"""Issue 12: the library API (the docs' loop runs as written), the timm task, evaluate, plot, TensorBoard,
--config and args.yaml, practitioners' flag names, fast failures without a network, the user's umask."""

import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import one_line, precompute_args, run_cli

from cskd_cache.cache.store import Cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDENT = "deit_tiny_distilled_patch16_224"


@pytest.fixture
def cache(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "2"))[0] == 0
    return out


def test_the_documented_loop_runs_as_written(tmp_path, image_folder, cache):
    text = open(os.path.join(ROOT, "docs", "api.md")).read()
    code = re.search(r"## A complete training loop.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) < 60
    env = dict(os.environ, CSKD_CACHE=str(cache), CSKD_DATA=str(image_folder), CSKD_STUDENT=STUDENT, CSKD_EPOCHS="2",
               CSKD_BATCH="8", CSKD_OUT=str(tmp_path / "student.pth"), OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "student.pth").exists()
    lines = [line for line in r.stdout.splitlines() if line[:1].isdigit()]
    assert len(lines) == 2 and "cskd" in lines[0] and "distill" in lines[0]


def test_cached_views_and_the_timm_task(tmp_path, image_folder, teacher_checkpoint, cache):
    """CSKDTask from the cache and from an online teacher gives the same loss on the same batch (the targets are
    exact either way); it takes soft or hard targets and validates with CSKD's prediction."""
    import timm
    from timm.task import TrainingTask

    from cskd_cache import CachedViews, CSKDTask

    views = CachedViews(str(cache), str(image_folder), batch_size=8)
    batch = next(iter(views.loader(workers=0)))
    assert batch["image"].shape == (8, 3, 64, 64) and set(batch["teacher"]) == set(views.encoding.arrays())
    teacher = views.teacher(batch, 0.5)
    assert teacher["ckf_targets"].shape == (8, 4) and teacher["teacher_global_argmax"].shape == (8,)
    torch.manual_seed(0)
    student = views.student(STUDENT)
    cached = CSKDTask(student, encoding=views.encoding, epochs=4)
    assert isinstance(cached, TrainingTask)
    net = timm.create_model("test_resnet", num_classes=4)
    net.load_state_dict(torch.load(teacher_checkpoint, weights_only=True))
    online = CSKDTask(student, teacher_model=net, epochs=4)
    x, y = batch["image"], views.targets(batch)
    for epoch in (0, 2):
        cached.set_epoch(epoch)
        online.set_epoch(epoch)
        a = cached(x, y, teacher=batch["teacher"], spill=batch.get("spill"))
        b = online(x, y)
        assert torch.equal(a["loss"], b["loss"]) and a["cskd_loss"] > 0 and a["distill_loss"] > 0
    hard = cached(x, batch["label"], teacher=batch["teacher"])
    assert torch.isfinite(hard["loss"]) and hard["output"].shape == (8, 4)
    assert torch.equal(cached.get_eval_model()(x), student.predict(x))
    with pytest.raises(Exception, match="cached teacher outputs"):
        cached(x, y)


def train_args(data, cache, out, *extra):
    return ["train", "--student", STUDENT, "--data", data, "--cache", cache, "--out", out, "--epochs", "2",
            "--batch-size", "8", "--workers", "0", "--warmup-epochs", "0", "--ema-decay", "0.5", *extra]


def test_evaluate_plot_tensorboard(tmp_path, image_folder, cache):
    out = tmp_path / "run"
    code, text = run_cli(*train_args(image_folder, cache, out, "--val-data", image_folder, "--tensorboard"))
    assert code == 0, text
    code, text = run_cli("evaluate", "--checkpoint", out / "checkpoint.pth", "--val-data", image_folder,
                         "--workers", "0", "--json")
    assert code == 0, text
    result = json.loads(text)
    last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    for w in ("model", "ema"):
        assert set(result[w]) == {"cls", "dist", "dense", "cskd", "images"} and result[w]["images"] == 24
    assert result["model"]["cskd"]["top1"] == pytest.approx(last["top1"])  # the same prediction train reports
    assert result["ema"]["cskd"]["top1"] == pytest.approx(last["ema_top1"])
    code, text = run_cli("evaluate", "--checkpoint", out / "checkpoint.pth", "--val-data", image_folder,
                         "--workers", "0")
    assert code == 0 and "patch tokens" in text and "| ema |" in text
    assert run_cli(*train_args(image_folder, cache, tmp_path / "run2", "--alpha-schedule", "cos"))[0] == 0
    code, text = run_cli("plot", out, tmp_path / "run2", "--out", tmp_path / "curves.png")
    assert code == 0 and (tmp_path / "curves.png").stat().st_size > 20_000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train_total")] == [0, 1]
    assert acc.Scalars("top1")[-1].value == pytest.approx(last["top1"])
    one_line(*run_cli("plot", tmp_path / "nothing"), "metrics.jsonl")


def test_config_file_and_args_yaml(tmp_path, image_folder, cache):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"lr": 0.002, "epochs": 1, "warmup-epochs": 0, "batch_size": 8, "reprob": 0.3}))
    one_line(*run_cli("train", "--config", cfg, "--data", image_folder, "--out", tmp_path / "x"), "reprob")
    cfg.write_text(yaml.safe_dump({"lr": 0.002, "epochs": 1, "warmup-epochs": 0, "batch_size": 8, "workers": 0,
                                   "student": STUDENT, "cache": str(cache)}))
    code, text = run_cli("train", "--config", cfg, "--data", image_folder, "--out", tmp_path / "a", "--lr", "0.003")
    assert code == 0, text
    args = yaml.safe_load((tmp_path / "a" / "args.yaml").read_text())
    assert args["lr"] == 0.003 and args["epochs"] == 1 and args["batch_size"] == 8  # the flag wins over the file
    code, text = run_cli("train", "--config", tmp_path / "a" / "args.yaml", "--out", tmp_path / "b")
    assert code == 0, text  # a run's args.yaml reproduces it
    assert yaml.safe_load((tmp_path / "b" / "args.yaml").read_text()) == dict(args, out=str(tmp_path / "b"))


def test_practitioners_flag_names_and_version(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "c.zarr"
    code, text = run_cli("precompute", "--data", image_folder, "--output", out, "--teacher", "test_resnet",
                         "--teacher-checkpoint", teacher_checkpoint, "--input-size", "64", "--aa", "rand-m5-mstd0.5",
                         "--reprob", "0.3", "--mixup-prob", "0.5", "--mixup-switch-prob", "0.25", "--smoothing",
                         "0.2", "--batch-size", "8", "--chunk-views", "4", "--shard-views", "8", "--workers", "0",
                         "--epochs", "1")
    assert code == 0, text
    r = Cache.open(str(out)).manifest["recipe"]
    assert (r["auto_augment"], r["re_prob"], r["mix_prob"], r["switch_prob"], r["label_smoothing"]) == (
        "rand-m5-mstd0.5", 0.3, 0.5, 0.25, 0.2)
    from cskd_cache import __version__

    code, text = run_cli("--version")
    assert code == 0 and text.strip() == f"cskd-cache {__version__}"
    code, text = run_cli("train", "--help")
    flat = " ".join(text.split())
    assert "deit_demo" in flat and "deit_ti" in flat


def test_no_network_fails_in_seconds(tmp_path, image_folder, cache):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: what a machine without network sees
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "cskd_cache", "train", "--student", STUDENT, "--data", str(image_folder),
                        "--cache", str(cache), "--out", str(tmp_path / "o"), "--teacher-source", "online",
                        "--workers", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.time() - t < 30, r.stderr[-2000:]
    assert "--teacher-checkpoint" in r.stderr and "teacher.pth" in r.stderr  # names the file the cache recorded
    assert len(r.stderr.strip().splitlines()) == 1


def test_files_follow_the_users_umask(tmp_path, image_folder):
    old = os.umask(0o022)
    try:
        out = tmp_path / "t.safetensors"
        code, text = run_cli("fit-teacher", "--data", image_folder, "--out", out, "--teacher", "test_resnet",
                             "--no-pretrained", "--epochs", "1", "--input-size", "64", "--workers", "0")
        assert code == 0, text
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_resume_refusals_say_what_was_used(tmp_path, image_folder, cache):
    out = tmp_path / "r"
    assert run_cli(*train_args(image_folder, cache, out, "--stop-after", "1"))[0] == 0
    one_line(*run_cli(*train_args(image_folder, cache, out, "--resume", "--lr", "0.1")), "--lr its default",
             "not 0.1")


def test_one_epoch_reads_its_plan_once(image_folder, cache, monkeypatch):
    """The sampler asks for the plan once per pair; at ImageNet size a read plus the check's regeneration costs
    0.6 s, so it must happen once per epoch, not once per pair."""
    from cskd_cache import CachedViews
    from cskd_cache.cache import store

    reads = []
    real = store.Cache.stored_plan
    monkeypatch.setattr(store.Cache, "stored_plan", lambda self, e: reads.append(e) or real(self, e))
    views = CachedViews(str(cache), str(image_folder), batch_size=4)
    for epoch in (0, 1):
        views.set_epoch(epoch)
        batches = list(views.loader(workers=0))
        assert len(batches) == len(views) >= 3
    assert reads == [0, 1]


def test_the_timm_task_keeps_its_teacher_right(tmp_path, image_folder, teacher_checkpoint, cache):
    """timm's loop calls task.train() every epoch: the online teacher must stay in eval mode (BatchNorm on its
    running statistics, never updated). An online teacher takes the cache's precision and must be the cache's
    teacher; a teacher with another class count is refused, never given a random head."""
    import timm
    from safetensors.torch import save_file

    from cskd_cache import CachedViews, CSKDTask
    from cskd_cache.teacher.model import DenseTeacher

    views = CachedViews(str(cache), str(image_folder), batch_size=8)
    batch = next(iter(views.loader(workers=0)))
    x, y = batch["image"], views.targets(batch)
    net = timm.create_model("test_resnet", num_classes=4)
    net.load_state_dict(torch.load(teacher_checkpoint, weights_only=True))
    want = [t.clone() for t in DenseTeacher(net.eval(), views.recipe.mean, views.recipe.std)(x)]
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    student = views.student(STUDENT)
    task = CSKDTask(student, teacher_model=net, cache=views, epochs=4)
    cached = CSKDTask(student, cache=views, epochs=4)
    for epoch in range(2):  # as timm's train loop does
        task.train()
        cached.train()
        task.set_epoch(epoch)
        cached.set_epoch(epoch)
        assert not task.teacher.training and not task.teacher.model.training and task.trainable_module.training
        got = task.teacher(x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        a = task(x, y)
        b = cached(x, y, teacher=batch["teacher"], spill=batch.get("spill"))
        assert torch.equal(a["loss"], b["loss"])  # online targets == cached targets, epoch after epoch
    assert all(torch.equal(v, stats[k]) for k, v in net.state_dict().items() if k in stats)
    # precision: the cache's (here recorded as bf16) unless asked otherwise
    c = Cache.open(str(cache))
    c.manifest["teacher"]["precision"] = "bf16"
    assert CSKDTask(views.student(STUDENT), teacher_model=net, cache=c).teacher.precision == "bf16"
    assert CSKDTask(views.student(STUDENT), teacher_model=net, cache=c, teacher_precision="fp32").teacher.precision \
        == "fp32"
    assert CSKDTask(views.student(STUDENT), teacher_model=net).teacher.precision == "fp32"  # no cache, on a CPU
    # another teacher than the cache's is refused
    other = timm.create_model("test_resnet", num_classes=4)
    with pytest.raises(Exception, match="not the cache's teacher"):
        CSKDTask(views.student(STUDENT), teacher_model=other, cache=views)
    # 1000-class weights for a 4-class student: by module, and by name with a weights file (timm's overlay)
    big = timm.create_model("test_resnet")
    with pytest.raises(Exception, match="1000 classes"):
        CSKDTask(views.student(STUDENT), teacher_model=big)
    path = tmp_path / "big.safetensors"
    save_file({k: v.contiguous() for k, v in big.state_dict().items()}, str(path))
    with pytest.raises(Exception, match="1000 classes"):
        CSKDTask(views.student(STUDENT), teacher_model="test_resnet",
                 teacher_pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(Exception, match="1000 classes"):
        CSKDTask(views.student(STUDENT), teacher_model="test_resnet", teacher_pretrained_path=str(path))
    # the fine-tuned 4-class weights by path: loaded weights-only, the cache's teacher, same loss as cached
    task = CSKDTask(views.student(STUDENT), teacher_model="test_resnet", teacher_pretrained_path=str(teacher_checkpoint),
                    cache=views)
    assert task.teacher.model.num_classes == 4
