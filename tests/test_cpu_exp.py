"""exp on CPU without the underflow slow path: the clamped PyTorch primitives of
rce_fast._torch_impl against the unclamped maths, and the fused C++ loss's vectorised exp
(rce_fast._C.exp_cpu) against a float64 / extended-precision reference.

The primitives must give the same bits as the PyTorch functions they replace wherever
the result is defined by normal numbers, and the paths built on them (the RCE loss's
PyTorch path, the blocked K-density and its gradient) the same bits as before the clamp.
"""
import math  # noqa: F401

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rce_fast import _ext, _torch_impl as ti

INF, NAN = float("inf"), float("nan")
DTYPES = [torch.float32, torch.float64]
TINY = {dt: torch.finfo(dt).tiny for dt in DTYPES}


def _same(a, b):
    """Bitwise equal, NaN where NaN (and the same signed zeros)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    keep = ~torch.isnan(a)
    assert torch.equal(a[keep].view(-1), b[keep].view(-1)), (
        f"{int((a[keep] != b[keep]).sum())} entries differ, max "
        f"{(a[keep] - b[keep]).abs().max().item():.3g}")
    assert torch.equal(torch.signbit(a[keep]), torch.signbit(b[keep]))


def _rows(dtype, seed=0):
    """Rows that exercise every case: ordinary, huge gaps (most terms far below the
    floor after the shift), partly -inf, all -inf, +inf, NaN, all equal, one column."""
    g = torch.Generator().manual_seed(seed)
    cases = {
        "ordinary": torch.randn(64, 33, generator=g) * 3,
        "huge gaps": torch.randn(64, 257, generator=g) * 400,
        "subnormal band": -torch.rand(64, 40, generator=g) * 30 - 80,  # gaps of 80..110
        "all equal": torch.full((5, 17), -3.25),
        "one column": torch.randn(9, 1, generator=g),
    }
    mixed = torch.randn(8, 12, generator=g) * 50
    mixed[0, 3] = -INF
    mixed[1] = -INF
    mixed[2, 5] = INF
    mixed[3, 0] = NAN
    mixed[4, :6] = INF
    mixed[5, 2] = -INF
    mixed[5, 7] = INF
    mixed[6] = 1e30
    mixed[7, 1] = -1e30
    cases["special values"] = mixed
    return {k: v.to(dtype) for k, v in cases.items()}


# ------------------------------------------------------------------------ the floor

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_floor_is_where_exp_leaves_the_normal_range(dtype):
    floor = ti.exp_floor(dtype)
    at = torch.full((64,), floor, dtype=dtype)
    assert (torch.exp(at) >= TINY[dtype]).all() and torch.exp(at[:1]) >= TINY[dtype]
    assert float(torch.exp(at[:1])) <= TINY[dtype] * 1.0001
    # 0.005% lower the results are subnormal: nothing normal lies below the floor
    below = torch.full((64,), floor * (1 + 1e-6), dtype=dtype)
    assert (torch.exp(below) < TINY[dtype]).all()
    assert ti.exp_floor(torch.float16) == ti.exp_floor(torch.bfloat16) == ti.EXP_FLOOR[
        torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exp_clamped_and_exp_flush_against_torch_exp(dtype):
    floor = ti.exp_floor(dtype)
    x = torch.cat([torch.linspace(-2000, 100, 200_001, dtype=dtype),
                   floor + torch.arange(-50, 51, dtype=dtype) * abs(floor) * 2 ** -40,
                   torch.tensor([0.0, -0.0, 1e-40, -1e-300, INF, -INF, NAN], dtype=dtype)])
    ref = torch.exp(x)
    clamped = ti.exp_clamped_(x.clone())
    above = ~(x < floor)  # NaN included
    _same(clamped[above], ref[above])
    assert (clamped[x < floor] == torch.exp(torch.tensor(floor, dtype=dtype))).all()
    flushed = ti.exp_flush(x)
    keep = ~(x <= floor)
    _same(flushed[keep], ref[keep])
    assert (flushed[x <= floor] == 0).all() and not torch.signbit(flushed).any()
    assert torch.isnan(flushed[-1]) and flushed[-3] == INF and flushed[-2] == 0
    inplace = x.clone()
    assert ti.exp_flush_(inplace) is inplace
    _same(inplace, flushed)


# --------------------------------------------------------------- log-sum-exp, softmax

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logsumexp_is_bit_identical_to_torch(dtype):
    for name, x in _rows(dtype).items():
        for dim in (1, 0, -1):
            ref = torch.logsumexp(x, dim)
            _same(ti.logsumexp(x, dim), ref)
            _same(ti.logsumexp(x, dim, keepdim=True), torch.logsumexp(x, dim, keepdim=True))
            scratch = x.clone()
            _same(ti.logsumexp_(scratch, dim), ref)
    x3 = torch.randn(4, 5, 300, dtype=dtype) * 200
    for dim in (0, 1, 2):
        _same(ti.logsumexp(x3, dim), torch.logsumexp(x3, dim))
    before = x3.clone()
    ti.logsumexp(x3, 2)
    assert torch.equal(x3, before)  # the out-of-place version leaves its input alone


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_and_log_softmax_match_torch(dtype):
    """Not bitwise: PyTorch's fused softmax kernels sum in their own order (and differ
    between dim = -1 and other dims). Measured at most 5.6 ulps apart; allowed 8, which
    is also the order of PyTorch's own error against float64 on these rows."""
    eps = torch.finfo(dtype).eps
    for name, x in _rows(dtype).items():
        for dim in (1, 0):
            p, ref = ti.softmax(x, dim), torch.softmax(x, dim)
            torch.testing.assert_close(p, ref, rtol=8 * eps, atol=2 * TINY[dtype],
                                       equal_nan=True, msg=f"softmax {name}")
            lp, lref = ti.log_softmax(x, dim), torch.log_softmax(x, dim)
            scale = max(1.0, float(lref.abs().nan_to_num(0.0, 0.0, 0.0).max()))
            torch.testing.assert_close(lp, lref, rtol=0, atol=8 * eps * scale, equal_nan=True,
                                       msg=f"log_softmax {name}")
            if not ti._exp_may_underflow(x, shifted=True):  # PyTorch's own kernels ran
                _same(p, ref)
                _same(lp, lref)
            # probabilities below the normal range are exact zeros, never subnormals
            assert not ((p > 0) & (p < TINY[dtype])).any()
            assert (p[torch.isneginf(x) & ~torch.isnan(ref)] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logaddexp_matches_torch(dtype):
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(5000, generator=g) * 300).to(dtype)
    b = (torch.randn(5000, generator=g) * 300).to(dtype)
    special = torch.tensor([-INF, INF, -INF, 2.0, NAN, 0.0, 0.0, -INF], dtype=dtype)
    other = torch.tensor([-INF, INF, 3.0, -INF, 1.0, -200.0, -1000.0, INF], dtype=dtype)
    a, b = torch.cat([a, special]), torch.cat([b, other])
    torch.testing.assert_close(ti.logaddexp(a, b), torch.logaddexp(a, b), equal_nan=True,
                               rtol=2 * torch.finfo(dtype).eps, atol=0)
    _same(ti.logaddexp(special, other), torch.logaddexp(special, other))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_matches_torch_values_and_gradients(dtype):
    eps = torch.finfo(dtype).eps
    g = torch.Generator().manual_seed(6)
    for scale in (3.0, 400.0):
        z = (torch.randn(200, 10, generator=g) * scale).to(dtype)
        y = torch.randint(0, 10, (200,), generator=g)
        assert ti._exp_may_underflow(z, shifted=True) == (scale > 100)
        for reduction in ("none", "sum", "mean"):
            a, b = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
            ours, theirs = ti.cross_entropy(a, y, reduction), F.cross_entropy(b, y,
                                                                             reduction=reduction)
            # a log-sum-exp of logits of size S carries an absolute error of about eps * S
            # (in both implementations), and so do the loss and the softmax in the gradient
            tol = 4 * eps * max(1.0, float(z.abs().max()))
            torch.testing.assert_close(ours, theirs, rtol=4 * eps, atol=tol)
            (ours.sum() if reduction == "none" else ours).backward()
            (theirs.sum() if reduction == "none" else theirs).backward()
            torch.testing.assert_close(a.grad, b.grad, rtol=8 * eps, atol=tol,
                                       msg=f"{scale} {reduction}")
    with pytest.raises(ValueError, match="reduction"):
        ti.cross_entropy(z, y, "avg")


