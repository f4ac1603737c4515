"""A classifier and its detector as ONE model with L + 1 decision logits.

After Carlini & Wagner, *Adversarial Examples Are Not Easily Detected: Bypassing Ten
Detection Methods* (AISec 2017), section 5: with a "flagged" class L added, any attack
on a logits model attacks classifier and detector together. C&W write the extra logit
as (Z_D(x) + 1) * max_j Z_j(x), which needs max_j Z_j > 0; here it is additive,

    G(x)_i = Z(x)_i                                      for i < L
    G(x)_L = max_j Z(x)_j + scale * (threshold - s(x))

with s the detector's score (higher = more normal; flagged when s < threshold). So
arg max G = L exactly when the detector flags x, whatever the sign of the logits, and
the classifier's class otherwise (at s == threshold the tie goes to the classifier's
class, as the detector does not flag). A last-bit correction keeps that exact when
the gap is below one unit of rounding of max Z.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from .._args import check_real, scalar
from .._modes import model_in_eval_mode
from .kd_detector import KDensityDetector
from .kdensity import BankIndex, QueryPlan, kdensity_planned
from .scoring import check_detector, score_inputs


def _plan_without_sync(query_classes: Tensor, index: BankIndex) -> QueryPlan:
    """A :class:`QueryPlan` built on the device with no host synchronisation and no checks.

    Valid when every class in ``query_classes`` has bank rows: true for a classifier's
    arg max when L == C and the detector was fitted on every class.
    """
    return QueryPlan.unchecked(query_classes, index)


class GuardedClassifier(nn.Module):
    """Classifier + detector as one ``nn.Module`` returning (B, L + 1) decision logits.

    Args:
        classifier: module returning decision logits (B, L); for K-density it must also
            have ``logits_and_features`` (rce_fast.models.Classifier).
        detector: a fitted :class:`KDensityDetector`, ``"confidence"``, ``"non-ME"``, or
            any object with ``score_inputs(model, x) -> (logits, scores)`` that is
            differentiable (LIDDetector, MahalanobisDetector).
        threshold: flag an input when its score is below it; default the detector's
            ``threshold`` (set by ``fit_threshold``).
        scale: multiplies (threshold - score) in the extra logit (the balance between
            fooling the classifier and evading the detector in a CE-type loss).

    ``forward(x)`` returns G (see the module docstring) in float32 (float64 for float64
    logits): arg max G is L ("flagged") exactly when the detector flags x, else the
    classifier's class. It is differentiable w.r.t. x; for K-density through the fused
    K-density op (Triton on CUDA), with the class grouping built on the device, so a
    forward has no host synchronisation. ``logits_and_score(x)`` gives (Z, s) apart, as
    Orthogonal PGD needs.

    The classifier and detector are never modified: ``train()`` / ``eval()`` on this
    module only set its own flag (attack libraries call them), not the classifier's mode.
    The classifier runs in eval mode whatever its own mode (each module's flag is
    restored afterwards, and BatchNorm's running statistics are never updated).
    """

    def __init__(self, classifier: nn.Module, detector, threshold: float | None = None,
                 scale: float = 1.0) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module returning decision logits, got "
                            f"{type(classifier).__name__}")
        check_detector(detector)
        if threshold is None:
            threshold = getattr(detector, "threshold", None)
            if threshold is None:
                raise ValueError("threshold is None and the detector has none: pass "
                                 "threshold= or call detector.fit_threshold first")
        threshold = check_real(threshold, "threshold")
        if not math.isfinite(threshold):  # +inf: a threshold at fpr = 1 ("flag everything")
            raise ValueError(f"threshold must be finite, got {threshold}" + (
                " (a threshold fitted at fpr = 1 flags every input: the extra logit would "
                "be +inf and its gradient NaN)" if threshold > 0 else
                " (it would flag no input: the extra logit would be -inf for every input, "
                "a guard that never fires)"))
        scale = scalar(scale)
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or \
                not (0 < scale < math.inf):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        if isinstance(detector, KDensityDetector) and \
                not callable(getattr(classifier, "logits_and_features", None)):
            raise TypeError("K-density needs the classifier's features: pass a module with "
                            "logits_and_features(x), such as rce_fast.models.Classifier")
        self.classifier = classifier
        self.detector = detector
        self.threshold = float(threshold)
        self.scale = float(scale)
        self.training = False  # an inference wrapper; see train()

    def train(self, mode: bool = True) -> "GuardedClassifier":
        """Sets this wrapper's flag only: the classifier's mode is left as it is."""
        self.training = bool(mode)
        return self

    def logits_and_score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(classifier decision logits (B, L), detector scores (B,)), differentiable."""
        det = self.detector
        if isinstance(det, KDensityDetector):
            with model_in_eval_mode(self.classifier):
                logits, feats = self.classifier.logits_and_features(x)
            index = det.index
            if logits.shape[1] != index.num_classes:
                raise ValueError(f"the classifier has {logits.shape[1]} classes but the "
                                 f"detector's bank has {index.num_classes}")
            if feats.dim() != 2 or feats.shape[1] != index.bank.shape[1]:
                raise ValueError(f"the classifier's features have shape "
                                 f"{tuple(feats.shape)} but the detector was fitted on "
                                 f"features of size {index.bank.shape[1]}")
            if feats.device != index.bank.device:
                raise ValueError(f"the features are on {feats.device} but the detector's "
                                 f"bank is on {index.bank.device}")
            plan = _plan_without_sync(logits.argmax(1), index)
            scores = kdensity_planned(feats.to(index.bank.dtype), plan, index, det.sigma2)
        else:
            logits, scores = score_inputs(self.classifier, det, x)
        return logits, scores

    def guard(self, logits: Tensor, scores: Tensor) -> Tensor:
        """G from the classifier's logits (B, L) and the detector's scores (B,)."""
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        z = logits.to(acc)
        s = scores.to(acc)
        top = z.max(1).values
        flagged = s < self.threshold
        extra = top + self.scale * (self.threshold - s)
        with torch.no_grad():  # where rounding swallowed a positive gap: one ulp above
            above = torch.nextafter(top, torch.full_like(top, math.inf))
            bump = torch.where(flagged & (extra <= top), above - extra,
                               torch.zeros_like(extra))
        return torch.cat([z, (extra + bump).unsqueeze(1)], 1)

    def forward(self, x: Tensor) -> Tensor:
        logits, scores = self.logits_and_score(x)
        return self.guard(logits, scores)

    def flags(self, x: Tensor) -> Tensor:
        """Bool (B,): the detector flags x (score < threshold). x is checked first (a NaN
        score would compare False: "not flagged"); ``forward`` leaves that check to its
        callers (rce_fast's attacks check x once), as it would cost a host sync per call,
        and NaN in x gives NaN logits there, as in any module."""
        from ._layered import check_inputs
        check_inputs(x, "x")
        with torch.no_grad():
            return self.logits_and_score(x)[1] < self.threshold
