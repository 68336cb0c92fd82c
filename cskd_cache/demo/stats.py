"""Statistics that fit a paired design: every arm trains from the same initial weights and on the same views for
a given seed, so arms are compared seed by seed (the difference on each seed), never as independent samples.

For n seeds, the mean of the n paired differences and its 95% interval (Student's t with n - 1 degrees of
freedom). The wording says only what the interval allows: an interval on one side of 0 is "consistent with" that
arm being better (by between its ends); an interval across 0 means "cannot tell", and its ends say how large a
difference either way is still possible. Nothing is called "no difference".
"""

from __future__ import annotations

import math
import statistics

# two-sided 95%: t quantile 0.975 for 1..30 degrees of freedom (beyond, 1.96 is within 2%)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    if df < 1:
        raise ValueError("an interval needs at least two paired values")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def paired(a: dict, b: dict) -> dict:
    """a, b: seed -> value (same seeds in both). The per-seed differences a - b, their mean and 95% interval."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = {"seeds": seeds, "differences": diffs, "n": len(diffs), "mean": statistics.mean(diffs) if diffs else None}
    if len(diffs) >= 2:
        sd = statistics.stdev(diffs)
        half = t975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
        out.update(sd=sd, low=out["mean"] - half, high=out["mean"] + half)
    else:
        out.update(sd=None, low=None, high=None)
    return out


def verdict(p: dict, a: str, b: str) -> str:
    """One sentence: what the interval of a - b allows."""
    if p["low"] is None:
        return f"cannot tell ({p['n']} seed{'s' if p['n'] != 1 else ''}: no interval)"
    if p["sd"] == 0:  # a zero-width interval would claim certainty that a few tied seeds cannot give
        return (f"cannot tell: every seed gives the same difference ({p['mean']:+.1f} points), no spread to build an "
                "interval from")
    lo, hi = p["low"], p["high"]
    span = f"95% interval {lo:+.1f} to {hi:+.1f} points"
    if lo > 0:
        return f"consistent with {a} better than {b}, by {lo:.1f} to {hi:.1f} points ({span})"
    if hi < 0:
        return f"consistent with {b} better than {a}, by {-hi:.1f} to {-lo:.1f} points ({span})"
    return f"cannot tell: {span}, which allows {a} ahead by up to {hi:.1f} or behind by up to {abs(lo):.1f}"


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}