def test_primitives_are_differentiable():
    x = (torch.randn(5, 7, dtype=torch.float64) * 3).requires_grad_(True)
    y = torch.tensor([0, 6, 2, 3, 3])
    for fn in (lambda t: ti.logsumexp(t, 1), lambda t: ti.logsumexp(t, 0, keepdim=True),
               lambda t: ti.softmax(t, 1), lambda t: ti.log_softmax(t, 0),
               ti.exp_flush, lambda t: ti.logaddexp(t, t.flip(0)),
               lambda t: ti.cross_entropy(t, y, "sum")):
        assert torch.autograd.gradcheck(fn, (x,))
    # where exp underflows the gradient is 0, as the flushed value's
    far = torch.tensor([[0.0, -1000.0, 1.0]], dtype=torch.float64, requires_grad=True)
    ti.logsumexp(far, 1).backward()
    assert far.grad[0, 1] == 0 and torch.isclose(far.grad.sum(), torch.tensor(1.0,
                                                                               dtype=torch.float64))


# ------------------------------------------------- the paths built on the primitives

def _rce_unclamped(z, y, grad_rows):
    """The RCE loss's PyTorch path (one chunk, T = 1, no ignored rows) with
    torch.logsumexp and torch.exp, operation for operation. The gradient's label entry
    is p_y itself (R_y = 0), flushed to 0 below the normal range as exp_flush does."""
    num_classes = z.shape[1]
    inv_lm1 = 1.0 / (num_classes - 1)
    lse = torch.logsumexp(z, 1)
    off_label = z.sum(1) - z.gather(1, y[:, None]).squeeze(1)
    rows = torch.sub(lse, off_label, alpha=inv_lm1)
    g = grad_rows * 1.0
    p = (z - lse[:, None]).exp_()
    p_label = p.gather(1, y[:, None])
    p_label = torch.where(p_label < TINY[z.dtype], 0.0, p_label)
    grad = p.sub_(inv_lm1).scatter_(1, y[:, None], p_label).mul_(g[:, None])
    return rows, lse, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rce_pytorch_path_same_bits_as_unclamped(dtype):
    g = torch.Generator().manual_seed(4)
    for scale in (2.0, 300.0):
        z = (torch.randn(300, 97, generator=g) * scale).to(dtype)
        z[0, 5] = -INF
        y = torch.randint(0, 97, (300,), generator=g)
        gr = torch.rand(300, generator=g).to(dtype)
        rows, lse = ti.rce_forward(z, y, -100, 1.0)
        grad = ti.rce_backward(gr, z, y, lse, -100, 1.0)
        rows_ref, lse_ref, grad_ref = _rce_unclamped(z, y, gr)
        _same(lse, lse_ref)
        _same(rows, rows_ref)
        _same(grad, grad_ref)


