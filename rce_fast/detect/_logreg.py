"""The logistic regression on detector features (LID, Mahalanobis), kept as plain arrays.

scikit-learn fits it; the detectors keep only the standardisation (mean, scale), the
coefficients and the intercept as tensors, so scoring runs on the device, and
``save``/``load`` store numbers, never a pickled estimator.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

from .._args import scalar, sklearn_seed

#: The grid of inverse regularisation strengths searched when C is not given.
C_GRID = tuple(float(c) for c in np.logspace(-4, 4, 9))


def _check_C(C) -> float | None:
    if C is None:
        return None
    C = scalar(C)
    if isinstance(C, bool) or not isinstance(C, numbers.Real):
        raise TypeError(f"C must be a finite number > 0 or None (cross-validated), got "
                        f"{type(C).__name__}")
    if not (0 < C < math.inf):
        raise ValueError(f"C must be a finite number > 0 or None (cross-validated), got {C!r}")
    return float(C)


def _fit_one(xs: np.ndarray, y: np.ndarray, C: float):
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(C=C, max_iter=2000, tol=1e-6).fit(xs, y)


def fit_logistic(features: np.ndarray, y: np.ndarray, C: float | None = None, seed: int = 0,
                 folds: int = 5) -> dict:
    """Fit P(adversarial | features) by logistic regression on standardised features.

    Args:
        features: (n, d) float64; y: (n,) 0 = normal (clean or noisy), 1 = adversarial.
        C: inverse L2 strength; None picks it from :data:`C_GRID` by ``folds``-fold
            stratified cross-validation on the log-loss (as LogisticRegressionCV does;
            done here so the behaviour does not change with the scikit-learn version).
    Returns {"mean", "scale", "coef" (d,) float64 arrays, "intercept", "C" floats}.
    """
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be (n, d) with n labels, got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the detector features contain NaN or inf values")
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError("the logistic regression needs both normal and adversarial examples")
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    xs = (x - mean) / scale
    C = _check_C(C)
    if C is None:
        k = int(min(folds, np.bincount(y).min()))
        if k < 2:
            C = 1.0
        else:
            split = StratifiedKFold(n_splits=k, shuffle=True,
                                    random_state=sklearn_seed(seed))
            losses = []
            for c in C_GRID:
                loss = 0.0
                for tr, va in split.split(xs, y):
                    p = _fit_one(xs[tr], y[tr], c).predict_proba(xs[va])[:, 1]
                    loss += log_loss(y[va], p, labels=[0, 1]) * len(va)
                losses.append(loss)
            C = C_GRID[int(np.argmin(losses))]
    model = _fit_one(xs, y, C)
    return {"mean": mean, "scale": scale, "coef": model.coef_[0].astype(np.float64),
            "intercept": float(model.intercept_[0]), "C": float(C)}


class LinearHead:
    """A fitted logistic regression as tensors: ``logit(f) = ((f - mean) / scale) . coef +
    intercept`` (the log-odds of "adversarial")."""

    def __init__(self, mean, scale, coef, intercept: float, C: float,
                 device="cpu") -> None:
        as_t = lambda v: torch.as_tensor(np.asarray(v), dtype=torch.float64).to(device)  # noqa: E731
        self.mean, self.scale, self.coef = as_t(mean), as_t(scale), as_t(coef)
        self.intercept, self.C = float(intercept), float(C)

    @classmethod
    def from_fit(cls, fit: dict, device="cpu") -> "LinearHead":
        return cls(fit["mean"], fit["scale"], fit["coef"], fit["intercept"], fit["C"], device)

    def logit(self, features: Tensor) -> Tensor:
        """(B,) log-odds in the features' dtype (at least float32) from (B, d)."""
        dt = torch.float64 if features.dtype == torch.float64 else torch.float32
        f = features.to(dt)
        return ((f - self.mean.to(dt)) / self.scale.to(dt)) @ self.coef.to(dt) + self.intercept

    def to(self, device) -> "LinearHead":
        self.mean, self.scale, self.coef = (t.to(device) for t in (self.mean, self.scale,
                                                                     self.coef))
        return self

    def state(self) -> dict:
        return {"mean": self.mean.cpu(), "scale": self.scale.cpu(), "coef": self.coef.cpu(),
                "intercept": self.intercept, "C": self.C}

    @classmethod
    def from_state(cls, state: dict, device="cpu") -> "LinearHead":
        return cls(state["mean"].numpy(), state["scale"].numpy(), state["coef"].numpy(),
                   state["intercept"], state["C"], device)
