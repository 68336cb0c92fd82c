"""The `ckf` encoding: store only what the CKF targets can ever be, exactly, in a few hundred bytes a view.

CKF target at a position: Y = argmax_c(alpha * d_c + (1 - alpha) * g_c), alpha moving from 1 to 0 in training.
Only the classes on the upper convex chain of the points (d_c, g_c) can win for some alpha; with real teachers
that is about 2.3 classes per position (7x7 grid, 1000 classes). Per view we store:

  global_class / global_value [G]   a table: the global top-k, then every other class that is a candidate at some
                                    position, ordered by global logit (fp32), so each global value is stored once
  global_lse                        log-sum-exp of the global logits (soft distillation, see encodings.py)
  ckf_slot [P, W] uint8             per position, its candidates as indices into the table, ascending by class
                                    (argmax takes the first of equal values, i.e. the lowest class, as `full` does);
                                    255 = empty. uint16 (65535 = empty) when the table is wider than 254 classes
                                    (e.g. --global-topk 1000 for exact soft distillation)
  ckf_dense [P, W] fp16             their dense logits
  ckf_count [P] uint8               the number of candidates, or 255: this position's row is in `spill/` (more
                                    candidates than W, or a class the table could not hold; rare)

Decoding fuses the very fp16/fp32 numbers `full` stores with the same float32 formula, so targets are identical
bit for bit, for every alpha. Format-1 caches stored the global value per position and candidate
(`ckf_class`/`ckf_global`), about 60% more; `CKFEncodingV1` still reads them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .encoding import (_GLOBAL_ABSENT, ArraySpec, Encoding, _check_alpha, _check_inputs, _scatter_fill,
                        _torch_dtype, fuse)

_U32 = 2.0**-24  # fp32 unit roundoff
_CHUNK = 2**22  # elements per float64 work tensor in the analysis (~32 MB), bounds memory for big K
EMPTY, SPILLED = 255, 255  # ckf_slot (uint8): no candidate; ckf_count: the position's row is in spill/
MAX_WIDTH = 65534  # widest table a uint16 slot can index (65535 = empty)


def _eps(d: Tensor, g: Tensor) -> Tensor:
    """The rounding margin of the analysis, float64 [N, 1], from the full rows (see ckf_candidates). The maxima are
    taken in the rows' own dtype (exact), then widened."""
    S = d.abs().amax(-1, keepdim=True).double() + g.abs().amax(-1, keepdim=True).double()
    return 16 * _U32 * S + 2.0**-126  # + subnormals


def ckf_candidates(d: Tensor, g: Tensor, eps: Tensor | None = None) -> Tensor:
    """d, g: [N, K] float64 (the STORED values: fp16 dense, fp32 global). Returns bool [N, K]: the classes that
    can be argmax_c fl32(alpha * d_c + (1 - alpha) * g_c) for some alpha in [0, 1], duplicates dropped.

    Lines f_c(a) = g_c + a * (d_c - g_c), M(a) = max_c f_c(a). The fp32 fused value of a class is within about
    3u * S of f_c(a) (S = max|d| + max|g|, u = 2**-24), so a class can win (or tie and win on index) only if
    M(a) - f_c(a) <= 6u * S somewhere. A real win at 1.77u * S exists (see the tests); we use eps = 16u * S, and
    the float64 errors of the analysis are far below the spare margin. M - f_c is convex, so its minimum over [0, 1]
    is at a breakpoint of M or at 0 / 1: walk the envelope from a = 1 down to a = 0, vectorised over rows,
    looping over chain steps only. `eps` may be given (computed on fuller rows, see `candidates`)."""
    n, d0, g0 = d.shape[0], d, g
    s = d - g  # slopes
    eps = _eps(d, g) if eps is None else eps
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


