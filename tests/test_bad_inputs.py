"""The bad-input matrix: every public function against every kind of bad argument.

Each case is one line: a call with ONE bad argument (everything else valid), the
exception type it must raise, and a regular expression the message must match -- the
argument's name (or the path, for files). A crash deep inside (IndexError, a RuntimeError
from torch, an AttributeError), a hang or a silent answer fails the case. The README's
section "Errors, checks and files: the contract" is what these cases back.

A second test runs every public function on valid inputs and checks that nothing it was
given (tensors, the model's parameters, buffers and train/eval flags) was modified.
"""
from __future__ import annotations

import functools
import math
import types

import numpy as np
import pytest
import torch

import rce_fast
from rce_fast import attacks as A
from rce_fast.data import load_mnist, load_npz
from rce_fast.detect import (GuardedClassifier, KDensityDetector, LIDDetector,
                             MahalanobisDetector, auc, build_bank_index, confidence,
                             detection_metrics, kdensity, kdensity_indexed, non_me, paper_auc,
                             robust_accuracy, robust_accuracy_curve, threshold_at_fpr,
                             threshold_for_fpr)
from rce_fast.models import Classifier
from rce_fast.train import TrainConfig, load_classifier, train
from tests.helpers import MLP, digits_tensors

NAN, INF = float("nan"), float("inf")
META = torch.device("meta")


@functools.lru_cache(maxsize=None)
def _setup():
    """Small fixtures shared by every case: an untrained MLP on digits (bad-input checks
    need no trained model), its features, fitted detectors."""
    torch.manual_seed(0)
    x_all, y_all = digits_tensors()
    model = Classifier(MLP(64, 16), "rce").eval()
    with torch.no_grad():
        feats = model.features(x_all[:200])
    labels = y_all[:200].clone()
    kd = KDensityDetector(sigma2=1.0, per_class=8, seed=0).fit(feats, labels, num_classes=10)
    kd.class_medians(feats, labels, kernel_points=4)
    kd.fit_threshold(feats[:50], labels[:50], fpr=0.1)
    kd_small = KDensityDetector(sigma2=1.0, per_class=8).fit(feats[:, :8], labels, 10)
    kd_small.class_medians(feats[:, :8], labels, kernel_points=4)
    kd_small.threshold = kd.threshold
    kd_nomed = KDensityDetector(sigma2=1.0, per_class=8).fit(feats, labels, 10)
    x = x_all[:6].clone()
    noisy = (x_all[:60] + 0.05 * torch.randn(60, 1, 8, 8)).clamp(-0.5, 0.5)
    lid = LIDDetector(k=3, batch_size=10).fit(model, x_all[:60], noisy)
    maha = MahalanobisDetector(C=1.0).fit(model, x_all[:200], labels, noisy)
    return types.SimpleNamespace(
        model=model, x=x, y=y_all[:6].clone(), feats=feats, labels=labels, kd=kd,
        kd_small=kd_small, kd_nomed=kd_nomed, lid=lid, maha=maha, x60=x_all[:60],
        noisy=noisy, z=torch.randn(6, 10), t=torch.tensor([0, 1, 2, 3, 4, 5]),
        guarded=GuardedClassifier(model, kd), x_all=x_all, y_all=y_all)


def _s():
    return _setup()


def _with(t, **at):
    """A clone of t with t[index] = value for each index=value pair (kwargs as strings)."""
    t = t.clone()
    for k, v in at.items():
        t[int(k[1:])] = v
    return t


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = NAN
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[-1] = INF
    return t


def _empty(t):
    return t[:0]


