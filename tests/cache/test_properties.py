"""Property-based tests (hypothesis): the ckf encoding equals full for any logits at any alpha; the plan and the
training order keep their invariants for any size, repeats and seed."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_encodings import assert_exact

from cskd_cache.data.order import epoch_views
from cskd_cache.data.plan import PlanParams, _partner_order, make_epoch_plan

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(B=st.integers(1, 3), P=st.integers(1, 5), K=st.integers(2, 40), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       integer=st.booleans(), seed=st.integers(0, 2**31 - 1), width=st.integers(1, 6),
       alphas=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5), table=st.integers(1, 60))
def test_ckf_targets_equal_full_for_any_logits(B, P, K, scale, integer, seed, width, alphas, table):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(B, P, K, generator=g) * scale
    if integer:  # many exact ties, the hardest case for argmax order
        dense = dense.round()
    assert_exact(dense, width=width, extra=alphas, table=table)


@SETTINGS
@given(n=st.integers(2, 400), repeats=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 50),
       mix=st.sampled_from([(0.8, 1.0), (0.0, 1.0), (0.8, 0.0), (0.0, 0.0)]))
def test_plan_invariants(n, repeats, seed, epoch, mix):
    p = PlanParams(num_samples=n, epochs=epoch + 1, seed=seed, repeats=repeats, mixup_alpha=mix[0],
                   cutmix_alpha=mix[1], input_size=32)
    e = make_epoch_plan(p, epoch)
    v = p.views_per_epoch
    assert len(e.sample) == v == n - n % 2 and e.sample.min() >= 0 and e.sample.max() < n
    counts = np.bincount(e.sample, minlength=n)
    assert counts.max() <= repeats and (counts[counts > 0] == repeats).sum() >= len(counts[counts > 0]) - 1
    assert np.array_equal(e.partner, np.arange(v) ^ 1)
    assert (e.lam[0::2] == e.lam[1::2]).all() and (e.mode[0::2] == e.mode[1::2]).all()
    assert ((e.lam >= 0) & (e.lam <= 1)).all() and (e.box[:, [0, 2]] <= e.box[:, [1, 3]]).all()
    if mix == (0.0, 0.0):
        assert (e.mode == 0).all() and (e.lam == 1).all()
    again = make_epoch_plan(PlanParams(**{**p.to_dict(), "epochs": epoch + 7}), epoch)  # epochs count: irrelevant
    assert all(np.array_equal(getattr(e, f), getattr(again, f)) for f in ("sample", "seed", "lam", "mode", "box"))
    half = v // 2
    assert sorted(_partner_order(half, repeats).tolist()) == list(range(half))


@SETTINGS
@given(vpe_pairs=st.integers(1, 200), gb_pairs=st.integers(1, 16), block_pairs=st.integers(1, 40),
       plan_epochs=st.integers(1, 4), epoch=st.integers(0, 12), seed=st.integers(0, 1000))
def test_epoch_order_invariants(vpe_pairs, gb_pairs, block_pairs, plan_epochs, epoch, seed):
    vpe, gb, block = 2 * vpe_pairs, 2 * gb_pairs, 2 * block_pairs
    steps = vpe // gb
    if steps == 0:
        return
    views = epoch_views(epoch, plan_epochs, vpe, gb, steps, block, seed)
    first = (epoch % plan_epochs) * vpe
    assert len(views) == steps * gb and len(set(views.tolist())) == len(views)
    assert views.min() >= first and views.max() < first + vpe  # the cached epoch it names
    assert (views[0::2] % 2 == 0).all() and (views[1::2] == views[0::2] + 1).all()  # whole pairs
    assert np.array_equal(views, epoch_views(epoch, plan_epochs, vpe, gb, steps, block, seed))
