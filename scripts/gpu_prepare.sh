#!/usr/bin/env bash
# Run HERE, on the development machine, before a device call: stages in .gpu_carry/
# (git-ignored) what the GPU machine lacks, since only the repository travels there and
# that machine has no network.
#
#   bash scripts/gpu_prepare.sh [MNIST_DIR]      # default ../shared/data/mnist
#
#   .gpu_carry/wheels/  torchattacks 3.5.1 (pure Python; what it needs is already there),
#                       the baseline of the attack and JSMA benchmarks
#   .gpu_carry/mnist/   the four MNIST IDX files (about 11 MB), so the GPU tests and
#                       benchmarks use real MNIST (RCE_FAST_MNIST_DIR) and
#                       scripts/gpu_reproduce.sh has its data
#
# Then the device call (the `run` tool) is, for the GPU check:
#   command:   bash scripts/gpu_check.sh "$OUT" --budget 450
#   carry:     [".gpu_carry"]          timeout_s: 560
# and for one share of the paper-settings MNIST run:
#   command:   bash scripts/gpu_reproduce.sh benchmarks/results/DATE_h100_mnist-paper .gpu_carry/mnist 540
#   carry:     [".gpu_carry"]          timeout_s: 600
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${1:-../shared/data/mnist}
mkdir -p .gpu_carry/wheels
python3 -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
    -d .gpu_carry/wheels "torchattacks==3.5.1"
if [ -f "$MNIST/train-images-idx3-ubyte.gz" ]; then
    rm -rf .gpu_carry/mnist
    mkdir -p .gpu_carry/mnist
    cp "$MNIST"/*-ubyte.gz .gpu_carry/mnist/
else
    echo "[gpu_prepare] no MNIST in $MNIST: the GPU run uses the digits stand-in" >&2
fi
git check-ignore -q .gpu_carry || { echo "[gpu_prepare] .gpu_carry is not git-ignored" >&2; exit 1; }
echo "[gpu_prepare] staged (carry it as \".gpu_carry\"):"
du -sh .gpu_carry/*
