"""The CNN teacher: dense logits (its head at every position of the last feature map) and global logits.

We wrap a timm model rather than fork it. The head is applied position by position by feeding each feature
vector to timm's own `forward_head` as a 1x1 map: average pooling of a 1x1 map is the identity, so this is the
teacher's classifier at that position whatever the head holds (fc, conv 1x1, norm + fc). The global logits are
the spatial mean of the dense ones (the paper's definition); for a linear head after average pooling that is
exactly the teacher's own output, which `check_global_equals_output` verifies on the loaded model.
"""

from __future__ import annotations

import hashlib
import os

import timm
import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..data.recipe import Renormalize, model_normalization
from ..errors import CacheError

# DeiT's (and CSKD's) teacher. timm's bare `regnety_160` resolves to other (in12k) weights, so name it exactly.
TEACHER_ALIASES = {"regnety_160": "regnety_160.deit_in1k"}
PRECISIONS = ("fp32", "fp16", "bf16")
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """'auto' (or None): fp16 autocast on a GPU, as the official CSKD code runs its teacher (bf16's 8-bit
    mantissa flips about 10x more argmaxes than fp16's 11 bits), and fp32 on a CPU, where autocast is slower."""
    if precision in (None, "auto"):
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise CacheError(f"--teacher-precision {precision!r}: use one of auto, {', '.join(PRECISIONS)}")
    return precision


class DenseTeacher(nn.Module):
    """`view_mean/std`: how the views it is fed are normalised (the recipe's); it renormalises them to its own
    pretrained config. `precision`: fp32, or the autocast dtype its forward runs under (fp16 / bf16)."""

    def __init__(self, model: nn.Module, view_mean=IMAGENET_DEFAULT_MEAN, view_std=IMAGENET_DEFAULT_STD,
                 precision: str = "fp32"):
        super().__init__()
        self.model = model.eval()
        self.mean, self.std = model_normalization(model)
        self.renorm = Renormalize(view_mean, view_std, self.mean, self.std)
        if precision not in PRECISIONS:
            raise CacheError(f"teacher precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.precision = precision

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 3, H, W] (normalised as the views are) -> dense [B, h*w, K] and global [B, K], both float32."""
        x = self.renorm(x)
        with torch.autocast(x.device.type, dtype=_AUTOCAST.get(self.precision), enabled=self.precision != "fp32"):
            feats = self.model.forward_features(x)
            if feats.ndim != 4:
                raise CacheError(f"teacher {self.name!r} has no spatial feature map (forward_features gives shape "
                                 f"{tuple(feats.shape)}); use a CNN teacher such as regnety_160")
            b, c, h, w = feats.shape
            per_position = feats.permute(0, 2, 3, 1).reshape(b * h * w, c, 1, 1)
            dense = self.model.forward_head(per_position).float().reshape(b, h * w, -1)
        return dense, dense.mean(dim=1)  # the mean in fp32, whatever the forward ran in

    @property
    def name(self) -> str:
        return self.model.pretrained_cfg.get("architecture", type(self.model).__name__)

    def grid(self, input_size: int) -> tuple[int, int]:
        with torch.inference_mode():
            p = next(self.model.parameters())
            feats = self.model.forward_features(torch.zeros(1, 3, input_size, input_size, device=p.device))
        if feats.ndim != 4:
            raise CacheError(f"teacher {self.name!r} has no spatial feature map (forward_features gives shape "
                             f"{tuple(feats.shape)}); use a CNN teacher such as regnety_160")
        return int(feats.shape[2]), int(feats.shape[3])

    @torch.inference_mode()
    def check_global_equals_output(self, input_size: int, atol: float = 1e-4) -> bool:
        """True when the mean of the dense logits is the model's own pooled prediction (a linear head).
        Checked in fp32, whatever the teacher's precision: it is a property of the architecture."""
        p = next(self.model.parameters())
        x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0)).to(p.device)
        precision, self.precision = self.precision, "fp32"
        try:
            _, glob = self(x)
        finally:
            self.precision = precision
        out = self.model(self.renorm(x)).float()
        return bool(torch.allclose(glob, out, atol=atol, rtol=1e-4))


