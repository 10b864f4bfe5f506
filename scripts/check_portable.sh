#!/usr/bin/env bash
# Runs the test suite three times in a row in a fresh clone of HEAD, as CI does (CI=true), under the
# settings that change floating-point results between machines: OMP_NUM_THREADS=1, OMP_NUM_THREADS=2,
# and OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset (OpenBLAS then picks its kernel for this CPU).
# Any run failing fails the script; a summary line per run goes to stdout and to OUT_DIR/summary.txt.
#
#   bash scripts/check_portable.sh [OUT_DIR]     (default: a new temporary directory; the clone lives there too)
#
# Uses the current Python environment (run scripts/setup.sh first). Takes about 3 × the suite's time.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$(mktemp -d -t hypermoe-portable-XXXXXX)}
mkdir -p "$out"
clone="$out/clone"
rm -rf "$clone"
git clone -q "$repo" "$clone" || exit 2
echo "clone of $(git -C "$clone" rev-parse --short HEAD) in $clone; logs in $out"
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
echo "machine: $cpu, $(nproc) cores; OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset}" | tee "$out/summary.txt"
status=0
run() {  # name, then env assignments
    local name=$1; shift
    local start=$SECONDS
    (cd "$clone" && env "$@" CI=true python3 -m pytest -q -p no:cacheprovider) > "$out/$name.log" 2>&1
    local rc=$?
    [ $rc -ne 0 ] && status=1
    echo "$name: exit $rc, $(tail -1 "$out/$name.log" | sed 's/=//g; s/^ *//') ($((SECONDS - start)) s)" | tee -a "$out/summary.txt"
}
run omp1 OMP_NUM_THREADS=1
run omp2 OMP_NUM_THREADS=2
run openblas-unset -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE
exit $status
