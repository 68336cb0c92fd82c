"""Stage one: run the teacher once over every planned view and write its outputs, shard by shard.

Resumable by construction: a shard is either marked done (and never recomputed) or redone from its start, and a
shard's batches are always the same, so a resumed cache equals an uninterrupted one array for array. Under
torchrun, rank r owns shards r, r + world, ...: no two processes ever write one shard.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor
import threading
from functools import lru_cache
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

from ..cache import store, write
from ..cache.encodings import ENCODINGS, make_encoding
from ..cache.lock import WriterLock
from ..cache.share import parse_epochs
from ..data.matching import content_hash
from ..data.open import open_source
from ..data.recipe import Recipe
from ..data import kernels
from ..data.params import Drawer
from ..data.plan import make_epoch_plan
from ..data.replay import collate_pairs, pair_items
from ..data.views import pair_dataset
from ..data.source import find_bad_images
from ..distributed import Dist, init_distributed
from ..errors import CacheError
from .model import create_teacher, resolve_precision


@dataclass
class PrecomputeConfig:
    data: str
    out: str
    teacher: str
    pretrained: bool = False
    teacher_checkpoint: str | None = None
    epochs: int = 300  # one per training epoch of DeiT's recipe: fresh views every epoch, the paper's condition
    encoding: str = "ckf"
    ckf_width: int = 8
    topk: int = 10
    global_topk: int = 10
    repeats: int = 3  # DeiT's and CSKD's repeated augmentation
    seed: int = 0
    recipe: Recipe = field(default_factory=Recipe)
    # views per teacher batch (even: views come in mixing pairs); None: 256 on a GPU (fewer, larger launches keep it
    # busy; a forward without gradients holds one batch's activations), 64 on a CPU (more only costs memory there)
    batch_size: int | None = None
    workers: int = 4
    chunk_views: int = 64
    shard_views: int = 2048
    skip_bad: bool = False
    overwrite: bool = False
    device: str | None = None
    teacher_precision: str = "auto"  # fp16 autocast on a GPU (official), fp32 on a CPU
    content_hash: bool = False  # store each image file's sha256: train --match content then finds them anywhere
    compile: bool = False  # torch.compile the teacher (pays off on a GPU, for long runs)
    same_label_space: bool = False  # --data's labels are the teacher's class ids (e.g. ImageNet images, ImageNet labels)
    only_epochs: str | None = None  # compute these epochs only ('15-29'): a partial cache, for merging later
    max_shards: int | None = None  # stop after this many shards (for tests of interruption and for budgets)


def check_label_space(data_classes: int, max_label: int, teacher_classes: int, same_label_space: bool) -> None:
    """A teacher's outputs are targets only in its own label space: a 1000-class ImageNet teacher over a 4-class
    dataset would train a 1000-way student on nothing useful. Refused unless the user says the dataset's labels
    ARE the teacher's class ids (a subset of ImageNet with ImageNet labels)."""
    if max_label >= teacher_classes:
        raise CacheError(f"--data has labels up to {max_label} but the teacher has {teacher_classes} classes; "
                         "fine-tune the teacher on this dataset first (cskd-cache fit-teacher)")
    if data_classes != teacher_classes and not same_label_space:
        raise CacheError(f"the teacher has {teacher_classes} classes but --data has {data_classes}; fine-tune it on "
                         "this dataset first (cskd-cache fit-teacher), or pass --same-label-space if the dataset's "
                         "labels are the teacher's class ids (e.g. ImageNet images with ImageNet labels)")


def _check(cfg: PrecomputeConfig) -> None:
    """Every value where it enters: nothing invalid is ever recorded in a manifest."""
    if cfg.batch_size is not None and (cfg.batch_size < 2 or cfg.batch_size % 2):
        raise CacheError("--batch-size must be an even number >= 2 (views are mixed in pairs)")
    if cfg.chunk_views < 2 or cfg.chunk_views % 2 or cfg.shard_views % cfg.chunk_views:
        raise CacheError("--shard-views must be a multiple of --chunk-views, and both even")
    for flag, v in (("--epochs", cfg.epochs), ("--repeats", cfg.repeats), ("--ckf-width", cfg.ckf_width),
                    ("--topk", cfg.topk), ("--global-topk", cfg.global_topk), ("--workers", cfg.workers + 1)):
        if v < 1:
            raise CacheError(f"{flag} must be >= 1, got {v if flag != '--workers' else v - 1}")
    if cfg.encoding not in ENCODINGS:
        raise CacheError(f"--encoding {cfg.encoding!r}: use one of {', '.join(ENCODINGS)}")
    cfg.recipe.check()
    if cfg.recipe.replay == "tensor":
        Drawer(cfg.recipe)  # refuses, before any work, a recipe the tensor kernels cannot express


