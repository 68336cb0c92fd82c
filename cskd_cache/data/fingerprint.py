"""What a view's pixels were: a 64-bit fingerprint (exact) and a signature (a distance), stored per view.

Training and verify replay each view and compare: the very pixels, or (within --replay-tolerance) a harmless drift
such as another Pillow's rounding; anything else stops training. Rates on real photos: `python -m benchmarks.drift`.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch


FINGERPRINTS = ("sha1-int16", "blake2b-int32")  # format 2's, format 1's


def fingerprint(view: torch.Tensor, kind: str = "sha1-int16") -> int:
    """A 64-bit hash of a view's pixels, quantised to 1/256 so that it names the image, not float noise.
    Format 2 hashes int16 values with SHA-1 (hardware-accelerated: 0.2 ms at 224 px, 15% of the replay path
    before; identity, not security, is what it checks); format-1 caches used blake2b over int32."""
    # NumPy, not torch: the same float32 product and round-half-even, without intra-op thread start-up per call.
    scaled = np.rint(view.float().numpy() * np.float32(256))
    if kind == "blake2b-int32":
        digest = hashlib.blake2b(scaled.astype(np.int32).tobytes(), digest_size=8).digest()
    else:
        digest = hashlib.sha1(np.clip(scaled, -32768, 32767).astype(np.int16).data).digest()[:8]
    return int.from_bytes(digest, "little", signed=True)


# A signature summarises a view's pixels in a few bytes so that a replay that does not match its fingerprint
# exactly can be measured: harmless drift (another Pillow rounds a few pixels differently) or another view (a wrong
# crop, flip, partner or image). Format 3 stores `sketch64`; format-2 caches `cells4x4` (read as they are).
# Rates of both on real photos, full recipe: `python -m benchmarks.drift`, docs/reliability.md.

def _cells4x4(view: torch.Tensor) -> np.ndarray:
    """Format 2 (48 bytes): the mean of each channel over a 4 x 4 grid of cells, int8 in steps of 1/48."""
    cells = torch.nn.functional.adaptive_avg_pool2d(view.float()[None], 4)[0]
    return np.clip(np.round(cells.numpy().ravel() * 48), -127, 127).astype(np.int8)


def _cells4x4_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest difference of a cell mean (normalised units). Low-pass: it accepts a quarter of 4-px crop shifts."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(-1) / 48


# sketch64 (format 3): 8x8-pixel block means, count-sketched into 64 buckets.
# WHY block means: another Pillow differs where its crop-resize rounds differently, by +-1..12 levels in scattered
# pixels (RandAugment's point ops amplify some into sparse jumps); a moved crop, another partner or another image
# changes content, which is spatially coherent. Averaging 8x8 pixels divides uncorrelated per-pixel noise by 8 and
# keeps coherent change (8 px measured best of 1..56 px at 224 and 64 px).
# WHY a count sketch: 3 x 28 x 28 block means do not fit in 64 bytes. Each goes, with a sign, into one of 64
# buckets; the sketch of a difference is the difference of sketches, and with random signs its mean square over
# buckets estimates the mean square block-mean difference (relative error ~18% with 64 buckets).
# WHY wrap-around int8 in steps of 1/256: only small differences need resolving; a large one wraps to a random byte,
# still far beyond any tolerance (the distance then saturates near 0.29).
# WHY a fixed integer hash (splitmix64) for bucket and sign: stored signatures are compared years later, so the map
# must not depend on NumPy's random streams.
_SKETCH_BLOCK, _SKETCH_BUCKETS, _SKETCH_STEP = 8, 64, 1 / 256


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=16)
def _sketch_plan(c: int, h: int, w: int):
    """Per block of a [c, h, w] view: its bucket and weight (sign / block area * sqrt(buckets / blocks), so that
    the RMS over buckets of a sketch difference estimates the RMS block-mean difference)."""
    b = _SKETCH_BLOCK
    rows, cols = np.arange(0, h, b), np.arange(0, w, b)
    area = np.minimum(b, h - rows)[:, None] * np.minimum(b, w - cols)[None, :]  # edge blocks may be smaller
    n = c * len(rows) * len(cols)
    z = _splitmix64(np.arange(n, dtype=np.uint64) + np.uint64(0x5EED_D21F7))
    bucket = (z >> np.uint64(58)).astype(np.intp)  # top 6 bits: 0..63
    sign = np.where((z >> np.uint64(57)) & np.uint64(1), 1.0, -1.0)
    return rows, cols, bucket, sign / np.tile(area.ravel(), c) * np.sqrt(_SKETCH_BUCKETS / n)


def _sketch64(view: torch.Tensor) -> np.ndarray:
    x = np.ascontiguousarray(view.float().numpy(), dtype=np.float32)
    c, h, w = x.shape
    rows, cols, bucket, weight = _sketch_plan(c, h, w)
    b = _SKETCH_BLOCK
    if h % b == 0 and w % b == 0:  # fast path: sum a block's rows (contiguous), then its columns
        sums = x.reshape(c * h // b, b, w).sum(1).reshape(-1, b).sum(1)
    else:
        sums = np.add.reduceat(np.add.reduceat(x, rows, axis=1), cols, axis=2).ravel()
    s = np.bincount(bucket, weights=sums * weight, minlength=_SKETCH_BUCKETS)
    return (np.round(s / _SKETCH_STEP).astype(np.int64) & 0xFF).astype(np.uint8).view(np.int8)


def _sketch64_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated RMS difference of 8x8 block means (normalised units)."""
    d = (a.astype(np.int16) - b.astype(np.int16) + 128) % 256 - 128  # wrapped difference, in steps
    return np.sqrt((d.astype(np.float64) ** 2).mean(-1)) * _SKETCH_STEP


# kind -> (signature, distance, bytes, default tolerance). Tolerances: where real Pillow 10.4-vs-13 drift passes.
SIGNATURES = {"cells4x4": (_cells4x4, _cells4x4_distance, 48, 0.05),
              "sketch64": (_sketch64, _sketch64_distance, 64, 0.025)}


def signature(view: torch.Tensor, kind: str = "sketch64") -> np.ndarray:
    return SIGNATURES[kind][0](view)


def signature_distance(a: np.ndarray, b: np.ndarray, kind: str = "sketch64") -> np.ndarray:
    """How far two views' pixels are apart, from their signatures ([..., bytes]), in normalised units. 0 only says
    the signatures agree: exactness is the fingerprint's job (see `replay_matches`)."""
    return SIGNATURES[kind][1](a, b)


def replay_tolerance(tolerance: float | None, kind: str) -> float:
    """The tolerance a check uses: the given one, or the signature kind's default."""
    return SIGNATURES[kind][3] if tolerance is None else float(tolerance)


def replay_matches(same_fingerprint, distance, tolerance: float):
    """The replay check, per view: the very pixels (fingerprints equal), or, only when the tolerance is above 0, a
    signature distance within it. WHY the explicit 0: a drift can leave every bucket unchanged, so `distance <= 0`
    alone would let changed pixels through at --replay-tolerance 0."""
    return np.asarray(same_fingerprint) | ((tolerance > 0) & (np.asarray(distance) <= tolerance))
