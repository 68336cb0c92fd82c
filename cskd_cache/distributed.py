"""torchrun support: rank/world from the environment, a process group when there is more than one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import CacheError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        # no process group: ranks run as independent jobs (e.g. one per machine), nothing to wait for
        if self.world > 1 and dist.is_initialized():
            dist.barrier()

    def device(self, requested: str | None = None) -> torch.device:
        return resolve_device(requested, self.local_rank)


def resolve_device(requested: str | None = None, index: int = 0) -> torch.device:
    """`--device` checked where it enters (one line naming the flag, never a CUDA traceback later); default: the
    GPU when present (`index`: a rank's local GPU), else the CPU."""
    if requested:
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise CacheError(f"--device {requested!r}: not a device (cpu, cuda, cuda:1, mps, ...)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise CacheError(f"--device {requested}: no CUDA GPU is available here; use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CacheError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s) here")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise CacheError(f"--device {requested}: MPS is not available here; use --device cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed() -> Dist:
    """Reads torchrun's variables; gloo on CPU, nccl on GPU. A single process needs no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return Dist(rank, world, local)


def shutdown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
