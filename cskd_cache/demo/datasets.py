"""The experiment's datasets, made offline and written as WebDataset shards (the path real data takes), each with
disjoint train / validation / test splits:

- `fashion-mnist`: real product photos (Zalando's Fashion-MNIST, 28 px grayscale, 10 classes) from Debian's
  `dataset-fashion-mnist` (IDX files under /usr/share/datasets/fashion-mnist/). Train and validation come from
  the official training file, test from the official test file; every split is class-balanced. The teacher may
  fit on a larger `teacher` split, as an ImageNet teacher has seen the whole training set its student trains on:
  the student's train split plus other images of the training file, never a validation or test image.
- `elpv`: real electroluminescence images of solar cells (300 px, PyPI's `elpv-dataset`, CC BY-NC-SA: used,
  never copied into this repository), two classes: functional (defect probability < 0.5) or defective. Defects
  are local (cracks, dark regions), a case where per-position labels should matter.
- `scenes`: the demo's digit scenes (demo/scenes.py), a construction whose class needs every cell read.

A dataset package that is not installed is a `DatasetMissing` error naming the package to install, so CI can
skip with that one line.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from ..errors import CacheError

DATASETS = ("fashion-mnist", "elpv", "scenes")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot"]
ELPV_CLASSES = ["functional", "defective"]


class DatasetMissing(CacheError):
    """The dataset's package is not installed (tests skip on it with this message)."""


@dataclass(frozen=True)
class Splits:
    train: str  # WebDataset brace specs
    val: str
    test: str
    classes: list
    teacher: str | None = None  # the teacher's training split, a superset of train (None: train itself)

    @property
    def teacher_data(self) -> str:
        return self.teacher or self.train


def fashion_dir() -> str:
    return os.environ.get("CSKD_FASHION_MNIST", FASHION_DIR)


