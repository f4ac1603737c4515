"""Detection rates at operating points: AUROC, AUPR, FPR at 95% TPR, TPR at fixed FPRs,
and robust accuracy of a classifier + detector pair.

Conventions (the same everywhere in rce_fast):

- A detector SCORE is "higher = more likely normal" (log K-density, confidence, ...).
- For detection RATES the ADVERSARIAL inputs are the positive class: the detector flags
  an input when its score is below a threshold, a true positive is a flagged adversarial
  input, a false positive a flagged clean one. (AUROC does not depend on which class is
  called positive; AUPR does: here it is the adversarial class, so
  ``average_precision_score(y_adv, -scores)``.)
- Thresholds are exact order statistics, not interpolated quantiles:
  :func:`threshold_at_fpr` returns the LARGEST t such that the share of clean scores
  strictly below t is at most ``fpr``, and an input is flagged when ``score < t``. With
  n clean scores sorted s_(0) <= ... <= s_(n-1) and k = the largest integer with
  k / n <= fpr, t = s_(k) (t = +inf when k = n). Ties at s_(k) are NOT flagged, so the
  realised false-positive rate on the calibration scores is at most ``fpr`` (it is
  below it when s_(k) is tied with lower scores).
- "TPR at FPR f" is the share of adversarial scores below that threshold. It equals the
  true-positive rate of the last point of scikit-learn's ``roc_curve`` (with
  ``drop_intermediate=False``) whose false-positive rate is <= f, and it is computed
  from ``roc_curve``.
- "FPR at 95% TPR" is the smallest false-positive rate among the ``roc_curve`` points
  whose true-positive rate is >= 0.95.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .._args import check_has_data, scalar
from .metrics import auc_standard_error


def as_scores(values, name: str) -> np.ndarray:
    """``values`` (tensor, array or sequence of numbers) as a 1-D float64 array; raises
    TypeError / ValueError naming ``name`` for a wrong type, shape, an empty input or a
    NaN / inf value."""
    if isinstance(values, Tensor):
        if values.dtype == torch.bool or values.dtype.is_complex:
            raise TypeError(f"{name} must hold real numbers, got {values.dtype}")
        check_has_data(values, name)
        arr = values.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(values)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be a 1-D array of numbers: {exc}") from None
        if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer)
                                     or np.issubdtype(arr.dtype, np.floating)):
            raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per input), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{name} contains {bad} NaN or inf value(s)")
    return arr


def _check_fpr(fpr, name: str = "fpr") -> float:
    fpr = scalar(fpr)
    if isinstance(fpr, bool) or not isinstance(fpr, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(fpr).__name__}")
    if not (0.0 <= float(fpr) <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {fpr}")
    return float(fpr)


def _allowed(n: int, fpr: float) -> int:
    """The largest integer k in [0, n] with k / n <= fpr (evaluated as floats, exactly as
    scikit-learn's roc_curve evaluates its false-positive rates)."""
    k = min(n, int(math.floor(fpr * n)))
    while k < n and (k + 1) / n <= fpr:
        k += 1
    while k > 0 and k / n > fpr:
        k -= 1
    return k


def threshold_at_fpr(clean_scores, fpr: float) -> float:
    """The detection threshold calibrated on clean scores for a false-positive rate.

    Args:
        clean_scores: (n,) scores of clean (held-out) inputs, higher = more normal.
        fpr: the false-positive rate allowed, in [0, 1].

    Returns:
        t (float): flag an input when ``score < t``. t is the largest value such that at
        most ``floor(fpr * n)`` clean scores are below it: t = s_(k), the (k+1)-th
        smallest clean score, k = the largest integer with k / n <= fpr; +inf when
        fpr * n >= n. See the module docstring for ties.
    """
    scores = np.sort(as_scores(clean_scores, "clean_scores"))
    k = _allowed(len(scores), _check_fpr(fpr))
    return math.inf if k == len(scores) else float(scores[k])


def _check_fprs(fprs, name: str = "fprs") -> tuple[float, ...]:
    fprs = scalar(fprs)
    if isinstance(fprs, numbers.Real):
        fprs = (fprs,)
    try:
        values = tuple(fprs)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of numbers in [0, 1], got {fprs!r}"
                        ) from None
    if not values:
        raise ValueError(f"{name} is empty")
    return tuple(_check_fpr(f, name) for f in values)


@dataclass(frozen=True)
class DetectionMetrics:
    """What :func:`detection_metrics` returns (floats; dictionaries keyed by FPR).

    auroc, auroc_se: area under the ROC curve and its DeLong standard error.
    aupr: average precision with the adversarial inputs as the positive class.
    fpr_at_95_tpr: smallest FPR whose TPR is >= 0.95.
    tpr_at_fpr: {fpr: TPR} with the threshold set on the clean scores.
    thresholds: {fpr: t}, flag ``score < t`` (see :func:`threshold_at_fpr`).
    n_clean, n_adv: the number of scores on each side.
    """
    auroc: float
    auroc_se: float
    aupr: float
    fpr_at_95_tpr: float
    tpr_at_fpr: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    n_clean: int = 0
    n_adv: int = 0

    def as_dict(self) -> dict:
        """A JSON-friendly dict (FPR keys as strings)."""
        return {"auroc": self.auroc, "auroc_se": self.auroc_se, "aupr": self.aupr,
                "fpr_at_95_tpr": self.fpr_at_95_tpr,
                "tpr_at_fpr": {f"{k:g}": v for k, v in self.tpr_at_fpr.items()},
                "thresholds": {f"{k:g}": v for k, v in self.thresholds.items()},
                "n_clean": self.n_clean, "n_adv": self.n_adv}


