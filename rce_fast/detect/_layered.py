"""What the layer-feature detectors (LID, Mahalanobis) share: input checks, layer choice,
streaming over batches, thresholds, and safe persistence."""
from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._args import check_device, check_has_data, check_int, check_real, scalar  # noqa: F401
from .._io import atomic_torch_save, check_writable, safe_torch_load
from .._torch_impl import all_finite
from .rates import threshold_at_fpr


def check_inputs(x, name: str) -> None:
    """A non-empty floating batch (B, ...) with no NaN / inf."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor batch of inputs, got "
                        f"{type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be a batch of shape (B, ...), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    check_has_data(x, name)
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or inf values")


def check_same_shape(x: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    if tuple(x.shape[1:]) != tuple(ref.shape[1:]):
        raise ValueError(f"{name} has inputs of shape {tuple(x.shape[1:])}, {ref_name} "
                         f"{tuple(ref.shape[1:])}")


def check_model(model) -> None:
    if not callable(getattr(model, "features_at", None)) or \
            getattr(model, "layer_names", None) is None:
        raise TypeError("model must expose per-layer activations: features_at(x, layers) "
                        "and layer_names (rce_fast.models.Classifier has them), got "
                        f"{type(model).__name__}")


def resolve_layers(model, layers, default: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(model.layer_names)
    chosen = tuple(default if layers is None else layers)
    if isinstance(layers, str):
        raise TypeError("layers must be a sequence of layer names, not one string")
    if not chosen:
        raise ValueError("layers is empty: the detector needs at least one layer")
    for name in chosen:
        if name not in names:
            raise ValueError(f"unknown layer {name!r}; the model has {list(names)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers has duplicates: {list(chosen)}")
    return chosen


def check_float(value, name: str, minimum: float = 0.0, allow_equal: bool = True) -> float:
    value = scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(value) or value < minimum or (value == minimum and
                                                           not allow_equal):
        op = ">=" if allow_equal else ">"
        raise ValueError(f"{name} must be a finite number {op} {minimum}, got {value!r}")
    return float(value)


def model_device(model) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class LayerDetector:
    """Base of LIDDetector and MahalanobisDetector: everything but the features.

    Subclasses define ``score_inputs(model, x) -> (decision logits, scores)`` for one
    batch (differentiable when autograd is on), ``state_dict`` / ``_from_state``.
    """
    kind = "layer"

    threshold: float | None = None
    input_shape: tuple | None = None   # the shape of one input the detector was fitted on

    def _require_fit(self) -> None:
        if not getattr(self, "fitted", False):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(...) first")

    def _check_device(self, device: torch.device) -> None:
        if device != self.device:
            raise ValueError(f"the detector is on {self.device} but the activations are on "
                             f"{device}: call detector.to({str(device)!r})")

    def score(self, model, x: Tensor, batch_size: int | None = None,
              progress: bool = False) -> Tensor:
        """Scores (N,) of inputs ``x`` (higher = more normal).

        ``batch_size=None``: one batch, on the model's device (differentiable when
        autograd is on). Otherwise batches of ``batch_size`` are moved to the model's
        device in turn under ``torch.no_grad`` and the scores come back on ``x``'s
        device as float64: device memory does not grow with N.
        """
        self._require_fit()
        check_model(model)
        check_inputs(x, "x")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x has inputs of shape {tuple(x.shape[1:])}, the detector was "
                             f"fitted on inputs of shape {self.input_shape}")
        if batch_size is None:
            return self.score_inputs(model, x.to(model_device(model)))[1]
        batch_size = check_int(batch_size, "batch_size", 1)
        device = model_device(model)
        out = []
        for xb in tqdm(x.split(batch_size), desc=f"{self.kind} scores", disable=not progress,
                       leave=False):
            with torch.no_grad():
                out.append(self.score_inputs(model, xb.to(device))[1].double().to(x.device))
        return torch.cat(out)

    def fit_threshold(self, model, clean: Tensor, fpr: float = 0.05,
                      batch_size: int = 512) -> float:
        """Threshold flagging at most a fraction ``fpr`` of the held-out ``clean`` inputs:
        :func:`rce_fast.detect.threshold_at_fpr` of their scores (flag ``score < t``)."""
        scores = self.score(model, clean, batch_size=batch_size)
        self.threshold = threshold_at_fpr(scores, fpr)
        return self.threshold

    def detect(self, model, x: Tensor, threshold: float | None = None,
               batch_size: int = 512) -> Tensor:
        """Boolean "adversarial" decision per input: score below the threshold."""
        self._require_fit()
        thr = self.threshold if threshold is None else check_real(threshold, "threshold")
        if thr is None:
            raise RuntimeError("no threshold: pass threshold= or call fit_threshold first")
        return self.score(model, x, batch_size=batch_size) < thr

    # -- persistence: tensors, numbers, strings only (torch.load(weights_only=True))
    def save(self, path) -> None:
        """Write the fitted detector (tensors and plain numbers; no pickled objects)."""
        self._require_fit()
        check_writable(path, "detector")
        state = self.state_dict()
        state["kind"] = self.kind
        atomic_torch_save(state, path)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu"):
        """Read a detector written by :meth:`save` (``weights_only=True``: no code runs)."""
        path = Path(path)
        device = check_device(device)
        state = safe_torch_load(path, f"a {cls.__name__} file ({cls.__name__}.save)")
        if not isinstance(state, dict) or state.get("kind") != cls.kind:
            found = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path} does not hold a {cls.__name__} (kind {found!r})")
        try:
            return cls._from_state(state, device)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as exc:
            raise ValueError(f"{path}: not a valid {cls.__name__} file ({type(exc).__name__}: "
                             f"{exc})") from None


def as_numpy(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()
