"""Cache read + CKF decode throughput of one process, from a local ckf cache of real teacher outputs.

The teacher outputs of a real ImageNet teacher (efficientnet_lite0) on real photos (benchmarks.storage's
pipeline) are tiled into a cache of --views views (ImageNet's layout: 2048-view shards, 64-view chunks). Measured
in one process, for both readers side by side (zarr-python, as `Cache.gather` read before issue 17; the shard
reader of cache/reader.py): reading the views the way training does (one batch of views at a time, every array,
fingerprints and signatures included; in plan order, as the first pass over a cache reads them, and in shuffled
chunk-sized blocks, as later passes do), decoding CKF targets on the CPU, and both together. The load average is
recorded: on a shared machine, other processes' load lowers every figure.

    python -m benchmarks.read_decode --threads 1
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from functools import partial

import numpy as np
import torch

from benchmarks.common import lite0_checkpoint, parser, real_photos, save, setup, table
from cskd_cache.cache import write
from cskd_cache.cache.reader import ShardReader, zarr_gather
from cskd_cache.teacher.precompute import PrecomputeConfig, precompute
from cskd_cache.cache.store import Cache, make_layout, to_torch
from cskd_cache.data.recipe import Recipe


def tiled_cache(src: Cache, out: str, views: int, shard_views: int = 2048, chunk_views: int = 64) -> Cache:
    """A cache of `views` views holding the source's real outputs, repeated (fingerprints made up)."""
    arrays, _ = src.read_views(0, src.views_per_epoch)
    n = src.views_per_epoch
    m = copy.deepcopy(src.manifest)
    m["plan"] = dict(m["plan"], epochs=1)
    views = views - views % 2
    m["layout"] = make_layout(1, views, chunk_views, shard_views)
    m["plan"]["num_samples"] = m["dataset"]["used_samples"] = views  # a plan of that many (stand-in) samples
    keys = [f"s{i:07d}" for i in range(views)]
    cache = write.create_cache(out, m, keys, [0] * views, src.encoding, chunk_views, overwrite=True)
    rng = np.random.default_rng(0)
    for s in range(cache.num_shards):
        a, b = cache.shard_range(s)
        idx = np.arange(a, b) % n
        width = cache.replay_specs["signature"][0][0]
        replay = {"fingerprint": rng.integers(1, 2**62, b - a),
                  "signature": rng.integers(-64, 64, (b - a, width), dtype=np.int8)}
        write.write_shard(cache, s, {k: v[idx] for k, v in arrays.items()}, replay, None)
    write.finalize(cache)
    return Cache.open(out)


def reader(name: str, cache: Cache):
    """A fresh reader's gather: zarr-python's (as Cache.gather read before issue 17), or the shard reader's."""
    return ShardReader(cache).gather if name == "shard reader" else partial(zarr_gather, cache)


def read_rate(gather, views: np.ndarray, batch: int) -> tuple[float, float]:
    """(views/s, views per CPU-second) reading `views` one batch at a time, as a DataLoader worker does."""
    done = len(views) // batch * batch
    t, c = time.perf_counter(), time.process_time()
    for a in range(0, done, batch):
        gather(views[a:a + batch])
    return done / (time.perf_counter() - t), done / max(time.process_time() - c, 1e-9)


def fetched_per_view(cache: Cache, batch: int = 64) -> dict:
    """Bytes a training pass fetches per view, as the shard reader fetches them (compressed chunks of the teacher
    outputs, fingerprint and signature, plus shard indexes), and the epoch plan's stored bytes per view (read once
    per epoch by every rank)."""
    r = ShardReader(cache, whole_files=False)  # ranges, as from object storage: only the chunks a batch needs
    n = cache.num_views // batch * batch
    for a in range(0, n, batch):
        r.gather(np.arange(a, a + batch))
    plan = sum(cache.group[f"plan/{k}"].nbytes_stored() for k in cache.group["plan"].array_keys())
    return {"fetched B/view (outputs + fingerprint + signature + indexes)": r.fetched / n,
            "plan B/view (once per epoch)": plan / cache.num_views}


def decode_rate(enc, tensors: dict, batch: int) -> float:
    reps = max(1, 4096 // batch)
    t = time.perf_counter()
    for _ in range(reps):
        enc.decode_targets(tensors, 0.37, None)
    return reps * batch / (time.perf_counter() - t)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--views", type=int, default=16384)
    args = ap.parse_args()
    device = setup(args)
    tmp = tempfile.mkdtemp()
    size, views = (64, 2048) if args.smoke else (224, args.views)
    data = real_photos(f"{tmp}/photos", per_photo=2 if args.smoke else 5, size=max(size + 32, 96))
    teacher = lite0_checkpoint(f"{tmp}/lite0.safetensors")
    src = precompute(PrecomputeConfig(data=str(data), out=f"{tmp}/src.zarr", teacher=teacher,
                                      teacher_checkpoint=f"{tmp}/lite0.safetensors", recipe=Recipe(input_size=size),
                                      epochs=1, batch_size=32, workers=2, chunk_views=64, shard_views=128,
                                      device="cpu", same_label_space=True))  # photos, an ImageNet teacher
    cache = tiled_cache(src, f"{tmp}/big.zarr", views)
    enc, rows, load = cache.encoding, [], [os.getloadavg()[0]]
    n, chunk = cache.num_views, cache.manifest["layout"]["chunk_views"]
    blocks = np.random.default_rng(0).permutation(n // chunk)  # later passes over a cache: shuffled blocks
    orders = {"in order": np.arange(n), "shuffled blocks": (blocks[:, None] * chunk + np.arange(chunk)).ravel()}
    parts = 1 if args.smoke else 4  # each figure: the best of `parts` (other processes' load only ever slows)
    for batch in (64, 1024) if args.smoke else (64, 128, 256, 1024):
        tensors = to_torch(cache.gather(np.arange(0, batch))[0])
        decode = max(decode_rate(enc, tensors, batch) for _ in range(parts))
        for name in ("zarr-python", "shard reader"):
            best = {}
            for order, views in orders.items():  # each part read by a fresh reader: nothing read before
                rates = [read_rate(reader(name, cache), part, batch) for part in np.array_split(views, parts)]
                best[order] = tuple(max(r[i] for r in rates) for i in range(2))
            read = best["in order"][0]
            rows.append({"reader": name, "views per read": batch, "read views/s": read,
                         "read views/CPU-s": best["in order"][1],
                         "read views/s (shuffled blocks)": best["shuffled blocks"][0], "decode views/s (CPU)": decode,
                         "read + decode views/s": 1 / (1 / read + 1 / decode)})
    fetched = fetched_per_view(cache)
    load.append(os.getloadavg()[0])
    print(table(rows, list(rows[0])))
    print(table([fetched], list(fetched)))
    path = save("read_decode", args, rows, {"views": n, "layout": cache.manifest["layout"], "threads":
                                            torch.get_num_threads(), "teacher": "efficientnet_lite0 on real photos",
                                            "load_average_1min": {"start": load[0], "end": load[1]}}, device,
                fetched_bytes_per_view=fetched)
    print(f"\n{path}")


if __name__ == "__main__":
    main()
