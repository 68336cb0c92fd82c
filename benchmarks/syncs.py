"""Host-device synchronisations per training step, in steady state.

Every way a step can wait for the device goes through a few tensor methods (`.item()`, `.tolist()`, `bool()`,
`float()`, `int()`, `.numpy()`, `.cpu()` of a device tensor); this counts the calls that cskd-cache's own step
code makes (the training step, the teacher targets, the loss, the student: the modules a step runs through)
inside the real `train_one_epoch` (cache mode, ckf targets, EMA, DeiT's loss), per step. Data loading (in the
workers, on CPU tensors) and the optimizer's CPU step counters are not device reads. On a CPU nothing
synchronises, so this counts the places that would on a GPU; on a GPU the run also sets
`torch.cuda.set_sync_debug_mode("warn")`. The one read every `check_every` steps (loss finiteness and the
progress bar) is by design and shown separately.

Also counted: precompute's ckf encode of one teacher batch (1000 classes, 7x7, 64 views), the plain call and the
sync-free one precompute makes (`deferred=True`: a bounded analysis whose check and spill rows are read when the
outputs reach the host anyway), with `nonzero` counted too.

    python -m benchmarks.syncs
"""

from __future__ import annotations

import collections
import sys
import tempfile

import torch

from benchmarks.common import parser, random_checkpoint, real_photos, save, setup, table
from cskd_cache.training import engine
from cskd_cache.distributed import Dist
from cskd_cache.teacher.precompute import PrecomputeConfig, precompute
from cskd_cache.training.train import TrainConfig, _one_epoch, setup as train_setup
from cskd_cache.data.recipe import Recipe
from cskd_cache.data.replay import PairDataset

METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")
STEP_MODULES = ("training/engine", "training/losses", "cache/encoding", "cache/ckf", "training/student",
                "training/train")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    device = setup(args)
    tmp = tempfile.mkdtemp()
    steps = 4 if args.smoke else args.steps
    data = real_photos(f"{tmp}/photos", per_photo=4, size=96)
    ckpt = f"{tmp}/t.safetensors"
    random_checkpoint("test_resnet", ckpt, num_classes=1000)
    cache = precompute(PrecomputeConfig(data=str(data), out=f"{tmp}/c.zarr", teacher="test_resnet",
                                        teacher_checkpoint=ckpt, recipe=Recipe(input_size=64), epochs=2,
                                        batch_size=8, workers=0, chunk_views=8, shard_views=32,
                                        same_label_space=True))  # a random teacher: labels do not matter here
    run = train_setup(TrainConfig(student="deit_tiny_distilled_patch16_224", data=str(data), out=f"{tmp}/run",
                                  cache=cache.url, epochs=2, batch_size=4, max_steps=steps, workers=0,
                                  ema_decay=0.99, device=args.device), Dist())
    counts, step_of = collections.Counter(), {"step": -1}
    real = {m: getattr(torch.Tensor, m) for m in METHODS}

    def counting(name):
        def f(self, *a, **kw):
            caller = sys._getframe(1).f_code.co_filename
            if any(caller.endswith(f"cskd_cache/{m}.py") for m in STEP_MODULES):
                counts[(step_of["step"], name)] += 1
            return real[name](self, *a, **kw)
        return f

    real_train = engine.train_one_epoch

    def instrumented(model, criterion, loader, *a, **kw):
        class Steps:  # the loader, telling us which step is running
            batch_sampler = loader.batch_sampler

            def __iter__(self):
                for i, b in enumerate(loader):
                    step_of["step"] = i
                    yield b

        kw["check_every"] = 5
        return real_train(model, criterion, Steps(), *a, **kw)

    for m in METHODS:
        setattr(torch.Tensor, m, counting(m))
    import cskd_cache.training.train as train_mod

    train_mod.train_one_epoch = instrumented
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
    try:
        _one_epoch(run, PairDataset(run.source, run.recipe, run.fingerprint_kind), 0)
    finally:
        for m in METHODS:
            setattr(torch.Tensor, m, real[m])
        train_mod.train_one_epoch = real_train
    rows = []
    for s in range(steps):
        calls = {k[1]: v for k, v in counts.items() if k[0] == s}
        rows.append({"step": s, "syncs": sum(calls.values()), "where": ", ".join(f"{k} x{v}" for k, v in
                                                                                    calls.items()) or "-",
                     "check step": (s + 1) % 5 == 0 or s + 1 == steps})
    steady = [r["syncs"] for r in rows[1:] if not r["check step"]]
    print(table(rows, ["step", "syncs", "check step", "where"]))
    print(f"\nsteady-state steps (not check steps): {max(steady) if steady else 0} syncs at most")
    encode = encode_syncs(device)
    print(table(encode, ["precompute encode (one batch)", "syncs", "where"]))
    path = save("syncs", args, rows, {"steps": steps, "check_every": 5, "mode": "cache, ckf, hard, EMA on"},
                device, steady_state_max=max(steady) if steady else 0,
                precompute_encode_syncs={r["precompute encode (one batch)"]: r["syncs"] for r in encode})
    print(path)


def encode_syncs(device: torch.device) -> list[dict]:
    """Host reads made by cache/ckf.py while encoding one realistic teacher batch, plain and deferred."""
    from cskd_cache.cache.encodings import make_encoding

    torch.manual_seed(0)
    dense = (torch.randn(64, 1, 1000) * 4 + torch.randn(64, 49, 1000)).to(device)
    glob, ckf = dense.mean(1), make_encoding("ckf", 1000, 49)
    methods = (*METHODS, "nonzero")
    real = {m: getattr(torch.Tensor, m) for m in methods}
    rows = []
    for deferred in (False, True):
        counts = collections.Counter()

        def counting(name):
            def f(self, *a, **kw):
                if sys._getframe(1).f_code.co_filename.endswith("cskd_cache/cache/ckf.py"):
                    counts[name] += 1
                return real[name](self, *a, **kw)
            return f

        for m in methods:
            setattr(torch.Tensor, m, counting(m))
        try:
            ckf.encode(dense, glob, deferred=deferred)
        finally:
            for m in methods:
                setattr(torch.Tensor, m, real[m])
        rows.append({"precompute encode (one batch)": "deferred (precompute)" if deferred else "plain",
                     "syncs": sum(counts.values()), "where": ", ".join(f"{k} x{v}" for k, v in counts.items()) or "-"})
    return rows


if __name__ == "__main__":
    main()
