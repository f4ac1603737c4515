"""Direct calls of the registered ops (``torch.ops.rce_fast.*``) with mismatched tensors.

The public functions check their arguments first; these ops are reachable on their own
(``torch.ops``, ``torch.compile`` graphs, other libraries), and some hand raw pointers to
compiled code. Every mismatch here must be a ValueError / TypeError naming the op and the
argument, never an out-of-bounds read or write: before the checks, a short target or an
int32 target read past the end of the buffer, and an out-of-range label in the backward
wrote past the gradient row (a heap write in ``csrc/rce_cpu.cpp``).
"""
import math

import pytest
import torch

import rce_fast
from rce_fast import ops

OP = torch.ops.rce_fast
CPU_PATHS = ["torch", "compiled", "triton"]


def _rce(n=6, num_classes=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, num_classes, generator=g, dtype=dtype)
    y = torch.randint(0, num_classes, (n,), generator=g)
    lse = torch.logsumexp(z.to(torch.float64 if dtype == torch.float64 else torch.float32), 1)
    return z, y, lse


def _path(name):
    """Context selecting one CPU implementation of the RCE ops."""
    import contextlib
    stack = contextlib.ExitStack()
    if name == "triton":
        if not rce_fast._backend.triton_interpreter_on():
            pytest.skip("the Triton interpreter is off in this run")
        stack.enter_context(rce_fast.use_backend("triton"))
    elif name == "compiled":
        if rce_fast._ext.load()[0] is None:
            pytest.skip("rce_fast._C is not built")
        stack.enter_context(rce_fast.use_backend("auto"))
        stack.enter_context(ops.rce_cpu_path("compiled"))
    else:
        stack.enter_context(rce_fast.use_backend("torch"))
    return stack


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("bad", [7, 5, -1, -101, 2 ** 40])
def test_backward_op_gives_nan_rows_for_labels_out_of_range(path, bad):
    """The backward op does not re-check label values (a host sync per step); a row whose
    label is outside [0, L) gets NaN in every implementation, the others their gradient."""
    z, y, lse = _rce(n=37, num_classes=5)
    y[3], y[20] = bad, -100
    y_ok = y.clone()
    y_ok[3] = 0
    g = torch.rand(37, generator=torch.Generator().manual_seed(1))
    with _path(path):
        grad = OP.rce_loss_backward(g, z, y, lse, -100, 1.0)
        ref = OP.rce_loss_backward(g, z, y_ok, lse, -100, 1.0)
    assert torch.isnan(grad[3]).all()
    keep = torch.ones(37, dtype=torch.bool)
    keep[3] = False
    assert torch.equal(grad[keep], ref[keep])
    assert torch.equal(grad[20], torch.zeros(5))


@pytest.mark.parametrize("path", CPU_PATHS)
def test_forward_op_still_refuses_labels_out_of_range(path):
    z, y, _ = _rce()
    y[2] = 5
    with _path(path), pytest.raises(ValueError, match=r"class index 5, outside \[0, 5\)"):
        OP.rce_loss_forward(z, y, -100, 1.0)


