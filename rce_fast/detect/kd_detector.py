"""The K-density detector (Pang et al. 2018): a per-class kernel bank of training
features, scored in log space."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor

from ._checks import _check_features, _check_labels, _check_sigma2
from .kdensity import BankIndex, build_bank_index, kdensity_indexed
from .metrics import threshold_for_fpr

#: Kernel widths sigma2 of the authors' release, by training objective.
DEFAULT_SIGMA2 = {"rce": 0.1 / 0.26, "ce": 1.0 / 0.26}


def _sample_per_class(labels: Tensor, per_class: int, generator: torch.Generator,
                      num_classes: int) -> Tensor:
    """Indices of up to ``per_class`` rows of every class, drawn without replacement."""
    labels_cpu = labels.cpu()
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(labels_cpu == c).squeeze(1)
        if len(idx) > per_class:
            idx = idx[torch.randperm(len(idx), generator=generator)[:per_class]].sort().values
        picks.append(idx)
    return torch.cat(picks).to(labels.device)


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
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise ValueError(f"per_class must be a positive int, got {per_class!r}")
        self.per_class, self.seed, self.objective = per_class, int(seed), objective
        self.index: BankIndex | None = None
        self.bank: Tensor | None = None
        self.bank_labels: Tensor | None = None
        self.threshold: float | None = None
        self.medians: Tensor | None = None
        self.median_index: BankIndex | None = None

    # -- fitting
    def fit(self, features: Tensor, labels: Tensor, num_classes: int | None = None
            ) -> "KDensityDetector":
        """Sample the bank from training ``features`` (M, D) with TRUE ``labels`` (M,)."""
        _check_features(features, "features")
        _check_labels(labels, "labels", features.shape[0], features.device)
        if features.shape[0] == 0:
            raise ValueError("features is empty: fit needs training features")
        c = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        present = torch.bincount(labels.long().cpu(), minlength=c)
        if len(present) > c:
            raise ValueError(f"labels holds class {len(present) - 1} >= num_classes={c}")
        missing = torch.nonzero(present == 0).squeeze(1).tolist()
        if missing:
            raise ValueError(f"every class needs training features; classes {missing} have none")
        g = torch.Generator().manual_seed(self.seed)
        idx = _sample_per_class(labels.long(), self.per_class, g, c)
        self.bank, self.bank_labels = features[idx].clone(), labels[idx].long()
        self.index = build_bank_index(self.bank, self.bank_labels, c)
        return self

    @property
    def num_classes(self) -> int:
        self._require_fit()
        return self.index.num_classes

    def _require_fit(self) -> None:
        if self.index is None:
            raise RuntimeError("KDensityDetector is not fitted: call fit(features, labels)")

    # -- scoring
    def score(self, features: Tensor, predicted_classes: Tensor,
              batch_size: int | None = None) -> Tensor:
        """Log K-density of each row against the bank of its predicted class, (N,)."""
        self._require_fit()
        if batch_size is None:
            return kdensity_indexed(features.to(self.index.bank.dtype), predicted_classes,
                                    self.index, self.sigma2)
        parts = [self.score(f, p) for f, p in zip(features.split(batch_size),
                                                  predicted_classes.split(batch_size))]
        return torch.cat(parts) if parts else features.new_empty(0)

    def class_medians(self, features: Tensor, labels: Tensor, kernel_points: int = 100
                      ) -> Tensor:
        """Per-class median log K-density of training ``features`` against ``kernel_points``
        bank rows per class (the C&W-wb threshold: f2 > 0 means below the median).

        Stores the medians (``self.medians``, (C,)) and the small bank
        (``self.median_index``) so the attack scores against the same kernel points.
        """
        self._require_fit()
        _check_features(features, "features", self.index.bank.shape[1])
        _check_labels(labels, "labels", features.shape[0], features.device)
        g = torch.Generator().manual_seed(self.seed + 1)
        idx = _sample_per_class(self.bank_labels, kernel_points, g, self.num_classes)
        self.median_index = build_bank_index(self.bank[idx], self.bank_labels[idx],
                                             self.num_classes)
        scores = kdensity_indexed(features.to(self.bank.dtype), labels, self.median_index,
                                  self.sigma2)
        medians = torch.full((self.num_classes,), float("nan"), dtype=scores.dtype,
                             device=scores.device)
        for c in range(self.num_classes):
            sel = scores[labels == c]
            if sel.numel():
                medians[c] = sel.median()
        self.medians = medians
        return medians

    # -- thresholds and decisions
    def fit_threshold(self, clean_features: Tensor, clean_predictions: Tensor,
                      fpr: float = 0.05) -> float:
        """Threshold on log K-density flagging a fraction ``fpr`` of clean inputs."""
        if not (0.0 <= fpr <= 1.0):
            raise ValueError(f"fpr must be in [0, 1], got {fpr}")
        self.threshold = threshold_for_fpr(self.score(clean_features, clean_predictions), fpr)
        return self.threshold

    def detect(self, features: Tensor, predicted_classes: Tensor,
               threshold: float | None = None, batch_size: int = 65536) -> Tensor:
        """Boolean "adversarial" decision per row: log K-density below the threshold."""
        thr = self.threshold if threshold is None else threshold
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
    def state_dict(self) -> dict:
        self._require_fit()
        return {"sigma2": self.sigma2, "per_class": self.per_class, "seed": self.seed,
                "objective": self.objective, "bank": self.bank.cpu(),
                "bank_labels": self.bank_labels.cpu(), "num_classes": self.num_classes,
                "threshold": self.threshold,
                "medians": None if self.medians is None else self.medians.cpu()}

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "KDensityDetector":
        state = torch.load(path, map_location="cpu", weights_only=True)
        det = cls(state["sigma2"], state["per_class"], state["seed"], state["objective"])
        det.bank = state["bank"].to(device)
        det.bank_labels = state["bank_labels"].to(device)
        det.index = build_bank_index(det.bank, det.bank_labels, state["num_classes"])
        det.threshold = state["threshold"]
        if state["medians"] is not None:
            det.medians = state["medians"].to(device)
        return det

