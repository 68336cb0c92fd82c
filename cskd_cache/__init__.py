"""cskd-cache: an offline teacher-label cache for Cumulative Spatial Knowledge Distillation (CSKD)."""

__version__ = "0.1.0"