# Each case: (id, call taking the fixtures, expected exception, regex on the message)
def _cases():
    s = _s
    x, m = lambda: s().x, lambda: s().model
    C = []

    def add(name, fn, exc, match):
        C.append(pytest.param(fn, exc, match, id=name))

    # ------------------------------------------------------------------ rce_loss / RCELoss
    L = rce_fast.rce_loss
    add("rce_loss-logits-list", lambda: L([[1.0, 2.0]], torch.tensor([0])), TypeError, "logits")
    add("rce_loss-target-list", lambda: L(s().z, [0] * 6), TypeError, "target")
    add("rce_loss-logits-int", lambda: L(s().z.long(), s().t), TypeError, "logits")
    add("rce_loss-logits-bool", lambda: L(s().z > 0, s().t), TypeError, "logits")
    add("rce_loss-target-float", lambda: L(s().z, s().t.float()), TypeError, "target")
    add("rce_loss-target-bool", lambda: L(s().z, s().t > 0), TypeError, "target")
    add("rce_loss-logits-scalar", lambda: L(torch.tensor(1.0), torch.tensor(0)), ValueError, "logits")
    add("rce_loss-target-short", lambda: L(s().z, s().t[:5]), ValueError, "target")
    add("rce_loss-target-2d", lambda: L(s().z, s().t[:, None]), ValueError, "target")
    add("rce_loss-one-class", lambda: L(s().z[:, :1], torch.zeros(6, dtype=torch.long)), ValueError, "logits")
    add("rce_loss-label-too-big", lambda: L(s().z, _with(s().t, i2=10)), ValueError, "target")
    add("rce_loss-label-negative", lambda: L(s().z, _with(s().t, i0=-3)), ValueError, "target")
    add("rce_loss-target-meta", lambda: L(s().z, s().t.to(META)), ValueError, "target")
    add("rce_loss-logits-meta", lambda: L(s().z.to(META), s().t), ValueError, "logits")
    add("rce_loss-both-meta", lambda: L(s().z.to(META), s().t.to(META)), ValueError,
        "meta device")
    add("RCELoss-both-meta", lambda: rce_fast.RCELoss()(s().z.to(META), s().t.to(META)),
        ValueError, "meta device")
    add("rce_loss-reduction", lambda: L(s().z, s().t, reduction="avg"), ValueError, "reduction")
    add("rce_loss-ignore-index-float", lambda: L(s().z, s().t, ignore_index=1.5), TypeError, "ignore_index")
    add("rce_loss-temperature-0", lambda: L(s().z, s().t, temperature=0.0), ValueError, "temperature")
    add("rce_loss-temperature-neg", lambda: L(s().z, s().t, temperature=-1.0), ValueError, "temperature")
    add("rce_loss-temperature-nan", lambda: L(s().z, s().t, temperature=NAN), ValueError, "temperature")
    add("rce_loss-temperature-inf", lambda: L(s().z, s().t, temperature=INF), ValueError, "temperature")
    add("rce_loss-temperature-str", lambda: L(s().z, s().t, temperature="2"), TypeError, "temperature")
    add("RCELoss-reduction", lambda: rce_fast.RCELoss(reduction="avg"), ValueError, "reduction")
    add("RCELoss-temperature", lambda: rce_fast.RCELoss(temperature=0), ValueError, "temperature")
    add("RCELoss-ignore-index", lambda: rce_fast.RCELoss(ignore_index="x"), TypeError, "ignore_index")
    add("RCELoss-call-target", lambda: rce_fast.RCELoss()(s().z, s().t.float()), TypeError, "target")

    # ------------------------------------------------------------------------- kdensity
    def kd(q=None, b=None, bl=None, qc=None, s2=1.0):
        f, lab = s().feats, s().labels
        return kdensity(f[:6] if q is None else q, f if b is None else b,
                        lab if bl is None else bl, lab[:6] if qc is None else qc, s2)
    F, Y = lambda: s().feats, lambda: s().labels
    add("kdensity-queries-list", lambda: kd(q=F()[:6].tolist()), TypeError, "queries")
    add("kdensity-bank-list", lambda: kd(b=F().tolist()), TypeError, "bank")
    add("kdensity-queries-int", lambda: kd(q=F()[:6].long()), TypeError, "queries")
    add("kdensity-bank-float64", lambda: kd(b=F().double()), TypeError, "bank")
    add("kdensity-queries-1d", lambda: kd(q=F()[0]), ValueError, "queries")
    add("kdensity-bank-3d", lambda: kd(b=F()[None]), ValueError, "bank")
    add("kdensity-bank-feature-size", lambda: kd(b=F()[:, :8]), ValueError, "bank")
    add("kdensity-bank-empty", lambda: kd(b=F()[:0], bl=Y()[:0]), ValueError, "bank")
    add("kdensity-queries-nan", lambda: kd(q=_nan(F()[:6])), ValueError, "queries")
    add("kdensity-bank-inf", lambda: kd(b=_inf(F())), ValueError, "bank")
    add("kdensity-bank-labels-short", lambda: kd(bl=Y()[:10]), ValueError, "bank_labels")
    add("kdensity-bank-labels-float", lambda: kd(bl=Y().float()), TypeError, "bank_labels")
    add("kdensity-bank-labels-list", lambda: kd(bl=Y().tolist()), TypeError, "bank_labels")
    add("kdensity-bank-labels-negative", lambda: kd(bl=_with(Y(), i3=-1)), ValueError, "bank_labels")
    add("kdensity-query-classes-float", lambda: kd(qc=Y()[:6].float()), TypeError, "query_classes")
    add("kdensity-query-classes-short", lambda: kd(qc=Y()[:5]), ValueError, "query_classes")
    add("kdensity-query-classes-too-big", lambda: kd(qc=_with(Y()[:6], i1=10)), ValueError, "query_classes")
    add("kdensity-query-classes-negative", lambda: kd(qc=_with(Y()[:6], i1=-2)), ValueError, "query_classes")
    add("kdensity-query-class-without-rows", lambda: kd(b=F()[Y() != 3], bl=Y()[Y() != 3], qc=torch.full((6,), 3)), ValueError, "query_classes")
    add("kdensity-query-classes-meta", lambda: kd(qc=Y()[:6].to(META)), ValueError, "query_classes")
    add("kdensity-bank-labels-meta", lambda: kd(bl=Y().to(META)), ValueError, "bank_labels")
    add("kdensity-bank-meta", lambda: kd(b=F().to(META)), ValueError, "bank")
    add("kdensity-queries-meta", lambda: kd(q=F()[:6].to(META)), ValueError, "queries")
    add("kdensity-sigma2-0", lambda: kd(s2=0.0), ValueError, "sigma2")
    add("kdensity-sigma2-neg", lambda: kd(s2=-1.0), ValueError, "sigma2")
    add("kdensity-sigma2-nan", lambda: kd(s2=NAN), ValueError, "sigma2")
    add("kdensity-sigma2-inf", lambda: kd(s2=INF), ValueError, "sigma2")
    add("kdensity-sigma2-str", lambda: kd(s2="1"), TypeError, "sigma2")
    add("kdensity-sigma2-tensor", lambda: kd(s2=torch.tensor([1.0, 2.0])), TypeError, "sigma2")
    add("build_bank_index-num-classes-0", lambda: build_bank_index(F(), Y(), 0), ValueError, "num_classes")
    add("build_bank_index-num-classes-small", lambda: build_bank_index(F(), Y(), 5), ValueError, "num_classes")
    add("build_bank_index-num-classes-str", lambda: build_bank_index(F(), Y(), "10"), TypeError, "num_classes")
    add("kdensity_indexed-feature-size", lambda: kdensity_indexed(F()[:6, :8], Y()[:6], s().kd.index, 1.0), ValueError, "queries")
    add("kdensity_indexed-dtype", lambda: kdensity_indexed(F()[:6].double(), Y()[:6], s().kd.index, 1.0), TypeError, "queries")
    add("kdensity_indexed-index-type", lambda: kdensity_indexed(F()[:6], Y()[:6], "bank", 1.0), TypeError, "index")

    # ----------------------------------------------------------------- KDensityDetector
    KD = KDensityDetector
    add("KD-init-sigma2", lambda: KD(sigma2=-1.0), ValueError, "sigma2")
    add("KD-init-per-class-0", lambda: KD(per_class=0), ValueError, "per_class")
    add("KD-init-per-class-float", lambda: KD(per_class=2.5), ValueError, "per_class")
    add("KD-init-per-class-bool", lambda: KD(per_class=True), ValueError, "per_class")
    add("KD-init-objective", lambda: KD(objective="mse"), ValueError, "objective")
    add("KD-init-seed-str", lambda: KD(seed="a"), TypeError, "seed")
    add("KD-init-seed-none", lambda: KD(seed=None), TypeError, "seed")
    add("KD-fit-features-list", lambda: KD().fit(F().tolist(), Y()), TypeError, "features")
    add("KD-fit-features-int", lambda: KD().fit(F().long(), Y()), TypeError, "features")
    add("KD-fit-features-1d", lambda: KD().fit(F()[:, 0], Y()), ValueError, "features")
    add("KD-fit-features-empty", lambda: KD().fit(F()[:0], Y()[:0]), ValueError, "features")
    add("KD-fit-features-nan", lambda: KD().fit(_nan(F()), Y()), ValueError, "features")
    add("KD-fit-labels-float", lambda: KD().fit(F(), Y().float()), TypeError, "labels")
    add("KD-fit-labels-short", lambda: KD().fit(F(), Y()[:-1]), ValueError, "labels")
    add("KD-fit-labels-negative", lambda: KD().fit(F(), _with(Y(), i0=-1)), ValueError, "labels")
    add("KD-fit-labels-meta", lambda: KD().fit(F(), Y().to(META)), ValueError, "labels")
    add("KD-fit-num-classes-0", lambda: KD().fit(F(), Y(), num_classes=0), ValueError, "num_classes")
    add("KD-fit-num-classes-small", lambda: KD().fit(F(), Y(), num_classes=5), ValueError, "num_classes")
    add("KD-fit-num-classes-missing", lambda: KD().fit(F(), Y(), num_classes=12), ValueError, "classes")
    add("KD-score-feature-size", lambda: s().kd.score(F()[:6, :8], Y()[:6]), ValueError, "features")
    add("KD-score-features-nan", lambda: s().kd.score(_nan(F()[:6]), Y()[:6]), ValueError, "features")
    add("KD-score-features-meta", lambda: s().kd.score(F()[:6].to(META), Y()[:6]), ValueError, "features")
    add("KD-score-pred-float", lambda: s().kd.score(F()[:6], Y()[:6].float()), TypeError, "predicted_classes")
    add("KD-score-pred-short", lambda: s().kd.score(F()[:6], Y()[:5]), ValueError, "predicted_classes")
    add("KD-score-pred-too-big", lambda: s().kd.score(F()[:6], _with(Y()[:6], i0=10)), ValueError, "predicted_classes")
    add("KD-score-pred-meta", lambda: s().kd.score(F()[:6], Y()[:6].to(META)), ValueError, "predicted_classes")
    add("KD-score-batch-size-0", lambda: s().kd.score(F()[:6], Y()[:6], batch_size=0), ValueError, "batch_size")
    add("KD-score-batch-size-neg", lambda: s().kd.score(F()[:6], Y()[:6], batch_size=-4), ValueError, "batch_size")
    add("KD-score-batch-size-float", lambda: s().kd.score(F()[:6], Y()[:6], batch_size=2.5), ValueError, "batch_size")
    add("KD-fit-threshold-fpr-neg", lambda: s().kd.fit_threshold(F()[:6], Y()[:6], fpr=-0.1), ValueError, "fpr")
    add("KD-fit-threshold-fpr-big", lambda: s().kd.fit_threshold(F()[:6], Y()[:6], fpr=1.5), ValueError, "fpr")
    add("KD-fit-threshold-fpr-nan", lambda: s().kd.fit_threshold(F()[:6], Y()[:6], fpr=NAN), ValueError, "fpr")
    add("KD-fit-threshold-fpr-str", lambda: s().kd.fit_threshold(F()[:6], Y()[:6], fpr="0.1"), TypeError, "fpr")
    add("KD-fit-threshold-empty", lambda: s().kd.fit_threshold(F()[:0], Y()[:0]), ValueError, "clean")
    add("KD-detect-threshold-str", lambda: s().kd.detect(F()[:6], Y()[:6], threshold="1"), TypeError, "threshold")
    add("KD-detect-threshold-nan", lambda: s().kd.detect(F()[:6], Y()[:6], threshold=NAN), ValueError, "threshold")
    add("KD-detect-batch-size-0", lambda: s().kd.detect(F()[:6], Y()[:6], batch_size=0), ValueError, "batch_size")
    add("KD-detect-features-int", lambda: s().kd.detect(F()[:6].int(), Y()[:6]), TypeError, "features")
    add("KD-class-medians-kernel-points-0", lambda: KD(sigma2=1.0).fit(F(), Y()).class_medians(F(), Y(), kernel_points=0), ValueError, "kernel_points")
    add("KD-class-medians-kernel-points-neg", lambda: KD(sigma2=1.0).fit(F(), Y()).class_medians(F(), Y(), kernel_points=-5), ValueError, "kernel_points")
    add("KD-class-medians-labels-too-big", lambda: KD(sigma2=1.0).fit(F(), Y()).class_medians(F(), _with(Y(), i0=10)), ValueError, "labels")
    add("KD-median-of-float", lambda: s().kd.median_of(Y()[:3].float()), TypeError, "classes")

    # ------------------------------------------------------------- confidence / non-ME
    for fn in (confidence, non_me):
        n = fn.__name__
        add(f"{n}-list", lambda fn=fn: fn(s().z.tolist()), TypeError, "decision_logits")
        add(f"{n}-int", lambda fn=fn: fn(s().z.long()), TypeError, "decision_logits")
        add(f"{n}-1d", lambda fn=fn: fn(s().z[0]), ValueError, "decision_logits")
        add(f"{n}-3d", lambda fn=fn: fn(s().z[None]), ValueError, "decision_logits")
        add(f"{n}-one-class", lambda fn=fn: fn(s().z[:, :1]), ValueError, "decision_logits")
        add(f"{n}-nan", lambda fn=fn: fn(_nan(s().z)), ValueError, "decision_logits")
        add(f"{n}-inf", lambda fn=fn: fn(_inf(s().z)), ValueError, "decision_logits")
        add(f"{n}-meta", lambda fn=fn: fn(s().z.to(META)), ValueError, "decision_logits")

    # ------------------------------------------------------------------- AUC and friends
    sc = lambda: torch.linspace(0, 1, 6)  # noqa: E731
    add("auc-pos-str", lambda: auc(["a", "b"], [1.0]), TypeError, "pos_scores")
    add("auc-pos-2d", lambda: auc(torch.ones(2, 3), sc()), ValueError, "pos_scores")
    add("auc-neg-2d", lambda: auc(sc(), np.ones((2, 3))), ValueError, "neg_scores")
    add("auc-pos-nan", lambda: auc(_nan(sc()), sc()), ValueError, "pos_scores")
    add("auc-neg-bool", lambda: auc(sc(), sc() > 0.5), TypeError, "neg_scores")
    add("auc-neg-complex", lambda: auc(sc(), sc().to(torch.complex64)), TypeError, "neg_scores")
    add("threshold_for_fpr-fpr-neg", lambda: threshold_for_fpr(sc(), -0.1), ValueError, "fpr")
    add("threshold_for_fpr-fpr-big", lambda: threshold_for_fpr(sc(), 1.5), ValueError, "fpr")
    add("threshold_for_fpr-fpr-nan", lambda: threshold_for_fpr(sc(), NAN), ValueError, "fpr")
    add("threshold_for_fpr-fpr-str", lambda: threshold_for_fpr(sc(), "0.1"), TypeError, "fpr")
    add("threshold_for_fpr-empty", lambda: threshold_for_fpr(sc()[:0], 0.1), ValueError, "clean_scores")
    add("threshold_for_fpr-nan", lambda: threshold_for_fpr(_nan(sc()), 0.1), ValueError, "clean_scores")
    add("threshold_for_fpr-2d", lambda: threshold_for_fpr(sc()[None], 0.1), ValueError, "clean_scores")
    add("threshold_for_fpr-str", lambda: threshold_for_fpr("abc", 0.1), TypeError, "clean_scores")

    def pa(cs=None, ad=None, lab=None, cp=None, ap=None):
        return paper_auc({"kd": sc()} if cs is None else cs, {"kd": sc()} if ad is None else ad,
                         s().t if lab is None else lab, s().t if cp is None else cp,
                         s().t.flip(0) if ap is None else ap)
    add("paper_auc-clean-not-dict", lambda: pa(cs=sc()), TypeError, "clean_scores")
    add("paper_auc-adv-not-dict", lambda: pa(ad=[1, 2]), TypeError, "adv_scores")
    add("paper_auc-adv-missing-metric", lambda: pa(ad={"conf": sc()}), ValueError, "adv_scores")
    add("paper_auc-score-short", lambda: pa(cs={"kd": sc()[:5]}), ValueError, r"clean_scores\['kd'\]")
    add("paper_auc-score-2d", lambda: pa(ad={"kd": sc()[None]}), ValueError, r"adv_scores\['kd'\]")
    add("paper_auc-score-nan", lambda: pa(cs={"kd": _nan(sc())}), ValueError, r"clean_scores\['kd'\]")
    add("paper_auc-labels-float", lambda: pa(lab=s().t.float()), TypeError, "labels")
    add("paper_auc-labels-2d", lambda: pa(lab=s().t[:, None]), ValueError, "labels")
    add("paper_auc-clean-pred-short", lambda: pa(cp=s().t[:5]), ValueError, "clean_pred")
    add("paper_auc-adv-pred-float", lambda: pa(ap=np.ones(6)), TypeError, "adv_pred")
    add("paper_auc-adv-pred-broadcast", lambda: pa(ap=s().t[:1]), ValueError, "adv_pred")

    dm = detection_metrics
    add("detection_metrics-clean-empty", lambda: dm(sc()[:0], sc()), ValueError, "clean_scores")
    add("detection_metrics-adv-nan", lambda: dm(sc(), _nan(sc())), ValueError, "adv_scores")
    add("detection_metrics-adv-inf", lambda: dm(sc(), _inf(sc())), ValueError, "adv_scores")
    add("detection_metrics-clean-2d", lambda: dm(sc()[None], sc()), ValueError, "clean_scores")
    add("detection_metrics-clean-bool", lambda: dm(sc() > 0, sc()), TypeError, "clean_scores")
    add("detection_metrics-adv-str", lambda: dm(sc(), ["x", "y"]), TypeError, "adv_scores")
    add("detection_metrics-fprs-empty", lambda: dm(sc(), sc(), fprs=()), ValueError, "fprs")
    add("detection_metrics-fprs-big", lambda: dm(sc(), sc(), fprs=(0.1, 1.5)), ValueError, "fprs")
    add("detection_metrics-fprs-nan", lambda: dm(sc(), sc(), fprs=NAN), ValueError, "fprs")
    add("detection_metrics-fprs-str", lambda: dm(sc(), sc(), fprs="a"), TypeError, "fprs")
    add("threshold_at_fpr-fpr-neg", lambda: threshold_at_fpr(sc(), -0.5), ValueError, "fpr")
    add("threshold_at_fpr-fpr-str", lambda: threshold_at_fpr(sc(), "x"), TypeError, "fpr")
    add("threshold_at_fpr-empty", lambda: threshold_at_fpr([], 0.1), ValueError, "clean_scores")

    def ra(h=None, a=None, p=None, lab=None, fpr=0.05):
        return robust_accuracy(sc() if h is None else h, sc() if a is None else a,
                               s().t if p is None else p, s().t if lab is None else lab, fpr)
    add("robust_accuracy-heldout-nan", lambda: ra(h=_nan(sc())), ValueError, "heldout_scores")
    add("robust_accuracy-adv-empty", lambda: ra(a=sc()[:0], p=s().t[:0], lab=s().t[:0]), ValueError, "adv_scores")
    add("robust_accuracy-pred-float", lambda: ra(p=s().t.float()), TypeError, "adv_predictions")
    add("robust_accuracy-pred-short", lambda: ra(p=s().t[:5]), ValueError, "adv_predictions")
    add("robust_accuracy-labels-short", lambda: ra(lab=s().t[:2]), ValueError, "labels")
    add("robust_accuracy-labels-negative", lambda: ra(lab=_with(s().t, i0=-1)), ValueError, "labels")
    add("robust_accuracy-fpr-big", lambda: ra(fpr=2.0), ValueError, "fpr")
    add("robust_accuracy-fpr-nan", lambda: ra(fpr=NAN), ValueError, "fpr")
    add("robust_accuracy_curve-fprs-neg", lambda: robust_accuracy_curve(sc(), sc(), s().t, s().t, (-0.1,)), ValueError, "fprs")

    # ---------------------------------------------------------- LID / Mahalanobis
    add("LID-init-k-0", lambda: LIDDetector(k=0), ValueError, "k")
    add("LID-init-batch-size-1", lambda: LIDDetector(batch_size=1), ValueError, "batch_size")
    add("LID-init-k-above-batch", lambda: LIDDetector(k=30, batch_size=10), ValueError, "batch_size")
    add("LID-init-reference-batches", lambda: LIDDetector(reference_batches=0), ValueError, "reference_batches")
    add("LID-init-layers-str", lambda: LIDDetector(layers="features"), TypeError, "layers")
    add("LID-init-C", lambda: LIDDetector(C=-1.0), ValueError, "C")
    add("LID-init-seed", lambda: LIDDetector(seed="x"), TypeError, "seed")
    lid_fit = lambda **kw: LIDDetector(k=3, batch_size=10).fit(  # noqa: E731
        kw.pop("model", m()), kw.pop("clean", s().x60), kw.pop("adversarial", s().noisy), **kw)
    add("LID-fit-model", lambda: lid_fit(model=torch.nn.Linear(64, 10)), TypeError, "model")
    add("LID-fit-clean-int", lambda: lid_fit(clean=s().x60.long()), TypeError, "clean")
    add("LID-fit-clean-nan", lambda: lid_fit(clean=_nan(s().x60)), ValueError, "clean")
    add("LID-fit-clean-empty", lambda: lid_fit(clean=s().x60[:0]), ValueError, "clean")
    add("LID-fit-clean-too-few", lambda: lid_fit(clean=s().x60[:8]), ValueError, "clean")
    add("LID-fit-adv-shape", lambda: lid_fit(adversarial=s().noisy[:, :, :4]), ValueError, "adversarial")
    add("LID-fit-noisy-list", lambda: lid_fit(noisy=[1.0]), TypeError, "noisy")
    add("LID-fit-batch-size", lambda: lid_fit(batch_size=0), ValueError, "batch_size")
    add("LID-fit-layers-unknown", lambda: LIDDetector(k=3, batch_size=10, layers=["conv9"]).fit(m(), s().x60, s().noisy), ValueError, "layer")
    add("LID-score-x-nan", lambda: s().lid.score(m(), _nan(x())), ValueError, "x")
    add("LID-score-x-shape", lambda: s().lid.score(m(), x()[:, :, :4]), ValueError, "x")
    add("LID-score-batch-size", lambda: s().lid.score(m(), x(), batch_size=0), ValueError, "batch_size")
    add("LID-fit-threshold-fpr", lambda: s().lid.fit_threshold(m(), x(), fpr=1.5), ValueError, "fpr")
    add("LID-detect-threshold-nan", lambda: s().lid.detect(m(), x(), threshold=NAN), ValueError, "threshold")
    add("Maha-init-noise-neg", lambda: MahalanobisDetector(noise=-0.1), ValueError, "noise")
    add("Maha-init-noise-nan", lambda: MahalanobisDetector(noise=NAN), ValueError, "noise")
    add("Maha-init-C", lambda: MahalanobisDetector(C=0), ValueError, "C")
    maha_fit = lambda **kw: MahalanobisDetector(C=1.0).fit(  # noqa: E731
        m(), kw.pop("x", s().x_all[:200]), kw.pop("y", s().labels), kw.pop("adv", s().noisy), **kw)
    add("Maha-fit-y-float", lambda: maha_fit(y=s().labels.float()), TypeError, "y")
    add("Maha-fit-y-short", lambda: maha_fit(y=s().labels[:10]), ValueError, "y")
    add("Maha-fit-y-negative", lambda: maha_fit(y=_with(s().labels, i0=-1)), ValueError, "y")
    add("Maha-fit-y-huge", lambda: maha_fit(y=_with(s().labels, i0=10**12)), ValueError, "y")
    add("Maha-fit-num-classes-small", lambda: maha_fit(num_classes=3), ValueError, "num_classes")
    add("Maha-fit-x-inf", lambda: maha_fit(x=_inf(s().x_all[:200])), ValueError, "x")
    add("Maha-fit-adv-shape", lambda: maha_fit(adv=s().noisy.reshape(60, 64)), ValueError, "adversarial")
    add("Maha-score-x-shape", lambda: s().maha.score(m(), x().reshape(6, 4, 4, 4)), ValueError, "x")
    add("Maha-score-model", lambda: s().maha.score(torch.nn.Identity(), x()), TypeError, "model")

    # ---------------------------------------------------------------- GuardedClassifier
    G = GuardedClassifier
    add("Guarded-classifier-fn", lambda: G(lambda t: t, s().kd), TypeError, "classifier")
    add("Guarded-detector-name", lambda: G(m(), "entropy"), ValueError, "detector")
    add("Guarded-detector-int", lambda: G(m(), 3), TypeError, "detector")
    add("Guarded-detector-unfitted", lambda: G(m(), KDensityDetector(), threshold=0.0), ValueError, "detector")
    add("Guarded-threshold-str", lambda: G(m(), s().kd, threshold="1"), TypeError, "threshold")
    add("Guarded-threshold-nan", lambda: G(m(), s().kd, threshold=NAN), ValueError, "threshold")
    add("Guarded-threshold-missing", lambda: G(m(), "confidence"), ValueError, "threshold")
    add("Guarded-scale-0", lambda: G(m(), s().kd, scale=0.0), ValueError, "scale")
    add("Guarded-scale-inf", lambda: G(m(), s().kd, scale=INF), ValueError, "scale")
    add("Guarded-kd-needs-features", lambda: G(torch.nn.Linear(64, 10), s().kd), TypeError, "classifier")
    add("Guarded-feature-size", lambda: G(m(), s().kd_small)(x()), ValueError, "detector")

    # ------------------------------------------------------------------------- attacks
    def attack_cases(name, call, labels=True, eps=True, steps=True, model=True):
        add(f"{name}-x-list", lambda: call(x=x().tolist()), TypeError, r"\bx\b")
        add(f"{name}-x-int", lambda: call(x=(x() * 16).long()), TypeError, r"\bx\b")
        add(f"{name}-x-1d", lambda: call(x=x()[0, 0, 0]), ValueError, r"\bx\b")
        add(f"{name}-x-empty", lambda: call(x=x()[:0]), ValueError, r"\bx\b")
        add(f"{name}-x-nan", lambda: call(x=_nan(x())), ValueError, r"\bx\b")
        add(f"{name}-x-inf", lambda: call(x=_inf(x())), ValueError, r"\bx\b")
        add(f"{name}-x-meta", lambda: call(x=x().to(META)), ValueError, r"\bx\b")
        if model:
            add(f"{name}-x-image-shape", lambda: call(x=x()[:, :, :4]), ValueError, r"\bx\b")
        add(f"{name}-clip-reversed", lambda: call(clip=(0.5, -0.5)), ValueError, "clip")
        add(f"{name}-clip-equal", lambda: call(clip=(0.0, 0.0)), ValueError, "clip")
        add(f"{name}-clip-nan", lambda: call(clip=(NAN, 0.5)), ValueError, "clip")
        add(f"{name}-clip-one", lambda: call(clip=(0.5,)), TypeError, "clip")
        add(f"{name}-clip-str", lambda: call(clip="ab"), TypeError, "clip")
        if eps:
            add(f"{name}-eps-neg", lambda: call(eps=-0.1), ValueError, "eps")
            add(f"{name}-eps-nan", lambda: call(eps=NAN), ValueError, "eps")
            add(f"{name}-eps-inf", lambda: call(eps=INF), ValueError, "eps")
            add(f"{name}-eps-str", lambda: call(eps="0.1"), (TypeError, ValueError), "eps")
            add(f"{name}-eps-none", lambda: call(eps=None), (TypeError, ValueError), "eps")
        if labels:
            add(f"{name}-labels-float", lambda: call(labels=s().y.float()), TypeError, "labels")
            add(f"{name}-labels-list", lambda: call(labels=s().y.tolist()), TypeError, "labels")
            add(f"{name}-labels-short", lambda: call(labels=s().y[:5]), ValueError, "labels")
            add(f"{name}-labels-too-big", lambda: call(labels=_with(s().y, i0=10)), ValueError, "labels")
            add(f"{name}-labels-negative", lambda: call(labels=_with(s().y, i0=-1)), ValueError, "labels")
            add(f"{name}-labels-meta", lambda: call(labels=s().y.to(META)), ValueError, "labels")
        if steps:
            add(f"{name}-steps-0", lambda: call(steps=0), ValueError, "steps")
            add(f"{name}-steps-neg", lambda: call(steps=-3), ValueError, "steps")
            add(f"{name}-steps-float", lambda: call(steps=2.5), ValueError, "steps")
            add(f"{name}-step-size-0", lambda: call(step_size=0.0), ValueError, "step_size")
            add(f"{name}-step-size-nan", lambda: call(step_size=NAN), ValueError, "step_size")
            add(f"{name}-step-size-neg", lambda: call(step_size=-0.01), ValueError, "step_size")

    def kw_call(fn, first=None, **defaults):
        def call(**kw):
            args = dict(defaults)
            args.update(kw)
            xx = args.pop("x", x())
            if first is None:
                return fn(m(), xx, **args)
            return fn(first(), xx, **args)
        return call

    attack_cases("fgsm", kw_call(A.fgsm, eps=0.1), steps=False)
    attack_cases("bim", kw_call(A.bim, eps=0.1, steps=2))
    attack_cases("ilcm", kw_call(A.ilcm, eps=0.1, steps=2), labels=False)
    attack_cases("pgd", kw_call(A.pgd, eps=0.1, steps=2))
    attack_cases("pgd-guarded", kw_call(A.pgd, first=lambda: s().guarded, eps=0.1, steps=2))
    attack_cases("opgd", kw_call(A.orthogonal_pgd, first=lambda: s().guarded, eps=0.1, steps=2))
    attack_cases("jsma", kw_call(A.jsma, max_iterations=1), labels=False, eps=False, steps=False)
    attack_cases("cw_l2", kw_call(A.cw_l2, max_iterations=2, binary_search_steps=1),
                 labels=False, eps=False, steps=False)
    wb_stages = dict(stage1=False, stage2=dict(max_iterations=2, binary_search_steps=1))
    attack_cases("cw_wb", kw_call(A.cw_wb, target="random", detector=s().kd, **wb_stages),
                 labels=False, eps=False, steps=False)

    def rand(**kw):
        xx = kw.pop("x", x())
        return A.rand_noise(xx, kw.pop("eps", 0.1), **kw)
    attack_cases("rand_noise", rand, labels=False, steps=False, model=False)
    add("rand_noise-seed-str", lambda: rand(seed="a"), TypeError, "seed")
    add("fgsm-eps-sweep-empty", lambda: A.fgsm(m(), x(), []), ValueError, "eps")
    add("fgsm-eps-sweep-nan", lambda: A.fgsm(m(), x(), [0.1, NAN]), ValueError, "eps")
    add("fgsm-model-not-callable", lambda: A.fgsm("model", x(), 0.1), TypeError, "model")
    add("fgsm-model-wrong-output", lambda: A.fgsm(torch.nn.Flatten(0), x(), 0.1), ValueError, "model")
    add("bim-eps-sweep-neg", lambda: A.bim(m(), x(), [0.1, -0.1], steps=1), ValueError, "eps")
    add("pgd-norm", lambda: A.pgd(m(), x(), 0.1, norm="l3", steps=1), ValueError, "norm")
    add("pgd-loss", lambda: A.pgd(m(), x(), 0.1, loss="hinge", steps=1), ValueError, "loss")
    add("pgd-restarts-0", lambda: A.pgd(m(), x(), 0.1, restarts=0, steps=1), ValueError, "restarts")
    add("pgd-eps-0", lambda: A.pgd(m(), x(), 0.0, steps=1), ValueError, "eps")
    add("pgd-target-str", lambda: A.pgd(m(), x(), 0.1, target="worst", steps=1), ValueError, "target")
    add("pgd-target-too-big", lambda: A.pgd(m(), x(), 0.1, target=_with(s().y, i0=10), steps=1), ValueError, "target")
    add("pgd-seed-str", lambda: A.pgd(m(), x(), 0.1, steps=1, seed="s"), TypeError, "seed")
    add("opgd-model-plain", lambda: A.orthogonal_pgd(m(), x(), 0.1, steps=1), TypeError, "model")
    add("opgd-margin-neg", lambda: A.orthogonal_pgd(s().guarded, x(), 0.1, steps=1, margin=-1.0), ValueError, "margin")
    add("opgd-norm", lambda: A.orthogonal_pgd(s().guarded, x(), 0.1, steps=1, norm="l1"), ValueError, "norm")
    jsma = lambda **kw: A.jsma(m(), x(), max_iterations=kw.pop("max_iterations", 1), **kw)  # noqa: E731
    add("jsma-target-float", lambda: jsma(target=s().y.float()), TypeError, "target")
    add("jsma-target-short", lambda: jsma(target=s().y[:3]), ValueError, "target")
    add("jsma-target-too-big", lambda: jsma(target=_with(s().y, i0=10)), ValueError, "target")
    add("jsma-target-negative", lambda: jsma(target=_with(s().y, i0=-1)), ValueError, "target")
    add("jsma-target-str", lambda: jsma(target="best"), ValueError, "target")
    add("jsma-target-list", lambda: jsma(target=[1, 2]), TypeError, "target")
    add("jsma-target-meta", lambda: jsma(target=s().y.to(META)), ValueError, "target")
    add("jsma-theta-0", lambda: jsma(theta=0.0), ValueError, "theta")
    add("jsma-theta-nan", lambda: jsma(theta=NAN), ValueError, "theta")
    add("jsma-theta-str", lambda: jsma(theta="up"), TypeError, "theta")
    add("jsma-gamma-0", lambda: jsma(gamma=0.0), ValueError, "gamma")
    add("jsma-gamma-big", lambda: jsma(gamma=1.5), ValueError, "gamma")
    add("jsma-gamma-nan", lambda: jsma(gamma=NAN), ValueError, "gamma")
    add("jsma-gamma-str", lambda: jsma(gamma="0.1"), TypeError, "gamma")
    add("jsma-max-iterations-neg", lambda: jsma(max_iterations=-1), ValueError, "max_iterations")
    add("jsma-max-iterations-float", lambda: jsma(max_iterations=1.5), ValueError, "max_iterations")
    add("jsma-max-iterations-str", lambda: jsma(max_iterations="3"), ValueError, "max_iterations")
    cw = kw_call(A.cw_l2, max_iterations=2, binary_search_steps=1)
    add("cw_l2-kappa-neg", lambda: cw(kappa=-1.0), ValueError, "kappa")
    add("cw_l2-kappa-nan", lambda: cw(kappa=NAN), ValueError, "kappa")
    add("cw_l2-c-init-0", lambda: cw(c_init=0.0), ValueError, "c_init")
    # float32 c: 1e-50 became 0 (no attack term), 1e39 failed inside torch
    add("cw_l2-c-init-underflow", lambda: cw(c_init=1e-50), ValueError, "c_init must lie")
    add("cw_l2-c-init-overflow", lambda: cw(c_init=1e39), ValueError, "c_init must lie")
    add("cw_l2-lr-0", lambda: cw(lr=0.0), ValueError, "lr")
    add("cw_l2-lr-inf", lambda: cw(lr=INF), ValueError, "lr")
    add("cw_l2-search-0", lambda: cw(binary_search_steps=0), ValueError, "binary_search_steps")
    add("cw_l2-iterations-0", lambda: cw(max_iterations=0), ValueError, "max_iterations")
    add("cw_l2-iterations-float", lambda: cw(max_iterations=2.0), ValueError, "max_iterations")
    add("cw_l2-target-float", lambda: cw(target=s().y.float()), TypeError, "target")
    add("cw_l2-target-short", lambda: cw(target=s().y[:2]), ValueError, "target")
    add("cw_l2-target-too-big", lambda: cw(target=_with(s().y, i0=99)), ValueError, "target")
    add("cw_l2-init-shape", lambda: cw(init=x()[:3]), ValueError, "init")
    add("cw_l2-init-image-shape", lambda: cw(init=x().reshape(6, 64)), ValueError, "init")
    add("cw_l2-init-int", lambda: cw(init=x().long()), TypeError, "init")
    add("cw_l2-init-list", lambda: cw(init=x().tolist()), TypeError, "init")
    add("cw_l2-init-nan", lambda: cw(init=_nan(x())), ValueError, "init")
    add("cw_l2-init-meta", lambda: cw(init=x().to(META)), ValueError, "init")
    add("cw_l2-seed-str", lambda: cw(target="random", seed="s"), TypeError, "seed")
    wb = kw_call(A.cw_wb, target="random", detector=s().kd, **wb_stages)
    add("cw_wb-detector-str", lambda: wb(detector="confidence"), TypeError, "detector")
    add("cw_wb-detector-none", lambda: wb(detector=None), TypeError, "detector")
    add("cw_wb-detector-lid", lambda: wb(detector=s().lid), TypeError, "detector")
    add("cw_wb-detector-unfitted", lambda: wb(detector=KDensityDetector()), ValueError, "detector")
    add("cw_wb-detector-no-medians", lambda: wb(detector=s().kd_nomed), ValueError, "detector")
    add("cw_wb-detector-feature-size", lambda: wb(detector=s().kd_small), ValueError, "detector")
    add("cw_wb-model-no-features", lambda: A.cw_wb(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), x(), "random", s().kd, **wb_stages), TypeError, "model")
    add("cw_wb-target-float", lambda: wb(target=s().y.float()), TypeError, "target")
    add("cw_wb-target-str", lambda: wb(target="worst"), ValueError, "target")
    add("cw_wb-kappa-neg", lambda: wb(kappa=-5.0), ValueError, "kappa")
    add("cw_wb-stage1-type", lambda: wb(stage1=5), TypeError, "stage1")
    add("cw_wb-stage1-key", lambda: wb(stage1={"iterations": 5}), ValueError, "stage1")
    add("cw_wb-stage1-iterations-0", lambda: wb(stage1={"max_iterations": 0}), ValueError, "max_iterations")
    add("cw_wb-stage1-c-init-nan", lambda: wb(stage1={"c_init": NAN}), ValueError, "c_init")
    add("cw_wb-stage2-type", lambda: wb(stage2=[1]), TypeError, "stage2")
    add("cw_wb-stage2-search-0", lambda: wb(stage2={"binary_search_steps": 0}), ValueError, "binary_search_steps")

    # ---------------------------------------------------------------- train / load
    cfg = lambda: TrainConfig(model="resnet8", steps=1, batch_size=4, lr_boundaries=[], lr_values=[0.1], progress=False)  # noqa: E731
    xt, yt = lambda: s().x_all[:16], lambda: s().y_all[:16]
    tr = lambda **kw: train(kw.pop("config", cfg()), kw.pop("x_train", xt()), kw.pop("y_train", yt()), **kw)  # noqa: E731
    add("train-config-dict", lambda: tr(config={"steps": 1}), TypeError, "config")
    add("train-x-list", lambda: tr(x_train=xt().tolist()), TypeError, "x_train")
    add("train-x-int", lambda: tr(x_train=xt().long()), TypeError, "x_train")
    add("train-x-3d", lambda: tr(x_train=xt()[:, 0]), ValueError, "x_train")
    add("train-x-empty", lambda: tr(x_train=xt()[:0], y_train=yt()[:0]), ValueError, "x_train")
    add("train-x-nan", lambda: tr(x_train=_nan(xt())), ValueError, "x_train")
    add("train-y-float", lambda: tr(y_train=yt().float()), TypeError, "y_train")
    add("train-y-list", lambda: tr(y_train=yt().tolist()), TypeError, "y_train")
    add("train-y-short", lambda: tr(y_train=yt()[:5]), ValueError, "y_train")
    add("train-y-negative", lambda: tr(y_train=_with(yt(), i0=-1)), ValueError, "y_train")
    add("train-y-meta", lambda: tr(y_train=yt().to(META)), ValueError, "y_train")
    add("train-num-classes-small", lambda: tr(num_classes=3), ValueError, "num_classes")
    add("train-num-classes-0", lambda: tr(num_classes=0), ValueError, "num_classes")
    add("train-device-bad", lambda: tr(device="foo"), ValueError, "device")
    add("train-device-absent", lambda: tr(device="cuda:7"), ValueError, "device")
    add("train-checkpoint-is-dir", lambda: tr(config=TrainConfig(steps=1, checkpoint="/", lr_boundaries=[], lr_values=[0.1])), ValueError, "checkpoint")
    tc = lambda **kw: TrainConfig(**{"lr_boundaries": [], "lr_values": [0.1], **kw})  # noqa: E731
    add("TrainConfig-steps-neg", lambda: tc(steps=-1), ValueError, "steps")
    add("TrainConfig-batch-size-0", lambda: tc(batch_size=0), ValueError, "batch_size")
    add("TrainConfig-objective", lambda: tc(objective="mse"), ValueError, "objective")
    add("TrainConfig-model", lambda: tc(model="vgg"), ValueError, "model")
    add("TrainConfig-temperature-0", lambda: tc(temperature=0.0), ValueError, "temperature")
    add("TrainConfig-lr-values", lambda: tc(lr_values=[0.1, 0.01]), ValueError, "lr_values")
    add("TrainConfig-lr-negative", lambda: tc(lr_values=[-0.1]), ValueError, "lr_values")
    add("TrainConfig-momentum", lambda: tc(momentum=NAN), ValueError, "momentum")
    add("TrainConfig-weight-decay", lambda: tc(weight_decay=-1.0), ValueError, "weight_decay")
    add("TrainConfig-checkpoint-every", lambda: tc(checkpoint_every=0), ValueError, "checkpoint_every")
    add("TrainConfig-steps-str", lambda: tc(steps="10"), TypeError, "steps")
    add("TrainConfig-seed-negative", lambda: tc(seed=-1), ValueError, "seed")
    add("TrainConfig-seed-huge", lambda: tc(seed=2 ** 64), ValueError, "seed")
    add("train-y-one-class", lambda: tr(y_train=torch.zeros(16, dtype=torch.long)), ValueError, "y_train")

    # ------------------------------------------------- from the 12-06 (third) API audit
    from rce_fast.data import load_digits_split
    from rce_fast.detect import evaluate_detectors, noisy_like, score_dataset
    from rce_fast.train import evaluate_error
    def named(fn, defaults):
        """fn(**defaults(), **overrides): the defaults are built when the case runs."""
        return lambda **kw: fn(**{**defaults(), **kw})
    ee = named(evaluate_error, lambda: dict(model=s().model, x=s().x_all[:20], y=s().y_all[:20]))
    add("evaluate_error-y-2d", lambda: ee(y=s().y_all[:20, None]), ValueError, "y")
    add("evaluate_error-y-short", lambda: ee(y=s().y_all[:5]), ValueError, "y")
    add("evaluate_error-y-list", lambda: ee(y=s().y_all[:20].tolist()), TypeError, "y")
    add("evaluate_error-y-float", lambda: ee(y=s().y_all[:20].float()), TypeError, "y")
    add("evaluate_error-y-too-big", lambda: ee(y=_with(s().y_all[:20], i3=10)), ValueError, "y")
    add("evaluate_error-x-nan", lambda: ee(x=_nan(s().x_all[:20])), ValueError, "x")
    add("evaluate_error-x-empty", lambda: ee(x=s().x_all[:0], y=s().y_all[:0]), ValueError, "x")
    add("evaluate_error-batch-size-0", lambda: ee(batch_size=0), ValueError, "batch_size")
    ev = named(evaluate_detectors, lambda: dict(
        classifier=s().model, detectors={"c": "confidence"}, x_heldout=s().x_all[:20],
        x_clean=s().x_all[20:30], y_clean=s().y_all[20:30], x_adv=s().x_all[30:40]))
    add("evaluate_detectors-detectors-list", lambda: ev(detectors=["confidence"]), TypeError, "detectors")
    add("evaluate_detectors-detectors-empty", lambda: ev(detectors={}), ValueError, "detectors")
    add("evaluate_detectors-heldout-numpy", lambda: ev(x_heldout=s().x_all[:20].numpy()), TypeError, "x_heldout")
    add("evaluate_detectors-heldout-empty", lambda: ev(x_heldout=s().x_all[:0]), ValueError, "x_heldout")
    add("evaluate_detectors-heldout-nan", lambda: ev(x_heldout=_nan(s().x_all[:20])), ValueError, "x_heldout")
    add("evaluate_detectors-heldout-shape", lambda: ev(x_heldout=s().x_all[:20].reshape(20, 64)), ValueError, "x_heldout")
    add("evaluate_detectors-clean-nan", lambda: ev(x_clean=_nan(s().x_all[20:30])), ValueError, "x_clean")
    add("evaluate_detectors-adv-nan", lambda: ev(x_adv={"fgsm": _nan(s().x_all[30:40])}), ValueError, "x_adv")
    add("evaluate_detectors-adv-empty-dict", lambda: ev(x_adv={}), ValueError, "x_adv")
    add("evaluate_detectors-y-too-big", lambda: ev(y_clean=s().y_all[20:30] + 100), ValueError, "y_clean")
    add("evaluate_detectors-y-2d", lambda: ev(y_clean=s().y_all[20:30, None]), ValueError, "y_clean")
    add("evaluate_detectors-y-float", lambda: ev(y_clean=s().y_all[20:30].float()), TypeError, "y_clean")
    add("evaluate_detectors-y-adv-short", lambda: ev(y_adv=s().y_all[:3]), ValueError, "y_adv")
    add("evaluate_detectors-y-adv-negative", lambda: ev(y_adv=_with(s().y_all[30:40], i0=-1)), ValueError, "y_adv")
    add("evaluate_detectors-batch-size-bool", lambda: ev(batch_size=True), ValueError, "batch_size")
    add("evaluate_detectors-batch-size-float", lambda: ev(batch_size=2.5), ValueError, "batch_size")
    add("evaluate_detectors-fpr", lambda: ev(fpr=1.5), ValueError, "fpr")
    add("evaluate_detectors-curve-fprs", lambda: ev(curve_fprs=[2.0]), ValueError, "curve_fprs")
    add("evaluate_detectors-adversarial", lambda: ev(adversarial="some"), ValueError, "adversarial")
    add("score_dataset-batch-size-bool", lambda: score_dataset(m(), "confidence", x(), batch_size=True), ValueError, "batch_size")
    add("score_dataset-x-list", lambda: score_dataset(m(), "confidence", x().tolist()), TypeError, "x")
    nl = named(noisy_like, lambda: dict(x=x(), x_adv=x() + 0.01))
    add("noisy_like-clip-reversed", lambda: nl(clip=(0.5, -0.5)), ValueError, "clip")
    add("noisy_like-clip-none", lambda: nl(clip=None), TypeError, "clip")
    add("noisy_like-seed-float", lambda: nl(seed=1.7), TypeError, "seed")
    add("noisy_like-seed-huge", lambda: nl(seed=2 ** 64), ValueError, "seed")
    add("KDensityDetector-seed-huge", lambda: KDensityDetector(seed=2 ** 70), ValueError, "seed")
    add("KDensityDetector-seed-negative", lambda: KDensityDetector(seed=-1), ValueError, "seed")
    add("rand_noise-seed-huge", lambda: A.rand_noise(x(), 0.1, seed=2 ** 64), ValueError, "seed")
    add("cw_l2-seed-huge", lambda: A.cw_l2(m(), x(), "random", seed=2 ** 64, max_iterations=1, binary_search_steps=1), ValueError, "seed")
    add("pgd-seed-huge", lambda: A.pgd(m(), x(), 0.1, steps=1, seed=2 ** 64), ValueError, "seed")
    add("load_digits_split-seed-huge", lambda: load_digits_split(seed=2 ** 63), ValueError, "seed")
    add("rce_loss-ignore-index-huge", lambda: L(s().z, s().t, ignore_index=2 ** 70), ValueError, "ignore_index")
    add("RCELoss-ignore-index-huge", lambda: rce_fast.RCELoss(ignore_index=-2 ** 70), ValueError, "ignore_index")
    add("RCELoss-temperature-str", lambda: rce_fast.RCELoss(temperature="2"), TypeError, "temperature")
    add("fgsm-eps-set", lambda: A.fgsm(m(), x(), {0.1, 0.2}), TypeError, "eps")
    one = lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))  # noqa: E731
    add("cw_l2-random-one-class", lambda: A.cw_l2(one(), x(), "random", max_iterations=1, binary_search_steps=1), ValueError, "target")
    add("pgd-random-one-class", lambda: A.pgd(one(), x(), 0.1, steps=1, target="random"), ValueError, "target")
    add("threshold_for_fpr-inf", lambda: threshold_for_fpr(torch.tensor([1.0, INF]), 0.5), ValueError, "clean_scores")
    add("LID-init-C-str", lambda: LIDDetector(C="1"), TypeError, "C")
    add("jsma_pairs-increase-str", lambda: A.jsma_pairs(torch.rand(2, 5), torch.rand(2, 5), torch.ones(2, 5, dtype=torch.bool), "False"), TypeError, "increase")
    add("Guarded-threshold-minus-inf", lambda: GuardedClassifier(m(), s().kd, -INF), ValueError, "threshold")
    return C


