"""Fused Triton kernels for batched Gaussian kernel density in log space (K-density).

For a query z of class c and the class's bank rows x_1..x_n:

    lse(z)   = logsumexp_j( -||z - x_j||^2 / sigma2 )
    logKD(z) = lse(z) - log(n)
    d logKD / dz = (2 / sigma2) * (sum_j p_j x_j - z),   p = softmax_j(-||z - x_j||^2 / sigma2)

Flash-attention style: queries and bank are grouped by class (sorted, with offsets);
each program owns a tile of BLOCK_M queries of ONE class and streams that class's bank
in tiles of BLOCK_N rows with a running max and sum. Nothing N x M is ever stored.
Distances use ||q||^2 + ||b||^2 - 2 q.b, so the launcher's caller centres both on the
class mean first (distances are translation invariant) to shrink the cancellation;
fp32 inputs use 3xTF32 dots (about fp32 accuracy on tensor cores).

The feature dimension is tiled in chunks of BLOCK_D, so any D runs in the fused kernels
(ResNet-50's 2048, ViT-B's 768) with tiles that fit the register file:
  * D <= BLOCK_D ("single chunk", the paper's D = 64): the query tile and, in the
    backward, the (BLOCK_M, D) accumulator of sum_j p_j x_j stay in registers;
  * larger D: the q.b dot accumulates over D chunks (the query chunks are re-read from
    L1/L2 per bank tile), and the backward accumulates sum_j p_j x_j chunk by chunk in an
    fp32 (N, D) buffer that only this program touches.
The softmax weights p stay in fp32 for the second dot, for every input dtype (the bank
chunk is widened to fp32 and the dot runs as 3xTF32): rounding p to bf16 would cost
about 1e-3 relative error in the gradient.

Raw tensors in, raw tensors out; checks and sorting live in ``rce_fast``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_guard

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Width of one feature chunk: D <= CHUNK_D runs the single-chunk kernels.
CHUNK_D = 64


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
def _load_tile(P, rows, row_ok, d0, D, stride, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """(len(rows), BLOCK_D) tile of columns [d0, d0 + BLOCK_D), zero outside."""
    dcols = d0 + tl.arange(0, BLOCK_D)
    t = tl.load(P + rows.to(tl.int64)[:, None] * stride + dcols[None, :],
                mask=row_ok[:, None] & (dcols < D)[None, :], other=0.0)
    if UPCAST:  # the interpreter's dot is wrong on bf16; bf16 products are exact in fp32
        t = t.to(tl.float32)
    return t


@triton.jit
def _qb_dot(Q, B, q_tile, rows, row_ok, cols, col_ok, D, stride_q, stride_b,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            SINGLE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """q . b for a (BLOCK_M, BLOCK_N) tile, fp32, over every feature chunk."""
    if SINGLE:
        b = _load_tile(B, cols, col_ok, 0, D, stride_b, BLOCK_D, UPCAST)
        dot = tl.dot(q_tile, tl.trans(b), input_precision=PREC)
    else:
        dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            q = _load_tile(Q, rows, row_ok, d0, D, stride_q, BLOCK_D, UPCAST)
            b = _load_tile(B, cols, col_ok, d0, D, stride_b, BLOCK_D, UPCAST)
            dot = tl.dot(q, tl.trans(b), dot, input_precision=PREC)
    return dot


@triton.jit
def _logits(dot, qn, BN, cols, col_ok, neg_inv_s2):
    bn = tl.load(BN + cols, mask=col_ok, other=0.0)
    d2 = tl.maximum(qn[:, None] + bn[None, :] - 2.0 * dot, 0.0)
    return tl.where(col_ok[None, :], d2 * neg_inv_s2, float("-inf"))


@triton.jit
def _kd_fwd_kernel(Q, B, QN, BN, QOFF, BOFF, TSTART, TCLASS, LSE, D, stride_q, stride_b,
                   neg_inv_s2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, SINGLE: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr):
    rows, row_ok, qn, b_lo, b_hi = _tile_setup(QOFF, BOFF, TSTART, TCLASS, QN, BLOCK_M)
    q_tile = _load_tile(Q, rows, row_ok, 0, D, stride_q, BLOCK_D, UPCAST)  # SINGLE only
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(b_lo, b_hi, BLOCK_N):  # every tile holds >= 1 valid bank row
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < b_hi
        dot = _qb_dot(Q, B, q_tile, rows, row_ok, cols, col_ok, D, stride_q, stride_b,
                      BLOCK_M, BLOCK_N, BLOCK_D, SINGLE, PREC, UPCAST)
        logit = _logits(dot, qn, BN, cols, col_ok, neg_inv_s2)
        m_new = tl.maximum(m, tl.max(logit, axis=1))
        # A row that is -inf so far (every distance / sigma2 overflowing) would give
        # exp(-inf - -inf) = nan and carry it on: shift by 0 instead.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(logit - shift[:, None]), axis=1)
        m = m_new
    # rows past the tile end have s = 0: log 1 instead (masked off, no -inf - -inf)
    tl.store(LSE + rows, m + tl.log(tl.where(row_ok, s, 1.0)), mask=row_ok)


@triton.jit
def _kd_bwd_kernel(Q, B, QN, BN, QOFF, BOFF, TSTART, TCLASS, LSE, G, DQ, D, stride_q,
                   stride_b, stride_dq, neg_inv_s2, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                   PREC: tl.constexpr):
    """Single feature chunk (D <= BLOCK_D): the accumulator stays in registers."""
    rows, row_ok, qn, b_lo, b_hi = _tile_setup(QOFF, BOFF, TSTART, TCLASS, QN, BLOCK_M)
    q_tile = _load_tile(Q, rows, row_ok, 0, D, stride_q, BLOCK_D, UPCAST)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)   # sum_j p_j x_j
    for j0 in range(b_lo, b_hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < b_hi
        b = _load_tile(B, cols, col_ok, 0, D, stride_b, BLOCK_D, UPCAST)
        dot = tl.dot(q_tile, tl.trans(b), input_precision=PREC)
        p = tl.exp(_logits(dot, qn, BN, cols, col_ok, neg_inv_s2) - lse[:, None])
        acc = tl.dot(p, b.to(tl.float32), acc, input_precision="tf32x3")  # p kept in fp32
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    dq = (acc - q_tile.to(tl.float32)) * (g * (-2.0 * neg_inv_s2))[:, None]
    dcols = tl.arange(0, BLOCK_D)
    tl.store(DQ + rows.to(tl.int64)[:, None] * stride_dq + dcols[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (dcols < D)[None, :])


@triton.jit
def _kd_bwd_tiled_kernel(Q, B, QN, BN, QOFF, BOFF, TSTART, TCLASS, LSE, G, DQ, ACC, D,
                         stride_q, stride_b, stride_dq, neg_inv_s2, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Any D: sum_j p_j x_j accumulates chunk by chunk in ACC, an fp32 (N, D) zero-filled
    buffer whose rows only this program touches (it may be DQ itself when DQ is fp32)."""
    rows, row_ok, qn, b_lo, b_hi = _tile_setup(QOFF, BOFF, TSTART, TCLASS, QN, BLOCK_M)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    acc_rows = ACC + rows.to(tl.int64)[:, None] * D
    for j0 in range(b_lo, b_hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < b_hi
        dot = _qb_dot(Q, B, Q, rows, row_ok, cols, col_ok, D, stride_q, stride_b,
                      BLOCK_M, BLOCK_N, BLOCK_D, False, PREC, UPCAST)
        p = tl.exp(_logits(dot, qn, BN, cols, col_ok, neg_inv_s2) - lse[:, None])
        for d0 in range(0, D, BLOCK_D):
            dcols = d0 + tl.arange(0, BLOCK_D)
            amask = row_ok[:, None] & (dcols < D)[None, :]
            b = _load_tile(B, cols, col_ok, d0, D, stride_b, BLOCK_D, UPCAST)
            a = tl.load(acc_rows + dcols[None, :], mask=amask, other=0.0)
            a = tl.dot(p, b.to(tl.float32), a, input_precision="tf32x3")
            tl.store(acc_rows + dcols[None, :], a, mask=amask)
        # this tile's stores must be visible to every thread before the next tile loads
        tl.debug_barrier()
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    scale = (g * (-2.0 * neg_inv_s2))[:, None]
    for d0 in range(0, D, BLOCK_D):
        dcols = d0 + tl.arange(0, BLOCK_D)
        amask = row_ok[:, None] & (dcols < D)[None, :]
        a = tl.load(acc_rows + dcols[None, :], mask=amask, other=0.0)
        q = tl.load(Q + rows.to(tl.int64)[:, None] * stride_q + dcols[None, :], mask=amask,
                    other=0.0).to(tl.float32)
        tl.debug_barrier()  # every read of ACC precedes the writes when ACC is DQ
        tl.store(DQ + rows.to(tl.int64)[:, None] * stride_dq + dcols[None, :],
                 ((a - q) * scale).to(DQ.dtype.element_ty), mask=amask)


# ----------------------------------------------------------------------------- launchers
# Tile shapes (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) by direction, dtype class
# and chunking. 3xTF32 splits every fp32 dot operand in two and the backward widens the
# bank chunk to fp32 for its second dot, so the fp32 and backward tiles are smaller.
# Every one compiles for sm_80 and sm_90 with no register spills under Triton 3.6 and 3.9,
# with and without the JIT's alignment specialisation (tests/test_triton_aot.py runs
# ptxas -v on each and fails on any spill). fp32 at BLOCK_D = 32 has BLOCK_N = 32: with
# 64, its aligned sm_80 build under Triton 3.9 spilled 4 bytes (128 registers).
_CONFIGS = {
    # (backward, fp32, BLOCK_D of the single-chunk kernels or 0 for the tiled ones)
    (False, True, 16): (64, 64, 4, 3), (False, False, 16): (64, 64, 4, 3),
    (False, True, 32): (64, 32, 4, 3), (False, False, 32): (64, 64, 4, 3),
    (False, True, 64): (64, 32, 8, 2), (False, False, 64): (64, 64, 8, 3),
    (False, True, 0): (32, 32, 8, 2), (False, False, 0): (64, 32, 8, 2),
    (True, True, 16): (32, 32, 8, 1), (True, False, 16): (32, 32, 8, 1),
    (True, True, 32): (32, 16, 8, 1), (True, False, 32): (32, 32, 8, 2),
    (True, True, 64): (32, 32, 8, 2), (True, False, 64): (32, 32, 8, 2),
    (True, True, 0): (32, 32, 8, 1), (True, False, 0): (32, 32, 8, 1),
}
#: Feature chunk of the tiled (D > CHUNK_D) kernels.
TILED_BLOCK_D = 32


def single_chunk(dim: int) -> bool:
    """D <= CHUNK_D keeps whole feature rows in registers."""
    return int(dim) <= CHUNK_D


def block_config(dim: int, dtype: torch.dtype = torch.float32, backward: bool = False
                 ) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) the launchers use."""
    single = single_chunk(dim)
    block_d = max(16, triton.next_power_of_2(int(dim))) if single else TILED_BLOCK_D
    bm, bn, warps, stages = _CONFIGS[(bool(backward), dtype == torch.float32,
                                      block_d if single else 0)]
    return bm, bn, block_d, warps, stages


def _config_dims() -> list[int]:
    """One feature size per distinct configuration (the single-chunk widths, then tiled)."""
    return [16, 32, 64, CHUNK_D + 1]


def all_block_configs(dtype: torch.dtype = torch.float32, backward: bool = False):
    return sorted({block_config(d, dtype, backward) for d in _config_dims()})


def _precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _upcast(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def _tiles(q_offsets: torch.Tensor, block_m: int, n_rows: int, exact: bool | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Start row and class of every BLOCK_M tile of class-sorted queries, built on the
    device. On CUDA the grid is the upper bound cdiv(N, BLOCK_M) + C (surplus tiles get
    class -1 and exit at once), so no host synchronisation is needed (the launch is safe
    inside CUDA-graph capture); on CPU (the interpreter) the exact count is used."""
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


