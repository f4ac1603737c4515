"""Adaptive attacks and baseline detectors (issue 13).

Time per adversarial example of ``pgd`` (on the classifier, and on the
GuardedClassifier with K-density) and ``orthogonal_pgd``, next to:
- torchattacks' PGD on the same model (and on the same GuardedClassifier) at the same
  steps, no random start;
- the "model floor": the same number of forward + input-gradient passes of the model
  attacked and nothing else;
- for Orthogonal PGD, the same algorithm written the way the authors' release is (two
  ``.backward()`` passes, gradients and decisions copied to the host each step, a Python
  loop over inputs for the kept example: tests/reference_detection.py).

Detector scoring throughput (inputs per second) of LIDDetector and
MahalanobisDetector against the research-script way of computing the same scores
(activations to NumPy, scipy cdist and full sorts for LID; per-class B x B Gram
matrices for Mahalanobis, as the authors' code does), on an untrained ResNet-8 at
28 x 28 (throughput does not depend on training). Results are checked against the
baselines.

Model: the 784-256-10 MLP on CPU, ResNet-32 on GPU (``--bench-model`` to change).
"""
import pytest
import torch

import rce_fast
from benchmarks.conftest import DEVICE, HAS_CUDA
from benchmarks.models import mnist_sized_data, mnist_sized_model
from rce_fast.attacks import orthogonal_pgd, pgd
from rce_fast.detect import (GuardedClassifier, LIDDetector, MahalanobisDetector,
                             threshold_at_fpr)
from rce_fast.models import Classifier, build_model
from tests.reference_detection import (lid_scores_script, mahalanobis_scores_script,
                                       orthogonal_pgd_reference)

N = 100
STEPS = 20
EPS = 0.1
ALPHA = 0.01
_CACHE = {}


def _setting(request):
    kind = request.config.getoption("--bench-model") or ("resnet32" if HAS_CUDA else "mlp")
    if kind not in _CACHE:
        model = mnist_sized_model(kind, "rce", device=DEVICE)
        x_tr, y_tr, x_te, y_te, name = mnist_sized_data()
        with torch.no_grad():
            feats = torch.cat([model.features(b.to(DEVICE)) for b in x_tr[:5000].split(500)])
            z, f = model.logits_and_features(x_te[N:N + 500].to(DEVICE))
        det = rce_fast.KDensityDetector(objective="rce", per_class=1000, seed=0)
        det.fit(feats, y_tr[:5000].to(DEVICE))
        thr = threshold_at_fpr(det.score(f, z.argmax(1)), 0.05)
        _CACHE[kind] = (model, GuardedClassifier(model, det, thr), x_te[:N].to(DEVICE),
                        y_te[:N].to(DEVICE), f"{kind} {name}")
    return _CACHE[kind]


class _ZeroOne(torch.nn.Module):
    """torchattacks wants inputs in [0, 1]; ours live in [-0.5, 0.5]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z):
        return self.model(z - 0.5)


def _floor(model, x, passes):
    with torch.no_grad():
        gz = torch.ones_like(model(x))

    def run():
        for _ in range(passes):
            xl = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(model(xl), xl, gz)
        return g
    return run


@pytest.mark.parametrize("impl", ["rce_fast", "torchattacks", "model floor"])
@pytest.mark.parametrize("target", ["classifier", "guarded K-density"])
def test_pgd_time_per_example(record, request, target, impl):
    model, guarded, x, y, name = _setting(request)
    attacked = model if target == "classifier" else guarded
    if impl == "rce_fast":
        def fn():
            return pgd(attacked, x, EPS, steps=STEPS, step_size=ALPHA, random_start=False,
                       labels=y)
    elif impl == "model floor":
        fn = _floor(attacked, x, STEPS + 2)  # + the clean and the final forward
    else:
        ta = pytest.importorskip("torchattacks")
        atk = ta.PGD(_ZeroOne(attacked), eps=EPS, alpha=ALPHA, steps=STEPS,
                     random_start=False)

        def fn():
            return atk(x + 0.5, y) - 0.5
    case = f"PGD {STEPS} steps on {target}, {name}"
    out = record(case, impl, fn, rounds=3, per_image_of=N)
    assert out.shape == x.shape


@pytest.mark.parametrize("impl", ["rce_fast", "authors' structure", "model floor"])
def test_orthogonal_pgd_time_per_example(record, request, impl):
    _, guarded, x, y, name = _setting(request)
    if impl == "rce_fast":
        def fn():
            return orthogonal_pgd(guarded, x, EPS, steps=STEPS, step_size=ALPHA, labels=y)
    elif impl == "model floor":
        # one forward and two input-gradient passes per step
        def fn():
            for _ in range(STEPS):
                xl = x.detach().requires_grad_(True)
                z, s = guarded.logits_and_score(xl)
                torch.autograd.grad(z.sum(), xl, retain_graph=True)
                torch.autograd.grad(s.sum(), xl)
            return xl
    else:
        def fn():
            return orthogonal_pgd_reference(guarded, x, y, EPS, STEPS, ALPHA)
    out = record(f"Orthogonal PGD {STEPS} steps, {name}", impl, fn, rounds=3,
                 per_image_of=N)
    assert out.shape == x.shape


# ------------------------------------------------------------------ detector throughput

SCORE_N = 1000


def _detectors():
    if "detectors" not in _CACHE:
        torch.manual_seed(0)
        model = Classifier(build_model("resnet8", 1), "ce").to(DEVICE).eval()
        _, _, x_te, _, _ = mnist_sized_data()
        x_tr, y_tr, _, _, _ = mnist_sized_data()
        x = x_tr[:400].to(DEVICE)
        g = torch.Generator(device=DEVICE).manual_seed(1)
        adv = (x + 0.1 * torch.randn(x.shape, generator=g, device=DEVICE).sign()).clamp(
            -0.5, 0.5)
        lid = LIDDetector(k=20, batch_size=100, C=1.0).fit(model, x, adv)
        maha = MahalanobisDetector(C=1.0).fit(model, x, y_tr[:400].to(DEVICE), adv)
        _CACHE["detectors"] = (model, lid, maha, x_te[:SCORE_N].to(DEVICE))
    return _CACHE["detectors"]


@pytest.mark.parametrize("impl", ["rce_fast", "research-script style"])
@pytest.mark.parametrize("kind", ["LID", "Mahalanobis"])
def test_detector_scoring_throughput(record, kind, impl):
    model, lid, maha, x = _detectors()
    det = lid if kind == "LID" else maha
    if impl == "rce_fast":
        def fn():
            return det.score(model, x, batch_size=500)
    else:
        script = lid_scores_script if kind == "LID" else mahalanobis_scores_script

        def fn():
            return torch.as_tensor(script(model, x, det))
    out = record(f"{kind} scoring {SCORE_N} x 28x28, ResNet-8", impl, fn, rounds=3,
                 per_image_of=SCORE_N)
    ours = det.score(model, x[:200], batch_size=100).cpu().double()
    torch.testing.assert_close(out[:200].cpu().double(), ours, rtol=1e-4, atol=1e-4)
