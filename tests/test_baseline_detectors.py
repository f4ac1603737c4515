"""LIDDetector and MahalanobisDetector against plain references written in
tests/reference_detection.py (NumPy loops, scikit-learn), and their API."""
import numpy as np
import pytest
import torch

from rce_fast.detect import LIDDetector, MahalanobisDetector, noisy_like
from rce_fast.detect.bundle import load_detector, save_detector
from rce_fast.models import Classifier, ResNet
from tests.helpers import digits_tensors
from tests.reference_detection import (gaussian_reference, lid_features_reference,
                                       logistic_reference,
                                       mahalanobis_layer_scores_reference, pooled)


N = 80  # clean / adversarial / noisy inputs for the regressions


@pytest.fixture(scope="module")
def setup64():
    """An untrained narrow ResNet-8 (widths 4/8/16: fast) in float64 (the references are
    float64) and digits data with crude adversarial and noisy counterparts."""
    torch.manual_seed(0)
    model = Classifier(ResNet(1, 1, 10, widths=(4, 8, 16)), "ce").double().eval()
    x, y = digits_tensors()
    x = x.double()
    g = torch.Generator().manual_seed(1)
    adv = (x[:N] + 0.15 * torch.randn(N, 1, 8, 8, generator=g, dtype=torch.float64)
           .sign()).clamp(-0.5, 0.5)
    return model, x, y, adv, noisy_like(x[:N], adv, seed=2)


# --------------------------------------------------------------------------------- LID

def test_lid_matches_the_reference(setup64):
    model, x, _, adv, noisy = setup64
    layers = ("stem", "block2", "features", "logits")
    det = LIDDetector(k=6, batch_size=15, reference_batches=2, layers=layers, C=0.5, seed=3)
    det.fit(model, x[:N], adv, noisy, batch_size=32)
    assert det.layers == layers
    ref_rows = det.reference_index
    assert len(ref_rows) == 30 and len(set(ref_rows.tolist())) == 30
    # the reference minibatches are those rows, and the LID of any input against them is
    # the reference's
    queries = x[1000:1030]
    want = lid_features_reference(model, queries, layers, x[:N][ref_rows], 2, 6)
    with torch.no_grad():
        got = det.lid_features(model, queries).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    # the regression: clean / noisy / adversarial rows not drawn into the reference
    keep = np.ones(N, dtype=bool)
    keep[ref_rows.numpy()] = False
    feats = [lid_features_reference(model, part[keep], layers, x[:N][ref_rows], 2, 6)
             for part in (x[:N], noisy, adv)]
    labels = np.r_[np.zeros(2 * keep.sum()), np.ones(keep.sum())]
    logit = logistic_reference(np.concatenate(feats), labels, C=0.5)
    scores = det.score(model, queries, batch_size=7).numpy()
    np.testing.assert_allclose(scores, -logit(want), rtol=1e-6, atol=1e-6)
    # one batch on the device, differentiable
    xq = queries.clone().requires_grad_(True)
    s = det.score(model, xq)
    (grad,) = torch.autograd.grad(s.sum(), xq)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_lid_with_a_separate_reference_and_cross_validation(setup64):
    model, x, _, adv, noisy = setup64
    det = LIDDetector(k=5, batch_size=20, layers=("features", "logits"), seed=0)
    det.fit(model, x[:N], adv, reference=x[500:600])
    assert det.head.C in (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4)
    assert set(det.reference_index.tolist()) <= set(range(100))
    # a duplicate of a reference point gets a finite LID (distance floored)
    dup = x[500:600][det.reference_index[:3]]
    assert torch.isfinite(det.lid_features(model, dup)).all()


def test_lid_threshold_detect_save_load(setup64, tmp_path):
    model, x, _, adv, noisy = setup64
    det = LIDDetector(k=5, batch_size=20, C=1.0).fit(model, x[:N], adv, noisy)
    assert det.layers == model.layer_names  # every layer by default, as the paper
    thr = det.fit_threshold(model, x[200:300], fpr=0.1)
    scores = det.score(model, x[200:300], batch_size=50)
    assert (scores < thr).double().mean() <= 0.1
    assert torch.equal(det.detect(model, x[200:300]), scores < thr)
    det.save(tmp_path / "lid.pt")
    back = LIDDetector.load(tmp_path / "lid.pt")
    assert back.threshold == thr and back.layers == det.layers and back.k == 5
    assert torch.equal(back.score(model, x[200:300], batch_size=50), scores)
    assert torch.equal(back.reference_index, det.reference_index)
    raw = torch.load(tmp_path / "lid.pt", weights_only=True)   # plain data only
    assert raw["kind"] == "lid" and isinstance(raw["head"]["coef"], torch.Tensor)
    with pytest.raises(ValueError, match="does not hold a MahalanobisDetector"):
        MahalanobisDetector.load(tmp_path / "lid.pt")