def _kd_unclamped(q, qo, bank, bo, sigma2):
    """The blocked K-density and gradient as they were: torch.logsumexp, torch.exp."""
    lse = torch.empty(len(q), dtype=q.dtype)
    for rows, bank_slices in ti._kd_blocks(qo, bo):
        qq = q[rows]
        qn = (qq * qq).sum(1)
        run = None
        for bs in bank_slices:
            part = torch.logsumexp(ti._kd_logits(qq, qn, bank[bs], -1.0 / sigma2), 1)
            run = part if run is None else torch.logaddexp(run, part)
        lse[rows] = run
    dq = torch.empty_like(q)
    for rows, bank_slices in ti._kd_blocks(qo, bo):
        qq = q[rows]
        qn = (qq * qq).sum(1)
        mean_x = torch.zeros_like(qq)
        for bs in bank_slices:
            b = bank[bs]
            p = ti._kd_logits(qq, qn, b, -1.0 / sigma2).sub_(lse[rows].unsqueeze(1)).exp_()
            mean_x.addmm_(p, b)
        dq[rows] = mean_x.sub_(qq).mul_(2.0 / sigma2)
    return lse, dq


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spread", [0.3, 6.0], ids=["ordinary", "huge-gaps"])
def test_kdensity_pytorch_path_same_bits_as_unclamped(dtype, spread):
    g = torch.Generator().manual_seed(5)
    counts_q, counts_b = [300, 0, 157, 41], [200, 30, 333, 1]
    q = (torch.randn(sum(counts_q), 24, generator=g) * spread).to(dtype)
    bank = (torch.randn(sum(counts_b), 24, generator=g) * spread).to(dtype)
    off = lambda c: torch.tensor([0] + list(np.cumsum(c)), dtype=torch.long)  # noqa: E731
    qo, bo = off(counts_q), off(counts_b)
    lse_ref, dq_ref = _kd_unclamped(q, qo, bank, bo, 0.385)
    lse = ti.kdensity_lse(q, qo, bank, bo, 0.385)
    _same(lse, lse_ref)
    _same(ti.kdensity_grad(torch.ones(len(q), dtype=dtype), q, qo, bank, bo, lse, 0.385),
          dq_ref)


# ------------------------------------------------------------- the fused loss's exp

def _module():
    module, why = _ext.load()
    if module is None:
        pytest.skip(why)
    return module


K_LO = {torch.float32: -87.3365, torch.float64: -708.3964}   # csrc/vec_exp.h
K_HI = {torch.float32: 88.72283172607421875, torch.float64: 709.782712893384}


