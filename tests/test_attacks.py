"""FGSM, BIM, ILCM, RAND against their direct formulas; C&W, C&W-hc, C&W-wb properties."""
import math

import pytest
import torch
import torch.nn.functional as F

import rce_fast
from rce_fast.attacks import bim, cw_l2, cw_wb, fgsm, ilcm, rand_noise
from tests.helpers import digits_mlp, digits_tensors
from tests.reference import cw_l2_reference


@pytest.fixture(scope="module")
def batch():
    x, y = digits_tensors()
    return x[1500:1540], y[1500:1540]


def _sign_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    return x.grad.sign()


# ------------------------------------------------------------------- gradient attacks

def test_fgsm_formula_sweep_and_info(batch):
    model = digits_mlp("rce")
    x, _ = batch
    pred = model(x).argmax(1)
    expected = (x + 0.1 * _sign_grad(model, x, pred)).clamp(-0.5, 0.5)
    adv, info = fgsm(model, x, 0.1, return_info=True)
    assert torch.equal(adv, expected)
    assert torch.equal(info.labels, pred)
    assert (info.linf <= 0.1 + 1e-6).all()
    assert torch.equal(info.success, model(adv).argmax(1) != pred)
    sweep = fgsm(model, x, [0.0, 0.05, 0.1])
    assert sweep.shape == (3, *x.shape)
    assert torch.equal(sweep[0], x) and torch.equal(sweep[2], expected)
    assert torch.equal(sweep[1], fgsm(model, x, 0.05))


def test_fgsm_with_true_labels(batch):
    model = digits_mlp("ce")
    x, y = batch
    expected = (x + 0.2 * _sign_grad(model, x, y)).clamp(-0.5, 0.5)
    assert torch.equal(fgsm(model, x, 0.2, labels=y), expected)


@pytest.mark.parametrize("project", [False, True])
def test_bim_formula(batch, project):
    model = digits_mlp("ce")
    x, _ = batch
    pred = model(x).argmax(1)
    eps, steps = 0.1, 10
    xa = x.clone()
    for _ in range(steps):
        xa = xa + eps / 10 * _sign_grad(model, xa, pred)
        if project:
            xa = torch.max(torch.min(xa, x + eps), x - eps)
        xa = xa.clamp(-0.5, 0.5)
    adv = bim(model, x, eps, steps=steps, project=project)
    torch.testing.assert_close(adv, xa, rtol=0, atol=1e-6)
    sweep = bim(model, x, [0.05, 0.1], steps=steps, project=project)
    torch.testing.assert_close(sweep[1], xa, rtol=0, atol=1e-6)
    torch.testing.assert_close(sweep[0], bim(model, x, 0.05, steps=steps, project=project),
                               rtol=0, atol=1e-6)


def test_ilcm_formula_and_target(batch):
    model = digits_mlp("rce")
    x, _ = batch
    target = model(x).argmin(1)
    xa = x.clone()
    for _ in range(10):
        xa = (xa - 0.2 / 10 * _sign_grad(model, xa, target)).clamp(-0.5, 0.5)
    adv, info = ilcm(model, x, 0.2, return_info=True)
    torch.testing.assert_close(adv, xa, rtol=0, atol=1e-6)
    assert torch.equal(info.target, target)
    assert torch.equal(info.success, model(adv).argmax(1) == target)


def test_attacks_hurt_accuracy_more_with_larger_eps(batch):
    model = digits_mlp("ce")
    x, y = batch
    accs = [(model(a).argmax(1) == y).float().mean().item()
            for a in bim(model, x, [0.0, 0.05, 0.2])]
    assert accs[0] > 0.8 and accs[2] < accs[1] <= accs[0]


def test_rand_noise(batch):
    x, _ = batch
    a = rand_noise(x, 0.04, seed=1)
    assert torch.equal(a, rand_noise(x, 0.04, seed=1))
    assert not torch.equal(a, rand_noise(x, 0.04, seed=2))
    assert ((a - x).abs() <= 0.04 + 1e-7).all() and a.min() >= -0.5 and a.max() <= 0.5
    noise = (a - x)[(x > -0.45) & (x < 0.45)]
    assert noise.abs().mean() > 0.015  # roughly uniform on [-eps, eps]: mean |u| = eps / 2
    sweep = rand_noise(x, [0.0, 0.04], seed=1)
    assert torch.equal(sweep[0], x) and torch.equal(sweep[1], a)


