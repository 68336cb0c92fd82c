"""`verify`: is every byte and every view of a cache still right? Everything that can be wrong is listed: unwritten
or foreign shards, a manifest that does not match its arrays, a plan that does not match its parameters, chunks
that fail their crc32c or hold unwritten values, files that do not match SHA256SUMS, and (with --replay) views
that no longer replay. The teacher re-run (--teacher-check) is the teacher's business: teacher/check.py."""

from __future__ import annotations

import numpy as np
import torch

from ..data.matching import match_samples
from ..data.open import open_source
from ..data.fingerprint import replay_matches, replay_tolerance, signature_distance
from ..data.recipe import library_drift
from ..data.replay import pair_items
from ..data.views import pair_dataset
from ..distributed import resolve_device
from ..errors import CacheError
from .files import check_files
from .inspect import _ranges
from .store import Cache


def spread_pairs(cache: Cache, count: int) -> list[int]:
    """The first views of about count / 2 pairs spread evenly over the done shards."""
    done = np.flatnonzero(cache.done_shards())
    pairs_per = [(cache.shard_range(int(s))[1] - cache.shard_range(int(s))[0]) // 2 for s in done]
    total = sum(pairs_per)
    n = min(-(-count // 2), total)  # whole pairs: a view is only replayed with its partner
    out = []
    for k in (np.arange(n) * total // max(n, 1)).tolist():
        for s, m in zip(done, pairs_per):  # pair k among the done shards
            if k < m:
                out.append(cache.shard_range(int(s))[0] + 2 * k)
                break
            k -= m
    return out


def replayer(cache: Cache, source, match: str, device=None):
    """A function view -> the replayed pair (dict as PairDataset gives it, `image` on `device`), over the cache's
    samples in --data. `--replay tensor` views are made on `device` (their fingerprints too), as training makes
    them: the kernels give the same bits everywhere, but a cache decoded by nvJPEG (`--decode device` on CUDA)
    replays within tolerance elsewhere (libjpeg-turbo's pixels); `--decode worker` caches replay exactly anywhere."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    ids, _ = match_samples(cache.sample_keys(), cache.sample_labels(), source, match,
                           cache.sample_hashes() if match == "content" else None)
    dataset = pair_dataset(source.subset(ids), cache.recipe, cache.fingerprint_kind, cache.signature_kind)

    def replay(v: int) -> dict:
        got = dataset.__getitems__(pair_items(cache.epoch_plan, [v, v + 1], cache.stride))[0]
        if "error" in got:
            raise CacheError(f"--data: {got['error']}")
        return dict(got, image=dataset.finish(got, device))
    return replay


def replay_views(cache: Cache, source, count: int, match: str = "key", device=None) -> dict:
    """Replay about `count` views (whole pairs) spread over the done shards; compare their pixel fingerprints
    with the stored ones and, where they differ, measure by how much (signature distance, normalised units).
    Returns {"checked": n, "drifted": [view, ...], "distance": [d, ...]}. A drift means the augmentation code,
    a library version or the images changed since the cache was made."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    replay = replayer(cache, source, match, device)
    out = {"checked": 0, "drifted": [], "distance": [], "device": str(device)}
    for v in spread_pairs(cache, count):
        got, want = replay(v), cache.read_replay(v, v + 2)
        for i in range(2):
            if int(got["fingerprint"][i]) != int(want["fingerprint"][i]):
                out["drifted"].append(v + i)
                out["distance"].append(float(signature_distance(got["signature"][i].numpy(), want["signature"][i],
                                                                cache.signature_kind))
                                       if "signature" in want else float("inf"))
        out["checked"] += 2
    return out


def verify_cache(url: str, replay: int = 0, data: str | None = None, match: str = "key",
                 tolerance: float | None = None, device: str | None = None) -> dict:
    """Returns {"summary": str, "problems": [str, ...]} (and "replay" with --replay); no problems means sound.
    `device`: where `--replay tensor` views are made (default: the GPU when present, as training)."""
    if replay and not data:
        raise CacheError("verify --replay needs --data (the dataset the cache was made from)")
    if device:
        resolve_device(device)  # a bad --device is named before any work
    cache = Cache.open(url)
    problems = cache.layout_problems()
    if problems:  # the rest would read arrays that are not what the manifest says
        return {"summary": "", "problems": problems}
    expected = _shard_problems(cache, problems)
    problems += _chunk_problems(cache)
    if cache.manifest.get("files"):  # every file against the list a mirror or a partial copy is checked by
        problems += check_files(url, cache.manifest)
    status = cache.manifest.get("status")
    held = f" (partial: epochs {_ranges(cache.manifest['epochs_held'])})" if status == "partial" else ""
    summary = (f"{url}: {len(expected)} shards{held}, every chunk read and checksummed"
               + (", every file matches SHA256SUMS" if cache.manifest.get("files") else "")
               + ", the plan matches its parameters")
    report = {"summary": summary, "problems": problems}
    if replay:
        _replay_report(report, cache, open_source(data), replay, match, tolerance, device)
    return report


def _shard_problems(cache: Cache, problems: list[str]) -> list[int]:
    """Foreign, unwritten and unfinished shards, and damaged plans, appended to `problems`; returns the shards the
    cache should hold."""
    done = cache.done_shards()
    foreign = cache.foreign_shards()
    if len(foreign):
        problems.append(f"shards {foreign[:10].tolist()} were written by another run (another writer, or a cache "
                        "that was replaced); they do not count")
    status = cache.manifest.get("status")
    epochs = cache.manifest.get("epochs_held", []) if status == "partial" else range(cache.plan_params.epochs)
    expected = sorted({s for e in epochs for s in cache.epoch_shards(e)}) if cache.epoch_aligned else \
        list(range(cache.num_shards))
    undone = [s for s in expected if not done[s]]
    if undone:
        problems.append(f"{len(undone)} of {len(expected)} shards not written (run the precompute command "
                        "again to finish them)")
    elif status not in ("complete", "partial"):
        problems.append("every shard is written but the cache was not finalised (run the precompute command again)")
    # a finished cache holds the plan of every epoch it holds; one being written, of the epochs it has started
    planned = epochs if status in ("complete", "partial") else sorted(set(epochs) & cache.planned_epochs())
    bad_plan = [e for e in planned if not cache.plan_ok(e)]
    if bad_plan:
        problems.append(f"the stored plan of epochs {bad_plan[:10]} does not match its parameters")
    return expected


def _chunk_problems(cache: Cache) -> list[str]:
    """Every chunk of every done shard read (zarr checks each chunk's crc32c as it reads it) and checked for fill
    values where a written view cannot hold them."""
    problems, step, names = [], cache.manifest["layout"]["chunk_views"], cache.view_names
    for s in np.flatnonzero(cache.done_shards()):
        start, stop = cache.shard_range(int(s))
        missing = cache.missing_shard_files(int(s))
        if missing:  # a missing shard file reads back as fill values, silently
            problems.append(f"shard {s}: files missing for {', '.join(missing)} (marked done, but deleted since)")
            continue
        for a in range(start, stop, step):
            b, chunk = min(a + step, stop), {}
            for name in names:
                try:
                    chunk[name] = np.asarray(cache.group[f"views/{name}"][a:b])
                except Exception as e:  # noqa: BLE001 - zarr raises several types for a corrupt chunk
                    problems.append(f"views/{name} views {a}..{b} (shard {s}): {type(e).__name__}: {str(e)[:200]}")
            if len(chunk) < len(names):
                continue
            # the encoding knows its own padding (a ckf global table is NaN/-1 padded after its last class); a
            # fingerprint is never 0
            empty = cache.encoding.unwritten({k: chunk[k] for k in cache.encoding.arrays()}) | \
                (chunk["fingerprint"] == 0)
            if empty.any():
                problems.append(f"views {a}..{b} (shard {s}): {int(empty.sum())} views hold unwritten (fill) "
                                f"values, e.g. view {a + int(np.flatnonzero(empty)[0])}")
    return problems


def _replay_report(report: dict, cache: Cache, source, count: int, match: str, tolerance: float | None,
                   device: str | None = None) -> None:
    r = replay_views(cache, source, count, match, device)
    tolerance = replay_tolerance(tolerance, cache.signature_kind)
    # tolerance 0: exact pixels only (a drift can leave a signature unchanged, at distance 0)
    far = [d for d in r["distance"] if not replay_matches(False, d, tolerance)]
    if far:
        report["problems"].append(f"{len(far)} of {r['checked']} replayed views differ from the pixels the teacher "
                                  f"saw by more than {tolerance} (up to {max(far):.3f}){library_drift(cache.manifest)} "
                                  "(inspect --requirements pins the cache's)")
    near = len(r["drifted"]) - len(far)
    report["replay"] = r
    where = f" (tensor replay on {r['device']})" if cache.recipe.replay == "tensor" else ""
    if not r["drifted"]:
        report["summary"] += f"; {r['checked']} replayed views{where} match their fingerprints"
    else:
        report["summary"] += (f"; {r['checked']} replayed views{where}: {r['checked'] - len(r['drifted'])} exact"
                              + (f", {near} within tolerance {tolerance} (at most "
                                 f"{max(d for d in r['distance'] if d <= tolerance):.3f})" if near else "")
                              + (f", {len(far)} beyond it" if far else ""))
