"""`cskd-cache fit-teacher --init-checkpoint`: fine-tuning local weights offline (the experiment's ImageNet teacher
starts this way), loaded weights-only, with a new classifier for the dataset's classes."""

import json

import timm
import torch
from conftest import NUM_CLASSES, TEACHER, run_cli


class NotWeights:
    """Pickled beside tensors: a weights-only load must refuse to build it (it could run code)."""


def test_fit_teacher_fine_tunes_local_weights_with_a_new_classifier(tmp_path, image_folder):
    """--init-checkpoint: local weights (a 1000-class file, as ImageNet weights are) are the starting point,
    loaded weights-only, with a classifier for the dataset's classes; offline, no hub."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(123)
    init = timm.create_model(TEACHER, num_classes=1000)
    save_file({k: v.contiguous() for k, v in init.state_dict().items()}, str(tmp_path / "init.safetensors"))
    out = tmp_path / "teacher.safetensors"
    code, text = run_cli("fit-teacher", "--data", image_folder, "--out", out, "--teacher", TEACHER,
                         "--init-checkpoint", tmp_path / "init.safetensors", "--epochs", "1", "--lr", "1e-12",
                         "--warmup-epochs", "0", "--batch-size", "8", "--input-size", "64", "--workers", "0")
    assert code == 0, text
    fitted = load_file(str(out))
    assert fitted["fc.weight"].shape == (NUM_CLASSES, init.fc.weight.shape[1])
    # every other parameter starts from the file (a learning rate of 1e-12 leaves it where it started)
    params = [k for k, _ in init.named_parameters() if not k.startswith("fc.")]
    assert params and all(torch.allclose(fitted[k], init.state_dict()[k], atol=1e-6) for k in params)
    report = json.loads((tmp_path / "teacher.safetensors.json").read_text())
    assert len(report["settings"]["init_checkpoint"]) == 64  # the weights' sha256, not where they lay
    # refusals, one line each, naming the flag
    other = timm.create_model("resnet10t", num_classes=4)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    # a pickle that builds an object: refused by the weights-only load, never run
    torch.save({"fc.weight": torch.zeros(1), "x": NotWeights()}, tmp_path / "pickle.pth")
    for path, why in ((tmp_path / "other.pth", "does not fit --teacher"), (tmp_path / "nope.pth", "no such file"),
                      (tmp_path / "pickle.pth", "not a readable weights file")):
        code, text = run_cli("fit-teacher", "--data", image_folder, "--out", tmp_path / "t.pth", "--teacher", TEACHER,
                             "--init-checkpoint", path, "--workers", "0")
        assert code == 2 and len(text.strip().splitlines()) == 1 and "--init-checkpoint" in text and why in text, text
