"""The cache on disk: one Zarr v3 group, readable by any Zarr v3 reader, from any store zarr can open.

Layout (V = total views in plan order, view v = epoch * views_per_epoch + position):
  zarr.json                 group attributes hold the manifest under "cskd_cache"
  samples/key   uint8 [N, L]   sample keys, UTF-8, zero padded (a core Zarr dtype, unlike variable strings)
  samples/label int32 [N]
  plan/{sample,seed,partner,lam,mode,box} [E, P(, 4)]   the view plan, one chunk row per epoch
  views/fingerprint int64 [V]  hash of each view's pixels (replay drift detection)
  views/<encoding arrays> [V, ...]  sharded along V, compressed, crc32c on every chunk
  views/shard_done uint8 [S]   1 chunk per shard: written last, so a shard is complete iff its marker is 1
  spill/sNNNNNN/...            rows of positions that overflowed the ckf width, per shard (usually none)

Why: zarr 3.1 loses data when two processes write one shard (each write rewrites the whole shard), a missing
shard file silently reads as fill_value, and a flipped byte reads as wrong numbers without a chunk checksum.
So every shard is written by one process in one call, completion is recorded separately, and chunks carry crc32c.
"""

from __future__ import annotations

import asyncio
import os
import warnings

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from ..data.fingerprint import SIGNATURES
from ..data.plan import EpochPlan, PlanParams, make_epoch_plan
from ..data.recipe import Recipe
from ..data.source import key_str
from ..errors import CacheError
from .encoding import Encoding
from .encodings import encoding_from_description
from .manifest import (ATTR, FORMAT, FORMAT_VERSION, IDENTITY, PIL_FORMAT_VERSION, identity, make_layout,  # noqa: F401 - re-exported
                       manifest_mismatch, run_marker, without_epochs)
from .reader import ShardReader

def replay_specs(signature_kind: str = "sketch64", params_width: int = 0) -> dict:
    """The per-view replay records: a 64-bit pixel hash, a signature whose width its kind says and, in caches made
    with --replay tensor (format 4), each view's augmentation parameters (data/params.py: one int32 row)."""
    specs = {"fingerprint": ((), "int64"), "signature": ((SIGNATURES[signature_kind][2],), "int8")}
    if params_width:
        specs["params"] = ((params_width,), "int32")
    return specs


_PLAN_FIELDS = {"sample": "int64", "seed": "int64", "partner": "int64", "lam": "float32", "mode": "int8",
                "box": "int16"}


def _codecs(dtype: str = "int64", shuffle: bool = True, level: int = 9):
    """blosc-zstd at level 9 (decompression is as fast as at 5, and a cache is written once and read many times),
    byte-shuffled unless an array asks otherwise (1-byte types: nothing to shuffle): measured by
    `python -m benchmarks.storage`. crc32c on every chunk: a flipped byte is an error, not a wrong number."""
    shuffle = shuffle and np.dtype(dtype).itemsize > 1
    return [BloscCodec(cname="zstd", clevel=level, shuffle="shuffle" if shuffle else "noshuffle"), Crc32cCodec()]


def _zarr_url(url: str) -> str:
    """A single-file `.zarr.zip` (local or remote) is read through fsspec's zip filesystem."""
    if url.endswith(".zip") and not url.startswith("zip::"):
        return "zip::" + (url if "://" in url else "file://" + os.path.abspath(url))
    return url


