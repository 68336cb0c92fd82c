"""`cskd-cache experiment`: does training from the cache give CSKD's gains, and how many cached epochs are enough?

On the demo's digit scenes (real handwritten digits composed into 64x64 scenes whose class needs every cell read),
one fitted teacher and one cache of T augmented epochs (T = the training epochs: fresh views every epoch, the
official condition), every arm trains the same small ViT on the same views for the same steps:

- main: no distillation, DeiT hard distillation, CSKD; several seeds (initial weights, drop path, cycle order);
- the paper's ablation: CSKD with constant alpha = 1 (dense targets only) and the linear, x2, cos schedules;
- cached epochs: CSKD and DeiT from the first E epochs of the cache (a partial copy, `pull --epochs`), E < T,
  cycled over the T training epochs (reuse factor T / E);
- encodings: the same plan cached as `full` (exact logits) and `topk` (lossy); ckf and full must train identically.

Every run is resumable and a finished one is reused, so the command can be stopped and run again.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from .demo import demo_recipe, require_matplotlib, scene_teacher
from .errors import CacheError
from .precompute import PrecomputeConfig, precompute
from .scenes import write_scene_shards
from .share import pull
from .train import TrainConfig, train


@dataclass
class ExperimentConfig:
    out: str = "cskd-experiment"
    train_scenes: int = 4000
    val_scenes: int = 500
    size: int = 64
    teacher: str = "test_resnet"
    teacher_epochs: int = 5
    student: str = "deit_demo"
    epochs: int = 10  # T
    cached_epochs: tuple[int, ...] = (1, 2, 5)  # E < T; E = T is the main arms' cache
    seeds: tuple[int, ...] = (0, 1, 2)
    schedules: tuple[str, ...] = ("local", "x2", "cos")  # besides linear, which the main CSKD arm uses
    topk: int = 2  # the lossy topk arm: classes kept per position (the scenes have 10 classes)
    batch_size: int = 32
    lr: float = 1e-3
    workers: int = 0  # 64 px scenes on 2 cores: loading in the main process measured 17% faster than 2 workers
    device: str | None = None
    arms: list = field(default_factory=list)

    @classmethod
    def quick(cls, out: str, **kw) -> "ExperimentConfig":
        """CI's smoke size: every kind of arm, a few seconds each."""
        return cls(out=out, train_scenes=96, val_scenes=32, teacher_epochs=1, epochs=2, cached_epochs=(1,),
                   seeds=(0, 1), schedules=("local",), batch_size=16, workers=0, **kw)


def _arms(cfg: ExperimentConfig) -> list[dict]:
    """name, group, cache, and the TrainConfig fields that differ from the base."""
    arms = []
    for s in cfg.seeds:
        arms += [dict(name=f"no distillation, seed {s}", group="main", arm="no distillation", cache="ckf", seed=s,
                      teacher_source="none"),
                 dict(name=f"DeiT hard distillation, seed {s}", group="main", arm="DeiT hard distillation",
                      cache="ckf", seed=s, cskd_weight=0.0),
                 dict(name=f"CSKD, seed {s}", group="main", arm="CSKD", cache="ckf", seed=s)]
    # The ablations run every seed too: between seeds, one arm's best top-1 spreads by a few points, as much as the
    # gaps being measured. DeiT's cached-epochs arms run one seed: its spread between seeds (hard labels of a weak
    # teacher on a few thousand images) is wider than any effect of E, so more seeds would cost much and say little.
    arms += [dict(name=f"CSKD, alpha {sch}, seed {s}", group="alpha", arm=sch, cache="ckf", seed=s,
                  alpha_schedule=sch) for sch in cfg.schedules for s in cfg.seeds]
    for e in cfg.cached_epochs:
        arms += [dict(name=f"CSKD, {e} cached epochs, seed {s}", group="cached", arm="CSKD", cache=f"ckf-{e}",
                      seed=s, E=e) for s in cfg.seeds]
        arms += [dict(name=f"DeiT, {e} cached epochs, seed {cfg.seeds[0]}", group="cached",
                      arm="DeiT hard distillation", cache=f"ckf-{e}", seed=cfg.seeds[0], cskd_weight=0.0, E=e)]
    s0 = cfg.seeds[0]
    arms += [dict(name="CSKD, full cache", group="encoding", arm="full", cache="full", seed=s0),
             dict(name=f"CSKD, topk cache (k={cfg.topk})", group="encoding", arm="topk", cache="topk", seed=s0)]
    return arms


