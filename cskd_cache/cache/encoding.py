"""How teacher logits are stored per view, and how CKF targets are decoded from what was stored.

CKF target at each position: Y = argmax_c(alpha * d_c + (1 - alpha) * g_c), alpha changing during training.
  full: dense fp16 [P, K] + global fp32 [K]. The reference: Y_full = argmax fuse(d16, g32, alpha).
  ckf:  per position only the classes that can win for SOME alpha in [0, 1] (ckf.py), so decoded targets equal
        Y_full bit for bit.
  topk: per position top-k dense + global top-k; lossy (absent classes share the remaining probability mass).
All values are logits (not probabilities). Class ids are int16/int32, never float (fp16 ids break above 2048).
This module is the interface every encoding implements, with `full` (the reference) and `topk`; `ckf` is its own
module, and `encodings.py` makes any of them by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

def class_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16 if num_classes <= 32767 else np.int32)


def fuse(dense: Tensor, global_: Tensor, alpha: float) -> Tensor:
    """THE one formula both paths use: alpha * dense + (1 - alpha) * global_, computed in float32
    (inputs cast with .float()), alpha as a python float. Broadcasting is the caller's job."""
    alpha = float(alpha)
    return alpha * dense.float() + (1 - alpha) * global_.float()


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]  # trailing shape (without the view axis)
    dtype: str  # numpy dtype name
    fill: float | int  # zarr fill value: NaN for floats (always math.nan, so specs compare equal), -1 ids, 0 counts
    shuffle: bool = True  # blosc's byte shuffle; off where it measurably hurts (benchmarks/storage.py)


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, np.dtype(name).name)


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # the CKF candidate analysis only covers alpha in [0, 1]
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


def _sorted_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    # torch.topk does not promise an order among ties; a stable descending sort puts ties in ascending class
    # order, so slot 0 is exactly torch.argmax (first index on ties).
    vals, idx = torch.sort(x.float(), dim=-1, descending=True, stable=True)
    return idx[..., :k], vals[..., :k]


def _scatter_fill(cls: Tensor, val: Tensor, num_classes: int, lse: Tensor | None = None,
                  valid: Tensor | None = None, ranked: int | None = None) -> Tensor:
    """Sparse (class, value) slots -> dense float32 [..., K] logits.

    The first `ranked` slots (all of them by default) are the row's top-k by value; a ckf table stores more
    classes after them (CKF candidates of any global rank, down to the very last). With the log-sum-exp of the
    full logits (`lse`, stored since format 2), every stored class keeps its exact softmax probability and the
    remaining probability mass is spread evenly over the absent classes (as TinyViT does for its top-k logits):
    absent logit = lse + log((1 - sum of stored p) / (K - stored)). That mean can never exceed the k-th largest
    logit (every absent class lies below it), so it is bounded by the k-th value only: bounding it by the smallest
    STORED value (a low-ranked candidate) would make the absent mass vanish. Without lse (format-1 caches),
    absent classes get the k-th value, an upper bound on their true logit. Either way the argmax and the order of
    the stored classes are the teacher's; soft targets are an approximation unless every class is stored."""
    val = val.float()
    if valid is None:
        valid = torch.ones_like(val, dtype=torch.bool)
    ranked = val.shape[-1] if ranked is None else ranked
    k = valid.sum(-1, keepdim=True)  # stored classes per row (a ckf table may be partly empty)
    kth = val[..., :ranked].masked_fill(~valid[..., :ranked], torch.inf).amin(-1, keepdim=True)
    if lse is None:
        fill = kth
    else:
        lse = lse.float().unsqueeze(-1)
        p = torch.exp(val - lse).masked_fill(~valid, 0)
        rest = (1.0 - p.sum(-1, keepdim=True)).clamp(min=1e-30)  # rounding can push it to <= 0
        fill = torch.minimum(lse + torch.log(rest / (num_classes - k).clamp(min=1)), kth)
    out = fill.expand(*val.shape[:-1], num_classes + 1).clone()  # the last column takes the empty slots
    out.scatter_(-1, torch.where(valid, cls.long(), num_classes), val)
    return out[..., :num_classes]


