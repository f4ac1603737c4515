"""detection_metrics, threshold_at_fpr and robust accuracy against scikit-learn and
against brute-force definitions, on continuous and heavily tied scores."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from rce_fast.detect import (auc_standard_error, defense_metrics, detection_metrics,
                             plot_robust_accuracy, robust_accuracy, robust_accuracy_curve,
                             threshold_at_fpr)

FPRS = (0.0, 0.01, 0.05, 0.1, 0.29, 0.5, 1.0)


def _cases():
    rng = np.random.default_rng(0)
    for n, m in ((1, 1), (7, 3), (100, 100), (300, 57)):
        yield "random", rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.5, m)
        # integer scores: many ties inside and between the two sets
        yield "tied", rng.integers(0, 5, n).astype(float), rng.integers(-1, 3, m).astype(float)
    yield "all equal", np.zeros(20), np.zeros(30)
    yield "separated", np.arange(10.0) + 100, np.arange(5.0)


CASES = list(_cases())


def _brute_tpr(clean, adv, f):
    """max TPR over every threshold t (flag score < t) whose clean FPR is <= f."""
    best = 0.0
    for t in np.concatenate([np.unique(np.concatenate([clean, adv])), [np.inf]]):
        if np.mean(clean < t) <= f:
            best = max(best, float(np.mean(adv < t)))
    return best


@pytest.mark.parametrize("name, clean, adv", CASES, ids=[f"{c[0]}-{len(c[1])}x{len(c[2])}"
                                                        for c in CASES])
def test_metrics_equal_scikit_learn(name, clean, adv):
    m = detection_metrics(clean, adv, fprs=FPRS)
    y = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
    s = -np.r_[clean, adv]  # adversarial = positive, higher = more suspicious
    if len(clean) and len(adv):
        assert m.auroc == roc_auc_score(y, s)
        assert m.aupr == average_precision_score(y, s)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert m.fpr_at_95_tpr == fpr[tpr >= 0.95].min()
    for f in FPRS:
        assert m.tpr_at_fpr[f] == tpr[fpr <= f].max()
        t = m.thresholds[f]
        assert m.tpr_at_fpr[f] == np.mean(adv < t)      # the threshold gives that rate
        assert np.mean(clean < t) <= f                  # and respects the FPR
        assert m.tpr_at_fpr[f] == _brute_tpr(clean, adv, f)
    se = auc_standard_error(clean, adv)
    assert (math.isnan(m.auroc_se) and math.isnan(se)) or m.auroc_se == se
    assert m.n_clean == len(clean) and m.n_adv == len(adv)
    d = m.as_dict()
    assert d["tpr_at_fpr"]["0.05"] == m.tpr_at_fpr[0.05]


def test_inputs_as_tensors_and_lists():
    clean = torch.tensor([3.0, 1.0, 2.0, 5.0], dtype=torch.float32)
    adv = [0.5, 2.0, 1.0]
    a = detection_metrics(clean, adv)
    b = detection_metrics(clean.double().numpy(), np.array(adv))
    assert a == b


def test_threshold_definition_and_ties():
    s = np.array([1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    assert threshold_at_fpr(s, 0.0) == 1.0          # flags nothing: nothing is < 1
    assert threshold_at_fpr(s, 0.1) == 2.0          # flags the 1.0 only
    # 0.2 * 10 = 2 allowed, but 2.0 is tied three times: t = 2.0 flags one input
    assert threshold_at_fpr(s, 0.2) == 2.0
    assert threshold_at_fpr(s, 0.4) == 3.0          # flags 1, 2, 2, 2
    assert threshold_at_fpr(s, 1.0) == math.inf     # flags everything
    # k / n <= fpr evaluated like scikit-learn (0.29 * 100 = 28.999...96 in floats)
    assert threshold_at_fpr(np.arange(100.0), 0.29) == 29.0
    assert threshold_at_fpr(np.arange(100.0), 0.07) == 7.0


@pytest.mark.parametrize("bad, match", [
    (([1.0, float("nan")], [1.0]), "clean_scores contains 1 NaN"),
    (([1.0], [float("inf")]), "adv_scores contains 1 NaN or inf"),
    (([], [1.0]), "clean_scores is empty"),
    ((np.zeros((2, 2)), [1.0]), "clean_scores must be 1-D"),
    (([1.0], torch.zeros(3, dtype=torch.bool)), "adv_scores must hold real numbers"),
    ((["a", "b"], [1.0]), "clean_scores must hold real numbers"),
])
def test_bad_scores_name_the_argument(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        detection_metrics(*bad)


def test_bad_fprs():
    with pytest.raises(ValueError, match="fprs must be in"):
        detection_metrics([1.0], [0.0], fprs=(0.1, 1.5))
    with pytest.raises(ValueError, match="fprs is empty"):
        detection_metrics([1.0], [0.0], fprs=())
    with pytest.raises(ValueError, match="fpr must be in"):
        threshold_at_fpr([1.0], -0.1)


def test_robust_accuracy_brute_force_and_curve(tmp_path):
    rng = np.random.default_rng(1)
    held = rng.normal(0, 1, 200)
    adv = rng.normal(-1, 1, 150)
    labels = rng.integers(0, 10, 150)
    pred = np.where(rng.random(150) < 0.3, labels, (labels + 1) % 10)
    for f in (0.0, 0.05, 0.2, 1.0):
        t = threshold_at_fpr(held, f)
        expected = np.mean((adv < t) | (pred == labels))
        assert robust_accuracy(held, adv, pred, labels, f) == expected
    grid, acc = robust_accuracy_curve(held, adv, torch.as_tensor(pred), labels)
    assert grid[0] == 0.0 and grid[-1] == pytest.approx(0.2) and len(grid) == 41
    assert np.all(np.diff(acc) >= 0)                # more flags, never less robust
    assert acc[0] >= np.mean(pred == labels)
    png = plot_robust_accuracy({"K-density": (grid, acc), "LID": (grid, acc * 0.9)},
                               tmp_path / "plots" / "robust.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="adv_predictions must have shape"):
        robust_accuracy(held, adv, pred[:3], labels)
    with pytest.raises(TypeError, match="labels must hold integer"):
        robust_accuracy(held, adv, pred, labels.astype(float))


def test_defense_metrics_by_hand():
    held = np.arange(20.0)                          # t at 5% FPR: 1.0 (flags the 0.0)
    clean = np.array([0.5, 3.0, 4.0, 5.0])
    clean_y = np.array([0, 1, 2, 3])
    adv = np.array([-1.0, 0.9, 2.0, 7.0])           # flagged: the first two
    adv_y = np.array([0, 1, 2, 3])
    adv_p = np.array([5, 1, 6, 7])                  # the second is still correct
    out = defense_metrics(held, clean, clean_y, clean_y, adv, adv_y, adv_p, fpr=0.05)
    assert out["threshold"] == 1.0
    assert out["clean_fpr"] == 0.25
    assert out["n_adv_used"] == 3 and out["n_attacked"] == 4
    assert out["tpr"] == pytest.approx(1 / 3)       # of the misclassified: -1.0 only
    assert out["robust_accuracy"] == 0.5            # -1.0 (flagged), 0.9 (flagged, correct)
    assert out["attack_success"] == 0.5
    used = adv[adv_p != adv_y]
    assert out["auroc"] == detection_metrics(clean, used).auroc
    everything = defense_metrics(held, clean, clean_y, clean_y, adv, adv_y, adv_p,
                                 adversarial="all")
    assert everything["n_adv_used"] == 4 and everything["tpr"] == 0.5
    none = defense_metrics(held, clean, clean_y, clean_y, adv, adv_y, adv_y)
    assert none["auroc"] is None and none["robust_accuracy"] == 1.0
