"""cskd-cache: an offline teacher-label cache for Cumulative Spatial Knowledge Distillation (CSKD).

The library, for your own training loop (docs/api.md):

    from cskd_cache import CachedViews, CSKDLoss, alpha_at

    views = CachedViews("teacher-cache.zarr", "/data/train", batch_size=128)
    student = views.student("deit_s")
    ...

`CachedViews` (replayed views, labels, mixing, teacher outputs), `CSKDLoss` (the objective), `ckf_alpha` /
`alpha_at` (CKF's schedule), `mixup_target`, `create_student` / `CSKDStudent` (DeiT with dense heads),
`create_teacher` / `DenseTeacher`, `CSKDTask` (a `timm.task.TrainingTask`), `Cache`, and the stages' configs
(`cskd_cache.precompute.precompute(PrecomputeConfig(...))`, `cskd_cache.train.train(TrainConfig(...))`). Names
are imported on first use (torch, timm and zarr are heavy).
"""

__version__ = "0.2.0"

_EXPORTS = {
    "CachedViews": "api", "CSKDTask": "task", "CSKDLoss": "losses", "ckf_alpha": "losses", "alpha_at": "losses",
    "mixup_target": "losses", "create_student": "student", "CSKDStudent": "student", "create_teacher": "teacher",
    "DenseTeacher": "teacher", "Cache": "store", "make_encoding": "encodings", "PrecomputeConfig": "precompute",
    "TrainConfig": "train", "Recipe": "views", "CacheError": "errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'cskd_cache' has no attribute {name!r}")
