#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc alone (no GPU, no CUDA build of PyTorch needed) for sm_80
# and sm_90 with -Xptxas -v.  A compile error fails; the registers / spills of each kernel are
# summarised, and any spill is reported (set NVCC_CHECK_FAIL_ON_SPILL=1 to fail on one).
# Then the CUDA glue (csrc/cuda/*_glue.cpp) is syntax-checked with the host compiler against the
# installed torch headers, when torch and a C++ compiler are present (a CPU build of torch lacks one
# generated header, c10/cuda/impl/cuda_cmake_macros.h, which is stubbed for the check).
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
CXX=${CXX:-$(command -v g++ || command -v c++ || true)}
TORCH_INC=$(python -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null || true)
if [ -n "$CXX" ] && [ -n "$TORCH_INC" ] && [ -d "$TORCH_INC" ]; then
  CUDA_INC=$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include
  [ -f "$CUDA_INC/cuda_runtime.h" ] || CUDA_INC=/usr/local/cuda/include
  mkdir -p "$OUT/stub/c10/cuda/impl"
  [ -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ] \
    || printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
  for glue in csrc/cuda/*_glue.cpp; do
    if "$CXX" -std=c++20 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -I"$OUT/stub" -I"$TORCH_INC" \
        -I"$TORCH_INC/torch/csrc/api/include" -I"$CUDA_INC" -Icsrc/include -Icsrc "$glue" >"$OUT/glue.log" 2>&1; then
      if grep -q "csrc/.*warning" "$OUT/glue.log"; then echo "WARN $glue"; grep "csrc/.*warning" "$OUT/glue.log"; fi
      echo "ok   $(basename "$glue"): syntax ($CXX, torch headers)"
    else
      echo "FAIL $glue"; grep -E "error" "$OUT/glue.log" | head -20; fail=1
    fi
  done
else
  echo "skip csrc/cuda/*_glue.cpp syntax check: no C++ compiler or no torch headers"
fi
[ "$fail" -eq 0 ] || { echo "nvcc_check: compile errors" >&2; exit 1; }
if [ "$spills" -gt 0 ] && [ "${NVCC_CHECK_FAIL_ON_SPILL:-0}" = 1 ]; then
  echo "nvcc_check: register spills" >&2; exit 1
fi
echo "nvcc_check: all csrc/cuda/*.cu compile for sm_${ARCHS// /, sm_} (spilling kernels: $spills)"
