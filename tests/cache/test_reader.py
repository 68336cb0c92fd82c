"""The fast cache reader (cache/reader.py) reads exactly what zarr-python reads, from every kind of cache and
store, and fails where zarr fails: every array, replay record and spill row equal, in request order, on format
1/2/3 caches, fresh ckf/full/topk caches (spill rows, padded epoch slots, partial copies), a .zarr.zip and a cache
served over HTTP; a flipped byte raises; a missing shard reads as the fill value."""

import os
import shutil

import numpy as np
import pytest
import torch
import zarr
from conftest import make_images, precompute_args, run_cli
from servers import bytes_sent, http_server

from cskd_cache.cache import write
from cskd_cache.cache.reader import ShardReader, zarr_gather
from cskd_cache.cache.store import Cache

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")


def assert_same(want, got):
    """(arrays, replay, spill) of zarr-python's read and the reader's: same keys in the same order, dtypes,
    shapes, values (NaN where NaN)."""
    for w, g in zip(want, got):
        assert (w is None) == (g is None), (w, g)
        if w is None:
            continue
        assert list(w) == list(g)
        for k in w:
            assert w[k].dtype == g[k].dtype and w[k].shape == g[k].shape, (k, w[k].dtype, g[k].dtype, g[k].shape)
            assert np.array_equal(w[k], g[k], equal_nan=w[k].dtype.kind == "f"), k


