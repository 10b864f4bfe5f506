#!/usr/bin/env bash
# The GPU half of BENCHMARKS.md, unattended: torch CUDA fp32 and bf16 (the official approach, hypermoe's
# layer, the plain MoE) and onnxruntime CUDA (portable and fused exports), one run, one table.
#
#   scripts/gpu_bench.sh OUT_DIR [extra `hypermoe bench` options, e.g. --quick or --tokens 64 1024]
#
# Writes into OUT_DIR: bench-cuda.json (every number), bench-cuda.md (the tables), bench-cuda.log
# (progress), env.txt (nvidia-smi, versions). Exits non-zero when there is no usable GPU or the run fails;
# rows that cannot run (e.g. onnxruntime without the CUDA libraries it was built against) are kept in the
# table as "not measured: <reason>" rather than failing the whole run.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR [hypermoe bench options]" >&2
    exit 2
fi
out=$1
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works from a checkout without `pip install -e .`

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_available_providers())
except ImportError as err:
    print("onnxruntime: not importable:", err)
EOF
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench: torch sees no CUDA device (see $out/env.txt); nothing measured" >&2
    exit 1
fi

# progress (stderr) to the log and the terminal; the markdown tables also go to stdout
"$PY" -c "import sys; from hypermoe.cli import main; sys.exit(main(sys.argv[1:]))" \
    bench --device cuda --json "$out/bench-cuda.json" --markdown "$out/bench-cuda.md" "$@" \
    2> >(tee "$out/bench-cuda.log" >&2)

# --- generation throughput (`hypermoe generate`, onnxruntime-genai's metrics): a 2-block model at the official
#     layer sizes (d 768, f 3072, N 8, k 1, 12 heads, byte vocabulary), exported with past key/values; CUDA
#     (IOBinding, cache on the device) vs the CPU provider, prompt 128 tokens, 128 new, batch 1 and 8
gen_tmp=$(mktemp -d)
"$PY" - "$gen_tmp" <<'EOF'
import sys
from ref import io
from ref.config import HyperMoEConfig
from ref.model import init_model
from export.exporter import export_model
cfg = HyperMoEConfig(n_layers=2, max_seq_len=512)
params = init_model(cfg, seed=0)
io.save_dir(sys.argv[1] + "/model", cfg, params, "model")
export_model(sys.argv[1] + "/export", cfg, params, kind="model", with_past=True)
EOF
prompt=$("$PY" -c "print(','.join(str(i % 200 + 32) for i in range(128)))")
for provider in cuda cpu; do
    for batch in 1 8; do
        echo "== hypermoe generate --provider $provider --batch $batch (prompt 128, 128 new tokens)"
        "$PY" -c "import sys; from hypermoe.cli import main; sys.exit(main(sys.argv[1:]))" generate "$gen_tmp/export" \
            --provider "$provider" --prompt-ids "$prompt" --max-new-tokens 128 --batch "$batch" | tail -n 2 \
            || echo "not measured (exit status $?)"
    done
done 2>&1 | tee "$out/generate-cuda.txt"
rm -rf "$gen_tmp"
echo "gpu_bench: wrote $out/bench-cuda.json and $out/bench-cuda.md"

# Text generation (BENCHMARKS.md, "Generation"): a GPT-2-small-sized HyperMoE LM upcycled from transformers' dense
# GPT2LMHeadModel, both on CUDA, torch with and without its KV cache and onnxruntime CUDA (IOBinding, the cache on
# the device) on with-past exports, prefill and decode tokens/s side by side. First the float32 exports that must
# run (sparse and fused; the contrib attention with one shared KV buffer), then each CUDA-only variant in a run of
# its own, so that a kernel the installed onnxruntime lacks loses one row, not the table: QMoE needs fp16/bf16
# input on CUDA (onnx-notes), so the quantised fused exports are fp16 and bf16. --quick in the options above also
# shrinks these runs; GEN_OPTS adds options of its own; GEN_VARIANTS replaces the list of variants.
gen_opts=()
for arg in "$@"; do if [ "$arg" = "--quick" ]; then gen_opts+=(--quick); fi; done
hm() { "$PY" -c "import sys; from hypermoe.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
hm bench --generation --device cuda --exports sparse fused sparse:contrib --json "$out/bench-generation-cuda.json" \
    --markdown "$out/bench-generation-cuda.md" "${gen_opts[@]}" ${GEN_OPTS:-} \
    2> >(tee "$out/bench-generation-cuda.log" >&2)
echo "gpu_bench: wrote $out/bench-generation-cuda.json and $out/bench-generation-cuda.md"
for spec in ${GEN_VARIANTS:-fused:fp16 fused:bf16 fused:fp16:int4 fused:bf16:int4 fused:fp16:int8 sparse:fp16:int4 fused:fp16:int4:contrib}; do
    name=${spec//:/-}
    echo "== bench --generation --device cuda --exports $spec"
    hm bench --generation --device cuda --exports "$spec" --json "$out/bench-generation-cuda-$name.json" \
        --markdown "$out/bench-generation-cuda-$name.md" "${gen_opts[@]}" ${GEN_OPTS:-} \
        2> >(tee "$out/bench-generation-cuda-$name.log" >&2) || echo "not measured: $spec (exit status $?; see the log)"
done
