"""K-density: rce_fast against scikit-learn and a naive torch.cdist + logsumexp.

scikit-learn is used the way detection code in the literature uses it: one
KernelDensity per class (bandwidth sqrt(sigma2 / 2), same ranking), fit + score_samples.
The naive torch baseline forms each class's query x bank distance matrix with cdist.
Targets: CPU >= 20x scikit-learn at N = 10k, bank 1000 x 10 classes, D = 64; GPU
>= 5x the naive path and >= 1e12 pair evaluations per second at N = M = 100k.
"""
import numpy as np
import pytest
import torch
from sklearn.neighbors import KernelDensity

import rce_fast
from benchmarks.conftest import DEVICE, HAS_CUDA, set_target
from tests.reference import kdensity_reference

SIGMA2 = 0.1 / 0.26
D = 64


def _data(n, per_class, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, D, generator=g)
    bl = torch.arange(classes).repeat_interleave(per_class)
    bank = centers[bl] + 0.3 * torch.randn(len(bl), D, generator=g)
    qc = torch.randint(0, classes, (n,), generator=g)
    q = centers[qc] + 0.4 * torch.randn(n, D, generator=g)
    return q.to(DEVICE), bank.to(DEVICE), bl.to(DEVICE), qc.to(DEVICE)


def naive_torch(q, bank, bl, qc):
    out = torch.empty(len(q), device=q.device)
    for c in torch.unique(qc).tolist():
        sel, b = qc == c, bank[bl == c]
        d2 = torch.cdist(q[sel], b) ** 2
        out[sel] = torch.logsumexp(-d2 / SIGMA2, 1) - np.log(len(b))
    return out


def sklearn_per_class(q, bank, bl, qc):
    qn, bn, bln, qcn = (t.cpu().numpy() for t in (q, bank, bl, qc))
    out = np.empty(len(qn))
    for c in np.unique(qcn):
        kde = KernelDensity(kernel="gaussian", bandwidth=np.sqrt(SIGMA2 / 2)).fit(bn[bln == c])
        out[qcn == c] = kde.score_samples(qn[qcn == c])
    return out


CASE = "kdensity N=10k bank=10x1000 D=64"
# The same sizes with features 6x further apart: most kernel logits then lie far below
# their row's maximum (exp inputs below -87), the underflow case in which PyTorch's exp
# is many times slower on some CPUs (the data above stays within 54 of the maximum).
FAR = "kdensity N=10k bank=10x1000 D=64 far apart"
LARGE = "kdensity N=M=100k D=64 10 classes"
set_target(CASE, "scikit-learn", 20.0 if not HAS_CUDA else 1.0)
set_target(LARGE, "naive torch.cdist", 5.0 if HAS_CUDA else 1.0)


@pytest.mark.parametrize("impl", ["rce_fast", "naive torch.cdist", "scikit-learn"])
def test_kdensity_10k(record, impl):
    q, bank, bl, qc = _data(10_000, 1000, 10)
    fns = {"rce_fast": lambda: rce_fast.kdensity(q, bank, bl, qc, SIGMA2),
           "naive torch.cdist": lambda: naive_torch(q, bank, bl, qc),
           "scikit-learn": lambda: sklearn_per_class(q, bank, bl, qc)}
    out = record(CASE, impl, fns[impl], rounds=3 if impl == "scikit-learn" else None,
                 pairs=10_000 * 1000, dim=D)
    # Checked against the float64 brute force. scikit-learn's KernelDensity differs by its
    # normalising constant, and its tree-based evaluation is not exact on these 64-d
    # inputs (measured: the difference spreads over 4.6 in log-density with the kd-tree,
    # 2.6 with the ball tree; scikit-learn issues #7492 and #27186): reported, not asserted.
    ref = kdensity_reference(q[:200].double().cpu(), bank.double().cpu(), bl.cpu(),
                             qc[:200].cpu(), SIGMA2)
    got = torch.as_tensor(out[:200] if impl == "scikit-learn" else out[:200].cpu()).double()
    if impl == "scikit-learn":
        spread = float(np.ptp((got - ref).numpy()))
        print(f"\nscikit-learn minus float64 reference: spread {spread:.3g} (0 = a constant)")
    else:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("impl", ["rce_fast", "naive torch.cdist"])
def test_kdensity_10k_far_apart(record, impl):
    q, bank, bl, qc = _data(10_000, 1000, 10)
    q, bank = q * 6, bank * 6
    fns = {"rce_fast": lambda: rce_fast.kdensity(q, bank, bl, qc, SIGMA2),
           "naive torch.cdist": lambda: naive_torch(q, bank, bl, qc)}
    out = record(FAR, impl, fns[impl], pairs=10_000 * 1000, dim=D)
    ref = kdensity_reference(q[:200].double().cpu(), bank.double().cpu(), bl.cpu(),
                             qc[:200].cpu(), SIGMA2)
    torch.testing.assert_close(out[:200].cpu().double(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("impl", ["rce_fast", "naive torch.cdist"])
def test_kdensity_100k(record, impl):
    if impl != "rce_fast" and not HAS_CUDA:
        pytest.skip("the naive baseline at N = M = 100k is a GPU comparison")
    q, bank, bl, qc = _data(100_000, 10_000, 10, seed=1)
    fns = {"rce_fast": lambda: rce_fast.kdensity(q, bank, bl, qc, SIGMA2),
           "naive torch.cdist": lambda: naive_torch(q, bank, bl, qc)}
    # pairs actually evaluated: each query against its class's 10k bank rows
    out = record(LARGE, impl, fns[impl], rounds=3, pairs=100_000 * 10_000, dim=D)
    assert torch.isfinite(out).all()
