"""Creating and writing a cache: the group, the plan, shards with their markers, finalising, extending.

Why it is written the way it is (see store.py for the layout): zarr 3.1 loses data when two processes write one
shard (each write rewrites the whole shard), a missing shard file silently reads as fill_value, and a flipped byte
reads as wrong numbers without a chunk checksum. So every shard is written by one process in one call, flushed,
then marked done with the run's id; completion and the checksum list are recorded when the cache is finished.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import uuid
import warnings

import numpy as np
import zarr

from .. import __version__
from ..data.plan import EpochPlan, make_epoch_plan
from ..data.source import key_bytes
from ..errors import CacheError
from .encoding import Encoding
from .files import write_checksums
from .store import (ATTR, _PLAN_FIELDS, Cache, _codecs, _local_root, make_layout, open_group, read_manifest,
                    replay_specs)


def remove_cache(url: str) -> None:
    """Delete a cache that is ours. Locally the folder is first renamed aside (one atomic step), so an interrupted
    delete leaves `PATH.deleting-*`, never a half-deleted cache at PATH that no longer looks like one."""
    root = _local_root(url)
    if root is None:
        zarr.open_group(url, mode="w")  # remote: zarr's own delete
        return
    if not os.path.exists(root):
        return
    aside = f"{root.rstrip('/')}.deleting-{uuid.uuid4().hex[:8]}"
    os.rename(root, aside)
    shutil.rmtree(aside, ignore_errors=True)


def create_cache(url: str, manifest: dict, keys: list[str], labels: list[int], encoding: Encoding,
                 chunk_views: int, overwrite: bool, hashes: np.ndarray | None = None) -> Cache:
    """Create the group, all arrays and the samples; only then mark it 'incomplete' (ready for shards). Until that
    last write the manifest says 'creating': recognisably ours, never usable, and redone from scratch by the next
    run. An epoch's plan is written with its first shard, before that shard's marker (`write_shard`): nothing that
    marks a cache usable is written before the plan it depends on, and start-up does not grow with epochs x
    samples (300 epochs of ImageNet are 14 GB of plan). Each creation gets a run id; shard markers carry it, so
    shards another run wrote never count as done."""
    manifest = dict(manifest, status="creating", created=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                    tool_version=__version__, spill_shards=[], run_id=uuid.uuid4().hex, fingerprint="sha1-int16",
                    signature="sketch64")
    specs = replay_specs("sketch64", int(manifest.get("params", {}).get("width", 0)))
    manifest["replay"] = list(specs)
    if overwrite:
        remove_cache(url)
    # one write of zarr.json that already carries the manifest: there is no moment where it is a bare group
    group = zarr.create_group(url, overwrite=False, attributes={ATTR: manifest})
    total = manifest["layout"]["total_views"]
    shard_views = manifest["layout"]["shard_views"]
    raw = [key_bytes(k) for k in keys]
    encoded = np.zeros((len(keys), max(1, max(len(b) for b in raw))), dtype=np.uint8)
    for i, b in enumerate(raw):
        encoded[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    _write_array(group, "samples/key", encoded, chunks=(min(65536, len(keys)), encoded.shape[1]))
    _write_array(group, "samples/label", np.asarray(labels, dtype=np.int32), chunks=(min(1 << 20, len(keys)),))
    if hashes is not None:  # lets another packaging of the same images be matched by content
        _write_array(group, "samples/sha256", np.asarray(hashes, dtype=np.uint8), chunks=(min(65536, len(keys)), 32))
    epochs, vpe = manifest["plan"]["epochs"], manifest["layout"]["views_per_epoch"]
    for f, dt in _PLAN_FIELDS.items():
        shape = (epochs, vpe, 4) if f == "box" else (epochs, vpe)
        group.create_array(f"plan/{f}", shape=shape, chunks=(1,) + shape[1:], dtype=dt, fill_value=0,
                           compressors=_codecs(dt, level=PLAN_LEVEL))
    for name, (shape, dtype) in specs.items():
        group.create_array(f"views/{name}", shape=(total, *shape), chunks=(chunk_views, *shape),
                           shards=(shard_views, *shape), dtype=dtype, fill_value=0, compressors=_codecs(dtype))
    for name, spec in encoding.arrays().items():
        group.create_array(f"views/{name}", shape=(total,) + tuple(spec.shape),
                           chunks=(chunk_views,) + tuple(spec.shape), shards=(shard_views,) + tuple(spec.shape),
                           dtype=spec.dtype, fill_value=spec.fill, compressors=_codecs(spec.dtype, spec.shuffle))
    group.create_array("views/shard_done", shape=(manifest["layout"]["num_shards"],), chunks=(1,), dtype="int64",
                       fill_value=0)
    group.attrs[ATTR] = dict(manifest, status="incomplete")
    return Cache(group, url)


def _write_array(group, name: str, data: np.ndarray, chunks) -> None:
    arr = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype, fill_value=0,
                             compressors=_codecs(data.dtype))
    arr[...] = data


# The plan is a permutation and random seeds: zstd's level 9 spends 20 s an epoch at ImageNet size on what does not
# compress, level 3 0.5 s for 10% more bytes (decompression is as fast).
PLAN_LEVEL = 3


def write_epoch_plan(group: zarr.Group, epoch: int, plan: EpochPlan) -> None:
    for f in _PLAN_FIELDS:
        group[f"plan/{f}"][epoch] = getattr(plan, f)


def ensure_epoch_plan(cache: Cache, epoch: int) -> None:
    """Write an epoch's plan unless this process has written or checked it already (several ranks may write one
    epoch's plan: every chunk is written whole, with the same bytes)."""
    seen = cache.__dict__.setdefault("_plans_written", set())
    if epoch not in seen:
        if epoch not in cache.planned_epochs() or not cache.plan_ok(epoch):
            write_epoch_plan(cache.group, epoch, make_epoch_plan(cache.plan_params, epoch))
        seen.add(epoch)


