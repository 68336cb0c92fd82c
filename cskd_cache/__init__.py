"""cskd-cache: an offline teacher-label cache for Cumulative Spatial Knowledge Distillation (CSKD).

The library, for your own training loop (docs/api.md):

    from cskd_cache import CachedViews, CSKDLoss, alpha_at

    views = CachedViews("teacher-cache.zarr", "/data/train", batch_size=128)
    student = views.student("deit_s")
    ...

`CachedViews` (replayed views, labels, mixing, teacher outputs), `CSKDLoss` (the objective), `ckf_alpha` /
`alpha_at` (CKF's schedule), `mixup_target`, `create_student` / `CSKDStudent` (DeiT with dense heads),
`create_teacher` / `DenseTeacher`, `CSKDTask` (a `timm.task.TrainingTask`), `Cache`, and the stages' configs
(`cskd_cache.teacher.precompute.precompute(PrecomputeConfig(...))`, `cskd_cache.training.train.train(
TrainConfig(...))`). Names are imported on first use (torch, timm and zarr are heavy).

The sub-packages are the architecture (docs/design.md): `data` (image sources, the view plan, the recipe, replay,
fingerprints) <- `cache` (the format: encodings, store, writing, sharing, verify) <- `teacher` (the teacher model,
fit-teacher, stage one: precompute) <- `training` (stage two: student, loss, loader, train, the timm task, the
library API) <- `demo`; the CLI (`cskd_cache_cli`) sits on top. Imports go that way only.
"""

__version__ = "0.2.0"

_EXPORTS = {
    "CachedViews": "training.cached_views", "CSKDTask": "training.task", "CSKDLoss": "training.losses",
    "ckf_alpha": "training.losses", "alpha_at": "training.losses", "mixup_target": "training.losses",
    "create_student": "training.student", "CSKDStudent": "training.student", "create_teacher": "teacher.model",
    "DenseTeacher": "teacher.model", "Cache": "cache.store", "make_encoding": "cache.encodings",
    "PrecomputeConfig": "teacher.precompute", "TrainConfig": "training.train", "Recipe": "data.recipe",
    "CacheError": "errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'cskd_cache' has no attribute {name!r}")
