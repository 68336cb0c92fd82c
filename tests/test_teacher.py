"""Teacher: dense logits = its classifier at every position, global = their mean = its own output."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from cskd_cache.errors import CacheError
from cskd_cache.teacher import DenseTeacher, create_teacher


def test_dense_is_classifier_at_every_position_and_global_is_model_output():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5).eval()
    t = DenseTeacher(model)
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
