"""Plain references of the issue-13 detectors and attacks, written for clarity, not speed:
NumPy loops one input (and one class, one neighbour list) at a time, as the papers'
research scripts do. Shared by the tests (ground truth) and the benchmarks (the
"straightforward implementation" baselines)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------- LID

def lid_reference(queries: np.ndarray, references: np.ndarray, k: int) -> np.ndarray:
    """LID of each query (B, D) against each reference minibatch (R, M, D), averaged
    over the minibatches: -k / sum_i log(r_i / r_k) over the k nearest Euclidean
    distances (floored at 1e-6, as rce_fast floors them). Returns (B,) float64."""
    out = np.zeros(len(queries))
    for i, q in enumerate(queries):
        estimates = []
        for batch in references:
            d = np.sqrt(((batch - q) ** 2).sum(1))
            d = np.maximum(np.sort(d)[:k], 1e-6)
            estimates.append(-k / np.sum(np.log(d / d[-1])))
        out[i] = np.mean(estimates)
    return out


def flat_activations(model, x: torch.Tensor, layers) -> list[np.ndarray]:
    with torch.no_grad():
        return [a.flatten(1).double().numpy() for a in model.features_at(x, list(layers))]


def lid_features_reference(model, x, layers, reference_inputs, batches, k) -> np.ndarray:
    """(B, n_layers) LID features: x against ``reference_inputs`` cut into ``batches``."""
    q = flat_activations(model, x, layers)
    r = flat_activations(model, reference_inputs, layers)
    return np.stack([lid_reference(qa, ra.reshape(batches, -1, ra.shape[1]), k)
                     for qa, ra in zip(q, r)], 1)


def logistic_reference(features: np.ndarray, y: np.ndarray, C: float):
    """scikit-learn's logistic regression on standardised features; returns a function
    giving the log-odds of "adversarial"."""
    from sklearn.linear_model import LogisticRegression
    mean, std = features.mean(0), features.std(0)
    std = np.where(std > 0, std, 1.0)
    model = LogisticRegression(C=C, max_iter=2000, tol=1e-6).fit((features - mean) / std, y)
    return lambda f: model.decision_function((f - mean) / std)


# ------------------------------------------------------------------------- Mahalanobis

def pooled(model, x, layer) -> torch.Tensor:
    a = model.features_at(x, [layer])[0]
    return a.flatten(2).mean(2) if a.dim() > 2 else a


def gaussian_reference(features: np.ndarray, labels: np.ndarray, num_classes: int):
    """Class means and the pseudo-inverse of the tied covariance (1/N) sum_i
    (f_i - mu_{y_i})(f_i - mu_{y_i})^T, one sample at a time."""
    means = np.stack([features[labels == c].mean(0) for c in range(num_classes)])
    cov = np.zeros((features.shape[1], features.shape[1]))
    for f, c in zip(features, labels):
        d = f - means[c]
        cov += np.outer(d, d)
    cov /= len(features)
    return means, np.linalg.pinv(cov)


def mahalanobis_score_reference(f: np.ndarray, means: np.ndarray, precision: np.ndarray
                                ) -> float:
    """max_c -(f - mu_c)^T P (f - mu_c) for one feature vector, class by class."""
    best = -np.inf
    for mu in means:
        d = f - mu
        best = max(best, -float(d @ precision @ d))
    return best


def mahalanobis_layer_scores_reference(model, x, layers, gaussians, noise: float
                                       ) -> np.ndarray:
    """(B, n_layers) per-layer scores by the plain formula, input by input and class by
    class; with ``noise`` > 0 each input first moves by -noise * sign(grad of its
    distance to the closest class) (autograd on the class-by-class formula, float64;
    the inputs are independent, so one backward of the sum gives every gradient)."""
    out = np.zeros((len(x), len(layers)))
    for j, layer in enumerate(layers):
        means, precision = gaussians[j]
        xi = x
        if noise > 0:
            xg = x.detach().clone().requires_grad_(True)
            f = pooled(model, xg, layer).double()
            p = torch.as_tensor(precision)
            dists = torch.stack([(((f - m) @ p) * (f - m)).sum(1)
                                 for m in torch.as_tensor(means)], 1)
            (g,) = torch.autograd.grad(dists.min(1).values.sum(), xg)
            xi = (xg - noise * g.sign()).detach()
        with torch.no_grad():
            feats = pooled(model, xi, layer).double().numpy()
        for i, f in enumerate(feats):
            out[i, j] = mahalanobis_score_reference(f, means, precision)
    return out


# ------------------------------------------------------------------------- K-density

def guarded_reference(model, x, bank, bank_labels, sigma2, threshold, scale=1.0):
    """The guarded logits G = [Z, max Z + scale * (threshold - log KD)] by the plain
    formula: brute-force float64 K-density of the predicted class."""
    logits, feats = model.logits_and_features(x)
    pred = logits.argmax(1)
    d2 = ((feats.double()[:, None, :] - bank.double()[None]) ** 2).sum(-1)
    same = bank_labels[None, :] == pred[:, None]
    logkd = torch.logsumexp((-d2 / sigma2).masked_fill(~same, float("-inf")), 1) - \
        same.sum(1).double().log()
    top = logits.double().max(1).values
    return torch.cat([logits.double(), (top + scale * (threshold - logkd))[:, None]], 1)


# ------------------------------------------------------------------------------- PGD

def pgd_reference(model, x, y, eps, steps, alpha, clip=(-0.5, 0.5)):
    """L-inf PGD from x (no random start) on CE, untargeted, keeping per input the best
    iterate (a successful one first, then the highest loss), one input at a time."""
    out = []
    for i in range(len(x)):
        xi, yi = x[i:i + 1], y[i:i + 1]
        xa, best, best_key = xi.clone(), xi.clone(), (False, -np.inf)
        for step in range(steps + 1):
            xa = xa.detach().requires_grad_(True)
            z = model(xa)
            loss = F.cross_entropy(z, yi)
            key = (bool(z.argmax(1).item() != yi.item()), float(loss.detach()))
            if key > best_key:
                best, best_key = xa.detach().clone(), key
            if step == steps:
                break
            (g,) = torch.autograd.grad(loss, xa)
            xa = xa.detach() + alpha * g.sign()
            xa = torch.min(torch.max(xa, xi - eps), xi + eps).clamp(*clip)
        out.append(best)
    return torch.cat(out)


def orthogonal_pgd_reference(guarded, x, y, eps, steps, alpha, margin=0.05,
                             clip=(-0.5, 0.5)):
    """Orthogonal PGD (L-inf, untargeted) written the way the authors' release is: two
    ``.backward()`` passes, gradients and decisions copied to the host every step, a
    Python loop over inputs for the kept example."""
    x0 = x.detach().clone()
    xa = x0.clone()
    best = x0.clone()
    best_score = np.full(len(x), -np.inf)
    found = np.zeros(len(x), dtype=bool)
    for _ in range(steps):
        xa.requires_grad_(True)
        z, s = guarded.logits_and_score(xa)
        F.cross_entropy(z.float(), y, reduction="sum").backward(retain_graph=True)
        gf = xa.grad.detach().cpu().clone()
        xa.grad = None
        s.sum().backward()
        gg = xa.grad.detach().cpu().clone()
        zn = z.detach().cpu().numpy()
        sn = s.detach().cpu().numpy()
        for i in range(len(x)):
            if zn[i].argmax() != int(y[i]) and sn[i] > best_score[i]:
                best[i], best_score[i], found[i] = xa[i].detach(), sn[i], True
        nudged = zn.copy()
        nudged[np.arange(len(x)), y.cpu().numpy()] += margin
        crossed = nudged.argmax(1) != y.cpu().numpy()
        step = torch.zeros_like(gf)
        for i in range(len(x)):
            a, b = (gg[i], gf[i]) if crossed[i] else (gf[i], gg[i])
            step[i] = a - (a.flatten() @ b.flatten()) / max(float(b.flatten() @ b.flatten()),
                                                              1e-30) * b
        xa = xa.detach() + alpha * step.sign().to(xa.device)
        xa = torch.min(torch.max(xa, x0 - eps), x0 + eps).clamp(*clip)
    with torch.no_grad():
        z, s = guarded.logits_and_score(xa)
    for i in range(len(x)):
        if z[i].argmax().item() != int(y[i]) and s[i].item() > best_score[i]:
            best[i], found[i] = xa[i], True
    return torch.where(torch.as_tensor(found).view(-1, *[1] * (x.dim() - 1)), best, xa)


# ------------------------------------------------- research-script scoring (baselines)

def lid_scores_script(model, x, det, batch_size=100) -> np.ndarray:
    """LID scores computed the way the research scripts compute LID: per minibatch,
    activations copied to NumPy, scipy's cdist to each reference batch, a full sort of
    every distance row, then scikit-learn-style arithmetic on the host."""
    from scipy.spatial.distance import cdist
    refs = [r.double().cpu().numpy() for r in det.references]
    head = det.head
    out = []
    for i in range(0, len(x), batch_size):
        with torch.no_grad():
            acts = model.features_at(x[i:i + batch_size], list(det.layers))
        cols = []
        for a, ref in zip(acts, refs):
            a = a.flatten(1).double().cpu().numpy()
            est = np.zeros(len(a))
            for batch in ref:
                d = np.sort(cdist(a, batch), axis=1)[:, :det.k]
                d = np.maximum(d, 1e-6)
                est += -det.k / np.minimum(np.log(d / d[:, -1:]).sum(1), -1e-12)
            cols.append(est / len(ref))
        f = np.stack(cols, 1)
        mean, scale = head.mean.cpu().numpy(), head.scale.cpu().numpy()
        out.append(-(((f - mean) / scale) @ head.coef.cpu().numpy() + head.intercept))
    return np.concatenate(out)


def mahalanobis_scores_script(model, x, det, batch_size=100) -> torch.Tensor:
    """Mahalanobis scores (no pre-processing) computed the way the authors' code does:
    per class, the centred features' B x B Gram matrix through the precision, and its
    diagonal; the layer scores then go through the regression on the host."""
    out = []
    for i in range(0, len(x), batch_size):
        with torch.no_grad():
            acts = model.features_at(x[i:i + batch_size], list(det.layers))
            cols = []
            for a, g in zip(acts, det.gaussians):
                f = (a.flatten(2).mean(2) if a.dim() > 2 else a).double()
                per_class = []
                for mu in g.means:
                    zero_f = f - mu
                    per_class.append(-(zero_f @ g.precision @ zero_f.T).diag())
                cols.append(torch.stack(per_class, 1).max(1).values)
        feats = torch.stack(cols, 1).cpu().numpy()
        head = det.head
        out.append(-(((feats - head.mean.cpu().numpy()) / head.scale.cpu().numpy())
                     @ head.coef.cpu().numpy() + head.intercept))
    return np.concatenate(out)
