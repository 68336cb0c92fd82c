"""`verify --teacher-check`: re-run the cache's teacher on replayed views and compare with what the cache stores.
This is the acceptance test for a cache made elsewhere (another lab, other library versions): what training needs
is that the teacher's targets agree on the pixels it saw. Views whose replay drifted (another Pillow rounds a few
pixels differently) are counted apart, with the libraries that differ, so a healthy cache is not failed for
them."""

from __future__ import annotations

import numpy as np
import torch

from ..cache.encodings import make_encoding
from ..cache.store import Cache
from ..cache.verify import replayer, spread_pairs
from ..data.open import open_source
from ..data.recipe import library_drift
from ..distributed import resolve_device
from ..errors import CacheError
from .model import create_teacher, resolve_precision


ALPHAS = (1.0, 0.75, 0.5, 0.25, 0.0)


def teacher_check(cache: Cache, source, count: int, checkpoint: str | None = None, pretrained: bool = False,
                  match: str = "key", device: str | None = None) -> dict:
    """Re-run the cache's teacher (the same weights: their sha256 must equal the manifest's) on about `count`
    replayed views; report the largest difference to the stored values and the fraction of CKF targets (at alpha
    1, 0.75, 0.5, 0.25, 0) and of global argmaxes that come out differently: over all views, and apart over the
    views that replay exactly (the teacher saw these very pixels: only the teacher can differ) and those that
    drifted (another Pillow or torchvision rounded their pixels differently: their targets may differ with no
    fault of the cache)."""
    m = cache.manifest["teacher"]
    dev = resolve_device(device)
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
    replay = replayer(cache, source, match, dev)
    full = make_encoding("full", cache.encoding.num_classes, cache.encoding.positions)
    tally = {k: {"views": 0, "changed": 0, "total": 0, "argmax_changed": 0, "max_difference": 0.0}
             for k in ("exact", "drifted")}
    for v in spread_pairs(cache, count):
        got = replay(v)
        exact = [int(got["fingerprint"][i]) == int(f) for i, f in enumerate(cache.read_replay(v, v + 2)["fingerprint"])]
        dense, glob = teacher(got["image"].to(dev))
        now, _ = full.encode(dense, glob)
        stored, spill = cache.read_views(v, v + 2)
        stored = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in stored.items()}
        spill = None if spill is None else {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in spill.items()}
        now = {k: t.cpu() for k, t in now.items()}
        changed = sum((full.decode_targets(now, a) != cache.encoding.decode_targets(stored, a, spill)).sum(-1)
                      for a in ALPHAS)  # per view
        argmax = full.global_argmax(now) != cache.encoding.global_argmax(stored)
        positions = cache.encoding.positions * len(ALPHAS)
        for i in range(2):
            t = tally["exact" if exact[i] else "drifted"]
            t["views"] += 1
            t["changed"] += int(changed[i])
            t["total"] += positions
            t["argmax_changed"] += int(argmax[i])
            t["max_difference"] = max(t["max_difference"], _value_difference(
                cache.encoding, {k: a[i:i + 1] for k, a in stored.items()}, {k: a[i:i + 1] for k, a in now.items()}))
    groups = {k: {"views": t["views"], "changed_targets": t["changed"] / max(t["total"], 1),
                  "changed_argmax": t["argmax_changed"] / max(t["views"], 1), "max_difference": t["max_difference"]}
              for k, t in tally.items()}
    views = sum(t["views"] for t in tally.values())
    return {"views": views,
            "changed_targets": sum(t["changed"] for t in tally.values()) / max(sum(t["total"] for t in
                                                                               tally.values()), 1),
            "changed_argmax": sum(t["argmax_changed"] for t in tally.values()) / max(views, 1),
            "max_difference": max(t["max_difference"] for t in tally.values()),
            "exact": groups["exact"], "drifted": groups["drifted"],
            "libraries": library_drift(cache.manifest).lstrip("; "),
            "precision": precision, "device": str(dev)}


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


def _pct(group: dict) -> str:
    return (f"{100 * group['changed_targets']:.2f}% of CKF targets and {100 * group['changed_argmax']:.2f}% of "
            "global argmaxes")


def check_teacher(report: dict, url: str, data: str | None, count: int, checkpoint: str | None = None,
                  pretrained: bool = False, match: str = "key", device: str | None = None,
                  tolerance: float = 0.02) -> dict:
    """Adds the teacher re-run on about `count` views to a verify report (summary, problems, "teacher"). The
    verdict is the views that replay exactly: there the teacher saw the cached pixels, so a difference is the
    teacher's (weights, device, precision) or the stored values'. Drifted views are reported apart, with the
    libraries whose versions differ from the cache's, and judged only when no view replays exactly."""
    if not data:
        raise CacheError("verify --teacher-check needs --data (the dataset the cache was made from)")
    t = teacher_check(Cache.open(url), open_source(data), count, checkpoint, pretrained, match, device)
    report["teacher"] = t
    exact, drifted = t["exact"], t["drifted"]
    report["summary"] += (f"; teacher re-run on {t['views']} views ({t['precision']}, {t['device']}): {_pct(t)} "
                          f"differ, largest logit difference {t['max_difference']:.4g}")
    if drifted["views"]:
        report["summary"] += (f" (on the {exact['views']} views that replay exactly: {_pct(exact)}; on the "
                              f"{drifted['views']} whose replay drifted: {_pct(drifted)}; {t['libraries']})")
    judged, where = (exact, f"on the {exact['views']} views that replay exactly") if exact["views"] else \
        (drifted, f"on {drifted['views']} views, none of which replays exactly ({t['libraries']}; install the "
                  "cache's versions, `cskd-cache inspect CACHE --requirements`, to tell the teacher from the replay)")
    if judged["changed_targets"] > tolerance or judged["changed_argmax"] > tolerance:
        report["problems"].append(f"the teacher re-run changes {_pct(judged)} {where} (tolerance "
                                  f"{100 * tolerance:.1f}%)")
    return report