def detection_metrics(clean_scores, adv_scores, fprs=(0.01, 0.05, 0.1)) -> DetectionMetrics:
    """The detection metrics researchers report, from scores (higher = more normal).

    Args:
        clean_scores: (n,) scores of clean inputs (the negatives).
        adv_scores: (m,) scores of adversarial inputs (the positives).
        fprs: false-positive rates at which to report the TPR; each in [0, 1].

    Returns:
        :class:`DetectionMetrics`: AUROC (``roc_auc_score``) with its DeLong standard
        error, AUPR (``average_precision_score``, adversarial = positive), FPR at 95% TPR
        and, for every f in ``fprs``, the TPR at FPR f with the threshold set on
        ``clean_scores`` (``roc_curve``; the threshold from :func:`threshold_at_fpr`).

    The arguments may be tensors (any device), NumPy arrays or sequences; NaN / inf,
    empty or non-1-D input raises ValueError naming the argument.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    clean = as_scores(clean_scores, "clean_scores")
    adv = as_scores(adv_scores, "adv_scores")
    targets = _check_fprs(fprs)
    y = np.concatenate([np.zeros(len(clean)), np.ones(len(adv))])
    suspicion = -np.concatenate([clean, adv])   # higher = more adversarial
    roc_fpr, roc_tpr, _ = roc_curve(y, suspicion, drop_intermediate=False)
    first = int(np.searchsorted(roc_tpr, 0.95, side="left"))
    tpr_at, thresholds = {}, {}
    for f in targets:
        tpr_at[f] = float(roc_tpr[np.searchsorted(roc_fpr, f, side="right") - 1])
        thresholds[f] = threshold_at_fpr(clean, f)
    return DetectionMetrics(
        auroc=float(roc_auc_score(y, suspicion)),
        auroc_se=auc_standard_error(clean, adv),
        aupr=float(average_precision_score(y, suspicion)),
        fpr_at_95_tpr=float(roc_fpr[first]),
        tpr_at_fpr=tpr_at, thresholds=thresholds, n_clean=len(clean), n_adv=len(adv))


def _as_classes(values, name: str, n: int) -> np.ndarray:
    if isinstance(values, Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or \
                values.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer class indices, got {values.dtype}")
        check_has_data(values, name)
        arr = values.detach().cpu().numpy()
    else:
        arr = np.asarray(values)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like adv_scores, got {arr.shape}")
    if n and arr.min() < 0:
        raise ValueError(f"{name} holds a negative class index ({arr.min()})")
    return arr.astype(np.int64)


def robust_accuracy(heldout_scores, adv_scores, adv_predictions, labels,
                    fpr: float = 0.05) -> float:
    """Robust accuracy of a classifier + detector pair at a false-positive rate.

    The threshold t = ``threshold_at_fpr(heldout_scores, fpr)`` is calibrated on HELD-OUT
    clean inputs (not the clean inputs you report on). An attacked input counts as a
    defence success when it is flagged (``score < t``) OR still classified correctly;
    the robust accuracy is the share of such inputs, and 1 minus it is the attack's
    success rate against the defended model.

    Args:
        heldout_scores: (n,) detector scores of held-out clean inputs.
        adv_scores: (m,) detector scores of the attacked inputs (all of them, not only
            the ones that fool the classifier).
        adv_predictions: (m,) the classifier's predicted class of each attacked input.
        labels: (m,) true classes.
        fpr: in [0, 1].
    """
    return float(robust_accuracy_curve(heldout_scores, adv_scores, adv_predictions, labels,
                                       (fpr,))[1][0])


def robust_accuracy_curve(heldout_scores, adv_scores, adv_predictions, labels,
                          fprs=None) -> tuple[np.ndarray, np.ndarray]:
    """Robust accuracy (see :func:`robust_accuracy`) at every FPR of ``fprs`` (default
    0, 0.005, ..., 0.2). Returns ``(fprs, accuracy)``, two float64 arrays."""
    held = as_scores(heldout_scores, "heldout_scores")
    adv = as_scores(adv_scores, "adv_scores")
    pred = _as_classes(adv_predictions, "adv_predictions", len(adv))
    true = _as_classes(labels, "labels", len(adv))
    grid = np.linspace(0.0, 0.2, 41) if fprs is None else np.asarray(_check_fprs(fprs))
    correct = pred == true
    acc = np.array([np.mean((adv < threshold_at_fpr(held, f)) | correct) for f in grid])
    return grid.astype(np.float64), acc


def plot_robust_accuracy(curves: dict, path, title: str | None = None):
    """Plot robust accuracy against FPR to a PNG.

    Args:
        curves: {label: (fprs, accuracy)} (e.g. from :func:`robust_accuracy_curve`), one
            line each.
        path: the PNG to write (folders are created).
        title: optional plot title.
    Returns the path written.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, (x, acc) in curves.items():
        x, acc = np.asarray(x, dtype=np.float64), np.asarray(acc, dtype=np.float64)
        if x.shape != acc.shape or x.ndim != 1:
            raise ValueError(f"curves[{label!r}] must be two 1-D arrays of the same length")
        ax.plot(x, acc, label=str(label))
    ax.set_xlabel("false-positive rate on clean inputs (threshold on held-out data)")
    ax.set_ylabel("robust accuracy (detected or correct)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # a PNG whatever the name (temp files)
    plt.close(fig)
    return path