def _existing_manifest(out: str) -> dict | None:
    """The manifest at --out, whatever its status; None where there is nothing. Refuses a folder that is not ours
    (even with --overwrite, which would delete it)."""
    manifest = store.read_manifest(out)
    # zarr's atomic writes may leave *.partial files if killed: they are not somebody else's data
    if manifest is None and os.path.isdir(out) and [f for f in os.listdir(out) if not f.endswith(".partial")]:
        raise CacheError(f"--out {out} exists and is not a cskd-cache; choose another path")
    return manifest


def build_manifest(cfg: PrecomputeConfig, source, teacher_info: dict, grid, num_classes: int,
                   bad: list[str], encoding) -> dict:
    params = cfg.recipe.plan_params(len(source), cfg.epochs, cfg.seed, cfg.repeats)
    tensor = cfg.recipe.replay == "tensor"  # format 4: each view's augmentation parameters are stored
    # the kernels' revision too: a revision that changes pixels is then named when views drift
    extra = {"params": Drawer(cfg.recipe).describe() | {"kernels_revision": kernels.REVISION}} if tensor else {}
    return {
        "format": store.FORMAT, "format_version": store.FORMAT_VERSION if tensor else store.PIL_FORMAT_VERSION,
        **extra,
        "teacher": dict(teacher_info, input_size=cfg.recipe.input_size),
        "dataset": source.describe(),
        "recipe": cfg.recipe.to_dict(),
        "plan": params.to_dict(),
        "encoding": encoding.describe(),
        "grid": list(grid), "num_classes": num_classes,
        "layout": store.make_layout(params.epochs, params.views_per_epoch, cfg.chunk_views, cfg.shard_views),
        "bad_samples": bad,
    }


class _Pending:
    """A batch's encoded outputs on their way to the host: on CUDA the copies start into pinned memory and an event
    marks them, so the next teacher batch is queued without waiting; the writer thread settles them (waits for the
    event, then, for ckf, `settle`s the sync-free encode: the exact encode again in the rare batch that needs it)."""

    def __init__(self, encoding, arrays: dict, spill: dict | None, inputs: tuple | None):
        self.event, self.settled = None, None
        self.encoding, self.arrays, self.spill, self.inputs = encoding, arrays, spill, inputs
        if any(v.is_cuda for v in arrays.values()):
            self.arrays, self.spill = _pinned(arrays), None if spill is None else _pinned(spill)
            self.event = torch.cuda.Event()
            self.event.record()
        else:  # nothing to wait for on a CPU: settle now, and hold no teacher outputs (200 KB a view at 1000 classes)
            self.settled = self.settle()

    def settle(self) -> tuple[dict, dict | None]:
        if self.settled is not None:
            return self.settled
        if self.event is not None:
            self.event.synchronize()
        arrays = {k: v.numpy() for k, v in self.arrays.items()}
        spill = None if self.spill is None else {k: v.numpy() for k, v in self.spill.items()}
        if self.inputs is not None:  # a deferred (sync-free) ckf encode
            arrays, spill = self.encoding.settle(arrays, spill, *self.inputs)
        self.arrays = self.spill = self.inputs = None
        return arrays, spill


def _pinned(tensors: dict) -> dict:
    return {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True) if v.is_cuda
            else v for k, v in tensors.items()}


class _Writer(threading.Thread):
    """Writes finished shards in the background so the teacher never waits on storage (nor on its outputs'
    copies to the host: the writer settles them, `_Pending`)."""

    def __init__(self, cache: store.Cache):
        super().__init__(daemon=True)
        self.cache, self.jobs, self.error = cache, queue.Queue(maxsize=2), None

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    write.write_shard(self.cache, *_assemble(self.cache, *job))
                except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                    self.error = e

    def put(self, job) -> None:
        self._raise()
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            e = self.error
            if isinstance(e, OSError):
                raise CacheError(f"writing {self.cache.url} failed: {e.strerror or e} (free space or fix the "
                                 "storage, then run the same command again to resume)") from None
            raise e


