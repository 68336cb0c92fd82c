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
from .plan import EpochPlan, PlanParams, make_epoch_plan
from .views import Recipe

FORMAT = "cskd-cache"
FORMAT_VERSION = 2
ATTR = "cskd_cache"
# Manifest sections that must match for a resumed run to write into an existing cache.
IDENTITY = ("teacher", "dataset", "recipe", "plan", "encoding", "layout", "grid", "num_classes", "bad_samples")
# Within them, what does not change a single stored number: where the data lives and which library versions ran
# (a replay on other versions is checked by its pixel fingerprints, not by version strings).
_NOT_IDENTITY = {"dataset": ("kind", "location"), "recipe": ("library_versions",),
                 "teacher": ("checkpoint", "pretrained_tag")}


def identity(manifest: dict) -> dict:
    """What a cache's numbers depend on: teacher weights and precision, dataset fingerprint, recipe values, plan,
    encoding, layout, grid, classes and skipped samples. Checkpoints record it; resumes compare it."""
    out = {}
    for key in IDENTITY:
        v = manifest.get(key)
        if isinstance(v, dict):
            v = {k: x for k, x in v.items() if k not in _NOT_IDENTITY.get(key, ())}
        out[key] = json.loads(json.dumps(v, default=str))  # tuples -> lists: compare values, not containers
    return out

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


def read_manifest(url: str, storage_options: dict | None = None) -> dict | None:
    """The manifest of the cskd-cache at `url` whatever its status, or None if there is no cskd-cache there."""
    try:
        group = zarr.open_group(url, mode="r", storage_options=storage_options if "://" in url else None)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
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
        cached output with the wrong image."""
        if not self.plan_ok(epoch):
            raise CacheError(f"{self.url}: the stored plan of epoch {epoch} does not match the plan parameters "
                             "(damaged, or written by an incompatible cskd-cache); run `cskd-cache verify`, and "
                             "the precompute command again to repair it")
        return self.stored_plan(epoch)

    def read_views(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], dict | None]:
        """Encoded teacher outputs of views [start, stop) (contiguous reads: fast on sharded arrays)."""
        arrays = {name: np.asarray(arr[start:stop]) for name, arr in self._arrays.items()}
        return arrays, self._read_spill(start, stop)

    def gather(self, views: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, dict | None]:
        """Encoded outputs, fingerprints and spill rows (views counted in the given order) of any views.
        Reads each contiguous run once (a training batch is a few runs of whole chunks)."""
        views = np.asarray(views, dtype=np.int64)
        order = np.argsort(views, kind="stable")
        sv = views[order]
        cuts = np.flatnonzero(np.diff(sv) != 1) + 1
        parts, fps, spills = [], [], []
        for run in np.split(np.arange(len(sv)), cuts):
            a, b = int(sv[run[0]]), int(sv[run[-1]]) + 1
            arrays, spill = self.read_views(a, b)
            parts.append(arrays)
            fps.append(self.read_fingerprints(a, b))
            if spill is not None:
                spills.append(dict(spill, view=spill["view"] + (a - int(sv[0]))))
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))  # position in the request of each sorted view
        arrays = {k: np.concatenate([p[k] for p in parts])[inv] for k in parts[0]}
        fingerprints = np.concatenate(fps)[inv]
        spill = None
        if spills:
            spill = {k: np.concatenate([s[k] for s in spills]) for k in spills[0]}
            # spill views are offsets from sv[0] in sorted order; map them to request positions
            rank = np.searchsorted(sv, spill["view"] + int(sv[0]))
            spill["view"] = order[rank]
        return arrays, fingerprints, spill

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


# -- creating and writing -------------------------------------------------------------------------
def manifest_mismatch(old: dict, new: dict) -> str | None:
    """The first identity section that differs, described for a one-line error, or None."""
    ia, ib = identity(old), identity(new)
    for key in IDENTITY:
        a, b = ia[key], ib[key]
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            if key == "teacher":
                if a.get("weights_sha256") == b.get("weights_sha256"):
                    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                    return f"another teacher setting ({', '.join(f'{k} {a.get(k)} vs {b.get(k)}' for k in diff)})"
                return f"another teacher ({a.get('name')} {str(a.get('weights_sha256'))[:12]} vs " \
                       f"{b.get('name')} {str(b.get('weights_sha256'))[:12]})"
            if key == "dataset":
                if a.get("fingerprint") == b.get("fingerprint"):
                    return f"another selection of the dataset ({a.get('used_samples')} vs {b.get('used_samples')} " \
                           "samples used)"
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
    """Create the group, all arrays, the samples and the whole plan; only then mark it 'incomplete' (ready for
    shards). Until that last write the manifest says 'creating': recognisably ours, never usable, and redone
    from scratch by the next run. Nothing that marks a cache usable is written before the plan it depends on."""
    manifest = dict(manifest, status="creating", created=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                    tool_version=__version__, spill_shards=[])
    # one write of zarr.json that already carries the manifest: there is no moment where it is a bare group
    group = zarr.create_group(url, overwrite=overwrite, attributes={ATTR: manifest})
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
    params = PlanParams(**manifest["plan"])
    for e in range(params.epochs):
        write_epoch_plan(group, e, make_epoch_plan(params, e))
    group.attrs[ATTR] = dict(manifest, status="incomplete")
    return Cache(group, url)


def _write_array(group, name: str, data: np.ndarray, chunks) -> None:
    arr = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype, fill_value=0,
                             compressors=_codecs())
    arr[...] = data


def write_epoch_plan(group: zarr.Group, epoch: int, plan: EpochPlan) -> None:
    for f in _PLAN_FIELDS:
        group[f"plan/{f}"][epoch] = getattr(plan, f)


def repair_plan(cache: Cache) -> list[int]:
    """Rewrite every epoch whose stored plan differs from its parameters, and mark that epoch's shards undone
    (outputs computed on a wrong plan belong to other images). Returns the epochs repaired."""
    bad = [e for e in range(cache.plan_params.epochs) if not cache.plan_ok(e)]
    vpe = cache.views_per_epoch
    for e in bad:
        write_epoch_plan(cache.group, e, make_epoch_plan(cache.plan_params, e))
        first, last = e * vpe // cache.shard_views, ((e + 1) * vpe - 1) // cache.shard_views
        for s in range(first, last + 1):
            cache.group["views/shard_done"][s] = 0
    return bad


def write_shard(cache: Cache, shard: int, arrays: dict[str, np.ndarray], fingerprints: np.ndarray,
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