def _chain_bounded(d: Tensor, g: Tensor, eps: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """`ckf_candidates` without host syncs: `steps` chain steps for every row, finished rows frozen with
    torch.where instead of compacted (the same per-row arithmetic, so the same bits). Returns (candidates, done):
    `done` is a device bool, False when some row's chain is longer than `steps` (then the result is not used)."""
    d0, g0, s = d, g, d - g
    gap = torch.minimum(d.amax(-1, keepdim=True) - d, g.amax(-1, keepdim=True) - g)
    v, m = d, d.amax(-1, keepdim=True)
    w = torch.where(v == m, s, torch.inf).argmin(-1, keepdim=True)
    a = torch.ones_like(m)
    active = torch.ones_like(m, dtype=torch.bool)
    for step in range(steps + 1):
        sw = s.gather(-1, w)
        cross = torch.where(s < sw, a - (m - v) / (sw - s), -torch.inf)
        nxt = cross.amax(-1, keepdim=True)
        active = active & (nxt > 0)
        if step == steps:  # one more look: a row still active here has breakpoints left
            break
        w = torch.where(active, torch.where(cross == nxt, s, torch.inf).argmin(-1, keepdim=True), w)
        a = torch.where(active, nxt, a)
        v_new = (1 - a) * g + a * d
        m_new = v_new.amax(-1, keepdim=True)
        gap = torch.where(active, torch.minimum(gap, m_new - v_new), gap)
        v, m = torch.where(active, v_new, v), torch.where(active, m_new, m)
    return (gap <= eps) & ~_duplicates(d0, g0), ~active.any()


def _duplicates(d: Tensor, g: Tensor) -> Tensor:
    """bool [N, K]: True where a lower class index has the same stored (d, g). Their fused values are bitwise
    identical at every alpha and argmax takes the first index, so these can never win."""
    o1 = torch.sort(g, dim=-1, stable=True).indices  # lexsort by (d, g, index) via two stable sorts
    order = o1.gather(-1, torch.sort(d.gather(-1, o1), dim=-1, stable=True).indices)
    ds, gs = d.gather(-1, order), g.gather(-1, order)
    dup = torch.zeros_like(ds, dtype=torch.bool)
    dup[:, 1:] = (ds[:, 1:] == ds[:, :-1]) & (gs[:, 1:] == gs[:, :-1])
    return torch.zeros_like(dup).scatter_(-1, order, dup)


def _may_win(d: Tensor, g: Tensor, eps: Tensor) -> Tensor:
    """bool [N, K], a cheap superset of the candidates (float32 in, one pass over the classes). The winners at
    alpha = 1 (j) and alpha = 0 (k) bound the envelope from below: M >= L = max(f_j, f_k). A class whose line stays
    more than eps below L everywhere has a gap above eps and is never a candidate. L - f_c is convex with one
    breakpoint, where f_j and f_k cross (a*), so it is smallest at 0, 1 or a*: keep c if it comes within eps of L
    at one of them. The test runs in float32 with a margin for its own rounding, so it only ever keeps extra."""
    S = d.abs().amax(-1, keepdim=True) + g.abs().amax(-1, keepdim=True)
    tol = eps.float() + 8 * _U32 * S  # float32 rounding of a fused value and of the thresholds: a few u * S
    dj, j = d.max(-1, keepdim=True)
    gk, k = g.max(-1, keepdim=True)
    gj, dk = g.gather(-1, j), d.gather(-1, k)
    den = (dj - gj) - (dk - gk)  # slope of f_j minus slope of f_k: >= 0, as f_j leads at 1 and f_k at 0
    a = torch.where(den > 0, (gk - gj) / den.clamp(min=1e-30), 0.0).clamp(0.0, 1.0)
    level = torch.maximum(a * dj + (1 - a) * gj, a * dk + (1 - a) * gk)
    return (d >= dj - tol) | (g >= gk - tol) | (a * d + (1 - a) * g >= level - tol)


def candidates(d: Tensor, g: Tensor) -> Tensor:
    """The candidates of rows d [N, K] (fp16 values as float32) and g [N, K] (float32): a cheap float32 filter
    (`_may_win`), then the exact float64 analysis on the few classes it keeps, scattered back to [N, K]. Exact:
    the dropped classes stay below M - eps everywhere, so M, and every gap, are the same over the survivors."""
    N, K = d.shape
    eps = _eps(d, g)
    keep = _may_win(d, g, eps)
    width = int(keep.sum(-1).max())
    if width >= K // 2:
        return ckf_candidates(d.double(), g.double(), eps)
    # the survivors (and, in rows with fewer, some others: harmless, they are analysed and dropped), ascending
    # by class so that ties are decided as the full rows would
    sub = torch.topk(keep.to(d.dtype), width, -1).indices.sort(-1).values
    found = ckf_candidates(d.gather(-1, sub).double(), g.gather(-1, sub).double(), eps)
    return torch.zeros(N, K, dtype=torch.bool, device=d.device).scatter_(-1, sub, found)


# The bounded analysis (precompute on a GPU): survivors of the filter analysed per row, and chain steps. Real
# teachers keep about 5-20 survivors and walk 2-4 steps per position (7x7, 1000 classes); a batch beyond either
# bound is redone by the exact, syncing path.
BOUNDED_WIDTH, BOUNDED_STEPS = 48, 12


def candidates_bounded(d: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """`candidates` with fixed shapes and no host syncs: (candidates [N, K], ok): `ok` (a device bool) is False when
    a row had more than BOUNDED_WIDTH survivors or a longer chain than BOUNDED_STEPS; the caller then uses
    `candidates`. Where ok, the result equals `candidates`' bit for bit (the same analysis on the same classes)."""
    N, K = d.shape
    eps = _eps(d, g)
    keep = _may_win(d, g, eps)
    width = min(BOUNDED_WIDTH, K)
    sub = torch.topk(keep.to(d.dtype), width, -1).indices.sort(-1).values
    found, done = _chain_bounded(d.gather(-1, sub).double(), g.gather(-1, sub).double(), eps, BOUNDED_STEPS)
    ok = done & (keep.sum(-1) <= width).all()
    return torch.zeros(N, K, dtype=torch.bool, device=d.device).scatter_(-1, sub, found), ok


class CKFEncoding(Encoding):
    name = "ckf"
    absent_classes = ("dense: only the classes that can be the CKF target for some alpha in [0, 1] are stored "
                      "(exact hard targets, dense logits not recoverable); " + _GLOBAL_ABSENT)
    exact_global = False
    soft_ckf = "none"
    lossy = True  # hard CKF targets and hard distillation are exact; soft distillation is approximate

    def __init__(self, num_classes: int, positions: int, ckf_width: int = 8, global_topk: int = 10,
                 global_width: int | None = None):
        # the table holds the union of a view's candidates: about 20 classes at 7x7, 40 at 14x14 with real
        # teachers (benchmarks/scale.py); empty entries cost almost nothing compressed, a spilled position 6 KB
        global_width = global_width or min(254, max(48, positions + 16))
        super().__init__(num_classes, positions, ckf_width=ckf_width, global_topk=global_topk,
                         global_width=max(global_width, global_topk))
        # the global top-k always fits: a table wider than 254 classes takes 2-byte slots (asked-for exactness is
        # stored, never silently cut to what one byte can index)
        self.params["global_width"] = min(self.params["global_width"], MAX_WIDTH, self.num_classes)
        self.params["global_topk"] = min(self.params["global_topk"], self.params["global_width"])
        self.params["ckf_width"] = min(self.params["ckf_width"], 254)
        self.slot_dtype = "uint8" if self.params["global_width"] <= 254 else "uint16"
        self.empty = EMPTY if self.slot_dtype == "uint8" else 65535
        self.exact_global = self.params["global_topk"] == self.num_classes

    def arrays(self) -> dict[str, ArraySpec]:
        P, W, G = self.positions, self.params["ckf_width"], self.params["global_width"]
        # ckf_dense: a few fp16 values per position and zero padding; unshuffled it compresses about 10% better
        return {"ckf_slot": ArraySpec((P, W), self.slot_dtype, self.empty),
                "ckf_dense": ArraySpec((P, W), "float16", math.nan, shuffle=False),
                "ckf_count": ArraySpec((P,), "uint8", 0), "global_class": ArraySpec((G,), self.cdtype, -1),
                "global_value": ArraySpec((G,), "float32", math.nan), "global_lse": ArraySpec((), "float32", math.nan)}

    def encode(self, dense, global_, deferred: bool = False):
        """-> (arrays, spill rows or None). `deferred` (precompute): no host sync; the spill comes as a fixed
        number of rows with its true `count`, and `arrays["ok"]` (a device bool) says whether the bounded analysis
        held; `settle` then gives what the plain call gives, reading both where the arrays reach the host."""
        d16, g32 = _check_inputs(self, dense, global_)
        B, P, K = d16.shape
        N, W, G, k, dev = B * P, self.params["ckf_width"], self.params["global_width"], self.params["global_topk"], \
            d16.device
        work = torch.device("cpu") if dev.type == "mps" else dev  # mps has no float64
        dw, gw, step = d16.to(work).reshape(N, K), g32.to(work), max(1, _CHUNK // K)
        cand, ok = torch.empty(N, K, dtype=torch.bool, device=work), torch.ones((), dtype=torch.bool, device=work)
        for i in range(0, N, step):
            j = min(i + step, N)
            rows = (dw[i:j].float(), gw[torch.arange(i, j, device=work) // P])
            if deferred:
                cand[i:j], held = candidates_bounded(*rows)
                ok = ok & held
            else:
                cand[i:j] = candidates(*rows)
        cand, gw = cand.to(dev), g32
        count = cand.sum(-1)
        # the table: global top-k, then the other candidate classes, by global logit (ties: lower class first)
        order = torch.sort(gw, dim=-1, descending=True, stable=True).indices  # [B, K]
        rank_of_class = torch.empty_like(order).scatter_(1, order, torch.arange(K, device=dev).expand(B, K))
        in_table = cand.view(B, P, K).any(1) | (rank_of_class < k)
        in_sorted = in_table.gather(1, order)
        place = in_sorted.long().cumsum(1) - 1  # table index of each class, in table order
        fits = in_sorted & (place < G)
        table = torch.full((B, G + 1), -1, dtype=torch.long, device=dev)
        table.scatter_(1, torch.where(fits, place, G), order)
        table = table[:, :G]
        slot_of_class = torch.full((B, K), self.empty, dtype=torch.long, device=dev)
        slot_of_class.scatter_(1, order, torch.where(fits, place, self.empty))
        # each position's candidates, ascending by class, as table slots
        rank = cand.long().cumsum(-1) - 1
        cls = torch.full((N, W + 1), -1, dtype=torch.long, device=dev)  # column W collects the overflow
        cls.scatter_(-1, torch.where(cand & (rank < W), rank, W), torch.arange(K, device=dev).expand(N, K))
        cls = cls[:, :W]
        row_slots = slot_of_class.repeat_interleave(P, 0)  # [N, K]
        slot = torch.where(cls >= 0, row_slots.gather(-1, cls.clamp(min=0)), self.empty)
        spilled = (count > W) | (cand & (row_slots == self.empty)).any(-1)
        out = {"ckf_slot": slot.to(_torch_dtype(self.slot_dtype)).view(B, P, W),
               "ckf_dense": d16.reshape(N, K).gather(-1, cls.clamp(min=0)).masked_fill(cls < 0, 0).view(B, P, W),
               "ckf_count": torch.where(spilled, SPILLED, count.clamp(max=SPILLED - 1)).to(torch.uint8).view(B, P),
               "global_class": table.to(_torch_dtype(self.cdtype)),
               "global_value": gw.gather(1, table.clamp(min=0)).masked_fill(table < 0, math.nan),
               "global_lse": torch.logsumexp(gw, -1)}
        if deferred:
            # a fixed number of rows, spilled positions first in order (stable sort: no nonzero, no sync); their
            # true count travels with them, and more than fit means the plain call (settle)
            rows = min(N, max(64, N // 8))
            over = torch.sort((~spilled).to(torch.uint8), stable=True).indices[:rows]
            view, pos = over // P, over % P
            out["ok"] = ok.to(dev)
            return out, {"view": view, "pos": pos, "dense": d16[view, pos], "global": g32[view],
                         "count": spilled.sum()}
        over = spilled.nonzero()[:, 0]
        if not over.numel():
            return out, None
        view, pos = over // P, over % P
        return out, {"view": view, "pos": pos, "dense": d16[view, pos], "global": g32[view]}

    def settle(self, arrays: dict, spill: dict, dense, global_) -> tuple[dict, dict | None]:
        """A deferred encode's host arrays (numpy) -> exactly what `encode(dense, global_)` gives, as numpy: the
        spill cut to its count, or, where the bounded analysis did not hold or the spill did not fit, the plain
        encode again (rare; `dense` and `global_` are the same tensors)."""
        count = int(spill.pop("count"))
        if not bool(arrays.pop("ok")) or count > len(spill["view"]):
            out, rows = self.encode(dense, global_)
            out = {k: v.cpu().numpy() for k, v in out.items()}
            return out, None if rows is None else {k: v.cpu().numpy() for k, v in rows.items()}
        return arrays, ({k: v[:count] for k, v in spill.items()} if count else None)

    def decode_targets(self, arrays, alpha, spill=None):
        alpha = _check_alpha(alpha)
        slot, table, values = arrays["ckf_slot"], arrays["global_class"], arrays["global_value"]
        B, P, W = slot.shape
        empty = slot == self.empty
        # Table indices (an empty slot clamped to a valid one: it is masked below), widened to int64 once, after
        # clamping the 1-byte slots (torch cannot clamp uint16: those are widened first); the class table is
        # widened after its gather. 10-20% faster on the CPU at 100k views/s (benchmarks/read_decode.py).
        index = (slot if slot.dtype == torch.uint8 else slot.long()).clamp(max=table.shape[1] - 1).long()
        g = values.gather(1, index.reshape(B, P * W)).view(B, P, W)
        # -inf only AFTER fusing: 0 * -inf would be NaN (and empty slots hold NaN global values)
        fused = fuse(arrays["ckf_dense"], g, alpha).masked_fill(empty, -torch.inf)
        best = index.gather(-1, fused.argmax(-1, keepdim=True)).view(B, P)  # first max: the lowest class
        y = table.gather(1, best).long()
        if spill is not None and spill["view"].numel():
            view, pos = spill["view"].long(), spill["pos"].long()
            y[view, pos] = fuse(spill["dense"], spill["global"], alpha).argmax(-1)  # the full-path formula
        return y

    @staticmethod
    def slot_classes(arrays: dict) -> Tensor:
        """The class id in each candidate slot, [B, P, W], -1 where empty (for inspection and tests)."""
        empty = EMPTY if arrays["ckf_slot"].dtype == torch.uint8 else 65535
        slot, table = arrays["ckf_slot"].long(), arrays["global_class"].long()
        B, P, W = slot.shape
        cls = table.gather(1, slot.clamp(max=table.shape[1] - 1).reshape(B, P * W)).view(B, P, W)
        return cls.masked_fill(slot == empty, -1)

    def missing_spill(self, arrays: dict, spill: dict | None) -> int:
        """How many positions say their row is in spill/ but have none (a damaged cache). Checked where the
        rows are read (numpy), so that decoding on the device never has to synchronise for it."""
        need = np.asarray(arrays["ckf_count"]) == SPILLED
        if spill is not None and len(spill["view"]):
            need[np.asarray(spill["view"]), np.asarray(spill["pos"])] = False
        return int(need.sum())

    def unwritten(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The global table is padded: a view with fewer table classes than its width has class -1 and value NaN
        in its last slots. A written row holds its global top-k first (never -1), a value wherever it holds a
        class, no NaN logit anywhere else; an unwritten row holds fill values (-1, NaN) from slot 0."""
        cls, val, k = arrays["global_class"], arrays["global_value"], self.params["global_topk"]
        n = len(cls)
        return ((cls[:, :k] < 0).any(1) | (np.isnan(val) != (cls < 0)).any(1) |
                np.isnan(arrays["ckf_dense"].reshape(n, -1)).any(1) | np.isnan(arrays["global_lse"]))

    def decode_global(self, arrays):
        cls, val = arrays["global_class"], arrays["global_value"]
        # the first global_topk slots are the top-k; later ones are candidates of any rank (see _scatter_fill)
        return _scatter_fill(cls, val, self.num_classes, arrays.get("global_lse"), valid=cls >= 0,
                             ranked=self.params["global_topk"])


class CKFEncodingV1(Encoding):
    """The format-1 `ckf` layout (cskd-cache 0.1): global values per position and candidate, no log-sum-exp.
    Read only; new caches use CKFEncoding."""

    name = "ckf"
    absent_classes = CKFEncoding.absent_classes
    exact_global, soft_ckf, lossy = False, "none", True

    def __init__(self, num_classes: int, positions: int, ckf_width: int = 8, global_topk: int = 10, lse=False):
        super().__init__(num_classes, positions, ckf_width=ckf_width, global_topk=global_topk, lse=lse)

    def arrays(self) -> dict[str, ArraySpec]:
        P, W, c = self.positions, self.params["ckf_width"], self.cdtype
        return {"ckf_class": ArraySpec((P, W), c, -1), "ckf_dense": ArraySpec((P, W), "float16", math.nan),
                "ckf_global": ArraySpec((P, W), "float32", math.nan), "ckf_count": ArraySpec((P,), "int16", 0),
                **self._global_specs()}

    def encode(self, dense, global_):
        raise ValueError("format-1 ckf caches are read, not written; new caches use the format-2 layout")

    def decode_targets(self, arrays, alpha, spill=None):
        alpha, cls = _check_alpha(alpha), arrays["ckf_class"].long()
        fused = fuse(arrays["ckf_dense"], arrays["ckf_global"], alpha).masked_fill(cls < 0, -torch.inf)
        y = cls.gather(-1, fused.argmax(-1, keepdim=True))[..., 0]
        if spill is not None and spill["view"].numel():
            view, pos = spill["view"].long(), spill["pos"].long()
            y[view, pos] = fuse(spill["dense"], spill["global"], alpha).argmax(-1)
        return y

    def missing_spill(self, arrays: dict, spill: dict | None) -> int:
        need = np.asarray(arrays["ckf_count"]).astype(np.int64) > np.asarray(arrays["ckf_class"]).shape[-1]
        if spill is not None and len(spill["view"]):
            need[np.asarray(spill["view"]), np.asarray(spill["pos"])] = False
        return int(need.sum())
