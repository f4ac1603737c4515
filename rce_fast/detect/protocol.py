"""The paper's Table 2 protocol: AUC over index pairs (clean correct, adversarial wrong)."""
from __future__ import annotations

from torch import Tensor

from .metrics import auc, auc_standard_error

def paper_auc(clean_scores: dict, adv_scores: dict, labels: Tensor, clean_pred: Tensor,
              adv_pred: Tensor, standard_errors: bool = False) -> dict:
    """The paper's Table 2 protocol.

    Keeps index pairs whose clean example is classified correctly AND whose adversarial
    counterpart is misclassified; normal = positive; AUC per metric. ``clean_scores`` and
    ``adv_scores`` map metric name -> (N,) scores (higher = more normal).
    Returns {"n": pairs kept, metric: AUC, ...} (AUC nan when no pair is kept); with
    ``standard_errors=True`` also "se": {metric: DeLong standard error of that AUC}.
    """
    keep = ((clean_pred == labels) & (adv_pred != labels)).cpu()
    out = {"n": int(keep.sum())}
    se = {}
    for name, clean in clean_scores.items():
        if name not in adv_scores:
            raise ValueError(f"adv_scores has no {name!r} entry")
        if clean.shape != keep.shape or adv_scores[name].shape != keep.shape:
            raise ValueError(f"scores for {name!r} must have shape {tuple(keep.shape)}")
        pos = clean.detach().cpu()[keep].double().numpy()
        neg = adv_scores[name].detach().cpu()[keep].double().numpy()
        out[name] = auc(pos, neg)
        if standard_errors:
            se[name] = auc_standard_error(pos, neg)
    if standard_errors:
        out["se"] = se
    return out
