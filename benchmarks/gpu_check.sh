#!/usr/bin/env bash
# The CUDA path, checked and measured on one GPU in a few minutes: see benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh            # on a GPU machine; writes $OUT/gpu_check.md if OUT is set
#   bash benchmarks/gpu_check.sh --dry_run  # tiny, on the CPU: proves it parses and starts
set -euo pipefail
cd "$(dirname "$0")/.."  # the recipes name their model configs from the repository root
exec python benchmarks/gpu_check.py "$@"
