"""The HyperMoE-vs-MoE experiment of EXPERIMENTS.md: every variant × seed is one `hypermoe train` command
(printed before it runs, so any row can be rerun alone), then one table from the runs' logs.

    python3 scripts/fetch_corpus.py                          # the corpus (once; ~20 s)
    python3 scripts/experiment.py run [--jobs 2] [--variants hyper,moe] [--seeds 0,1,2]
    python3 scripts/experiment.py table                      # markdown table + per-run rows from runs/experiment/*
    hypermoe plot runs/experiment/*-s0 -o runs/experiment-plots

Runs go to --root (default runs/experiment, outside git via .gitignore's /runs/). `run` skips a run whose
log already holds its test evaluation; `--jobs J` runs J trainings at once, each with one thread (on a
2-core machine J = 2: the per-step wall time is then that of one core, stated in the table).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# variant → (preset, extra flags). All share d 128, f 256, 4 blocks, N 8 (dense: one expert of width f).
VARIANTS = {
    "dense": ("cpu-small-dense", []),
    "moe-k1": ("cpu-small-moe", []),
    "hyper-k1": ("cpu-small", []),
    "moe-k2": ("cpu-small-moe-k2", []),
    "hyper-k1-frozen": ("cpu-small", ["--freeze-hyper-heads"]),
}
# the training budget of every run: equal tokens (steps × batch × seq = 1000 × 16 × 128 = 2.05M, ~0.45 epoch)
TRAIN = ["--steps", "1000", "--batch-size", "16", "--seq-len", "128", "--lr", "1e-3", "--warmup-steps", "100",
         "--eval-every", "100", "--eval-tokens", "65536", "--checkpoint-every", "500", "--threads", "1", "--quiet"]


def command(variant: str, seed: int, root: Path, data: Path) -> list[str]:
    preset, extra = VARIANTS[variant]
    return ["hypermoe", "train", "--config", preset, "--data", str(data), "--out", str(root / f"{variant}-s{seed}"),
            "--seed", str(seed), *TRAIN, *extra]


def records(run: Path) -> list[dict]:
    lines = (run / "log.jsonl").read_text().splitlines() if (run / "log.jsonl").is_file() else []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a partial last line of a killed run
    return out


def finished(run: Path) -> bool:
    return any("test_loss" in r for r in records(run))


def run(args: argparse.Namespace) -> int:
    jobs = [(v, s) for v in args.variants for s in args.seeds]
    todo = [(v, s) for v, s in jobs if args.force or not finished(args.root / f"{v}-s{s}")]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done; {args.jobs} at a time", flush=True)

    def one(job):
        cmd = command(*job, args.root, args.data) + (["--force"] if (args.root / f"{job[0]}-s{job[1]}").exists() else [])
        print("$ " + shlex.join(cmd), flush=True)
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
        print(f"  {job[0]} seed {job[1]}: exit {done.returncode} in {time.perf_counter() - start:.0f} s: {tail[0]}",
              flush=True)
        return done.returncode

    args.root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(one, todo))
    return max(codes, default=0)


def summary(run: Path) -> dict:
    """val/test perplexity at the end, s per step (median of the logged windows), parameters, load balance."""
    recs = records(run)
    evals = [r for r in recs if "val_loss" in r]
    test = next(r for r in recs if "test_loss" in r)
    train = [r for r in recs if "tokens_per_s" in r]
    cfg = json.loads((run / "train.json").read_text())
    tokens_per_step = cfg["batch_size"] * cfg["seq_len"] * cfg["grad_accum"]
    weights = run / "checkpoint" / "model" / "weights.npz"
    import numpy as np

    with np.load(weights, allow_pickle=False) as archive:
        params = sum(archive[name].size for name in archive.files)
    last = evals[-1]
    fractions = [np.asarray(v) for v in last.get("expert_fraction", {}).values()]
    # load balance: max over experts of the token share × N (1 = perfectly even), mean over MoE layers
    balance = float(np.mean([f.max() * len(f) for f in fractions])) if fractions and len(fractions[0]) > 1 else None
    shares = list(last.get("hyper_share", {}).values())
    return {"val_ppl": last["val_ppl"], "test_ppl": test["test_ppl"], "params": int(params),
            "s_per_step": statistics.median(tokens_per_step / r["tokens_per_s"] for r in train),
            "balance": balance, "hyper_share": float(np.mean(shares)) if shares else None}


def table(args: argparse.Namespace) -> int:
    def mean_std(values):
        values = [v for v in values if v is not None]
        if not values:
            return "–"
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    print("| variant | seeds | val ppl | test ppl | s/step | parameters | load max/mean | HyperExpert share |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in VARIANTS:
        runs = [args.root / f"{variant}-s{s}" for s in args.seeds if finished(args.root / f"{variant}-s{s}")]
        if not runs:
            continue
        rows = [summary(r) for r in runs]
        params = {r["params"] for r in rows}
        print(f"| {variant} | {len(rows)} | {mean_std([r['val_ppl'] for r in rows])} | "
              f"{mean_std([r['test_ppl'] for r in rows])} | {mean_std([r['s_per_step'] for r in rows])} | "
              f"{'/'.join(f'{p:,}' for p in sorted(params))} | {mean_std([r['balance'] for r in rows])} | "
              f"{mean_std([r['hyper_share'] for r in rows])} |")
    print()
    print("| run | val ppl | test ppl | s/step |")
    print("|---|---|---|---|")
    for variant in VARIANTS:
        for s in args.seeds:
            path = args.root / f"{variant}-s{s}"
            if finished(path):
                r = summary(path)
                print(f"| {variant}-s{s} | {r['val_ppl']:.3f} | {r['test_ppl']:.3f} | {r['s_per_step']:.3f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("run", "table"))
    p.add_argument("--root", type=Path, default=Path("runs/experiment"))
    p.add_argument("--data", type=Path, default=Path.home() / ".cache/hypermoe/corpus/shakespeare")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--force", action="store_true", help="rerun finished runs too")
    args = p.parse_args(argv)
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return run(args) if args.action == "run" else table(args)


if __name__ == "__main__":
    sys.exit(main())
