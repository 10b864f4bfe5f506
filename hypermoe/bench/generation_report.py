"""The tables of the generation benchmark (hypermoe/bench/generation.py): its result as markdown (machine, model,
exports, checks, one row per backend and group) and the issue's targets (the ratios to torch-kv).
"""

from __future__ import annotations

from typing import Any

KIND = "generation"  # the JSON's meta.kind: `hypermoe bench --render` tells this benchmark's files apart
BASE = "torch-kv"  # the row every ratio divides by


COLUMNS = ("phase", "B", "prompt", "steps attend to", "backend", "reps", "tokens/s (median)", "min–max",
           "ms per step (median)", "× torch-kv", "tokens = torch-kv")


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in result["rows"]:
        decode_row = r["phase"] == "decode"
        context = f"{r['context_range'][0]}–{r['context_range'][1]}" if decode_row else ""
        same = f"{r['tokens_same']}/{r['tokens_compared']}" if decode_row else ""
        out.append([r["phase"], str(r["batch"]), str(r["prompt"]), context, r["backend"],
                    f"{r['reps']}" + (f"×{r['steps']}" if decode_row else ""), f"{r['tokens_per_s']:,.1f}",
                    f"{r['tokens_per_s_min']:,.1f}–{r['tokens_per_s_max']:,.1f}", f"{r['latency_ms']:,.1f}",
                    f"{r['x_vs_torch_kv']:.2f}", same])
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: torch-kv ≥ 10× torch-nocache per decoded token at the longest context; every
    onnxruntime backend's decode ≥ torch-kv's (median; min–max ratios as a second opinion)."""
    rows = [r for r in result["rows"] if r["phase"] == "decode"]
    if not rows:
        return []
    longest = max(r["context"] for r in rows)
    by_key = {(r["batch"], r["context"], r["backend"]): r for r in rows}
    out = []
    for r in rows:
        key = (r["batch"], r["context"])
        base = by_key[(*key, BASE)]
        if r["backend"] == "torch-nocache" and r["context"] == longest:
            value = base["tokens_per_s"] / r["tokens_per_s"]
            out.append({"target": "torch KV cache × faster than recompute, per decoded token", "batch": key[0],
                        "context": key[1], "value": value, "goal": 10.0, "met": value >= 10.0,
                        "range": [base["tokens_per_s_min"] / r["tokens_per_s_max"],
                                  base["tokens_per_s_max"] / r["tokens_per_s_min"]]})
        if r["backend"].startswith("ort-"):
            value = r["tokens_per_s"] / base["tokens_per_s"]
            out.append({"target": f"{r['backend']} decode ≥ torch eager (KV cache)", "batch": key[0],
                        "context": key[1], "value": value, "goal": 1.0, "met": value >= 1.0,
                        "range": [r["tokens_per_s_min"] / base["tokens_per_s_max"],
                                  r["tokens_per_s_max"] / base["tokens_per_s_min"]]})
    return out


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    cfg = meta["config"]
    lines = [
        f"- command: `{meta.get('command') or 'hypermoe bench --generation (from Python)'}`"
        + (f"; wall time {meta['wall_s'] / 60:.1f} min" if meta.get("wall_s") else ""),
        f"- date: {meta['date_utc']}; device: {meta['device']}" + (f" ({meta['gpu']}, CUDA {meta['cuda']})" if "gpu" in meta else ""),
        f"- torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, numpy {meta['numpy']}, Python {meta['python']}",
        f"- CPU: {meta['cpu']}, {meta['cores']} cores; torch and onnxruntime threads {meta['threads']}; load average "
        f"at start {meta['loadavg_start'][0]:.2f}, at end {meta.get('loadavg_end', [float('nan')])[0]:.2f}",
        f"- model: d={cfg['d_model']}, {cfg['n_layers']} blocks, {cfg['n_heads']} heads, V={cfg['vocab_size']}, "
        f"{cfg['max_seq_len']} positions, N={cfg['n_experts']}, k={cfg['top_k']}, f={cfg['d_ff']}, a={cfg['d_adapter']}, "
        f"hypernetwork {cfg['d_expert_embed']}/{cfg['d_process']}/{cfg['d_hyper']}/{cfg['d_generator']}, layer embedding "
        f"{cfg['d_layer_embed']}; {meta['parameters'] / 1e6:,.0f} M parameters, fp32",
    ]
    lines += [f"- export `{e['flavour']}`: {e['seconds']:.0f} s, {e['bytes'] / 2**20:,.0f} MiB, HyperExpert form "
              f"{e['hyper_form']}" for e in result["exports"]]
    lines += [f"- check: {c['backend']} prefill logits vs torch-kv, max rel diff {c['max_rel_diff']:.1e} "
              f"({'ok' if c['ok'] else 'FAILED'})" for c in result["checks"]]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(result)]
    checks = targets(result)
    if checks:
        lines += ["", "| target | B | context | median ratio | ratio range (min/max) | goal | met |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['batch']} | {t['context']} | {t['value']:.2f} | {t['range'][0]:.2f}–"
                  f"{t['range'][1]:.2f} | ≥ {t['goal']:g} | {'yes' if t['met'] else '**no**'} |" for t in checks]
    return "\n".join(lines) + "\n"


def is_result(result: Any) -> bool:
    return isinstance(result, dict) and isinstance(result.get("meta"), dict) and result["meta"].get("kind") == KIND


__all__ = ["COLUMNS", "is_result", "markdown", "table_rows", "targets"]
