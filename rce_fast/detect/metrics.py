"""Scores and statistics of detection: confidence, non-ME, thresholds, AUC and its
DeLong standard error. Every score is "higher = more likely normal"."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .._torch_impl import acc_dtype
from ._checks import _FLOAT

def _check_logits(x, name="decision_logits") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] < 2:
        raise ValueError(f"{name} must have shape (N, L) with L >= 2, got {tuple(x.shape)}")


def confidence(decision_logits: Tensor) -> Tensor:
    """max_i softmax(decision_logits)_i per row, (N,) float32 (float64 for float64)."""
    _check_logits(decision_logits)
    z = decision_logits.to(acc_dtype(decision_logits.dtype))
    return torch.softmax(z, -1).amax(-1)


def non_me(decision_logits: Tensor) -> Tensor:
    """Non-maximal entropy per row: the entropy of the renormalised non-top probabilities.

    q_i = p_i / sum_{j != top} p_j for i != top; returns -sum q_i log q_i in
    [0, log(L - 1)], computed in log space (stable for any logits and any L).
    """
    _check_logits(decision_logits)
    z = decision_logits.to(acc_dtype(decision_logits.dtype))
    top = z.argmax(-1, keepdim=True)
    log_q = torch.log_softmax(z.scatter(-1, top, float("-inf")), -1)
    q = log_q.exp()
    return -(q * torch.where(q > 0, log_q, 0.0)).sum(-1)



def threshold_for_fpr(clean_scores: Tensor, fpr: float) -> float:
    """Score threshold t such that a fraction ``fpr`` of clean scores fall below t."""
    if clean_scores.numel() == 0:
        raise ValueError("clean_scores is empty: a threshold needs clean data")
    return float(torch.quantile(clean_scores.double().cpu(), fpr))


# -------------------------------------------------------------------------- AUC protocol

def auc(pos_scores, neg_scores) -> float:
    """ROC AUC with positives scoring higher, by the rank-sum (Mann-Whitney) formula,
    ties counted as half; equals sklearn's roc_auc_score."""
    pos = np.asarray(pos_scores, dtype=np.float64).ravel()
    neg = np.asarray(neg_scores, dtype=np.float64).ravel()
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
    pos = np.asarray(pos_scores, dtype=np.float64).ravel()
    neg = np.asarray(neg_scores, dtype=np.float64).ravel()
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        return float("nan")
    both = _midranks(np.concatenate([pos, neg]))
    v10 = (both[:m] - _midranks(pos)) / n          # share of negatives below each positive
    v01 = 1.0 - (both[m:] - _midranks(neg)) / m    # share of positives above each negative
    return float(math.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n))