def _idx(path: str) -> np.ndarray:
    """An IDX file (gzip'ed or not): the big-endian header gives the dimensions, then uint8 data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise CacheError(f"{path}: not an IDX file of unsigned bytes")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise CacheError(f"{path}: truncated ({data.size} bytes for shape {shape})")
    return data.reshape(shape)


def _fashion_file(kind: str) -> str:
    d = fashion_dir()
    for name in (f"{kind}.gz", kind):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    raise DatasetMissing(f"--dataset fashion-mnist: {d} has no {kind}(.gz); install Debian's package: "
                         "apt-get install dataset-fashion-mnist (or set CSKD_FASHION_MNIST to a folder of its IDX "
                         "files)")


def balanced(labels: np.ndarray, n: int, rng: np.random.Generator, exclude: np.ndarray | None = None) -> np.ndarray:
    """n indices, as many per class as the classes allow (n / K each, the remainder to the first classes), drawn
    in a fixed random order, never from `exclude`."""
    classes = np.unique(labels)
    order = rng.permutation(len(labels))
    if exclude is not None:
        order = order[~np.isin(order, exclude)]
    per = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    picked = []
    for c, k in zip(classes, per):
        pool = order[labels[order] == c]
        if len(pool) < k:
            raise CacheError(f"class {c} has {len(pool)} images left, {k} asked for; ask for fewer")
        picked.append(pool[:k])
    return np.sort(np.concatenate(picked))


def _proportional(labels: np.ndarray, n: int, rng: np.random.Generator, exclude: np.ndarray) -> np.ndarray:
    """n indices keeping the classes' proportions (elpv is 2:1 functional), never from `exclude`."""
    order = rng.permutation(len(labels))
    order = order[~np.isin(order, exclude)]
    picked = []
    classes, counts = np.unique(labels, return_counts=True)
    for c, count in zip(classes, counts):
        k = int(round(n * count / len(labels)))
        picked.append(order[labels[order] == c][:k])
    return np.sort(np.concatenate(picked))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(out_dir: str, split: str, samples, n: int, per_shard: int = 2000) -> str:
    """Write `n` (png bytes, class) samples as SPLIT-NNNNNN.tar shards; return the brace spec. Each shard is
    written under a temporary name and renamed, so a kill never leaves a short shard."""
    import webdataset as wds

    shards = max(1, -(-n // per_shard))
    it = iter(samples)
    for s in range(shards):
        path = os.path.join(out_dir, f"{split}-{s:06d}.tar")
        with wds.TarWriter(path + ".tmp") as sink:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                png, label = next(it)
                sink.write({"__key__": f"{split}_{i:06d}", "png": png, "cls": int(label)})
        os.replace(path + ".tmp", path)
    return os.path.join(out_dir, f"{split}-{{000000..{shards - 1:06d}}}.tar" if shards > 1 else f"{split}-000000.tar")


def _fashion(sizes: tuple[int, int, int], seed: int, teacher: int):
    train_x, train_y = _idx(_fashion_file("train-images-idx3-ubyte")), _idx(_fashion_file("train-labels-idx1-ubyte"))
    test_x, test_y = _idx(_fashion_file("t10k-images-idx3-ubyte")), _idx(_fashion_file("t10k-labels-idx1-ubyte"))
    rng = np.random.default_rng([seed, 1])
    tr = balanced(train_y, sizes[0], rng)
    va = balanced(train_y, sizes[1], rng, exclude=tr)  # disjoint from train: the same file, other images
    te = balanced(test_y, sizes[2], rng)  # the official test file: images never seen in training
    # drawn after the others, so train / val / test are the same images whatever the teacher split's size
    extra = balanced(train_y, teacher - sizes[0], rng, exclude=np.concatenate([tr, va])) if teacher else tr[:0]
    # stored as they come (28 px grayscale): the recipe's crop resizes them to the view size
    def pngs(x, y, idx):
        return ((_png(x[i]), y[i]) for i in idx)

    return {"train": pngs(train_x, train_y, tr), "val": pngs(train_x, train_y, va),
            "test": pngs(test_x, test_y, te),
            "teacher": pngs(train_x, train_y, np.sort(np.concatenate([tr, extra])))}, FASHION_CLASSES


def _elpv(sizes: tuple[int, int, int], seed: int, stored: int):
    try:
        import elpv_dataset
    except ImportError:
        raise DatasetMissing("--dataset elpv: the elpv-dataset package is not installed: pip install elpv-dataset "
                             "(CC BY-NC-SA 4.0: research use)") from None
    folder = os.path.join(os.path.dirname(elpv_dataset.__file__), "data")
    rows = [line.split() for line in open(os.path.join(folder, "labels.csv")) if line.strip()]
    paths = [os.path.join(folder, r[0]) for r in rows]
    labels = np.array([int(float(r[1]) >= 0.5) for r in rows])  # experts' defect probability 0, 1/3, 2/3, 1
    if sum(sizes) > len(labels):
        raise CacheError(f"--dataset elpv has {len(labels)} images; the splits ask for {sum(sizes)}")
    rng = np.random.default_rng([seed, 2])
    picked: list[np.ndarray] = []
    for n in sizes:
        picked.append(_proportional(labels, n, rng, np.concatenate(picked) if picked else np.array([], int)))

    def load(i: int) -> bytes:  # 300 px -> the stored size once, not at every view
        with Image.open(paths[i]) as img:
            return _png(np.asarray(img.convert("L").resize((stored, stored), Image.LANCZOS)))

    def pngs(idx):
        return ((load(i), labels[i]) for i in idx)

    return dict(zip(("train", "val", "test"), map(pngs, picked))), ELPV_CLASSES


def _scenes(sizes: tuple[int, int, int], seed: int, size: int):
    from .scenes import CLASSES, make_scenes

    def pngs(n, split):
        for img, label in make_scenes(n, split, seed, size):
            yield _png(np.asarray(img)), label

    return {split: pngs(n, split) for split, n in zip(("train", "val", "test"), sizes)}, CLASSES


def write_dataset(name: str, out_dir: str, sizes: tuple[int, int, int], seed: int = 0, size: int = 64,
                  teacher: int = 0) -> Splits:
    """Write DATASET's train/val/test shards into out_dir (reused when written before with the same settings),
    and with `teacher` > 0 (fashion-mnist only) a teacher split of that many images holding the train split."""
    if name not in DATASETS:
        raise CacheError(f"--dataset {name!r}: use one of {', '.join(DATASETS)}")
    if teacher and name != "fashion-mnist":
        raise CacheError(f"--dataset {name}: only fashion-mnist has a teacher split beyond train; ask for 0 images")
    if teacher and teacher < sizes[0]:
        raise CacheError(f"teacher split of {teacher} images: it holds the train split, so ask for >= {sizes[0]}")
    settings = {"dataset": name, "sizes": list(sizes), "seed": seed, "size": size, "teacher": teacher}
    manifest = os.path.join(out_dir, "dataset.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            done = json.load(f)
        if done.get("settings") == settings:
            return Splits(**done["splits"])
    if name == "fashion-mnist":
        samples, classes = _fashion(sizes, seed, teacher)
    elif name == "elpv":
        samples, classes = _elpv(sizes, seed, size)
    else:
        samples, classes = _scenes(sizes, seed, size)
    os.makedirs(out_dir, exist_ok=True)
    counts = dict(zip(("train", "val", "test"), sizes), **({"teacher": teacher} if teacher else {}))
    specs = {split: write_shards(out_dir, split, samples[split], n) for split, n in counts.items()}
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    splits = Splits(**specs, classes=list(classes))
    with open(manifest + ".tmp", "w") as f:
        json.dump({"settings": settings, "splits": asdict(splits)}, f)
    os.replace(manifest + ".tmp", manifest)
    return splits


def available(name: str) -> str | None:
    """None when DATASET can be made here, else the one-line reason it cannot."""
    if name == "elpv":  # installed is all it asks (None in sys.modules, as a test sets it, counts as absent)
        if importlib.util.find_spec("elpv_dataset") is None:
            return "--dataset elpv: the elpv-dataset package is not installed: pip install elpv-dataset"
    elif name == "fashion-mnist":
        try:
            _fashion_file("train-images-idx3-ubyte")
        except DatasetMissing as e:
            return str(e)
    return None
