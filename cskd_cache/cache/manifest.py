"""What a cache is: its format constants, layout and identity, and what makes two caches the same.

The identity of a cache is what its numbers depend on (teacher weights and precision, dataset fingerprint, recipe
values, plan, encoding, layout, grid, classes, skipped samples), not where its data lives or which library
versions ran: a replay on other versions is checked by the views' fingerprints and signatures. Resumes,
extensions, merges and checkpoints compare identities.
"""

from __future__ import annotations

import json

FORMAT = "cskd-cache"
FORMAT_VERSION = 4  # the newest this version reads and writes: 4 = 3 + per-view augmentation parameters (--replay tensor)
PIL_FORMAT_VERSION = 3  # what --replay pil caches are: a 64-byte sketch signature, ckf slots that may take 2 bytes
ATTR = "cskd_cache"
# Manifest sections that must match for a resumed run to write into an existing cache.
IDENTITY = ("teacher", "dataset", "recipe", "plan", "encoding", "layout", "grid", "num_classes", "bad_samples")
# Within them, what does not change a single stored number: where the data lives and which library versions ran
# (a replay on other versions is checked by its pixel fingerprints, not by version strings).
_NOT_IDENTITY = {"dataset": ("kind", "location"), "recipe": ("library_versions",),
                 "teacher": ("checkpoint", "pretrained_tag")}


def make_layout(epochs: int, views_per_epoch: int, chunk_views: int, shard_views: int) -> dict:
    """Where views live. Each epoch has a slot of `epoch_stride` views, a whole number of shards (format 2), so
    every shard belongs to one epoch: epochs can be copied, pulled, merged and appended shard file by shard file.
    The padding at the end of a slot is never written (zarr stores no empty chunks), so it costs nothing."""
    stride = -(-views_per_epoch // shard_views) * shard_views
    return {"total_views": epochs * stride, "views_per_epoch": views_per_epoch, "epoch_stride": stride,
            "chunk_views": chunk_views, "shard_views": shard_views, "num_shards": epochs * stride // shard_views,
            "view_index": "epoch * epoch_stride + position"}


def identity(manifest: dict) -> dict:
    """What a cache's numbers depend on: teacher weights and precision, dataset fingerprint, recipe values, plan,
    encoding, layout, grid, classes and skipped samples. Checkpoints record it; resumes compare it."""
    out = {}
    for key in IDENTITY:
        v = manifest.get(key)
        if isinstance(v, dict):
            v = {k: x for k, x in v.items() if k not in _NOT_IDENTITY.get(key, ())}
        out[key] = json.loads(json.dumps(v, default=str))  # tuples -> lists: compare values, not containers
    return out

# Per-view records of what the teacher saw (checked when a view is replayed): a 64-bit hash of the pixels, and a
# signature that gives a distance (format 3: 64 bytes, `sketch64`; format 2: 48, `cells4x4`; format 1: none).


def without_epochs(ident: dict) -> dict:
    """An identity less what depends on the number of epochs: caches that agree on this are the same plan, and
    can be extended, subset and merged."""
    ident = json.loads(json.dumps(ident))
    ident["plan"].pop("epochs", None)
    for k in ("total_views", "num_shards"):
        ident["layout"].pop(k, None)
    return ident



def manifest_mismatch(old: dict, new: dict) -> str | None:
    """The first identity section that differs, described for a one-line error, or None."""
    ia, ib = identity(old), identity(new)
    for key in IDENTITY:
        a, b = ia[key], ib[key]
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            if key == "teacher":
                if a.get("weights_sha256") == b.get("weights_sha256"):
                    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                    return f"another teacher setting ({', '.join(f'{k} {a.get(k)} vs {b.get(k)}' for k in diff)})"
                return f"another teacher ({a.get('name')} {str(a.get('weights_sha256'))[:12]} vs " \
                       f"{b.get('name')} {str(b.get('weights_sha256'))[:12]})"
            if key == "dataset":
                if a.get("fingerprint") == b.get("fingerprint"):
                    return f"another selection of the dataset ({a.get('used_samples')} vs {b.get('used_samples')} " \
                           "samples used)"
                return f"another dataset (fingerprint {str(a.get('fingerprint'))[:12]} vs " \
                       f"{str(b.get('fingerprint'))[:12]})"
            if key == "recipe":
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                return f"another augmentation recipe (differs in {', '.join(diff)})"
            if key == "encoding":
                return f"another encoding ({a.get('name')} {a.get('params')} vs {b.get('name')} {b.get('params')})"
            return f"another {key}"
    return None


def run_marker(manifest: dict) -> int:
    """The 63-bit number a run writes into `views/shard_done` when a shard is done: from its run id."""
    run_id = manifest.get("run_id")
    return 1 if run_id is None else int(run_id[:15], 16) | 1  # | 1: never 0, the fill value
