#!/usr/bin/env bash
# Pre-flight for a GPU session, on this CPU machine and at no device time: the lent GPU
# machine's software (Python 3.12, torch 2.11, triton 3.6.0, numpy 2.5.2) in a venv, the
# package built there as the GPU check builds it (CUDA code for sm_90 included), and the
# test suite run in it on the CPU (Triton interpreter). It finds what only that stack
# shows (a Python 3.12 or torch 2.11 difference) before the GPU run would.
#
#   bash scripts/gpu_twin.sh [VENV] [pytest args...]     # default VENV /tmp/gpu-twin
#
# Needs a Python 3.12 (python3.12 on PATH, or pyenv's) and PyPI: torch 2.11 from PyPI is
# the CUDA build, about 4 GB of downloads the first time (it runs on the CPU as well).
# Not part of CI: CI's Python is 3.11 and its own drift check covers triton 3.6.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/gpu-twin}
shift || true
PY312=$(command -v python3.12 || ls -d "$HOME"/.pyenv/versions/3.12*/bin/python 2>/dev/null | tail -1 || true)
[ -n "$PY312" ] || { echo "[gpu_twin] no Python 3.12 found" >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
    "$PY312" -m venv "$VENV"
    "$VENV/bin/pip" install --disable-pip-version-check -q "torch==2.11.0" "triton==3.6.0" \
        "numpy==2.5.2" pytest pytest-benchmark hypothesis scikit-learn tqdm matplotlib \
        pybind11 cmake ninja setuptools wheel
fi
CMAKE_CUDA_ARCHITECTURES=90 "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
    --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import torch, triton, numpy, sys, rce_fast._C as c; print(f'[gpu_twin] python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}, extension with CUDA: {c.with_cuda}')"
if [ $# -eq 0 ]; then set -- tests benchmarks --benchmark-disable; fi
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfE "$@"
