"""Argument checks shared by the detection modules (one place, clear messages)."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .._args import FP32_MAX, FP32_TINY, check_has_data, scalar
from .._torch_impl import all_finite

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_features(x, name: str, dim: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (rows, D), got {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has feature size {x.shape[1]}, expected {dim} (the bank's)")
    check_has_data(x, name)
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or inf values")


def _check_labels(y, name: str, rows: int, device) -> None:
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got "
                        f"{type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class indices, got {y.dtype}")
    if tuple(y.shape) != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"{name} is on {y.device}, expected {device} like the features")
    check_has_data(y, name)
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name} holds a negative class index ({int(y.min())})")


def _check_sigma2(sigma2) -> float:
    sigma2 = scalar(sigma2)
    if isinstance(sigma2, bool) or not isinstance(sigma2, numbers.Real):
        raise TypeError(f"sigma2 must be a positive float, got {type(sigma2).__name__}")
    if not (math.isfinite(sigma2) and sigma2 > 0):
        raise ValueError(f"sigma2 must be a finite number > 0, got {sigma2}")
    if not FP32_TINY <= sigma2 <= FP32_MAX:
        raise ValueError(f"sigma2 must be in [2**-126, 3.4e38] (1/sigma2 scales the squared "
                         f"distances in float32), got {sigma2}")
    return float(sigma2)

