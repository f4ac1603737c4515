"""Every attack (and every detector, fitting or scoring, and the test error) leaves the
user's model exactly as it found it: parameters, buffers (batch norm running statistics)
and each module's train/eval flag, even when the model arrives in train mode; and it
reads the model as evaluated (eval mode) either way."""
import copy

import pytest
import torch

import rce_fast
from rce_fast import attacks as A
from rce_fast.detect import GuardedClassifier
from rce_fast.models import Classifier, ResNet
from tests.helpers import digits_tensors


def _bn_model():
    torch.manual_seed(0)
    net = ResNet(1, in_channels=1, num_classes=10, widths=(4, 8, 8))
    model = Classifier(net, "rce")
    with torch.no_grad():  # non-trivial running statistics
        model.train()
        for _ in range(3):
            model(digits_tensors()[0][:64])
    return model


def _detector(model):
    x, y = digits_tensors()
    with torch.no_grad(), A._common.model_in_eval_mode(model):
        feats = model.features(x[:300])
    det = rce_fast.KDensityDetector(objective="rce", per_class=20).fit(feats, y[:300])
    det.class_medians(feats, y[:300], kernel_points=10)
    det.fit_threshold(feats[:100], y[:100], fpr=0.1)
    return det


ATTACKS = {
    "fgsm": lambda m, x, d: A.fgsm(m, x, 0.1),
    "bim": lambda m, x, d: A.bim(m, x, 0.1, steps=2),
    "ilcm": lambda m, x, d: A.ilcm(m, x, 0.1, steps=2),
    "jsma": lambda m, x, d: A.jsma(m, x, max_iterations=2),
    "cw_l2": lambda m, x, d: A.cw_l2(m, x, "random", binary_search_steps=1,
                                     max_iterations=3),
    "cw_wb": lambda m, x, d: A.cw_wb(m, x, "random", d, stage1=dict(max_iterations=2,
                                     binary_search_steps=1), stage2=dict(
                                         max_iterations=2, binary_search_steps=1)),
    "pgd": lambda m, x, d: A.pgd(m, x, 0.1, steps=2),
    "pgd_guarded": lambda m, x, d: A.pgd(GuardedClassifier(m, d, d.threshold), x, 0.1,
                                         steps=2),
    "orthogonal_pgd": lambda m, x, d: A.orthogonal_pgd(GuardedClassifier(m, d, d.threshold),
                                                       x, 0.1, steps=2),
}


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_leaves_the_model_as_it_found_it(name, mode):
    model = _bn_model()
    det = _detector(model)
    x = digits_tensors()[0][:6]
    model.train(mode == "train")
    if mode == "mixed":
        model.net.blocks[0].train(True)  # one submodule in train mode, the rest in eval
    flags = {n: m.training for n, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad for p in model.parameters()]
    adv = ATTACKS[name](model, x, det)
    adv = adv[0] if isinstance(adv, tuple) else adv
    assert {n: m.training for n, m in model.named_modules()} == flags
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "parameters or buffers changed"
    assert [p.grad for p in model.parameters()] == grads
    # the attack saw the model as evaluated: the same result from an eval-mode copy
    ref_model = copy.deepcopy(model).eval()
    ref = ATTACKS[name](ref_model, x, det)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(adv, ref)


def _layer_detectors(model):
    from rce_fast.detect import LIDDetector, MahalanobisDetector
    x, y = digits_tensors()
    noisy = (x[:40] + 0.05 * torch.randn(x[:40].shape, generator=torch.Generator()
                                         .manual_seed(0))).clamp(-0.5, 0.5)
    adv = (x[:40] + 0.2 * torch.sign(torch.randn(x[:40].shape, generator=torch.Generator()
                                                 .manual_seed(1)))).clamp(-0.5, 0.5)
    lid = LIDDetector(k=5, batch_size=20).fit(model, x[:40], adv, noisy)
    maha = MahalanobisDetector().fit(model, x[:200], y[:200], adv[:20], noisy[:20],
                                     clean=x[:20])
    return lid, maha


def _scorers():
    from rce_fast.detect import evaluate_detectors, score_dataset
    from rce_fast.train import evaluate_error
    xs, ys = digits_tensors()
    held, clean, yc = xs[300:340], xs[340:360], ys[340:360]
    return {
        "score_dataset_kdensity": lambda m, d: score_dataset(m, d["kd"], clean),
        "score_dataset_confidence": lambda m, d: score_dataset(m, "confidence", clean),
        "evaluate_detectors": lambda m, d: evaluate_detectors(
            m, {"kd": d["kd"], "non-ME": "non-ME"}, held, clean, yc, clean + 0.01),
        "lid_fit": lambda m, d: torch.cat([r.flatten()
                                            for r in _layer_detectors(m)[0].references]),
        "mahalanobis_fit": lambda m, d: _layer_detectors(m)[1].gaussians[0].means,
        "lid_score": lambda m, d: d["lid"].score(m, clean),
        "lid_fit_threshold": lambda m, d: d["lid"].fit_threshold(m, held),
        "mahalanobis_score": lambda m, d: d["maha"].score(m, clean, batch_size=7),
        "guarded_kdensity": lambda m, d: GuardedClassifier(m, d["kd"])(clean),
        "guarded_lid": lambda m, d: GuardedClassifier(m, d["lid"], 0.0)(clean),
        "evaluate_error": lambda m, d: evaluate_error(m, clean, yc, batch_size=6),
    }


SCORERS = _scorers()


@pytest.mark.parametrize("mode", ["train", "mixed"])
@pytest.mark.parametrize("name", list(SCORERS))
def test_scoring_runs_the_model_in_eval_mode_and_leaves_it_alone(name, mode):
    """Detectors, their fitting and the test error read a model that arrives in train
    mode as evaluated (running statistics), and leave its flags and buffers alone."""
    model = _bn_model()
    lid, maha = _layer_detectors(model.eval())
    dets = {"kd": _detector(model), "lid": lid, "maha": maha}
    model.train(mode == "train")
    if mode == "mixed":
        model.net.blocks[0].train(True)
    flags = {n: m.training for n, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    got = SCORERS[name](model, dets)
    assert {n: m.training for n, m in model.named_modules()} == flags
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "parameters or buffers changed"
    ref = SCORERS[name](copy.deepcopy(model).eval(), dets)
    torch.testing.assert_close(got, ref)
