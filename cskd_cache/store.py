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

import datetime as _dt
import json
import warnings

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from . import __version__
from .encodings import Encoding, encoding_from_description
from .errors import CacheError
from .plan import EpochPlan

FORMAT = "cskd-cache"
FORMAT_VERSION = 1
ATTR = "cskd_cache"
# Manifest sections that must match for a resumed run to write into an existing cache.
IDENTITY = ("teacher", "dataset", "recipe", "plan", "encoding", "layout", "grid", "num_classes", "bad_samples")

_PLAN_FIELDS = {"sample": "int64", "seed": "int64", "partner": "int64", "lam": "float32", "mode": "int8",
                "box": "int16"}


def _codecs():
    return [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec()]


def open_group(url: str, mode: str = "r", storage_options: dict | None = None):
    """A local path or any fsspec URL (s3://, gs://, http(s)://, memory://, zip via fsspec)."""
    try:
        return zarr.open_group(url, mode=mode, storage_options=storage_options if "://" in url else None)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError) as e:
        raise CacheError(f"no cskd-cache at {url} ({type(e).__name__}); check --cache / the path") from None


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
        self.manifest = manifest
        layout = manifest["layout"]
        self.total_views = layout["total_views"]
        self.views_per_epoch = layout["views_per_epoch"]
        self.shard_views = layout["shard_views"]
        self.num_shards = layout["num_shards"]
        grid = manifest["grid"]
        self.encoding: Encoding = encoding_from_description(manifest["encoding"], manifest["num_classes"],
                                                            grid[0] * grid[1])
        self._arrays = {name: group[f"views/{name}"] for name in self.encoding.arrays()}

    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: dict | None = None) -> "Cache":
        return cls(open_group(url, mode, storage_options), url)

    # -- completeness -------------------------------------------------------------------------------
    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_views
        return start, min(start + self.shard_views, self.total_views)

    def done_shards(self) -> np.ndarray:
        return np.asarray(self.group["views/shard_done"][:]).astype(bool)

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete" and bool(self.done_shards().all())

    # -- reading ------------------------------------------------------------------------------------
    def sample_keys(self) -> list[str]:
        raw = np.asarray(self.group["samples/key"][:])
        return [bytes(r).rstrip(b"\0").decode("utf-8") for r in raw]

    def sample_labels(self) -> np.ndarray:
        return np.asarray(self.group["samples/label"][:]).astype(np.int64)

    def epoch_plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(**{f: np.asarray(self.group[f"plan/{f}"][epoch]) for f in _PLAN_FIELDS})

    def read_views(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], dict | None]:
        """Encoded teacher outputs of views [start, stop) (contiguous reads: fast on sharded arrays)."""
        arrays = {name: np.asarray(arr[start:stop]) for name, arr in self._arrays.items()}
        return arrays, self._read_spill(start, stop)

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
        """Stored (compressed) bytes per view, per array, from the files' sizes."""
        out = {}
        for name, arr in self._arrays.items():
            stored = arr.nbytes_stored() if callable(getattr(arr, "nbytes_stored", None)) else None
            out[name] = {"stored": (stored or 0) / max(self.total_views, 1),
                         "raw": arr.nbytes / max(self.total_views, 1)}
        return out