def state_dict_sha256(model: nn.Module) -> str:
    """Hash of the weights themselves (names, shapes, bytes), so the cache names the exact teacher it used."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(f"{tuple(t.shape)} {t.dtype}".encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _classifier_width(name: str, state: dict) -> int | None:
    """Classes of a fine-tuned checkpoint, read from its classifier weight (timm's cfg names the layer)."""
    key = timm.models.get_pretrained_cfg_value(name, "classifier") or "fc"
    w = state.get(f"{key}.weight")
    return int(w.shape[0]) if w is not None else None


def require_hub(flag: str | None = None, recorded: str | None = None, instead: str | None = None) -> None:
    """Fail in seconds, not after a minute of retries, when the Hugging Face hub cannot be reached (unless the
    user asked for offline mode, where timm reads the local hub cache). `flag` and `instead` are the caller's to
    name: what asked for the hub, and what the user passes instead (it must be a flag of the caller's command)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=float(os.environ.get("CSKD_HUB_TIMEOUT", "3"))).close()
    except OSError as e:
        hint = f" (the cache was made with {recorded})" if recorded else ""
        what = f"download the weights elsewhere and pass {instead}" if instead else \
            "connect to it, or set HF_HUB_OFFLINE=1 if the weights are in the local hub cache"
        raise CacheError(f"{flag + ': ' if flag else ''}the Hugging Face hub ({url.hostname}) cannot be reached "
                         f"({e.strerror or e}) for pretrained weights; {what}{hint}") from None


def create_teacher(name: str, *, pretrained: bool = False, checkpoint: str | None = None,
                   num_classes: int | None = None, view_mean=IMAGENET_DEFAULT_MEAN, view_std=IMAGENET_DEFAULT_STD,
                   precision: str = "fp32", recorded: str | None = None) -> tuple[DenseTeacher, dict]:
    """Any timm CNN by name; weights from the hub (`pretrained`) or a local .pth/.safetensors file (weights only).
    view_mean/std: the recipe's normalisation of the views it will see; precision: fp32 | fp16 | bf16."""
    # precompute, verify and train call this: its messages name only flags all three have (tests/test_messages.py)
    if not pretrained and not checkpoint:
        raise CacheError("no teacher weights: give --teacher-checkpoint PATH (.pth or .safetensors), or take "
                         "timm's from the Hugging Face hub (precompute --pretrained, verify --pretrained)")
    name = TEACHER_ALIASES.get(name, name)
    if checkpoint and not os.path.isfile(checkpoint):
        raise CacheError(f"--teacher-checkpoint: no such file: {checkpoint}")
    if not timm.is_model(name) and not timm.list_models(name):
        raise CacheError(f"teacher {name!r}: unknown timm model (see timm.list_models())")
    state = None
    if checkpoint:
        try:
            # timm's loader: safetensors, or torch.load(weights_only=True); unwraps 'state_dict'/'model' keys.
            state = timm.models.load_state_dict(checkpoint, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here is the file's fault, say which
            raise CacheError(f"--teacher-checkpoint {checkpoint}: not a readable weights file "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        num_classes = num_classes or _classifier_width(name, state)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if pretrained and not checkpoint:
        require_hub(f"teacher {name}", recorded, instead="--teacher-checkpoint PATH")
    try:
        model = timm.create_model(name, pretrained=pretrained and not checkpoint, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:  # hub unreachable, no such weights, ...
        raise CacheError(f"teacher {name}: cannot get pretrained weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); download them elsewhere and pass "
                         "--teacher-checkpoint PATH") from None
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:300]
            raise CacheError(f"--teacher-checkpoint {checkpoint}: does not fit {name} ({detail})") from None
    teacher = DenseTeacher(model, view_mean, view_std, precision)
    info = {
        "name": name,
        "architecture": teacher.name,
        "pretrained_tag": model.pretrained_cfg.get("tag") if pretrained and not checkpoint else None,
        "checkpoint": os.path.basename(checkpoint) if checkpoint else None,
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
        "weights_sha256": state_dict_sha256(model),
        "num_classes": model.num_classes,
        "mean": list(teacher.mean),  # what its input is normalised with (its pretrained config's)
        "std": list(teacher.std),
        "precision": precision,
    }
    return teacher, info
