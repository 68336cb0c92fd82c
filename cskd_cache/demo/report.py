"""The experiment's gates, paired statistics, tables and plots, computed from its results.json alone, so anyone
can redo them from the committed file: `python -m cskd_cache.demo.report results.json [--plots FOLDER]`."""

from __future__ import annotations

import argparse
import json
import os
import statistics

from .stats import paired, summary, verdict

NAMES = {"none": "no distillation", "deit": "DeiT hard distillation", "cskd": "CSKD (linear alpha)",
         "cskd-local": "CSKD local (alpha = 1)"}
PROTOCOL_NAMES = {"cls": "class head", "cls+dist": "mean of class and distillation heads",
                  "cskd": "mean of the three heads"}
COMPARISONS = (("cskd", "deit"), ("cskd", "none"), ("deit", "none"), ("cskd", "cskd-local"))
TEACHER_GATE = {"fashion-mnist": 90.0, "elpv": 80.0, "scenes": 85.0}


def main_records(results: dict) -> list[dict]:
    return [r for r in results["records"] if "pair" not in r]


def by_seed(records: list[dict], arm: str, **match) -> dict:
    return {r["seed"]: r["test"] for r in records if r["arm"] == arm and all(r[k] == v for k, v in match.items())}


def gates(results: dict) -> dict:
    """The run's own checks that its comparisons mean something: a good teacher; a no-distillation student that
    learned (well above chance: at least a third of the way from chance to the teacher) and left room to gain
    (below the teacher). Otherwise the comparison is inconclusive, whatever its numbers."""
    cfg, chance = results["config"], results["chance"]
    teacher = results["teacher"]["test_top1"]
    need = TEACHER_GATE.get(cfg["dataset"], 90.0)
    none = [r["test"] for r in main_records(results) if r["arm"] == "none"]
    student = statistics.mean(none) if none else None
    floor = chance + (teacher - chance) / 3
    checks = {"teacher": {"value": teacher, "need": need, "ok": teacher >= need,
                          "rule": f"teacher test top-1 >= {need:g}%"},
              "student": {"value": student, "floor": floor, "ceiling": teacher, "chance": chance,
                          "ok": student is not None and floor <= student < teacher,
                          "rule": f"no-distillation student between {floor:.1f}% (chance {chance:.1f}% + a third of "
                                  f"the way to the teacher) and the teacher's {teacher:.1f}%"}}
    failed = [c["rule"] for c in checks.values() if not c["ok"]]
    checks["conclusive"] = not failed
    checks["line"] = ("gates passed: " + "; ".join(c["rule"] for c in checks.values() if isinstance(c, dict))
                      if not failed else "inconclusive: not met: " + "; ".join(failed))
    return checks