CASES = _cases()


@pytest.mark.parametrize("call, exc, match", CASES)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------- files


def _files(tmp_path):
    s = _s()
    good_kd = tmp_path / "kd.pt"
    s.kd.save(good_kd)
    good_lid = tmp_path / "lid.pt"
    s.lid.save(good_lid)
    data = good_kd.read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a torch file at all" * 10)
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.ones(3)}, tmp_path / "foreign.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save(types.SimpleNamespace(a=1), tmp_path / "pickled.pt")
    (tmp_path / "folder.pt").mkdir()
    return tmp_path


FILE_CASES = ["missing.pt", "empty.pt", "garbage.pt", "truncated.pt", "foreign.pt", "list.pt",
              "pickled.pt", "folder.pt"]


def _loaders():
    from rce_fast.detect.bundle import load_detector
    return {"KDensityDetector.load": KDensityDetector.load, "LIDDetector.load": LIDDetector.load,
            "MahalanobisDetector.load": MahalanobisDetector.load,
            "load_detector": load_detector, "load_classifier": load_classifier}


@pytest.mark.parametrize("loader", list(_loaders()))
@pytest.mark.parametrize("name", FILE_CASES)
def test_bad_files(tmp_path, loader, name):
    """Missing, empty, corrupt, truncated, foreign, pickled files and folders: ONE
    FileNotFoundError / ValueError naming the path."""
    folder = _files(tmp_path)
    exc = FileNotFoundError if name == "missing.pt" else ValueError
    with pytest.raises(exc, match=name.replace(".", r"\.")):
        _loaders()[loader](folder / name)


