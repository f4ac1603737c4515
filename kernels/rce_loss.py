"""Fused Triton kernels for the reverse cross-entropy (RCE) loss.

Per row i of the logits Z (N x L), with u = Z_i / T and label y:

    loss_i = logsumexp(u) - mean_{j != y} u_j
    dloss_i / dZ_ij = (softmax(u)_j - R_y[j]) / T,   R_y = 1/(L-1) off y, 0 at y.

The forward keeps one fp32 log-sum-exp per row; the backward recomputes the
softmax from it, so nothing N x L is saved between the two. Raw tensors in, raw
tensors out: argument checking lives in ``rce_fast``.

Tiling: every program owns ``ROWS`` rows and walks the classes in chunks of
``BLOCK_L`` with a running max and sum (online log-sum-exp), so one kernel serves
L = 2 (thousands of rows per program) and L = 262,144 (one row, 64 chunks).
Row offsets are computed in int64, so N * L may exceed 2^31.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_guard

# Elements per backward program tile (ROWS * BLOCK_L); the forward's are in _FWD_CONFIG.
_TILE = 4096
_MAX_BLOCK_L = 4096
_NUM_WARPS = 8
# CUDA's limit on grid axis 1 (the backward's class tiles; programs stride past it).
MAX_GRID_Y = 65535
# int32 column indices: the backward's last stride (MAX_GRID_Y tiles) must not overflow.
MAX_CLASSES = 2 ** 31 - 1 - MAX_GRID_Y * _MAX_BLOCK_L
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def class_count_problem(num_classes: int) -> str | None:
    """Why the kernels cannot take ``num_classes`` (past MAX_CLASSES their int32 class
    indices would wrap: the forward's loop, the backward's last stride), or None."""
    if num_classes > MAX_CLASSES:
        return (f"logits has {num_classes} classes; the Triton RCE kernels take at most "
                f"{MAX_CLASSES} (int32 class indices)")
    return None


def check_class_count(num_classes: int) -> None:
    """ValueError for :func:`class_count_problem`. The dispatcher falls back to PyTorch
    before this (see rce_fast.ops); the launchers check again, before allocating."""
    problem = class_count_problem(num_classes)
    if problem is not None:
        raise ValueError(problem)


@triton.jit
def _rce_fwd_kernel(Z, Y, LOSS, LSE, N, L, stride_row, ignore_index, inv_t, inv_lm1,
                    ROWS: tl.constexpr, BLOCK_L: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    y = tl.load(Y + rows, mask=row_ok, other=0)
    base = Z + rows[:, None] * stride_row

    m = tl.full([ROWS], float("-inf"), tl.float32)   # running max
    s = tl.zeros([ROWS], tl.float32)                 # running sum of exp(u - m)
    tot = tl.zeros([ROWS], tl.float32)               # sum of u over all classes
    u_y = tl.zeros([ROWS], tl.float32)               # u at the label
    for start in range(0, L, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < L)[None, :]
        u = tl.load(base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(u, axis=1))
        # A row that is -inf so far would give exp(-inf - -inf) = nan: shift by 0 instead.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(u - shift[:, None]), axis=1)
        m = m_new
        u0 = tl.where(mask, u, 0.0)
        tot += tl.sum(u0, axis=1)
        u_y += tl.sum(tl.where(cols[None, :] == y[:, None], u0, 0.0), axis=1)

    lse = m + tl.log(tl.where(row_ok, s, 1.0))  # padding rows have s = 0
    loss = lse - (tot - u_y) * inv_lm1
    keep = y != ignore_index
    # A label outside [0, L) (only reachable where the host check is skipped, inside
    # CUDA-graph capture) gives a NaN loss, never a silently wrong number.
    bad = keep & ((y < 0) | (y >= L))
    loss = tl.where(bad, float("nan"), tl.where(keep, loss, 0.0))
    tl.store(LOSS + rows, loss, mask=row_ok)
    tl.store(LSE + rows, lse, mask=row_ok)


@triton.jit
def _rce_bwd_tile(Z, DZ, rows, row_ok, cols, y, lse, g, keep, bad, L, stride_row,
                  stride_grad, inv_t, inv_lm1):
    mask = row_ok[:, None] & (cols < L)[None, :]
    u = tl.load(Z + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)
    p = tl.exp(u.to(tl.float32) * inv_t - lse[:, None])
    r = tl.where(cols[None, :] == y[:, None], 0.0, inv_lm1)
    dz = tl.where(keep[:, None], (p - r) * g[:, None], 0.0)
    dz = tl.where(bad[:, None], float("nan"), dz)
    tl.store(DZ + rows[:, None] * stride_grad + cols[None, :], dz.to(DZ.dtype.element_ty),
             mask=mask)


@triton.jit
def _rce_bwd_kernel(Z, Y, LSE, G, DZ, N, L, stride_row, stride_grad, ignore_index, inv_t,
                    inv_lm1, ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
                    STRIDED: tl.constexpr):
    pid_r = tl.program_id(0)
    rows = pid_r.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    y = tl.load(Y + rows, mask=row_ok, other=0)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    keep = y != ignore_index
    # Upstream gradient per row, already including the 1/T of the chain rule.
    g = tl.where(keep, tl.load(G + rows, mask=row_ok, other=0.0), 0.0) * inv_t
    bad = keep & ((y < 0) | (y >= L))  # see the forward: NaN, never a wrong gradient
    if STRIDED:
        # More class tiles than grid axis 1 holds (CUDA caps it at 65535: 268M classes
        # at BLOCK_L = 4096): each program strides over several.
        for c0 in range(tl.program_id(1) * BLOCK_L, L, tl.num_programs(1) * BLOCK_L):
            _rce_bwd_tile(Z, DZ, rows, row_ok, c0 + tl.arange(0, BLOCK_L), y, lse, g, keep,
                          bad, L, stride_row, stride_grad, inv_t, inv_lm1)
    else:
        _rce_bwd_tile(Z, DZ, rows, row_ok, tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L),
                      y, lse, g, keep, bad, L, stride_row, stride_grad, inv_t, inv_lm1)


# (elements per program tile, num_warps) by BLOCK_L, forward and backward. The forward
# keeps four running (ROWS,) statistics per tile, and ptxas's register allocation for it
# varies with the tile shape in ways no formula captures: every entry here was compiled
# for sm_80 and sm_90 under Triton 3.6 and 3.9 and chosen free of register spills with
# room to spare (tests/test_triton_aot.py checks every one with ptxas -v).
_FWD_CONFIG = {2: (1024, 4), 4: (1024, 4), 8: (2048, 4), 16: (2048, 8), 32: (2048, 8),
               64: (2048, 8), 128: (1024, 4), 256: (2048, 8), 512: (2048, 8),
               1024: (4096, 4), 2048: (4096, 8), 4096: (4096, 8)}
_BWD_WARPS_NARROW = 16   # BLOCK_L <= 256: 4096-element tiles, 16 warps (64 registers)


def block_config(num_classes: int, backward: bool = False) -> tuple[int, int, int]:
    """(ROWS, BLOCK_L, num_warps) the launchers use for ``num_classes`` classes."""
    block_l = min(triton.next_power_of_2(max(int(num_classes), 2)), _MAX_BLOCK_L)
    if backward:
        return _TILE // block_l, block_l, _BWD_WARPS_NARROW if block_l <= 256 else _NUM_WARPS
    tile, warps = _FWD_CONFIG[block_l]
    return tile // block_l, block_l, warps


def all_block_configs(backward: bool = False) -> list[tuple[int, int, int]]:
    """Every configuration :func:`block_config` can return (for ahead-of-time compile tests)."""
    return sorted({block_config(1 << k, backward) for k in range(1, 20)})


def _rows_view(logits: torch.Tensor) -> torch.Tensor:
    # The kernels take an arbitrary row stride but unit column stride.
    return logits if logits.stride(1) == 1 else logits.contiguous()


def rce_forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row RCE loss and log-sum-exp, both float32 of shape (N,).

    ``logits`` (N, L) float32/float16/bfloat16 with N >= 1; ``target`` (N,) int64.
    """
    z = _rows_view(logits)
    target = target.contiguous()
    n, num_classes = z.shape
    check_class_count(num_classes)
    loss = torch.empty(n, dtype=torch.float32, device=z.device)
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    rows, block_l, warps = block_config(num_classes)
    with device_guard(z.device):
        _rce_fwd_kernel[(triton.cdiv(n, rows),)](
            z, target, loss, lse, n, num_classes, z.stride(0), ignore_index,
            inv_temperature, 1.0 / (num_classes - 1), ROWS=rows, BLOCK_L=block_l,
            num_warps=warps)
    return loss, lse


