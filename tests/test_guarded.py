"""GuardedClassifier: arg max semantics, gradient against the plain formula, no side
effects, and attacks from torchattacks on it."""
import copy
import math

import pytest
import torch

import rce_fast
from rce_fast.detect import GuardedClassifier, LIDDetector, noisy_like
from rce_fast.detect.guarded import _plan_without_sync
from rce_fast.detect.kdensity import QueryPlan
from rce_fast.models import Classifier, build_model
from tests.helpers import digits_mlp, digits_tensors
from tests.reference_detection import guarded_reference


def _kd(model, dtype=torch.float32):
    x, y = digits_tensors()
    with torch.no_grad():
        feats = model.features(x[:1500].to(dtype))
    det = rce_fast.KDensityDetector(objective=model.objective, per_class=100, seed=0,
                                    sigma2=float(feats.var(0).sum()) / 4)
    return det.fit(feats, y[:1500])


@pytest.fixture(scope="module")
def guarded():
    model = digits_mlp("rce")
    det = _kd(model)
    x, _ = digits_tensors()
    with torch.no_grad():
        z, f = model.logits_and_features(x[1500:1650])
    det.fit_threshold(f, z.argmax(1), fpr=0.2)
    return model, det, GuardedClassifier(model, det)


def test_argmax_is_flagged_exactly_when_the_detector_flags(guarded):
    model, det, g = guarded
    x, _ = digits_tensors()
    xs = torch.cat([x[1650:1797], (x[1650:1700] + 0.3 * torch.randn(50, 1, 8, 8)).clamp(
        -0.5, 0.5), torch.rand(20, 1, 8, 8) - 0.5])
    with torch.no_grad():
        out = g(xs)
        z, f = model.logits_and_features(xs)
        flagged = det.detect(f, z.argmax(1))
    assert out.shape == (len(xs), 11) and out.dtype == torch.float32
    assert 10 < int(flagged.sum()) < len(xs) - 10
    expected = torch.where(flagged, 10, z.argmax(1))
    assert torch.equal(out.argmax(1), expected)
    assert torch.equal(g.flags(xs), flagged)
    assert torch.equal(out[:, :10], z)


class _FixedScores:
    """A detector whose scores are given: exercises ties and rounding of G_L."""

    def __init__(self, scores):
        self.scores = scores

    def score_inputs(self, model, x):
        return model(x), self.scores[: len(x)]


def test_ties_and_gaps_below_one_ulp():
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, _ = digits_tensors()
    xs = x[:6]
    with torch.no_grad():
        z = linear(xs)
    # Large logits: a gap of 1e-6 is far below one ulp of max Z (~1e-3 at 1e4).
    big_model = lambda t: linear(t) + 1e4  # noqa: E731
    thr = 0.5
    scores = torch.tensor([thr, thr - 1e-6, thr + 1e-6, thr - 10.0, thr + 10.0, thr],
                          dtype=torch.float32)

    class Wrap(torch.nn.Module):
        def forward(self, t):
            return big_model(t)

    g = GuardedClassifier(Wrap(), _FixedScores(scores), threshold=thr)
    with torch.no_grad():
        out = g(xs)
    flagged = scores < thr
    assert flagged.tolist() == [False, True, False, True, False, False]
    pred = (1e4 + z).argmax(1)
    assert torch.equal(out.argmax(1), torch.where(flagged, 10, pred))
    # the gap of 1e-6 vanished in 1e4 + 1e-6, the correction keeps it one ulp above
    top = out[:, :10].max(1).values
    assert out[1, 10] == torch.nextafter(top[1], torch.tensor(math.inf))
    assert out[0, 10] == top[0]  # score == threshold: not flagged, tie goes to the class


