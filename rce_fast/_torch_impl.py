"""Plain PyTorch implementations of the ops: the CPU path, and the fallback anywhere.

They work in row chunks sized to stay in cache, so each chunk's several elementwise
passes hit L2 instead of DRAM (about 1.8x fewer DRAM bytes than whole-tensor ops on
the large shapes), and they never hold more than one gradient-sized buffer.
"""
from __future__ import annotations

import functools

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


# ----------------------------------------------------------- exp without the underflow path
# On some x86 CPUs PyTorch's vectorised exp is many times slower per element when its
# result is subnormal or underflows to 0: inputs below about -87.3 in float32 and -708.4
# in float64. Measured on a 2-core AMD EPYC (AVX2, torch 2.13): 2.4 ms per million
# float32 inputs in [-80, 0], 35-100 ms in [-200, -90] (worst between -103 and -87.3,
# where results are subnormal), 23 ms for float64 inputs below -720; an AMD EPYC with
# AVX-512 showed the same. A log-sum-exp or softmax over logits with large gaps is made
# of such inputs. Every CPU exp, log-sum-exp and softmax in the package goes through the
# helpers below, which clamp the input at EXP_FLOOR first. exp(EXP_FLOOR[dtype]) is the
# dtype's smallest normal number (times 1.00004), so:
#   - for inputs >= the floor nothing changes, bit for bit;
#   - an input below it (including -inf) gives exp(floor) < 1.2e-38 (2.3e-308 in float64)
#     where torch.exp gives a subnormal or 0. Added to a sum that holds a term >= 1 (a
#     log-sum-exp after subtracting the maximum), or subtracted from a number >= 2^-100
#     (the RCE gradient's 1/(L-1)), such a value is below half an ulp and changes nothing;
#     where the value itself is returned (softmax probabilities) exp_flush returns 0.
EXP_FLOOR = {torch.float32: -87.3365, torch.float64: -708.3964}


def exp_floor(dtype: torch.dtype) -> float:
    """Clamp point of exp inputs in ``dtype``. float16/bfloat16 use float32's (PyTorch
    exponentiates them in float32 on CPU; their own normal range ends earlier, so their
    results below it round to the same values either way)."""
    return EXP_FLOOR.get(dtype, EXP_FLOOR[torch.float32])


def _exp_may_underflow(x: torch.Tensor, shifted: bool) -> bool:
    """Could an exp input fall below the floor: x itself (``shifted=False``) or x minus
    its row maximum (``shifted=True``, bounded by the tensor's whole range)? Only asked on
    CPU, where one aminmax pass and a host sync cost about as much as one small op: when
    the answer is no, PyTorch's own fused kernels run, with their bits. GPUs have no
    such slow path: always no there. NaN or inf in x: yes (the clamped code handles them
    as PyTorch does)."""
    if x.device.type != "cpu" or x.numel() == 0:
        return False
    lo, hi = torch.aminmax(x.detach())
    lo, hi, floor = lo.item(), hi.item(), exp_floor(x.dtype)
    return not ((hi - lo < -floor) if shifted else (lo > floor))  # NaN: not safe


def exp_clamped_(x: torch.Tensor) -> torch.Tensor:
    """In place: ``x = exp(max(x, floor))`` (see EXP_FLOOR). Equal to ``torch.exp(x)``
    wherever that is a normal number, inf or NaN; ``exp(floor)`` (the smallest normal
    number, about) where it would be subnormal or 0. For terms that only enter sums with
    a term >= 1 or differences with numbers >= 2^-100, where this changes no bit."""
    return x.clamp_(min=exp_floor(x.dtype)).exp_()


@functools.lru_cache(maxsize=None)
def _exp_at_floor(dtype: torch.dtype) -> float:
    """The largest value torch.exp gives at the floor: its vectorised kernel (64 lanes'
    worth) and its scalar loop (a one-element tensor, also used for loop tails) may
    round it differently."""
    floor = exp_floor(dtype)
    vec = torch.full((64,), floor, dtype=dtype).exp_()
    one = torch.full((1,), floor, dtype=dtype).exp_()
    return max(float(vec.max()), float(one.max()))


def exp_flush_(x: torch.Tensor) -> torch.Tensor:
    """In place: exp(x) for x above the floor, 0 at or below it (see :func:`exp_flush`)."""
    x.clamp_(min=exp_floor(x.dtype)).exp_()
    # zero what the clamp produced: exp is increasing, and the next input above the floor
    # gives a value dozens of ulps above exp(floor), so nothing else reaches this value
    return torch.nn.functional.threshold_(x, _exp_at_floor(x.dtype), 0.0)


