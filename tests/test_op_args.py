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
    z, y, lse = _rce()
    g = torch.ones(6)
    yield ("short target", (z, y[:3], lse, g),
           r"rce_fast::rce_loss_\w+: target must have shape \(6,\)")
    yield "int32 target", (z, y.int(), lse, g), r"target must have .*dtype torch.int64"
    yield "2-d target", (z, y[:, None], lse, g), r"target must have shape \(6,\)"
    yield "1-d logits", (z[0], y, lse, g), r"logits must have 2 dimensions"
    yield "int logits", (z.long(), y, lse, g), r"logits must have .*dtype"
    yield "one class", (z[:, :1], y * 0, lse, g), r"logits must have at least 2 classes"
    yield "not a tensor", (z, [0] * 6, lse, g), r"argument 'target'"  # the schema's check


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("case", list(_rce_cases()), ids=lambda c: c[0])
def test_rce_ops_refuse_mismatched_tensors(path, case):
    _, (z, y, lse, g), match = case
    with _path(path):
        with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
            OP.rce_loss_forward(z, y, -100, 1.0)
        with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
            OP.rce_loss_backward(g, z, y, lse, -100, 1.0)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_rce_backward_op_refuses_mismatched_statistics(path):
    z, y, lse = _rce()
    g = torch.ones(6)
    with _path(path):
        with pytest.raises(ValueError, match=r"rce_loss_backward: lse must have shape \(6,\)"):
            OP.rce_loss_backward(g, z, y, lse[:2], -100, 1.0)
        with pytest.raises(ValueError, match=r"lse must have .*dtype torch.float32"):
            OP.rce_loss_backward(g, z, y, lse.double(), -100, 1.0)
        with pytest.raises(ValueError, match=r"lse must have .*dtype torch.float64"):
            OP.rce_loss_backward(g.double(), z.double(), y, lse.float(), -100, 1.0)
        with pytest.raises(ValueError, match=r"grad_rows must have shape \(6,\)"):
            OP.rce_loss_backward(g[:1], z, y, lse, -100, 1.0)
        with pytest.raises(ValueError, match=r"grad_rows must have .*dtype"):
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
    cases = [((a, b[:, :5], d), r"jsma_pairs: beta must have shape \(4, 9\)"),
             ((a, b[:2], d), r"beta must have shape \(4, 9\)"),
             ((a, b, d[:, :3]), r"domain must have shape \(4, 9\)"),
             ((a, b, d.float()), r"domain must have .*dtype torch.bool"),
             ((a, b.long(), d), r"beta must have .*dtype"),
             ((a.long(), b, d), r"alpha must have .*dtype"),
             ((a[0], b[0], d[0]), r"alpha must have 2 dimensions")]
    with rce_fast.use_backend(backend):
        for args, match in cases:
            with pytest.raises(ValueError, match=match):
                OP.jsma_pairs(*args, True)
        assert OP.jsma_pairs(a, b, d, True).shape == (4, 2)  # the checks let good input by


def test_op_checks_refuse_a_tensor_on_another_device():
    """A CPU-only machine has no second real device; a call mixing in a meta tensor is
    routed to the fake kernels by the dispatcher, so the checks are called directly."""
    z, y, lse = _rce()
    with pytest.raises(ValueError, match=r"rce_fast::op: target must have .*on cpu"):
        ops.check_rce_op_args("op", z, y.to("meta"), 1.0)
    with pytest.raises(ValueError, match=r"lse must have .*on cpu"):
        ops.check_rce_op_args("op", z, y, 1.0, lse=lse.to("meta"))
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"domain must have .*on cpu"):
        ops.check_jsma_op_args("op", a, a, torch.ones(2, 3, dtype=torch.bool, device="meta"))
    q, qo, bank, bo = _kd_args()
    with pytest.raises(ValueError, match=r"b_offsets must have .*on cpu"):
        ops.check_kdensity_op_args("op", q, qo, bank, bo.to("meta"), 1.0)


def _kd_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(7, 3, generator=g, dtype=dtype)
    bank = torch.randn(10, 3, generator=g, dtype=dtype)
    return q, torch.tensor([0, 4, 7]), bank, torch.tensor([0, 6, 10])


def test_kdensity_ops_refuse_mismatched_tensors():
    q, qo, bank, bo = _kd_args()
    lse = OP.kdensity_lse(q, qo, bank, bo, 1.0)
    g = torch.ones(7)
    cases = [((q, qo, bank[:, :2], bo, 1.0), r"kdensity_lse: bank must have shape \(\*, 3\)"),
             ((q, qo, bank.double(), bo, 1.0), r"bank must have .*dtype torch.float32"),
             ((q, qo[:2], bank, bo, 1.0), r"q_offsets must have shape \(3,\)"),
             ((q, qo.int(), bank, bo, 1.0), r"q_offsets must have .*dtype torch.int64"),
             ((q, qo, bank, bo[:1], 1.0), r"b_offsets must hold at least 2"),
             ((q, qo, bank, bo.float(), 1.0), r"b_offsets must have .*dtype torch.int64"),
             ((q[0], qo, bank, bo, 1.0), r"q must have 2 dimensions"),
             ((q, qo, bank, bo, 0.0), r"sigma2 must be a finite number > 0"),
             ((q, qo, bank, bo, math.nan), r"sigma2 must be a finite number > 0")]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            OP.kdensity_lse(*args)
    for op in (OP.kdensity_grad, OP.kdensity_bank_grad):
        name = str(op).split(".")[-1]
        with pytest.raises(ValueError, match=rf"{name}: grad_lse must have shape \(7,\)"):
            op(g[:3], q, qo, bank, bo, lse, 1.0)
        with pytest.raises(ValueError, match=rf"{name}: lse must have shape \(7,\)"):
            op(g, q, qo, bank, bo, lse[:1], 1.0)
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
    with pytest.raises(ValueError, match="row stride must be >= L"):
        module.rce_forward_cpu(*p, 6, 5, 4, -100, 1.0, False, 1)
    with pytest.raises(ValueError, match="null buffer pointer"):
        module.rce_backward_cpu(0, 1.0, 0, y.data_ptr(), lse.data_ptr(), loss.data_ptr(),
                                6, 5, 5, -100, 1.0, False, 1)
    with pytest.raises(ValueError, match="null buffer pointer"):
        module.jsma_pairs_cpu(0, 0, 0, 0, 2, 4, True)
    with pytest.raises(ValueError, match="batch and n must be >= 0"):
        module.jsma_pairs_cpu(0, 0, 0, 0, -2, 4, True)
