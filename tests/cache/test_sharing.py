"""Sharing caches (issue 9): a checksum list, export to one file, pull all or some epochs (resumable, checked),
merge epochs computed apart, extend with more epochs; read over HTTP from a real web server (aiohttp's, and nginx
where it is installed), from S3 (moto), from a zip."""

import json
import os
import subprocess

import numpy as np
import pytest
import zarr
from conftest import one_line, precompute_args, run_cli
from servers import KINDS, NGINX, bytes_sent, http_server, s3
from conftest import assert_same_cache

from cskd_cache.cache.store import Cache

STUDENT = "deit_tiny_distilled_patch16_224"


def train_args(data, cache, out, *extra):
    return ["train", "--student", STUDENT, "--data", data, "--cache", cache, "--out", out, "--epochs", "2",
            "--batch-size", "8", "--workers", "0", "--max-steps", "2", *extra]


@pytest.fixture(params=KINDS)
def web_server(request):
    """The static web server a lab publishes with: aiohttp's (always: a dependency), nginx where installed."""
    if request.param == "nginx" and NGINX is None:
        pytest.skip("nginx is not installed (the aiohttp variant ran)")
    return request.param


@pytest.fixture
def cache3(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "c3.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "3"))[0] == 0
    return out


def test_every_file_is_listed_with_its_sha256(cache3):
    m = Cache.open(str(cache3)).manifest
    assert m["files"]["list"] == "SHA256SUMS" and m["files"]["count"] > 20
    r = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=cache3, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr  # the standard tool checks a copy, no Zarr needed
    listed = {line.split("  ", 1)[1] for line in (cache3 / "SHA256SUMS").read_text().splitlines()}
    on_disk = {os.path.relpath(os.path.join(d, f), cache3) for d, _, fs in os.walk(cache3) for f in fs}
    assert on_disk - listed == {"zarr.json", "SHA256SUMS"}
    (cache3 / "samples" / "label" / "c" / "0").write_bytes(b"tampered")
    code, text = run_cli("verify", cache3)
    assert code == 1 and "samples/label/c/0: sha256 differs" in text


def test_export_to_one_zip_and_read_it(tmp_path, image_folder, cache3):
    zipped = tmp_path / "c3.zarr.zip"
    code, text = run_cli("export", cache3, zipped)
    assert code == 0 and zipped.exists(), text
    zs = zarr.open_group(zarr.storage.ZipStore(str(zipped), mode="r"), mode="r")  # any Zarr v3 reader
    assert np.array_equal(zs["views/fingerprint"][:24], Cache.open(str(cache3)).read_fingerprints(0, 24))
    code, text = run_cli("verify", zipped, "--replay", "8", "--data", image_folder)
    assert code == 0 and "every file matches SHA256SUMS" in text, text
    code, text = run_cli(*train_args(image_folder, zipped, tmp_path / "run"))
    assert code == 0, text
    code, text = run_cli("export", cache3, tmp_path / "one.zarr.zip", "--epochs", "1")
    assert code == 0 and Cache.open(str(tmp_path / "one.zarr.zip")).usable_epochs == [1]
    one_line(*run_cli("export", cache3, tmp_path / "x.tar"), "zarr.zip")


def test_pull_all_or_some_epochs_resumably_and_checked(tmp_path, image_folder, cache3):
    full = tmp_path / "full.zarr"
    code, text = run_cli("pull", cache3, full)
    assert code == 0, text
    assert_same_cache(full, cache3)
    assert run_cli("verify", full)[0] == 0
    # resumable: a deleted and a damaged file are fetched again, nothing else
    os.remove(full / "views" / "ckf_dense" / "c" / "1" / "0" / "0")
    (full / "plan" / "seed" / "c" / "2" / "0").write_bytes(b"x")
    from cskd_cache.cache.share import pull

    r = pull(str(cache3), str(full), show_progress=False)
    assert 0 < r["bytes_fetched"] < 4096
    assert run_cli("verify", full)[0] == 0
    # some epochs: a partial copy of byte-identical files, trained from on its epochs only
    part = tmp_path / "part.zarr"
    code, text = run_cli("pull", cache3, part, "--epochs", "1")
    assert code == 0 and "epochs 1," in text, text
    c = Cache.open(str(part))
    assert c.manifest["status"] == "partial" and c.usable_epochs == [1] and not c.complete
    code, text = run_cli("inspect", part)
    assert "partial" in text and "epochs 1 usable" in text, text
    code, text = run_cli("verify", part)
    assert code == 0 and "partial: epochs 1" in text, text
    code, text = run_cli(*train_args(image_folder, part, tmp_path / "run"))
    assert code == 0, text
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["cached_epoch"] for r in rows] == [1, 1]
    # a damaged source is never copied
    (cache3 / "views" / "global_value" / "c" / "0" / "0").write_bytes(b"bad")
    one_line(*run_cli("pull", cache3, tmp_path / "bad.zarr"), "global_value", "sha256 does not match")
    one_line(*run_cli("pull", cache3, tmp_path / "x.zarr", "--epochs", "7"), "epochs 0-2")


