"""Reading a cache's views fast: the Zarr v3 shard files, through the store, by byte range.

Why: zarr-python costs about 1 ms per array per read (its async pipeline, and each shard's index read again on
every call), and a training batch reads 8 arrays: 7.5k-20k views/s in one process. This reader keeps each shard's
index once read, fetches only the inner chunks a batch needs (neighbours in one request; a zip member or memory:
the whole shard file once), decodes each once with the codecs its array's zarr.json names, and keeps the latest
shards of every array: a batch is a few chunk-sized blocks, in plan order on a first pass over a cache, shuffled on
later ones. It reads the very bytes zarr reads and checks every crc32c as zarr does (a flipped byte is an error,
never a wrong number); a missing shard file or inner chunk reads as the fill value, as in zarr (the loader finds a
missing shard by its fingerprints, 0). The cache stays a plain Zarr v3 group; an array in a layout this reader
does not know is read by zarr-python.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import crc32c
import numpy as np
from numcodecs import blosc

_EMPTY = 2**64 - 1  # an inner chunk's (offset, nbytes) when it was never written: the fill value


def _crc32c(data):
    """Checks and strips the 4-byte little-endian crc32c that zarr's crc32c codec appends."""
    if len(data) < 4 or crc32c.crc32c(data[:-4]) != int.from_bytes(bytes(data[-4:]), "little"):
        raise ValueError("Stored and computed checksum do not match (crc32c)")
    return data[:-4]


# bytes-to-bytes codecs by their Zarr v3 name: the ones cskd-cache writes (others are left to zarr-python)
_BYTES_CODECS: dict[str, Callable] = {"crc32c": _crc32c, "blosc": blosc.decompress}


@dataclass
class _Layout:
    """How one view array lies in its shard files (read from its zarr.json)."""

    key: Callable[[int], str]  # shard number -> store key
    dtype: np.dtype  # as stored (explicit byte order)
    native: np.dtype  # as zarr returns it
    fill: np.ndarray  # one decoded chunk of fill values
    chunk_views: int
    chunks_per_shard: int
    index_at_end: bool
    index_size: int
    index_crc: bool
    decoders: list[Callable] = field(default_factory=list)  # applied in this order when reading


def layout(arr) -> _Layout | None:
    """The shard layout of a Zarr v3 array sharded along its first axis only, or None if it is anything else
    (then zarr-python reads it)."""
    try:
        meta = arr.metadata.to_dict()
        if meta.get("zarr_format") != 3 or meta["chunk_grid"]["name"] != "regular" or len(meta["codecs"]) != 1:
            return None
        shard = meta["codecs"][0]
        shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        conf = shard["configuration"]
        inner = tuple(conf["chunk_shape"])
        shape = tuple(arr.shape)
        if shard["name"] != "sharding_indexed" or len(shape) < 1 or shard_shape[1:] != shape[1:] or \
                inner[1:] != shape[1:] or shard_shape[0] % inner[0] or arr.dtype.kind not in "biuf" or \
                arr.dtype.fields is not None:
            return None
        codecs, index = conf["codecs"], conf.get("index_codecs", [])
        if not codecs or codecs[0]["name"] != "bytes" or not index or index[0]["name"] != "bytes":
            return None
        endian = (codecs[0].get("configuration") or {}).get("endian", "little")
        if any(c["name"] not in _BYTES_CODECS for c in codecs[1:]) or \
                (index[0].get("configuration") or {}).get("endian", "little") != "little" or \
                [c["name"] for c in index[1:]] not in ([], ["crc32c"]):
            return None
        n = shard_shape[0] // inner[0]
        dtype = arr.dtype.newbyteorder("<" if endian == "little" else ">") if arr.dtype.itemsize > 1 else arr.dtype
        location = conf.get("index_location", "end")
        if location not in ("start", "end"):
            return None
        rest = (0,) * (len(shape) - 1)
        return _Layout(
            key=lambda s, _m=arr.metadata, _p=arr.path: f"{_p}/{_m.encode_chunk_key((s, *rest))}",
            dtype=dtype, native=arr.dtype, fill=np.full(inner, arr.fill_value, dtype=arr.dtype),
            chunk_views=inner[0], chunks_per_shard=n, index_at_end=location == "end",
            index_size=16 * n + 4 * (len(index) == 2), index_crc=len(index) == 2,
            decoders=[_BYTES_CODECS[c["name"]] for c in reversed(codecs[1:])])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return None