def test_gradient_equals_autograd_of_the_plain_formula():
    model = copy.deepcopy(digits_mlp("rce")).double()  # the cached model, in float64
    det = _kd(model, torch.float64)
    x, _ = digits_tensors()
    xs = x[1500:1540].double()
    thr, scale = -3.0, 0.7
    g = GuardedClassifier(model, det, threshold=thr, scale=scale)
    w = torch.randn(40, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xa = xs.clone().requires_grad_(True)
    out = g(xa)
    (grad,) = torch.autograd.grad((out * w).sum(), xa)
    xb = xs.clone().requires_grad_(True)
    ref = guarded_reference(model, xb, det.bank, det.bank_labels, det.sigma2, thr, scale)
    (grad_ref,) = torch.autograd.grad((ref * w).sum(), xb)
    # The K-density op subtracts log(bank count) computed in float32 even for float64
    # input (QueryPlan.log_counts: int64.log()), ~1e-7 off: a constant per class, so it
    # shows in the values, not in the gradient.
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-7, atol=1e-9)


def test_plan_without_sync_equals_query_plan(guarded):
    _, det, _ = guarded
    cls = torch.tensor([3, 0, 3, 9, 1, 1, 0, 7])
    a, b = _plan_without_sync(cls, det.index), QueryPlan(cls, det.index)
    for name in ("order", "cls_sorted", "q_offsets", "log_counts", "inverse"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_classifier_and_detector_are_left_alone():
    net = build_model("resnet8", 1)
    model = Classifier(net, "ce").eval()
    x, y = digits_tensors()
    with torch.no_grad():
        feats = model.features(x[:300])
    det = rce_fast.KDensityDetector(objective="ce", per_class=20).fit(feats, y[:300])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = det.bank.clone()
    g = GuardedClassifier(model, det, threshold=-5.0)
    g.train()
    assert not model.training and g.training
    g.eval()
    xa = x[300:310].clone().requires_grad_(True)
    g(xa).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(det.bank, bank) and det.threshold is None
    model.train()
    g.eval()
    assert model.training  # eval() on the wrapper does not switch the classifier
    model.eval()


class _ZeroOne(torch.nn.Module):
    """torchattacks wants inputs in [0, 1]; ours live in [-0.5, 0.5]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z):
        return self.model(z - 0.5)


def test_torchattacks_pgd_and_apgd_attack_the_pair(guarded):
    ta = pytest.importorskip("torchattacks")
    model, det, g = guarded
    x, y = digits_tensors()
    xs, ys = x[1650:1690], y[1650:1690]
    wrapped = _ZeroOne(g)
    # targeted at a wrong class: success = that class, so neither flagged nor correct
    target = (ys + 3) % 10
    pgd = ta.PGD(wrapped, eps=0.3, alpha=0.03, steps=20, random_start=False)
    pgd.set_mode_targeted_by_function(lambda images, labels: target)
    adv = pgd(xs + 0.5, ys) - 0.5
    assert adv.shape == xs.shape and adv.min() >= -0.5 - 1e-6 and adv.max() <= 0.5 + 1e-6
    assert ((adv - xs).abs().amax((1, 2, 3)) <= 0.3 + 1e-5).all()
    with torch.no_grad():
        out = g(adv)
    hit = out.argmax(1) == target
    assert hit.float().mean() > 0.5
    # those inputs are misclassified AND not flagged by the detector
    with torch.no_grad():
        z, f = model.logits_and_features(adv)
    assert not det.detect(f, z.argmax(1))[hit].any()
    assert (z.argmax(1)[hit] == target[hit]).all()
    apgd = ta.APGD(wrapped, eps=0.3, steps=10, n_restarts=1, loss="ce", seed=0)
    adv2 = apgd(xs + 0.5, ys) - 0.5
    assert adv2.shape == xs.shape and torch.isfinite(adv2).all()


def test_autoattack_takes_the_flagged_class_as_its_success(guarded):
    """torchattacks' AutoAttack (APGD-CE, APGD-T, FAB-T, Square) runs on the pair, but an
    untargeted attack that knows only the label treats class L ("flagged") as a success
    and stops there. Scored as robust accuracy (flagged or correct = defended), it finds
    far fewer real successes than rce_fast's pgd, which avoids the flagged class like the
    label: the README's advice."""
    ta = pytest.importorskip("torchattacks")
    from rce_fast.attacks import pgd
    model, det, g = guarded
    x, y = digits_tensors()
    xs, ys = x[1650:1690], y[1650:1690]
    aa = ta.AutoAttack(_ZeroOne(g), norm="Linf", eps=0.3, version="standard", n_classes=11,
                       seed=0)
    adv = aa(xs + 0.5, ys) - 0.5
    assert adv.shape == xs.shape and torch.isfinite(adv).all()
    assert ((adv - xs).abs().amax((1, 2, 3)) <= 0.3 + 1e-5).all()
    with torch.no_grad():
        clean, out = g(xs).argmax(1), g(adv).argmax(1)
    flagged = out == 10
    assert (clean == ys).float().mean() >= 0.7
    assert (out != ys).float().mean() >= 0.9          # the naive "attack success"
    assert flagged.float().mean() >= 0.75             # ... is mostly being flagged
    real_aa = (out != ys) & ~flagged
    with torch.no_grad():                             # flagged agrees with the detector
        z, f = model.logits_and_features(adv)
    assert torch.equal(det.detect(f, z.argmax(1)), flagged)
    _, info = pgd(g, xs, eps=0.3, steps=40, labels=ys, loss="margin", return_info=True)
    assert info.success.float().mean() >= real_aa.float().mean() + 0.4


def test_a_threshold_that_flags_everything_is_refused(guarded):
    """fit_threshold(fpr=1) gives +inf (flag every input); as the extra logit it would be
    inf and the attacks' gradients NaN, so the wrapper refuses it, naming the threshold."""
    model, det, _ = guarded
    x, _ = digits_tensors()
    det = copy.deepcopy(det)
    with torch.no_grad():
        z, f = model.logits_and_features(x[1500:1550])
    assert det.fit_threshold(f, z.argmax(1), fpr=1.0) == math.inf
    assert det.detect(f, z.argmax(1)).all()
    for kw in ({}, {"threshold": math.inf}):
        with pytest.raises(ValueError, match=r"threshold must be finite, got inf \(a threshold "
                                             r"fitted at fpr = 1 flags every input"):
            GuardedClassifier(model, det, **kw)
    with pytest.raises(ValueError, match=r"got -inf \(it would flag no input: .* never fires"):
        GuardedClassifier(model, det, threshold=-math.inf)
    with pytest.raises(ValueError, match=r"threshold must be a number, got nan"):
        GuardedClassifier(model, det, threshold=math.nan)


def test_flags_refuses_nan_inputs(guarded):
    """A NaN score compares False with the threshold, which would read "not flagged"."""
    _, _, g = guarded
    x, _ = digits_tensors()
    bad = x[:4].clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        g.flags(bad)
    assert g.flags(x[:4]).shape == (4,)


def test_other_detectors_and_errors():
    model = digits_mlp("rce")
    x, _ = digits_tensors()
    xa = x[:8].clone().requires_grad_(True)
    g = GuardedClassifier(model, "confidence", threshold=0.9)
    out = g(xa)
    conf = torch.softmax(model(x[:8]), 1).amax(1)
    assert torch.equal(out.argmax(1) == 10, conf < 0.9)
    (grad,) = torch.autograd.grad(out[:, 10].sum(), xa)
    assert torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="threshold"):
        GuardedClassifier(model, rce_fast.KDensityDetector().fit(torch.randn(20, 4),
                                                                 torch.arange(20) % 2))
    with pytest.raises(TypeError, match="classifier must be an nn.Module"):
        GuardedClassifier(lambda t: t, "confidence", 0.5)
    with pytest.raises(TypeError, match="score_inputs"):
        GuardedClassifier(model, object(), 0.5)
    with pytest.raises(ValueError, match="not a known score"):
        GuardedClassifier(model, "entropy", 0.5)
    with pytest.raises(ValueError, match="scale"):
        GuardedClassifier(model, "confidence", 0.5, scale=0.0)
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    det = rce_fast.KDensityDetector().fit(torch.randn(20, 4), torch.arange(20) % 2)
    with pytest.raises(TypeError, match="logits_and_features"):
        GuardedClassifier(plain, det, 0.0)
    g = GuardedClassifier(model, det, 0.0)
    with pytest.raises(ValueError, match="10 classes but the detector's bank has 2"):
        g(x[:2])


