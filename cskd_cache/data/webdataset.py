"""WebDataset .tar shards as a random-access image source: local paths or any fsspec URL.

A tar has no index, so each shard is scanned once (headers only) for every sample's key, image byte range and
label. The scan's result is saved in a local index folder (`$CSKD_CACHE_INDEX_DIR`, default
`~/.cache/cskd-cache/tar-index`), keyed by URL or absolute path and checked against the shard's size and ETag (remote:
a scan reads the whole shard) or size and modification time (local: ImageNet's 1.28M samples in 128 shards are 2.6M
tar headers, about a minute to scan): every later run and every rank reuses it. Member reads then fetch exactly
their byte range (one range request each, no read-ahead).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from ..errors import DataError
from .source import _HINT, _URL_RE, ImageSource

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")  # first present wins
WDS_LABEL_EXTS = ("cls", "cls.txt", "class", "label")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Patterns separated by spaces or '::' (or given as a list), each brace-expanded."""
    out = []
    for part in [spec] if isinstance(spec, str) else spec:
        if os.path.exists(os.path.expanduser(part)):  # a real path may contain spaces or braces
            out.append(os.path.expanduser(part))
            continue
        for piece in part.replace("::", " ").split():
            out.extend(p if _URL_RE.match(p) else os.path.expanduser(p) for p in braceexpand(piece))
    return out


def _read_class_map(first_shard: str) -> list[str] | None:
    """Optional classes.txt (one name per line) or classes.json (list, or {name: index}) beside the first shard."""
    base = first_shard.rsplit("/", 1)[0] if "/" in first_shard else "."
    for name in ("classes.txt", "classes.json"):
        path = f"{base}/{name}"
        fs, p = fsspec.core.url_to_fs(path)
        if not fs.exists(p):
            continue
        try:
            text = fs.cat_file(p).decode("utf-8")
            if name.endswith(".txt"):
                return [line.strip() for line in text.splitlines() if line.strip()]
            obj = json.loads(text)
            return [str(c) for c in obj] if isinstance(obj, list) else sorted(obj, key=lambda n: int(obj[n]))
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise DataError(f"--data: cannot parse class map {path}: {e}; fix it or remove it") from e
    return None


def index_dir() -> str:
    return os.environ.get("CSKD_CACHE_INDEX_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cskd-cache", "tar-index")


def _saved_index_path(shard: str) -> str:
    return os.path.join(index_dir(), hashlib.sha256(shard.encode()).hexdigest()[:32] + ".json")


def _remote_stamp(shard: str) -> dict:
    """What identifies a remote shard's bytes without reading them: its size and, where the server gives one,
    its ETag (one HEAD request)."""
    fs, path = fsspec.core.url_to_fs(shard)
    info = fs.info(path)
    return {"size": int(info.get("size") or -1), "etag": str(info.get("ETag") or info.get("etag") or "")}


