"""The fused CPU update step of C&W (csrc/cw_cpu.cpp) against its tensor-op twin and the
plain C&W reference; each compiled copy (baseline x86-64, AVX2) gives the same bits."""
from __future__ import annotations

import math

import pytest
import torch

from rce_fast import _ext
from rce_fast.attacks import _cw_fused, cw_l2
from tests.helpers import digits_mlp, digits_tensors
from tests.reference import cw_l2_reference

module, _ = _ext.load()
pytestmark = pytest.mark.skipif(module is None or not hasattr(module, "cw_update_cpu"),
                                reason="rce_fast._C not built")


def _isas():
    out = [module.ISA_BASELINE]
    if module.cpu_isa(module.ISA_AUTO) == "avx2":
        out.append(module.ISA_AVX2)
    return out


def _tanh(x, isa):
    y = torch.empty_like(x)
    module.cw_tanh_cpu(x.data_ptr(), y.data_ptr(), x.numel(), isa)
    return y


@pytest.mark.parametrize("isa", _isas())
def test_tanh_error_is_below_one_ulp_of_one(isa):
    # Every float32 range the box sees: saturation (|x| > 9), the tail, the linear part
    # near 0 (relative accuracy matters there: x' - mid is t * half), subnormals.
    x = torch.cat([torch.linspace(-20, 20, 200_001), torch.logspace(-30, 0, 3001),
                   -torch.logspace(-30, 0, 3001), torch.tensor([0.0, -0.0, 1e-40, 9.01])])
    x = x.float()
    got = _tanh(x, isa).double()
    ref = torch.tanh(x.double())
    err = (got - ref).abs()
    # absolute error below 1 ulp of 1.0 (2^-23 ~ 1.2e-7; measured 9e-8): the box maps
    # t to x' = t * half + mid, whose own rounding is ulp(half) at |t| ~ 1
    assert float(err.max()) < 2.0 ** -23
    # relative error too (x' = t * half when the box is symmetric): a few float32
    # roundings on the series below |x| = 0.25 (subnormals included), where 1 - exp(-2|x|)
    # would cancel, and a few more just above it
    nz = ref != 0
    rel = err[nz] / ref[nz].abs()
    small = x[nz].abs() < 0.25
    assert float(rel[small].max()) < 4 * 2.0 ** -24
    assert float(rel[~small].max()) < 8 * 2.0 ** -24
    assert torch.equal(got[x.abs() > 10].abs(), torch.ones_like(got[x.abs() > 10]))
    assert (got.sign() == ref.sign()).all()


def _case(batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, n, generator=g) * 2
    x = torch.rand(batch, n, generator=g) - 0.5
    t = torch.tanh(w)
    xp = t * 0.5
    d = xp - x
    return dict(g=torch.randn(batch, n, generator=g), w=w, m=torch.randn(batch, n, generator=g) * 1e-2,
                v=torch.rand(batch, n, generator=g) * 1e-3, t=t, xp=xp, x=x,
                best=torch.rand(batch, n, generator=g) - 0.5,
                improved=torch.rand(batch, generator=g) < 0.5, l2=(d * d).sum(1))


def _reference64(case, step, lr, half, mid):
    """The step's maths in float64 from the same float32 inputs, with a per-element bound
    on what float32 arithmetic may add: a few roundings of each term (the moments'
    terms may cancel, so the bound follows their magnitudes, not the result's)."""
    d = {k: v.double() for k, v in case.items() if k != "improved"}
    b1, b2, eps = _cw_fused.BETA1, _cw_fused.BETA2, _cw_fused.EPS
    u = 2.0 ** -24
    gsum = d["g"] + 2 * (d["xp"] - d["x"])
    gw = gsum * (1 - d["t"] ** 2) * half
    gw_err = 6 * u * (d["g"].abs() + 2 * (d["xp"] - d["x"]).abs()) * half
    m = b1 * d["m"] + (1 - b1) * gw
    m_err = 4 * u * (b1 * d["m"].abs() + (1 - b1) * gw.abs()) + (1 - b1) * gw_err
    v = b2 * d["v"] + (1 - b2) * gw * gw
    v_err = 4 * u * v + (1 - b2) * 2 * gw.abs() * gw_err
    step_size = lr / (1 - b1 ** step)
    den = v.sqrt() / math.sqrt(1 - b2 ** step) + eps
    upd = step_size * m / den
    upd_err = step_size * m_err / den + upd.abs() * (12 * u + v_err / (2 * v.clamp_min(1e-300)))
    w = d["w"] - upd
    w_err = u * (d["w"].abs() + upd.abs()) + upd_err
    t = torch.tanh(w)
    t_err = 2.0 ** -23 + w_err  # tanh's own (test above), tanh' <= 1
    xp = t * half + mid
    xp_err = half * t_err + u * (abs(mid) + half)
    diff = xp - d["x"]
    l2 = (diff * diff).sum(1)
    l2_err = (2 * diff.abs() * xp_err + xp_err ** 2).sum(1) + 4 * u * l2
    return {"m": (m, m_err), "v": (v, v_err), "w": (w, w_err), "t": (t, t_err),
            "xp": (xp, xp_err), "l2": (l2, l2_err)}


