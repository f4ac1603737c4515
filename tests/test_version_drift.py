"""The kernel tests and the ahead-of-time compile (with its ptxas spill check) under the
GPU machine's versions: triton 3.6.0 and NumPy 2.4.x (the nearest to the GPU machine's
2.5 on this Python; the interpreter behaves the same), beside CI's own Triton.

The environment comes from ``scripts/install_drift_env.sh`` (``.ci/run`` builds it and
sets RCE_FAST_REQUIRE_DRIFT=1, so there a missing environment fails instead of skipping).
"""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DRIFT_PYTHON = pathlib.Path(os.environ.get("RCE_FAST_DRIFT_PYTHON",
                                           ROOT / ".ci" / "drift-venv" / "bin" / "python"))
REQUIRED = os.environ.get("RCE_FAST_REQUIRE_DRIFT") == "1"

# Every Triton-interpreter case of the kernel tests (on CPU tensors), and the AOT compile.
KERNEL_TESTS = ["tests/test_rce_loss.py", "tests/test_kdensity.py",
                "tests/test_gpu_readiness.py", "tests/test_triton_aot.py"]
SELECTION = "triton_interp or triton or interp or wide or low_precision or capture or launch or compile_for"


def _drift_python() -> pathlib.Path:
    if not DRIFT_PYTHON.exists():
        msg = (f"no drift environment at {DRIFT_PYTHON}: run "
               "`bash scripts/install_drift_env.sh` (CI does)")
        if REQUIRED:
            pytest.fail(msg)
        pytest.skip(msg)
    return DRIFT_PYTHON


def test_drift_environment_has_the_gpu_machines_versions():
    py = _drift_python()
    out = subprocess.run([str(py), "-c", "import triton, numpy; print(triton.__version__, "
                          "numpy.__version__)"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    triton_v, numpy_v = out.stdout.split()
    assert triton_v == "3.6.0"
    assert tuple(int(p) for p in numpy_v.split(".")[:2]) >= (2, 4)


def test_kernel_tests_pass_under_the_gpu_machines_triton():
    py = _drift_python()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                            "PYTEST_ADDOPTS")}
    env["RCE_FAST_TEST_INTERPRET"] = "1"
    proc = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-x", *KERNEL_TESTS, "-k", SELECTION],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout, tail