def _common(q, bank, q_offsets, backward):
    block_m, block_n, block_d, warps, stages = block_config(q.shape[1], q.dtype, backward)
    tstart, tcls = _tiles(q_offsets, block_m, q.shape[0])
    qn = q.float().square().sum(1)
    bn = bank.float().square().sum(1)
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PREC=_precision(q.dtype),
                UPCAST=_upcast(q), num_warps=warps, num_stages=stages)
    return tstart, tcls, qn, bn, meta


def kdensity_lse(q: torch.Tensor, q_offsets: torch.Tensor, bank: torch.Tensor,
                 b_offsets: torch.Tensor, sigma2: float) -> torch.Tensor:
    """lse (N,) float32 for class-sorted queries q (N, D) against a class-sorted bank (M, D).

    ``q_offsets`` / ``b_offsets`` (C + 1,) int64: rows of class c are [off[c], off[c+1]).
    Every class that has queries must have at least one bank row. Any D >= 1.
    """
    q, bank = q.contiguous(), bank.contiguous()
    q_offsets, b_offsets = q_offsets.contiguous(), b_offsets.contiguous()
    with device_guard(q.device):
        tstart, tcls, qn, bn, meta = _common(q, bank, q_offsets, backward=False)
        lse = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
        if len(tstart):
            _kd_fwd_kernel[(len(tstart),)](
                q, bank, qn, bn, q_offsets, b_offsets, tstart, tcls, lse, q.shape[1],
                q.stride(0), bank.stride(0), -1.0 / sigma2, SINGLE=single_chunk(q.shape[1]),
                **meta)
    return lse


