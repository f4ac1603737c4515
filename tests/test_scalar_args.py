"""Numbers given as 0-d tensors, 0-d NumPy arrays and NumPy scalars are taken as the Python
numbers they hold (a config or a sweep often produces them), with the same result; a bool
is still refused. Also C&W's success rule on a tie and the targets that need 2 classes."""
import math

import numpy as np
import pytest
import torch

import rce_fast
from rce_fast import attacks as A
from rce_fast.attacks.cw import _reached
from rce_fast.detect import rates
from rce_fast.detect._logreg import fit_logistic
from tests.helpers import digits_mlp, digits_tensors


@pytest.fixture(scope="module")
def setup():
    x, y = digits_tensors()
    return digits_mlp("rce"), x[1500:1516], y[1500:1516]


def _forms(v):
    """Forms holding exactly the float ``v`` (a float32 tensor holds another number:
    ``test_a_float32_tensor_gives_the_number_it_holds``)."""
    return [np.float64(v), np.array(v), torch.tensor(v, dtype=torch.float64)]


def test_attack_numbers_as_0d_arrays_and_tensors(setup):
    model, x, y = setup
    want_fgsm = A.fgsm(model, x, 0.1)
    want_bim = A.bim(model, x, 0.1, steps=3, step_size=0.04)
    want_pgd = A.pgd(model, x, 0.1, steps=3, step_size=0.04, seed=1)
    want_noise = A.rand_noise(x, 0.1, seed=2)
    for v in _forms(0.1):
        assert torch.equal(A.fgsm(model, x, v), want_fgsm)
        assert torch.equal(A.bim(model, x, v, steps=3, step_size=v * 0.4), want_bim)
        assert torch.equal(A.pgd(model, x, v, steps=np.int64(3), step_size=v * 0.4,
                                 seed=np.array(1)), want_pgd)
        assert torch.equal(A.rand_noise(x, v, seed=torch.tensor(2)), want_noise)
    with pytest.raises(TypeError, match="eps"):
        A.pgd(model, x, torch.tensor(True), steps=1)
    with pytest.raises(TypeError, match="seed"):
        A.pgd(model, x, 0.1, steps=1, seed=np.array(True))
    with pytest.raises(TypeError, match="eps must be a number, got Tensor"):
        A.pgd(model, x, torch.tensor([0.1, 0.2]), steps=1)  # not a 0-d value


def test_a_float32_tensor_gives_the_number_it_holds(setup):
    model, x, _ = setup
    eps = torch.tensor(0.1)  # 0.100000001490116...
    assert torch.equal(A.bim(model, x, eps, steps=3), A.bim(model, x, float(eps), steps=3))


def test_rates_and_logistic_numbers_as_0d_arrays():
    g = np.random.default_rng(0)
    clean, adv = g.normal(1.0, 1.0, 200), g.normal(-1.0, 1.0, 200)
    want_t = rates.threshold_at_fpr(clean, 0.05)
    want_m = rates.detection_metrics(clean, adv, fprs=0.05)
    for v in _forms(0.05):
        assert rates.threshold_at_fpr(clean, v) == want_t
        assert rates.detection_metrics(clean, adv, fprs=v) == want_m
    feats = np.concatenate([clean, adv])[:, None]
    labels = np.r_[np.zeros(200), np.ones(200)]
    want = fit_logistic(feats, labels, C=0.5)
    for v in _forms(0.5):
        got = fit_logistic(feats, labels, C=v)
        assert got["C"] == 0.5 and np.array_equal(got["coef"], want["coef"])


def test_loss_and_detector_numbers_as_0d_arrays():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(9, 5, generator=g), torch.randint(0, 5, (9,), generator=g)
    y[4] = -100
    want = rce_fast.rce_loss(z, y, temperature=2.0)
    for t in _forms(2.0):
        assert torch.equal(rce_fast.rce_loss(z, y, temperature=t,
                                             ignore_index=np.array(-100)), want)
    det = rce_fast.KDensityDetector(sigma2=np.array(0.2), per_class=np.int64(50),
                                    seed=torch.tensor(3))
    assert (det.sigma2, det.per_class, det.seed) == (0.2, 50, 3)
    assert type(det.per_class) is int and type(det.seed) is int
    with pytest.raises(ValueError, match="per_class"):
        rce_fast.KDensityDetector(per_class=np.array(True))
    with pytest.raises(TypeError, match="temperature must be a positive float, got Tensor"):
        rce_fast.rce_loss(z, y, temperature=torch.tensor(2.0, device="meta"))