def _cpp_exp(x, isa=None):
    module = _module()
    x = x.contiguous()
    y = torch.empty_like(x)
    module.exp_cpu(x.data_ptr(), y.data_ptr(), x.numel(), x.dtype == torch.float64,
                   module.ISA_AUTO if isa is None else isa)
    return y


def _ulps(got, ref, mant_bits):
    """|got - ref| in units of the last place of ref (float64 / longdouble arrays)."""
    ref_abs = np.abs(ref)
    expo = np.floor(np.log2(ref_abs.astype(np.float64)))
    return np.abs(got.astype(ref.dtype) - ref) / np.exp2(expo - mant_bits).astype(ref.dtype)


def test_cpp_exp_float32_error_bound():
    """Max error over a strided sweep of every float32 input in [kLo, kHi] (and all
    inputs near the ends and near 0): <= 1.5 ulp. An exhaustive sweep of all 2.24e9
    inputs in range gave 1.3625 ulp (at x = 5.2007337)."""
    lo = np.float32(K_LO[torch.float32]).view(np.uint32)
    hi = np.float32(K_HI[torch.float32]).view(np.uint32)
    pos = np.arange(0, int(hi) + 1, 509, dtype=np.uint32)
    neg = np.arange(0x80000000, int(lo) + 1, 509, dtype=np.uint32)
    ends = np.concatenate([np.arange(int(hi) - 3000, int(hi) + 1), np.arange(int(lo) - 3000,
                                                                              int(lo) + 1),
                           np.arange(0, 3000), np.arange(0x80000000, 0x80000000 + 3000),
                           np.arange(0x3F800000 - 3000, 0x3F800000 + 3000)]).astype(np.uint32)
    x = np.concatenate([pos, neg, ends]).view(np.float32)
    got = _cpp_exp(torch.from_numpy(x)).numpy()
    err = _ulps(got, np.exp(x.astype(np.float64)), 23)
    assert err.max() <= 1.5, f"{err.max():.4f} ulp at x = {x[err.argmax()]!r}"
    module = _module()
    base = _cpp_exp(torch.from_numpy(x), module.ISA_BASELINE).numpy()
    assert np.array_equal(base.view(np.uint32), got.view(np.uint32))  # same bits, any ISA


def test_cpp_exp_float64_error_bound():
    if np.finfo(np.longdouble).nmant < 63:
        pytest.skip("no extended-precision long double for the float64 reference")
    g = np.random.default_rng(0)
    x = np.concatenate([g.uniform(K_LO[torch.float64], K_HI[torch.float64], 1_000_000),
                        g.uniform(-1, 1, 100_000), np.linspace(-708.3964, -700, 10_000),
                        np.linspace(700, 709.782712893384, 10_000)])
    got = _cpp_exp(torch.from_numpy(x)).numpy()
    err = _ulps(got, np.exp(x.astype(np.longdouble)), 52)
    assert float(err.max()) <= 1.5, f"{float(err.max()):.4f} ulp at x = {x[err.argmax()]!r}"
    base = _cpp_exp(torch.from_numpy(x), _module().ISA_BASELINE).numpy()
    assert np.array_equal(base.view(np.uint64), got.view(np.uint64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_exp_special_values_and_range(dtype):
    module = _module()
    lo, hi = K_LO[dtype], K_HI[dtype]
    big = torch.finfo(dtype).max
    npt = np.float32 if dtype == torch.float32 else np.float64
    below, above = np.nextafter(npt(lo), npt(-INF)), np.nextafter(npt(hi), npt(INF))
    x = torch.tensor([NAN, INF, -INF, 0.0, -0.0, 1e-45 if dtype == torch.float32 else 5e-324,
                      lo, float(below), -1e4, hi, float(above), 1e4], dtype=dtype)
    for isa in (module.ISA_BASELINE, module.ISA_AUTO):
        y = _cpp_exp(x, isa)
        assert torch.isnan(y[0]) and y[1] == INF and y[2] == 0 and not torch.signbit(y[2])
        assert y[3] == 1 and y[4] == 1 and y[5] == 1  # exp(0) exactly 1, also for -0, tiny
        assert TINY[dtype] <= y[6] <= TINY[dtype] * 1.0001  # kLo: the smallest normal
        assert y[7] == 0 and y[8] == 0  # below kLo: flushed, never subnormal
        assert math.isfinite(y[9]) and y[9] > big * 0.9999 and y[10] == INF and y[11] == INF
    assert module.cpu_isa(module.ISA_BASELINE) == "baseline"
    assert module.cpu_isa() in ("avx2", "baseline")
