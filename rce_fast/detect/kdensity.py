"""The K-density op: a per-class Gaussian kernel density in log space.

    KD(z) = mean_{x in bank_c} exp(-||z - x||^2 / sigma2)

returned in LOG space (the plain formula underflows to 0 beyond ||z - x||^2 ~ 40 sigma2).
On CUDA a fused Triton kernel computes it tile by tile with no N x M matrix in memory;
on CPU a blocked PyTorch path keeps memory bounded the same way. :class:`BankIndex`
groups a bank by class once; :class:`QueryPlan` groups a fixed set of query classes once
(an attack's inner loop re-uses it).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops  # noqa: F401  (registers torch.ops.rce_fast.kdensity_*)
from .._args import scalar
from .._torch_impl import acc_dtype
from ._checks import _check_features, _check_labels, _check_sigma2


@dataclass
class BankIndex:
    """A kernel bank grouped by class.

    Only the classes present in the bank take memory: ``classes`` (C,) holds their label
    values, sorted, and the rows of the k-th of them are bank[offsets[k]:offsets[k+1]]
    (k is the class's *compact id*). ``num_classes`` is the size of the label space
    (labels are in [0, num_classes)); when every label in it has bank rows (the usual
    case, ``identity``), compact ids are the labels themselves. Time and memory follow
    the number of rows and present classes, never the largest label value.

    Rows are stored centred on their class mean (``centers``): distances do not change,
    and the ||a||^2 + ||b||^2 - 2ab form loses far less to cancellation.
    """
    bank: Tensor       # (M, D), class-sorted and centred, in the features' dtype
    offsets: Tensor    # (C + 1,) int64
    counts: Tensor     # (C,) int64, every count >= 1
    centers: Tensor    # (C, D) in the accumulation dtype
    num_classes: int   # size of the label space
    classes: Tensor    # (C,) int64, the label value of each compact id, ascending
    identity: bool     # classes == arange(num_classes)

    def compact(self, labels: Tensor, name: str = "query_classes") -> Tensor:
        """Compact ids (int64, same shape) of label values, checking that each has bank
        rows (one host synchronisation)."""
        cls = labels.long()
        if cls.numel() == 0:
            return cls
        lo, hi = (int(v) for v in torch.aminmax(cls))
        if lo < 0 or hi >= self.num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} holds class {bad} but the bank has "
                             f"{self.num_classes} classes")
        if self.identity:
            return cls
        ids = torch.searchsorted(self.classes, cls).clamp_(max=len(self.classes) - 1)
        found = self.classes[ids] == cls
        if not bool(found.all()):
            missing = torch.unique(cls[~found])
            shown = missing[:20].tolist()
            more = f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""
            raise ValueError(f"{name} asks for classes with no bank rows: {shown}{more}")
        return ids

    def compact_unchecked(self, labels: Tensor) -> Tensor:
        """Compact ids with no check and no host synchronisation (labels known valid)."""
        cls = labels.long()
        if self.identity:
            return cls
        return torch.searchsorted(self.classes, cls).clamp_(max=len(self.classes) - 1)


def _offsets(counts: Tensor) -> Tensor:
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def build_bank_index(bank: Tensor, bank_labels: Tensor, num_classes: int | None = None
                     ) -> BankIndex:
    """Group (and centre) a kernel bank by class for :func:`kdensity_indexed`.

    ``num_classes``: the label space (default: the largest label + 1); classes without
    bank rows cost nothing, and asking for them later is an error naming them.
    """
    _check_features(bank, "bank")
    if bank.shape[0] == 0:
        raise ValueError("bank is empty: K-density needs at least one bank row")
    _check_labels(bank_labels, "bank_labels", bank.shape[0], bank.device)
    labels = bank_labels.long()
    classes, compact, counts = torch.unique(labels, sorted=True, return_inverse=True,
                                            return_counts=True)
    top = int(classes[-1])
    if num_classes is None:
        c = top + 1
    else:
        num_classes = scalar(num_classes)
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise TypeError(f"num_classes must be a positive int, got "
                            f"{type(num_classes).__name__}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        c = int(num_classes)
        if top >= c:
            raise ValueError(f"bank_labels holds class {top} >= num_classes={c}")
    acc = acc_dtype(bank.dtype)
    order = torch.argsort(compact, stable=True)
    sums = torch.zeros(len(classes), bank.shape[1], dtype=acc, device=bank.device)
    # The centres are constants for autograd: the distances, and so K-density, do not
    # depend on them (a bank row and a query of its class move by the same centre), so
    # their exact gradient is 0. Differentiating through the class mean would add sums
    # of gradients that cancel only up to rounding, spread over every row of the class
    # (absolute noise where a row's true gradient is ~0; NaN from inf - inf where a
    # float16 gradient overflows).
    sums.index_add_(0, compact, bank.detach().to(acc))
    centers = sums / counts.unsqueeze(1).to(acc)
    centred = (bank[order].to(acc) - centers[compact[order]]).to(bank.dtype)
    return BankIndex(centred, _offsets(counts), counts, centers, c, classes,
                     len(classes) == c)


class QueryPlan:
    """The class grouping of a fixed set of query classes, computed (and checked) once, so
    that repeated K-density calls on changing features (an attack's inner loop) do no
    re-sorting and no checks. ``cls_sorted`` holds compact ids (see :class:`BankIndex`)."""

    def __init__(self, query_classes: Tensor, index: BankIndex,
                 name: str = "query_classes") -> None:
        self._build(index.compact(query_classes, name), index)

    @classmethod
    def unchecked(cls, query_classes: Tensor, index: BankIndex) -> "QueryPlan":
        """Built on the device with no host synchronisation and no checks: valid when
        every query class has bank rows (a classifier's arg max against a detector fitted
        on every class)."""
        plan = cls.__new__(cls)
        plan._build(index.compact_unchecked(query_classes), index)
        return plan

    def _build(self, ids: Tensor, index: BankIndex) -> None:
        self.order = torch.argsort(ids, stable=True)
        self.cls_sorted = ids[self.order]
        q_counts = torch.zeros(len(index.classes), dtype=torch.int64, device=ids.device)
        q_counts.index_add_(0, ids, torch.ones_like(ids))
        self.q_offsets = _offsets(q_counts)
        # float64: the log of a count must not cap float64 results at float32 accuracy
        self.log_counts = index.counts[self.cls_sorted].double().log()
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
                     sigma2: float, *, names: tuple[str, str] = ("queries", "query_classes")
                     ) -> Tensor:
    """Log K-density of ``queries`` against a prepared :class:`BankIndex` (see kdensity).
    ``names``: how errors call the two tensors (a detector's methods name their own
    arguments)."""
    if not isinstance(index, BankIndex):
        raise TypeError(f"index must be a BankIndex (build_bank_index), got "
                        f"{type(index).__name__}")
    qname, cname = names
    _check_features(queries, qname, index.bank.shape[1])
    if queries.dtype != index.bank.dtype:
        raise TypeError(f"{qname} are {queries.dtype} but the bank is {index.bank.dtype}")
    if queries.device != index.bank.device:
        raise ValueError(f"{qname} are on {queries.device} but the bank is on "
                         f"{index.bank.device}")
    _check_labels(query_classes, cname, queries.shape[0], queries.device)
    sigma2 = _check_sigma2(sigma2)
    acc = acc_dtype(queries.dtype)
    if queries.shape[0] == 0:
        return queries.new_empty(0, dtype=acc)
    return kdensity_planned(queries, QueryPlan(query_classes, index, cname), index, sigma2)


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

