#!/usr/bin/env bash
# check_oldest.sh: run the test suite against the OLDEST dependency versions pyproject.toml claims.
#
# Usage: scripts/check_oldest.sh [--keep] [VENV_DIR] [-- PYTEST_ARGS...]
#
# Builds a fresh virtualenv in VENV_DIR (default: a new mktemp directory, removed at the end unless
# --keep is given; VENV_DIR itself is always kept), installs exactly the lower bound of every
# dependency in pyproject.toml, `X>=V` pinned as `X==V` (the runtime dependencies and the `test`
# extra), then hypermoe itself with `pip install --no-deps -e .`, prints the versions it got, runs
# `python -m pytest -q -p no:cacheprovider` from the repository root with CI=true, and exits with
# pytest's status. VENV_DIR must not be inside the repository; an existing VENV_DIR must be empty or a
# virtualenv (it is then cleared).
#
# Cost: on Linux x86_64, PyPI's torch is a CUDA build: with its nvidia-* wheels the venv is ~7 GB
# (~3 GB downloaded; about a minute here), and that build does not import without them. Where a
# CPU-only wheel index is reachable, TORCH_INDEX_URL=<that index> installs torch from it instead.
# Environment: PYTHON (the interpreter for the venv, default python3), TORCH_INDEX_URL (see above).
# The `hf` extra (hypermoe.hf) is not pinned here: with the test extra's transformers 4.40 tests/test_hf.py skips
# (it needs ≥ 4.46.3). Its oldest claim was checked by hand in a venv over the installed packages:
#   python3 -m venv --system-site-packages /tmp/hfold && /tmp/hfold/bin/pip install transformers==4.46.3
#   PYTHONPATH=. /tmp/hfold/bin/python -m pytest -q -p no:cacheprovider tests/test_hf.py   (tokenizers 0.20.3)
# Arguments after `--` go to pytest (e.g. `-- -m "not slow"` or `-- tests/test_ref.py`).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

KEEP=0
VENV=""
while (( $# )); do
    arg=$1; shift
    case "$arg" in
        --) break ;;
        -h|--help) usage; exit 0 ;;
        --keep) KEEP=1 ;;
        -*) echo "check_oldest: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) if [[ -n "$VENV" ]]; then echo "check_oldest: one VENV_DIR only (see --help)" >&2; exit 2; fi
           VENV=$arg ;;
    esac
done
PYTEST_EXTRA=("$@")

REPO=$(cd "$(dirname "$0")/.." && pwd -P)
PY=${PYTHON:-python3}
CLEANUP=""
if [[ -z "$VENV" ]]; then
    VENV=$(mktemp -d "${TMPDIR:-/tmp}/hypermoe-oldest.XXXXXX")
    [[ $KEEP == 1 ]] || CLEANUP=$VENV
else
    VENV=$(realpath -m -- "$VENV")
    if [[ "$VENV/" == "$REPO/"* ]]; then
        echo "check_oldest: $VENV is inside the repository; give a folder outside it" >&2; exit 2
    fi
    mkdir -p -- "$VENV"
    if [[ -n "$(ls -A "$VENV")" && ! -f "$VENV/pyvenv.cfg" ]]; then
        echo "check_oldest: $VENV is neither empty nor a virtualenv; refusing to clear it" >&2; exit 2
    fi
fi
if [[ -n "$CLEANUP" ]]; then trap 'rm -rf -- "$CLEANUP"' EXIT; fi

START=$(date +%s)
echo "check_oldest: virtualenv $VENV (python: $("$PY" --version 2>&1))"
"$PY" -m venv --clear "$VENV"
VPY="$VENV/bin/python"

# The pins, read from pyproject.toml: every dependency and test extra must have a `>=` lower bound.
mapfile -t PINS < <("$VPY" - "$REPO/pyproject.toml" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = project["dependencies"] + project.get("optional-dependencies", {}).get("test", [])
for req in reqs:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(,.*)?", req)
    if not m:
        sys.exit(f"check_oldest: no '>=' lower bound in {req!r}")
    print(f"{m.group(1)}=={m.group(2)}")
EOF
)
echo "check_oldest: installing ${PINS[*]}"

PIP=("$VPY" -m pip --disable-pip-version-check)
TORCH_PIN=""
REST=()
for pin in "${PINS[@]}"; do
    if [[ "${pin%%==*}" == torch ]]; then TORCH_PIN=$pin; else REST+=("$pin"); fi
done
if [[ -n "$TORCH_PIN" && -n "${TORCH_INDEX_URL:-}" ]]; then
    "${PIP[@]}" install --quiet --no-deps "$TORCH_PIN" --index-url "$TORCH_INDEX_URL"  # deps: below
fi
# One resolve for everything, so pip checks that the pins fit together.
"${PIP[@]}" install --quiet ${TORCH_PIN:+"$TORCH_PIN"} "${REST[@]}"
(cd "$REPO" && "${PIP[@]}" install --quiet --no-deps -e .)

echo "check_oldest: installed (install took $(( $(date +%s) - START )) s):"
"$VPY" - "${PINS[@]}" <<'EOF'
import sys
from importlib.metadata import version
import numpy, onnx, onnxruntime, onnxscript, torch
print(f"  python {sys.version.split()[0]}")
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    got = version(name)
    def release(v):  # "1.26" == "1.26.0"; "+cu128" and the like ignored
        parts = [int(p) for p in v.split("+")[0].split(".")]
        while parts and parts[-1] == 0:
            parts.pop()
        return parts
    print(f"  {name} {got}" + ("" if release(got) == release(want) else f"  (asked for {want}!)"))
print(f"  imported: numpy {numpy.__version__}, torch {torch.__version__}, onnx {onnx.__version__}, "
      f"onnxscript {onnxscript.__version__}, onnxruntime {onnxruntime.__version__} "
      f"{onnxruntime.get_available_providers()}")
EOF
"${PIP[@]}" check || echo "check_oldest: (pip check reported the above)"

cd "$REPO"
T0=$(date +%s)
set +e
CI=true "$VPY" -m pytest -q -p no:cacheprovider "${PYTEST_EXTRA[@]}"
RC=$?
set -e
echo "check_oldest: pytest exited $RC after $(( $(date +%s) - T0 )) s (total $(( $(date +%s) - START )) s)"
exit $RC
