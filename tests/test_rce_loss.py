"""rce_loss / RCELoss against a float64 reference, on every device and backend.

Tolerances follow the flash-attention rule: the float64 reference is ground truth, and
an output in dtype D passes when its error is at most twice the error of the same
reference computed in D (plus a floor of a few ulps of D), so bounds come from
measurement, not from loosening until green.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import rce_fast
from rce_fast import ops
from tests.conftest import RCE_DEVICE_BACKENDS as DEVICE_BACKENDS
from tests.reference import rce_loss_closed_form, rce_loss_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
       torch.float64: 2.0 ** -52}


def _inputs(n, num_classes, dtype, device, seed=0, scale=3.0, ignore_frac=0.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, num_classes, generator=g) * scale).to(dtype).to(device)
    y = torch.randint(0, num_classes, (n,), generator=g)
    if ignore_frac:
        y[torch.rand(n, generator=g) < ignore_frac] = -100
    return z, y.to(device)


def _assert_within_ref_error(out, ref64, ref_low, dtype, what):
    """|out - ref64| <= 2 * max|ref_low - ref64| + floor, elementwise."""
    out, ref64, ref_low = out.double().cpu(), ref64.double().cpu(), ref_low.double().cpu()
    assert torch.isfinite(ref64).all()
    ref_err = (ref_low - ref64).abs().max().item() if ref64.numel() else 0.0
    floor = 4 * EPS[dtype] * (1.0 + ref64.abs())
    err = (out - ref64).abs()
    bound = 2 * ref_err + floor
    worst = (err - bound).max().item() if err.numel() else -1
    assert worst <= 0, (f"{what}: max error {err.max().item():.3g} exceeds bound (2 x reference "
                        f"error {ref_err:.3g} + floor); worst excess {worst:.3g}")


def _loss_and_grad(fn, z, y, **kw):
    zz = z.detach().clone().requires_grad_(True)
    loss = fn(zz, y, **kw)
    grad_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype,
                              device=loss.device).reshape(loss.shape)
    (g,) = torch.autograd.grad(loss, zz, grad_out)
    return loss.detach(), g


def _check_against_reference(z, y, dtype, **kw):
    loss, grad = _loss_and_grad(rce_fast.rce_loss, z, y, **kw)
    z_cpu, y_cpu = z.cpu(), y.cpu()
    ref_loss, ref_grad = _loss_and_grad(rce_loss_reference, z_cpu, y_cpu, **kw)
    low_loss, low_grad = _loss_and_grad(rce_loss_reference, z_cpu, y_cpu, dtype=dtype, **kw)
    assert loss.dtype == dtype and grad.dtype == dtype and loss.device == z.device
    assert grad.shape == z.shape
    _assert_within_ref_error(loss, ref_loss, low_loss, dtype, "loss")
    _assert_within_ref_error(grad, ref_grad, low_grad, dtype, "grad")


SHAPES = [(1, 2), (1, 3), (5, 2), (37, 3), (300, 10), (129, 1000), (3, 4096), (2, 4097),
          (2, 50_001)]


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_float64_reference(on_backend, dtype, shape):
    device, _ = on_backend
    z, y = _inputs(*shape, dtype, device, seed=shape[0] * 7 + shape[1])
    _check_against_reference(z, y, dtype, reduction="none")


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
def test_reductions_ignore_index_temperature(on_backend, reduction, temperature):
    device, _ = on_backend
    z, y = _inputs(64, 17, torch.float32, device, seed=3, ignore_frac=0.3)
    _check_against_reference(z, y, torch.float32, reduction=reduction, temperature=temperature)


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_custom_ignore_index_and_closed_form(on_backend):
    device, _ = on_backend
    z, y = _inputs(40, 6, torch.float32, device, seed=4)
    y[::5] = 3  # ignore class 3 entirely: an index inside [0, L) is allowed as ignore_index
    out = rce_fast.rce_loss(z, y, reduction="none", ignore_index=3)
    keep = (y != 3).cpu()
    closed = rce_loss_closed_form(z.cpu(), y.cpu()) * keep
    torch.testing.assert_close(out.cpu().double(), closed, rtol=1e-5, atol=1e-5)
    assert (out.cpu()[~keep] == 0).all()


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_huge_class_count(on_backend):
    device, _ = on_backend
    z, y = _inputs(1, 262_147, torch.float32, device, seed=5)
    _check_against_reference(z, y, torch.float32, reduction="sum")


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_do_not_overflow(on_backend, dtype):
    """log(softmax) written naively gives -inf here; the log-sum-exp form must not."""
    device, _ = on_backend
    z, y = _inputs(16, 10, torch.float32, device, seed=6, scale=1.0)
    z = (z * 60.0).to(dtype)  # exp(120) overflows fp16/fp32 alike
    _check_against_reference(z, y, dtype, reduction="none")


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_non_contiguous_inputs(on_backend):
    device, _ = on_backend
    base, y = _inputs(50, 23, torch.float32, device, seed=7)
    y_wide = torch.stack([y, y], 1)
    cases = {
        "transposed": base.t().contiguous().t(),          # column stride != 1
        "row-strided": torch.cat([base, base], 1)[:, :23],   # row stride 46
        "column slice": torch.cat([base, base], 1)[:, 5:28],
    }
    for name, z in cases.items():
        before = z.clone()
        out = rce_fast.rce_loss(z, y_wide[:, 1], reduction="none")  # target non-contiguous
        ref = rce_loss_reference(z.cpu(), y.cpu(), reduction="none")
        torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(z, before), f"{name}: logits modified in place"
        _check_against_reference(z, y_wide[:, 1], torch.float32, reduction="mean")


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_input_not_modified_by_backward(on_backend):
    device, _ = on_backend
    z, y = _inputs(33, 12, torch.float16, device, seed=8)
    zz = z.clone().requires_grad_(True)
    rce_fast.rce_loss(zz, y).backward()
    assert torch.equal(zz.detach(), z) and zz.grad is not None
    assert zz.grad.data_ptr() != zz.data_ptr()


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_unbatched_and_spatial_shapes(on_backend):
    device, _ = on_backend
    z, y = _inputs(6, 5, torch.float32, device, seed=9)
    one = rce_fast.rce_loss(z[2], y[2])
    torch.testing.assert_close(one, rce_fast.rce_loss(z[2:3], y[2:3]))
    # (N, L, d1, d2) like cross_entropy: class dim 1
    z4 = torch.randn(2, 5, 3, 4, device=device)
    y4 = torch.randint(0, 5, (2, 3, 4), device=device)
    out = rce_fast.rce_loss(z4, y4, reduction="none")
    assert out.shape == (2, 3, 4)
    flat = rce_loss_reference(z4.movedim(1, -1).reshape(-1, 5).cpu(), y4.reshape(-1).cpu(),
                              reduction="none")
    torch.testing.assert_close(out.cpu().double().reshape(-1), flat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_empty_batch_like_cross_entropy(on_backend):
    device, _ = on_backend
    z = torch.randn(0, 7, device=device, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=device)
    for reduction in ("mean", "sum", "none"):
        ours = rce_fast.rce_loss(z, y, reduction=reduction)
        theirs = F.cross_entropy(z, y, reduction=reduction)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    rce_fast.rce_loss(z, y, reduction="sum").backward()
    assert z.grad.shape == (0, 7)


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_all_rows_ignored_gives_nan_mean_zero_grad(on_backend):
    device, _ = on_backend
    z = torch.randn(4, 3, device=device, requires_grad=True)
    y = torch.full((4,), -100, device=device)
    assert torch.isnan(rce_fast.rce_loss(z, y)).item()
    assert torch.isnan(F.cross_entropy(z, y)).item()
    rce_fast.rce_loss(z, y, reduction="sum").backward()
    assert (z.grad == 0).all()


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_nan_and_inf_logits_propagate_like_cross_entropy(on_backend):
    device, _ = on_backend
    z = torch.randn(5, 4, device=device)
    y = torch.tensor([0, 1, 2, 3, -100], device=device)
    z[0, 2] = float("nan")
    z[1, 3] = float("inf")
    z[2, 0] = float("-inf")  # off the label: the reverse label puts mass there -> +inf loss
    z[4, 1] = float("nan")   # ignored row: 0 loss and 0 gradient, NaN or not
    zz = z.clone().requires_grad_(True)
    out = rce_fast.rce_loss(zz, y, reduction="none")
    ref = rce_loss_reference(z.cpu(), y.cpu(), reduction="none")
    assert torch.isnan(out[0]) and torch.isnan(ref[0])
    assert torch.isnan(out[1]) and torch.isnan(ref[1])
    assert out[2] == float("inf") and ref[2] == float("inf")
    assert torch.isfinite(out[3]) and out[4] == 0
    out.sum().backward()
    assert (zz.grad[4] == 0).all() and torch.isfinite(zz.grad[3]).all()


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_gradient_is_softmax_minus_reverse_label(on_backend):
    device, _ = on_backend
    z, y = _inputs(20, 9, torch.float32, device, seed=10)
    zz = z.clone().requires_grad_(True)
    rce_fast.rce_loss(zz, y, reduction="sum", temperature=2.0).backward()
    r = torch.full((20, 9), 1 / 8, device=device).scatter_(1, y[:, None], 0.0)
    expected = (torch.softmax(z / 2.0, 1) - r) / 2.0
    torch.testing.assert_close(zz.grad, expected, rtol=1e-5, atol=1e-6)


def _tiny_label_probability_logits(n, num_classes, p_label, seed):
    """(n, L) float64 logits whose label class has probability ~``p_label``: the label's
    logit 0, the others log((1 - p) / (p (L - 1))) plus a little noise (the state RCE
    training drives towards: the label the least likely class)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    high = math.log((1 - p_label) / (p_label * (num_classes - 1)))
    z = high + 0.5 * torch.randn(n, num_classes, generator=g, dtype=torch.float64)
    return z.scatter_(1, y[:, None], 0.0), y


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
@pytest.mark.parametrize("num_classes", [10, 40], ids=lambda c: f"L{c}")  # C++: both kernels
@pytest.mark.parametrize("reduction", ["none", "mean"])  # per-row and uniform upstream
@pytest.mark.parametrize("create_graph", [False, True], ids=["plain", "create_graph"])
def test_gradient_label_entry_keeps_a_tiny_probability(on_backend, num_classes, reduction,
                                                       create_graph):
    """The label's gradient entry is g p_y (R_y is 0 there). Forming it as
    (p_y - 1/(L-1)) + 1/(L-1) rounds it to a multiple of ulp(1/(L-1)), 0 for p_y ~1e-12:
    the one entry that keeps pushing the label's logit down would vanish. It must be
    nonzero and match float64 to the relative error that rounding lse (|lse| ~ 26 here,
    an ulp of 2e-6 in float32) leaves in p_y."""
    device, backend = on_backend
    z64, y = _tiny_label_probability_logits(13, num_classes, 1e-12, seed=num_classes)
    cases = [(torch.float32, 1e-5)] + ([] if backend == "triton" else [(torch.float64, 1e-12)])
    for dtype, rtol in cases:  # (no float64 Triton kernels)
        zz = z64.to(dtype).to(device).requires_grad_(True)
        loss = rce_fast.rce_loss(zz, y.to(device), reduction=reduction, temperature=1.0)
        up = torch.linspace(0.5, 1.5, loss.numel(), dtype=dtype, device=device)
        (grad,) = torch.autograd.grad(loss, zz, up.reshape(loss.shape),
                                      create_graph=create_graph)
        weight = up.double().cpu() if reduction == "none" else up.double().cpu() / len(y)
        p = torch.softmax(z64, 1)
        expected = (p.gather(1, y[:, None]) * weight.expand(len(y))[:, None]).squeeze(1)
        assert (expected > 0.5e-12 * weight.min()).all()  # the case is what it says
        got = grad.detach().double().cpu().gather(1, y[:, None]).squeeze(1)
        assert (got != 0).all(), f"{dtype}: label entries rounded to 0: {got.tolist()}"
        torch.testing.assert_close(got, expected, rtol=rtol, atol=0.0)


