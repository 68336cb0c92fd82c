"""What `train` tells a second lab (issue 20): the same images packaged otherwise are pointed to `--match`, not to
`--force` (which would pair cached targets with other images); a warmup as long as the run is said; timm's note
that a one-epoch cosine does nothing is not printed."""

import webdataset as wds
from conftest import make_images, one_line, precompute_args, run_cli

from cskd_cache.data.open import open_source

STUDENT = "deit_tiny_distilled_patch16_224"


def train_args(data, cache, out, *extra):
    return ["train", "--student", STUDENT, "--data", data, "--cache", cache, "--out", out, "--epochs", "2",
            "--warmup-epochs", "1", "--batch-size", "8", "--workers", "0", "--max-steps", "1", *extra]


def _as_webdataset(folder, shard):
    """The folder's images as one WebDataset shard keyed by file stem (another lab's packaging)."""
    src = open_source(str(folder))
    shard.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(shard)) as w:
        for i in reversed(range(len(src))):
            w.write({"__key__": src.keys[i].split("/")[1].rsplit(".", 1)[0], "png": src.read_bytes(i),
                     "cls": str(src.labels[i]).encode()})


def test_another_packaging_is_pointed_to_match_not_force(tmp_path, image_folder, teacher_checkpoint):
    folder = tmp_path / "folder"  # ImageNet-like names: file stems unique across classes
    src = open_source(str(image_folder))
    for i, k in enumerate(src.keys):
        c, name = k.split("/")
        (folder / c).mkdir(parents=True, exist_ok=True)
        (folder / c / f"{c}_{name}").write_bytes(src.read_bytes(i))
    cache = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(folder, cache, teacher_checkpoint))[0] == 0
    shard = tmp_path / "wds" / "train-000.tar"
    _as_webdataset(folder, shard)
    code, text = run_cli(*train_args(shard, cache, tmp_path / "a"))
    one_line(code, text, "another dataset", "--match stem finds every cached sample", "pass --match stem")
    assert "--force" not in text  # it would train on wrong pairings
    code, text = run_cli(*train_args(shard, cache, tmp_path / "b", "--match", "stem"))  # the advice works
    assert code == 0 and "matched 24 of 24 cached samples" in text, text
    assert "--warmup-epochs" not in text  # 1 of 2 epochs: nothing to say
    # another dataset altogether: both ways named, and precompute, never --force
    other = make_images(tmp_path / "other", seed=1)
    code, text = run_cli(*train_args(other, cache, tmp_path / "c"))
    one_line(code, text, "another dataset", "--match stem", "--match content", "precompute --content-hash",
             "precompute a cache from --data")
    assert "--force" not in text
    # more images than the cache was made from, under the same keys: --force is the way, and says so
    extra = folder / "class_0" / "class_0_extra.png"
    extra.write_bytes(next(folder.glob("class_1/*.png")).read_bytes())
    code, text = run_cli(*train_args(folder, cache, tmp_path / "d"))
    one_line(code, text, "every cached sample under its key", "--force")
    code, text = run_cli(*train_args(folder, cache, tmp_path / "e", "--force"))
    assert code == 0, text


def test_warmup_as_long_as_the_run_is_said_and_timm_is_quiet(tmp_path, image_folder):
    args = ["train", "--student", STUDENT, "--data", image_folder, "--teacher-source", "none", "--batch-size", "8",
            "--workers", "0", "--max-steps", "1"]
    code, text = run_cli(*args, "--out", tmp_path / "a", "--epochs", "1")  # the default warmup: 5 epochs
    assert code == 0, text
    assert "warning: --warmup-epochs 5 >= --epochs 1" in text and "never reaches" in text, text
    assert "Cosine annealing" not in text, text


def test_more_cached_epochs_than_training_epochs_is_said_plainly(tmp_path, image_folder, teacher_checkpoint):
    """A cache of 3 epochs read by a 1-epoch run: each view is used once (not 'used 0.333333 times')."""
    cache = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, cache, teacher_checkpoint, "--epochs", "3"))[0] == 0
    code, text = run_cli("train", "--student", STUDENT, "--data", image_folder, "--cache", cache, "--out",
                         tmp_path / "run", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8", "--workers",
                         "0", "--max-steps", "1")
    assert code == 0, text
    views = next(line for line in text.splitlines() if line.startswith("views:"))
    assert "1 of the 3 cached epochs are used, each view once" in views and "0.33" not in views, text
