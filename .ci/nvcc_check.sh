#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc alone (no GPU, no CUDA build of PyTorch needed) for sm_80
# and sm_90 with -Xptxas -v.  A compile error fails; the registers / spills of each kernel are
# summarised, and any spill is reported (set NVCC_CHECK_FAIL_ON_SPILL=1 to fail on one).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  echo "nvcc_check: nvcc not found (set NVCC); cannot compile csrc/cuda" >&2
  exit 1
fi
ARCHS=${NVCC_CHECK_ARCHS:-"80 90"}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/nvcc-check.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
"$NVCC" --version | tail -1
pids=()
for cu in csrc/cuda/*.cu; do
  for arch in $ARCHS; do
    name=$(basename "$cu" .cu)_sm$arch
    ( "$NVCC" -c -std=c++20 -O3 -Icsrc/include -gencode="arch=compute_$arch,code=sm_$arch" \
        -Xptxas -v -Werror all-warnings "$cu" -o "$OUT/$name.o" >"$OUT/$name.log" 2>&1 \
      && echo ok >"$OUT/$name.status" || echo fail >"$OUT/$name.status" ) &
    pids+=($!)
  done
done
wait "${pids[@]}"
fail=0
spills=0
for status in "$OUT"/*.status; do
  name=$(basename "$status" .status)
  log="$OUT/$name.log"
  if [ "$(cat "$status")" != ok ]; then
    echo "FAIL $name"; cat "$log"; fail=1; continue
  fi
  nk=$(grep -c "Compiling entry function" "$log" || true)
  maxreg=$(grep -o "Used [0-9]* registers" "$log" | awk '{print $2}' | sort -n | tail -1)
  sp=$(grep -o "[0-9]* bytes spill stores, [0-9]* bytes spill loads" "$log" | awk '$1 > 0 || $5 > 0' | wc -l)
  spills=$((spills + sp))
  echo "ok   $name: $nk kernels, max ${maxreg:-0} registers, $sp kernels with spills"
  if [ "$sp" -gt 0 ]; then grep -B3 "[1-9][0-9]* bytes spill" "$log" || true; fi
done
[ "$fail" -eq 0 ] || { echo "nvcc_check: compile errors" >&2; exit 1; }
if [ "$spills" -gt 0 ] && [ "${NVCC_CHECK_FAIL_ON_SPILL:-0}" = 1 ]; then
  echo "nvcc_check: register spills" >&2; exit 1
fi
echo "nvcc_check: all csrc/cuda/*.cu compile for sm_${ARCHS// /, sm_} (spilling kernels: $spills)"