def test_pulls_into_one_folder_add_up(tmp_path, image_folder, teacher_checkpoint, cache3):
    """A second pull into the same folder adds its epochs to those held (issue 20: it dropped the first's);
    a folder holding another cache, or another state of this one, is refused with the reason."""
    local = tmp_path / "local.zarr"
    assert run_cli("pull", cache3, local, "--epochs", "0-0")[0] == 0
    code, text = run_cli("pull", cache3, local, "--epochs", "2")
    assert code == 0 and "epochs 0,2 (added 2 to 0)" in text, text
    c = Cache.open(str(local))
    assert c.manifest["status"] == "partial" and c.manifest["epochs_held"] == [0, 2] and c.usable_epochs == [0, 2]
    code, text = run_cli("verify", local)
    assert code == 0 and "partial: epochs 0,2" in text, text
    code, text = run_cli(*train_args(image_folder, local, tmp_path / "run", "--epochs", "2"))
    assert code == 0, text
    assert [json.loads(line)["cached_epoch"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [0, 2]
    # a file of an epoch held before that went missing is fetched again; the rest are kept as they are
    os.remove(local / "plan" / "seed" / "c" / "0" / "0")
    code, text = run_cli("pull", cache3, local, "--epochs", "1")
    assert code == 0 and "epochs 0-2 (added 1 to 0,2)" in text, text
    assert Cache.open(str(local)).complete
    assert_same_cache(local, cache3)
    assert run_cli("verify", local)[0] == 0
    # another cache in the folder: refused, the folder untouched
    other = tmp_path / "other.zarr"
    assert run_cli(*precompute_args(image_folder, other, teacher_checkpoint, "--epochs", "3", "--seed", "1"))[0] == 0
    before = (local / "zarr.json").read_bytes()
    one_line(*run_cli("pull", other, local, "--epochs", "0"), "holds another cache", "epochs 0-2",
             "pull into a new folder")
    assert (local / "zarr.json").read_bytes() == before
    # the source extended since the first pull: another state of it, whose files may differ
    grown = tmp_path / "grown.zarr"
    assert run_cli("pull", cache3, grown, "--epochs", "0")[0] == 0
    assert run_cli(*precompute_args(image_folder, cache3, teacher_checkpoint, "--epochs", "4"))[0] == 0
    one_line(*run_cli("pull", cache3, grown, "--epochs", "3"), "another state of this cache", "SHA256SUMS")
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")  # any other Zarr group
    one_line(*run_cli("pull", cache3, plain.store.root, "--epochs", "0"), "not a pull of", "new or empty folder")


def test_merge_epochs_computed_apart_equals_one_run(tmp_path, image_folder, teacher_checkpoint, cache3):
    """Lab A computes epochs 0-1, lab B epoch 2, of the same 3-epoch plan; merged, it is the 3-epoch cache."""
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    code, text = run_cli(*precompute_args(image_folder, a, teacher_checkpoint, "--epochs", "3", "--only-epochs",
                                          "0-1"))
    assert code == 0 and "partial" in text, text
    assert run_cli(*precompute_args(image_folder, b, teacher_checkpoint, "--epochs", "3", "--only-epochs", "2"))[0] == 0
    assert Cache.open(str(a)).usable_epochs == [0, 1] and Cache.open(str(b)).usable_epochs == [2]
    code, text = run_cli("merge", a, b, "--out", tmp_path / "m.zarr")
    assert code == 0 and "complete" in text, text
    assert_same_cache(tmp_path / "m.zarr", cache3)
    assert run_cli("verify", tmp_path / "m.zarr")[0] == 0
    one_line(*run_cli("merge", a, a, "--out", tmp_path / "x.zarr"), "in both")
    other = tmp_path / "o.zarr"
    assert run_cli(*precompute_args(image_folder, other, teacher_checkpoint, "--epochs", "3", "--seed", "1",
                                    "--only-epochs", "2"))[0] == 0
    one_line(*run_cli("merge", a, other, "--out", tmp_path / "y.zarr"), "not the same plan", "plan")


def test_extend_computes_only_the_new_epochs(tmp_path, image_folder, teacher_checkpoint, cache3):
    out = tmp_path / "e.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "2"))[0] == 0
    first = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "views").rglob("*") if p.is_file()
             and "/shard_" not in str(p) and "zarr.json" not in p.name}  # markers are rewritten
    code, text = run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "3"))
    assert code == 0 and "extending" in text and "complete" in text, text
    changed = [str(p) for p, (t, b) in first.items() if p.stat().st_mtime_ns != t or p.read_bytes() != b]
    assert first and not changed, changed  # the epochs it held: untouched
    assert_same_cache(out, cache3)
    one_line(*run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--epochs", "2")), "would drop",
             "pull")


