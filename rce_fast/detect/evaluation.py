"""Evaluate classifier + detector pairs against attacks: AUROC, TPR and robust accuracy
at a false-positive rate calibrated on held-out clean inputs."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from .rates import (_check_fpr, _check_fprs, detection_metrics, robust_accuracy_curve,
                    threshold_at_fpr)
from .._args import check_has_data, check_int
from .._modes import model_in_eval_mode
from ._layered import check_inputs, check_same_shape
from .scoring import _model_device, check_detector, score_dataset


def defense_metrics(heldout_scores, clean_scores, clean_labels, clean_predictions,
                    adv_scores, adv_labels, adv_predictions, fpr: float = 0.05,
                    adversarial: str = "misclassified") -> dict:
    """Metrics of one detector against one attack, from scores (higher = more normal).

    Args:
        heldout_scores: (h,) scores of held-out clean inputs: they set the threshold
            t = ``threshold_at_fpr(heldout_scores, fpr)`` (flag ``score < t``).
        clean_scores, clean_labels, clean_predictions: (n,) scores, true and predicted
            classes of the clean test inputs.
        adv_scores, adv_labels, adv_predictions: (m,) the same for the attacked inputs.
        fpr: the false-positive rate of the operating point.
        adversarial: which attacked inputs the detection rates use: "misclassified"
            (those that fool the classifier; the default) or "all".

    Returns a dict: ``auroc``, ``auroc_se`` (DeLong), ``aupr``, ``fpr_at_95_tpr`` (all
    clean test inputs against the chosen attacked inputs, :func:`detection_metrics`),
    ``tpr`` (share of the chosen attacked inputs flagged at t), ``clean_fpr`` (share of
    the clean test inputs flagged at t: the realised FPR), ``robust_accuracy`` (share
    of ALL attacked inputs flagged or correctly classified), ``attack_success`` (1 minus
    it), ``threshold`` t, ``n_adv_used`` and ``n_attacked``. The detection entries are
    None when no attacked input qualifies.
    """
    fpr = _check_fpr(fpr)
    if adversarial not in ("misclassified", "all"):
        raise ValueError(f"adversarial must be 'misclassified' or 'all', got {adversarial!r}")
    t = threshold_at_fpr(heldout_scores, fpr)
    clean_s = _np(clean_scores)
    adv_s = _np(adv_scores)
    adv_y, adv_p = _np(adv_labels), _np(adv_predictions)
    if not (len(adv_s) == len(adv_y) == len(adv_p)):
        raise ValueError("adv_scores, adv_labels and adv_predictions must have one entry per "
                         f"attacked input; got {len(adv_s)}, {len(adv_y)}, {len(adv_p)}")
    if not (len(clean_s) == len(_np(clean_labels)) == len(_np(clean_predictions))):
        raise ValueError("clean_scores, clean_labels and clean_predictions must have one "
                         "entry per clean input")
    used = adv_s if adversarial == "all" else adv_s[adv_p != adv_y]
    out = {"threshold": t, "n_attacked": int(len(adv_s)), "n_adv_used": int(len(used)),
           "clean_fpr": float(np.mean(clean_s < t))}
    if len(used):
        m = detection_metrics(clean_s, used, fprs=(fpr,))
        out.update(auroc=m.auroc, auroc_se=m.auroc_se, aupr=m.aupr,
                   fpr_at_95_tpr=m.fpr_at_95_tpr, tpr=float(np.mean(used < t)))
    else:
        out.update(auroc=None, auroc_se=None, aupr=None, fpr_at_95_tpr=None, tpr=None)
    acc = robust_accuracy_curve(heldout_scores, adv_s, adv_p, adv_y, (fpr,))[1][0]
    out.update(robust_accuracy=float(acc), attack_success=float(1.0 - acc))
    return out


def _check_classes(y, name: str, n: int | None, classes: int) -> Tensor:
    """``y`` as an int64 CPU tensor of classes in [0, classes), of length ``n`` (if
    given)."""
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a tensor of class indices, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got {y.dtype}")
    if y.dim() != 1 or (n is not None and len(y) != n):
        expected = "(N,)" if n is None else f"({n},) like x_clean"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(y.shape)}")
    check_has_data(y, name)
    y = y.detach().cpu().long()
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"{name} holds classes outside [0, {classes}) (the classifier's "
                         "classes)")
    return y


def _np(values) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def evaluate_detectors(classifier, detectors: Mapping, x_heldout: Tensor, x_clean: Tensor,
                       y_clean: Tensor, x_adv, y_adv: Tensor | None = None,
                       fpr: float = 0.05, adversarial: str = "misclassified",
                       curve_fprs=None, batch_size: int = 512,
                       progress: bool = False) -> dict:
    """AUROC, TPR and robust accuracy at ``fpr`` for every detector and attack.

    Args:
        classifier: module returning decision logits (rce_fast.models.Classifier).
        detectors: {name: detector}: a KDensityDetector, "confidence", "non-ME", an
            LIDDetector, a MahalanobisDetector, or any object with ``score_inputs``.
        x_heldout: held-out clean inputs (threshold calibration; not x_clean).
        x_clean, y_clean: clean test inputs and their classes.
        x_adv: one tensor of attacked inputs, or {attack name: tensor}.
        y_adv: true classes of the attacked inputs (default ``y_clean``: x_adv[i]
            crafted from x_clean[i]).
        curve_fprs: FPRs for the robust-accuracy curve (default 0, 0.005, ..., 0.2).

    Returns {attack: {detector: :func:`defense_metrics` dict + "curve": (fprs,
    robust accuracy) arrays}} (with one tensor, the attack is called "attack").
    Inputs are scored once each, in batches moved to the classifier's device.
    """
    if not isinstance(detectors, Mapping):
        raise TypeError("detectors must be a mapping {name: detector}, got "
                        f"{type(detectors).__name__}")
    if not detectors:
        raise ValueError("detectors is empty: pass at least one {name: detector}")
    for det in detectors.values():
        check_detector(det)
    attacks = dict(x_adv) if isinstance(x_adv, Mapping) else {"attack": x_adv}
    if not attacks:
        raise ValueError("x_adv is empty: pass a tensor or at least one {attack: tensor}")
    check_inputs(x_heldout, "x_heldout")
    check_inputs(x_clean, "x_clean")
    for name, xa in attacks.items():
        where = "x_adv" if not isinstance(x_adv, Mapping) else f"x_adv[{name!r}]"
        check_inputs(xa, where)
        for x, x_name in ((x_heldout, "x_heldout"), (xa, where)):
            check_same_shape(x, x_clean, x_name, "x_clean")
    batch_size = check_int(batch_size, "batch_size", 1)
    fpr = _check_fpr(fpr)
    if curve_fprs is not None:
        curve_fprs = _check_fprs(curve_fprs, "curve_fprs")
    if adversarial not in ("misclassified", "all"):
        raise ValueError(f"adversarial must be 'misclassified' or 'all', got {adversarial!r}")
    with torch.no_grad(), model_in_eval_mode(classifier):  # the classifier's class count
        classes = classifier(x_clean[:1].to(_model_device(classifier))).shape[-1]
    y_clean = _check_classes(y_clean, "y_clean", len(x_clean), classes)
    y_adv = y_clean if y_adv is None else _check_classes(y_adv, "y_adv", None, classes)
    for attack, xa in attacks.items():
        if len(xa) != len(y_adv):
            where = "x_adv" if not isinstance(x_adv, Mapping) else f"x_adv[{attack!r}]"
            raise ValueError(f"{where} has {len(xa)} inputs but y_adv has {len(y_adv)} "
                             "(pass y_adv when the attacked inputs are not x_clean's)")
    out = {name: {} for name in attacks}
    for det_name, det in detectors.items():
        _, held = score_dataset(classifier, det, x_heldout, batch_size, progress,
                                f"{det_name} held-out")
        clean_pred, clean = score_dataset(classifier, det, x_clean, batch_size, progress,
                                          f"{det_name} clean")
        for attack, xa in attacks.items():
            adv_pred, adv = score_dataset(classifier, det, xa, batch_size, progress,
                                          f"{det_name} {attack}")
            res = defense_metrics(held, clean, y_clean, clean_pred, adv, y_adv, adv_pred,
                                  fpr, adversarial)
            res["curve"] = robust_accuracy_curve(held, adv, adv_pred, torch.as_tensor(y_adv),
                                                 curve_fprs)
            out[attack][det_name] = res
    return out
