"""Every number of the CKF schedule and the CSKD loss, against hand-computed values and timm/DeiT formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target as timm_mixup_target

from cskd_cache.errors import CacheError
from cskd_cache.training.losses import ALPHA_SCHEDULES, CSKDLoss, alpha_at, ckf_alpha, mixup_target

B, K, h, w = 4, 6, 2, 3


@pytest.mark.parametrize("x, linear, x2, cos", [
    (0.0, 1.0, 1.0, 1.0),
    (0.25, 0.75, 0.5625, math.cos(math.pi / 8)),
    (0.5, 0.5, 0.25, math.sqrt(0.5)),
    (0.9, 0.1, 0.01, math.cos(0.45 * math.pi)),
    (1.0, 0.0, 0.0, 0.0),
    (-0.5, 1.0, 1.0, 1.0),  # clamped
    (1.5, 0.0, 0.0, 0.0),
])
def test_ckf_alpha_schedules(x, linear, x2, cos):
    assert ALPHA_SCHEDULES == ("linear", "x2", "cos", "local")
    assert ckf_alpha(x) == pytest.approx(linear)  # linear is the default
    assert ckf_alpha(x, "local") == 1.0  # the paper's ablation: constant alpha = 1
    for schedule, want in zip(ALPHA_SCHEDULES, (linear, x2, cos)):
        a = ckf_alpha(x, schedule)
        assert a == pytest.approx(want, abs=1e-12) and 0.0 <= a <= 1.0
    assert ckf_alpha(1.0, "cos") == 0.0  # exactly, not 6e-17


def test_unknown_schedule_refused():
    with pytest.raises(CacheError, match="schedule"):
        ckf_alpha(0.5, "exp")


def test_alpha_at_official_once_per_epoch():
    """Starts local (1), ends near global: epoch 299 of 300 uses 1/300; steps inside an epoch do not move it."""
    assert alpha_at(0, 0, 100, 300, "linear") == 1.0
    assert alpha_at(299, 0, 100, 300, "linear") == pytest.approx(1 / 300)
    assert alpha_at(299, 99, 100, 300, "linear") == pytest.approx(1 / 300)
    assert alpha_at(299, 0, 100, 300, "x2") == pytest.approx((1 / 300) ** 2)
    assert alpha_at(150, 0, 100, 300, "cos") == pytest.approx(math.cos(math.pi / 4))
    for s in ("linear", "x2", "cos"):  # the annealing schedules fall strictly, epoch by epoch
        seq = [alpha_at(e, 0, 10, 300, s) for e in range(300)]
        assert seq[0] == 1.0 and seq[-1] > 0 and all(a > b for a, b in zip(seq, seq[1:]))
    assert {alpha_at(e, 3, 10, 300, "local", per_step=True) for e in range(300)} == {1.0}  # local never moves


def test_alpha_at_per_step():
    assert alpha_at(1, 50, 100, 10, "linear", per_step=True) == pytest.approx(1 - 1.5 / 10)
    assert alpha_at(1, 50, 100, 10, "linear") == pytest.approx(0.9)
    assert alpha_at(9, 99, 100, 10, "linear", per_step=True) == pytest.approx(0.001)
    with pytest.raises(CacheError):
        alpha_at(0, 0, 0, 10, "linear")


@pytest.mark.parametrize("lam, smoothing", [(1.0, 0.0), (0.7, 0.1), (0.3, 0.1)])
def test_mixup_target_matches_timm(lam, smoothing):
    labels = torch.tensor([0, 3, 5, 1])
    ours = mixup_target(labels, labels.flip(0), lam, K, smoothing)
    assert torch.allclose(ours, timm_mixup_target(labels, K, lam=lam, smoothing=smoothing), atol=1e-7)


def test_mixup_target_hand_values_and_per_sample_lam():
    y = mixup_target(torch.tensor([0]), torch.tensor([2]), 1.0, 4, 0.1)
    assert torch.allclose(y, torch.tensor([[0.925, 0.025, 0.025, 0.025]]))  # off = 0.1/4, on = 1 - 0.1 + off
    a, b, lam = torch.tensor([0, 1, 2]), torch.tensor([3, 3, 0]), torch.tensor([0.2, 0.5, 1.0])
    y = mixup_target(a, b, lam, K, 0.1)
    for i in range(3):
        assert torch.allclose(y[i], mixup_target(a[i:i + 1], b[i:i + 1], float(lam[i]), K, 0.1)[0])
    assert torch.allclose(y.sum(1), torch.ones(3))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {"cls": torch.randn(B, K, generator=g), "dist": torch.randn(B, K, generator=g),
           "dense": torch.randn(B, K, h, w, generator=g)}
    target = mixup_target(torch.randint(K, (B,), generator=g), torch.randint(K, (B,), generator=g), 0.6, K, 0.1)
    teacher = torch.randn(B, K, generator=g) * 3
    Y = torch.randint(K, (B, h * w), generator=g)
    return out, target, teacher, Y


def test_cskd_parts_against_hand_computed():
    out, target, teacher, Y = _inputs()
    loss = CSKDLoss()  # defaults: hard, 0.5 / 0.5 / 1.0
    total, parts = loss(out, target, teacher_global=teacher, ckf_targets=Y)
    base = -(target * out["cls"].log_softmax(-1)).sum(-1).mean()  # timm's SoftTargetCrossEntropy
    hard = F.cross_entropy(out["dist"], teacher.argmax(-1))
    flat = out["dense"].permute(0, 2, 3, 1).reshape(B * h * w, K)  # position p = i * w + j, row-major
    cskd = F.cross_entropy(flat, Y.reshape(-1))
    assert set(parts) == {"base", "distill", "cskd", "total"}
    assert parts["base"] == pytest.approx(base.item(), rel=1e-6)
    assert parts["distill"] == pytest.approx(hard.item(), rel=1e-6)
    assert parts["cskd"] == pytest.approx(cskd.item(), rel=1e-6)
    assert total.item() == pytest.approx((0.5 * base + 0.5 * hard + cskd).item(), rel=1e-6)
    assert parts["total"] == pytest.approx(total.item())


def test_dense_ce_is_mean_over_every_position():
    out, _, _, Y = _inputs(1)
    by_hand = torch.stack([-out["dense"][b, :, p // w, p % w].log_softmax(0)[Y[b, p]]
                           for b in range(B) for p in range(h * w)]).mean()
    assert CSKDLoss.spatial(out["dense"], Y).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert CSKDLoss.spatial(out["dense"], Y.view(B, h, w)).item() == pytest.approx(by_hand.item(), rel=1e-6)
    with pytest.raises(ValueError):
        CSKDLoss.spatial(out["dense"], Y[:, :-1])


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_soft_distill_is_deits_formula(T):
    out, target, teacher, _ = _inputs(2)
    _, parts = CSKDLoss("soft", T, cskd_weight=0)(out, target, teacher_global=teacher.half())
    ps, pt = (out["dist"] / T).log_softmax(-1), (teacher.half().float() / T).log_softmax(-1)
    deit = (pt.exp() * (pt - ps)).sum() * T * T / (B * K)  # KL(teacher || student), summed, / numel
    assert parts["distill"] == pytest.approx(deit.item(), rel=1e-5)
    timm_batchmean = F.kl_div(ps, pt, reduction="batchmean", log_target=True) * T * T
    assert parts["distill"] == pytest.approx(timm_batchmean.item() / K, rel=1e-5)  # DeiT's is timm's / K


def test_cached_argmax_drives_hard_distill():
    out, target, teacher, _ = _inputs(3)
    other = (teacher.argmax(-1) + 1) % K
    _, parts = CSKDLoss(cskd_weight=0)(out, target, teacher_global=teacher, teacher_global_argmax=other)
    assert parts["distill"] == pytest.approx(F.cross_entropy(out["dist"], other).item(), rel=1e-6)
    _, only = CSKDLoss(cskd_weight=0)(out, target, teacher_global_argmax=teacher.argmax(-1))
    assert only["distill"] == pytest.approx(F.cross_entropy(out["dist"], teacher.argmax(-1)).item(), rel=1e-6)
    with pytest.raises(CacheError, match="teacher_global"):
        CSKDLoss("soft", cskd_weight=0)(out, target, teacher_global_argmax=teacher.argmax(-1))


def test_for_mode_weights_and_refusals():
    for mode, want in {"cskd": (0.5, 0.5, 1.0), "deit": (0.5, 0.5, 0.0), "none": (1.0, 0.0, 0.0)}.items():
        loss = CSKDLoss.for_mode(mode, "soft", 2.0)
        assert (loss.base_weight, loss.distill_weight, loss.cskd_weight) == want
        assert (loss.distill_type, loss.temperature) == ("soft", 2.0)
    with pytest.raises(CacheError):
        CSKDLoss.for_mode("tinyvit")
    with pytest.raises(CacheError):
        CSKDLoss("kl")
    with pytest.raises(CacheError):
        CSKDLoss(temperature=0)


def test_modes_skip_terms_only_by_weight():
    out, target, teacher, Y = _inputs(4)
    base = F.cross_entropy(out["cls"], target)
    hard = F.cross_entropy(out["dist"], teacher.argmax(-1))
    total, parts = CSKDLoss.for_mode("none")(out, target, teacher_global=teacher, ckf_targets=Y)
    assert set(parts) == {"base", "total"} and total.item() == pytest.approx(base.item(), rel=1e-6)
    total, parts = CSKDLoss.for_mode("deit")(out, target, teacher_global=teacher, ckf_targets=Y)
    assert "cskd" not in parts and total.item() == pytest.approx((0.5 * base + 0.5 * hard).item(), rel=1e-6)
    # a weighted term without its teacher tensor is an error, never a silently smaller loss
    with pytest.raises(CacheError, match="ckf_targets"):
        CSKDLoss.for_mode("cskd")(out, target, teacher_global=teacher)
    with pytest.raises(CacheError, match="ckf_logits"):  # a soft CKF loss given hard targets only
        CSKDLoss.for_mode("cskd", cskd_type="soft")(out, target, teacher_global=teacher, ckf_targets=Y)
    with pytest.raises(CacheError, match="teacher_global"):
        CSKDLoss.for_mode("deit")(out, target)
    total, parts = CSKDLoss.for_mode("cskd", cskd_type="soft")(out, target, teacher_global=teacher,
                                                               ckf_logits=torch.randn(B, h * w, K))
    assert "cskd" in parts and torch.isfinite(total)


def test_gradients_reach_every_student_output_in_cskd_mode_only():
    out, target, teacher, Y = _inputs(5)
    for mode, with_grad in {"cskd": {"cls", "dist", "dense"}, "deit": {"cls", "dist"}, "none": {"cls"}}.items():
        leaves = {k: v.clone().requires_grad_() for k, v in out.items()}
        total, _ = CSKDLoss.for_mode(mode)(leaves, target, teacher_global=teacher, ckf_targets=Y)
        total.backward()
        got = {k for k, v in leaves.items() if v.grad is not None and v.grad.abs().sum() > 0}
        assert got == with_grad, mode


def test_student_end_to_end_backward():
    """Loss on a real tiny student: gradients reach both heads and both tokens."""
    import timm

    from cskd_cache.training.student import CSKDStudent

    torch.manual_seed(0)
    s = CSKDStudent(timm.create_model("deit_tiny_distilled_patch16_224", num_classes=K, img_size=64, depth=2), (2, 2))
    _, target, teacher, _ = _inputs(6)
    Y = torch.randint(K, (B, 2, 2))
    total, _ = CSKDLoss.for_mode("cskd")(s(torch.randn(B, 3, 64, 64)), target, teacher_global=teacher, ckf_targets=Y)
    total.backward()
    m = s.model
    for p in (m.head.weight, m.head_dist.weight, m.cls_token, m.dist_token, m.patch_embed.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("T, alpha", [(1.0, 0.3), (2.0, 1.0), (4.0, 0.0)])
def test_soft_ckf_is_the_official_formula(T, alpha):
    """The official code's soft CKF loss, written out by hand: fused = alpha * dense + (1 - alpha) * global (logit
    space, per position), then sum over batch, classes and positions of p_t * (log p_t - log p_s) at temperature T,
    times T^2, divided by the batch size. Our path: the teacher's logits through the `full` encoding (fp16 dense,
    fp32 global, as cached), fused by decode_fused, into CSKDLoss.spatial_soft."""
    from cskd_cache.cache.encodings import make_encoding

    g = torch.Generator().manual_seed(7)
    student = torch.randn(B, K, h, w, generator=g)
    t_dense = (torch.randn(B, h * w, K, generator=g) * 3).half().float()  # what the cache keeps: fp16 values
    t_global = t_dense.mean(1)
    fused = alpha * t_dense.double() + (1 - alpha) * t_global.double()[:, None, :]  # [B, P, K]
    log_pt = torch.log_softmax(fused / T, -1)
    log_ps = torch.log_softmax(student.double().flatten(2).transpose(1, 2) / T, -1)  # positions row-major
    want = float((log_pt.exp() * (log_pt - log_ps)).sum() * T * T / B)
    enc = make_encoding("full", K, h * w)
    arrays, _ = enc.encode(t_dense, t_global)
    loss = CSKDLoss(temperature=T, cskd_type="soft")
    got = loss.spatial_soft(student, enc.decode_fused(arrays, alpha))
    assert float(got) == pytest.approx(want, rel=1e-5)