def test_lid_errors(setup64):
    model, x, _, adv, _ = setup64
    with pytest.raises(ValueError, match="k=30 needs batch_size >= k"):
        LIDDetector(k=30, batch_size=20)
    with pytest.raises(RuntimeError, match="not fitted"):
        LIDDetector().score(model, x[:4])
    with pytest.raises(ValueError, match="clean has 80 inputs; 200 reference inputs"):
        LIDDetector(batch_size=100, reference_batches=2).fit(model, x[:N], adv)
    with pytest.raises(ValueError, match="adversarial has inputs of shape"):
        LIDDetector(k=5, batch_size=20).fit(model, x[:N], adv[:, :, :4])
    with pytest.raises(ValueError, match="unknown layer 'fc7'"):
        LIDDetector(k=5, batch_size=20, layers=["fc7"]).fit(model, x[:N], adv)
    with pytest.raises(ValueError, match="clean contains NaN"):
        bad = x[:N].clone()
        bad[3, 0, 0, 0] = float("nan")
        LIDDetector(k=5, batch_size=20).fit(model, bad, adv)
    with pytest.raises(TypeError, match="features_at"):
        LIDDetector().fit(torch.nn.Flatten(), x[:N], adv)


# ------------------------------------------------------------------------- Mahalanobis

@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_mahalanobis_matches_the_reference(setup64, noise):
    model, x, y, adv, noisy = setup64
    layers = ("stem", "block2", "features")
    det = MahalanobisDetector(layers=layers, noise=noise, C=2.0)
    # batches of 37: the streamed statistics must equal the all-at-once reference
    det.fit(model, x[200:500], y[200:500], adv, noisy, clean=x[:N], batch_size=37)
    gaussians = []
    for i, layer in enumerate(layers):
        with torch.no_grad():
            f = pooled(model, x[200:500], layer).numpy()
        means, precision = gaussian_reference(f, y[200:500].numpy(), 10)
        np.testing.assert_allclose(det.gaussians[i].means.numpy(), means, rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(det.gaussians[i].precision.numpy(), precision,
                                   rtol=1e-7, atol=1e-7 * np.abs(precision).max())
        gaussians.append((means, precision))
    queries = x[1000:1012]
    want = mahalanobis_layer_scores_reference(model, queries, layers, gaussians, noise)
    got = det.layer_scores(model, queries).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-7)
    feats = [mahalanobis_layer_scores_reference(model, part, layers, gaussians, noise)
             for part in (x[:N], noisy, adv)]
    labels = np.r_[np.zeros(2 * N), np.ones(N)]
    logit = logistic_reference(np.concatenate(feats), labels, C=2.0)
    np.testing.assert_allclose(det.score(model, queries, batch_size=5).numpy(),
                               -logit(want), rtol=1e-6, atol=1e-6)


def test_mahalanobis_is_differentiable_and_separates(setup64):
    model, x, y, adv, noisy = setup64
    det = MahalanobisDetector(noise=0.005, C=1.0).fit(model, x[200:500], y[200:500], adv,
                                                      noisy, clean=x[:N])
    assert det.layers == model.stage_layers
    xq = x[1000:1004].clone().requires_grad_(True)
    logits, s = det.score_inputs(model, xq)
    assert torch.equal(logits.detach(), model(x[1000:1004]))
    (grad,) = torch.autograd.grad(s.sum() + logits.sum(), xq)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():  # scoring under no_grad still pre-processes
        torch.testing.assert_close(det.score(model, x[1000:1004]), s.detach())
    clean_s = det.score(model, x[1000:1100], batch_size=64)
    far = (x[1000:1100] + 0.15 * torch.randn(100, 1, 8, 8, dtype=torch.float64).sign())
    adv_s = det.score(model, far.clamp(-0.5, 0.5), batch_size=64)
    assert clean_s.mean() > adv_s.mean()


