"""Sharing caches: pulling all or some epochs, one-file export, merging; every file checked against the cache's
checksum list (files.py).

Epochs live in whole shards (format 2), so taking some epochs of a cache is copying some files unchanged: a
partial copy (`pull --epochs`) holds byte-identical files, its manifest says `status: partial` and which epochs it
holds, and training cycles over those. Merging caches of the same plan whose epochs were computed apart (other
labs, other machines) copies shard files too; only the shard markers are rewritten for the merged cache's run.
"""

from __future__ import annotations

import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from ..errors import CacheError
from . import store, write
from .files import SUMS, _sha256, read_checksums, select, url_to_fs
from .inspect import _ranges
from .manifest import identity, without_epochs


def parse_epochs(spec: str | None, total: int) -> list[int] | None:
    """'0-9', '0,2,5-7', or None (all)."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    out = set()
    try:
        for part in spec.split(","):
            a, _, b = part.strip().partition("-")
            out.update(range(int(a), int(b or a) + 1))
    except ValueError:
        raise CacheError(f"--epochs {spec!r}: give epochs as 0-9 or 0,3,5-7") from None
    bad = sorted(e for e in out if not 0 <= e < total)
    if bad or not out:
        raise CacheError(f"--epochs {spec!r}: the cache has epochs 0-{total - 1}")
    return sorted(out)


def _root_document(fs, root: str) -> tuple[dict, dict]:
    try:
        doc = json.loads(fs.cat_file(f"{root}/zarr.json"))
    except FileNotFoundError:
        raise CacheError(f"no cskd-cache at {root} (no zarr.json)") from None
    manifest = doc.get("attributes", {}).get("cskd_cache")
    if not isinstance(manifest, dict) or manifest.get("format") != "cskd-cache":
        raise CacheError(f"{root} is not a cskd-cache")
    return doc, manifest


def _held(manifest: dict) -> list[int]:
    return manifest.get("epochs_held", list(range(manifest["plan"]["epochs"])))


def _partial_document(doc: dict, manifest: dict, epochs, source: str) -> dict:
    doc = json.loads(json.dumps(doc))
    if epochs is not None and sorted(epochs) != list(range(manifest["plan"]["epochs"])):
        m = dict(manifest, status="partial", epochs_held=sorted(epochs), copied_from=source)
    else:
        m = dict(manifest, copied_from=source)
    doc.setdefault("attributes", {})["cskd_cache"] = m
    return doc


def _held_before(dst: str, src: str, manifest: dict) -> list[int]:
    """The epochs an earlier pull of the same cache left in `dst` (none for a new folder or an interrupted first
    pull). Pulls add up only over the same files: a folder holding another cache, or another state of this one
    (its list differs: the source was extended or remade since), is refused rather than mixed."""
    if not os.path.exists(os.path.join(dst, "zarr.json")):
        return []
    try:
        _, local = _root_document(*url_to_fs(dst))
    except CacheError:
        raise CacheError(f"{dst} holds something that is not a pull of {src}; pull into a new or empty folder") \
            from None
    same = (local.get("files") or {}).get("sha256") == (manifest.get("files") or {}).get("sha256")
    if not same or local.get("status") not in ("complete", "partial"):
        ident = lambda m: without_epochs(identity(m))
        what = "another cache" if ident(local) != ident(manifest) else \
            "another state of this cache (its SHA256SUMS differs: the source was extended or remade since)"
        raise CacheError(f"{dst} holds {what}, so epochs pulled now would not add up with its epochs "
                         f"{_ranges(_held(local))}; pull into a new folder")
    return _held(local)


def pull(src: str, dst: str, epochs: str | None = None, workers: int = 8, show_progress: bool = True) -> dict:
    """Copy all or some epochs of a cache (any fsspec URL, or a .zarr.zip) into a local folder, checking every
    file against the source's list. Resumable: files already there with the right sha256 are kept. Pulls add up:
    pulling more epochs into a folder that holds some of the same cache keeps those (`epochs_held` grows). The
    root zarr.json is written last, so an interrupted pull is never a cache that looks whole."""
    fs, root = url_to_fs(src)
    doc, manifest = _root_document(fs, root)
    if manifest.get("status") not in ("complete", "partial"):
        raise CacheError(f"{src} is not finished (status {manifest.get('status')}); pull it once it is complete")
    wanted = parse_epochs(epochs, manifest["plan"]["epochs"])
    missing = sorted(set(wanted or _held(manifest)) - set(_held(manifest)))
    if wanted is None and manifest.get("status") == "partial":
        wanted = _held(manifest)
    if missing:
        raise CacheError(f"{src} holds epochs {_ranges(_held(manifest))}, not {_ranges(missing)}")
    before = _held_before(dst, src, manifest)
    sums = read_checksums(fs, root, manifest)
    files = select(manifest, sums, wanted)
    held = sorted(set(before) | set(wanted if wanted is not None else _held(manifest)))
    if set(before) - set(held if wanted is None else wanted):  # epochs held before and not asked for now
        # their files are checked by verify, as any copy's; here only that they are still there
        kept = set(select(manifest, sums, before)) - set(files)
        files += sorted(rel for rel in kept if not os.path.exists(os.path.join(dst, *rel.split("/"))))
    os.makedirs(dst, exist_ok=True)
    fetched = [0]

    def get(rel: str) -> None:
        path = os.path.join(dst, *rel.split("/"))
        if os.path.exists(path):
            with open(path, "rb") as f:
                if _sha256(f.read()) == sums[rel]:
                    return
        try:
            data = fs.cat_file(f"{root}/{rel}")
        except FileNotFoundError:
            raise CacheError(f"{src}/{rel}: missing, though its list names it; the source is damaged there") \
                from None
        if _sha256(data) != sums[rel]:
            raise CacheError(f"{src}/{rel}: its sha256 does not match the list; the source is damaged there")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
        fetched[0] += len(data)

    with ThreadPoolExecutor(workers) as ex:
        list(tqdm(ex.map(get, files), total=len(files), unit="file", desc="pull",
                  disable=None if show_progress else True))
    with open(os.path.join(dst, SUMS), "wb") as f:
        f.write(fs.cat_file(f"{root}/{manifest['files']['list']}"))
    out_doc = _partial_document(doc, manifest, held, src)
    with open(os.path.join(dst, "zarr.json.tmp"), "w") as f:
        json.dump(out_doc, f)
    os.replace(os.path.join(dst, "zarr.json.tmp"), os.path.join(dst, "zarr.json"))
    return {"files": len(files), "bytes_fetched": fetched[0], "epochs": held,
            "added": sorted(set(held) - set(before)), "held_before": before}


def export(src: str, zip_path: str, epochs: str | None = None, show_progress: bool = True) -> dict:
    """All or some epochs of a cache as one .zarr.zip (stored, not recompressed: chunks are compressed already),
    readable by zarr's ZipStore and by cskd-cache from any fsspec URL."""
    if not zip_path.endswith(".zip"):
        raise CacheError(f"{zip_path}: name the export *.zarr.zip")
    fs, root = url_to_fs(src)
    doc, manifest = _root_document(fs, root)
    if manifest.get("status") not in ("complete", "partial"):
        raise CacheError(f"{src} is not finished; export it once it is complete")
    wanted = parse_epochs(epochs, manifest["plan"]["epochs"])
    sums = read_checksums(fs, root, manifest)
    files = select(manifest, sums, wanted if wanted is not None else
                   (_held(manifest) if manifest.get("status") == "partial" else None))
    tmp = zip_path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for rel in tqdm(files, unit="file", desc="export", disable=None if show_progress else True):
            data = fs.cat_file(f"{root}/{rel}")
            if _sha256(data) != sums[rel]:
                raise CacheError(f"{src}/{rel}: its sha256 does not match the list; not exported")
            z.writestr(rel, data)
        z.writestr(SUMS, fs.cat_file(f"{root}/{manifest['files']['list']}"))
        z.writestr("zarr.json", json.dumps(_partial_document(doc, manifest, wanted, src)))
    os.replace(tmp, zip_path)
    return {"files": len(files) + 2, "bytes": os.path.getsize(zip_path)}


