"""One way to score inputs with any detector: K-density, the logit scores, LID,
Mahalanobis, or your own.

A *detector* here is one of

- a :class:`~rce_fast.detect.KDensityDetector` (scored on the classifier's last hidden
  layer against the bank of the PREDICTED class);
- the string ``"confidence"`` or ``"non-ME"`` (scores of the decision logits);
- any object with ``score_inputs(model, x) -> (decision_logits (B, L), scores (B,))``
  (``LIDDetector`` and ``MahalanobisDetector`` have it; so can yours).

Scores are "higher = more likely normal".
"""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._args import check_int
from .._modes import model_in_eval_mode
from .kd_detector import KDensityDetector
from .metrics import confidence, non_me

#: Scores computed from the decision logits alone, by name.
LOGIT_SCORES = {"confidence": confidence, "non-ME": non_me, "non_me": non_me}


def _model_device(model) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def check_detector(detector) -> None:
    """TypeError unless ``detector`` is one of the kinds listed in the module docstring."""
    if isinstance(detector, str):
        if detector not in LOGIT_SCORES:
            raise ValueError(f"detector {detector!r} is not a known score; use one of "
                             f"{sorted(LOGIT_SCORES)} or a detector object")
        return
    if isinstance(detector, KDensityDetector):
        if detector.index is None:
            raise ValueError("detector is not fitted: call detector.fit(features, labels)")
        return
    if not callable(getattr(detector, "score_inputs", None)):
        raise TypeError("detector must be a KDensityDetector, 'confidence', 'non-ME', or an "
                        "object with score_inputs(model, x) -> (logits, scores); got "
                        f"{type(detector).__name__}")
    if getattr(detector, "fitted", True) is False:
        raise ValueError(f"detector ({type(detector).__name__}) is not fitted: call "
                         "detector.fit(...) first")


def score_inputs(model, detector, x: Tensor) -> tuple[Tensor, Tensor]:
    """(decision logits (B, L), detector scores (B,)) of one batch ``x``.

    Differentiable w.r.t. ``x`` when autograd is enabled (the K-density through the
    fused op). ``model`` returns decision logits; K-density needs
    ``model.logits_and_features`` (rce_fast.models.Classifier has it). The model runs in
    eval mode (each module's train/eval flag is restored afterwards; BatchNorm's running
    statistics are used, never updated).
    """
    check_detector(detector)
    with model_in_eval_mode(model):
        if isinstance(detector, str):
            logits = model(x)
            return logits, LOGIT_SCORES[detector](logits)
        if isinstance(detector, KDensityDetector):
            fn = getattr(model, "logits_and_features", None)
            if fn is None:
                raise TypeError("K-density needs the model's features: pass a module with "
                                "logits_and_features(x), such as rce_fast.models.Classifier")
            logits, feats = fn(x)
            bank_classes = detector.index.num_classes if detector.index is not None else None
            if bank_classes is not None and logits.dim() == 2 and \
                    logits.shape[1] != bank_classes:
                raise ValueError(f"the model has {logits.shape[1]} classes but the "
                                 f"detector's bank has {bank_classes}: it was fitted with "
                                 "another model")
            return logits, detector.score(feats, logits.argmax(1))
        return detector.score_inputs(model, x)


def score_dataset(model, detector, x: Tensor, batch_size: int = 512,
                  progress: bool = False, desc: str = "scoring") -> tuple[Tensor, Tensor]:
    """Predicted classes (N,) int64 and scores (N,) float64 of ``x``, both on the CPU.

    Batches of ``batch_size`` are moved to the model's device one at a time, so ``x`` may
    live on the CPU (memory on the device does not grow with N). Autograd is off (a
    detector that needs an input gradient, such as Mahalanobis with pre-processing,
    turns it on for itself).
    """
    batch_size = check_int(batch_size, "batch_size", 1)
    check_detector(detector)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor batch of inputs, got {type(x).__name__}")
    device = _model_device(model)
    preds, scores = [], []
    for xb in tqdm(x.split(batch_size), desc=desc, disable=not progress, leave=False):
        with torch.no_grad():
            logits, s = score_inputs(model, detector, xb.to(device))
        preds.append(logits.argmax(1).cpu())
        scores.append(s.detach().double().cpu())
    if not preds:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(preds), torch.cat(scores)
