"""Start-up and memory at ImageNet's size: 1,281,167 samples, 1000 classes, 128 WebDataset shards of tiny JPEGs.

What grows with samples x epochs (plans, indexes, markers) is invisible at the other benchmarks' few hundred views,
so this one builds ImageNet's sample count (the images are 16x16 JPEGs: pixels do not change start-up) and runs
the commands a user runs, as fresh processes:

- `precompute --epochs E` for E = 1, 60, 300 (a tiny 1000-class teacher, 64 px views, default workers): the time
  until its first shard is written (the first run also indexes the 128 shards; later runs reuse the saved index)
  and the peak memory of its whole process tree (main process + workers, PSS, sampled every 0.2 s) up to then;
  then it is stopped (a cache is resumable; this one is thrown away);
- `train --teacher-source online --epochs 300 --max-steps 1` (DeiT-Ti at 64 px): time until its first epoch (cut
  to one step) is logged, an upper bound of the time to the first step, and its tree's peak memory.

- with `--cache-arm`: `train --teacher-source cache --epochs 300 --max-steps 1` from a finished one-epoch cache of
  all 1.28M samples, the product's main path. The cache is made first (its wall time reported) as cheaply as an
  honest finished cache can be on a CPU: 16-px views without RandAugment, erasing or mixing, the tiny 1000-class
  teacher, the `full` encoding (start-up reads keys, plans and shard markers; it does not depend on the recipe or
  the encoding, which are labelled in the JSON). About 45 more minutes on 2 cores (the cache: 40.6 min);
  `--only-cache-arm` skips the other arms.

    python -m benchmarks.imagenet_scale            # about 15 minutes on 2 cores (making the shards: ~3 of them)
    python -m benchmarks.imagenet_scale --smoke    # 12,800 samples in 8 shards
    python -m benchmarks.imagenet_scale --only-cache-arm --out benchmarks/results/imagenet_scale_cache_arm.json
"""

from __future__ import annotations

import io
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks.common import parser, random_checkpoint, save, table

IMAGENET_SAMPLES = 1_281_167
CLASSES = 1000


def make_shards(root: pathlib.Path, samples: int, shards: int) -> str:
    """`samples` tiny JPEGs (a pool of 512 distinct ones, keys unique) with labels 0..999, in `shards` tars."""
    rng = np.random.default_rng(0)
    pool = []
    for _ in range(512):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        pool.append(buf.getvalue())
    root.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, samples, shards + 1).astype(int)

    def member(name: str, data: bytes) -> bytes:  # what webdataset's TarWriter writes, 10x faster for 2.6M members
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)

    for s in range(shards):
        with open(root / f"train-{s:06d}.tar", "wb") as f:
            for i in range(bounds[s], bounds[s + 1]):
                key = f"n{i % CLASSES:08d}_{i:07d}"
                f.write(member(f"{key}.jpg", pool[i % 512]) + member(f"{key}.cls", str(i % CLASSES).encode()))
            f.write(b"\0" * 1024)  # the end-of-archive marker
    return str(root / f"train-{{000000..{shards - 1:06d}}}.tar")


