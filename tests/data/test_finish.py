"""Workers ship uint8 pixels and erasing draws; normalising, erasing and mixing run batched on the training device.
That must be the very views timm's transform and the per-pair mixing gave, bit for bit, whatever the batch."""

import numpy as np
import pytest
import torch
from PIL import Image

from cskd_cache.data.plan import MODE_CUTMIX, MODE_MIXUP, PlanParams, make_epoch_plan
from cskd_cache.data.recipe import Recipe, build_transform
from cskd_cache.data.replay import PairDataset, collate_pairs, pair_items, replay_pair


class Photos:
    """A minimal image source over real photos (the replay dataset's interface)."""

    def __init__(self, root):
        self.paths = sorted(root.rglob("*.jpg"))
        self.labels = list(range(len(self.paths)))

    def load(self, i):
        return Image.open(self.paths[i]).convert("RGB")


@pytest.mark.parametrize("size, pairs", [(64, 192), (224, 24)])
def test_batched_device_steps_equal_the_per_view_transform(real_photos, size, pairs):
    """The full default recipe (RandAugment, erasing 0.25, mixup/cutmix) on real photos: every view of every pair
    equals timm's per-view transform followed by the per-pair mix, bit for bit, finished a batch at a time or one
    pair at a time."""
    source = Photos(real_photos)
    recipe = Recipe(input_size=size)
    params = PlanParams(num_samples=len(source.paths), epochs=1, seed=3, input_size=size,
                        mixup_alpha=recipe.mixup_alpha, cutmix_alpha=recipe.cutmix_alpha)
    plan = make_epoch_plan(params, 0)
    n = min(2 * pairs, params.views_per_epoch)
    items = pair_items(lambda e: plan, np.arange(n), params.views_per_epoch, check=False)
    dataset = PairDataset(source, recipe)
    batch = collate_pairs(dataset.__getitems__(items))
    got = dataset.finish(batch)
    alone = torch.cat([dataset.finish(collate_pairs([dataset[it]])) for it in items[:8]])
    transform = build_transform(recipe)
    want = torch.cat([torch.stack(replay_pair(transform, source.load(it[1]), source.load(it[2]), it[3], it[4], it[5],
                                              it[6], it[7])) for it in items])
    assert torch.equal(got, want)
    assert torch.equal(alone, want[:16])
    kinds = {int(m) for m in batch["mode"]}
    assert {MODE_MIXUP, MODE_CUTMIX} <= kinds and len(batch["erase_view"]) > 0  # every step was exercised


def test_a_checked_pair_carries_the_fingerprints_of_the_finished_views(real_photos):
    from cskd_cache.data.fingerprint import fingerprint

    source = Photos(real_photos)
    recipe = Recipe(input_size=64)
    plan = make_epoch_plan(PlanParams(num_samples=len(source.paths), epochs=1, input_size=64), 0)
    dataset = PairDataset(source, recipe)
    items = pair_items(lambda e: plan, np.arange(8), 999_999, check=[True, False, True, False])
    batch = collate_pairs(dataset.__getitems__(items))
    x = dataset.finish(batch)
    assert batch["checked"].tolist() == [True, True, False, False] * 2
    for i in range(8):
        want = fingerprint(x[i]) if batch["checked"][i] else 0
        assert int(batch["fingerprint"][i]) == want
    assert batch["pixels"].dtype == torch.uint8  # what crosses from the workers


def test_a_repeated_sample_is_decoded_once_per_batch(real_photos):
    """Repeated augmentation (3 repeats) puts a sample's views in one step: the batch decodes it once."""
    source = Photos(real_photos)
    loads = []
    real = source.load
    source.load = lambda i: loads.append(i) or real(i)
    plan = make_epoch_plan(PlanParams(num_samples=len(source.paths), epochs=1, repeats=3, input_size=64), 0)
    dataset = PairDataset(source, Recipe(input_size=64))
    items = pair_items(lambda e: plan, np.arange(16), 999_999, check=False)
    dataset.__getitems__(items)
    samples = [s for it in items for s in (it[1], it[2])]
    assert sorted(loads) == sorted(set(samples)) and len(loads) < len(samples)
