"""Attack time costs: the paper's appendix Table 1 in miniature, and torchattacks baselines.

Time per adversarial example of FGSM, BIM, ILCM, JSMA, C&W, C&W-hc and C&W-wb on a CE
and an RCE model (MNIST-sized: real MNIST when present, digits upsampled otherwise),
with the paper's P100 seconds per example as a reference column. Small budgets by
default; ``--paper-settings`` runs the paper's (9 x 10,000 C&W steps, 100 JSMA
iterations, two-stage C&W-wb). ``--bench-model`` picks the network (default: a
784-256-10 MLP on CPU, ResNet-32 on GPU).

Against torchattacks (installed --no-deps) on the same model and inputs: FGSM and BIM
(target on CPU: no slower) and CW at the same number of optimisation steps, with no
speed target: on CPU the model's own cost dominates C&W. Beside them, the "model
floor": the same number of model forward + input-gradient passes and nothing else, the
time no implementation can beat; the summary reports C&W's time as a multiple of it
(the step after the model's gradient is one fused C++ pass on CPU: Adam, the tanh box,
best tracking, the next iterate; see csrc/cw_cpu.cpp). ``test_cw_update_step`` times
that pass against the same maths as tensor ops (the GPU path) on the benchmark's batch.
"""
import pytest
import torch

import rce_fast
from benchmarks.conftest import DEVICE, HAS_CUDA, set_target
from benchmarks.models import mnist_sized_data, mnist_sized_model
from rce_fast.attacks import bim, cw_l2, cw_wb, fgsm, ilcm, jsma

# Appendix Table 1 (P100, ResNet-32, mean of MNIST and CIFAR-10), seconds per example.
PAPER_SECONDS = {
    ("FGSM", "ce"): 1.9e-3, ("FGSM", "rce"): 2.4e-3, ("BIM", "ce"): 3.3e-3,
    ("BIM", "rce"): 3.6e-3, ("ILCM", "ce"): 4.1e-3, ("ILCM", "rce"): 4.3e-3,
    ("JSMA", "ce"): 29.0, ("JSMA", "rce"): 20.0, ("C&W", "ce"): 45.0, ("C&W", "rce"): 55.0,
    ("C&W-hc", "ce"): 65.0, ("C&W-hc", "rce"): 110.0, ("C&W-wb", "ce"): 700.0,
    ("C&W-wb", "rce"): 1300.0,
}
# The budgets behind those seconds (NOTES section 4: the paper and its release).
PAPER_BUDGET = {
    "FGSM": "1 step", "BIM": "10 steps", "ILCM": "10 steps",
    "JSMA": "at most 100 iterations", "C&W": "9 x 10,000 steps",
    "C&W-hc": "9 x 10,000 steps, kappa 10",
    "C&W-wb": "3 x 5,000 then 9 x 10,000 steps",
}
PAPER_SETTING = "ResNet-32 on a P100, mean of MNIST and CIFAR-10"


def _budget(attack, setting):
    """The budget this run gives ``attack``, in the words of PAPER_BUDGET."""
    cw, wb = setting["cw"], setting["wb"]
    if attack in ("FGSM", "BIM", "ILCM"):
        return PAPER_BUDGET[attack]  # fixed by the attack, as in the paper
    if attack == "JSMA":
        return f"at most {setting['jsma']['max_iterations']} iterations"
    if attack in ("C&W", "C&W-hc"):
        steps = f"{cw['binary_search_steps']} x {cw['max_iterations']:,} steps"
        return steps + (", kappa 10" if attack == "C&W-hc" else "")
    if not wb:
        return PAPER_BUDGET["C&W-wb"]  # cw_wb's defaults are the release's two stages
    s1, s2 = wb["stage1"], wb["stage2"]
    return (f"{s1['binary_search_steps']} x {s1['max_iterations']:,} then "
            f"{s2['binary_search_steps']} x {s2['max_iterations']:,} steps")


