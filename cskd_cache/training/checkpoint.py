"""A run's checkpoint and log: written atomically every epoch, loaded weights-only, resumed only with the flags
and the teacher targets (the cache's identity) the run was started with."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch

from ..errors import CacheError


# Flags that may change between a run and its --resume: they do not alter what is computed (data, cache and the
# run folder itself may move; the data's and cache's identity is checked by fingerprint).
# --epochs may grow (training extended: the cosine and alpha schedules stretch from the resumed epoch on).
_RESUME_FREE = {"workers", "device", "resume", "force", "tensorboard", "out", "data", "cache", "val_data", "epochs",
                "stop_after", "match", "replay_tolerance", "compile", "check_every"}


def _check_resume(cfg, saved: dict, path: str) -> None:
    for key, value in asdict(cfg).items():
        if key in _RESUME_FREE or key not in saved or saved[key] == value:
            continue
        flag = "--" + key.replace("_", "-")
        shown = lambda v: "its default" if v is None else repr(v)  # noqa: E731 - None means: not given
        raise CacheError(f"--resume: {path} was trained with {flag} {shown(saved[key])}, not {shown(value)}; "
                         f"pass the same flags, or a new --out to start another run")


def _identity_mismatch(saved: dict, now: dict) -> str | None:
    for key in sorted(set(saved) | set(now)):
        if json.dumps(saved.get(key), sort_keys=True) != json.dumps(now.get(key), sort_keys=True):
            return key
    return None


def checkpoint_path(cfg) -> str:
    return os.path.join(cfg.out, "checkpoint.pth")


def refuse_overwrite(cfg) -> None:
    """Before any work: a run in --out is continued with --resume, never overwritten (said first, and alone)."""
    if not cfg.resume and os.path.exists(checkpoint_path(cfg)):
        raise CacheError(f"--out {cfg.out} already holds a run; pass --resume to continue it, or choose another --out")


def resume(run) -> None:
    """Load the run's checkpoint into `run` (a train.Run) if there is one and --resume asks for it."""
    cfg, path = run.cfg, checkpoint_path(run.cfg)
    if not os.path.exists(path):
        if cfg.resume and run.dist.main:
            print(f"note: --resume: no run in {cfg.out} yet; starting a new one")
        return
    refuse_overwrite(cfg)
    try:  # weights_only: a checkpoint is data, never code (it may come from someone else)
        ck = torch.load(path, map_location=run.device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, say so in one line
        raise CacheError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]})") from None
    _check_resume(cfg, ck.get("config", {}), path)
    what = _identity_mismatch(ck.get("identity", {}), run.identity)
    if what:
        raise CacheError(f"--resume: {path} was trained with teacher targets from another {what} than the ones "
                         "given now (another cache, teacher or plan); pass the run's own --cache, or a new --out")
    run.student.load_state_dict(ck["model"])
    run.optimizer.load_state_dict(ck["optimizer"])
    if run.ema is not None and ck.get("ema") is not None:
        run.ema.load_state_dict(ck["ema"])
    run.start_epoch, run.history = ck["epoch"] + 1, ck["history"]
    if run.dist.main:
        print(f"resuming {cfg.out} at epoch {run.start_epoch} of {cfg.epochs}" if run.start_epoch < cfg.epochs else
              f"{cfg.out} has trained all {cfg.epochs} epochs already; nothing left to train")
    if run.dist.main and run.history:  # a kill between the checkpoint and the log: the log follows the checkpoint
        _write_log(run)


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def save(run, epoch: int, row: dict) -> None:
    """Checkpoint, metrics.jsonl (the whole history, so the log always agrees with the checkpoint a resume
    starts from) and last.json; each written to a temporary file and renamed: a kill never leaves half a file."""
    path = checkpoint_path(run.cfg)
    s = run.student
    student = {"name": run.cfg.student, "num_classes": run.num_classes, "img_size": run.recipe.input_size,
               "teacher_grid": list(s.teacher_grid), "view_mean": list(s.view_mean), "view_std": list(s.view_std),
               "interpolation": run.recipe.interpolation}  # all evaluate needs to rebuild it
    torch.save({"model": s.state_dict(), "optimizer": run.optimizer.state_dict(),
                "ema": run.ema.state_dict() if run.ema is not None else None, "epoch": epoch,
                "history": run.history, "config": asdict(run.cfg), "identity": run.identity, "student": student},
               path + ".tmp")
    os.replace(path + ".tmp", path)
    _write_log(run)


def _write_log(run) -> None:
    _write_atomic(os.path.join(run.cfg.out, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in run.history))
    _write_atomic(os.path.join(run.cfg.out, "last.json"), json.dumps(run.history[-1]))