def test_configs_store_plain_numbers():
    """A 0-d tensor or NumPy number in a config is stored as the Python number it holds,
    so the config is JSON-serialisable and the training seed reaches torch.manual_seed as
    an int (before: a RuntimeError deep inside training)."""
    import dataclasses
    import json

    from rce_fast.resume import Budget
    from rce_fast.train import TrainConfig
    cfg = TrainConfig(model="resnet8", steps=np.int64(3), batch_size=torch.tensor(8),
                      seed=torch.tensor(3), momentum=np.float64(0.5),
                      lr_values=np.array([0.1, 0.01]), lr_boundaries=[np.int64(2)])
    assert (cfg.steps, cfg.batch_size, cfg.seed, cfg.momentum) == (3, 8, 3, 0.5)
    assert cfg.lr_values == [0.1, 0.01] and cfg.lr_boundaries == [2]
    json.dumps(dataclasses.asdict(cfg))
    assert type(cfg.seed) is int and type(cfg.steps) is int
    budget = Budget(np.float64(5.0), max_chunk=np.int64(4), stop_after=torch.tensor(2))
    assert (budget.seconds, budget.max_chunk, budget.stop_after) == (5.0, 4, 2)
    with pytest.raises(ValueError, match="seconds"):
        Budget(True)
    x, y = digits_tensors()
    from rce_fast.train import train
    model, _ = train(dataclasses.replace(cfg, progress=False), x[:64], y[:64],
                     num_classes=np.int64(10))
    assert model(x[:2]).shape == (2, 10)


def test_ilcm_needs_two_classes():
    """ILCM targets the least-likely class, which must be another class than the
    prediction: a 1-class model reported success with no distortion."""
    with pytest.raises(ValueError, match="at least 2 classes"):
        A.ilcm(_OneClass(), torch.zeros(2, 1, 8, 8), 0.1, steps=1)


def test_jsma_pairs_takes_a_numpy_bool():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    d = torch.ones(3, 8, dtype=torch.bool)
    for inc in (True, False):
        assert torch.equal(A.jsma_pairs(a, b, d, np.bool_(inc)), A.jsma_pairs(a, b, d, inc))


def test_cw_success_needs_the_target_to_be_the_unique_arg_max():
    """m = margin + kappa. At kappa 0 a tie (margin 0) is no success, any margin below 0 is;
    at kappa > 0 the margin must reach -kappa."""
    m = torch.tensor([0.0, -1e-7, 1e-7, -0.5, -0.4])
    assert _reached(m, 0.0).tolist() == [False, True, False, True, True]
    margin = torch.tensor([0.0, -0.5, -0.4, -0.6])
    assert _reached(margin + 0.5, 0.5).tolist() == [False, True, False, True]


class _OneClass(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :1]


@pytest.mark.parametrize("target", ["least_likely", "random"])
def test_string_targets_need_two_classes(target):
    """A 1-class model has no class other than its prediction: 'least_likely' returned the
    prediction itself, so a targeted attack 'succeeded' with no distortion."""
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=rf"target='{target}' needs a model with at least 2 "):
        A.cw_l2(_OneClass(), x, target, max_iterations=1, binary_search_steps=1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        A.pgd(_OneClass(), x, 0.1, steps=1, target=target)


def test_threshold_for_nan_fpr_is_refused():
    with pytest.raises(ValueError, match="fpr must be in"):
        rates.threshold_at_fpr(np.ones(4), np.array(math.nan))


def test_a_number_that_requires_grad_is_refused():
    """A 0-d tensor that requires grad would be used as a constant (no gradient reaches
    it): refused rather than silently not learned."""
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    t = torch.nn.Parameter(torch.tensor(2.0))
    with pytest.raises(TypeError, match="requires grad would be used as a constant"):
        rce_fast.rce_loss(z, y, temperature=t)
    with pytest.raises(TypeError, match="eps must hold numbers"):
        A.fgsm(torch.nn.Flatten(), torch.zeros(2, 3), torch.tensor(0.1, device="meta"))
    assert rce_fast.RCELoss(ignore_index=np.array(-1)).ignore_index == -1


def test_settings_compare_equal_whatever_number_type():
    """Saved and current run settings compare by value: a NumPy or 0-d tensor number
    equals the Python number (a run state saved with a NumPy seed resumes)."""
    from rce_fast.resume import settings_diff
    saved = {"seed": np.int64(3), "eps": 0.25, "n": 300}
    now = {"seed": 3, "eps": torch.tensor(0.25, dtype=torch.float64), "n": np.int64(300)}
    assert settings_diff(saved, now) == []
    assert settings_diff({"seed": 3}, {"seed": 4}) == ["seed: 3 before, 4 now"]


def test_train_config_checks_the_losss_temperature_range():
    from rce_fast.train import TrainConfig
    for t in (1e-40, 1e39):
        with pytest.raises(ValueError, match="temperature must be in"):
            TrainConfig(temperature=t)


def test_budget_checks_every_number():
    from rce_fast.resume import Budget
    cases = [(dict(safety="2"), TypeError, "safety must be a number"),
             (dict(chunk_seconds=math.nan), ValueError, "chunk_seconds must be finite"),
             (dict(reserve=-5.0), ValueError, "reserve must be >= 0"),
             (dict(reserve=math.nan), ValueError, "reserve must be finite"),
             (dict(spent=math.nan), ValueError, "spent must be finite"),
             (dict(safety=0.5), ValueError, "safety must be >= 1")]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            Budget(60.0, **kwargs)
    assert Budget(60.0, reserve=np.float64(2.0)).reserve == 2.0
