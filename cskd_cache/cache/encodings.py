"""The encodings by name: `make_encoding` (as timm's `create_model`) and the inverse of `Encoding.describe()`."""

from __future__ import annotations

from .ckf import CKFEncoding, CKFEncodingV1
from .encoding import Encoding, FullEncoding, TopKEncoding

ENCODINGS = ("full", "ckf", "topk")


def make_encoding(name: str, num_classes: int, positions: int, *, ckf_width: int = 8, topk: int = 10,
                  global_topk: int = 10, global_width: int | None = None) -> Encoding:
    if name == "full":
        return FullEncoding(num_classes, positions)
    if name == "ckf":
        return CKFEncoding(num_classes, positions, ckf_width=ckf_width, global_topk=global_topk,
                           global_width=global_width)
    if name == "topk":
        return TopKEncoding(num_classes, positions, topk=topk, global_topk=global_topk)
    raise ValueError(f"unknown encoding {name!r}; choose one of {', '.join(ENCODINGS)}")


def encoding_from_description(desc: dict, num_classes: int, positions: int) -> Encoding:
    """Inverse of Encoding.describe(), used when opening a cache (format-1 layouts included)."""
    for key, want in (("num_classes", num_classes), ("positions", positions)):
        if key in desc and int(desc[key]) != want:
            raise ValueError(f"cache encoding was built for {key}={desc[key]}, not {want}")
    arrays, params = desc.get("arrays", {}), desc.get("params", {})
    if desc["name"] == "ckf" and "ckf_class" in arrays:  # format 1
        return CKFEncodingV1(num_classes, positions, **params, lse="global_lse" in arrays)
    enc = make_encoding(desc["name"], num_classes, positions, **params)
    if desc["name"] == "topk" and "global_lse" not in arrays:  # format 1: no log-sum-exps stored
        enc = TopKEncoding(num_classes, positions, **enc.params, lse=False)
    return enc
