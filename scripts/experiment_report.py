"""EXPERIMENTS.md's tables and plots from scripts/experiment.py's runs: per-variant mean ± std, paired differences with
95 % intervals, the equal-wall-clock comparison, validation curves.

    python3 scripts/experiment_report.py table [--root runs/experiment] [--seeds 0,1,2,3,4]
    python3 scripts/experiment_report.py plot -o docs/experiments

Statistics: per variant mean ± sample std over seeds; paired differences d_s = ppl(a, s) − ppl(b, s) over the seeds
both finished (same seed = same data order), mean ± t_{0.975, n−1} · std / √n (the t quantile computed here by
bisection on the CDF, so that no table of constants is needed).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from experiment import A, B, SEEDS, finished, records

# the comparisons each table reports: (a, b, what a − b says)
PAIRS = {
    "A": [("hyper-k1", "moe-k1", "HyperMoE − MoE, k 1 (switch)"), ("hyper-k2", "moe-k2", "HyperMoE − MoE, k 2 (topk)"),
          ("hyper-k1", "hyper-k1-frozen", "HyperExpert's own effect, k 1 (trained − frozen heads)"),
          ("moe-k2", "moe-k1", "yardstick: MoE k 2 − k 1"), ("moe-k1", "dense", "MoE k 1 − dense"),
          ("hyper-k1-topk", "moe-k1-topk", "HyperMoE − MoE, k 1 topk (router without task gradient)"),
          ("moe-k1", "moe-k1-topk", "MoE k 1: switch − topk (a router that learns)")],
    "B": [("hyper-k1-topk", "moe-k1-topk", "HyperMoE − MoE, k 1, official topk gate"),
          ("hyper-k1-switch", "moe-k1-switch", "HyperMoE − MoE, k 1, switch gate"),
          ("hyper-k2-topk", "moe-k2-topk", "HyperMoE − MoE, k 2, topk gate"),
          ("moe-k2-topk", "moe-k1-topk", "yardstick: MoE k 2 − k 1 (topk)"),
          ("moe-k1-topk", "dense", "MoE k 1 topk − dense"), ("moe-k1-switch", "dense", "MoE k 1 switch − dense"),
          ("moe-k1-switch", "moe-k1-topk", "MoE k 1: switch − topk")],
}

# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom: bisection on the CDF, which is integrated with
    Simpson's rule on the density (exact to ~1e-10 here; t_{0.975, 4} = 2.776)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    density = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731

    def cdf(x: float, n: int = 2000) -> float:  # 0.5 + ∫_0^x density
        h = x / n
        s = density(0) + density(x) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired(a: list[float], b: list[float]) -> tuple[float, float, float, int]:
    """mean of a − b, and its 95 % interval (t, n − 1 df) → (mean, low, high, n)."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = statistics.mean(d)
    if n < 2:
        return mean, math.nan, math.nan, n
    half = t_quantile(0.975, n - 1) * statistics.stdev(d) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def summary(run: Path) -> dict:
    recs = records(run)
    evals = [r for r in recs if "val_loss" in r]
    test = next(r for r in recs if "test_loss" in r)
    last = evals[-1]
    import numpy as np

    fractions = [np.asarray(v) for v in last.get("expert_fraction", {}).values()]
    balance = float(np.mean([f.max() * len(f) for f in fractions])) if fractions and len(fractions[0]) > 1 else None
    shares = list(last.get("hyper_share", {}).values())
    return {"val_ppl": last["val_ppl"], "test_ppl": test["test_ppl"], "balance": balance,
            "hyper_share": float(np.mean(shares)) if shares else None,
            "curve": [(r["step"], r["val_ppl"]) for r in evals], "first_loss": recs[0].get("lm_loss")}


def results(root: Path, protocol: str, variants, seeds) -> dict[str, dict[int, dict]]:
    out = {}
    for v in variants:
        runs = {s: summary(root / protocol / f"{v}-s{s}") for s in seeds if finished(root / protocol / f"{v}-s{s}")}
        if runs:
            out[v] = runs
    return out