def rce_backward(grad_rows: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                 lse: torch.Tensor, ignore_index: int, inv_temperature: float) -> torch.Tensor:
    """Gradient w.r.t. the logits, a new contiguous (N, L) tensor in the logits' dtype.

    ``grad_rows`` (N,) float32 is the upstream gradient of each row's loss.
    """
    z = _rows_view(logits)
    target, lse, grad_rows = target.contiguous(), lse.contiguous(), grad_rows.contiguous()
    n, num_classes = z.shape
    check_class_count(num_classes)
    # The interpreter's own fp32 -> bf16 conversion truncates; there the kernel writes
    # fp32 and torch rounds to nearest even, as the GPU's cvt.rn does.
    interp_bf16 = z.device.type == "cpu" and z.dtype == torch.bfloat16
    grad = torch.empty((n, num_classes), dtype=torch.float32 if interp_bf16 else z.dtype,
                       device=z.device)
    rows, block_l, warps = block_config(num_classes, backward=True)
    tiles = triton.cdiv(num_classes, block_l)
    grid = (triton.cdiv(n, rows), min(tiles, MAX_GRID_Y))
    with device_guard(z.device):
        _rce_bwd_kernel[grid](
            z, target, lse, grad_rows, grad, n, num_classes, z.stride(0), grad.stride(0),
            ignore_index, inv_temperature, 1.0 / (num_classes - 1),
            ROWS=rows, BLOCK_L=block_l, STRIDED=tiles > MAX_GRID_Y, num_warps=warps)
    return grad.to(z.dtype)