def _prepare(cfg: ExperimentConfig, times: dict) -> tuple[str, str, dict, float | None]:
    t = time.time()
    train_spec, val_spec = write_scene_shards(os.path.join(cfg.out, "data"), cfg.train_scenes, cfg.val_scenes, 0,
                                              cfg.size)
    ckpt, report = scene_teacher(cfg.out, train_spec, val_spec, cfg.teacher, cfg.teacher_epochs, cfg.size,
                                 cfg.workers, cfg.device, seed=0)
    times["data and teacher"] = time.time() - t
    t = time.time()
    caches = {}
    for enc in ("ckf", "full", "topk"):
        path = os.path.join(cfg.out, f"cache-{enc}.zarr")
        precompute(PrecomputeConfig(data=train_spec, out=path, teacher=cfg.teacher, teacher_checkpoint=ckpt,
                                    epochs=cfg.epochs, encoding=enc, topk=cfg.topk, global_topk=cfg.topk,
                                    recipe=demo_recipe(cfg.size), repeats=1, batch_size=2 * cfg.batch_size,
                                    workers=cfg.workers, chunk_views=cfg.batch_size, shard_views=8 * cfg.batch_size,
                                    seed=0, device=cfg.device))
        caches[enc] = path
    for e in cfg.cached_epochs:  # the first E epochs, as a lab that pulled part of the cache would have them
        path = os.path.join(cfg.out, f"cache-ckf-{e}.zarr")
        if not os.path.exists(os.path.join(path, "zarr.json")):
            pull(caches["ckf"], path, f"0-{e - 1}", show_progress=False)
        caches[f"ckf-{e}"] = path
    times["precompute and partial copies"] = time.time() - t
    teacher_top1 = report["history"][-1].get("val_top1") if report["history"] else None
    return train_spec, val_spec, caches, teacher_top1


def run_experiment(cfg: ExperimentConfig) -> dict:
    require_matplotlib("experiment")
    os.makedirs(cfg.out, exist_ok=True)
    times: dict[str, float] = {}
    start = time.time()
    train_spec, val_spec, caches, teacher_top1 = _prepare(cfg, times)
    runs = {}
    for arm in _arms(cfg):
        t = time.time()
        knobs = {k: v for k, v in arm.items() if k in TrainConfig.__dataclass_fields__ and k != "cache"}
        folder = os.path.join(cfg.out, "runs", arm["name"].replace(", ", "-").replace(" ", "_").replace("=", ""))
        tc = TrainConfig(student=cfg.student, data=train_spec, out=folder, cache=caches[arm["cache"]],
                         val_data=val_spec, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, warmup_epochs=0,
                         min_lr=1e-5, ema_decay=0.0, workers=cfg.workers, device=cfg.device, resume=True, **knobs)
        history = train(tc)
        top1 = [r["top1"] for r in history]
        # a reused run's time is its epochs' own (metrics.jsonl), not this invocation's few seconds
        seconds = sum(r["seconds"] for r in history) if all("seconds" in r for r in history) else time.time() - t
        runs[arm["name"]] = {**{k: v for k, v in arm.items() if k != "name"}, "top1_per_epoch": top1,
                             "final_top1": top1[-1], "best_top1": max(top1), "seconds": seconds}
    times["trainings"] = sum(r["seconds"] for r in runs.values())
    results = {"config": asdict(cfg), "teacher_top1": teacher_top1, "runs": runs, "seconds": times,
               "teacher_dense_vs_global": _cached_dense_vs_global(caches["full"], train_spec),
               "topk_target_mismatch": _topk_target_mismatch(caches["ckf"], caches["topk"], train_spec, cfg.epochs),
               "total_seconds": time.time() - start, "summary": summarize(runs, cfg),
               "ckf_equals_full": _same_weights(cfg, "CSKD, seed {}".format(cfg.seeds[0]), "CSKD, full cache")}
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(format_tables(results) + "\n")
    plot(results, cfg.out)
    return results


def dense_vs_global(dense: torch.Tensor, glob: torch.Tensor) -> dict:
    """How the teacher's dense labels (alpha = 1) relate to its global label (alpha = 0), from logits dense [N, P, K]
    and global [N, K]: the share of positions whose argmax agrees with the view's global argmax, and the mean top
    softmax probability of positions that agree and of those that differ. Confident disagreeing positions are
    spatial knowledge that CKF's late global phase overwrites; unconfident ones are the noise it is meant to fix."""
    agree = dense.argmax(-1) == glob.argmax(-1)[:, None]
    top = dense.float().softmax(-1).amax(-1)
    mean = lambda t: float(t.mean()) if t.numel() else None  # noqa: E731 - None: no such position
    return {"positions": int(agree.numel()), "agree": mean(agree.float()), "top_prob_agree": mean(top[agree]),
            "top_prob_differ": mean(top[~agree]), "global_top_prob": mean(glob.float().softmax(-1).amax(-1))}


