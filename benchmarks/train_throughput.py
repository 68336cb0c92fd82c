"""Training images per second from the cache vs an online teacher vs no distillation, side by side in one run.

The real pipeline (`cskd-cache train` as a library call) on crops of real photos at 224 px: DeiT's recipe
replayed by DataLoader workers, teacher outputs read from a ckf cache in the workers (`cache`), a RegNetY-160 run
on every batch (`online`: its forward and the exact `full` fusion, nothing else), or nothing (`none`, plain
DeiT). Same views, same steps; the modes are interleaved and repeated, and each figure is the median over repeats
of a steady-state epoch (the first epoch of every run warms up and is not counted). RegNetY-160 is
random-initialised (the architecture is what costs; no download here). A second part replaces the student by
a tiny one, so that the data path is the bottleneck: there the cache must cost what no distillation costs.

    python -m benchmarks.train_throughput                 # regnety_160 -> deit_s, about 10 minutes on 2 cores
    python -m benchmarks.train_throughput --student deit_ti --batch 16 --steps 4
"""

from __future__ import annotations

import statistics
import tempfile

import torch

from benchmarks.common import parser, random_checkpoint, real_photos, save, setup, table
from cskd_cache.teacher.precompute import PrecomputeConfig, precompute
from cskd_cache.training.train import TrainConfig, train
from cskd_cache.data.recipe import Recipe

MODES = ("cache", "online", "none")


def run(mode: str, args, data, cache, ckpt, student: str, out: str, batch: int) -> float:
    cfg = TrainConfig(student=student, data=str(data), out=out, cache=cache, teacher_source=mode,
                      teacher_checkpoint=ckpt if mode == "online" else None, epochs=2, batch_size=batch,
                      max_steps=args.steps, warmup_epochs=0, workers=args.workers, ema_decay=0.0,
                      device=args.device, input_size=None)
    history = train(cfg)
    return history[-1]["img_per_s"]  # epoch 1: steady state (epoch 0 starts workers, warms caches)


def measure(args, data, cache, ckpt, student, tmp, batch, modes=MODES) -> dict:
    seen = {m: [] for m in modes}
    for r in range(args.repeats):
        for m in modes:
            seen[m].append(run(m, args, data, cache, ckpt, student, f"{tmp}/{student}-{m}-{r}", batch))
    return {m: statistics.median(v) for m, v in seen.items()} | {f"{m} runs": v for m, v in seen.items()}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--teacher", default="regnety_160")
    ap.add_argument("--student", default="deit_s")
    ap.add_argument("--tiny-student", default="deit_demo")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tiny-batch", type=int, default=64, help="the tiny student's batch (a realistic per-GPU one)")
    ap.add_argument("--steps", type=int, default=4, help="steps per epoch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    device = setup(args)
    if args.smoke:
        args.teacher, args.student, args.tiny_student = "test_resnet", "deit_tiny_distilled_patch16_224", "deit_demo"
        args.batch, args.tiny_batch, args.steps, args.repeats, args.workers = 4, 4, 1, 1, 0
    size = 64 if args.smoke else 224
    tmp = tempfile.mkdtemp()
    per_photo = 2 if args.smoke else max(1, -(-2 * args.tiny_batch // 14), -(-args.batch * args.steps // 14))
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
    for student, modes, batch in ((args.student, MODES, args.batch), (args.tiny_student, ("cache", "none"),
                                                                       args.tiny_batch)):
        r = measure(args, data, cache, ckpt, student, tmp, batch, modes)
        row = {"student": student, "batch": batch, **{f"{m} img/s": r[m] for m in modes},
               "cache / none": r["cache"] / r["none"]}
        if "online" in modes:
            row["cache / online"] = r["cache"] / r["online"]
        row["runs"] = {m: r[f"{m} runs"] for m in modes}
        rows.append(row)
    print(table(rows, ["student", "batch", "cache img/s", "online img/s", "none img/s", "cache / online",
                       "cache / none"]))
    path = save("train_throughput", args, rows, {"teacher": f"{args.teacher} (random init)", "input_size": size,
                                                  "batch": args.batch, "steps per epoch": args.steps,
                                                  "repeats": args.repeats, "workers": args.workers,
                                                  "encoding": "ckf", "threads": torch.get_num_threads()}, device)
    print(f"\n{path}")


if __name__ == "__main__":
    main()
