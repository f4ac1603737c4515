"""pgd and orthogonal_pgd: against plain references, their constraints, and the point of
them: aware of the detector, they lower its TPR at 5% FPR."""
import copy

import pytest
import torch

import rce_fast
from rce_fast.attacks import orthogonal_pgd, pgd
from rce_fast.attacks.pgd import _Ball, _orthogonal
from rce_fast.detect import GuardedClassifier, threshold_at_fpr
from tests.helpers import digits_mlp, digits_tensors
from tests.reference_detection import orthogonal_pgd_reference, pgd_reference


@pytest.fixture(scope="module")
def pair():
    """The RCE digits MLP, its K-density detector, the threshold at 5% FPR on held-out
    clean inputs, and test inputs with labels."""
    model = digits_mlp("rce")
    x, y = digits_tensors()
    with torch.no_grad():
        feats = model.features(x[:1500])
    det = rce_fast.KDensityDetector(objective="rce", per_class=100, seed=0,
                                    sigma2=float(feats.var(0).sum()) / 4).fit(feats, y[:1500])
    with torch.no_grad():
        z, f = model.logits_and_features(x[1500:1650])
    thr = threshold_at_fpr(det.score(f, z.argmax(1)), 0.05)
    return model, det, thr, x[1650:1797], y[1650:1797]


def _tpr(model, det, thr, adv, y):
    """(share misclassified, TPR at the threshold over the misclassified)."""
    with torch.no_grad():
        z, f = model.logits_and_features(adv)
    wrong = z.argmax(1) != y
    flagged = det.score(f, z.argmax(1)) < thr
    return float(wrong.float().mean()), float(flagged[wrong].float().mean())


def test_adaptive_attacks_lower_the_detectors_tpr(pair):
    model, det, thr, x, y = pair
    guarded = GuardedClassifier(model, det, thr)
    eps = 0.2
    unaware = pgd(model, x, eps, steps=20, labels=y)
    wrong_u, tpr_u = _tpr(model, det, thr, unaware, y)
    adaptive, info = pgd(guarded, x, eps, steps=20, labels=y, return_info=True)
    wrong_a, tpr_a = _tpr(model, det, thr, adaptive, y)
    opgd, oinfo = orthogonal_pgd(guarded, x, eps, steps=20, labels=y, return_info=True)
    wrong_o, tpr_o = _tpr(model, det, thr, opgd, y)
    assert wrong_u > 0.7 and tpr_u > 0.1          # the unaware attack is often detected
    assert wrong_a > 0.5 and tpr_a < tpr_u - 0.1  # the adaptive ones much less
    assert wrong_o > 0.2 and tpr_o < tpr_u - 0.1
    # info agrees with the detector
    assert torch.equal(info.flagged, info.prediction == 10)
    assert torch.equal(info.success, (info.prediction != y) & ~info.flagged)
    with torch.no_grad():
        z, f = model.logits_and_features(opgd)
    assert torch.equal(oinfo.flagged, det.score(f, z.argmax(1)) < thr)
    assert torch.equal(oinfo.success, (z.argmax(1) != y) & ~oinfo.flagged)


def test_pgd_equals_the_reference_loop():
    model = copy.deepcopy(digits_mlp("ce")).double()
    x, y = digits_tensors()
    x, y = x[1500:1530].double(), y[1500:1530]
    adv = pgd(model, x, 0.1, steps=7, step_size=0.02, random_start=False, labels=y)
    ref = pgd_reference(model, x, y, 0.1, 7, 0.02)
    torch.testing.assert_close(adv, ref, rtol=0, atol=1e-12)


