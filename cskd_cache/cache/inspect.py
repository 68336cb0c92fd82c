"""`inspect`: what a cache is (teacher, data, recipe, plan, encoding and what it keeps exactly, completeness, bytes
per view), and the library versions its replay depends on."""

from __future__ import annotations

from .store import Cache


# cskd-cache has no PyPI release yet: a requirement on it would fail `pip install -r`, so the file says how to
# install it instead (a comment, which pip skips). When a release exists, pin it like the libraries.
_INSTALL = ("# made with cskd-cache {version}, which is not on PyPI yet: install it from its repository\n"
            "# (git clone, then pip install -e .) or from a wheel (pip install cskd_cache-{version}-py3-none-any.whl)")


def requirements(manifest: dict) -> str:
    """The library versions the replay depends on, pinned, as a requirements file another lab installs."""
    names = {"pillow": "pillow", "torch": "torch", "torchvision": "torchvision", "timm": "timm", "numpy": "numpy"}
    versions = manifest["recipe"].get("library_versions", {})
    return _INSTALL.format(version=manifest.get("tool_version", "0.1.0")) + "\n" + \
        "\n".join(f"{names.get(k, k)}=={v}" for k, v in sorted(versions.items()))


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
    return "  ".join(f"{k} {r.get(k)}" for k in keys if k in r) + f"  replay {r.get('replay', 'pil')}"


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
