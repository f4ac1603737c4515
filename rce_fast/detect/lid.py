"""Local intrinsic dimensionality (LID) detector, after Ma et al., *Characterizing
Adversarial Subspaces Using Local Intrinsic Dimensionality* (ICLR 2018).

For an input x and a layer l, with r_1 <= ... <= r_k the Euclidean distances from the
layer's (flattened) activation of x to its k nearest neighbours in a minibatch of
NORMAL data, the maximum-likelihood estimate is

    LID_l(x) = -( (1/k) sum_i log(r_i / r_k) )^(-1).

The LID of every chosen layer forms a feature vector, and a logistic regression on
standardised features, fitted on clean and noisy (label normal) and adversarial (label
adversarial) training examples as the paper does, gives the log-odds of "adversarial".
The detector's score is minus that log-odds (higher = more normal, as everywhere in
rce_fast).

The paper estimates each minibatch's LIDs against that same minibatch of clean data.
A deployed detector has no clean counterpart of a test input, so here the minibatches
of normal data are fixed at fit time (``reference_batches`` batches of ``batch_size``
training inputs, drawn with the seed) and every input's LID is its estimate against
each of them, averaged. The reference activations are stored (memory does not grow
with the data scored), and scoring is batched on the device.
"""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._args import check_clip, check_seed
from .._modes import model_in_eval_mode
from ._layered import (LayerDetector, as_numpy, check_inputs, check_int, check_model,
                       check_same_shape, model_device, resolve_layers)
from ._logreg import LinearHead, _check_C, fit_logistic

_TINY = 1e-12


def lid_from_sq_distances(d2: Tensor, k: int) -> Tensor:
    """LID estimates (B,) from squared distances (B, M) to M >= k reference points.

    Uses the k smallest: -k / sum_i log(r_i / r_k) with log(r_i / r_k) =
    (log r_i^2 - log r_k^2) / 2; distances are floored at 1e-6 (squared 1e-12) so a
    duplicate of a reference point gives a finite value. Differentiable (a.e.).
    """
    nearest = torch.topk(d2.clamp(min=_TINY), k, dim=1, largest=False, sorted=True).values
    logs = nearest.log()
    total = 0.5 * (logs - logs[:, -1:]).sum(1)            # <= 0
    return -k / total.clamp(max=-_TINY)


def _sq_distances(a: Tensor, b: Tensor, center: Tensor) -> Tensor:
    """||a_i - b_j||^2 (B, M), centred first so the expanded form keeps its accuracy."""
    a = a - center
    b = b - center
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2.0 * (a @ b.T)).clamp_(
        min=0.0)


def noisy_like(x: Tensor, x_adv: Tensor, seed: int = 0, clip=(-0.5, 0.5)) -> Tensor:
    """Noisy counterparts of ``x`` for fitting LID / Mahalanobis: Gaussian noise with, per
    input, the same L2 norm as the adversarial perturbation ``x_adv - x`` (Ma et al.
    tuned their noise to match the adversarial distortion), clipped to ``clip``.
    Deterministic given ``seed``; same shape, dtype and device as ``x``."""
    check_inputs(x, "x")
    check_inputs(x_adv, "x_adv")
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv must have x's shape {tuple(x.shape)}, got "
                         f"{tuple(x_adv.shape)}")
    lo, hi = check_clip(clip)
    g = torch.Generator(device=x.device).manual_seed(check_seed(seed))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    noise = torch.randn(x.shape, generator=g, device=x.device, dtype=torch.float32).to(acc)
    want = (x_adv.to(acc) - x.to(acc)).flatten(1).norm(dim=1)
    have = noise.flatten(1).norm(dim=1).clamp(min=1e-12)
    noise = noise * (want / have).view(-1, *[1] * (x.dim() - 1))
    return (x.to(acc) + noise).clamp(lo, hi).to(x.dtype)