def kdensity_grad(grad_lse: torch.Tensor, q: torch.Tensor, q_offsets: torch.Tensor,
                  bank: torch.Tensor, b_offsets: torch.Tensor, lse: torch.Tensor,
                  sigma2: float) -> torch.Tensor:
    """grad_lse[i] * d lse_i / d q_i as an (N, D) tensor in q's dtype."""
    q, bank = q.contiguous(), bank.contiguous()
    q_offsets, b_offsets = q_offsets.contiguous(), b_offsets.contiguous()
    n, dim = q.shape
    with device_guard(q.device):
        tstart, tcls, qn, bn, meta = _common(q, bank, q_offsets, backward=True)
        g = grad_lse.float().contiguous()
        lse = lse.float().contiguous()
        # The interpreter's own fp32 -> bf16 conversion truncates; there the kernel
        # writes fp32 and torch rounds to nearest even, as the GPU's cvt.rn does.
        out_dtype = torch.float32 if meta["UPCAST"] else q.dtype
        if single_chunk(dim):
            dq = torch.empty((n, dim), dtype=out_dtype, device=q.device)
            if len(tstart):
                _kd_bwd_kernel[(len(tstart),)](
                    q, bank, qn, bn, q_offsets, b_offsets, tstart, tcls, lse, g, dq, dim,
                    q.stride(0), bank.stride(0), dq.stride(0), -1.0 / sigma2, **meta)
        else:
            # fp32 accumulator, zero-filled; for fp32 output the output itself
            acc = torch.zeros((n, dim), dtype=torch.float32, device=q.device)
            dq = acc if out_dtype == torch.float32 else torch.empty_like(q)
            if len(tstart):
                _kd_bwd_tiled_kernel[(len(tstart),)](
                    q, bank, qn, bn, q_offsets, b_offsets, tstart, tcls, lse, g, dq, acc,
                    dim, q.stride(0), bank.stride(0), dq.stride(0), -1.0 / sigma2, **meta)
    return dq.to(q.dtype)