def test_orthogonal_pgd_equals_the_reference_loop(pair):
    model, det, thr, x, y = pair
    guarded = GuardedClassifier(model, det, thr)
    x, y = x[:25], y[:25]
    adv = orthogonal_pgd(guarded, x, 0.15, steps=6, step_size=0.03, labels=y)
    ref = orthogonal_pgd_reference(guarded, x, y, 0.15, 6, 0.03)
    # float32 and two different evaluation orders: a gradient component at the edge of
    # zero may take the other sign, moving that pixel by one step
    close = (adv - ref).abs() <= 1e-6
    assert close.float().mean() > 0.99


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_constraints_dtype_seed_and_targets(pair, norm):
    model, _, _, x, y = pair
    x = x[:40]
    eps = 0.1 if norm == "linf" else 1.0
    adv, info = pgd(model, x, eps, norm=norm, steps=10, seed=3, return_info=True)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert adv.min() >= -0.5 and adv.max() <= 0.5
    if norm == "linf":
        assert (info.linf <= eps + 1e-6).all()
    else:
        assert (info.l2 <= eps * (1 + 1e-5)).all()
    assert torch.equal(pgd(model, x, eps, norm=norm, steps=10, seed=3), adv)
    assert not torch.equal(pgd(model, x, eps, norm=norm, steps=10, seed=4), adv)
    with torch.no_grad():
        pred = model(adv).argmax(1)
    assert torch.equal(info.success, pred != info.labels)
    target = (model(x).argmax(1) + 1) % 10
    tadv, tinfo = pgd(model, x, 0.3 if norm == "linf" else 3.0, norm=norm, steps=20,
                      target=target, loss="margin", restarts=2, return_info=True)
    assert torch.equal(tinfo.target, target)
    assert tinfo.success.float().mean() > 0.8
    assert torch.equal(tinfo.success, model(tadv).argmax(1) == target)
    adv64 = pgd(copy.deepcopy(model).double(), x.double(), eps, norm=norm, steps=2)
    assert adv64.dtype == torch.float64


def test_orthogonal_step_is_orthogonal():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 1, 8, 8, generator=g)
    u = torch.randn(5, 1, 8, 8, generator=g)
    w = _orthogonal(v, u)
    dots = (w.flatten(1) * u.flatten(1)).sum(1)
    assert dots.abs().max() < 1e-4
    torch.testing.assert_close(_orthogonal(u, u), torch.zeros_like(u), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e25, 1e36])
