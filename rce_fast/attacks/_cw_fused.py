"""The fused CPU update step of C&W (``rce_fast._C.cw_update_cpu``) and its PyTorch twin.

After the model's input gradient ``g`` = d(model term)/dx' is known, one C&W iteration
still has to: chain the gradient through the distance term and the tanh box, run Adam
on w, keep the best example so far, and form the next iterate and its distance. As
tensor ops that is about ten passes over the batch and twenty small kernels; on a CPU
with a small model they cost as much as the model itself. The compiled step does it in
one pass (csrc/cw_cpu.cpp). :func:`torch_update` is the same maths as tensor ops: the
path for GPUs (and where the extension is missing), and the reference of the tests.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _backend, _ext

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8   # torch.optim.Adam's defaults, as Carlini's code


def fused_available(w: Tensor) -> bool:
    """The compiled step can run on ``w`` (CPU float32, extension built, backend not
    forced to 'torch')."""
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return False
    if _backend.get_backend() == "torch":
        return False
    module, _ = _ext.load()
    return module is not None and hasattr(module, "cw_update_cpu")


def _bias_terms(step: int, lr: float) -> tuple[float, float]:
    bc1 = 1.0 - BETA1 ** step
    bc2 = 1.0 - BETA2 ** step
    return lr / bc1, 1.0 / math.sqrt(bc2)


def fused_update(g: Tensor, w: Tensor, m: Tensor, v: Tensor, t: Tensor, xp: Tensor,
                 x: Tensor, best: Tensor, improved: Tensor, step: int, lr: float,
                 half: float, mid: float, l2: Tensor, isa: int | None = None) -> None:
    """The compiled step, in place on w, m, v, t, xp, best and l2 (see csrc/cw.h).

    ``step`` is Adam's step count AFTER this update (1 on the first); every image buffer
    is (B, n) float32 contiguous, ``improved`` (B,) bool, ``l2`` (B,) float32. ``isa``
    picks a compiled copy (tests; default: the best this CPU runs)."""
    module, _ = _ext.load()
    step_size, inv_sqrt_bc2 = _bias_terms(step, lr)
    batch = w.shape[0]
    n = w.numel() // max(batch, 1)
    imp = improved.contiguous().view(torch.uint8)
    module.cw_update_cpu(g.data_ptr(), w.data_ptr(), m.data_ptr(), v.data_ptr(),
                         t.data_ptr(), xp.data_ptr(), x.data_ptr(), best.data_ptr(),
                         imp.data_ptr(), l2.data_ptr(), batch, n, lr, BETA1, BETA2, EPS,
                         step_size, inv_sqrt_bc2, half, mid, torch.get_num_threads(),
                         module.ISA_AUTO if isa is None else isa)


def fused_iterate(w: Tensor, x: Tensor, half: float, mid: float):
    """(t, xp, l2) of the iterate at ``w`` as the compiled step computes them: its tanh,
    x' = t * half + mid and its distance sum. A step that starts (or continues after a
    resume) from ``w`` must see the same bits the compiled step would have left, or a
    resumed C&W would not repeat an uninterrupted one. Runs the compiled step with a zero
    step size on scratch moments and a zero gradient: w is left exactly as it is."""
    module, _ = _ext.load()
    w = w.contiguous()
    batch = w.shape[0]
    n = w.numel() // max(batch, 1)
    # the step reads the old t and x' (for a gradient that the zero step size discards):
    # zeros keep every intermediate finite, so w - 0 * update is w exactly
    t, xp = torch.zeros_like(w), torch.zeros_like(w)
    l2 = torch.empty(batch, dtype=torch.float32, device=w.device)
    zeros = torch.zeros_like(w)
    scratch_m, scratch_v, scratch_best = (torch.zeros_like(w), torch.zeros_like(w),
                                          torch.empty_like(w))
    none = torch.zeros(batch, dtype=torch.uint8)
    module.cw_update_cpu(zeros.data_ptr(), w.data_ptr(), scratch_m.data_ptr(),
                         scratch_v.data_ptr(), t.data_ptr(), xp.data_ptr(), x.data_ptr(),
                         scratch_best.data_ptr(), none.data_ptr(), l2.data_ptr(), batch, n,
                         0.0, BETA1, BETA2, EPS, 0.0, 1.0, half, mid,
                         torch.get_num_threads(), module.ISA_AUTO)
    return t, xp, l2


def torch_update(g: Tensor, w: Tensor, m: Tensor, v: Tensor, t: Tensor, xp: Tensor,
                 x: Tensor, best: Tensor, improved: Tensor, step: int, lr: float,
                 half: float, mid: float, l2: Tensor) -> None:
    """:func:`fused_update` as tensor ops (any device), in place on the same buffers."""
    view = (-1,) + (1,) * (w.dim() - 1)
    gw = g + 2.0 * (xp - x)
    gw = gw - (gw * t) * t
    gw = gw * half
    m.mul_(BETA1).add_(gw, alpha=1.0 - BETA1)
    v.mul_(BETA2).addcmul_(gw, gw, value=1.0 - BETA2)
    step_size, inv_sqrt_bc2 = _bias_terms(step, lr)
    w.sub_(step_size * (m / (v.sqrt() * inv_sqrt_bc2 + EPS)))
    best.copy_(torch.where(improved.view(view), xp, best))
    torch.tanh(w, out=t)
    torch.add(t * half, mid, out=xp)
    d = (xp - x).flatten(1)
    torch.linalg.vecdot(d, d, out=l2)