def exp_flush(x: torch.Tensor) -> torch.Tensor:
    """``torch.exp(x)`` with results below the normal range flushed to 0, computed without
    the underflow slow path: bit-identical to ``torch.exp(x)`` where x > floor (every
    normal result except the smallest few, within 0.005% of the smallest normal
    number), inf and NaN included; 0 where x <= floor (-inf included). Differentiable
    (gradient 0 where flushed)."""
    if not _exp_may_underflow(x, shifted=False):
        return torch.exp(x)
    e = torch.exp(torch.clamp(x, min=exp_floor(x.dtype)))
    return torch.nn.functional.threshold(e, _exp_at_floor(x.dtype), 0.0)


def _logsumexp(x: torch.Tensor, dim: int, keepdim: bool, inplace: bool) -> torch.Tensor:
    # torch.logsumexp's own algorithm (measured bit-identical to it on CPU for float32 and
    # float64), with the exp clamped: maximum (inf -> 0 shift), exp of the shifted values,
    # sum, log, add the shift back.
    m = torch.amax(x.detach(), dim, keepdim=True)
    shift = m.masked_fill(m.abs() == float("inf"), 0.0)
    t = x.sub_(shift) if inplace else x - shift
    out = exp_clamped_(t).sum(dim, keepdim=True).log_().add_(shift)
    # a row of -inf: torch sums exact zeros (log 0 = -inf); the clamp would not
    out.masked_fill_(m == float("-inf"), float("-inf"))
    return out if keepdim else out.squeeze(dim)


