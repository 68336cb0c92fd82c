"""The student's three outputs against timm's own heads and the reference's definitions (tiny DeiTs, CPU)."""

import pytest
import timm
import torch
import torch.nn.functional as F

from cskd_cache.errors import CacheError
from cskd_cache.training.student import STUDENT_ALIASES, CSKDStudent, create_student

K = 5
TIMM_NAME = "deit_tiny_distilled_patch16_224"


def tiny(img_size, teacher_grid, name=TIMM_NAME) -> CSKDStudent:
    """DeiT-Ti cut to 2 blocks: the heads and token layout are what is tested, depth only costs time."""
    torch.manual_seed(0)
    return CSKDStudent(timm.create_model(name, num_classes=K, img_size=img_size, depth=2), teacher_grid)


@pytest.fixture(scope="module")
def student():
    """64 px -> 4x4 patches, teacher grid 2x2 (kernel 2, as 14x14 -> 7x7 at 224 px)."""
    return tiny(64, (2, 2))


def tokens(s: CSKDStudent, x):
    return s.model.forward_features(x)  # [B, 2 + H*W, D]


def test_shapes_and_config(student):
    x = torch.randn(3, 3, 64, 64)
    out = student(x)
    assert set(out) == {"cls", "dist", "dense"}
    assert out["cls"].shape == out["dist"].shape == (3, K)
    assert out["dense"].shape == (3, K, 2, 2)
    assert student.predict(x).shape == (3, K)
    assert student.patch_grid == (4, 4) and student.kernel == (2, 2)
    assert tokens(student, x).shape[1] == student.model.num_prefix_tokens + 16 and student.model.num_prefix_tokens == 2


def test_wraps_without_copy():
    model = timm.create_model(TIMM_NAME, num_classes=K, img_size=32, depth=1)
    s = CSKDStudent(model, (2, 2))
    assert s.model is model
    assert s.model.head_dist.weight.data_ptr() == model.head_dist.weight.data_ptr()


def test_cls_dist_equal_timm_distilled_training_heads(student):
    """timm in train mode with set_distilled_training(True) returns (head(cls), head_dist(dist)): ours must match."""
    x = torch.randn(2, 3, 64, 64)
    m = student.model
    m.train()
    m.set_distilled_training(True)
    try:
        with torch.no_grad():
            ref_cls, ref_dist = m(x)
            out = student(x)
    finally:
        m.set_distilled_training(False)
        m.eval()
    assert torch.allclose(out["cls"], ref_cls, atol=1e-6)
    assert torch.allclose(out["dist"], ref_dist, atol=1e-6)
    assert not torch.allclose(ref_cls, ref_dist, atol=1e-3)  # two different heads, or the test proves nothing


def test_dense_is_pooled_head_dist_of_every_patch(student):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = student(x)
        per_patch = student.model.head_dist(tokens(student, x)[:, 2:])  # [B, 16, K]
    grid = per_patch.transpose(1, 2).reshape(2, K, 4, 4)
    assert torch.allclose(out["dense"], F.avg_pool2d(grid, 2, 2), atol=1e-6)
    # Independent of reshapes: teacher cell (i, j) averages patches (2i+a, 2j+b), patch (r, c) = token r*4 + c.
    i, j = 1, 0
    cell = per_patch[:, [(2 * i + a) * 4 + 2 * j + b for a in (0, 1) for b in (0, 1)]].mean(1)
    assert torch.allclose(out["dense"][:, :, i, j], cell, atol=1e-6)


def test_kernel_one_and_non_square_grid_is_row_major():
    """teacher grid == patch grid: no pooling; a 32x64 input (2x4 patches) catches a swapped h/w anywhere."""
    s = tiny((32, 64), (2, 4)).eval()
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        dense = s(x)["dense"]
        per_patch = s.model.head_dist(tokens(s, x)[:, 2:])
    assert s.kernel == (1, 1) and dense.shape == (2, K, 2, 4)
    for r in range(2):
        for c in range(4):
            assert torch.allclose(dense[:, :, r, c], per_patch[:, r * 4 + c], atol=1e-6)
    pooled = CSKDStudent(s.model, (2, 2))  # kernel (1, 2): rows kept, column pairs averaged
    with torch.no_grad():
        dense = pooled(x)["dense"]
    assert pooled.kernel == (1, 2) and dense.shape == (2, K, 2, 2)
    assert torch.allclose(dense[:, :, 1, 1], (per_patch[:, 6] + per_patch[:, 7]) / 2, atol=1e-6)


def test_predict_is_mean_of_cls_dist_and_patch_mean(student):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        t = tokens(student, x)
        m = student.model
        ref = (m.head(t[:, 0]) + m.head_dist(t[:, 1]) + m.head_dist(t[:, 2:]).mean(1)) / 3
        pred = student.predict(x)
        out = student(x)
    assert torch.allclose(pred, ref, atol=1e-6)
    assert not torch.allclose(pred, (out["cls"] + out["dist"]) / 2, atol=1e-4)  # the dense term counts


def test_aliases_resolve_to_timm_distilled_models():
    assert STUDENT_ALIASES == {"deit_ti": "deit_tiny_distilled_patch16_224",
                               "deit_s": "deit_small_distilled_patch16_224",
                               "deit_b": "deit_base_distilled_patch16_224"}
    assert all(timm.is_model(n) for n in STUDENT_ALIASES.values())
    s = create_student("deit_ti", num_classes=3, img_size=32, teacher_grid=(1, 1), drop_path=0.1)
    assert type(s.model).__name__ == "VisionTransformerDistilled" and s.model.embed_dim == 192
    assert s.model.head.out_features == s.model.head_dist.out_features == 3
    assert s.model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # drop_path reaches timm
    assert s.patch_grid == (2, 2) and len(s.model.blocks) == 12  # the real DeiT-Ti, at 32 px


def test_refuses_model_without_distillation_token():
    with pytest.raises(CacheError, match="distillation token"):
        tiny(32, (2, 2), name="deit_tiny_patch16_224")


@pytest.mark.parametrize("grid", [(3, 3), (4, 3), (8, 8), (0, 2)])
def test_refuses_patch_grid_not_divisible_by_teacher_grid(student, grid):
    with pytest.raises(CacheError, match="not divisible") as e:
        CSKDStudent(student.model, grid)  # 4x4 patches
    assert "\n" not in str(e.value)  # the CLI prints it on one line


def test_refuses_unknown_name():
    with pytest.raises(CacheError, match="unknown student"):
        create_student("deit_xl", num_classes=K, img_size=32, teacher_grid=(1, 1))