def _rce_cases():
    """(name, args, error type, message): shapes and devices are ValueErrors, dtypes
    TypeErrors (the package's contract); a non-tensor is the op schema's RuntimeError."""
    z, y, lse = _rce()
    g = torch.ones(6)
    yield ("short target", (z, y[:3], lse, g), ValueError,
           r"rce_fast::rce_loss_\w+: target must have shape \(6,\)")
    yield ("int32 target", (z, y.int(), lse, g), TypeError,
           r"target must have dtype torch.int64; got shape \(6,\), dtype torch.int32")
    yield "2-d target", (z, y[:, None], lse, g), ValueError, r"target must have shape \(6,\)"
    yield "1-d logits", (z[0], y, lse, g), ValueError, r"logits must have 2 dimensions"
    yield "int logits", (z.long(), y, lse, g), TypeError, r"logits must have dtype"
    yield ("one class", (z[:, :1], y * 0, lse, g), ValueError,
           r"logits must have at least 2 classes")
    yield ("target on meta", (z, y.to("meta"), lse, g), ValueError,
           r"target must be on cpu like the other tensors; got .* on meta")
    yield "not a tensor", (z, [0] * 6, lse, g), RuntimeError, r"argument 'target'"


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("case", list(_rce_cases()), ids=lambda c: c[0])
def test_rce_ops_refuse_mismatched_tensors(path, case):
    """Also a call mixing in a meta tensor, which the dispatcher routes to the fake kernel
    (which checks too, so torch.compile refuses such tensors while tracing)."""
    _, (z, y, lse, g), error, match = case
    with _path(path):
        with pytest.raises(error, match=match):
            OP.rce_loss_forward(z, y, -100, 1.0)
        with pytest.raises(error, match=match):
            OP.rce_loss_backward(g, z, y, lse, -100, 1.0)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_rce_backward_op_refuses_mismatched_statistics(path):
    z, y, lse = _rce()
    g = torch.ones(6)
    with _path(path):
        with pytest.raises(ValueError, match=r"rce_loss_backward: lse must have shape \(6,\)"):
            OP.rce_loss_backward(g, z, y, lse[:2], -100, 1.0)
        with pytest.raises(TypeError, match=r"lse must have dtype torch.float32"):
            OP.rce_loss_backward(g, z, y, lse.double(), -100, 1.0)
        with pytest.raises(TypeError, match=r"lse must have dtype torch.float64"):
            OP.rce_loss_backward(g.double(), z.double(), y, lse.float(), -100, 1.0)
        with pytest.raises(ValueError, match=r"lse must be on cpu"):
            OP.rce_loss_backward(g, z, y, lse.to("meta"), -100, 1.0)
        with pytest.raises(ValueError, match=r"grad_rows must have shape \(6,\)"):
            OP.rce_loss_backward(g[:1], z, y, lse, -100, 1.0)
        with pytest.raises(TypeError, match=r"grad_rows must have dtype"):
            OP.rce_loss_backward(g.long(), z, y, lse, -100, 1.0)
        for t in (0.0, -1.0, math.inf, math.nan):
            with pytest.raises(ValueError, match=r"inv_temperature must be a finite number"):
                OP.rce_loss_backward(g, z, y, lse, -100, t)
            with pytest.raises(ValueError, match=r"inv_temperature must be a finite number"):
                OP.rce_loss_forward(z, y, -100, t)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_jsma_op_refuses_mismatched_tensors(backend):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    d = torch.ones(4, 9, dtype=torch.bool)
    cases = [((a, b[:, :5], d), ValueError, r"jsma_pairs: beta must have shape \(4, 9\)"),
             ((a, b[:2], d), ValueError, r"beta must have shape \(4, 9\)"),
             ((a, b, d[:, :3]), ValueError, r"domain must have shape \(4, 9\)"),
             ((a, b, d.float()), TypeError, r"domain must have dtype torch.bool"),
             ((a, b.long(), d), TypeError, r"beta must have dtype"),
             ((a.long(), b, d), TypeError, r"alpha must have dtype"),
             ((a[0], b[0], d[0]), ValueError, r"alpha must have 2 dimensions"),
             ((a, b, d.to("meta")), ValueError, r"domain must be on cpu"),
             ((a, b, d[:, :3].to("meta")), ValueError, r"domain must have shape \(4, 9\)")]
    with rce_fast.use_backend(backend):
        for args, error, match in cases:
            with pytest.raises(error, match=match):
                OP.jsma_pairs(*args, True)
        assert OP.jsma_pairs(a, b, d, True).shape == (4, 2)  # the checks let good input by


def _kd_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(7, 3, generator=g, dtype=dtype)
    bank = torch.randn(10, 3, generator=g, dtype=dtype)
    return q, torch.tensor([0, 4, 7]), bank, torch.tensor([0, 6, 10])


def test_kdensity_ops_refuse_mismatched_tensors():
    q, qo, bank, bo = _kd_args()
    lse = OP.kdensity_lse(q, qo, bank, bo, 1.0)
    g = torch.ones(7)
    V, T = ValueError, TypeError
    cases = [((q, qo, bank[:, :2], bo, 1.0), V, r"kdensity_lse: bank must have shape \(\*, 3\)"),
             ((q, qo, bank.double(), bo, 1.0), T, r"bank must have dtype torch.float32"),
             ((q, qo[:2], bank, bo, 1.0), V, r"q_offsets must have shape \(3,\)"),
             ((q, qo.int(), bank, bo, 1.0), T, r"q_offsets must have dtype torch.int64"),
             ((q, qo, bank, bo[:1], 1.0), V, r"b_offsets must hold at least 2"),
             ((q, qo, bank, bo.float(), 1.0), T, r"b_offsets must have dtype torch.int64"),
             ((q[0], qo, bank, bo, 1.0), V, r"q must have 2 dimensions"),
             ((q, qo, bank, bo.to("meta"), 1.0), V, r"b_offsets must be on cpu"),
             ((q, qo, bank, bo, 0.0), V, r"sigma2 must be a finite number > 0"),
             ((q, qo, bank, bo, math.nan), V, r"sigma2 must be a finite number > 0")]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            OP.kdensity_lse(*args)
    for op in (OP.kdensity_grad, OP.kdensity_bank_grad):
        name = str(op).split(".")[-1]
        with pytest.raises(ValueError, match=rf"{name}: grad_lse must have shape \(7,\)"):
            op(g[:3], q, qo, bank, bo, lse, 1.0)
        with pytest.raises(ValueError, match=rf"{name}: lse must have shape \(7,\)"):
            op(g, q, qo, bank, bo, lse[:1], 1.0)
        with pytest.raises(ValueError, match=rf"{name}: lse must be on cpu"):
            op(g, q, qo, bank, bo, lse.to("meta"), 1.0)
        assert op(g, q, qo, bank, bo, lse, 1.0).shape in (q.shape, bank.shape)