@pytest.mark.parametrize("batch,n,step", [(1, 1, 1), (3, 7, 2), (5, 64, 10), (17, 784, 1),
                                          (64, 3 * 32 * 32 + 5, 300)])
@pytest.mark.parametrize("path", ["fused", "torch"])
def test_update_step_within_float32_error_of_the_float64_maths(batch, n, step, path):
    # Both the compiled step and its tensor-op twin (the GPU path) against the float64
    # maths, element by element: no path may drift beyond float32 rounding of its terms.
    case = _case(batch, n, seed=batch * 1000 + n)
    args = dict(step=step, lr=0.01, half=0.5, mid=0.0)
    ref = _reference64(case, **args)
    runs = ([lambda c: _cw_fused.fused_update(**c, **args, isa=i) for i in _isas()]
            if path == "fused" else [lambda c: _cw_fused.torch_update(**c, **args)])
    for run in runs:
        got = {k: v.clone() for k, v in case.items()}
        run(got)
        # improved rows take the OLD iterate as their best, the others keep theirs
        keep = ~case["improved"]
        assert torch.equal(got["best"][keep], case["best"][keep])
        assert torch.equal(got["best"][case["improved"]], case["xp"][case["improved"]])
        for k, (want, bound) in ref.items():
            err = (got[k].double() - want).abs()
            worst = float((err / bound).max())
            assert worst <= 1.0, f"{k}: error {worst:.2f} x its float32 bound"


def test_every_compiled_copy_gives_the_same_bits():
    isas = _isas()
    if len(isas) < 2:
        pytest.skip("this CPU runs only the baseline copy")
    ref = _case(9, 1000, seed=3)
    outs = []
    for isa in isas:
        got = {k: v.clone() for k, v in ref.items()}
        _cw_fused.fused_update(**got, step=4, lr=0.01, half=0.5, mid=0.0, isa=isa)
        outs.append(got)
    for k in ("w", "m", "v", "t", "xp", "best", "l2"):
        assert torch.equal(outs[0][k], outs[1][k]), k


def test_inputs_are_not_modified_and_threads_do_not_change_the_result():
    ref = _case(33, 500, seed=5)
    before = {k: v.clone() for k, v in ref.items()}
    outs = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = {k: v.clone() for k, v in ref.items()}
            _cw_fused.fused_update(**got, step=2, lr=0.01, half=0.5, mid=0.0)
        finally:
            torch.set_num_threads(prev)
        assert torch.equal(got["g"], before["g"]) and torch.equal(got["x"], before["x"])
        outs.append(got)
    for k in ("w", "m", "v", "t", "xp", "best", "l2"):
        assert torch.equal(outs[0][k], outs[1][k]), k


def test_a_step_starts_from_the_bits_the_compiled_step_leaves():
    # fused_iterate(w) must reproduce what an update leaves in t, x' and l2 for the new w
    # (a resumed C&W step starts from it), and leave w exactly as it is.
    case = _case(13, 777, seed=9)
    _cw_fused.fused_update(**case, step=3, lr=0.01, half=0.5, mid=0.0)
    w = case["w"].clone()
    t, xp, l2 = _cw_fused.fused_iterate(case["w"], case["x"], 0.5, 0.0)
    assert torch.equal(case["w"], w)
    assert torch.equal(t, case["t"]) and torch.equal(xp, case["xp"])
    assert torch.equal(l2, case["l2"])


@pytest.fixture(scope="module")
def batch():
    x, y = digits_tensors()
    return x[1500:1524], y[1500:1524]


def test_cw_with_the_fused_step_follows_the_plain_reference(batch, monkeypatch):
    # The attack with the fused step and with the tensor-op step both follow the plain
    # autograd reference's iterates to float32 reassociation.
    model = digits_mlp("ce")
    x, _ = batch
    target = (model(x).argmax(1) + 3) % 10
    ref, ref_l2 = cw_l2_reference(model, x, target, c=2.0, steps=120, lr=0.02)
    found = torch.isfinite(ref_l2)
    assert found.float().mean() > 0.5
    calls = []
    real = _cw_fused.fused_update
    monkeypatch.setattr(_cw_fused, "fused_update",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    adv, info = cw_l2(model, x, target, c_init=2.0, binary_search_steps=1,
                      max_iterations=120, lr=0.02, abort_early=False, return_info=True)
    assert len(calls) == 120  # the fused step really ran
    assert torch.equal(info.success, found)
    torch.testing.assert_close(adv, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(info.l2[found], ref_l2[found].sqrt(), rtol=1e-3, atol=1e-4)
    # and the tensor-op path (the GPU's) lands on the same examples
    monkeypatch.setattr(_cw_fused, "fused_available", lambda w: False)
    adv2 = cw_l2(model, x, target, c_init=2.0, binary_search_steps=1, max_iterations=120,
                 lr=0.02, abort_early=False)
    torch.testing.assert_close(adv2, adv, rtol=0, atol=1e-4)
    assert math.isfinite(float(adv.sum()))