def summarize(results: dict) -> dict:
    recs = main_records(results)
    arms = {}
    for arm in NAMES:
        rs = [r for r in recs if r["arm"] == arm]
        if rs:
            arms[arm] = {"test": summary([r["test"] for r in rs]), "val": summary([r["val"] for r in rs]),
                         "heads": {h: statistics.mean(r["test_heads"][h] for r in rs) for h in rs[0]["test_heads"]},
                         "best_epochs": [r["best_epoch"] for r in rs], "protocol": rs[0]["protocol"]}
    comparisons = []
    for a, b in COMPARISONS:
        if a in arms and b in arms and set(by_seed(recs, a)) & set(by_seed(recs, b)):
            p = paired(by_seed(recs, a), by_seed(recs, b))
            comparisons.append({"a": a, "b": b, **p, "verdict": verdict(p, NAMES[a], NAMES[b])})
    reuse = [r for r in results["records"] if r.get("pair") == "reuse"]
    pair = None
    if len({r["E"] for r in reuse}) == 2 and len({r["seed"] for r in reuse}) >= 1:
        few, many = sorted({r["E"] for r in reuse})[0], sorted({r["E"] for r in reuse})[-1]
        t = reuse[0]["T"]
        p = paired(by_seed(reuse, "cskd", E=few), by_seed(reuse, "cskd", E=many))
        pair = {"T": t, "E_few": few, "E_many": many, **p,
                "few": summary([r["test"] for r in reuse if r["E"] == few]),
                "many": summary([r["test"] for r in reuse if r["E"] == many]),
                "verdict": verdict(p, f"E = {few}", f"E = {many}")}
    return {"arms": arms, "comparisons": comparisons, "reuse": pair}


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def format_report(results: dict) -> str:
    cfg, s, g = results["config"], results["summary"], results["gates"]
    recs = main_records(results)
    seeds = sorted({r["seed"] for r in recs})
    n_train, n_val, n_test = cfg["sizes"]
    init = "ImageNet weights, fine-tuned" if cfg["teacher_init"] == "imagenet" else "trained from scratch"
    out = [f"dataset {cfg['dataset']}: {n_train} train / {n_val} validation / {n_test} test images, {cfg['size']} px "
           f"views; teacher {cfg['teacher']} ({init}, {cfg['teacher_epochs']} epochs): test top-1 {results['teacher']['test_top1']:.1f}%; student "
           f"{cfg['student']}, T = {cfg['epochs']} epochs, {len(seeds)} seeds; chance {results['chance']:.1f}%",
           g["line"], "",
           "Each arm's test top-1 at the epoch where its own validation top-1 is best, scored by its own protocol; "
           "every head at that epoch besides.", "",
           "| arm | protocol | test top-1 % mean +- sd | min - max | class head | distillation head | patch tokens "
           "| class + distillation | three heads |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, a in s["arms"].items():
        h = a["heads"]
        out.append(f"| {NAMES[arm]} | {PROTOCOL_NAMES[a['protocol']]} | {a['test']['mean']:.1f} +- "
                   f"{a['test']['sd']:.1f} | {a['test']['min']:.1f} - {a['test']['max']:.1f} | {h['cls']:.1f} | "
                   f"{h['dist']:.1f} | {h['dense']:.1f} | {h['cls+dist']:.1f} | {h['cskd']:.1f} |")
    out.append(f"| (teacher) | its output | {results['teacher']['test_top1']:.1f} | | | | | | |")
    arms = list(s["arms"])
    out += ["", "Per seed (test top-1 %, own protocol, at the best validation epoch):", "",
            "| seed | " + " | ".join(NAMES[a] for a in arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for seed in seeds:
        out.append(f"| {seed} | " + " | ".join(_f(by_seed(recs, a).get(seed)) for a in arms) + " |")
    out += ["", "Paired differences (same seed: same initial weights, same views), test top-1 points:", "",
            "| difference | per seed | mean | 95% interval | what it allows |", "|---|---|---|---|---|"]
    for c in s["comparisons"]:
        per = ", ".join(f"{d:+.1f}" for d in c["differences"])
        out.append(f"| {NAMES[c['a']]} - {NAMES[c['b']]} | {per} | {c['mean']:+.1f} | "
                   f"{_f(c['low'])} to {_f(c['high'])} | {c['verdict']} |")
    p = s.get("reuse")
    if p:
        out += ["", f"Reuse pair: CSKD trained T = {p['T']} epochs from E cached epochs (each view used T / E times, "
                    f"E distinct views per image), seeds {', '.join(map(str, p['seeds']))}:", "",
                "| E | uses per view | test top-1 % mean +- sd |", "|---|---|---|",
                f"| {p['E_few']} | {p['T'] / p['E_few']:g} | {p['few']['mean']:.1f} +- {p['few']['sd']:.1f} |",
                f"| {p['E_many']} | {p['T'] / p['E_many']:g} | {p['many']['mean']:.1f} +- {p['many']['sd']:.1f} |",
                "", f"E = {p['E_few']} - E = {p['E_many']} per seed: "
                    f"{', '.join(f'{d:+.1f}' for d in p['differences'])}; mean {p['mean']:+.1f}; {p['verdict']}"]
    secs = results["seconds"]
    out.append("\ntime: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in secs.items()) +
               f"; this invocation {results['total_seconds'] / 60:.1f} min ({len(results['records'])} runs; a "
               "finished run is reused)")
    return "\n".join(out)


def plot(results: dict, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs, s = main_records(results), results["summary"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm in s["arms"]:
        curves = [[e["test"][r["protocol"]] for e in r["epochs"]] for r in recs if r["arm"] == arm]
        x = range(1, len(curves[0]) + 1)
        mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
        ax.plot(x, mean, marker="o", label=f"{NAMES[arm]} ({len(curves)} seeds)")
        ax.fill_between(x, [min(c[i] for c in curves) for i in range(len(x))],
                        [max(c[i] for c in curves) for i in range(len(x))], alpha=0.15)
    ax.axhline(results["teacher"]["test_top1"], color="gray", linestyle="--", label="teacher")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%), own protocol")
    ax.set_title(f"{results['config']['dataset']}: mean and range over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [os.path.join(out, "accuracy_per_epoch.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    rows = list(s["comparisons"]) + ([{**s["reuse"], "a": f"E={s['reuse']['E_few']}",
                                       "b": f"E={s['reuse']['E_many']} (T={s['reuse']['T']})"}]
                                     if s.get("reuse") else [])
    fig, ax = plt.subplots(figsize=(6.5, 0.6 * len(rows) + 1.2))
    for i, c in enumerate(rows):
        ax.scatter(c["differences"], [i] * len(c["differences"]), color="tab:blue", s=14, zorder=3)
        if c["low"] is not None:
            ax.plot([c["low"], c["high"]], [i, i], color="black", linewidth=2)
        ax.scatter([c["mean"]], [i], color="black", marker="|", s=200, zorder=4)
    ax.axvline(0, color="gray", linestyle="--")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{NAMES.get(c['a'], c['a'])} - {NAMES.get(c['b'], c['b'])}" for c in rows], fontsize=8)
    ax.set_xlabel("paired difference, test top-1 points (dots: seeds; bar: 95% interval)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    paths.append(os.path.join(out, "paired_differences.png"))
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("results", help="an experiment's results.json")
    ap.add_argument("--plots", help="also draw the plots into this folder")
    args = ap.parse_args()
    try:
        with open(args.results) as f:
            results = json.load(f)
        results["gates"], results["summary"] = gates(results), summarize(results)
    except (OSError, ValueError, KeyError, TypeError) as e:  # one line, not a traceback
        ap.exit(2, f"error: {args.results}: not an experiment's results.json ({type(e).__name__}: {e}); pass the "
                   "results.json that `cskd-cache experiment` wrote\n")
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
    print(format_report(results))
    if args.plots:
        print("\n".join(plot(results, args.plots)))


if __name__ == "__main__":
    main()
