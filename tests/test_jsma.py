"""JSMA: the pair-search op on every path against brute force, and the batched attack
against a plain per-image implementation of the same algorithm."""
import os
import subprocess
import sys

import pytest
import torch

import rce_fast
from rce_fast import _ext
from rce_fast.attacks import jsma, jsma_pairs
from tests.helpers import digits_mlp, digits_tensors
from tests.reference import jsma_attack_reference, jsma_pairs_reference

PATHS = [pytest.param(("cpu", "auto"), id="cpu-compiled"),
         pytest.param(("cpu", "torch"), id="cpu-torch"),
         pytest.param(("cuda", "auto"), id="cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=PATHS)
def path(request):
    device, backend = request.param
    if backend == "auto" and device == "cpu" and _ext.load()[0] is None:
        pytest.skip("rce_fast._C is not built")
    with rce_fast.use_backend(backend):
        yield device


def _random_case(batch, n, seed, tie_step=0.25, keep=0.7):
    g = torch.Generator().manual_seed(seed)
    alpha = (torch.randn(batch, n, generator=g) / tie_step).round() * tie_step  # many ties
    beta = (torch.randn(batch, n, generator=g) / tie_step).round() * tie_step
    domain = torch.rand(batch, n, generator=g) < keep
    return alpha, beta, domain


@pytest.mark.parametrize("increase", [True, False], ids=["theta>0", "theta<0"])
@pytest.mark.parametrize("n", [2, 3, 17, 64, 255, 784, 3072])
def test_pairs_match_brute_force(path, n, increase):
    alpha, beta, domain = _random_case(4 if n < 3072 else 2, n, seed=n)
    got = jsma_pairs(alpha.to(path), beta.to(path), domain.to(path), increase).cpu()
    assert torch.equal(got, jsma_pairs_reference(alpha, beta, domain, increase))


def test_pairs_edge_cases(path):
    # no valid pair: alpha never positive
    a = -torch.rand(3, 10)
    b = -torch.rand(3, 10)
    d = torch.ones(3, 10, dtype=torch.bool)
    assert (jsma_pairs(a.to(path), b.to(path), d.to(path)).cpu() == -1).all()
    # a single feature in the domain: no pair
    d1 = torch.zeros(1, 10, dtype=torch.bool)
    d1[0, 4] = True
    assert (jsma_pairs(a[:1].abs().to(path), b[:1].to(path), d1.to(path)).cpu() == -1).all()
    # all scores equal: the lowest (p, q)
    a2 = torch.ones(2, 6)
    b2 = -torch.ones(2, 6)
    d2 = torch.ones(2, 6, dtype=torch.bool)
    d2[1, 0] = False
    assert jsma_pairs(a2.to(path), b2.to(path), d2.to(path)).cpu().tolist() == [[0, 1], [1, 2]]
    # NaN gradients never qualify
    a3 = torch.tensor([[float("nan"), 1.0, 2.0]])
    b3 = torch.tensor([[-1.0, -1.0, -1.0]])
    assert jsma_pairs(a3.to(path), b3.to(path), torch.ones(1, 3, dtype=torch.bool).to(path)
                      ).cpu().tolist() == [[1, 2]]
    # empty batch
    assert jsma_pairs(torch.zeros(0, 5).to(path), torch.zeros(0, 5).to(path),
                      torch.zeros(0, 5, dtype=torch.bool).to(path)).shape == (0, 2)


def test_pairs_bad_inputs():
    a, b, d = _random_case(2, 8, seed=1)
    with pytest.raises(ValueError, match="one shape"):
        jsma_pairs(a, b[:, :7], d)
    with pytest.raises(TypeError, match="domain must be a bool"):
        jsma_pairs(a, b, d.float())
    with pytest.raises(ValueError, match=r"shape \(B, n\)"):
        jsma_pairs(a[0], b[0], d[0])


def test_pairs_opcheck():
    a, b, d = _random_case(3, 40, seed=2)
    torch.library.opcheck(torch.ops.rce_fast.jsma_pairs.default, (a, b, d, True))


def test_missing_extension_falls_back_with_a_clear_warning(monkeypatch):
    a, b, d = _random_case(3, 50, seed=3)
    expected = jsma_pairs_reference(a, b, d, True)
    monkeypatch.setattr(_ext, "load", lambda: (None, "the compiled extension rce_fast._C "
                                                     "is not available (test)"))
    _ext.warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="rce_fast._C is not available"):
        got = jsma_pairs(a, b, d)
    assert torch.equal(got, expected)
    with rce_fast.use_backend("triton"):  # the fast path was asked for explicitly
        with pytest.raises(RuntimeError, match="compiled: the compiled extension"):
            jsma_pairs(a, b, d)
    _ext.warn_fallback.cache_clear()


def test_compiled_module_imports_and_reports_cuda():
    module, why = _ext.load()
    if module is None:
        pytest.skip(why)
    assert isinstance(module.with_cuda, bool)
    if module.with_cuda and not torch.cuda.is_available():
        # the real probe on a machine with no usable GPU says why, and does not throw
        why_not, permanent = module.jsma_cuda_probe()
        assert isinstance(why_not, str) and why_not and permanent is True
    elif module.with_cuda:
        why_not, permanent = module.jsma_cuda_probe()
        if "driver supports CUDA" in why_not:
            pytest.skip(why_not)  # the designed fallback, on an older driver
        assert (why_not, permanent) == ("", True)


def test_cuda_probe_failure_falls_back_with_its_reason(monkeypatch):
    """A driver older than the runtime built in, or a GPU with no SASS/PTX in the build,
    would fail at the first CUDA launch: the probe (on the launch's device, kept when the
    answer is permanent) turns it into the reason the PyTorch path runs instead, and the
    PyTorch path's warning names it. A transient failure is probed again next time."""
    import contextlib
    import types
    from rce_fast import ops
    calls, entered = [], []
    answer = ("the CUDA driver supports CUDA 12.4, older than the CUDA 13.0 runtime", True)

    def probe():
        calls.append(entered[-1])
        return answer

    def on_device(index):  # no GPU here: record the device the probe would run on
        entered.append(index)
        return contextlib.nullcontext()

    fake = types.SimpleNamespace(with_cuda=True, jsma_cuda_probe=probe)
    monkeypatch.setattr(_ext, "load", lambda: (fake, None))
    monkeypatch.setattr(ops, "_JSMA_CUDA_PROBED", {})
    monkeypatch.setattr(ops.torch.cuda, "device", on_device)
    alpha = types.SimpleNamespace(device=torch.device("cuda", 3))
    with rce_fast.use_backend("auto"):
        for _ in range(3):
            assert "older than the CUDA 13.0" in ops._jsma_compiled_why_not(alpha)
        assert calls == [3]  # probed once, on device 3
        answer = ("the CUDA kernels cannot run on device 3 (out of memory)", False)
        monkeypatch.setattr(ops, "_JSMA_CUDA_PROBED", {})
        for _ in range(2):
            assert "out of memory" in ops._jsma_compiled_why_not(alpha)
        assert calls == [3, 3, 3]  # not kept: probed again
        answer = ("", True)
        assert ops._jsma_compiled_why_not(alpha) is None
        fake.with_cuda = False
        assert "built without CUDA" in ops._jsma_compiled_why_not(alpha)
        # the fallback's warning carries the reason the compiled path gave
        monkeypatch.setattr(ops, "_jsma_compiled_why_not",
                            lambda a, **_: "the CUDA driver supports CUDA 12.4")
        _ext.warn_fallback.cache_clear()
        a, b, d = _random_case(2, 10, seed=4)
        with pytest.warns(RuntimeWarning, match="jsma_pairs: the CUDA driver supports CUDA "
                                                "12.4. Falling back"):
            got = ops._jsma_torch(a, b, d, True)
        assert torch.equal(got, jsma_pairs_reference(a, b, d, True))
    _ext.warn_fallback.cache_clear()


# -------------------------------------------------------------------------- the attack

@pytest.mark.parametrize("use_logits", [True, False])
def test_attack_matches_per_image_reference(use_logits):
    model = digits_mlp("ce", torch.float64)
    x, _ = digits_tensors()
    x = x[1500:1516].double()
    target = (model(x).argmax(1) + 3) % 10
    adv, info = jsma(model, x, target, gamma=0.4, use_logits=use_logits, return_info=True)
    ref = jsma_attack_reference(model, x, target, gamma=0.4, use_logits=use_logits)
    assert torch.equal(adv, ref)
    assert adv.dtype == x.dtype and adv.shape == x.shape
    changed = (adv != x).reshape(16, -1).sum(1)
    assert (changed <= info.n_changed).all() and (info.n_changed <= int(0.4 * 64)).all()


def test_attack_targeted_success_on_digits_and_bookkeeping():
    for objective in ("ce", "rce"):
        model = digits_mlp(objective)
        x, _ = digits_tensors()
        x = x[1500:1600]
        before = x.clone()
        adv, info = jsma(model, x, "least_likely", gamma=0.5, return_info=True)
        assert torch.equal(x, before), "input modified in place"
        assert adv.min() >= -0.5 and adv.max() <= 0.5
        pred = model(adv).argmax(1)
        assert torch.equal(info.success, pred == info.target)
        assert info.success.float().mean() > 0.7, objective
        assert torch.equal(info.target, model(x).argmin(1))


def test_attack_theta_negative_and_random_target_deterministic():
    model = digits_mlp("ce")
    x, _ = digits_tensors()
    x = x[1600:1620]
    a1, i1 = jsma(model, x, "random", theta=-1.0, gamma=0.3, seed=5, return_info=True)
    a2, i2 = jsma(model, x, "random", theta=-1.0, gamma=0.3, seed=5, return_info=True)
    assert torch.equal(a1, a2) and torch.equal(i1.target, i2.target)
    assert (i1.target != model(x).argmax(1)).all()
    assert (a1 <= x).all()  # theta < 0 only decreases features


def test_attack_bad_inputs():
    model = digits_mlp("ce")
    x, _ = digits_tensors()
    x = x[:4]
    with pytest.raises(ValueError, match="gamma"):
        jsma(model, x, gamma=0)
    with pytest.raises(ValueError, match="theta"):
        jsma(model, x, theta=0.0)
    with pytest.raises(ValueError, match="target holds classes"):
        jsma(model, x, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        jsma(model, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target must be"):
        jsma(model, x, "most_likely")
    with pytest.raises(ValueError, match="clip"):
        jsma(model, x, clip=(0.5, -0.5))
    with pytest.raises(ValueError, match="empty batch"):
        jsma(model, x[:0])
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        jsma(model, bad)


@pytest.mark.slow
def test_imagenet_sized_image_runs_without_n_by_n_memory():
    """One 3 x 224 x 224 image (n = 150,528; an n x n float32 matrix is 90 GB) on CPU."""
    code = (
        "import resource, torch, rce_fast\n"
        "torch.manual_seed(0)\n"
        "net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, stride=4), torch.nn.ReLU(),\n"
        "    torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()\n"
        "x = torch.rand(1, 3, 224, 224) - 0.5\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "adv, info = rce_fast.attacks.jsma(net, x, 'least_likely', max_iterations=1,\n"
        "                                  return_info=True)\n"
        "assert int(info.n_changed) in (0, 2)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 500
