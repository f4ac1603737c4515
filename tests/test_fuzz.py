"""Property-based fuzzing (hypothesis) of rce_loss, kdensity, confidence, non_me and the
AUC protocol against plain references, on every CPU path.

Each property draws a whole case (shapes, dtype, value regime, options) plus a seed for
the bulk values, runs the op and its gradients, and compares with the references of
tests/reference.py (float64 ground truth; scikit-learn for the AUC code).

Tolerances follow the flash-attention rule of tests/test_rce_loss.py: an output is within
2 x the error of the same reference computed in low precision (measured on the same
case), plus a floor. The floor is a few roundings of each quantity the algorithm has to
form in its accumulation dtype (float64 for float64 input, float32 otherwise):
- RCE: loss = lse - mean_{j != y} u_j with lse kept per row (the design's one fp32
  log-sum-exp per row), gradient exp(u - lse) - R_y: a rounding of lse (|lse| ulps) and of
  the mean is the loss's floor, and lse's rounding is a relative error of p in the
  gradient. With logits of 1e4 that is 1e-3 in float32, inherent in storing lse.
- K-density: the distances come from ||a||^2 + ||b||^2 - 2ab on class-centred rows (one
  matmul per block), so the floor holds a rounding of those squared norms over sigma2.
For float64 input the floor is the whole bound (the float64 reference cannot judge its
own precision). Non-finite values must match the reference's exactly.

Examples per property are fixed (``derandomize=True``: the same cases on every run, no
example database; a property run once per CPU path is seeded per path, so each path gets
cases of its own); ``RCE_FAST_FUZZ_SCALE=k`` runs k times as many and
``RCE_FAST_FUZZ_RANDOM=1`` draws new cases each run, for deeper fuzzing by hand.

Examples (cases run) per property at the default scale, counted by wrapping the checks:

    op                          property                                  examples
    rce_loss                    loss and gradient vs float64 reference         143
                                  (auto 40, compiled 30, torch 40,
                                   torch_chunked 25, triton 8)
    rce_loss                    double backward vs float64 reference            71
                                  (auto 20, compiled 15, torch 20,
                                   torch_chunked 12, triton 4)
    kdensity                    log K-density and gradients (queries,           86
                                bank) vs float64 reference
                                  (auto 30, torch 30, torch_chunked 20,
                                   triton 6)
    confidence, non_me          vs float64 references (both per case)           60
    auc, auc_standard_error     vs brute force and scikit-learn                 80
    paper_auc                   vs the per-index protocol + scikit-learn        60
    detection_metrics           AUROC/AUPR/SE/FPR95/TPR/thresholds vs           60
                                brute force and scikit-learn

The triton rows run only under the Triton interpreter (CPU, the default here). The
whole file takes about 30-60 s on a shared 2-core CPU.
"""
from __future__ import annotations

import contextlib
import math
import os
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

import rce_fast
from rce_fast import _torch_impl, ops
from rce_fast.detect import auc, auc_standard_error, detection_metrics, paper_auc
from tests.reference import (auc_reference, auc_se_reference, confidence_reference,
                             detection_rates_reference, kdensity_reference, non_me_reference,
                             paper_auc_reference, rce_grad_reference, rce_loss_reference)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
EPS = {F16: 2.0 ** -10, BF16: 2.0 ** -7, F32: 2.0 ** -23, F64: 2.0 ** -52}
ALL_DTYPES = (F32, F64, F16, BF16)
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_SCALE = float(os.environ.get("RCE_FAST_FUZZ_SCALE", "1"))
_DERANDOMIZE = os.environ.get("RCE_FAST_FUZZ_RANDOM") != "1"
# too_slow is a timing check: on a loaded CI machine it could fail a run whose cases are
# the same as always; the cases, not the clock, decide pass or fail here.
_BASE = settings(deadline=None, derandomize=_DERANDOMIZE, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow])


def fuzz(examples: int, key: str | None = None):
    """Settings of one property: a fixed number of examples, deterministic, no database.

    ``key`` names a property run once per path (the same inner function each time): it
    seeds that run, so each path gets its own cases rather than the same ones again
    (derandomize seeds from the function's source, which the paths share)."""
    fixed = settings(_BASE, max_examples=max(1, int(examples * _SCALE)))

    def apply(test):
        test = fixed(test)
        if key is not None and _DERANDOMIZE:
            test = seed(zlib.crc32(key.encode()))(test)
        return test
    return apply


def acc(dtype):
    return _torch_impl.acc_dtype(dtype)


# ------------------------------------------------------------------------------ paths

# (name, examples of the RCE properties, examples of the K-density properties; the module
# docstring's table adds them up: keep it in step). The interpreted Triton kernels cost
# ~2 ms per program: few, smaller cases there.
PATHS = {"auto": (40, 30), "compiled": (30, 0), "torch": (40, 30), "torch_chunked": (25, 20),
         "triton": (8, 6)}


def _path_params(kind):
    col = 0 if kind == "rce" else 1
    out = []
    for name, counts in PATHS.items():
        if counts[col] == 0:
            continue
        marks = ()
        if name == "triton":
            marks = pytest.mark.skipif(not INTERPRETER, reason="the Triton interpreter is off "
                                       "(TRITON_INTERPRET=0): the cuda tests run the kernels")
        out.append(pytest.param(name, id=name, marks=marks))
    return out


