"""Detection metrics for adversarial examples: confidence, non-ME and K-density.

All three scores are "higher = more likely normal" (Pang et al. 2018, section 2 of
the notes). K-density of a feature z with predicted class c is

    KD(z) = mean_{x in bank_c} exp(-||z - x||^2 / sigma2)

returned in LOG space (the plain formula underflows to 0 beyond ||z - x||^2 ~ 40 sigma2).
On CUDA a fused Triton kernel computes it tile by tile with no N x M matrix in memory;
on CPU a blocked PyTorch path keeps memory bounded the same way.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.rce_fast.kdensity_*)
from ._torch_impl import acc_dtype, all_finite

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Kernel widths sigma2 of the authors' release, by training objective.
DEFAULT_SIGMA2 = {"rce": 0.1 / 0.26, "ce": 1.0 / 0.26}


# --------------------------------------------------------------------------- checks

def _check_features(x, name: str, dim: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (rows, D), got {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has feature size {x.shape[1]}, expected {dim} (the bank's)")
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or inf values")


def _check_labels(y, name: str, rows: int, device) -> None:
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got "
                        f"{type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class indices, got {y.dtype}")
    if tuple(y.shape) != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"{name} is on {y.device}, expected {device} like the features")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name} holds a negative class index ({int(y.min())})")


def _check_sigma2(sigma2) -> float:
    if isinstance(sigma2, bool) or not isinstance(sigma2, numbers.Real):
        raise TypeError(f"sigma2 must be a positive float, got {type(sigma2).__name__}")
    if not (math.isfinite(sigma2) and sigma2 > 0):
        raise ValueError(f"sigma2 must be a finite number > 0, got {sigma2}")
    return float(sigma2)


# ------------------------------------------------------------------------ K-density op

@dataclass
class BankIndex:
    """A kernel bank grouped by class: rows of class c are bank[offsets[c]:offsets[c+1]].

    Rows are stored centred on their class mean (``centers``): distances do not change,
    and the ||a||^2 + ||b||^2 - 2ab form loses far less to cancellation.
    """
    bank: Tensor       # (M, D), class-sorted and centred, in the features' dtype
    offsets: Tensor    # (C + 1,) int64
    counts: Tensor     # (C,) int64
    centers: Tensor    # (C, D) in the accumulation dtype
    num_classes: int


def _offsets(counts: Tensor) -> Tensor:
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def build_bank_index(bank: Tensor, bank_labels: Tensor, num_classes: int | None = None
                     ) -> BankIndex:
    """Group (and centre) a kernel bank by class for :func:`kdensity_indexed`."""
    _check_features(bank, "bank")
    if bank.shape[0] == 0:
        raise ValueError("bank is empty: K-density needs at least one bank row")
    _check_labels(bank_labels, "bank_labels", bank.shape[0], bank.device)
    labels = bank_labels.long()
    c = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if int(labels.max()) >= c:
        raise ValueError(f"bank_labels holds class {int(labels.max())} >= num_classes={c}")
    acc = acc_dtype(bank.dtype)
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=c)
    sums = torch.zeros(c, bank.shape[1], dtype=acc, device=bank.device)
    sums.index_add_(0, labels, bank.to(acc))
    centers = sums / counts.clamp(min=1).unsqueeze(1).to(acc)
    sorted_labels = labels[order]
    centred = (bank[order].to(acc) - centers[sorted_labels]).to(bank.dtype)
    return BankIndex(centred, _offsets(counts), counts, centers, c)


class QueryPlan:
    """The class grouping of a fixed set of query classes, computed (and checked) once, so
    that repeated K-density calls on changing features (an attack's inner loop) do no
    re-sorting and no checks."""

    def __init__(self, query_classes: Tensor, index: BankIndex) -> None:
        cls = query_classes.long()
        if cls.numel() and int(cls.max()) >= index.num_classes:
            raise ValueError(f"query_classes holds class {int(cls.max())} but the bank has "
                             f"{index.num_classes} classes")
        empty = index.counts[cls] == 0
        if bool(empty.any()):
            missing = sorted(set(cls[empty].tolist()))
            raise ValueError(f"query_classes asks for classes with no bank rows: {missing}")
        self.order = torch.argsort(cls, stable=True)
        self.cls_sorted = cls[self.order]
        self.q_offsets = _offsets(torch.bincount(cls, minlength=index.num_classes))
        self.log_counts = index.counts[self.cls_sorted].log()
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(len(self.order), device=self.order.device)


def kdensity_planned(queries: Tensor, plan: QueryPlan, index: BankIndex,
                     sigma2: float) -> Tensor:
    """Log K-density with a precomputed :class:`QueryPlan` (no argument checks)."""
    acc = acc_dtype(queries.dtype)
    if queries.shape[0] == 0:
        return queries.new_empty(0, dtype=acc)
    q_sorted = (queries[plan.order].to(acc) - index.centers[plan.cls_sorted]).to(queries.dtype)
    lse = torch.ops.rce_fast.kdensity_lse(q_sorted, plan.q_offsets, index.bank, index.offsets,
                                          sigma2)
    return (lse - plan.log_counts.to(lse.dtype))[plan.inverse]


def kdensity_indexed(queries: Tensor, query_classes: Tensor, index: BankIndex,
                     sigma2: float) -> Tensor:
    """Log K-density of ``queries`` against a prepared :class:`BankIndex` (see kdensity)."""
    _check_features(queries, "queries", index.bank.shape[1])
    if queries.dtype != index.bank.dtype:
        raise TypeError(f"queries are {queries.dtype} but the bank is {index.bank.dtype}")
    if queries.device != index.bank.device:
        raise ValueError(f"queries are on {queries.device} but the bank is on "
                         f"{index.bank.device}")
    _check_labels(query_classes, "query_classes", queries.shape[0], queries.device)
    sigma2 = _check_sigma2(sigma2)
    acc = acc_dtype(queries.dtype)
    if queries.shape[0] == 0:
        return queries.new_empty(0, dtype=acc)
    return kdensity_planned(queries, QueryPlan(query_classes, index), index, sigma2)


def kdensity(queries: Tensor, bank: Tensor, bank_labels: Tensor, query_classes: Tensor,
             sigma2: float) -> Tensor:
    """Log K-density: ``log mean_{j: bank_labels[j] == query_classes[i]} exp(-||q_i - x_j||^2 / sigma2)``.

    Args:
        queries: (N, D) features z_i (float16/bfloat16/float32/float64).
        bank: (M, D) kernel points x_j, same dtype and device as ``queries``.
        bank_labels: (M,) integer class of each bank row.
        query_classes: (N,) integer class whose bank each query is compared with
            (the predicted class in detection); every such class needs >= 1 bank row.
        sigma2: kernel width > 0 (no factor 2, no normalising constant).

    Returns:
        (N,) float32 (float64 for float64 input), differentiable w.r.t. ``queries``:
        d/dz = (2 / sigma2) (sum_j p_j x_j - z), p the softmax over the class's bank.
        Memory is O(N + M) beyond the inputs: no N x M matrix is formed.
    """
    _check_features(queries, "queries")
    _check_features(bank, "bank", queries.shape[1])
    if bank.dtype != queries.dtype:
        raise TypeError(f"bank is {bank.dtype} but queries are {queries.dtype}; use one dtype")
    if bank.device != queries.device:
        raise ValueError(f"bank is on {bank.device} but queries are on {queries.device}")
    return kdensity_indexed(queries, query_classes, build_bank_index(bank, bank_labels),
                            sigma2)


# ------------------------------------------------------------------ logit-based metrics

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


# ---------------------------------------------------------------------------- detector

def _sample_per_class(labels: Tensor, per_class: int, generator: torch.Generator,
                      num_classes: int) -> Tensor:
    """Indices of up to ``per_class`` rows of every class, drawn without replacement."""
    labels_cpu = labels.cpu()
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(labels_cpu == c).squeeze(1)
        if len(idx) > per_class:
            idx = idx[torch.randperm(len(idx), generator=generator)[:per_class]].sort().values
        picks.append(idx)
    return torch.cat(picks).to(labels.device)


class KDensityDetector:
    """K-density detector: a per-class kernel bank of training features, scored in log space.

    Args:
        sigma2: kernel width; default the authors' value for ``objective``
            (0.1/0.26 for RCE, 1/0.26 for CE).
        per_class: training features sampled per class into the bank (1000 in the paper).
        seed: seed of the sampling (the detector is deterministic given it).
        objective: "rce" or "ce", used only for the default sigma2.

    ``fit`` -> ``score`` (log K-density, higher = more normal) -> ``fit_threshold`` ->
    ``detect``. ``class_medians`` gives the per-class median threshold of the white-box
    attack (C&W-wb). ``save`` / ``load`` round-trip everything.
    """

    def __init__(self, sigma2: float | None = None, per_class: int = 1000, seed: int = 0,
                 objective: str = "rce") -> None:
        if objective not in DEFAULT_SIGMA2:
            raise ValueError(f"objective must be 'rce' or 'ce', got {objective!r}")
        self.sigma2 = _check_sigma2(DEFAULT_SIGMA2[objective] if sigma2 is None else sigma2)
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise ValueError(f"per_class must be a positive int, got {per_class!r}")
        self.per_class, self.seed, self.objective = per_class, int(seed), objective
        self.index: BankIndex | None = None
        self.bank: Tensor | None = None
        self.bank_labels: Tensor | None = None
        self.threshold: float | None = None
        self.medians: Tensor | None = None
        self.median_index: BankIndex | None = None

    # -- fitting
    def fit(self, features: Tensor, labels: Tensor, num_classes: int | None = None
            ) -> "KDensityDetector":
        """Sample the bank from training ``features`` (M, D) with TRUE ``labels`` (M,)."""
        _check_features(features, "features")
        _check_labels(labels, "labels", features.shape[0], features.device)
        if features.shape[0] == 0:
            raise ValueError("features is empty: fit needs training features")
        c = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        present = torch.bincount(labels.long().cpu(), minlength=c)
        if len(present) > c:
            raise ValueError(f"labels holds class {len(present) - 1} >= num_classes={c}")
        missing = torch.nonzero(present == 0).squeeze(1).tolist()
        if missing:
            raise ValueError(f"every class needs training features; classes {missing} have none")
        g = torch.Generator().manual_seed(self.seed)
        idx = _sample_per_class(labels.long(), self.per_class, g, c)
        self.bank, self.bank_labels = features[idx].clone(), labels[idx].long()
        self.index = build_bank_index(self.bank, self.bank_labels, c)
        return self

    @property
    def num_classes(self) -> int:
        self._require_fit()
        return self.index.num_classes

    def _require_fit(self) -> None:
        if self.index is None:
            raise RuntimeError("KDensityDetector is not fitted: call fit(features, labels)")

    # -- scoring
    def score(self, features: Tensor, predicted_classes: Tensor,
              batch_size: int | None = None) -> Tensor:
        """Log K-density of each row against the bank of its predicted class, (N,)."""
        self._require_fit()
        if batch_size is None:
            return kdensity_indexed(features.to(self.index.bank.dtype), predicted_classes,
                                    self.index, self.sigma2)
        parts = [self.score(f, p) for f, p in zip(features.split(batch_size),
                                                  predicted_classes.split(batch_size))]
        return torch.cat(parts) if parts else features.new_empty(0)

    def class_medians(self, features: Tensor, labels: Tensor, kernel_points: int = 100
                      ) -> Tensor:
        """Per-class median log K-density of training ``features`` against ``kernel_points``
        bank rows per class (the C&W-wb threshold: f2 > 0 means below the median).

        Stores the medians (``self.medians``, (C,)) and the small bank
        (``self.median_index``) so the attack scores against the same kernel points.
        """
        self._require_fit()
        _check_features(features, "features", self.index.bank.shape[1])
        _check_labels(labels, "labels", features.shape[0], features.device)
        g = torch.Generator().manual_seed(self.seed + 1)
        idx = _sample_per_class(self.bank_labels, kernel_points, g, self.num_classes)
        self.median_index = build_bank_index(self.bank[idx], self.bank_labels[idx],
                                             self.num_classes)
        scores = kdensity_indexed(features.to(self.bank.dtype), labels, self.median_index,
                                  self.sigma2)
        medians = torch.full((self.num_classes,), float("nan"), dtype=scores.dtype,
                             device=scores.device)
        for c in range(self.num_classes):
            sel = scores[labels == c]
            if sel.numel():
                medians[c] = sel.median()
        self.medians = medians
        return medians

    # -- thresholds and decisions
    def fit_threshold(self, clean_features: Tensor, clean_predictions: Tensor,
                      fpr: float = 0.05) -> float:
        """Threshold on log K-density flagging a fraction ``fpr`` of clean inputs."""
        if not (0.0 <= fpr <= 1.0):
            raise ValueError(f"fpr must be in [0, 1], got {fpr}")
        self.threshold = threshold_for_fpr(self.score(clean_features, clean_predictions), fpr)
        return self.threshold

    def detect(self, features: Tensor, predicted_classes: Tensor,
               threshold: float | None = None, batch_size: int = 65536) -> Tensor:
        """Boolean "adversarial" decision per row: log K-density below the threshold."""
        thr = self.threshold if threshold is None else threshold
        if thr is None:
            raise RuntimeError("no threshold: pass threshold= or call fit_threshold first")
        return self.score(features, predicted_classes, batch_size=batch_size) < thr

    def detect_stream(self, batches: Iterable[tuple[Tensor, Tensor]],
                      threshold: float | None = None) -> Iterator[Tensor]:
        """Decisions for an iterable of (features, predicted_classes) batches, one at a
        time, for inputs larger than memory."""
        for features, preds in batches:
            yield self.detect(features, preds, threshold)

    # -- persistence
    def state_dict(self) -> dict:
        self._require_fit()
        return {"sigma2": self.sigma2, "per_class": self.per_class, "seed": self.seed,
                "objective": self.objective, "bank": self.bank.cpu(),
                "bank_labels": self.bank_labels.cpu(), "num_classes": self.num_classes,
                "threshold": self.threshold,
                "medians": None if self.medians is None else self.medians.cpu()}

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "KDensityDetector":
        state = torch.load(path, map_location="cpu", weights_only=True)
        det = cls(state["sigma2"], state["per_class"], state["seed"], state["objective"])
        det.bank = state["bank"].to(device)
        det.bank_labels = state["bank_labels"].to(device)
        det.index = build_bank_index(det.bank, det.bank_labels, state["num_classes"])
        det.threshold = state["threshold"]
        if state["medians"] is not None:
            det.medians = state["medians"].to(device)
        return det


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