_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_specs() -> list[dict]:
    """Every (kernel, signature, constants, warps) the launchers above can launch."""
    specs = []
    for dtype in SUPPORTED_DTYPES:
        zt = "*" + _TRITON_DTYPE[dtype]
        for rows, block_l, warps in all_block_configs(backward=False):
            const = {"ROWS": rows, "BLOCK_L": block_l}
            specs.append(dict(
                kernel=_rce_fwd_kernel, num_warps=warps, constexprs=const,
                signature={"Z": zt, "Y": "*i64", "LOSS": "*fp32", "LSE": "*fp32", "N": "i32",
                           "L": "i32", "stride_row": "i64", "ignore_index": "i32",
                           "inv_t": "fp32", "inv_lm1": "fp32",
                           "ROWS": "constexpr", "BLOCK_L": "constexpr"}))
        for rows, block_l, warps in all_block_configs(backward=True):
            # the strided form only where a class count can need it: the widest tile
            for strided in (False, True) if block_l == _MAX_BLOCK_L else (False,):
                const = {"ROWS": rows, "BLOCK_L": block_l, "STRIDED": strided}
                specs.append(dict(
                    kernel=_rce_bwd_kernel, num_warps=warps, constexprs=const,
                    signature={"Z": zt, "Y": "*i64", "LSE": "*fp32", "G": "*fp32", "DZ": zt,
                               "N": "i32", "L": "i32", "stride_row": "i64",
                               "stride_grad": "i64", "ignore_index": "i32", "inv_t": "fp32",
                               "inv_lm1": "fp32", "ROWS": "constexpr",
                               "BLOCK_L": "constexpr", "STRIDED": "constexpr"}))
    return specs
