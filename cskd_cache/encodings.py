"""How teacher logits are stored per view, and how CKF targets are decoded from what was stored.

CKF target at each position: Y = argmax_c(alpha * d_c + (1 - alpha) * g_c), alpha changing during training.
  full: dense fp16 [P, K] + global fp32 [K]. The reference: Y_full = argmax fuse(d16, g32, alpha).
  ckf:  per position only the classes that can win for SOME alpha in [0, 1] (the upper convex chain of the
        points (d_c, g_c), widened by an fp32 rounding margin), so decoded targets equal Y_full bit for bit.
  topk: per position top-k dense + global top-k; lossy (absent classes get the smallest stored value).
All values are logits (not probabilities). Class ids are int16/int32, never float (fp16 ids break above 2048).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

ENCODINGS = ("full", "ckf", "topk")
_U32 = 2.0**-24  # fp32 unit roundoff
_CHUNK = 2**22  # elements per float64 work tensor in the CKF analysis (~32 MB), bounds memory for big K


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


def _scatter_fill(cls: Tensor, val: Tensor, num_classes: int, lse: Tensor | None = None) -> Tensor:
    """Sparse (class, value) slots -> dense float32 [..., K] logits.

    With the log-sum-exp of the full logits (`lse`, stored since format 2), the stored classes keep their exact
    softmax probabilities and the remaining probability mass is spread evenly over the absent classes (as TinyViT
    does for its top-k logits): absent logit = lse + log((1 - sum of stored p) / (K - k)). Without it (format 1
    caches), absent classes get the smallest stored value, an upper bound on their true logit. Either way the
    argmax and the order of the stored classes are the teacher's; soft targets are an approximation."""
    val = val.float()
    k = val.shape[-1]
    if lse is None or k >= num_classes:
        fill = val.amin(-1, keepdim=True)
    else:
        lse = lse.float().unsqueeze(-1)
        rest = (1.0 - torch.exp(val - lse).sum(-1, keepdim=True)).clamp(min=1e-30)  # rounding can push it to <= 0
        # never above the smallest stored logit: absent classes were not in the top-k
        fill = torch.minimum(lse + torch.log(rest / (num_classes - k)), val.amin(-1, keepdim=True))
    out = fill.expand(*val.shape[:-1], num_classes).clone()
    return out.scatter_(-1, cls.long(), val)


def ckf_candidates(d: Tensor, g: Tensor) -> Tensor:
    """d, g: [N, K] float64 (the STORED values: fp16 dense, fp32 global). Returns bool [N, K]: the classes that
    can be argmax_c fl32(alpha * d_c + (1 - alpha) * g_c) for some alpha in [0, 1], duplicates dropped.

    Lines f_c(a) = g_c + a * (d_c - g_c), M(a) = max_c f_c(a). The fp32 fused value of a class is within about
    3u * S of f_c(a) (S = max|d| + max|g|, u = 2**-24), so a class can win (or tie and win on index) only if
    M(a) - f_c(a) <= 6u * S somewhere. A real win at 1.77u * S exists (see the tests); we use eps = 16u * S, and
    the float64 errors of the analysis are far below the spare margin. M - f_c is convex, so its minimum over [0, 1]
    is at a breakpoint of M or at 0 / 1: walk the envelope from a = 1 down to a = 0, vectorised over rows,
    looping over chain steps only."""
    n, d0, g0 = d.shape[0], d, g
    s = d - g  # slopes
    eps = 16 * _U32 * (d.abs().amax(-1, keepdim=True) + g.abs().amax(-1, keepdim=True)) + 2.0**-126  # + subnormals
    gap = torch.minimum(d.amax(-1, keepdim=True) - d, g.amax(-1, keepdim=True) - g)  # at a = 1 and a = 0
    out_gap = gap.clone()
    # winner just left of a = 1: among the top dense classes, the one with the smallest slope
    v, m = d, d.amax(-1, keepdim=True)
    w = torch.where(v == m, s, torch.inf).argmin(-1, keepdim=True)
    a = torch.ones_like(m)
    rows = torch.arange(n, device=d.device)
    while rows.numel():
        sw = s.gather(-1, w)
        # where the line of each class with a smaller slope overtakes the winner; the largest one is the next
        # breakpoint. Masked entries may be inf/NaN (0/0): torch.where discards them.
        cross = torch.where(s < sw, a - (m - v) / (sw - s), -torch.inf)
        nxt = cross.amax(-1, keepdim=True)
        go = nxt[:, 0] > 0
        if not bool(go.all()):  # rows whose chain reached a = 0: done, compact the working set
            out_gap[rows[~go]] = gap[~go]
            rows, d, g, s, gap, cross, nxt = (t[go] for t in (rows, d, g, s, gap, cross, nxt))
            if not rows.numel():
                break
        # new winner: among classes crossing at the breakpoint, the smallest slope (it dominates further left).
        # Slopes strictly decrease, so the loop ends within K steps even if rounding stalls a.
        w = torch.where(cross == nxt, s, torch.inf).argmin(-1, keepdim=True)
        a = nxt
        v = (1 - a) * g + a * d
        m = v.amax(-1, keepdim=True)
        gap = torch.minimum(gap, m - v)  # M is re-evaluated over all classes, so the walk only picks where to look
    return (out_gap <= eps) & ~_duplicates(d0, g0)