@pytest.mark.parametrize("loader, wrong", [
    ("KDensityDetector.load", "lid.pt"), ("LIDDetector.load", "kd.pt"),
    ("MahalanobisDetector.load", "lid.pt"), ("load_classifier", "kd.pt")])
def test_files_of_another_kind(tmp_path, loader, wrong):
    folder = _files(tmp_path)
    with pytest.raises(ValueError, match=wrong.replace(".", r"\.")):
        _loaders()[loader](folder / wrong)


@pytest.mark.parametrize("loader", list(_loaders()))
@pytest.mark.parametrize("device", ["foo", "cuda:7"])
def test_load_bad_device(tmp_path, loader, device):
    folder = _files(tmp_path)
    torch.manual_seed(0)
    from rce_fast.models import build_model
    from rce_fast.train import save_checkpoint
    save_checkpoint(folder / "ck.pt", build_model("resnet8", 1), None, None, None, {}, 0,
                    TrainConfig(model="resnet8"), 1, 10)
    path = {"LIDDetector.load": "lid.pt", "load_classifier": "ck.pt"}.get(loader, "kd.pt")
    if loader == "MahalanobisDetector.load":
        _s().maha.save(folder / "maha.pt")
        path = "maha.pt"
    with pytest.raises(ValueError, match="device"):
        _loaders()[loader](folder / path, device=device)