def _spans(sv: np.ndarray, chunk_views: int) -> list[tuple[int, int, int]]:
    """(chunk, a, b): sorted views sv[a:b] lie in inner chunk `chunk` (counted along the whole view axis)."""
    if not len(sv):
        return []
    chunk = sv // chunk_views
    cuts = (np.flatnonzero(chunk[1:] != chunk[:-1]) + 1).tolist()
    starts, stops = [0, *cuts], [*cuts, len(sv)]
    return [(int(chunk[a]), a, b) for a, b in zip(starts, stops)]


class _Shard:
    """One shard file of one array, as far as it has been read: the file (or None, when fetched by byte
    ranges), its index ([offset, nbytes] per inner chunk; None: no file, every chunk is the fill value) and the
    inner chunks decoded so far."""

    __slots__ = ("data", "index", "chunks")

    def __init__(self, data, index):
        self.data, self.index, self.chunks = data, index, {}


def _parse_index(lay: _Layout, raw: np.ndarray, where: str) -> list:
    if len(raw) != lay.index_size:
        raise ValueError(f"{where}: the shard index is cut short ({len(raw)} of {lay.index_size} bytes)")
    if lay.index_crc:
        try:
            raw = _crc32c(raw)
        except ValueError:
            raise ValueError(f"{where}: the shard index's crc32c does not match") from None
    return np.frombuffer(raw, dtype="<u8").reshape(lay.chunks_per_shard, 2).tolist()  # [(offset, nbytes)]


def _store_kind(store) -> tuple[str | None, bool]:
    """(the folder of a local store, whose files are read here; whether to fetch whole shard files: a zip
    member, as zipfile cannot seek within one without reading what precedes it, and memory). Other stores are
    asked by byte range: shuffled blocks would fetch a whole file to use a 32nd of it."""
    from zarr.storage import FsspecStore, LocalStore, WrapperStore

    while isinstance(store, WrapperStore):
        store = store._store
    if isinstance(store, LocalStore):
        return str(store.root), False
    if not isinstance(store, FsspecStore):
        return None, type(store).__name__ in ("MemoryStore", "ZipStore")
    fs = getattr(store.fs, "sync_fs", store.fs)  # fsspec wraps sync filesystems for zarr
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return None, any(p in ("file", "local", "memory", "zip") for p in protocols)


def _read_file(path: str, byte_range) -> np.ndarray | None:
    """LocalStore.get's answer, read here: the file's bytes (or a range of them), None if there is no file."""
    from zarr.abc.store import RangeByteRequest, SuffixByteRequest

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if isinstance(byte_range, RangeByteRequest):
            start, stop = byte_range.start, min(byte_range.end, size)
        elif isinstance(byte_range, SuffixByteRequest):
            start, stop = max(0, size - byte_range.suffix), size
        elif byte_range is None:
            start, stop = 0, size
        else:
            raise TypeError(f"unexpected byte range {byte_range!r}")
        return np.frombuffer(os.pread(fd, max(0, stop - start), start), dtype=np.uint8)
    finally:
        os.close(fd)


