"""`cskd-cache demo`: the whole pipeline on an embedded dataset, nothing to download.

digit scenes -> WebDataset shards -> fit-teacher -> precompute -> train the same small ViT three ways on the same
cached views (no distillation, DeiT hard distillation, CSKD) -> a table, results.json and accuracy.png. Every stage
is the library call the CLI command makes, so the demo exercises the real path.

The settings are the folder's identity (OUT/demo.json): a rerun with the same settings reuses every finished stage
(scenes, teacher, cache, each run), printing "reused: STAGE", and continues an interrupted one; other settings in
the same folder are refused, naming the demo's own flags, before anything is touched. OUT/demo.json also keeps each
stage's wall time, so a rerun's table reports what the stages took when they ran.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

from ..cache.store import Cache
from ..data.recipe import Recipe
from ..errors import CacheError
from ..teacher.fit import FitTeacherConfig, fit_settings, fit_teacher
from ..teacher.precompute import PrecomputeConfig, precompute
from ..training.train import TrainConfig, train
from .machine import machine
from .scenes import scene_specs, write_scene_shards

# name -> (teacher source, CSKD weight): the three rows of the paper's comparison, on one code path.
MODES = {"no distillation": ("none", 0.0), "DeiT hard distillation": ("cache", 0.0), "CSKD": ("cache", 1.0)}


@dataclass
class DemoConfig:
    out: str = "cskd-demo"
    train_scenes: int = 4000
    val_scenes: int = 500
    size: int = 64  # scene and view size: 2x2 teacher grid (stride 32), 4x4 student patches (16 px)
    teacher: str = "test_resnet"  # timm's small ResNet (0.4M parameters): trains in about a minute on 2 cores
    teacher_epochs: int = 5
    cache_epochs: int = 2  # augmented epochs cached; training cycles them
    student: str = "deit_demo"
    student_epochs: int = 10
    batch_size: int = 32  # small batches: more steps in the few minutes a CPU has
    lr: float = 1e-3
    workers: int = 2
    device: str | None = None
    seed: int = 0


def demo_recipe(size: int) -> Recipe:
    """DeiT's recipe at the scene size, minus what would destroy a digit or cost more than it teaches in a few
    CPU minutes: no flips, crops keep >= 70% of the scene, no RandAugment, colour jitter or erasing; half the
    pairs are mixed (mixup or cutmix, as DeiT), so the teacher labels mixed views as it does at scale."""
    return Recipe(input_size=size, scale=(0.7, 1.0), hflip=0.0, auto_augment=None, color_jitter=0.0, re_prob=0.0,
                  mix_prob=0.5)


def require_matplotlib(what: str) -> None:
    try:
        import matplotlib  # noqa: F401 - fail before the work, not after it
    except ImportError:
        raise CacheError(f"the {what} plots with matplotlib: pip install 'cskd-cache[demo]'") from None


def scene_teacher(out: str, train_spec: str, val_spec: str, teacher: str, epochs: int, size: int, workers: int,
                  device: str | None, seed: int) -> FitTeacherConfig:
    """The scenes' teacher fit: weights at OUT/teacher.safetensors, its report beside them (.json)."""
    return FitTeacherConfig(data=train_spec, out=os.path.join(out, "teacher.safetensors"), teacher=teacher,
                            pretrained=False, val_data=val_spec, epochs=epochs, batch_size=64, lr=2e-3,
                            warmup_epochs=0, input_size=size, scale=(0.7, 1.0), hflip=0.0, workers=workers,
                            device=device, seed=seed)


# settings that are not part of a stage's identity: where it runs. (--workers does move the teacher's augmentation
# draws, so numbers differ by a point or so, but a stage finished with other workers is as valid: it is reused.)
_FREE = ("out", "workers", "device")


def settings(cfg: DemoConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in _FREE}


# DemoConfig fields that `cskd-cache demo` has no flag for (set from Python only): named without "--"
_NO_FLAG = ("size", "teacher", "student", "lr")


def _named(key: str, value) -> str:
    return f"{key} {value}" if key in _NO_FLAG else f"--{key.replace('_', '-')} {value}"


