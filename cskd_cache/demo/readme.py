"""The README's demo tables, generated from demo runs: `python -m cskd_cache.demo.readme RESULTS.json... [README.md]`.

Each results.json (written by `cskd-cache demo`) gives one block: the table the demo printed, the command with its
settings, and the machine and thread count it ran on. With a README.md as the last argument, each block replaces
the text between its markers there:

    <!-- demo-results SETTINGS -->  ...  <!-- /demo-results -->

where SETTINGS are the run's non-default flags (empty for the default demo), so a table can only land where the
README says which settings made it. Without a README.md the blocks are printed.

A module of the package rather than a script under benchmarks/: it formats with the demo's own `format_table`,
so the README shows exactly what the demo prints, and it works wherever the package is installed.
"""

from __future__ import annotations

import json
import os
import re
import sys

from .demo import DemoConfig, format_table, settings
from .machine import describe

END = "<!-- /demo-results -->"


def flags(results: dict) -> str:
    """The run's settings as `demo` flags, defaults left out (the block's key and its command line)."""
    cfg = DemoConfig(**results["config"])
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings(cfg).items() if v != getattr(DemoConfig, k))


def marker(results: dict) -> str:
    key = flags(results)
    return f"<!-- demo-results{' ' + key if key else ''} -->"


def block(results: dict) -> str:
    """The table the demo printed, then the command that made it and where it ran."""
    out = os.path.basename(os.path.normpath(results["config"]["out"]))
    command = " ".join(["cskd-cache demo"] + ([f"--out {out}"] if out != DemoConfig.out else []) +
                       ([flags(results)] if flags(results) else []))
    m = results["machine"]
    threads = m.get("torch_threads")
    return (format_table(results) + f"\n\n`{command}` on {describe(m)}"
            + (f"; {threads} torch thread{'s' if threads != 1 else ''}" if threads else "")
            + f": {results['total_seconds'] / 60:.1f} min of stages.")


def rewrite(readme: str, all_results: list[dict]) -> str:
    """`readme`'s text with each run's block between its markers; ValueError naming the missing marker."""
    for results in all_results:
        start = marker(results)
        pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(END), re.S)
        if not pattern.search(readme):
            raise ValueError(f"no '{start}' ... '{END}' block for this run's settings; add the two marker lines "
                             "where its table belongs")
        readme = pattern.sub(lambda _: f"{start}\n{block(results)}\n{END}", readme, count=1)
    return readme


def _fail(path: str, why) -> int:
    print(f"error: {path}: {why}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    paths = list(argv)
    target = paths.pop() if paths and paths[-1].endswith(".md") else None
    if not paths:
        print("usage: python -m cskd_cache.demo.readme RESULTS.json... [README.md]", file=sys.stderr)
        return 2
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                runs.append(json.load(f))
            block(runs[-1])
        except OSError as e:
            return _fail(path, e.strerror or e)
        except (ValueError, KeyError, TypeError) as e:
            return _fail(path, f"not a demo's results.json ({type(e).__name__}: {e}); pass OUT/results.json of a "
                               "finished `cskd-cache demo`")
    if target is None:
        print("\n\n".join(block(r) for r in runs))
        return 0
    try:
        with open(target) as f:
            text = rewrite(f.read(), runs)
    except OSError as e:
        return _fail(target, e.strerror or e)
    except ValueError as e:
        return _fail(target, e)
    with open(target + ".tmp", "w") as f:
        f.write(text)
    os.replace(target + ".tmp", target)
    print(f"{target}: {len(runs)} demo table{'s' if len(runs) != 1 else ''} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
