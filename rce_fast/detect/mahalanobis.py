"""Mahalanobis detector, after Lee et al., *A Simple Unified Framework for Detecting
Out-of-Distribution Samples and Adversarial Attacks* (NeurIPS 2018).

Per layer l, the activation is averaged over its spatial positions (f_l(x), one value
per channel). From training data: class means mu_{l,c} and ONE covariance shared by
the classes (tied), Sigma_l = (1/N) sum_i (f_l(x_i) - mu_{l,y_i})(...)^T, and its
pseudo-inverse P_l. The layer's confidence score is

    M_l(x) = max_c -(f_l(x) - mu_{l,c})^T P_l (f_l(x) - mu_{l,c}).

Input pre-processing (optional, ``noise`` = the paper's epsilon): the score is taken at
x' = x - noise * sign(grad_x d_l(x)), d_l the distance to the closest class mean, a step
that raises the score of normal inputs more than that of abnormal ones (as in the
authors' code, one step per layer, not clipped to the input box). A logistic regression
on the standardised (M_1, ..., M_L) (the layer ensemble), fitted on clean (and noisy)
inputs against adversarial ones, gives the log-odds of "adversarial"; the detector's
score is minus that (higher = more normal).

Fitting streams over the data once, accumulating per layer C x D sums and a D x D
scatter matrix in float64: memory does not grow with the data.
"""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._args import check_has_data, check_seed
from .._modes import model_in_eval_mode
from ._layered import (LayerDetector, as_numpy, check_float, check_inputs, check_int,
                       check_model, check_same_shape, model_device, resolve_layers)
from ._logreg import LinearHead, _check_C, fit_logistic


def pool(activation: Tensor) -> Tensor:
    """(B, C, ...) -> (B, C): the mean over spatial positions; (B, D) unchanged."""
    return activation.flatten(2).mean(2) if activation.dim() > 2 else activation


class _LayerGaussian:
    """Class means and tied precision of one layer, with the whitened form used to score."""

    def __init__(self, means: Tensor, precision: Tensor) -> None:
        self.means = means            # (C, D) float64
        self.precision = precision    # (D, D) float64
        w, v = torch.linalg.eigh(0.5 * (precision + precision.T))
        self.whiten = v * w.clamp(min=0).sqrt()           # P = W W^T
        self.center = means.mean(0)
        self._cache: dict = {}

    def _on(self, device, dtype):
        key = (device, dtype)
        if key not in self._cache:
            mu = (self.means - self.center) @ self.whiten
            self._cache[key] = (self.whiten.to(device, dtype), self.center.to(device, dtype),
                                mu.to(device, dtype), (mu * mu).sum(1).to(device, dtype))
        return self._cache[key]

    def sq_distances(self, f: Tensor) -> Tensor:
        """(B, C) Mahalanobis distances (f - mu_c)^T P (f - mu_c), float32 (float64 for
        float64 features), differentiable w.r.t. f."""
        dt = torch.float64 if f.dtype == torch.float64 else torch.float32
        w, c, mu, mu2 = self._on(f.device, dt)
        g = (f.to(dt) - c) @ w
        return ((g * g).sum(1, keepdim=True) + mu2[None] - 2.0 * (g @ mu.T)).clamp(min=0.0)

    def to(self, device) -> "_LayerGaussian":
        out = _LayerGaussian(self.means.to(device), self.precision.to(device))
        return out