def test_checkpoint_of_another_network(tmp_path):
    """A checkpoint whose weights do not fit the network it names: ValueError naming the
    path, not torch's RuntimeError from load_state_dict."""
    from rce_fast.models import build_model
    from rce_fast.train import save_checkpoint
    net = build_model("resnet8", 1)
    save_checkpoint(tmp_path / "ck.pt", net, None, None, None, {}, 0,
                    TrainConfig(model="resnet32"), 1, 10)
    with pytest.raises(ValueError, match=r"ck\.pt"):
        load_classifier(tmp_path / "ck.pt")


@pytest.mark.parametrize("saver", ["kd", "lid", "maha"])
@pytest.mark.parametrize("where", ["dir", "under-file"])
def test_save_to_unwritable_path(tmp_path, saver, where):
    det = getattr(_s(), saver)
    (tmp_path / "file").write_text("x")
    target = tmp_path if where == "dir" else tmp_path / "file" / "det.pt"
    with pytest.raises(ValueError, match=str(target.name)):
        det.save(target)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def _npz(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "truncated", "foreign-keys",
                                  "labels-float", "labels-negative", "labels-2d",
                                  "lengths", "images-1d", "pickled"])
def test_load_npz_bad_files(tmp_path, case):
    imgs, labs = np.zeros((10, 8, 8), np.uint8), np.arange(10)
    good = _npz(tmp_path, "good.npz", images=imgs, labels=labs)
    path = tmp_path / f"{case}.npz"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"PK\x03\x04garbage" * 20)
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[:200])
    elif case == "foreign-keys":
        np.savez(path, a=imgs)
    elif case == "labels-float":
        np.savez(path, images=imgs, labels=labs.astype(float))
    elif case == "labels-negative":
        np.savez(path, images=imgs, labels=labs - 5)
    elif case == "labels-2d":
        np.savez(path, images=imgs, labels=labs[:, None])
    elif case == "lengths":
        np.savez(path, x_train=imgs, y_train=labs[:5], x_test=imgs, y_test=labs)
    elif case == "images-1d":
        np.savez(path, images=np.zeros(10), labels=labs)
    elif case == "pickled":
        np.savez(path, images=np.array([{"a": 1}] * 10, dtype=object), labels=labs)
    exc = FileNotFoundError if case == "missing" else ValueError
    with pytest.raises(exc, match=path.name.replace(".", r"\.")):
        load_npz(path)