def _check_inputs(enc: "Encoding", dense: Tensor, global_: Tensor) -> tuple[Tensor, Tensor]:
    """-> (dense rounded to fp16, global fp32): the values the cache stores and every path decodes from."""
    P, K = enc.positions, enc.num_classes
    if dense.dim() != 3 or tuple(dense.shape[1:]) != (P, K) or tuple(global_.shape) != (dense.shape[0], K):
        raise ValueError(f"expected dense [B, {P}, {K}] and global [B, {K}], got {tuple(dense.shape)} and "
                         f"{tuple(global_.shape)}")
    if not (bool(torch.isfinite(dense).all()) and bool(torch.isfinite(global_).all())):
        raise ValueError("teacher logits contain NaN or inf")
    # contiguous: a permuted [N, C, h, w] -> [N, h*w, C] map is a strided view, and the encoders reshape rows
    d16, g32 = dense.half().contiguous(), global_.float().contiguous()
    if not (bool(torch.isfinite(d16).all()) and bool(torch.isfinite(g32).all())):
        raise ValueError("teacher logits overflow when rounded to fp16 (|logit| > 65504)")
    return d16, g32


class Encoding:
    name: str = ""
    absent_classes: str = ""
    exact_ckf_targets: bool = True  # hard CKF targets equal the full logits' for every alpha
    exact_global: bool = True  # the global logits themselves (soft distillation) are all kept
    soft_ckf: str = "exact"  # what a soft CKF loss (KL on the fused logits) gets: exact | approximate | none
    lossy: bool = False

    def __init__(self, num_classes: int, positions: int, *, lse: bool = True, **params):
        if num_classes < 1 or positions < 1 or any(int(v) < 1 for v in params.values()):
            raise ValueError(f"bad encoding size: num_classes={num_classes} positions={positions} {params}")
        self.num_classes, self.positions = int(num_classes), int(positions)
        # k larger than K is meaningless; clamp so shapes stay [.., min(k, K)] and describe() records what is used
        self.params = {k: min(int(v), self.num_classes) for k, v in params.items()}
        self.cdtype = class_dtype(self.num_classes).name
        self.lse = bool(lse)  # False only for format-1 caches, which did not store log-sum-exps

    def arrays(self) -> dict[str, ArraySpec]:
        raise NotImplementedError

    def encode(self, dense: Tensor, global_: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        raise NotImplementedError

    def decode_targets(self, arrays: dict[str, Tensor], alpha: float,
                       spill: dict[str, Tensor] | None = None) -> Tensor:
        raise NotImplementedError

    def decode_global(self, arrays: dict[str, Tensor]) -> Tensor:
        """Global logits [B, K] for soft distillation (see _scatter_fill for what absent classes get)."""
        return _scatter_fill(arrays["global_class"], arrays["global_value"], self.num_classes,
                             arrays.get("global_lse"))

    def missing_spill(self, arrays: dict, spill: dict | None) -> int:
        """Positions whose targets need spill rows that are not there (only ckf has spill rows)."""
        return 0

    def unwritten(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """bool [n]: rows of read arrays that hold the fill value where a written row cannot (verify uses it).
        Floats are filled with NaN and no written logit is NaN; encodings with legitimate padding say otherwise."""
        n = len(next(iter(arrays.values())))
        rows = np.zeros(n, dtype=bool)
        for a in arrays.values():
            if a.dtype.kind == "f":
                rows |= np.isnan(a.reshape(n, -1)).any(1)
        return rows

    def decode_fused(self, arrays: dict[str, Tensor], alpha: float) -> Tensor:
        """Fused CKF logits [B, P, K] for a soft CKF loss; only encodings that keep dense logits can."""
        raise ValueError(f"the {self.name} encoding keeps only the classes that can be a hard CKF target, not the "
                         "dense logits a soft CKF loss needs")

    def global_argmax(self, arrays: dict[str, Tensor]) -> Tensor:
        return arrays["global_class"][:, 0].long()  # stable descending order: slot 0 == torch.argmax

    def describe(self) -> dict:
        return {"name": self.name, "params": dict(self.params), "num_classes": self.num_classes,
                "positions": self.positions, "values": "logits (not probabilities)",
                "absent_classes": self.absent_classes, "exact_ckf_targets": self.exact_ckf_targets,
                "exact_hard_distillation": True, "exact_soft_distillation": self.exact_global,
                "soft_ckf": self.soft_ckf, "lossy": self.lossy, "class_dtype": self.cdtype,
                # no fill here: NaN is not strict JSON, and fills are the store's business
                "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype} for k, v in self.arrays().items()}}

    def _global_topk(self, g32: Tensor) -> dict[str, Tensor]:
        cls, val = _sorted_topk(g32, self.params["global_topk"])
        out = {"global_class": cls.to(_torch_dtype(self.cdtype)), "global_value": val}
        if self.lse:  # 4 bytes a view: stored top-k probabilities become exact (see _scatter_fill)
            out["global_lse"] = torch.logsumexp(g32, -1)
        return out

    def _global_specs(self) -> dict[str, ArraySpec]:
        k = self.params["global_topk"]
        out = {"global_class": ArraySpec((k,), self.cdtype, -1), "global_value": ArraySpec((k,), "float32", math.nan)}
        if self.lse:
            out["global_lse"] = ArraySpec((), "float32", math.nan)
        return out


class FullEncoding(Encoding):
    name = "full"
    absent_classes = "none: every class is stored (dense fp16, global fp32)"

    def arrays(self) -> dict[str, ArraySpec]:
        P, K = self.positions, self.num_classes
        return {"dense": ArraySpec((P, K), "float16", math.nan), "global": ArraySpec((K,), "float32", math.nan)}

    def encode(self, dense, global_):
        d16, g32 = _check_inputs(self, dense, global_)
        return {"dense": d16, "global": g32}, None

    def decode_targets(self, arrays, alpha, spill=None):
        return fuse(arrays["dense"], arrays["global"][:, None, :], _check_alpha(alpha)).argmax(-1)

    def decode_global(self, arrays):
        return arrays["global"].float()

    def decode_fused(self, arrays, alpha):
        return fuse(arrays["dense"], arrays["global"][:, None, :], _check_alpha(alpha))

    def global_argmax(self, arrays):
        return arrays["global"].float().argmax(-1)


_GLOBAL_ABSENT = ("global: top-k logits plus the log-sum-exp of all of them, so the stored classes keep their "
                  "exact probabilities and the rest of the mass is spread evenly over the absent classes")


class TopKEncoding(Encoding):
    name = "topk"
    absent_classes = ("dense: top-k logits per position plus their log-sum-exp; " + _GLOBAL_ABSENT +
                      " (the same rule per position)")

    def __init__(self, num_classes: int, positions: int, topk: int = 10, global_topk: int = 10, lse=True):
        super().__init__(num_classes, positions, topk=topk, global_topk=global_topk, lse=lse)
        self.exact_ckf_targets = min(self.params.values()) == self.num_classes  # exact only when nothing is cut
        self.exact_global = self.params["global_topk"] == self.num_classes
        self.soft_ckf = "exact" if self.exact_ckf_targets else "approximate"
        self.lossy = not self.exact_ckf_targets

    def arrays(self) -> dict[str, ArraySpec]:
        P, k = self.positions, self.params["topk"]
        out = {"dense_class": ArraySpec((P, k), self.cdtype, -1), "dense_value": ArraySpec((P, k), "float16", math.nan)}
        if self.lse:
            out["dense_lse"] = ArraySpec((P,), "float32", math.nan)
        return {**out, **self._global_specs()}

    def encode(self, dense, global_):
        d16, g32 = _check_inputs(self, dense, global_)
        cls, val = _sorted_topk(d16, self.params["topk"])
        out = {"dense_class": cls.to(_torch_dtype(self.cdtype)), "dense_value": val.half()}
        if self.lse:
            out["dense_lse"] = torch.logsumexp(d16.float(), -1)
        return {**out, **self._global_topk(g32)}, None

    def _dense(self, arrays) -> Tensor:
        return _scatter_fill(arrays["dense_class"], arrays["dense_value"], self.num_classes, arrays.get("dense_lse"))

    def decode_targets(self, arrays, alpha, spill=None):
        return self.decode_fused(arrays, alpha).argmax(-1)

    def decode_fused(self, arrays, alpha):
        return fuse(self._dense(arrays), self.decode_global(arrays)[:, None, :], _check_alpha(alpha))