class MahalanobisDetector(LayerDetector):
    """Mahalanobis detector (Lee et al. 2018) with the KDensityDetector-style API.

    Args:
        layers: layer names of the model; default ``model.stage_layers`` (the stem, the
            ends of the first two stages and the last hidden layer for the ResNets here,
            as the paper reads a ResNet), else ("features",).
        noise: the input pre-processing magnitude (the paper's epsilon, searched over
            0 ... 0.005 for inputs in [0, 1]); 0 turns it off.
        C: inverse L2 strength of the layer-ensemble regression; None = 5-fold CV.
        seed: seed of the CV split.

    ``fit(model, x, y, adversarial, noisy)`` -> ``score(model, x)`` ->
    ``fit_threshold(model, heldout_clean, fpr)`` -> ``detect(model, x)``;
    ``layer_scores(model, x)`` gives the per-layer M_l; ``score_inputs(model, x)`` gives
    (decision logits, scores) of one batch, differentiable (the pre-processing step's
    sign has zero gradient, so d x'/d x is the identity); ``save`` / ``load``.
    """
    kind = "mahalanobis"

    def __init__(self, layers=None, noise: float = 0.0, C: float | None = None,
                 seed: int = 0) -> None:
        if isinstance(layers, str):
            raise TypeError("layers must be a sequence of layer names, not one string")
        self.layers = None if layers is None else tuple(layers)
        self.noise = check_float(noise, "noise")
        self.C = _check_C(C)
        self.seed = check_seed(seed)
        self.fitted = False
        self.threshold = None
        self.gaussians: list[_LayerGaussian] = []
        self.head: LinearHead | None = None
        self.num_classes: int | None = None
        self.device = torch.device("cpu")

    # -- per-layer scores
    def _ask(self) -> list[str]:
        names = list(self.layers)
        return names if "logits" in names else names + ["logits"]

    def _layer_score(self, i: int, activation: Tensor) -> Tensor:
        return -self.gaussians[i].sq_distances(pool(activation)).min(1).values

    def _scores_and_logits(self, model, x: Tensor) -> tuple[Tensor, Tensor]:
        with model_in_eval_mode(model):  # running statistics, never updated
            return self._scores_and_logits_eval(model, x)

    def _scores_and_logits_eval(self, model, x: Tensor) -> tuple[Tensor, Tensor]:
        ask = self._ask()
        if self.noise == 0.0:
            outs = model.features_at(x, ask)
            logits = outs[ask.index("logits")]
            self._check_device(logits.device)
            cols = [self._layer_score(i, outs[i]) for i in range(len(self.layers))]
            return torch.stack(cols, 1), logits
        # Pre-processing: one forward to every layer, one input gradient per layer (of the
        # distance to the closest class mean there), then the layer's score at
        # x - noise * sign(gradient). The sign has zero derivative, so the scores stay
        # differentiable w.r.t. x with d x' / d x = identity.
        track = torch.is_grad_enabled() and x.requires_grad
        with torch.enable_grad():
            xg = x if track else x.detach().requires_grad_(True)
            outs = model.features_at(xg, ask)
            logits = outs[ask.index("logits")]
            self._check_device(logits.device)
            steps = []
            for i in range(len(self.layers)):
                d2 = self.gaussians[i].sq_distances(pool(outs[i]))
                (grad,) = torch.autograd.grad(d2.min(1).values.sum(), [xg],
                                              retain_graph=True)
                steps.append(grad.sign().to(x.dtype))
        if not track:
            logits = logits.detach()
        cols = []
        for i, name in enumerate(self.layers):
            xh = x - self.noise * steps[i]
            cols.append(self._layer_score(i, model.features_at(xh, [name])[0]))
        return torch.stack(cols, 1), logits

    def layer_scores(self, model, x: Tensor) -> Tensor:
        """(B, n_layers) confidence scores M_l of one batch (after pre-processing when
        ``noise`` > 0); differentiable w.r.t. ``x``."""
        self._require_gaussians()
        return self._scores_and_logits(model, x)[0]

    def score_inputs(self, model, x: Tensor) -> tuple[Tensor, Tensor]:
        """(decision logits (B, L), scores (B,)) of one batch."""
        self._require_fit()
        m, logits = self._scores_and_logits(model, x)
        return logits, -self.head.logit(m)

    def _require_gaussians(self) -> None:
        if not self.gaussians:
            raise RuntimeError("MahalanobisDetector is not fitted: call fit(...) first")

    # -- fitting
    def _fit_gaussians(self, model, x: Tensor, y: Tensor, num_classes: int, batch_size: int,
                       progress: bool) -> None:
        device = model_device(model)
        n_layers = len(self.layers)
        counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        sums, scatter, shift = [None] * n_layers, [None] * n_layers, [None] * n_layers
        for xb, yb in tqdm(list(zip(x.split(batch_size), y.split(batch_size))),
                           desc="Mahalanobis statistics", disable=not progress, leave=False):
            yb = yb.to(device).long()
            with torch.no_grad(), model_in_eval_mode(model):
                outs = model.features_at(xb.to(device), list(self.layers))
            counts.index_add_(0, yb, torch.ones(len(yb), dtype=torch.float64, device=device))
            for i, o in enumerate(outs):
                f = pool(o).double()
                if shift[i] is None:  # accumulate around a shift: less cancellation
                    shift[i] = f.mean(0)
                    sums[i] = torch.zeros(num_classes, f.shape[1], dtype=torch.float64,
                                          device=device)
                    scatter[i] = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64,
                                             device=device)
                f = f - shift[i]
                sums[i].index_add_(0, yb, f)
                scatter[i].addmm_(f.T, f)
        total = counts.sum()
        self.gaussians = []
        for i in range(n_layers):
            means = sums[i] / counts[:, None]
            cov = (scatter[i] - (means.T * counts) @ means) / total
            precision = torch.linalg.pinv(0.5 * (cov + cov.T), hermitian=True)
            self.gaussians.append(_LayerGaussian(means + shift[i], precision))

    def _features_of(self, model, x: Tensor, batch_size: int, progress: bool,
                     desc: str) -> Tensor:
        device = model_device(model)
        out = []
        for xb in tqdm(x.split(batch_size), desc=desc, disable=not progress, leave=False):
            with torch.no_grad():
                out.append(self._scores_and_logits(model, xb.to(device))[0].cpu())
        return torch.cat(out)

    def fit(self, model, x: Tensor, y: Tensor, adversarial: Tensor,
            noisy: Tensor | None = None, clean: Tensor | None = None,
            num_classes: int | None = None, batch_size: int = 256,
            progress: bool = False) -> "MahalanobisDetector":
        """Fit the class-conditional Gaussians on (x, y), then the layer ensemble.

        Args:
            model: rce_fast.models.Classifier (or a module with ``features_at`` and
                ``layer_names``); it runs in eval mode, its modes restored afterwards.
            x, y: (N, ...) training inputs and their TRUE classes (N,).
            adversarial: (Na, ...) adversarial examples (label adversarial).
            noisy: optional (Nn, ...) noisy inputs (label normal).
            clean: clean inputs for the regression (label normal); default ``x``.
                Inputs the Gaussians were not fitted on (a held-out split) give the
                regression clean scores like those it will see at test time.
            num_classes: default max(y) + 1; every class needs training inputs.
        """
        check_model(model)
        check_inputs(x, "x")
        if not isinstance(y, Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise TypeError("y must be an integer tensor of class indices")
        if tuple(y.shape) != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        check_inputs(adversarial, "adversarial")
        check_same_shape(adversarial, x, "adversarial", "x")
        for name, extra in (("noisy", noisy), ("clean", clean)):
            if extra is not None:
                check_inputs(extra, name)
                check_same_shape(extra, x, name, "x")
        batch_size = check_int(batch_size, "batch_size", 1)
        check_has_data(y, "y")
        y_cpu = y.cpu().long()
        if int(y_cpu.min()) < 0:
            raise ValueError(f"y holds a negative class index ({int(y_cpu.min())})")
        # the classes present, sorted: cost follows the rows, never the label values
        present = torch.unique(y_cpu).tolist()
        c = present[-1] + 1 if num_classes is None else check_int(num_classes,
                                                                   "num_classes", 1)
        if present[-1] >= c:
            raise ValueError(f"y holds class {present[-1]} >= num_classes={c}")
        if len(present) < c:
            have, missing = set(present), []
            for k in range(c):
                if k not in have:
                    missing.append(k)
                    if len(missing) == 20:
                        break
            more = "" if c - len(present) <= 20 else f" (and {c - len(present) - 20} more)"
            raise ValueError(f"every class of y needs training inputs; classes {missing}"
                             f"{more} have none")
        self.layers = resolve_layers(model, self.layers, tuple(model.stage_layers))
        self.num_classes = c
        self._fit_gaussians(model, x, y_cpu, c, batch_size, progress)
        self.device = self.gaussians[0].means.device
        parts = [(x if clean is None else clean, 0, "Mahalanobis clean")]
        if noisy is not None:
            parts.append((noisy, 0, "Mahalanobis noisy"))
        parts.append((adversarial, 1, "Mahalanobis adversarial"))
        feats, labels = [], []
        for inputs, label, desc in parts:
            f = self._features_of(model, inputs, batch_size, progress, desc)
            feats.append(f)
            labels.append(torch.full((len(f),), label, dtype=torch.int64))
        fit = fit_logistic(as_numpy(torch.cat(feats)), torch.cat(labels).numpy(), self.C,
                           self.seed)
        self.head = LinearHead.from_fit(fit, self.device)
        self.input_shape = tuple(x.shape[1:])
        self.fitted = True
        return self

    # -- device and persistence
    def to(self, device) -> "MahalanobisDetector":
        """Move the statistics and the regression to ``device`` (in place)."""
        self.gaussians = [g.to(device) for g in self.gaussians]
        if self.head is not None:
            self.head.to(device)
        if self.gaussians:
            self.device = self.gaussians[0].means.device
        return self

    def state_dict(self) -> dict:
        self._require_fit()
        return {"layers": list(self.layers), "noise": self.noise, "C": self.C,
                "seed": self.seed, "threshold": self.threshold,
                "input_shape": None if self.input_shape is None else list(self.input_shape),
                "num_classes": self.num_classes,
                "means": [g.means.cpu() for g in self.gaussians],
                "precisions": [g.precision.cpu() for g in self.gaussians],
                "head": self.head.state()}

    @classmethod
    def _from_state(cls, state: dict, device: torch.device) -> "MahalanobisDetector":
        det = cls(state["layers"], state["noise"], state["C"], state["seed"])
        det.gaussians = [_LayerGaussian(m.to(device), p.to(device))
                         for m, p in zip(state["means"], state["precisions"])]
        det.head = LinearHead.from_state(state["head"], device)
        det.threshold = state["threshold"]
        det.num_classes = state["num_classes"]
        det.device = det.gaussians[0].means.device
        shape = state.get("input_shape")  # absent in files of older versions
        det.input_shape = None if shape is None else tuple(int(v) for v in shape)
        det.fitted = True
        return det
