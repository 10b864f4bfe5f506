"""EXPERIMENTS.md: does HyperMoE beat MoE at equal experts and sparsity? Two protocols, every run one printed
`hypermoe` command (so any row reruns alone), then tables with paired differences and 95 % intervals, and plots.

    python3 scripts/fetch_corpus.py && python3 scripts/fetch_corpus.py --works a && python3 scripts/fetch_corpus.py --works b
    python3 scripts/experiment.py run --jobs 2          # both protocols, every variant x seed (skips finished runs)
    python3 scripts/experiment.py time                  # s/step of every variant, one run at a time (idle machine!)
    python3 scripts/experiment.py table                 # markdown tables (EXPERIMENTS.md) from runs/experiment/
    python3 scripts/experiment.py plot -o docs/experiments   # validation curves, mean and seed band, per protocol

Protocol A (from scratch): the cpu-small model family on the whole corpus; variants differ only in the FFN.
Protocol B (the paper's shape): a dense model pretrained on half "a" of the works, upcycled by `hypermoe convert
--from hypermoe-dense` (every expert a copy of the dense MLP, HyperExpert W_up / b_up heads zero, routers drawn from
seed 0 for every variant), then fine-tuned on half "b" (`hypermoe train --init`), evaluated on half b's test split.

Runs go to --root (default runs/experiment, outside git). `--jobs J` runs J trainings at once with one thread each;
s/step in the tables comes from `time` (one run at a time), not from the runs, whose clocks share the machine.
Statistics: per variant mean ± sample std over seeds; paired differences d_s = ppl(a, s) − ppl(b, s) over the
seeds both finished, mean ± t_{0.975, n−1} · std / √n (t quantile computed here by bisection on the CDF).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CORPUS = Path.home() / ".cache/hypermoe/corpus"
ROOT = Path(__file__).resolve().parents[1]  # the checkout whose code the runs use (PYTHONPATH, see `execute`)
ACK = "--allow-router-without-task-gradient"  # the topk k = 1 variants: routers without task gradient, on purpose

# Protocol A: variant -> (preset, extra flags). d 128, f 256, 4 blocks, N 8 (dense: one expert of width f).
A = {
    "dense": ("cpu-small-dense", []),
    "moe-k1": ("cpu-small-moe", []),  # gate switch
    "hyper-k1": ("cpu-small", []),  # gate switch
    "hyper-k1-frozen": ("cpu-small", ["--freeze-hyper-heads"]),  # HyperExpert output 0 throughout
    "moe-k2": ("cpu-small-moe-k2", []),  # gate topk
    "hyper-k2": ("cpu-small-k2", []),  # gate topk
    "moe-k1-topk": ("cpu-small-moe", ["--gate", "topk", ACK]),  # the old baseline: router without task gradient
    "hyper-k1-topk": ("cpu-small", ["--gate", "topk", ACK]),
}
A_TRAIN = ["--steps", "1000", "--batch-size", "16", "--seq-len", "128", "--lr", "1e-3", "--min-lr", "1e-4",
           "--warmup-steps", "100", "--eval-every", "100", "--eval-tokens", "32768", "--checkpoint-every", "1000",
           "--threads", "1", "--quiet"]

# Protocol B: pretraining, upcycling, fine-tuning variants -> (upcycled model name or "dense", extra flags)
B_PRETRAIN = ["--config", "cpu-small-dense", "--seed", "0", "--steps", "1000", "--batch-size", "16", "--seq-len",
              "128", "--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "100", "--eval-every", "250",
              "--eval-tokens", "32768", "--checkpoint-every", "1000", "--threads", "1", "--quiet"]
B_UPCYCLED = {  # name -> convert flags
    "moe-topk": ["--gate", "topk", "--no-hyper-expert"], "hyper-topk": ["--gate", "topk"],
    "moe-switch": ["--gate", "switch", "--no-hyper-expert"], "hyper-switch": ["--gate", "switch"],
}
B = {
    "dense": ("dense", []),  # the pretrained dense model fine-tuned: the floor
    "moe-k1-topk": ("moe-topk", [ACK]),  # the paper's own setting (official renormalised gate)
    "hyper-k1-topk": ("hyper-topk", [ACK]),
    "moe-k1-switch": ("moe-switch", []),
    "hyper-k1-switch": ("hyper-switch", []),
}
B_TRAIN = ["--steps", "300", "--batch-size", "16", "--seq-len", "128", "--lr", "3e-4", "--min-lr", "3e-5",
           "--warmup-steps", "30", "--eval-every", "50", "--eval-tokens", "32768", "--checkpoint-every", "300",
           "--threads", "1", "--quiet"]

# the comparisons each table reports: (a, b, what a − b says)
PAIRS = {
    "A": [("hyper-k1", "moe-k1", "HyperMoE − MoE, k 1 (switch)"), ("hyper-k2", "moe-k2", "HyperMoE − MoE, k 2 (topk)"),
          ("hyper-k1", "hyper-k1-frozen", "HyperExpert's own effect, k 1 (trained − frozen heads)"),
          ("moe-k2", "moe-k1", "yardstick: MoE k 2 − k 1"), ("moe-k1", "dense", "MoE k 1 − dense"),
          ("hyper-k1-topk", "moe-k1-topk", "HyperMoE − MoE, k 1 topk (router without task gradient)"),
          ("moe-k1", "moe-k1-topk", "MoE k 1: switch − topk (a router that learns)")],
    "B": [("hyper-k1-topk", "moe-k1-topk", "HyperMoE − MoE, k 1, official topk gate"),
          ("hyper-k1-switch", "moe-k1-switch", "HyperMoE − MoE, k 1, switch gate"),
          ("moe-k1-topk", "dense", "MoE k 1 topk − dense"), ("moe-k1-switch", "dense", "MoE k 1 switch − dense")],
}
SEEDS = [0, 1, 2, 3, 4]


def a_command(variant: str, seed: int, root: Path) -> list[str]:
    preset, extra = A[variant]
    return ["hypermoe", "train", "--config", preset, "--data", str(CORPUS / "shakespeare"),
            "--out", str(root / "A" / f"{variant}-s{seed}"), "--seed", str(seed), *A_TRAIN, *extra]


def b_pretrain_command(root: Path) -> list[str]:
    return ["hypermoe", "train", *B_PRETRAIN, "--data", str(CORPUS / "shakespeare-a"),
            "--out", str(root / "B" / "pretrain-dense")]


def b_upcycle_command(name: str, root: Path) -> list[str]:
    return ["hypermoe", "convert", "--from", "hypermoe-dense", str(root / "B" / "pretrain-dense/checkpoint/model"),
            "--experts", "8", "--top-k", "1", "--seed", "0", *B_UPCYCLED[name], "-o", str(root / "B" / f"up-{name}")]


def b_command(variant: str, seed: int, root: Path) -> list[str]:
    init, extra = B[variant]
    model = root / "B" / ("pretrain-dense/checkpoint/model" if init == "dense" else f"up-{init}")
    return ["hypermoe", "train", "--init", str(model), "--data", str(CORPUS / "shakespeare-b"),
            "--out", str(root / "B" / f"{variant}-s{seed}"), "--seed", str(seed), *B_TRAIN, *extra]


def records(run: Path) -> list[dict]:
    out = []
    if (run / "log.jsonl").is_file():
        for line in (run / "log.jsonl").read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a partial last line of a killed run
    return out


def finished(run: Path) -> bool:
    return any("test_loss" in r for r in records(run))


def execute(cmd: list[str], *, force: bool = False) -> tuple[int, float, str]:
    """Run one printed command with this checkout's code (PYTHONPATH=ROOT, `python -m hypermoe`): a sweep
    started from a pinned worktree keeps using that worktree's code while the main checkout changes."""
    out = Path(cmd[cmd.index("--out") + 1]) if "--out" in cmd else Path(cmd[cmd.index("-o") + 1])
    full = cmd + (["--force"] if force and out.exists() else [])
    print("$ " + shlex.join(full), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hypermoe", *full[1:]], capture_output=True, text=True, env=env)
    tail = ((done.stdout + done.stderr).strip().splitlines() or [""])[-1]
    return done.returncode, time.perf_counter() - start, tail


def run(args: argparse.Namespace) -> int:
    root = args.root
    todo_a = [("A", v, s) for v in args.variants_a for s in args.seeds
              if args.force or not finished(root / "A" / f"{v}-s{s}")]
    todo_b = [("B", v, s) for v in args.variants_b for s in args.seeds
              if args.force or not finished(root / "B" / f"{v}-s{s}")]
    print(f"{len(todo_a)} protocol A runs and {len(todo_b)} protocol B runs to do, {args.jobs} at a time", flush=True)
    (root / "A").mkdir(parents=True, exist_ok=True)
    (root / "B").mkdir(parents=True, exist_ok=True)
    codes = []

    def report(job, result):
        code, seconds, tail = result
        print(f"  {' '.join(map(str, job))}: exit {code} in {seconds:.0f} s: {tail}", flush=True)
        codes.append(code)
        return code

    def b_chain() -> bool:
        """Pretraining → upcycling (each once); True when protocol B's fine-tuning runs can start."""
        if not finished(root / "B" / "pretrain-dense"):
            if report(("B", "pretrain"), execute(b_pretrain_command(root), force=True)):
                return False
        for name in B_UPCYCLED:
            if not (root / "B" / f"up-{name}" / "config.json").is_file():
                if report(("B", "upcycle", name), execute(b_upcycle_command(name, root), force=True)):
                    return False
        return True

    import threading

    queue: list[tuple] = ([("chain",)] if todo_b else []) + todo_a  # the chain first: B's runs wait for it
    lock, chain_done = threading.Lock(), [not todo_b]

    def worker() -> None:
        while True:
            with lock:
                job = queue.pop(0) if queue else None
                if job is None and chain_done[0]:
                    return
            if job is None:  # the chain is still pretraining: its runs come
                time.sleep(5)
            elif job[0] == "chain":
                ok = b_chain()
                with lock:
                    queue[0:0] = todo_b if ok else []  # protocol B next, ahead of the rest of A
                    chain_done[0] = True
            else:
                protocol, variant, seed = job
                report(job, execute((a_command if protocol == "A" else b_command)(variant, seed, root), force=True))

    with ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(worker) for _ in range(args.jobs)]:
            f.result()
    return max(codes, default=0)


