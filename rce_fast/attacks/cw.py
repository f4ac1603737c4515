"""Carlini-Wagner L2 (C&W, C&W-hc) and the white-box attack on K-density (C&W-wb).

Everything per example stays on the device: the binary search over c is a set of
(B,) tensors updated with ``torch.where``. No Python loop runs over examples, and there
is no ``.item()`` per step: abort-early syncs once every ``max_iterations // 10`` steps,
as in Carlini's reference code.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._common import (AttackInfo, check_clip, check_images, check_int, check_positive,
                      decision_logits, resolve_target)

try:
    from torch.optim.adam import adam as _functional_adam
except ImportError:  # pragma: no cover - every torch this package supports has it
    _functional_adam = None

_BIG = 1e10


def _margin(z: Tensor, cls: Tensor, targeted: bool) -> tuple[Tensor, Tensor]:
    """(margin, rival class). Targeted: max_{i != t} Z_i - Z_t; untargeted (cls = label):
    Z_y - max_{i != y} Z_i. The rival is the arg max over i != cls."""
    real = z.gather(1, cls.unsqueeze(1)).squeeze(1)
    other, rival = z.scatter(1, cls.unsqueeze(1), float("-inf")).max(1)
    return (other - real if targeted else real - other), rival


def _hinge_and_grad(z: Tensor, cls: Tensor, targeted: bool, kappa: float, c: Tensor):
    """(margin + kappa, d sum(c * max(margin + kappa, 0)) / dz), by hand: the gradient is
    +-c at the rival class and -+c at ``cls`` where the hinge is active (>= 0, as
    clamp's gradient), so no autograd graph is built over the logits."""
    zf = z.float()
    m, rival = _margin(zf, cls, targeted)
    m = m + kappa
    weight = torch.where(m >= 0, c, 0.0)
    if not targeted:
        weight = -weight
    gz = torch.zeros_like(zf)
    gz.scatter_(1, rival.unsqueeze(1), weight.unsqueeze(1))
    gz.scatter_add_(1, cls.unsqueeze(1), -weight.unsqueeze(1))
    return m, gz.to(z.dtype)


def logits_and_features(model, x: Tensor) -> tuple[Tensor, Tensor]:
    """(decision logits, features) from a model that exposes ``logits_and_features``."""
    fn = getattr(model, "logits_and_features", None)
    if fn is None:
        raise TypeError("this attack needs the model's features: pass a module with "
                        "logits_and_features(x) -> (decision logits, features), such as "
                        "rce_fast.models.Classifier")
    return fn(x)


class _Adam:
    """Adam (torch's defaults: betas 0.9 / 0.999, eps 1e-8) on one tensor.

    It calls torch's functional fused Adam directly: the ``torch.optim.Adam`` object's
    per-step bookkeeping costs ~0.1 ms on CPU, more than the fused update itself, and
    the C&W step is launch-bound. Falls back to the optimizer object where the fused
    kernel does not exist (older torch, other devices).
    """

    def __init__(self, w: Tensor, lr: float) -> None:
        self.w, self.lr = w, float(lr)
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(w), torch.zeros_like(w)
        self.step_t = torch.zeros((), dtype=torch.float32, device=w.device)
        self.opt = None

    def step(self, grad: Tensor) -> None:
        if self.opt is None:
            try:
                if _functional_adam is None:
                    raise RuntimeError("no functional Adam in this torch")
                _functional_adam([self.w], [grad], [self.exp_avg], [self.exp_avg_sq], [],
                                 [self.step_t], fused=True, amsgrad=False, beta1=0.9,
                                 beta2=0.999, lr=self.lr, weight_decay=0.0, eps=1e-8,
                                 maximize=False)
                return
            except (RuntimeError, TypeError, ValueError):
                if int(self.step_t) != 0:
                    raise
                self.opt = torch.optim.Adam([self.w], lr=self.lr, foreach=True)
        self.w.grad = grad
        self.opt.step()


def _cw_search(model, x: Tensor, cls: Tensor, targeted: bool, kappa: float, c_init: float,
               binary_search_steps: int, max_iterations: int, lr: float, abort_early: bool,
               lo: float, hi: float, init: Tensor | None = None,
               extra: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None = None,
               progress: bool = False, desc: str = "C&W", warm_start: bool = True):
    """The C&W optimisation with a per-example binary search over c.

    ``extra(features) -> (penalty (B,), ok (B,) bool, score (B,))`` adds c * penalty to
    the loss and requires ``ok`` for success (C&W-wb); among iterates classified as the
    target it also keeps the one with the lowest ``score`` as a fallback for inputs
    that never succeed. ``warm_start``: each search step starts from the previous
    step's last iterate instead of the starting point, so the whole step budget keeps
    refining (Carlini's code restarts; at equal budgets warm starts reach smaller L2).
    Returns (best_adv, best_l2, final c, fallback_adv, fallback_score).
    """
    batch = x.shape[0]
    view = (-1,) + (1,) * (x.dim() - 1)
    x32 = x.detach().float()
    mid, half = (hi + lo) / 2.0, (hi - lo) / 2.0
    start = x32 if init is None else init.detach().float()
    w0 = torch.atanh(((start - mid) / half).clamp(-1 + 1e-6, 1 - 1e-6))
    dev = x.device
    c = torch.full((batch,), float(c_init), device=dev)
    lower = torch.zeros(batch, device=dev)
    upper = torch.full((batch,), _BIG, device=dev)
    best_l2 = torch.full((batch,), math.inf, device=dev)
    best_adv = x32.clone()
    fb_score = torch.full((batch,), math.inf, device=dev)
    fb_adv = start.clone()
    check_every = max(1, max_iterations // 10)
    outer = tqdm(range(binary_search_steps), desc=desc, disable=not progress, leave=False)
    for _ in outer:
        w = w0.clone()
        opt = _Adam(w, lr)
        step_ok = torch.zeros(batch, dtype=torch.bool, device=dev)
        prev = math.inf
        t, xp, diff, l2 = _iterate(w, x32, half, mid)
        for it in range(max_iterations):
            # The model's part of the loss goes through autograd; the distance term and the
            # tanh box are differentiated by hand below (fewer passes over the batch).
            xp.requires_grad_(True)
            # Only the input's gradient is taken: parameter gradients are skipped even
            # when the parameters require grad.
            if extra is None:
                z = decision_logits(model, xp)
                with torch.no_grad():
                    m, gz = _hinge_and_grad(z, cls, targeted, kappa, c)
                model_term = c * m.clamp(min=0)
                ok = m <= 0
                (g,) = torch.autograd.grad(z, [xp], gz)
            else:
                z, feats = logits_and_features(model, xp)
                m = _margin(z.float(), cls, targeted)[0] + kappa
                model_term = c * m.clamp(min=0)
                ok = m <= 0
                penalty, ok2, score = extra(feats)
                model_term = model_term + c * penalty
                with torch.no_grad():
                    better = ok & (score.detach() < fb_score)
                    fb_score = torch.where(better, score.detach(), fb_score)
                    fb_adv = torch.where(better.view(view), xp.detach(), fb_adv)
                ok = ok & ok2
                (g,) = torch.autograd.grad(model_term.sum(), [xp])
            xp = xp.detach()
            with torch.no_grad():
                # d loss / d w = (d model_term / d xp + 2 (xp - x)) * half * (1 - tanh(w)^2)
                g.add_(diff, alpha=2.0)
                g.addcmul_(g * t, t, value=-1.0)
                if half != 1.0:
                    g.mul_(half)
                opt.step(g)
                improved = ok & (l2 < best_l2)
                best_l2 = torch.where(improved, l2, best_l2)
                best_adv = torch.where(improved.view(view), xp, best_adv)
                step_ok |= ok
                if abort_early and it % check_every == 0:
                    # one sync every max_iterations // 10 steps
                    current = float(l2.sum() + model_term.detach().sum())
                    if current > prev * 0.9999:
                        break
                    prev = current
                t, xp, diff, l2 = _iterate(w, x32, half, mid)
        if warm_start:
            w0 = w.detach()
        with torch.no_grad():  # per-example binary search on c, all on the device
            upper = torch.where(step_ok, torch.minimum(upper, c), upper)
            lower = torch.where(step_ok, lower, torch.maximum(lower, c))
            c = torch.where(upper < 1e9, (lower + upper) / 2, c * 10)
    return best_adv, best_l2, c, fb_adv, fb_score


def _iterate(w: Tensor, x32: Tensor, half: float, mid: float):
    """(tanh(w), x' = tanh(w) * half + mid, x' - x, ||x' - x||^2 per example)."""
    t = torch.tanh(w)
    xp = t * half
    if mid != 0.0:
        xp.add_(mid)
    diff = xp - x32
    flat = diff.flatten(1)
    return t, xp, diff, torch.linalg.vecdot(flat, flat)


def _check_cw_args(x, kappa, c_init, binary_search_steps, max_iterations, lr, clip):
    check_images(x)
    lo, hi = check_clip(clip)
    check_positive(kappa, "kappa", allow_zero=True)
    check_positive(c_init, "c_init")
    check_positive(lr, "lr")
    return (lo, hi, check_int(binary_search_steps, "binary_search_steps", 1),
            check_int(max_iterations, "max_iterations", 1))


def cw_l2(model, x: Tensor, target=None, kappa: float = 0.0, c_init: float = 1e-3,
          binary_search_steps: int = 9, max_iterations: int = 10000, lr: float = 1e-2,
          abort_early: bool = True, clip=(-0.5, 0.5), seed: int = 0, init: Tensor | None = None,
          warm_start: bool = True, progress: bool = False, return_info: bool = False):
    """Carlini-Wagner L2 attack, batched, with a per-example binary search over c.

    Minimises ||x' - x||^2 + c * max(margin, -kappa) over x' = tanh(w) * half + mid (the
    box ``clip``), with Adam. ``kappa > 0`` is C&W-hc (the release used 10).

    Args:
        model: module returning decision logits (B, L).
        x: (B, ...) inputs inside ``clip``.
        target: None for untargeted (away from the clean prediction), or a LongTensor
            (B,), ``"random"`` (a random wrong class, the paper's choice, seeded) or
            ``"least_likely"``.
        init: optional starting point of the optimisation (distance is still to x).
        warm_start: start each binary-search step from the previous step's last iterate
            (default) rather than from the starting point as Carlini's code does; at the
            same step budget it reaches smaller distortions.
        return_info: also return AttackInfo with ``success``, ``target``, ``l2`` (the L2
            norm of the kept perturbation, inf where none succeeded) and ``c`` (final c).

    Returns the smallest-L2 successful example per input (the input itself where the
    attack failed), in x's dtype.
    """
    lo, hi, bss, iters = _check_cw_args(x, kappa, c_init, binary_search_steps,
                                        max_iterations, lr, clip)
    with torch.no_grad():
        clean = decision_logits(model, x.detach())
    targeted = target is not None
    cls = resolve_target(target, clean, seed) if targeted else clean.argmax(1)
    adv, l2, c, _, _ = _cw_search(model, x, cls, targeted, float(kappa), float(c_init), bss,
                                  iters, float(lr), abort_early, lo, hi, init=init,
                                  progress=progress, warm_start=warm_start)
    adv = adv.to(x.dtype)
    if not return_info:
        return adv
    success = torch.isfinite(l2)
    return adv, AttackInfo(success=success, target=cls if targeted else None,
                           extra={"l2": l2.sqrt(), "c": c, "labels": clean.argmax(1)})


def cw_wb(model, x: Tensor, target, detector, kappa: float = 5.0,
          stage1: dict | None = None, stage2: dict | None = None, lr: float = 1e-2,
          abort_early: bool = True, clip=(-0.5, 0.5), seed: int = 0, progress: bool = False,
          return_info: bool = False):
    """C&W-wb: the white-box attack on the K-density detector (Pang et al. 2018, sec. 5).

    Adds c * max(f2, 0) to the C&W loss, f2(x') = -log KD_t(x') + log median_t: the
    K-density of the TARGET class t against the detector's 100-points-per-class bank
    (``detector.class_medians`` must have been called), differentiated through the fused
    K-density op. Success = classified as t (with margin kappa) AND f2 <= 0.

    The default is the release's two-stage schedule: stage 1 plain C&W (5000 iterations,
    c = 10, 3 search steps), then the combined loss (10000 iterations, c = 100, 9 search
    steps) started from stage 1's output. Override with ``stage1`` / ``stage2`` dicts of
    ``max_iterations``, ``c_init``, ``binary_search_steps`` (``stage1=False`` skips it).

    ``model`` must expose ``logits_and_features(x)`` (rce_fast.models.Classifier does).
    Returns, per input, the smallest-L2 example that is classified as t with f2 <= 0;
    where none was found, the target-classified iterate with the lowest f2.
    AttackInfo: ``success``, ``target``, ``f2`` (B,), ``f2_positive_ratio`` (the paper's
    Table 3 number), ``l2``, ``classified_as_target``.
    """
    from rce_fast.detect import QueryPlan, kdensity_planned

    s1 = {"max_iterations": 5000, "c_init": 10.0, "binary_search_steps": 3}
    s2 = {"max_iterations": 10000, "c_init": 100.0, "binary_search_steps": 9}
    if stage1 is not False:
        s1.update(stage1 or {})
    s2.update(stage2 or {})
    lo, hi, bss2, iters2 = _check_cw_args(x, kappa, s2["c_init"], s2["binary_search_steps"],
                                          s2["max_iterations"], lr, clip)
    if detector.medians is None or detector.median_index is None:
        raise ValueError("detector has no class medians: call "
                         "detector.class_medians(train_features, train_labels) first")
    with torch.no_grad():
        clean = decision_logits(model, x.detach())
    cls = resolve_target(target, clean, seed)
    index = detector.median_index
    plan = QueryPlan(cls, index)
    log_median = detector.medians.to(x.device)[cls].float()

    def f2_of(features: Tensor) -> Tensor:
        logkd = kdensity_planned(features.to(index.bank.dtype), plan, index, detector.sigma2)
        return log_median - logkd.float()

    def penalty(features):
        f2 = f2_of(features)
        return f2.clamp(min=0), f2 <= 0, f2

    init = None
    if stage1 is not False:
        adv1, _, _, _, _ = _cw_search(model, x, cls, True, float(kappa), float(s1["c_init"]),
                                   int(s1["binary_search_steps"]), int(s1["max_iterations"]),
                                   float(lr), abort_early, lo, hi, progress=progress,
                                   desc="C&W-wb stage 1")
        init = adv1
    adv, l2, c, fb_adv, fb_score = _cw_search(
        model, x, cls, True, float(kappa), float(s2["c_init"]), bss2, iters2, float(lr),
        abort_early, lo, hi, init=init, extra=penalty, progress=progress,
        desc="C&W-wb stage 2")
    success = torch.isfinite(l2)
    # Where f2 <= 0 was never reached: the target-classified iterate with the lowest f2
    # (the detector's best case), else stage 1's example.
    view = (-1,) + (1,) * (x.dim() - 1)
    has_fb = torch.isfinite(fb_score)
    fallback = torch.where(has_fb.view(view), fb_adv, init.float() if init is not None
                           else x.float())
    adv = torch.where(success.view(view), adv, fallback)
    l2 = torch.where(success, l2, (fallback - x.float()).flatten(1).square().sum(1))
    adv = adv.to(x.dtype)
    if not return_info:
        return adv
    with torch.no_grad():
        z, feats = logits_and_features(model, adv)
        f2 = f2_of(feats)
        on_target = (_margin(z.float(), cls, True)[0] + kappa) <= 0
    return adv, AttackInfo(success=success & on_target & (f2 <= 0), target=cls, extra={
        "f2": f2, "f2_positive_ratio": float((f2 > 0).float().mean()), "l2": l2.sqrt(),
        "c": c, "classified_as_target": on_target})
