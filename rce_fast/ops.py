"""Custom-op registration and device dispatch for every rce_fast op (the one place).

The public functions in ``rce_fast`` check their arguments once, with clear messages.
Each op also checks, itself, what its kernels rely on that costs no host synchronisation
(tensor kinds, shapes, dtypes, devices, scalar ranges: O(1) metadata), so that a direct
``torch.ops.rce_fast...`` call with a mismatched tensor gets a ValueError / TypeError, not
an out-of-bounds read or write in a compiled kernel; and the label-range check, which
needs tensor *values*, runs inside the RCE forward op, so that it also runs under
``torch.compile`` and before any kernel is launched. The RCE backward op does not re-check
label values (that would cost a host synchronisation per training step): every
implementation returns a NaN gradient row for a label outside [0, L). The K-density ops
check their offsets' *values* on the CPU (free there) and trust them on a GPU (class
boundaries built by ``detect.kdensity`` on the device, with no synchronisation in an
attack's inner loop). The fake kernels run the same metadata checks, so a call mixing
in a meta tensor, and torch.compile while tracing, refuse what the real kernels would.

Ops:
  ``rce_fast::rce_loss_forward(logits, target, ignore_index, inv_temperature)
        -> (loss_rows, lse)``   per-row loss and log-sum-exp, float32 (float64 for
        float64 logits), autograd-enabled w.r.t. ``logits``.
  ``rce_fast::rce_loss_backward(grad_rows, logits, target, lse, ignore_index,
        inv_temperature) -> grad_logits``   in the logits' dtype.
  ``rce_fast::kdensity_lse(q, q_offsets, bank, b_offsets, sigma2) -> lse``
        log-sum-exp of -||q_i - x_j||^2 / sigma2 over the bank rows of q_i's class, for
        class-sorted q and bank; autograd-enabled w.r.t. ``q``.
  ``rce_fast::kdensity_grad(grad_lse, q, q_offsets, bank, b_offsets, lse, sigma2)``.
  ``rce_fast::jsma_pairs(alpha, beta, domain, increase) -> pairs``   the JSMA saliency
        pair search, (B, 2) int64 with (-1, -1) where no pair qualifies; the compiled
        extension rce_fast._C on CPU (OpenMP) and CUDA, a tiled PyTorch fallback else.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch
from torch import Tensor

from . import _backend, _ext, _torch_impl
from ._args import FP32_MAX, FP32_TINY

# ------------------------------------------------------------- argument checks of the ops

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, on {t.device}"


def _check_op_tensor(op: str, name: str, t, *, shape=None, ndim=None, dtypes=None,
                     device=None) -> None:
    """Unless ``t`` is a tensor of the given shape (None entries free) or number of
    dimensions (ValueError), one of ``dtypes`` (TypeError), on ``device`` (ValueError):
    an error naming ``op`` and ``name``. Metadata only: no host synchronisation."""
    if not isinstance(t, Tensor):
        raise TypeError(f"rce_fast::{op}: {name} must be a torch.Tensor, got "
                        f"{type(t).__name__}")
    got = _describe(t)
    if shape is not None:
        if t.dim() != len(shape) or any(w is not None and w != g
                                        for w, g in zip(shape, t.shape)):
            want = ", ".join("*" if w is None else str(w) for w in shape)
            want += "," if len(shape) == 1 else ""
            raise ValueError(f"rce_fast::{op}: {name} must have shape ({want}); got {got}")
    elif ndim is not None and t.dim() != ndim:
        raise ValueError(f"rce_fast::{op}: {name} must have {ndim} dimensions; got {got}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"rce_fast::{op}: {name} must have dtype "
                        f"{' or '.join(str(d) for d in dtypes)}; got {got}")
    if device is not None and t.device != device:
        raise ValueError(f"rce_fast::{op}: {name} must be on {device} like the other "
                         f"tensors; got {got}")


def _check_fp32_scale(op: str, name: str, value: float) -> None:
    """A scale in [2**-126, float32 max]: it, or its inverse, is a float32 in the kernels."""
    if not (FP32_TINY <= value <= FP32_MAX):
        raise ValueError(f"rce_fast::{op}: {name} must be a finite number > 0 that float32 "
                         f"holds with its inverse (in [2**-126, 3.4e38]), got {value}")


def check_rce_op_args(op: str, logits, target, inv_temperature: float, lse=None,
                      grad_rows=None) -> None:
    """What the RCE kernels rely on: (N, L >= 2) floating logits; int64 (N,) target, (N,)
    lse in the accumulation dtype and (N,) floating grad_rows on the logits' device."""
    _check_op_tensor(op, "logits", logits, ndim=2, dtypes=_FLOATS)
    n, num_classes = logits.shape
    if num_classes < 2:
        raise ValueError(f"rce_fast::{op}: logits must have at least 2 classes, got "
                         f"{num_classes}")
    _check_op_tensor(op, "target", target, shape=(n,), dtypes=(torch.int64,),
                     device=logits.device)
    if lse is not None:
        _check_op_tensor(op, "lse", lse, shape=(n,),
                         dtypes=(_torch_impl.acc_dtype(logits.dtype),), device=logits.device)
    if grad_rows is not None:
        _check_op_tensor(op, "grad_rows", grad_rows, shape=(n,), dtypes=_FLOATS,
                         device=logits.device)
    _check_fp32_scale(op, "inv_temperature", inv_temperature)


