"""Teacher: dense logits = its classifier at every position, global = their mean = its own output."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from cskd_cache.errors import CacheError
from cskd_cache.teacher.model import DenseTeacher, create_teacher


def test_dense_is_classifier_at_every_position_and_global_is_model_output():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5).eval()
    t = DenseTeacher(model, view_mean=(0.5,) * 3, view_std=(0.5,) * 3)  # views normalised as the model wants
    assert t.renorm.identity
    x = torch.randn(3, 3, 64, 64)
    dense, glob = t(x)
    feats = model.forward_features(x)
    manual = torch.einsum("bchw,kc->bhwk", feats, model.fc.weight) + model.fc.bias
    assert dense.shape == (3, 4, 5) and t.grid(64) == (2, 2)
    assert torch.allclose(dense, manual.reshape(3, 4, 5), atol=1e-5)
    assert torch.allclose(glob, model(x), atol=1e-5)
    assert t.check_global_equals_output(64)


def test_regnety_160_grid_is_7x7_with_3024_channels():
    model = timm.create_model("regnety_160").eval()  # random init: the reference facts are architectural
    t = DenseTeacher(model)
    x = torch.randn(1, 3, 224, 224)
    assert model.forward_features(x).shape == (1, 3024, 7, 7)
    dense, glob = t(x)
    assert dense.shape == (1, 49, 1000)
    assert torch.allclose(glob, model(x), atol=1e-4)


def test_model_without_spatial_map_is_refused():
    t = DenseTeacher(timm.create_model("test_vit", num_classes=3, img_size=64).eval())
    with pytest.raises(CacheError, match="no spatial feature map"):
        t.grid(64)


def test_checkpoints_load_weights_only(tmp_path, teacher_checkpoint):
    t, info = create_teacher("test_resnet", checkpoint=str(teacher_checkpoint))
    assert info["num_classes"] == 4 and len(info["checkpoint_sha256"]) == 64
    sd = timm.create_model("test_resnet", num_classes=4).state_dict()
    torch.manual_seed(0)
    ref = timm.create_model("test_resnet", num_classes=4).state_dict()
    save_file(ref, tmp_path / "t.safetensors")
    t2, info2 = create_teacher("test_resnet", checkpoint=str(tmp_path / "t.safetensors"))
    assert info2["weights_sha256"] == info["weights_sha256"]  # same weights, either format
    save_file(sd, tmp_path / "other.safetensors")
    assert create_teacher("test_resnet", checkpoint=str(tmp_path / "other.safetensors"))[1]["weights_sha256"] \
        != info["weights_sha256"]
    # a pickle holding arbitrary objects is refused by weights_only loading
    torch.save({"model": ref, "evil": object()}, tmp_path / "evil.pth")
    with pytest.raises(CacheError, match="not a readable weights file"):
        create_teacher("test_resnet", checkpoint=str(tmp_path / "evil.pth"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="no_such_net", checkpoint=None, pretrained=True), "unknown timm model"),
    (dict(name="test_resnet", checkpoint=None, pretrained=False), "no teacher weights"),
    (dict(name="test_resnet", checkpoint="/nonexistent.pth"), "no such file"),
    (dict(name="test_resnet", pretrained=True), "--teacher-checkpoint"),  # hub unreachable here
])
def test_clear_errors(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(CacheError, match=match):
        create_teacher(name, **kwargs)


def test_regnety_160_alias_is_deits_teacher(monkeypatch):
    seen = {}

    def fake_create(name, pretrained=False, **kw):
        seen["name"] = name
        raise OSError("offline")

    monkeypatch.setattr(timm, "create_model", fake_create)
    with pytest.raises(CacheError):
        create_teacher("regnety_160", pretrained=True)
    assert seen["name"] == "regnety_160.deit_in1k"


def test_each_model_sees_the_views_pixels_in_its_own_units():
    """Views are the recipe's pixels in the recipe's units (ImageNet mean/std); test_resnet's config says 0.5/0.5.
    Teacher and student must both see exactly the view's pixels, each in its own units, for every kind of view
    (RandAugment fills, random erasing, mixing). What they do not see (and the docstring says so): a 0.5/0.5 transform's
    own view, whose fill colour and erasing noise differ; the seeds below include both cases."""
    import skimage.data
    from PIL import Image

    from cskd_cache.training.student import create_student
    from cskd_cache.data.recipe import Recipe, build_transform
    from cskd_cache.data.replay import augment, mix_pair

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3).eval()
    assert tuple(model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    img = Image.fromarray(skimage.data.chelsea()).convert("RGB")
    imagenet, half = Recipe(input_size=64), Recipe(input_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    seeds = range(12)
    x_view = torch.stack([augment(build_transform(imagenet), img, s) for s in seeds])
    x_own = torch.stack([augment(build_transform(half), img, s) for s in seeds])
    x_view[0], x_view[1] = mix_pair(x_view[0], x_view[1], 0.7, 1, None)  # a mixup pair too
    vm, vs = torch.tensor(imagenet.mean).view(1, 3, 1, 1), torch.tensor(imagenet.std).view(1, 3, 1, 1)
    pixels = x_view * vs + vm  # the view's pixels (0..1, noise where erased)
    t = DenseTeacher(model, view_mean=imagenet.mean, view_std=imagenet.std)
    s = create_student("deit_tiny_distilled_patch16_224", 3, 64, (2, 2), view_mean=imagenet.mean,
                       view_std=imagenet.std)
    assert not t.renorm.identity and s.renorm.identity  # DeiT's config is ImageNet's: the view as it is
    torch.testing.assert_close(t.renorm(x_view) * 0.5 + 0.5, pixels, atol=1e-5, rtol=0)  # the same pixels
    torch.testing.assert_close(t(x_view)[1], model((pixels - 0.5) / 0.5), atol=1e-4, rtol=1e-4)
    # mixing commutes with the map: a mixed view is the mix of the two renormalised views
    a, b = t.renorm(torch.stack([augment(build_transform(imagenet), img, s) for s in (0, 1)]))
    torch.testing.assert_close(t.renorm(x_view[:2]), torch.stack(mix_pair(a, b, 0.7, 1, None)), atol=1e-5, rtol=0)
    # not the 0.5/0.5 transform's own view: fill colour (recipe mean) and erasing noise (recipe units) differ
    differ = (t.renorm(x_view[2:]) - x_own[2:]).abs().flatten(1).amax(1) > 0.1
    assert 3 <= int(differ.sum()) < len(differ)  # seeds with fills or erasing differ, the others do not
    fed_raw = DenseTeacher(model, view_mean=(0.5,) * 3, view_std=(0.5,) * 3)(x_view)[1]
    assert not torch.allclose(fed_raw, t(x_view)[1], atol=1e-3)  # fed unconverted, it would see other inputs


def test_precision_is_a_choice_and_recorded(tmp_path, teacher_checkpoint):
    from cskd_cache.teacher.model import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision(None, torch.device("cuda")) == "fp16"  # the official code's teacher autocast
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(CacheError, match="--teacher-precision"):
        resolve_precision("int8", torch.device("cpu"))
    t32, info = create_teacher("test_resnet", checkpoint=str(teacher_checkpoint))
    tb, info_b = create_teacher("test_resnet", checkpoint=str(teacher_checkpoint), precision="bf16")
    assert info["precision"] == "fp32" and info_b["precision"] == "bf16"
    x = torch.randn(2, 3, 64, 64)
    d32, _ = t32(x)
    db, gb = tb(x)
    assert db.dtype == gb.dtype == torch.float32  # outputs are fp32 whatever the forward ran in
    assert not torch.equal(d32, db) and torch.allclose(d32, db, atol=0.1)