def _duplicates(d: Tensor, g: Tensor) -> Tensor:
    """bool [N, K]: True where a lower class index has the same stored (d, g). Their fused values are bitwise
    identical at every alpha and argmax takes the first index, so these can never win."""
    o1 = torch.sort(g, dim=-1, stable=True).indices  # lexsort by (d, g, index) via two stable sorts
    order = o1.gather(-1, torch.sort(d.gather(-1, o1), dim=-1, stable=True).indices)
    ds, gs = d.gather(-1, order), g.gather(-1, order)
    dup = torch.zeros_like(ds, dtype=torch.bool)
    dup[:, 1:] = (ds[:, 1:] == ds[:, :-1]) & (gs[:, 1:] == gs[:, :-1])
    return torch.zeros_like(dup).scatter_(-1, order, dup)


def _check_inputs(enc: "Encoding", dense: Tensor, global_: Tensor) -> tuple[Tensor, Tensor]:
    """-> (dense rounded to fp16, global fp32): the values the cache stores and every path decodes from."""
    P, K = enc.positions, enc.num_classes
    if dense.dim() != 3 or tuple(dense.shape[1:]) != (P, K) or tuple(global_.shape) != (dense.shape[0], K):
        raise ValueError(f"expected dense [B, {P}, {K}] and global [B, {K}], got {tuple(dense.shape)} and "
                         f"{tuple(global_.shape)}")
    if not (bool(torch.isfinite(dense).all()) and bool(torch.isfinite(global_).all())):
        raise ValueError("teacher logits contain NaN or inf")
    d16, g32 = dense.half(), global_.float()
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


