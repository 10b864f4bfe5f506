"""hypermoe.bench: the official-approach baseline computes ref.layer, and the benchmark machinery runs end
to end on a tiny config and produces the documented columns. No timing is asserted (speed is measured in
BENCHMARKS.md, never in tests)."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given

import ref
from hypermoe import bench
from hypermoe.cli import main
from tests.strategies import cases, configs, layer_magnitude


@given(cases(configs(capacity=False)))
def test_official_baseline_matches_ref(case):
    """The baseline (per-token generated weights, expert loop) is ref.layer in float64, on random configs
    (both gates, k from 1 to N, with and without the HyperExpert, biases, activations) and shapes."""
    expected = ref.layer(case.cfg, case.params, case.x, case.layer_index).output
    model = bench.official_layer(case.cfg, case.params, dtype=torch.float64)
    with torch.no_grad():
        got = model(torch.from_numpy(case.x), case.layer_index).numpy()
    assert got.shape == expected.shape
    # the same math in another order (per-token weights, an expert loop): float64 errors ≤ ~1e-13 S
    # (tests/strategies.py), a wrong term ≥ 1e-2 S; 1e-10 S in between, S the layer's largest magnitude
    S = layer_magnitude(case.cfg, case.params, case.x, case.layer_index)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * S, err_msg=f"{case.cfg} seed={case.seed}")


def test_official_error_helper_and_tie_rule():
    """official_error_vs_ref is what run() checks before timing; exact logit ties pick the lower index."""
    cfg = ref.tiny_config(top_k=1, d_model=4)
    params = ref.init(cfg, seed=1)
    params["router.weight"][:] = 0.0  # every logit ties: expert 0 must win (SPEC.md §3.2)
    x = np.random.default_rng(0).standard_normal((1, 5, 4))
    assert bench.official_error_vs_ref(cfg, params, x) < 1e-12  # relative: max|Δ| / max(1, max|ref|)


def test_official_baseline_rejects_capacity():
    cfg = ref.tiny_config(gate="switch", top_k=1, capacity=2)
    with pytest.raises(ValueError, match="capacity"):
        bench.official_layer(cfg, ref.init(cfg))


def test_run_tiny_produces_every_column():
    cfg = ref.tiny_config(top_k=1)
    opts = bench.Options(cfg=cfg, top_ks=(1, 2), tokens=(8, 33), impls=("official", "hypermoe", "hypermoe-nocache", "plain-moe"),
                         gemm_sizes=(32,), block_s=0.001, budget_s=0.005, min_reps=1, max_reps=2)
    messages = []
    result = bench.run(opts, progress=messages.append)
    assert messages and all(c["ok"] for c in result["checks"]) and len(result["checks"]) == 2
    rows = result["rows"]
    # 2 k × 2 T × (4 forward + 3 forward+backward) rows, no failures
    assert len(rows) == 2 * 2 * (4 + 3) and all("median_s" in r for r in rows), [r.get("note") for r in rows]
    for r in rows:
        assert r["min_s"] <= r["median_s"] and r["reps"] >= 1 and r["tokens_per_s"] > 0
        assert r["speedup_vs_official"] > 0 and 0 < r["frac_gemm"]
        if r["impl"] == "official":
            assert r["speedup_vs_official"] == 1.0
        if r["mode"] == "fwd+bwd":
            assert r["saved_bytes"] > 0 and r["saved_ratio_vs_official"] > 0
        elif r["impl"] in ("hypermoe", "hypermoe-nocache"):
            assert r["max_rel_diff_vs_official"] < 1e-5  # the same numbers as the baseline (fp32)
    assert {(l["k"], l["T"]) for l in result["load"]} == {(1, 8), (1, 33), (2, 8), (2, 33)}
    text = bench.markdown(result)
    header = "| " + " | ".join(bench.COLUMNS) + " |"
    assert header in text and text.count("\n| official |") == 2 * 2 * 2
    json.dumps(result)  # serialisable as written by --json


def test_cli_bench_on_a_config_file(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(ref.tiny_config().to_json())
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--config", str(config), "--tokens", "16", "--top-k", "2", "--modes", "fwd",
            "--impls", "official", "plain-moe", "--json", str(out), "--threads", "1"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert [r["impl"] for r in result["rows"]] == ["official", "plain-moe"]
    assert result["meta"]["torch_threads"] == 1
    printed = capsys.readouterr().out
    assert "| plain-moe | 2 | 16 | fwd |" in printed
    assert main(["bench", "--render", str(out)]) == 0  # the same tables again, from the JSON
    assert capsys.readouterr().out.strip() == printed.strip()
    assert main(["bench", "--config", str(tmp_path / "missing.json")]) == 2