def claim_folder(cfg: DemoConfig) -> dict:
    """OUT is this demo's, with these settings: create it, or check it, before any stage runs. Returns its
    demo.json (settings, and the seconds of the stages finished so far)."""
    path = os.path.join(cfg.out, "demo.json")
    now = settings(cfg)
    if os.path.exists(path):
        try:
            with open(path) as f:
                state = json.load(f)
            old = state["settings"]
            if not isinstance(old, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise CacheError(f"{path} is not a demo's settings file; pass another --out, or delete {cfg.out}") from None
        diff = [f"{_named(k, old.get(k))}, not {now[k]}" for k in now if old.get(k) != now[k]]
        if diff:
            raise CacheError(f"--out {cfg.out} holds a demo made with other settings ({'; '.join(diff)}); pass "
                             f"another --out (e.g. --out {cfg.out.rstrip('/')}-small) or delete {cfg.out}")
        state.setdefault("seconds", {})
        return state
    if os.path.isdir(cfg.out) and os.listdir(cfg.out):
        raise CacheError(f"--out {cfg.out} is not empty and holds no demo.json (made by an older demo, or not a "
                         f"demo); pass another --out, or delete {cfg.out}")
    state = {"settings": now, "seconds": {}}
    _save_state(cfg.out, state)
    return state


def _save_state(out: str, state: dict) -> None:
    path = os.path.join(out, "demo.json")
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=2)
    os.replace(path + ".tmp", path)


class _Stages:
    """Runs each stage unless it finished before with these settings (demo.json vouches for that), and keeps
    every stage's wall time in demo.json as it finishes: a rerun reports what a reused stage took when it ran,
    not the moment its reuse took."""

    def __init__(self, out: str, state: dict):
        self.out, self.state, self.reused = out, state, []
        self.seconds: dict[str, float | None] = {}
        try:  # a folder finished by a demo that did not keep times in demo.json: its last results.json has them
            with open(os.path.join(out, "results.json")) as f:
                self.before = json.load(f).get("seconds", {})
        except (OSError, ValueError, AttributeError):
            self.before = {}

    def run(self, name: str, done, compute):
        """`done()` is the stage's result if it is there already, else None; `compute()` makes it."""
        result = done()
        if result is not None:
            print(f"reused: {name} (finished before with these settings, in {self.out})", flush=True)
            self.reused.append(name)
            self.seconds[name] = self.state["seconds"].get(name, self.before.get(name))
            return result
        started = time.time()
        result = compute()
        self.seconds[name] = self.state["seconds"][name] = time.time() - started
        _save_state(self.out, self.state)
        return result


