"""Which replay backend makes a recipe's views: PIL in the loader workers, or tensor kernels on the training device."""

from __future__ import annotations

from .recipe import Recipe
from .replay import PairDataset


def pair_dataset(source, recipe: Recipe, fingerprint_kind: str = "sha1-int16",
                 signature_kind: str = "sketch64") -> PairDataset:
    """The dataset that replays `recipe`'s mixing pairs over `source`, by the recipe's backend (`recipe.replay`).
    Both give batches that `dataset.finish(batch, device)` turns into the views; precompute, train and verify all
    go through here, so a cache and its training run always use one backend."""
    if recipe.replay == "tensor":
        from .tensor_replay import TensorPairDataset  # torchvision.io and the kernels, only when asked for

        return TensorPairDataset(source, recipe, fingerprint_kind, signature_kind)
    return PairDataset(source, recipe, fingerprint_kind, signature_kind)
