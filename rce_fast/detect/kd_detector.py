"""The K-density detector (Pang et al. 2018): a per-class kernel bank of training
features, scored in log space."""
from __future__ import annotations

import numbers
from typing import Iterable, Iterator

import torch
from torch import Tensor

from .._args import check_int, check_real, check_seed, scalar
from ._checks import _check_features, _check_labels, _check_sigma2
from .kdensity import BankIndex, build_bank_index, kdensity_indexed

#: Kernel widths sigma2 of the authors' release, by training objective.
DEFAULT_SIGMA2 = {"rce": 0.1 / 0.26, "ce": 1.0 / 0.26}


def _sample_per_class(labels: Tensor, per_class: int, generator: torch.Generator,
                      num_classes: int | None = None) -> Tensor:
    """Indices of up to ``per_class`` rows of every class present in ``labels``, drawn
    without replacement, classes in ascending order (one stable sort: the cost follows
    the rows, not the label values). ``num_classes`` is accepted for compatibility."""
    labels_cpu = labels.long().cpu()
    order = torch.argsort(labels_cpu, stable=True)
    _, counts = torch.unique_consecutive(labels_cpu[order], return_counts=True)
    picks, start = [], 0
    for count in counts.tolist():
        idx = order[start:start + count]  # ascending row positions of one class
        start += count
        if count > per_class:
            idx = idx[torch.randperm(count, generator=generator)[:per_class]].sort().values
        picks.append(idx)
    return torch.cat(picks).to(labels.device) if picks else labels.new_empty(0).long()


def _check_count(value, name: str, minimum: int = 1) -> int:
    return check_int(value, name, minimum)


