#!/usr/bin/env bash
# Kept for old instructions: the GPU run is benchmarks/gpu_check.sh (install without touching torch,
# CUDA build, GPU tests, benchmarks, one summary, under 8 minutes).
exec bash "$(dirname "$0")/gpu_check.sh" "$@"
