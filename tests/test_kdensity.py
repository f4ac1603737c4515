"""K-density op, metrics, detector and AUC protocol against plain references."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KernelDensity

import rce_fast
from rce_fast.detect import auc, auc_standard_error, build_bank_index, threshold_for_fpr
from tests.conftest import DEVICE_BACKENDS
from tests.reference import kdensity_reference

EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _data(n, m, d, classes, dtype=torch.float32, device="cpu", seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 3
    bl = torch.cat([torch.arange(classes), torch.randint(0, classes, (m - classes,),
                                                         generator=g)])
    b = centers[bl] + torch.randn(m, d, generator=g) * spread
    qc = torch.randint(0, classes, (n,), generator=g)
    q = centers[qc] + torch.randn(n, d, generator=g) * spread * 1.5
    return (q.to(dtype).to(device), b.to(dtype).to(device), bl.to(device), qc.to(device))


def _low_precision_reference(q, b, bl, qc, sigma2, dtype):
    """The reference's own error in ``dtype``: class-centred features stored in dtype."""
    q64, b64 = q.double().cpu(), b.double().cpu()
    c = int(bl.max()) + 1
    centers = torch.stack([b64[bl.cpu() == k].mean(0) for k in range(c)])
    qr = (q64 - centers[qc.cpu()]).to(dtype).double()
    br = (b64 - centers[bl.cpu()]).to(dtype).double()
    return kdensity_reference(qr, br, bl.cpu(), qc.cpu(), sigma2)


def _assert_close_to_reference(out, q, b, bl, qc, sigma2, dtype):
    ref = kdensity_reference(q.double().cpu(), b.double().cpu(), bl.cpu(), qc.cpu(), sigma2)
    if dtype == torch.float32:
        ref_low = kdensity_reference(q.cpu().float(), b.cpu().float(), bl.cpu(), qc.cpu(),
                                     sigma2).double()
    else:
        ref_low = _low_precision_reference(q, b, bl, qc, sigma2, dtype)
    ref_err = (ref_low - ref).abs().max().item()
    err = (out.double().cpu() - ref).abs()
    bound = 2 * ref_err + 8 * EPS[dtype] * (1 + ref.abs())
    assert (err <= bound).all(), (f"max error {err.max().item():.3g} vs reference's own "
                                  f"error {ref_err:.3g}")