def _views(cache: str, data: str):
    """Epoch 0 of a cache as CachedViews, in batches of up to 100 views that cover the whole epoch."""
    from .api import CachedViews
    from .store import Cache

    n = Cache.open(cache).views_per_epoch
    return CachedViews(cache, data, batch_size=next(b for b in range(min(100, n), 1, -1) if n % b == 0 and b % 2 == 0))


def _cached_dense_vs_global(cache: str, data: str) -> dict:
    """dense_vs_global over epoch 0 of a `full` cache (exact logits), every view replayed as training sees it."""
    views = _views(cache, data)
    dense, glob = [], []
    for batch in views.loader(workers=0):
        t = views.teacher(batch, 1.0, needs=("ckf_logits", "teacher_global"))
        dense.append(t["ckf_logits"])
        glob.append(t["teacher_global"])
    return dense_vs_global(torch.cat(dense), torch.cat(glob))


def _topk_target_mismatch(exact: str, topk: str, data: str, epochs: int) -> float:
    """The share of CKF targets (positions x views of epoch 0, at every alpha the training used) on which a topk
    cache disagrees with the exact ckf cache: the seed-free measure of what topk changes."""
    from .losses import alpha_at

    a, b = _views(exact, data), _views(topk, data)
    differ = total = 0
    for x, y in zip(a.loader(workers=0), b.loader(workers=0)):
        if not torch.equal(x["view"], y["view"]):
            raise CacheError(f"{exact} and {topk} hold different plans; make both with the same flags")
        for e in range(epochs):
            alpha = alpha_at(e, 0, 1, epochs, "linear")
            t, u = a.teacher(x, alpha)["ckf_targets"], b.teacher(y, alpha)["ckf_targets"]
            differ += int((t != u).sum())
            total += t.numel()
    return differ / total


