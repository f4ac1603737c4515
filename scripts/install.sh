#!/usr/bin/env bash
# Installs rce_fast (editable) with its test extras on a fresh machine.
#
# torch comes first and pinned (2.13.0, the version tested) when no torch is installed.
# Which build that is depends on the index: this project's package index serves the CPU
# build, while PyPI's Linux torch is the CUDA build with several GB of CUDA packages; set
# RCE_FAST_TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu) to take torch from
# another index. An installed torch (e.g. your CUDA build) is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # RCE_FAST_TORCH_INDEX: a wheel index for torch alone, e.g. PyTorch's CPU-only
    # https://download.pytorch.org/whl/cpu where the default index's Linux torch is the
    # CUDA build
    echo "[install] torch not found: installing torch==2.13.0${RCE_FAST_TORCH_INDEX:+ from $RCE_FAST_TORCH_INDEX}"
    pip_install ${RCE_FAST_TORCH_INDEX:+--index-url "$RCE_FAST_TORCH_INDEX"} "torch==2.13.0"
fi
echo "[install] rce_fast and its dependencies"
pip_install -e ".[test]"
# Baseline for the attack benchmarks; --no-deps keeps it from pulling torchvision.
pip_install --no-deps "torchattacks==3.5.1"
"$PY" -c "import rce_fast, torch; print(f'[install] rce_fast {rce_fast.__version__}, torch {torch.__version__}')"
