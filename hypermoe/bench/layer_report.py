"""The layer benchmark's tables: a result (layer.run) → rows, targets and markdown."""

from __future__ import annotations

from typing import Any

from hypermoe.bench.harness import MiB


COLUMNS = ("impl", "k", "T", "mode", "reps", "median ms", "min ms", "tokens/s", "saved MiB", "peak MiB",
           "× faster than official", "× less saved", "expert GFLOP/s", "GEMM GFLOP/s now", "% of GEMM rate", "note")


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in result["rows"]:
        if "median_s" not in r:
            out.append([r["impl"], str(r["k"]), str(r["T"]), r["mode"], *[""] * (len(COLUMNS) - 5), r.get("note", "")])
            continue
        note = ""
        if "max_rel_diff_vs_official" in r:
            note = f"diff vs official {r['max_rel_diff_vs_official']:.1e}"
        out.append([
            r["impl"], str(r["k"]), str(r["T"]), r["mode"], f"{r['reps']}×{r['calls_per_rep']}",
            _fmt(r["median_s"] * 1e3, ".2f"), _fmt(r["min_s"] * 1e3, ".2f"), _fmt(r["tokens_per_s"], ",.0f"),
            _fmt(r["saved_bytes"] / MiB if r.get("saved_bytes") is not None else None, ",.1f"),
            _fmt(r["peak_bytes"] / MiB if r.get("peak_bytes") is not None else None, ",.1f"),
            _fmt(r.get("speedup_vs_official"), ".2f"), _fmt(r.get("saved_ratio_vs_official"), ".1f"),
            _fmt(r["expert_gflops"], ".1f"), _fmt(r.get("gemm_gflops_now"), ".1f"), _fmt(r["frac_gemm"] * 100, ".0f"), note,
        ])
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets (performance.md), one entry per (target, case), evaluated on the medians and,
    as a second opinion on a shared machine, on the minima (GEMM rate: the same-time probe's median, resp. best)."""
    rows = {(r["impl"], r["device"], r["dtype"], r["k"], r["T"], r["mode"]): r for r in result["rows"] if "median_s" in r}
    largest = max(result["meta"]["options"]["tokens"])
    out = []

    def add(name, key, value, goal, higher_is_better=True):
        values = {stat: value(stat) for stat in ("median_s", "min_s")}
        met = values["median_s"] >= goal if higher_is_better else values["median_s"] <= goal
        out.append({"target": name, "device": key[0], "dtype": key[1], "k": key[2], "T": key[3], "mode": key[4],
                    "value": values["median_s"], "value_min": values["min_s"], "goal": goal, "met": bool(met)})

    for (impl, device, dtype, k, T, mode), r in rows.items():
        key = (device, dtype, k, T, mode)
        official, plain, torch_eager = (rows.get((name, *key)) for name in ("official", "plain-moe", "hypermoe"))
        if impl == "hypermoe" and T == largest and official:
            add("× faster than the official approach", key, lambda stat: official[stat] / r[stat], 5.0)
            if r.get("saved_bytes") and official.get("saved_bytes"):
                add("× less memory saved for backward", key, lambda stat: official["saved_bytes"] / r["saved_bytes"], 10.0)
        if impl == "hypermoe" and T >= 1024 and plain:
            add("HyperExpert overhead over the plain MoE", key, lambda stat: r[stat] / plain[stat] - 1.0, 0.08,
                higher_is_better=False)
        if impl == "plain-moe" and T == largest:
            flops = 4.0 * result["meta"]["config"]["d_model"] * result["meta"]["config"]["d_ff"] * T * k * (3 if mode == "fwd+bwd" else 1)
            add("expert FLOP rate / GEMM rate (plain MoE layer: a lower bound)", key,
                lambda stat: flops / r[stat] / 1e9 / r["gemm_gflops_now" if stat == "median_s" else "gemm_gflops_best_now"], 0.90)
        if impl.startswith("ort-") and torch_eager:
            add(f"{impl} × faster than torch eager (hypermoe)", key, lambda stat: torch_eager[stat] / r[stat], 1.0)
    return out


def markdown(result: dict[str, Any]) -> str:
    """The run as markdown: environment, GEMM rates, checks, routing load, one table per device/dtype."""
    meta = result["meta"]
    lines = [
        f"- date: {meta['date_utc']}; device: {meta['device']}" + (f" ({meta['gpu']}, CUDA {meta['cuda']})" if "gpu" in meta else ""),
        f"- torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, numpy {meta['numpy']}, Python {meta['python']}",
        f"- CPU: {meta['cpu']}, {meta['cores']} cores; torch threads {meta['torch_threads']}; "
        f"load average at start {meta['loadavg_start'][0]:.2f}, at end {meta.get('loadavg_end', [float('nan')])[0]:.2f}",
        "", "GEMM rate of this machine at the start of this run (the \"% of GEMM rate\" column divides by a GEMM probe "
        "timed in the same interleaved rounds as each row instead: `gemm now` in the JSON):", "",
        "| shape | dtype | median ms | GFLOP/s (median) | GFLOP/s (best) |", "|---|---|---|---|---|",
    ]
    lines += [f"| {g['shape']} | {g['dtype']} | {g['median_ms']:.2f} | {g['gflops']:.1f} | {g['best_gflops']:.1f} |" for g in result["gemm"]]
    lines += ["", "Checks before timing:", ""]
    lines += [f"- {c['what']}, k={c['k']}: max rel err {c['max_rel_err']:.1e} ({'ok' if c['ok'] else 'FAILED'})" for c in result["checks"]]
    lines += ["", "Routing load of the inputs (x ~ N(0, 1), ref.init parameters):", "",
              "| k | T | tokens per expert (min–max) | distinct selection sets / possible |", "|---|---|---|---|"]
    lines += [f"| {l['k']} | {l['T']} | {l['tokens_per_expert_min']}–{l['tokens_per_expert_max']} | {l['distinct_sets']} / {l['possible_sets']} |" for l in result["load"]]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(result["rows"]):
        groups.setdefault((r["device"], r["dtype"]), []).append(i)
    body = table_rows(result)
    for (device, dtype), indices in groups.items():
        lines += ["", f"#### {device}, {dtype}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(body[i]) + " |" for i in indices]
    checks = targets(result)
    if checks:
        lines += ["", "#### Targets (the issue states the speed and memory targets for T = 8192; here they are evaluated at "
                  "this run's largest T; \"met\" judges the median)", "",
                  "| target | device | dtype | k | T | mode | median | from the minima | goal | met |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for t in checks:
            percent = "overhead" in t["target"] or "GEMM rate" in t["target"]
            value, value_min = (f"{v * 100:.0f}%" if percent else f"{v:.2f}" for v in (t["value"], t["value_min"]))
            goal = ("≤ " if "overhead" in t["target"] else "≥ ") + (f"{t['goal'] * 100:.0f}%" if percent else f"{t['goal']:g}")
            lines.append(f"| {t['target']} | {t['device']} | {t['dtype']} | {t['k']} | {t['T']} | {t['mode']} | {value} | {value_min} | {goal} | "
                         f"{'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"
