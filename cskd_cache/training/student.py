"""The CSKD student: a timm DeiT with a distillation token whose distillation head also reads every patch token.

Training outputs (CSKD paper, official code):
  cls   [B, K]        class token -> head
  dist  [B, K]        distillation token -> head_dist
  dense [B, K, h, w]  head_dist on every patch token, laid out on the patch grid (row-major, as ViT patchifies)
                      and average-pooled in logit space down to the teacher's grid (e.g. 14x14 -> 7x7, kernel 2)
Eval prediction: mean of cls, dist and the patch-mean of the (unpooled) dense logits.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..data.recipe import Renormalize, model_normalization
from ..errors import CacheError

# Short names for the three DeiT sizes of the paper; all three must carry a distillation token.
STUDENT_ALIASES = {
    "deit_ti": "deit_tiny_distilled_patch16_224",
    "deit_s": "deit_small_distilled_patch16_224",
    "deit_b": "deit_base_distilled_patch16_224",
}
# Small students for the demo and for CPU runs: DeiT-Ti's architecture made narrower and shallower (timm kwargs).
STUDENT_VARIANTS = {
    "deit_demo": ("deit_tiny_distilled_patch16_224", dict(embed_dim=96, depth=4, num_heads=3)),
    # benchmarks/train_throughput's data-bound part: a step far cheaper than the data path's cost per view
    "deit_probe": ("deit_tiny_distilled_patch16_224", dict(patch_size=32, embed_dim=16, depth=1, num_heads=1)),
}


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class CSKDStudent(nn.Module):
    """Wraps (does not copy) a timm ViT with a distillation token (timm's VisionTransformerDistilled)."""

    def __init__(self, model: nn.Module, teacher_grid: tuple[int, int], view_mean=IMAGENET_DEFAULT_MEAN,
                 view_std=IMAGENET_DEFAULT_STD) -> None:
        super().__init__()
        name = type(model).__name__
        # A plain ViT has no second token to train against the teacher: refuse instead of silently using the cls token.
        if getattr(model, "dist_token", None) is None or not isinstance(getattr(model, "head_dist", None), nn.Linear):
            raise CacheError(f"student {name} has no distillation token/head; use a *_distilled_* DeiT (e.g. deit_s)")
        if getattr(model, "global_pool", "token") != "token":  # forward_head reads tokens 0 and 1, nothing else
            raise CacheError(f"student {name} must use global_pool='token', got {model.global_pool!r}")
        self.model = model
        # views come normalised with the recipe's mean/std; the student sees them with its own config's
        self.view_mean, self.view_std = tuple(view_mean), tuple(view_std)
        self.renorm = Renormalize(view_mean, view_std, *model_normalization(model))
        self.teacher_grid = _pair(teacher_grid)
        self.patch_grid = _pair(model.patch_embed.grid_size)
        self.kernel = self._kernel(self.patch_grid)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's optimizer factory reads this: pos_embed, cls_token and dist_token are not decayed (as in DeiT)."""
        return {f"model.{n}" for n in getattr(self.model, "no_weight_decay", lambda: set())()}

    def _kernel(self, grid: tuple[int, int]) -> tuple[int, int]:
        (H, W), (h, w) = grid, self.teacher_grid
        if h < 1 or w < 1 or H % h or W % w:  # non-integer windows would mix patches unevenly across positions
            raise CacheError(f"student patch grid {H}x{W} is not divisible by the teacher grid {h}x{w}; "
                             f"pick an input size where it is (e.g. 224 px: 14x14 patches, 7x7 teacher)")
        return H // h, W // w

    HEADS = ("cls", "dist", "dense")

    def _heads(self, x: Tensor, heads=HEADS) -> dict[str, Tensor]:
        """cls [B,K], dist [B,K], unpooled dense [B,K,H,W]: the ones asked for."""
        m = self.model
        grid = self.patch_grid
        if getattr(m, "dynamic_img_size", False):  # the grid follows the input size
            grid = _pair(m.patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))
        tokens = m.forward_features(self.renorm(x))  # [B, prefix + H*W, D], final norm already applied
        tokens = m.head_drop(tokens)  # timm's forward_head drops cls/dist this way; patches get the same
        out = {}
        if "cls" in heads:
            out["cls"] = m.head(tokens[:, 0])
        if "dist" in heads:
            out["dist"] = m.head_dist(tokens[:, 1])
        if "dense" in heads:
            dense = m.head_dist(tokens[:, m.num_prefix_tokens:])  # [B, H*W, K]
            B, _, K = dense.shape
            out["dense"] = dense.transpose(1, 2).reshape(B, K, *grid)
        return out

    def forward(self, x: Tensor, heads=HEADS) -> dict[str, Tensor]:
        """The training outputs named in `heads` (all three by default). A loss that does not use a head need not
        pay for it: plain DeiT (no teacher) asks for the class head alone."""
        out = self._heads(x, heads)
        if "dense" in out:
            kernel = self._kernel(tuple(out["dense"].shape[-2:]))  # cheap; re-checks grids that follow the input
            if kernel != (1, 1):
                # Pool logits, not features, as the paper does (equal for a linear head, not once head_drop is on).
                out["dense"] = F.avg_pool2d(out["dense"], kernel_size=kernel, stride=kernel)
        return out

    def predict(self, x: Tensor) -> Tensor:
        """Eval prediction [B, K]: the three heads weigh equally (official CSKD inference)."""
        out = self._heads(x)
        return (out["cls"] + out["dist"] + out["dense"].mean(dim=(2, 3))) / 3


def create_student(name: str, num_classes: int, img_size: int, teacher_grid: tuple[int, int],
                   drop_path: float = 0.0, pretrained: bool = False, view_mean=IMAGENET_DEFAULT_MEAN,
                   view_std=IMAGENET_DEFAULT_STD) -> CSKDStudent:
    """A timm model by alias or timm name. drop_path 0.0 is the official CSKD configs' value (DeiT's own is 0.1)."""
    timm_name, kwargs = STUDENT_VARIANTS.get(name, (STUDENT_ALIASES.get(name, name), {}))
    if not timm.is_model(timm_name):
        raise CacheError(f"unknown student {name!r}; use one of {sorted(STUDENT_ALIASES) + sorted(STUDENT_VARIANTS)} "
                         "or a timm model name")
    if kwargs and pretrained:
        raise CacheError(f"student {name!r} is a resized architecture with no pretrained weights")
    try:
        model = timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes, img_size=img_size,
                                  drop_path_rate=drop_path, **kwargs)
    except TypeError as e:  # a CNN (resnet18, ...) takes no img_size: not a ViT at all
        raise CacheError(f"student {name!r} is not a ViT with a distillation token ({str(e).splitlines()[0][:120]});"
                         f" use one of {sorted(STUDENT_ALIASES) + sorted(STUDENT_VARIANTS)} or a timm *_distilled_* "
                         "DeiT") from None
    return CSKDStudent(model, teacher_grid, view_mean, view_std)
