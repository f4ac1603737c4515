"""Reverse cross-entropy (RCE) training loss and the matching inference helpers.

RCE (Pang et al., NeurIPS 2018) trains on the cross-entropy between the *reverse*
label vector R_y (0 at the true class y, 1/(L-1) elsewhere) and softmax(Z / T):

    loss = logsumexp(Z / T) - mean_{j != y} Z_j / T

At test time an RCE model is read through its NEGATED logits: the decision logits
are -Z and the prediction is argmin Z (see :func:`rce_decision_logits`).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from . import ops
from ._args import FP32_TINY, check_has_data, scalar

_REDUCTIONS = ("none", "mean", "sum")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_args(logits, target, reduction, ignore_index, temperature) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got "
                        f"{type(target).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got "
                        f"{logits.dtype}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices (int64), got "
                        f"{target.dtype}; RCE builds its own reverse label vectors")
    check_has_data(logits, "logits")
    check_has_data(target, "target")
    if logits.device != target.device:
        raise ValueError(f"logits is on {logits.device} but target is on {target.device}; "
                         "put both on the same device")
    if logits.dim() == 0:
        raise ValueError("logits must have shape (N, L), (L,) or (N, L, d1, ...), got a scalar")
    if logits.dim() == 1:
        expected = ()
    else:
        expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"target must have shape {expected} for logits of shape "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    num_classes = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"logits must have at least 2 classes (dimension "
                         f"{0 if logits.dim() == 1 else 1}), got {num_classes}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_ignore_index(ignore_index)
    _check_temperature(temperature)


def _check_ignore_index(ignore_index) -> int:
    ignore_index = scalar(ignore_index)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2 ** 63 <= ignore_index < 2 ** 63:
        raise ValueError(f"ignore_index must fit in int64 (targets are int64), got "
                         f"{ignore_index}")
    return int(ignore_index)


def _check_temperature(temperature) -> float:
    temperature = scalar(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive float, got "
                        f"{type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not FP32_TINY <= temperature <= 1 / FP32_TINY:
        raise ValueError(f"temperature must be in [2**-126, 2**126] (1/temperature scales "
                         f"the logits in float32), got {temperature}")
    return float(temperature)


def rce_loss(logits: Tensor, target: Tensor, reduction: str = "mean",
             ignore_index: int = -100, temperature: float = 1.0) -> Tensor:
    """Reverse cross-entropy loss, a drop-in for ``F.cross_entropy`` in an RCE training loop.

    Args:
        logits: (N, L) raw (pre-softmax) logits Z, float16/bfloat16/float32/float64; also
            (L,) for one sample, or (N, L, d1, ...) like ``cross_entropy``. L >= 2.
        target: integer class indices, shape (N,) (or () / (N, d1, ...)), values in
            [0, L) or equal to ``ignore_index``.
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"``.
        ignore_index: rows with this target contribute 0 loss and 0 gradient.
        temperature: T > 0; the loss is computed on Z / T (the RCE authors suggest T > 1
            when there are many classes).

    Returns:
        The loss in the logits' dtype: a scalar, or the target's shape for ``"none"``.
        Computed in float32 (float64 for float64 logits). On CUDA a fused Triton kernel
        computes it and its gradient; on CPU a cache-blocked PyTorch path.

    Raises:
        TypeError / ValueError naming the offending argument, before any kernel runs.
    """
    _check_args(logits, target, reduction, ignore_index, temperature)
    out_shape = target.shape
    if logits.dim() == 1:
        z2, t1 = logits.unsqueeze(0), target.reshape(1)
    elif logits.dim() == 2:
        z2, t1 = logits, target
    else:
        z2, t1 = logits.movedim(1, -1).reshape(-1, logits.shape[1]), target.reshape(-1)
    if t1.dtype != torch.int64:
        t1 = t1.long()
    out = ops.rce_loss_reduced(z2, t1, int(ignore_index), 1.0 / float(temperature), reduction)
    if reduction == "none":
        out = out.reshape(out_shape)
    return out.to(logits.dtype)


class RCELoss(nn.Module):
    """``nn.Module`` form of :func:`rce_loss` (same arguments, same semantics)."""

    def __init__(self, reduction: str = "mean", ignore_index: int = -100,
                 temperature: float = 1.0) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.temperature = _check_temperature(temperature)
        self.ignore_index = _check_ignore_index(ignore_index)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return rce_loss(logits, target, self.reduction, self.ignore_index, self.temperature)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"temperature={self.temperature}")


def rce_decision_logits(logits: Tensor) -> Tensor:
    """Decision logits of an RCE-trained model: -Z (softmax of these gives its probabilities)."""
    return -logits


def rce_predict(logits: Tensor) -> Tensor:
    """Predicted class of an RCE-trained model, argmin_j Z_j over the last dimension."""
    return torch.argmin(logits, dim=-1)


def decision_logits(logits: Tensor, objective: str) -> Tensor:
    """Decision logits for a model trained with ``objective`` "ce" (Z) or "rce" (-Z)."""
    if objective == "ce":
        return logits
    if objective == "rce":
        return -logits
    raise ValueError(f"objective must be 'ce' or 'rce', got {objective!r}")