def merge(sources: list[str], out: str, show_progress: bool = True) -> dict:
    """One cache from caches of the same plan whose epochs were computed apart (other labs or machines; e.g.
    `precompute --epochs 30 --only-epochs 15-29`). The first source is copied whole, the others' epochs are
    copied shard file by shard file, and the result is complete when every epoch is held (else partial)."""
    if len(sources) < 2:
        raise CacheError("merge needs at least two caches")
    if os.path.exists(out):
        raise CacheError(f"--out {out} exists; merge writes a new cache")
    caches = [store.Cache.open(s) for s in sources]
    base = store.without_epochs(store.identity(caches[0].manifest))
    held: dict[int, str] = {}
    for src, c in zip(sources, caches):
        ident = store.without_epochs(store.identity(c.manifest))
        diff = [k for k in ident if json.dumps(ident[k], sort_keys=True) != json.dumps(base[k], sort_keys=True)]
        if diff:
            raise CacheError(f"{src} is not the same plan as {sources[0]} (differs in {', '.join(diff)}); only "
                             "caches of one teacher, dataset, recipe, plan, encoding and layout merge")
        if not c.epoch_aligned:
            raise CacheError(f"{src}: a format-1 cache (shards span epochs) cannot be merged")
        for name in c.view_names:
            if c.group[f"views/{name}"].metadata.codecs != caches[0].group[f"views/{name}"].metadata.codecs:
                raise CacheError(f"{src}: views/{name} is encoded differently (another cskd-cache version?); "
                                 "its shard files cannot be copied")
        usable = c.usable_epochs
        if not usable:
            raise CacheError(f"{src} holds no finished epoch")
        both = sorted(set(usable) & set(held))
        if both:
            raise CacheError(f"epochs {both} are in both {held[both[0]]} and {src}; merge caches with disjoint "
                             "epochs")
        held.update({e: src for e in usable})
    pull(sources[0], out, show_progress=show_progress)
    merged = store.Cache.open(out, mode="r+")
    # back to 'being written': the per-shard markers are the truth again until finalize takes a new snapshot
    merged.group.attrs[store.ATTR] = {k: v for k, v in merged.manifest.items()
                                      if k not in ("epochs_held", "files", "copied_from")} | {"status": "incomplete"}
    if "shard_run" in merged.group["views"].array_keys():
        del merged.group["views/shard_run"]
    merged = store.Cache.open(out, mode="r+")
    epochs = max(c.plan_params.epochs for c in caches)
    if epochs > merged.plan_params.epochs:
        write.extend_cache(merged, epochs)
    for src, c in zip(sources[1:], caches[1:]):
        fs, root = url_to_fs(src)
        sums = read_checksums(fs, root, c.manifest)
        mine = c.usable_epochs
        files = [rel for rel in select(c.manifest, sums, mine) if rel.split("/")[0] in ("views", "spill", "plan")
                 and "/c/" in rel or rel.startswith("spill/")]
        for rel in tqdm(files, unit="file", desc=f"merge {src}", disable=None if show_progress else True):
            data = fs.cat_file(f"{root}/{rel}")
            if _sha256(data) != sums[rel]:
                raise CacheError(f"{src}/{rel}: its sha256 does not match the list; not merged")
            path = os.path.join(out, *rel.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)
        for e in mine:  # the copied markers name the source's run: these shards are now the merged cache's
            for s in merged.epoch_shards(e):
                merged.group["views/shard_done"][s] = merged.run_marker
    all_held = sorted(held)
    write.finalize(merged, None if all_held == list(range(epochs)) else all_held)
    return {"epochs": all_held, "of": epochs, "complete": all_held == list(range(epochs))}
