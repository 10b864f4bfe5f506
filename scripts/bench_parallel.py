"""Expert-parallel HyperMoE layer on CPU (gloo): tokens/s and bytes exchanged per training step at 1, 2, 4
processes, next to the analytic all-to-all volume (docs/parallel.md, BENCHMARKS.md).

    python scripts/bench_parallel.py                          # cpu-small's layer (d 128, f 256, N 8), k = 1 and 2
    python scripts/bench_parallel.py --procs 1 2 4 --tokens 4096 --iters 10

One step = forward + backward of one layer on a global batch of --tokens tokens (sequences of 128), split evenly
over P processes, each with one thread. Bytes are counted at the all_to_all_single calls of the forward
(dispatch + return: rows sent to *other* ranks, and all rows); the backward's all_to_all repeats them with the
gradients (same split sizes), so a training step moves twice the forward volume. Analytic: every one of the
T·k assignments goes out and comes back, 2·T·k·d elements per layer per forward, of which (P − 1)/P leave
the rank under balanced routing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEQ = 128


def _worker(rank: int, world: int, store: str, cfg_dict: dict, tokens: int, iters: int, out: str) -> None:
    from ref.config import HyperMoEConfig
    from hypermoe import expert_parallel, parallel
    from hypermoe.layer import HyperMoELayer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    cfg = HyperMoEConfig.from_dict(cfg_dict)
    torch.manual_seed(0)
    layer = parallel.ExpertParallelHyperMoE.from_layer(HyperMoELayer(cfg).train())
    x_all = torch.randn(tokens // SEQ, SEQ, cfg.d_model, generator=torch.Generator().manual_seed(1))
    mine = x_all.chunk(world)[rank].clone().requires_grad_(True)  # (B/P, S, d)

    sent = {"all": 0, "off_rank": 0}  # elements of the forward's all_to_all_single rows
    real = expert_parallel.funcol

    def counting(t, output_split_sizes, input_split_sizes, group):
        row = t[0].numel() if t.shape[0] else cfg.d_model
        sent["all"] += sum(input_split_sizes) * row
        sent["off_rank"] += sum(n for r, n in enumerate(input_split_sizes) if r != rank) * row
        return real.all_to_all_single(t, output_split_sizes, input_split_sizes, group)

    expert_parallel.funcol = types.SimpleNamespace(all_to_all_single=counting, wait_tensor=real.wait_tensor)
    times = []
    for i in range(iters + 2):  # 2 warm-up steps
        sent.update(all=0, off_rank=0)
        dist.barrier()
        start = time.perf_counter()
        out_ = layer(mine, 0)
        (out_.output.square().mean() + out_.aux["switch_balance"]).backward()
        parallel.sync_gradients(layer)
        dist.barrier()
        if i >= 2:
            times.append(time.perf_counter() - start)
        layer.zero_grad(set_to_none=True)
    totals = torch.tensor([sent["all"], sent["off_rank"]], dtype=torch.float64)
    dist.all_reduce(totals)
    if rank == 0:
        Path(out).write_text(json.dumps({"median_s": statistics.median(times), "min_s": min(times),
                                         "all": totals[0].item(), "off_rank": totals[1].item()}))
    dist.destroy_process_group()


def run(cfg, procs: int, tokens: int, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(_worker, args=(procs, str(Path(tmp) / "store"), cfg.to_dict(), tokens, iters, out),
                           nprocs=procs, join=True, start_method="spawn")
        return json.loads(Path(out).read_text())


def main() -> int:
    from hypermoe.train import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="cpu-small", choices=sorted(PRESETS))
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=4096, help="global tokens per step (multiple of 128 · procs)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(f"| k | P | tokens/s (median) | ms/step median (min) | fwd all_to_all, all rows (MB) | fwd, off-rank (MB) "
          f"| analytic 2·T·k·d (MB) | analytic × (P−1)/P (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for k in args.top_k:
        cfg = PRESETS[args.config].replace(top_k=k)
        for P in args.procs:
            r = run(cfg, P, args.tokens, args.iters)
            analytic = 2 * args.tokens * k * cfg.d_model * 4 / 1e6  # float32 bytes
            print(f"| {k} | {P} | {args.tokens / r['median_s']:,.0f} "
                  f"| {1e3 * r['median_s']:.1f} ({1e3 * r['min_s']:.1f}) "
                  f"| {r['all'] * 4 / 1e6:.2f} | {r['off_rank'] * 4 / 1e6:.2f} | {analytic:.2f} "
                  f"| {analytic * (P - 1) / P:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