@pytest.fixture(scope="module")
def setting(request):
    paper = request.config.getoption("--paper-settings")
    kind = request.config.getoption("--bench-model") or ("resnet32" if HAS_CUDA else "mlp")
    n = 100 if paper else 20
    cw = dict(binary_search_steps=9, max_iterations=10_000) if paper else dict(
        binary_search_steps=3, max_iterations=100)
    wb = {} if paper else dict(
        stage1=dict(max_iterations=50, c_init=10.0, binary_search_steps=1),
        stage2=dict(max_iterations=100, c_init=100.0, binary_search_steps=2))
    jsma_kw = dict(max_iterations=100) if paper else dict(max_iterations=20)
    return dict(kind=kind, n=n, cw=cw, wb=wb, jsma=jsma_kw, paper=paper)


_DETECTORS = {}


def _model_and_detector(setting, objective):
    model = mnist_sized_model(setting["kind"], objective, device=DEVICE)
    key = (setting["kind"], objective)
    if key not in _DETECTORS:
        x_tr, y_tr, _, _, _ = mnist_sized_data()
        with torch.no_grad():
            feats = torch.cat([model.features(b.to(DEVICE)) for b in x_tr[:5000].split(500)])
        det = rce_fast.KDensityDetector(objective=objective, per_class=1000, seed=0)
        det.fit(feats, y_tr[:5000].to(DEVICE))
        det.class_medians(feats, y_tr[:5000].to(DEVICE), kernel_points=100)
        _DETECTORS[key] = det
    return model, _DETECTORS[key]


def _attack_fns(setting, model, det):
    cw, wb, js = setting["cw"], setting["wb"], setting["jsma"]
    return {
        "FGSM": lambda x: fgsm(model, x, 0.1),
        "BIM": lambda x: bim(model, x, 0.1),
        "ILCM": lambda x: ilcm(model, x, 0.1),
        "JSMA": lambda x: jsma(model, x, "least_likely", gamma=0.1, **js),
        "C&W": lambda x: cw_l2(model, x, "random", c_init=1e-3 if setting["paper"] else 1.0,
                               **cw),
        "C&W-hc": lambda x: cw_l2(model, x, "random", kappa=10.0,
                                  c_init=1e-3 if setting["paper"] else 1.0, **cw),
        "C&W-wb": lambda x: cw_wb(model, x, "random", det, kappa=5.0, **wb),
    }


@pytest.mark.parametrize("objective", ["ce", "rce"])
@pytest.mark.parametrize("attack", ["FGSM", "BIM", "ILCM", "JSMA", "C&W", "C&W-hc", "C&W-wb"])
def test_attack_time_per_example(record, setting, attack, objective):
    model, det = _model_and_detector(setting, objective)
    _, _, x_te, _, data_name = mnist_sized_data()
    x = x_te[:setting["n"]].to(DEVICE)
    fn = _attack_fns(setting, model, det)[attack]
    case = f"attack {attack} {objective.upper()} {setting['kind']} {data_name}"
    rounds = 3 if attack in ("FGSM", "BIM", "ILCM") else 1
    adv = record(case, "rce_fast", lambda: fn(x), rounds=rounds, per_image_of=setting["n"],
                 setting=f"{setting['kind']} on {data_name}, batch {setting['n']}, "
                         f"{_budget(attack, setting)}",
                 paper_seconds=PAPER_SECONDS[(attack, objective)],
                 paper_setting=f"{PAPER_SETTING}, {PAPER_BUDGET[attack]}")
    assert adv.shape == x.shape and adv.min() >= -0.5 - 1e-6 and adv.max() <= 0.5 + 1e-6


# --------------------------------------------------------------- torchattacks baselines

class _ZeroOne(torch.nn.Module):
    """torchattacks wants inputs in [0, 1]; ours live in [-0.5, 0.5]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z):
        return self.model(z - 0.5)


N_BASE = 100
CW_STEPS = 100
set_target("vs torchattacks FGSM", "torchattacks", 1.0)
set_target("vs torchattacks BIM", "torchattacks", 1.0)


def _model_floor(model, x, steps):
    """What every gradient-based attack must pay: ``steps`` forward passes and input-
    gradient backward passes of the model, nothing else. It bounds the attainable speed-up:
    a baseline's time over this floor is the most any implementation can gain."""
    with torch.no_grad():
        gz = torch.ones_like(model(x))

    def run():
        for _ in range(steps):
            xl = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(model(xl), xl, gz)
        return g
    return run


