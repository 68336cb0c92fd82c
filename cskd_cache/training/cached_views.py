"""The cache without our training loop: replayed views, their labels and mixing, their teacher outputs.

    views = CachedViews("teacher-cache.zarr", "/data/imagenet/train", batch_size=128)
    for epoch in range(epochs):
        views.set_epoch(epoch)
        for batch in views.loader(workers=8):
            x = batch["image"].to(device)                       # [B, 3, H, W], normalised as the recipe says
            target = views.targets(batch, device)               # mixup/cutmix soft targets, smoothed
            teacher = views.teacher(batch, alpha, device)       # decoded on `device`: CKF targets, global argmax

Each batch is one rank's share of one training step, in the order `cskd-cache train` uses (cycles of the cache
reordered, every view reachable); the teacher outputs are read in the DataLoader's workers and decoded where the
caller says. Everything `train` checks is checked here too: the cache is complete and made from this data, each
epoch's plan matches its parameters, each replayed view's pixels are the ones the teacher saw.
"""

from __future__ import annotations

import functools
import torch

from ..cache.encoding import Encoding
from ..cache.store import Cache, to_torch
from ..data.matching import match_samples
from ..data.open import open_source
from ..data.order import epoch_views
from ..data.recipe import Recipe
from ..data.views import pair_dataset
from ..errors import CacheError
from .engine import TeacherTargets
from .loader import RankBatches, epoch_loader
from .train import CHECK_FIRST_STEPS
from .losses import CSKDLoss, mixup_target
from .student import CSKDStudent, create_student


class CachedViews:
    """The views of a cache and their teacher outputs, as batches.

    cache: path or URL of a complete (or partial) cache. data: the dataset it was made from (`match`: key | stem
    | content, for another packaging of the same images). batch_size: views per rank and step (even).
    rank/world: this process's share under torchrun. seed: the order of later cycles over the cache.
    replay_tolerance: tolerated signature drift of a replayed view (None: the cache's signature's default; 0: exact
    pixels only)."""

    def __init__(self, cache: str, data: str, batch_size: int = 64, *, rank: int = 0, world: int = 1, seed: int = 0,
                 match: str = "key", replay_tolerance: float | None = None, max_steps: int | None = None,
                 check_every: int = 8):
        if batch_size < 2 or batch_size % 2:
            raise CacheError("batch_size must be an even number >= 2 (views come in mixing pairs)")
        self.url, self.cache = cache, Cache.open(cache)
        self.epochs_held = self.cache.usable_epochs
        if not self.epochs_held:
            raise CacheError(f"{cache} holds no finished epoch; finish it with the precompute command")
        source = open_source(data)
        ids, self.match_report = match_samples(self.cache.sample_keys(), self.cache.sample_labels(), source, match,
                                               self.cache.sample_hashes() if match == "content" else None)
        self.source = source.subset(ids)
        self.recipe: Recipe = self.cache.recipe
        self.encoding: Encoding = self.cache.encoding
        self.num_classes: int = self.cache.manifest["num_classes"]
        self.grid: tuple[int, int] = tuple(self.cache.manifest["grid"])
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.tolerance = replay_tolerance
        steps = self.cache.views_per_epoch // (batch_size * world)
        if steps == 0:
            raise CacheError(f"batch_size {batch_size} x {world} processes exceeds the views of an epoch")
        self.steps = min(steps, max_steps) if max_steps else steps
        self._batches = RankBatches(self.cache.epoch_plan, None, self.cache.stride, batch_size, rank, world,
                                    check_every=check_every)
        self._loaders: dict = {}
        self._first_epoch = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Training epoch `epoch` reads cached epoch epochs_held[epoch % len]; later cycles are reordered. Every view
        of the first epoch's first steps is checked against the cache, then one pair in `check_every`."""
        self._batches.views = epoch_views(epoch, self.epochs_held, self.cache.views_per_epoch,
                                          self.batch_size * self.world, self.steps, self.chunk, self.seed,
                                          self.cache.stride)
        self._first_epoch = epoch if self._first_epoch is None else self._first_epoch
        self._batches.epoch = epoch
        self._batches.check_steps = CHECK_FIRST_STEPS if epoch == self._first_epoch else 0

    @property
    def chunk(self) -> int:
        return self.cache.manifest["layout"]["chunk_views"]

    def __len__(self) -> int:
        """Steps per epoch."""
        return self.steps

    def loader(self, workers: int = 4, pin_memory: bool = False, device="cpu") -> torch.utils.data.DataLoader:
        """A DataLoader over this epoch's batches (the same object every epoch: its workers persist). A batch is a
        dict: image [B, 3, H, W] on `device` (the views, normalised as the recipe says: the workers send uint8
        pixels, `pixels`, and the float steps run on the device), label and partner_label [B], lam [B], view [B]
        (global view index), teacher (the encoded arrays, CPU tensors), maybe spill and drift. A damaged cache or a
        replay drift beyond the tolerance raises CacheError."""
        key = (workers, pin_memory)
        if key not in self._loaders:
            dataset = pair_dataset(self.source, self.recipe, self.cache.fingerprint_kind, self.cache.signature_kind)
            loader = epoch_loader(dataset, self._batches, self.url, workers, pin_memory, self.tolerance)
            self._loaders[key] = (loader, functools.partial(loader.collate_fn.finish, dataset))
        return _Checked(*self._loaders[key], torch.device(device))

    def targets(self, batch: dict, device="cpu") -> torch.Tensor:
        """The mixed (mixup/cutmix) soft targets [B, K] with the recipe's label smoothing, on `device`."""
        return mixup_target(batch["label"].to(device), batch["partner_label"].to(device), batch["lam"].to(device),
                            self.num_classes, self.recipe.label_smoothing)

    def teacher(self, batch: dict, alpha: float, device="cpu", needs=None) -> dict[str, torch.Tensor]:
        """The teacher tensors your loss takes, decoded on `device`. `needs`: the CSKDLoss itself (its `needs` say
        which tensors it uses: a soft loss gets the logits it needs, never the hard targets it would ignore), or
        names among teacher_global_argmax [B], ckf_targets [B, h*w], teacher_global [B, K], ckf_logits [B, h*w, K];
        by default what the default CSKDLoss (hard distillation, hard CKF) takes."""
        if needs is None:
            needs = CSKDLoss().needs
        needs = set(getattr(needs, "needs", needs))
        x = torch.empty(0, device=device)
        return TeacherTargets(self.encoding, needs)(batch, x, alpha)

    def student(self, name: str = "deit_s", **kwargs) -> CSKDStudent:
        """A CSKD student that fits this cache: its classes, input size, the teacher's grid, the views'
        normalisation."""
        return create_student(name, self.num_classes, self.recipe.input_size, self.grid,
                              view_mean=self.recipe.mean, view_std=self.recipe.std, **kwargs)


class _Checked:
    """A loader that raises the errors the workers send as data (DataLoader cannot re-raise custom exceptions)."""

    def __init__(self, loader, finish, device: torch.device):
        self.loader, self.batch_sampler, self.finish, self.device = loader, loader.batch_sampler, finish, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if "error" in batch:
                raise CacheError(batch["error"])
            batch["image"] = self.finish(batch, self.device)
            yield batch


__all__ = ["CachedViews", "to_torch"]