def check_kdensity_op_args(op: str, q, q_offsets, bank, b_offsets, sigma2: float,
                           grad_lse=None, lse=None, values: bool = False) -> None:
    """(M, d) queries and (N, d) bank of one floating dtype and device; int64 offsets of one
    length on that device; (M,) grad_lse / lse. ``values``: also the offsets' values
    (:func:`check_kdensity_offsets`; real tensors only, not in a fake kernel)."""
    _check_op_tensor(op, "q", q, ndim=2, dtypes=_FLOATS)
    dev = q.device
    _check_op_tensor(op, "bank", bank, shape=(None, q.shape[1]), dtypes=(q.dtype,),
                     device=dev)
    _check_op_tensor(op, "b_offsets", b_offsets, ndim=1, dtypes=(torch.int64,), device=dev)
    if b_offsets.shape[0] < 2:
        raise ValueError(f"rce_fast::{op}: b_offsets must hold at least 2 class boundaries, "
                         f"got {b_offsets.shape[0]}")
    _check_op_tensor(op, "q_offsets", q_offsets, shape=(b_offsets.shape[0],),
                     dtypes=(torch.int64,), device=dev)
    for name, t in (("grad_lse", grad_lse), ("lse", lse)):
        if t is not None:
            _check_op_tensor(op, name, t, shape=(q.shape[0],), dtypes=_FLOATS, device=dev)
    _check_fp32_scale(op, "sigma2", sigma2)
    if values:
        check_kdensity_offsets(op, q_offsets, b_offsets, q.shape[0], bank.shape[0])


def check_kdensity_offsets(op: str, q_offsets: Tensor, b_offsets: Tensor, m: int,
                           n: int) -> None:
    """Offsets on the CPU (where reading them costs no device sync) must be class
    boundaries: from 0, non-decreasing, to M queries / N bank rows, and every class with
    queries must have bank rows. Offsets on a GPU are trusted (built on the device by
    ``rce_fast.kdensity``, with no host sync in an attack's inner loop)."""
    if q_offsets.device.type != "cpu":
        return
    qo, bo = q_offsets.tolist(), b_offsets.tolist()
    for name, v, total in (("q_offsets", qo, m), ("b_offsets", bo, n)):
        if v[0] != 0 or v[-1] != total or any(a > b for a, b in zip(v, v[1:])):
            raise ValueError(f"rce_fast::{op}: {name} must rise from 0 to {total} (the "
                             f"class boundaries of its {total} rows), got {v}")
    empty = [c for c in range(len(qo) - 1) if qo[c + 1] > qo[c] and bo[c + 1] == bo[c]]
    if empty:
        raise ValueError(f"rce_fast::{op}: class slot(s) {empty} have queries but no bank "
                         f"rows")


def check_jsma_op_args(op: str, alpha, beta, domain) -> None:
    """(B, n) floating alpha and beta and bool domain of one shape, on one device."""
    _check_op_tensor(op, "alpha", alpha, ndim=2, dtypes=_FLOATS)
    shape = tuple(alpha.shape)
    _check_op_tensor(op, "beta", beta, shape=shape, dtypes=_FLOATS, device=alpha.device)
    _check_op_tensor(op, "domain", domain, shape=shape, dtypes=(torch.bool,),
                     device=alpha.device)


# ----------------------------------------------------------------------------- RCE loss


def _triton_why_not(kernel_module: str, t: Tensor) -> str | None:
    """None when the Triton kernels of ``rce_fast.kernels.<kernel_module>`` can take ``t``."""
    why = _backend.triton_device_reason(t.device)
    if why is not None:
        return why
    import importlib
    k = importlib.import_module(f"rce_fast.kernels.{kernel_module}")
    if t.dtype not in k.SUPPORTED_DTYPES:
        return f"dtype {t.dtype} is not one of {k.SUPPORTED_DTYPES}"
    return None


def _rce_triton_why_not(logits: Tensor, **_) -> str | None:
    why = _triton_why_not("rce_loss", logits)
    if why is None:
        from rce_fast.kernels import rce_loss as k
        why = k.class_count_problem(logits.shape[1])
    return why


def _rce_triton_forward(*args):
    from rce_fast.kernels import rce_loss as k
    return k.rce_forward(*args)


def _rce_triton_backward(*args):
    from rce_fast.kernels import rce_loss as k
    return k.rce_backward(*args)


