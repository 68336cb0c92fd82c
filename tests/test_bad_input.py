"""Bad input everywhere gets one line and exit 2 (or is handled correctly), never a traceback: every numeric flag
of every command given a wrong type or an out-of-range number, missing paths, URLs that do not answer, empty and
one-class datasets, non-images, every image mode PIL decodes, decompression bombs, malformed WebDataset shards."""

import io
import struct
import zlib

import numpy as np
import pytest
import typer
import webdataset as wds
from conftest import make_images, one_line, precompute_args, run_cli
from PIL import Image

from cskd_cache.data.open import open_source
from cskd_cache.cache.store import Cache
from cskd_cache_cli.app import app



REQUIRED = {"precompute": ["--data", "d", "--out", "o"], "train": ["--data", "d", "--out", "o"],
            "fit-teacher": ["--data", "d", "--out", "o.pth"], "verify": ["c"], "demo": []}


def _numeric_options():
    group = typer.main.get_command(app)
    for name, required in REQUIRED.items():
        for p in group.commands[name].params:
            kind = {"int": "integer", "float": "float"}.get(p.bare_type(), "")
            if p.param_type_name == "option" and not p.hidden and kind in ("integer", "float"):
                yield name, required, p.opts[0], p


@pytest.mark.parametrize("command, required, flag, param", list(_numeric_options()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_numeric_flag_refuses_a_wrong_type(command, required, flag, param):
    code, text = run_cli(command, *required, flag, "twelve")
    one_line(code, text, flag)


@pytest.mark.parametrize("command, required, flag, param",
                         [o for o in _numeric_options() if o[3].name not in ("seed",)],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_numeric_flag_refuses_a_negative_number(command, required, flag, param):
    code, text = run_cli(command, *required, flag, "-1")
    if code == 2:
        one_line(code, text)
    else:  # a value the command accepts (none do today: keep the test honest if one ever should)
        pytest.fail(f"{command} {flag} -1 was accepted")


def test_every_option_has_help():
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if p.param_type_name == "option" and not p.hidden:
                assert p.help, (name, p.opts)


def _png_claiming(width, height) -> bytes:
    """A valid 1x1 PNG whose header claims another size: what a decompression bomb looks like to PIL."""
    b = io.BytesIO()
    Image.new("L", (1, 1)).save(b, format="PNG")
    data = bytearray(b.getvalue())
    ihdr = data[12:29]  # b'IHDR' + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_every_image_mode_is_read_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "images" / "a"
    d.mkdir(parents=True)
    gray = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    Image.fromarray(gray).save(d / "gray.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(gray.astype(np.uint16) * 257).save(d / "sixteen.png")  # 16-bit grayscale
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("P").save(d / "palette.png")
    (tmp_path / "images" / "b").mkdir()
    Image.fromarray(gray).save(tmp_path / "images" / "b" / "x.png")
    source = open_source(str(tmp_path / "images"))
    for i, key in enumerate(source.keys):
        img = source.load(i)
        assert img.mode == "RGB" and img.size == (20, 20), key
    sixteen = np.asarray(source.load(source.keys.index("a/sixteen.png")))[..., 0]
    assert np.array_equal(sixteen, gray)  # the top 8 bits, not 255 everywhere


def test_decompression_bomb_is_a_clear_error_or_skipped(tmp_path, teacher_checkpoint):
    images = make_images(tmp_path / "images", per_class=3)
    (images / "class_0" / "bomb.png").write_bytes(_png_claiming(30000, 30000))
    args = precompute_args(images, tmp_path / "c.zarr", teacher_checkpoint, "--repeats", "1")
    code, text = run_cli(*args)
    one_line(code, text, "class_0/bomb.png", "decompression bomb", "--skip-bad")
    code, text = run_cli(*args, "--skip-bad")
    assert code == 0 and "bomb.png" in text, text


@pytest.mark.parametrize("case", ["missing", "empty", "no_images", "non_images", "one_image", "url", "pipe",
                                  "tar_missing_key_image", "tar_duplicate_key", "tar_bad_label", "not_a_tar"])
def test_bad_datasets(tmp_path, teacher_checkpoint, case):
    data = tmp_path / "data"
    needles = []
    if case == "missing":
        needles = ["no such file"]
    elif case == "empty":
        data.mkdir()
        needles = ["no class sub-directories"]
    elif case == "no_images":
        (data / "a").mkdir(parents=True)
        (data / "a" / "notes.txt").write_text("hi")
        needles = ["no image files"]
    elif case == "non_images":
        for c in "abcd":  # the teacher's 4 classes
            (data / c).mkdir(parents=True)
            (data / c / "0.jpg").write_text("not a jpeg")
        needles = ["cannot decode image", "--skip-bad"]
    elif case == "one_image":
        make_images(data, per_class=1, classes=1)
        for c in "bcd":  # 4 classes, 1 image
            (data / c).mkdir()
        needles = ["at least 2"]
    elif case == "url":
        data = "http://127.0.0.1:9/train-{000..001}.tar"  # nothing listens on the discard port
        needles = ["--data", "127.0.0.1:9"]
    elif case == "pipe":
        data = "pipe:cat x.tar"
        needles = ["random access"]
    else:
        data.mkdir()
        shard = data / "train-000.tar"
        img = io.BytesIO()
        Image.new("RGB", (8, 8)).save(img, format="PNG")
        with wds.TarWriter(str(shard)) as w:
            if case == "tar_missing_key_image":
                w.write({"__key__": "a", "cls": b"0"})
                needles = ["has no image"]
            elif case == "tar_duplicate_key":
                w.write({"__key__": "a", "png": img.getvalue(), "cls": b"0"})
                w.write({"__key__": "b", "png": img.getvalue(), "cls": b"0"})
                w.write({"__key__": "a", "png": img.getvalue(), "cls": b"1"})
                needles = ["appears twice"]
            elif case == "tar_bad_label":
                w.write({"__key__": "a", "png": img.getvalue(), "cls": b"cat"})
                needles = ["not an integer"]
        if case == "not_a_tar":
            shard.write_bytes(b"\x1f\x8b compressed, not a tar")
            needles = ["not an uncompressed tar"]
        data = shard
    code, text = run_cli(*precompute_args(data, tmp_path / "c.zarr", teacher_checkpoint, "--repeats", "1"))
    one_line(code, text, *needles)


def test_one_class_is_a_dataset(tmp_path, teacher_checkpoint):
    """One class of the teacher's four: refused as another label space (the teacher was not fitted on it), unless
    the user says the labels are the teacher's class ids; then it is a dataset like any other."""
    images = make_images(tmp_path / "images", per_class=6, classes=1)
    code, text = run_cli(*precompute_args(images, tmp_path / "c.zarr", teacher_checkpoint))
    one_line(code, text, "4 classes", "1", "fit-teacher", "--same-label-space")
    code, text = run_cli(*precompute_args(images, tmp_path / "c.zarr", teacher_checkpoint, "--same-label-space"))
    assert code == 0 and Cache.open(str(tmp_path / "c.zarr")).complete, text
    assert Cache.open(str(tmp_path / "c.zarr")).manifest["dataset"]["label_space"] == "teacher"
