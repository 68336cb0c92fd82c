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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from cskd_cache.errors import BadImageError, DataError

# Same list as torchvision.datasets.folder.IMG_EXTENSIONS, so ids match a torchvision ImageFolder.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
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
            from .wds import WebDatasetSource

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


MATCH_MODES = ("key", "stem", "content")


def canonical_key(key: str) -> str:
    """A sample's name whatever the packaging: the file stem. ImageFolder 'n01440764/n01440764_10026.JPEG' and
    WebDataset '__key__' 'n01440764_10026' (or 'train/n01440764_10026') are the same sample."""
    base = key.rsplit("/", 1)[-1]
    return base.split(".", 1)[0] if "." in base else base


def content_hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def match_samples(keys: list[str], labels, source: ImageSource, how: str = "key", hashes=None,
                  workers: int = 8) -> tuple[list[int], str]:
    """The ids in `source` of the cache's samples (`keys`, `labels`, in cache order), matched by exact key, by
    file stem (another packaging of the same dataset), or by the sha256 of each image file's bytes (`hashes`, as
    precompute --content-hash stored them). Refuses when any cached sample is missing, is ambiguous, or has
    another label. Returns (ids, a one-line report)."""
    if how not in MATCH_MODES:
        raise DataError(f"--match {how!r}: use one of {', '.join(MATCH_MODES)}")
    if how == "content":
        if hashes is None:
            raise DataError("--match content needs a cache made with precompute --content-hash (it stores each "
                            "image file's sha256); use --match stem, or precompute again")
        with ThreadPoolExecutor(workers) as ex:
            mine = list(ex.map(lambda i: content_hash(source.read_bytes(i)), range(len(source))))
        want = [bytes(h) for h in hashes]
    else:
        name = (lambda k: k) if how == "key" else canonical_key
        mine, want = [name(k) for k in source.keys], [name(k) for k in keys]
    index: dict = {}
    for i, m in enumerate(mine):
        index.setdefault(m, []).append(i)
    ids, missing, ambiguous, relabelled = [], [], [], []
    for k, w, y in zip(keys, want, labels):
        found = index.get(w, [])
        if not found:
            missing.append(k)
        elif len(found) > 1:
            ambiguous.append(k)
        else:
            ids.append(found[0])
            if int(source.labels[found[0]]) != int(y):
                relabelled.append(k)
    if missing:
        raise DataError(f"{source.flag} lacks {len(missing)} of the {len(keys)} samples the cache was made from "
                        f"(matched by {how}; e.g. {missing[0]!r}); give the dataset the cache was made from")
    if ambiguous:
        raise DataError(f"{source.flag}: {len(ambiguous)} cached samples match several images by {how} (e.g. "
                        f"{ambiguous[0]!r}); match by content, or use the cache's own packaging")
    if relabelled:
        raise DataError(f"{source.flag}: {len(relabelled)} matched samples have another label than in the cache "
                        f"(e.g. {relabelled[0]!r}); the class order differs between the two copies")
    return ids, f"matched {len(ids)} of {len(keys)} cached samples in {source.flag} by {how} " \
                f"({len(source) - len(set(ids))} other images unused)"
