"""The training data path: replayed mixing pairs, with the teacher's cached outputs read where they are replayed.

Each DataLoader worker replays a batch's pairs and reads that batch's teacher outputs from the cache (a few
contiguous runs of whole chunks), so the training step never waits on storage. Workers open the cache themselves,
lazily, once per process: no zarr or fsspec handle crosses a fork. Every replayed view's pixel fingerprint is
compared with the one stored when the teacher saw it; a mismatch stops training (the cached outputs would belong
to other pixels). Errors travel as data: DataLoader cannot re-raise exceptions that take custom arguments.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..cache.store import Cache, to_torch
from ..errors import CacheError
from ..data.fingerprint import replay_matches, replay_tolerance, signature_distance
from ..data.recipe import library_drift
from ..data.replay import PairDataset, collate_pairs, pair_items


class CachedOutputs:
    """collate_fn: pairs -> one batch, plus the cache's encoded outputs for its views (key 'teacher', and
    'spill' for ckf positions past the width). Picklable: it carries the URL, not an open cache."""

    def __init__(self, url: str | None, tolerance: float | None = None):
        self.url, self.tolerance, self._cache, self._pid = url, tolerance, None, None

    def cache(self) -> Cache:
        if self._pid != os.getpid():
            self._cache, self._pid = Cache.open(self.url), os.getpid()
        return self._cache

    def __getstate__(self) -> dict:
        return {"url": self.url, "tolerance": self.tolerance, "_cache": None, "_pid": None}

    def __call__(self, items: list[dict]) -> dict:
        batch = collate_pairs(items)
        if "error" in batch:
            return {"error": f"--data: {batch['error']}"}
        if self.url is None:
            return batch
        cache = self.cache()
        views = batch["view"].numpy()
        try:
            arrays, replay, spill = cache.gather(views)
        except Exception as e:  # noqa: BLE001 - zarr raises several types for a corrupt or missing chunk
            shards = sorted({int(v) // cache.shard_views for v in views})
            return {"error": f"--cache {self.url}: reading views of shard(s) {shards} failed ({type(e).__name__}: "
                             f"{str(e)[:160]}); the cache is damaged there: run `cskd-cache verify {self.url}`"}
        stored = replay["fingerprint"]
        if (stored == 0).any():  # the fill value: a shard file that is gone (a real fingerprint is never 0)
            shards = sorted({int(v) // cache.shard_views for v in views[stored == 0]})
            return {"error": f"--cache {self.url}: the files of shard(s) {shards} are missing (deleted after the "
                             f"cache was made?); run `cskd-cache verify {self.url}` and precompute again"}
        if "params" in batch:
            # --replay tensor: every view's draws are compared here, exactly (a changed timm draws other crops or
            # ops: caught on every view, not only the fingerprinted ones); the pixels are made and checked on the
            # device (`finish`)
            if "params" in replay and not np.array_equal(replay["params"], batch["params"].numpy()):
                bad = int(views[np.flatnonzero((replay["params"] != batch["params"].numpy()).any(1))[0]])
                return {"error": f"replay drift at view {bad}: its augmentation parameters differ from those the "
                                 "teacher saw (timm's draws changed since the cache was made"
                                 f"{library_drift(cache.manifest)}; `cskd-cache inspect --requirements` pins them)"}
            batch["stored"] = {k: torch.from_numpy(np.ascontiguousarray(replay[k]))
                               for k in ("fingerprint", "signature") if k in replay}
        else:  # the views fingerprinted in the worker (all at first, then a rotating sample: see RankBatches)
            verdict = self.compare(views, replay, batch)
            if "error" in verdict:
                return verdict
            batch.update(verdict)
        missing = cache.encoding.missing_spill(arrays, spill)
        if missing:  # checked here, on the CPU, so that decoding on the device never waits for it
            return {"error": f"--cache {self.url}: {missing} positions of views {int(views.min())}..{int(views.max())} "
                             f"have no spill rows though they need them; the cache is damaged: run `cskd-cache "
                             f"verify {self.url}`"}
        batch["teacher"] = to_torch(arrays)
        if spill is not None:
            batch["spill"] = to_torch(spill)
        return batch

    def compare(self, views: np.ndarray, stored: dict, batch: dict) -> dict:
        """The checked views' fingerprints against the stored ones -> {} (all equal), {"drift": [n, largest
        distance]} (small drift, tolerated and counted) or {"error": ...}."""
        cache = self.cache()
        off = np.flatnonzero(batch["checked"].numpy() & (stored["fingerprint"] != batch["fingerprint"].numpy()))
        if not len(off):
            return {}
        # Not the pixels the teacher saw. Small drift (other library versions round a few pixels differently) is
        # tolerated and counted; anything else stops training. A batch holds whole pairs, so a wrong partner shows
        # in the view that carries most of it.
        kind = cache.signature_kind
        tol = replay_tolerance(self.tolerance, kind)
        dist = signature_distance(stored["signature"][off], batch["signature"].numpy()[off], kind) \
            if "signature" in stored else np.full(len(off), np.inf)
        if not replay_matches(False, dist, tol).all():
            bad = int(views[off[int(dist.argmax())]])
            far = "" if not np.isfinite(dist.max()) else f" by {dist.max():.3f} (tolerance {tol})"
            return {"error": f"replay drift at view {bad}{far}: the augmented pixels differ from those the teacher "
                             "saw (augmentation code, library versions or images changed since the cache was made"
                             f"{library_drift(cache.manifest)}; `cskd-cache inspect --requirements` pins them)"}
        return {"drift": torch.tensor([len(off), float(dist.max())])}

    def finish(self, dataset: PairDataset, batch: dict, device) -> torch.Tensor:
        """The batch's views on `device` (dataset.finish); views made there (--replay tensor) are checked there."""
        x = dataset.finish(batch, device)
        if "stored" in batch:
            stored = {k: v.numpy() for k, v in batch.pop("stored").items()}
            verdict = self.compare(batch["view"].numpy(), stored, batch)
            if "error" in verdict:
                raise CacheError(verdict["error"])
            batch.update(verdict)
        return x


