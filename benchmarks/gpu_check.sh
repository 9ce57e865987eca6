#!/usr/bin/env bash
# The GPU check: one script for a fresh H100/H200 machine that has a CUDA build of torch and a
# package index.  From the repository root (or anywhere):
#
#   bash benchmarks/gpu_check.sh                 # results and logs in $OUT (default ./gpu_check_out)
#
# Stages, each under its own `timeout`, all inside GPU_CHECK_BUDGET_S seconds (default 470: the
# whole check stays under 8 minutes); one summary screen at the end (stage, status, seconds):
#
#   env        the GPU, torch, CUDA and Triton versions (no CUDA device: every later stage is skipped)
#   deps       what the tests and benchmarks need, WITHOUT touching torch: test tools with --no-deps,
#              the package's light dependencies under a constraint that pins the installed torch
#   build      the C++ extension with the CUDA kernels for sm_90 (RLHF_KERNELS_BUILD_CUDA=1);
#              no CUDA toolkit (nvcc) is a failed stage with the reason, not a crash
#   cuda_ext   fails loudly unless the extension loaded with its CUDA kernels
#   backends   python -m rlhf_kernels with RLHF_KERNELS_JIT=0 (never a minutes-long JIT build)
#   tests      the GPU subset of the test suite on CUDA tensors (RLHF_TEST_DEVICE=cuda,
#              RLHF_TEST_REQUIRE_BACKENDS=triton,cuda): every op's values and gradients in
#              fp32/bf16/fp16, V up to 262144, offsets past 2^31
#   bench_logprobs, bench_ops   the benchmarks without torch.compile (token_logprobs first)
#   bench_compile               the torch.compile providers, only if time remains
#
# Results: benchmark rows in benchmarks/results/cuda-<gpu>.jsonl and benchmarks/results/REPORT.md,
# all copied with the logs, env.txt and summary.txt to $OUT.  Exit status 0 only if every stage
# passed (bench_compile may be skipped for time).
#
# Knobs: PYTHON (default python), OUT, GPU_CHECK_BUDGET_S, GPU_CHECK_JOBS (pytest workers, default 8),
# RLHF_KERNELS_CUDA_ARCH (default 90).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export ROOT
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs
export OUT LOGS
PY=${PYTHON:-python}
export PY
T0=$(date +%s)
DEADLINE=$(( T0 + ${GPU_CHECK_BUDGET_S:-470} ))
unset TRITON_INTERPRET
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
export RLHF_KERNELS_JIT=0  # the extension is built by the build stage, never just in time
export RLHF_KERNELS_CUDA_ARCH=${RLHF_KERNELS_CUDA_ARCH:-90}
export MAX_JOBS=${MAX_JOBS:-16}

# The GPU subset of the tests: every tests/test_*.py except the files below, which test CPU-only
# machinery (so a new op's test file is in the subset without an edit here).  The Triton
# token_logprobs kernel tests are left out for time: their cases run again through the public op.
# tests/test_gpu_check_script.py checks that these exist and that the subset covers every op.
GPU_TEST_EXCLUDE=(
  tests/test_bad_input.py
  tests/test_benchmarks_smoke.py
  tests/test_cpu_op_checks.py
  tests/test_cuda_glue_source.py
  tests/test_gpu_check_script.py
  tests/test_integration_hf.py
  tests/test_integration_openrlhf.py
  tests/test_integration_trl.py
  tests/test_integration_verl.py
  tests/test_kernels_only_install.py
  tests/test_properties.py
  tests/test_registry.py
  tests/test_run_script.py
  tests/test_triton_logprobs_kernel.py
)
GPU_TEST_FILES=()
for f in tests/test_*.py; do
  [[ " ${GPU_TEST_EXCLUDE[*]} " == *" $f "* ]] || GPU_TEST_FILES+=("$f")
done
# Left out for time: torch.compile tracing (minutes with a cold cache) and the ahead-of-time sm_90
# lowering (the kernels run for real here).
GPU_TEST_DESELECT="not test_compile_fullgraph_every_op_with_backward and not test_kernels_lower_to_sm90_cubin"
# Benchmark scripts, token_logprobs first.
BENCH_FIRST=logprobs
BENCH_REST=gae,losses,dpo
# Test tools, installed with --no-deps so pip never resolves (and replaces) torch.
TEST_TOOLS=(pytest pluggy iniconfig packaging exceptiongroup tomli hypothesis attrs sortedcontainers
            pytest-benchmark py-cpuinfo)
OPTIONAL_TOOLS=(pytest-xdist execnet)  # parallel test workers, when the index has them
LIGHT_DEPS=(numpy pyyaml ninja pybind11)

STAGES=()
STATUS=()
SECONDS_TAKEN=()
NOTES=()
record() { STAGES+=("$1"); STATUS+=("$2"); SECONDS_TAKEN+=("$3"); NOTES+=("$4"); }
left() { echo $(( DEADLINE - $(date +%s) )); }

