"""Which replayed views the loader checks against the cache (train --check-every): all of a run's first steps, then
a rotating sample that covers every pair once in N epochs; none where nothing is cached."""

import numpy as np

from cskd_cache.data.plan import PlanParams, make_epoch_plan
from cskd_cache.training.loader import RankBatches

VIEWS, BATCH, STRIDE = 64, 8, 64


def _plan(epoch: int):
    return make_epoch_plan(PlanParams(num_samples=VIEWS, epochs=1, repeats=3), epoch)


def checked_pairs(batches: RankBatches, epoch: int, cached_epoch: int = 0) -> list[np.ndarray]:
    """Per step: the pair indices (within the cached epoch) whose views are checked."""
    batches.epoch = epoch
    batches.views = cached_epoch * STRIDE + np.arange(VIEWS)
    return [np.array([(it[0] - cached_epoch * STRIDE) // 2 for it in step if it[-1]]) for step in batches]


def test_first_steps_check_everything_then_each_pair_once_in_n_epochs():
    batches = RankBatches(_plan, None, STRIDE, BATCH, check_every=4)
    batches.check_steps = 2
    first = checked_pairs(batches, epoch=0)
    assert all(len(p) == BATCH // 2 for p in first[:2])  # a run's first steps: every pair
    batches.check_steps = 0
    seen = np.concatenate([np.concatenate(checked_pairs(batches, epoch=e)) for e in range(1, 5)])
    # four epochs over the same cached epoch (training cycles it): every pair checked, exactly once
    assert sorted(seen.tolist()) == list(range(VIEWS // 2))
    per_epoch = [sum(len(p) for p in checked_pairs(batches, epoch=e)) for e in range(1, 5)]
    assert per_epoch == [VIEWS // 2 // 4] * 4  # a quarter each epoch, spread over the steps, not front-loaded
    assert all(len(p) for p in checked_pairs(batches, epoch=1))


def test_check_every_one_checks_all_and_zero_checks_none():
    every = RankBatches(_plan, None, STRIDE, BATCH, check_every=1)
    assert sum(len(p) for p in checked_pairs(every, epoch=3)) == VIEWS // 2
    none = RankBatches(_plan, None, STRIDE, BATCH, check_every=0)
    none.check_steps = 8  # online / no teacher: nothing cached to compare with, even at the start
    assert sum(len(p) for p in checked_pairs(none, epoch=0)) == 0