@pytest.mark.parametrize("arg, value", [("test_fraction", 1.5), ("test_fraction", 0.0),
                                        ("test_fraction", NAN), ("scale", "percent"),
                                        ("seed", "a")])
def test_load_npz_bad_arguments(tmp_path, arg, value):
    path = _npz(tmp_path, "d.npz", images=np.zeros((10, 8, 8), np.uint8), labels=np.arange(10))
    with pytest.raises((TypeError, ValueError), match=arg):
        load_npz(path, **{arg: value})


@pytest.mark.parametrize("case", ["missing-dir", "empty-dir", "corrupt", "truncated",
                                  "disagree", "split"])
def test_load_mnist_bad_files(tmp_path, case):
    import gzip
    import struct

    def idx(path, arr):
        head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim,
                                                                  *arr.shape)
        with gzip.open(path, "wb") as f:
            f.write(head + arr.astype(np.uint8).tobytes())
    root = tmp_path / "mnist"
    root.mkdir()
    idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((4, 28, 28)))
    idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(4))
    split = "test"
    if case == "missing-dir":
        root = tmp_path / "nowhere"
    elif case == "empty-dir":
        root = tmp_path / "emptydir"
        root.mkdir()
    elif case == "corrupt":
        (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    elif case == "truncated":
        data = (root / "t10k-labels-idx1-ubyte.gz").read_bytes()
        (root / "t10k-labels-idx1-ubyte.gz").write_bytes(data[:-6])
    elif case == "disagree":
        idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(3))
    elif case == "split":
        split = "validation"
    if case == "split":
        with pytest.raises(ValueError, match="split"):
            load_mnist(root, split)
        return
    with pytest.raises((FileNotFoundError, ValueError), match=str(root.name)):
        load_mnist(root, split)


