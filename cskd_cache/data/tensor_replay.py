"""The tensor replay backend (`--replay tensor`): workers draw, the training device makes the pixels.

A loader worker does what costs no pixel work: it reads each image's encoded bytes, takes its size from the header,
and draws the view's parameters from its seed (data/params.py: timm's own draws). The batch then carries the bytes
and one int32 record per view; `finish` decodes each image once (torchvision.io on the CPU, nvJPEG on CUDA), crops
and resizes each view, flips, applies each RandAugment layer batched per op (data/kernels.py), all in uint8 with
Pillow's own arithmetic (integer resize, float64 taps for the geometric ops), then the float steps every backend
shares (data/finish.py). On a CPU the views are timm's PIL views bit for bit (tests/data/test_tensor_views.py); on
CUDA only nvJPEG's decoder differs from libjpeg-turbo. Precompute and training both call `finish`, so on one kind of
device the teacher's pixels and the student's are the same bits; a cache still records its backend (and the
kernels' revision) and is only used with it.

Views are fingerprinted where they are made: on the device, after finishing (the checked ones, copied to the host).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from ..errors import BadImageError, CacheError
from . import kernels
from .resize import resized_crops, to_device
from .finish import Finisher
from .fingerprint import SIGNATURES, fingerprint, signature
from .params import INTERPOLATIONS, KERNELS, NO_OP, Drawer, header_size
from .recipe import Recipe
from .replay import PairDataset, _ErasingDraws, _seeded

# torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec's; they are the ones with nvJPEG batch
# decoding today, and their warning on every call would flood a training log. Revisit when torchvision drops them.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

_NO_ARG = {"auto_contrast", "equalize", "invert"}
_INT_ARG = {"posterize", "solarize", "solarize_add"}
_GEOMETRIC = {"rotate": kernels.rotate, "shear_x": kernels.shear_x, "shear_y": kernels.shear_y,
              "translate_x_rel": kernels.translate_x, "translate_y_rel": kernels.translate_y}


def decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Encoded images (uint8 CPU tensors) -> uint8 RGB [3, H, W] on `device`. On CUDA, JPEGs are decoded there, as a
    batch (nvJPEG); other formats on the CPU, then moved."""
    out: list[torch.Tensor | None] = [None] * len(encoded)
    if device.type == "cuda":
        jpeg = [i for i, d in enumerate(encoded) if len(d) > 2 and int(d[0]) == 0xFF and int(d[1]) == 0xD8]
        if jpeg:
            for i, img in zip(jpeg, decode_jpeg([encoded[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)):
                out[i] = img
    for i, d in enumerate(encoded):
        if out[i] is None:
            out[i] = decode_image(d, mode=ImageReadMode.RGB).to(device, non_blocking=True)
    return out


class DeviceViews:
    """A batch's records -> its views' uint8 pixels [B, 3, S, S], on the device. Per view: crop + resize (sizes
    differ), flip; then each RandAugment layer, one batched kernel call per (op, interpolation) present. Every
    kernel computes each view independently of the others in its batch (tests/data/test_kernels.py), so a view's
    pixels do not depend on which batch it falls in: precompute's teacher batches and training's student batches
    differ."""

    def __init__(self, recipe: Recipe, drawer: Drawer, keys: list[str] | None = None):
        self.size, self.layers, self.fill, self.keys = recipe.input_size, drawer.layers, drawer.fill, keys

    def __call__(self, batch: dict, device: torch.device) -> torch.Tensor:
        if device.type == "mps":  # the geometric ops are Pillow's float64 arithmetic, which MPS does not have
            raise CacheError("--replay tensor: its kernels need float64, which Apple's MPS lacks; use --device cpu "
                             "or a cache made with --replay pil")
        samples = batch["sample"].tolist()
        ends = np.cumsum(batch["data_len"].numpy())
        first: dict[int, int] = {}
        for i, s in enumerate(samples):
            first.setdefault(s, i)  # repeats of a sample in the batch: decoded once
        if "decoded" in batch:  # --decode worker: decoded in the loader workers (a list: sizes differ)
            images = {s: img.to(device, non_blocking=True)
                      for s, img in zip(batch["decoded_sample"].tolist(), batch["decoded"])}
        else:
            data = batch["data"]
            encoded = [data[int(ends[i]) - int(batch["data_len"][i]): int(ends[i])] for i in first.values()]
            try:
                images = dict(zip(first, decode(encoded, device)))
            except RuntimeError as e:  # torchvision names no image; find it (rare: precompute skips unreadable ones)
                raise self._bad(first, encoded, e) from None
        rows = batch["params"].numpy()
        for s, row in zip(samples, rows):
            top, left, h, w = (int(v) for v in row[:4])
            if top + h > images[s].shape[1] or left + w > images[s].shape[2]:
                raise BadImageError(self._key(s), f"decoded as {tuple(images[s].shape[1:])} (height, width), but its "
                                    f"header said otherwise; re-encode it")
        order = list(images)  # groups of padded crops: up to 512 MB on a GPU (few launches), 16 MB on a CPU (little
        # padding: a CPU pays for every padded multiply-add, a GPU for every launch)
        x = resized_crops([images[s] for s in order], [order.index(s) for s in samples], rows[:, :4], self.size,
                          [INTERPOLATIONS[int(i)] for i in rows[:, 4]], budget=1 << (29 if device.type == "cuda" else 24))
        # indices and arguments travel pinned and non-blocking: a pageable copy would wait for the queued kernels
        flip = np.flatnonzero(rows[:, 5])
        if len(flip):
            at = to_device(flip, device)
            x[at] = kernels.hflip(x[at])
        for layer in range(self.layers):
            col = 6 + 4 * layer
            kern, interp = rows[:, col], rows[:, col + 1]
            args = np.ascontiguousarray(rows[:, col + 2: col + 4]).view(np.float64)[:, 0]
            for k, ip in sorted({(int(a), int(b)) for a, b in zip(kern, interp) if a != NO_OP}):
                sel = np.flatnonzero((kern == k) & (interp == ip))
                at = to_device(sel, device)
                x[at] = self._op(KERNELS[k], x[at], args[sel], INTERPOLATIONS[ip], device)
        return x

    def _op(self, name: str, x: torch.Tensor, args: np.ndarray, interp: str, device) -> torch.Tensor:
        if name in _NO_ARG:
            return getattr(kernels, name.replace("auto_contrast", "autocontrast"))(x)
        if name in _INT_ARG:
            return getattr(kernels, name)(x, to_device(args.astype(np.int64), device))
        a = to_device(np.ascontiguousarray(args), device)
        if name in _GEOMETRIC:
            return _GEOMETRIC[name](x, a, self.fill, interp, exact=True)  # Pillow's float64 taps: see kernels
        return getattr(kernels, name)(x, a.to(torch.float32))  # color, contrast, brightness, sharpness

    def decode_here(self, samples: list[int], datas: list[bytes]) -> list[torch.Tensor]:
        """Encoded images -> uint8 [3, H, W] on this process's CPU (libjpeg-turbo, as Pillow), one per sample."""
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            return decode(encoded, torch.device("cpu"))
        except RuntimeError as e:
            raise self._bad(dict(zip(samples, range(len(samples)))), encoded, e) from None

    def _key(self, sample: int) -> str:
        return self.keys[sample] if self.keys is not None else f"sample {sample}"

    def _bad(self, first: dict, encoded: list, error: Exception) -> BadImageError:
        for s, d in zip(first, encoded):
            try:
                decode_image(d, mode=ImageReadMode.RGB)
            except RuntimeError as e:
                return BadImageError(self._key(s), f"torchvision cannot decode it ({e})")
        return BadImageError(self._key(next(iter(first))), f"decoding failed ({error})")


class TensorPairDataset(PairDataset):
    """PairDataset for `--replay tensor`: items as PairDataset's, batches carrying encoded images and parameter
    records instead of pixels; `finish` makes the views on the device (and fingerprints the checked ones there)."""

    def __init__(self, source, recipe: Recipe, fingerprint_kind: str = "sha1-int16", signature_kind: str = "sketch64"):
        self.source, self.recipe, self.fingerprint_kind = source, recipe, fingerprint_kind
        self.signature_kind = signature_kind
        self.drawer = Drawer(recipe)  # refuses a recipe the kernels cannot express
        self.views = DeviceViews(recipe, self.drawer, source.keys)
        self.finisher = Finisher(recipe.mean, recipe.std)

    def __getitems__(self, items: list[tuple]) -> list[dict]:
        """The pairs of `items` as one batch (a one-element list: `collate_pairs` passes it through), built in
        NumPy and turned into tensors once: per-pair tensors cost more than the draws themselves."""
        n, width = 2 * len(items), self.drawer.width
        rows, box = np.zeros((n, width), np.int32), np.zeros((n, 4), np.int64)
        ints = np.zeros((6, n), np.int64)  # view, sample, label, partner label, mode, checked
        lam, lengths = np.zeros(n, np.float32), np.zeros(n, np.int64)
        images: dict[int, tuple[bytes, tuple[int, int]]] = {}
        datas, erase_view, erase_box, noise = [], [], [], []
        try:
            for k, (view, sample_a, sample_b, seed_a, seed_b, lam_k, mode, box_k, check) in enumerate(items):
                for j, (s, seed, other) in enumerate(((sample_a, seed_a, sample_b), (sample_b, seed_b, sample_a))):
                    i = 2 * k + j
                    data, size = self._image(int(s), images)
                    draws = _ErasingDraws()
                    with _seeded(int(seed)):
                        rows[i] = self.drawer.draw(*size, draws)
                    erase_view += [i] * len(draws.boxes)
                    erase_box += draws.boxes
                    noise += draws.values
                    datas.append(data)
                    lengths[i] = len(data)
                    ints[:, i] = (view + j, s, self.source.labels[int(s)], self.source.labels[int(other)], mode,
                                  check)
                    lam[i], box[i] = lam_k, box_k
        except BadImageError as e:  # carried as data: DataLoader cannot re-raise exceptions with custom args
            return [{"error": str(e)}]
        sig = SIGNATURES[self.signature_kind][2]
        view, sample, label, partner, mode, checked = (torch.from_numpy(a) for a in ints)
        decoded = {}
        if self.recipe.decode == "worker":  # libjpeg-turbo here, once per sample: Pillow's pixels on any device
            try:
                decoded = {"decoded": self.views.decode_here(list(images), [d for d, _ in images.values()]),
                           "decoded_sample": torch.tensor(list(images), dtype=torch.int64)}
            except BadImageError as e:
                return [{"error": str(e)}]
            datas, lengths = [], np.zeros(n, np.int64)  # the bytes need not travel
        data = torch.frombuffer(bytearray(b"".join(datas)), dtype=torch.uint8) if datas else torch.zeros(0, dtype=torch.uint8)
        return [{"view": view, "sample": sample, "data": data, **decoded,
                 "data_len": torch.from_numpy(lengths), "params": torch.from_numpy(rows),
                 "erase_view": torch.tensor(erase_view, dtype=torch.int64),
                 "erase_box": torch.tensor(erase_box, dtype=torch.int64).view(-1, 4),
                 "erase_noise": torch.cat(noise) if noise else torch.zeros(0),
                 "label": label, "partner_label": partner, "lam": torch.from_numpy(lam), "mode": mode,
                 "box": torch.from_numpy(box), "checked": checked.bool(),
                 "fingerprint": torch.zeros(n, dtype=torch.int64), "signature": torch.zeros(n, sig, dtype=torch.int8)}]

    def _image(self, s: int, images: dict) -> tuple[bytes, tuple[int, int]]:
        """An image's encoded bytes and (width, height) from its header: read once per batch."""
        if s not in images:
            data = self.source.read_bytes(s)
            try:
                images[s] = data, header_size(data)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad header
                raise BadImageError(self.source.keys[s], f"{type(e).__name__}: {e}") from e
        return images[s]

    def finish(self, batch: dict, device: torch.device | str = "cpu", mixed: bool = True) -> torch.Tensor:
        """The batch's views on `device` (float32, normalised, erased, mixed). The checked views' fingerprints and
        signatures are written into the batch's `fingerprint` / `signature` (in place)."""
        device = torch.device(device)
        pixels = self.views(batch, device)
        x = self.finisher(dict(batch, pixels=pixels), device, mixed)
        checked = np.flatnonzero(batch["checked"].numpy())
        if len(checked):
            host = x[torch.from_numpy(checked).to(device)].cpu()
            for i, v in zip(checked.tolist(), host):
                batch["fingerprint"][i] = fingerprint(v, self.fingerprint_kind)
                batch["signature"][i] = torch.from_numpy(signature(v, self.signature_kind))
        return x
