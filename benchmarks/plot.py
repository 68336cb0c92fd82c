"""docs/images/performance.png from the benchmarks' JSON: training throughput of the three teacher sources, and
stored bytes per view of each encoding.

    python -m benchmarks.plot
"""

from __future__ import annotations

import json
import pathlib

from benchmarks.common import RESULTS


def main() -> None:
    import argparse

    import matplotlib

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parents[1] / "docs" / "images" / "performance.png"))
    out = pathlib.Path(ap.parse_args().out)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = json.loads((RESULTS / "train_throughput.json").read_text())
    storage = json.loads((RESULTS / "storage.json").read_text())
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    row = train["rows"][0]
    modes = ["cache", "online", "none"]
    a.bar(modes, [row[f"{m} img/s"] for m in modes], color=["tab:green", "tab:red", "tab:gray"])
    a.set_ylabel("training images / s")
    a.set_title(f"{row['student']} from {train['inputs']['teacher'].split()[0]}, 224 px, "
                f"{train['machine']['cores']} CPU cores")
    for i, m in enumerate(modes):
        a.text(i, row[f"{m} img/s"], f"{row[f'{m} img/s']:.2f}", ha="center", va="bottom")
    rows = storage["rows"]
    names = [r["encoding"] for r in rows]
    b.bar(names, [r["stored B/view"] for r in rows], color="tab:blue")
    b.set_yscale("log")
    b.set_ylabel("stored bytes / view (log)")
    b.set_title("7x7 grid, 1000 classes, real ImageNet teacher")
    for i, r in enumerate(rows):
        b.text(i, r["stored B/view"], f"{r['stored B/view']:,.0f}", ha="center", va="bottom")
    b.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
