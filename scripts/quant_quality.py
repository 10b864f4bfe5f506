"""Issue 21 §1's quality numbers: what int8 / int4 weight quantisation (hypermoe export --quantize) costs a trained
model, measured, not assumed.

    python3 scripts/quant_quality.py RUN/checkpoint/model [...] -o /work/quant-results/NAME [--flavours sparse fused]
        [--block-size 32] [--threads 2] [--force]

For each model directory (a training run's checkpoint/model; the run's train.json, two levels up, names the corpus
and the evaluation) and each flavour, three with-past exports (float32, int8, int4; fused int8 is refused by the
exporter and reported so) and on each, through export.generate.OrtDecoder (what `hypermoe generate` runs):
- test perplexity: hypermoe.train.objective.evaluate, the very function the training run used for its test_ppl
  (the same windows of test.bin: eval_tokens, seq_len, batch_size from train.json), the export standing in for the
  torch model (one full pass per batch of windows, no past). The float export's value is checked against the
  run's logged test_ppl;
- greedy agreement with the float export of the same flavour: 3 fixed prompts × 64 new tokens (hypermoe.generation
  .generate): tokens identical before the first difference, and position by position;
- the export's size and a decode-speed sanity number (3 prompts × 64 tokens, wall clock of generate; not a benchmark).
Weights float32, int8, int4 at accuracy level 0 (exact: the dequantised model) and int8, int4 at level 4 ("a4": int8
activations in the kernels, the fast CPU path).
Writes OUT/results.json and OUT/results.md atomically (ref.files); the exports go to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

PROMPTS = ("ROMEO:\n", "To be, or not to be", "KING HENRY.\nWhat")  # UTF-8 bytes: the byte vocabulary
NEW_TOKENS = 64
QUANTS = ((None, 0), ("int8", 0), ("int4", 0), ("int8", 4), ("int4", 4))  # (weights, accuracy level)


class ExportAsModel:
    """Stands in for the torch model in hypermoe.train.objective.evaluate: model(x).logits from one full pass of
    the export (past length 0); no HyperMoE blocks to hook (evaluate then skips expert counting)."""

    blocks: list = []
    training = False

    def __init__(self, decoder):
        self.decoder = decoder

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, x):
        import torch

        from export.verify_past import full_pass

        return SimpleNamespace(logits=torch.from_numpy(full_pass(self.decoder, x.numpy())["logits"]), routing={})


def run_info(model_dir: Path):
    """(TrainConfig, test tokens, the run's logged test_ppl) of the training run that wrote model_dir."""
    from hypermoe.train.config import TrainConfig
    from hypermoe.train.data import open_corpus

    run = model_dir.resolve().parents[1]
    cfg = TrainConfig.from_dict(json.loads((run / "train.json").read_text()))
    corpus = open_corpus(cfg.data)
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "test_ppl" in line]
    return cfg, corpus.test, (logged[-1]["test_ppl"] if logged else None)


def measure(model_dir: Path, flavour: str, quantize: str | None, level: int, block_size: int, threads: int,
            workdir: Path, train_cfg, test) -> dict:
    from export.exporter import export_model, load_source
    from export.generate import OrtDecoder
    from hypermoe.generation import generate
    from hypermoe.train.objective import evaluate

    cfg, params, kind, source = load_source(model_dir)
    weights = (quantize or "float32") + (f" a{level}" if level else "")  # a4: accuracy level 4 (int8 activations)
    out = workdir / f"{model_dir.resolve().parents[1].name}-{flavour}-{weights.replace(' ', '-')}"
    try:
        result = export_model(out, cfg, params, kind=kind, flavour=flavour, with_past=True, source=source,
                              quantize=quantize, block_size=block_size, accuracy_level=level)
    except ValueError as err:
        return {"flavour": flavour, "quantize": weights, "refused": str(err)}
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
    decoder = OrtDecoder(out, "cpu", threads=threads)
    ppl = evaluate(train_cfg, ExportAsModel(decoder), test)["val_ppl"]
    prompts = [list(p.encode()) for p in PROMPTS]
    start = time.perf_counter()
    tokens = generate(decoder, prompts, max_new_tokens=NEW_TOKENS, max_length=cfg.max_seq_len).tokens
    seconds = time.perf_counter() - start
    return {"flavour": flavour, "quantize": weights, "bytes": size, "export_seconds": result.seconds,
            "test_ppl": ppl, "tokens": [list(map(int, t)) for t in tokens],
            "generate_tokens_per_s": len(prompts) * NEW_TOKENS / seconds}


