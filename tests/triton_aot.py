"""Compile Triton kernels ahead of time for real GPU targets, with no GPU present.

Each kernel module in ``kernels/`` exposes ``aot_specs()``: every (kernel, signature,
constants, num_warps) its launchers can choose. :func:`compile_module` compiles all of
them for sm_80 and sm_90 with ``triton.compile(ASTSource, target=GPUTarget(...))`` down
to a cubin, so a kernel that would not compile on a GPU fails CI instead of a user.

The compile runs in a subprocess without TRITON_INTERPRET: under the interpreter
``@triton.jit`` yields interpreted functions that cannot be lowered to PTX.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

ARCHS = (80, 90)


def _compile_in_this_process(module_name: str, archs=ARCHS) -> list[str]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(module_name)
    failures, count = [], 0
    for spec in module.aot_specs():
        kernel = spec["kernel"]
        for cc in archs:
            label = f"{kernel.__name__} sm_{cc} {spec['constexprs']} {spec['signature']}"
            try:
                # signature in the kernel's argument order, whatever order the spec used
                sig = {name: spec["signature"][name] for name in kernel.arg_names}
                src = ASTSource(fn=kernel, signature=sig, constexprs=spec["constexprs"])
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                          options={"num_warps": spec["num_warps"]})
                if not compiled.asm.get("cubin"):
                    failures.append(f"{label}: no cubin produced")
                count += 1
            except Exception as exc:  # report every failing config, not just the first
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
    if count == 0 and not failures:
        failures.append(f"{module_name}.aot_specs() listed no kernels")
    return failures


def compile_module(module_name: str, timeout: float = 1200) -> tuple[int, list[str]]:
    """Compile every spec of ``module_name`` for sm_80 and sm_90; (specs, failures)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, module_name], env=env, timeout=timeout,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return 0, [f"compiler subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}"]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["specs"], result["failures"]


if __name__ == "__main__":
    name = sys.argv[1]
    mod = importlib.import_module(name)
    out = _compile_in_this_process(name)
    print(json.dumps({"specs": len(mod.aot_specs()), "failures": out}))