class RankBatches:
    """Batch sampler of one rank: step s takes views[s * batch * world + rank * batch, +batch) of the current
    epoch's order (`views`, set before each epoch). Plan entries are looked up as the loader asks for them, not
    held for the whole epoch.

    Which pairs the workers fingerprint (a pixel hash and a signature cost about 0.5 ms a view at 224 px, an eighth
    of the data path): every pair of the first `check_steps` steps (a run that starts on other libraries or images
    is stopped at once), then the pairs with (pair index + epoch) % check_every == 0, so every view is checked once
    in `check_every` epochs and a systematic drift, which touches every view, is still met on every step.
    check_every 1: every view; 0: none (an online teacher or no teacher: nothing cached to compare with)."""

    def __init__(self, plan, views: np.ndarray, epoch_stride: int, batch: int, rank: int = 0, world: int = 1,
                 check_every: int = 1):
        self.plan, self.views, self.stride = plan, views, epoch_stride
        self.batch, self.rank, self.gb = batch, rank, batch * world
        self.check_every, self.check_steps, self.epoch = check_every, 0, 0

    def __len__(self) -> int:
        return len(self.views) // self.gb

    def __iter__(self):
        for s in range(len(self)):
            a = s * self.gb + self.rank * self.batch
            views = self.views[a: a + self.batch]
            yield pair_items(self.plan, views, self.stride, self._checks(views, s))

    def _checks(self, views: np.ndarray, step: int):
        if self.check_every <= 0:
            return False
        if self.check_every == 1 or step < self.check_steps:
            return True
        return (views[0::2] // 2 + self.epoch) % self.check_every == 0


def epoch_loader(dataset: PairDataset, batches: RankBatches, cache_url: str | None, workers: int,
                 pin_memory: bool, tolerance: float | None = None) -> torch.utils.data.DataLoader:
    # persistent: every epoch iterates the same sampler object (its views set per epoch), so worker start-up and
    # cache opening happen once per run, not once per epoch
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       persistent_workers=workers > 0,
                                       collate_fn=CachedOutputs(cache_url, tolerance), pin_memory=pin_memory,
                                       prefetch_factor=4 if workers else None)