def _local_stamp(shard: str) -> dict:
    """What identifies a local shard's bytes without reading them: its size and modification time."""
    st = os.stat(shard)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _index_shard(shard: str) -> list[tuple[str, int, int, bytes]]:
    """(key, image offset, image size, label bytes) per sample: the shard's saved index when its stamp (size and
    ETag, or size and mtime) still matches, else a scan, saved for next time."""
    if not _URL_RE.match(shard):
        shard = os.path.abspath(shard)
    try:
        stamp = _remote_stamp(shard) if _URL_RE.match(shard) else _local_stamp(shard)
    except ImportError:
        raise
    except Exception:  # noqa: BLE001 - the scan below opens it again and says what is wrong
        stamp = None
    path = _saved_index_path(shard)
    if stamp is not None:
        try:
            with open(path) as f:
                saved = json.load(f)
            if saved.get("url") == shard and saved.get("stamp") == stamp:
                return [(k, int(o), int(n), bytes.fromhex(lab)) for k, o, n, lab in saved["samples"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    samples = _scan_shard(shard)
    if stamp is not None:
        try:
            os.makedirs(index_dir(), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump({"url": shard, "stamp": stamp, "samples": [[k, o, n, lab.hex()] for k, o, n, lab in
                                                                     samples]}, f)
            os.replace(path + ".tmp", path)
        except OSError:
            pass  # an index folder we cannot write only costs a rescan next time
    return samples


def _scan_shard(shard: str) -> list[tuple[str, int, int, bytes]]:
    """Scan tar headers only; returns (key, image offset, image size, label bytes) per sample."""
    try:
        # remote: one sequential pass with a large read-ahead (the headers are spread over the whole shard)
        f = fsspec.open(shard, "rb", block_size=2**24, cache_type="readahead").open() if _URL_RE.match(shard) \
            else open(shard, "rb")
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - local OSErrors, and whatever a remote filesystem raises
        if _URL_RE.match(shard) and isinstance(e, FileNotFoundError):  # fsspec's http says so for refusals too
            raise DataError(f"--data: no such file or directory: {shard} (or its server does not answer); check "
                            "the URL") from None
        if _URL_RE.match(shard):
            raise DataError(f"--data: cannot fetch {shard} ({type(e).__name__}: {str(e)[:160]}); check the URL and "
                            "that the server answers") from None
        if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            raise DataError(f"--data: no such file or directory: {shard}; {_HINT}") from None
        raise DataError(f"--data: cannot open {shard}: {e}; {_HINT}") from None
    samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    seen: set[str] = set()
    try:
        with f, tarfile.open(fileobj=f, mode="r:") as tf:  # "r:": compressed tars cannot be seeked into
            for ti in tf:
                if not ti.isreg() or os.path.basename(ti.name).startswith("__"):
                    continue
                key, ext = base_plus_ext(ti.name)
                if key is None:
                    continue
                ext = ext.lower()
                if not samples or samples[-1][0] != key:  # webdataset groups consecutive members
                    if key in seen:
                        raise DataError(f"--data: key {key!r} appears twice in shard {shard}; rewrite the shard")
                    seen.add(key)
                    samples.append((key, {}))
                if ext in samples[-1][1]:
                    raise DataError(f"--data: duplicate member {ti.name!r} in shard {shard}; rewrite the shard")
                samples[-1][1][ext] = ti
            out = []
            for key, members in samples:
                img = next((members[e] for e in WDS_IMAGE_EXTS if e in members), None)
                lab = next((members[e] for e in WDS_LABEL_EXTS if e in members), None)
                if img is None or lab is None:
                    missing = "image (" + "/".join(WDS_IMAGE_EXTS) + ")" if img is None else "label (cls)"
                    raise DataError(f"--data: sample {key!r} in shard {shard} has no {missing}; fix or remove it")
                f.seek(lab.offset_data)
                out.append((key, img.offset_data, img.size, f.read(lab.size)))
            return out
    except tarfile.TarError as e:
        raise DataError(f"--data: {shard} is not an uncompressed tar file ({e}); {_HINT}") from e


class WebDatasetSource(ImageSource):
    kind = "webdataset"

    def __init__(self, spec: str | list[str]):
        location = spec if isinstance(spec, str) else " ".join(spec)
        self.shards = expand_shards(spec)
        if not self.shards:
            raise DataError(f"--data: no shards in {location!r}; {_HINT}")
        if any(s.startswith("pipe:") for s in self.shards):
            raise DataError(f"--data: {location!r}: random access needs seekable shards; "
                            "give local paths or URLs (s3://, https://, ...)")
        missing = [s for s in self.shards if not _URL_RE.match(s) and not os.path.exists(s)]
        if missing:
            n = f" ({len(missing)} of {len(self.shards)} shards missing)" if len(self.shards) > 1 else ""
            raise DataError(f"--data: no such file or directory: {missing[0]}{n}; {_HINT}")
        # Shards are independent; threads overlap the seeks (and round trips for remote shards).
        with ThreadPoolExecutor(min(16, len(self.shards))) as ex:
            per_shard = list(ex.map(_index_shard, self.shards))
        rows, where = [], {}
        for si, samples in enumerate(per_shard):
            for key, off, size, raw in samples:
                if key in where:
                    raise DataError(f"--data: key {key!r} is in both {self.shards[where[key]]} and "
                                    f"{self.shards[si]}; remove the duplicate")
                where[key] = si
                try:
                    y = int(raw.decode("utf-8").strip())
                except (ValueError, UnicodeDecodeError):
                    y = -1
                if y < 0:
                    raise DataError(f"--data: sample {key!r} in shard {self.shards[si]} has label {raw[:20]!r}, "
                                    "not an integer >= 0; fix it")
                rows.append((key, y, si, off, size))
        if not rows:
            raise DataError(f"--data: no samples in {location!r}; {_HINT}")
        keys, labels, shard_ids, offsets, sizes = (list(c) for c in zip(*rows))
        classes = _read_class_map(self.shards[0]) or [str(i) for i in range(max(labels) + 1)]
        if max(labels) >= len(classes):
            raise DataError(f"--data: label {max(labels)} but the class map beside {self.shards[0]} has "
                            f"{len(classes)} classes; fix the class map")
        # numpy, not lists of tuples: ~20 bytes/sample and no refcount writes that un-share forked worker memory
        self._shard, self._offset = np.asarray(shard_ids, np.int32), np.asarray(offsets, np.int64)
        self._size = np.asarray(sizes, np.int64)
        self._reset_handles()
        super().__init__(location, keys, labels, classes)

    def _reset_handles(self) -> None:
        self._pid, self._files, self._lock = os.getpid(), {}, threading.Lock()

    def _handle(self, si: int):
        """A local shard's file descriptor, or a remote shard's (filesystem, path); per process."""
        if self._pid != os.getpid():  # forked DataLoader worker: the parent's handles/locks are not ours
            self._reset_handles()
        with self._lock:
            h = self._files.get(si)
            if h is None:
                s = self.shards[si]
                h = self._files[si] = fsspec.core.url_to_fs(s) if _URL_RE.match(s) else os.open(s, os.O_RDONLY)
            return h

    def read_bytes(self, i: int) -> bytes:
        si, off, size = int(self._shard[i]), int(self._offset[i]), int(self._size[i])
        try:
            h = self._handle(si)
            if isinstance(h, int):
                data = os.pread(h, size, off)  # no shared file position: safe from many threads
            else:  # exactly the member's bytes: one range request, no read-ahead, no shared file position
                fs, path = h
                data = fs.cat_file(path, start=off, end=off + size)
        except (OSError, ValueError) as e:
            raise DataError(f"{self.flag}: cannot read {self.keys[i]!r} from {self.shards[si]}: {e}; "
                            "check the shard") from e
        if len(data) != size:
            raise DataError(f"{self.flag}: shard {self.shards[si]} is shorter than its index; was it rewritten? "
                            "reopen it")
        return data

    def _take(self, new: ImageSource, ids: np.ndarray) -> None:
        new._shard, new._offset, new._size = self._shard[ids], self._offset[ids], self._size[ids]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in ("_pid", "_files", "_lock"):  # fds, file objects and locks are per process
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_handles()

    def close(self) -> None:
        if self._pid == os.getpid():
            for h in self._files.values():
                if isinstance(h, int):
                    os.close(h)
        self._reset_handles()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