def precompute(cfg: PrecomputeConfig, dist: Dist | None = None) -> store.Cache:
    _check(cfg)
    dist = dist or init_distributed()
    device = dist.device(cfg.device)
    if cfg.batch_size is None:
        cfg = replace(cfg, batch_size=256 if device.type == "cuda" else 64)
    source = open_source(cfg.data)
    teacher, teacher_info = create_teacher(cfg.teacher, pretrained=cfg.pretrained,
                                           checkpoint=cfg.teacher_checkpoint, view_mean=cfg.recipe.mean,
                                           view_std=cfg.recipe.std,
                                           precision=resolve_precision(cfg.teacher_precision, device))
    teacher = teacher.to(device)
    grid = teacher.grid(cfg.recipe.input_size)
    num_classes = teacher_info["num_classes"]
    teacher_info["global_equals_output"] = teacher.check_global_equals_output(cfg.recipe.input_size)
    encoding = make_encoding(cfg.encoding, num_classes, grid[0] * grid[1], ckf_width=cfg.ckf_width,
                             topk=cfg.topk, global_topk=cfg.global_topk)
    check_label_space(len(source.classes), max(source.labels), num_classes, cfg.same_label_space)

    # Rank 0 holds the writer lock for the whole run (the job's other ranks write only their own shards).
    lock = WriterLock(cfg.out) if dist.main else None
    try:
        if lock is not None:
            lock.acquire()
            _prepare(cfg, source, teacher_info, grid, num_classes, encoding)
        dist.barrier()
        cache = store.Cache.open(cfg.out, mode="r+")
        bad = set(cache.manifest["bad_samples"])
        used = source.subset([i for i, k in enumerate(source.keys) if k not in bad]) if bad else source
        only = parse_epochs(cfg.only_epochs, cache.plan_params.epochs)
        _run_shards(cfg, cache, used, teacher, encoding, dist, device, only)
        dist.barrier()
        if dist.main and (cache.done_shards().all() or only is not None and set(only) <= set(cache.held_epochs())):
            write.finalize(cache, only)
        dist.barrier()
    finally:
        if lock is not None:
            lock.release()
    return store.Cache.open(cfg.out)  # as finalised: every rank reports the same state


def _prepare(cfg: PrecomputeConfig, source, teacher_info: dict, grid, num_classes: int, encoding) -> None:
    """Rank 0: create the cache, or check that the one at --out is this run's and repair its plan."""
    old = _existing_manifest(cfg.out)
    if old is not None and old.get("status") == "creating":
        old = None  # ours, but never finished being created: nothing in it is worth keeping
        overwrite = True
    else:
        overwrite = cfg.overwrite
    old_bad = set((old or {}).get("bad_samples", []))
    bad_ids = [i for i, k in enumerate(source.keys) if k in old_bad]
    if cfg.skip_bad and (old is None or cfg.overwrite or not old_bad):
        bad_ids = find_bad_images(source, workers=cfg.workers)
    used = source.subset([i for i in range(len(source)) if i not in set(bad_ids)]) if bad_ids else source
    if len(used) < 2:
        raise CacheError(f"--data {cfg.data}: {len(used)} usable image(s) of {len(source)}; a cache needs at least "
                         "2 (views are mixed in pairs)")
    manifest = build_manifest(cfg, used, teacher_info, grid, num_classes, [source.keys[i] for i in bad_ids],
                              encoding)
    manifest["dataset"] = dict(source.describe(), used_samples=len(used))
    if cfg.same_label_space:  # part of the identity: the labels mean the teacher's classes
        manifest["dataset"]["label_space"] = "teacher"
    if old is not None and not cfg.overwrite:
        why = store.manifest_mismatch(old, manifest)
        same_plan = store.without_epochs(store.identity(old)) == store.without_epochs(store.identity(manifest))
        if why and same_plan and manifest["plan"]["epochs"] > old["plan"]["epochs"]:
            cache = store.Cache.open(cfg.out, mode="r+")
            print(f"note: extending {cfg.out} from {old['plan']['epochs']} to {manifest['plan']['epochs']} epochs "
                  "(the epochs it holds stay as they are)")
            write.extend_cache(cache, manifest["plan"]["epochs"])
            return
        if why and same_plan:
            raise CacheError(f"--out {cfg.out} holds {old['plan']['epochs']} epochs of this plan; --epochs "
                             f"{manifest['plan']['epochs']} would drop some: use `cskd-cache pull {cfg.out} NEW "
                             "--epochs ...` to take a subset, or pass the cache's own --epochs")
        if why and cfg.skip_bad and not old_bad and manifest["bad_samples"] and old.get("status") != "complete":
            # the run that stopped at a bad image, now given --skip-bad: skipping changes the plan, start over
            print(f"note: skipping {len(manifest['bad_samples'])} undecodable images changes the plan; "
                  f"{cfg.out} is started again")
            overwrite = True
        elif why:
            raise CacheError(f"--out {cfg.out} holds a cache made with {why}; pass --overwrite to replace it "
                             "or choose another --out")
        else:
            cache = store.Cache.open(cfg.out, mode="r+")
            repaired = write.repair_plan(cache)
            if repaired:
                print(f"note: the stored plan of epochs {repaired} did not match its parameters; rewritten, and "
                      "their shards will be computed again")
            return
    hashes = None
    if cfg.content_hash:
        with ThreadPoolExecutor(max(1, cfg.workers)) as ex:
            hashes = np.stack([np.frombuffer(h, np.uint8) for h in tqdm(
                ex.map(lambda i: content_hash(used.read_bytes(i)), range(len(used))), total=len(used),
                desc="hashing images", unit="img", disable=None)])
        manifest["dataset"]["content_hashes"] = "sha256 of each image file, samples/sha256"
    write.create_cache(cfg.out, manifest, used.keys, used.labels, encoding, cfg.chunk_views, overwrite=overwrite,
                       hashes=hashes)