def test_read_over_http(tmp_path, image_folder, cache3, web_server):
    """inspect, verify and train read a cache from a real web server (Range requests, no folder listing), lazily:
    training fetches at most 1.2x the stored bytes of the views it reads; a .zarr.zip works over HTTP too."""
    served = tmp_path / "www"
    served.mkdir()
    os.rename(cache3, served / "c.zarr")
    assert run_cli("export", served / "c.zarr", served / "c.zarr.zip")[0] == 0
    with http_server(web_server, served, tmp_path / "server") as (base, log):
        url = f"{base}/c.zarr"
        code, text = run_cli("inspect", url)
        assert code == 0 and "complete" in text, text
        code, text = run_cli("verify", url, "--replay", "8", "--data", image_folder)
        assert code == 0 and "every file matches" in text, text
        open(log, "w").close()
        code, text = run_cli("train", "--student", STUDENT, "--data", image_folder, "--cache", url, "--out",
                             tmp_path / "run", "--epochs", "1", "--batch-size", "8", "--workers", "0")
        assert code == 0, text
        c = Cache.open(str(served / "c.zarr"))
        stored = sum(v["stored"] for v in c.bytes_per_view().values()) + 8  # + the 8-byte fingerprint
        views = 24  # one training epoch: every view of cached epoch 0
        fetched = bytes_sent(log, "/views/")
        assert fetched <= 1.2 * stored * views, (fetched, stored * views)  # lazily: one epoch, whole chunks
        code, text = run_cli("train", "--student", STUDENT, "--data", image_folder, "--cache", f"{base}/c.zarr.zip",
                             "--out", tmp_path / "run-zip", "--epochs", "1", "--batch-size", "8", "--workers", "0")
        assert code == 0, text
        code, text = run_cli("pull", url, tmp_path / "pulled.zarr", "--epochs", "0-1")
        assert code == 0 and run_cli("verify", tmp_path / "pulled.zarr")[0] == 0, text


def test_read_from_s3(tmp_path, image_folder, cache3, monkeypatch):
    import fsspec

    with s3(monkeypatch):
        fs = fsspec.filesystem("s3")
        fs.mkdir("labcache")
        fs.put(str(cache3), "labcache/c3.zarr", recursive=True)
        url = "s3://labcache/c3.zarr"
        code, text = run_cli("verify", url, "--replay", "8", "--data", image_folder)
        assert code == 0 and "every file matches" in text, text
        code, text = run_cli(*train_args(image_folder, url, tmp_path / "run"))
        assert code == 0, text
        code, text = run_cli("pull", url, tmp_path / "p.zarr", "--epochs", "2")
        assert code == 0 and Cache.open(str(tmp_path / "p.zarr")).usable_epochs == [2], text


def test_remote_webdataset_is_indexed_once_and_read_by_byte_range(tmp_path, image_folder, teacher_checkpoint,
                                                                  monkeypatch, web_server):
    """Shards over HTTP: the tar index is built once (one pass per shard) and saved; every later open reuses it
    (a HEAD request checks size and ETag), and each image read fetches exactly its member's bytes."""
    import webdataset as wds

    from cskd_cache.data.open import open_source

    src = open_source(str(image_folder))
    www = tmp_path / "www"
    www.mkdir()
    members = 0
    for s in range(2):
        with wds.TarWriter(str(www / f"train-{s:03d}.tar")) as w:
            for i in range(s, len(src), 2):
                data = src.read_bytes(i)
                members += len(data)
                w.write({"__key__": f"s{i:04d}", "png": data, "cls": str(src.labels[i]).encode()})
    monkeypatch.setenv("CSKD_CACHE_INDEX_DIR", str(tmp_path / "index"))
    with http_server(web_server, www, tmp_path / "server") as (base, log):
        spec = f"{base}/train-{{000..001}}.tar"
        code, text = run_cli(*precompute_args(spec, tmp_path / "c.zarr", teacher_checkpoint, "--repeats", "1"))
        assert code == 0, text
        assert len(list((tmp_path / "index").glob("*.json"))) == 2
        full = [line for line in open(log) if ".tar" in line and line.startswith("GET") and '"-"' in line]
        assert len(full) <= 2  # one pass per shard, at most
        open(log, "w").close()
        code, text = run_cli(*train_args(spec, tmp_path / "c.zarr", tmp_path / "run", "--max-steps", "3"))
        assert code == 0, text
        lines = [line.split() for line in open(log) if ".tar" in line]
        gets = [ln for ln in lines if ln[0] == "GET"]
        assert gets and all(ln[4] != '"-"' for ln in gets)  # every read is a Range request
        fetched = sum(int(ln[3]) for ln in gets)
        per_image = fetched / len(gets)
        assert per_image <= 1.1 * members / len(src)  # exactly the members' bytes (sizes vary a little)