def test_guarded_lid_is_differentiable():
    net = build_model("resnet8", 1).eval()
    model = Classifier(net, "ce")
    x, _ = digits_tensors()
    adv = (x[:200] + 0.2 * torch.randn(200, 1, 8, 8).sign()).clamp(-0.5, 0.5)
    det = LIDDetector(k=5, batch_size=20, C=1.0).fit(model, x[:200], adv,
                                                     noisy_like(x[:200], adv))
    g = GuardedClassifier(model, det, threshold=0.0)
    xa = x[300:306].clone().requires_grad_(True)
    out = g(xa)
    (grad,) = torch.autograd.grad(out[:, -1].sum(), xa)
    assert out.shape == (6, 11) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        flagged = det.detect(model, x[300:306], threshold=0.0)
    assert torch.equal(out.argmax(1) == 10, flagged)


def test_triton_kernel_path_with_the_gpu_launch_grid(guarded, monkeypatch):
    """The GuardedClassifier through the Triton K-density kernels (interpreter on CPU),
    launched with the CUDA grid (upper bound, no host sync): same logits and input
    gradient as the PyTorch path."""
    import os
    if os.environ.get("TRITON_INTERPRET", "0") == "0":
        pytest.skip("Triton interpreter is off in this run")
    from rce_fast.kernels import kdensity as k
    model, det, g = guarded
    original = k._tiles
    monkeypatch.setattr(k, "_tiles", lambda off, bm, n, exact=None: original(off, bm, n, False))
    x, _ = digits_tensors()
    xs = x[1650:1666]
    outs = {}
    for backend in ("torch", "triton"):
        xa = xs.clone().requires_grad_(True)
        with rce_fast.use_backend(backend):
            out = g(xa)
            (grad,) = torch.autograd.grad(out[:, -1].sum(), xa)
        outs[backend] = (out.detach(), grad)
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["triton"][1], outs["torch"][1], rtol=1e-3, atol=1e-4)


def test_the_repos_attacks_run_on_the_pair(guarded):
    """fgsm, bim, cw_l2 and jsma take any decision-logits model: on the guarded one a
    targeted attack towards a real class must also evade the detector to succeed."""
    from rce_fast.attacks import bim, cw_l2, fgsm, jsma
    model, det, g = guarded
    x, y = digits_tensors()
    xs, ys = x[1650:1666], y[1650:1666]
    target = (ys + 2) % 10
    for adv in (fgsm(g, xs, 0.1, labels=ys), bim(g, xs, 0.1, labels=ys)):
        assert adv.shape == xs.shape and adv.abs().max() <= 0.5
    adv, info = cw_l2(g, xs, target, binary_search_steps=2, max_iterations=30, c_init=1.0,
                      lr=0.05, return_info=True)
    with torch.no_grad():
        out = g(adv)
        z, f = model.logits_and_features(adv)
    ok = info.success
    assert ok.any()
    assert torch.equal(out.argmax(1)[ok], target[ok])
    assert not det.detect(f, z.argmax(1))[ok].any()
    adv, jinfo = jsma(g, xs[:4], target[:4], max_iterations=5, return_info=True)
    assert adv.shape == (4, 1, 8, 8) and jinfo.success.shape == (4,)
