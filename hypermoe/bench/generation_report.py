"""The tables of the generation benchmark (hypermoe/bench/generation.py): its result as markdown (machine, model,
exports, checks, one row per backend and group) and the goals of issue 21 (ratios of medians, with the ratio of the
extremes as a second opinion).
"""

from __future__ import annotations

from typing import Any

KIND = "generation"  # the JSON's meta.kind: `hypermoe bench --render` tells this benchmark's files apart
BASE = "torch-kv"  # the HyperMoE model's torch row; the base of the ratios when the dense row is left out
DENSE = "hf-gpt2"  # transformers' dense GPT2LMHeadModel: the base of the ratios when present


COLUMNS = ("phase", "B", "prompt", "steps attend to", "backend", "reps", "tokens/s (median)", "min–max",
           "ms per step (median)", "× base", "tokens = base")


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in result["rows"]:
        decode_row = r["phase"] == "decode"
        context = f"{r['context_range'][0]}–{r['context_range'][1]}" if decode_row else ""
        same = f"{r['tokens_same']}/{r['tokens_compared']}" if decode_row else ""
        out.append([r["phase"], str(r["batch"]), str(r["prompt"]), context, r["backend"],
                    f"{r['reps']}" + (f"×{r['steps']}" if decode_row else ""), f"{r['tokens_per_s']:,.1f}",
                    f"{r['tokens_per_s_min']:,.1f}–{r['tokens_per_s_max']:,.1f}", f"{r['latency_ms']:,.1f}",
                    f"{r['x_vs_base']:.2f}", same])
    return out


def _ratio(target: str, mine: dict[str, Any], base: dict[str, Any], goal: float, **where: Any) -> dict[str, Any]:
    value = mine["tokens_per_s"] / base["tokens_per_s"]
    return {"target": target, **where, "value": value, "goal": goal, "met": value >= goal,
            "range": [mine["tokens_per_s_min"] / base["tokens_per_s_max"],
                      mine["tokens_per_s_max"] / base["tokens_per_s_min"]]}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 21's goals, each row a ratio of medians (tokens/s) where both rows ran:
    - onnxruntime int4 decode at batch 1 ≥ 2× the same export in fp32, and ≥ 3× transformers' dense decode;
    - every onnxruntime export's prefill ≥ transformers' dense prefill;
    - batch-8 decode at the longest context ≥ 0.75× its rate at the shortest (every backend with a KV cache);
    - torch-kv decode ≥ 0.9× transformers' dense decode;
    - and the KV cache itself: torch-kv ≥ 10× torch-nocache per decoded token at the longest context."""
    rows = result["rows"]
    by_key = {(r["phase"], r["batch"], r["context"] or r["prompt"], r["backend"]): r for r in rows}
    decode = [r for r in rows if r["phase"] == "decode"]
    contexts = sorted({r["context"] for r in decode})
    out = []
    for r in decode:
        B, C, name = r["batch"], r["context"], r["backend"]
        dense = by_key.get(("decode", B, C, DENSE))
        if name.startswith("ort-") and ":int4" in name and B == 1:
            float_name = ":".join(p for p in name.split(":") if p not in ("int4", "acc4"))  # the same export in float
            fp32 = by_key.get(("decode", B, C, float_name))
            if fp32:
                out.append(_ratio(f"{name} decode ≥ 2× {fp32['backend']}", r, fp32, 2.0, batch=B, context=C))
            if dense:
                out.append(_ratio(f"{name} decode ≥ 3× {DENSE} (dense)", r, dense, 3.0, batch=B, context=C))
        if name == BASE and dense:
            out.append(_ratio(f"{BASE} decode ≥ 0.9× {DENSE} (dense)", r, dense, 0.9, batch=B, context=C))
        if name == "torch-nocache" and C == contexts[-1]:
            cached = by_key[("decode", B, C, BASE)]
            value = cached["tokens_per_s"] / r["tokens_per_s"]
            out.append({"target": "torch KV cache × faster than recompute, per decoded token", "batch": B,
                        "context": C, "value": value, "goal": 10.0, "met": value >= 10.0,
                        "range": [cached["tokens_per_s_min"] / r["tokens_per_s_max"],
                                  cached["tokens_per_s_max"] / r["tokens_per_s_min"]]})
    if len(contexts) > 1:
        for r in decode:
            short = by_key.get(("decode", r["batch"], contexts[0], r["backend"]))
            if r["batch"] == 8 and r["context"] == contexts[-1] and r["backend"] != "torch-nocache" and short:
                out.append(_ratio(f"{r['backend']} decode at context {contexts[-1]} ≥ 0.75× at {contexts[0]}", r,
                                  short, 0.75, batch=8, context=contexts[-1]))
    for r in rows:
        dense = by_key.get(("prefill", r["batch"], r["prompt"], DENSE))
        if r["phase"] == "prefill" and r["backend"].startswith("ort-") and dense:
            out.append(_ratio(f"{r['backend']} prefill ≥ {DENSE} (dense)", r, dense, 1.0, batch=r["batch"],
                              context=r["prompt"]))
    return out


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    cfg = meta["config"]
    base = meta.get("base", BASE)
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
        f"- ratios and token counts against `{base}`"
        + (f"; `{DENSE}`: transformers {meta.get('transformers')} GPT2LMHeadModel, {meta['dense_parameters'] / 1e6:,.0f} M "
           f"parameters, attention `{meta.get('dense_attention')}`, the HyperMoE model upcycled from it"
           if "dense_parameters" in meta else ""),
    ]
    lines += [f"- export `{e.get('export', e['flavour'])}`: {e['seconds']:.0f} s, {e['bytes'] / 2**20:,.0f} MiB, HyperExpert form "
              f"{e['hyper_form']}" for e in result["exports"]]
    verdict = {True: "ok", False: "FAILED", None: "quantised or 16-bit: reported, not judged"}
    lines += [f"- check: {c['backend']} prefill logits vs {base}, max rel diff {c['max_rel_diff']:.1e} "
              f"({verdict[c['ok']]})" for c in result["checks"]]
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


__all__ = ["BASE", "COLUMNS", "DENSE", "is_result", "markdown", "table_rows", "targets"]