def _same_weights(cfg: ExperimentConfig, a: str, b: str) -> bool:
    """ckf and full caches give the same CKF targets, so the two runs must end with the same weights, bit for bit."""
    name = lambda arm: arm.replace(", ", "-").replace(" ", "_").replace("=", "")
    wa = torch.load(os.path.join(cfg.out, "runs", name(a), "checkpoint.pth"), weights_only=True)["model"]
    wb = torch.load(os.path.join(cfg.out, "runs", name(b), "checkpoint.pth"), weights_only=True)["model"]
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: dict, cfg: ExperimentConfig) -> dict:
    main = {}
    for arm in ("no distillation", "DeiT hard distillation", "CSKD"):
        rs = [r for r in runs.values() if r["group"] == "main" and r["arm"] == arm]
        main[arm] = {"best": _stats([r["best_top1"] for r in rs]), "final": _stats([r["final_top1"] for r in rs])}
    s0 = cfg.seeds[0]
    alpha = {"linear": main["CSKD"]["best"]}  # the main CSKD arm uses the linear schedule
    for sch in cfg.schedules:
        alpha[sch] = _stats([r["best_top1"] for r in runs.values() if r["group"] == "alpha" and r["arm"] == sch])
    cached = {}
    for arm in ("CSKD", "DeiT hard distillation"):  # E = T is the main arm's runs with the same seeds
        rs = [r for r in runs.values() if r["group"] == "cached" and r["arm"] == arm]
        seeds = sorted({r["seed"] for r in rs})
        cached[arm] = {e: _stats([r["best_top1"] for r in rs if r["E"] == e]) for e in cfg.cached_epochs}
        cached[arm][cfg.epochs] = _stats([runs[f"{arm}, seed {s}"]["best_top1"] for s in seeds])
    enc = {"ckf": runs[f"CSKD, seed {s0}"]["best_top1"],
           **{r["arm"]: r["best_top1"] for r in runs.values() if r["group"] == "encoding"}}
    return {"main": main, "alpha": alpha, "cached_epochs": cached, "encoding": enc}


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def format_tables(results: dict) -> str:
    s, cfg = results["summary"], results["config"]
    seeds = len(cfg["seeds"])
    out = [f"| student (same views, same steps; {seeds} seeds) | best top-1 % (mean +- std) | final top-1 % "
           "(mean +- std) |", "|---|---|---|"]
    for arm, r in s["main"].items():
        out.append(f"| {arm} | {r['best']['mean']:.1f} +- {r['best']['std']:.1f} | "
                   f"{r['final']['mean']:.1f} +- {r['final']['std']:.1f} |")
    if results.get("teacher_top1") is not None:
        out.append(f"| (teacher, {cfg['teacher']}) | {results['teacher_top1']:.1f} | |")
    out += ["", f"| CSKD alpha schedule ({seeds} seeds) | best top-1 % (mean +- std) | min - max |", "|---|---|---|"]
    out += [f"| {k}{' (constant alpha = 1: dense targets only)' if k == 'local' else ''} | {v['mean']:.1f} +- "
            f"{v['std']:.1f} | {v['min']:.1f} - {v['max']:.1f} |" for k, v in s["alpha"].items()]
    c, d = s["cached_epochs"]["CSKD"], s["cached_epochs"]["DeiT hard distillation"]
    any_e = next(iter(c))
    out += ["", f"| cached epochs E (training: {cfg['epochs']} epochs; each view used {cfg['epochs']} / E times) | "
            f"CSKD best top-1 % ({c[any_e]['n']} seeds, mean +- std) | DeiT best top-1 % ({d[any_e]['n']} seed) |",
            "|---|---|---|"]
    for e in sorted(c, key=int):
        out.append(f"| {e}{' (fresh views every epoch)' if int(e) == cfg['epochs'] else ''} | {c[e]['mean']:.1f} +- "
                   f"{c[e]['std']:.1f} | {d[e]['mean']:.1f} |")
    out += ["", "| cache encoding (CSKD, seed 0) | best top-1 % |", "|---|---|"]
    out += [f"| {k} | {v:.1f} |" for k, v in s["encoding"].items()]
    out.append(f"\ntopk (k = {cfg['topk']}) CKF targets that differ from the exact ones (epoch 0, every alpha of the "
               f"schedule): {100 * results['topk_target_mismatch']:.2f}%")
    out.append(f"\nckf and full trained to the same weights, bit for bit: {results['ckf_equals_full']}")
    t = results["teacher_dense_vs_global"]
    out.append(f"\nteacher's dense labels (alpha = 1) vs its global label, {t['positions']} positions of epoch 0: "
               f"{100 * t['agree']:.1f}% agree; mean top probability {_num(t['top_prob_agree'])} where they agree, "
               f"{_num(t['top_prob_differ'])} where they differ")
    out.append(f"\nthis invocation: {results['total_seconds'] / 60:.1f} min wall; " +
               ", ".join(f"{k} {v / 60:.1f} min" for k, v in results["seconds"].items()) +
               f" ({len(results['runs'])} runs; a reused run counts its own epochs' time)")
    return "\n".join(out)


def plot(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, cfg = results["runs"], results["config"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ("no distillation", "DeiT hard distillation", "CSKD"):
        curves = [r["top1_per_epoch"] for r in runs.values() if r["group"] == "main" and r["arm"] == arm]
        mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
        lo = [min(c[i] for c in curves) for i in range(len(curves[0]))]
        hi = [max(c[i] for c in curves) for i in range(len(curves[0]))]
        x = range(1, len(mean) + 1)
        ax.plot(x, mean, marker="o", label=f"{arm} ({len(curves)} seeds)")
        ax.fill_between(x, lo, hi, alpha=0.2)
    if results.get("teacher_top1") is not None:
        ax.axhline(results["teacher_top1"], color="gray", linestyle="--", label="teacher")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("same views, same steps: mean and range over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_per_epoch.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, values in results["summary"]["cached_epochs"].items():
        es = sorted(values, key=int)
        mean = [values[e]["mean"] for e in es]
        err = [[m - values[e]["min"] for m, e in zip(mean, es)], [values[e]["max"] - m for m, e in zip(mean, es)]]
        n = values[es[0]]["n"]
        ax.errorbar([int(e) for e in es], mean, yerr=err, marker="o", capsize=3,
                    label=f"{arm} ({n} seed{'s' if n > 1 else ''}{', mean and range' if n > 1 else ''})")
    ax.set_xscale("log")
    ax.set_xlabel(f"cached epochs E (training {cfg['epochs']} epochs; each view used {cfg['epochs']}/E times)")
    ax.set_ylabel("best validation top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_cached_epochs.png"), dpi=110)
    plt.close(fig)
