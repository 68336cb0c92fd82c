"""Looking at a cache: `inspect` (what it is) and `verify` (is every byte and every view still right)."""

from __future__ import annotations

import numpy as np
import torch

from .data import match_samples, open_source
from .errors import CacheError
from .store import Cache
from .loader import library_drift
from .views import PairDataset, pair_items, replay_matches, replay_tolerance, signature_distance


def _spread_pairs(cache: Cache, count: int) -> list[int]:
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


def _replayed(cache: Cache, source, match: str):
    """A function view -> the replayed pair (dict as PairDataset gives it), over the cache's samples in --data."""
    ids, _ = match_samples(cache.sample_keys(), cache.sample_labels(), source, match,
                           cache.sample_hashes() if match == "content" else None)
    dataset = PairDataset(source.subset(ids), cache.recipe, cache.fingerprint_kind, cache.signature_kind)

    def replay(v: int) -> dict:
        got = dataset[pair_items(cache.epoch_plan, [v, v + 1], cache.stride)[0]]
        if "error" in got:
            raise CacheError(f"--data: {got['error']}")
        return got
    return replay


def replay_views(cache: Cache, source, count: int, match: str = "key") -> dict:
    """Replay about `count` views (whole pairs) spread over the done shards; compare their pixel fingerprints
    with the stored ones and, where they differ, measure by how much (signature distance, normalised units).
    Returns {"checked": n, "drifted": [view, ...], "distance": [d, ...]}. A drift means the augmentation code,
    a library version or the images changed since the cache was made."""
    replay = _replayed(cache, source, match)
    out = {"checked": 0, "drifted": [], "distance": []}
    for v in _spread_pairs(cache, count):
        got, want = replay(v), cache.read_replay(v, v + 2)
        for i in range(2):
            if int(got["fingerprint"][i]) != int(want["fingerprint"][i]):
                out["drifted"].append(v + i)
                out["distance"].append(float(signature_distance(got["signature"][i].numpy(), want["signature"][i],
                                                                cache.signature_kind))
                                       if "signature" in want else float("inf"))
        out["checked"] += 2
    return out


ALPHAS = (1.0, 0.75, 0.5, 0.25, 0.0)


def teacher_check(cache: Cache, source, count: int, checkpoint: str | None = None, pretrained: bool = False,
                  match: str = "key", device: str | None = None) -> dict:
    """Re-run the cache's teacher (the same weights: their sha256 must equal the manifest's) on about `count`
    replayed views; report the largest difference to the stored values and the fraction of CKF targets (at alpha
    1, 0.75, 0.5, 0.25, 0) and of global argmaxes that come out differently."""
    from .encodings import make_encoding
    from .teacher import create_teacher, resolve_precision

    m = cache.manifest["teacher"]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = m.get("precision", "fp32")
    if dev.type == "cpu" and precision != "fp32":
        precision = resolve_precision(None, dev)  # autocast fp16 on a CPU is slow and partly unsupported
    recipe = cache.recipe
    teacher, info = create_teacher(m["name"], pretrained=pretrained, checkpoint=checkpoint, view_mean=recipe.mean,
                                   view_std=recipe.std, precision=precision)
    if info["weights_sha256"] != m["weights_sha256"]:
        raise CacheError(f"--teacher-checkpoint: these weights (sha256 {info['weights_sha256'][:16]}) are not the "
                         f"cache's teacher ({m['weights_sha256'][:16]}); give the checkpoint it was made with")
    teacher = teacher.to(dev)
    replay = _replayed(cache, source, match)
    full = make_encoding("full", cache.encoding.num_classes, cache.encoding.positions)
    changed = total = argmax_changed = views = 0
    diff = 0.0
    for v in _spread_pairs(cache, count):
        got = replay(v)
        dense, glob = teacher(got["image"].to(dev))
        now, _ = full.encode(dense, glob)
        stored, spill = cache.read_views(v, v + 2)
        stored = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in stored.items()}
        spill = None if spill is None else {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in spill.items()}
        now = {k: t.cpu() for k, t in now.items()}
        for a in ALPHAS:
            y_now, y_then = full.decode_targets(now, a), cache.encoding.decode_targets(stored, a, spill)
            changed += int((y_now != y_then).sum())
            total += y_now.numel()
        argmax_changed += int((full.global_argmax(now) != cache.encoding.global_argmax(stored)).sum())
        diff = max(diff, _value_difference(cache.encoding, stored, now))
        views += 2
    return {"views": views, "changed_targets": changed / max(total, 1), "changed_argmax": argmax_changed /
            max(views, 1), "max_difference": diff, "precision": precision, "device": str(dev)}