class LIDDetector(LayerDetector):
    """LID detector (Ma et al. 2018) with the KDensityDetector-style API.

    Args:
        k: nearest neighbours per estimate (the paper: 20 for MNIST-like data).
        batch_size: size of each minibatch of normal reference data (the paper: 100).
        reference_batches: how many reference minibatches to average the LID over.
        layers: layer names of the model (``model.layer_names``); default all of them,
            as the paper uses every layer's output.
        C: inverse L2 strength of the logistic regression; None = 5-fold CV over
            1e-4 ... 1e4 on the log-loss.
        seed: seed of the reference draw and of the CV split.

    ``fit(model, clean, adversarial, noisy)`` -> ``score(model, x)`` (higher = more
    normal) -> ``fit_threshold(model, heldout_clean, fpr)`` -> ``detect(model, x)``;
    ``score_inputs(model, x)`` gives (decision logits, scores) of one batch,
    differentiable (GuardedClassifier uses it); ``save`` / ``load``.
    """
    kind = "lid"

    def __init__(self, k: int = 20, batch_size: int = 100, reference_batches: int = 1,
                 layers=None, C: float | None = None, seed: int = 0) -> None:
        self.k = check_int(k, "k", 1)
        self.batch_size = check_int(batch_size, "batch_size", 2)
        if self.k > self.batch_size:
            raise ValueError(f"k={k} needs batch_size >= k reference points, got "
                             f"batch_size={batch_size}")
        self.reference_batches = check_int(reference_batches, "reference_batches", 1)
        if isinstance(layers, str):
            raise TypeError("layers must be a sequence of layer names, not one string")
        self.layers = None if layers is None else tuple(layers)
        self.C = _check_C(C)
        self.seed = check_seed(seed)
        self.fitted = False
        self.threshold = None
        self.references: list[Tensor] = []     # per layer: (R, batch_size, D_l)
        self.centers: list[Tensor] = []        # per layer: (D_l,)
        self.reference_index: Tensor | None = None   # rows of the source drawn, (R * B,)
        self.head: LinearHead | None = None
        self.device = torch.device("cpu")

    # -- features
    def _activations(self, model, x: Tensor) -> tuple[list[Tensor], Tensor]:
        names = list(self.layers)
        ask = names if "logits" in names else names + ["logits"]
        with model_in_eval_mode(model):  # running statistics, never updated
            outs = model.features_at(x, ask)
        acts = [o.flatten(1) for o in outs[:len(names)]]
        logits = outs[ask.index("logits")]
        return acts, logits

    def _lid_of(self, acts: list[Tensor]) -> Tensor:
        cols = []
        for a, ref, c in zip(acts, self.references, self.centers):
            self._check_device(a.device)
            dt = torch.float64 if a.dtype == torch.float64 else torch.float32
            a, ref, c = a.to(dt), ref.to(dt), c.to(dt)
            est = sum(lid_from_sq_distances(_sq_distances(a, ref[r], c), self.k)
                      for r in range(ref.shape[0]))
            cols.append(est / ref.shape[0])
        return torch.stack(cols, 1)

    def lid_features(self, model, x: Tensor) -> Tensor:
        """(B, n_layers) LID of one batch against the reference minibatches (float32, or
        float64 for a float64 model); differentiable w.r.t. ``x``."""
        self._require_references()
        return self._lid_of(self._activations(model, x)[0])

    def score_inputs(self, model, x: Tensor) -> tuple[Tensor, Tensor]:
        """(decision logits (B, L), scores (B,)) of one batch from ONE forward pass."""
        self._require_fit()
        acts, logits = self._activations(model, x)
        return logits, -self.head.logit(self._lid_of(acts))

    def _require_references(self) -> None:
        if not self.references:
            raise RuntimeError("LIDDetector is not fitted: call fit(...) first")

    # -- fitting
    def _features_of(self, model, x: Tensor, batch_size: int, progress: bool, desc: str):
        device = model_device(model)
        out = []
        for xb in tqdm(x.split(batch_size), desc=desc, disable=not progress, leave=False):
            with torch.no_grad():
                out.append(self._lid_of(self._activations(model, xb.to(device))[0]).cpu())
        return torch.cat(out)

    def fit(self, model, clean: Tensor, adversarial: Tensor, noisy: Tensor | None = None,
            reference: Tensor | None = None, batch_size: int = 256,
            progress: bool = False) -> "LIDDetector":
        """Draw the reference minibatches and fit the logistic regression.

        Args:
            model: rce_fast.models.Classifier (or any module with ``features_at`` and
                ``layer_names``); it runs in eval mode, its modes restored afterwards.
            clean: (N, ...) clean training inputs (label normal).
            adversarial: (Na, ...) adversarial examples (label adversarial), as in the
                paper crafted from clean training inputs: when ``reference`` is None and
                Na == N, row i is taken to be crafted from ``clean[i]``.
            noisy: optional (Nn, ...) noisy inputs (label normal), e.g. :func:`noisy_like`.
            reference: inputs to draw the normal minibatches from. Default: drawn from
                ``clean``; those rows (and the same rows of ``adversarial`` / ``noisy``
                when they have N rows) are then left out of the regression, so no
                training input is compared with itself or its own source.
            batch_size: inputs per forward pass.

        Returns self. ``reference_index`` keeps the rows of the reference (or clean)
        inputs that were drawn, ``references`` their activations per layer.
        """
        check_model(model)
        check_inputs(clean, "clean")
        check_inputs(adversarial, "adversarial")
        check_same_shape(adversarial, clean, "adversarial", "clean")
        if noisy is not None:
            check_inputs(noisy, "noisy")
            check_same_shape(noisy, clean, "noisy", "clean")
        if reference is not None:
            check_inputs(reference, "reference")
            check_same_shape(reference, clean, "reference", "clean")
        batch_size = check_int(batch_size, "batch_size", 1)
        self.layers = resolve_layers(model, self.layers, tuple(model.layer_names))
        device = model_device(model)
        need = self.reference_batches * self.batch_size
        g = torch.Generator().manual_seed(self.seed)
        source = clean if reference is None else reference
        if len(source) < need + (1 if reference is None else 0):
            raise ValueError(f"{'clean' if reference is None else 'reference'} has "
                             f"{len(source)} inputs; {need} reference inputs "
                             f"({self.reference_batches} x {self.batch_size})"
                             f"{' plus some for the regression' if reference is None else ''}"
                             " are needed")
        picked = torch.randperm(len(source), generator=g)[:need]
        self.reference_index = picked.clone()
        with torch.no_grad():
            acts = [self._activations(model, source[picked[i:i + batch_size]].to(device))[0]
                    for i in range(0, need, batch_size)]
        per_layer = [torch.cat([a[j] for a in acts]) for j in range(len(self.layers))]
        self.references = [p.reshape(self.reference_batches, self.batch_size, -1)
                           for p in per_layer]
        self.centers = [p.mean(0) for p in per_layer]
        self.device = per_layer[0].device

        keep = None
        if reference is None:
            keep = torch.ones(len(clean), dtype=torch.bool)
            keep[picked] = False
            clean = clean[keep]

        def rows(x):
            return x[keep] if keep is not None and len(x) == len(keep) else x

        parts = [(clean, 0, "LID clean")]
        if noisy is not None:
            parts.append((rows(noisy), 0, "LID noisy"))
        parts.append((rows(adversarial), 1, "LID adversarial"))
        feats, labels = [], []
        for x, label, desc in parts:
            f = self._features_of(model, x, batch_size, progress, desc)
            feats.append(f)
            labels.append(torch.full((len(f),), label, dtype=torch.int64))
        fit = fit_logistic(as_numpy(torch.cat(feats)), torch.cat(labels).numpy(), self.C,
                           self.seed)
        self.head = LinearHead.from_fit(fit, device)
        self.input_shape = tuple(clean.shape[1:])
        self.fitted = True
        return self

    # -- device and persistence
    def to(self, device) -> "LIDDetector":
        """Move the reference activations and the regression to ``device`` (in place)."""
        device = torch.device(device)
        self.references = [r.to(device) for r in self.references]
        self.centers = [c.to(device) for c in self.centers]
        if self.head is not None:
            self.head.to(device)
        self.device = self.references[0].device if self.references else device
        return self

    def state_dict(self) -> dict:
        self._require_fit()
        return {"k": self.k, "batch_size": self.batch_size,
                "reference_batches": self.reference_batches, "layers": list(self.layers),
                "C": self.C, "seed": self.seed, "threshold": self.threshold,
                "input_shape": None if self.input_shape is None else list(self.input_shape),
                "references": [r.cpu() for r in self.references],
                "centers": [c.cpu() for c in self.centers], "head": self.head.state(),
                "reference_index": self.reference_index}

    @classmethod
    def _from_state(cls, state: dict, device: torch.device) -> "LIDDetector":
        det = cls(state["k"], state["batch_size"], state["reference_batches"],
                  state["layers"], state["C"], state["seed"])
        det.references = [r.to(device) for r in state["references"]]
        det.centers = [c.to(device) for c in state["centers"]]
        det.head = LinearHead.from_state(state["head"], device)
        det.reference_index = state["reference_index"]
        det.threshold = state["threshold"]
        det.device = det.references[0].device
        shape = state.get("input_shape")  # absent in files of older versions
        det.input_shape = None if shape is None else tuple(int(v) for v in shape)
        det.fitted = True
        return det
