#!/usr/bin/env bash
# One command for a GPU machine (no network; torch, triton and transformers preinstalled):
#   install this checkout without touching those packages, build the CUDA extension, run the test
#   suite on CUDA tensors, run every benchmark, and leave the results where they come back.
#
#   bash benchmarks/run_gpu.sh            # from the repository root, or any directory
#
# Results: rows are appended to benchmarks/results/cuda-<gpu>.jsonl, benchmarks/results/REPORT.md
# and README.md's benchmark section are regenerated; when $OUT is set, all of that plus the logs is
# copied there.  The whole run keeps inside TOTAL_BUDGET_S seconds (default 560, under 10 minutes):
# each stage gets what the earlier ones left.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
TOTAL=${TOTAL_BUDGET_S:-560}
LOGS=${OUT:-benchmarks/results}/logs
mkdir -p "$LOGS"
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
PY=${PYTHON:-python}
unset TRITON_INTERPRET
status=0

echo "== install (no deps, no build isolation; builds the C++/CUDA extension ahead of time)"
# setup.py builds the CUDA kernels when torch has CUDA and nvcc is found; force them on here.
export RLHF_KERNELS_BUILD_CUDA=${RLHF_KERNELS_BUILD_CUDA:-1}
timeout $(( $(left) / 3 )) $PY -m pip install --no-deps --no-build-isolation --no-index -e . \
  > "$LOGS/install.log" 2>&1 || { echo "install failed (see $LOGS/install.log)"; tail -20 "$LOGS/install.log"; status=1; }
$PY -m rlhf_kernels 2>&1 | tee "$LOGS/backends.txt"
nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1 || true

echo "== tests on CUDA tensors ($(left)s left)"
TEST_S=$(( $(left) * 2 / 5 ))
# The end-to-end training tests (marked slow) are left to RUN_SLOW=1: they need minutes.
MARK=(-m "not slow"); [ "${RUN_SLOW:-0}" = 1 ] && MARK=()
RLHF_TEST_DEVICE=cuda timeout "$TEST_S" $PY -m pytest -q -p no:cacheprovider "${MARK[@]}" \
  > "$LOGS/tests-cuda.log" 2>&1
rc=$?
tail -5 "$LOGS/tests-cuda.log"
[ "$rc" -eq 124 ] && echo "tests stopped after ${TEST_S}s (budget)"
[ "$rc" -ne 0 ] && status=1

echo "== benchmarks ($(left)s left)"
BENCH_S=$(( $(left) - 30 ))
$PY benchmarks/run_all.py --device cuda --budget "$BENCH_S" --update-readme > "$LOGS/bench.log" 2>&1
rc=$?
grep -E "^(run |ceilings|bench_)" "$LOGS/bench.log"
[ "$rc" -ne 0 ] && status=1

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results"
  cp -r benchmarks/results/. "$OUT/results/"
  cp README.md "$OUT/README.md"
fi
echo "== done in $(( $(date +%s) - T0 ))s, status $status"
exit "$status"