# run_stage NAME LIMIT_S FUNCTION: FUNCTION runs in a child bash under `timeout`, output to
# $LOGS/NAME.log; the stage gets min(LIMIT_S, time left).
run_stage() {
  local name=$1 limit=$2 fn=$3 rest t rc dt st note
  rest=$(left)
  if (( rest < 10 )); then
    record "$name" SKIP 0 "no time left in the ${GPU_CHECK_BUDGET_S:-470}s budget"
    return 1
  fi
  (( limit > rest )) && limit=$rest
  if (( limit < 10 )); then
    record "$name" SKIP 0 "only ${limit}s available for it"
    return 1
  fi
  echo "== $name (up to ${limit}s)"
  t=$(date +%s)
  timeout --kill-after=5 "$limit" bash -c "$fn" > "$LOGS/$name.log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t ))
  st=PASS
  note="log: logs/$name.log"
  if (( rc == 124 || rc == 137 )); then
    st=TIMEOUT; note="stopped after ${limit}s; $note"
  elif (( rc != 0 )); then
    st=FAIL; note="exit $rc: $(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-90); $note"
  fi
  record "$name" "$st" "$dt" "$note"
  tail -n 3 "$LOGS/$name.log" | sed 's/^/   /'
  return "$rc"
}

stage_env() {
  nvidia-smi || echo "(no nvidia-smi)"
  git -C "$ROOT" log -1 --format='commit %H %cI' 2>/dev/null || true
  "$PY" - <<'EOF'
import platform, sys
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__} (torch.version.cuda={torch.version.cuda})")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB")
EOF
}

stage_deps() {
  set -e
  torch_version=$("$PY" -c "import torch; print(torch.__version__)")
  echo "torch==$torch_version" > "$OUT/torch-constraint.txt"
  "$PY" -m pip install -q --no-deps "${TEST_TOOLS[@]}"
  "$PY" -m pip install -q --no-deps "${OPTIONAL_TOOLS[@]}" || echo "no ${OPTIONAL_TOOLS[*]}: the tests run in one process"
  "$PY" -m pip install -q -c "$OUT/torch-constraint.txt" "${LIGHT_DEPS[@]}" "setuptools>=69" wheel
  "$PY" -c "import torch; assert torch.__version__ == '$torch_version', 'pip changed torch'"
  "$PY" -m pytest --version
  "$PY" -c "import hypothesis, pytest_benchmark; print('hypothesis', hypothesis.__version__)"
}

stage_build() {
  set -e
  nvcc=$(command -v nvcc || true)
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    [ -z "$nvcc" ] && [ -n "$d" ] && [ -x "$d/bin/nvcc" ] && nvcc=$d/bin/nvcc
  done
  if [ -z "$nvcc" ]; then
    echo "no CUDA toolkit: nvcc is not on PATH, in \$CUDA_HOME or /usr/local/cuda; the CUDA kernels cannot be built"
    exit 3
  fi
  CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$nvcc")")}
  PATH="$(dirname "$nvcc"):$PATH"
  export CUDA_HOME PATH
  "$nvcc" --version | tail -n 2
  RLHF_KERNELS_BUILD_CUDA=1 "$PY" setup.py -q build_ext --inplace
}

stage_cuda_ext() {
  "$PY" - <<'EOF'
import sys
import torch
import rlhf_kernels as rk
from rlhf_kernels import _extension
info = _extension.build_info()
print(info)
if info.get("status") != "loaded":
    sys.exit(f"the compiled extension did not load: {info.get('reason')}")
if info.get("built for cuda", "none") in ("none", "", None):
    sys.exit("the extension loaded WITHOUT its CUDA kernels (built for cuda: none)")
missing = {}
for op in rk.OPS:
    reason = rk.available_backends(op, "cuda", torch.float32)["cuda"]
    if reason is not None:
        missing[op] = reason
if missing:
    sys.exit(f"CUDA backend unavailable for: {missing}")
print("CUDA kernels loaded for every op:", ", ".join(rk.OPS))
EOF
}

stage_backends() { "$PY" -m rlhf_kernels; }

stage_tests() {
  jobs=()
  if "$PY" -c "import xdist" 2>/dev/null && [ "${GPU_CHECK_JOBS:-8}" -gt 1 ]; then
    # Workers compile Triton kernels in parallel: a cold cache is the bulk of the time.
    jobs=(-n "${GPU_CHECK_JOBS:-8}")
  fi
  RLHF_TEST_DEVICE=cuda RLHF_TEST_REQUIRE_BACKENDS=$REQUIRE \
    "$PY" -m pytest -q -p no:cacheprovider -m "not slow" "${jobs[@]}" -rfE \
    --junitxml="$OUT/tests-cuda.xml" -k "$GPU_TEST_DESELECT" "${GPU_TEST_FILES[@]}"
}

