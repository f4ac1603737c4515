"""Scores and statistics of detection: confidence, non-ME, thresholds, AUC and its
DeLong standard error. Every score is "higher = more likely normal"."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .. import _torch_impl
from .._args import check_has_data
from .._torch_impl import acc_dtype, all_finite
from ._checks import _FLOAT


def _check_logits(x, name="decision_logits") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] < 2:
        raise ValueError(f"{name} must have shape (N, L) with L >= 2, got {tuple(x.shape)}")
    check_has_data(x, name)
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or inf values")


def confidence(decision_logits: Tensor) -> Tensor:
    """max_i softmax(decision_logits)_i per row, (N,) float32 (float64 for float64)."""
    _check_logits(decision_logits)
    z = decision_logits.to(acc_dtype(decision_logits.dtype))
    return _torch_impl.softmax(z, -1).amax(-1)  # no exp underflow slow path on CPU


def non_me(decision_logits: Tensor) -> Tensor:
    """Non-maximal entropy per row: the entropy of the renormalised non-top probabilities.

    q_i = p_i / sum_{j != top} p_j for i != top; returns -sum q_i log q_i in
    [0, log(L - 1)], computed in log space (stable for any logits and any L).
    """
    _check_logits(decision_logits)
    z = decision_logits.to(acc_dtype(decision_logits.dtype))
    top = z.argmax(-1, keepdim=True)
    log_q = _torch_impl.log_softmax(z.scatter(-1, top, float("-inf")), -1)
    q = _torch_impl.exp_flush(log_q)  # exact 0 at -inf; no underflow slow path on CPU
    # the sign inside the sum: the same values, and +0 (not -0) for two classes
    return (q * torch.where(q > 0, -log_q, 0.0)).sum(-1)


def _scores_1d(x, name: str) -> np.ndarray:
    """Scores as a float64 NumPy vector: a 1-D tensor or array of real numbers, no NaN."""
    if isinstance(x, Tensor):
        if x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got {x.dtype}")
        check_has_data(x, name)
        arr = x.detach().cpu().double().numpy()
    else:
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a tensor or array of scores, got "
                            f"{type(x).__name__}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one score per input, shape (N,), got {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN scores ({int(np.isnan(arr).sum())} of "
                         f"{arr.size}); a NaN cannot be ranked")
    return arr


def threshold_for_fpr(clean_scores: Tensor, fpr: float) -> float:
    """The ``fpr`` quantile of the clean scores, interpolated linearly between order
    statistics (``torch.quantile``). Flagging ``score < t`` may then flag MORE than a
    fraction ``fpr`` of those scores (n = 10, fpr = 0.05: one of ten). For a detection
    threshold use :func:`rce_fast.detect.threshold_at_fpr` (an order statistic that
    flags at most ``floor(fpr * n)``), which every detector's ``fit_threshold`` uses."""
    from .rates import _check_fpr, as_scores  # (rates imports this module)
    scores = as_scores(clean_scores, "clean_scores")  # finite: inf would interpolate to NaN
    return float(torch.quantile(torch.from_numpy(scores), _check_fpr(fpr)))


# -------------------------------------------------------------------------- AUC protocol

def auc(pos_scores, neg_scores) -> float:
    """ROC AUC with positives scoring higher, by the rank-sum (Mann-Whitney) formula,
    ties counted as half; equals sklearn's roc_auc_score. Each side is (N,) scores (a
    tensor, array or sequence; nothing is flattened). NaN when a side is empty; a NaN
    score is an error (it cannot be ranked)."""
    pos = _scores_1d(pos_scores, "pos_scores")
    neg = _scores_1d(neg_scores, "neg_scores")
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = _midranks(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _midranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks of v, ties sharing their average rank."""
    order = np.argsort(v, kind="mergesort")
    _, start, counts = np.unique(v[order], return_index=True, return_counts=True)
    ranks = np.empty(len(v))
    ranks[order] = np.repeat(start + (counts + 1) / 2.0, counts)
    return ranks


def auc_standard_error(pos_scores, neg_scores) -> float:
    """Standard error of :func:`auc` from the scores themselves (DeLong et al. 1988).

    Two AUCs from independent samples differ by noise alone when their gap is within
    about 2 * sqrt(se1^2 + se2^2). nan with fewer than two scores on either side.
    """
    pos = _scores_1d(pos_scores, "pos_scores")
    neg = _scores_1d(neg_scores, "neg_scores")
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        return float("nan")
    both = _midranks(np.concatenate([pos, neg]))
    v10 = (both[:m] - _midranks(pos)) / n          # share of negatives below each positive
    v01 = 1.0 - (both[m:] - _midranks(neg)) / m    # share of positives above each negative
    return float(math.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n))