# ------------------------------------------------- CPU: fused C++ loss or PyTorch path
# Both compute the same loss and gradient (equal to within the tests' tolerance of the
# float64 reference, on every shape; the C++ loss gives the same bits on every x86 CPU).
# Which one is faster depends on the CPU (vector width, its exp, caches) and the shape,
# so it is measured, not set by thresholds tuned on one machine: the first call in a
# shape class times both (fwd + bwd on a synthetic input of that class, at most one
# PyTorch chunk, 1 MiB in fp32: a few milliseconds, once per class and process) and
# caches the faster. RCE_FAST_CPU_RCE_PATH = "compiled" / "torch" (or rce_cpu_path())
# skips the measurement and forces one; so does torch.use_deterministic_algorithms(True),
# which takes the C++ loss for its run-to-run and machine-to-machine identical bits.
_RCE_CPU_PATHS = ("measure", "compiled", "torch")
_rce_cpu_path = os.environ.get("RCE_FAST_CPU_RCE_PATH", "measure")
if _rce_cpu_path not in _RCE_CPU_PATHS:
    raise ValueError(f"RCE_FAST_CPU_RCE_PATH must be one of {_RCE_CPU_PATHS}, "
                     f"got {_rce_cpu_path!r}")
_RCE_CPU_CHOICE: dict[tuple, str] = {}
_RCE_MEASURE_ELEMS = _torch_impl.SMALL_ELEMS  # the synthetic input: at most one chunk
_RCE_MEASURE_ROUNDS = 5
# PyTorch must be this much faster to be chosen: timing noise then cannot flip a choice
# between two paths that are about as fast, and the C++ loss keeps its identical bits.
_RCE_TORCH_MARGIN = 0.9


def get_rce_cpu_path() -> str:
    """"measure" (default), "compiled" or "torch": how CPU RCE losses pick their path."""
    return _rce_cpu_path


def set_rce_cpu_path(mode: str) -> None:
    """Force the fused C++ loss ("compiled") or the PyTorch path ("torch") for CPU RCE
    losses under backend "auto", or go back to measuring ("measure"). The C++ loss is
    used only where it can run (extension built, float32/float64)."""
    global _rce_cpu_path
    if mode not in _RCE_CPU_PATHS:
        raise ValueError(f"mode must be one of {_RCE_CPU_PATHS}, got {mode!r}")
    _rce_cpu_path = mode


@contextlib.contextmanager
def rce_cpu_path(mode: str):
    """Context manager form of :func:`set_rce_cpu_path`."""
    previous = _rce_cpu_path
    set_rce_cpu_path(mode)
    try:
        yield
    finally:
        set_rce_cpu_path(previous)


def rce_cpu_choices() -> dict:
    """The measured choices of this process: {shape class: "compiled" or "torch"}."""
    return dict(_RCE_CPU_CHOICE)


def clear_rce_cpu_choices() -> None:
    """Forget the measured choices (the next call in each shape class measures again)."""
    _RCE_CPU_CHOICE.clear()


def _rce_shape_class(logits: Tensor) -> tuple:
    """(dtype, classes up to a power of 2, elements up to a power of 2 capped at the
    measured size, threads): the inputs whose relative speed one measurement predicts."""
    n, num_classes = logits.shape
    elems = min(n * num_classes, max(_RCE_MEASURE_ELEMS, num_classes))
    return (logits.dtype, num_classes.bit_length(), elems.bit_length(),
            torch.get_num_threads())


def _rce_torch_fwd_bwd(z, y):
    if z.numel() <= _torch_impl.SMALL_ELEMS:
        rows, logp, label, keep, _ = _torch_impl.rce_forward_small(z, y, -100, 1.0)
        return rows, _torch_impl.rce_backward_small(1.0 / len(z), logp, label, keep, z.dtype)
    rows, lse = _torch_impl.rce_forward(z, y, -100, 1.0)
    g = torch.full((len(z),), 1.0 / len(z), dtype=lse.dtype)
    return rows, _torch_impl.rce_backward(g, z, y, lse, -100, 1.0)


def _rce_compiled_fwd_bwd(z, y):
    rows, lse, _, _, _ = _rce_compiled_forward_stats(z, y, -100, 1.0)
    return rows, _rce_compiled_backward(None, z, y, lse, -100, 1.0, grad_scale=1.0 / len(z))