def test_l2_steps_and_projection_do_not_overflow(scale):
    """An L2 step normalises the direction and the projection rescales the delta by their
    norms; in float32 the square of a component past 1.8e19 is inf, which made the norm
    inf and the step (or the projected delta) zero, and a floor of 1e-12 on the norm cut
    the step of a tiny gradient (1e-30 here) to nothing. The norms are taken on
    v / max|v|, so every nonzero direction gives a step of exactly alpha."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 6, 6, generator=g) - 0.5
    d = torch.randn(4, 1, 6, 6, generator=g)
    d[3] = 0  # no direction: no step
    ball = _Ball(x, 0.5, "l2", -1e38, 1e38)
    moved = ball.step(x, d * scale, 0.3)
    want = x + 0.3 * d / d.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
    torch.testing.assert_close(moved, want, rtol=1e-5, atol=1e-6)
    # a step far past the ball (1e30 in a delta whose square overflows) lands on its edge
    far = _Ball(x, 0.5, "l2", -1e38, 1e38).step(x, d, 1e30)
    n = (far - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(n[:3], torch.full((3,), 0.5), rtol=1e-5, atol=0)
    assert torch.equal(far[3], x[3])
    want_dir = d[:3].flatten(1) / d[:3].flatten(1).norm(dim=1, keepdim=True)
    torch.testing.assert_close((far - x)[:3].flatten(1) / 0.5, want_dir, rtol=1e-4,
                               atol=1e-6)
    # the orthogonal part keeps its meaning at any scale
    u = torch.randn(4, 1, 6, 6, generator=g)
    w = _orthogonal(d * scale, u * scale)
    torch.testing.assert_close(w / scale, _orthogonal(d.double(), u.double()).float(),
                               rtol=1e-4, atol=1e-5)


def test_selective_and_l2_orthogonal_pgd(pair):
    model, det, thr, x, y = pair
    guarded = GuardedClassifier(model, det, thr)
    x, y = x[:30], y[:30]
    sel, info = orthogonal_pgd(guarded, x, 0.2, steps=5, orthogonal=False, labels=y,
                               return_info=True)
    assert ((sel - x).abs().amax((1, 2, 3)) <= 0.2 + 1e-6).all()
    l2, info2 = orthogonal_pgd(guarded, x, 1.5, norm="l2", steps=5, random_start=True,
                               labels=y, return_info=True)
    assert (info2.l2 <= 1.5 * (1 + 1e-5)).all()
    target = (y + 1) % 10
    tg, tinfo = orthogonal_pgd(guarded, x, 0.3, steps=8, target=target, labels=y,
                               return_info=True)
    assert torch.equal(tinfo.target, target)
    assert torch.equal(tinfo.fooled, tinfo.prediction == target)


def test_argument_errors(pair):
    model, det, thr, x, y = pair
    guarded = GuardedClassifier(model, det, thr)
    with pytest.raises(TypeError, match="GuardedClassifier"):
        orthogonal_pgd(model, x[:2], 0.1)
    with pytest.raises(ValueError, match="norm must be"):
        pgd(model, x[:2], 0.1, norm="l1")
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        pgd(model, x[:2], 0.0)
    with pytest.raises(ValueError, match="loss must be"):
        pgd(model, x[:2], 0.1, loss="hinge")
    with pytest.raises(ValueError, match="steps must be an int"):
        orthogonal_pgd(guarded, x[:2], 0.1, steps=-1)
    with pytest.raises(ValueError, match="labels holds classes outside"):
        pgd(guarded, x[:2], 0.1, labels=torch.tensor([10, 0]))
    with pytest.raises(ValueError, match="NaN or inf"):
        pgd(model, torch.full((2, 1, 8, 8), float("nan")), 0.1)
    with pytest.raises(ValueError, match="target holds classes outside"):
        pgd(model, x[:2], 0.1, target=torch.tensor([0, 12]))


@pytest.mark.gpu
def test_no_host_sync_per_step_on_cuda(pair):
    """The number of synchronising calls does not grow with the number of steps."""
    model, det, thr, x, y = pair
    model = copy.deepcopy(model).cuda()
    det_gpu = copy.deepcopy(det)
    det_gpu.bank, det_gpu.bank_labels = det.bank.cuda(), det.bank_labels.cuda()
    det_gpu.index = rce_fast.detect.build_bank_index(det_gpu.bank, det_gpu.bank_labels)
    guarded = GuardedClassifier(model, det_gpu, thr)
    xc, yc = x[:32].cuda(), y[:32].cuda()

    def syncs(fn):
        import warnings
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    for attack in (lambda s: pgd(guarded, xc, 0.1, steps=s, labels=yc),
                   lambda s: orthogonal_pgd(guarded, xc, 0.1, steps=s, labels=yc)):
        attack(2)  # warm-up (kernel compilation)
        assert syncs(lambda: attack(2)) == syncs(lambda: attack(12))


def test_evaluate_detectors_scores_every_pair(pair):
    from rce_fast.detect import evaluate_detectors
    model, det, _, x, y = pair
    xh, _ = digits_tensors()
    held = xh[1500:1650]
    adv = pgd(model, x[:60], 0.2, steps=5, labels=y[:60])
    noise = (x[:60] + 0.05 * torch.randn(60, 1, 8, 8)).clamp(-0.5, 0.5)
    res = evaluate_detectors(model, {"K-density": det, "confidence": "confidence"}, held,
                             x[60:], y[60:], {"PGD": adv, "noise": noise}, y_adv=y[:60],
                             batch_size=32)
    assert set(res) == {"PGD", "noise"} and set(res["PGD"]) == {"K-density", "confidence"}
    with torch.no_grad():
        zh, fh = model.logits_and_features(held)
        za, fa = model.logits_and_features(adv)
    thr = threshold_at_fpr(det.score(fh, zh.argmax(1)), 0.05)
    r = res["PGD"]["K-density"]
    assert r["threshold"] == pytest.approx(thr, rel=1e-12)
    flagged = det.score(fa, za.argmax(1)).double() < r["threshold"]
    wrong = za.argmax(1) != y[:60]
    assert r["tpr"] == pytest.approx(float(flagged[wrong].double().mean()))
    assert r["robust_accuracy"] == pytest.approx(float((flagged | ~wrong).double().mean()))
    fprs, acc = r["curve"]
    assert fprs.shape == acc.shape == (41,)
    assert res["noise"]["confidence"]["n_attacked"] == 60
