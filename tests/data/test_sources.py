import hashlib
import io
import json
import os
import pickle
import tarfile

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from cskd_cache.data.folder import ImageFolderSource
from cskd_cache.data.open import open_source
from cskd_cache.data.source import find_bad_images
from cskd_cache.data.webdataset import WebDatasetSource
from cskd_cache.errors import BadImageError, DataError

CLASSES = ["cat", "dog", "eel"]


def _img_bytes(seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _samples(n: int = 9) -> list[tuple[str, int, str, bytes]]:
    """(key, label, ext, bytes): a mix of PNG and JPEG, labels cycling over CLASSES."""
    out = []
    for i in range(n):
        fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
        out.append((f"s{i:04d}", i % 3, ext, _img_bytes(i, fmt)))
    return out


def _imagefolder(root, samples) -> str:
    for key, y, ext, data in samples:
        (root / CLASSES[y]).mkdir(parents=True, exist_ok=True)
        (root / CLASSES[y] / f"{key}.{ext}").write_bytes(data)
    return str(root)


def _shards(d, samples, nshards: int = 1, label_field: str = "cls") -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    paths = [str(d / f"train-{j:06d}.tar") for j in range(nshards)]
    for j, p in enumerate(paths):
        with wds.TarWriter(p) as w:
            for key, y, ext, data in samples[j::nshards]:
                w.write({"__key__": key, ext: data, label_field: str(y).encode()})
    return paths


def test_imagefolder_keys_labels_order(tmp_path):
    root = _imagefolder(tmp_path / "d", _samples(6))
    (tmp_path / "d" / "dog" / "nested").mkdir()
    (tmp_path / "d" / "dog" / "nested" / "UPPER.PNG").write_bytes(_img_bytes(99))
    (tmp_path / "d" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "d" / "stray.png").write_bytes(_img_bytes(98))  # not inside a class dir
    src = open_source(root)
    assert isinstance(src, ImageFolderSource) and src.kind == "imagefolder"
    assert src.classes == CLASSES
    assert src.keys == ["cat/s0000.png", "cat/s0003.jpg", "dog/s0001.jpg", "dog/s0004.png",
                        "dog/nested/UPPER.PNG", "eel/s0002.png", "eel/s0005.jpg"]
    assert src.labels == [0, 0, 1, 1, 1, 2, 2]
    assert src.read_bytes(0) == _samples(1)[0][3]
    d = src.describe()
    assert d == dict(kind="imagefolder", location=root, num_samples=7, num_classes=3, fingerprint=src.fingerprint())
    json.dumps(d)


def test_webdataset_matches_imagefolder_pixels(tmp_path):
    samples = _samples(9)
    folder = open_source(_imagefolder(tmp_path / "d", samples))
    (shard,) = _shards(tmp_path / "w", samples)
    src = open_source(shard)
    assert isinstance(src, WebDatasetSource) and src.kind == "webdataset"
    assert src.keys == [k for k, *_ in samples] and src.labels == [y for _, y, *_ in samples]
    assert src.classes == ["0", "1", "2"]
    by_key = {k.split("/")[1].split(".")[0]: i for i, k in enumerate(folder.keys)}
    for i, key in enumerate(src.keys):
        a, b = src.load(i), folder.load(by_key[key])
        assert a.mode == "RGB" and a.size == (24, 24)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert src.read_bytes(i) == samples[i][3]


def test_fingerprint_stable_and_sensitive(tmp_path):
    samples = _samples(6)
    root = _imagefolder(tmp_path / "d", samples)
    fp = open_source(root).fingerprint()
    assert fp == open_source(root).fingerprint() and len(fp) == 64
    os.rename(tmp_path / "d" / "eel", tmp_path / "d" / "fox")  # class name change only
    assert open_source(root).fingerprint() != fp
    os.rename(tmp_path / "d" / "fox" / "s0002.png", tmp_path / "d" / "fox" / "s0002b.png")  # key change
    fp2 = open_source(root).fingerprint()
    assert fp2 != fp and fp2 != open_source(root).subset([1, 0, 2, 3, 4, 5]).fingerprint()  # order change
    (shard,) = _shards(tmp_path / "a", samples)
    relabelled = [(k, (y + 1) % 3 if k == "s0003" else y, e, b) for k, y, e, b in samples]
    (shard2,) = _shards(tmp_path / "b", relabelled)
    assert open_source(shard).fingerprint() == open_source(shard).fingerprint() != open_source(shard2).fingerprint()


def test_fingerprint_documented_encoding(tmp_path):
    src = open_source(_shards(tmp_path / "w", _samples(3))[0])
    h = hashlib.sha256(b'["0","1","2"]\n')
    for k, y in [("s0000", 0), ("s0001", 1), ("s0002", 2)]:
        h.update(f'["{k}",{y}]\n'.encode())
    assert src.fingerprint() == h.hexdigest()


def test_brace_expansion_three_shards(tmp_path):
    samples = _samples(9)
    paths = _shards(tmp_path / "w", samples, nshards=3, label_field="cls.txt")
    src = open_source(str(tmp_path / "w" / "train-{000000..000002}.tar"))
    assert src.shards == paths and len(src) == 9
    assert src.keys == [k for j in range(3) for k, *_ in samples[j::3]]
    for spec in (paths, " ".join(paths), "::".join(paths)):
        other = open_source(spec)
        assert other.keys == src.keys and other.fingerprint() == src.fingerprint()
    i = src.keys.index("s0007")
    assert src.labels[i] == 1 and src.read_bytes(i) == samples[7][3]


def test_memory_remote_matches_local(tmp_path):
    samples = _samples(5)
    paths = _shards(tmp_path / "w", samples, nshards=2)
    fs = fsspec.filesystem("memory")
    for j, p in enumerate(paths):
        fs.pipe(f"/cskd-test/train-{j}.tar", open(p, "rb").read())
    fs.pipe("/cskd-test/classes.txt", b"cat\ndog\neel\n")
    remote = open_source("memory://cskd-test/train-{0..1}.tar")
    local = open_source(paths)
    assert remote.keys == local.keys and remote.labels == local.labels
    assert remote.classes == CLASSES and local.classes == ["0", "1", "2"]
    assert [remote.read_bytes(i) for i in range(5)] == [local.read_bytes(i) for i in range(5)]
    assert pickle.loads(pickle.dumps(remote)).read_bytes(3) == local.read_bytes(3)


def test_class_map_json_beside_local_shard(tmp_path):
    (shard,) = _shards(tmp_path / "w", _samples(3))
    (tmp_path / "w" / "classes.json").write_text(json.dumps(CLASSES))
    assert open_source(shard).classes == CLASSES
    (tmp_path / "w" / "classes.json").write_text(json.dumps(["only-one"]))
    with pytest.raises(DataError, match="class map"):
        open_source(shard)


def test_bad_specs(tmp_path):
    with pytest.raises(DataError, match="random access needs seekable shards"):
        open_source("pipe:curl -s https://example.com/train-000000.tar")
    with pytest.raises(DataError, match=r"no such file or directory: .*nope-000000\.tar \(2 of 2 shards missing\)"):
        open_source(str(tmp_path / "nope-{000000..000001}.tar"))
    with pytest.raises(DataError, match="no such file or directory"):
        open_source("memory://cskd-test-missing/x.tar")
    (tmp_path / "img.jpg").write_bytes(_img_bytes(0, "JPEG"))
    with pytest.raises(DataError, match=r"img\.jpg is not an uncompressed tar"):
        open_source(str(tmp_path / "img.jpg"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(_img_bytes(0))
    with pytest.raises(DataError, match="no class sub-directories"):
        open_source(str(tmp_path / "flat"))
    (tmp_path / "flat" / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        open_source(str(tmp_path / "flat"))
    with pytest.raises(DataError, match="no dataset given"):
        open_source([])


def test_bad_shards(tmp_path):
    a, b = _shards(tmp_path / "a", _samples(2)), _shards(tmp_path / "b", _samples(3))
    with pytest.raises(DataError, match=r"'s0000' is in both .*a/train-000000\.tar and .*b/train-000000\.tar"):
        open_source(a + b)
    nolabel = tmp_path / "nolabel.tar"
    with wds.TarWriter(str(nolabel)) as w:
        w.write({"__key__": "x1", "png": _img_bytes(0), "cls": b"0"})
        w.write({"__key__": "x2", "png": _img_bytes(1), "json": b"{}"})
    with pytest.raises(DataError, match=r"'x2' in shard .*nolabel\.tar has no label"):
        open_source(str(nolabel))
    noimg = tmp_path / "noimg.tar"
    with wds.TarWriter(str(noimg)) as w:
        w.write({"__key__": "y1", "txt": b"hello", "cls": b"0"})
    with pytest.raises(DataError, match=r"'y1' in shard .*noimg\.tar has no image"):
        open_source(str(noimg))
    badlabel = tmp_path / "badlabel.tar"
    with wds.TarWriter(str(badlabel)) as w:
        w.write({"__key__": "z1", "png": _img_bytes(0), "cls": b"dog"})
    with pytest.raises(DataError, match="not an integer"):
        open_source(str(badlabel))


def test_tar_grouping_rules(tmp_path):
    """Members grouped by webdataset's base_plus_ext; meta members skipped; first image ext wins."""
    path = tmp_path / "raw.tar"
    members = [("__meta__.json", b"{}"), ("d.x/a.PNG", _img_bytes(1)), ("d.x/a.jpg", _img_bytes(2, "JPEG")),
               ("d.x/a.label", b" 4\n"), ("b.webp", _img_bytes(3, "WEBP")), ("b.class", b"0")]
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    src = open_source(str(path))
    assert src.keys == ["d.x/a", "b"] and src.labels == [4, 0] and len(src.classes) == 5
    assert src.read_bytes(0) == _img_bytes(2, "JPEG")  # jpg preferred over png
    assert src.read_bytes(1) == _img_bytes(3, "WEBP")


def _with_corrupt(samples):
    out = list(samples)
    out[2] = (out[2][0], out[2][1], "png", b"\x89PNG\r\n\x1a\n garbage")
    out[5] = (out[5][0], out[5][1], "jpg", out[5][3][: len(out[5][3]) // 2])  # truncated JPEG
    return out


@pytest.mark.parametrize("kind", ["imagefolder", "webdataset"])
def test_corrupt_images(tmp_path, kind):
    samples = _with_corrupt(_samples(8))
    spec = _imagefolder(tmp_path / "d", samples) if kind == "imagefolder" else _shards(tmp_path / "w", samples, 2)
    src = open_source(spec)
    bad = sorted(i for i, k in enumerate(src.keys) if "s0002" in k or "s0005" in k)
    with pytest.raises(BadImageError) as e:
        src.load(bad[0])
    assert e.value.key == src.keys[bad[0]] and src.keys[bad[0]] in str(e.value)
    assert find_bad_images(src) == bad
    assert find_bad_images(src, workers=2) == bad
    good = src.subset([i for i in range(len(src)) if i not in bad])
    assert len(good) == 6 and find_bad_images(good) == []


@pytest.mark.parametrize("kind", ["imagefolder", "webdataset"])
def test_subset(tmp_path, kind):
    samples = _samples(7)
    spec = _imagefolder(tmp_path / "d", samples) if kind == "imagefolder" else _shards(tmp_path / "w", samples, 2)
    src = open_source(spec)
    ids = [5, 0, 3]
    sub = src.subset(ids)
    assert sub.keys == [src.keys[i] for i in ids] and sub.labels == [src.labels[i] for i in ids]
    assert sub.classes == src.classes and len(sub) == 3
    assert [sub.read_bytes(j) for j in range(3)] == [src.read_bytes(i) for i in ids]
    assert np.array_equal(np.asarray(sub.load(1)), np.asarray(src.load(0)))
    assert sub.fingerprint() != src.fingerprint() and len(src) == 7  # the original is untouched
    with pytest.raises(IndexError):
        src.subset([7])


def test_pickle_drops_open_handles(tmp_path):
    samples = _samples(6)
    src = open_source(_shards(tmp_path / "w", samples, 2))
    before = [src.read_bytes(i) for i in range(len(src))]  # opens one handle per shard
    assert len(src._files) == 2
    clone = pickle.loads(pickle.dumps(src))
    assert clone._files == {}  # an fd number is meaningless in another process
    assert [clone.read_bytes(i) for i in range(len(clone))] == before
    assert clone.fingerprint() == src.fingerprint() and clone.keys == src.keys


class _BytesDataset(torch.utils.data.Dataset):
    def __init__(self, src):
        self.src = src

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        data = self.src.read_bytes(i)
        # WebDataset handles must be re-opened per process, not inherited from the parent
        fresh = getattr(self.src, "_pid", os.getpid()) == os.getpid()
        return i, os.getpid(), fresh, data


@pytest.mark.parametrize("kind", ["imagefolder", "webdataset"])
def test_dataloader_workers_read_same_bytes(tmp_path, kind):
    samples = _samples(12)
    spec = _imagefolder(tmp_path / "d", samples) if kind == "imagefolder" else _shards(tmp_path / "w", samples, 3)
    src = open_source(spec)
    expected = [src.read_bytes(i) for i in range(len(src))]  # parent holds handles before the fork
    dl = torch.utils.data.DataLoader(_BytesDataset(src), batch_size=None, num_workers=2, shuffle=True,
                                     multiprocessing_context="fork")
    got, pids = {}, set()
    for i, pid, fresh, data in dl:
        assert fresh
        got[int(i)] = data
        pids.add(pid)
    assert os.getpid() not in pids and len(pids) == 2
    assert [got[i] for i in range(len(src))] == expected


def test_local_shard_index_is_saved_reused_and_renewed(tmp_path, monkeypatch):
    """A local shard's scan is saved (ImageNet's 128 shards are 2.6M tar headers) and reused while the shard's size
    and mtime are unchanged; a rewritten shard is scanned again, never read through a stale index."""
    import cskd_cache.data.webdataset as wdsrc

    monkeypatch.setenv("CSKD_CACHE_INDEX_DIR", str(tmp_path / "index"))
    samples = _samples(6)
    paths = _shards(tmp_path / "w", samples, nshards=2)
    first = open_source(paths)
    assert len(list((tmp_path / "index").glob("*.json"))) == 2
    scans = []
    real = wdsrc._scan_shard
    monkeypatch.setattr(wdsrc, "_scan_shard", lambda s: scans.append(s) or real(s))
    again = open_source(paths)
    assert scans == [] and again.keys == first.keys and again.read_bytes(1) == first.read_bytes(1)
    _shards(tmp_path / "w", samples[::-1], nshards=2)  # the same names, other contents
    os.utime(paths[0], ns=(1, 1))  # even within one clock tick, the mtime differs
    renewed = open_source(paths)
    assert sorted(scans) == sorted(paths)
    by_key = {k: d for k, _, _, d in samples}
    assert renewed.keys != first.keys and renewed.read_bytes(0) == by_key[renewed.keys[0]]
