"""The data path, per view and per core: decode, DeiT's augmentation, mixing, fingerprint and signature.

Real photographs (JPEG, ImageNet-like sizes) replayed at 224 px with the full recipe; one process, one thread
(`torch.set_num_threads(1)`, as in a DataLoader worker). From the per-core rate: how many cores keep one GPU busy
for each DeiT size (the GPU rates are the published DeiT throughputs, not measured here: no GPU was lent).

    python -m benchmarks.replay
"""

from __future__ import annotations

import io
import tempfile
import time

import torch
from PIL import Image

from benchmarks.common import parser, real_photos, save, table
from cskd_cache.data.open import open_source
from cskd_cache.data.plan import MODE_MIXUP
from cskd_cache.data.fingerprint import fingerprint, signature
from cskd_cache.data.recipe import Recipe, build_transform
from cskd_cache.data.replay import augment, mix_pair

# Published training-time reference (DeiT paper, Table 1: images/s at inference on one V100-16GB, AMP). Training
# costs about 3x inference (forward + backward), and an H100 is about 4x a V100 for ViTs; both are assumptions,
# stated as such in docs/performance.md.
DEIT_V100_INFERENCE = {"deit_ti": 2536, "deit_s": 940, "deit_b": 292}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--views", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = 24 if args.smoke else args.views
    size = 64 if args.smoke else 224
    tmp = tempfile.mkdtemp()
    source = open_source(str(real_photos(f"{tmp}/photos", per_photo=2, size=128 if args.smoke else 448)))
    raw = [source.read_bytes(i) for i in range(len(source))]
    transform = build_transform(Recipe(input_size=size))
    t = {"decode": 0.0, "augment": 0.0, "mix": 0.0, "fingerprint": 0.0, "signature": 0.0}
    last = None
    for i in range(n):
        a = time.perf_counter()
        img = Image.open(io.BytesIO(raw[i % len(raw)]))
        img.load()
        img = img.convert("RGB")
        b = time.perf_counter()
        x = augment(transform, img, i)
        c = time.perf_counter()
        if last is not None and i % 2:
            mix_pair(last, x, 0.6, MODE_MIXUP, (0, 0, 0, 0))
        d = time.perf_counter()
        fingerprint(x)
        e = time.perf_counter()
        signature(x)
        f = time.perf_counter()
        last = x
        for k, v in zip(t, (b - a, c - b, (d - c) * 2, e - d, f - e)):
            t[k] += v
    per_view = {k: 1000 * v / n for k, v in t.items()}
    total = sum(per_view.values())
    rows = [{"stage": k, "ms/view": v, "share": v / total} for k, v in per_view.items()]
    rows.append({"stage": "total", "ms/view": total, "share": 1.0})
    rate = 1000 / total
    gpu = []
    for name, inf in DEIT_V100_INFERENCE.items():
        for label, factor in (("V100", 1.0), ("H100 (~4x V100)", 4.0)):
            train_rate = inf * factor / 3
            gpu.append({"student": name, "GPU": label, "train img/s per GPU (estimate)": train_rate,
                        "cores to feed one GPU": train_rate / rate})
    print(table(rows, ["stage", "ms/view", "share"]))
    print(f"\none core replays {rate:.0f} views/s")
    print(table(gpu, ["student", "GPU", "train img/s per GPU (estimate)", "cores to feed one GPU"]))
    path = save("replay", args, rows, {"views": n, "input_size": size, "photos": "scikit-image, JPEG 448 px",
                                        "threads": 1}, None, views_per_core_s=rate, gpu_feeding=gpu)
    print(f"\n{path}")


if __name__ == "__main__":
    main()
