"""Argument checks shared across the package: one place, one wording.

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong value,
shape or device) with a message that starts with the argument's name.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor


def check_has_data(t: Tensor, name: str) -> None:
    """ValueError for a tensor on the ``meta`` device (it has a shape but no values)."""
    if t.is_meta:
        raise ValueError(f"{name} is on the meta device (a tensor with no data); pass a "
                         "tensor on cpu or cuda")


def move_to(t: Tensor, device: torch.device, name: str) -> Tensor:
    """``t`` on ``device`` (a copy when it is elsewhere); ValueError naming ``name`` when
    it cannot be moved (a meta tensor)."""
    if t.device == device:
        return t
    check_has_data(t, name)
    return t.to(device)


#: Seeds are ints in [0, SEED_LIMIT): what every generator used here takes (torch's up
#: to 2**64, NumPy's only >= 0), with room for the seed + 1 some use. scikit-learn's
#: random_state (< 2**32) gets a 32-bit word derived from the seed (sklearn_seed).
SEED_LIMIT = 2 ** 63 - 1


def check_seed(seed, name: str = "seed") -> int:
    """An int seed in [0, 2**63 - 1) (None is not accepted here; callers that allow it
    check first)."""
    seed = scalar(seed)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**63 - 1), got {seed}")
    return int(seed)


def sklearn_seed(seed: int) -> int:
    """``seed`` as scikit-learn's ``random_state`` takes it (< 2**32): itself when it fits
    (so results for the usual small seeds stay as they were), else a 32-bit word derived
    from all of its bits by NumPy's SeedSequence (distinct seeds stay distinct in
    practice, and the result is deterministic)."""
    seed = int(seed)
    if 0 <= seed < 2 ** 32:
        return seed
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


#: The smallest normal float32 (2**-126) and the largest finite one: a scale whose value
#: or inverse reaches a float32 kernel must lie between them, or the kernel computes with
#: 0 or inf and returns NaN.
FP32_TINY = 2.0 ** -126
FP32_MAX = 3.4028234663852886e38


def scalar(value):
    """A 0-d torch tensor or NumPy array as the Python number it holds (``.item()``: a
    bool stays a bool, so checks refusing bools still do); anything else unchanged. Lets
    ``eps=torch.tensor(0.3)`` or ``fpr=np.array(0.05)`` pass the number checks."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, Tensor) and value.ndim == 0 and value.device.type != "meta":
        if value.requires_grad:
            raise TypeError("a number given as a tensor that requires grad would be used as "
                            "a constant (no gradient reaches it): pass a float, or detach "
                            "it if that is what you mean")
        return value.item()  # (a meta tensor holds no number: left to the type checks)
    return value


def check_int(value, name: str, minimum: int) -> int:
    """An int (not a bool) >= ``minimum`` (ValueError otherwise, also for a float or a
    string: every count and size check of the package words it so)."""
    value = scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_clip(clip) -> tuple[float, float]:
    """A (min, max) pair of finite numbers with min < max."""
    try:
        lo, hi = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise TypeError(f"clip must be a (min, max) pair of numbers, got {clip!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"clip must be finite with min < max, got {clip!r}")
    return lo, hi


def check_real(value, name: str, allow_inf: bool = True) -> float:
    """A real number, not NaN (infinities allowed unless ``allow_inf`` is False)."""
    value = scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (not allow_inf and math.isinf(value)):
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number, got "
                         f"{value}")
    return value


def check_device(device, name: str = "device") -> torch.device:
    """A ``torch.device`` that exists on this machine: ValueError naming ``name`` for a
    string that is no device ('foo') or a device that is not there ('cuda' without a
    GPU, 'cuda:7' on a machine with fewer GPUs); TypeError for other types."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(f"{name} {device!r} is not a device (expected cpu, cuda or "
                             "cuda:N)") from None
    elif isinstance(device, int) and not isinstance(device, bool):
        dev = torch.device("cuda", device)
    else:
        raise TypeError(f"{name} must be a torch.device or a string such as 'cpu' or "
                        f"'cuda:0', got {type(device).__name__}")
    if dev.type == "meta":
        raise ValueError(f"{name} {str(dev)!r}: the meta device holds no data")
    if dev.type not in ("cpu", "cuda"):  # mps, xpu, xla, ...: one line, not torch's error
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        try:
            ok = bool(available()) if callable(available) else False
        except Exception:  # a backend that cannot even say
            ok = False
        if not ok:
            raise ValueError(f"{name} {str(dev)!r}: this PyTorch has no {dev.type} device "
                             "available (expected cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {str(dev)!r}: no CUDA device is available")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{name} {str(dev)!r}: there {'is' if count == 1 else 'are'} "
                             f"only {count} CUDA device{'' if count == 1 else 's'}")
    return dev