_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_specs() -> list[dict]:
    """Every (kernel, signature, constants, warps, stages) the launchers can launch."""
    specs = []
    common = {"QN": "*fp32", "BN": "*fp32", "QOFF": "*i64", "BOFF": "*i64", "TSTART": "*i32",
              "TCLASS": "*i32", "LSE": "*fp32", "D": "i32", "stride_q": "i32",
              "stride_b": "i32", "neg_inv_s2": "fp32"}
    for dtype in SUPPORTED_DTYPES:
        t = "*" + _TRITON_DTYPE[dtype]
        for dim in _config_dims():
            single = single_chunk(dim)
            bm, bn_, bd, warps, stages = block_config(dim, dtype, backward=False)
            const = {"BLOCK_M": bm, "BLOCK_N": bn_, "BLOCK_D": bd, "SINGLE": single,
                     "PREC": _precision(dtype), "UPCAST": False}
            specs.append(dict(kernel=_kd_fwd_kernel, num_warps=warps, num_stages=stages,
                              constexprs=const, signature={
                                  "Q": t, "B": t, **common,
                                  **{k: "constexpr" for k in const}}))
            bm, bn_, bd, warps, stages = block_config(dim, dtype, backward=True)
            const = {"BLOCK_M": bm, "BLOCK_N": bn_, "BLOCK_D": bd, "PREC": _precision(dtype),
                     "UPCAST": False}
            sig = {"Q": t, "B": t, **common, "G": "*fp32", "DQ": t, "stride_dq": "i32",
                   **{k: "constexpr" for k in const}}
            kernel = _kd_bwd_kernel if single else _kd_bwd_tiled_kernel
            if not single:
                sig["ACC"] = "*fp32"
            specs.append(dict(kernel=kernel, num_warps=warps, num_stages=stages,
                              constexprs=const, signature=sig))
    return specs
