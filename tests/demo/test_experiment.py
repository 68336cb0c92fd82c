"""`cskd-cache experiment`: its datasets (Fashion-MNIST's IDX files, elpv's package, both optional), the paired
statistics and their wording, the gates, and `--quick` end to end through the CLI."""

import gzip
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from cskd_cache.data.open import open_source
from cskd_cache.demo.datasets import DatasetMissing, available, write_dataset
from cskd_cache.demo.report import format_report, gates, summarize
from cskd_cache.demo.stats import paired, verdict
from cskd_cache.errors import CacheError


def _idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """Fashion-MNIST's four IDX files, tiny: image i of a file holds i in its first two rows (i % 256, i // 256), so
    every image can be traced back to its index, and its third row says its file (0: train, 255: t10k)."""
    d = tmp_path / "fashion"
    d.mkdir()
    for prefix, n in (("train", 300), ("t10k", 100)):
        images = np.zeros((n, 28, 28))
        images[:, 0], images[:, 1] = (np.arange(n) % 256)[:, None], (np.arange(n) // 256)[:, None]
        images[:, 2] = 255 * (prefix == "t10k")
        _idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        _idx(d / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv("CSKD_FASHION_MNIST", str(d))
    return d


def _read(spec, two_rows: bool = True):
    """The source and the index each image encodes (two rows, or its constant value)."""
    src = open_source(spec)
    pixels = [np.asarray(src.load(i)).astype(int) for i in range(len(src))]
    return src, [int(p[0, 0, 0] + 256 * p[1, 0, 0] * two_rows) for p in pixels]


def test_fashion_mnist_splits_are_disjoint_balanced_shards(tmp_path, fake_fashion):
    splits = write_dataset("fashion-mnist", str(tmp_path / "data"), (60, 20, 30))
    train, train_ids = _read(splits.train)
    val, val_ids = _read(splits.val)
    test, _ = _read(splits.test)
    assert (len(train), len(val), len(test)) == (60, 20, 30)
    assert not set(train_ids) & set(val_ids)  # train and validation: other images of the same file
    for src, n in ((train, 6), (val, 2), (test, 3)):  # class-balanced, labels from the IDX label file
        assert np.bincount(src.labels, minlength=10).tolist() == [n] * 10
    assert train.classes[0] == "t-shirt" and len(train.classes) == 10
    assert all(v % 10 == y for v, y in zip(train_ids, train.labels))  # the label file's label of that image
    before = (tmp_path / "data" / "train-000000.tar").stat().st_mtime_ns
    assert write_dataset("fashion-mnist", str(tmp_path / "data"), (60, 20, 30)) == splits  # reused
    assert (tmp_path / "data" / "train-000000.tar").stat().st_mtime_ns == before
    assert splits.teacher is None and splits.teacher_data == splits.train  # no teacher split: it fits on train


def _file(spec) -> set:
    """The files (0: train, 255: t10k) a split's images come from."""
    src = open_source(spec)
    return {int(np.asarray(src.load(i))[2, 0, 0]) for i in range(len(src))}


def test_fashion_mnist_teacher_split_holds_train_never_val_or_test(tmp_path, fake_fashion):
    """The teacher's split: the student's train split plus other training-file images (as an ImageNet teacher has
    seen its student's whole training set), never a validation or test image; the student's splits are the same
    images as without it."""
    plain = write_dataset("fashion-mnist", str(tmp_path / "plain"), (60, 20, 30))
    splits = write_dataset("fashion-mnist", str(tmp_path / "data"), (60, 20, 30), teacher=150)
    teacher, teacher_ids = _read(splits.teacher)
    _, train_ids = _read(splits.train)
    _, val_ids = _read(splits.val)
    assert splits.teacher_data == splits.teacher and len(teacher_ids) == len(set(teacher_ids)) == 150
    assert set(train_ids) <= set(teacher_ids) and not set(val_ids) & set(teacher_ids)
    assert _file(splits.teacher) == _file(splits.train) == _file(splits.val) == {0} and _file(splits.test) == {255}
    assert np.bincount(teacher.labels, minlength=10).tolist() == [15] * 10  # class-balanced, labels its own
    assert all(v % 10 == y for v, y in zip(teacher_ids, teacher.labels))
    for split in ("train", "val", "test"):  # drawn first: the student sees the same images either way
        assert _read(getattr(splits, split))[1] == _read(getattr(plain, split))[1]
    with pytest.raises(CacheError, match="holds the train split"):
        write_dataset("fashion-mnist", str(tmp_path / "small"), (60, 20, 30), teacher=59)
    with pytest.raises(CacheError, match="ask for fewer"):  # 300 images: 80 in train and val, 220 left
        write_dataset("fashion-mnist", str(tmp_path / "big"), (60, 20, 30), teacher=281)
    with pytest.raises(CacheError, match="only fashion-mnist"):
        write_dataset("scenes", str(tmp_path / "scenes"), (10, 10, 10), teacher=20)


def test_missing_datasets_are_named_with_their_install_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CSKD_FASHION_MNIST", str(tmp_path / "nowhere"))
    assert "apt-get install dataset-fashion-mnist" in available("fashion-mnist")
    with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        write_dataset("fashion-mnist", str(tmp_path / "d"), (10, 10, 10))
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)  # import fails as if not installed
    assert "pip install elpv-dataset" in available("elpv")
    code, text = run_cli("experiment", "--dataset", "fashion-mnist", "--quick", "--out", tmp_path / "x")
    assert code == 2 and len(text.strip().splitlines()) == 1 and "dataset-fashion-mnist" in text


def test_elpv_two_classes_by_defect_probability_disjoint(tmp_path, monkeypatch):
    """elpv's labels.csv (path, defect probability, type) -> functional (< 0.5) / defective, splits keeping the
    classes' proportions, images resized once to the stored size."""
    pkg = tmp_path / "elpv_dataset"
    (pkg / "data" / "images").mkdir(parents=True)
    probs = [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 0.0] * 10
    with open(pkg / "data" / "labels.csv", "w") as f:
        for i, p in enumerate(probs):
            Image.fromarray(np.full((300, 300), i, np.uint8)).save(pkg / "data" / "images" / f"cell{i:04d}.png")
            f.write(f"images/cell{i:04d}.png  {p}  mono\n")
    monkeypatch.setitem(sys.modules, "elpv_dataset", types.SimpleNamespace(__file__=str(pkg / "__init__.py")))
    splits = write_dataset("elpv", str(tmp_path / "data"), (30, 15, 15), size=48)
    seen = []
    for spec in (splits.train, splits.val, splits.test):
        src, ids = _read(spec, two_rows=False)
        assert np.asarray(src.load(0)).shape[:2] == (48, 48)
        assert all(int(probs[i] >= 0.5) == y for i, y in zip(ids, src.labels))
        assert sum(src.labels) * 3 == len(src)  # a third of the cells are defective here: proportions kept
        seen += ids
    assert len(seen) == len(set(seen)) == 60 and splits.classes == ["functional", "defective"]


def test_paired_interval_and_wording():
    p = paired({0: 80.0, 1: 82.0, 2: 81.0}, {0: 78.0, 1: 79.0, 2: 80.0})
    assert p["differences"] == [2.0, 3.0, 1.0] and p["mean"] == 2.0
    assert p["low"] == pytest.approx(2.0 - 4.303 * 1.0 / 3 ** 0.5) and p["high"] == pytest.approx(4.484, abs=1e-3)
    assert verdict(p, "A", "B") == ("cannot tell: 95% interval -0.5 to +4.5 points, which allows A ahead by up to "
                                    "4.5 or behind by up to 0.5")  # every seed favours A, and still it cannot tell
    q = paired({0: 82.0, 1: 83.0, 2: 82.5}, {0: 80.0, 1: 80.0, 2: 80.0})
    assert verdict(q, "A", "B").startswith("consistent with A better than B, by 1.3 to 3.7 points")
    r = paired({0: 1.0, 1: 2.0}, {0: 5.0, 1: 5.5})
    assert verdict(r, "A", "B").startswith("consistent with B better than A")
    assert "no difference" not in verdict(p, "A", "B")
    tied = paired({0: 23.4, 1: 23.4}, {0: 14.0, 1: 14.0})  # tiny test sets: seeds tie, the interval is 0 wide
    assert verdict(tied, "A", "B").startswith("cannot tell: every seed gives the same difference (+9.4 points)")


def _results(none=(70.0, 72.0, 71.0), teacher=91.0, cskd=(75.0, 76.0, 74.0)) -> dict:
    heads = {h: 0.0 for h in ("cls", "dist", "dense", "cls+dist", "cskd")}
    recs = []
    for arm, vals in (("none", none), ("deit", none), ("cskd", cskd), ("cskd-local", cskd)):
        for s, v in enumerate(vals):
            recs.append({"arm": arm, "seed": s, "T": 3, "E": 3, "test": v, "val": v, "best_epoch": 1,
                         "protocol": "cskd", "test_heads": heads,
                         "epochs": [{"test": {"cskd": v, "cls": v, "cls+dist": v}}] * 3})
    return {"config": {"dataset": "fashion-mnist", "sizes": [6, 2, 5], "size": 64, "teacher": "t",
                       "teacher_init": "imagenet", "teacher_epochs": 1, "student": "s", "epochs": 3},
            "chance": 10.0, "teacher": {"test_top1": teacher}, "records": recs, "seconds": {"x": 1.0},
            "total_seconds": 1.0}


def test_gates_say_inconclusive_when_the_teacher_or_baseline_fail():
    ok = _results()
    assert gates(ok)["conclusive"] and gates(ok)["line"].startswith("gates passed")
    weak = gates(_results(teacher=85.0))
    assert not weak["conclusive"] and weak["line"].startswith("inconclusive") and ">= 90%" in weak["line"]
    stuck = gates(_results(none=(12.0, 11.0, 13.0)))  # a baseline near chance (10%) learned nothing
    assert not stuck["conclusive"] and "no-distillation" in stuck["line"]
    above = gates(_results(none=(95.0, 96.0, 94.0)))  # no room left to gain from the teacher
    assert not above["conclusive"]
    r = _results()
    r["gates"], r["summary"] = gates(r), summarize(r)
    text = format_report(r)
    assert "| 0 | 70.0 | 70.0 | 75.0 | 75.0 |" in text  # the per-seed table
    assert "+5.0, +4.0, +3.0" in text and "consistent with CSKD (linear alpha) better than DeiT" in text


def test_report_redoes_the_analysis_from_results_json_alone(tmp_path):
    """The committed results.json is enough: the module prints the same tables and draws the plots; a file that is
    not one is a one-line error."""
    r = _results()
    (tmp_path / "results.json").write_text(json.dumps(r))
    done = subprocess.run([sys.executable, "-m", "cskd_cache.demo.report", str(tmp_path / "results.json"), "--plots",
                           str(tmp_path / "plots")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    r["gates"], r["summary"] = gates(r), summarize(r)
    assert done.stdout.startswith(format_report(r)) and (tmp_path / "plots" / "paired_differences.png").exists()
    (tmp_path / "other.json").write_text("{}")
    done = subprocess.run([sys.executable, "-m", "cskd_cache.demo.report", str(tmp_path / "other.json")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(available("fashion-mnist") is not None,
                    reason=str(available("fashion-mnist")))
def test_experiment_quick_on_fashion_mnist(tmp_path):
    """Every kind of run at a tiny size, through the CLI: shards, the teacher fine-tuned from ImageNet weights,
    one cache and a partial copy, four arms over two paired seeds and the reuse pair; a second run reuses all."""
    out = tmp_path / "exp"
    threads = torch.get_num_threads()
    code, text = run_cli("experiment", "--quick", "--out", out)
    assert code == 0, text
    assert torch.get_num_threads() == threads  # --threads holds for the run only, not for the caller's process
    results = json.loads((out / "results.json").read_text())
    recs = results["records"]
    assert {(r["arm"], r["seed"]) for r in recs if "pair" not in r} == {(a, s) for a in ("none", "deit", "cskd",
                                                                                        "cskd-local") for s in (0, 1)}
    assert {r["E"] for r in recs if r.get("pair") == "reuse"} == {1, 2}
    for r in recs:  # every epoch scored on validation and test, every head; the result is the best-val epoch's
        assert len(r["epochs"]) == r["T"] and set(r["epochs"][0]["test"]) == {"cls", "dist", "dense", "cls+dist",
                                                                               "cskd"}
        assert r["test"] == r["epochs"][r["best_epoch"]]["test"][r["protocol"]]
    protocols = {r["arm"]: r["protocol"] for r in recs}
    assert protocols == {"none": "cls", "deit": "cls+dist", "cskd": "cskd", "cskd-local": "cskd"}
    # paired: one seed, the same initial weights in every arm
    w = {a: torch.load(out / "runs" / f"{a}-T2-E2-seed1" / "checkpoint.pth", weights_only=True) for a in
         ("none", "cskd")}
    assert w["none"]["config"]["seed"] == w["cskd"]["config"]["seed"] == 1
    teacher = json.loads((out / "teacher.safetensors.json").read_text())
    assert teacher["settings"]["init_checkpoint"] and 0 <= results["teacher"]["test_top1"] <= 100
    # fitted on the teacher split (the 128 train images and 128 more), the cache made from the train split
    assert teacher["data"]["num_samples"] == results["teacher"]["images"] == 256
    assert teacher["settings"]["data"].endswith("teacher-000000.tar")
    assert results["gates"]["line"].startswith(("gates passed", "inconclusive"))
    assert "Paired differences" in text and "95% interval" in text
    for png in ("accuracy_per_epoch.png", "paired_differences.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG"
    logs = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/scores.jsonl")}
    code, again = run_cli("experiment", "--quick", "--out", out)
    assert code == 0, again
    assert [r["test"] for r in json.loads((out / "results.json").read_text())["records"]] == [r["test"] for r in recs]
    assert {p: p.stat().st_mtime_ns for p in logs} == logs  # no run trained or scored again