def test_gradcheck_float64():
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, -100, 2, 1, 3])
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda t: rce_fast.rce_loss(t, y, reduction=reduction, temperature=1.7), (z,))


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_opcheck(on_backend):
    device, _ = on_backend
    z, y = _inputs(9, 11, torch.float32, device, seed=11)
    y[3] = -100
    for requires_grad in (False, True):
        zz = z.clone().requires_grad_(requires_grad)
        torch.library.opcheck(torch.ops.rce_fast.rce_loss_forward.default, (zz, y, -100, 0.5))
    _, lse = torch.ops.rce_fast.rce_loss_forward(z, y, -100, 0.5)
    g = torch.rand(9, device=device)
    torch.library.opcheck(torch.ops.rce_fast.rce_loss_backward.default,
                          (g, z, y, lse, -100, 0.5))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    torch._dynamo.reset()

    def step(z, y):
        return rce_fast.rce_loss(z, y, temperature=2.0) * 3.0

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    z, y = _inputs(16, 10, torch.float32, "cpu", seed=12)
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    out_c = compiled(z1, y)
    out_e = step(z2, y)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(z1.grad, z2.grad)
    with pytest.raises(ValueError, match="target"):
        compiled(z, torch.full((16,), 10))


def test_module_matches_function_and_repr():
    z, y = _inputs(8, 4, torch.float32, "cpu", seed=13)
    mod = rce_fast.RCELoss(reduction="sum", temperature=2.0)
    torch.testing.assert_close(mod(z, y), rce_fast.rce_loss(z, y, "sum", temperature=2.0))
    assert "temperature=2.0" in repr(mod)
    with pytest.raises(ValueError, match="temperature"):
        rce_fast.RCELoss(temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        rce_fast.RCELoss(reduction="avg")


def test_rce_inference_helpers():
    z = torch.tensor([[3.0, -1.0, 0.5], [0.0, 2.0, -4.0]])
    assert rce_fast.rce_predict(z).tolist() == [1, 2]
    assert torch.equal(rce_fast.rce_decision_logits(z), -z)
    assert torch.equal(rce_fast.decision_logits(z, "ce"), z)
    assert rce_fast.decision_logits(z, "rce").argmax(1).tolist() == [1, 2]
    with pytest.raises(ValueError, match="objective"):
        rce_fast.decision_logits(z, "mse")


def test_rce_training_signal_makes_label_least_likely():
    """A few SGD steps on RCE push Z_y below the other logits (prediction = argmin Z)."""
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x @ torch.randn(8, 4)).argmax(1)  # linearly separable labels
    w = torch.zeros(8, 4, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5)
    first = None
    for _ in range(200):
        loss = rce_fast.rce_loss(x @ w, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert (rce_fast.rce_predict(x @ w) == y).float().mean() > 0.8


# ------------------------------------------------------------------------- bad input

def _bad(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_bad_inputs_raise_clear_errors():
    z = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    _bad(lambda: rce_fast.rce_loss(z, torch.tensor([0, 1, 5, 3])), ValueError, r"target.*\[0, 5\)")
    _bad(lambda: rce_fast.rce_loss(z, torch.tensor([0, -1, 2, 3])), ValueError, "target")
    _bad(lambda: rce_fast.rce_loss(z, y.float()), TypeError, "target")
    _bad(lambda: rce_fast.rce_loss(z.long(), y), TypeError, "logits")
    _bad(lambda: rce_fast.rce_loss(z.numpy(), y), TypeError, "logits")
    _bad(lambda: rce_fast.rce_loss(z, [0, 1, 2, 3]), TypeError, "target")
    _bad(lambda: rce_fast.rce_loss(z, y[:3]), ValueError, r"target must have shape \(4,\)")
    _bad(lambda: rce_fast.rce_loss(z[:, :1], y * 0), ValueError, "at least 2 classes")
    _bad(lambda: rce_fast.rce_loss(z, y, temperature=0.0), ValueError, "temperature")
    _bad(lambda: rce_fast.rce_loss(z, y, temperature=-1), ValueError, "temperature")
    _bad(lambda: rce_fast.rce_loss(z, y, temperature=math.inf), ValueError, "temperature")
    _bad(lambda: rce_fast.rce_loss(z, y, temperature="2"), TypeError, "temperature")
    _bad(lambda: rce_fast.rce_loss(z, y, reduction="avg"), ValueError, "reduction")
    _bad(lambda: rce_fast.rce_loss(z, y, ignore_index=1.5), TypeError, "ignore_index")
    _bad(lambda: rce_fast.rce_loss(torch.tensor(1.0), torch.tensor(0)), ValueError, "logits")
    _bad(lambda: rce_fast.rce_loss(z, y.to("meta")), ValueError, "device")


@pytest.mark.gpu
def test_device_mismatch_cuda():
    z = torch.randn(4, 5, device="cuda")
    with pytest.raises(ValueError, match="same device"):
        rce_fast.rce_loss(z, torch.tensor([0, 1, 2, 3]))


def test_forced_triton_backend_explains_what_it_cannot_run():
    z = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    with rce_fast.use_backend("triton"):
        with pytest.raises(RuntimeError, match="triton: .*dtype"):
            rce_fast.rce_loss(z, y)
    with pytest.raises(ValueError, match="backend"):
        rce_fast.set_backend("cuda")


def test_range_check_runs_before_any_kernel(monkeypatch):
    called = []
    spies = [ops._backend.Impl(impl.name, impl.why_not, lambda *a: called.append(a))
             for impl in ops._RCE_FORWARD]
    monkeypatch.setattr(ops, "_RCE_FORWARD", spies)
    with pytest.raises(ValueError, match="class index 3"):
        rce_fast.rce_loss(torch.randn(2, 3), torch.tensor([0, 3]))
    assert not called


# ------------------------------------------------------- CPU path: C++ or PyTorch

def _needs_extension():
    from rce_fast import _ext
    if _ext.load()[0] is None:
        pytest.skip("rce_fast._C is not built")


@pytest.fixture
def fresh_choices(monkeypatch):
    """Measured choices of this test only; counts the measurements."""
    _needs_extension()
    monkeypatch.setattr(ops, "_RCE_CPU_CHOICE", {})
    monkeypatch.setattr(ops, "_rce_cpu_path", "measure")
    calls = []
    real = ops._measure_rce_cpu
    monkeypatch.setattr(ops, "_measure_rce_cpu", lambda z: calls.append(tuple(z.shape)) or real(z))
    return calls


def _picked(z):
    return ops._backend.pick("t", ops._RCE_FORWARD, logits=z).name


def test_cpu_path_is_measured_once_per_shape_class(fresh_choices):
    calls = fresh_choices
    z = torch.randn(128, 10)
    rng = torch.get_rng_state()
    first = _picked(z)
    assert first in ("compiled", "torch") and calls == [(128, 10)]
    assert torch.equal(torch.get_rng_state(), rng)  # its synthetic input has its own generator
    assert _picked(torch.randn(120, 9)) == first  # same class: cached, not measured again
    assert calls == [(128, 10)]
    _picked(torch.randn(64, 1000))                 # another class: measured
    _picked(torch.randn(128, 10, dtype=torch.float64))
    assert calls == [(128, 10), (64, 1000), (128, 10)]
    classes = ops.rce_cpu_choices()
    assert len(classes) == 3 and set(classes.values()) <= {"compiled", "torch"}
    # the measured choice is what rce_loss runs
    key = ops._rce_shape_class(torch.empty(128, 10))
    assert ops._RCE_CPU_CHOICE[key] == first
    ops.clear_rce_cpu_choices()
    assert ops.rce_cpu_choices() == {}


def test_cpu_path_measurement_is_quick_and_bounded(fresh_choices, monkeypatch):
    """Whatever the input's size, the measurement times at most one chunk's worth."""
    seen = []
    real = ops._rce_compiled_fwd_bwd
    monkeypatch.setattr(ops, "_rce_compiled_fwd_bwd", lambda z, y: seen.append(z.numel()) or real(z, y))
    big = torch.empty(4_000_000, 10)  # not touched: only its shape and dtype are used
    _picked(big)
    assert seen and max(seen) <= ops._RCE_MEASURE_ELEMS
    _picked(torch.empty(1, 600_000))  # one row wider than a chunk: that one row
    assert max(seen) == 600_000


@pytest.mark.parametrize("mode", ["compiled", "torch"])
def test_cpu_path_override_forces_each_path(fresh_choices, mode, monkeypatch):
    calls = fresh_choices
    with ops.rce_cpu_path(mode):
        for shape in ((128, 10), (8192, 10), (64, 1000), (2, 50_001)):
            assert _picked(torch.empty(shape)) == mode
        assert ops.get_rce_cpu_path() == mode
    assert ops.get_rce_cpu_path() == "measure" and calls == []
    monkeypatch.setenv("RCE_FAST_CPU_RCE_PATH", mode)  # the documented environment switch
    import importlib
    fresh = importlib.reload(ops)
    try:
        assert fresh.get_rce_cpu_path() == mode
    finally:
        monkeypatch.delenv("RCE_FAST_CPU_RCE_PATH")
        importlib.reload(ops)
    with pytest.raises(ValueError, match="mode"):
        ops.set_rce_cpu_path("fast")


def test_cpu_path_fixed_under_deterministic_algorithms(fresh_choices):
    calls = fresh_choices
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert _picked(torch.empty(128, 10)) == "compiled" and calls == []
    finally:
        torch.use_deterministic_algorithms(previous)


def test_cpu_path_needs_what_the_extension_supports(fresh_choices):
    with ops.rce_cpu_path("compiled"):
        assert _picked(torch.empty(128, 10, dtype=torch.float16)) == "torch"
        with rce_fast.use_backend("torch"):
            assert _picked(torch.empty(128, 10)) == "torch"
    assert fresh_choices == []


# Shapes that cover both C++ kernels (row lanes below 32 classes in the forward and 16 in
# the backward, column lanes with and without a tail above) and the PyTorch small and
# chunked paths.
PATH_SHAPES = [(1, 2), (37, 3), (300, 10), (33, 15), (17, 16), (40, 31), (9, 32), (5, 33),
               (128, 64), (129, 1000), (3, 4097), (2, 300_001)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", PATH_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_both_cpu_paths_give_the_same_results(dtype, shape):
    """Whichever path the measurement picks, rce_loss returns the same numbers: equal to
    within a few ulps of the accumulation dtype (both are within the reference-error
    bound of the float64 reference, tested above). The gradient's tolerance is absolute,
    in ulps of its largest entry: softmax - 1/(L-1) cancels, and each path's exp and
    log-sum-exp differ by an ulp or two."""
    _needs_extension()
    z, y = _inputs(*shape, dtype, "cpu", seed=shape[0] + shape[1], scale=4.0, ignore_frac=0.2)
    z[0, -1] = -1e4  # a logit whose exp underflows
    out = {}
    for mode in ("compiled", "torch"):
        with ops.rce_cpu_path(mode):
            for reduction in ("none", "mean"):
                out[mode, reduction] = _loss_and_grad(rce_fast.rce_loss, z, y,
                                                      reduction=reduction, temperature=1.5)
    eps = EPS[dtype]
    for reduction in ("none", "mean"):
        (lc, gc), (lt, gt) = out["compiled", reduction], out["torch", reduction]
        torch.testing.assert_close(lc, lt, rtol=16 * eps, atol=16 * eps, equal_nan=True)
        torch.testing.assert_close(gc, gt, rtol=16 * eps, atol=16 * eps * gc.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(300, 10), (40, 31), (5, 33), (129, 1000), (2, 50_001)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_fused_cpu_loss_same_bits_on_every_instruction_set(dtype, shape):
    """The fused loss's x86-64 baseline and AVX2 copies give identical bits (so do CPUs
    without AVX2, and with AVX-512, which run one of the two)."""
    _needs_extension()
    module = ops._ext.load()[0]
    z, y = _inputs(*shape, dtype, "cpu", seed=1, scale=30.0, ignore_frac=0.1)
    z = z.contiguous()
    n, num_classes = z.shape
    outs = []
    for isa in (module.ISA_BASELINE, module.ISA_AVX2):
        loss, lse = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
        stats = module.rce_forward_cpu(z.data_ptr(), y.data_ptr(), loss.data_ptr(),
                                       lse.data_ptr(), n, num_classes, num_classes, -100, 0.7,
                                       dtype == torch.float64, 1, isa)
        g = torch.rand(n, dtype=dtype, generator=torch.Generator().manual_seed(2))
        grad = torch.empty_like(z)
        module.rce_backward_cpu(g.data_ptr(), 1.0, z.data_ptr(), y.data_ptr(), lse.data_ptr(),
                                grad.data_ptr(), n, num_classes, num_classes, -100, 0.7,
                                dtype == torch.float64, 1, isa)
        outs.append((loss, lse, grad, stats))
    (l0, s0, g0, st0), (l1, s1, g1, st1) = outs
    assert torch.equal(l0, l1) and torch.equal(s0, s1) and torch.equal(g0, g1) and st0 == st1


# ------------------------------------------------------------------- double backward

@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(6, 5), (40, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_double_backward_matches_the_reference(on_backend, reduction, shape):
    """create_graph=True gives a differentiable gradient on every path (a gradient
    penalty's term must not silently vanish): the penalty's gradient against the float64
    reference's, by the same flash-attention rule as the loss."""
    device, _ = on_backend
    z, y = _inputs(*shape, torch.float32, device, seed=31, ignore_frac=0.2)

    def penalty_grad(fn, zz, yy, dtype):
        zz = zz.detach().to(dtype).requires_grad_(True)
        loss = fn(zz, yy, reduction=reduction, temperature=1.3)
        w = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
        (g,) = torch.autograd.grad((loss.reshape(-1) * w).sum(), zz, create_graph=True)
        assert g.requires_grad
        (gg,) = torch.autograd.grad((g * g).sum() + g[:, 0].sum(), zz)
        return gg

    ours = penalty_grad(rce_fast.rce_loss, z, y, torch.float32)
    ref = penalty_grad(rce_loss_reference, z.cpu(), y.cpu(), torch.float64)
    low = penalty_grad(lambda a, b, **kw: rce_loss_reference(a, b, dtype=torch.float32, **kw),
                       z.cpu(), y.cpu(), torch.float32)
    _assert_within_ref_error(ours, ref, low, torch.float32, "double backward")


@pytest.mark.parametrize("backend", ["torch", "auto", "torch_chunked"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradgradcheck_float64(backend, reduction, monkeypatch):
    if backend == "torch_chunked":
        from rce_fast import _torch_impl
        monkeypatch.setattr(_torch_impl, "SMALL_ELEMS", -1)
        backend = "torch"
    g = torch.Generator().manual_seed(32)
    z = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 6, -100, 2, 3])
    with rce_fast.use_backend(backend):
        assert torch.autograd.gradgradcheck(
            lambda t: rce_fast.rce_loss(t, y, reduction=reduction, temperature=0.7), (z,))


def test_opcheck_backward_op_with_gradients():
    z, y = _inputs(9, 11, torch.float32, "cpu", seed=34)
    y[2] = -100
    _, lse = torch.ops.rce_fast.rce_loss_forward(z, y, -100, 0.5)
    g = torch.rand(9)
    torch.library.opcheck(torch.ops.rce_fast.rce_loss_backward.default,
                          (g.requires_grad_(True), z.clone().requires_grad_(True), y, lse,
                           -100, 0.5))


@pytest.mark.parametrize("grid_y", [1, 2, 3])
def test_backward_strides_over_class_tiles_past_the_grid_limit(monkeypatch, grid_y):
    """More class tiles than grid axis 1 may hold (CUDA: 65535, i.e. 268M classes): the
    backward's strided form, forced here with a tiny limit, gives the same gradient."""
    import os
    if os.environ.get("TRITON_INTERPRET", "0") == "0" and not torch.cuda.is_available():
        pytest.skip("neither the Triton interpreter nor a GPU in this run")
    from rce_fast.kernels import rce_loss as k
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(grid_y)
    z = torch.randn(3, 3 * 4096 + 17, generator=g).to(device)  # 4 tiles of 4096 classes
    y = torch.tensor([5, 4096 * 2 + 3, 12300], device=device)
    w = torch.tensor([1.0, -2.0, 0.5], device=device)
    with rce_fast.use_backend("triton"):
        zz = z.clone().requires_grad_(True)
        (rce_fast.rce_loss(zz, y, reduction="none") * w).sum().backward()
        monkeypatch.setattr(k, "MAX_GRID_Y", grid_y)
        zs = z.clone().requires_grad_(True)
        (rce_fast.rce_loss(zs, y, reduction="none") * w).sum().backward()
    assert torch.equal(zs.grad, zz.grad)
    z64 = z.double().cpu().requires_grad_(True)
    (rce_loss_reference(z64, y.cpu(), reduction="none") * w.double().cpu()).sum().backward()
    torch.testing.assert_close(zs.grad.double().cpu(), z64.grad, rtol=1e-5, atol=1e-7)


def test_kernels_refuse_a_class_count_past_int32_indexing(monkeypatch):
    """Past MAX_CLASSES (about 1.88e9) the forward's class loop and the strided backward's
    int32 column index could wrap around: both launchers refuse, before allocating
    anything, with a message naming the class count; the dispatcher never sends such a
    call to them (the PyTorch path takes it), and backend 'triton' says why it cannot."""
    from rce_fast.kernels import rce_loss as k
    monkeypatch.setattr(k, "MAX_CLASSES", 100)
    z, y = torch.randn(2, 101), torch.tensor([0, 1])
    allocated = []
    real_empty = torch.empty

    def counting_empty(*args, **kwargs):
        allocated.append(args)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(k.torch, "empty", counting_empty)
    with pytest.raises(ValueError, match="101 classes; the Triton RCE kernels take at most 100"):
        k.rce_forward(z, y, -100, 1.0)
    with pytest.raises(ValueError, match="101 classes"):
        k.rce_backward(torch.ones(2), z, y, torch.zeros(2), -100, 1.0)
    assert allocated == []
    monkeypatch.setattr(k.torch, "empty", real_empty)
    if rce_fast._backend.triton_interpreter_on() or torch.cuda.is_available():
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        zz = z.to(dev, copy=True).requires_grad_(True)
        with rce_fast.use_backend("auto"), rce_fast.ops.rce_cpu_path("torch"):
            rce_fast.rce_loss(zz, y.to(dev)).backward()  # falls back to PyTorch
        ref = z.double().requires_grad_(True)
        rce_loss_reference(ref, y).backward()
        torch.testing.assert_close(zz.grad.cpu().double(), ref.grad, rtol=1e-5, atol=1e-7)
        with rce_fast.use_backend("triton"), pytest.raises(
                RuntimeError, match="101 classes; the Triton RCE kernels take at most 100"):
            rce_fast.rce_loss(z.to(dev), y.to(dev))