def test_mahalanobis_save_load_and_bundle(setup64, tmp_path):
    model, x, y, adv, noisy = setup64
    det = MahalanobisDetector(layers=("block1", "features"), noise=0.01, C=1.0)
    det.fit(model, x[200:400], y[200:400], adv, noisy)
    det.fit_threshold(model, x[1000:1100], fpr=0.05)
    det.save(tmp_path / "m.pt")
    back = MahalanobisDetector.load(tmp_path / "m.pt")
    assert back.noise == 0.01 and back.layers == det.layers and back.num_classes == 10
    assert back.threshold == det.threshold
    torch.testing.assert_close(back.score(model, x[1100:1120]), det.score(model, x[1100:1120]),
                               rtol=0, atol=0)
    cal = det.score(model, x[1000:1100], batch_size=50)
    save_detector(tmp_path / "bundle.pt", det, cal, 0.05, model, meta={"note": "test"})
    f = load_detector(tmp_path / "bundle.pt")
    assert f.kind == "mahalanobis" and f.meta == {"note": "test"} and f.fpr == 0.05
    assert torch.equal(f.calibration_scores, cal.sort().values)
    assert f.threshold_for() == det.threshold
    assert f.threshold_for(0.1) == float(cal.sort().values[10])
    plain = load_detector(tmp_path / "m.pt")  # a detector's own file reads too
    assert plain.kind == "mahalanobis" and plain.calibration_scores is None
    with pytest.raises(ValueError, match="no calibration scores"):
        plain.threshold_for(0.1)


def test_mahalanobis_errors(setup64):
    model, x, y, adv, _ = setup64
    with pytest.raises(ValueError, match=r"classes \[3\] have none"):
        keep = y[:300] != 3
        MahalanobisDetector().fit(model, x[:300][keep], y[:300][keep], adv, num_classes=10)
    with pytest.raises(ValueError, match="noise must be a finite number >= 0"):
        MahalanobisDetector(noise=-1.0)
    with pytest.raises(ValueError, match="C must be"):
        MahalanobisDetector(C=0.0)
    with pytest.raises(ValueError, match="y must have shape"):
        MahalanobisDetector().fit(model, x[:300], y[:200], adv)
    with pytest.raises(TypeError, match="y must be an integer"):
        MahalanobisDetector().fit(model, x[:300], y[:300].double(), adv)
    with pytest.raises(RuntimeError, match="not fitted"):
        MahalanobisDetector().detect(model, x[:3])


def test_noisy_like_matches_the_adversarial_distortion():
    x, _ = digits_tensors()
    adv = (x[:50] + 0.05 * torch.randn(50, 1, 8, 8).sign()).clamp(-0.5, 0.5)
    noisy = noisy_like(x[:50], adv, seed=4, clip=(-10, 10))
    want = (adv - x[:50]).flatten(1).norm(dim=1)
    torch.testing.assert_close((noisy - x[:50]).flatten(1).norm(dim=1), want, rtol=1e-5,
                               atol=1e-6)
    assert torch.equal(noisy_like(x[:50], adv, seed=4, clip=(-10, 10)), noisy)
    assert noisy_like(x[:50], adv).abs().max() <= 0.5


@pytest.mark.parametrize("seed", [2 ** 32, 2 ** 63 - 2])
def test_detectors_fit_with_seeds_past_scikit_learns_range(setup64, seed):
    """Seeds are ints in [0, 2**63 - 1) everywhere; scikit-learn's random_state stops at
    2**32 - 1, so the cross-validation split gets a 32-bit word derived from the seed
    (before, such a seed passed the check and then crashed inside StratifiedKFold)."""
    model, x, y, adv, noisy = setup64
    lid = LIDDetector(k=5, batch_size=20, layers=("features", "logits"), seed=seed)
    lid.fit(model, x[:N], adv, noisy)
    again = LIDDetector(k=5, batch_size=20, layers=("features", "logits"), seed=seed)
    again.fit(model, x[:N], adv, noisy)
    assert lid.head.C == again.head.C
    assert torch.equal(lid.score(model, x[1000:1010]), again.score(model, x[1000:1010]))
    maha = MahalanobisDetector(layers=("features",), seed=seed)
    maha.fit(model, x[200:500], y[200:500], adv, noisy, clean=x[:N])
    assert torch.isfinite(maha.score(model, x[1000:1010])).all()


def test_sklearn_seed_keeps_small_seeds_and_maps_large_ones_deterministically():
    from rce_fast._args import sklearn_seed
    assert [sklearn_seed(s) for s in (0, 7, 2 ** 32 - 1)] == [0, 7, 2 ** 32 - 1]
    big = [sklearn_seed(s) for s in (2 ** 32, 2 ** 32 + 1, 2 ** 63 - 2)]
    assert all(0 <= b < 2 ** 32 for b in big) and len(set(big)) == 3
    assert big == [sklearn_seed(s) for s in (2 ** 32, 2 ** 32 + 1, 2 ** 63 - 2)]