@contextlib.contextmanager
def cpu_path(name):
    """Run under one CPU path:
    auto: the default (the RCE loss's fused C++ loop or PyTorch, picked by measurement);
    compiled: the fused C++ RCE loss forced on every shape;
    torch: backend "torch"; torch_chunked: the same with tiny row chunks and K-density
    blocks, so small cases run the multi-chunk / multi-block code;
    triton: the Triton kernels under the interpreter."""
    saved = (_torch_impl.SMALL_ELEMS, _torch_impl._CHUNK_ELEMS, _torch_impl._KD_BLOCK,
             _torch_impl._KD_BANK_STEP)
    backend = {"auto": "auto", "compiled": "auto", "triton": "triton"}.get(name, "torch")
    try:
        if name == "torch_chunked":
            _torch_impl.SMALL_ELEMS, _torch_impl._CHUNK_ELEMS = -1, 64
            _torch_impl._KD_BLOCK, _torch_impl._KD_BANK_STEP = 96, 7
        with rce_fast.use_backend(backend), ops.rce_cpu_path(
                "compiled" if name == "compiled" else ops.get_rce_cpu_path()):
            yield
    finally:
        (_torch_impl.SMALL_ELEMS, _torch_impl._CHUNK_ELEMS, _torch_impl._KD_BLOCK,
         _torch_impl._KD_BANK_STEP) = saved


def _dtypes(path):
    return (F32, F16, BF16) if path == "triton" else ALL_DTYPES  # no float64 Triton kernels


# ------------------------------------------------------------------------- comparison

def assert_close_to_truth(out, truth, low, floor, what, dtype=None):
    """|out - truth| <= 2 * max|low - truth| + floor (elementwise; ``floor`` broadcasts).

    ``low``: the same reference computed in low precision (None: no low-precision
    reference). Where the truth (rounded to ``dtype``, the output's) is not finite, the
    output must be the same inf or a NaN where the truth is NaN."""
    out = out.detach().double().cpu()
    truth = truth.detach().double().cpu()
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    expect = truth if dtype is None else truth.to(dtype).double()
    odd = ~torch.isfinite(expect)
    if odd.any():
        same = (out[odd] == expect[odd]) | (torch.isnan(out[odd]) & torch.isnan(expect[odd]))
        assert same.all(), (f"{what}: {out[odd][~same][:5].tolist()} where the reference "
                            f"gives {expect[odd][~same][:5].tolist()}")
    fin = ~odd
    ref_err = 0.0
    if low is not None:
        low = low.detach().double().cpu()
        both = fin & torch.isfinite(low)
        if both.any():
            ref_err = (low[both] - truth[both]).abs().max().item()
    floor = torch.as_tensor(floor, dtype=torch.float64).expand(truth.shape)
    err = (out - truth).abs()
    bound = 2 * ref_err + floor
    bad = fin & ~(err <= bound)  # NaN in out fails too
    if bad.any():
        i = int(torch.nonzero(bad.reshape(-1))[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {int(fin.sum())} entries off; first at flat index "
            f"{i}: got {out.reshape(-1)[i].item()!r}, reference {truth.reshape(-1)[i].item()!r}"
            f", error {err.reshape(-1)[i].item():.3g} > bound {bound.reshape(-1)[i].item():.3g}"
            f" (2 x reference's own error {ref_err:.3g} + floor)")


def _tiny(dtype):
    return float(torch.finfo(dtype).tiny)


# ===================================================================== RCE loss

@st.composite
def logits_values(draw, n, num_classes, generator):
    """(n, L) float64 logits in one of several regimes: ordinary, large (+-1e4), large
    gaps, (near-)ties."""
    regime = draw(st.sampled_from(["normal", "large", "gap", "ties"]))
    shape = (n, num_classes)
    if regime == "normal":
        scale = draw(st.sampled_from([1e-3, 1.0, 4.0, 30.0]))
        z = torch.randn(shape, generator=generator, dtype=F64) * scale
    elif regime == "large":
        z = (torch.rand(shape, generator=generator, dtype=F64) * 2 - 1) * 1e4
    elif regime == "gap":
        z = torch.randn(shape, generator=generator, dtype=F64)
        gap = draw(st.sampled_from([30.0, 100.0, 1e3, 1e4])) * draw(st.sampled_from([1, -1]))
        cols = torch.randint(0, num_classes, (n, 1), generator=generator)
        z.scatter_add_(1, cols, torch.full((n, 1), gap, dtype=F64))
    else:
        centre = draw(st.sampled_from([0.0, 7.0, -50.0, 1e4, -1e4]))
        noise = draw(st.sampled_from([0.0, 1e-6, 1e-3]))
        z = centre + noise * torch.randn(shape, generator=generator, dtype=F64)
    return z


def with_neg_inf(z, rows, generator):
    """About 20% of the entries of the chosen rows set to -inf, never a whole row. (The
    reference, cross_entropy against R_y times a 0/1 mask, makes ignored rows NaN with
    -inf, where the loss is 0 by definition: only kept rows get them.)"""
    hit = (torch.rand(z.shape, generator=generator) < 0.2) & rows.unsqueeze(1)
    hit[:, 0] = False
    return z.masked_fill(hit, float("-inf"))


@st.composite
def rce_cases(draw, path, double_backward=False):
    dtype = draw(st.sampled_from(_dtypes(path)))
    small = path == "triton"
    size = draw(st.sampled_from(["one", "small", "small", "medium", "large"]
                                + ([] if small or double_backward else ["huge"])))
    n, num_classes = {
        "one": (1, draw(st.integers(2, 50))),
        "small": (draw(st.integers(1, 16)), draw(st.integers(2, 40))),
        "medium": (draw(st.integers(1, 64)), draw(st.integers(41, 300))),
        "large": (draw(st.integers(1, 8 if small else 40)),
                  draw(st.integers(301, 600 if small else 3000))),
        "huge": (1, draw(st.sampled_from([65_537, 100_003, 262_147]))),
    }[size]
    layout = draw(st.sampled_from(["2d", "2d", "1d", "3d", "transposed", "strided"]))
    if layout == "1d":
        n = 1
    d1 = 1
    if layout == "3d":
        d1 = draw(st.integers(1, 4))
        n = max(1, n // d1) * d1
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 32 - 1)))
    z = draw(logits_values(n, num_classes, g))
    temperature = draw(st.one_of(st.just(1.0), st.sampled_from([0.25, 2.0, 10.0]),
                                 st.floats(0.05, 20.0)))
    if dtype == F16:  # keep Z / T inside float16's range (the float16 reference needs it)
        z = z.clamp(-2e4 * min(1.0, temperature), 2e4 * min(1.0, temperature))
    y = torch.randint(0, num_classes, (n,), generator=g)
    ignore_index = draw(st.sampled_from([-100, -100, -1, 0, num_classes - 1]))
    frac = draw(st.sampled_from([0.0, 0.0, 0.25, 1.0]))
    if frac:
        y[torch.rand(n, generator=g) < frac] = ignore_index
    if not double_backward and num_classes > 2 and draw(st.integers(0, 3)) == 0:
        z = with_neg_inf(z, y != ignore_index, g)  # on the label too: a NaN loss there
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    return dict(z=z.to(dtype), y=y, dtype=dtype, layout=layout, d1=d1, T=temperature,
                ignore_index=ignore_index, reduction=reduction)


