"""Plain PyTorch implementations of the ops: the CPU path, and the fallback anywhere.

They work in row chunks sized to stay in cache, so each chunk's several elementwise
passes hit L2 instead of DRAM (about 1.8x fewer DRAM bytes than whole-tensor ops on
the large shapes), and they never hold more than one gradient-sized buffer.
"""
from __future__ import annotations

import torch

# Elements per row chunk: 256 Ki fp32 = 1 MiB, which stays in L2 across passes.
_CHUNK_ELEMS = 1 << 18


def all_finite(t: torch.Tensor) -> bool:
    """True when no entry is NaN or +-inf. One aminmax pass (NaN propagates through it),
    about 10x cheaper on CPU than ``isfinite(t).all()``, which takes four passes."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(n: int, num_classes: int):
    step = max(1, _CHUNK_ELEMS // num_classes)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def rce_forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row RCE loss and log-sum-exp of ``logits * inv_temperature``; see kernels.rce_loss."""
    n, num_classes = logits.shape
    acc = acc_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    keep = target != ignore_index
    # Any in-range index works for ignored rows: their loss is masked afterwards.
    label = target.clamp(0, num_classes - 1).unsqueeze(1)
    inv_lm1 = 1.0 / (num_classes - 1)
    for rs in _row_chunks(n, num_classes):
        u = logits[rs].to(acc)
        if inv_temperature != 1.0:
            u = u * inv_temperature
        torch.logsumexp(u, 1, out=lse[rs])
        off_label = u.sum(1) - u.gather(1, label[rs]).squeeze(1)
        torch.sub(lse[rs], off_label, alpha=inv_lm1, out=loss[rs])
    return torch.where(keep, loss, 0.0), lse


def rce_backward(grad_rows: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                 lse: torch.Tensor, ignore_index: int, inv_temperature: float) -> torch.Tensor:
    """(softmax(u) - R_y) * grad_rows / T as a new (N, L) tensor in the logits' dtype."""
    n, num_classes = logits.shape
    acc = acc_dtype(logits.dtype)
    grad = torch.empty((n, num_classes), dtype=logits.dtype, device=logits.device)
    keep = target != ignore_index
    label = target.clamp(0, num_classes - 1).unsqueeze(1)
    g = torch.where(keep, grad_rows.to(acc) * inv_temperature, 0.0)
    inv_lm1 = 1.0 / (num_classes - 1)
    g_label = (g * inv_lm1).unsqueeze(1)
    for rs in _row_chunks(n, num_classes):
        out = grad[rs]
        lse_col = lse[rs].unsqueeze(1)
        if logits.dtype == acc:  # compute straight into the output rows
            p = out
            if inv_temperature == 1.0:
                torch.sub(logits[rs], lse_col, out=p)
            else:
                torch.mul(logits[rs], inv_temperature, out=p).sub_(lse_col)
        else:
            p = logits[rs].to(acc)
            if inv_temperature != 1.0:
                p.mul_(inv_temperature)
            p.sub_(lse_col)
        p.exp_().sub_(inv_lm1).mul_(g[rs].unsqueeze(1))
        p.scatter_add_(1, label[rs], g_label[rs])
        if p is not out:
            out.copy_(p)
    if not bool(keep.all()):
        grad[~keep] = 0  # also zeroes NaN logits in ignored rows, as cross_entropy does
    return grad


# Inputs of at most one chunk take a path with the fewest tensor ops: at (128, 10) the
# per-op dispatch cost, not arithmetic, is the whole runtime. It keeps log_softmax
# (at most one chunk, 1 MiB) for the backward instead of recomputing it from lse.
SMALL_ELEMS = _CHUNK_ELEMS


def rce_forward_small(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                      inv_temperature: float):
    """(per-row loss, log_softmax(u), label (N, 1), keep (N,), labels_ok).

    ``labels_ok`` is a 0-d bool tensor: False when some non-ignored target is outside
    [0, L); the caller raises before using anything else.
    """
    num_classes = logits.shape[1]
    clamped = target.clamp(0, num_classes - 1)
    keep = target != ignore_index
    labels_ok = ~((clamped != target) & keep).any()
    u = logits.to(acc_dtype(logits.dtype))
    if inv_temperature != 1.0:
        u = u * inv_temperature
    logp = torch.log_softmax(u, 1)
    label = clamped.unsqueeze(1)
    rows = torch.sub(logp.gather(1, label).squeeze(1), logp.sum(1)).mul_(1.0 / (num_classes - 1))
    return torch.where(keep, rows, 0.0), logp, label, keep, labels_ok


