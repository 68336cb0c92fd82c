"""`cskd-cache plot`: training curves of one or more runs side by side (train loss, top-1 of model and EMA,
CKF's alpha), from each run's metrics.jsonl."""

from __future__ import annotations

import json
import os

from ..errors import CacheError


def read_metrics(run: str) -> list[dict]:
    path = os.path.join(run, "metrics.jsonl")
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        raise CacheError(f"{run}: no metrics.jsonl (is it a cskd-cache train --out folder?)") from None
    except ValueError:
        raise CacheError(f"{path} is not JSON lines") from None


def plot_runs(runs: list[str], out: str) -> str:
    try:
        import matplotlib
    except ImportError:
        raise CacheError("plot needs matplotlib: pip install 'cskd-cache[demo]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss, acc, alpha) = plt.subplots(1, 3, figsize=(14, 4))
    for run in runs:
        rows = read_metrics(run)
        label = os.path.basename(os.path.normpath(run))
        epochs = [r["epoch"] + 1 for r in rows]
        line, = loss.plot(epochs, [r.get("train_total") for r in rows], marker=".", label=label)
        if any("top1" in r for r in rows):
            acc.plot(epochs, [r.get("top1") for r in rows], marker=".", color=line.get_color(), label=label)
        if any("ema_top1" in r for r in rows):
            acc.plot(epochs, [r.get("ema_top1") for r in rows], linestyle="--", color=line.get_color(),
                     label=f"{label} (EMA)")
        alpha.plot(epochs, [r.get("alpha") for r in rows], marker=".", color=line.get_color(), label=label)
    for ax, title, y in ((loss, "training loss", "total loss"), (acc, "validation", "top-1 (%)"),
                         (alpha, "CKF alpha (1 local -> 0 global)", "alpha")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
