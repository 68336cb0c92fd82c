"""`cskd-cache evaluate`: a trained run's accuracy per head, for the model and its EMA.

CSKD's prediction is the mean of three heads (class token, distillation token, mean of the dense patch logits);
seeing each alone shows what the patch tokens learned. The checkpoint says how to rebuild the student (it is
loaded weights-only), and the validation images go through the recipe's evaluation transform.
"""

from __future__ import annotations

import torch

from ..data.open import open_source
from ..data.recipe import Recipe, build_eval_transform
from ..data.source import LabeledImages
from ..errors import CacheError
from .student import create_student

HEADS = ("cls", "dist", "dense", "cskd")


def load_student(checkpoint: str, ema: bool = False, device="cpu"):
    try:
        ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, one line
        raise CacheError(f"--checkpoint {checkpoint}: not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]})") from None
    d = ck.get("student")
    if d is None:
        raise CacheError(f"--checkpoint {checkpoint}: written by an older cskd-cache without the student's "
                         "description; evaluate it with that version")
    student = create_student(d["name"], d["num_classes"], d["img_size"], tuple(d["teacher_grid"]),
                             view_mean=d["view_mean"], view_std=d["view_std"])
    state = ck["model"]
    if ema:
        if ck.get("ema") is None:
            return None, d, ck
        state = {k.removeprefix("module."): v for k, v in ck["ema"].items()}
    student.load_state_dict(state)
    return student.to(device).eval(), d, ck


@torch.no_grad()
def head_accuracy(student, loader, device) -> dict:
    """Top-1/top-5 (%) of each head and of their CSKD combination."""
    hits = {h: torch.zeros(2, dtype=torch.float64) for h in HEADS}
    n = 0
    for x, y in loader:
        x = x.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            heads = student._heads(x)
        logits = {"cls": heads["cls"], "dist": heads["dist"], "dense": heads["dense"].mean(dim=(2, 3))}
        logits["cskd"] = (logits["cls"] + logits["dist"] + logits["dense"]) / 3
        for h, z in logits.items():
            top = z.float().topk(min(5, z.shape[1]), dim=1).indices.cpu()
            hits[h] += torch.tensor([(top[:, 0] == y).sum().item(), (top == y[:, None]).any(1).sum().item()],
                                    dtype=torch.float64)
        n += len(y)
    return {h: {"top1": 100 * float(v[0]) / max(n, 1), "top5": 100 * float(v[1]) / max(n, 1)} for h, v in
            hits.items()} | {"images": n}


def evaluate_checkpoint(checkpoint: str, val_data: str, batch_size: int = 64, workers: int = 2,
                        device: str | None = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    student, d, ck = load_student(checkpoint, device=dev)
    recipe = Recipe(input_size=d["img_size"], interpolation=d.get("interpolation", "bicubic"),
                    mean=tuple(d["view_mean"]), std=tuple(d["view_std"]))
    source = open_source(val_data, flag="--val-data")
    if max(source.labels) >= d["num_classes"]:
        raise CacheError(f"--val-data has labels up to {max(source.labels)}; the student has {d['num_classes']} "
                         "classes")
    loader = torch.utils.data.DataLoader(LabeledImages(source, build_eval_transform(recipe)), batch_size=batch_size,
                                         num_workers=workers)
    out = {"checkpoint": checkpoint, "epoch": ck.get("epoch"), "student": d["name"],
           "model": head_accuracy(student, loader, dev)}
    ema, _, _ = load_student(checkpoint, ema=True, device=dev)
    if ema is not None:
        out["ema"] = head_accuracy(ema, loader, dev)
    return out


def format_accuracy(result: dict) -> str:
    lines = [f"{result['checkpoint']} (epoch {result['epoch']}, {result['student']}, "
             f"{result['model']['images']} images)", "| weights | head | top-1 % | top-5 % |", "|---|---|---|---|"]
    names = {"cls": "class token", "dist": "distillation token", "dense": "patch tokens (mean)",
             "cskd": "CSKD (mean of the three)"}
    for w in ("model", "ema"):
        for h in HEADS if w in result else ():
            lines.append(f"| {w} | {names[h]} | {result[w][h]['top1']:.2f} | {result[w][h]['top5']:.2f} |")
    return "\n".join(lines)
