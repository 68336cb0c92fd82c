"""Worker CPU per view: plain DeiT's loader vs cskd-cache's, cached and online, on the same camera-like JPEGs.

What a DataLoader worker does for one batch, timed in one process on one thread (a worker's share of a core),
at 224 px with DeiT's full recipe and repeated augmentation (3 repeats), on 640x427 JPEGs at quality 90 made from
real photos (scikit-image's):

- plain DeiT: read + decode + timm's whole training transform (crop, flip, RandAugment, ToTensor, Normalize,
  erasing) per image, then collate float32 views (DeiT mixes on the GPU);
- cache: replay pairs from the plan (each repeated image decoded once per batch, uint8 pixels and erasing draws
  out; normalise, erase and mix run on the training device), read the batch's teacher outputs from the cache, and
  fingerprint the rotating sample of views a run checks in steady state (`train --check-every 8`);
- online: the same replay, nothing read, nothing checked (the teacher runs on the device);
- tensor loader (`--replay tensor`, a cache made with it): what its workers do: read each image's bytes, its size
  from the header, draw the views' parameters, read the teacher outputs and compare the stored parameters (timed as
  in a worker, whose generators are seeded per view and not saved and restored around each draw);
- tensor device work: what `--replay tensor` moves to the training device (decode, crop + resize, flip,
  RandAugment, normalise, erase, mix, and the checked views' fingerprints), on `--device` (default: a GPU when
  present, else this CPU on one thread, where it says what a GPU takes off the cores, not what it costs there).

Modes run in a new random order in every repeat (>= 5), so a busy machine slows them alike; the ratio is taken
repeat by repeat, and the table shows median, min and max. Writes benchmarks/results/data_path.json with
`plain_ms_per_view`, `cache_ms_per_view`, `online_ms_per_view`, `ratio` (cache / plain),
`tensor_loader_ms_per_view` and `tensor_device_cpu_ms_per_view` (`_cuda_` on a GPU).

    python -m benchmarks.data_path              # about 5 minutes on 2 cores
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import default_collate

from benchmarks.common import camera_photos, parser, random_checkpoint, save, table
from cskd_cache.cache.store import Cache
from cskd_cache.data.open import open_source
from cskd_cache.data.order import epoch_views
from cskd_cache.data.recipe import Recipe, build_transform
from cskd_cache.data.replay import PairDataset
from cskd_cache.data.tensor_replay import TensorPairDataset
from cskd_cache.data.source import LabeledImages
from cskd_cache.teacher.precompute import PrecomputeConfig, precompute
from cskd_cache.training.loader import CachedOutputs, RankBatches

BATCH = 64  # views per worker batch


def batches_of(cache: Cache, check_every: int, batch: int) -> list[list[tuple]]:
    """The worker batches of training epochs over every cached epoch, in steady state (past a run's first, fully
    checked steps)."""
    steps = cache.views_per_epoch // batch
    sampler = RankBatches(cache.epoch_plan, None, cache.stride, batch, check_every=check_every)
    out = []
    for epoch in cache.usable_epochs:
        sampler.views = epoch_views(epoch, cache.usable_epochs, cache.views_per_epoch, batch, steps, 64, 0,
                                    cache.stride)
        sampler.epoch = epoch
        out += list(sampler)
    return out


def timed(fn, batches) -> float:
    """Seconds per view of running `fn` over the batches."""
    t, n = time.perf_counter(), 0
    for b in batches:
        n += fn(b)
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a worker's share of a core
    tmp = tempfile.mkdtemp()
    size = 64 if args.smoke else 224
    data = camera_photos(f"{tmp}/photos", per_photo=2 if args.smoke else 8)
    source = open_source(str(data))
    recipe = Recipe(input_size=size)
    ckpt = f"{tmp}/teacher.safetensors"
    teacher = random_checkpoint("test_resnet" if args.smoke else "efficientnet_lite0", ckpt)
    epochs = 2 if args.smoke else 4
    cache = precompute(PrecomputeConfig(data=str(data), out=f"{tmp}/cache.zarr", teacher=teacher,
                                        teacher_checkpoint=ckpt, epochs=epochs, recipe=recipe, batch_size=32,
                                        workers=0, chunk_views=64, shard_views=128, same_label_space=True))
    tensor_cache = precompute(PrecomputeConfig(
        data=str(data), out=f"{tmp}/tensor.zarr", teacher=teacher, teacher_checkpoint=ckpt, epochs=epochs,
        recipe=Recipe(input_size=size, replay="tensor"), batch_size=32, workers=0, chunk_views=64, shard_views=128,
        same_label_space=True))
    batch = min(BATCH, cache.views_per_epoch)
    pairs = PairDataset(cache_source(cache, source), recipe, cache.fingerprint_kind, cache.signature_kind)
    read = CachedOutputs(cache.url)
    tensor_pairs = TensorPairDataset(cache_source(tensor_cache, source), tensor_cache.recipe)
    tensor_read = CachedOutputs(tensor_cache.url)
    tensor_batches = batches_of(tensor_cache, 8, batch)
    tensor_collated = [tensor_read(tensor_pairs.__getitems__(b)) for b in tensor_batches]
    plain = LabeledImages(source, build_transform(recipe))
    cached_batches = batches_of(cache, 8, batch)
    online_batches = batches_of(cache, 0, batch)
    ids = [i for batch in online_batches for item in batch for i in (item[1], item[2])]  # the images replayed

    def run_plain(batch):
        images = [plain[int(i)] for item in batch for i in (item[1], item[2])]
        default_collate(images)
        return len(images)

    def run_cache(batch):
        out = read(pairs.__getitems__(batch))
        assert "error" not in out, out.get("error")
        return len(out["view"])

    def run_online(batch):
        return len(CachedOutputs(None)(pairs.__getitems__(batch))["view"])

    def run_tensor_loader(batch):
        real = torch.utils.data.get_worker_info
        torch.utils.data.get_worker_info = lambda: True  # a worker's draws (replay._seeded)
        try:
            out = tensor_read(tensor_pairs.__getitems__(batch))
        finally:
            torch.utils.data.get_worker_info = real
        assert "error" not in out, out.get("error")
        return len(out["view"])

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def run_tensor_device(collated):
        collated = dict(collated, fingerprint=collated["fingerprint"].clone(),
                        signature=collated["signature"].clone())
        tensor_read.finish(tensor_pairs, collated, device)  # views made, then checked against the cache
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(collated["view"])

    modes = {"plain DeiT": (run_plain, online_batches), "cache": (run_cache, cached_batches),
             "online": (run_online, online_batches), "tensor loader": (run_tensor_loader, tensor_batches),
             f"tensor device work ({device.type})": (run_tensor_device, tensor_collated)}
    for fn, batches in modes.values():  # warm-up: imports, caches opened, first-use allocations
        fn(batches[0])
    per = {m: [] for m in modes}
    rng = random.Random(0)
    for _ in range(1 if args.smoke else args.repeats):
        order = list(modes)
        rng.shuffle(order)
        for m in order:
            fn, batches = modes[m]
            per[m].append(1000 * timed(fn, batches))
    ratios = [c / p for c, p in zip(per["cache"], per["plain DeiT"])]
    rows = [{"loader": m, "ms/view (median)": statistics.median(v), "min": min(v), "max": max(v)}
            for m, v in per.items()]
    rows.append({"loader": "cache / plain DeiT", "ms/view (median)": statistics.median(ratios), "min": min(ratios),
                 "max": max(ratios)})
    print(table(rows, ["loader", "ms/view (median)", "min", "max"]))
    inputs = {"input_size": size, "images": f"{len(source)} camera-like JPEGs (640x427 q90, scikit-image photos)",
              "recipe": "DeiT's full recipe, repeats 3", "batch_views": batch, "check_every": 8,
              "repeats": len(ratios), "threads": 1, "views_per_mode_and_repeat": len(online_batches) * batch,
              "unique_images_per_batch": float(np.mean([len({i for it in b for i in (it[1], it[2])})
                                                        for b in online_batches])),
              "distinct_images": len(set(ids))}
    path = save("data_path", args, rows, inputs, None,
                plain_ms_per_view=statistics.median(per["plain DeiT"]),
                cache_ms_per_view=statistics.median(per["cache"]),
                online_ms_per_view=statistics.median(per["online"]), ratio=statistics.median(ratios),
                tensor_loader_ms_per_view=statistics.median(per["tensor loader"]),
                **{f"tensor_device_{device.type}_ms_per_view":
                   statistics.median(per[f"tensor device work ({device.type})"])},
                per_repeat=per)
    print(f"\n{path}")


def cache_source(cache: Cache, source):
    """The dataset's samples in the cache's order (what `train` hands its workers)."""
    from cskd_cache.data.matching import match_samples

    ids, _ = match_samples(cache.sample_keys(), cache.sample_labels(), source)
    return source.subset(ids)


if __name__ == "__main__":
    main()