class CKFEncoding(Encoding):
    name = "ckf"
    absent_classes = ("dense: only the classes that can be the CKF target for some alpha in [0, 1] are stored "
                      "(exact hard targets, dense logits not recoverable); " + _GLOBAL_ABSENT)
    exact_global = False
    soft_ckf = "none"
    lossy = True  # hard CKF targets and hard distillation are exact; soft distillation is approximate

    def __init__(self, num_classes: int, positions: int, ckf_width: int = 8, global_topk: int = 10, lse=True):
        super().__init__(num_classes, positions, ckf_width=ckf_width, global_topk=global_topk, lse=lse)
        self.exact_global = self.params["global_topk"] == self.num_classes

    def arrays(self) -> dict[str, ArraySpec]:
        P, W, c = self.positions, self.params["ckf_width"], self.cdtype
        return {"ckf_class": ArraySpec((P, W), c, -1), "ckf_dense": ArraySpec((P, W), "float16", math.nan),
                "ckf_global": ArraySpec((P, W), "float32", math.nan), "ckf_count": ArraySpec((P,), "int16", 0),
                **self._global_specs()}

    def encode(self, dense, global_):
        d16, g32 = _check_inputs(self, dense, global_)
        B, P, K = d16.shape
        N, W, dev = B * P, self.params["ckf_width"], d16.device
        work = torch.device("cpu") if dev.type == "mps" else dev  # mps has no float64
        cls = torch.full((N, W + 1), -1, dtype=torch.long, device=work)  # slot W is a dump column for the rest
        count = torch.empty(N, dtype=torch.long, device=work)
        dw, gw, step = d16.to(work).reshape(N, K), g32.to(work), max(1, _CHUNK // K)
        for i in range(0, N, step):
            j = min(i + step, N)
            cand = ckf_candidates(dw[i:j].double(), gw[torch.arange(i, j, device=work) // P].double())
            rank = cand.long().cumsum(-1) - 1  # candidates stay in ascending class order: decode's first max
            slot = torch.where(cand & (rank < W), rank, W)  # over them is then the full path's first max
            cls[i:j].scatter_(-1, slot, torch.arange(K, device=work).expand_as(slot))
            count[i:j] = cand.sum(-1)
        cls = cls[:, :W].to(dev).view(B, P, W)
        empty, safe = cls < 0, cls.clamp(min=0)
        out = {"ckf_class": cls.to(_torch_dtype(self.cdtype)),
               "ckf_dense": d16.gather(-1, safe).masked_fill(empty, 0),
               "ckf_global": g32[:, None, :].expand(B, P, K).gather(-1, safe).masked_fill(empty, 0),
               "ckf_count": count.clamp(max=32767).to(dev, torch.int16).view(B, P),  # saturates: only > W matters
               **self._global_topk(g32)}
        over = (count.to(dev) > W).nonzero()[:, 0]
        if not over.numel():
            return out, None
        view, pos = over // P, over % P
        return out, {"view": view, "pos": pos, "dense": d16[view, pos], "global": g32[view]}

    def decode_targets(self, arrays, alpha, spill=None):
        alpha, cls = _check_alpha(alpha), arrays["ckf_class"].long()
        # -inf only AFTER fusing: 0 * -inf would be NaN
        fused = fuse(arrays["ckf_dense"], arrays["ckf_global"], alpha).masked_fill(cls < 0, -torch.inf)
        y = cls.gather(-1, fused.argmax(-1, keepdim=True))[..., 0]
        need = arrays["ckf_count"].long() > cls.shape[-1]
        if spill is not None and spill["view"].numel():
            view, pos = spill["view"].long(), spill["pos"].long()
            y[view, pos] = fuse(spill["dense"], spill["global"], alpha).argmax(-1)  # the full-path formula
            need[view, pos] = False
        if bool(need.any()):
            raise ValueError(f"{int(need.sum())} positions have more CKF candidates than ckf_width "
                             f"({cls.shape[-1]}) but no spill row was given")
        return y


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


def make_encoding(name: str, num_classes: int, positions: int, *, ckf_width: int = 8, topk: int = 10,
                  global_topk: int = 10) -> Encoding:
    if name == "full":
        return FullEncoding(num_classes, positions)
    if name == "ckf":
        return CKFEncoding(num_classes, positions, ckf_width=ckf_width, global_topk=global_topk)
    if name == "topk":
        return TopKEncoding(num_classes, positions, topk=topk, global_topk=global_topk)
    raise ValueError(f"unknown encoding {name!r}; choose one of {', '.join(ENCODINGS)}")


def encoding_from_description(desc: dict, num_classes: int, positions: int) -> Encoding:
    """Inverse of Encoding.describe(), used when opening a cache."""
    for key, want in (("num_classes", num_classes), ("positions", positions)):
        if key in desc and int(desc[key]) != want:
            raise ValueError(f"cache encoding was built for {key}={desc[key]}, not {want}")
    enc = make_encoding(desc["name"], num_classes, positions, **desc.get("params", {}))
    if desc["name"] != "full" and "global_lse" not in desc.get("arrays", {"global_lse": 0}):
        # a format-1 cache: no log-sum-exps were stored; absent classes decode the old way
        enc = type(enc)(num_classes, positions, **enc.params, lse=False)
    return enc
