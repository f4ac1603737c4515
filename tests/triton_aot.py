"""Compile Triton kernels ahead of time for real GPU targets, with no GPU present.

Each kernel module in ``kernels/`` exposes ``aot_specs()``: every (kernel, signature,
constants, num_warps, num_stages) its launchers can choose. :func:`compile_module`
compiles all of them for sm_80 and sm_90 with ``triton.compile(ASTSource,
target=GPUTarget(...))`` down to a cubin, so a kernel that would not compile on a GPU
fails CI instead of a user.

Each spec is compiled in two specialisations, as the JIT would build them: "plain" (no
argument known to be aligned) and "aligned" (every pointer 16-byte aligned and every
integer argument a multiple of 16: the JIT's ``tt.divisibility`` for aligned tensors
and sizes or strides such as D = 32). ptxas allocates registers differently for the
two, so one can spill where the other does not.

It also reads ptxas's resource report (``-v``) for every compile and reports registers
and spills: a configuration that spills registers to local memory is a failure, since
spills are what makes a kernel that compiles run several times slower. The report is
the one Triton's own ptxas invocation prints (``TRITON_DUMP_PTXAS_LOG``), so the flags
match the installed Triton exactly; a fresh cache directory makes every kernel compile.

The compile runs in a subprocess without TRITON_INTERPRET: under the interpreter
``@triton.jit`` yields interpreted functions that cannot be lowered to PTX.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

ARCHS = (80, 90)
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict:
    """{"registers", "spill_stores", "spill_loads"} from ptxas -v output (the kernel's
    own function entry; -1 where ptxas printed nothing)."""
    spills = _SPILL.findall(log)
    regs = _REGS.findall(log)
    return {"registers": int(regs[-1]) if regs else -1,
            "spill_stores": sum(int(s) for s, _ in spills) if spills else -1,
            "spill_loads": sum(int(s) for _, s in spills) if spills else -1}


def _ptxas_report(compiled, log: str, cc: int) -> dict:
    """Resource report of one compile: Triton's own ptxas log, or ptxas -v run here."""
    report = parse_ptxas_log(log)
    if report["spill_stores"] >= 0:
        return report
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        proc = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={sm_arch_from_capability(cc)}",
                               src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    return parse_ptxas_log(proc.stderr)


def _aligned_attrs(kernel, signature: dict) -> dict:
    """The JIT's attributes for every pointer and integer argument divisible by 16."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if signature[name].startswith("*") or signature[name] in ("i32", "i64")}


SPECIALISATIONS = ("plain", "aligned")


def _compile_in_this_process(module_name: str, archs=ARCHS) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True
    module = importlib.import_module(module_name)
    failures, rows = [], []
    for spec in module.aot_specs():
        kernel = spec["kernel"]
        options = {"num_warps": spec["num_warps"]}
        if spec.get("num_stages") is not None:
            options["num_stages"] = spec["num_stages"]
        for cc, special in ((cc, s) for cc in archs for s in SPECIALISATIONS):
            label = (f"{kernel.__name__} sm_{cc} {special} warps={spec['num_warps']} "
                     f"stages={spec.get('num_stages')} {spec['constexprs']} "
                     f"{[v for v in spec['signature'].values() if v.startswith('*')][:1]}")
            try:
                # signature in the kernel's argument order, whatever order the spec used
                sig = {name: spec["signature"][name] for name in kernel.arg_names}
                attrs = _aligned_attrs(kernel, sig) if special == "aligned" else None
                src = ASTSource(fn=kernel, signature=sig, constexprs=spec["constexprs"],
                                attrs=attrs)
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                              options=options)
                if not compiled.asm.get("cubin"):
                    failures.append(f"{label}: no cubin produced")
                    continue
                report = _ptxas_report(compiled, buf.getvalue(), cc)
                rows.append({"label": label, **report})
                if report["spill_stores"] < 0:
                    failures.append(f"{label}: ptxas printed no resource report")
                elif report["spill_stores"] or report["spill_loads"]:
                    failures.append(f"{label}: register spills ({report['spill_stores']} "
                                    f"bytes stored, {report['spill_loads']} loaded; "
                                    f"{report['registers']} registers)")
            except Exception as exc:  # report every failing config, not just the first
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
    if not rows and not failures:
        failures.append(f"{module_name}.aot_specs() listed no kernels")
    return {"specs": len(module.aot_specs()), "compiled": len(rows), "failures": failures,
            "triton": triton.__version__, "rows": rows}


def compile_module(module_name: str, timeout: float = 1800, python: str | None = None
                   ) -> dict:
    """Compile every spec of ``module_name`` for sm_80 and sm_90 in a subprocess (optionally
    another interpreter, e.g. one with another Triton). Returns {"specs", "compiled",
    "failures", "triton", "rows"}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache  # a cache hit would skip ptxas and its report
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([python or sys.executable, "-m", "tests.triton_aot", module_name],
                              env=env, timeout=timeout, capture_output=True, text=True,
                              cwd=root)
    if proc.returncode != 0:
        return {"specs": 0, "compiled": 0, "triton": None, "rows": [],
                "failures": [f"compiler subprocess failed ({proc.returncode}):\n"
                             f"{proc.stderr[-4000:]}"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    result = _compile_in_this_process(sys.argv[1])
    print(json.dumps(result))
