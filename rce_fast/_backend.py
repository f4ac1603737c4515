"""Which implementation runs an op: the one place that decides.

Every op has a list of implementations in order of preference. Each one states what
it supports; the first that supports the call runs. When the user forces a backend
that cannot run the call, the error lists every reason, xformers-style.

Backends:
  ``"auto"``   (default) Triton / the CUDA extension on CUDA tensors, PyTorch or C++ on CPU.
  ``"triton"`` use the Triton kernels wherever possible, also on CPU tensors when the
              Triton interpreter is on (``TRITON_INTERPRET=1``): this is how the kernels
              are tested on machines without a GPU.
  ``"torch"``  the plain PyTorch paths everywhere.

Set it with :func:`set_backend`, the :func:`use_backend` context manager, or the
``RCE_FAST_BACKEND`` environment variable.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
_backend = os.environ.get("RCE_FAST_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"RCE_FAST_BACKEND must be one of {BACKENDS}, got {_backend!r}")


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Processor", ...): CPU timings
    depend on it, so results name it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "unknown CPU"


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Select ``"auto"``, ``"triton"`` or ``"torch"`` for every op (see module docstring)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when Triton and our kernels import, else why not."""
    try:
        import triton  # noqa: F401
        import rce_fast.kernels  # noqa: F401
    except Exception as exc:  # ImportError, or a broken Triton install
        return f"Triton is not usable ({type(exc).__name__}: {exc})"
    return None


def triton_device_reason(device: torch.device) -> str | None:
    """None when Triton kernels can run on ``device`` under the current backend."""
    if _backend == "torch":
        return "backend 'torch' selected"
    err = triton_import_error()
    if err is not None:
        return err
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _backend == "triton" and triton_interpreter_on():
        return None
    if device.type == "cpu":
        return ("CPU tensors run the PyTorch path (the Triton interpreter is used only with "
                "backend 'triton' and TRITON_INTERPRET=1)")
    return f"device type {device.type!r} is not supported by Triton here"


@dataclass(frozen=True)
class Impl:
    """One implementation of an op: ``why_not(**call)`` returns None or a reason."""
    name: str
    why_not: Callable[..., str | None]
    run: Callable


def pick(op_name: str, impls: list[Impl], **call) -> Impl:
    """First implementation in ``impls`` that supports the call.

    Under backend ``"triton"`` the first entry (the fast path) must fit, else the error
    lists every implementation's reason; otherwise the last entry is the fallback.
    """
    reasons = []
    for impl in impls:
        why = impl.why_not(**call)
        if why is None:
            if _backend == "triton" and impl is not impls[0]:
                break
            return impl
        reasons.append(f"{impl.name}: {why}")
    raise RuntimeError(f"{op_name}: no implementation can run this call under backend "
                       f"{_backend!r}:\n  " + "\n  ".join(reasons))
