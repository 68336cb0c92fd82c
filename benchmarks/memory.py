"""Peak memory of precompute and of train against the number of views and epochs: it must stay flat.

Each run is a fresh process (`python -m cskd_cache ...`, no DataLoader workers, so the peak is the process's
own), at 1x and at 8x the views (precompute) or 1x and 4x the epochs (train).

    python -m benchmarks.memory
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

from benchmarks.common import parser, random_checkpoint, real_photos, save, table

PEAK = "import resource, runpy, sys; sys.argv = sys.argv[1:]; "\
       "exec('try:\\n runpy.run_module(\"cskd_cache\", run_name=\"__main__\")\\nexcept SystemExit: pass'); " \
       "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def peak_mib(args: list[str]) -> float:
    r = subprocess.run([sys.executable, "-c", PEAK, "cskd_cache", *map(str, args)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    line = [x for x in r.stdout.splitlines() if x.startswith("PEAK")]
    if not line:
        raise SystemExit(r.stderr[-2000:])
    return int(line[-1].split()[1]) / 1024


def main() -> None:
    ap = parser(__doc__)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    small = args.smoke
    data = real_photos(f"{tmp}/photos", per_photo=2 if small else 8, size=96)
    ckpt = f"{tmp}/t.safetensors"
    random_checkpoint("test_resnet", ckpt, num_classes=1000)
    base = ["precompute", "--data", data, "--teacher", "test_resnet", "--teacher-checkpoint", ckpt,
            "--input-size", "64", "--repeats", "1", "--batch-size", "16", "--chunk-views", "16", "--shard-views", "64",
            "--workers", "0"]
    rows = []
    sizes = (1, 2) if small else (1, 8)
    for e in sizes:
        out = f"{tmp}/c{e}.zarr"
        rows.append({"run": "precompute", "epochs": e, "views": e * 14 * (2 if small else 8) // 2 * 2,
                     "peak MiB": peak_mib([*base, "--out", out, "--epochs", e])})
    cache = f"{tmp}/c{sizes[-1]}.zarr"
    for e in ((1,) if small else (1, 4)):  # --smoke: train at one size (its growth is checked by the full run)
        rows.append({"run": "train", "epochs": e, "views": "cycled",
                     "peak MiB": peak_mib(["train", "--student", "deit_demo", "--data", data, "--cache", cache,
                                           "--out", f"{tmp}/r{e}", "--epochs", e, "--batch-size", "16",
                                           "--workers", "0", "--warmup-epochs", "0"])})
    for run in ("precompute", "train"):
        r = [x for x in rows if x["run"] == run]
        r[-1]["growth"] = r[-1]["peak MiB"] / r[0]["peak MiB"]
    print(table(rows, ["run", "epochs", "views", "peak MiB", "growth"]))
    path = save("memory", args, rows, {"teacher": "test_resnet, 1000 classes", "student": "deit_demo",
                                        "input_size": 64, "workers": 0, "threads": torch.get_num_threads()})
    print(f"\n{path}")


if __name__ == "__main__":
    main()
