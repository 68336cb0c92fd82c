"""Tensor replay vs PIL replay: how much the teacher's targets move between the two backends' pixels, beside how much
they move with the teacher's own precision (the same PIL pixels in bf16 autocast vs fp32).

Both backends make each view from the same parameters (timm's draws from the view's seed). The tensor backend
redoes Pillow's arithmetic, so on a CPU its pixels are PIL's (the expected result: 0 differences); on CUDA its JPEG
decoder is nvJPEG, not libjpeg-turbo (`--device cuda` measures what that changes). The first version of the backend
(torch's float resize, grid_sample) measured 0.28 levels and 8.5% / 9.8% changed targets here. On camera-like JPEGs (640x427, quality 90, scikit-image's photographs) at 224 px with DeiT's full
recipe (RandAugment, erasing, mixup/cutmix in pairs, 3 repeats), for the same plan entries:

- pixels: mean |difference| of the uint8 views (after crop, flip and RandAugment; erasing and mixing are the same
  arithmetic in both) and the share of values within 2 levels;
- teacher targets (efficientnet_lite0, ImageNet weights, fp32): share of views whose global argmax differs, share of
  positions whose dense CKF target (full encoding, as a cache stores it) differs at alpha 1, 0.5 and 0; on the mixed
  views (as trained) and the unmixed ones;
- the reference: the same PIL views through the same teacher in bf16 autocast vs fp32, the same shares, and a
  95% bootstrap interval (views resampled, paired) of the gap between the two: is it more than the sample's noise?

The issue's acceptance: tensor vs PIL no looser than bf16 vs fp32. The verdict is printed and written (`verdict`,
`looser_than_bf16`), failures included. Per RandAugment op (views that apply it, unmixed): mean pixel difference
and global flips, to say where the disagreement comes from. Writes benchmarks/results/backend_agreement.json.

    OMP_NUM_THREADS=2 python -m benchmarks.backend_agreement     # about 8 minutes on 2 busy cores
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

from benchmarks.common import camera_photos, lite0_checkpoint, parser, save, setup, table
from cskd_cache.cache.encodings import make_encoding
from cskd_cache.data.open import open_source
from cskd_cache.data.params import ops_of
from cskd_cache.data.plan import make_epoch_plan
from cskd_cache.data.recipe import Recipe
from cskd_cache.data.replay import collate_pairs, pair_items
from cskd_cache.data.views import pair_dataset
from cskd_cache.teacher.model import create_teacher

ALPHAS = (1.0, 0.5, 0.0)
BATCH = 32  # views per teacher batch (16 pairs)


class Targets:
    """The teacher's targets as a cache holds them (full encoding: dense fp16, global fp32): global argmax and the
    dense CKF targets per alpha, accumulated over batches."""

    def __init__(self):
        self.glob, self.dense = [], {a: [] for a in ALPHAS}

    def add(self, teacher, x: torch.Tensor) -> None:
        dense, glob = teacher(x)
        enc = make_encoding("full", dense.shape[-1], dense.shape[1])
        arrays, _ = enc.encode(dense, glob)
        self.glob.append(enc.global_argmax(arrays).cpu())
        for a in ALPHAS:
            self.dense[a].append(enc.decode_targets(arrays, a).cpu())

    def changed(self, other: "Targets") -> dict:
        """Shares (and counts) of views / positions whose target differs from `other`'s."""
        g = torch.cat(self.glob) != torch.cat(other.glob)
        out = {"global": float(g.float().mean()), "global_count": int(g.sum()), "views": len(g)}
        for a in ALPHAS:
            d = torch.cat(self.dense[a]) != torch.cat(other.dense[a])
            out[f"dense@{a:g}"] = float(d.float().mean())
        return out

    def flips(self, other: "Targets") -> np.ndarray:
        return (torch.cat(self.glob) != torch.cat(other.glob)).numpy()

    def per_view(self, other: "Targets") -> dict[str, np.ndarray]:
        """Per view: global changed (0/1), share of its positions whose dense target changed, by alpha."""
        out = {"global": self.flips(other).astype(np.float64)}
        for a in ALPHAS:
            out[f"dense@{a:g}"] = (torch.cat(self.dense[a]) != torch.cat(other.dense[a])).double().mean(1).numpy()
        return out