class ShardBatches:
    """The batch sampler of precompute: the batches of the given shards in order, made as the loader asks for them
    (never the whole plan at once: 300 epochs of ImageNet would be 14 GB of plan entries before the first teacher
    batch). A batch lies within one shard and one epoch and is always cut the same way, so a redone shard equals its
    first attempt. Plans come from the cache's parameters (a pure function); the writer stores each epoch's plan with
    its first shard."""

    def __init__(self, cache: store.Cache, shards: list[int], batch_size: int):
        self.cache, self.shards, self.batch_size = cache, shards, batch_size
        self.plan = lru_cache(maxsize=2)(lambda e: make_epoch_plan(cache.plan_params, e))

    def _cuts(self, shard: int):
        start, stop = self.cache.shard_range(shard)
        stride = self.cache.stride
        for a in range(start, stop, self.batch_size):
            b = min(a + self.batch_size, stop)
            # a batch never spans epochs (format-1 shards can): split at each boundary
            cuts = [a, *range((a // stride + 1) * stride, b, stride), b]
            yield from zip(cuts, cuts[1:])

    def __len__(self) -> int:
        if self.cache.epoch_aligned:
            return sum(-(-(b - a) // self.batch_size) for a, b in map(self.cache.shard_range, self.shards))
        return sum(1 for s in self.shards for _ in self._cuts(s))

    def __iter__(self):
        for s in self.shards:
            for lo, hi in self._cuts(s):
                yield pair_items(self.plan, np.arange(lo, hi), self.cache.stride)  # every view fingerprinted


def _run_shards(cfg, cache: store.Cache, source, teacher, encoding, dist: Dist, device, only=None) -> None:
    done = cache.done_shards()
    wanted = range(cache.num_shards) if only is None else sorted({s for e in only for s in cache.epoch_shards(e)})
    mine = [s for s in wanted if s % dist.world == dist.rank and not done[s]]
    if cfg.max_shards is not None:
        mine = mine[: cfg.max_shards]
    batches = ShardBatches(cache, mine, cfg.batch_size)
    dataset = pair_dataset(source, cache.recipe, cache.fingerprint_kind, cache.signature_kind)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=cfg.workers, collate_fn=collate_pairs,
        pin_memory=device.type == "cuda", persistent_workers=False, prefetch_factor=4 if cfg.workers else None)
    use_amp = device.type == "cuda"
    if use_amp:
        teacher = teacher.to(memory_format=torch.channels_last)
    if cfg.compile:
        teacher = torch.compile(teacher)
    writer = _Writer(cache)
    writer.start()
    total = sum(cache.shard_range(s)[1] - cache.shard_range(s)[0] for s in mine)
    bar = tqdm(total=total, unit="view", desc=f"precompute[{dist.rank}]", disable=None, dynamic_ncols=True)
    parts, shard = [], None
    try:
        for batch in loader:
            if "error" in batch:
                raise CacheError(f"--data: {batch['error']}")
            first = int(batch["view"][0])
            if parts and first // cache.shard_views != shard:  # the previous shard is whole: hand it to the writer
                writer.put((shard, parts))
                parts = []
            shard = first // cache.shard_views
            x = dataset.finish(batch, device)  # normalise, erase, mix: on the device, as training does
            if use_amp:
                x = x.contiguous(memory_format=torch.channels_last)
            dense, glob = teacher(x)  # under the teacher's own precision (autocast inside)
            # ckf encodes without a host sync (a bounded analysis, checked when its outputs reach the host)
            deferred = encoding.name == "ckf"
            enc, spill = encoding.encode(dense, glob, deferred=True) if deferred else encoding.encode(dense, glob)
            replay = {k: batch[k].numpy() for k in cache.replay_names}  # format 1 (resumed): fingerprint only
            parts.append((_Pending(encoding, enc, spill, (dense, glob) if deferred else None), replay, first))
            bar.update(len(x))
        if parts:
            writer.put((shard, parts))
    finally:
        bar.close()
    writer.close()


def _assemble(cache: store.Cache, shard: int, pending: list) -> tuple:
    parts = [(arrays, replay, spill, first) for p, replay, first in pending for arrays, spill in [p.settle()]]
    start, _ = cache.shard_range(shard)
    arrays = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    replay = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
    spills = [dict(s, view=s["view"] + (v0 - start)) for _, _, s, v0 in parts if s is not None and len(s["view"])]
    spill = {k: np.concatenate([s[k] for s in spills]) for k in spills[0]} if spills else None
    return shard, arrays, replay, spill