def rce_backward_small(grad_scale: torch.Tensor, logp: torch.Tensor, label: torch.Tensor,
                       keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad_scale`` is (N, 1) or a scalar: upstream gradient times 1/T."""
    inv_lm1 = 1.0 / (logp.shape[1] - 1)
    grad = logp.exp().sub_(inv_lm1)
    grad.scatter_add_(1, label, torch.full(label.shape, inv_lm1, dtype=grad.dtype))
    grad.mul_(grad_scale)
    if not bool(keep.all()):
        grad.masked_fill_(~keep.unsqueeze(1), 0.0)
    return grad.to(dtype)


# ------------------------------------------------------------------------- K-density
# Blocks of at most _KD_BLOCK query-bank pairs (16 MiB of fp32): memory stays bounded
# however large N and M are, and each block is one matmul.
_KD_BLOCK = 1 << 22
_KD_BANK_STEP = 1 << 14


def _kd_blocks(q_offsets: torch.Tensor, b_offsets: torch.Tensor):
    """(query slice, bank slice of the same class) pairs covering every query's class bank."""
    qo, bo = q_offsets.tolist(), b_offsets.tolist()
    for c in range(len(qo) - 1):
        if qo[c] == qo[c + 1]:
            continue
        n_bank = bo[c + 1] - bo[c]
        bank_step = min(n_bank, _KD_BANK_STEP)
        q_step = max(1, _KD_BLOCK // bank_step)
        for q0 in range(qo[c], qo[c + 1], q_step):
            rows = slice(q0, min(qo[c + 1], q0 + q_step))
            yield rows, [slice(b0, min(bo[c + 1], b0 + bank_step))
                         for b0 in range(bo[c], bo[c + 1], bank_step)]


def _kd_logits(q: torch.Tensor, qn: torch.Tensor, b: torch.Tensor, neg_inv_s2: float):
    """-max(||q - b||^2, 0) / sigma2 for a block, via one matmul (addmm)."""
    d2 = torch.addmm((b * b).sum(1).unsqueeze(0), q, b.t(), alpha=-2.0).add_(qn.unsqueeze(1))
    return d2.clamp_(min=0.0).mul_(neg_inv_s2)


def kdensity_lse(q: torch.Tensor, q_offsets: torch.Tensor, bank: torch.Tensor,
                 b_offsets: torch.Tensor, sigma2: float) -> torch.Tensor:
    """Same contract as kernels.kdensity.kdensity_lse (float64 input stays float64)."""
    acc = acc_dtype(q.dtype)
    lse = torch.empty(q.shape[0], dtype=acc, device=q.device)
    for rows, bank_slices in _kd_blocks(q_offsets, b_offsets):
        qq = q[rows].to(acc)
        qn = (qq * qq).sum(1)
        run = None
        for bs in bank_slices:
            part = torch.logsumexp(_kd_logits(qq, qn, bank[bs].to(acc), -1.0 / sigma2), 1)
            run = part if run is None else torch.logaddexp(run, part)
        lse[rows] = run
    return lse


def kdensity_grad(grad_lse: torch.Tensor, q: torch.Tensor, q_offsets: torch.Tensor,
                  bank: torch.Tensor, b_offsets: torch.Tensor, lse: torch.Tensor,
                  sigma2: float) -> torch.Tensor:
    """grad_lse[i] * (2 / sigma2) * (sum_j p_ij x_j - q_i), (N, D) in q's dtype."""
    acc = acc_dtype(q.dtype)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    for rows, bank_slices in _kd_blocks(q_offsets, b_offsets):
        qq = q[rows].to(acc)
        qn = (qq * qq).sum(1)
        mean_x = torch.zeros_like(qq)
        for bs in bank_slices:
            b = bank[bs].to(acc)
            p = _kd_logits(qq, qn, b, -1.0 / sigma2).sub_(lse[rows].unsqueeze(1)).exp_()
            mean_x.addmm_(p, b)
        scale = grad_lse[rows].to(acc).unsqueeze(1) * (2.0 / sigma2)
        dq[rows] = mean_x.sub_(qq).mul_(scale)
    return dq


# ----------------------------------------------------------------------- JSMA pairs
_PAIR_BLOCK = 1 << 22  # pair scores materialised at once (16 MiB)


def jsma_pairs(alpha: torch.Tensor, beta: torch.Tensor, domain: torch.Tensor,
               increase: bool) -> torch.Tensor:
    """Tiled PyTorch JSMA pair search, bit-identical to the C++/CUDA paths.

    alpha, beta (B, n) float32; domain (B, n) bool. Returns (B, 2) int64, (-1, -1) where no
    pair satisfies the sign conditions. Memory O(n + block), never n x n.
    """
    batch, _ = alpha.shape
    out = torch.full((batch, 2), -1, dtype=torch.int64, device=alpha.device)
    for b in range(batch):
        idx = torch.nonzero(domain[b]).squeeze(1)
        a, bt = alpha[b, idx], beta[b, idx]
        k = len(idx)
        rows = max(1, _PAIR_BLOCK // max(k, 1))
        best_score, best = None, None
        cols = torch.arange(k, device=alpha.device)
        for i0 in range(0, k, rows):
            i1 = min(k, i0 + rows)
            sa = a[i0:i1, None] + a[None, :]
            sb = bt[i0:i1, None] + bt[None, :]
            ok = (sa > 0) & (sb < 0) if increase else (sa < 0) & (sb > 0)
            ok &= cols[None, :] > torch.arange(i0, i1, device=alpha.device)[:, None]
            score = torch.where(ok, sa * -sb, float("-inf"))
            flat = int(torch.argmax(score))  # first maximum: lowest (i, j) in the block
            top = score.view(-1)[flat]
            # -inf: no valid pair in this block; only a strictly better block wins ties
            if bool(top > float("-inf")) and (best_score is None or bool(top > best_score)):
                best_score, best = top, (i0 + flat // k, flat % k)
        if best is not None:
            out[b, 0], out[b, 1] = idx[best[0]], idx[best[1]]
    return out
