"""Shared test setup.

Which Triton runs the kernel tests:
  * no CUDA GPU (CI, laptops): the Triton interpreter on CPU tensors. TRITON_INTERPRET
    must be set before Triton (or any kernel) is first imported, so it is set here.
  * a CUDA GPU present: the compiled kernels, on the ``cuda`` test cases (the
    ``cpu-triton_interp`` cases then skip, since one process cannot hold both).
RCE_FAST_TEST_INTERPRET=1 / 0 forces either choice.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
_forced = os.environ.get("RCE_FAST_TEST_INTERPRET")
USE_INTERPRETER = (_forced != "0") if _forced is not None else not HAS_CUDA
if USE_INTERPRETER:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


import pytest  # noqa: E402

import rce_fast  # noqa: E402
from tests import helpers as _helpers  # noqa: E402
from tests import triton_compat  # noqa: E402

INTERPRETER_PATCHED = USE_INTERPRETER and triton_compat.apply()
MNIST_DIR = _helpers.MNIST_DIR  # re-exported for the tests


def pytest_report_header(config):
    import importlib.util
    triton = "not installed"
    if importlib.util.find_spec("triton") is not None:
        import triton as _t
        triton = _t.__version__
    mode = "interpreter" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else \
        "compiled kernels"
    extra = " (NumPy >= 2.4 scalar fix applied to the interpreter)" if INTERPRETER_PATCHED else ""
    return (f"rce_fast: torch {torch.__version__}, triton {triton} ({mode}{extra}), "
            f"CUDA {'yes: ' + torch.cuda.get_device_name() if HAS_CUDA else 'no'}")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def _devices_and_backends():
    """(device, backend) pairs every kernel test runs on."""
    pairs = [pytest.param(("cpu", "torch"), id="cpu-torch"),
             pytest.param(("cpu", "auto"), id="cpu-auto"),  # the fused C++ loss where it fits
             pytest.param(("cpu", "torch_chunked"), id="cpu-torch_chunked"),
             pytest.param(("cpu", "triton"), id="cpu-triton_interp")]
    pairs.append(pytest.param(("cuda", "auto"), id="cuda", marks=pytest.mark.gpu))
    return pairs


DEVICE_BACKENDS = _devices_and_backends()
# The RCE loss also forces each of its two CPU paths ("cpu-auto" measures which is faster;
# "cpu-torch" is the PyTorch path): "cpu-compiled" is the fused C++ loss on every shape.
RCE_DEVICE_BACKENDS = DEVICE_BACKENDS[:2] + [
    pytest.param(("cpu", "compiled"), id="cpu-compiled")] + DEVICE_BACKENDS[2:]


@pytest.fixture
def on_backend(request, monkeypatch):
    """Parametrised (device, backend); sets the backend for the test and restores it.

    "torch_chunked" is the CPU PyTorch path with tiny row chunks and no small-input
    shortcut, so every test also covers the multi-chunk code on small shapes.
    "compiled" is backend "auto" with the fused C++ RCE loss forced wherever it can run.
    """
    device, backend = request.param
    if backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the Triton interpreter is off in this run (a GPU is present: the "
                    "cuda cases run the compiled kernels; RCE_FAST_TEST_INTERPRET=1 runs "
                    "the interpreter instead)")
    if backend == "torch_chunked":
        from rce_fast import _torch_impl
        monkeypatch.setattr(_torch_impl, "SMALL_ELEMS", -1)
        monkeypatch.setattr(_torch_impl, "_CHUNK_ELEMS", 64)
        backend = "torch"
    if backend == "compiled":
        from rce_fast import _ext, ops
        if _ext.load()[0] is None:
            pytest.skip("rce_fast._C is not built")
        monkeypatch.setattr(ops, "_rce_cpu_path", "compiled")
        backend = "auto"
    with rce_fast.use_backend(backend):
        yield device, backend
