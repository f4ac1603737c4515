#!/usr/bin/env bash
# One prepared command for a lent GPU (about 8 minutes wall on one H100, build included):
#
#   bash scripts/gpu_check.sh OUT_DIR [--budget SECONDS] [--skip STAGE,...] ...
#
# Builds and installs rce_fast for this GPU only, runs every GPU test on the compiled
# kernels, compute-sanitizer memcheck/racecheck on our kernels, and the GPU benchmarks
# sized to the time left; writes OUT_DIR/summary.json, summary.md and gpu_check.log and
# prints summary.md. Every stage has its own time cap; nothing can hang.
# See scripts/gpu_check.py (or --help) for the stages and options.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