def _ms(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def table(args: argparse.Namespace) -> int:
    timing = json.loads((args.root / "timing.json").read_text())["s_per_step"] if (args.root / "timing.json").is_file() else {}
    start = json.loads((args.root / "B/initial.json").read_text()) if (args.root / "B/initial.json").is_file() else {}
    for protocol, variants in (("A", A), ("B", B)):
        res = results(args.root, protocol, variants, args.seeds)
        if not res:
            continue
        print(f"### Protocol {protocol}\n")
        first = protocol == "B" and bool(start)
        print("| variant | seeds | " + ("step-0 val ppl | " if first else "") +
              "val ppl | test ppl | s/step | load max/mean | HyperExpert share |")
        print("|---|---|---|---|---|---|---|" + ("---|" if first else ""))
        for v, runs in res.items():
            rows = list(runs.values())
            t = timing.get(f"{protocol}/{v}")
            print(f"| {v} | {len(rows)} | " + (f"{start[v]:.3f} | " if first and v in start else "– | " if first else "")
                  + f"{_ms([r['val_ppl'] for r in rows])} | {_ms([r['test_ppl'] for r in rows])} | "
                  f"{'–' if t is None else f'{t:.3f}'} | {_ms([r['balance'] for r in rows])} | "
                  f"{_ms([r['hyper_share'] for r in rows])} |")
        print("\nPaired differences of test perplexity (same seed = same data order), 95 % interval (t, n − 1):\n")
        print("| comparison | a − b | 95 % interval | n | a lower in |")
        print("|---|---|---|---|---|")
        for a, b, what in PAIRS[protocol]:
            if a not in res or b not in res:
                continue
            seeds = sorted(set(res[a]) & set(res[b]))
            xa, xb = [res[a][s]["test_ppl"] for s in seeds], [res[b][s]["test_ppl"] for s in seeds]
            mean, low, high, n = paired(xa, xb)
            lower = sum(x < y for x, y in zip(xa, xb))
            print(f"| {what} (`{a}` − `{b}`) | {mean:+.3f} | [{low:+.3f}, {high:+.3f}] | {n} | {lower} of {n} |")
        if timing:
            print("\nEqual wall-clock time: each variant's validation perplexity at the time the faster variant of "
                  "the pair took for all its steps (linear interpolation on the logged curve; seed mean):\n")
            print("| pair | s/step a / b | a's val ppl at b's time | b's val ppl at the end |")
            print("|---|---|---|---|")
            for a, b, what in PAIRS[protocol][:2]:
                ta, tb = timing.get(f"{protocol}/{a}"), timing.get(f"{protocol}/{b}")
                if a not in res or b not in res or not ta or not tb or ta <= tb:
                    continue
                at = []
                for s in sorted(set(res[a]) & set(res[b])):
                    curve = res[a][s]["curve"]
                    step = curve[-1][0] * tb / ta  # the step a reaches in b's whole time
                    at.append(_interp(curve, step))
                end = [res[b][s]["curve"][-1][1] for s in sorted(set(res[a]) & set(res[b]))]
                print(f"| `{a}` vs `{b}` | {ta:.3f} / {tb:.3f} | {_ms(at)} | {_ms(end)} |")
        print("\nPer run (test ppl; val ppl):\n")
        print("| variant | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
        print("|---|" + "---|" * len(args.seeds))
        for v, runs in res.items():
            print(f"| {v} | " + " | ".join(f"{runs[s]['test_ppl']:.3f}; {runs[s]['val_ppl']:.3f}" if s in runs else "–"
                                           for s in args.seeds) + " |")
        print()
    return 0


def _interp(curve: list[tuple[int, float]], step: float) -> float:
    for (s0, p0), (s1, p1) in zip(curve, curve[1:]):
        if s0 <= step <= s1:
            return p0 + (p1 - p0) * (step - s0) / (s1 - s0)
    return curve[0][1] if step < curve[0][0] else curve[-1][1]


def plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    args.out.mkdir(parents=True, exist_ok=True)
    for protocol, variants in (("A", A), ("B", B)):
        res = results(args.root, protocol, variants, args.seeds)
        if not res:
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        for v, runs in res.items():
            steps = [s for s, _ in next(iter(runs.values()))["curve"]]
            ppl = np.array([[p for _, p in r["curve"]] for r in runs.values() if len(r["curve"]) == len(steps)])
            mean = ppl.mean(axis=0)
            line, = ax.plot(steps, mean, label=f"{v} (n={len(ppl)})", marker="o", markersize=3)
            ax.fill_between(steps, ppl.min(axis=0), ppl.max(axis=0), color=line.get_color(), alpha=0.15)
        ax.set_xlabel("update")
        ax.set_ylabel("validation perplexity")
        ax.set_title(f"Protocol {protocol}: validation perplexity, seed mean (band: min-max over seeds)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        file = args.out / f"protocol_{protocol}_val.png"
        fig.savefig(file, dpi=110)
        plt.close(fig)
        print(f"wrote {file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("table", "plot"))
    p.add_argument("--root", type=Path, default=Path("runs/experiment"), help="where scripts/experiment.py put the runs")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds (default 0-4)")
    p.add_argument("-o", "--out", type=Path, default=Path("docs/experiments"), help="plot: output folder")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.root = args.root.resolve()
    return {"table": table, "plot": plot}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