CASES = [  # (N, M, D, classes); D > 64 runs the feature-tiled kernels (ViT-B: 768,
    # ResNet-50: 2048)
    (1, 1, 1, 1), (1, 7, 3, 2), (37, 50, 20, 3), (130, 65, 64, 10), (20, 300, 200, 4),
    (64, 40, 512, 2), (90, 1000, 17, 1000), (21, 45, 768, 2), (13, 33, 2048, 3),
]


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_float64_brute_force(on_backend, dtype, case):
    device, _ = on_backend
    n, m, d, classes = case
    q, b, bl, qc = _data(n, max(m, classes), d, classes, dtype, device, seed=sum(case))
    sigma2 = 0.1 / 0.26 * d / 8
    out = rce_fast.kdensity(q, b, bl, qc, sigma2)
    assert out.shape == (n,) and out.dtype == torch.float32 and out.device.type == device
    _assert_close_to_reference(out, q, b, bl, qc, sigma2, dtype)


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_underflow_region_stays_finite(on_backend):
    """exp(-d2/sigma2) is 0 in fp64 here; the log-space result must still be exact."""
    device, _ = on_backend
    q, b, bl, qc = _data(9, 30, 8, 3, device=device, seed=1)
    q = q + 200.0  # ||q - x||^2 ~ 3e5 with sigma2 = 0.38: exp underflows by far
    sigma2 = 0.1 / 0.26
    naive = torch.exp(-torch.cdist(q.double().cpu(), b.double().cpu()) ** 2 / sigma2)
    assert (naive == 0).all()
    out = rce_fast.kdensity(q, b, bl, qc, sigma2)
    ref = kdensity_reference(q.double().cpu(), b.double().cpu(), bl.cpu(), qc.cpu(), sigma2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_gradient_matches_autograd_of_reference(on_backend):
    device, _ = on_backend
    q, b, bl, qc = _data(40, 70, 24, 5, device=device, seed=2)
    sigma2 = 2.0
    qq = q.clone().requires_grad_(True)
    w = torch.linspace(-1, 2, 40, device=device)
    (rce_fast.kdensity(qq, b, bl, qc, sigma2) * w).sum().backward()
    q64 = q.double().cpu().requires_grad_(True)
    (kdensity_reference(q64, b.double().cpu(), bl.cpu(), qc.cpu(), sigma2)
     * w.double().cpu()).sum().backward()
    torch.testing.assert_close(qq.grad.double().cpu(), q64.grad, rtol=1e-4, atol=1e-5)
    # the closed form the white-box attack relies on
    ref = kdensity_reference(q.double().cpu(), b.double().cpu(), bl.cpu(), qc.cpu(), sigma2)
    assert torch.isfinite(ref).all()


def test_gradcheck_float64():
    q, b, bl, qc = _data(6, 12, 5, 3, dtype=torch.float64, seed=3)
    q.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: rce_fast.kdensity(t, b, bl, qc, 1.5), (q,))


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_opcheck(on_backend):
    device, _ = on_backend
    q, b, bl, qc = _data(20, 30, 16, 3, device=device, seed=4)
    index = build_bank_index(b, bl)
    order = torch.argsort(qc, stable=True)
    qs = q[order].contiguous()
    q_off = torch.cat([torch.zeros(1, dtype=torch.long, device=device),
                       torch.bincount(qc, minlength=3).cumsum(0)])
    for rg in (False, True):
        torch.library.opcheck(torch.ops.rce_fast.kdensity_lse.default,
                              (qs.clone().requires_grad_(rg), q_off, index.bank,
                               index.offsets, 0.7))
    lse = torch.ops.rce_fast.kdensity_lse(qs, q_off, index.bank, index.offsets, 0.7)
    torch.library.opcheck(torch.ops.rce_fast.kdensity_grad.default,
                          (torch.rand(20, device=device), qs, q_off, index.bank, index.offsets,
                           lse, 0.7))


def test_matches_sklearn_kernel_density_up_to_a_constant_per_class():
    q, b, bl, qc = _data(60, 90, 6, 3, dtype=torch.float64, seed=5)
    sigma2 = 0.8
    ours = rce_fast.kdensity(q, b, bl, qc, sigma2).double().numpy()
    for c in range(3):
        kde = KernelDensity(kernel="gaussian", bandwidth=np.sqrt(sigma2 / 2)).fit(
            b[bl == c].double().numpy())
        theirs = kde.score_samples(q[qc == c].double().numpy())
        diff = ours[(qc == c).numpy()] - theirs
        assert np.ptp(diff) < 1e-9, "differ by more than a constant"


def test_empty_queries_and_bad_inputs():
    q, b, bl, qc = _data(5, 12, 4, 3, seed=6)
    assert rce_fast.kdensity(q[:0], b, bl, qc[:0], 1.0).shape == (0,)
    with pytest.raises(ValueError, match="feature size"):
        rce_fast.kdensity(q[:, :3], b, bl, qc, 1.0)
    with pytest.raises(ValueError, match="no bank rows"):
        rce_fast.kdensity(q, b[bl != 1], bl[bl != 1], torch.full((5,), 1), 1.0)
    with pytest.raises(ValueError, match="sigma2"):
        rce_fast.kdensity(q, b, bl, qc, 0.0)
    with pytest.raises(ValueError, match="sigma2"):
        rce_fast.kdensity(q, b, bl, qc, float("nan"))
    qn = q.clone()
    qn[2, 1] = float("nan")
    with pytest.raises(ValueError, match="queries contains NaN"):
        rce_fast.kdensity(qn, b, bl, qc, 1.0)
    with pytest.raises(TypeError, match="bank is"):
        rce_fast.kdensity(q, b.double(), bl, qc, 1.0)
    with pytest.raises(TypeError, match="query_classes"):
        rce_fast.kdensity(q, b, bl, qc.float(), 1.0)
    with pytest.raises(ValueError, match="query_classes must have shape"):
        rce_fast.kdensity(q, b, bl, qc[:2], 1.0)
    with pytest.raises(ValueError, match="bank is empty"):
        rce_fast.kdensity(q, b[:0], bl[:0], qc, 1.0)
    with pytest.raises(ValueError, match="query_classes holds class 7"):
        rce_fast.kdensity(q, b, bl, torch.tensor([0, 1, 7, 0, 0]), 1.0)


