"""Replay drift: does a view's stored signature tell a harmless library drift from a wrong view?

When a replayed view's fingerprint differs from the stored one, training accepts it if the signature distance is
within --replay-tolerance. This measures, on real photos with DeiT's full recipe (RandomResizedCrop, flip,
RandAugment rand-m9-mstd0.5-inc1, random erasing, mixup/cutmix pairs), how often that check

- wrongly ACCEPTS a view that is not the one the teacher saw: a wrong mixup / cutmix partner, the crop box moved by
  4 or 16 source pixels, the flip inverted, another sample's image, every RandAugment magnitude one step lower
  (false accept);
- wrongly REJECTS a harmless drift: the same views replayed under Pillow 10.4 (real tensors, made in another
  environment with --capture), the crop-resize output off by +-1 level in 10% of its values, or resized with
  torch's antialiased bicubic instead of Pillow's (false reject);

for the current 48-byte signature (4x4 cell means, max difference, tolerance 0.05) and the proposed 64-byte one
(format 3's `sketch64`: a count sketch of 8x8-pixel block means; RMS difference, tolerance 0.025), per view and per
mixing pair (a pair is rejected when either view is; training and verify replay whole pairs). Rates count only
views/pairs whose pixels changed (fingerprint differs): identical pixels are no error.

    python -m benchmarks.drift --photos-dir /tmp/drift-photos        # about 6 minutes on 2 cores
    # the Pillow 10.4 rows: the same views replayed under Pillow 10.4, in a separate environment
    python -m venv --system-site-packages /tmp/venv-pil104 && /tmp/venv-pil104/bin/pip install pillow==10.4.0
    /tmp/venv-pil104/bin/python -m benchmarks.drift --photos-dir /tmp/drift-photos --capture /tmp/pil104
    python -m benchmarks.drift --photos-dir /tmp/drift-photos --pillow-views /tmp/pil104
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import tempfile
import time

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation

from benchmarks.common import camera_photos, parser, real_photos, save, table
from cskd_cache.data.plan import MODE_CUTMIX, MODE_MIXUP, make_epoch_plan
from cskd_cache.data.fingerprint import fingerprint
from cskd_cache.data.recipe import Recipe, build_transform
from cskd_cache.data.replay import augment, mix_pair
from cskd_cache.data.fingerprint import SIGNATURES, replay_matches

# The library's two signatures: format 2's cells4x4 ("old": 4x4 cell means, max difference) and format 3's sketch64
# ("new": a count sketch of 8x8-pixel block means, RMS difference); cskd_cache/data/fingerprint.py says why each is built so.
old_signature, old_signature_distance, _, OLD_TOLERANCE = SIGNATURES["cells4x4"]
signature, signature_distance, _, SKETCH_TOLERANCE = SIGNATURES["sketch64"]


def accepts(same_fp, got_fp, distance, tolerance: float) -> bool:
    """The library's replay check (tolerance 0: exact pixels only)."""
    return bool(replay_matches(bool(same_fp) and bool(got_fp), distance, tolerance))


# ---------------------------------------------------------------------------------------------------------------
# Instrumented replay: timm's transform with its crop, flip and ToTensor steps wrapped. With no knob set it gives
# the library's views bit for bit (checked in main); every knob leaves the random draws of the replay unchanged.

class Knobs:
    def __init__(self):
        self.reset(0)

    def reset(self, seed: int):
        self.shift = 0          # move the crop box by this many source pixels (same size), direction at random
        self.flip = False       # invert the flip decision
        self.drift = None       # "pm1": +-1 level on 10% of the crop-resize output; "torch": torch's bicubic resize
        self.capture = None     # a list: append the uint8 image handed to ToTensor
        self.substitute = None  # a uint8 [H, W, 3] image to hand to ToTensor instead (Pillow 10.4's)
        self.ra_delta = 0.0     # add this to every RandAugment op's magnitude (the draws stay the same)
        self.skipped = False    # the crop could not move (it spans the image)
        self.out_shift = 0.0    # the crop's move in output pixels
        self.rng = np.random.default_rng([int(seed) % 2**63, 7])  # knob draws: not the replay's generators


