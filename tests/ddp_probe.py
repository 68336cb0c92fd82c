"""Run under torchrun by tests: train each given config, then write a hash of this rank's EMA and model weights.

Rank 1's student starts from other weights than rank 0's (as a rank whose init drew other random numbers would):
DDP broadcasts rank 0's at wrap time, so every rank ends with the same model, and with the same EMA only if the
EMA is built from the weights after that broadcast."""

import hashlib
import json
import os
import sys

import torch

import cskd_cache.training.setup as setup_mod
import cskd_cache.training.train as train_mod

built = []


class RecordingEma(setup_mod.ModelEmaV3):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        built.append(self)


def rank_dependent_student(*a, **kw):
    student = create_student(*a, **kw)
    if os.environ.get("RANK", "0") != "0":
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01)
    return student


def digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    setup_mod.ModelEmaV3 = RecordingEma
    create_student, setup_mod.create_student = setup_mod.create_student, rank_dependent_student
    rank = os.environ.get("RANK", "0")
    for cfg in json.loads(sys.argv[1]):
        cfg = train_mod.TrainConfig(**cfg)
        run = train_mod.train(cfg)
        with open(os.path.join(cfg.out, f"rank{rank}.json"), "w") as f:
            json.dump({"ema": digest(built[-1].module), "history": run}, f)