def test_one_dataset_in_any_packaging(tmp_path, image_folder, teacher_checkpoint):
    """A cache made from an ImageFolder copy trains with a WebDataset copy of the same images (matched by file
    stem, or by content) and with another folder layout, and refuses when a cached sample is missing."""
    import webdataset as wds

    from cskd_cache.data.open import open_source

    first = open_source(str(image_folder))
    folder = tmp_path / "folder"  # ImageNet-like: file stems are unique across classes
    for i, k in enumerate(first.keys):
        c, name = k.split("/")
        p = folder / c / f"{c}_{name}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(first.read_bytes(i))
    src = open_source(str(folder))
    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(folder, out, teacher_checkpoint, "--content-hash"))[0] == 0
    shard = tmp_path / "wds" / "train-000.tar"
    shard.parent.mkdir()
    with wds.TarWriter(str(shard)) as w:
        for i in reversed(range(len(src))):  # another order, another container, keys = file stems
            w.write({"__key__": src.keys[i].split("/")[1].rsplit(".", 1)[0], "png": src.read_bytes(i),
                     "cls": str(src.labels[i]).encode()})
    code, text = run_cli(*train_args(shard, out, tmp_path / "k"))
    assert code == 2 and "another dataset" in text  # by key: not the same samples
    for how in ("stem", "content"):
        code, text = run_cli(*train_args(shard, out, tmp_path / how, "--match", how))
        assert code == 0 and "matched 24 of 24 cached samples" in text and f"by {how}" in text, text
    deeper = tmp_path / "deeper"
    for i, k in enumerate(src.keys):  # another layout of the same files: one folder deeper
        p = deeper / k.split("/")[0] / "sub" / k.split("/")[1]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(src.read_bytes(i))
    code, text = run_cli("verify", out, "--replay", "8", "--data", deeper, "--match", "stem")
    assert code == 0, text
    next((deeper / "class_0" / "sub").iterdir()).unlink()
    one_line(*run_cli(*train_args(deeper, out, tmp_path / "m", "--match", "stem")), "lacks 1 of the 24",
             "by stem")
    plain = tmp_path / "plain.zarr"
    assert run_cli(*precompute_args(folder, plain, teacher_checkpoint))[0] == 0
    one_line(*run_cli(*train_args(shard, plain, tmp_path / "n", "--match", "content")), "--content-hash")


def test_replay_drift_is_measured_and_small_drift_tolerated(tmp_path, image_folder, teacher_checkpoint):
    """Another lab's libraries round a few pixels differently: the fingerprints differ, the 64-byte signatures
    barely. verify reports how many views drift and by how much; training counts and tolerates that, and stops
    on real differences (or on any, with --replay-tolerance 0)."""
    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--repeats", "1"))[0] == 0
    from PIL import Image

    for p in sorted(image_folder.rglob("*.png")):  # a few pixels a few levels off, as another Pillow would
        a = np.asarray(Image.open(p)).copy()
        a[::7, ::5] = np.clip(a[::7, ::5].astype(int) + 3, 0, 255)
        Image.fromarray(a).save(p)
    code, text = run_cli("verify", out, "--replay", "24", "--data", image_folder)
    assert code == 0 and "within tolerance 0.025" in text, text
    code, text = run_cli("verify", out, "--replay", "24", "--data", image_folder, "--replay-tolerance", "0")
    assert code == 1 and "by more than 0.0" in text, text
    code, text = run_cli(*train_args(image_folder, out, tmp_path / "run", "--max-steps", "3"))
    assert code == 0 and "warning:" in text and "within --replay-tolerance 0.025" in text, text
    assert "the same library versions as now" in text  # the images changed here, not a library
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[0]["replay_drifted"] > 0
    code, text = run_cli(*train_args(image_folder, out, tmp_path / "strict", "--replay-tolerance", "0"))
    assert code == 2 and "replay drift" in text and "tolerance 0.0" in text, text


