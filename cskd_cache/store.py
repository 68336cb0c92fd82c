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
import os
import shutil
import uuid
import warnings

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from . import __version__
from .data import key_bytes, key_str
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
        try:
            layout = manifest["layout"]
            self.total_views = int(layout["total_views"])
            self.views_per_epoch = int(layout["views_per_epoch"])
            self.shard_views = int(layout["shard_views"])
            self.num_shards = int(layout["num_shards"])
            grid = manifest["grid"]
            self.encoding: Encoding = encoding_from_description(manifest["encoding"], manifest["num_classes"],
                                                                grid[0] * grid[1])
            self._arrays = {name: group[f"views/{name}"] for name in self.encoding.arrays()}
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CacheError(f"{url}: the manifest is damaged or inconsistent ({type(e).__name__}: {e}); the cache "
                             "cannot be read") from None

    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: dict | None = None) -> "Cache":
        return cls(open_group(url, mode, storage_options), url)

    # -- completeness -------------------------------------------------------------------------------
    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_views
        return start, min(start + self.shard_views, self.total_views)

    @property
    def run_marker(self) -> int:
        """What this cache's shard markers hold when done: its run id (format 2), 1 (format 1)."""
        return run_marker(self.manifest)

    def shard_markers(self) -> np.ndarray:
        return np.asarray(self.group["views/shard_done"][:]).astype(np.int64)

    def done_shards(self) -> np.ndarray:
        """Shards written completely by this cache's own run. A marker left by another run (a second writer,
        an older cache at the same path) does not count."""
        return self.shard_markers() == self.run_marker

    def foreign_shards(self) -> np.ndarray:
        markers = self.shard_markers()
        return np.flatnonzero((markers != 0) & (markers != self.run_marker))

    def layout_problems(self) -> list[str]:
        """Where the manifest and the arrays it describes disagree (shapes, dtypes, sample and plan sizes)."""
        m, problems = self.manifest, []
        want = {f"views/{k}": ((self.total_views, *v.shape), v.dtype) for k, v in self.encoding.arrays().items()}
        want["views/fingerprint"] = ((self.total_views,), "int64")
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
        if self.plan_params.num_samples != n or V != self.plan_params.views_per_epoch or \
                E * V != self.total_views or -(-self.total_views // self.shard_views) != self.num_shards:
            problems.append(f"layout: {self.total_views} views in {self.num_shards} shards do not match a plan of "
                            f"{E} epochs x {self.plan_params.views_per_epoch} views over {n} samples")
        return problems

    def missing_shard_files(self, shard: int) -> list[str]:
        """Arrays whose file for this shard does not exist (zarr would read its fill value instead)."""
        from zarr.core.sync import sync

        missing = []
        for name in ["views/fingerprint", *(f"views/{k}" for k in self.encoding.arrays())]:
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


def run_marker(manifest: dict) -> int:
    """The 63-bit number a run writes into `views/shard_done` when a shard is done: from its run id."""
    run_id = manifest.get("run_id")
    return 1 if run_id is None else int(run_id[:15], 16) | 1  # | 1: never 0, the fill value


def _local_root(url: str) -> str | None:
    if "://" in url and not url.startswith("file://"):
        return None
    return url.removeprefix("file://")


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
                 chunk_views: int, overwrite: bool) -> Cache:
    """Create the group, all arrays, the samples and the whole plan; only then mark it 'incomplete' (ready for
    shards). Until that last write the manifest says 'creating': recognisably ours, never usable, and redone
    from scratch by the next run. Nothing that marks a cache usable is written before the plan it depends on.
    Each creation gets a run id; shard markers carry it, so shards another run wrote never count as done."""
    manifest = dict(manifest, status="creating", created=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                    tool_version=__version__, spill_shards=[], run_id=uuid.uuid4().hex)
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
    group.create_array("views/shard_done", shape=(manifest["layout"]["num_shards"],), chunks=(1,), dtype="int64",
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
    _fsync_shard(cache, shard, [f"views/{name}" for name in arrays] + ["views/fingerprint"])
    cache.group["views/shard_done"][shard] = cache.run_marker
    _fsync_shard(cache, shard, ["views/shard_done"])


def finalize(cache: Cache) -> None:
    """Mark the cache complete once every shard is done; record spill shards; consolidate metadata for HTTP."""
    done = cache.done_shards()
    if not done.all():
        raise CacheError(f"{cache.url}: {int((~done).sum())} of {len(done)} shards are missing; run the same "
                         "command again to finish them")
    latest = read_manifest(cache.url)
    if latest is None or latest.get("run_id") != cache.manifest.get("run_id"):  # replaced under our feet
        raise CacheError(f"{cache.url} was replaced by another run while this one wrote it; it was not finalised")
    spill = sorted(int(name[1:]) for name in cache.group["spill"].group_keys()) if "spill" in cache.group else []
    cache.manifest = dict(cache.manifest, status="complete", spill_shards=spill,
                          completed=_dt.datetime.now(_dt.timezone.utc).isoformat())
    cache.group.attrs[ATTR] = cache.manifest
    with warnings.catch_warnings():  # consolidated metadata is how HTTP readers (no listing) find the arrays
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(cache.group.store)


def to_torch(arrays: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}