def agreement(tokens, reference) -> tuple[int, int, int]:
    """(identical tokens before each row's first difference, identical positions, positions) summed over rows."""
    prefix = same = total = 0
    for a, b in zip(tokens, reference):
        n = min(len(a), len(b))
        diff = [i for i in range(n) if a[i] != b[i]]
        prefix += diff[0] if diff else n
        same += sum(a[i] == b[i] for i in range(n))
        total += n
    return prefix, same, total


def markdown(results: dict) -> str:
    lines = ["| model | flavour | weights | size (MiB) | test ppl | Δ ppl vs float | greedy: identical prefix | "
             "greedy: same position | decode tok/s (sanity) |", "|---|---|---|---|---|---|---|---|---|"]
    for model in results["models"]:
        for row in model["rows"]:
            name = Path(model["model_dir"]).parents[1].name
            if "refused" in row:
                lines.append(f"| {name} | {row['flavour']} | {row['quantize']} | refused: {row['refused']} ||||||")
                continue
            rel = row.get("ppl_change")
            lines.append(f"| {name} | {row['flavour']} | {row['quantize']} | {row['bytes'] / 2**20:.2f} | "
                         f"{row['test_ppl']:.4f} | {'—' if rel is None else f'{rel:+.2%}'} | "
                         f"{row['greedy_prefix']}/{row['greedy_total']} | {row['greedy_same']}/{row['greedy_total']} | "
                         f"{row['generate_tokens_per_s']:.0f} |")
        lines.append(f"\n{name}: logged test_ppl of the run (torch, float32): {model['logged_test_ppl']}\n")
    lines.append(f"block size {results['block_size']}; {len(PROMPTS)} prompts × {NEW_TOKENS} greedy tokens; "
                 f"onnxruntime CPU, {results['threads']} threads; command: `{results['command']}`")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import sys

    from ref.files import atomic_output

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dirs", nargs="+", type=Path)
    p.add_argument("-o", "--output", required=True, type=Path, help="a directory for results.json and results.md")
    p.add_argument("--flavours", nargs="+", default=["sparse", "fused"], choices=("sparse", "fused", "portable"))
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    results = {"block_size": args.block_size, "threads": args.threads, "models": [],
               "command": " ".join(["python3", "scripts/quant_quality.py", *(argv if argv is not None else sys.argv[1:])])}
    with atomic_output(args.output, force=args.force, directory=True, entries=("results.json", "results.md")) as out:
        with tempfile.TemporaryDirectory(prefix="quant-quality-") as workdir:
            for model_dir in args.model_dirs:
                train_cfg, test, logged = run_info(model_dir)
                rows = []
                for flavour in args.flavours:
                    base = None
                    for quantize, level in QUANTS:
                        row = measure(model_dir, flavour, quantize, level, args.block_size, args.threads,
                                      Path(workdir), train_cfg, test)
                        if quantize is None:
                            base = row
                        elif "refused" not in row and base is not None and "refused" not in base:
                            row["ppl_change"] = row["test_ppl"] / base["test_ppl"] - 1
                            row["greedy_prefix"], row["greedy_same"], row["greedy_total"] = agreement(row["tokens"],
                                                                                                       base["tokens"])
                        if quantize is None and "refused" not in row:
                            row["greedy_prefix"] = row["greedy_same"] = row["greedy_total"] = len(PROMPTS) * NEW_TOKENS
                        rows.append(row)
                        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
                results["models"].append({"model_dir": str(model_dir), "logged_test_ppl": logged, "rows": rows})
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