# ------------------------------------------------------------- behaviour at the edges


def test_empty_batches_of_row_wise_ops():
    """Row-wise ops accept an empty batch and return an empty result (like torch);
    the loss's mean over no rows is NaN, as in cross_entropy."""
    s = _s()
    assert confidence(s.z[:0]).shape == (0,)
    assert non_me(s.z[:0]).shape == (0,)
    assert kdensity(s.feats[:0], s.feats, s.labels, s.labels[:0], 1.0).shape == (0,)
    assert s.kd.score(s.feats[:0], s.labels[:0]).shape == (0,)
    assert rce_fast.rce_loss(s.z[:0], s.t[:0], reduction="none").shape == (0,)
    assert rce_fast.rce_loss(s.z[:0], s.t[:0], reduction="sum").item() == 0.0
    assert math.isnan(rce_fast.rce_loss(s.z[:0], s.t[:0]).item())
    assert math.isnan(torch.nn.functional.cross_entropy(s.z[:0], s.t[:0]).item())


def test_loss_lets_nan_and_inf_through_like_cross_entropy():
    """NaN / inf logits are NOT refused by the loss (AMP's GradScaler relies on an inf or
    NaN loss to skip a step): they give NaN, like cross_entropy, never a finite number."""
    s = _s()
    for bad in (_nan(s.z), _inf(s.z)):
        loss = rce_fast.rce_loss(bad, s.t, reduction="none")
        ce = torch.nn.functional.cross_entropy(bad, s.t, reduction="none")
        assert torch.equal(torch.isfinite(loss), torch.isfinite(ce))
        assert not bool(torch.isfinite(loss).all())


