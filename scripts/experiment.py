"""EXPERIMENTS.md: does HyperMoE beat MoE at equal experts and sparsity? Two protocols, every run one printed
`hypermoe` command (so any row reruns alone), then tables with paired differences and 95 % intervals, and plots.

    python3 scripts/fetch_corpus.py && python3 scripts/fetch_corpus.py --works a && python3 scripts/fetch_corpus.py --works b
    python3 scripts/experiment.py run --jobs 2          # both protocols, every variant x seed (skips finished runs)
    python3 scripts/experiment.py time                  # s/step of every variant, one run at a time (idle machine!)
    python3 scripts/experiment.py initial               # protocol B: step-0 validation perplexity of each start
    python3 scripts/experiment_report.py table          # markdown tables (EXPERIMENTS.md) from runs/experiment/
    python3 scripts/experiment_report.py plot -o docs/experiments   # validation curves, mean and seed band

Protocol A (from scratch): the cpu-small model family on the whole corpus; variants differ only in the FFN.
Protocol B (the paper's shape): a dense model pretrained on half "a" of the works, upcycled by `hypermoe convert
--from hypermoe-dense` (every expert a copy of the dense MLP, HyperExpert W_up / b_up heads zero, routers drawn from
seed 0 for every variant), then fine-tuned on half "b" (`hypermoe train --init`), evaluated on half b's test split.

Runs go to --root (default runs/experiment, outside git). `--jobs J` runs J trainings at once with one thread each;
s/step in the tables comes from `time` (one run at a time), not from the runs, whose clocks share the machine.
The statistics, tables and plots are scripts/experiment_report.py's.
"""

from __future__ import annotations

import argparse
import json
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
    "moe-topk": ["--top-k", "1", "--gate", "topk", "--no-hyper-expert"], "hyper-topk": ["--top-k", "1", "--gate", "topk"],
    "moe-switch": ["--top-k", "1", "--gate", "switch", "--no-hyper-expert"],
    "hyper-switch": ["--top-k", "1", "--gate", "switch"],
    "moe-topk-k2": ["--top-k", "2", "--gate", "topk", "--no-hyper-expert"], "hyper-topk-k2": ["--top-k", "2", "--gate", "topk"],
}
B = {
    "dense": ("dense", []),  # the pretrained dense model fine-tuned: the floor
    "moe-k1-topk": ("moe-topk", [ACK]),  # the paper's own setting (official renormalised gate)
    "hyper-k1-topk": ("hyper-topk", [ACK]),
    "moe-k1-switch": ("moe-switch", []),
    "hyper-k1-switch": ("hyper-switch", []),
    "moe-k2-topk": ("moe-topk-k2", []),  # the yardstick: two experts per token
    "hyper-k2-topk": ("hyper-topk-k2", []),
}
B_TRAIN = ["--steps", "300", "--batch-size", "16", "--seq-len", "128", "--lr", "3e-4", "--min-lr", "3e-5",
           "--warmup-steps", "30", "--eval-every", "50", "--eval-tokens", "32768", "--checkpoint-every", "300",
           "--threads", "1", "--quiet"]

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
            "--experts", "8", "--seed", "0", *B_UPCYCLED[name], "-o", str(root / "B" / f"up-{name}")]


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


def initial(args: argparse.Namespace) -> int:
    """Protocol B's starting points: validation perplexity at step 0 (before fine-tuning) of every variant's --init
    model on half b's validation split (the runs' eval windows), written to ROOT/B/initial.json. Evidence for what
    upcycling does to each gate: topk k = 1 starts at the dense model's numbers, switch scales each FFN by p."""
    import torch

    from hypermoe.model import HyperMoETransformer
    from hypermoe.train import TrainConfig, evaluate, open_corpus

    torch.set_num_threads(1)
    data = CORPUS / "shakespeare-b"
    corpus, out = open_corpus(data), {}
    for variant, (init, _) in B.items():
        path = args.root / "B" / ("pretrain-dense/checkpoint/model" if init == "dense" else f"up-{init}")
        model = HyperMoETransformer.from_dir(path)
        cfg = TrainConfig(model=model.config, data=str(data), batch_size=16, seq_len=128, eval_tokens=32768)
        result = evaluate(cfg, model, corpus.val)
        out[variant] = result["val_ppl"]
        print(f"{variant}: step-0 val ppl {result['val_ppl']:.3f} ({path})", flush=True)
    (args.root / "B" / "initial.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("run", "time", "initial"))
    p.add_argument("--root", type=Path, default=Path("runs/experiment"), help="where the runs go")
    p.add_argument("--variants-a", default=",".join(A), help=f"protocol A variants: {', '.join(A)} (empty: none)")
    p.add_argument("--variants-b", default=",".join(B), help=f"protocol B variants: {', '.join(B)} (empty: none)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds (default 0-4)")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once, one thread each (default 1)")
    p.add_argument("--force", action="store_true", help="rerun finished runs too")
    args = p.parse_args(argv)
    args.variants_a = [v for v in args.variants_a.split(",") if v]
    args.variants_b = [v for v in args.variants_b.split(",") if v]
    unknown = [v for v in args.variants_a if v not in A] + [v for v in args.variants_b if v not in B]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.root = args.root.resolve()
    return {"run": run, "time": time_steps, "initial": initial}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