class _Crop:
    def __init__(self, rrc: RandomResizedCropAndInterpolation, k: Knobs):
        self.rrc, self.k = rrc, k

    def __call__(self, img):
        rrc, k = self.rrc, self.k
        i, j, h, w = rrc.get_params(img, rrc.scale, rrc.ratio)
        if k.shift:
            n, (width, height) = k.shift, img.size
            ways = [(dy, dx) for dy, dx in ((n, 0), (-n, 0), (0, n), (0, -n))
                    if 0 <= i + dy and i + dy + h <= height and 0 <= j + dx and j + dx + w <= width]
            if ways:
                dy, dx = ways[int(k.rng.integers(len(ways)))]
                i, j = i + dy, j + dx
                k.out_shift = abs(dy) * rrc.size[0] / h + abs(dx) * rrc.size[1] / w
            else:
                k.skipped = True
        if k.drift == "torch":
            crop = torch.from_numpy(np.array(img.crop((j, i, j + w, i + h)))).permute(2, 0, 1)[None].float()
            out = torch.nn.functional.interpolate(crop, size=rrc.size, mode="bicubic", antialias=True)
            return Image.fromarray(out[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
        out = TF.resized_crop(img, i, j, h, w, rrc.size, rrc.interpolation)
        if k.drift == "pm1":
            a = np.asarray(out).astype(np.int16)
            a += (k.rng.random(a.shape) < 0.1) * k.rng.choice(np.array([-1, 1], np.int16), a.shape)
            out = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        return out


class _Flip:
    def __init__(self, flip, k: Knobs):
        self.p, self.k = flip.p, k

    def __call__(self, img):
        return TF.hflip(img) if bool(torch.rand(1) < self.p) != self.k.flip else img  # the same draw as torchvision


class _Hook:
    def __init__(self, k: Knobs):
        self.k = k

    def __call__(self, img):
        if self.k.capture is not None:
            self.k.capture.append(np.array(img))
        return img if self.k.substitute is None else Image.fromarray(np.asarray(self.k.substitute))


class Replayer:
    def __init__(self, recipe: Recipe):
        self.transform, self.k = build_transform(recipe), Knobs()
        ts = self.transform.transforms
        for n, t in enumerate(list(ts)):
            if isinstance(t, RandomResizedCropAndInterpolation):
                ts[n] = _Crop(t, self.k)
            elif type(t).__name__ == "RandomHorizontalFlip":
                ts[n] = _Flip(t, self.k)
        ts.insert(next(n for n, t in enumerate(ts) if isinstance(t, MaybeToTensor)), _Hook(self.k))
        self.ra_ops = [op for t in ts for op in (getattr(t, "ops", None) or [])]

    def __call__(self, img, seed: int, **knobs) -> tuple[torch.Tensor, bool]:
        self.k.reset(seed)
        for name, v in knobs.items():
            setattr(self.k, name, v)
        for op in self.ra_ops:
            op.magnitude += self.k.ra_delta
        try:
            x = augment(self.transform, img, seed)
        finally:
            for op in self.ra_ops:
                op.magnitude -= self.k.ra_delta
        self.out_shift, skipped = self.k.out_shift, self.k.skipped
        self.k.reset(0)
        return x, skipped


# ---------------------------------------------------------------------------------------------------------------
# Photos, pairs

PHOTO_SETS = {"photos320": "scikit-image photos, 320 px square JPEG crops (benchmarks.common.real_photos)",
              "camera640": "the same photos as camera-like 640x427 / 427x640 JPEGs, quality 90"}


def photo_files(root: pathlib.Path, kind: str, smoke: bool) -> list[pathlib.Path]:
    d = root / (kind + ("-smoke" if smoke else ""))
    if not d.exists() or not any(d.rglob("*.jpg")):
        if kind == "photos320":
            real_photos(d, per_photo=1 if smoke else 8, size=96 if smoke else 320)
        else:
            camera_photos(d, per_photo=1 if smoke else 8)
    return sorted(d.rglob("*.jpg"))


def files_digest(files) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def plan_pairs(num_images: int, recipe: Recipe, n: int, seed: int = 0) -> list[dict]:
    """n mixing pairs from cskd-cache's own plans (repeats 1), epoch after epoch. Each pair also gets a mixup lambda
    and a cutmix box of its own (plans drawn with switch_prob 0 and 1: draws are unconditional, so samples, seeds and
    lambdas are the same as the default plan's) for the wrong-partner rows."""
    import dataclasses

    params = recipe.plan_params(num_images, 10_000, seed, 1)
    only_mixup, only_cutmix = (dataclasses.replace(params, switch_prob=p) for p in (0.0, 1.0))
    pairs, epoch = [], 0
    while len(pairs) < n:
        ep, em, ec = (make_epoch_plan(p, epoch) for p in (params, only_mixup, only_cutmix))
        for p in range(0, len(ep.sample), 2):
            pairs.append({"a": int(ep.sample[p]), "b": int(ep.sample[p + 1]), "sa": int(ep.seed[p]),
                          "sb": int(ep.seed[p + 1]), "lam": float(ep.lam[p]), "mode": int(ep.mode[p]),
                          "box": tuple(int(v) for v in ep.box[p]), "lam_mix": float(em.lam[p]),
                          "lam_cut": float(ec.lam[p]), "box_cut": tuple(int(v) for v in ec.box[p])})
        epoch += 1
    return pairs[:n]


# ---------------------------------------------------------------------------------------------------------------
# Measurement

CASES = [  # (name, kind, what); kind FA: a wrong view, its acceptance is the error; FR: a harmless drift
    ("wrong mixup partner", "FA", "partner image replaced by another sample; per view: both views of the pair"),
    ("wrong cutmix partner", "FA", "partner image replaced by another sample; per view: both views of the pair"),
    ("crop shifted 4 px", "FA", "crop box of the view's own image moved by 4 source px (per pair: image a only)"),
    ("crop shifted 16 px", "FA", "crop box moved by 16 source px"),
    ("wrong flip", "FA", "flip decision inverted"),
    ("wrong image", "FA", "another sample's image with the same seed (per view: unmixed)"),
    ("RandAugment magnitude 9 -> 8", "FA", "every op's magnitude 1 lower, same draws (a recipe change)"),
    ("Pillow 10.4 vs 13", "FR", "the same views replayed under Pillow 10.4 (both images of a pair)"),
    ("resize drift +-1 on 10%", "FR", "crop-resize output +-1 level in 10% of values, then the rest of the recipe"),
    ("resize drift: torch bicubic", "FR", "crop-resize by torch's antialiased bicubic instead of Pillow's"),
]
SIGS = {"old": (old_signature, old_signature_distance, OLD_TOLERANCE),
        "new": (signature, signature_distance, SKETCH_TOLERANCE)}


def record(x: torch.Tensor) -> tuple:
    return fingerprint(x), old_signature(x), signature(x)


def compare(ref: list[tuple], alt: list[tuple]) -> list[tuple]:
    """Per view: (same fingerprint, old distance, new distance)."""
    return [(r[0] == a[0], float(old_signature_distance(r[1], a[1])), float(signature_distance(r[2], a[2])))
            for r, a in zip(ref, alt)]


def run_one(kind: str, size: int, args, root: pathlib.Path, pillow: dict | None, capture: list | None):
    files = photo_files(root, kind, args.smoke)
    images = [Image.open(f).convert("RGB") for f in files]
    recipe = Recipe(input_size=size)
    rp = Replayer(recipe)
    reference = build_transform(recipe)
    for s in range(8):  # the instrumented transform is the library's when no knob is set
        assert torch.equal(rp(images[s % len(images)], s)[0], augment(reference, images[s % len(images)], s))
    pairs = plan_pairs(len(images), recipe, args.pairs)
    if capture is not None:
        for P in pairs:
            rp(images[P["a"]], P["sa"], capture=capture)
            rp(images[P["b"]], P["sb"], capture=capture)
        return {"set": kind, "size": size, "photos": files_digest(files), "pairs": len(pairs)}
    pil_note = None
    if pillow is not None:
        meta = next((m for m in pillow["runs"] if m["set"] == kind and m["size"] == size), None)
        if meta is None or meta["pairs"] < len(pairs):
            pil_note, pillow = f"{pillow['dir']} has no capture of {len(pairs)} pairs of {kind} at {size} px", None
        elif meta["photos"] != files_digest(files):
            pil_note, pillow = f"{pillow['dir']} was captured from other photo files (give the same --photos-dir)", None
        else:
            pre = np.load(pathlib.Path(pillow["dir"]) / meta["file"], mmap_mode="r")
    rng = np.random.default_rng(1)
    per_view = {c[0]: [] for c in CASES}
    per_pair = {c[0]: [] for c in CASES}
    covar = {"wrong mixup partner": [], "wrong cutmix partner": [], "crop shifted 4 px": [],
             "crop shifted 16 px": []}  # per view: the wrong image's weight / area share / the shift in output px
    skipped = {"crop shifted 4 px": 0, "crop shifted 16 px": 0}
    t0 = time.perf_counter()
    for n, P in enumerate(pairs):
        a, b, sa, sb = P["a"], P["b"], P["sa"], P["sb"]
        w, q = rng.choice([i for i in range(len(images)) if i not in (a, b)], 2, replace=False)
        xa, xb = rp(images[a], sa)[0], rp(images[b], sb)[0]
        mix = lambda x, y: mix_pair(x, y, P["lam"], P["mode"], P["box"])  # noqa: E731
        ref_a, ref_pair = [record(xa)], [record(v) for v in mix(xa, xb)]
        # wrong partners: q replaces b, mixed with the pair's own mixup lambda / cutmix box
        xq = rp(images[q], sb)[0]
        for case, lam, mode, box in (("wrong mixup partner", P["lam_mix"], MODE_MIXUP, None),
                                     ("wrong cutmix partner", P["lam_cut"], MODE_CUTMIX, P["box_cut"])):
            c = compare([record(v) for v in mix_pair(xa, xb, lam, mode, box)],
                        [record(v) for v in mix_pair(xa, xq, lam, mode, box)])
            per_view[case] += [[v] for v in c]
            per_pair[case].append(c)
            share = 1 - lam if mode == MODE_MIXUP else (box[1] - box[0]) * (box[3] - box[2]) / size**2
            covar[case] += [share, 1 - share]  # view 2k holds the wrong image with this weight/area, 2k+1 the rest
        # one image's replay is wrong (image a): per view its unmixed view, per pair the mixed pair
        for case, img, knobs in (("crop shifted 4 px", a, {"shift": 4}), ("crop shifted 16 px", a, {"shift": 16}),
                                 ("wrong flip", a, {"flip": True}), ("wrong image", w, {}),
                                 ("RandAugment magnitude 9 -> 8", a, {"ra_delta": -1.0})):
            x, skip = rp(images[img], sa, **knobs)
            if skip:
                skipped[case] += 1
                continue
            if case in covar:
                covar[case].append(rp.out_shift)
            per_view[case].append(compare(ref_a, [record(x)]))
            per_pair[case].append(compare(ref_pair, [record(v) for v in mix(x, xb)]))
        # harmless drift of the whole environment: both images
        drifts = [("resize drift +-1 on 10%", {"drift": "pm1"}, {"drift": "pm1"}),
                  ("resize drift: torch bicubic", {"drift": "torch"}, {"drift": "torch"})]
        if pillow is not None:
            drifts.append(("Pillow 10.4 vs 13", {"substitute": pre[2 * n]}, {"substitute": pre[2 * n + 1]}))
        for case, ka, kb in drifts:
            ya, yb = rp(images[a], sa, **ka)[0], rp(images[b], sb, **kb)[0]
            per_view[case].append(compare(ref_a, [record(ya)]))
            per_pair[case].append(compare(ref_pair, [record(v) for v in mix(ya, yb)]))
        if args.progress and n % 100 == 99:
            print(f"  {kind}@{size}: {n + 1}/{len(pairs)} pairs, {time.perf_counter() - t0:.0f} s", flush=True)
    if pillow is None:
        per_view["Pillow 10.4 vs 13"] = per_pair["Pillow 10.4 vs 13"] = None
    return {"set": kind, "size": size, "images": len(images), "pairs": len(pairs), "per_view": per_view,
            "per_pair": per_pair, "covar": covar, "skipped": skipped, "pillow_note": pil_note,
            "seconds": time.perf_counter() - t0}


def rates(units: list[list[tuple]], tol_old: float, tol_new: float, kind: str) -> dict:
    """units: per view or pair, its views' (same fingerprint, old distance, new distance). A unit is accepted when
    every view is. Counted: units whose pixels changed; the rate is the wrong decision's (accepted for FA, rejected
    for FR)."""
    changed = [u for u in units if not all(v[0] for v in u)]
    out = {"units": len(units), "changed": len(changed)}
    for name, i, tol in (("old", 1, tol_old), ("new", 2, tol_new)):
        acc = np.array([all(accepts(v[0], True, v[i], tol) for v in u) for u in changed], bool)
        out[name] = float((acc if kind == "FA" else ~acc).mean()) if len(changed) else float("nan")
    return out


def distances(units: list[list[tuple]]) -> dict:
    """Quantiles of the largest distance of the changed views of each unit, for choosing a tolerance."""
    out = {}
    for name, i in (("old", 1), ("new", 2)):
        d = np.array([max(v[i] for v in u if not v[0]) for u in units if not all(v[0] for v in u)])
        if len(d):
            out[name] = {q: float(np.quantile(d, p)) for q, p in (("min", 0), ("p01", .01), ("p05", .05),
                                                                  ("p50", .5), ("p95", .95), ("p99", .99),
                                                                  ("max", 1))}
    return out


BINS = {"wrong mixup partner": ("weight of the wrong image in the view", [0, .01, .02, .05, .1, .5, 1.01]),
        "wrong cutmix partner": ("area share of the wrong image in the view", [0, .005, .01, .02, .05, .5, 1.01]),
        "crop shifted 4 px": ("shift in output px", [0, 1, 2, 3, 4, 6, 99]),
        "crop shifted 16 px": ("shift in output px", [0, 4, 8, 12, 16, 99])}


def breakdown(units: list[list[tuple]], covar: list[float], edges, tol_old: float, tol_new: float) -> list[dict]:
    """False-accept rate per view by a covariate bin (only views whose pixels changed)."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = [u[0] for u, c in zip(units, covar) if lo <= c < hi and not u[0][0]]
        if sel:
            out.append({"bin": f"{lo:g}-{hi:g}", "views": len(sel),
                        "old %": 100 * float(np.mean([accepts(v[0], True, v[1], tol_old) for v in sel])),
                        "new %": 100 * float(np.mean([accepts(v[0], True, v[2], tol_new) for v in sel]))})
    return out


def timing(xs: list[torch.Tensor], repeats: int = 3) -> dict:
    """ms per view, one thread, best of `repeats` passes over the views (the machine is shared)."""
    out = {}
    for name, fn in (("fingerprint", fingerprint), ("old signature (48 B)", old_signature),
                     ("new signature (64 B)", signature)):
        fn(xs[0])  # warm-up (the sketch's per-shape plan is built once)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for x in xs:
                fn(x)
            best = min(best, (time.perf_counter() - t) / len(xs))
        out[name] = 1000 * best
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--pairs", type=int, default=1000, help="mixing pairs per run (default 1000)")
    ap.add_argument("--runs", default="photos320@224,camera640@224,photos320@64",
                    help="photo set @ input size, comma separated (sets: photos320, camera640)")
    ap.add_argument("--photos-dir", default=None,
                    help="where the photo sets are written once and reused (needed to compare with --capture)")
    ap.add_argument("--capture", default=None, metavar="DIR",
                    help="only write the views' pre-tensor images under this Pillow to DIR (run it under 10.4)")
    ap.add_argument("--pillow-views", default=None, metavar="DIR", help="a --capture DIR made under Pillow 10.4")
    ap.add_argument("--tolerance", type=float, default=SKETCH_TOLERANCE, help="the new signature's tolerance")
    ap.add_argument("--old-tolerance", type=float, default=0.05, help="the 48-byte signature's (default 0.05)")
    ap.add_argument("--progress", action="store_true", help="print progress every 100 pairs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import PIL

    if args.smoke:
        args.pairs, args.runs = min(args.pairs, 6), "photos320@64"
    runs = [(r.split("@")[0], int(r.split("@")[1])) for r in args.runs.split(",")]
    root = pathlib.Path(args.photos_dir or tempfile.mkdtemp(prefix="drift-photos-"))

    if args.capture:
        out = pathlib.Path(args.capture)
        out.mkdir(parents=True, exist_ok=True)
        metas = []
        for kind, size in runs:
            meta = run_one(kind, size, args, root, None, cap := [])
            meta["file"] = f"pre-{kind}@{size}.npy"  # uint8 [2 * pairs, size, size, 3]: images a, b of each pair
            np.save(out / meta["file"], np.stack(cap))
            metas.append(meta)
        (out / "meta.json").write_text(json.dumps({"pillow": PIL.__version__, "runs": metas}, indent=1))
        print(f"captured the pre-tensor images of {len(metas)} runs under Pillow {PIL.__version__} -> {out}")
        return

    pillow, pillow_note = None, None
    if args.pillow_views:
        d = pathlib.Path(args.pillow_views)
        if (d / "meta.json").exists():
            pillow = {**json.loads((d / "meta.json").read_text()), "dir": str(d)}
            if pillow["pillow"] == PIL.__version__:
                pillow_note, pillow = f"{d} was captured under this very Pillow ({PIL.__version__})", None
        else:
            pillow_note = f"{d} has no meta.json (make it with --capture under Pillow 10.4)"
    else:
        pillow_note = "no --pillow-views DIR (make one with --capture under Pillow 10.4; see the module docstring)"

    rows, extra = [], {"runs": []}
    for kind, size in runs:
        res = run_one(kind, size, args, root, pillow, None)
        note = res["pillow_note"] or (pillow_note if pillow is None else None)
        run = f"{kind}@{size}"
        info = {"run": run, "images": res["images"], "pairs": res["pairs"], "seconds": res["seconds"],
                "shift_skipped": res["skipped"], "cases": {}}
        for case, kind_, what in CASES:
            if res["per_view"][case] is None:
                print(f"{run}: '{case}' skipped: {note}")
                continue
            v = rates(res["per_view"][case], args.old_tolerance, args.tolerance, kind_)
            p = rates(res["per_pair"][case], args.old_tolerance, args.tolerance, kind_)
            rows.append({"run": run, "case": case, "error": "false accept" if kind_ == "FA" else "false reject",
                         "views changed": f"{v['changed']}/{v['units']}",
                         "old, per view %": 100 * v["old"], "new, per view %": 100 * v["new"],
                         "pairs changed": f"{p['changed']}/{p['units']}",
                         "old, per pair %": 100 * p["old"], "new, per pair %": 100 * p["new"]})
            sweep = {}
            for t in (0.0125, 0.0175, 0.025, 0.035, 0.05):
                sv = rates(res["per_view"][case], args.old_tolerance, t, kind_)
                sp = rates(res["per_pair"][case], args.old_tolerance, t, kind_)
                sweep[str(t)] = {"per_view": sv["new"], "per_pair": sp["new"]}
            if case in BINS:
                label, edges = BINS[case]
                info.setdefault("breakdown", {})[case] = {"by": label, "bins": breakdown(
                    res["per_view"][case], res["covar"][case], edges, args.old_tolerance, args.tolerance)}
            info["cases"][case] = {"what": what, "per_view_distance": distances(res["per_view"][case]),
                                   "per_pair_distance": distances(res["per_pair"][case]),
                                   "new_tolerance_sweep": sweep}
        extra["runs"].append(info)
        print(f"{run}: {res['pairs']} pairs in {res['seconds']:.0f} s", flush=True)
    cols = ["run", "case", "error", "views changed", "old, per view %", "new, per view %", "pairs changed",
            "old, per pair %", "new, per pair %"]
    print(f"\nwrong decisions, old: 48 B cell means at tolerance {args.old_tolerance}; new: 64 B block-mean sketch "
          f"at tolerance {args.tolerance}")
    print(table(rows, cols))
    print("\nfalse accepts per view, % (views), by how much of the view is wrong (new signature; old in "
          "the JSON):")
    brows = [{"run": r["run"], "case": case, "by": b["by"], **{x["bin"]: f"{x['new %']:.1f} ({x['views']})"
                                                             for x in b["bins"]}}
             for r in extra["runs"] for case, b in r.get("breakdown", {}).items()]
    for case, (_, edges) in BINS.items():
        sub = [b for b in brows if b["case"] == case]
        bins = [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]
        bins = [k for k in bins if any(k in b for b in sub)]
        if sub:
            print()
            print(table(sub, ["run", "case", "by", *bins]))

    # cost per view, one thread: real augmented views at each run's size
    costs = []
    for size in sorted({s for _, s in runs}, reverse=True):
        rp = Replayer(Recipe(input_size=size))
        imgs = [Image.open(f).convert("RGB") for f in photo_files(root, runs[0][0], args.smoke)[:50]]
        xs = [rp(imgs[i % len(imgs)], i)[0] for i in range(20 if args.smoke else 200)]
        costs += [{"input size": size, "function": k, "ms/view": v}
                  for k, v in timing(xs, 1 if args.smoke else 3).items()]
    print()
    print(table(costs, ["input size", "function", "ms/view"]))
    path = save("drift", args, rows, {"pairs": args.pairs, "runs": args.runs, "photo_sets": PHOTO_SETS,
                                      "tolerance_old": args.old_tolerance, "tolerance_new": args.tolerance,
                                      "pillow_views": pillow and {"dir": pillow["dir"], "pillow": pillow["pillow"]},
                                      "recipe": "Recipe() defaults (DeiT), plan repeats 1"},
                None, cost=costs, **extra)
    print(f"\n{path}")


if __name__ == "__main__":
    main()