def open_group(url: str, mode: str = "r", storage_options: dict | None = None):
    """A local path or any fsspec URL (s3://, gs://, http(s)://, memory://), or a .zarr.zip (read-only).
    Credentials and endpoints come from the usual environment variables (AWS_*, GOOGLE_*, ...)."""
    target = _zarr_url(url)
    zarr_format = {"zarr_format": 3} if mode == "r" else {}  # do not probe for v2 files (3 requests over HTTP)
    if target.startswith("zip::") and mode != "r":
        raise CacheError(f"{url}: a .zarr.zip is read-only; pull it into a folder to write to it")
    try:
        with warnings.catch_warnings():  # zarr notes that consolidated metadata is not in the v3 spec yet
            warnings.simplefilter("ignore", category=UserWarning)
            # writers never trust consolidated metadata: it is a snapshot taken at the last finalize
            kw = zarr_format if mode == "r" else {"use_consolidated": False}
            return zarr.open_group(target, mode=mode, storage_options=storage_options if "://" in target else None,
                                   **kw)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError) as e:
        raise CacheError(f"no cskd-cache at {url} ({type(e).__name__}); check the path or URL") from None
    except ImportError as e:  # an fsspec protocol whose package is missing
        raise CacheError(f"{url}: needs a package that is not installed ({str(e).splitlines()[0][:160]})") from None
    except Exception as e:  # noqa: BLE001 - remote stores raise their own kinds (HTTP 403, S3 access denied, ...)
        if "://" not in target:
            raise
        raise CacheError(f"cannot read {url} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); check the URL, "
                         "the server and the credentials") from None


def read_manifest(url: str, storage_options: dict | None = None) -> dict | None:
    """The manifest of the cskd-cache at `url` whatever its status, or None if there is no cskd-cache there."""
    try:
        group = open_group(url, "r", storage_options)
    except (CacheError, ValueError):
        return None
    manifest = group.attrs.get(ATTR)
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


