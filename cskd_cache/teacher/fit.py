"""Fit (or fine-tune) the CNN teacher on the user's dataset, before caching it.

The paper fine-tunes its ImageNet teacher on each downstream dataset (CIFAR, Cars, iNat) first; this does the same
for any timm CNN and writes weights that `precompute --teacher-checkpoint` loads. Plain supervised training:
timm's train transform, label-smoothed CE, AdamW with a cosine schedule. An interrupted run resumes from the
per-epoch state file next to the output.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from ..data.open import open_source
from ..data.recipe import model_normalization
from ..data.source import LabeledImages
from ..errors import CacheError
from .model import TEACHER_ALIASES, file_sha256, require_hub


@dataclass
class FitTeacherConfig:
    data: str
    out: str  # .safetensors or .pth (weights only)
    teacher: str = "regnety_160"
    pretrained: bool = True  # start from timm's weights and replace the classifier (fine-tuning)
    init_checkpoint: str | None = None  # start from these local weights instead (offline fine-tuning)
    val_data: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    smoothing: float = 0.1
    input_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    workers: int = 4
    device: str | None = None
    seed: int = 0


def _save_weights(model: torch.nn.Module, path: str) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path + ".tmp"
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, tmp)
    else:
        torch.save(state, tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; the user's umask decides, as for any file
    os.replace(tmp, path)  # the weights file exists only once it is whole


def fit_settings(cfg: FitTeacherConfig) -> dict:
    """What the fitted weights depend on (not where they are computed); a resume, or a reuse, must match it."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("workers", "device")}
    if cfg.init_checkpoint:  # the weights it starts from, not where they lie
        settings["init_checkpoint"] = file_sha256(cfg.init_checkpoint)
    return json.loads(json.dumps(settings))


def load_init(model: torch.nn.Module, name: str, path: str) -> None:
    """Local weights into `model` (weights-only), the classifier excepted when its shape differs from the
    dataset's: then it keeps its fresh initialisation, as timm does with hub weights and another class count.
    Every other tensor must fit, or the file is for another architecture."""
    if not os.path.isfile(path):
        raise CacheError(f"--init-checkpoint: no such file: {path}")
    try:
        state = timm.models.load_state_dict(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is the file's fault, say which
        raise CacheError(f"--init-checkpoint {path}: not a readable weights file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    own = model.state_dict()
    head = timm.models.get_pretrained_cfg_value(name, "classifier") or "fc"
    heads = {f"{head}.weight", f"{head}.bias"} & set(own)  # may be absent (a backbone-only file) or replaced
    if any(k in state and state[k].shape != own[k].shape for k in heads):
        state = {k: v for k, v in state.items() if k not in heads}
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if unexpected or wrong or missing - heads:
        what = sorted(unexpected)[:2] + sorted(wrong)[:2] + sorted(missing - heads)[:2]
        raise CacheError(f"--init-checkpoint {path}: does not fit --teacher {name} ({len(unexpected)} unexpected, "
                         f"{len(wrong)} mis-shaped, {len(missing - heads)} missing tensors, e.g. {', '.join(what)})")
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader, device: torch.device) -> float:
    model.eval()
    correct = n = 0
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        n += len(y)
    return 100.0 * correct / max(n, 1)


def fit_teacher(cfg: FitTeacherConfig) -> dict:
    """Train the teacher; write cfg.out (weights) and cfg.out + '.json' (what it is and how well it does)."""
    if not (cfg.out.endswith(".safetensors") or cfg.out.endswith(".pth")):
        raise CacheError(f"--out {cfg.out}: name it *.safetensors or *.pth")
    name = TEACHER_ALIASES.get(cfg.teacher, cfg.teacher)
    if not timm.is_model(name) and not timm.list_models(name):
        raise CacheError(f"--teacher: unknown timm model {cfg.teacher!r} (see timm.list_models())")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = open_source(cfg.data)
    num_classes = len(source.classes)
    torch.manual_seed(cfg.seed)
    hub = cfg.pretrained and not cfg.init_checkpoint
    if hub:
        require_hub(instead="--init-checkpoint PATH (local weights to fine-tune) or --no-pretrained")
    try:
        model = timm.create_model(name, pretrained=hub, num_classes=num_classes)
    except (OSError, RuntimeError, ValueError) as e:
        raise CacheError(f"--teacher {name}: cannot get pretrained weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); pass --init-checkpoint PATH (local weights) or "
                         "--no-pretrained to train from scratch") from None
    if cfg.init_checkpoint:
        load_init(model, name, cfg.init_checkpoint)
    model = model.to(device)
    # the model's own normalisation, which is what precompute feeds it (views are renormalised to it)
    mean, std = model_normalization(model)
    train_tf = create_transform(cfg.input_size, is_training=True, scale=cfg.scale, hflip=cfg.hflip,
                                interpolation="bicubic", mean=mean, std=std)
    eval_tf = create_transform(cfg.input_size, is_training=False, crop_pct=1.0, interpolation="bicubic",
                               mean=mean, std=std)
    loader = torch.utils.data.DataLoader(LabeledImages(source, train_tf), batch_size=cfg.batch_size,
                                         shuffle=True,
                                         num_workers=cfg.workers, drop_last=len(source) > cfg.batch_size,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    val = None
    if cfg.val_data:
        val_source = open_source(cfg.val_data, flag="--val-data")
        val = torch.utils.data.DataLoader(LabeledImages(val_source, eval_tf), batch_size=cfg.batch_size,
                                          num_workers=cfg.workers)
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs, warmup_t=cfg.warmup_epochs, warmup_lr_init=1e-6)

    state_path, start, history = cfg.out + ".state.pth", 0, []
    settings = fit_settings(cfg)
    if os.path.exists(state_path):
        try:  # weights-only: a state file is data, never code, whoever left it there
            state = torch.load(state_path, map_location=device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, one line
            raise CacheError(f"{state_path}: not a readable resume state ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160]}); delete it to start over") from None
        if json.loads(json.dumps(state["settings"])) == json.loads(json.dumps(settings)):
            model.load_state_dict(state["model"]), optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            start, history = state["epoch"] + 1, state["history"]
    t0 = time.time()
    for epoch in range(start, cfg.epochs):
        scheduler.step(epoch)
        model.train()
        total = seen = 0
        for x, y in tqdm(loader, desc=f"teacher epoch {epoch}", unit="batch", disable=None, leave=False):
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        row = {"epoch": epoch, "train_loss": total / max(seen, 1)}
        if val is not None:
            row["val_top1"] = accuracy(model, val, device)
        history.append(row)
        print(json.dumps(row), flush=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "rng": torch.get_rng_state(), "history": history, "settings": json.loads(json.dumps(settings))},
                   state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)
    _save_weights(model, cfg.out)
    report = {"teacher": name, "num_classes": num_classes, "classes": source.classes, "data": source.describe(),
              "settings": settings, "history": history, "seconds": time.time() - t0}
    with open(cfg.out + ".json", "w") as f:
        json.dump(report, f, indent=2, default=str)
    if os.path.exists(state_path):
        os.remove(state_path)
    return report