def time_steps(args: argparse.Namespace) -> int:
    """s/step of every variant, one run at a time, one thread: 40 updates each (the first 10 are warm-up), written to
    ROOT/timing.json. The machine should be otherwise idle."""
    root, results = args.root, {}
    steps = ["--steps", "40", "--log-every", "10", "--eval-every", "0", "--eval-tokens", "256", "--checkpoint-every", "0"]
    jobs = [("A", v, a_command(v, 0, root)) for v in A]
    if (root / "B" / "pretrain-dense/checkpoint/model").is_dir():
        jobs += [("B", v, b_command(v, 0, root)) for v in B]
    for protocol, variant, cmd in jobs:
        cmd = [c for c in cmd]
        cmd[cmd.index("--out") + 1] = str(root / "timing" / f"{protocol}-{variant}")
        for flag, value in zip(steps[::2], steps[1::2]):
            if flag in cmd:
                cmd[cmd.index(flag) + 1] = value
            else:
                cmd += [flag, value]
        code, _, tail = execute(cmd, force=True)
        if code:
            print(f"  {protocol} {variant}: exit {code}: {tail}")
            return code
        recs = [r for r in records(Path(cmd[cmd.index("--out") + 1])) if "tokens_per_s" in r and r["step"] > 10]
        tokens = 16 * 128
        results[f"{protocol}/{variant}"] = statistics.median(tokens / r["tokens_per_s"] for r in recs)
        print(f"  {protocol} {variant}: {results[f'{protocol}/{variant}']:.4f} s/step", flush=True)
    info = {"s_per_step": results, "cpu": _cpu(), "threads": 1, "command": "python3 scripts/experiment.py time",
            "date": time.strftime("%Y-%m-%d %H:%M")}
    (root / "timing.json").write_text(json.dumps(info, indent=2) + "\n")
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


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
    for protocol, variants in (("A", A), ("B", B)):
        res = results(args.root, protocol, variants, args.seeds)
        if not res:
            continue
        print(f"### Protocol {protocol}\n")
        print("| variant | seeds | val ppl | test ppl | s/step | load max/mean | HyperExpert share |")
        print("|---|---|---|---|---|---|---|")
        for v, runs in res.items():
            rows = list(runs.values())
            t = timing.get(f"{protocol}/{v}")
            print(f"| {v} | {len(rows)} | {_ms([r['val_ppl'] for r in rows])} | {_ms([r['test_ppl'] for r in rows])} | "
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
        ax.set_yscale("log")
        ax.set_xlabel("update")
        ax.set_ylabel("validation perplexity (log scale)")
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
    p.add_argument("action", choices=("run", "time", "table", "plot"))
    p.add_argument("--root", type=Path, default=Path("runs/experiment"), help="where the runs go")
    p.add_argument("--variants-a", default=",".join(A), help=f"protocol A variants: {', '.join(A)} (empty: none)")
    p.add_argument("--variants-b", default=",".join(B), help=f"protocol B variants: {', '.join(B)} (empty: none)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds (default 0-4)")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once, one thread each (default 1)")
    p.add_argument("--force", action="store_true", help="rerun finished runs too")
    p.add_argument("-o", "--out", type=Path, default=Path("docs/experiments"), help="plot: output folder")
    args = p.parse_args(argv)
    args.variants_a = [v for v in args.variants_a.split(",") if v]
    args.variants_b = [v for v in args.variants_b.split(",") if v]
    unknown = [v for v in args.variants_a if v not in A] + [v for v in args.variants_b if v not in B]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.root = args.root.resolve()
    return {"run": run, "time": time_steps, "table": table, "plot": plot}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