def tree_pss_mib(pid: int) -> float:
    """Proportional set size of a process and all its descendants (from /proc), MiB: workers share the parent's
    pages (torch alone is ~400 MB resident in each), so summing RSS would count those once per process."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))  # kB
        except (OSError, StopIteration, ValueError):
            pass
        todo += children.get(p, [])
    return total / 1024


def watch(cmd: list[str], done, limit: float) -> dict:
    """Runs `cmd` until `done()` is true or it exits; the seconds it took and the tree's peak memory."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="2"), start_new_session=True)
    peak, reached = 0.0, False
    while True:
        peak = max(peak, tree_pss_mib(proc.pid))
        if done():
            reached = True
            break
        if proc.poll() is not None:
            reached = proc.returncode == 0
            break
        if time.perf_counter() - t0 > limit:
            break
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    if not reached:
        raise SystemExit(f"{' '.join(cmd[:4])} ... did not get there in {limit:.0f} s:\n{out[-3000:]}")
    return {"seconds": seconds, "peak_pss_mib": peak}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--cache-arm", action="store_true", help="also time train from a finished 1.28M-sample cache "
                                                                "(makes it first: 25-40 min on 2 cores)")
    ap.add_argument("--only-cache-arm", action="store_true", help="with --cache-arm: skip the other arms")
    args = ap.parse_args()
    args.cache_arm = args.cache_arm or args.only_cache_arm
    tmp = pathlib.Path(tempfile.mkdtemp())
    os.environ["CSKD_CACHE_INDEX_DIR"] = str(tmp / "tar-index")  # a cold index for the first run, then reused
    samples, shards = (12_800, 8) if args.smoke else (IMAGENET_SAMPLES, 128)
    t = time.perf_counter()
    spec = make_shards(tmp / "shards", samples, shards)
    made = time.perf_counter() - t
    print(f"{samples} samples in {shards} shards written in {made:.0f} s", flush=True)
    ckpt = tmp / "teacher.safetensors"
    teacher = random_checkpoint("test_resnet", ckpt, num_classes=CLASSES)
    cli = [sys.executable, "-m", "cskd_cache"]
    rows, extra = [], {}
    for epochs in () if args.only_cache_arm else (1, 3) if args.smoke else (1, 60, 300):
        out = tmp / f"cache-{epochs}.zarr"
        first_marker = out / "views" / "shard_done" / "c" / "0"
        cmd = [*cli, "precompute", "--data", spec, "--out", str(out), "--teacher", teacher, "--teacher-checkpoint",
               str(ckpt), "--epochs", str(epochs), "--input-size", "64", "--batch-size", "256"]
        r = watch(cmd, first_marker.exists, limit=1800)
        rows.append({"command": f"precompute --epochs {epochs}", "until": "first shard written",
                     "index": f"cold (scan {shards} tars)" if not rows else "saved", **r})
        print(table(rows[-1:], ["command", "until", "index", "seconds", "peak_pss_mib"]), flush=True)
    if not args.only_cache_arm:
        cmd = [*cli, "train", "--data", spec, "--out", str(tmp / "run"), "--student", "deit_ti", "--teacher-source",
               "online", "--teacher", teacher, "--teacher-checkpoint", str(ckpt), "--input-size", "64", "--epochs",
               "300", "--batch-size", "64", "--max-steps", "1"]
        r = watch(cmd, (tmp / "run" / "metrics.jsonl").exists, limit=1800)
        rows.append({"command": "train --teacher-source online --epochs 300 --max-steps 1",
                     "until": "first step logged", "index": "saved", **r})
        pre = [r["peak_pss_mib"] for r in rows if r["command"].startswith("precompute")]
        extra = dict(precompute_peak_growth=max(pre) / min(pre), precompute_peak_pss_mib=max(pre),
                     first_shard_seconds_cold=rows[0]["seconds"], train_first_step_seconds=rows[-1]["seconds"])
    if args.cache_arm:
        extra |= cache_arm(cli, spec, tmp, rows)
    print(table(rows, ["command", "until", "index", "seconds", "peak_pss_mib"]))
    path = save("imagenet_scale", args, rows, {"samples": samples, "shards": shards, "classes": CLASSES,
                                               "image": "16x16 JPEG q90", "input_size": 64, "teacher": teacher,
                                               "shards_written_seconds": made}, **extra)
    print(f"\n{path}")


def cache_arm(cli: list[str], spec: str, tmp: pathlib.Path, rows: list[dict]) -> dict:
    """A finished one-epoch cache of every sample, then `train --teacher-source cache` until its first step."""
    ckpt = tmp / "teacher.safetensors"
    teacher = random_checkpoint("test_resnet", ckpt, num_classes=CLASSES)  # the labels are ImageNet's
    out = tmp / "cache-full.zarr"
    recipe = ["--input-size", "16", "--aa", "none", "--re-prob", "0", "--mixup", "0", "--cutmix", "0"]
    t = time.perf_counter()
    r = subprocess.run([*cli, "precompute", "--data", spec, "--out", str(out), "--teacher", teacher,
                        "--teacher-checkpoint", str(ckpt), "--epochs", "1", "--batch-size", "1024", "--encoding", "full",
                        *recipe],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if r.returncode:
        raise SystemExit(f"precompute for the cache arm failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    made = time.perf_counter() - t
    print(f"cache of one epoch of every sample made in {made:.0f} s", flush=True)
    cmd = [*cli, "train", "--data", spec, "--cache", str(out), "--out", str(tmp / "run-cache"), "--student",
           "deit_ti", "--teacher-source", "cache", "--input-size", "16", "--epochs", "300", "--batch-size", "64",
           "--max-steps", "1"]
    r = watch(cmd, (tmp / "run-cache" / "metrics.jsonl").exists, limit=1800)
    rows.append({"command": "train --teacher-source cache --epochs 300 --max-steps 1", "until": "first step logged",
                 "index": "saved", **r})
    return {"train_cache_first_step_seconds": r["seconds"], "train_cache_peak_pss_mib": r["peak_pss_mib"],
            "cache_arm": {"cache_made_seconds": made, "teacher": "test_resnet, 1000 classes (random init)",
                          "encoding": "full (1x1 grid at 16 px: no ckf analysis to pay for)",
                          "recipe": " ".join(recipe), "epochs": 1}}


if __name__ == "__main__":
    main()