class ShardReader:
    """`gather(views)` as `Cache.gather` returns it, from the shard files. One per process (per `Cache`): it
    keeps the `keep` most recent shards of every array (a batch can straddle two)."""

    def __init__(self, cache, whole_files: bool | None = None, keep: int = 2):
        self.cache, self.keep = cache, keep
        self.store = cache.group.store
        self.names = list(cache.encoding.arrays())
        self.replay_names = list(cache.replay_names)
        self.arrays = {n: cache.group[f"views/{n}"] for n in [*self.names, *self.replay_names]}
        self.layouts = {n: layout(a) for n, a in self.arrays.items()}
        self.root, whole = _store_kind(self.store)
        self.whole = whole if whole_files is None else whole_files
        self._shards: dict[str, OrderedDict] = {n: OrderedDict() for n in self.arrays}
        self._indexes: dict[str, OrderedDict] = {n: OrderedDict() for n in self.arrays}
        self._spill: OrderedDict = OrderedDict()
        self.fetched = 0  # bytes read from the store (shard indexes and chunks; whole files where read whole)

    # -- the public call ------------------------------------------------------------------------------------
    def gather(self, views) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict | None]:
        """Encoded outputs, replay records and spill rows of any views, in request order (see Cache.gather)."""
        views = np.asarray(views, dtype=np.int64).reshape(-1)
        total = self.cache.total_views
        if len(views) and (int(views.min()) < 0 or int(views.max()) >= total):
            raise IndexError(f"views {int(views.min())}..{int(views.max())} out of range for {total} views")
        order = np.argsort(views, kind="stable")
        sv = views[order]
        out = self.read(sv, order)
        return {k: out[k] for k in self.names}, {k: out[k] for k in self.replay_names}, self._spill_rows(sv, order)

    def read(self, sv: np.ndarray, order: np.ndarray) -> dict[str, np.ndarray]:
        """Every view array at sorted views `sv`, placed at request positions `order`."""
        in_order = bool((order[1:] > order[:-1]).all())  # asked in ascending order: rows are copied as slices
        spans, out = {}, {}
        for n, lay in self.layouts.items():
            if lay is not None and lay.chunk_views not in spans:
                spans[lay.chunk_views] = _spans(sv, lay.chunk_views)
        fast = {n: lay for n, lay in self.layouts.items() if lay is not None}
        shards = self._fetch(fast, {n: {c // lay.chunks_per_shard for c, _, _ in spans[lay.chunk_views]}
                                    for n, lay in fast.items()})
        fetched = self._fetch_chunks(fast, spans, shards)
        for n, lay in fast.items():
            rows = np.empty((len(sv), *lay.fill.shape[1:]), dtype=lay.native)
            for c, a, b in spans[lay.chunk_views]:
                s, i = divmod(c, lay.chunks_per_shard)
                chunk = self._chunk(n, lay, shards[n][s], s, i, fetched)
                first = c * lay.chunk_views
                if in_order and int(sv[b - 1]) - int(sv[a]) == b - a - 1:
                    rows[a:b] = chunk[int(sv[a]) - first:int(sv[b - 1]) - first + 1]
                else:
                    rows[order[a:b]] = chunk[sv[a:b] - first]
            out[n] = rows
        for n in self.arrays:
            if n not in out:  # a layout this reader does not know: zarr-python reads it
                unique = np.unique(sv)
                rows = np.asarray(self.arrays[n].get_orthogonal_selection((unique,)))[np.searchsorted(unique, sv)]
                out[n] = np.empty_like(rows)
                out[n][order] = rows
        return {n: out[n] for n in self.arrays}

    # -- steps ----------------------------------------------------------------------------------------------
    def _fetch(self, fast: dict, need: dict) -> dict[str, dict[int, _Shard]]:
        """The shards this read needs: this process's recent ones, or from the store (whole files, or their
        indexes), every array's at once. Indexes are kept longer than shards: a few hundred bytes each, and later
        passes over a cache come back to every shard of an epoch."""
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest

        got: dict[str, dict[int, _Shard]] = {n: {} for n in fast}
        todo = []
        for n, lay in fast.items():
            kept, indexes = self._shards[n], self._indexes[n]
            for s in sorted(need[n]):
                if s in kept:
                    kept.move_to_end(s)
                    got[n][s] = kept[s]
                elif s in indexes:
                    indexes.move_to_end(s)
                    got[n][s] = self._keep(n, s, _Shard(None, indexes[s]))
                elif self.whole:
                    todo.append((n, s, None))
                else:
                    todo.append((n, s, SuffixByteRequest(lay.index_size) if lay.index_at_end
                                 else RangeByteRequest(0, lay.index_size)))
        for (n, s, _), data in zip(todo, self._get([(fast[n].key(s), r) for n, s, r in todo]) if todo else []):
            lay, where = fast[n], f"views/{n} shard {s}"
            if data is None:  # no file: fill values, as zarr reads it (asked for again next time)
                got[n][s] = _Shard(None, None)
                continue
            if self.whole:
                if len(data) < lay.index_size:
                    raise ValueError(f"{where}: the shard file is cut short ({len(data)} bytes)")
                raw = data[len(data) - lay.index_size:] if lay.index_at_end else data[:lay.index_size]
                got[n][s] = self._keep(n, s, _Shard(data, _parse_index(lay, raw, where)))
            else:
                index = self._indexes[n][s] = _parse_index(lay, data, where)
                while len(self._indexes[n]) > 64 * self.keep:
                    self._indexes[n].popitem(last=False)
                got[n][s] = self._keep(n, s, _Shard(None, index))
        return got

    def _keep(self, n: str, s: int, shard: _Shard) -> _Shard:
        kept = self._shards[n]
        kept[s] = shard
        while len(kept) > self.keep:
            kept.popitem(last=False)
        return shard

    def _fetch_chunks(self, fast: dict, spans: dict, shards: dict) -> dict:
        """Where only the index is here: the bytes of the needed inner chunks not decoded yet, neighbouring
        chunks in one request (zarr writes a shard's chunks back to back), every array's in one pass."""
        from zarr.abc.store import RangeByteRequest

        ranges = []  # [name, shard, [chunks], start, stop]
        for n, lay in fast.items():
            for c, _, _ in spans[lay.chunk_views]:
                s, i = divmod(c, lay.chunks_per_shard)
                shard = shards[n][s]
                if shard.data is not None or shard.index is None or i in shard.chunks:
                    continue
                off, size = shard.index[i]
                if off == _EMPTY:
                    continue
                if ranges and ranges[-1][:2] == [n, s] and ranges[-1][4] == off:
                    ranges[-1][2].append(i)
                    ranges[-1][4] = off + size
                else:
                    ranges.append([n, s, [i], off, off + size])
        if not ranges:
            return {}
        fetched = {}
        bufs = self._get([(fast[n].key(s), RangeByteRequest(a, b)) for n, s, _, a, b in ranges])
        for (n, s, chunks, a, b), buf in zip(ranges, bufs):
            data = buf if buf is not None else np.empty(0, np.uint8)
            if len(data) != b - a:
                raise ValueError(f"views/{n} shard {s}: the shard file is shorter than its index says (replaced "
                                 "while reading?)")
            for i in chunks:
                off, size = shards[n][s].index[i]
                fetched[n, s, i] = data[off - a:off - a + size]
        return fetched

    def _get(self, requests: list) -> list:
        """The bytes (uint8 arrays, None where no file) of (key, byte range) requests: a local store's files read
        here (LocalStore.get hops to a thread per request, about 0.1 ms, the whole cost of a small read), any
        other store's all at once in one pass of zarr's event loop."""
        if self.root is not None:
            got = [_read_file(os.path.join(self.root, key), r) for key, r in requests]
        else:
            from zarr.core.buffer import default_buffer_prototype
            from zarr.core.sync import sync

            proto = default_buffer_prototype()

            async def all_of():
                return await asyncio.gather(*(self.store.get(k, proto, byte_range=r) for k, r in requests))

            got = [None if b is None else b.as_numpy_array() for b in sync(all_of())]
        self.fetched += sum(len(b) for b in got if b is not None)  # what a reader pays for (benchmarks/read_decode)
        return got

    @staticmethod
    def _chunk(n: str, lay: _Layout, shard: _Shard, s: int, i: int, fetched: dict) -> np.ndarray:
        """Inner chunk i of a shard, decoded once (its crc32c checked, as zarr does)."""
        chunk = shard.chunks.get(i)
        if chunk is not None:
            return chunk
        where = f"views/{n} shard {s} chunk {i}"
        if shard.index is None or shard.index[i][0] == _EMPTY:
            chunk = lay.fill
        else:
            if shard.data is not None:
                off, size = shard.index[i]
                if off + size > len(shard.data):
                    raise ValueError(f"{where}: lies past the end of the shard file (cut short?)")
                raw = shard.data[off:off + size]
            else:
                raw = fetched[n, s, i]
            try:
                for decode in lay.decoders:
                    raw = decode(raw)
                chunk = np.frombuffer(raw, dtype=lay.dtype)
            except Exception as e:  # noqa: BLE001 - codecs raise their own kinds; name the chunk
                raise ValueError(f"{where}: {e}") from None
            if chunk.size != lay.fill.size:
                raise ValueError(f"{where}: decodes to {chunk.size} values, not {lay.fill.size}")
            chunk = chunk.reshape(lay.fill.shape).astype(lay.native, copy=False)
        shard.chunks[i] = chunk
        return chunk

    # -- spill rows (ckf positions past the width): rare, small, one chunk per array and shard ---------------
    def _spill_of(self, shard: int) -> dict[str, np.ndarray]:
        if shard not in self._spill:
            g = self.cache.group[f"spill/s{shard:06d}"]
            self._spill[shard] = {k: np.asarray(g[k][:]) for k in ("view", "pos", "dense", "global")}
            while len(self._spill) > 4 * self.keep:
                self._spill.popitem(last=False)
        return self._spill[shard]

    def _spill_rows(self, sv: np.ndarray, order: np.ndarray) -> dict | None:
        """Spill rows of the requested views, in the order and form Cache.gather gives them: per contiguous run
        of sorted views, per spill shard, in stored order; `view` is the row's position in the request."""
        shards = self.cache.manifest.get("spill_shards") or []
        if not shards or not len(sv):
            return None
        bounds = [self.cache.shard_range(s) for s in shards]
        cuts = np.flatnonzero(np.diff(sv) != 1) + 1
        rows = []
        for run in np.split(sv, cuts):
            a, b = int(run[0]), int(run[-1]) + 1
            for s, (lo, hi) in zip(shards, bounds):
                if lo < b and hi > a:
                    r = self._spill_of(s)
                    keep = (r["view"] >= a) & (r["view"] < b)
                    rows.append({k: v[keep] for k, v in r.items()})
        if not rows:
            return None
        spill = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        spill["view"] = order[np.searchsorted(sv, spill["view"])]
        return spill


def zarr_gather(cache, views) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict | None]:
    """The same read through zarr-python (what `Cache.gather` did before this reader): the reference the tests
    hold this reader to, and the benchmark's baseline."""
    views = np.asarray(views, dtype=np.int64)
    order = np.argsort(views, kind="stable")
    sv = views[order]
    cuts = np.flatnonzero(np.diff(sv) != 1) + 1
    names, replay_names = list(cache.encoding.arrays()), list(cache.replay_names)
    parts, spills = [], []
    for run in np.split(np.arange(len(sv)), cuts):
        a, b = int(sv[run[0]]), int(sv[run[-1]]) + 1
        parts.append(cache._read_many([*names, *replay_names], a, b))
        spill = cache._read_spill(a, b)
        if spill is not None:
            spills.append(dict(spill, view=spill["view"] + (a - int(sv[0]))))
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    both = {k: np.concatenate([p[k] for p in parts])[inv] for k in parts[0]}
    spill = None
    if spills:
        spill = {k: np.concatenate([s[k] for s in spills]) for k in spills[0]}
        spill["view"] = order[np.searchsorted(sv, spill["view"] + int(sv[0]))]
    return {k: both[k] for k in names}, {k: both[k] for k in replay_names}, spill
