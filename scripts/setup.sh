#!/usr/bin/env bash
# Installs hypermoe and what it needs into the current Python environment. Idempotent: quick when done.
# torch first and pinned, so that pip never pulls a multi-GB CUDA build onto a machine without a GPU:
# where a torch is already importable (a CUDA build on a GPU machine, say) it is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch ${HYPERMOE_TORCH:-2.13.0} (CPU build where the platform offers one)"
    "$PY" -m pip install --quiet "torch==${HYPERMOE_TORCH:-2.13.0}"
fi
echo "setup: installing hypermoe, its test and its train dependencies (tqdm, matplotlib)"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test,train]"
# onnxruntime-genai (tests/test_genai.py: genai's own generator on our with-past export). Its wheel holds only
# onnxruntime_genai/ and runs on the libonnxruntime of the onnxruntime-gpu installed above; --no-deps, because
# its declared dependency is the CPU `onnxruntime` package, which would overwrite onnxruntime-gpu's files.
echo "setup: installing onnxruntime-genai 0.18.0 (--no-deps: it uses onnxruntime-gpu's runtime)"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps "onnxruntime-genai==0.18.0"
