"""Run under torchrun by tests: train, then write a hash of this rank's EMA weights (and model weights)."""

import hashlib
import json
import os
import sys

import cskd_cache.train as train_mod

built = []


class RecordingEma(train_mod.ModelEmaV3):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        built.append(self)


def digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    cfg = train_mod.TrainConfig(**json.loads(sys.argv[1]))
    train_mod.ModelEmaV3 = RecordingEma
    train_mod.train(cfg)
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(cfg.out, f"ema-rank{rank}.txt"), "w") as f:
        f.write(digest(built[-1].module))