def run_demo(cfg: DemoConfig) -> dict:
    require_matplotlib("demo")
    stages = _Stages(cfg.out, claim_folder(cfg))
    data = os.path.join(cfg.out, "data")
    scene_args = (data, cfg.train_scenes, cfg.val_scenes, cfg.seed, cfg.size)
    train_spec, val_spec = stages.run("make scenes (WebDataset shards)", lambda: scene_specs(*scene_args),
                                      lambda: write_scene_shards(*scene_args))

    fit = scene_teacher(cfg.out, train_spec, val_spec, cfg.teacher, cfg.teacher_epochs, cfg.size, cfg.workers,
                        cfg.device, cfg.seed)
    report = stages.run("fit-teacher", lambda: reuse_teacher(fit, moved=True), lambda: fit_teacher(fit))
    teacher_top1 = report["history"][-1].get("val_top1") if report["history"] else None

    cache_path = os.path.join(cfg.out, "teacher-cache.zarr")
    pre = PrecomputeConfig(data=train_spec, out=cache_path, teacher=cfg.teacher, teacher_checkpoint=fit.out,
                           epochs=cfg.cache_epochs, recipe=demo_recipe(cfg.size), batch_size=2 * cfg.batch_size,
                           repeats=1,  # every scene in every cached epoch: a small dataset, a short run
                           workers=cfg.workers, chunk_views=256, shard_views=1024, seed=cfg.seed,
                           device=cfg.device)
    # demo.json vouches that a complete cache here was made with these settings: reuse it without a write
    stages.run("precompute", lambda: True if _complete(cache_path) else None, lambda: precompute(pre))
    cache = Cache.open(cache_path)

    runs = {}
    for label, (source, cskd_weight) in MODES.items():
        run_dir = os.path.join(cfg.out, "runs", label.split()[0].lower())
        checkpoint = os.path.join(run_dir, "checkpoint.pth")
        # resume only a run that is there: train's note about a missing one would name its own flags
        tc = TrainConfig(student=cfg.student, data=train_spec, out=run_dir, cache=cache_path, val_data=val_spec,
                         epochs=cfg.student_epochs, teacher_source=source, cskd_weight=cskd_weight,
                         batch_size=cfg.batch_size, lr=cfg.lr, warmup_epochs=0, min_lr=1e-5, ema_decay=0.0,
                         workers=cfg.workers, device=cfg.device, seed=cfg.seed, resume=os.path.exists(checkpoint))
        history = stages.run(f"train: {label}", lambda c=checkpoint: _finished_run(c, cfg.student_epochs),
                             lambda tc=tc: train(tc))
        runs[label] = {"top1": history[-1]["top1"], "best_top1": max(r["top1"] for r in history),
                       "top1_per_epoch": [r["top1"] for r in history]}

    known = [s for s in stages.seconds.values() if s is not None]
    results = {"config": asdict(cfg), "teacher_top1": teacher_top1, "runs": runs, "seconds": stages.seconds,
               "total_seconds": sum(known), "reused": stages.reused,
               "cache_bytes_per_view": sum(a["stored"] for a in cache.bytes_per_view().values()),
               "views_cached": cache.num_views, "machine": machine()}
    with open(os.path.join(cfg.out, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=2)
    os.replace(os.path.join(cfg.out, "results.json.tmp"), os.path.join(cfg.out, "results.json"))
    plot_accuracy(results, os.path.join(cfg.out, "accuracy.png"))
    return results


def _finished_run(checkpoint: str, epochs: int) -> list[dict] | None:
    """A student run's per-epoch history if its checkpoint holds all `epochs` epochs (else train resumes it)."""
    import torch

    try:
        history = torch.load(checkpoint, map_location="cpu", weights_only=True)["history"]
    except (OSError, RuntimeError, KeyError, TypeError, EOFError):
        return None
    return history if len(history) == epochs else None


def _complete(path: str) -> bool:
    try:
        return Cache.open(path).complete
    except (CacheError, OSError):
        return False


def reuse_teacher(fit: FitTeacherConfig, moved: bool = False) -> dict | None:
    """The report of a teacher fitted before with exactly these settings, if its weights are there. `moved`:
    the paths may differ (a demo folder that was moved or renamed; its demo.json vouches for its scenes)."""
    try:
        with open(fit.out + ".json") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    old, now = report.get("settings"), fit_settings(fit)
    if moved and isinstance(old, dict):
        old, now = ({k: v for k, v in d.items() if k not in ("data", "val_data", "out")} for d in (old, now))
    return report if old == now and os.path.exists(fit.out) else None


def format_table(results: dict) -> str:
    """Markdown: the three students' accuracies, then every stage's wall time."""
    lines = ["| student (same views, same steps) | final top-1 % | best top-1 % |", "|---|---|---|"]
    for label, r in results["runs"].items():
        lines.append(f"| {label} | {r['top1']:.1f} | {r['best_top1']:.1f} |")
    if results.get("teacher_top1") is not None:
        lines.append(f"| (teacher, {results['config']['teacher']}) | {results['teacher_top1']:.1f} | |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    # a stage reused from a folder that kept no time for it (made by an older demo) has none to show
    lines += [f"| {stage} | {'n/a' if s is None else f'{s:.1f}'} |" for stage, s in results["seconds"].items()]
    lines.append(f"| total | {results['total_seconds']:.1f} |")
    return "\n".join(lines)


def plot_accuracy(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, r in results["runs"].items():
        ax.plot(range(1, len(r["top1_per_epoch"]) + 1), r["top1_per_epoch"], marker="o", label=label)
    if results.get("teacher_top1") is not None:
        ax.axhline(results["teacher_top1"], color="gray", linestyle="--", label="teacher")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("cskd-cache demo: ViT student on digit scenes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
