"""Training images per second from the cache vs an online teacher vs no distillation, side by side in one run.

The real pipeline (`cskd-cache train` as a library call) on crops of real photos at 224 px: DeiT's recipe
replayed by DataLoader workers, teacher outputs read from a ckf cache in the workers (`cache`), a RegNetY-160 run
on every batch (`online`: its forward and the exact `full` fusion, nothing else), or nothing (`none`, plain
DeiT). Same views, same steps; the modes are interleaved and repeated, and each figure is the median over repeats
of a steady-state epoch (the first epoch of every run warms up and is not counted). RegNetY-160 is
random-initialised (the architecture is what costs; no download here). A second part replaces the student by
a probe (one block, 16 wide, 32-px patches: a 7x7 grid, the teacher's) and its step is measured against the data
path's cost per view (the wall time per view without distillation): the part is data-bound when the step is at
most a tenth of it, and there the cache must cost what no distillation costs. Its teacher has the photos' own
classes (14), as a teacher fine-tuned on them would: on a CPU, 1000-class logits at every patch position (50 MB for
a batch of 64) alone cost a student step about 12 ms per view, more than the data path, while replay, reading and
checks do not depend on the class count. That part runs its modes in a new random order in every repeat (>= 5) and
takes the ratio repeat by repeat (median, min, max).

    python -m benchmarks.train_throughput                 # regnety_160 -> deit_s, about 10 minutes on 2 cores
    python -m benchmarks.train_throughput --student deit_ti --batch 16 --steps 4
    python -m benchmarks.train_throughput --skip-main       # only the data-bound part, about 5 minutes
"""

from __future__ import annotations

import pathlib
import random
import statistics
import tempfile
import time

import torch

from benchmarks.common import parser, random_checkpoint, real_photos, save, setup, table
from cskd_cache.data.open import open_source
from cskd_cache.data.recipe import Recipe
from cskd_cache.teacher.precompute import PrecomputeConfig, precompute
from cskd_cache.training.student import create_student
from cskd_cache.training.train import TrainConfig, train

MODES = ("cache", "online", "none")


def run(mode: str, args, data, cache, ckpt, student: str, out: str, batch: int) -> float:
    cfg = TrainConfig(student=student, data=str(data), out=out, cache=cache, teacher_source=mode,
                      teacher_checkpoint=ckpt if mode == "online" else None, epochs=2, batch_size=batch,
                      max_steps=args.steps, warmup_epochs=0, workers=args.workers, ema_decay=0.0,
                      device=args.device, input_size=None)
    history = train(cfg)
    return history[-1]["img_per_s"]  # epoch 1: steady state (epoch 0 starts workers, warms caches)


def measure(args, data, cache, ckpt, student, tmp, batch, modes=MODES, repeats=None, shuffle=False) -> dict:
    seen = {m: [] for m in modes}
    rng = random.Random(0)
    for r in range(repeats or args.repeats):
        order = list(modes)
        if shuffle:  # a busy machine then slows every mode alike
            rng.shuffle(order)
        for m in order:
            seen[m].append(run(m, args, data, cache, ckpt, student, f"{tmp}/{student}-{m}-{r}", batch))
    return {m: statistics.median(v) for m, v in seen.items()} | {f"{m} runs": v for m, v in seen.items()}