def _value_difference(enc, stored: dict, now: dict) -> float:
    """Largest |stored - recomputed| over the logits the encoding keeps (fp16 dense, fp32 global)."""
    d, g = now["dense"].float(), now["global"].float()
    if enc.name == "full":
        return float(max((stored["dense"].float() - d).abs().max(), (stored["global"].float() - g).abs().max()))
    table = stored["global_class"].long()
    out = (stored["global_value"].float() - g.gather(-1, table.clamp(min=0))).abs().masked_fill(table < 0, 0).max()
    if enc.name == "ckf":
        cls = enc.slot_classes(stored).long() if "ckf_slot" in stored else stored["ckf_class"].long()
        ok = cls >= 0
        dd = (stored["ckf_dense"].float() - d.gather(-1, cls.clamp(min=0))).abs()
        out = max(out, dd[ok].max() if ok.any() else out)
    else:
        out = max(out, (stored["dense_value"].float() - d.gather(-1, stored["dense_class"].long())).abs().max())
    return float(out)


def requirements(manifest: dict) -> str:
    """The library versions the replay depends on, pinned, as a requirements file another lab installs."""
    names = {"pillow": "pillow", "torch": "torch", "torchvision": "torchvision", "timm": "timm", "numpy": "numpy"}
    versions = manifest["recipe"].get("library_versions", {})
    return "\n".join(f"{names.get(k, k)}=={v}" for k, v in sorted(versions.items())) + \
        f"\ncskd-cache>={manifest.get('tool_version', '0.1.0')}"


def describe_cache(url: str) -> dict:
    cache = Cache.open(url)
    done = cache.done_shards()
    arrays = {}
    for name in cache.view_names:
        a = cache.group[f"views/{name}"]
        arrays[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks),
                        "shards": list(a.shards) if a.shards else None}
    per_view = cache.bytes_per_view()
    return {
        "url": url,
        "status": "complete" if cache.complete else "partial" if cache.manifest.get("status") == "partial" and
                  cache.usable_epochs else "incomplete",
        "epochs_usable": cache.usable_epochs,
        "epochs_complete": cache.held_epochs() if cache.epoch_aligned else
        (list(range(cache.plan_params.epochs)) if cache.complete else []),
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
        f"cache        {info['url']}  ({info['status']}: {info['shards_done']}/{info['shards_total']} shards"
        + (f"; epochs {_ranges(info['epochs_usable'])} usable" if info["status"] == "partial" else "") + ")",
        f"teacher      {t['name']}  weights {t['weights_sha256'][:16]}  input {t['input_size']}px  "
        f"grid {m['grid'][0]}x{m['grid'][1]}  classes {m['num_classes']}",
        f"dataset      {d['kind']} {d['location']}  {d.get('used_samples', d['num_samples'])} samples  "
        f"fingerprint {d['fingerprint'][:16]}",
        f"plan         {m['plan']['epochs']} epochs x {lay['views_per_epoch']} views  repeats "
        f"{m['plan']['repeats']}  seed {m['plan']['seed']}  epochs complete: "
        f"{_ranges(info['epochs_complete']) or 'none'}",
        "recipe       " + _recipe_line(m["recipe"]),
        f"teacher run  precision {t.get('precision', 'fp32')}  normalised with mean {t.get('mean')} std "
        f"{t.get('std')}",
        f"encoding     {m['encoding']['name']}  {m['encoding'].get('params', {})}  ({_exactness(m['encoding'])})",
        f"layout       {lay['total_views']} views, {lay['chunk_views']} per chunk, {lay['shard_views']} per shard",
        f"bytes/view   {info['bytes_per_view']['stored']:.0f} stored, {info['bytes_per_view']['raw']:.0f} raw",
    ]
    per = info["bytes_per_view"]["per_array"]
    for name, a in info["arrays"].items():
        b = per.get(name, {}).get("stored")
        lines.append(f"  {name:14s} {a['dtype']:8s} {str(a['shape']):18s}" + (f" {b:9.1f} B/view" if b else ""))
    bad = m.get("bad_samples") or []
    lines.append(f"skipped      {len(bad)} undecodable images" + (": " + ", ".join(repr(k) for k in bad[:10]) +
                                                                 (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
                                                                 if bad else ""))
    return "\n".join(lines)


def _recipe_line(r: dict) -> str:
    keys = ("input_size", "interpolation", "scale", "hflip", "auto_augment", "re_prob", "mixup_alpha", "cutmix_alpha",
            "mix_prob", "switch_prob", "label_smoothing")
    return "  ".join(f"{k} {r.get(k)}" for k in keys if k in r)


def _ranges(epochs) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out = []
    for e in sorted(epochs):
        if out and out[-1][1] == e - 1:
            out[-1][1] = e
        else:
            out.append([e, e])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out)


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


