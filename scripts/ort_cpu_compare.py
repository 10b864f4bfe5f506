"""onnxruntime CPU against torch eager on the exported HyperMoE layer, interleaved, one process.

    python scripts/ort_cpu_compare.py [--threads 1 2] [--top-k 1 2] [--tokens 64 1024 8192] [--rounds 5]
        [--profile] [--spinning] [--rows fused/sets fused/auto sparse/auto]

Official sizes (hypermoe's default config: d 768, f 3072, N 8, a 64, tanh-GELU, expert biases), ref.init
seed 0, fp32, x ~ N(0, 1) of shape (1, T, d). Rows: `torch` = hypermoe.layer.HyperMoELayer in eval mode
(adapter cache on, inference_mode), the row BENCHMARKS.md calls torch eager; `ort-<flavour>/<form>` =
onnxruntime's CPU provider on export/'s file (export.runtime.OnnxRunner, inputs bound once, no copies).
Per (threads, k, T): one warm-up call each, then `rounds` rounds in which every row runs once in turn;
median and min ms per call, and each ORT row's speed relative to torch (torch median / row median).
Torch threads and intra_op_num_threads are the same. With --profile, the top nodes of an onnxruntime
profile of each ORT row at the largest T (first thread count) are printed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

import ref  # noqa: E402
from ref import HyperMoEConfig  # noqa: E402

ORT_ROWS = (("fused", "sets"), ("fused", "auto"), ("sparse", "auto"))


def profile_top(path: str, x: np.ndarray, threads: int, n: int = 8) -> list[str]:
    from export.runtime import OnnxRunner

    # onnxruntime's default spin-waiting (spinning=True), as this profile has always been taken
    runner = OnnxRunner(path, "cpu", threads=threads, spinning=True,
                        profile_prefix=os.path.join(os.path.dirname(path), "profile"))
    for _ in range(3):
        runner(x)
    with open(runner.session.end_profiling()) as f:
        events = json.load(f)
    total, calls = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            key = f"{event['args'].get('op_name', '?')} {event['name'][:-len('_kernel_time')]}"
            total[key] += event["dur"]
            calls[key] += 1
    whole = sum(total.values())
    return [f"{total[k] / calls[k] / 1e3:9.2f} ms/call {100 * v / whole:5.1f} %  {k}" for k, v in total.most_common(n)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 1024, 8192])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--spinning", action="store_true",
                        help="session.intra_op.allow_spinning = 1 (onnxruntime's default; OnnxRunner turns it off on the CPU)")
    parser.add_argument("--rows", nargs="+", default=[f"{f}/{h}" for f, h in ORT_ROWS],
                        help="ORT rows as flavour/hyper_form (default: %(default)s)")
    args = parser.parse_args(argv)

    import torch

    from export.exporter import export_model
    from export.runtime import OnnxRunner
    from hypermoe.layer import HyperMoELayer

    workdir = tempfile.TemporaryDirectory(prefix="ort-cpu-compare-")
    print(f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}; spinning {args.spinning}")
    for k in args.top_k:
        cfg = HyperMoEConfig().replace(top_k=k)
        params = ref.init(cfg, 0)
        layer = HyperMoELayer.from_ref(cfg, params, dtype=torch.float32).eval()
        files = {}
        for flavour, form in (row.split("/") for row in args.rows):
            path = os.path.join(workdir.name, f"k{k}-{flavour}-{form}.onnx")
            result = export_model(path, cfg, params, flavour=flavour, hyper_form=form)
            files[f"ort-{flavour}/{result.hyper_form}"] = path
        for threads in args.threads:
            torch.set_num_threads(threads)
            runners = {name: OnnxRunner(path, "cpu", threads=threads, spinning=args.spinning) for name, path in files.items()}
            for T in args.tokens:
                x = np.random.default_rng(1).standard_normal((1, T, cfg.d_model)).astype(np.float32)
                xt = torch.from_numpy(x[0])
                for runner in runners.values():
                    runner.bind(x)
                rows = {"torch": lambda: layer(xt, 0)}
                rows.update({name: runner.run_bound for name, runner in runners.items()})
                times = {name: [] for name in rows}
                with torch.inference_mode():
                    for fn in rows.values():
                        fn()  # warm-up
                    for _ in range(args.rounds):
                        for name, fn in rows.items():
                            start = time.perf_counter()
                            fn()
                            times[name].append(time.perf_counter() - start)
                base = statistics.median(times["torch"])
                for name, values in times.items():
                    median = statistics.median(values)
                    print(f"threads {threads} k {k} T {T:5d}  {name:22s} median {median * 1e3:9.2f} ms  "
                          f"min {min(values) * 1e3:9.2f} ms  × torch speed {base / median:5.2f}")
            if args.profile and threads == args.threads[0]:
                x = np.random.default_rng(1).standard_normal((1, max(args.tokens), cfg.d_model)).astype(np.float32)
                for name, path in files.items():
                    print(f"profile {name}, k {k}, T {max(args.tokens)}, threads {threads}:")
                    print("\n".join(profile_top(path, x, threads)))
        print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