def test_extension_guards_sizes_and_null_pointers():
    """The pybind11 bindings' last-line guards (the ops check tensors before them)."""
    module, why = rce_fast._ext.load()
    if module is None:
        pytest.skip(why)
    z, y, lse = _rce()
    loss = torch.empty(6)
    p = (z.data_ptr(), y.data_ptr(), loss.data_ptr(), lse.data_ptr())
    with pytest.raises(ValueError, match="n must be >= 0"):
        module.rce_forward_cpu(*p, -1, 5, 5, -100, 1.0, False, 1)
    with pytest.raises(ValueError, match=r"L \(classes\) must be >= 2"):
        module.rce_forward_cpu(*p, 6, 1, 5, -100, 1.0, False, 1)
    with pytest.raises(ValueError, match="row stride must be >= 0"):
        module.rce_forward_cpu(*p, 6, 5, -1, -100, 1.0, False, 1)
    with pytest.raises(ValueError, match="null buffer pointer"):
        module.rce_backward_cpu(0, 1.0, 0, y.data_ptr(), lse.data_ptr(), loss.data_ptr(),
                                6, 5, 5, -100, 1.0, False, 1)
    with pytest.raises(ValueError, match="null buffer pointer"):
        module.jsma_pairs_cpu(0, 0, 0, 0, 2, 4, True)
    with pytest.raises(ValueError, match="batch and n must be >= 0"):
        module.jsma_pairs_cpu(0, 0, 0, 0, -2, 4, True)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_logits_with_repeated_or_overlapping_rows(path):
    """Rows that overlap or repeat in memory are valid logits (read only): one row of a
    transpose (stride (1, 1), which torch calls contiguous), expanded logits (row stride
    0) and an overlapping as_strided view, through the loss and its gradient."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(40, 3, generator=g)
    base = torch.randn(64, generator=g)
    cases = {"one row of a transpose": (w @ torch.randn(1, 3, generator=g).t()).t(),
             "expanded": torch.randn(1, 40, generator=g).expand(5, 40),
             "overlapping": base.as_strided((6, 40), (3, 1))}
    for name, z in cases.items():
        assert z.stride(0) < z.shape[1], name
        y = torch.arange(z.shape[0]) % z.shape[1]
        ref = z.detach().double().requires_grad_(True)
        want = rce_fast.rce_loss(ref, y, reduction="none")
        want.sum().backward()
        with _path(path):
            zg = z.detach().requires_grad_(True)  # the strided view itself as the leaf
            assert zg.stride() == z.stride()
            got = rce_fast.rce_loss(zg, y, reduction="none")
            torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6,
                                       msg=name)
            got.sum().backward()
            torch.testing.assert_close(zg.grad.double(), ref.grad, rtol=1e-5, atol=1e-7,
                                       msg=name)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_jsma_pairs_with_fewer_than_two_features(backend):
    """No pair exists: (-1, -1) on every row, on every path (an empty feature axis has a
    null data pointer, which the C++ binding would refuse)."""
    with rce_fast.use_backend(backend):
        for n in (0, 1):
            a = torch.randn(3, n)
            out = OP.jsma_pairs(a, a.clone(), torch.ones(3, n, dtype=torch.bool), True)
            assert out.tolist() == [[-1, -1]] * 3


def test_kdensity_ops_check_offset_values_on_the_cpu():
    """Offsets past the rows, not rising, not ending at the row count, or a class with
    queries and no bank rows: before, the interpreter's kernel read past the bank (heap
    corruption) and the PyTorch path returned uninitialised rows or divided by zero."""
    q, qo, bank, bo = _kd_args()
    g = torch.ones(7)
    bad = [(torch.tensor([0, 3, 6000]), bo, r"q_offsets must rise from 0 to 7"),
           (torch.tensor([0, 4, 6]), bo, r"q_offsets must rise from 0 to 7"),
           (torch.tensor([1, 4, 7]), bo, r"q_offsets must rise from 0 to 7"),
           (qo, torch.tensor([0, 12, 10]), r"b_offsets must rise from 0 to 10"),
           (qo, torch.tensor([0, 6, 99999]), r"b_offsets must rise from 0 to 10"),
           (qo, torch.tensor([0, 0, 10]), r"class slot\(s\) \[0\] have queries but no bank")]
    lse = OP.kdensity_lse(q, qo, bank, bo, 1.0)
    for backend in ("torch", "triton"):
        if backend == "triton" and not rce_fast._backend.triton_interpreter_on():
            continue
        with rce_fast.use_backend(backend):
            for q_off, b_off, match in bad:
                with pytest.raises(ValueError, match=match):
                    OP.kdensity_lse(q, q_off, bank, b_off, 1.0)
                with pytest.raises(ValueError, match=match):
                    OP.kdensity_grad(g, q, q_off, bank, b_off, lse, 1.0)
                with pytest.raises(ValueError, match=match):
                    OP.kdensity_bank_grad(g, q, q_off, bank, b_off, lse, 1.0)
            # an empty bank class without queries is fine
            ok = OP.kdensity_lse(q, torch.tensor([0, 0, 7]), bank, torch.tensor([0, 0, 10]),
                                 1.0)
            assert torch.isfinite(ok).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_statistics_and_offsets_give_the_contiguous_result(backend):
    """lse, grad_rows and offsets given as strided views (the right values, another
    layout): the Triton launchers made them contiguous only for some arguments."""
    if backend == "triton" and not rce_fast._backend.triton_interpreter_on():
        pytest.skip("the Triton interpreter is off")
    z, y, lse = _rce(n=9, num_classes=6)
    g = torch.rand(9, generator=torch.Generator().manual_seed(2))
    wide_lse = torch.stack([lse, torch.full_like(lse, 99.0)], 1)[:, 0]
    wide_g = torch.stack([g, torch.full_like(g, -7.0)], 1)[:, 0]
    q, qo, bank, bo = _kd_args()
    wide_qo = torch.stack([qo, qo * 0 + 12345], 1)[:, 0]
    wide_bo = torch.stack([bo, bo * 0 + 54321], 1)[:, 0]
    assert wide_lse.stride() == (2,) and wide_qo.stride() == (2,)
    with rce_fast.use_backend(backend):
        assert torch.equal(OP.rce_loss_backward(wide_g, z, y, wide_lse, -100, 1.0),
                           OP.rce_loss_backward(g, z, y, lse, -100, 1.0))
        want = OP.kdensity_lse(q, qo, bank, bo, 1.0)
        assert torch.equal(OP.kdensity_lse(q, wide_qo, bank, wide_bo, 1.0), want)
        assert torch.equal(OP.kdensity_grad(torch.ones(7), q, wide_qo, bank, wide_bo, want, 1.0),
                           OP.kdensity_grad(torch.ones(7), q, qo, bank, bo, want, 1.0))


def test_scales_past_float32_are_refused():
    """1/temperature and 1/sigma2 scale float32 values in the kernels: a temperature of
    1e-310 gave a NaN loss in eager mode (inf * 0), and under torch.compile an error about
    inv_temperature, an argument the user never passed; sigma2 = 1e-40 gave NaN."""
    z, y, _ = _rce()
    for t in (1e-310, 1e-39, 1e39):
        with pytest.raises(ValueError, match=r"temperature must be in \[2\*\*-126, 2\*\*126\]"):
            rce_fast.rce_loss(z, y, temperature=t)
    assert torch.isfinite(rce_fast.rce_loss(z, y, temperature=2.0 ** -126 * 1e30))
    with pytest.raises(ValueError, match=r"inv_temperature must be .*\(in \[2\*\*-126, 3.4e38\]\)"):
        OP.rce_loss_forward(z, y, -100, 1e39)
    q, qo, bank, bo = _kd_args()
    bl = torch.tensor([0] * 6 + [1] * 4)
    qc = torch.tensor([0] * 4 + [1] * 3)
    for s2 in (1e-40, 1e39):
        with pytest.raises(ValueError, match=r"sigma2 must be in \[2\*\*-126, 3.4e38\]"):
            rce_fast.kdensity(q, bank, bl, qc, s2)
        with pytest.raises(ValueError, match=r"sigma2 must be a finite number > 0 that"):
            OP.kdensity_lse(q, qo, bank, bo, s2)
