"""Precompute's sync-free ckf encode (a bounded analysis, settled where its outputs reach the host) is the plain
encode exactly; test_encodings.py holds every adversarial case to it through `assert_deferred_same`."""

import numpy as np
import torch

from cskd_cache.cache.encodings import make_encoding


def assert_deferred_same(ckf, dense, global_, arrays, spill):
    """precompute's sync-free encode, settled on the host, is the plain encode exactly (arrays and spill rows)."""
    d_arrays, d_spill = ckf.encode(dense, global_, deferred=True)
    got, rows = ckf.settle({k: v.numpy() for k, v in d_arrays.items()}, {k: v.numpy() for k, v in d_spill.items()},
                           dense, global_)
    assert got.keys() == arrays.keys()
    for k in arrays:
        assert np.array_equal(got[k], arrays[k].numpy(), equal_nan=True), k
    assert (rows is None) == (spill is None)
    if spill is not None:
        for k in spill:
            assert np.array_equal(rows[k], spill[k].numpy()), k


def test_the_bounded_analysis_holds_on_realistic_rows_and_falls_back_otherwise(monkeypatch):
    """Real-teacher-like rows stay within the bounds (no fallback: the sync-free path is the one that runs); a
    bound too small is detected and settled by the plain encode, still exact."""
    import cskd_cache.cache.ckf as ckf_module

    torch.manual_seed(5)
    dense = torch.randn(2, 1, 1000) * 4 + torch.randn(2, 49, 1000)
    ckf = make_encoding("ckf", 1000, 49)
    arrays, spill = ckf.encode(dense, dense.mean(1))
    d_arrays, _ = ckf.encode(dense, dense.mean(1), deferred=True)
    assert bool(d_arrays["ok"])
    for width, steps in ((2, 12), (48, 1)):
        monkeypatch.setattr(ckf_module, "BOUNDED_WIDTH", width)
        monkeypatch.setattr(ckf_module, "BOUNDED_STEPS", steps)
        d_arrays, _ = ckf.encode(dense, dense.mean(1), deferred=True)
        assert not bool(d_arrays["ok"])
        assert_deferred_same(ckf, dense, dense.mean(1), arrays, spill)
