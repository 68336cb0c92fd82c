"""An ImageFolder directory as an image source: class sub-directories, ids in torchvision's order."""

from __future__ import annotations

import os

from ..errors import DataError
from .source import _HINT, IMG_EXTENSIONS, ImageSource


class ImageFolderSource(ImageSource):
    kind = "imagefolder"

    def __init__(self, root: str):
        self.root = os.path.expanduser(root)
        try:
            with os.scandir(self.root) as it:
                classes = sorted(e.name for e in it if e.is_dir())
        except OSError as e:
            raise DataError(f"--data: no such file or directory: {root}; {_HINT}") from e
        keys, labels = [], []
        for y, c in enumerate(classes):  # walk order mirrors torchvision's make_dataset
            for dirpath, _, fnames in sorted(os.walk(os.path.join(self.root, c), followlinks=True)):
                for f in sorted(fnames):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        rel = os.path.relpath(os.path.join(dirpath, f), self.root)
                        keys.append(rel.replace(os.sep, "/"))
                        labels.append(y)
        if not classes or not keys:
            what = "no class sub-directories" if not classes else "no image files in its class sub-directories"
            raise DataError(f"--data: {root} has {what}; {_HINT} (as a pattern: dir/train-{{000000..000009}}.tar)")
        super().__init__(root, keys, labels, classes)

    def read_bytes(self, i: int) -> bytes:
        path = os.path.join(self.root, self.keys[i])
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise DataError(f"{self.flag}: cannot read {path!r}: {e.strerror or e}; check the dataset directory") from e
