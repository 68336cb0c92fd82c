"""Random-access image sources with stable keys: an ImageFolder directory or WebDataset .tar shards.

The cache stores one entry per (sample id, view); training replays views in a shuffled order, so
sources must read any sample by index. Sample ids are positions in `keys`, and `fingerprint()` ties a
cache to the exact ordered key/label/class list it was built from.
"""

import contextlib
import copy
import hashlib
import io
import json
import os
import re
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from webdataset.tariterators import base_plus_ext

from cskd_cache.errors import BadImageError, DataError

# Same list as torchvision.datasets.folder.IMG_EXTENSIONS, so ids match a torchvision ImageFolder.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")  # first present wins
WDS_LABEL_EXTS = ("cls", "cls.txt", "class", "label")
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_HINT = "give an ImageFolder directory or WebDataset .tar shards"


def key_bytes(key: str) -> bytes:
    """A sample key as bytes. Keys are file names, which need not be UTF-8 (a Latin-1 `caf\xe9.png` reads as
    'caf\udce9.png' in Python): surrogateescape gives the original bytes back, and plain UTF-8 for the rest."""
    return key.encode("utf-8", "surrogateescape")


def key_str(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL decodes: L, P, RGBA, CMYK, ... by PIL's own conversion; 16-bit grayscale by its
    top 8 bits (PIL's convert would clip every value above 255 to white). 32-bit 'I' images are read as 16-bit
    when they hold values above 255, else as 8-bit."""
    if img.mode.startswith("I;16") or (img.mode == "I" and np.asarray(img).max() > 255):
        img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    elif img.mode in ("I", "F"):
        img = Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


class ImageSource:
    """Base class: subclasses fill keys/labels/classes and implement read_bytes and _take."""

    flag = "--data"  # the command-line flag the source came from, for error messages
    kind: str
    location: str
    keys: list[str]
    labels: list[int]
    classes: list[str]

    def __init__(self, location: str, keys: list[str], labels: list[int], classes: list[str]):
        self.location, self.keys, self.labels, self.classes = location, keys, labels, classes
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def read_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        data = self.read_bytes(i)  # I/O errors stay DataErrors: a flaky disk is not a bad image
        try:
            img = Image.open(io.BytesIO(data))  # PIL refuses decompression bombs here (DecompressionBombError)
            img.load()  # decode now: PIL is lazy and would otherwise fail later, far from the key
            return to_rgb(img)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            raise BadImageError(self.keys[i], f"{type(e).__name__}: {e}") from e

    def fingerprint(self) -> str:
        """sha256 hex of a canonical encoding that ignores kind/location (moving the data keeps it):
        the UTF-8 of json.dumps(classes) + "\\n", then json.dumps([key, label]) + "\\n" per sample in
        order, json.dumps with ensure_ascii=False and separators=(",", ":")."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            dump = lambda x: key_bytes(json.dumps(x, ensure_ascii=False, separators=(",", ":")) + "\n")
            h.update(dump(list(self.classes)))
            for k, y in zip(self.keys, self.labels):
                h.update(dump([k, int(y)]))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        return dict(kind=self.kind, location=self.location, num_samples=len(self),
                    num_classes=len(self.classes), fingerprint=self.fingerprint())

    def subset(self, ids: list[int]) -> "ImageSource":
        ids = [int(i) for i in ids]
        if any(not 0 <= i < len(self) for i in ids):
            raise IndexError(f"subset ids must be in [0, {len(self)})")
        new = copy.copy(self)  # goes through __getstate__: fresh handle cache, shared read-only data
        new.keys, new.labels = [self.keys[i] for i in ids], [self.labels[i] for i in ids]
        new._fingerprint = None
        self._take(new, np.asarray(ids, dtype=np.int64))
        return new

    def _take(self, new: "ImageSource", ids: np.ndarray) -> None:
        """Restrict per-sample storage other than keys/labels to `ids` on `new`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r}, {len(self)} samples, {len(self.classes)} classes)"


class ImageFolderSource(ImageSource):
    kind = "imagefolder"

    def __init__(self, root: str):
        self.root = os.path.expanduser(root)
        try:
            with os.scandir(self.root) as it:
                classes = sorted(e.name for e in it if e.is_dir())
        except OSError as e:
            raise DataError(f"--data: no such file or directory: {root}; {_HINT}") from e
        keys, labels = [], []
        for y, c in enumerate(classes):  # walk order mirrors torchvision's make_dataset
            for dirpath, _, fnames in sorted(os.walk(os.path.join(self.root, c), followlinks=True)):
                for f in sorted(fnames):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        rel = os.path.relpath(os.path.join(dirpath, f), self.root)
                        keys.append(rel.replace(os.sep, "/"))
                        labels.append(y)
        if not classes or not keys:
            what = "no class sub-directories" if not classes else "no image files in its class sub-directories"
            raise DataError(f"--data: {root} has {what}; {_HINT} (as a pattern: dir/train-{{000000..000009}}.tar)")
        super().__init__(root, keys, labels, classes)

    def read_bytes(self, i: int) -> bytes:
        path = os.path.join(self.root, self.keys[i])
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise DataError(f"{self.flag}: cannot read {path!r}: {e.strerror or e}; check the dataset directory") from e


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


def _index_shard(shard: str) -> list[tuple[str, int, int, bytes]]:
    """Scan tar headers only; returns (key, image offset, image size, label bytes) per sample."""
    try:
        f = fsspec.open(shard, "rb").open() if _URL_RE.match(shard) else open(shard, "rb")
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
        if self._pid != os.getpid():  # forked DataLoader worker: the parent's handles/locks are not ours
            self._reset_handles()
        with self._lock:
            h = self._files.get(si)
            if h is None:
                s = self.shards[si]
                h = self._files[si] = fsspec.open(s, "rb").open() if _URL_RE.match(s) else os.open(s, os.O_RDONLY)
            return h

    def read_bytes(self, i: int) -> bytes:
        si, off, size = int(self._shard[i]), int(self._offset[i]), int(self._size[i])
        try:
            h = self._handle(si)
            if isinstance(h, int):
                data = os.pread(h, size, off)  # no shared file position: safe from many threads
            else:
                with self._lock:  # seek+read on a shared file object must not interleave
                    h.seek(off)
                    data = h.read(size)
        except OSError as e:
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
                os.close(h) if isinstance(h, int) else h.close()
        self._reset_handles()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class LabeledImages(torch.utils.data.Dataset):
    """(transform(image), label) over a source, or over the given indices of it (e.g. one rank's share)."""

    def __init__(self, source: ImageSource, transform, ids: list[int] | None = None):
        self.source, self.transform = source, transform
        self.ids = list(range(len(source))) if ids is None else ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.transform(self.source.load(self.ids[i])), self.source.labels[self.ids[i]]


def open_source(spec: str | list[str], flag: str = "--data") -> ImageSource:
    """An ImageFolder directory, or WebDataset shards (paths/URLs, brace patterns, space/'::'-separated).
    `flag` names the option the spec came from in every error message (--data, --val-data, ...)."""
    try:
        if isinstance(spec, (list, tuple)):
            spec = list(spec)[0] if len(spec) == 1 else list(spec)
        if not spec or (isinstance(spec, str) and not spec.strip()):
            raise DataError(f"--data: no dataset given; {_HINT}")
        if isinstance(spec, str) and os.path.isdir(os.path.expanduser(spec)):
            source = ImageFolderSource(spec)
        else:
            source = WebDatasetSource(spec)
    except DataError as e:
        msg = str(e)
        raise DataError(flag + msg[len("--data"):] if msg.startswith("--data") else msg) from None
    except ImportError as e:  # fsspec's protocol extras (s3fs, gcsfs, aiohttp, ...) missing
        raise DataError(f"{flag}: {spec!r} needs a package that is not installed ({str(e).splitlines()[0][:200]})") \
            from None
    source.flag = flag
    return source


def find_bad_images(source: ImageSource, workers: int = 0) -> list[int]:
    """Decode every image; ids whose decode fails, sorted. Read (I/O) errors propagate instead."""
    from tqdm import tqdm

    def bad(i: int) -> bool:
        try:
            source.load(i)
            return False
        except BadImageError:
            return True

    out, n, mapper = [], len(source), map
    with contextlib.ExitStack() as stack:
        if workers > 0:  # threads suffice: PIL releases the GIL while decoding
            mapper = stack.enter_context(ThreadPoolExecutor(workers)).map
        bar = stack.enter_context(tqdm(total=n, desc="checking images", unit="img", disable=None))
        for start in range(0, n, 4096):  # chunks bound the pending futures on million-image datasets
            ids = range(start, min(n, start + 4096))
            for i, b in zip(ids, mapper(bad, ids)):
                out += [i] if b else []
                bar.update(1)
    return out
