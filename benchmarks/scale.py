"""How the cache grows: classes (1k vs 21k), teacher grid (7x7 vs 14x14), views; and what ImageNet costs.

Teacher outputs are real where they can be: efficientnet_lite0's ImageNet logits on real photos at 224 px
(7x7 grid) and 448 px (14x14 grid). For 21k classes (ImageNet-21k's 21,843), each view's 1,000 real classes are
joined by 20,843 more whose dense maps and global logits are copies of the view's own low-ranked classes, shifted
down and jittered: a realistic tail that never competes with the top (as most of 21k classes would not). Per
configuration: ckf candidates per position, table size, encode time per view (CPU), stored bytes per view (ckf
and full, with the cache's codecs). Then ImageNet-1k's cost per cached epoch from the measured bytes.

    python -m benchmarks.scale
"""

from __future__ import annotations

import tempfile
import time

import torch
import zarr

from benchmarks.common import lite0_checkpoint, parser, real_photos, save, setup, table
from cskd_cache.cache.ckf import SPILLED
from cskd_cache.data.open import open_source
from cskd_cache.cache.encodings import make_encoding
from cskd_cache.cache.store import _codecs
from cskd_cache.teacher.model import create_teacher
from cskd_cache.data.recipe import Recipe, build_transform
from cskd_cache.data.replay import augment

IMAGENET_VIEWS = 1_281_167 - 1  # views per cached epoch (pairs: an even count)
REGNETY_160_GMACS = 15.9  # timm's figure for regnety_160 at 224 px


def stored_bytes(arrays: dict, specs: dict, chunk: int = 64) -> float:
    g = zarr.create_group(zarr.storage.MemoryStore())
    n = 0
    for name, a in arrays.items():
        a = a.numpy() if torch.is_tensor(a) else a
        n = len(a)
        spec = specs[name]
        z = g.create_array(name, shape=a.shape, chunks=(chunk, *a.shape[1:]), dtype=a.dtype, fill_value=0,
                           compressors=_codecs(a.dtype, spec.shuffle))
        z[...] = a
    return sum(len(v) for v in g.store._store_dict.values()) / n


def widen(dense: torch.Tensor, glob: torch.Tensor, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Add classes copied from each view's lower half of classes, shifted down by 2 and jittered."""
    g = torch.Generator().manual_seed(seed)
    B, P, K = dense.shape
    low = glob.argsort(-1)[:, K // 2:]  # the lower half, per view
    pick = low.gather(1, torch.randint(0, low.shape[1], (B, classes - K), generator=g))
    jitter = torch.randn(B, 1, classes - K, generator=g) * 0.1 - 2.0
    d = torch.cat([dense, dense.gather(2, pick[:, None, :].expand(B, P, -1)) + jitter], 2)
    return d, torch.cat([glob, glob.gather(1, pick) + jitter[:, 0]], 1)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--views", type=int, default=64)
    args = ap.parse_args()
    device = setup(args)
    tmp = tempfile.mkdtemp()
    n = 8 if args.smoke else args.views
    source = open_source(str(real_photos(f"{tmp}/photos", per_photo=max(1, n // 14 + 1), size=480)))
    name = lite0_checkpoint(f"{tmp}/lite0.safetensors")
    rows = []
    for size in ((64,) if args.smoke else (224, 448)):
        teacher, _ = create_teacher(name, checkpoint=f"{tmp}/lite0.safetensors")
        tf = build_transform(Recipe(input_size=size))
        x = torch.stack([augment(tf, source.load(i % len(source)), i) for i in range(n)])
        dense, glob = teacher(x)
        grid = int(dense.shape[1] ** 0.5)
        for classes in ((1000, 2000) if args.smoke else (1000, 21843)):
            d, g = (dense, glob) if classes == 1000 else widen(dense, glob, classes)
            ckf = make_encoding("ckf", classes, d.shape[1])
            t = time.perf_counter()
            arrays, spill = ckf.encode(d, g)
            seconds = (time.perf_counter() - t) / n
            count = arrays["ckf_count"].long()
            full = make_encoding("full", classes, d.shape[1])
            fa, _ = full.encode(d[:8], g[:8])
            rows.append({"grid": f"{grid}x{grid}", "classes": classes,
                         "candidates/position": float(count[count != SPILLED].float().mean()),
                         "spilled positions": int((count == SPILLED).sum()),
                         "table classes/view": float((arrays["global_class"] >= 0).sum(-1).float().mean()),
                         "encode ms/view (CPU)": 1000 * seconds,
                         "ckf B/view": stored_bytes(arrays, ckf.arrays()),
                         "full B/view": stored_bytes(fa, full.arrays(), chunk=8)})
    print(table(rows, list(rows[0])))
    base = next(r for r in rows if r["classes"] == 1000)
    cost = []
    for enc, per_view in (("ckf", base["ckf B/view"] + 56), ("full", base["full B/view"] + 56)):
        for epochs in (1, 30, 300):
            cost.append({"encoding": enc, "cached epochs": epochs,
                         "storage GB": per_view * IMAGENET_VIEWS * epochs / 1e9})
    gpu = {"GFLOP per view (2 x GMACs)": 2 * REGNETY_160_GMACS,
           "A100 bf16 at 40% of 312 TFLOP/s: views/s (estimate)": 0.4 * 312e12 / (2 * REGNETY_160_GMACS * 1e9)}
    gpu["A100 GPU-hours per cached epoch (estimate)"] = IMAGENET_VIEWS / gpu[
        "A100 bf16 at 40% of 312 TFLOP/s: views/s (estimate)"] / 3600
    print()
    print(table(cost, ["encoding", "cached epochs", "storage GB"]))
    print()
    print("\n".join(f"{k}: {v:,.2f}" for k, v in gpu.items()))
    path = save("scale", args, rows, {"views": n, "teacher": "efficientnet_lite0 (ImageNet weights) on real photos",
                                      "21k": "1k real classes + 20,843 copied from each view's lower half, -2, jitter"},
                device, imagenet_storage=cost, teacher_cost=gpu,
                note="storage includes the 56 bytes per view of replay checks (fingerprint, signature)")
    print(f"\n{path}")


if __name__ == "__main__":
    main()