def repair_plan(cache: Cache) -> list[int]:
    """Rewrite every written epoch plan that differs from its parameters, and mark that epoch's shards undone
    (outputs computed on a wrong plan belong to other images). Returns the epochs repaired."""
    bad = [e for e in sorted(cache.planned_epochs()) if not cache.plan_ok(e)]
    for e in bad:
        write_epoch_plan(cache.group, e, make_epoch_plan(cache.plan_params, e))
        for s in cache.epoch_shards(e):
            cache.group["views/shard_done"][s] = 0
    return bad


def _fsync_shard(cache: Cache, shard: int, names: list[str]) -> None:
    """Flush a shard's files to disk before its marker says it is done (zarr writes atomically, not durably).
    Local stores only: an object store's PUT is durable when it returns."""
    root = _local_root(cache.url)
    if root is None:
        return
    dirs = set()
    for name in names:
        arr = cache.group[name]
        coords = (shard,) + (0,) * (len(arr.shape) - 1)
        path = os.path.join(root, arr.path, arr.metadata.encode_chunk_key(coords))
        if os.path.exists(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(os.path.dirname(path))
    for d in dirs:  # the renames that made the files appear
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_shard(cache: Cache, shard: int, arrays: dict[str, np.ndarray], replay: dict[str, np.ndarray],
                spill: dict[str, np.ndarray] | None) -> None:
    """Write one whole shard (one call per array), then its completion marker. Only its owner calls this."""
    start, stop = cache.shard_range(shard)
    stale = f"spill/s{shard:06d}"
    if stale in cache.group:  # rows of an earlier attempt (another device can round differently)
        del cache.group[stale]
    if spill is not None and len(spill["view"]):
        g = cache.group.require_group(f"spill/s{shard:06d}")
        for k, v in spill.items():
            v = np.asarray(v)
            if k == "view":
                v = v + start  # stored as global view indices
            a = g.create_array(k, shape=v.shape, chunks=v.shape, dtype=v.dtype, fill_value=0,
                               compressors=_codecs(v.dtype), overwrite=True)
            a[...] = v
    for name, data in {**arrays, **replay}.items():
        cache.group[f"views/{name}"][start:stop] = data
    _fsync_shard(cache, shard, [f"views/{name}" for name in {**arrays, **replay}])
    for epoch in range(start // cache.stride, (stop - 1) // cache.stride + 1):  # the plan before the marker
        ensure_epoch_plan(cache, epoch)
    cache.group["views/shard_done"][shard] = cache.run_marker
    _fsync_shard(cache, shard, ["views/shard_done"])


def finalize(cache: Cache, epochs: list[int] | None = None) -> None:
    """Mark the cache complete once every shard is done (or `partial` when only `epochs` were asked for and they
    are done); record spill shards; write the checksum list; consolidate metadata for HTTP readers."""
    cache.manifest = dict(cache.manifest, status="incomplete")  # judge by the per-shard markers, not a snapshot
    done = cache.done_shards()
    held = cache.held_epochs()
    partial = epochs is not None and not done.all()
    if partial and not set(epochs) <= set(held):
        raise CacheError(f"{cache.url}: epochs {sorted(set(epochs) - set(held))} are not finished; run the same "
                         "command again to finish them")
    if not partial and not done.all():
        raise CacheError(f"{cache.url}: {int((~done).sum())} of {len(done)} shards are missing; run the same "
                         "command again to finish them")
    latest = read_manifest(cache.url)
    if latest is None or latest.get("run_id") != cache.manifest.get("run_id"):  # replaced under our feet
        raise CacheError(f"{cache.url} was replaced by another run while this one wrote it; it was not finalised")
    spill = sorted(int(name[1:]) for name in cache.group["spill"].group_keys()) if "spill" in cache.group else []
    extra = {"status": "partial", "epochs_held": held} if partial else {"status": "complete"}
    manifest = {k: v for k, v in cache.manifest.items() if k not in ("epochs_held", "files")}
    manifest = dict(manifest, spill_shards=spill, completed=_dt.datetime.now(_dt.timezone.utc).isoformat(), **extra)
    manifest["stored_bytes"] = {name: int(arr.nbytes_stored()) for name, arr in cache._arrays.items()}
    # the per-shard markers are the truth (read them before replacing the snapshot, which may be stale)
    truth = np.asarray(cache.group["views/shard_done"][:]).astype(np.int64)
    markers = cache.group.create_array("views/shard_run", shape=(cache.num_shards,), chunks=(cache.num_shards,),
                                       dtype="int64", fill_value=0, compressors=_codecs(), overwrite=True)
    markers[:] = truth
    # every file but the root zarr.json, hashed: a mirror or a partial copy can be checked without Zarr
    manifest["files"] = write_checksums(cache.url)
    cache.group.attrs[ATTR] = manifest
    cache.manifest = manifest
    with warnings.catch_warnings():  # consolidated metadata is how HTTP readers (no listing) find the arrays
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(cache.group.store)


def extend_cache(cache: Cache, epochs: int) -> None:
    """More epochs of the same plan: the arrays grow along the view axis (new shard files only, so the existing
    epochs' files are untouched), and the cache is incomplete until the new epochs (and their plans) are written."""
    if not cache.epoch_aligned:
        raise CacheError(f"{cache.url}: a format-1 cache (shards span epochs) cannot be extended; precompute a "
                         "new one")
    layout = make_layout(epochs, cache.views_per_epoch, cache.manifest["layout"]["chunk_views"], cache.shard_views)
    for name in cache.view_names:
        arr = cache.group[f"views/{name}"]
        arr.resize((layout["total_views"], *arr.shape[1:]))
    cache.group["views/shard_done"].resize((layout["num_shards"],))
    if "shard_run" in cache.group["views"].array_keys():  # the finished snapshot; rewritten at finalize
        del cache.group["views/shard_run"]
    for f in _PLAN_FIELDS:
        arr = cache.group[f"plan/{f}"]
        arr.resize((epochs, *arr.shape[1:]))
    manifest = {k: v for k, v in cache.manifest.items() if k not in ("epochs_held", "files")}
    manifest = dict(manifest, status="incomplete", layout=layout, plan=dict(manifest["plan"], epochs=epochs))
    cache.group.attrs[ATTR] = manifest
    cache.manifest = manifest
    with warnings.catch_warnings():  # readers that use consolidated metadata must see the new shapes
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(cache.group.store)
    cache.__init__(open_group(cache.url, "r+"), cache.url)  # re-read sizes from the new manifest