def test_gradient_attack_bad_inputs(batch):
    model = digits_mlp("ce")
    x, _ = batch
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, -0.1)
    with pytest.raises(ValueError, match="eps"):
        bim(model, x, [0.1, float("nan")])
    with pytest.raises(ValueError, match="eps sweep is empty"):
        fgsm(model, x, [])
    with pytest.raises(ValueError, match="steps"):
        bim(model, x, 0.1, steps=-1)
    with pytest.raises(ValueError, match="labels holds classes"):
        fgsm(model, x, 0.1, labels=torch.full((40,), 12))
    with pytest.raises(ValueError, match=r"labels must have shape \(40,\)"):
        fgsm(model, x, 0.1, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="decision logits"):
        fgsm(lambda t: t.sum(), x, 0.1)
    with pytest.raises(TypeError, match="x must be a floating"):
        rand_noise(x.long(), 0.1)


# ------------------------------------------------------------------------------ C&W

def test_cw_targeted_success_and_box(batch):
    model = digits_mlp("ce")
    x, _ = batch
    adv, info = cw_l2(model, x, target="random", binary_search_steps=4, max_iterations=300,
                      c_init=1.0, lr=0.05, return_info=True)
    assert info.success.float().mean() >= 0.95
    assert adv.min() >= -0.5 and adv.max() <= 0.5 and adv.dtype == x.dtype
    ok = info.success
    assert (model(adv[ok]).argmax(1) == info.target[ok]).all()
    l2 = (adv - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(l2[ok], info.l2[ok], rtol=1e-4, atol=1e-5)
    assert (info.target != model(x).argmax(1)).all()
    # failures keep the input unchanged
    assert torch.equal(adv[~ok], x[~ok])


def test_cw_untargeted_and_determinism(batch):
    model = digits_mlp("rce")
    x, _ = batch
    kw = dict(binary_search_steps=3, max_iterations=150, c_init=1.0, lr=0.05, return_info=True)
    a1, i1 = cw_l2(model, x, target="random", seed=3, **kw)
    a2, i2 = cw_l2(model, x, target="random", seed=3, **kw)
    assert torch.equal(a1, a2) and torch.equal(i1.target, i2.target)
    adv, info = cw_l2(model, x, **kw)
    pred = model(x).argmax(1)
    assert info.success.float().mean() > 0.9
    assert (model(adv[info.success]).argmax(1) != pred[info.success]).all()


@pytest.mark.parametrize("kappa", [0.0, 3.0])
def test_cw_matches_a_plain_autograd_implementation(batch, kappa):
    # One search step, no abort: the batched attack (hand-differentiated distance and tanh
    # box, fused Adam) must follow the same iterates as autograd over the whole loss.
    model = digits_mlp("ce")
    x, _ = batch
    target = (model(x).argmax(1) + 4) % 10
    ref, ref_l2 = cw_l2_reference(model, x, target, c=2.0, steps=150, kappa=kappa, lr=0.02)
    adv, info = cw_l2(model, x, target, kappa=kappa, c_init=2.0, binary_search_steps=1,
                      max_iterations=150, lr=0.02, abort_early=False, return_info=True)
    found = torch.isfinite(ref_l2)
    assert found.float().mean() > 0.5
    assert torch.equal(info.success, found)
    # float32 reassociation only (measured: at most 1.2e-5 after 150 steps)
    torch.testing.assert_close(adv, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(info.l2[found], ref_l2[found].sqrt(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("fallback", [False, True])
def test_attack_adam_matches_torch_optim_adam(monkeypatch, fallback):
    from rce_fast.attacks import cw as cw_module
    if fallback:  # a torch without the fused functional Adam: the optimizer object takes over
        def no_fused(*args, **kwargs):
            raise RuntimeError("fused Adam is not supported here")
        monkeypatch.setattr(cw_module, "_functional_adam", no_fused)
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(7, 33, generator=g)
    ours, ref_w = w0.clone(), w0.clone().requires_grad_(True)
    mine, ref = cw_module._Adam(ours, 0.05), torch.optim.Adam([ref_w], lr=0.05)
    for _ in range(20):
        grad = torch.randn(7, 33, generator=g)
        mine.step(grad.clone())
        ref_w.grad = grad.clone()
        ref.step()
    assert (mine.opt is not None) == fallback
    torch.testing.assert_close(ours, ref_w.detach(), rtol=1e-6, atol=1e-6)


def test_binary_search_beats_every_fixed_c_at_the_same_budget(batch):
    model = digits_mlp("ce")
    x, _ = batch
    target = (model(x).argmax(1) + 1) % 10
    searched = cw_l2(model, x, target, binary_search_steps=6, max_iterations=100, c_init=0.1,
                     lr=0.05, abort_early=False, return_info=True)[1]
    for c in (0.01, 0.1, 1.0, 10.0, 100.0):
        fixed = cw_l2(model, x, target, binary_search_steps=1, max_iterations=600, c_init=c,
                      lr=0.05, abort_early=False, return_info=True)[1]
        both = searched.success & fixed.success
        worse_success = fixed.success.float().mean() < searched.success.float().mean()
        larger_l2 = fixed.l2[both].mean() > searched.l2[both].mean()
        assert worse_success or larger_l2, f"fixed c = {c} is as good as the search"


def test_kappa_raises_the_logit_margin(batch):
    model = digits_mlp("ce")
    x, _ = batch
    target = (model(x).argmax(1) + 2) % 10
    kw = dict(binary_search_steps=4, max_iterations=200, c_init=1.0, lr=0.05, return_info=True)
    adv0, i0 = cw_l2(model, x, target, kappa=0.0, **kw)
    adv5, i5 = cw_l2(model, x, target, kappa=5.0, **kw)

    def margin(a):
        z = model(a)
        return z.gather(1, target[:, None]).squeeze(1) - z.scatter(
            1, target[:, None], float("-inf")).amax(1)

    m0, m5 = margin(adv0)[i0.success], margin(adv5)[i5.success]
    assert i5.success.float().mean() > 0.8
    assert (m5 >= 5.0 - 1e-3).all() and m5.mean() > m0.mean() + 3
    assert i5.l2[i5.success].mean() > i0.l2[i0.success & i5.success].mean()


def test_abort_early_changes_nothing_it_should_not(batch):
    model = digits_mlp("ce")
    x, _ = batch
    target = (model(x).argmax(1) + 3) % 10
    kw = dict(binary_search_steps=3, max_iterations=400, c_init=1.0, lr=0.05,
              return_info=True)
    _, full = cw_l2(model, x, target, abort_early=False, **kw)
    _, early = cw_l2(model, x, target, abort_early=True, **kw)
    assert torch.equal(full.success, early.success)
    both = full.success
    assert early.l2[both].mean() <= full.l2[both].mean() * 1.1


def test_cw_bad_inputs(batch):
    model = digits_mlp("ce")
    x, _ = batch
    with pytest.raises(ValueError, match="kappa"):
        cw_l2(model, x, kappa=-1)
    with pytest.raises(ValueError, match="c_init"):
        cw_l2(model, x, c_init=0)
    with pytest.raises(ValueError, match="max_iterations"):
        cw_l2(model, x, max_iterations=0)
    with pytest.raises(ValueError, match="target holds classes"):
        cw_l2(model, x, torch.full((40,), -1))
    with pytest.raises(ValueError, match="clip"):
        cw_l2(model, x, clip=(1, 1))


# ---------------------------------------------------------------------------- C&W-wb

@pytest.fixture(scope="module")
def rce_detector():
    model = digits_mlp("rce")
    x, y = digits_tensors()
    with torch.no_grad():
        feats = model.features(x[:1500])
    det = rce_fast.KDensityDetector(objective="rce", per_class=100, seed=0,
                                    sigma2=float(feats.var(0).sum()) / 4)
    det.fit(feats, y[:1500])
    det.class_medians(feats, y[:1500], kernel_points=50)
    return model, det


def test_cw_wb_lowers_f2_compared_with_plain_cw(batch, rce_detector):
    model, det = rce_detector
    x, _ = batch
    x = x[:20]
    target = (model(x).argmax(1) + 4) % 10
    # This small RCE model's decision logits span ~1.5, so a margin the box allows:
    kappa = 0.5
    plain, plain_info = cw_l2(model, x, target, kappa=kappa, binary_search_steps=3,
                              max_iterations=200, c_init=10.0, lr=0.05, return_info=True)
    adv, info = cw_wb(model, x, target, det, kappa=kappa, lr=0.05,
                      stage1={"max_iterations": 200, "c_init": 10.0, "binary_search_steps": 3},
                      stage2={"max_iterations": 200, "c_init": 10.0, "binary_search_steps": 3},
                      return_info=True)
    assert plain_info.success.float().mean() > 0.8
    assert info.classified_as_target.float().mean() > 0.8
    from rce_fast.detect import QueryPlan, kdensity_planned

    def f2(a):
        feats = model.features(a)
        plan = QueryPlan(target, det.median_index)
        return det.medians[target] - kdensity_planned(feats, plan, det.median_index, det.sigma2)

    f2_plain, f2_wb = f2(plain).detach(), f2(adv).detach()
    torch.testing.assert_close(info.f2, f2_wb, rtol=1e-4, atol=1e-4)
    assert f2_wb.mean() < f2_plain.mean()
    assert info.f2_positive_ratio <= float((f2_plain > 0).float().mean())
    assert info.f2_positive_ratio == pytest.approx(float((f2_wb > 0).float().mean()))
    on = info.classified_as_target
    assert info.f2_positive_ratio_on_target == pytest.approx(
        float((f2_wb[on] > 0).float().mean()))
    assert torch.equal(info.success, info.classified_as_target & (info.f2 <= 0))


def test_cw_wb_table3_ratio_counts_only_the_examples_on_target(batch, rce_detector):
    """At budgets too short for every input, the paper's ratio is taken among the inputs
    moved to the target class (x*): failed attacks keep f2 > 0 and would inflate it. With
    none on target it is NaN (undefined), while the ratio over all inputs is 1."""
    model, det = rce_detector
    x, _ = batch
    x = x[:40]
    target = (model(x).argmax(1) + 4) % 10
    for iterations, some in ((30, True), (3, False)):
        stage = {"max_iterations": iterations, "c_init": 1.0, "binary_search_steps": 1}
        _, info = cw_wb(model, x, target, det, kappa=0.5, lr=0.05, stage1=stage,
                        stage2=stage, return_info=True)
        on, positive = info.classified_as_target, info.f2 > 0
        assert info.f2_positive_ratio == pytest.approx(float(positive.float().mean()))
        if some:
            assert 0 < int(on.sum()) < len(x)          # some, not all, reached the target
            assert info.f2_positive_ratio_on_target == pytest.approx(
                float(positive[on].float().mean()))
            assert info.f2_positive_ratio_on_target < info.f2_positive_ratio
        else:
            assert not on.any() and math.isnan(info.f2_positive_ratio_on_target)
            assert info.f2_positive_ratio == 1.0


def test_cw_wb_needs_medians_and_features(batch, rce_detector):
    model, det = rce_detector
    x, _ = batch
    fresh = rce_fast.KDensityDetector(per_class=10).fit(det.bank, det.bank_labels)
    with pytest.raises(ValueError, match="class_medians"):
        cw_wb(model, x[:2], "random", fresh)
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(TypeError, match="logits_and_features"):
        cw_wb(plain, x[:2], "random", det, stage1=False,
              stage2={"max_iterations": 2, "binary_search_steps": 1})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)
def test_finite_check_sees_every_nan_and_inf(dtype):
    from rce_fast._torch_impl import all_finite
    x = torch.rand(6, 1, 5, 5).to(dtype) - 0.5
    assert all_finite(x) and all_finite(x[:, :, ::2]) and all_finite(x[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for pos in ((0, 0, 0, 0), (3, 0, 2, 4), (5, 0, 4, 4)):
            y = x.clone()
            y[pos] = bad
            assert not all_finite(y), (bad, pos)
            with pytest.raises(ValueError, match="NaN or inf"):
                fgsm(torch.nn.Flatten(), y, 0.1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_cw_runs_on_models_of_another_dtype(batch, rce_detector, dtype):
    """C&W searches in float32 but feeds the model its iterates in x's dtype, so a float64
    or bf16 model (with x of its dtype) is attacked, as by every other attack. float64:
    the same successes as the float32 model; every success is one for the model that was
    attacked (in its own dtype)."""
    import copy
    model32, det32 = rce_detector
    model = copy.deepcopy(model32).to(dtype)
    x = batch[0][:12]
    target = (model32(x).argmax(1) + 3) % 10
    kw = dict(binary_search_steps=3, max_iterations=60, c_init=1.0)
    adv, info = cw_l2(model, x.to(dtype), target, return_info=True, **kw)
    assert adv.dtype == dtype and bool(info.success.any())
    with torch.no_grad():
        hit = model(adv).argmax(1) == target
    assert bool(hit[info.success].all())
    # info.l2 is the norm of the perturbation as returned (in x's dtype), not of the
    # float32 iterate the search measured
    norm = (adv.double() - x.to(dtype).double()).flatten(1).norm(dim=1).float()
    torch.testing.assert_close(info.l2[info.success], norm[info.success], rtol=1e-6, atol=0)
    assert torch.isinf(info.l2[~info.success]).all()
    if dtype == torch.float64:
        _, info32 = cw_l2(model32, x, target, return_info=True, **kw)
        assert int((info.success != info32.success).sum()) <= 1
    with torch.no_grad():
        feats = model.features(digits_tensors()[0][:1500].to(dtype))
    det = rce_fast.KDensityDetector(objective="rce", per_class=100, seed=0,
                                    sigma2=det32.sigma2).fit(feats, digits_tensors()[1][:1500])
    det.class_medians(feats, digits_tensors()[1][:1500], kernel_points=50)
    stages = dict(stage1=dict(max_iterations=30, c_init=10.0, binary_search_steps=1),
                  stage2=dict(max_iterations=30, c_init=100.0, binary_search_steps=1))
    adv, info = cw_wb(model, x.to(dtype), target, det, return_info=True, **stages)
    assert adv.dtype == dtype and info.f2.isfinite().all()
    norm = (adv.double() - x.to(dtype).double()).flatten(1).norm(dim=1).float()
    torch.testing.assert_close(info.l2, norm, rtol=1e-6, atol=0)
