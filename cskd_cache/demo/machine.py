"""What a result was measured on: the CPU, its cores, the GPU, the library versions (results.json records it)."""

from __future__ import annotations

import os
import platform

import torch


def machine() -> dict:
    import PIL
    import timm

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "versions": {"torch": torch.__version__, "timm": timm.__version__, "Pillow": PIL.__version__,
                         "python": platform.python_version()}}


def describe(m: dict) -> str:
    v = m["versions"]
    where = f"{m['cuda']} GPU" if m.get("cuda") else "no GPU"
    return (f"{m['cpu']}, {m['cores']} cores, {where}; Python {v['python']}, torch {v['torch']}, timm {v['timm']}, "
            f"Pillow {v['Pillow']}")
