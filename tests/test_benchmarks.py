"""Every benchmark runs at its smallest settings (`--smoke`): a table, a JSON with its inputs and the machine.
Smoke tests time nothing; the measured figures are in docs/performance.md."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
BENCHMARKS = ["storage", "dense_agreement", "train_throughput", "read_decode", "precompute_throughput", "replay",
              "syncs", "memory", "scale", "drift", "data_path", "backend_agreement"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_smoke(tmp_path, name):
    out = tmp_path / f"{name}.json"
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == name and doc["smoke"] and doc["rows"] and doc["machine"]["versions"]["torch"]
    assert "|" in r.stdout  # the table
    if name == "syncs":
        assert doc["steady_state_max"] == 0  # no host-device sync in a steady-state step
    if name == "memory":
        pre = [row for row in doc["rows"] if row["run"] == "precompute"]
        assert len(pre) == 2 and pre[-1]["growth"] < 1.2  # flat in views (2x here)


def test_plot_from_results(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.plot", "--out", str(tmp_path / "p.png")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (tmp_path / "p.png").stat().st_size > 10_000, r.stderr[-2000:]