class BlockReader:
    """Serves views [start, stop) out of whole, chunk-aligned blocks read once. A training step's batch is often
    smaller than a chunk, and reading per step would decompress the same chunk chunk/batch times over."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self.block = int(cache.group["views/fingerprint"].chunks[0])
        self.start = self.stop = -1

    def _load(self, start: int, stop: int) -> None:
        if self.start <= start and stop <= self.stop:
            return
        a = start - start % self.block
        b = max(min(a + self.block, self.cache.total_views), stop)
        self.arrays, self.spill = self.cache.read_views(a, b)
        self.fingerprints = self.cache.read_fingerprints(a, b)
        self.start, self.stop = a, b

    def read(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray, dict | None]:
        """(encoded arrays, fingerprints, spill rows with views counted from `start`) of views [start, stop)."""
        self._load(start, stop)
        i, j = start - self.start, stop - self.start
        spill = None
        if self.spill is not None:
            keep = (self.spill["view"] >= i) & (self.spill["view"] < j)
            if keep.any():
                spill = {k: v[keep] for k, v in self.spill.items()}
                spill["view"] = spill["view"] - i
        return {k: v[i:j] for k, v in self.arrays.items()}, self.fingerprints[i:j], spill


# -- creating and writing -------------------------------------------------------------------------
def manifest_mismatch(old: dict, new: dict) -> str | None:
    """The first identity section that differs, described for a one-line error, or None."""
    for key in IDENTITY:
        a, b = old.get(key), new.get(key)
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            if key == "teacher":
                return f"another teacher ({a.get('name')} {str(a.get('weights_sha256'))[:12]} vs " \
                       f"{b.get('name')} {str(b.get('weights_sha256'))[:12]})"
            if key == "dataset":
                return f"another dataset (fingerprint {str(a.get('fingerprint'))[:12]} vs " \
                       f"{str(b.get('fingerprint'))[:12]})"
            if key == "recipe":
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                return f"another augmentation recipe (differs in {', '.join(diff)})"
            if key == "encoding":
                return f"another encoding ({a.get('name')} {a.get('params')} vs {b.get('name')} {b.get('params')})"
            return f"another {key}"
    return None


def create_cache(url: str, manifest: dict, keys: list[str], labels: list[int], encoding: Encoding,
                 chunk_views: int, overwrite: bool) -> Cache:
    """Create the group, all arrays (empty) and the manifest with status 'incomplete'."""
    group = zarr.open_group(url, mode="w" if overwrite else "w-")
    total = manifest["layout"]["total_views"]
    shard_views = manifest["layout"]["shard_views"]
    encoded = np.zeros((len(keys), max(1, max(len(k.encode()) for k in keys))), dtype=np.uint8)
    for i, k in enumerate(keys):
        b = k.encode("utf-8")
        encoded[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    _write_array(group, "samples/key", encoded, chunks=(min(65536, len(keys)), encoded.shape[1]))
    _write_array(group, "samples/label", np.asarray(labels, dtype=np.int32), chunks=(min(1 << 20, len(keys)),))
    epochs, vpe = manifest["plan"]["epochs"], manifest["layout"]["views_per_epoch"]
    for f, dt in _PLAN_FIELDS.items():
        shape = (epochs, vpe, 4) if f == "box" else (epochs, vpe)
        group.create_array(f"plan/{f}", shape=shape, chunks=(1,) + shape[1:], dtype=dt, fill_value=0,
                           compressors=_codecs())
    group.create_array("views/fingerprint", shape=(total,), chunks=(chunk_views,), shards=(shard_views,),
                       dtype="int64", fill_value=0, compressors=_codecs())
    for name, spec in encoding.arrays().items():
        group.create_array(f"views/{name}", shape=(total,) + tuple(spec.shape),
                           chunks=(chunk_views,) + tuple(spec.shape), shards=(shard_views,) + tuple(spec.shape),
                           dtype=spec.dtype, fill_value=spec.fill, compressors=_codecs())
    group.create_array("views/shard_done", shape=(manifest["layout"]["num_shards"],), chunks=(1,), dtype="uint8",
                       fill_value=0)
    manifest = dict(manifest, status="incomplete", created=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                    tool_version=__version__, spill_shards=[])
    group.attrs[ATTR] = manifest
    return Cache(group, url)


def _write_array(group, name: str, data: np.ndarray, chunks) -> None:
    arr = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype, fill_value=0,
                             compressors=_codecs())
    arr[...] = data


def write_epoch_plan(cache: Cache, epoch: int, plan: EpochPlan) -> None:
    for f in _PLAN_FIELDS:
        cache.group[f"plan/{f}"][epoch] = getattr(plan, f)


def write_shard(cache: Cache, shard: int, arrays: dict[str, np.ndarray], fingerprints: np.ndarray,
                spill: dict[str, np.ndarray] | None) -> None:
    """Write one whole shard (one call per array), then its completion marker. Only its owner calls this."""
    start, stop = cache.shard_range(shard)
    if spill is not None and len(spill["view"]):
        g = cache.group.require_group(f"spill/s{shard:06d}")
        for k, v in spill.items():
            v = np.asarray(v)
            if k == "view":
                v = v + start  # stored as global view indices
            a = g.create_array(k, shape=v.shape, chunks=v.shape, dtype=v.dtype, fill_value=0,
                               compressors=_codecs(), overwrite=True)
            a[...] = v
    for name, data in arrays.items():
        cache.group[f"views/{name}"][start:stop] = data
    cache.group["views/fingerprint"][start:stop] = fingerprints
    cache.group["views/shard_done"][shard] = 1


def finalize(cache: Cache) -> None:
    """Mark the cache complete once every shard is done; record spill shards; consolidate metadata for HTTP."""
    done = cache.done_shards()
    if not done.all():
        raise CacheError(f"{cache.url}: {int((~done).sum())} of {len(done)} shards are missing; run the same "
                         "command again to finish them")
    spill = sorted(int(name[1:]) for name in cache.group["spill"].group_keys()) if "spill" in cache.group else []
    cache.manifest = dict(cache.manifest, status="complete", spill_shards=spill,
                          completed=_dt.datetime.now(_dt.timezone.utc).isoformat())
    cache.group.attrs[ATTR] = cache.manifest
    with warnings.catch_warnings():  # consolidated metadata is how HTTP readers (no listing) find the arrays
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(cache.group.store)


def to_torch(arrays: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}