@pytest.mark.parametrize("impl", ["rce_fast", "torchattacks", "model floor"])
@pytest.mark.parametrize("attack", ["FGSM", "BIM", "CW"])
def test_against_torchattacks(record, setting, attack, impl):
    model, _ = _model_and_detector(setting, "ce")
    _, _, x_te, y_te, _ = mnist_sized_data()
    x, y = x_te[:N_BASE].to(DEVICE), y_te[:N_BASE].to(DEVICE)
    steps = {"FGSM": 1, "BIM": 10, "CW": CW_STEPS}[attack]
    if impl == "rce_fast":
        fns = {"FGSM": lambda: fgsm(model, x, 0.1, labels=y),
               "BIM": lambda: bim(model, x, 0.1, steps=10, labels=y),
               "CW": lambda: cw_l2(model, x, None, c_init=1.0, binary_search_steps=1,
                                   max_iterations=CW_STEPS, lr=0.01, abort_early=False)}
        fn = fns[attack]
    elif impl == "model floor":
        fn = _model_floor(model, x, steps)
    else:
        ta = pytest.importorskip("torchattacks")
        wrapped = _ZeroOne(model)
        atk = {"FGSM": lambda: ta.FGSM(wrapped, eps=0.1),
               "BIM": lambda: ta.BIM(wrapped, eps=0.1, alpha=0.01, steps=10),
               # torchattacks' CW always returns early when its cost stops falling, while
               # rce_fast runs all CW_STEPS here (abort_early=False): a conservative ratio.
               "CW": lambda: ta.CW(wrapped, c=1.0, kappa=0, steps=CW_STEPS, lr=0.01)}[attack]()

        def fn():
            return atk(x + 0.5, y) - 0.5
    case = f"vs torchattacks {attack}" + (f" {CW_STEPS} steps" if attack == "CW" else "")
    out = record(case, impl, fn, rounds=3 if attack == "CW" else None, per_image_of=N_BASE)
    assert out.shape == x.shape


# The fused C&W update alone (CPU): one pass over the batch instead of ~20 tensor ops.
CW_STEP_CASE = "C&W update step, batch 100 x 784"
set_target(CW_STEP_CASE, "tensor ops", 2.0)


@pytest.mark.skipif(DEVICE != "cpu", reason="the fused C&W step is the CPU path")
@pytest.mark.parametrize("impl", ["rce_fast", "tensor ops", "baseline x86-64 copy"])
def test_cw_update_step(record, impl):
    from rce_fast import _ext
    from rce_fast.attacks import _cw_fused
    module, _ = _ext.load()
    probe = torch.zeros(1, 1)
    if not _cw_fused.fused_available(probe):
        pytest.skip("the compiled C&W step is not available")
    g = torch.Generator().manual_seed(0)
    b, n = 100, 784
    w = torch.randn(b, n, generator=g) * 2
    x = torch.rand(b, n, generator=g) - 0.5
    t = torch.tanh(w)
    bufs = dict(g=torch.randn(b, n, generator=g), w=w, m=torch.zeros(b, n),
                v=torch.zeros(b, n), t=t, xp=t * 0.5, x=x, best=x.clone(),
                improved=torch.rand(b, generator=g) < 0.5, l2=torch.zeros(b))
    args = dict(step=10, lr=0.01, half=0.5, mid=0.0)
    if impl == "rce_fast":
        def fn():
            _cw_fused.fused_update(**bufs, **args)
    elif impl == "tensor ops":
        def fn():
            _cw_fused.torch_update(**bufs, **args)
    else:
        def fn():
            _cw_fused.fused_update(**bufs, **args, isa=module.ISA_BASELINE)
    record(CW_STEP_CASE, impl, fn)
