"""Jacobian-based Saliency Map Attack (Papernot et al. 2016), pair version, batched."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .. import _torch_impl
from .._args import check_real, check_seed
from ._common import (AttackInfo, check_clip, check_images, check_int, decision_logits,
                      preserves_model_state, resolve_target)


def _jacobian_rows(model, x: Tensor, target: Tensor, use_logits: bool):
    """alpha = d out_t / dx and beta = d sum_{j != t} out_j / dx for a whole batch, from
    one forward and two batched backward passes (images are independent in eval mode)."""
    x = x.detach().requires_grad_(True)
    out = decision_logits(model, x)
    if not use_logits:
        out = _torch_impl.softmax(out, 1)  # differentiable; no exp underflow slow path
    picked = out.gather(1, target.unsqueeze(1)).sum()
    (g_target,) = torch.autograd.grad(picked, x, retain_graph=True)
    (g_all,) = torch.autograd.grad(out.sum(), x)
    flat = x.shape[0], -1
    alpha = g_target.reshape(flat).float()
    beta = (g_all - g_target).reshape(flat).float()
    return out.detach(), alpha, beta


@preserves_model_state
def jsma(model, x: Tensor, target="least_likely", theta: float = 1.0, gamma: float = 0.1,
         clip=(-0.5, 0.5), use_logits: bool = True, max_iterations: int | None = None,
         seed: int = 0, return_info: bool = False):
    """Targeted JSMA on a batch, every image in parallel.

    Each iteration takes the Jacobian of the whole (still active) batch, asks the
    saliency op ``rce_fast::jsma_pairs`` (C++/CUDA, O(n) memory) for the best feature
    pair of every image, and moves both features by ``theta * (max - min)`` within
    ``clip`` (theta = +1: set to the maximum). Images stop when classified as their
    target (success), when no pair qualifies, or after ``gamma * n`` changed features.

    Args:
        model: module mapping x to decision logits (B, L).
        x: (B, ...) inputs inside ``clip``.
        target: LongTensor (B,), ``"least_likely"`` (the paper's choice) or ``"random"``.
        theta: perturbation direction/size; > 0 increases features, < 0 decreases.
        gamma: maximum fraction of features changed, in (0, 1].
        use_logits: differentiate the logits (True) or the softmax probabilities
            (False, as the authors' release did).
        max_iterations: optional cap on iterations (the release used 100).
        seed: seed for ``target="random"``.
        return_info: also return an AttackInfo with ``success``, ``target``,
            ``n_changed`` (features changed) and ``iterations`` per image.
    """
    check_images(x)
    lo, hi = check_clip(clip)
    theta = check_real(theta, "theta")
    if not (theta != 0 and math.isfinite(theta)):
        raise ValueError(f"theta must be a finite non-zero number, got {theta}")
    gamma = check_real(gamma, "gamma")
    if not (0 < gamma <= 1):
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    batch = x.shape[0]
    n = x[0].numel()
    increase = theta > 0
    budget = int(gamma * n) // 2  # two features per iteration
    if max_iterations is not None:
        budget = min(budget, check_int(max_iterations, "max_iterations", 0))
    seed = check_seed(seed)

    x_adv = x.detach().reshape(batch, n).clone()
    with torch.no_grad():
        clean = decision_logits(model, x.detach(), first=True)
    target = resolve_target(target, clean, seed)
    domain = (x_adv < hi) if increase else (x_adv > lo)
    success = clean.argmax(1) == target
    active = ~success
    n_changed = torch.zeros(batch, dtype=torch.int64, device=x.device)
    iterations = torch.zeros(batch, dtype=torch.int64, device=x.device)
    step = theta * (hi - lo)

    for _ in range(budget):
        idx = torch.nonzero(active).squeeze(1)
        if idx.numel() == 0:
            break
        out, alpha, beta = _jacobian_rows(model, x_adv[idx].reshape(-1, *x.shape[1:]),
                                          target[idx], use_logits)
        reached = out.argmax(1) == target[idx]
        success[idx[reached]] = True
        pairs = torch.ops.rce_fast.jsma_pairs(alpha, beta, domain[idx], increase)
        stuck = pairs[:, 0] < 0
        active[idx[reached | stuck]] = False
        move = ~(reached | stuck)
        rows, pq = idx[move], pairs[move]
        if rows.numel() == 0:
            continue
        r2 = rows.unsqueeze(1).expand(-1, 2)
        x_adv[r2, pq] = (x_adv[r2, pq] + step).clamp(lo, hi)
        domain[r2, pq] = False
        n_changed[rows] += 2
        iterations[rows] += 1

    remaining = torch.nonzero(active).squeeze(1)
    if remaining.numel():
        with torch.no_grad():
            out = decision_logits(model, x_adv[remaining].reshape(-1, *x.shape[1:]))
        success[remaining] = out.argmax(1) == target[remaining]

    x_adv = x_adv.reshape(x.shape).to(x.dtype)
    if return_info:
        return x_adv, AttackInfo(success=success, target=target,
                                 extra={"n_changed": n_changed, "iterations": iterations})
    return x_adv


def jsma_pairs(alpha: Tensor, beta: Tensor, domain: Tensor, increase: bool = True) -> Tensor:
    """The JSMA saliency pair search on its own (checked wrapper of ``rce_fast::jsma_pairs``).

    Args:
        alpha: (B, n) d target / dx; beta: (B, n) d (sum of other classes) / dx; float,
            searched in float32.
        domain: (B, n) bool, features that may still be changed.
        increase: True for theta > 0 (alpha_p + alpha_q > 0, beta_p + beta_q < 0),
            False for theta < 0 (both signs flipped).

    Returns:
        (B, 2) int64 pairs p < q maximising (alpha_p + alpha_q) * -(beta_p + beta_q), ties
        to the lowest (p, q); (-1, -1) where no pair qualifies. O(n) extra memory.
    """
    for name, t in (("alpha", alpha), ("beta", beta), ("domain", domain)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (B, n), got {tuple(t.shape)}")
    if beta.shape != alpha.shape or domain.shape != alpha.shape:
        raise ValueError(f"alpha, beta and domain must have one shape; got "
                         f"{tuple(alpha.shape)}, {tuple(beta.shape)}, {tuple(domain.shape)}")
    if not (alpha.dtype.is_floating_point and beta.dtype.is_floating_point):
        raise TypeError("alpha and beta must be floating-point tensors")
    if domain.dtype != torch.bool:
        raise TypeError(f"domain must be a bool tensor, got {domain.dtype}")
    if not (alpha.device == beta.device == domain.device):
        raise ValueError("alpha, beta and domain must be on one device")
    if not isinstance(increase, (bool, np.bool_)):
        raise TypeError(f"increase must be a bool, got {type(increase).__name__}")
    return torch.ops.rce_fast.jsma_pairs(alpha, beta, domain, bool(increase))
