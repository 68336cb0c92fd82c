"""Finding a cache's samples in a dataset: by key, by file stem (another packaging), or by content."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

from ..errors import DataError
from .source import ImageSource


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