def verify_cache(url: str, replay: int = 0, data: str | None = None, match: str = "key",
                 tolerance: float | None = None,
                 teacher_views: int = 0, teacher_checkpoint: str | None = None, pretrained: bool = False,
                 teacher_tolerance: float = 0.02, device: str | None = None) -> dict:
    """Everything that can be wrong with a cache, listed: unwritten or foreign shards, a manifest that does not
    match its arrays, a plan that does not match its parameters, chunks that fail their crc32c (zarr checks each
    chunk as it reads it) or hold unwritten values, and (with --replay) views that no longer replay.
    Returns {"summary": str, "problems": [str, ...]}; an empty list means sound."""
    if (replay or teacher_views) and not data:
        raise CacheError("verify --replay / --teacher-check need --data (the dataset the cache was made from)")
    cache = Cache.open(url)
    done = cache.done_shards()
    problems = cache.layout_problems()
    if problems:  # the rest would read arrays that are not what the manifest says
        return {"summary": "", "problems": problems}
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
    bad_plan = [e for e in epochs if not cache.plan_ok(e)]
    if bad_plan:
        problems.append(f"the stored plan of epochs {bad_plan[:10]} does not match its parameters")
    step = cache.manifest["layout"]["chunk_views"]
    names = cache.view_names
    for s in np.flatnonzero(done):
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
            # fill values where a written view cannot hold them: the encoding knows its own padding (a ckf global
            # table is NaN/-1 padded after its last class); a fingerprint is never 0
            empty = cache.encoding.unwritten({k: chunk[k] for k in cache.encoding.arrays()}) | \
                (chunk["fingerprint"] == 0)
            if empty.any():
                problems.append(f"views {a}..{b} (shard {s}): {int(empty.sum())} views hold unwritten (fill) "
                                f"values, e.g. view {a + int(np.flatnonzero(empty)[0])}")
    if cache.manifest.get("files"):  # every file against the list a mirror or a partial copy is checked by
        from .share import check_files

        problems += check_files(url, cache.manifest)
    held = f" (partial: epochs {_ranges(cache.manifest['epochs_held'])})" if status == "partial" else ""
    summary = (f"{url}: {len(expected)} shards{held}, every chunk read and checksummed"
               + (", every file matches SHA256SUMS" if cache.manifest.get("files") else "")
               + ", the plan matches its parameters")
    source = open_source(data) if (replay or teacher_views) else None
    report = {"summary": summary, "problems": problems}
    if replay:
        r = replay_views(cache, source, replay, match)
        tolerance = replay_tolerance(tolerance, cache.signature_kind)
        # tolerance 0: exact pixels only (a drift can leave a signature unchanged, at distance 0)
        far = [d for d in r["distance"] if not replay_matches(False, d, tolerance)]
        if far:
            problems.append(f"{len(far)} of {r['checked']} replayed views differ from the pixels the teacher saw by "
                            f"more than {tolerance} (up to {max(far):.3f}){library_drift(cache.manifest)} "
                            "(inspect --requirements pins the cache's)")
        near = len(r["drifted"]) - len(far)
        report["replay"] = r
        if not r["drifted"]:
            report["summary"] += f"; {r['checked']} replayed views match their fingerprints"
        else:
            report["summary"] += (f"; {r['checked']} replayed views: {r['checked'] - len(r['drifted'])} exact"
                                  + (f", {near} within tolerance {tolerance} (at most "
                                     f"{max(d for d in r['distance'] if d <= tolerance):.3f})" if near else "")
                                  + (f", {len(far)} beyond it" if far else ""))
    if teacher_views:
        t = teacher_check(cache, source, teacher_views, teacher_checkpoint, pretrained, match, device)
        report["teacher"] = t
        report["summary"] += (f"; teacher re-run on {t['views']} views ({t['precision']}, {t['device']}): "
                              f"{100 * t['changed_targets']:.2f}% of CKF targets and {100 * t['changed_argmax']:.2f}% "
                              f"of global argmaxes differ, largest logit difference {t['max_difference']:.4g}")
        if t["changed_targets"] > teacher_tolerance or t["changed_argmax"] > teacher_tolerance:
            problems.append(f"the teacher re-run changes {100 * t['changed_targets']:.2f}% of CKF targets and "
                            f"{100 * t['changed_argmax']:.2f}% of global argmaxes (tolerance "
                            f"{100 * teacher_tolerance:.1f}%)")
    return report
