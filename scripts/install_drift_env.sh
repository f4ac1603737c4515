#!/usr/bin/env bash
# A second Python environment with the GPU machine's Triton (3.6.0) and the NumPy nearest
# to its 2.5 that this Python supports (2.4.x, same behaviour in the Triton interpreter),
# on top of the installed torch and rce_fast. tests/test_version_drift.py runs the kernel
# tests and the sm_80/sm_90 compile (with the ptxas spill check) in it, so that drift
# between CI's Triton and the GPU machine's shows on every run.
#
#   bash scripts/install_drift_env.sh [VENV_DIR]     (default: .ci/drift-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.ci/drift-venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
fi
# The venv's own packages shadow the system's: only triton and numpy differ.
env -u PIP_CONSTRAINT "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
    "triton==3.6.0" "numpy>=2.4,<2.5"
"$VENV/bin/python" -c "import triton, numpy, torch, rce_fast; print(f'[drift env] triton {triton.__version__}, numpy {numpy.__version__}, torch {torch.__version__}')"
