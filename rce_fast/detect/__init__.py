"""Detection of adversarial examples: the K-density op and detector, logit-based scores,
AUC and the paper's protocol.

All scores are "higher = more likely normal" (Pang et al. 2018, section 2 of the notes).
One module per concern:

- :mod:`.kdensity`: the K-density op (``kdensity``), ``BankIndex``, ``QueryPlan``;
- :mod:`.metrics`: ``confidence``, ``non_me``, ``threshold_for_fpr``, ``auc`` and its
  DeLong standard error;
- :mod:`.kd_detector`: ``KDensityDetector``;
- :mod:`.protocol`: ``paper_auc`` (the paper's Table 2 protocol);
- :mod:`.rates`: ``detection_metrics`` (AUROC, AUPR, FPR at 95% TPR, TPR at fixed
  FPRs), ``threshold_at_fpr``, ``robust_accuracy`` and its curve and plot;
- :mod:`.evaluation`: ``evaluate_detectors`` / ``defense_metrics`` (every detector
  against every attack at one operating point);
- :mod:`.scoring`: ``score_inputs`` / ``score_dataset`` for any detector;
- :mod:`.guarded`: ``GuardedClassifier`` (classifier + detector as L + 1 logits);
- :mod:`.lid`, :mod:`.mahalanobis`: the baseline detectors ``LIDDetector`` and
  ``MahalanobisDetector``;
- :mod:`.bundle`: ``save_detector`` / ``load_detector``, one file with any detector,
  its held-out calibration scores and its model's fingerprint (the command line's).

Everything is re-exported here, so ``from rce_fast.detect import X`` keeps working.
"""
from ._checks import _FLOAT, _check_features, _check_labels, _check_sigma2  # noqa: F401
from .kd_detector import DEFAULT_SIGMA2, KDensityDetector, _sample_per_class  # noqa: F401
from .kdensity import (BankIndex, QueryPlan, _offsets, build_bank_index, kdensity,
                       kdensity_indexed, kdensity_planned)
from .metrics import (_check_logits, _midranks, auc, auc_standard_error, confidence, non_me,
                      threshold_for_fpr)
from .protocol import paper_auc
from .evaluation import defense_metrics, evaluate_detectors
from .guarded import GuardedClassifier
from .lid import LIDDetector, noisy_like
from .mahalanobis import MahalanobisDetector
from .rates import (DetectionMetrics, detection_metrics, plot_robust_accuracy,
                    robust_accuracy, robust_accuracy_curve, threshold_at_fpr)
from .scoring import score_dataset, score_inputs

__all__ = [
    "DEFAULT_SIGMA2", "KDensityDetector", "BankIndex", "QueryPlan", "build_bank_index",
    "kdensity", "kdensity_indexed", "kdensity_planned", "confidence", "non_me",
    "threshold_for_fpr", "auc", "auc_standard_error", "paper_auc",
    "DetectionMetrics", "detection_metrics", "threshold_at_fpr", "robust_accuracy",
    "robust_accuracy_curve", "plot_robust_accuracy", "defense_metrics", "evaluate_detectors",
    "score_inputs", "score_dataset", "GuardedClassifier", "LIDDetector",
    "MahalanobisDetector", "noisy_like",
]