stage_bench_logprobs() {
  "$PY" benchmarks/run_all.py --device cuda --no-plots --only "$BENCH_FIRST" \
    --skip-providers torch_compile --budget $(( STAGE_LIMIT - 15 ))
  # linear_token_logprobs at N=16384 H=4096 V=128256 bf16, every provider in its own process
  "$PY" benchmarks/bench_linear_logprobs.py --device cuda --timeout 120
}

stage_bench_ops() {
  "$PY" benchmarks/run_all.py --device cuda --no-plots --only "$BENCH_REST" \
    --skip-providers torch_compile --budget $(( STAGE_LIMIT - 15 ))
}

stage_bench_compile() {
  # Only the torch.compile provider: the others were measured above (ratios are per run).
  "$PY" benchmarks/run_all.py --device cuda --no-plots --only "$BENCH_FIRST,$BENCH_REST" \
    --skip-providers reference,triton,cuda,liger --budget $(( STAGE_LIMIT - 15 ))
}

export GPU_TEST_DESELECT BENCH_FIRST BENCH_REST
export -f stage_env stage_deps stage_build stage_cuda_ext stage_backends stage_tests \
  stage_bench_logprobs stage_bench_ops stage_bench_compile
# Arrays cannot be exported: hand them over as a declaration.
export TEST_TOOLS_DECL OPTIONAL_TOOLS_DECL LIGHT_DEPS_DECL GPU_TEST_FILES_DECL
TEST_TOOLS_DECL=$(declare -p TEST_TOOLS)
OPTIONAL_TOOLS_DECL=$(declare -p OPTIONAL_TOOLS)
LIGHT_DEPS_DECL=$(declare -p LIGHT_DEPS)
GPU_TEST_FILES_DECL=$(declare -p GPU_TEST_FILES)
with_arrays() { echo "eval \"\$TEST_TOOLS_DECL\"; eval \"\$OPTIONAL_TOOLS_DECL\"; eval \"\$LIGHT_DEPS_DECL\"; eval \"\$GPU_TEST_FILES_DECL\"; $1"; }

if run_stage env 30 stage_env; then
  run_stage deps 90 "$(with_arrays stage_deps)"
  run_stage build 180 stage_build
  ext_ok=1
  run_stage cuda_ext 45 stage_cuda_ext || ext_ok=0
  run_stage backends 45 stage_backends
  # Without the CUDA kernels (a failed stage above) only Triton is required, so the tests still
  # say something about the Triton kernels instead of failing on every CUDA case.
  REQUIRE=triton,cuda
  (( ext_ok )) || REQUIRE=triton
  export REQUIRE
  # The tests leave at least 75 s for the token_logprobs benchmark.
  run_stage tests $(( $(left) - 75 < 210 ? $(left) - 75 : 210 )) "$(with_arrays stage_tests)"
  STAGE_LIMIT=$(( $(left) < 100 ? $(left) : 100 )); export STAGE_LIMIT
  run_stage bench_logprobs "$STAGE_LIMIT" stage_bench_logprobs
  STAGE_LIMIT=$(( $(left) < 70 ? $(left) : 70 )); export STAGE_LIMIT
  run_stage bench_ops "$STAGE_LIMIT" stage_bench_ops
  if (( $(left) >= 60 )); then
    STAGE_LIMIT=$(left); export STAGE_LIMIT
    run_stage bench_compile "$STAGE_LIMIT" stage_bench_compile
  else
    record bench_compile SKIP 0 "only $(left)s left (torch.compile runs when >= 60s remain)"
  fi
else
  for s in deps build cuda_ext backends tests bench_logprobs bench_ops bench_compile; do
    record "$s" SKIP 0 "the env stage failed (no CUDA device or no torch)"
  done
fi

# Results next to the logs.
mkdir -p "$OUT/results"
cp -r benchmarks/results/. "$OUT/results/" 2>/dev/null || true
cp "$LOGS/env.log" "$OUT/env.txt" 2>/dev/null || true

status=0
for i in "${!STAGES[@]}"; do
  case "${STATUS[$i]}" in
    PASS) ;;
    SKIP) [ "${STAGES[$i]}" = bench_compile ] && [ "${STATUS[0]}" = PASS ] || status=1 ;;
    *) status=1 ;;
  esac
done
{
  echo
  echo "GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(( $(date +%s) - T0 ))s wall; output in $OUT"
  printf '%-15s %-8s %6s  %s\n' stage status seconds note
  for i in "${!STAGES[@]}"; do
    printf '%-15s %-8s %6s  %s\n' "${STAGES[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}" "${NOTES[$i]}"
  done
  echo "overall: $([ "$status" = 0 ] && echo PASS || echo FAIL)"
} | tee "$OUT/summary.txt"
exit "$status"
