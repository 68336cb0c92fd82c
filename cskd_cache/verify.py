"""Looking at a cache: `inspect` (what it is) and `verify` (is every byte and every view still right)."""

from __future__ import annotations

import numpy as np

from .errors import CacheError
from .store import Cache
from .views import PairDataset, pair_items


def check_replay(cache: Cache, source, count: int, offset: int = 0) -> int:
    """Replay `count` pairs spread over the done shards and compare pixel fingerprints with the stored ones.

    A mismatch means augmentation code, a library version or the data changed since the cache was made."""
    keys = cache.sample_keys()
    index = {k: i for i, k in enumerate(source.keys)}
    missing = [k for k in keys[:1000] if k not in index]
    if missing:
        raise CacheError(f"--data lacks samples the cache was made from (e.g. {missing[0]!r})")
    source = source.subset([index[k] for k in keys])
    done = np.flatnonzero(cache.done_shards())
    if not len(done):
        return 0
    dataset = PairDataset(source, cache.recipe)
    total = sum(cache.shard_range(int(s))[1] - cache.shard_range(int(s))[0] for s in done) // 2
    checked = 0
    for j in range(count):
        k = (offset + j * max(total // max(count, 1), 1)) % total
        for s in done:  # pair k among the done shards
            a, b = cache.shard_range(int(s))
            if k < (b - a) // 2:
                v = a + 2 * k
                break
            k -= (b - a) // 2
        item = pair_items(cache.epoch_plan, [v, v + 1], cache.views_per_epoch)[0]
        got = dataset[item]
        if "error" in got:
            raise CacheError(f"--data: {got['error']}")
        want = cache.read_fingerprints(v, v + 2)
        if not np.array_equal(got["fingerprint"].numpy(), want):
            raise CacheError(f"replay drift at view {v}: the augmented pixels differ from those the teacher saw "
                             "(augmentation code, library versions or images changed); use the environment "
                             f"recorded in the cache ({cache.manifest['recipe']['library_versions']})")
        checked += 2
    return checked


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


def verify_cache(url: str, replay: int = 0, data: str | None = None) -> str:
    """Read every chunk of every view array (zarr checks each chunk's crc32c), then optionally replay views."""
    cache = Cache.open(url)
    done = cache.done_shards()
    problems = []
    if not done.all():
        problems.append(f"{int((~done).sum())} of {len(done)} shards not written")
    bad_plan = [e for e in range(cache.plan_params.epochs) if not cache.plan_ok(e)]
    if bad_plan:
        problems.append(f"the stored plan of epochs {bad_plan[:10]} does not match its parameters")
    step = cache.manifest["layout"]["chunk_views"]
    names = ["fingerprint", *cache.encoding.arrays()]
    for s in np.flatnonzero(done):
        start, stop = cache.shard_range(int(s))
        for a in range(start, stop, step):
            for name in names:
                try:
                    chunk = np.asarray(cache.group[f"views/{name}"][a:min(a + step, stop)])
                except Exception as e:  # noqa: BLE001 - zarr raises several types for a corrupt chunk
                    problems.append(f"views/{name} views {a}..{min(a + step, stop)}: {type(e).__name__}: {e}")
                    continue
                if chunk.dtype.kind == "f" and np.isnan(chunk).any():
                    problems.append(f"views/{name} views {a}..{min(a + step, stop)}: unwritten (NaN) values")
    if problems:
        raise CacheError(f"{url}: verify failed: " + "; ".join(problems[:5]) +
                         (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
    report = f"{url}: {len(done)} shards, every chunk read and checksummed, the plan matches its parameters"
    if replay:
        if not data:
            raise CacheError("verify --replay needs --data (the dataset the cache was made from)")
        from .data import open_source

        checked = check_replay(cache, open_source(data), replay)
        report += f"; {checked} replayed views match their fingerprints"
    return report
