"""Looking at a cache: `inspect` (what it is) and `verify` (is every byte and every view still right)."""

from __future__ import annotations

import numpy as np

from .errors import CacheError
from .store import Cache
from .views import PairDataset, pair_items


def replay_views(cache: Cache, source, count: int) -> dict:
    """Replay about `count` views (whole pairs) spread evenly over the done shards and compare their pixel
    fingerprints with the stored ones. Returns {"checked": n, "drifted": [view, ...]}. A drift means the
    augmentation code, a library version or the images changed since the cache was made."""
    keys = cache.sample_keys()
    index = {k: i for i, k in enumerate(source.keys)}
    missing = [k for k in keys if k not in index]
    if missing:
        raise CacheError(f"--data lacks {len(missing)} of the {len(keys)} samples the cache was made from "
                         f"(e.g. {missing[0]!r}); give the dataset the cache was made from")
    source = source.subset([index[k] for k in keys])
    done = np.flatnonzero(cache.done_shards())
    pairs_per = [(cache.shard_range(int(s))[1] - cache.shard_range(int(s))[0]) // 2 for s in done]
    total = sum(pairs_per)
    n = min(-(-count // 2), total)  # whole pairs: a view is only replayed with its partner
    dataset = PairDataset(source, cache.recipe)
    out = {"checked": 0, "drifted": []}
    for k in (np.arange(n) * total // max(n, 1)).tolist():
        for s, m in zip(done, pairs_per):  # pair k among the done shards
            if k < m:
                v = cache.shard_range(int(s))[0] + 2 * k
                break
            k -= m
        got = dataset[pair_items(cache.epoch_plan, [v, v + 1], cache.views_per_epoch)[0]]
        if "error" in got:
            raise CacheError(f"--data: {got['error']}")
        want = cache.read_fingerprints(v, v + 2)
        out["drifted"] += [v + i for i in range(2) if int(got["fingerprint"][i]) != int(want[i])]
        out["checked"] += 2
    return out


def describe_cache(url: str) -> dict:
    cache = Cache.open(url)
    done = cache.done_shards()
    arrays = {}
    for name in ["fingerprint", *cache.encoding.arrays()]:
        a = cache.group[f"views/{name}"]
        arrays[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks),
                        "shards": list(a.shards) if a.shards else None}
    per_view = cache.bytes_per_view()
    return {
        "url": url,
        "status": "complete" if cache.complete else "incomplete",
        "shards_done": int(done.sum()), "shards_total": int(len(done)),
        "arrays": arrays,
        "bytes_per_view": {"stored": sum(v["stored"] for v in per_view.values()),
                           "raw": sum(v["raw"] for v in per_view.values()), "per_array": per_view},
        "manifest": cache.manifest,
    }


def format_description(info: dict) -> str:
    m = info["manifest"]
    t, d, lay = m["teacher"], m["dataset"], m["layout"]
    lines = [
        f"cache        {info['url']}  ({info['status']}: {info['shards_done']}/{info['shards_total']} shards)",
        f"teacher      {t['name']}  weights {t['weights_sha256'][:16]}  input {t['input_size']}px  "
        f"grid {m['grid'][0]}x{m['grid'][1]}  classes {m['num_classes']}",
        f"dataset      {d['kind']} {d['location']}  {d.get('used_samples', d['num_samples'])} samples  "
        f"fingerprint {d['fingerprint'][:16]}",
        f"plan         {m['plan']['epochs']} epochs x {lay['views_per_epoch']} views  repeats "
        f"{m['plan']['repeats']}  seed {m['plan']['seed']}",
        f"encoding     {m['encoding']['name']}  {m['encoding'].get('params', {})}  ({_exactness(m['encoding'])})",
        f"layout       {lay['total_views']} views, {lay['chunk_views']} per chunk, {lay['shard_views']} per shard",
        f"bytes/view   {info['bytes_per_view']['stored']:.0f} stored, {info['bytes_per_view']['raw']:.0f} raw",
    ]
    for name, a in info["arrays"].items():
        lines.append(f"  {name:14s} {a['dtype']:8s} {a['shape']}")
    if m.get("bad_samples"):
        lines.append(f"skipped      {len(m['bad_samples'])} undecodable images: {', '.join(m['bad_samples'][:5])}")
    return "\n".join(lines)


def _exactness(enc: dict) -> str:
    """What a user gets exactly from this encoding, and what approximately."""
    exact, approx = [], []
    (exact if enc.get("exact_ckf_targets") else approx).append("hard CKF targets")
    exact.append("hard distillation")
    if "exact_soft_distillation" in enc:
        (exact if enc["exact_soft_distillation"] else approx).append("soft distillation")
    if enc.get("soft_ckf") in ("exact", "approximate"):
        (exact if enc["soft_ckf"] == "exact" else approx).append("soft CKF")
    out = "exact: " + ", ".join(exact)
    return out + ("; approximate (top-k): " + ", ".join(approx) if approx else "")


def verify_cache(url: str, replay: int = 0, data: str | None = None) -> dict:
    """Everything that can be wrong with a cache, listed: unwritten or foreign shards, a manifest that does not
    match its arrays, a plan that does not match its parameters, chunks that fail their crc32c (zarr checks each
    chunk as it reads it) or hold unwritten values, and (with --replay) views that no longer replay.
    Returns {"summary": str, "problems": [str, ...]}; an empty list means sound."""
    if replay and not data:
        raise CacheError("verify --replay needs --data (the dataset the cache was made from)")
    cache = Cache.open(url)
    done = cache.done_shards()
    problems = cache.layout_problems()
    if problems:  # the rest would read arrays that are not what the manifest says
        return {"summary": "", "problems": problems}
    foreign = cache.foreign_shards()
    if len(foreign):
        problems.append(f"shards {foreign[:10].tolist()} were written by another run (another writer, or a cache "
                        "that was replaced); they do not count")
    if not done.all():
        problems.append(f"{int((~done).sum())} of {len(done)} shards not written (run the precompute command "
                        "again to finish them)")
    elif cache.manifest.get("status") != "complete":
        problems.append("every shard is written but the cache was not finalised (run the precompute command again)")
    bad_plan = [e for e in range(cache.plan_params.epochs) if not cache.plan_ok(e)]
    if bad_plan:
        problems.append(f"the stored plan of epochs {bad_plan[:10]} does not match its parameters")
    step = cache.manifest["layout"]["chunk_views"]
    names = ["fingerprint", *cache.encoding.arrays()]
    for s in np.flatnonzero(done):
        start, stop = cache.shard_range(int(s))
        missing = cache.missing_shard_files(int(s))
        if missing:  # a missing shard file reads back as fill values, silently
            problems.append(f"shard {s}: files missing for {', '.join(missing)} (marked done, but deleted since)")
            continue
        for a in range(start, stop, step):
            for name in names:
                where = f"views/{name} views {a}..{min(a + step, stop)} (shard {s})"
                try:
                    chunk = np.asarray(cache.group[f"views/{name}"][a:min(a + step, stop)])
                except Exception as e:  # noqa: BLE001 - zarr raises several types for a corrupt chunk
                    problems.append(f"{where}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                if chunk.dtype.kind == "f" and np.isnan(chunk).any():
                    problems.append(f"{where}: unwritten (NaN) values")
    summary = f"{url}: {len(done)} shards, every chunk read and checksummed, the plan matches its parameters"
    if replay:
        from .data import open_source

        r = replay_views(cache, open_source(data), replay)
        if r["drifted"]:
            problems.append(f"{len(r['drifted'])} of {r['checked']} replayed views differ from the pixels the teacher "
                            f"saw (e.g. view {r['drifted'][0]}); the cache recorded "
                            f"{cache.manifest['recipe'].get('library_versions')}")
        summary += f"; {r['checked']} replayed views match their fingerprints"
    return {"summary": summary, "problems": problems}
