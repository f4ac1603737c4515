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

from .._args import FP32_MAX, FP32_TINY
from ..resume import pack_like, unpack_like
from . import _cw_fused
from ._common import (AttackInfo, check_clip, check_images, check_int, check_positive,
                      check_start, decision_logits, first_call, preserves_model_state,
                      resolve_target)

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


def _reached(m: Tensor, kappa: float) -> Tensor:
    """Where ``m`` (margin + kappa) says the attack's goal is reached: the margin is at
    most -kappa AND below 0, so a tie (margin 0, common with bf16 logits) is not a
    success at kappa = 0; the arg max is then the target (away from the label)."""
    return (m <= 0) & (m < kappa)


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
    kernel does not exist (older torch, other devices); the object then works on this
    class's moment tensors, so :meth:`state_dict` covers both paths.
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
                self.step_t = self.step_t.cpu()
                self.opt.state[self.w] = {"step": self.step_t, "exp_avg": self.exp_avg,
                                          "exp_avg_sq": self.exp_avg_sq}
        self.w.grad = grad
        self.opt.step()

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu(),
                "step": self.step_t.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.step_t.copy_(state["step"])


class _CWSearch:
    """The C&W optimisation with a per-example binary search over c, resumable.

    ``extra(features) -> (penalty (B,), ok (B,) bool, score (B,))`` adds c * penalty to
    the loss and requires ``ok`` for success (C&W-wb); among iterates classified as the
    target it also keeps the one with the lowest ``score`` as a fallback for inputs
    that never succeed. ``warm_start``: each search step starts from the previous
    step's last iterate instead of the starting point, so the whole step budget keeps
    refining (Carlini's code restarts; at equal budgets warm starts reach smaller L2).

    :meth:`run` takes an optional :class:`rce_fast.resume.WorkControl`: iterations then
    run in chunks the budget grants, and a stop saves :meth:`state_dict` (everything:
    the best examples and distances so far, c and its bounds, the current iterate,
    Adam's moments and step, the iteration, the abort-early reference). A search
    restored with :meth:`load_state_dict` continues bit-identically on CPU.
    """

    _TENSORS = ("c", "lower", "upper", "best_l2", "fb_score")

    def __init__(self, model, x: Tensor, cls: Tensor, targeted: bool, kappa: float,
                 c_init: float, binary_search_steps: int, max_iterations: int, lr: float,
                 abort_early: bool, lo: float, hi: float, init: Tensor | None = None,
                 extra: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None = None,
                 warm_start: bool = True) -> None:
        batch = x.shape[0]
        self.model, self.cls, self.targeted, self.kappa = model, cls, targeted, kappa
        self.bss, self.max_iterations, self.lr = binary_search_steps, max_iterations, lr
        self.abort_early, self.extra, self.warm_start = abort_early, extra, warm_start
        self.view = (-1,) + (1,) * (x.dim() - 1)
        self.x32 = x.detach().float()
        # The search runs in float32; the model sees each iterate in x's dtype (a float64
        # or bf16 model takes inputs of its own dtype), differentiated through the cast.
        self.in_dtype = x.dtype
        self.mid, self.half = (hi + lo) / 2.0, (hi - lo) / 2.0
        start = self.x32 if init is None else init.detach().float()
        self.w0 = torch.atanh(((start - self.mid) / self.half).clamp(-1 + 1e-6, 1 - 1e-6))
        dev = x.device
        self.c = torch.full((batch,), float(c_init), device=dev)
        self.lower = torch.zeros(batch, device=dev)
        self.upper = torch.full((batch,), _BIG, device=dev)
        self.best_l2 = torch.full((batch,), math.inf, device=dev)
        self.best_adv = self.x32.clone()
        self.fb_score = torch.full((batch,), math.inf, device=dev)
        self.fb_adv = start.clone()
        self.check_every = max(1, max_iterations // 10)
        self.settings = {"batch": batch, "shape": list(x.shape), "targeted": targeted,
                         "kappa": kappa, "c_init": float(c_init),
                         "binary_search_steps": binary_search_steps,
                         "max_iterations": max_iterations, "lr": lr,
                         "abort_early": abort_early, "warm_start": warm_start,
                         "extra": extra is not None}
        # Position: search step, iteration within it; the step's iterate, Adam and
        # success flags exist only while a step is under way.
        self.step, self.it, self.prev = 0, 0, math.inf
        self.w: Tensor | None = None
        self.adam: _Adam | None = None
        self.step_ok: Tensor | None = None

    # -- state
    def state_dict(self) -> dict:
        """Everything the search needs to continue, as CPU tensors and numbers. Images
        are stored losslessly compressed against the inputs; the starting point of the
        step is left out where it can be recomputed (no warm start) or is no longer
        needed (warm start, in the middle of a step)."""
        state = {k: getattr(self, k).cpu() for k in self._TENSORS}
        state.update(settings=dict(self.settings), step=self.step, it=self.it,
                     prev=self.prev, cls=self.cls.cpu(),
                     best_adv=pack_like(self.best_adv, self.x32))
        if self.extra is not None:
            state["fb_adv"] = pack_like(self.fb_adv, self.x32)
        if self.warm_start and self.w is None:
            state["w0"] = self.w0.cpu()
        if self.w is not None:
            state.update(w=self.w.cpu(), step_ok=self.step_ok.cpu(),
                         adam=self.adam.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("settings") != self.settings:
            raise ValueError("saved C&W state is for other settings: "
                             f"{state.get('settings')} against {self.settings}")
        if not torch.equal(state["cls"], self.cls.cpu()):
            raise ValueError("saved C&W state is for other target classes")
        dev = self.x32.device
        for k in self._TENSORS:
            setattr(self, k, state[k].to(dev))
        self.best_adv = unpack_like(state["best_adv"], self.x32).to(dev)
        if "fb_adv" in state:
            self.fb_adv = unpack_like(state["fb_adv"], self.x32).to(dev)
        if "w0" in state:
            self.w0 = state["w0"].to(dev)
        self.step, self.it, self.prev = int(state["step"]), int(state["it"]), float(state["prev"])
        if "w" in state:
            self.w = state["w"].to(dev)
            self.adam = _Adam(self.w, self.lr)
            self.adam.load_state_dict(state["adam"])
            self.step_ok = state["step_ok"].to(dev)

    # -- the optimisation
    def run(self, control=None, progress: bool = False, desc: str = "C&W"):
        """Run (or continue) to the end; returns (best_adv, best_l2, final c,
        fallback_adv, fallback_score). With ``control``, may raise
        :class:`rce_fast.resume.StopRequested` after saving the state."""
        bar = tqdm(total=self.bss, initial=self.step, desc=desc, disable=not progress,
                   leave=False)
        try:
            while self.step < self.bss:
                if self.w is None:  # a new search step
                    self.w = self.w0.clone()
                    self.adam = _Adam(self.w, self.lr)
                    self.step_ok = torch.zeros(self.x32.shape[0], dtype=torch.bool,
                                               device=self.x32.device)
                    self.it, self.prev = 0, math.inf
                self._run_step(control, desc)
                if self.warm_start:
                    self.w0 = self.w.detach()
                with torch.no_grad():  # per-example binary search on c, all on the device
                    ok = self.step_ok
                    self.upper = torch.where(ok, torch.minimum(self.upper, self.c), self.upper)
                    self.lower = torch.where(ok, self.lower, torch.maximum(self.lower, self.c))
                    self.c = torch.where(self.upper < 1e9, (self.lower + self.upper) / 2,
                                         self.c * 10)
                self.step += 1
                self.w, self.adam, self.step_ok = None, None, None
                bar.update(1)
        finally:
            bar.close()
        return self.best_adv, self.best_l2, self.c, self.fb_adv, self.fb_score

    def _run_step(self, control, desc: str) -> None:
        """Iterations of the current search step, from ``self.it`` to its end (the
        budget or abort-early)."""
        model, cls, targeted, kappa, c = self.model, self.cls, self.targeted, self.kappa, self.c
        x32, half, mid, view, w = self.x32, self.half, self.mid, self.view, self.w
        # On CPU the update after the model's gradient runs as one compiled pass
        # (Adam, tanh box, best tracking, next iterate and its distance): in place on
        # w, Adam's moments, t, xp, l2 and best_adv. The step's first iterate comes from
        # the same compiled tanh, so a resumed step sees the bits it would have seen.
        fused = (_cw_fused.fused_available(w) and self.adam.opt is None
                 and w.is_contiguous() and x32.is_contiguous()
                 and self.best_adv.is_contiguous())
        if fused:
            t, xp, l2 = _cw_fused.fused_iterate(w, x32, half, mid)
            diff = None
        else:
            t, xp, diff, l2 = _iterate(w, x32, half, mid)
        while self.it < self.max_iterations:
            n = self.max_iterations - self.it
            if control is not None:
                control.chunk_boundary(self.state_dict)
                n = control.grant(desc, n)
                if n == 0:
                    control.stop(self.state_dict)
            ran = 0
            for _ in range(n):
                if control is not None and control.interrupted:
                    break
                it = self.it
                # The model's part of the loss goes through autograd; the distance term and
                # the tanh box are differentiated by hand below (fewer passes over the batch).
                xp.requires_grad_(True)
                xin = xp if self.in_dtype == torch.float32 else xp.to(self.in_dtype)
                # Only the input's gradient is taken: parameter gradients are skipped even
                # when the parameters require grad.
                if self.extra is None:
                    z = decision_logits(model, xin)
                    with torch.no_grad():
                        m, gz = _hinge_and_grad(z, cls, targeted, kappa, c)
                    model_term = c * m.clamp(min=0)
                    ok = _reached(m, kappa)
                    (g,) = torch.autograd.grad(z, [xp], gz)
                else:
                    z, feats = logits_and_features(model, xin)
                    m = _margin(z.float(), cls, targeted)[0] + kappa
                    model_term = c * m.clamp(min=0)
                    ok = _reached(m, kappa)
                    penalty, ok2, score = self.extra(feats)
                    model_term = model_term + c * penalty
                    with torch.no_grad():
                        better = ok & (score.detach() < self.fb_score)
                        self.fb_score = torch.where(better, score.detach(), self.fb_score)
                        self.fb_adv = torch.where(better.view(view), xp.detach(), self.fb_adv)
                    ok = ok & ok2
                    (g,) = torch.autograd.grad(model_term.sum(), [xp])
                xp = xp.detach()
                with torch.no_grad():
                    improved = ok & (l2 < self.best_l2)
                    self.best_l2 = torch.where(improved, l2, self.best_l2)
                    self.step_ok |= ok
                    check = self.abort_early and it % self.check_every == 0
                    if check:  # one sync every max_iterations // 10 steps
                        current = float(l2.sum() + model_term.detach().sum())
                    if fused:
                        self.adam.step_t += 1
                        _cw_fused.fused_update(g.contiguous(), w, self.adam.exp_avg,
                                               self.adam.exp_avg_sq, t, xp, x32,
                                               self.best_adv, improved,
                                               int(self.adam.step_t), self.lr, half, mid, l2)
                    else:
                        # d loss / d w = (d model_term / d xp + 2 (xp - x)) * half
                        #                * (1 - tanh(w)^2)
                        g.add_(diff, alpha=2.0)
                        g.addcmul_(g * t, t, value=-1.0)
                        if half != 1.0:
                            g.mul_(half)
                        self.adam.step(g)
                        self.best_adv = torch.where(improved.view(view), xp, self.best_adv)
                    self.it = it + 1
                    ran += 1
                    if check:
                        if current > self.prev * 0.9999:
                            self.it = self.max_iterations  # the step ends here
                            break
                        self.prev = current
                    if not fused:
                        t, xp, diff, l2 = _iterate(w, x32, half, mid)
            if control is not None:
                control.done(ran)
                if control.interrupted and self.it < self.max_iterations:
                    control.stop(self.state_dict)


def _cw_search(model, x: Tensor, cls: Tensor, targeted: bool, kappa: float, c_init: float,
               binary_search_steps: int, max_iterations: int, lr: float, abort_early: bool,
               lo: float, hi: float, init: Tensor | None = None,
               extra: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None = None,
               progress: bool = False, desc: str = "C&W", warm_start: bool = True,
               control=None):
    """The C&W optimisation with a per-example binary search over c (see
    :class:`_CWSearch`); resumes from ``control.saved`` when there is one.
    Returns (best_adv, best_l2, final c, fallback_adv, fallback_score)."""
    search = _CWSearch(model, x, cls, targeted, kappa, c_init, binary_search_steps,
                       max_iterations, lr, abort_early, lo, hi, init=init, extra=extra,
                       warm_start=warm_start)
    if control is not None and control.saved is not None:
        search.load_state_dict(control.saved)
    return search.run(control, progress=progress, desc=desc)


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
    c_init = check_positive(c_init, "c_init")
    if not FP32_TINY <= c_init <= FP32_MAX:  # c is float32: 1e-50 became 0 (no attack
        # term at all, and 0 * 10 stays 0), 1e39 failed deep in torch
        raise ValueError(f"c_init must lie in [2**-126, 3.4e38] (c is float32), got "
                         f"{c_init}")
    check_positive(lr, "lr")
    return (lo, hi, check_int(binary_search_steps, "binary_search_steps", 1),
            check_int(max_iterations, "max_iterations", 1))


@preserves_model_state
def cw_l2(model, x: Tensor, target=None, kappa: float = 0.0, c_init: float = 1e-3,
          binary_search_steps: int = 9, max_iterations: int = 10000, lr: float = 1e-2,
          abort_early: bool = True, clip=(-0.5, 0.5), seed: int = 0, init: Tensor | None = None,
          warm_start: bool = True, progress: bool = False, return_info: bool = False,
          control=None):
    """Carlini-Wagner L2 attack, batched, with a per-example binary search over c.

    Minimises ||x' - x||^2 + c * max(margin + kappa, 0) over x' = tanh(w) * half + mid
    (the box ``clip``), with Adam: Carlini's released loss, whose value (the one
    abort-early compares) is the paper's c * max(margin, -kappa) plus c * kappa; the
    gradients are the same. ``kappa > 0`` is C&W-hc (the release used 10).

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
        control: optional :class:`rce_fast.resume.WorkControl` for a time-boxed run:
            iterations run in chunks its budget grants; when it says stop, the whole
            search state is saved through it and :class:`rce_fast.resume.StopRequested`
            is raised. Called again with a control whose ``saved`` holds that state, the
            attack continues where it stopped, with the same result as without a stop
            (bit for bit on CPU).

    Returns the smallest-L2 successful example per input (the input itself where the
    attack failed), in x's dtype.
    """
    lo, hi, bss, iters = _check_cw_args(x, kappa, c_init, binary_search_steps,
                                        max_iterations, lr, clip)
    if init is not None:
        check_start(init, x, "init")
    with torch.no_grad():
        clean = decision_logits(model, x.detach(), first=True)
    targeted = target is not None
    cls = resolve_target(target, clean, seed) if targeted else clean.argmax(1)
    adv, l2, c, _, _ = _cw_search(model, x, cls, targeted, float(kappa), float(c_init), bss,
                                  iters, float(lr), abort_early, lo, hi, init=init,
                                  progress=progress, warm_start=warm_start, control=control)
    adv = adv.to(x.dtype)
    if not return_info:
        return adv
    success = torch.isfinite(l2)
    return adv, AttackInfo(success=success, target=cls if targeted else None,
                           extra={"l2": _returned_l2(adv, x, l2, success), "c": c,
                                  "labels": clean.argmax(1)})


def _returned_l2(adv: Tensor, x: Tensor, l2_search: Tensor,
                 kept: Tensor | None = None) -> Tensor:
    """The L2 norm of the perturbation as returned (B,) float32, inf where ``kept`` (if
    given) is False. The search measures float32 iterates; for a bfloat16 / float16 / float64 ``x``
    the example returned is in x's dtype, so the norm is measured again on it."""
    if x.dtype == torch.float32:
        return l2_search.sqrt()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    d = (adv.to(acc) - x.detach().to(acc)).flatten(1).square().sum(1).sqrt().float()
    return d if kept is None else torch.where(kept, d, math.inf)


#: C&W-wb's two stages in the authors' release (their defaults in :func:`cw_wb`).
WB_STAGE1 = {"max_iterations": 5000, "c_init": 10.0, "binary_search_steps": 3}
WB_STAGE2 = {"max_iterations": 10000, "c_init": 100.0, "binary_search_steps": 9}


@preserves_model_state
def cw_wb(model, x: Tensor, target, detector, kappa: float = 5.0,
          stage1: dict | None = None, stage2: dict | None = None, lr: float = 1e-2,
          abort_early: bool = True, clip=(-0.5, 0.5), seed: int = 0, progress: bool = False,
          return_info: bool = False, control=None):
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
    where none was found, the target-classified iterate with the lowest f2, else stage
    1's output (or x itself when stage 1 found nothing either).
    AttackInfo: ``success``, ``target``, ``f2`` (B,), ``l2``, ``classified_as_target``
    (margin kappa reached), ``f2_positive_ratio_on_target`` (the paper's Table 3 number:
    the share with f2 > 0 among the adversarial examples x*, i.e. those classified as
    target; NaN if there are none) and ``f2_positive_ratio`` (the share over every
    input, where an input the attack left short of the target counts by its own f2).

    ``control``: as in :func:`cw_l2`; the saved state also records the stage, and stage
    1's result once it is done.
    """
    from rce_fast.detect import QueryPlan, kdensity_planned

    from rce_fast.detect import KDensityDetector

    s1, s2 = dict(WB_STAGE1), dict(WB_STAGE2)
    for name, given, into in (("stage1", stage1, s1), ("stage2", stage2, s2)):
        if given is None or (given is False and name == "stage1"):
            continue
        if not isinstance(given, dict):
            raise TypeError(f"{name} must be a dict of max_iterations, c_init and "
                            f"binary_search_steps{' (or False)' if name == 'stage1' else ''}"
                            f", got {type(given).__name__}")
        unknown = sorted(set(given) - set(into))
        if unknown:
            raise ValueError(f"{name} has unknown keys {unknown}; expected some of "
                             f"{sorted(into)}")
        into.update(given)
    lo, hi, bss2, iters2 = _check_cw_args(x, kappa, s2["c_init"], s2["binary_search_steps"],
                                          s2["max_iterations"], lr, clip)
    if stage1 is not False:
        _check_cw_args(x, kappa, s1["c_init"], s1["binary_search_steps"],
                       s1["max_iterations"], lr, clip)
    if not isinstance(detector, KDensityDetector):
        raise TypeError("detector must be a fitted KDensityDetector (C&W-wb attacks "
                        f"K-density), got {type(detector).__name__}")
    if detector.index is None:
        raise ValueError("detector is not fitted: call detector.fit(features, labels)")
    if detector.medians is None or detector.median_index is None:
        raise ValueError("detector has no class medians: call "
                         "detector.class_medians(train_features, train_labels) first")
    if not callable(getattr(model, "logits_and_features", None)):
        raise TypeError("model must expose logits_and_features(x) -> (decision logits, "
                        "features) for C&W-wb (rce_fast.models.Classifier does), got "
                        f"{type(model).__name__}")
    with torch.no_grad():
        clean, clean_feats = first_call(lambda t: logits_and_features(model, t), x.detach())
    if clean_feats.dim() != 2 or clean_feats.shape[1] != detector.feature_dim:
        raise ValueError(f"detector was fitted on features of size {detector.feature_dim} "
                         f"but the model's features have shape {tuple(clean_feats.shape)}")
    if clean.shape[1] != detector.num_classes:
        raise ValueError(f"detector was fitted on {detector.num_classes} classes but the "
                         f"model has {clean.shape[1]}")
    if clean_feats.device != detector.index.bank.device:
        raise ValueError(f"detector is on {detector.index.bank.device} but the model's "
                         f"features are on {clean_feats.device}")
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

    saved = control.saved if control is not None else None
    if saved is not None and saved.get("stage") not in (1, 2):
        raise ValueError("saved C&W-wb state has no stage")
    init = None
    if stage1 is not False:
        if saved is not None and saved["stage"] == 2:
            init = unpack_like(saved["init"], x.float()).to(x.device)
        else:
            sub = None if control is None else control.nested(
                lambda s: {"stage": 1, "search": s}, saved and saved["search"])
            init, _, _, _, _ = _cw_search(
                model, x, cls, True, float(kappa), float(s1["c_init"]),
                int(s1["binary_search_steps"]), int(s1["max_iterations"]), float(lr),
                abort_early, lo, hi, progress=progress, desc="C&W-wb stage 1", control=sub)
            saved = None
    init_packed = None if init is None or control is None else pack_like(init, x.float())
    sub = None if control is None else control.nested(
        lambda s: {"stage": 2, "init": init_packed, "search": s},
        saved["search"] if saved is not None and saved["stage"] == 2 else None)
    adv, l2, c, fb_adv, fb_score = _cw_search(
        model, x, cls, True, float(kappa), float(s2["c_init"]), bss2, iters2, float(lr),
        abort_early, lo, hi, init=init, extra=penalty, progress=progress,
        desc="C&W-wb stage 2", control=sub)
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
        on_target = _reached(_margin(z.float(), cls, True)[0] + kappa, kappa)
    over_all, on_target_ratio = f2_positive_ratios(f2, on_target)
    return adv, AttackInfo(success=success & on_target & (f2 <= 0), target=cls, extra={
        "f2": f2, "f2_positive_ratio": over_all,
        "f2_positive_ratio_on_target": on_target_ratio,
        "l2": _returned_l2(adv, x, l2),
        "c": c, "classified_as_target": on_target})


def f2_positive_ratios(f2: Tensor, on_target: Tensor) -> tuple[float, float]:
    """C&W-wb's two readings of the paper's Table 3: the share of f2 > 0 over every input,
    and among the inputs on target (the adversarial examples x*; NaN when there are
    none). ``f2`` (B,) and ``on_target`` (B,) bool, as in cw_wb's AttackInfo."""
    positive = f2 > 0
    among = float(positive[on_target].float().mean()) if bool(on_target.any()) else math.nan
    return float(positive.float().mean()), among
