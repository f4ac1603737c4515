"""Every attack leaves the user's model exactly as it found it: parameters, buffers (batch
norm running statistics) and each module's train/eval flag, even when the model arrives
in train mode; and it attacks the model as evaluated (eval mode) either way."""
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