def requests(cache: Cache) -> list[np.ndarray]:
    """Everything (padding included), a training batch across a shard boundary, a shuffled half, duplicates
    out of order, the last view."""
    T, rng = cache.total_views, np.random.default_rng(0)
    edge = cache.shard_views
    return [np.arange(T), np.arange(edge - 4, edge + 4), rng.permutation(T)[: T // 2],
            np.array([5, 5, 2, 9, 2, T - 1]), np.array([T - 1])]


def assert_reads_like_zarr(cache: Cache, whole_files=None):
    reader = ShardReader(cache, whole_files=whole_files)
    for views in requests(cache):
        assert_same(zarr_gather(cache, views), reader.gather(views))
    return reader


@pytest.fixture(scope="module")
def made(tmp_path_factory, teacher_checkpoint):
    """Fresh caches from the CLI: 24 views an epoch in 16-view shards (8 padded views per epoch slot), and a ckf
    cache whose shards are rewritten with teacher outputs that spill at width 1."""
    root = tmp_path_factory.mktemp("reader")
    images = make_images(root / "images")
    out = {}
    for enc, extra in (("ckf", ["--ckf-width", "1", "--epochs", "2"]), ("full", []), ("topk", ["--topk", "2"])):
        out[enc] = root / f"{enc}.zarr"
        code, text = run_cli(*precompute_args(images, out[enc], teacher_checkpoint, "--shard-views", "16",
                                              "--encoding", enc, *extra))
        assert code == 0, text
    cache = Cache.open(str(out["ckf"]), mode="r+")
    gen = torch.Generator().manual_seed(0)
    P, K = cache.encoding.positions, cache.encoding.num_classes
    for s in range(cache.num_shards):
        a, b = cache.shard_range(s)
        dense = torch.randn(b - a, P, K, generator=gen)
        arrays, spill = cache.encoding.encode(dense, dense.mean(1))
        write.write_shard(cache, s, {k: v.numpy() for k, v in arrays.items()}, cache.read_replay(a, b),
                          None if spill is None else {k: v.numpy() for k, v in spill.items()})
    write.finalize(cache)
    return out


def test_old_formats_read_as_zarr_reads_them():
    for name in ("format1-ckf.zarr", "format1-topk.zarr", "format2-ckf.zarr"):
        cache = Cache.open(os.path.join(FIXTURES, name))
        for whole in (True, False):
            reader = assert_reads_like_zarr(cache, whole)
            assert all(lay is not None for lay in reader.layouts.values()), name  # read by the reader, not zarr


def test_fresh_caches_spill_rows_and_padding(made):
    out = made
    ckf = Cache.open(str(out["ckf"]))
    assert ckf.manifest["spill_shards"] and ckf.stride > ckf.views_per_epoch  # spill rows; padded epoch slots
    for enc in ("ckf", "full", "topk"):
        cache = Cache.open(str(out[enc]))
        for whole in (True, False):
            assert_reads_like_zarr(cache, whole)
    arrays, _, spill = ShardReader(ckf).gather(np.arange(ckf.total_views)[::-1])
    assert len(spill["view"]) > 10 and ckf.encoding.missing_spill(arrays, spill) == 0
    padded = np.arange(ckf.views_per_epoch, ckf.stride)  # never written: fill values
    _, replay, _ = ShardReader(ckf).gather(padded)
    assert (replay["fingerprint"] == 0).all()


def test_wide_tables_format_3(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "wide.zarr"  # a ckf table wider than 254 classes: 2-byte slots, format 3
    cache = write_wide_cache(out, image_folder, teacher_checkpoint)
    assert cache.manifest["format_version"] == 3 and str(cache.group["views/ckf_slot"].dtype) == "uint16"
    for whole in (True, False):
        assert_reads_like_zarr(cache, whole)


def write_wide_cache(out, images, ckpt) -> Cache:
    code, text = run_cli(*precompute_args(images, out, ckpt, "--global-topk", "4"))
    assert code == 0, text
    from cskd_cache.cache.ckf import CKFEncoding

    src = Cache.open(str(out))
    enc = CKFEncoding(300, src.encoding.positions, global_width=300)
    manifest = dict(src.manifest, num_classes=300, encoding=enc.describe(), format_version=3)
    cache = write.create_cache(str(out) + ".wide", manifest, src.sample_keys(), list(src.sample_labels()), enc,
                               src.manifest["layout"]["chunk_views"], overwrite=True)
    gen = torch.Generator().manual_seed(1)
    for s in range(cache.num_shards):
        a, b = cache.shard_range(s)
        dense = torch.randn(b - a, enc.positions, 300, generator=gen)
        arrays, spill = enc.encode(dense, dense.mean(1))
        write.write_shard(cache, s, {k: v.numpy() for k, v in arrays.items()}, src.read_replay(a, b),
                          None if spill is None else {k: v.numpy() for k, v in spill.items()})
    write.finalize(cache)
    return Cache.open(str(out) + ".wide")


def test_partial_copy_reads_missing_epochs_as_fill(made, tmp_path):
    out = made
    part = tmp_path / "part.zarr"
    code, text = run_cli("pull", out["ckf"], part, "--epochs", "1")
    assert code == 0, text
    cache = Cache.open(str(part))
    assert cache.manifest["status"] == "partial" and not os.path.exists(part / "views" / "fingerprint" / "c" / "0")
    for whole in (True, False):
        assert_reads_like_zarr(cache, whole)
    _, replay, _ = ShardReader(cache).gather(np.arange(cache.views_per_epoch))  # epoch 0: not held
    assert (replay["fingerprint"] == 0).all()


def test_zip_through_fsspec_and_zarr_zipstore(made, tmp_path):
    out = made
    zipped = tmp_path / "c.zarr.zip"
    code, text = run_cli("export", out["ckf"], zipped)
    assert code == 0, text
    cache = Cache.open(str(zipped))  # fsspec's zip filesystem: members read whole
    assert ShardReader(cache).whole
    assert_reads_like_zarr(cache)
    store = zarr.storage.ZipStore(str(zipped), mode="r")
    assert_reads_like_zarr(Cache(zarr.open_group(store, mode="r"), str(zipped)))
    store.close()


def test_http_reads_ranges_and_fewer_bytes_than_zarr(made, tmp_path):
    out = made
    served = tmp_path / "www"
    shutil.copytree(out["ckf"], served / "c.zarr")
    with http_server("aiohttp", served, tmp_path / "server") as (base, log):
        cache = Cache.open(f"{base}/c.zarr")
        reader = ShardReader(cache)
        assert not reader.whole  # remote: the index, then the chunks a batch needs
        assert_reads_like_zarr(cache)
        epoch = np.arange(cache.views_per_epoch)
        open(log, "w").close()
        for a in range(0, len(epoch), 8):  # training: one epoch in batches
            zarr_gather(cache, epoch[a:a + 8])
        by_zarr = bytes_sent(log, "/views/")
        open(log, "w").close()
        reader = ShardReader(cache)
        for a in range(0, len(epoch), 8):
            reader.gather(epoch[a:a + 8])
        assert 0 < bytes_sent(log, "/views/") < by_zarr  # each shard index once, not once per batch
        assert reader.fetched == bytes_sent(log, "/views/")  # what benchmarks/read_decode reports per view


def test_a_flipped_byte_raises(made, tmp_path):
    out = made
    copy = tmp_path / "c.zarr"
    shutil.copytree(out["ckf"], copy)
    shard = copy / "views" / "ckf_dense" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[30] ^= 0x55  # in the first inner chunk's compressed bytes
    shard.write_bytes(bytes(data))
    cache = Cache.open(str(copy))
    views = np.arange(16, 20)  # shard 1's first inner chunk
    with pytest.raises(ValueError):
        zarr_gather(cache, views)  # zarr raises; so must the reader, in both modes
    for whole in (True, False):
        with pytest.raises(ValueError, match="checksum"):
            ShardReader(cache, whole_files=whole).gather(views)
    data[30] ^= 0x55
    data[-6] ^= 0x01  # in the shard index
    shard.write_bytes(bytes(data))
    for whole in (True, False):
        with pytest.raises(ValueError, match="index"):
            ShardReader(cache, whole_files=whole).gather(views)
    shard.write_bytes(bytes(data[: len(data) // 2]))  # cut short
    for whole in (True, False):
        with pytest.raises(ValueError):
            ShardReader(cache, whole_files=whole).gather(views)
    assert_same(zarr_gather(cache, np.arange(16)), ShardReader(cache).gather(np.arange(16)))  # other shards: fine


def test_a_missing_shard_reads_as_fill(made, tmp_path):
    out = made
    copy = tmp_path / "c.zarr"
    shutil.copytree(out["ckf"], copy)
    os.remove(copy / "views" / "fingerprint" / "c" / "1")
    cache = Cache.open(str(copy))
    for whole in (True, False):
        reader = assert_reads_like_zarr(cache, whole)
        _, replay, _ = reader.gather(np.arange(12, 20))
        assert (replay["fingerprint"][4:] == 0).all() and (replay["fingerprint"][:4] != 0).all()


def counted(reader: ShardReader) -> tuple[ShardReader, list]:
    """The reader, and the (key, byte range) requests it makes of the store from now on."""
    asked, real = [], reader._get
    reader._get = lambda reqs: (asked.extend(reqs), real(reqs))[1]
    return reader, asked


def test_reads_fetch_each_shard_once_and_leave_unknown_layouts_to_zarr(made):
    out = made
    cache = Cache.open(str(out["ckf"]))
    reader = ShardReader(cache)
    assert reader.root and not reader.whole  # a local store: read by byte range, never whole files per block
    for whole in (True, False):
        reader, asked = counted(ShardReader(cache, whole_files=whole))
        for a in range(0, cache.views_per_epoch, 4):  # one epoch, sequentially, a chunk at a time
            reader.gather(np.arange(a, a + 4))
        keys = [k for k, _ in asked]
        shards = len(reader.arrays) * len(cache.epoch_shards(0))
        if whole:  # each shard file once
            assert len(keys) == len(set(keys)) == shards, keys
        else:  # each shard's index once, then one range per array and batch
            assert len(keys) == shards + len(reader.arrays) * cache.views_per_epoch // 4
    reader, asked = counted(ShardReader(cache, whole_files=False))
    reader.gather(np.arange(0, 8))  # two chunks: one range per array
    assert len(asked) == 2 * len(reader.arrays)
    reader.gather(np.arange(cache.stride, cache.stride + cache.views_per_epoch))  # epoch 1: shard 0 is dropped
    del asked[:]
    reader.gather(np.arange(8, 12))
    assert len(asked) == len(reader.arrays)  # ... but its index is kept
    reader = ShardReader(cache)
    reader.layouts["ckf_dense"] = reader.layouts["fingerprint"] = None  # as for a layout it does not know
    for views in requests(cache):
        assert_same(zarr_gather(cache, views), reader.gather(views))
    arrays, replay, spill = reader.gather(np.array([], dtype=np.int64))  # nothing asked: nothing read
    assert arrays["ckf_dense"].shape == (0, *cache.group["views/ckf_dense"].shape[1:]) and spill is None
    assert replay["fingerprint"].dtype == np.int64 and arrays["ckf_slot"].shape[0] == 0