def student_ms_per_view(student: str, size: int, batch: int, device, classes: int) -> float:
    """The student's whole training step (forward, three losses' worth of heads, backward, AdamW) per view, median of
    5 after a warm-up, on the training device."""
    model = create_student(student, classes, size, (size // 32, size // 32)).to(device)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(batch, 3, size, size, device=device)
    times = []
    for i in range(6):
        t = time.perf_counter()
        out = model(x)
        sum(o.float().mean() for o in out.values()).backward()  # every head the losses use
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(1000 * (time.perf_counter() - t) / batch)
    return statistics.median(times)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--teacher", default="regnety_160")
    ap.add_argument("--student", default="deit_s")
    ap.add_argument("--tiny-student", default="deit_probe")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tiny-batch", type=int, default=64, help="the tiny student's batch (a realistic per-GPU one)")
    ap.add_argument("--steps", type=int, default=4, help="steps per epoch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny-repeats", type=int, default=5, help="repeats of the data-bound part (randomised order)")
    ap.add_argument("--skip-main", action="store_true", help="only the data-bound part")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    device = setup(args)
    if args.smoke:
        args.teacher, args.student, args.tiny_student = "test_resnet", "deit_tiny_distilled_patch16_224", "deit_probe"
        args.batch, args.tiny_batch, args.steps, args.repeats, args.workers = 4, 4, 1, 1, 0
        args.tiny_repeats = 1
    size = 64 if args.smoke else 224
    tmp = tempfile.mkdtemp()
    # enough photos for `steps` steps of either part (14 photos, each cropped `per_photo` times)
    per_photo = 2 if args.smoke else max(1, -(-args.tiny_batch * args.steps // 14), -(-args.batch * args.steps // 14))
    data = real_photos(f"{tmp}/photos", per_photo=per_photo, size=size + 32)
    ckpt = f"{tmp}/teacher.safetensors"
    random_checkpoint(args.teacher, ckpt, num_classes=1000)
    chunk = min(64, args.tiny_batch)  # the default chunk, dividing the per-GPU batch (reads are whole chunks)
    cache = precompute(PrecomputeConfig(data=str(data), out=f"{tmp}/cache.zarr", teacher=args.teacher,
                                        teacher_checkpoint=ckpt, recipe=Recipe(input_size=size), epochs=2, repeats=1,
                                        batch_size=2 * args.batch, workers=args.workers, chunk_views=chunk,
                                        shard_views=chunk * 4, device=args.device,
                                        same_label_space=True)).url  # photos, an ImageNet teacher
    rows = []
    if not args.skip_main:
        r = measure(args, data, cache, ckpt, args.student, tmp, args.batch)
        rows.append({"student": args.student, "batch": args.batch, **{f"{m} img/s": r[m] for m in MODES},
                     "cache / none": r["cache"] / r["none"], "cache / online": r["cache"] / r["online"],
                     "runs": {m: r[f"{m} runs"] for m in MODES}})
    tiny_ckpt = f"{tmp}/tiny-teacher.safetensors"
    classes = len(open_source(str(data)).classes)
    random_checkpoint("test_resnet", tiny_ckpt, num_classes=classes)  # stride 32, as RegNetY's grid
    tiny_cache = precompute(PrecomputeConfig(data=str(data), out=f"{tmp}/tiny.zarr", teacher="test_resnet",
                                             teacher_checkpoint=tiny_ckpt, recipe=Recipe(input_size=size), epochs=2,
                                             repeats=1, batch_size=2 * args.batch, workers=args.workers,
                                             chunk_views=chunk, shard_views=chunk * 4, device=args.device,
                                             )).url
    r = measure(args, data, tiny_cache, tiny_ckpt, args.tiny_student, tmp, args.tiny_batch, ("cache", "none"),
                repeats=args.tiny_repeats, shuffle=True)
    ratios = [c / n for c, n in zip(r["cache runs"], r["none runs"])]
    step = student_ms_per_view(args.tiny_student, size, args.tiny_batch, device, classes)
    data_ms = 1000 / r["none"]  # wall time per view of the whole data-bound pipeline, no distillation
    rows.append({"student": args.tiny_student, "batch": args.tiny_batch, "cache img/s": r["cache"],
                 "none img/s": r["none"], "cache / none": statistics.median(ratios),
                 "cache / none min": min(ratios), "cache / none max": max(ratios),
                 "student step ms/view": step, "data path ms/view": data_ms, "student share": step / data_ms,
                 "runs": {m: r[f"{m} runs"] for m in ("cache", "none")}})
    print(table(rows, ["student", "batch", "cache img/s", "online img/s", "none img/s", "cache / online",
                       "cache / none"]))
    tiny = rows[-1]
    print(f"\ndata-bound part: cache / none {tiny['cache / none']:.3f} (min {tiny['cache / none min']:.3f}, max "
          f"{tiny['cache / none max']:.3f}, {len(ratios)} randomised repeats); student step "
          f"{step:.2f} ms/view = {100 * step / data_ms:.1f}% of the data path's {data_ms:.2f} ms/view "
          f"({'data-bound' if step <= 0.1 * data_ms else 'NOT data-bound: the student is too costly'})")
    if args.skip_main:  # keep the main part's rows of the last full run, marked with when they were measured
        rows = _earlier_main_rows(args) + rows
    path = save("train_throughput", args, rows, {"teacher": f"{args.teacher} (random init)", "input_size": size,
                                                  "batch": args.batch, "steps per epoch": args.steps,
                                                  "repeats": args.repeats, "tiny_repeats": args.tiny_repeats,
                                                  "tiny_teacher": "test_resnet, the photos' classes",
                                                  "workers": args.workers,
                                                  "encoding": "ckf", "threads": torch.get_num_threads()}, device)
    print(f"\n{path}")


def _earlier_main_rows(args) -> list[dict]:
    import json
    from benchmarks.common import RESULTS

    path = pathlib.Path(args.out) if args.out else \
        RESULTS / ("train_throughput-smoke.json" if args.smoke else "train_throughput.json")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [dict(r, measured=r.get("measured", doc.get("when")), machine=r.get("machine", doc.get("machine")))
            for r in doc.get("rows", []) if r.get("student") != args.tiny_student]


if __name__ == "__main__":
    main()