def test_auc_of_an_empty_side_is_nan():
    """auc / paper_auc with no pairs kept: NaN (documented), not an error."""
    assert math.isnan(auc([], [1.0, 2.0]))
    out = paper_auc({"kd": [1.0, 2.0]}, {"kd": [0.0, 1.0]}, [0, 1], [1, 0], [1, 0])
    assert out["n"] == 0 and math.isnan(out["kd"])


# ------------------------------------------------------- nothing passed in is modified


def _snapshot(*objs):
    out = []
    for o in objs:
        if isinstance(o, torch.Tensor):
            out.append(("t", o, o.detach().clone(),
                        None if o.grad is None else o.grad.clone()))
        elif isinstance(o, torch.nn.Module):
            out.append(("m", o, {k: v.detach().clone() for k, v in o.state_dict().items()},
                        [mod.training for mod in o.modules()]))
    return out


def _unchanged(snap, grads: bool = True):
    for item in snap:
        if item[0] == "t":
            assert torch.equal(item[1], item[2]) or (
                item[1].dtype.is_floating_point and
                torch.equal(item[1].isnan(), item[2].isnan()) and
                torch.equal(item[1].nan_to_num(), item[2].nan_to_num())), "a tensor was modified"
            grad = item[1].grad
            if not grads:
                continue
            assert (grad is None) == (item[3] is None), "a tensor's .grad was written"
            assert grad is None or torch.equal(grad, item[3]), "a tensor's .grad was changed"
        else:
            state = item[1].state_dict()
            for k, v in item[2].items():
                assert torch.equal(state[k], v), f"model {k} modified"
            assert [mod.training for mod in item[1].modules()] == item[3], "modes changed"


def _train_mode_model():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.Flatten())

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = net, torch.nn.Linear(256, 10)

        def forward_features(self, x):
            return self.body(x)

        def head(self, f):
            return self.fc(f)

        def forward(self, x):
            return self.fc(self.body(x))
    return Classifier(Net(), "rce").train()


def _untouched_calls():
    s = _s
    wb = dict(stage1=dict(max_iterations=2, binary_search_steps=1),
              stage2=dict(max_iterations=2, binary_search_steps=1))
    z, t = lambda: s().z.clone().requires_grad_(True), lambda: s().t.clone()
    return {
        "rce_loss": lambda: (lambda a, b: ([a, b], lambda: rce_fast.rce_loss(a, b, temperature=2.0).backward()))(z(), t()),
        "RCELoss-none": lambda: (lambda a, b: ([a, b], lambda: rce_fast.RCELoss("none")(a, b)))(z(), t()),
        "kdensity": lambda: (lambda q, b, bl, qc: ([q, b, bl, qc], lambda: kdensity(q, b, bl, qc, 1.0).sum().backward()))(
            s().feats[:6].clone().requires_grad_(True), s().feats.clone(), s().labels.clone(), s().labels[:6].clone()),
        "KD-fit-score-threshold-detect": lambda: (lambda f, lab: ([f, lab], lambda: (
            KDensityDetector(sigma2=1.0, per_class=4).fit(f, lab).fit_threshold(f, lab, 0.1),
            s().kd.score(f, lab, batch_size=7), s().kd.detect(f, lab),
            s().kd.class_medians(f, lab, 3))))(s().feats.clone(), s().labels.clone()),
        "confidence-non_me": lambda: (lambda a: ([a], lambda: (confidence(a), non_me(a))))(s().z.clone()),
        "auc-metrics": lambda: (lambda a, b, c: ([a, b, c], lambda: (
            auc(a, b), threshold_for_fpr(a, 0.2), detection_metrics(a, b),
            paper_auc({"k": a}, {"k": b}, c, c, c.flip(0)), robust_accuracy(a, b, c, c))))(
            torch.rand(6), torch.rand(6), s().t.clone()),
        "LID-Maha": lambda: (lambda mdl, xx: ([mdl, xx], lambda: (
            s().lid.score(mdl, xx), s().maha.score(mdl, xx, batch_size=4),
            s().lid.detect(mdl, xx, threshold=0.0))))(s().model, s().x.clone()),
        "Guarded": lambda: (lambda g, xx: ([g.classifier, xx], lambda: g(xx).sum()))(s().guarded, s().x.clone()),
        "fgsm": lambda: _attack(lambda mdl, xx, y: A.fgsm(mdl, xx, [0.1, 0.2], labels=y)),
        "bim": lambda: _attack(lambda mdl, xx, y: A.bim(mdl, xx, 0.1, steps=2, labels=y)),
        "ilcm": lambda: _attack(lambda mdl, xx, y: A.ilcm(mdl, xx, 0.1, steps=2)),
        "jsma": lambda: _attack(lambda mdl, xx, y: A.jsma(mdl, xx, y.roll(1), max_iterations=2)),
        "cw_l2": lambda: _attack(lambda mdl, xx, y: A.cw_l2(mdl, xx, y.roll(1), max_iterations=3, binary_search_steps=1, init=xx)),
        "cw_wb": lambda: _attack(lambda mdl, xx, y: A.cw_wb(mdl, xx, y.roll(1), _kd_for(mdl), **wb)),
        "rand_noise": lambda: (lambda xx: ([xx], lambda: A.rand_noise(xx, 0.1)))(s().x.clone()),
        "pgd": lambda: _attack(lambda mdl, xx, y: A.pgd(mdl, xx, 0.1, steps=2, labels=y, norm="l2")),
        "orthogonal_pgd": lambda: _attack(lambda mdl, xx, y: A.orthogonal_pgd(
            GuardedClassifier(mdl, _kd_for(mdl)), xx, 0.1, steps=2, labels=y)),
        "train": lambda: (lambda xx, y: ([xx, y], lambda: train(TrainConfig(
            model="resnet8", steps=1, batch_size=4, lr_boundaries=[], lr_values=[0.1],
            progress=False), xx, y, "cpu")))(s().x_all[:16].clone().requires_grad_(True),
                                              s().y_all[:16].clone()),
        "train-float64": lambda: (lambda xx, y: ([xx, y], lambda: train(TrainConfig(
            model="resnet8", steps=1, batch_size=4, lr_boundaries=[], lr_values=[0.1],
            progress=False), xx, y, "cpu")))(s().x_all[:16].double(), s().y_all[:16].clone()),
        "evaluate_detectors": lambda: (lambda mdl, xx, y: ([mdl, xx, y], lambda: (
            rce_fast.detect.evaluate_detectors(mdl, {"kd": _kd_for(mdl), "c": "confidence"},
                                               xx, xx, y, {"a": xx + 0.01}))))(
            _train_mode_model(), s().x.clone(), s().y.clone()),
        "KD-fit-features-with-grad": lambda: (lambda f, lab: ([f, lab], lambda: (
            _kd_holds_values(f, lab))))(s().feats.clone().requires_grad_(True),
                                        s().labels.clone()),
    }


def _kd_holds_values(features, labels):
    """A detector fitted on features with a graph behind them (a model's output, here
    features * 1) holds values, not the graph."""
    det = KDensityDetector(sigma2=1.0, per_class=4).fit(features * 1.0, labels)
    medians = det.class_medians(features * 1.0, labels, 3)
    assert det.bank.grad_fn is None and not det.bank.requires_grad
    assert medians.grad_fn is None and not medians.requires_grad
    assert not det.score(features[:3].detach(), labels[:3]).requires_grad


@functools.lru_cache(maxsize=None)
def _kd_cache():
    return {}


def _kd_for(model):
    cache = _kd_cache()
    if id(model) not in cache:
        s = _s()
        with torch.no_grad():
            flags = [mm.training for mm in model.modules()]
            model.eval()
            feats = model.features(s.x_all[:200])
            for mm, f in zip(model.modules(), flags):
                mm.training = f
        det = KDensityDetector(sigma2=1.0, per_class=8).fit(feats, s.labels, 10)
        det.class_medians(feats, s.labels, 4)
        det.fit_threshold(feats[:50], s.labels[:50], 0.1)
        cache[id(model)] = (model, det)
    return cache[id(model)][1]


def _attack(run):
    """An attack on a train-mode model with batch norm: inputs, labels and the model."""
    mdl = _train_mode_model()
    xx, y = _s().x.clone(), _s().y.clone()
    _kd_for(mdl)
    return [mdl, xx, y], lambda: run(mdl, xx, y)


# cases whose call runs backward() itself: their inputs' .grad is written by design
_BACKWARD = {"rce_loss", "kdensity"}


@pytest.mark.parametrize("name", list(_untouched_calls()))
def test_inputs_are_not_modified(name):
    objs, call = _untouched_calls()[name]()
    snap = _snapshot(*objs)
    call()
    _unchanged(snap, grads=name not in _BACKWARD)


def test_case_count():
    """The size of the matrix (reported by the lead): every case above is one line."""
    assert len(CASES) >= 300, len(CASES)
