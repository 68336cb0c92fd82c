"""Precompute's views per second against the bare teacher forward on the same batches.

`precompute` (replay in DataLoader workers, the teacher, the ckf encoding, shard writes in a background thread)
is timed at two sizes and the difference taken, so fixed start-up costs (model creation, plan) drop out: the
marginal seconds per view. The bare forward is `teacher(x)` alone on the same replayed batches, already in memory.
RegNetY-160 random-initialised at 224 px (the architecture is what costs). The whole measurement is repeated
(default 3) and the ratio taken repeat by repeat: median, min and max.

    python -m benchmarks.precompute_throughput          # about 12 minutes on 2 CPU cores (3 repeats)
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import Timer, parser, random_checkpoint, real_photos, save, setup, table
from cskd_cache.data.open import open_source
from cskd_cache.teacher.precompute import PrecomputeConfig, precompute
from cskd_cache.cache.store import Cache
from cskd_cache.teacher.model import create_teacher
from cskd_cache.data.recipe import Recipe
from cskd_cache.data.replay import PairDataset, pair_items


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--teacher", default="regnety_160")
    ap.add_argument("--views", type=int, default=96, help="views of the smaller run; the larger has twice as many")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = setup(args)
    if args.smoke:
        args.teacher, args.views, args.batch, args.workers, args.repeats = "test_resnet", 16, 8, 0, 1
    size = 64 if args.smoke else 224
    tmp = tempfile.mkdtemp()
    per_photo = -(-args.views // 14)
    data = real_photos(f"{tmp}/photos", per_photo=per_photo, size=size + 64)
    ckpt = f"{tmp}/t.safetensors"
    random_checkpoint(args.teacher, ckpt)
    n = len(open_source(str(data))) // 2 * 2

    def timed_precompute(epochs: int) -> tuple[float, Cache]:
        out = f"{tmp}/c{epochs}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        cfg = PrecomputeConfig(data=str(data), out=out, teacher=args.teacher, teacher_checkpoint=ckpt,
                               recipe=Recipe(input_size=size), epochs=epochs, repeats=1, batch_size=args.batch,
                               workers=args.workers, chunk_views=args.batch, shard_views=4 * args.batch,
                               device=args.device, same_label_space=True)  # photos, an ImageNet teacher
        t = time.perf_counter()
        cache = precompute(cfg)
        return time.perf_counter() - t, cache

    teacher, _ = create_teacher(args.teacher, checkpoint=ckpt, precision="fp32")
    teacher = teacher.to(device)
    seen = {"bare": [], "marginal": [], "whole": [], "ratio": []}
    x = None
    for _ in range(args.repeats):
        t1, cache = timed_precompute(1)
        t2, _ = timed_precompute(2)
        if x is None:  # the same replayed batches every repeat
            dataset = PairDataset(open_source(str(data)).subset(list(range(len(cache.sample_keys())))), cache.recipe)
            x = torch.cat([dataset[it]["image"] for it in pair_items(cache.epoch_plan, np.arange(n), cache.stride)])
            teacher(x[: args.batch].to(device))  # warm-up
        with Timer(device) as t:
            for a in range(0, n, args.batch):
                teacher(x[a:a + args.batch].to(device))
        seen["bare"].append(n / t.seconds)
        seen["marginal"].append(n / (t2 - t1))
        seen["whole"].append(n / t1)
        seen["ratio"].append(seen["marginal"][-1] / seen["bare"][-1])

    def spread(v):
        return {"median": statistics.median(v), "min": min(v), "max": max(v)}

    ratio = spread(seen["ratio"])
    rows = [{"what": "bare teacher forward (same batches)", "views/s": statistics.median(seen["bare"])},
            {"what": "precompute, marginal (replay, teacher, ckf encode, writes)",
             "views/s": statistics.median(seen["marginal"]), "ratio to bare": ratio["median"],
             "ratio min": ratio["min"], "ratio max": ratio["max"]},
            {"what": "precompute, whole run of one epoch (start-up included)", "views/s": statistics.median(seen["whole"])}]
    print(table(rows, ["what", "views/s", "ratio to bare", "ratio min", "ratio max"]))
    print(f"\nratio to bare, repeat by repeat: {', '.join(f'{r:.3f}' for r in seen['ratio'])}")
    path = save("precompute_throughput", args, rows, {"teacher": f"{args.teacher} (random init)", "input_size": size,
                                                      "views": [n, 2 * n], "batch": args.batch,
                                                      "workers": args.workers, "encoding": "ckf",
                                                      "threads": torch.get_num_threads(),
                                                      "repeats": args.repeats, "runs": seen}, device,
                ratio=ratio["median"])
    print(f"\n{path}")


if __name__ == "__main__":
    main()