def test_inputs_not_modified():
    q, b, bl, qc = _data(15, 20, 8, 2, seed=7)
    copies = [t.clone() for t in (q, b, bl, qc)]
    rce_fast.kdensity(q, b, bl, qc, 1.0)
    assert all(torch.equal(a, c) for a, c in zip((q, b, bl, qc), copies))


def test_cpu_memory_is_bounded():
    """40k queries x 40k bank: an N x M fp32 matrix would be 6.4 GB; peak RSS stays < 1.5 GB."""
    code = (
        "import resource, torch, rce_fast\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q = torch.randn(40000, 64, generator=g); b = torch.randn(40000, 64, generator=g)\n"
        "bl = torch.randint(0, 4, (40000,), generator=g); qc = torch.randint(0, 4, (40000,), generator=g)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = rce_fast.kdensity(q, b, bl, qc, 0.38)\n"
        "assert torch.isfinite(out).all()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    extra_mb = float(proc.stdout.strip().splitlines()[-1])
    assert extra_mb < 1500, f"K-density grew the process by {extra_mb:.0f} MB"


# ----------------------------------------------------------------------------- metrics

def test_confidence_and_non_me_against_definitions():
    g = torch.Generator().manual_seed(8)
    z = torch.randn(50, 10, generator=g) * 4
    p = torch.softmax(z.double(), 1)
    torch.testing.assert_close(rce_fast.confidence(z).double(), p.max(1).values,
                               rtol=1e-5, atol=1e-7)
    top = p.argmax(1)
    expected = []
    for i in range(50):
        rest = torch.cat([p[i, :top[i]], p[i, top[i] + 1:]])
        qv = rest / rest.sum()
        expected.append(-(qv * qv.log()).sum())
    torch.testing.assert_close(rce_fast.non_me(z).double(), torch.stack(expected),
                               rtol=1e-5, atol=1e-6)


def test_non_me_extremes_and_stability():
    # equal non-top logits: maximal value log(L - 1)
    z = torch.tensor([[5.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 9.0]])
    torch.testing.assert_close(rce_fast.non_me(z), torch.full((2,), np.log(3.0),
                                                              dtype=torch.float32))
    # huge logits and many classes: finite, in range
    big = torch.randn(4, 20000) * 1e4
    v = rce_fast.non_me(big)
    assert torch.isfinite(v).all() and (v >= 0).all() and (v <= np.log(19999) + 1e-4).all()
    assert torch.isfinite(rce_fast.non_me(big.half())).all()
    with pytest.raises(ValueError, match="decision_logits"):
        rce_fast.non_me(torch.randn(3, 1))


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 5, 200).astype(float)
    neg = rng.integers(0, 4, 150).astype(float)
    expected = roc_auc_score(np.r_[np.ones(200), np.zeros(150)], np.r_[pos, neg])
    assert abs(auc(pos, neg) - expected) < 1e-12
    assert np.isnan(auc([], [1.0]))


@pytest.mark.parametrize("shift, n_pos, n_neg", [(0.0, 50, 50), (1.0, 100, 80),
                                                (2.5, 60, 200)])
