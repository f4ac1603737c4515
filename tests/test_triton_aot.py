"""Every Triton kernel compiles to sm_80 and sm_90 cubins at every launcher configuration."""
import pytest

from tests.triton_aot import compile_module

KERNEL_MODULES = ["rce_fast.kernels.rce_loss", "rce_fast.kernels.kdensity"]


@pytest.mark.parametrize("module_name", KERNEL_MODULES)
def test_kernels_compile_for_sm80_and_sm90(module_name):
    specs, failures = compile_module(module_name)
    assert not failures, "\n".join(failures)
    assert specs > 0