class KDensityDetector:
    """K-density detector: a per-class kernel bank of training features, scored in log space.

    Args:
        sigma2: kernel width; default the authors' value for ``objective``
            (0.1/0.26 for RCE, 1/0.26 for CE).
        per_class: training features sampled per class into the bank (1000 in the paper).
        seed: seed of the sampling (the detector is deterministic given it).
        objective: "rce" or "ce", used only for the default sigma2.

    ``fit`` -> ``score`` (log K-density, higher = more normal) -> ``fit_threshold`` ->
    ``detect``. ``class_medians`` gives the per-class median threshold of the white-box
    attack (C&W-wb). ``save`` / ``load`` round-trip everything.
    """

    def __init__(self, sigma2: float | None = None, per_class: int = 1000, seed: int = 0,
                 objective: str = "rce") -> None:
        if objective not in DEFAULT_SIGMA2:
            raise ValueError(f"objective must be 'rce' or 'ce', got {objective!r}")
        self.sigma2 = _check_sigma2(DEFAULT_SIGMA2[objective] if sigma2 is None else sigma2)
        per_class = scalar(per_class)
        if isinstance(per_class, bool) or not isinstance(per_class, numbers.Integral) or \
                per_class < 1:
            raise ValueError(f"per_class must be a positive int, got {per_class!r}")
        self.per_class, self.seed, self.objective = int(per_class), check_seed(seed), objective
        self.index: BankIndex | None = None
        self.bank: Tensor | None = None
        self.bank_labels: Tensor | None = None
        self.threshold: float | None = None
        self.medians: Tensor | None = None
        self.median_index: BankIndex | None = None

    # -- fitting
    def fit(self, features: Tensor, labels: Tensor, num_classes: int | None = None
            ) -> "KDensityDetector":
        """Sample the bank from training ``features`` (M, D) with TRUE ``labels`` (M,).

        ``num_classes`` (L, the classifier's classes; default the largest label + 1):
        every class in [0, L) must have training features, so that any prediction can be
        scored. Time and memory follow the rows, not the label values: a missing class
        is reported at once, however large the labels.
        """
        _check_features(features, "features")
        _check_labels(labels, "labels", features.shape[0], features.device)
        if features.shape[0] == 0:
            raise ValueError("features is empty: fit needs training features")
        present = torch.unique(labels.long())
        top = int(present[-1])
        c = top + 1 if num_classes is None else _check_count(num_classes, "num_classes")
        if top >= c:
            raise ValueError(f"labels holds class {top} >= num_classes={c}")
        if len(present) < c:
            missing, k, have = [], 0, present.tolist()
            for value in have + [c]:  # the gaps between present labels, first 20
                while k < value and len(missing) < 20:
                    missing.append(k)
                    k += 1
                k = value + 1
            more = "" if c - len(present) <= 20 else f" (and {c - len(present) - 20} more)"
            raise ValueError(f"every class needs training features; classes {missing}"
                             f"{more} have none")
        g = torch.Generator().manual_seed(self.seed)
        idx = _sample_per_class(labels, self.per_class, g)
        # detached: the bank holds values, not the graph of the forward that made them
        self.bank, self.bank_labels = features[idx].detach().clone(), labels[idx].long()
        self.index = build_bank_index(self.bank, self.bank_labels, c)
        self.medians = self.median_index = self.kernel_points = None
        return self

    @property
    def num_classes(self) -> int:
        """Size of the label space (the largest class + 1, or ``fit``'s num_classes)."""
        self._require_fit()
        return self.index.num_classes

    @property
    def feature_dim(self) -> int:
        self._require_fit()
        return self.index.bank.shape[1]

    def _require_fit(self) -> None:
        if self.index is None:
            raise RuntimeError("KDensityDetector is not fitted: call fit(features, labels)")

    # -- scoring
    def score(self, features: Tensor, predicted_classes: Tensor,
              batch_size: int | None = None) -> Tensor:
        """Log K-density of each row against the bank of its predicted class, (N,).

        ``batch_size``: score in batches of this many rows (memory beyond one batch does
        not grow with N)."""
        self._require_fit()
        _check_features(features, "features", self.feature_dim)
        _check_labels(predicted_classes, "predicted_classes", features.shape[0],
                      features.device)
        if features.device != self.index.bank.device:
            raise ValueError(f"features are on {features.device} but the detector's bank is "
                             f"on {self.index.bank.device}")
        if batch_size is None:
            return kdensity_indexed(features.to(self.index.bank.dtype), predicted_classes,
                                    self.index, self.sigma2,
                                    names=("features", "predicted_classes"))
        batch_size = _check_count(batch_size, "batch_size")
        parts = [self.score(f, p) for f, p in zip(features.split(batch_size),
                                                  predicted_classes.split(batch_size))]
        return torch.cat(parts) if parts else features.new_empty(
            0, dtype=torch.float64 if features.dtype == torch.float64 else torch.float32)

    def class_medians(self, features: Tensor, labels: Tensor, kernel_points: int = 100
                      ) -> Tensor:
        """Per-class median log K-density of training ``features`` against ``kernel_points``
        bank rows per class (the C&W-wb threshold: f2 > 0 means below the median).

        Stores the medians (``self.medians``, one per class of the bank, in the bank's
        class order; :meth:`median_of` looks them up by label) and the small bank
        (``self.median_index``) so the attack scores against the same kernel points.
        Classes with no row in ``features`` get a NaN median.
        """
        self._require_fit()
        kernel_points = _check_count(kernel_points, "kernel_points")
        _check_features(features, "features", self.feature_dim)
        _check_labels(labels, "labels", features.shape[0], features.device)
        self.median_index = self._median_index(kernel_points)
        scores = kdensity_indexed(features.detach().to(self.bank.dtype), labels,
                                  self.median_index, self.sigma2, names=("features", "labels"))
        ids = self.index.compact(labels, "labels")
        medians = torch.full((len(self.index.classes),), float("nan"), dtype=scores.dtype,
                             device=scores.device)
        order = torch.argsort(ids, stable=True)
        present, counts = torch.unique_consecutive(ids[order], return_counts=True)
        for k, part in zip(present.tolist(), scores[order].split(counts.tolist())):
            medians[k] = part.median()
        self.medians, self.kernel_points = medians, kernel_points
        return medians

    def _median_index(self, kernel_points: int) -> BankIndex:
        g = torch.Generator().manual_seed(self.seed + 1)
        idx = _sample_per_class(self.bank_labels, kernel_points, g)
        return build_bank_index(self.bank[idx], self.bank_labels[idx], self.num_classes)

    def median_of(self, classes: Tensor) -> Tensor:
        """The class medians of :meth:`class_medians` for a tensor of class labels."""
        if self.medians is None:
            raise RuntimeError("no class medians: call class_medians(train_features, "
                               "train_labels) first")
        if not isinstance(classes, Tensor) or classes.dtype.is_floating_point or \
                classes.dtype.is_complex or classes.dtype == torch.bool:
            raise TypeError("classes must be an integer tensor of class labels, got "
                            f"{getattr(classes, 'dtype', type(classes).__name__)}")
        return self.medians.to(classes.device)[self.index.compact(classes, "classes")]

    # -- thresholds and decisions
    def fit_threshold(self, clean_features: Tensor, clean_predictions: Tensor,
                      fpr: float = 0.05) -> float:
        """Threshold on log K-density flagging at most a fraction ``fpr`` of the held-out
        clean inputs: :func:`rce_fast.detect.threshold_at_fpr` of their scores (flag
        ``score < t``), as for LID, Mahalanobis and the command line."""
        from .rates import _check_fpr, threshold_at_fpr
        fpr = _check_fpr(fpr)
        scores = self.score(clean_features, clean_predictions)
        if scores.numel() == 0:
            raise ValueError("clean_features is empty: a threshold needs clean inputs")
        self.threshold = threshold_at_fpr(scores, fpr)
        return self.threshold

    def detect(self, features: Tensor, predicted_classes: Tensor,
               threshold: float | None = None, batch_size: int = 65536) -> Tensor:
        """Boolean "adversarial" decision per row: log K-density below the threshold."""
        thr = self.threshold if threshold is None else check_real(threshold, "threshold")
        if thr is None:
            raise RuntimeError("no threshold: pass threshold= or call fit_threshold first")
        return self.score(features, predicted_classes, batch_size=batch_size) < thr

    def detect_stream(self, batches: Iterable[tuple[Tensor, Tensor]],
                      threshold: float | None = None) -> Iterator[Tensor]:
        """Decisions for an iterable of (features, predicted_classes) batches, one at a
        time, for inputs larger than memory."""
        for features, preds in batches:
            yield self.detect(features, preds, threshold)

    # -- persistence
    FORMAT = "rce_fast.KDensityDetector/2"

    def state_dict(self) -> dict:
        self._require_fit()
        return {"format": self.FORMAT, "sigma2": self.sigma2, "per_class": self.per_class,
                "seed": self.seed, "objective": self.objective, "bank": self.bank.cpu(),
                "bank_labels": self.bank_labels.cpu(), "num_classes": self.num_classes,
                "threshold": self.threshold,
                "medians": None if self.medians is None else self.medians.cpu(),
                "kernel_points": self.kernel_points}

    def save(self, path) -> None:
        """Everything the detector holds (bank, threshold, medians and the kernel points
        they were computed with), written atomically."""
        from .._io import atomic_torch_save, check_writable
        check_writable(path, "detector")
        atomic_torch_save(self.state_dict(), path)

    @classmethod
    def from_state_dict(cls, state: dict, device: str | torch.device = "cpu",
                        source: str = "state") -> "KDensityDetector":
        from .._io import require_keys
        require_keys(state, ("sigma2", "per_class", "seed", "objective", "bank",
                             "bank_labels", "num_classes", "threshold", "medians"),
                     source, "a K-density detector")
        try:
            det = cls(state["sigma2"], state["per_class"], state["seed"], state["objective"])
            det.bank = state["bank"].to(device)
            det.bank_labels = state["bank_labels"].to(device)
            det.index = build_bank_index(det.bank, det.bank_labels, state["num_classes"])
        except (TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise ValueError(f"{source}: not a valid K-density detector ({exc})") from None
        det.threshold = state["threshold"]
        if state["medians"] is not None:
            det.medians = state["medians"].to(device)
            det.kernel_points = state.get("kernel_points")
            if det.kernel_points is not None:  # the same kernel points, drawn again
                det.median_index = det._median_index(int(det.kernel_points))
        return det

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "KDensityDetector":
        """A detector written by :meth:`save`. Loaded safely (tensors and plain values
        only, never code); a missing, corrupt, truncated or foreign file gives one
        ValueError/FileNotFoundError naming the path and what was expected."""
        from .._args import check_device
        from .._io import safe_torch_load
        device = check_device(device)
        state = safe_torch_load(path, "a K-density detector file (KDensityDetector.save)")
        return cls.from_state_dict(state, device, source=str(path))
