"""Which cached views each training epoch visits, and in what order.

A cache holds E augmented epochs (the plan); a run trains T epochs. Training epoch e reads cached epoch e % E.
The first pass over the cache (cycle 0) visits every cached epoch in plan order, exactly as the plan was made
(and as the official code would see fresh views). When T > E the cache is cycled, and a later cycle must not
replay the previous cycle's batches or drop the same tail again: each cycle visits the epoch's views in a new
order of chunk-sized blocks of pairs (reads stay sequential within a block, pairs stay together), so the views
cut off by the last partial batch differ from cycle to cycle and every view is reachable.
"""

from __future__ import annotations

import numpy as np


def epoch_views(epoch: int, cached_epochs: list[int] | int, views_per_epoch: int, global_batch: int, steps: int,
                block: int, seed: int, epoch_stride: int | None = None) -> np.ndarray:
    """Global view indices (cached epoch * epoch_stride + position) of training epoch `epoch`, in step order:
    step s of rank r takes entries [s * global_batch + r * batch, ... + batch). Length steps * global_batch.
    `cached_epochs`: the cache's epochs training may read (a count means 0..count-1); a partial copy of a cache
    holds some of them only."""
    if block < 2 or block % 2 or views_per_epoch % 2 or global_batch % 2:
        raise ValueError("blocks, epochs and batches hold whole mixing pairs (even sizes)")
    if steps * global_batch > views_per_epoch:
        raise ValueError(f"{steps} steps of {global_batch} views exceed the {views_per_epoch} views of an epoch")
    held = list(range(cached_epochs)) if isinstance(cached_epochs, int) else list(cached_epochs)
    cycle, i = divmod(epoch, len(held))
    cached = held[i]
    first = cached * (epoch_stride or views_per_epoch)
    n = steps * global_batch
    if cycle == 0:
        return first + np.arange(n, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, cached, cycle, 0xC5D])))
    starts = np.arange(0, views_per_epoch, block, dtype=np.int64)
    blocks = [np.arange(a, min(a + block, views_per_epoch), dtype=np.int64)
              for a in starts[rng.permutation(len(starts))]]
    return first + np.concatenate(blocks)[:n]


# The official code sees a fresh view every epoch (reuse 1). Reuse is a trade-off whose cost is not known at ImageNet
# scale; on small data (docs/results.md) 10 uses per view cost points. Beyond this many uses train warns.
MAX_MEASURED_REUSE = 5


def reuse_factor(train_epochs: int, plan_epochs: int) -> float:
    """How many times each cached view is used (training epochs / cached epochs); 1.0 is the official condition."""
    return train_epochs / plan_epochs