def paired_interval(x: np.ndarray, y: np.ndarray, draws: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of mean(x) - mean(y) over views resampled together (the two comparisons are of the
    same views, so their noise is shared): says whether a gap between the shares is more than the sample's."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(x), size=(draws, len(x)))
    d = x[idx].mean(1) - y[idx].mean(1)
    return float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--epochs", type=int, default=4, help="plan epochs replayed (112 views each)")
    args = ap.parse_args()
    if args.epochs < 1:
        ap.error(f"--epochs {args.epochs}: replay at least 1 epoch")
    device = setup(args)
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp()
    size = 64 if args.smoke else 224
    source = open_source(str(camera_photos(f"{tmp}/photos", per_photo=1 if args.smoke else 8)))
    recipe = Recipe(input_size=size)  # DeiT's full recipe
    pil = pair_dataset(source, recipe)
    ten = pair_dataset(source, Recipe(input_size=size, replay="tensor"))
    name = lite0_checkpoint(f"{tmp}/lite0.safetensors")
    teachers = {p: create_teacher(name, checkpoint=f"{tmp}/lite0.safetensors", view_mean=recipe.mean,
                                  view_std=recipe.std, precision=p)[0].to(device) for p in ("fp32", "bf16")}

    epochs = 1 if args.smoke else args.epochs
    params = recipe.plan_params(len(source), epochs, 0, 3)  # DeiT's repeated augmentation
    plans = {e: make_epoch_plan(params, e) for e in range(epochs)}
    stride = params.views_per_epoch
    views = np.arange(8 if args.smoke else epochs * stride)
    items = pair_items(lambda e: plans[e], views, stride, check=False)

    # targets[(backend, precision, mixed)]
    targets = defaultdict(Targets)
    abs_sum, within2, values, per_view_diff, rows_params = 0, 0, 0, [], []
    for at in range(0, len(items), BATCH // 2):
        chunk = items[at: at + BATCH // 2]
        pb, tb = collate_pairs(pil.__getitems__(chunk)), collate_pairs(ten.__getitems__(chunk))
        a = pb["pixels"].to(torch.int16)
        b = ten.views(tb, device).cpu().to(torch.int16)
        diff = (a - b).abs()
        abs_sum += int(diff.sum())
        within2 += int((diff <= 2).sum())
        values += diff.numel()
        per_view_diff += diff.float().mean(dim=(1, 2, 3)).tolist()
        rows_params += list(tb["params"].numpy())
        for mixed in (True, False):
            xa, xb = pil.finish(pb, device, mixed=mixed), ten.finish(tb, device, mixed=mixed)
            targets[("pil", "fp32", mixed)].add(teachers["fp32"], xa)
            targets[("pil", "bf16", mixed)].add(teachers["bf16"], xa)
            targets[("tensor", "fp32", mixed)].add(teachers["fp32"], xb)

    rows, figures, looser = [], {}, []
    for mixed in (True, False):
        tag = "mixed" if mixed else "unmixed"
        tvp = targets[("tensor", "fp32", mixed)].changed(targets[("pil", "fp32", mixed)])
        ref = targets[("pil", "bf16", mixed)].changed(targets[("pil", "fp32", mixed)])
        for label, c in (("tensor vs PIL (fp32)", tvp), ("bf16 vs fp32 (PIL)", ref)):
            rows.append({"views": tag, "comparison": label, "global changed": c["global"],
                         "(count)": f"{c['global_count']}/{c['views']}",
                         **{f"dense changed a={a:g}": c[f"dense@{a:g}"] for a in ALPHAS}})
        key = "" if mixed else "_unmixed"
        figures[f"tensor_vs_pil_global_changed{key}"] = tvp["global"]
        figures[f"tensor_vs_pil_dense_changed{key}"] = {f"{a:g}": tvp[f"dense@{a:g}"] for a in ALPHAS}
        figures[f"bf16_vs_fp32_global_changed{key}"] = ref["global"]
        figures[f"bf16_vs_fp32_dense_changed{key}"] = {f"{a:g}": ref[f"dense@{a:g}"] for a in ALPHAS}
        looser += [f"{k} ({tag}): {tvp[k]:.4f} > {ref[k]:.4f}" for k in ("global", *(f"dense@{a:g}" for a in ALPHAS))
                   if tvp[k] > ref[k]]
        pv_t = targets[("tensor", "fp32", mixed)].per_view(targets[("pil", "fp32", mixed)])
        pv_r = targets[("pil", "bf16", mixed)].per_view(targets[("pil", "fp32", mixed)])
        figures[f"gap_interval95{key}"] = {k: paired_interval(pv_t[k], pv_r[k]) for k in pv_t}
        rows[-2]["verdict"] = "LOOSER than bf16" if any(f"({tag})" in s for s in looser) else "within bf16"
    columns = ["views", "comparison", "global changed", "(count)", *(f"dense changed a={a:g}" for a in ALPHAS),
               "verdict"]
    print(table(rows, columns))
    figures["pixel_mean_abs_diff"] = abs_sum / values
    figures["pixel_within_2"] = within2 / values
    print(f"\npixels (uint8, {len(per_view_diff)} views): mean |tensor - PIL| {abs_sum / values:.3f} levels, "
          f"{within2 / values:.2%} within 2 levels")

    # Where the disagreement comes from: per RandAugment op present in a view (unmixed flips: a mixed view's flip
    # also depends on its partner). "(none)": no op applied, crop + flip + decode only.
    flips = targets[("tensor", "fp32", False)].flips(targets[("pil", "fp32", False)])
    by_op = defaultdict(list)
    for i, row in enumerate(rows_params):
        names = {op for op, _, _ in ops_of(row, ten.drawer.layers)} or {"(none)"}
        for op in names:
            by_op[op].append(i)
    op_rows = sorted(({"RandAugment op": op, "views": len(ix), "pixel |diff|": float(np.mean(
        [per_view_diff[i] for i in ix])), "global flips": int(flips[ix].sum())} for op, ix in by_op.items()),
        key=lambda r: -r["pixel |diff|"])
    print()
    print(table(op_rows, ["RandAugment op", "views", "pixel |diff|", "global flips"]))

    for key, tag in (("", "mixed"), ("_unmixed", "unmixed")):
        print(f"{tag}: tensor-vs-PIL minus bf16-vs-fp32, 95% bootstrap interval over views: " + ", ".join(
            f"{k} [{lo:+.3f}, {hi:+.3f}]" for k, (lo, hi) in figures[f"gap_interval95{key}"].items()))
    verdict = ("tensor vs PIL is no looser than bf16 vs fp32" if not looser else
               "tensor vs PIL is LOOSER than bf16 vs fp32: " + "; ".join(looser))
    seconds = time.perf_counter() - t0
    print(f"\nverdict: {verdict}\n{seconds:.0f} s")
    inputs = {"teacher": f"{name} (ImageNet weights), fp32; reference bf16 autocast", "input_size": size,
              "images": f"{len(source)} camera-like JPEGs (640x427 q90, scikit-image photos)",
              "recipe": "DeiT's full recipe (rand-m9-mstd0.5-inc1, erasing 0.25, mixup 0.8 / cutmix 1.0), repeats 3",
              "views": len(per_view_diff), "encoding": "full (dense fp16, global fp32)", "alphas": list(ALPHAS),
              "threads": torch.get_num_threads()}
    path = save("backend_agreement", args, rows, inputs, device, **figures, looser_than_bf16=looser,
                verdict=verdict, by_op=op_rows, seconds=seconds)
    print(f"\n{path}")


if __name__ == "__main__":
    main()
