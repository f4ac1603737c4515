"""Fused Triton kernels for batched Gaussian kernel density in log space (K-density).

For a query z of class c and the class's bank rows x_1..x_n:

    lse(z)   = logsumexp_j( -||z - x_j||^2 / sigma2 )
    logKD(z) = lse(z) - log(n)
    d logKD / dz = (2 / sigma2) * (sum_j p_j x_j - z),   p = softmax_j(-||z - x_j||^2 / sigma2)

Flash-attention style: queries and bank are grouped by class (sorted, with offsets);
each program owns a tile of BLOCK_M queries of ONE class and streams that class's bank
in tiles of BLOCK_N rows, one ``tl.dot`` per tile, with a running max and sum. Nothing
N x M is ever stored. Distances use ||q||^2 + ||b||^2 - 2 q.b, so the launcher centres
both on the class mean first (distances are translation invariant) to shrink the
cancellation, and fp32 inputs use 3xTF32 dots (about fp32 accuracy on tensor cores).

Raw tensors in, raw tensors out; checks and sorting live in ``rce_fast``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DIM = 512
_TILE_ELEMS = 4096   # BLOCK_M * BLOCK_D and BLOCK_N * BLOCK_D stay at most this
_NUM_WARPS = 4


@triton.jit
def _tile_setup(QOFF, BOFF, TSTART, TCLASS, QN, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    start = tl.load(TSTART + pid)
    cls = tl.load(TCLASS + pid)
    valid = cls >= 0  # the grid is an upper bound: surplus programs have class -1
    cls = tl.maximum(cls, 0)
    q_end = tl.where(valid, tl.load(QOFF + cls + 1), 0)
    b_lo = tl.load(BOFF + cls)
    b_hi = tl.where(valid, tl.load(BOFF + cls + 1), b_lo)  # no bank tiles to stream
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < q_end
    qn = tl.load(QN + rows, mask=row_ok, other=0.0)
    return rows, row_ok, qn, b_lo, b_hi


@triton.jit
def _logits_tile(q, qn, B, BN, j0, b_hi, D, stride_b, neg_inv_s2,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                 UPCAST: tl.constexpr):
    cols = j0 + tl.arange(0, BLOCK_N)
    col_ok = cols < b_hi
    dcols = tl.arange(0, BLOCK_D)
    b = tl.load(B + cols.to(tl.int64)[:, None] * stride_b + dcols[None, :],
                mask=col_ok[:, None] & (dcols < D)[None, :], other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    bn = tl.load(BN + cols, mask=col_ok, other=0.0)
    dot = tl.dot(q, tl.trans(b), input_precision=PREC)
    d2 = tl.maximum(qn[:, None] + bn[None, :] - 2.0 * dot, 0.0)
    logit = tl.where(col_ok[None, :], d2 * neg_inv_s2, float("-inf"))
    return logit, b


@triton.jit
def _load_queries(Q, rows, row_ok, D, stride_q, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    dcols = tl.arange(0, BLOCK_D)
    q = tl.load(Q + rows.to(tl.int64)[:, None] * stride_q + dcols[None, :],
                mask=row_ok[:, None] & (dcols < D)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _kd_fwd_kernel(Q, B, QN, BN, QOFF, BOFF, TSTART, TCLASS, LSE, D, stride_q, stride_b,
                   neg_inv_s2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    rows, row_ok, qn, b_lo, b_hi = _tile_setup(QOFF, BOFF, TSTART, TCLASS, QN, BLOCK_M)
    q = _load_queries(Q, rows, row_ok, D, stride_q, BLOCK_D, UPCAST)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(b_lo, b_hi, BLOCK_N):  # every tile holds >= 1 valid bank row
        logit, _ = _logits_tile(q, qn, B, BN, j0, b_hi, D, stride_b, neg_inv_s2,
                                BLOCK_N, BLOCK_D, PREC, UPCAST)
        m_new = tl.maximum(m, tl.max(logit, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), axis=1)
        m = m_new
    # rows past the tile end have s = 0: log 1 instead (masked off, no -inf - -inf)
    tl.store(LSE + rows, m + tl.log(tl.where(row_ok, s, 1.0)), mask=row_ok)


@triton.jit
def _kd_bwd_kernel(Q, B, QN, BN, QOFF, BOFF, TSTART, TCLASS, LSE, G, DQ, D, stride_q,
                   stride_b, stride_dq, neg_inv_s2, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr):
    rows, row_ok, qn, b_lo, b_hi = _tile_setup(QOFF, BOFF, TSTART, TCLASS, QN, BLOCK_M)
    q = _load_queries(Q, rows, row_ok, D, stride_q, BLOCK_D, UPCAST)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)   # sum_j p_j x_j
    for j0 in range(b_lo, b_hi, BLOCK_N):
        logit, b = _logits_tile(q, qn, B, BN, j0, b_hi, D, stride_b, neg_inv_s2,
                                BLOCK_N, BLOCK_D, PREC, UPCAST)
        p = tl.exp(logit - lse[:, None])
        acc = tl.dot(p.to(b.dtype), b, acc, input_precision=PREC)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    dq = (acc - q.to(tl.float32)) * (g * (-2.0 * neg_inv_s2))[:, None]
    dcols = tl.arange(0, BLOCK_D)
    tl.store(DQ + rows.to(tl.int64)[:, None] * stride_dq + dcols[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (dcols < D)[None, :])


def block_config(dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) the launchers use for feature size ``dim``."""
    block_d = max(16, triton.next_power_of_2(int(dim)))
    block = max(16, min(64, _TILE_ELEMS // block_d))
    return block, block, block_d, _NUM_WARPS


def all_block_configs() -> list[tuple[int, int, int, int]]:
    return sorted({block_config(d) for d in range(1, MAX_DIM + 1)})


def _precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _tiles(q_offsets: torch.Tensor, block_m: int, n_rows: int, exact: bool | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Start row and class of every BLOCK_M tile of class-sorted queries, built on the
    device. On CUDA the grid is the upper bound cdiv(N, BLOCK_M) + C (surplus tiles get
    class -1 and exit at once), so no host synchronisation is needed; on CPU (the
    interpreter) the exact count is used."""
    counts = q_offsets[1:] - q_offsets[:-1]
    num_classes = counts.numel()
    ntiles = (counts + block_m - 1) // block_m
    cum = torch.cumsum(ntiles, 0)
    if exact is None:
        exact = q_offsets.device.type == "cpu"
    if exact:
        total = int(cum[-1]) if num_classes else 0
    else:
        total = triton.cdiv(n_rows, block_m) + num_classes
    t = torch.arange(total, device=q_offsets.device)
    cls = torch.searchsorted(cum, t, right=True)
    valid = cls < num_classes
    cls = cls.clamp(max=max(num_classes - 1, 0))
    start = q_offsets[cls] + (t - (cum[cls] - ntiles[cls])) * block_m
    return start.to(torch.int32), torch.where(valid, cls, -1).to(torch.int32)


def _common(q, bank, q_offsets):
    block_m, block_n, block_d, warps = block_config(q.shape[1])
    tstart, tcls = _tiles(q_offsets, block_m, q.shape[0])
    qn = q.float().square().sum(1)
    bn = bank.float().square().sum(1)
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PREC=_precision(q.dtype),
                UPCAST=q.device.type == "cpu", num_warps=warps)
    return tstart, tcls, qn, bn, meta


def kdensity_lse(q: torch.Tensor, q_offsets: torch.Tensor, bank: torch.Tensor,
                 b_offsets: torch.Tensor, sigma2: float) -> torch.Tensor:
    """lse (N,) float32 for class-sorted queries q (N, D) against a class-sorted bank (M, D).

    ``q_offsets`` / ``b_offsets`` (C + 1,) int64: rows of class c are [off[c], off[c+1]).
    Every class that has queries must have at least one bank row. D <= 512.
    """
    q, bank = q.contiguous(), bank.contiguous()
    tstart, tcls, qn, bn, meta = _common(q, bank, q_offsets)
    lse = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    if len(tstart):
        _kd_fwd_kernel[(len(tstart),)](
            q, bank, qn, bn, q_offsets, b_offsets, tstart, tcls, lse, q.shape[1], q.stride(0),
            bank.stride(0), -1.0 / sigma2, **meta)
    return lse


def kdensity_grad(grad_lse: torch.Tensor, q: torch.Tensor, q_offsets: torch.Tensor,
                  bank: torch.Tensor, b_offsets: torch.Tensor, lse: torch.Tensor,
                  sigma2: float) -> torch.Tensor:
    """grad_lse[i] * d lse_i / d q_i as an (N, D) tensor in q's dtype."""
    q, bank = q.contiguous(), bank.contiguous()
    tstart, tcls, qn, bn, meta = _common(q, bank, q_offsets)
    dq = torch.empty_like(q)
    if len(tstart):
        _kd_bwd_kernel[(len(tstart),)](
            q, bank, qn, bn, q_offsets, b_offsets, tstart, tcls, lse,
            grad_lse.float().contiguous(), dq, q.shape[1], q.stride(0), bank.stride(0),
            dq.stride(0), -1.0 / sigma2, **meta)
    return dq


_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_specs() -> list[dict]:
    """Every (kernel, signature, constants, warps) the launchers can launch on a GPU."""
    specs = []
    common = {"QN": "*fp32", "BN": "*fp32", "QOFF": "*i64", "BOFF": "*i64", "TSTART": "*i32",
              "TCLASS": "*i32", "LSE": "*fp32", "D": "i32", "stride_q": "i32",
              "stride_b": "i32"}
    for dtype in SUPPORTED_DTYPES:
        t = "*" + _TRITON_DTYPE[dtype]
        for bm, bn_, bd, warps in all_block_configs():
            const = {"BLOCK_M": bm, "BLOCK_N": bn_, "BLOCK_D": bd, "PREC": _precision(dtype),
                     "UPCAST": False}
            cx = {k: "constexpr" for k in const}
            specs.append(dict(kernel=_kd_fwd_kernel, num_warps=warps, constexprs=const,
                              signature={"Q": t, "B": t, **common, "neg_inv_s2": "fp32",
                                         **cx}))
            specs.append(dict(kernel=_kd_bwd_kernel, num_warps=warps, constexprs=const,
                              signature={"Q": t, "B": t, **common, "G": "*fp32", "DQ": t,
                                         "stride_dq": "i32", "neg_inv_s2": "fp32", **cx}))
    return specs
