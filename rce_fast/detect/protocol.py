"""The paper's Table 2 protocol: AUC over index pairs (clean correct, adversarial wrong)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._args import check_has_data
from .metrics import _scores_1d, auc, auc_standard_error


def _class_vector(x, name: str, n: int | None) -> np.ndarray:
    if isinstance(x, Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer class indices, got {x.dtype}")
        check_has_data(x, name)
        arr = x.detach().cpu().numpy()
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must be a tensor or array of integer class indices, "
                            f"got {type(x).__name__} of {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got {tuple(arr.shape)}")
    if n is not None and len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} entries but labels has {n}: every input "
                         "needs a label, a clean prediction and an adversarial prediction")
    return arr


def paper_auc(clean_scores: dict, adv_scores: dict, labels: Tensor, clean_pred: Tensor,
              adv_pred: Tensor, standard_errors: bool = False) -> dict:
    """The paper's Table 2 protocol.

    Keeps index pairs whose clean example is classified correctly AND whose adversarial
    counterpart is misclassified; normal = positive; AUC per metric. ``clean_scores`` and
    ``adv_scores`` map metric name -> (N,) scores (higher = more normal), ``labels``,
    ``clean_pred``, ``adv_pred`` are (N,) integer classes (tensors or arrays). Shapes
    must agree exactly (nothing is broadcast) and a NaN score is an error.
    Returns {"n": pairs kept, metric: AUC, ...} (AUC nan when no pair is kept); with
    ``standard_errors=True`` also "se": {metric: DeLong standard error of that AUC}.
    """
    for name, d in (("clean_scores", clean_scores), ("adv_scores", adv_scores)):
        if not isinstance(d, dict):
            raise TypeError(f"{name} must be a dict of metric name -> scores, got "
                            f"{type(d).__name__}")
    y = _class_vector(labels, "labels", None)
    clean_p = _class_vector(clean_pred, "clean_pred", len(y))
    adv_p = _class_vector(adv_pred, "adv_pred", len(y))
    keep = (clean_p == y) & (adv_p != y)
    out = {"n": int(keep.sum())}
    extra = sorted(set(adv_scores) - set(clean_scores))
    if extra:
        raise ValueError(f"adv_scores has metrics that clean_scores lacks: {extra}")
    se = {}
    for name, clean in clean_scores.items():
        if name not in adv_scores:
            raise ValueError(f"adv_scores has no {name!r} entry")
        pos_all = _scores_1d(clean, f"clean_scores[{name!r}]")
        neg_all = _scores_1d(adv_scores[name], f"adv_scores[{name!r}]")
        for label, arr in ((f"clean_scores[{name!r}]", pos_all),
                           (f"adv_scores[{name!r}]", neg_all)):
            if len(arr) != len(y):
                raise ValueError(f"{label} has {len(arr)} scores, expected {len(y)} (one "
                                 "per input, like labels)")
        pos, neg = pos_all[keep], neg_all[keep]
        out[name] = auc(pos, neg)
        if standard_errors:
            se[name] = auc_standard_error(pos, neg)
    if standard_errors:
        out["se"] = se
    return out