def _measure_rce_cpu(logits: Tensor) -> str:
    """Time both CPU paths, fwd + bwd, on a synthetic input like ``logits`` (same dtype
    and classes, as many rows as fit in one PyTorch chunk); "compiled" or "torch"."""
    n, num_classes = logits.shape
    rows = max(1, min(n, _RCE_MEASURE_ELEMS // num_classes))
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(rows, num_classes, generator=g) * 3).to(logits.dtype)
    y = torch.randint(0, num_classes, (rows,), generator=g)
    paths = {"compiled": _rce_compiled_fwd_bwd, "torch": _rce_torch_fwd_bwd}
    best = dict.fromkeys(paths, float("inf"))
    with torch.no_grad():
        for fn in paths.values():  # warm-up: first-call allocations, the extension's pages
            fn(z, y)
        for _ in range(_RCE_MEASURE_ROUNDS):  # interleaved, so load changes hit both
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn(z, y)
                best[name] = min(best[name], time.perf_counter() - t0)
    return "torch" if best["torch"] < _RCE_TORCH_MARGIN * best["compiled"] else "compiled"


def _rce_cpu_choice(logits: Tensor) -> str:
    if _rce_cpu_path != "measure":
        return _rce_cpu_path
    if torch.are_deterministic_algorithms_enabled():
        return "compiled"
    key = _rce_shape_class(logits)
    choice = _RCE_CPU_CHOICE.get(key)
    if choice is None:
        choice = _RCE_CPU_CHOICE[key] = _measure_rce_cpu(logits)
    return choice


def _rce_compiled_why_not(logits: Tensor, **_) -> str | None:
    if _backend.get_backend() != "auto":
        return f"backend {_backend.get_backend()!r} selected"
    module, why = _ext.load()
    if module is None:
        return why
    if logits.device.type != "cpu":
        return "the fused C++ loss is CPU-only"
    if logits.dtype not in (torch.float32, torch.float64):
        return f"dtype {logits.dtype} is not float32 / float64"
    if _rce_cpu_choice(logits) == "torch":
        how = "measured faster" if _rce_cpu_path == "measure" else "forced"
        return f"the PyTorch path is {how} for this shape class on this CPU"
    return None


def _rce_compiled_forward_stats(logits, target, ignore_index, inv_temperature):
    """(loss rows, lse, sum of losses, kept rows, first bad-label row or -1)."""
    module, _ = _ext.load()
    z = logits if logits.stride(1) == 1 else logits.contiguous()
    target = target.contiguous()
    n, num_classes = z.shape
    loss = torch.empty(n, dtype=z.dtype)
    lse = torch.empty(n, dtype=z.dtype)
    total, kept, bad = module.rce_forward_cpu(
        z.data_ptr(), target.data_ptr(), loss.data_ptr(), lse.data_ptr(), n, num_classes,
        z.stride(0), ignore_index, inv_temperature, z.dtype == torch.float64,
        torch.get_num_threads())
    return loss, lse, total, kept, bad


def _rce_compiled_forward(logits, target, ignore_index, inv_temperature):
    return _rce_compiled_forward_stats(logits, target, ignore_index, inv_temperature)[:2]


def _rce_compiled_backward(grad_rows, logits, target, lse, ignore_index, inv_temperature,
                           grad_scale: float = 1.0):
    """``grad_rows`` (N,) upstream gradients, or None for ``grad_scale`` on every row."""
    module, _ = _ext.load()
    z = logits if logits.stride(1) == 1 else logits.contiguous()
    target, lse = target.contiguous(), lse.contiguous()
    rows_ptr = 0
    if grad_rows is not None:
        grad_rows = grad_rows.to(z.dtype).contiguous()
        rows_ptr = grad_rows.data_ptr()
    grad = torch.empty(z.shape, dtype=z.dtype)
    module.rce_backward_cpu(rows_ptr, float(grad_scale), z.data_ptr(), target.data_ptr(),
                            lse.data_ptr(), grad.data_ptr(), z.shape[0], z.shape[1],
                            z.stride(0), ignore_index, inv_temperature,
                            z.dtype == torch.float64, torch.get_num_threads())
    return grad


_RCE_FORWARD = [
    _backend.Impl("triton", _rce_triton_why_not, _rce_triton_forward),
    _backend.Impl("compiled", _rce_compiled_why_not, _rce_compiled_forward),
    _backend.Impl("torch", lambda **_: None, _torch_impl.rce_forward),
]
_RCE_BACKWARD = [
    _backend.Impl("triton", _rce_triton_why_not, _rce_triton_backward),
    _backend.Impl("compiled", _rce_compiled_why_not, _rce_compiled_backward),
    _backend.Impl("torch", lambda **_: None, _torch_impl.rce_backward),
]


def host_sync_forbidden(t: Tensor) -> bool:
    """True while ``t``'s CUDA stream is being captured into a CUDA graph (under
    ``torch.compile(mode="reduce-overhead")`` or ``torch.cuda.graph``): no host
    synchronisation may happen then."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _bad_labels(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    return ((target < 0) | (target >= num_classes)) & (target != ignore_index)


def check_class_indices(target: Tensor, num_classes: int, ignore_index: int,
                        name: str = "target") -> None:
    """ValueError unless every entry is in [0, num_classes) or equals ``ignore_index``.

    During CUDA-graph capture the check would need a host sync, which capture forbids:
    it is skipped there, and every implementation instead returns NaN for the loss and
    the gradient of a row whose label is out of range (never a silently wrong number).
    Eager calls, and the warm-up run before a graph is captured, still raise.
    """
    if target.numel() == 0 or host_sync_forbidden(target):
        return
    bad = _bad_labels(target, num_classes, ignore_index)
    if bool(bad.any()):  # one host sync; cheaper than a device-side assert that kills the context
        first = target[bad][0].item()
        raise ValueError(
            f"{name} holds class index {first}, outside [0, {num_classes}) for logits with "
            f"{num_classes} classes (ignore_index={ignore_index} is also allowed)")


def rce_loss_forward_impl(logits: Tensor, target: Tensor, ignore_index: int,
                          inv_temperature: float) -> tuple[Tensor, Tensor]:
    """Checks label values, then runs the chosen forward implementation."""
    n, num_classes = logits.shape
    check_class_indices(target, num_classes, ignore_index)
    if n == 0:
        acc = _torch_impl.acc_dtype(logits.dtype)
        return logits.new_empty(0, dtype=acc), logits.new_empty(0, dtype=acc)
    impl = _backend.pick("rce_loss", _RCE_FORWARD, logits=logits)
    loss, lse = impl.run(logits, target, ignore_index, inv_temperature)
    if impl.name != "triton" and host_sync_forbidden(logits):  # the kernel does it itself
        loss = torch.where(_bad_labels(target, num_classes, ignore_index), float("nan"), loss)
    return loss, lse


def rce_loss_backward_impl(grad_rows: Tensor, logits: Tensor, target: Tensor, lse: Tensor,
                           ignore_index: int, inv_temperature: float) -> Tensor:
    if logits.shape[0] == 0:
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    impl = _backend.pick("rce_loss backward", _RCE_BACKWARD, logits=logits)
    # A row whose label is outside [0, L) (and not ignore_index) gets a NaN gradient in
    # every implementation: the forward raised for it (or, under graph capture, returned
    # NaN), and a direct call of the backward op must not write out of bounds.
    return impl.run(grad_rows.to(lse.dtype).contiguous(), logits, target, lse, ignore_index,
                    inv_temperature)


@torch.library.custom_op("rce_fast::rce_loss_forward", mutates_args=())
def rce_loss_forward(logits: Tensor, target: Tensor, ignore_index: int,
                     inv_temperature: float) -> tuple[Tensor, Tensor]:
    check_rce_op_args("rce_loss_forward", logits, target, inv_temperature)
    return rce_loss_forward_impl(logits, target, ignore_index, inv_temperature)


@rce_loss_forward.register_fake
def _(logits, target, ignore_index, inv_temperature):
    # The fake (and meta) kernels check too: a call mixing in a meta tensor is routed
    # here, and torch.compile then refuses mismatched tensors while tracing.
    check_rce_op_args("rce_loss_forward", logits, target, inv_temperature)
    acc = _torch_impl.acc_dtype(logits.dtype)
    n = logits.shape[0]
    return logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc)


@torch.library.custom_op("rce_fast::rce_loss_backward", mutates_args=())
def rce_loss_backward(grad_rows: Tensor, logits: Tensor, target: Tensor, lse: Tensor,
                      ignore_index: int, inv_temperature: float) -> Tensor:
    check_rce_op_args("rce_loss_backward", logits, target, inv_temperature, lse=lse,
                      grad_rows=grad_rows)
    return rce_loss_backward_impl(grad_rows, logits, target, lse, ignore_index,
                                  inv_temperature)


@rce_loss_backward.register_fake
def _(grad_rows, logits, target, lse, ignore_index, inv_temperature):
    check_rce_op_args("rce_loss_backward", logits, target, inv_temperature, lse=lse,
                      grad_rows=grad_rows)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def rce_grad_vjp(v: Tensor, logits: Tensor, target: Tensor, grad_rows: Tensor,
                 ignore_index: int, inv_temperature: float) -> tuple[Tensor, Tensor]:
    """Derivatives of <v, grad> for grad = (softmax(u) - R_y) * g / T, u = logits / T: the
    analytic second derivative of the RCE loss, for double backward (gradient penalties,
    meta-learning). Returns (d/d logits in the logits' dtype, d/d g (N,)).

        d<v, grad>/dZ_ik = g_i / T^2 * p_ik (v_ik - sum_j v_ij p_ij)
        d<v, grad>/dg_i  = (sum_j v_ij p_ij - mean_{j != y} v_ij) / T

    Written with differentiable torch ops (p from softmax of the logits, not from the saved
    log-sum-exp), so a third derivative works as well. Ignored rows give zeros.
    """
    acc = _torch_impl.acc_dtype(logits.dtype)
    num_classes = logits.shape[1]
    keep = target != ignore_index
    label = target.clamp(0, num_classes - 1).unsqueeze(1)
    p = torch.softmax(logits.to(acc) * inv_temperature, 1)
    vv = v.to(acc)
    vp = vv * p
    s = vp.sum(1, keepdim=True)
    g = torch.where(keep, grad_rows.to(acc), 0.0)
    d_logits = (vp - p * s) * (g * (inv_temperature * inv_temperature)).unsqueeze(1)
    v_off = (vv.sum(1) - vv.gather(1, label).squeeze(1)) / (num_classes - 1)
    d_rows = torch.where(keep, (s.squeeze(1) - v_off) * inv_temperature, 0.0)
    return d_logits.to(logits.dtype), d_rows.to(grad_rows.dtype)


def _rce_bwd_setup_context(ctx, inputs, output):
    grad_rows, logits, target, lse, ignore_index, inv_temperature = inputs
    ctx.save_for_backward(grad_rows, logits, target)
    ctx.ignore_index, ctx.inv_temperature = ignore_index, inv_temperature


def _rce_bwd_backward(ctx, v):
    grad_rows, logits, target = ctx.saved_tensors
    d_logits, d_rows = rce_grad_vjp(v, logits, target, grad_rows, ctx.ignore_index,
                                    ctx.inv_temperature)
    return (d_rows if ctx.needs_input_grad[0] else None,
            d_logits if ctx.needs_input_grad[1] else None, None, None, None, None)


rce_loss_backward.register_autograd(_rce_bwd_backward, setup_context=_rce_bwd_setup_context)


def _rce_setup_context(ctx, inputs, output):
    logits, target, ignore_index, inv_temperature = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, target, lse)
    ctx.ignore_index = ignore_index
    ctx.inv_temperature = inv_temperature


def _rce_backward(ctx, grad_rows, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.rce_fast.rce_loss_backward(
            grad_rows, logits, target, lse, ctx.ignore_index, ctx.inv_temperature)
    return grad, None, None, None


rce_loss_forward.register_autograd(_rce_backward, setup_context=_rce_setup_context)


class RCELossFunction(torch.autograd.Function):
    """Eager-mode twin of ``rce_fast::rce_loss_forward`` with the reduction folded in.

    The same implementations and kernels as the custom op, minus the custom-op wrapper's
    Python dispatch (about 120 us a call on CPU, measured) and minus the autograd nodes
    of a separate reduction: at the paper's batch shape (128, 10) those costs, not the
    arithmetic, decide the speed. Returns the reduced loss in the accumulation dtype.
    """

    @staticmethod
    def forward(ctx, logits, target, ignore_index, inv_temperature, reduction):
        n, num_classes = logits.shape
        ctx.mode, ctx.n, ctx.dtype = "general", n, logits.dtype
        ctx.ignore_index, ctx.inv_temperature, ctx.reduction = (ignore_index, inv_temperature,
                                                                reduction)
        if n > 0 and _rce_compiled_why_not(logits) is None:
            # Fused C++ loss: it also sums the losses, counts the kept rows and flags
            # labels out of range, so no further tensor op runs.
            rows, lse, total, kept, bad = _rce_compiled_forward_stats(
                logits, target, ignore_index, inv_temperature)
            if bad >= 0:
                check_class_indices(target, num_classes, ignore_index)  # raises, with detail
            ctx.mode, ctx.kept = "compiled", kept
            ctx.save_for_backward(None, logits, lse, target)
            if reduction == "none":
                return rows
            value = total if reduction == "sum" else (total / kept if kept else float("nan"))
            return torch.tensor(value, dtype=rows.dtype)
        small = (logits.device.type == "cpu" and _backend.get_backend() != "triton"
                 and logits.numel() <= _torch_impl.SMALL_ELEMS and n > 0)
        if small:
            rows, logp, label, keep, labels_ok = _torch_impl.rce_forward_small(
                logits, target, ignore_index, inv_temperature)
            if not bool(labels_ok):
                check_class_indices(target, num_classes, ignore_index)  # raises, with detail
            saved = (logits, None, target, logp, label, keep)
            ctx.mode = "small"
        else:
            rows, lse = rce_loss_forward_impl(logits, target, ignore_index, inv_temperature)
            keep = target != ignore_index if reduction == "mean" else None
            saved = (logits, lse, target)
        count = keep.sum() if reduction == "mean" else None
        if reduction == "none":
            out = rows
        elif reduction == "sum":
            out = rows.sum()
        else:
            out = rows.sum() / count  # no rows left -> nan, like cross_entropy
        ctx.save_for_backward(count, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable
            return RCELossFunction._differentiable_backward(ctx, grad_out)
        if ctx.mode == "compiled":
            _, logits, lse, target = ctx.saved_tensors
            if ctx.reduction == "none":
                grad = _rce_compiled_backward(grad_out, logits, target, lse, ctx.ignore_index,
                                              ctx.inv_temperature)
            else:
                scale = float(grad_out)
                if ctx.reduction == "mean":
                    scale = scale / ctx.kept if ctx.kept else float("nan")
                grad = _rce_compiled_backward(None, logits, target, lse, ctx.ignore_index,
                                              ctx.inv_temperature, grad_scale=scale)
            return grad, None, None, None, None
        count, *saved = ctx.saved_tensors
        if ctx.reduction == "mean":
            grad_out = grad_out / count
        if ctx.mode == "small":
            logp, label, keep = saved[3:]
            scale = grad_out * ctx.inv_temperature
            if ctx.reduction == "none":
                scale = scale.unsqueeze(1)
            return (_torch_impl.rce_backward_small(scale, logp, label, keep, ctx.dtype),
                    None, None, None, None)
        logits, lse, target = saved
        grad_rows = grad_out if ctx.reduction == "none" else grad_out.expand(ctx.n)
        grad = rce_loss_backward_impl(grad_rows, logits, target, lse, ctx.ignore_index,
                                      ctx.inv_temperature)
        return grad, None, None, None, None

    @staticmethod
    def _differentiable_backward(ctx, grad_out):
        """The gradient through the ``rce_fast::rce_loss_backward`` op, whose registered
        autograd (:func:`rce_grad_vjp`) makes it differentiable again."""
        count, logits, lse, target = ctx.saved_tensors[:4]
        if lse is None:  # the small / fused paths kept other statistics: recompute
            lse = torch.logsumexp(logits.detach().to(_torch_impl.acc_dtype(logits.dtype))
                                  * ctx.inv_temperature, 1)
        if ctx.reduction == "mean":
            if count is None:  # the fused C++ path counted the kept rows itself
                count = torch.tensor(float(ctx.kept), dtype=grad_out.dtype,
                                     device=grad_out.device)
            grad_out = grad_out / count
        grad_rows = grad_out if ctx.reduction == "none" else grad_out.expand(ctx.n)
        grad = torch.ops.rce_fast.rce_loss_backward(grad_rows, logits, target, lse,
                                                    ctx.ignore_index, ctx.inv_temperature)
        return grad, None, None, None, None


def rce_loss_reduced(logits: Tensor, target: Tensor, ignore_index: int, inv_temperature: float,
                     reduction: str) -> Tensor:
    """Reduced RCE loss (accumulation dtype) with autograd w.r.t. ``logits``.

    Under torch.compile / export it goes through the registered custom op (opaque to the
    compiler, with its fake and autograd registrations); in eager mode through
    :class:`RCELossFunction`. Both run the same implementations.
    """
    if torch.compiler.is_compiling():
        rows = torch.ops.rce_fast.rce_loss_forward(logits, target, ignore_index,
                                                   inv_temperature)[0]
        if reduction == "none":
            return rows
        if reduction == "sum":
            return rows.sum()
        return rows.sum() / (target != ignore_index).sum()
    return RCELossFunction.apply(logits, target, ignore_index, inv_temperature, reduction)


# ----------------------------------------------------------------------------- K-density


def _kd_triton_why_not(q: Tensor, **_) -> str | None:
    return _triton_why_not("kdensity", q)


def _kd_triton(name):
    def run(*args):
        from rce_fast.kernels import kdensity as k
        return getattr(k, name)(*args)
    return run


_KD_LSE = [_backend.Impl("triton", _kd_triton_why_not, _kd_triton("kdensity_lse")),
           _backend.Impl("torch", lambda **_: None, _torch_impl.kdensity_lse)]
_KD_GRAD = [_backend.Impl("triton", _kd_triton_why_not, _kd_triton("kdensity_grad")),
            _backend.Impl("torch", lambda **_: None, _torch_impl.kdensity_grad)]


@torch.library.custom_op("rce_fast::kdensity_lse", mutates_args=())
def kdensity_lse(q: Tensor, q_offsets: Tensor, bank: Tensor, b_offsets: Tensor,
                 sigma2: float) -> Tensor:
    check_kdensity_op_args("kdensity_lse", q, q_offsets, bank, b_offsets, sigma2,
                           values=True)
    if q.shape[0] == 0:
        return q.new_empty(0, dtype=_torch_impl.acc_dtype(q.dtype))
    impl = _backend.pick("kdensity", _KD_LSE, q=q)
    return impl.run(q, q_offsets, bank, b_offsets, sigma2).to(_torch_impl.acc_dtype(q.dtype))


@kdensity_lse.register_fake
def _(q, q_offsets, bank, b_offsets, sigma2):
    check_kdensity_op_args("kdensity_lse", q, q_offsets, bank, b_offsets, sigma2)
    return q.new_empty(q.shape[0], dtype=_torch_impl.acc_dtype(q.dtype))


@torch.library.custom_op("rce_fast::kdensity_grad", mutates_args=())
def kdensity_grad(grad_lse: Tensor, q: Tensor, q_offsets: Tensor, bank: Tensor,
                  b_offsets: Tensor, lse: Tensor, sigma2: float) -> Tensor:
    check_kdensity_op_args("kdensity_grad", q, q_offsets, bank, b_offsets, sigma2,
                           grad_lse=grad_lse, lse=lse, values=True)
    if q.shape[0] == 0:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    impl = _backend.pick("kdensity backward", _KD_GRAD, q=q)
    return impl.run(grad_lse, q, q_offsets, bank, b_offsets, lse, sigma2)


@kdensity_grad.register_fake
def _(grad_lse, q, q_offsets, bank, b_offsets, lse, sigma2):
    check_kdensity_op_args("kdensity_grad", q, q_offsets, bank, b_offsets, sigma2,
                           grad_lse=grad_lse, lse=lse)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("rce_fast::kdensity_bank_grad", mutates_args=())
def kdensity_bank_grad(grad_lse: Tensor, q: Tensor, q_offsets: Tensor, bank: Tensor,
                       b_offsets: Tensor, lse: Tensor, sigma2: float) -> Tensor:
    """Gradient of sum_i grad_lse[i] * lse_i w.r.t. the bank (PyTorch, blocked, any device)."""
    check_kdensity_op_args("kdensity_bank_grad", q, q_offsets, bank, b_offsets, sigma2,
                           grad_lse=grad_lse, lse=lse, values=True)
    return _torch_impl.kdensity_bank_grad(grad_lse, q, q_offsets, bank, b_offsets, lse,
                                          sigma2)


@kdensity_bank_grad.register_fake
def _(grad_lse, q, q_offsets, bank, b_offsets, lse, sigma2):
    check_kdensity_op_args("kdensity_bank_grad", q, q_offsets, bank, b_offsets, sigma2,
                           grad_lse=grad_lse, lse=lse)
    return torch.empty_like(bank, memory_format=torch.contiguous_format)


def _kd_setup_context(ctx, inputs, output):
    q, q_offsets, bank, b_offsets, sigma2 = inputs
    ctx.save_for_backward(q, q_offsets, bank, b_offsets, output)
    ctx.sigma2 = sigma2


def _kd_backward(ctx, grad_lse):
    q, q_offsets, bank, b_offsets, lse = ctx.saved_tensors
    grad = grad_bank = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.rce_fast.kdensity_grad(grad_lse, q, q_offsets, bank, b_offsets, lse,
                                                ctx.sigma2)
    if ctx.needs_input_grad[2]:  # kernel points that are learned
        grad_bank = torch.ops.rce_fast.kdensity_bank_grad(grad_lse, q, q_offsets, bank,
                                                          b_offsets, lse, ctx.sigma2)
    return grad, None, grad_bank, None, None


kdensity_lse.register_autograd(_kd_backward, setup_context=_kd_setup_context)


# ---------------------------------------------------------------------- JSMA pair search


def _jsma_compiled_why_not(alpha: Tensor, **_) -> str | None:
    if _backend.get_backend() == "torch":
        return "backend 'torch' selected"
    module, why = _ext.load()
    if module is None:
        return why
    if alpha.device.type == "cuda":
        if not module.with_cuda:
            return "rce_fast._C was built without CUDA (no CUDA compiler at build time)"
        return _jsma_cuda_probe(module, alpha.device.index
                                if alpha.device.index is not None
                                else torch.cuda.current_device())
    if alpha.device.type != "cpu":
        return f"device type {alpha.device.type!r} is not supported"
    return None


_JSMA_CUDA_PROBED: dict[int, str | None] = {}


def _jsma_cuda_probe(module, index: int) -> str | None:
    """Can the extension's CUDA kernels run on device ``index``? A driver older than the
    CUDA runtime built in, or a GPU architecture the build has neither SASS nor PTX for,
    would fail at the first launch; the probe makes that a fallback to PyTorch with a
    warning that says why. It runs on torch's current device for ``index`` (the one the
    launch would use) and is kept for the process only when the answer is a property of
    the build, driver and device."""
    if index in _JSMA_CUDA_PROBED:
        return _JSMA_CUDA_PROBED[index]
    with torch.cuda.device(index):
        why, permanent = module.jsma_cuda_probe()
    why = why or None
    if permanent:
        _JSMA_CUDA_PROBED[index] = why
    return why


_MAX_CUDA_BATCH = 65535  # grid.y limit of the CUDA kernel


def _jsma_compiled(alpha: Tensor, beta: Tensor, domain: Tensor, increase: bool) -> Tensor:
    module, _ = _ext.load()
    alpha = alpha.to(torch.float32).contiguous()
    beta = beta.to(torch.float32).contiguous()
    dom = domain.to(torch.bool).contiguous().view(torch.uint8)
    batch, n = alpha.shape
    out = torch.empty((batch, 2), dtype=torch.int64, device=alpha.device)
    if alpha.device.type == "cpu":
        module.jsma_pairs_cpu(alpha.data_ptr(), beta.data_ptr(), dom.data_ptr(),
                              out.data_ptr(), batch, n, bool(increase), torch.get_num_threads())
        return out
    blocks = module.jsma_cuda_blocks_per_image(n)
    with torch.cuda.device(alpha.device):
        stream = torch.cuda.current_stream(alpha.device).cuda_stream
        for b0 in range(0, batch, _MAX_CUDA_BATCH):
            b1 = min(batch, b0 + _MAX_CUDA_BATCH)
            ws_score = torch.empty((b1 - b0) * blocks, dtype=torch.float32, device=alpha.device)
            ws_pair = torch.empty((b1 - b0) * blocks * 2, dtype=torch.int64, device=alpha.device)
            module.jsma_pairs_cuda(alpha[b0:b1].data_ptr(), beta[b0:b1].data_ptr(),
                                   dom[b0:b1].data_ptr(), out[b0:b1].data_ptr(),
                                   ws_score.data_ptr(), ws_pair.data_ptr(), b1 - b0, n,
                                   bool(increase), stream)
    return out


def _jsma_torch(alpha, beta, domain, increase):
    if _backend.get_backend() != "torch":
        _ext.warn_fallback("jsma_pairs", _jsma_compiled_why_not(alpha))
    return _torch_impl.jsma_pairs(alpha.float(), beta.float(), domain.bool(), increase)


_JSMA = [_backend.Impl("compiled", _jsma_compiled_why_not, _jsma_compiled),
         _backend.Impl("torch", lambda **_: None, _jsma_torch)]


@torch.library.custom_op("rce_fast::jsma_pairs", mutates_args=())
def jsma_pairs(alpha: Tensor, beta: Tensor, domain: Tensor, increase: bool) -> Tensor:
    check_jsma_op_args("jsma_pairs", alpha, beta, domain)
    if alpha.shape[0] == 0 or alpha.shape[1] < 2:  # no pair: (-1, -1) on every row
        return torch.full((alpha.shape[0], 2), -1, dtype=torch.int64, device=alpha.device)
    impl = _backend.pick("jsma_pairs", _JSMA, alpha=alpha)
    return impl.run(alpha, beta, domain, increase)


@jsma_pairs.register_fake
def _(alpha, beta, domain, increase):
    check_jsma_op_args("jsma_pairs", alpha, beta, domain)
    return alpha.new_empty((alpha.shape[0], 2), dtype=torch.int64)
