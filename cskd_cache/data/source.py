"""Random-access image sources with stable keys: the interface every data source implements.

The cache stores one entry per (sample id, view); training replays views in a shuffled order, so sources must read
any sample by index. Sample ids are positions in `keys`, and `fingerprint()` ties a cache to the exact ordered
key/label/class list it was built from. Sources: an ImageFolder directory (`folder.py`), WebDataset .tar shards
(`webdataset.py`); `open_source` (`open.py`) picks one from what the user gives.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from ..errors import BadImageError


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


class LabeledImages(torch.utils.data.Dataset):
    """(transform(image), label) over a source, or over the given indices of it (e.g. one rank's share)."""

    def __init__(self, source: ImageSource, transform, ids: list[int] | None = None):
        self.source, self.transform = source, transform
        self.ids = list(range(len(source))) if ids is None else ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.transform(self.source.load(self.ids[i])), self.source.labels[self.ids[i]]


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
