"""Shared pieces of the attacks: argument checks, targets, per-example diagnostics.

Every attack takes a module returning DECISION logits (Z for a CE model, -Z for an RCE
model: see rce_fast.models' classifier wrapper), works on whole batches on any device,
clips to the input box and returns the adversarial batch with the same shape, dtype
and device as the input. Pass ``return_info=True`` for ``(x_adv, AttackInfo)``.
Attacks run the model in eval mode (batch-norm uses, and never updates, its running
statistics; dropout is off) and restore every module's train/eval flag afterwards: the
model, its parameters and its buffers are left exactly as they were.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from .._args import (check_clip, check_has_data, check_int, check_seed, scalar,  # noqa: F401
                     move_to)  # (check_clip, check_int: re-exported for the attacks)
from .._modes import model_in_eval_mode
from .._torch_impl import all_finite


@dataclass
class AttackInfo:
    """Per-example diagnostics of an attack (tensors of shape (B,) on the input's device)."""
    success: Tensor
    target: Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __getattr__(self, name):
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(name)

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out


def check_images(x, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be a batch of shape (B, ...), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    check_has_data(x, name)
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or inf values")


def check_positive(value, name: str, allow_zero: bool = False) -> float:
    value = scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, "
                         f"got {value}")
    return float(value)


def check_start(init, x: Tensor, name: str = "init") -> None:
    """A starting point for ``x``: a finite floating tensor of x's shape on x's device."""
    if not isinstance(init, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor like x, got {type(init).__name__}")
    if not init.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {init.dtype}")
    if init.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got "
                         f"{tuple(init.shape)}")
    if init.device != x.device:
        raise ValueError(f"{name} is on {init.device}, expected {x.device} like x")
    if not all_finite(init):
        raise ValueError(f"{name} contains NaN or inf values")


def generator_for(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else check_seed(seed))
    return g


def resolve_target(target, logits: Tensor, seed: int | None = 0, name: str = "target") -> Tensor:
    """LongTensor (B,) of target classes from a tensor, "least_likely" or "random".

    "least_likely": argmin of the clean decision logits. "random": uniform over the
    classes other than the clean prediction (seeded, so reproducible).
    """
    batch, num_classes = logits.shape
    if isinstance(target, str):
        if target in ("least_likely", "random") and num_classes < 2:
            raise ValueError(f"{name}={target!r} needs a model with at least 2 classes (a "
                             f"class other than the prediction), got {num_classes}")
        if target == "least_likely":
            return logits.argmin(1)
        if target == "random":
            g = generator_for(seed, "cpu")
            pred = logits.argmax(1).cpu()
            offset = torch.randint(1, num_classes, (batch,), generator=g)
            return ((pred + offset) % num_classes).to(logits.device)
        raise ValueError(f"{name} must be a LongTensor, 'least_likely' or 'random', got "
                         f"{target!r}")
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a LongTensor, 'least_likely' or 'random', got "
                        f"{type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got {target.dtype}")
    if tuple(target.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(target.shape)}")
    target = move_to(target, logits.device, name).long()
    if bool(((target < 0) | (target >= num_classes)).any()):
        raise ValueError(f"{name} holds classes outside [0, {num_classes})")
    return target


def first_call(fn, x: Tensor, *args):
    """``fn(x, *args)`` for the first model call of an attack: an error the model raises
    on these inputs (inputs of another image size or layout, another dtype or device than
    the model's) becomes a ValueError naming ``x`` and the model, not a raw torch error
    from deep inside the network. Later calls see inputs of the same shape, dtype and
    device, so they are not wrapped (out of memory is never wrapped)."""
    try:
        return fn(x, *args)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"the model cannot run on x (shape {tuple(x.shape)}, {x.dtype}, "
                         f"{x.device}): {type(exc).__name__}: {first[:300]}") from exc


def decision_logits(model, x: Tensor, first: bool = False) -> Tensor:
    out = first_call(model, x) if first else model(x)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ValueError("model must return decision logits of shape (B, L); got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    return out


def preserves_model_state(attack):
    """Decorator for attacks taking the model first: run it under :func:`model_in_eval_mode`."""
    @functools.wraps(attack)
    def run(model, *args, **kwargs):
        if not callable(model):
            raise TypeError(f"model must be a module (or callable) returning decision "
                            f"logits (B, L), got {type(model).__name__}")
        with model_in_eval_mode(model):
            return attack(model, *args, **kwargs)
    return run
