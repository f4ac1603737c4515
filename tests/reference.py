"""Plain PyTorch references of the maths, shared by the tests and the benchmarks."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reverse_labels(target: torch.Tensor, num_classes: int, dtype=torch.float64) -> torch.Tensor:
    """R_y: 0 at the label, 1/(L-1) elsewhere; (N, L)."""
    r = torch.full((target.shape[0], num_classes), 1.0 / (num_classes - 1), dtype=dtype,
                   device=target.device)
    return r.scatter_(1, target.clamp(min=0).unsqueeze(1), 0.0)


def rce_loss_reference(logits, target, reduction="mean", ignore_index=-100, temperature=1.0,
                       dtype=torch.float64):
    """RCE as the paper writes it: cross_entropy(Z / T, R_y), rows with ignore_index dropped.

    Computed in ``dtype`` (float64 = ground truth; the input dtype = the reference's own
    low-precision error). Returns the loss in ``dtype``. Logits (N, L), target (N,).
    """
    z = logits.to(dtype) / temperature
    keep = target != ignore_index
    r = reverse_labels(torch.where(keep, target, 0), z.shape[1], dtype=dtype)
    rows = F.cross_entropy(z, r, reduction="none") * keep
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum()


def rce_loss_closed_form(logits, target, temperature=1.0):
    """logsumexp(u) - mean_{j != y} u_j in float64, per row."""
    u = logits.double() / temperature
    num_classes = u.shape[1]
    return torch.logsumexp(u, 1) - (u.sum(1) - u.gather(1, target[:, None]).squeeze(1)) / (
        num_classes - 1)


def rce_grad_reference(logits, target, ignore_index=-100, temperature=1.0,
                       dtype=torch.float64):
    """d loss_i / d logits_i = (softmax(Z_i / T) - R_y) / T per row, 0 for ignored rows,
    computed in ``dtype`` from the closed form (no autograd: the autograd of
    rce_loss_reference carries sum_j R_j, which float sums of L - 1 copies of 1/(L-1)
    miss 1 by ~1e-12 at L = 10^5 in float64). (N, L)."""
    u = logits.to(dtype) / temperature
    keep = target != ignore_index
    r = reverse_labels(torch.where(keep, target, 0), u.shape[1], dtype=dtype)
    grad = (torch.softmax(u, 1) - r) / temperature
    return torch.where(keep.unsqueeze(1), grad, torch.zeros_like(grad))


def kdensity_reference(q, bank, bank_labels, query_classes, sigma2):
    """log mean_{j: class match} exp(-||q_i - x_j||^2 / sigma2), brute force (N x M) in the
    inputs' dtype (use float64 inputs for ground truth)."""
    d2 = ((q[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
    logits = (-d2 / sigma2).masked_fill(bank_labels[None, :] != query_classes[:, None],
                                        float("-inf"))
    count = (bank_labels[None, :] == query_classes[:, None]).sum(1)
    return torch.logsumexp(logits, 1) - count.to(logits.dtype).log()


def jsma_pairs_reference(alpha, beta, domain, increase):
    """Brute-force JSMA pair search over the full n x n pair matrix (tests only).

    Best (alpha_p + alpha_q) * -(beta_p + beta_q) over p < q in the domain, with
    alpha_p + alpha_q > 0 and beta_p + beta_q < 0 (signs flipped when not ``increase``);
    ties to the lowest (p, q); (-1, -1) when no pair qualifies. float32 arithmetic.
    """
    batch, n = alpha.shape
    out = torch.full((batch, 2), -1, dtype=torch.int64)
    a, b, d = alpha.float().cpu(), beta.float().cpu(), domain.bool().cpu()
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    for i in range(batch):
        sa = a[i][:, None] + a[i][None, :]
        sb = b[i][:, None] + b[i][None, :]
        ok = (sa > 0) & (sb < 0) if increase else (sa < 0) & (sb > 0)
        ok &= upper & d[i][:, None] & d[i][None, :]
        if not ok.any():
            continue
        score = torch.where(ok, sa * -sb, float("-inf"))
        flat = int(torch.argmax(score))
        out[i, 0], out[i, 1] = flat // n, flat % n
    return out


def jsma_attack_reference(model, x, target, theta=1.0, gamma=0.1, clip=(-0.5, 0.5),
                          use_logits=True):
    """JSMA one image at a time with the brute-force pair search (tests only)."""
    lo, hi = clip
    out = []
    n = x[0].numel()
    budget = int(gamma * n) // 2
    for i in range(x.shape[0]):
        xi = x[i:i + 1].detach().reshape(1, n).clone()
        t = int(target[i])
        domain = (xi < hi) if theta > 0 else (xi > lo)
        for _ in range(budget):
            xr = xi.reshape(1, *x.shape[1:]).requires_grad_(True)
            z = model(xr)
            if not use_logits:
                z = torch.softmax(z, 1)
            if int(z.argmax(1)) == t:
                break
            (ga,) = torch.autograd.grad(z[0, t], xr, retain_graph=True)
            (gall,) = torch.autograd.grad(z.sum(), xr)
            alpha = ga.reshape(1, n).float()
            beta = (gall - ga).reshape(1, n).float()
            p, q = jsma_pairs_reference(alpha, beta, domain, theta > 0)[0].tolist()
            if p < 0:
                break
            for f in (p, q):
                xi[0, f] = min(hi, max(lo, float(xi[0, f]) + theta * (hi - lo)))
                domain[0, f] = False
        out.append(xi.reshape(x.shape[1:]))
    return torch.stack(out)


def cw_l2_reference(model, x, target, c, steps, kappa=0.0, lr=1e-2, clip=(-0.5, 0.5)):
    """Targeted C&W L2 with one fixed c, written plainly (tests only): autograd through the
    whole loss ||x' - x||^2 + c max(max_{i != t} Z_i - Z_t + kappa, 0) over the tanh
    variable, torch's Adam, no abort; per example the smallest-L2 iterate classified as
    the target with margin kappa (the input itself when none was)."""
    lo, hi = clip
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    x = x.detach().float()
    w = torch.atanh(((x - mid) / half).clamp(-1 + 1e-6, 1 - 1e-6)).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    best_l2 = torch.full((x.shape[0],), float("inf"))
    best = x.clone()
    for _ in range(steps):
        xp = torch.tanh(w) * half + mid
        z = model(xp).float()
        real = z.gather(1, target[:, None]).squeeze(1)
        other = z.scatter(1, target[:, None], float("-inf")).amax(1)
        margin = other - real + kappa
        l2 = ((xp - x) ** 2).flatten(1).sum(1)
        loss = (l2 + c * margin.clamp(min=0)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            # reached: margin (+ kappa) <= 0, and a tie at kappa = 0 is no success
            better = (margin <= 0) & (margin < kappa) & (l2 < best_l2)
            best_l2 = torch.where(better, l2, best_l2)
            best[better] = xp[better]
    return best, best_l2


# ------------------------------------------------------------------ detection scores

def confidence_reference(decision_logits, dtype=torch.float64):
    """max_i softmax(z)_i per row, plainly, computed in ``dtype``; (N,)."""
    return torch.softmax(decision_logits.to(dtype), 1).amax(1)


def non_me_reference(decision_logits, dtype=torch.float64):
    """Non-maximal entropy, one row at a time, in ``dtype``: drop the top class, renormalise
    the other probabilities (p_i / sum_{j != top} p_j is the softmax of the other logits:
    the common factor cancels, so nothing underflows to 0 / 0), -sum q log q with
    0 log 0 = 0. (N,)."""
    out = []
    for row in decision_logits.to(dtype):
        top = int(torch.argmax(row))
        q = torch.softmax(torch.cat([row[:top], row[top + 1:]]), 0)
        terms = q * torch.log(q)
        out.append(-torch.where(q > 0, terms, torch.zeros_like(terms)).sum())
    return torch.stack(out)


# ----------------------------------------------------------------------- AUC protocol

def auc_reference(pos, neg):
    """P(pos > neg) + P(pos == neg) / 2 over every (pos, neg) pair, by brute force (float64
    NumPy); nan when a side is empty. Works with +-inf scores."""
    import numpy as np
    pos, neg = np.asarray(pos, np.float64).ravel(), np.asarray(neg, np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return float(psi.mean())


def auc_se_reference(pos, neg):
    """DeLong et al. (1988) standard error of the AUC from the pairwise kernel psi, by brute
    force: V10_i = mean_j psi(pos_i, neg_j), V01_j = mean_i psi(pos_i, neg_j),
    se = sqrt(var(V10) / m + var(V01) / n) (sample variances); nan when m < 2 or n < 2."""
    import numpy as np
    pos, neg = np.asarray(pos, np.float64).ravel(), np.asarray(neg, np.float64).ravel()
    m, n = pos.size, neg.size
    if m < 2 or n < 2:
        return float("nan")
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return float(np.sqrt(psi.mean(1).var(ddof=1) / m + psi.mean(0).var(ddof=1) / n))


def paper_auc_reference(clean_scores, adv_scores, labels, clean_pred, adv_pred):
    """The paper's Table 2 protocol, one index at a time: keep i when clean_pred[i] ==
    labels[i] != adv_pred[i]; AUC of the kept clean scores (positive, normal) against the
    kept adversarial scores by scikit-learn's roc_auc_score. Returns (n kept, AUC), the
    AUC nan when nothing is kept. Arguments: 1-D NumPy arrays."""
    import numpy as np
    from sklearn.metrics import roc_auc_score
    pos, neg = [], []
    for i in range(len(labels)):
        if clean_pred[i] == labels[i] and adv_pred[i] != labels[i]:
            pos.append(float(clean_scores[i]))
            neg.append(float(adv_scores[i]))
    if not pos:
        return 0, float("nan")
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    return len(pos), float(roc_auc_score(y, np.r_[pos, neg]))


def detection_rates_reference(clean, adv, fprs):
    """Brute-force rates of rce_fast.detect.detection_metrics (scores higher = more normal,
    an input flagged when its score is below a threshold): (FPR at 95% TPR, {f: TPR at FPR
    f}, {f: threshold}). Every threshold t in the scores and +inf is tried:
    - FPR at 95% TPR: the smallest share of clean scores <= s over the score values s
      with a share of adversarial scores <= s of at least 0.95;
    - threshold at f: the largest t with a share of clean scores below t of at most f;
    - TPR at f: the largest share of adversarial scores below t over those t."""
    import numpy as np
    clean, adv = np.asarray(clean, np.float64), np.asarray(adv, np.float64)
    values = np.unique(np.concatenate([clean, adv]))
    fpr95 = min(float(np.sum(clean <= s) / len(clean)) for s in values
                if np.sum(adv <= s) / len(adv) >= 0.95)
    cands = np.concatenate([values, [np.inf]])
    tpr, thr = {}, {}
    for f in fprs:
        ok = [t for t in cands if np.sum(clean < t) / len(clean) <= f]
        thr[f] = float(max(t for t in ok if t == np.inf or t in clean))
        tpr[f] = max(float(np.sum(adv < t) / len(adv)) for t in ok)
    return fpr95, tpr, thr