def _layout(z2, y, layout, d1):
    """The (N, L) logits and (N,) targets in the case's layout; and how to map a gradient
    of that layout back to (N, L)."""
    n, num_classes = z2.shape
    if layout == "1d":
        return z2[0], y[0], lambda g: g.unsqueeze(0)
    if layout == "3d":  # (a, L, d1), class dim 1 like cross_entropy; a view, not contiguous
        z3 = z2.reshape(n // d1, d1, num_classes).movedim(2, 1)
        return z3, y.reshape(n // d1, d1), lambda g: g.movedim(1, -1).reshape(n, num_classes)
    if layout == "transposed":
        return z2.t().contiguous().t(), y, lambda g: g
    if layout == "strided":
        return torch.cat([z2, z2], 1)[:, :num_classes], y, lambda g: g
    return z2.clone(), y, lambda g: g


def _upstream(loss):
    return torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)


def _reference_loss_and_grad(z2, y, case, dtype):
    """The reference loss in ``dtype`` and its gradient for the upstream gradient of
    _upstream (from the closed form, per row: see rce_grad_reference)."""
    loss = rce_loss_reference(z2, y, case["reduction"], case["ignore_index"], case["T"],
                              dtype=dtype)
    up = _upstream(loss).to(dtype)
    if case["reduction"] == "none":
        weight = up
    else:
        weight = up.expand(len(y))
        if case["reduction"] == "mean":
            weight = weight / (y != case["ignore_index"]).sum().to(dtype)
    rows = rce_grad_reference(z2, y, case["ignore_index"], case["T"], dtype=dtype)
    return loss, weight.unsqueeze(1) * rows


def _rce_stats(z2, y, case, dtype):
    """Float64 quantities the floors are made of: per-row weight of each loss in the
    reduced output (upstream gradient, 1 / kept rows for "mean"), keep mask, p =
    softmax(u), R_y, and cond = |lse| + max |u| (the size of lse and of the mean, whose
    roundings the algorithm cannot avoid)."""
    u = z2.double() / case["T"]
    n, num_classes = u.shape
    keep = y != case["ignore_index"]
    lse = torch.logsumexp(u, 1)
    cond = torch.where(torch.isfinite(lse), lse, 0.0).abs() + \
        torch.where(torch.isfinite(u), u, 0.0).abs().amax(1)
    rows = rce_loss_reference(z2.double(), y, "none", case["ignore_index"], case["T"])
    up = _upstream(rows if case["reduction"] == "none" else rows.sum()).double()
    count = keep.sum().clamp(min=1)
    weight = {"none": up, "sum": up.expand(n), "mean": up.expand(n) / count}[case["reduction"]]
    p = torch.softmax(u, 1).nan_to_num(0.0)
    r = torch.full_like(p, 1.0 / (num_classes - 1)).scatter_(
        1, y.clamp(0, num_classes - 1)[:, None], 0.0)
    return dict(keep=keep, cond=cond, rows=rows.nan_to_num(0.0, 0.0, 0.0), weight=weight,
                p=p, r=r, e_out=EPS[dtype], e_acc=EPS[acc(dtype)])


def _rce_floors(z2, y, case, dtype):
    """Floors of the loss (reduced like it) and of the gradient: a few roundings of each
    quantity the algorithm forms (module docstring)."""
    s = _rce_stats(z2, y, case, dtype)
    row_floor = (4 * s["e_out"] * s["rows"].abs() + 8 * s["e_acc"] * s["cond"]) * s["keep"]
    if case["reduction"] == "none":
        loss_floor = row_floor
    else:
        loss_floor = (row_floor * s["weight"].abs()).sum() + \
            4 * s["e_out"] * (s["rows"] * s["weight"]).sum().abs()
    scale = (s["weight"].abs() * s["keep"] / case["T"]).unsqueeze(1)
    grad_floor = scale * (4 * s["e_out"] * (s["p"] + s["r"])
                          + 8 * s["e_acc"] * s["cond"].unsqueeze(1) * s["p"]) + 2 * _tiny(dtype)
    return loss_floor + _tiny(dtype), grad_floor


def check_rce(case):
    z2, y, dtype = case["z"], case["y"], case["dtype"]
    z, target, back = _layout(z2, y, case["layout"], case["d1"])
    before = z.clone()
    zz = z.detach().requires_grad_(True)  # a leaf with the layout's strides
    loss = rce_fast.rce_loss(zz, target, reduction=case["reduction"],
                             ignore_index=case["ignore_index"], temperature=case["T"])
    assert loss.dtype == dtype
    expected_shape = tuple(target.shape) if case["reduction"] == "none" else ()
    assert tuple(loss.shape) == expected_shape
    (grad,) = torch.autograd.grad(loss, zz, _upstream(loss))
    assert grad.dtype == dtype and grad.shape == z.shape
    assert torch.equal(zz.detach(), before) or torch.isnan(before).any(), "logits modified"
    loss_flat = loss.detach().reshape(-1) if case["reduction"] == "none" else loss.detach()
    grad2 = back(grad)

    truth_loss, truth_grad = _reference_loss_and_grad(z2, y, case, F64)
    if dtype == F64:
        low_loss = low_grad = None
    else:
        low_loss, low_grad = _reference_loss_and_grad(z2, y, case, dtype)
    loss_floor, grad_floor = _rce_floors(z2, y, case, dtype)
    if case["reduction"] == "mean" and not bool((y != case["ignore_index"]).any()):
        # every row ignored: nan, like cross_entropy, and a zero gradient
        assert torch.isnan(loss)
        assert (grad2 == 0).all()
        return
    assert_close_to_truth(loss_flat, truth_loss, low_loss, loss_floor, "loss", dtype)
    assert_close_to_truth(grad2, truth_grad, low_grad, grad_floor, "gradient", dtype)


@pytest.mark.parametrize("path", _path_params("rce"))
def test_rce_loss_and_gradient_match_reference(path):
    @fuzz(PATHS[path][0], key=f"rce/{path}")
    @given(case=rce_cases(path))
    def run(case):
        with cpu_path(path):
            check_rce(case)
    run()


# ---------------------------------------------------------------- RCE double backward

def _penalty_grad(loss_fn, z2, y, case, dtype):
    """d/dz of sum(G^2) + sum(G[:, 0]), G = d(weighted loss)/dz taken with create_graph."""
    zz = z2.detach().to(dtype).requires_grad_(True)
    loss = loss_fn(zz, y, case["reduction"], case["ignore_index"], case["T"])
    w = _upstream(loss).to(loss.dtype)
    (g,) = torch.autograd.grad((loss * w).sum(), zz, create_graph=True)
    assert g.requires_grad, "the gradient is not differentiable"
    (gg,) = torch.autograd.grad((g * g).sum() + g[:, 0].sum(), zz)
    return gg


def check_rce_double_backward(case):
    z2, y, dtype = case["z"], case["y"], case["dtype"]
    ours = _penalty_grad(rce_fast.rce_loss, z2, y, case, dtype)
    assert ours.dtype == dtype
    if case["reduction"] == "mean" and not bool((y != case["ignore_index"]).any()):
        assert (ours == 0).all()  # no row left: a zero gradient, and so a zero penalty's
        return

    def ref(d):
        return lambda a, b, r, i, t: rce_loss_reference(a, b, r, i, t, dtype=d)

    truth = _penalty_grad(ref(F64), z2, y, case, F64)
    low = None if dtype == F64 else _penalty_grad(ref(dtype), z2, y, case, dtype)
    # The penalty's gradient is J^T v per row, v = 2 G + e_0, J = (w / T^2)(diag p - p p^T):
    # each entry is p_j (v_j - sum_k p_k v_k) times w / T^2, with roundings of v (whose
    # size is at most V = max |v| + 2 w / T) and of p (through lse, as in the gradient).
    s = _rce_stats(z2, y, case, dtype)
    wt = (s["weight"].abs() * s["keep"]).unsqueeze(1) / case["T"]
    g64 = wt * (s["p"] - s["r"])
    v_size = (2 * g64.abs() + 1).amax(1, keepdim=True) + 2 * wt
    floor = 8 * (wt / case["T"]) * s["p"] * v_size * (
        s["e_out"] + s["e_acc"] * s["cond"].unsqueeze(1)) + 2 * _tiny(dtype)
    assert_close_to_truth(ours, truth, low, floor, "double backward", dtype)


@pytest.mark.parametrize("path", _path_params("rce"))
def test_rce_double_backward_matches_reference(path):
    @fuzz(max(4, PATHS[path][0] // 2), key=f"rce-double-backward/{path}")
    @given(case=rce_cases(path, double_backward=True))
    def run(case):
        with cpu_path(path):
            check_rce_double_backward(case)
    run()


# ======================================================================== K-density

@st.composite
def kd_cases(draw, path):
    """Queries, a class-labelled bank and sigma2: one-row classes, sparse label values up
    to 10^9, features far from the origin, spreads and sigma2 over decades, D 1..300."""
    dtype = draw(st.sampled_from(_dtypes(path)))
    small = path == "triton"
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 32 - 1)))
    dim = draw(st.one_of(st.integers(1, 4), st.integers(5, 64),
                         st.integers(65, 96 if small else 300)))
    n_classes = draw(st.one_of(st.integers(1, 4), st.integers(5, 10 if small else 40)))
    counts = draw(st.lists(st.one_of(st.just(1), st.integers(1, 6),
                                     st.integers(7, 40 if small else 300)),
                           min_size=n_classes, max_size=n_classes))
    budget = 400 if small else 3000  # bank rows, for the brute-force reference
    total = sum(counts)
    if total > budget:
        counts = [max(1, c * budget // total) for c in counts]
    labels = draw(st.sampled_from(["dense", "dense", "sparse", "top"]))
    if labels == "dense":
        values = torch.randperm(n_classes, generator=g)
    elif labels == "sparse":
        values = torch.tensor(draw(st.lists(st.integers(0, 10 ** 9), min_size=n_classes,
                                            max_size=n_classes, unique=True)))
    else:  # the largest labels an int64 index sized by the label value could not hold
        values = 10 ** 9 - torch.arange(n_classes)
    offset = draw(st.sampled_from([0.0, 0.0, 10.0, 1e3]))
    spread = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
    separation = draw(st.sampled_from([0.0, 1.0, 10.0]))
    centres = offset + separation * spread * torch.randn(n_classes, dim, generator=g, dtype=F64)
    cls = torch.repeat_interleave(torch.arange(n_classes), torch.tensor(counts))
    bank = centres[cls] + spread * torch.randn(len(cls), dim, generator=g, dtype=F64)
    perm = torch.randperm(len(cls), generator=g)  # the bank is not class-sorted
    bank, cls = bank[perm], cls[perm]
    n = draw(st.integers(1, 12 if small else 40))
    n = max(1, min(n, 2_000_000 // (len(cls) * dim)))
    q_cls = torch.randint(0, n_classes, (n,), generator=g)
    where = draw(st.sampled_from(["near", "copy", "far", "mixed"]))
    near = centres[q_cls] + 1.5 * spread * torch.randn(n, dim, generator=g, dtype=F64)
    copy = torch.stack([bank[cls == k][0] for k in q_cls.tolist()])
    far = near + 30 * spread * math.sqrt(dim) * torch.randn(n, dim, generator=g, dtype=F64)
    pick = {"near": 0, "copy": 1, "far": 2}.get(where)
    choice = torch.full((n,), pick) if pick is not None else torch.randint(0, 3, (n,), generator=g)
    queries = torch.stack([near, copy, far])[choice, torch.arange(n)]
    sigma2 = dim * spread ** 2 * 10.0 ** draw(st.integers(-3, 3))
    grads = draw(st.sampled_from(["queries", "bank", "both", "none"]))
    return dict(q=queries.to(dtype), b=bank.to(dtype), bl=values[cls], qc=values[q_cls],
                sigma2=sigma2, dtype=dtype, grads=grads, seed=int(g.initial_seed()))


def _kd_low_reference(q, b, bl, qc, sigma2, dtype):
    """The reference's own error in ``dtype``: float32 computes it directly in float32;
    float16 / bfloat16 store the class-centred features in that dtype as the op does
    (centred in float32, on float32 class means: the rounding to float16 then matches
    the op's, not one that differs by chance) and compute in float64. Differentiable
    w.r.t. q and b."""
    if dtype == F32:
        return kdensity_reference(q.float(), b.float(), bl, qc, sigma2)
    classes, inverse = torch.unique(bl, return_inverse=True)
    centres = torch.zeros(len(classes), b.shape[1], dtype=F32).index_add(
        0, inverse, b.detach().float())
    centres = centres / torch.bincount(inverse).unsqueeze(1).float()
    q_ids = torch.searchsorted(classes, qc)
    qr = (q.float() - centres[q_ids]).to(dtype).double()
    br = (b.float() - centres[inverse]).to(dtype).double()
    return kdensity_reference(qr, br, bl, qc, sigma2)


def _kd_weights(n):
    return torch.linspace(-1.0, 2.0, n, dtype=F64) if n > 1 else torch.ones(1, dtype=F64)


def _kd_reference_and_grads(q, b, bl, qc, sigma2, fn):
    qq, bb = q.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    out = fn(qq, bb, bl, qc, sigma2)
    gq, gb = torch.autograd.grad((out.double() * _kd_weights(len(out))).sum(), (qq, bb))
    return out.detach(), gq, gb


def _kd_floors(q64, b64, bl, qc, sigma2, truth, dtype):
    """Floors of log KD and of its gradients w.r.t. queries and bank (module docstring).

    With class-centred rows q_c, x_c, kappa_i = (||q_ci||^2 + max_j ||x_cj||^2) / sigma2
    (over the bank rows of query i's class) is the size of the expansion's terms in units
    of sigma2: a rounding of them is an absolute error of each logit -d2 / sigma2, so of
    log KD, and a relative error of each softmax weight p_ij. The gradients
    (2 / sigma2)(sum_j p_ij x_j - q_i) (times the query's weight w_i) and
    (2 / sigma2) sum_i w_i p_ij (q_i - x_j) then carry a relative error of that size times
    size_i = max |q_ci| + max |x_cj|, besides a few roundings of the terms themselves."""
    classes, inverse = torch.unique(bl, return_inverse=True)
    centres = torch.zeros(len(classes), b64.shape[1], dtype=F64).index_add(0, inverse, b64)
    centres = centres / torch.bincount(inverse).unsqueeze(1)
    q_c = q64 - centres[torch.searchsorted(classes, qc)]
    b_c = b64 - centres[inverse]
    same = bl[None, :] == qc[:, None]
    kappa = ((q_c ** 2).sum(1) + ((b_c ** 2).sum(1)[None, :] * same).amax(1)) / sigma2
    size = q_c.abs().amax(1) + (b_c.abs().amax(1)[None, :] * same).amax(1)
    e = max(EPS[dtype], EPS[acc(dtype)])
    forward = 8 * EPS[acc(dtype)] * (1 + truth.abs() + kappa)
    per_query = _kd_weights(len(q64)).abs() * (2.0 / sigma2) * size * 8 * (
        e + EPS[acc(dtype)] * kappa)
    d2 = ((q64[:, None, :] - b64[None, :, :]) ** 2).sum(-1)
    p = torch.softmax((-d2 / sigma2).masked_fill(~same, float("-inf")), 1)
    # weights below the normal range are flushed to 0 (documented): up to one smallest
    # normal number per weight
    flush = _kd_weights(len(q64)).abs() * (2.0 / sigma2) * size * 2 * _tiny(acc(dtype))
    floors = {"queries": (per_query + flush * same.sum(1)).unsqueeze(1) + 2 * _tiny(dtype),
              "bank": (p * per_query.unsqueeze(1) + same * flush.unsqueeze(1)).sum(0)
              .unsqueeze(1) + 2 * _tiny(dtype)}
    return forward, floors


def check_kdensity(case):
    q, b, bl, qc, sigma2, dtype = (case[k] for k in ("q", "b", "bl", "qc", "sigma2", "dtype"))
    before = [t.clone() for t in (q, b, bl, qc)]
    qq = q.clone().requires_grad_(case["grads"] in ("queries", "both"))
    bb = b.clone().requires_grad_(case["grads"] in ("bank", "both"))
    out = rce_fast.kdensity(qq, bb, bl, qc, sigma2)
    assert out.dtype == acc(dtype) and out.shape == (len(q),)
    wants = [t for t in (qq, bb) if t.requires_grad]
    grads = torch.autograd.grad((out * _kd_weights(len(q)).to(out.dtype)).sum(), wants) \
        if wants else ()
    assert all(torch.equal(t, s) for t, s in zip((q, b, bl, qc), before)), "input modified"

    q64, b64 = q.double(), b.double()
    truth, tq, tb = _kd_reference_and_grads(q64, b64, bl, qc, sigma2, kdensity_reference)
    if dtype == F64:
        low = lq = lb = None
    else:
        low, lq, lb = _kd_reference_and_grads(
            q64, b64, bl, qc, sigma2, lambda *a: _kd_low_reference(*a, dtype=dtype))
    floor, floors = _kd_floors(q64, b64, bl, qc, sigma2, truth, dtype)
    assert_close_to_truth(out, truth, low, floor, "log K-density")
    names = [n for n, t in (("queries", qq), ("bank", bb)) if t.requires_grad]
    for name, got in zip(names, grads):
        assert got.dtype == dtype
        ref, lref = (tq, lq) if name == "queries" else (tb, lb)
        assert_close_to_truth(got, ref, lref, floors[name], f"gradient w.r.t. {name}", dtype)


@pytest.mark.parametrize("path", _path_params("kd"))
def test_kdensity_and_gradients_match_reference(path):
    @fuzz(PATHS[path][1], key=f"kdensity/{path}")
    @given(case=kd_cases(path))
    def run(case):
        with cpu_path(path):
            check_kdensity(case)
    run()


# ===================================================================== confidence, non-ME

@st.composite
def decision_logit_cases(draw):
    dtype = draw(st.sampled_from(ALL_DTYPES))
    size = draw(st.sampled_from(["one", "small", "small", "medium", "large", "huge"]))
    n, num_classes = {
        "one": (1, draw(st.integers(2, 50))),
        "small": (draw(st.integers(1, 16)), draw(st.integers(2, 40))),
        "medium": (draw(st.integers(1, 64)), draw(st.integers(41, 300))),
        "large": (draw(st.integers(1, 20)), draw(st.integers(301, 3000))),
        "huge": (1, draw(st.sampled_from([65_537, 100_003]))),
    }[size]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 32 - 1)))
    z = draw(logits_values(n, num_classes, g)).to(dtype)
    layout = draw(st.sampled_from(["contiguous", "contiguous", "transposed", "strided"]))
    if layout == "transposed":
        z = z.t().contiguous().t()
    elif layout == "strided":
        z = torch.cat([z, z], 1)[:, :num_classes]
    return dict(z=z, dtype=dtype, layout=layout)


def check_logit_scores(case):
    z, dtype = case["z"], case["dtype"]
    before = z.clone()
    conf, nme = rce_fast.confidence(z), rce_fast.non_me(z)
    assert torch.equal(z, before), "logits modified"
    for out in (conf, nme):
        assert out.dtype == acc(dtype) and out.shape == (z.shape[0],)
    e = EPS[acc(dtype)]
    # Both are computed in the accumulation dtype from the (exact) widened logits: the
    # low-precision reference is the same reference in that dtype.
    truth = confidence_reference(z)
    low = None if dtype == F64 else confidence_reference(z, acc(dtype))
    assert_close_to_truth(conf, truth, low, 4 * e * truth + _tiny(acc(dtype)), "confidence")
    truth = non_me_reference(z)
    low = None if dtype == F64 else non_me_reference(z, acc(dtype))
    # log q_i = (z_i - max) - log sum: roundings of |z_i - max| (up to the whole range of
    # the row), each weighted by q_i, so at most a few ulps of the row's range
    spread = (z.double().amax(1) - z.double().amin(1))
    assert_close_to_truth(nme, truth, low, 8 * e * (1 + truth + spread), "non-ME")
    assert (nme >= 0).all()  # a sum of terms -q log q >= 0, in any order


@fuzz(60)
@given(case=decision_logit_cases())
def test_confidence_and_non_me_match_reference(case):
    check_logit_scores(case)


# ==================================================================== the AUC protocol

def _as_container(values: np.ndarray, container: str):
    """``values`` as the caller passes them, and the float64 values the functions see."""
    if container == "list":
        return values.tolist(), values
    if container == "int64":
        ints = np.round(np.clip(values, -2 ** 62, 2 ** 62)).astype(np.int64)
        return ints, ints.astype(np.float64)
    if container.startswith("tensor"):
        dtype = {"tensor64": F64, "tensor32": F32, "tensor16": F16}[container]
        t = torch.from_numpy(values).to(dtype)
        return t, t.double().numpy()
    return values, values


@st.composite
def score_vectors(draw, n_min=0, n_max=150, allow_inf=False):
    """Two vectors of detector scores (positives, negatives): continuous, integer (many
    ties within and between the sets), constant, huge magnitudes, separated, tiny
    differences; as NumPy arrays, lists, integer arrays or tensors of several dtypes."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    m, n = draw(st.integers(n_min, n_max)), draw(st.integers(n_min, n_max))
    kind = draw(st.sampled_from(["normal", "ints", "constant", "huge", "separated", "tiny"]))
    shift = draw(st.sampled_from([0.0, 0.5, 3.0, -1.0]))
    if kind == "normal":
        pos, neg = rng.normal(shift, 1.0, m), rng.normal(0.0, 1.5, n)
    elif kind == "ints":
        pos, neg = (rng.integers(0, 5, m) + round(shift)).astype(float), \
            rng.integers(-1, 3, n).astype(float)
    elif kind == "constant":
        pos, neg = np.full(m, 2.0), np.full(n, 2.0)
    elif kind == "huge":
        pos, neg = rng.normal(shift, 1.0, m) * 1e300, rng.normal(0.0, 1.0, n) * 1e300
    elif kind == "separated":
        pos, neg = rng.normal(10.0, 1.0, m), rng.normal(-10.0, 1.0, n)
    else:  # differences at the last bits
        pos, neg = 1.0 + rng.integers(0, 4, m) * 2.0 ** -52, 1.0 + rng.integers(0, 4, n) * 2.0 ** -52
    if allow_inf and m and n and draw(st.integers(0, 3)) == 0:
        pos[rng.random(m) < 0.2] = np.inf
        neg[rng.random(n) < 0.2] = -np.inf
    container = draw(st.sampled_from(["numpy", "list", "int64", "tensor64", "tensor32",
                                      "tensor16"]))
    if allow_inf or kind in ("huge", "tiny"):  # values that int64 / float16 cannot hold
        container = draw(st.sampled_from(["numpy", "list", "tensor64"]))
    (p, pv), (q, qv) = _as_container(pos, container), _as_container(neg, container)
    return p, q, pv, qv


def _close(a, b, rel=1e-12, abs_=1e-13):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= abs_ + rel * abs(b)


@fuzz(80)
@given(data=score_vectors(allow_inf=True))
def test_auc_and_standard_error_match_references(data):
    pos, neg, pv, nv = data
    got, se = auc(pos, neg), auc_standard_error(pos, neg)
    assert _close(got, auc_reference(pv, nv)), (got, auc_reference(pv, nv))
    if len(pv) and len(nv) and np.isfinite(np.r_[pv, nv]).all():
        sk = roc_auc_score(np.r_[np.ones(len(pv)), np.zeros(len(nv))], np.r_[pv, nv])
        assert _close(got, sk), (got, sk)
    assert _close(se, auc_se_reference(pv, nv)), (se, auc_se_reference(pv, nv))


@st.composite
def paper_auc_cases(draw):
    """Labels, clean and adversarial predictions (tensors or arrays, int32/int64, class
    values up to 10^9) and 1-3 metrics' scores for the paper's protocol."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    n = draw(st.integers(1, 150))
    n_classes = draw(st.integers(2, 10))
    values = rng.choice(10 ** 9, n_classes, replace=False) if draw(st.booleans()) \
        else np.arange(n_classes)
    labels = values[rng.integers(0, n_classes, n)]
    acc_clean, acc_adv = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])), \
        draw(st.sampled_from([0.0, 0.3, 1.0]))
    clean_pred = np.where(rng.random(n) < acc_clean, labels,
                          values[rng.integers(0, n_classes, n)])
    adv_pred = np.where(rng.random(n) < acc_adv, labels, values[rng.integers(0, n_classes, n)])
    kind = draw(st.sampled_from(["tensor64", "tensor32", "numpy64", "numpy32"]))

    def ints(a):
        dt = np.int32 if kind.endswith("32") else np.int64
        return torch.from_numpy(a.astype(dt)) if kind.startswith("tensor") else a.astype(dt)

    metrics = draw(st.lists(st.sampled_from(["kd", "confidence", "non-ME"]), min_size=1,
                            max_size=3, unique=True))
    clean, adv, clean_v, adv_v = {}, {}, {}, {}
    for name in metrics:
        data = draw(score_vectors(n_min=n, n_max=n, allow_inf=draw(st.booleans())))
        clean[name], adv[name], clean_v[name], adv_v[name] = data
    return dict(clean=clean, adv=adv, clean_v=clean_v, adv_v=adv_v, labels=ints(labels),
                clean_pred=ints(clean_pred), adv_pred=ints(adv_pred),
                raw=(labels, clean_pred, adv_pred), se=draw(st.booleans()))


