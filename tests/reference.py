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
            better = (margin <= 0) & (l2 < best_l2)
            best_l2 = torch.where(better, l2, best_l2)
            best[better] = xp[better]
    return best, best_l2