def test_auc_standard_error_matches_the_spread_of_repeated_samples(shift, n_pos, n_neg):
    # The spread of AUCs over 600 independent draws is the quantity the standard error
    # estimates; the estimator's own Monte-Carlo error at 600 draws is about 3%.
    rng = np.random.default_rng(1)
    aucs, ses = [], []
    for _ in range(600):
        pos, neg = rng.normal(shift, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)
        aucs.append(auc(pos, neg))
        ses.append(auc_standard_error(pos, neg))
    assert np.mean(ses) == pytest.approx(np.std(aucs), rel=0.1)


def test_auc_standard_error_edge_cases():
    assert np.isnan(auc_standard_error([1.0], [0.0, 1.0]))
    assert auc_standard_error([2.0, 3.0], [0.0, 1.0]) == 0.0      # perfect separation
    # ties on both sides count half, like auc(); constant scores give AUC 0.5, se 0
    assert auc_standard_error([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.0


def test_paper_auc_protocol_hand_built():
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    clean_pred = torch.tensor([0, 1, 2, 3, 9, 5])   # index 4 wrong on clean: dropped
    adv_pred = torch.tensor([1, 1, 0, 2, 0, 0])     # index 1 still correct: dropped
    clean = {"kd": torch.tensor([5.0, 0.0, 3.0, 1.0, 9.0, 4.0])}
    adv = {"kd": torch.tensor([1.0, 9.0, 2.0, 2.0, 0.0, 0.5])}
    out = rce_fast.paper_auc(clean, adv, labels, clean_pred, adv_pred)
    # kept pairs: indices 0, 2, 3, 5 -> pos [5, 3, 1, 4], neg [1, 2, 2, 0.5]
    # pairs pos > neg: 5:4, 3:4, 1:1 + tie with 1 (0.5), 4:4 -> (4 + 4 + 1.5 + 4) / 16
    assert out["n"] == 4
    assert out["kd"] == pytest.approx(13.5 / 16)
    with_se = rce_fast.paper_auc(clean, adv, labels, clean_pred, adv_pred,
                                 standard_errors=True)
    assert with_se["kd"] == out["kd"] and "se" not in out
    assert with_se["se"]["kd"] == pytest.approx(auc_standard_error([5, 3, 1, 4], [1, 2, 2, 0.5]))
    with pytest.raises(ValueError, match="adv_scores"):
        rce_fast.paper_auc({"conf": clean["kd"]}, adv, labels, clean_pred, adv_pred)


# ---------------------------------------------------------------------------- detector

def test_detector_fit_score_threshold_detect_save_load(tmp_path):
    q, b, bl, qc = _data(200, 600, 16, 4, seed=9)
    det = rce_fast.KDensityDetector(per_class=100, seed=3).fit(b, bl)
    assert det.sigma2 == pytest.approx(0.1 / 0.26)
    assert det.bank.shape == (400, 16)
    assert torch.bincount(det.bank_labels).tolist() == [100] * 4
    # deterministic given the seed
    again = rce_fast.KDensityDetector(per_class=100, seed=3).fit(b, bl)
    assert torch.equal(again.bank, det.bank)
    scores = det.score(q, qc)
    torch.testing.assert_close(scores, rce_fast.kdensity(q, det.bank, det.bank_labels, qc,
                                                         det.sigma2))
    torch.testing.assert_close(det.score(q, qc, batch_size=7), scores)
    thr = det.fit_threshold(q, qc, fpr=0.1)
    flagged = det.detect(q, qc)
    assert abs(flagged.float().mean().item() - 0.1) < 0.02
    # the order statistic every detector uses: at most floor(fpr * n) flagged, the
    # (k+1)-th smallest score (not an interpolated quantile, which can flag more)
    from rce_fast.detect import threshold_at_fpr
    assert thr == threshold_at_fpr(scores, 0.1) == float(scores.sort().values[int(0.1 * len(q))])
    for n in (7, 10, 33):
        det.fit_threshold(q[:n], qc[:n], fpr=0.05)
        assert int(det.detect(q[:n], qc[:n]).sum()) <= int(0.05 * n)
    thr = det.fit_threshold(q, qc, fpr=0.1)
    far = q + 50
    assert det.detect(far, qc).all()
    stream = list(det.detect_stream([(q[:50], qc[:50]), (far[:10], qc[:10])]))
    assert torch.equal(stream[0], flagged[:50]) and stream[1].all()
    medians = det.class_medians(b, bl, kernel_points=20)
    assert medians.shape == (4,) and torch.isfinite(medians).all()
    assert torch.bincount(det.median_index.counts.new_tensor(
        [c for c in range(4) for _ in range(int(det.median_index.counts[c]))])).tolist() == [20] * 4
    path = tmp_path / "kd.pt"
    det.save(path)
    loaded = rce_fast.KDensityDetector.load(path)
    torch.testing.assert_close(loaded.score(q, qc), scores)
    assert loaded.threshold == thr and torch.equal(loaded.medians, det.medians)
    assert rce_fast.KDensityDetector(objective="ce").sigma2 == pytest.approx(1 / 0.26)


def test_detector_errors():
    q, b, bl, qc = _data(10, 30, 4, 3, seed=10)
    with pytest.raises(RuntimeError, match="not fitted"):
        rce_fast.KDensityDetector().score(q, qc)
    with pytest.raises(ValueError, match=r"classes \[1\] have none"):
        rce_fast.KDensityDetector().fit(b[bl != 1], bl[bl != 1])
    with pytest.raises(ValueError, match="per_class"):
        rce_fast.KDensityDetector(per_class=0)
    with pytest.raises(ValueError, match="objective"):
        rce_fast.KDensityDetector(objective="mse")
    det = rce_fast.KDensityDetector().fit(b, bl)
    with pytest.raises(RuntimeError, match="threshold"):
        det.detect(q, qc)
    with pytest.raises(ValueError, match="fpr"):
        det.fit_threshold(q, qc, fpr=2.0)
    with pytest.raises(ValueError, match="empty"):
        threshold_for_fpr(torch.zeros(0), 0.1)


@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_far_from_origin_features_keep_accuracy(on_backend):
    """Features offset by 1000: the uncentred fp32 expansion ||q||^2 + ||b||^2 - 2 q.b
    loses ~eps * ||q||^2 ~ 8 per distance (log KD off by ~20); class centring keeps the
    error at the level of the reference's own fp32 error."""
    device, _ = on_backend
    q, b, bl, qc = _data(50, 80, 64, 3, device=device, seed=11)
    q, b = q + 1000.0, b + 1000.0
    sigma2 = 0.1 / 0.26 * 8
    out = rce_fast.kdensity(q, b, bl, qc, sigma2)
    ref = kdensity_reference(q.double().cpu(), b.double().cpu(), bl.cpu(), qc.cpu(), sigma2)
    q32, b32 = q.cpu().float(), b.cpu().float()
    d2_naive = (q32 ** 2).sum(1)[:, None] + (b32 ** 2).sum(1)[None] - 2 * q32 @ b32.T
    d2_true = torch.cdist(q.double().cpu(), b.double().cpu()) ** 2
    assert (d2_naive.double() - d2_true).abs().max() > 1.0  # the problem is real
    assert (out.double().cpu() - ref).abs().max() < 1e-3


def test_triton_upper_bound_grid_without_host_sync(monkeypatch):
    """The CUDA launch grid (cdiv(N, BLOCK_M) + C programs, surplus ones inert) under the
    interpreter: same results as the float64 brute force."""
    if os.environ.get("TRITON_INTERPRET", "0") == "0":
        pytest.skip("Triton interpreter is off in this run")
    from rce_fast.kernels import kdensity as k
    original = k._tiles
    monkeypatch.setattr(k, "_tiles", lambda off, bm, n, exact=None: original(off, bm, n, False))
    q, b, bl, qc = _data(70, 40, 8, 5, seed=12)
    qq = q.clone().requires_grad_(True)
    with rce_fast.use_backend("triton"):
        out = rce_fast.kdensity(qq, b, bl, qc, 0.9)
        out.sum().backward()
    ref_q = q.double().requires_grad_(True)
    ref = kdensity_reference(ref_q, b.double(), bl, qc, 0.9)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(qq.grad.double(), ref_q.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy overflow
def test_triton_forward_survives_a_tile_of_overflowing_distances():
    """A tile of bank rows whose d2 / sigma2 all overflow to -inf before any finite one:
    the running log-sum-exp must shift by 0 there (as the RCE kernel does), not produce
    exp(-inf - -inf) = nan and carry it on. Launcher level, against the PyTorch path."""
    if os.environ.get("TRITON_INTERPRET", "0") == "0" and not torch.cuda.is_available():
        pytest.skip("neither the Triton interpreter nor a GPU in this run")
    from rce_fast import _torch_impl
    from rce_fast.kernels import kdensity as k
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d = 4
    q = torch.zeros(2, d, device=device)
    q[1] = 2e3  # the second query's class: every row overflows (lse = -inf on both paths)
    far = torch.full((300, d), 1e3, device=device)  # d2 / sigma2 = 4e6 / 1e-34: -inf
    bank = torch.cat([far, torch.zeros(1, d, device=device), far[:5]])
    qo = torch.tensor([0, 1, 2], device=device)
    bo = torch.tensor([0, 301, 306], device=device)
    sigma2 = 1e-34
    out = k.kdensity_lse(q, qo, bank, bo, sigma2)
    ref = _torch_impl.kdensity_lse(q.cpu(), qo.cpu(), bank.cpu(), bo.cpu(), sigma2)
    assert ref[0] == 0.0 and ref[1] == -float("inf")
    torch.testing.assert_close(out.cpu(), ref)


# ------------------------------------------------------------- reliability (issue 12)

@pytest.mark.parametrize("on_backend", DEVICE_BACKENDS, indirect=True)
def test_bank_gradient_is_the_true_one(on_backend):
    """The bank's gradient flows through every kernel point, not only through the class
    means (it used to: silently wrong)."""
    device, _ = on_backend
    q, b, bl, qc = _data(30, 45, 12, 3, device=device, seed=40)
    bb, qq = b.clone().requires_grad_(True), q.clone().requires_grad_(True)
    w = torch.linspace(-1, 2, 30, device=device)
    (rce_fast.kdensity(qq, bb, bl, qc, 3.0) * w).sum().backward()
    b64 = b.double().cpu().requires_grad_(True)
    q64 = q.double().cpu().requires_grad_(True)
    (kdensity_reference(q64, b64, bl.cpu(), qc.cpu(), 3.0) * w.double().cpu()).sum().backward()
    torch.testing.assert_close(bb.grad.double().cpu(), b64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(qq.grad.double().cpu(), q64.grad, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64_queries_and_bank():
    q, b, bl, qc = _data(6, 12, 5, 3, dtype=torch.float64, seed=41)
    assert torch.autograd.gradcheck(lambda t, u: rce_fast.kdensity(t, u, bl, qc, 1.5),
                                    (q.requires_grad_(True), b.requires_grad_(True)))


def test_float64_is_float64_accurate():
    q, b, bl, qc = _data(50, 80, 16, 4, dtype=torch.float64, seed=42)
    out = rce_fast.kdensity(q, b, bl, qc, 2.0)
    ref = kdensity_reference(q, b, bl, qc, 2.0)
    assert out.dtype == torch.float64
    assert (out - ref).abs().max() < 1e-12


def test_cost_follows_the_data_not_the_label_values():
    """Labels up to 10^9 on a 30-row bank: the old index sized its buffers by the largest
    label (5.5 GB at 10^7, killed at 10^9); now by the rows and the classes present."""
    code = (
        "import resource, torch, rce_fast\n"
        "g = torch.Generator().manual_seed(0)\n"
        "b = torch.randn(30, 64, generator=g); q = torch.randn(8, 64, generator=g)\n"
        "bl = torch.tensor([5, 10**7, 10**9]).repeat(10)\n"
        "qc = torch.tensor([10**9, 5, 10**7, 5, 5, 10**9, 10**7, 5])\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = rce_fast.kdensity(q, b, bl, qc, 8.0)\n"
        "assert torch.isfinite(out).all()\n"
        "det = rce_fast.KDensityDetector(per_class=5)\n"
        "try:\n"
        "    det.fit(b, bl)\n"
        "except ValueError as e:\n"
        "    assert 'classes [0, 1, 2' in str(e) and 'more' in str(e)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 200
    q, b, bl, qc = _data(20, 30, 6, 3, seed=43)
    sparse_bl, sparse_qc = bl * 10**6 + 7, qc * 10**6 + 7
    torch.testing.assert_close(rce_fast.kdensity(q, b, sparse_bl, sparse_qc, 1.0),
                               rce_fast.kdensity(q, b, bl, qc, 1.0))
    with pytest.raises(ValueError, match=r"no bank rows: \[8\]"):
        rce_fast.kdensity(q, b, sparse_bl, torch.full((20,), 8), 1.0)


def test_detector_round_trips_everything_and_drives_cw_wb(tmp_path):
    from tests.helpers import digits_mlp, digits_tensors
    model = digits_mlp("rce")
    x, y = digits_tensors()
    with torch.no_grad():
        feats = model.features(x[:600])
    det = rce_fast.KDensityDetector(per_class=40, seed=5).fit(feats, y[:600])
    det.class_medians(feats, y[:600], kernel_points=15)
    det.fit_threshold(feats[:200], y[:200], fpr=0.1)
    det.save(tmp_path / "det.pt")
    loaded = rce_fast.KDensityDetector.load(tmp_path / "det.pt")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    for name in ("bank", "bank_labels", "medians"):
        assert torch.equal(getattr(loaded, name), getattr(det, name))
    assert loaded.threshold == det.threshold and loaded.kernel_points == 15
    for field in ("bank", "offsets", "counts", "centers", "classes"):
        assert torch.equal(getattr(loaded.median_index, field), getattr(det.median_index, field))
    kw = dict(stage1=dict(max_iterations=5, binary_search_steps=1),
              stage2=dict(max_iterations=5, binary_search_steps=1), return_info=True)
    a1, i1 = rce_fast.attacks.cw_wb(model, x[600:606], "random", det, **kw)
    a2, i2 = rce_fast.attacks.cw_wb(model, x[600:606], "random", loaded, **kw)
    assert torch.equal(a1, a2) and torch.equal(i1.f2, i2.f2)


class _NotATensor:
    pass


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), (b"", "empty file"), (b"garbage bytes", "cannot be read"),
    ("truncated", "cannot be read"), ("foreign", "missing"), ("list", "expected a dict"),
    ("pickle", "Python objects"),
])
def test_detector_load_errors_name_the_path(tmp_path, content, message):
    path = tmp_path / "det.pt"
    if content == "truncated":
        q, b, bl, qc = _data(10, 30, 4, 3, seed=44)
        rce_fast.KDensityDetector(per_class=5).fit(b, bl).save(path)
        path.write_bytes(path.read_bytes()[:200])
    elif content == "foreign":
        torch.save({"model": torch.zeros(3)}, path)
    elif content == "list":
        torch.save([1, 2], path)
    elif content == "pickle":  # a crafted file with code in it: refused, never run
        torch.save({"sigma2": _NotATensor()}, path)
    elif content is not None:
        path.write_bytes(content)
    exc = FileNotFoundError if content is None else ValueError
    with pytest.raises(exc, match=message) as info:
        rce_fast.KDensityDetector.load(path)
    assert str(path) in str(info.value)