class Cache:
    """A cache opened for reading (and, during precompute, for writing its own shards)."""

    def __init__(self, group: zarr.Group, url: str = ""):
        self.group, self.url = group, url
        manifest = group.attrs.get(ATTR)
        if not manifest or manifest.get("format") != FORMAT:
            raise CacheError(f"{url or group.store} is a Zarr group but not a cskd-cache (no manifest)")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CacheError(f"{url}: cache format {manifest['format_version']} is newer than this cskd-cache "
                             f"({FORMAT_VERSION}); upgrade cskd-cache")
        if manifest.get("status") == "creating":
            raise CacheError(f"{url}: this cache was never fully created (interrupted while writing its plan); "
                             "run the precompute command again")
        self.manifest = manifest
        try:
            layout = manifest["layout"]
            self.total_views = int(layout["total_views"])
            self.views_per_epoch = int(layout["views_per_epoch"])
            self.stride = int(layout.get("epoch_stride", self.views_per_epoch))  # format 1: epochs back to back
            self.shard_views = int(layout["shard_views"])
            self.num_shards = int(layout["num_shards"])
            grid = manifest["grid"]
            self.encoding: Encoding = encoding_from_description(manifest["encoding"], manifest["num_classes"],
                                                                grid[0] * grid[1])
            self._arrays = {name: group[f"views/{name}"] for name in self.encoding.arrays()}
            self.replay_specs = replay_specs(self.signature_kind, int(manifest.get("params", {}).get("width", 0)))
            self.replay_names = [n for n in self.replay_specs if n == "fingerprint" or n in manifest.get("replay", [])]
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CacheError(f"{url}: the manifest is damaged or inconsistent ({type(e).__name__}: {e}); the cache "
                             "cannot be read") from None

    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: dict | None = None) -> "Cache":
        return cls(open_group(url, mode, storage_options), url)

    # -- completeness -------------------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        """Real views (epochs x views per epoch); `total_views` also counts the padding of epoch slots."""
        return self.plan_params.epochs * self.views_per_epoch

    @property
    def epoch_aligned(self) -> bool:
        """Every shard lies within one epoch (format 2); format-1 shards may span two."""
        return self.stride % self.shard_views == 0

    def shard_range(self, shard: int) -> tuple[int, int]:
        """The views a shard holds: its slice of the view axis, less the padding at the end of an epoch slot."""
        start = shard * self.shard_views
        stop = min(start + self.shard_views, self.total_views)
        if self.stride > self.views_per_epoch:
            stop = min(stop, (start // self.stride) * self.stride + self.views_per_epoch)
        return start, stop

    def epoch_shards(self, epoch: int) -> range:
        first = epoch * self.stride
        return range(first // self.shard_views, (first + self.views_per_epoch - 1) // self.shard_views + 1)

    def held_epochs(self) -> list[int]:
        """Epochs whose shards are all written by this cache's run: what a (partial) copy can train from."""
        done = self.done_shards()
        return [e for e in range(self.plan_params.epochs) if all(done[s] for s in self.epoch_shards(e))]

    @property
    def usable_epochs(self) -> list[int]:
        """Epochs training may read: all of a complete cache, the held ones of a partial copy, none otherwise."""
        status = self.manifest.get("status")
        if status == "complete":
            return list(range(self.plan_params.epochs)) if bool(self.done_shards().all()) else []
        if status == "partial":
            return self.held_epochs()
        return []

    @property
    def run_marker(self) -> int:
        """What this cache's shard markers hold when done: its run id (format 2), 1 (format 1)."""
        return run_marker(self.manifest)

    def shard_markers(self) -> np.ndarray:
        """Every shard's marker. A finished cache keeps a copy of them all in one chunk (`views/shard_run`,
        written at finalize): one read instead of one per shard, which matters over HTTP. While a cache is being
        written, each shard's own marker (one file each: its owner writes it alone) is the truth."""
        finished = self.manifest.get("status") in ("complete", "partial")
        if finished and "shard_run" in self._view_names():
            return np.asarray(self.group["views/shard_run"][:]).astype(np.int64)
        arr = self.group["views/shard_done"]
        written = self._chunk_indices(arr)
        if written is None:  # a store that cannot list: read every marker
            return np.asarray(arr[:]).astype(np.int64)
        # zarr reads a missing chunk in about a millisecond: 300 epochs of ImageNet are 188k shards, so read only the
        # markers that exist (listed), in contiguous runs
        out = np.zeros(arr.shape[0], dtype=np.int64)
        for run in np.split(written, np.flatnonzero(np.diff(written) != 1) + 1) if len(written) else []:
            out[run[0]:run[-1] + 1] = np.asarray(arr[run[0]:run[-1] + 1])
        return out

    def _chunk_indices(self, arr) -> np.ndarray | None:
        """Sorted indices of the chunks of a 1-chunk-per-row array that exist in the store (None if it cannot list)."""
        from zarr.core.sync import sync

        async def names():
            return [k async for k in self.group.store.list_dir(f"{arr.path}/c/")]
        try:
            keys = sync(names())
        except (NotImplementedError, OSError, ValueError):
            return None
        return np.sort(np.array([int(k) for k in keys if k.isdigit()], dtype=np.int64))

    def planned_epochs(self) -> set[int]:
        """Epochs whose plan is written (plans are written as their epochs' first shards are: see write.py)."""
        from zarr.core.sync import sync

        async def names():
            return [k async for k in self.group.store.list_dir("plan/seed/c/")]
        try:
            return {int(k) for k in sync(names()) if k.isdigit()}
        except (NotImplementedError, OSError, ValueError):
            return set(range(self.plan_params.epochs))

    def _view_names(self) -> set[str]:
        if not hasattr(self, "_views_cache"):
            self._views_cache = set(self.group["views"].array_keys())
        return self._views_cache

    def done_shards(self) -> np.ndarray:
        """Shards written completely by this cache's own run. A marker left by another run (a second writer,
        an older cache at the same path) does not count; a partial copy holds only the shards of its epochs."""
        done = self.shard_markers() == self.run_marker
        if self.manifest.get("status") == "partial":
            held = np.zeros_like(done)
            for e in self.manifest.get("epochs_held", []):
                held[list(self.epoch_shards(e))] = True
            done &= held
        return done

    def foreign_shards(self) -> np.ndarray:
        markers = self.shard_markers()
        return np.flatnonzero((markers != 0) & (markers != self.run_marker))

    def layout_problems(self) -> list[str]:
        """Where the manifest and the arrays it describes disagree (shapes, dtypes, sample and plan sizes)."""
        m, problems = self.manifest, []
        want = {f"views/{k}": ((self.total_views, *v.shape), v.dtype) for k, v in self.encoding.arrays().items()}
        specs = self.replay_specs
        want.update({f"views/{k}": ((self.total_views, *specs[k][0]), specs[k][1]) for k in self.replay_names})
        want["views/shard_done"] = ((self.num_shards,), None)
        E, V = self.plan_params.epochs, self.views_per_epoch
        want.update({f"plan/{f}": ((E, V, 4) if f == "box" else (E, V), None) for f in _PLAN_FIELDS})
        n = m["dataset"].get("used_samples", m["dataset"]["num_samples"])
        want["samples/label"] = ((n,), None)
        for name, (shape, dtype) in want.items():
            try:
                a = self.group[name]
            except KeyError:
                problems.append(f"{name}: missing (the manifest describes it)")
                continue
            if tuple(a.shape) != tuple(shape) or (dtype is not None and str(a.dtype) != dtype):
                problems.append(f"{name}: shape {tuple(a.shape)} {a.dtype}, the manifest says {tuple(shape)} "
                                f"{dtype or ''}".rstrip())
        if self.plan_params.num_samples != n or V != self.plan_params.views_per_epoch or self.stride < V or \
                E * self.stride != self.total_views or -(-self.total_views // self.shard_views) != self.num_shards:
            problems.append(f"layout: {self.total_views} views in {self.num_shards} shards do not match a plan of "
                            f"{E} epochs x {self.plan_params.views_per_epoch} views over {n} samples")
        return problems

    def missing_shard_files(self, shard: int) -> list[str]:
        """Arrays whose file for this shard does not exist (zarr would read its fill value instead)."""
        from zarr.core.sync import sync

        missing = []
        for name in (f"views/{k}" for k in self.view_names):
            arr = self.group[name]
            key = f"{arr.path}/{arr.metadata.encode_chunk_key((shard,) + (0,) * (len(arr.shape) - 1))}"
            if not sync(self.group.store.exists(key)):
                missing.append(name)
        return missing

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete" and bool(self.done_shards().all())

    # -- reading ------------------------------------------------------------------------------------
    def sample_keys(self) -> list[str]:
        raw = np.asarray(self.group["samples/key"][:])
        return [key_str(bytes(r).rstrip(b"\0")) for r in raw]

    def sample_hashes(self) -> np.ndarray | None:
        """sha256 of each sample's image file, [N, 32] uint8, when precompute ran with --content-hash."""
        return np.asarray(self.group["samples/sha256"][:]) if "sha256" in self.group["samples"].array_keys() \
            else None

    def sample_labels(self) -> np.ndarray:
        return np.asarray(self.group["samples/label"][:]).astype(np.int64)

    @property
    def recipe(self) -> Recipe:
        """The augmentation recipe the views were made with (refuses fields this version cannot replay)."""
        return Recipe.from_dict(self.manifest["recipe"], where=f"cache {self.url}")

    @property
    def plan_params(self) -> PlanParams:
        return PlanParams(**self.manifest["plan"])

    def stored_plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(**{f: np.asarray(self.group[f"plan/{f}"][epoch]) for f in _PLAN_FIELDS})

    def plan_ok(self, epoch: int) -> bool:
        """The stored plan of an epoch equals the one its parameters define (a plan is a pure function of them)."""
        stored, want = self.stored_plan(epoch), make_epoch_plan(self.plan_params, epoch)
        return all(np.array_equal(getattr(stored, f), getattr(want, f)) for f in _PLAN_FIELDS)

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """The plan of one epoch, checked against its parameters: a damaged plan would silently pair every
        cached output with the wrong image. Read and checked once per epoch (samplers ask for it per pair: at
        ImageNet size a read and a regeneration cost 0.6 s), the last two epochs kept."""
        plans = self.__dict__.setdefault("_plans", {})
        if epoch not in plans:
            stored, want = self.stored_plan(epoch), make_epoch_plan(self.plan_params, epoch)
            if not all(np.array_equal(getattr(stored, f), getattr(want, f)) for f in _PLAN_FIELDS):
                raise CacheError(f"{self.url}: the stored plan of epoch {epoch} does not match the plan parameters "
                                 "(damaged, or written by an incompatible cskd-cache); run `cskd-cache verify`, and "
                                 "the precompute command again to repair it")
            while len(plans) >= 2:
                plans.pop(next(iter(plans)))
            plans[epoch] = stored
        return plans[epoch]

    @property
    def signature_kind(self) -> str:
        """How this cache summarised its views' pixels (format 3: sketch64; format 2: cells4x4)."""
        return self.manifest.get("signature", "cells4x4")

    @property
    def fingerprint_kind(self) -> str:
        """How this cache hashed its views' pixels (format-1 caches: blake2b over int32)."""
        return self.manifest.get("fingerprint", "blake2b-int32")

    @property
    def view_names(self) -> list[str]:
        """Every array along the view axis: the replay records and the encoded teacher outputs."""
        return [*self.replay_names, *self.encoding.arrays()]

    def read_replay(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {n: np.asarray(self.group[f"views/{n}"][start:stop]) for n in self.replay_names}

    def read_views(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], dict | None]:
        """Encoded teacher outputs of views [start, stop) (contiguous reads: fast on sharded arrays)."""
        return self._read_many(list(self._arrays), start, stop), self._read_spill(start, stop)

    def _read_many(self, names: list[str], start: int, stop: int) -> dict[str, np.ndarray]:
        """Several view arrays' [start, stop) in one pass of zarr's event loop (about 20% faster than one
        after the other: the per-call round trip to zarr's IO thread is a large part of a small read)."""
        from zarr.core.sync import sync

        arrays = [self.group[f"views/{n}"] for n in names]

        async def read_all():
            return await asyncio.gather(*(a._async_array.getitem((slice(start, stop),)) for a in arrays))

        return {n: np.asarray(x) for n, x in zip(names, sync(read_all()))}

    def gather(self, views: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict | None]:
        """Encoded outputs, replay records (fingerprint, signature) and spill rows (views counted in the given
        order) of any views, in request order. Read from the shard files by byte range (reader.py: about 10x
        zarr-python's per-call cost, the same bytes and checksums); `reader.zarr_gather` is the same read through
        zarr-python."""
        if getattr(self, "_reader", None) is None:
            self._reader = ShardReader(self)
        return self._reader.gather(views)

    def read_fingerprints(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.group["views/fingerprint"][start:stop])

    def _read_spill(self, start: int, stop: int) -> dict | None:
        shards = self.manifest.get("spill_shards") or []
        rows = []
        for s in shards:
            a, b = self.shard_range(s)
            if a < stop and b > start:
                g = self.group[f"spill/s{s:06d}"]
                view = np.asarray(g["view"][:])
                keep = (view >= start) & (view < stop)
                rows.append({"view": view[keep] - start, "pos": np.asarray(g["pos"][:])[keep],
                             "dense": np.asarray(g["dense"][:])[keep], "global": np.asarray(g["global"][:])[keep]})
        if not rows:
            return None
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    def bytes_per_view(self) -> dict:
        """Stored (compressed) bytes per view, per array: recorded at finalize (a web server cannot list folders),
        else from the files' sizes."""
        recorded = self.manifest.get("stored_bytes", {})
        out = {}
        for name, arr in self._arrays.items():
            stored = recorded.get(name)
            if stored is None:
                stored = arr.nbytes_stored() if callable(getattr(arr, "nbytes_stored", None)) else 0
            out[name] = {"stored": stored / max(self.num_views, 1),  # real views, not the padded slots
                         "raw": arr.nbytes / max(self.total_views, 1)}
        return out


def _local_root(url: str) -> str | None:
    if "://" in url and not url.startswith("file://"):
        return None
    return url.removeprefix("file://")


def to_torch(arrays: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}
