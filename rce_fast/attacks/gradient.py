"""FGSM, BIM, ILCM and RAND noise (the paper's cheap attacks), batched.

Labels default to the model's own prediction on the clean input, computed once; ILCM's
least-likely class is likewise fixed from the clean input. ``eps`` may be a number or a
sequence of numbers: a sweep runs as one call (FGSM reuses its single gradient; BIM and
ILCM stack the sweep into one batch so every step is one model call) and returns a
tensor of shape (E, B, ...).
"""
from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import Tensor

from .. import _torch_impl
from .._args import move_to, scalar
from ._common import (AttackInfo, check_clip, check_images, check_int, check_positive,
                      decision_logits, generator_for, preserves_model_state, resolve_target)


def _eps_list(eps) -> tuple[list[float], bool]:
    """(values, is_sweep); every value finite and >= 0."""
    eps = scalar(eps)
    if isinstance(eps, (Tensor, np.ndarray)):
        if isinstance(eps, Tensor) and (eps.device.type == "meta" or eps.requires_grad):
            raise TypeError("eps must hold numbers (not a meta tensor or one that requires "
                            "grad)")
        eps = eps.tolist()  # a 0-d array gives its number, a 1-d one a list
    sweep = not isinstance(eps, numbers.Real)
    if sweep and (isinstance(eps, (str, bytes, set, frozenset, dict)) or
                  not hasattr(eps, "__iter__")):
        raise TypeError(f"eps must be a number >= 0 or a sequence of them (ordered: the "
                        f"sweep's order is the output's), got {type(eps).__name__}")
    values = list(eps) if sweep else [eps]
    if sweep and len(values) == 0:
        raise ValueError("eps sweep is empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0 <= v < float("inf")):
            raise ValueError(f"eps must be a finite number >= 0 (or a sequence of them), "
                             f"got {eps!r}")
    return [float(v) for v in values], sweep


def _labels(model, x: Tensor, labels) -> Tensor:
    """The model's clean prediction, or the user's labels (checked for shape and dtype
    here; their range is checked against the logits of the first gradient step, so given
    labels cost no extra forward pass)."""
    if labels is None:
        with torch.no_grad():
            return decision_logits(model, x, first=True).argmax(1)
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or \
            labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor of class indices")
    if tuple(labels.shape) != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    return move_to(labels, x.device, "labels").long()


def _ce_grad_sign(model, x: Tensor, y: Tensor, check: bool = False) -> Tensor:
    """sign of grad_x CE(model(x), y); only x's gradient is computed (parameter gradients
    are skipped even when the parameters require grad)."""
    x = x.detach().requires_grad_(True)
    z = decision_logits(model, x, first=check)
    if check:
        lo, hi = (int(v) for v in torch.aminmax(y))
        if lo < 0 or hi >= z.shape[1]:
            raise ValueError(f"labels holds classes outside [0, {z.shape[1]})")
    loss = _torch_impl.cross_entropy(z.float(), y, "sum")  # no exp underflow slow path
    (g,) = torch.autograd.grad(loss, x)
    return g.sign()


def _finish(x_adv: Tensor, x: Tensor, sweep: bool, n_eps: int, model, y: Tensor,
            targeted: bool, return_info: bool):
    batch = x.shape[0]
    out = x_adv.reshape(n_eps, *x.shape) if sweep else x_adv.reshape(x.shape)
    if not return_info:
        return out
    with torch.no_grad():
        pred = decision_logits(model, x_adv).argmax(1).reshape(n_eps, batch)
    yy = y.reshape(1, batch)
    success = (pred == yy) if targeted else (pred != yy)
    linf = (x_adv.reshape(n_eps, batch, -1) - x.reshape(1, batch, -1)).abs().amax(-1)
    if not sweep:
        success, linf, pred = success[0], linf[0], pred[0]
    key = "target" if targeted else "labels"
    return out, AttackInfo(success=success, target=y if targeted else None,
                           extra={key: y, "prediction": pred, "linf": linf})


@preserves_model_state
def fgsm(model, x: Tensor, eps, labels=None, clip=(-0.5, 0.5), return_info: bool = False):
    """Fast gradient sign method: x + eps * sign(grad_x CE(model(x), labels)), clipped.

    Args:
        model: module returning decision logits (B, L).
        x: (B, ...) inputs. eps: a number or a sweep (sequence) of numbers >= 0.
        labels: true labels (B,); default the model's prediction on ``x``.
        return_info: also return AttackInfo (``success`` = prediction changed from the
            labels, ``prediction``, ``linf``).
    """
    check_images(x)
    lo, hi = check_clip(clip)
    eps_values, sweep = _eps_list(eps)
    y = _labels(model, x, labels)
    sign = _ce_grad_sign(model, x, y, check=labels is not None)
    if not sweep:
        x_adv = torch.add(x.detach(), sign, alpha=eps_values[0]).clamp_(lo, hi)
        return _finish(x_adv, x, False, 1, model, y, False, return_info)
    e = torch.tensor(eps_values, dtype=x.dtype, device=x.device).view(-1, *[1] * x.dim())
    x_adv = (x.detach().unsqueeze(0) + e * sign.unsqueeze(0)).clamp(lo, hi)
    return _finish(x_adv.reshape(-1, *x.shape[1:]), x, sweep, len(eps_values), model, y,
                   False, return_info)


def _iterative(model, x, eps, steps, step_size, y, targeted, project, clip):
    lo, hi = check_clip(clip)
    eps_values, sweep = _eps_list(eps)
    steps = check_int(steps, "steps", 1)
    n_eps = len(eps_values)
    shape = [-1] + [1] * (x.dim() - 1)
    e = torch.tensor(eps_values, dtype=x.dtype, device=x.device).repeat_interleave(x.shape[0])
    if step_size is None:
        alpha = e / 10.0  # the paper: eps / 10 per step
    else:
        alpha = torch.full_like(e, check_positive(step_size, "step_size"))
    x0 = x.detach().repeat(n_eps, *[1] * (x.dim() - 1))
    yy = y.repeat(n_eps)
    x_adv = x0.clone()
    direction = -1.0 if targeted else 1.0  # towards the target / away from the label
    # One eps: scalar step and bounds (fewer kernels per step); a sweep: per-row tensors.
    scalar = n_eps == 1 and step_size is None
    step_arg = direction * eps_values[0] / 10.0 if scalar else direction * alpha.view(shape)
    low = x0 - (eps_values[0] if scalar else e.view(shape)) if project else None
    high = x0 + (eps_values[0] if scalar else e.view(shape)) if project else None
    for step in range(steps):
        sign = _ce_grad_sign(model, x_adv, yy, check=step == 0)
        if scalar:
            x_adv = torch.add(x_adv, sign, alpha=step_arg)
        else:
            x_adv = x_adv + step_arg * sign
        if project:
            x_adv = torch.max(torch.min(x_adv, high), low)
        x_adv = x_adv.clamp_(lo, hi)
    return x_adv, sweep, n_eps


@preserves_model_state
def bim(model, x: Tensor, eps, steps: int = 10, step_size: float | None = None, labels=None,
        project: bool = False, clip=(-0.5, 0.5), return_info: bool = False):
    """Basic iterative method: ``steps`` FGSM steps of ``step_size`` (default eps / 10).

    As in the authors' release, only the input box is enforced; ``project=True`` also
    projects onto the L-inf eps-ball around x after every step.
    """
    check_images(x)
    check_clip(clip)
    _eps_list(eps)
    steps = check_int(steps, "steps", 1)
    if step_size is not None:
        step_size = check_positive(step_size, "step_size")
    y = _labels(model, x, labels)
    x_adv, sweep, n_eps = _iterative(model, x, eps, steps, step_size, y, False, project, clip)
    return _finish(x_adv, x, sweep, n_eps, model, y, False, return_info)


@preserves_model_state
def ilcm(model, x: Tensor, eps, steps: int = 10, step_size: float | None = None,
         project: bool = False, clip=(-0.5, 0.5), return_info: bool = False):
    """Iterative least-likely class method: ``steps`` targeted steps
    x - step_size * sign(grad CE(model(x), t)) towards the clean input's least-likely class."""
    check_images(x)
    check_clip(clip)
    _eps_list(eps)
    steps = check_int(steps, "steps", 1)
    if step_size is not None:
        step_size = check_positive(step_size, "step_size")
    with torch.no_grad():
        clean = decision_logits(model, x, first=True)
    # the least-likely class must be another class than the prediction
    target = resolve_target("least_likely", clean, name="ilcm's target")
    x_adv, sweep, n_eps = _iterative(model, x, eps, steps, step_size, target, True, project,
                                     clip)
    return _finish(x_adv, x, sweep, n_eps, model, target, True, return_info)


def rand_noise(x: Tensor, eps, seed: int = 0, clip=(-0.5, 0.5)) -> Tensor:
    """RAND: x + U(-eps, eps) elementwise, clipped; deterministic given ``seed``.
    A sweep of eps returns (E, B, ...) (the same uniform draw scaled per eps)."""
    check_images(x)
    lo, hi = check_clip(clip)
    eps_values, sweep = _eps_list(eps)
    g = generator_for(seed, x.device)
    u = torch.rand(x.shape, generator=g, device=x.device, dtype=torch.float32) * 2 - 1
    e = torch.tensor(eps_values, device=x.device).view(-1, *[1] * x.dim())
    out = (x.unsqueeze(0) + (e * u.unsqueeze(0)).to(x.dtype)).clamp(lo, hi)
    return out if sweep else out[0]

