#!/usr/bin/env bash
# One GPU session's share of the paper-settings MNIST run (ResNet-32, 20,000 steps, 1000
# attacked images, C&W 9 x 10,000, C&W-wb 3 x 5,000 + 9 x 10,000). Repeat the same command
# in later sessions, with the state folder carried, until it prints "finished".
#
#   bash scripts/gpu_reproduce.sh STATE_DIR MNIST_DIR [SECONDS]
#
# STATE_DIR  the run's state folder (for example
#            benchmarks/results/2026-12-01_h100_mnist-paper); it is what must travel
#            between sessions: commit it, or bring it back and carry it.
# MNIST_DIR  the four MNIST IDX files (.gpu_carry/mnist, staged by scripts/gpu_prepare.sh
#            and named in the call's carry).
# SECONDS    wall-clock seconds for this whole script (default 540: a 600 s command limit
#            leaves a minute for the start and the copy back). The build's time comes
#            off the run's --time-budget.
#
# Exit status: 0 finished, 3 not finished (run it again), anything else an error.
# Where $OUT is set (the device tool), the state folder comes back as state.tgz.00,
# state.tgz.01 ... (15 MiB parts; `cat state.tgz.* | tar xzf - -C "$(dirname STATE_DIR)"`
# restores it).
set -uo pipefail
STATE=${1:?usage: gpu_reproduce.sh STATE_DIR MNIST_DIR [SECONDS]}
DATA=${2:?usage: gpu_reproduce.sh STATE_DIR MNIST_DIR [SECONDS]}
TOTAL=${3:-540}
START=$(date +%s)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# Build rce_fast._C there (CPU and CUDA JSMA), for this GPU only: quicker.
CAP=$(python3 -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null)
CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-${CAP:-90}} \
    python3 -m pip install -q --no-deps --no-build-isolation -e . >"${OUT:-/tmp}/build.log" 2>&1 \
    || { tail -20 "${OUT:-/tmp}/build.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
BUDGET=$(( TOTAL - ($(date +%s) - START) - 20 ))  # 20 s for packing the state
echo "[gpu_reproduce] build done; --time-budget $BUDGET"
python3 -m rce_fast reproduce --dataset mnist --data-dir "$DATA" --out "$STATE" --time-budget "$BUDGET" \
    --quiet 2>&1 | tee "${OUT:-/tmp}/reproduce.log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 0 ]; then echo "[gpu_reproduce] finished: $STATE/report.md"; fi
if [ -n "${OUT:-}" ]; then
    tar czf - -C "$(dirname "$STATE")" "$(basename "$STATE")" | split -b 15m -d - "$OUT/state.tgz."
fi
du -sh "$STATE" 2>/dev/null
exit "$rc"