def test_teacher_check_and_requirements(tmp_path, image_folder, teacher_checkpoint):
    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint, "--encoding", "full"))[0] == 0
    code, text = run_cli("verify", out, "--data", image_folder, "--teacher-check", "8", "--teacher-checkpoint",
                         teacher_checkpoint)
    assert code == 0 and "teacher re-run on 8 views" in text and "0.00% of CKF targets" in text, text
    import timm
    import torch

    torch.manual_seed(5)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_resnet", num_classes=4).state_dict(), other)
    one_line(*run_cli("verify", out, "--data", image_folder, "--teacher-check", "8", "--teacher-checkpoint", other),
             "not the cache's teacher")
    group = zarr.open_group(str(out), mode="r+")  # stored outputs that are not the teacher's
    group["views/dense"][0:8] = np.random.default_rng(0).normal(size=(8, 4, 4)).astype(np.float16) * 5
    code, text = run_cli("verify", out, "--data", image_folder, "--teacher-check", "8", "--teacher-checkpoint",
                         teacher_checkpoint)
    assert code == 1 and "the teacher re-run changes" in text, text
    code, text = run_cli("inspect", out, "--requirements")
    lines = text.split()
    assert code == 0 and any(line.startswith("torch==") for line in lines) and any(
        line.startswith("pillow==") for line in lines) and any(line.startswith("timm==") for line in lines)


def _teacher_that_reads_the_pixels(images, path) -> None:
    """test_resnet whose classifier is fitted (least squares on its pooled features) to the images' classes, so
    that its targets follow the pixels as a trained teacher's do (a random one answers the same everywhere)."""
    import timm
    import torch
    from PIL import Image

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4).eval()
    files = sorted(images.rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).resize((64, 64)), dtype=np.float32) / 255)
                     .permute(2, 0, 1) for p in files])
    y = torch.tensor([int(p.parent.name.split("_")[1]) for p in files])
    with torch.no_grad():
        f = model.forward_head(model.forward_features(x), pre_logits=True)
        f = torch.cat([f, torch.ones(len(f), 1)], 1)
        w = torch.linalg.lstsq(f, torch.nn.functional.one_hot(y, 4).float() * 2 - 1).solution * 10
        model.fc.weight.copy_(w[:-1].T)
        model.fc.bias.copy_(w[-1])
    torch.save(model.state_dict(), path)


def test_teacher_check_tells_drifted_views_from_exact_ones(tmp_path, image_folder, monkeypatch):
    """Another Pillow drifts some views (issue 20: 3.8% of targets differed under Pillow 10.4 and a healthy cache
    failed, unexplained). The verdict is the views that replay exactly; drifted ones are reported apart with the
    library whose version differs; with no exact view left, the re-run cannot tell and says so."""
    from PIL import Image

    import cskd_cache.data.recipe as recipe

    teacher = tmp_path / "teacher.pth"
    _teacher_that_reads_the_pixels(image_folder, teacher)
    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher, "--encoding", "full", "--repeats", "1"))[0] == 0
    files = sorted(image_folder.rglob("*.png"))
    for p in files[::4]:  # what another library does to some views' pixels, much amplified
        Image.fromarray(255 - np.asarray(Image.open(p))).save(p)
    versions = recipe.library_versions
    monkeypatch.setattr(recipe, "library_versions", lambda: dict(versions(), pillow="10.4.0"))
    then = Cache.open(str(out)).manifest["recipe"]["library_versions"]["pillow"]
    check = ["verify", out, "--data", image_folder, "--teacher-check", "24", "--teacher-checkpoint", teacher]
    code, text = run_cli(*check)
    overall = float(text.split("teacher re-run on 24 views (fp32, cpu): ")[1].split("%")[0])
    assert code == 0 and overall > 2.0, text  # over the tolerance taken together, as verify judged before
    assert "on the 14 views that replay exactly: 0.00% of CKF targets and 0.00% of global argmaxes" in text, text
    drifted = float(text.split("on the 10 whose replay drifted: ")[1].split("%")[0])
    assert drifted > 2.0 and f"pillow {then} then, 10.4.0 now" in text, text
    for p in set(files) - set(files[::4]):  # now every view drifts: nothing tells the teacher from the replay
        Image.fromarray(255 - np.asarray(Image.open(p))).save(p)
    code, text = run_cli(*check)
    assert code == 1 and "none of which replays exactly" in text and f"pillow {then} then, 10.4.0 now" in text, text
    assert "inspect CACHE --requirements" in text
