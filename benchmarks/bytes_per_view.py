"""Bytes per view of each encoding for a 224 px RegNetY-160 cache (7x7 grid, 1000 classes).

Runs the real pipeline (precompute through the library) on generated images with a seeded, randomly
initialised regnety_160 (no weights can be downloaded here), prints a table and writes JSON.
    python benchmarks/bytes_per_view.py --images 32 --out benchmarks/results/bytes_per_view.json
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np
import timm
import torch
from PIL import Image

from cskd_cache.precompute import PrecomputeConfig, precompute
from cskd_cache.store import Cache
from cskd_cache.views import Recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--teacher", default="regnety_160")
    ap.add_argument("--out", default="benchmarks/results/bytes_per_view.json")
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    for i in range(args.images):  # smooth random scenes (noise would be unrealistically hard to compress)
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        d = tmp / "images" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((256, 256), Image.BICUBIC).save(d / f"{i:04d}.jpg")
    torch.manual_seed(0)
    ckpt = tmp / "teacher.pth"
    torch.save(timm.create_model(args.teacher).state_dict(), ckpt)
    rows = []
    for enc in ("full", "ckf", "topk"):
        t = time.time()
        cfg = PrecomputeConfig(data=str(tmp / "images"), out=str(tmp / f"{enc}.zarr"), teacher=args.teacher,
                               teacher_checkpoint=str(ckpt), encoding=enc, recipe=Recipe(), batch_size=16,
                               workers=2, chunk_views=16, shard_views=args.images)
        cache = precompute(cfg)
        per = cache.bytes_per_view()
        counts = None
        if enc == "ckf":
            c = np.asarray(cache.group["views/ckf_count"][:])
            counts = {"mean": float(c.mean()), "max": int(c.max())}
        rows.append({"encoding": enc, "views": cache.total_views,
                     "stored_bytes_per_view": sum(v["stored"] for v in per.values()),
                     "raw_bytes_per_view": sum(v["raw"] for v in per.values()),
                     "ckf_candidates_per_position": counts, "seconds": time.time() - t})
    print(f"{'encoding':10s} {'stored B/view':>14s} {'raw B/view':>12s}  candidates/position")
    for r in rows:
        print(f"{r['encoding']:10s} {r['stored_bytes_per_view']:14.0f} {r['raw_bytes_per_view']:12.0f}  "
              f"{r['ckf_candidates_per_position'] or ''}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"teacher": args.teacher, "input_size": 224, "grid": "7x7", "classes": 1000,
                               "note": "random-init teacher on generated images", "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
