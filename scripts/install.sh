#!/usr/bin/env bash
# Installs rce_fast (editable) with its test extras on a fresh machine.
#
# torch comes first and pinned: on a machine with no torch, an unpinned `torch` from
# PyPI pulls several GB of CUDA packages, so we take the CPU build (2.13.0). If torch is
# already installed (e.g. your CUDA build), it is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[install] torch not found: installing the CPU build torch==2.13.0"
    pip_install "torch==2.13.0"
fi
echo "[install] rce_fast and its dependencies"
pip_install -e ".[test]"
# Baseline for the attack benchmarks; --no-deps keeps it from pulling torchvision.
pip_install --no-deps "torchattacks==3.5.1"
"$PY" -c "import rce_fast, torch; print(f'[install] rce_fast {rce_fast.__version__}, torch {torch.__version__}')"
