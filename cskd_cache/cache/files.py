"""A cache's files: which files hold which epochs, and the checksum list: every file it holds (but its root `zarr.json`, which names the list) with its sha256 in
`SHA256SUMS` (the format `sha256sum -c` reads); the manifest records the sha256 of the list, so the chain of trust
starts at the manifest. A mirror or a partial copy is checked file by file without reading Zarr."""

from __future__ import annotations

import hashlib
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor

import fsspec

from ..errors import CacheError

SUMS = "SHA256SUMS"
_SKIP = {"zarr.json", SUMS}  # the root metadata (it names the list) and the list itself


def url_to_fs(url: str):
    """(filesystem, root path) for a cache path or URL; `*.zip` is read through fsspec's zip filesystem."""
    if url.endswith(".zip") and not url.startswith("zip::"):
        url = "zip::" + (url if "://" in url else "file://" + os.path.abspath(url))
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise CacheError(f"{url}: needs a package that is not installed ({str(e).splitlines()[0][:160]})") from None
    return fs, root.rstrip("/")


def list_files(fs, root: str) -> list[str]:
    """Every file of a cache, relative to its root, but the root zarr.json, the list and zarr's temporary files."""
    out = []
    for path in fs.find(root):
        rel = posixpath.relpath(path, root) if root else path
        if rel not in _SKIP and not rel.endswith(".partial"):
            out.append(rel)
    return sorted(out)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_checksums(url: str, workers: int = 8) -> dict:
    """Hash every file of a cache into SHA256SUMS; returns the manifest entry that names the list."""
    fs, root = url_to_fs(url)
    files = list_files(fs, root)
    with ThreadPoolExecutor(workers) as ex:  # hashlib and file reads release the GIL
        sums = list(ex.map(lambda rel: _sha256(fs.cat_file(f"{root}/{rel}")), files))
    text = "".join(f"{h}  {rel}\n" for h, rel in zip(sums, files)).encode()
    with fs.open(f"{root}/{SUMS}.tmp", "wb") as f:
        f.write(text)
    fs.mv(f"{root}/{SUMS}.tmp", f"{root}/{SUMS}")
    return {"list": SUMS, "sha256": _sha256(text), "count": len(files)}


def read_checksums(fs, root: str, manifest: dict) -> dict[str, str]:
    """{relative path: sha256} from a cache's list, after checking the list against its manifest."""
    entry = manifest.get("files")
    if not entry:
        raise CacheError(f"{root}: this cache has no checksum list (made before it existed, or not finished); "
                         "finish it with precompute, or copy it with your own tools")
    try:
        text = fs.cat_file(f"{root}/{entry['list']}")
    except FileNotFoundError:
        raise CacheError(f"{root}: {entry['list']} is missing") from None
    if _sha256(text) != entry["sha256"]:
        raise CacheError(f"{root}: {entry['list']} does not match the sha256 its manifest records; the copy is "
                         "damaged or was tampered with")
    out = {}
    for line in text.decode().splitlines():
        h, rel = line.split("  ", 1)
        out[rel] = h
    return out


def _shards_of(manifest: dict, epochs) -> set[int]:
    lay = manifest["layout"]
    stride, sv, vpe = lay.get("epoch_stride", lay["views_per_epoch"]), lay["shard_views"], lay["views_per_epoch"]
    out = set()
    for e in epochs:
        out.update(range(e * stride // sv, (e * stride + vpe - 1) // sv + 1))
    return out


def select(manifest: dict, files, epochs) -> list[str]:
    """The files a copy of `epochs` (None: all) needs: all metadata and samples, and the plan chunks, shard files,
    shard markers and spill rows of those epochs."""
    if epochs is None:
        return sorted(files)
    lay = manifest["layout"]
    if lay.get("epoch_stride", lay["views_per_epoch"]) % lay["shard_views"]:
        raise CacheError("this cache's shards span epochs (format 1): it can only be copied whole")
    epochs, shards = set(epochs), _shards_of(manifest, epochs)
    out = []
    for rel in files:
        parts = rel.split("/")
        if parts[0] == "views" and len(parts) > 3 and parts[2] == "c" and parts[1] != "shard_run":
            keep = int(parts[3]) in shards
        elif parts[0] == "plan" and len(parts) > 3 and parts[2] == "c":
            keep = int(parts[3]) in epochs
        elif parts[0] == "spill" and len(parts) > 1 and parts[1].startswith("s"):
            keep = int(parts[1][1:]) in shards
        else:
            keep = True
        if keep:
            out.append(rel)
    return out


def check_files(url: str, manifest: dict) -> list[str]:
    """Problems found by hashing every file the cache should hold against its list (a partial copy: the files of
    the epochs it holds)."""
    fs, root = url_to_fs(url)
    sums = read_checksums(fs, root, manifest)
    held = manifest.get("epochs_held") if manifest.get("status") == "partial" else None
    problems = []
    for rel in select(manifest, sums, held):
        try:
            data = fs.cat_file(f"{root}/{rel}")
        except FileNotFoundError:
            problems.append(f"{rel}: missing (listed in {SUMS})")
            continue
        if _sha256(data) != sums[rel]:
            problems.append(f"{rel}: sha256 differs from {SUMS}")
    return problems
