"""Every Triton kernel compiles to sm_80 and sm_90 cubins at every launcher configuration,
plain and aligned (the JIT's two extremes of argument specialisation), with no register
spills (ptxas -v)."""
import pytest

from tests.triton_aot import SPECIALISATIONS, compile_module, parse_ptxas_log

KERNEL_MODULES = ["rce_fast.kernels.rce_loss", "rce_fast.kernels.kdensity"]


@pytest.mark.parametrize("module_name", KERNEL_MODULES)
def test_kernels_compile_for_sm80_and_sm90_without_spills(module_name):
    result = compile_module(module_name)
    assert not result["failures"], "\n".join(result["failures"])
    assert result["specs"] > 0
    # sm_80 and sm_90, each plain and aligned
    assert result["compiled"] == 2 * len(SPECIALISATIONS) * result["specs"]
    assert all(row["registers"] > 0 for row in result["rows"])


def test_ptxas_report_parser():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    12 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 64 registers, used 1 barriers, 380 bytes cmem[0]\n")
    assert parse_ptxas_log(log) == {"registers": 64, "spill_stores": 8, "spill_loads": 4}
    clean = log.replace("8 bytes spill stores, 4 bytes spill loads",
                        "0 bytes spill stores, 0 bytes spill loads")
    assert parse_ptxas_log(clean)["spill_stores"] == 0
    assert parse_ptxas_log("nothing")["spill_stores"] == -1