def logsumexp(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """``torch.logsumexp(x, dim)`` without the underflow slow path. Same algorithm, so the
    same bits (tested): the only terms that change are below 2^-126 (2^-1022), while the
    row's largest term is exactly 1 after the shift, so they are lost in rounding. Same
    NaN / +-inf behaviour, including rows of -inf (-> -inf). Differentiable (gradient:
    the softmax, 0 where it is below the normal range)."""
    if not _exp_may_underflow(x, shifted=True):
        return torch.logsumexp(x, dim, keepdim)
    return _logsumexp(x, dim, keepdim, inplace=False)


def logsumexp_(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """:func:`logsumexp` that uses ``x`` as its scratch buffer (``x`` is overwritten)."""
    return _logsumexp(x, dim, keepdim, inplace=True)


def log_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``(x - max) - log(sum(exp(x - max)))`` along ``dim`` without the underflow slow
    path, in the operation order of PyTorch's CPU log_softmax. Equal to
    ``torch.log_softmax`` to within a few ulps (not bitwise: PyTorch's fused kernel sums
    in its own order; where no exp input can underflow, PyTorch's kernel runs). Rows
    containing +inf, NaN or only -inf give NaN, as in PyTorch. Differentiable."""
    if not _exp_may_underflow(x, shifted=True):
        return torch.log_softmax(x, dim)
    t = x - torch.amax(x.detach(), dim, keepdim=True)
    s = torch.exp(torch.clamp(t, min=exp_floor(t.dtype))).sum(dim, keepdim=True)
    return t - torch.log(s)


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``exp(x - max) / sum(exp(x - max))`` along ``dim`` without the underflow slow path.
    Probabilities below the normal range are 0 (exactly 0 for -inf logits). Equal to
    ``torch.softmax`` to within a few ulps elsewhere (where no exp input can underflow,
    PyTorch's kernel runs); same NaN behaviour. Differentiable."""
    if not _exp_may_underflow(x, shifted=True):
        return torch.softmax(x, dim)
    e = exp_flush(x - torch.amax(x.detach(), dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(logits, target, reduction=...)`` for (N, L) logits and (N,) class
    indices (no ignore_index, no weights) without the underflow slow path: logsumexp
    minus the target's logit per row. Equal to PyTorch's to within a few ulps, gradient
    (softmax - one-hot) included; where no exp input can underflow it is PyTorch's."""
    if not _exp_may_underflow(logits, shifted=True):
        return torch.nn.functional.cross_entropy(logits, target, reduction=reduction)
    rows = _logsumexp(logits, 1, False, inplace=False) - logits.gather(1, target.unsqueeze(1)).squeeze(1)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.logaddexp(a, b)`` without the underflow slow path: max + log1p(exp(-|a - b|)),
    PyTorch's formula, with the exp flushed below the normal range (log1p of it would
    add less than 2^-126 to the maximum); equal inputs of +-inf give themselves."""
    m = torch.maximum(a, b)
    out = m + torch.log1p(exp_flush(-(a - b).abs()))
    return torch.where(torch.isinf(a) & (a == b), a, out)


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
        lse[rs] = logsumexp(u, 1)
        off_label = u.sum(1) - u.gather(1, label[rs]).squeeze(1)
        torch.sub(lse[rs], off_label, alpha=inv_lm1, out=loss[rs])
    return torch.where(keep, loss, 0.0), lse


def _label_probability(p: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The gradient's label entry, p_y itself (R_y is 0 there), taken from the clamped
    exponentials ``p`` before 1/(L-1) is subtracted: subtracting it and adding it back
    rounds every p_y far below 1/(L-1) (the usual case in RCE training, which makes the
    label the least likely class) to a multiple of ulp(1/(L-1)), often 0. Values the
    clamp produced (below the normal range) are 0, as in exp_flush."""
    return torch.nn.functional.threshold(p.gather(1, label), _exp_at_floor(p.dtype), 0.0)


def rce_backward(grad_rows: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                 lse: torch.Tensor, ignore_index: int, inv_temperature: float) -> torch.Tensor:
    """(softmax(u) - R_y) * grad_rows / T as a new (N, L) tensor in the logits' dtype."""
    n, num_classes = logits.shape
    acc = acc_dtype(logits.dtype)
    grad = torch.empty((n, num_classes), dtype=logits.dtype, device=logits.device)
    keep = target != ignore_index
    label = target.clamp(0, num_classes - 1).unsqueeze(1)
    g = torch.where(keep, grad_rows.to(acc) * inv_temperature, 0.0)
    # a label outside [0, L): a NaN row, as in the C++ and Triton backwards (never the
    # gradient of the clamped label)
    g = torch.where(keep & (label.squeeze(1) != target), float("nan"), g)
    inv_lm1 = 1.0 / (num_classes - 1)
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
        exp_clamped_(p)
        p_label = _label_probability(p, label[rs])
        p.sub_(inv_lm1).scatter_(1, label[rs], p_label).mul_(g[rs].unsqueeze(1))
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
    logp = log_softmax(u, 1)
    label = clamped.unsqueeze(1)
    rows = torch.sub(logp.gather(1, label).squeeze(1), logp.sum(1)).mul_(1.0 / (num_classes - 1))
    return torch.where(keep, rows, 0.0), logp, label, keep, labels_ok


def rce_backward_small(grad_scale: torch.Tensor, logp: torch.Tensor, label: torch.Tensor,
                       keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad_scale`` is (N, 1) or a scalar: upstream gradient times 1/T."""
    inv_lm1 = 1.0 / (logp.shape[1] - 1)
    grad = torch.clamp(logp, min=exp_floor(logp.dtype)).exp_()
    p_label = _label_probability(grad, label)
    grad.sub_(inv_lm1).scatter_(1, label, p_label).mul_(grad_scale)
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


def _kd_logits(q: torch.Tensor, qn: torch.Tensor, b: torch.Tensor, neg_inv_s2: float,
               out: torch.Tensor | None = None):
    """-max(||q - b||^2, 0) / sigma2 for a block, via one matmul (addmm), written into
    ``out`` (a (len(q), len(b)) scratch view) when given."""
    bn = (b * b).sum(1).unsqueeze(0)
    if out is None:
        d2 = torch.addmm(bn, q, b.t(), alpha=-2.0)
    else:
        d2 = torch.addmm(bn, q, b.t(), alpha=-2.0, out=out)
    return d2.add_(qn.unsqueeze(1)).clamp_(min=0.0).mul_(neg_inv_s2)


def _kd_scratch(q_offsets: torch.Tensor, b_offsets: torch.Tensor, dtype, device):
    """One block-sized buffer for every block of a call: a fresh 16 MiB tensor per block
    costs page faults on every pass over it (measured: the subtraction inside
    torch.logsumexp took 10x its in-cache time)."""
    most = max(((r.stop - r.start) * max(b.stop - b.start for b in bs)
                for r, bs in _kd_blocks(q_offsets, b_offsets)), default=0)
    return torch.empty(most, dtype=dtype, device=device)


def _block_view(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return buf[:rows * cols].view(rows, cols)


def kdensity_lse(q: torch.Tensor, q_offsets: torch.Tensor, bank: torch.Tensor,
                 b_offsets: torch.Tensor, sigma2: float) -> torch.Tensor:
    """Same contract as kernels.kdensity.kdensity_lse (float64 input stays float64).

    Per block: the logits by one addmm into a reused buffer, then an in-place log-sum-exp
    (:func:`logsumexp_`: no underflow slow path, the same bits as torch.logsumexp).
    """
    acc = acc_dtype(q.dtype)
    lse = torch.empty(q.shape[0], dtype=acc, device=q.device)
    if q.shape[0] == 0:
        return lse
    buf = _kd_scratch(q_offsets, b_offsets, acc, q.device)
    for rows, bank_slices in _kd_blocks(q_offsets, b_offsets):
        qq = q[rows].to(acc)
        qn = (qq * qq).sum(1)
        run = None
        for bs in bank_slices:
            scratch = _block_view(buf, qq.shape[0], bs.stop - bs.start)
            part = logsumexp_(_kd_logits(qq, qn, bank[bs].to(acc), -1.0 / sigma2, scratch), 1)
            run = part if run is None else logaddexp(run, part)
        lse[rows] = run
    return lse


def kdensity_grad(grad_lse: torch.Tensor, q: torch.Tensor, q_offsets: torch.Tensor,
                  bank: torch.Tensor, b_offsets: torch.Tensor, lse: torch.Tensor,
                  sigma2: float) -> torch.Tensor:
    """grad_lse[i] * (2 / sigma2) * (sum_j p_ij x_j - q_i), (N, D) in q's dtype."""
    acc = acc_dtype(q.dtype)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    if q.shape[0] == 0:
        return dq
    buf = _kd_scratch(q_offsets, b_offsets, acc, q.device)
    for rows, bank_slices in _kd_blocks(q_offsets, b_offsets):
        qq = q[rows].to(acc)
        qn = (qq * qq).sum(1)
        mean_x = torch.zeros_like(qq)
        for bs in bank_slices:
            b = bank[bs].to(acc)
            shape = qq.shape[0], bs.stop - bs.start
            p = _kd_logits(qq, qn, b, -1.0 / sigma2, _block_view(buf, *shape))
            # flushed, not clamped: exact zeros where exp underflows keep the matmul's
            # sums bit-identical to those over PyTorch's subnormals (tested)
            exp_flush_(p.sub_(lse[rows].unsqueeze(1)))
            mean_x.addmm_(p, b)
        scale = grad_lse[rows].to(acc).unsqueeze(1) * (2.0 / sigma2)
        dq[rows] = mean_x.sub_(qq).mul_(scale)
    return dq


def kdensity_bank_grad(grad_lse: torch.Tensor, q: torch.Tensor, q_offsets: torch.Tensor,
                       bank: torch.Tensor, b_offsets: torch.Tensor, lse: torch.Tensor,
                       sigma2: float) -> torch.Tensor:
    """d (sum_i grad_lse[i] lse_i) / d bank = (2 / sigma2) sum_i g_i p_ij (q_i - x_j),
    (M, D) in the bank's dtype; the same blocks (and memory bound) as the forward. Runs
    on any device (a bank gradient is rare: learning the kernel points)."""
    acc = acc_dtype(q.dtype)
    db = torch.zeros(bank.shape, dtype=acc, device=bank.device)
    if q.shape[0] == 0:
        return db.to(bank.dtype)
    buf = _kd_scratch(q_offsets, b_offsets, acc, q.device)
    scale = 2.0 / sigma2
    for rows, bank_slices in _kd_blocks(q_offsets, b_offsets):
        qq = q[rows].to(acc)
        qn = (qq * qq).sum(1)
        g = grad_lse[rows].to(acc)
        gq = qq * g.unsqueeze(1)
        for bs in bank_slices:
            b = bank[bs].to(acc)
            shape = qq.shape[0], bs.stop - bs.start
            p = _kd_logits(qq, qn, b, -1.0 / sigma2, _block_view(buf, *shape))
            exp_flush_(p.sub_(lse[rows].unsqueeze(1)))
            part = torch.mm(p.t(), gq).sub_(torch.mv(p.t(), g).unsqueeze(1) * b)
            db[bs] += part.mul_(scale)
    return db.to(bank.dtype)


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
