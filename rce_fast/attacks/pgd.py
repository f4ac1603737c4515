"""PGD and Orthogonal PGD: the adaptive attacks on a classifier + detector pair.

- :func:`pgd`: projected gradient descent (Madry et al. 2018), L-inf or L2, with a
  random start and restarts, on any model returning decision logits, in particular a
  :class:`rce_fast.detect.GuardedClassifier`: attacking its L + 1 logits attacks the
  classifier and the detector together (Carlini & Wagner 2017, section 5), and the
  "flagged" class L counts as a failure, like the true class.
- :func:`orthogonal_pgd`: Orthogonal PGD (Bryniarski et al. 2022), which alternates
  between fooling the classifier and evading the detector, each step projected
  orthogonal to the gradient of the other objective.

Same conventions as the other attacks: a batch is attacked at once on its device, the
result is clipped to ``clip`` and has the input's shape, dtype and device; random
draws are seeded; ``return_info=True`` adds an :class:`AttackInfo`. No step synchronises
with the host (no ``.item()``, no data-dependent shapes), so on a GPU the steps queue.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .._args import move_to
from ._common import (AttackInfo, check_clip, check_images, check_int, check_positive,
                      decision_logits, first_call, generator_for, preserves_model_state,
                      resolve_target)

_NORMS = ("linf", "l2")
_LOSSES = ("ce", "margin")


def _guarded(model):
    from rce_fast.detect import GuardedClassifier
    return model if isinstance(model, GuardedClassifier) else None


def _scaled(v: Tensor) -> tuple[Tensor, Tensor]:
    """(B, ...) -> (v / m flattened, m): m the per-example largest |v| (1 where v is 0),
    float32 (float64 for float64). Norms and dot products of v / m cannot overflow, so a
    direction or a delta past 1.8e19 (whose square is inf in float32) keeps its norm."""
    flat = v.flatten(1)
    flat = flat if flat.dtype == torch.float64 else flat.float()
    m = flat.abs().amax(1)
    m = torch.where(m > 0, m, torch.ones_like(m))
    return flat / m.unsqueeze(1), m


def _l2(v: Tensor) -> Tensor:
    """(B, ...) -> (B,) L2 norm per example, without overflow (see ``_scaled``)."""
    unit, m = _scaled(v)
    return m * torch.linalg.vector_norm(unit, dim=1)


def _unit(v: Tensor) -> Tensor:
    """(B, ...) -> (B, n) v / ||v|| per example (0 where v is 0), at any scale: a
    gradient of norm 1e-20 gives a full step, not one cut by a floor on the norm."""
    scaled, _ = _scaled(v)
    # each nonzero row of ``scaled`` has a component of magnitude 1, so its norm is >= 1
    return scaled / torch.linalg.vector_norm(scaled, dim=1, keepdim=True).clamp(min=1.0)


def _view(x: Tensor) -> tuple:
    return (-1,) + (1,) * (x.dim() - 1)


def _random_start(x: Tensor, eps: float, norm: str, g: torch.Generator) -> Tensor:
    """A uniform draw from the eps-ball around x (L-inf: the cube; L2: the ball)."""
    if norm == "linf":
        u = torch.rand(x.shape, generator=g, device=x.device, dtype=torch.float32)
        return (x + ((2 * u - 1) * eps).to(x.dtype))
    d = x[0].numel()
    direction = torch.randn(x.shape, generator=g, device=x.device, dtype=torch.float32)
    direction = _unit(direction).view(x.shape)
    radius = torch.rand(x.shape[0], generator=g, device=x.device) ** (1.0 / d) * eps
    return x + (direction * radius.view(_view(x))).to(x.dtype)


class _Ball:
    """Steps and projection onto {eps-ball around x} intersected with the box."""

    def __init__(self, x: Tensor, eps: float, norm: str, lo: float, hi: float) -> None:
        self.x, self.eps, self.norm, self.lo, self.hi = x, eps, norm, lo, hi
        if norm == "linf":  # the intersection is a box too: one clamp per step
            self.low = (x - eps).clamp_(min=lo)
            self.high = (x + eps).clamp_(max=hi)

    def step(self, xa: Tensor, direction: Tensor, alpha: float) -> Tensor:
        """x_a + alpha * (sign(d) for L-inf, d / ||d|| for L2), then the projection."""
        if self.norm == "linf":
            return torch.clamp(torch.add(xa, direction.sign(), alpha=alpha), self.low,
                               self.high)
        xa = xa + (alpha * _unit(direction)).view(xa.shape).to(xa.dtype)
        return self.project(xa)

    def project(self, xa: Tensor) -> Tensor:
        if self.norm == "linf":
            return torch.clamp(xa, self.low, self.high)
        delta = xa - self.x
        n = _l2(delta)
        factor = torch.where(n > self.eps, self.eps / n, torch.ones_like(n))
        return (self.x + delta * factor.view(_view(self.x)).to(delta.dtype)).clamp(self.lo,
                                                                               self.hi)


def _distances(xa: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    d = (xa - x).flatten(1).float()
    return d.abs().amax(1), d.norm(dim=1)


def _objective(logits: Tensor, cls: Tensor, targeted: bool, avoid_flag: bool, loss: str):
    """(loss to MAXIMISE (B,), success (B,) bool) from logits (B, K).

    Untargeted: ``cls`` is the label; the classes to avoid are the label and, on a
    guarded model, the "flagged" class K - 1. CE: -log(sum of the avoided classes'
    probabilities) (= cross-entropy for a plain model); margin: best other logit minus
    best avoided logit. Targeted: CE: log p_t; margin: Z_t - max_{i != t} Z_i.
    """
    z = logits if logits.dtype == torch.float64 else logits.float()
    pred = z.argmax(1)
    if not targeted and not avoid_flag and loss == "ce":
        return F.cross_entropy(z, cls, reduction="none"), pred != cls
    rows = torch.arange(z.shape[0], device=z.device)
    if targeted:
        success = pred == cls
        if loss == "ce":
            return -F.cross_entropy(z, cls, reduction="none"), success
        real = z[rows, cls]
        other = z.scatter(1, cls.unsqueeze(1), float("-inf")).amax(1)
        return real - other, success
    avoid = torch.zeros_like(z, dtype=torch.bool)
    avoid[rows, cls] = True
    if avoid_flag:
        avoid[:, -1] = True
    success = ~avoid[rows, pred]
    if loss == "ce":
        lse_all = torch.logsumexp(z, 1)
        lse_avoid = torch.logsumexp(z.masked_fill(~avoid, float("-inf")), 1)
        return lse_all - lse_avoid, success
    best_other = z.masked_fill(avoid, float("-inf")).amax(1)
    best_avoid = z.masked_fill(~avoid, float("-inf")).amax(1)
    return best_other - best_avoid, success


def _check_common(x, eps, norm, steps, step_size, clip, default_step):
    check_images(x)
    lo, hi = check_clip(clip)
    eps = check_positive(eps, "eps")
    if norm not in _NORMS:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    steps = check_int(steps, "steps", 1)
    alpha = default_step(eps, steps) if step_size is None else check_positive(step_size,
                                                                             "step_size")
    return lo, hi, eps, steps, alpha


def _labels_and_target(clean: Tensor, labels, target, seed):
    """Labels (B,) (default: the clean prediction) and the resolved target or None."""
    batch, num_classes = clean.shape
    if labels is None:
        y = clean.argmax(1)
    else:
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or \
                labels.dtype == torch.bool:
            raise TypeError("labels must be an integer tensor of class indices")
        if tuple(labels.shape) != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        y = move_to(labels, clean.device, "labels").long()
        if bool(((y < 0) | (y >= num_classes)).any()):
            raise ValueError(f"labels holds classes outside [0, {num_classes})")
    t = None if target is None else resolve_target(target, clean, seed)
    return y, t


@preserves_model_state
def pgd(model, x: Tensor, eps: float, norm: str = "linf", steps: int = 40,
        step_size: float | None = None, random_start: bool = True, restarts: int = 1,
        target=None, labels=None, loss: str = "ce", clip=(-0.5, 0.5), seed: int = 0,
        progress: bool = False, return_info: bool = False):
    """Projected gradient descent (Madry et al. 2018), L-inf or L2, batched.

    Args:
        model: module returning decision logits (B, L), or a
            :class:`rce_fast.detect.GuardedClassifier` (B, L + 1): then the "flagged"
            class is avoided like the label, so success means misclassified AND not
            flagged (the adaptive attack of Carlini & Wagner 2017, section 5).
        x: (B, ...) inputs inside ``clip``.
        eps: radius of the L-inf or L2 ball around x.
        norm: "linf" (sign steps, clamp) or "l2" (normalised steps, rescale).
        steps: iterations per restart; step_size: default 2.5 * eps / steps (Madry et al.).
        random_start: start from a uniform draw in the ball (seeded), else from x.
        restarts: independent runs (each with its own random start); per input the best
            is kept.
        target: None (untargeted: away from ``labels``), a LongTensor (B,), "random"
            (a random wrong class, seeded) or "least_likely" (of the classifier).
        labels: true classes (B,); default the classifier's prediction on x.
        loss: "ce" (cross-entropy; untargeted on a guarded model: -log(p_label +
            p_flagged)) or "margin" (C&W-style logit margin).
        return_info: also return :class:`AttackInfo` with ``success``, ``target``,
            ``labels``, ``prediction`` (arg max of the model's logits, L = flagged on a
            guarded model), ``flagged`` (guarded model only), ``loss``, ``linf``, ``l2``.

    Returns the best iterate per input over every step and restart: a successful one
    if any (the highest loss among them), else the highest-loss one. Same shape, dtype
    and device as ``x``.
    """
    lo, hi, eps, steps, alpha = _check_common(x, eps, norm, steps, step_size, clip,
                                              lambda e, s: 2.5 * e / max(s, 1))
    restarts = check_int(restarts, "restarts", 1)
    if loss not in _LOSSES:
        raise ValueError(f"loss must be 'ce' or 'margin', got {loss!r}")
    guarded = _guarded(model) is not None
    x0 = x.detach()
    generator_for(seed, "cpu")  # checks the seed before any work
    with torch.no_grad():
        clean = decision_logits(model, x0, first=True)
    base = clean[:, :-1] if guarded else clean
    y, t = _labels_and_target(base, labels, target, seed)
    targeted = t is not None
    cls = t if targeted else y
    g = generator_for(seed, x.device)
    view = _view(x0)
    best = x0.clone()
    best_loss = torch.full((x0.shape[0],), -math.inf, device=x.device)
    best_ok = torch.zeros(x0.shape[0], dtype=torch.bool, device=x.device)

    def keep(xa, value, ok):
        nonlocal best, best_loss, best_ok
        value = value.detach().to(best_loss.dtype)
        better = (ok & ~best_ok) | ((ok == best_ok) & (value > best_loss))
        best = torch.where(better.view(view), xa.detach(), best)
        best_loss = torch.where(better, value, best_loss)
        best_ok = best_ok | ok

    ball = _Ball(x0, eps, norm, lo, hi)
    for _ in range(restarts):
        xa = _random_start(x0, eps, norm, g).clamp(lo, hi) if random_start else x0.clone()
        for _ in tqdm(range(steps), desc="PGD", disable=not progress, leave=False):
            xa = xa.detach().requires_grad_(True)
            value, ok = _objective(decision_logits(model, xa), cls, targeted, guarded, loss)
            (grad,) = torch.autograd.grad(value.sum(), [xa])
            keep(xa, value, ok)
            with torch.no_grad():
                xa = ball.step(xa.detach(), grad, alpha)
        with torch.no_grad():
            value, ok = _objective(decision_logits(model, xa), cls, targeted, guarded, loss)
        keep(xa, value, ok)
    adv = best.to(x.dtype)
    if not return_info:
        return adv
    with torch.no_grad():
        pred = decision_logits(model, adv).argmax(1)
    linf, l2 = _distances(adv, x0)
    extra = {"labels": y, "prediction": pred, "loss": best_loss, "linf": linf, "l2": l2}
    if guarded:
        extra["flagged"] = pred == clean.shape[1] - 1
    return adv, AttackInfo(success=best_ok, target=t, extra=extra)


def _orthogonal(v: Tensor, u: Tensor) -> Tensor:
    """v minus its projection on u, per example: v - (<v, u> / <u, u>) u."""
    vf, mv = _scaled(v)
    uf, mu = _scaled(u)
    # <v, u> / <u, u> * u = (mv <v', u'> / <u', u'>) u' with v' = v / mv, u' = u / mu
    coef = mv * torch.linalg.vecdot(vf, uf) / torch.linalg.vecdot(uf, uf).clamp(min=1e-30)
    return (v.flatten(1).to(uf.dtype) - coef.unsqueeze(1) * uf).view(v.shape).to(v.dtype)


@preserves_model_state
def orthogonal_pgd(model, x: Tensor, eps: float, norm: str = "linf", steps: int = 100,
                   step_size: float | None = None, target=None, labels=None,
                   orthogonal: bool = True, margin: float = 0.05,
                   random_start: bool = False, clip=(-0.5, 0.5), seed: int = 0,
                   progress: bool = False, return_info: bool = False):
    """Orthogonal PGD on a classifier + detector pair.

    After Bryniarski, Hingun, Pachuca, Wang and Carlini, *Evading Adversarial Example
    Detection Defenses with Orthogonal Projected Gradient Descent* (ICLR 2022). With
    f the classifier's loss (cross-entropy; ascended untargeted, descended towards a
    target) and g the detector's score (ascended: towards "normal"), each step takes,
    per input,

    - while the classifier is not yet fooled (with ``margin`` added to the true
      class's logit, as the authors' code does, so the boundary is really crossed):
      grad f minus its projection on grad g, so the step does not move the detector;
    - once it is fooled: grad g minus its projection on grad f, so evading the
      detector does not undo the misclassification;

    then a sign step (L-inf) or a normalised step (L2) of ``step_size``, projected onto
    the eps-ball and the box. ``orthogonal=False`` drops the projections: the same
    alternation is the paper's Selective PGD. Among the iterates that fool the
    classifier, the one the detector finds most normal (highest score) is returned, as
    in the authors' code; where none fooled it, the last iterate.

    Args:
        model: a :class:`rce_fast.detect.GuardedClassifier` (classifier, detector and
            threshold; its detector must have a differentiable score).
        x: (B, ...) inputs inside ``clip``; eps, norm: the threat model.
        steps: iterations (the paper: 100); step_size: default eps / 8 (the authors'
            1/255 at eps 8/255).
        target, labels: as in :func:`pgd` (classes of the classifier).
        margin: decision-logit margin of the switch (0.05 in the authors' code).
        random_start: start from a uniform draw in the ball (the paper starts at x).
        return_info: also return :class:`AttackInfo`: ``success`` (fools the classifier
            AND is not flagged), ``target``, ``labels``, ``prediction`` (classifier),
            ``fooled``, ``flagged``, ``score`` (detector), ``linf``, ``l2``.

    Each step costs one forward pass and two input-gradient backward passes.
    """
    guarded = _guarded(model)
    if guarded is None:
        raise TypeError("model must be a rce_fast.detect.GuardedClassifier (classifier, "
                        "detector and threshold) for orthogonal_pgd, got "
                        f"{type(model).__name__}")
    lo, hi, eps, steps, alpha = _check_common(x, eps, norm, steps, step_size, clip,
                                              lambda e, s: e / 8.0)
    margin = check_positive(margin, "margin", allow_zero=True)
    x0 = x.detach()
    generator_for(seed, "cpu")  # checks the seed before any work
    with torch.no_grad():
        clean, _ = first_call(guarded.logits_and_score, x0)
    y, t = _labels_and_target(clean, labels, target, seed)
    targeted = t is not None
    thr = guarded.threshold
    view = _view(x0)
    rows = torch.arange(x0.shape[0], device=x.device)
    nudge = torch.zeros_like(clean, dtype=torch.float32)
    nudge[rows, y] = margin

    def fooled(z: Tensor, extra: Tensor | float = 0.0) -> Tensor:
        pred = (z.float() + extra).argmax(1)
        return pred == t if targeted else pred != y

    ball = _Ball(x0, eps, norm, lo, hi)
    xa = x0.clone()
    if random_start:
        xa = _random_start(x0, eps, norm, generator_for(seed, x.device)).clamp(lo, hi)
    best = xa.clone()
    best_score = torch.full((x0.shape[0],), -math.inf, device=x.device)
    found = torch.zeros(x0.shape[0], dtype=torch.bool, device=x.device)

    def keep(xa, z, s):
        nonlocal best, best_score, found
        ok = fooled(z)
        s = s.detach().to(best_score.dtype)
        better = ok & (s > best_score)
        best = torch.where(better.view(view), xa.detach(), best)
        best_score = torch.where(better, s, best_score)
        found = found | ok

    for _ in tqdm(range(steps), desc="Orthogonal PGD", disable=not progress, leave=False):
        xa = xa.detach().requires_grad_(True)
        z, s = guarded.logits_and_score(xa)
        zf = z if z.dtype == torch.float64 else z.float()
        f_loss = -F.cross_entropy(zf, t, reduction="sum") if targeted else \
            F.cross_entropy(zf, y, reduction="sum")
        (grad_f,) = torch.autograd.grad(f_loss, [xa], retain_graph=True)
        (grad_g,) = torch.autograd.grad(s.sum(), [xa])
        with torch.no_grad():
            keep(xa, z, s)
            crossed = fooled(z, nudge).view(view)
            if orthogonal:
                direction = torch.where(crossed, _orthogonal(grad_g, grad_f),
                                        _orthogonal(grad_f, grad_g))
            else:
                direction = torch.where(crossed, grad_g, grad_f)
            xa = ball.step(xa.detach(), direction, alpha)
    with torch.no_grad():
        z, s = guarded.logits_and_score(xa)
        keep(xa, z, s)
        adv = torch.where(found.view(view), best, xa).to(x.dtype)
        if not return_info:
            return adv
        z, s = guarded.logits_and_score(adv)
    ok, flagged = fooled(z), s < thr
    linf, l2 = _distances(adv, x0)
    return adv, AttackInfo(success=ok & ~flagged, target=t, extra={
        "labels": y, "prediction": z.argmax(1), "fooled": ok, "flagged": flagged,
        "score": s, "linf": linf, "l2": l2})