@fuzz(60)
@given(case=paper_auc_cases())
def test_paper_auc_matches_reference(case):
    out = paper_auc(case["clean"], case["adv"], case["labels"], case["clean_pred"],
                    case["adv_pred"], standard_errors=case["se"])
    labels, clean_pred, adv_pred = case["raw"]
    keep = (clean_pred == labels) & (adv_pred != labels)
    for name in case["clean"]:
        cv, av = case["clean_v"][name], case["adv_v"][name]
        n_kept, expected = paper_auc_reference(np.nan_to_num(cv), np.nan_to_num(av), labels,
                                               clean_pred, adv_pred)
        assert out["n"] == n_kept
        brute = auc_reference(cv[keep], av[keep])
        assert _close(out[name], brute), (name, out[name], brute)
        if np.isfinite(np.r_[cv, av]).all():  # scikit-learn takes finite scores only
            assert _close(out[name], expected), (name, out[name], expected)
        if case["se"]:
            assert _close(out["se"][name], auc_se_reference(cv[keep], av[keep]))
    assert ("se" in out) == case["se"]


@st.composite
def detection_cases(draw):
    clean, adv, cv, av = draw(score_vectors(n_min=1, n_max=200))
    n = len(cv)
    special = [0.0, 1.0, 0.05, 0.29] + [k / n for k in range(min(n, 3))]
    fprs = draw(st.lists(st.one_of(st.sampled_from(special), st.floats(0.0, 1.0)),
                         min_size=1, max_size=4, unique=True))
    return clean, adv, cv, av, tuple(fprs)


@fuzz(60)
@given(case=detection_cases())
def test_detection_metrics_match_references(case):
    clean, adv, cv, av, fprs = case
    m = detection_metrics(clean, adv, fprs=fprs)
    y = np.r_[np.zeros(len(cv)), np.ones(len(av))]
    suspicion = -np.r_[cv, av]  # the adversarial inputs are the positives
    assert _close(m.auroc, roc_auc_score(y, suspicion))
    assert _close(m.auroc, auc_reference(-av, -cv))
    assert _close(m.aupr, average_precision_score(y, suspicion))
    assert _close(m.auroc_se, auc_se_reference(cv, av))
    fpr95, tpr, thr = detection_rates_reference(cv, av, fprs)
    assert m.fpr_at_95_tpr == fpr95
    for f in fprs:
        assert m.thresholds[f] == thr[f], (f, m.thresholds[f], thr[f])
        assert m.tpr_at_fpr[f] == tpr[f], (f, m.tpr_at_fpr[f], tpr[f])
    assert (m.n_clean, m.n_adv) == (len(cv), len(av))
