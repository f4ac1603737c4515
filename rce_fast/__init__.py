"""rce_fast: Reverse Cross-Entropy training and K-density detection of adversarial examples.

GPU-accelerated (Triton / CUDA) with fast CPU paths. ``import rce_fast`` needs neither a
GPU, Triton, nor the compiled extension.
"""
from ._backend import get_backend, set_backend, use_backend
from . import attacks, data, detect, models
from .detect import (DEFAULT_SIGMA2, GuardedClassifier, KDensityDetector, LIDDetector,
                     MahalanobisDetector, confidence, detection_metrics, kdensity, non_me,
                     paper_auc)
from .loss import (RCELoss, decision_logits, rce_decision_logits, rce_loss,
                   rce_predict)

__version__ = "0.1.0"

__all__ = [
    "RCELoss", "rce_loss", "rce_decision_logits", "rce_predict", "decision_logits",
    "kdensity", "KDensityDetector", "confidence", "non_me", "paper_auc", "DEFAULT_SIGMA2",
    "detection_metrics", "GuardedClassifier", "LIDDetector", "MahalanobisDetector",
    "detect", "attacks", "models", "data", "get_backend", "set_backend", "use_backend", "__version__",
]
