"""The defense table of the end-to-end run: every attack against every detector, for the
CE and the RCE model, at one false-positive rate.

Attacks: the paper's seven (FGSM, BIM, ILCM, JSMA, C&W, C&W-hc, C&W-wb; their examples
are the run's own) and two adaptive ones that attack the classifier and the K-density
detector together through a :class:`rce_fast.detect.GuardedClassifier` whose threshold
is K-density's at the table's FPR: PGD on the guarded model ("PGD-adaptive") and
Orthogonal PGD ("OPGD"). Detectors: confidence, non-ME, K-density, LID and Mahalanobis.
Per (model, attack, detector): AUROC, TPR and robust accuracy at the FPR (default 5%),
and the robust-accuracy curve over FPRs 0 ... 0.2, all from
:func:`rce_fast.detect.evaluate_detectors`.

Which inputs count (the protocol):

- The n attacked test images are split by position. Even positions (0, 2, 4, ...) are
  the CALIBRATION half: their clean versions are the held-out clean inputs on which
  every threshold is set (the largest t flagging at most 5% of them, flag score < t).
  Odd positions are the EVALUATION half: all the metrics are computed on their clean
  versions and on the attacked versions of them. The adaptive attacks' threshold comes
  from the calibration half too, and they attack only evaluation images.
- AUROC: every clean evaluation image (normal) against the attacked evaluation images
  that the classifier misclassifies (adversarial). TPR: the share of those
  misclassified attacked images flagged at the threshold. Robust accuracy: the share of
  ALL attacked evaluation images that are flagged or still correctly classified (1 minus
  it is the attack's success rate against classifier + detector). The paper's Table 2
  protocol (pairs of a correctly classified clean image and its misclassified attacked
  version, every image) is kept for the Table 2 AUCs above the table.
- LID and Mahalanobis are fitted once per model on training images: clean, noisy
  (:func:`rce_fast.detect.noisy_like`, same L2 as the attack) and BIM adversarial
  examples (at the run's eps) of the first ``baseline_fit_n`` training images; every
  other attack in the table is unseen by them.

Every piece of work is a unit of the run's state folder, recorded in ``state.json`` when
it finishes and skipped when it is already there: the BIM examples for fitting
(``OBJ/baseline-fit``), the two detectors (``OBJ/LID``, ``OBJ/Mahalanobis``), the two
adaptive attacks (``OBJ/PGD-adaptive``, ``OBJ/OPGD``) and the table itself
(``OBJ/defense``, whose record holds the metrics).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from . import attacks as A
from .detect import (GuardedClassifier, LIDDetector, MahalanobisDetector,
                     evaluate_detectors, noisy_like, plot_robust_accuracy, score_dataset,
                     threshold_at_fpr)
from .resume import atomic_write

#: The adaptive attacks of the table (both attack classifier + K-density).
ADAPTIVE_ATTACKS = ("PGD-adaptive", "OPGD")
ADAPTIVE_SLUGS = {"PGD-adaptive": "pgd-adaptive", "OPGD": "opgd"}
DETECTORS = ("confidence", "non-ME", "K-density", "LID", "Mahalanobis")
#: The three numbers of the table, per model.
COLUMNS = ("auroc", "tpr", "robust_accuracy")
PLOT = "robust_accuracy.png"
#: Inputs per scoring batch (the same wherever a threshold is set or used, so the
#: adaptive attacks' threshold is bit for bit the table's).
BATCH = 500
#: Files the table's units write in the state folder (for --restart).
FILES = tuple(f"{o}_{k}.pt" for o in ("ce", "rce") for k in ("lid", "mahalanobis")) + \
    tuple(f"adversarial/{o}_{s}.pt" for o in ("ce", "rce")
          for s in ("fit-bim", *ADAPTIVE_SLUGS.values())) + (PLOT,)


def halves(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, evaluation) positions of n attacked images: even and odd."""
    idx = torch.arange(n)
    return idx[0::2], idx[1::2]


def _fit_rows(cfg, x_tr) -> int:
    return min(cfg.baseline_fit_n, len(x_tr))


def _fit_data(cfg, run, budget, objective, model, x_tr, device, passes, n, save_adv,
              load_adv):
    """BIM examples of the first baseline_fit_n training images (LID / Mahalanobis fit)."""
    key = f"{objective}/baseline-fit"
    m = _fit_rows(cfg, x_tr)
    x_fit = x_tr[:m]
    path = run.out / "adversarial" / f"{objective}_fit-bim.pt"
    if key not in run.units:
        def work():
            t0 = time.perf_counter()
            adv = A.bim(model, x_fit.to(device), cfg.eps).cpu()
            return adv, time.perf_counter() - t0
        adv, seconds = budget.run_unit("baseline fit data",
                                    passes(objective, model, 12.0 * m / n),
                                    work)
        save_adv(path, adv, x_fit, None, seconds)
        run.record(key, {"seconds": seconds, "n": m})
    return x_fit, load_adv(path, x_fit)[0]


def _lid(cfg, run, budget, objective, model, x_fit, adv_fit, device, passes, n):
    key = f"{objective}/LID"
    path = run.out / f"{objective}_lid.pt"
    if key not in run.units:
        def work():
            t0 = time.perf_counter()
            det = LIDDetector(k=cfg.lid_k, batch_size=cfg.lid_batch,
                              layers=cfg.lid_layers, seed=cfg.seed)
            det.fit(model, x_fit, adv_fit, noisy_like(x_fit, adv_fit, seed=cfg.seed))
            det.save(path)
            return time.perf_counter() - t0
        seconds = budget.run_unit("LID", passes(objective, model,
                                                     3.0 * len(x_fit) / n),
                               work)
        run.record(key, {"seconds": seconds, "layers": cfg.lid_layers or "all"})
    return LIDDetector.load(path, device)


def _mahalanobis(cfg, run, budget, objective, model, x_tr, y_tr, x_fit, adv_fit, device,
                 num_classes, passes, n):
    key = f"{objective}/Mahalanobis"
    path = run.out / f"{objective}_mahalanobis.pt"
    if key not in run.units:
        def work():
            t0 = time.perf_counter()
            det = MahalanobisDetector(noise=cfg.mahalanobis_noise, seed=cfg.seed)
            det.fit(model, x_tr, y_tr, adv_fit, noisy_like(x_fit, adv_fit, seed=cfg.seed),
                    clean=x_fit, num_classes=num_classes)
            det.save(path)
            return time.perf_counter() - t0
        seconds = budget.run_unit("Mahalanobis", passes(
            objective, model, (len(x_tr) + 3.0 * len(x_fit)) / n), work)
        run.record(key, {"seconds": seconds})
    return MahalanobisDetector.load(path, device)


def adaptive_rows(cfg, n: int) -> torch.Tensor:
    """Positions (in the attacked images) of the images the adaptive attacks attack: the
    first ``adaptive_n`` evaluation images (all of them when None)."""
    ev = halves(n)[1]
    return ev if cfg.adaptive_n is None else ev[:cfg.adaptive_n]


def _kd_threshold(cfg, model, det, x_att) -> float:
    cal = halves(len(x_att))[0]
    _, scores = score_dataset(model, det, x_att[cal], batch_size=BATCH)
    return threshold_at_fpr(scores, cfg.defense_fpr)


def _adaptive(cfg, run, budget, objective, name, model, det, x_att, y_att, device, passes,
              save_adv, load_adv):
    """One adaptive attack on the guarded K-density model; returns its examples."""
    key = f"{objective}/{name}"
    rows = adaptive_rows(cfg, len(x_att))
    x, y = x_att[rows], y_att[rows]
    path = run.out / "adversarial" / f"{objective}_{ADAPTIVE_SLUGS[name]}.pt"
    if key not in run.units:
        threshold = _kd_threshold(cfg, model, det, x_att)
        guarded = GuardedClassifier(model, det, threshold=threshold)
        xd, yd = x.to(device), y.to(device)
        if name == "PGD-adaptive":
            steps, per_step = cfg.pgd_steps, 2.5   # forward + backward, K-density included
            fn = lambda: A.pgd(guarded, xd, cfg.eps, steps=steps, labels=yd,  # noqa: E731
                               seed=cfg.seed, progress=cfg.progress, return_info=True)
        else:
            steps, per_step = cfg.opgd_steps, 3.5  # one forward, two backward passes
            fn = lambda: A.orthogonal_pgd(guarded, xd, cfg.eps, steps=steps,  # noqa: E731
                                          labels=yd, seed=cfg.seed, progress=cfg.progress,
                                          return_info=True)

        def work():
            t0 = time.perf_counter()
            adv, info = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return adv.cpu(), info, time.perf_counter() - t0
        estimate = passes(objective, model, per_step * steps * len(rows) / len(x_att))
        adv, info, seconds = budget.run_unit(f"attack {name}", estimate, work)
        save_adv(path, adv, x, info, seconds)
        # n_attack: the threshold was calibrated on the other half of these attacked
        # images, so the examples belong to this number of them
        run.record(key, {"seconds": seconds, "threshold": threshold, "n": len(rows),
                         "n_attack": len(x_att)})
    return load_adv(path, x)[0]


def _json_metrics(res: dict) -> dict:
    out = {}
    for k, v in res.items():
        if k == "curve":
            fprs, acc = v
            out[k] = {"fpr": [float(f) for f in fprs], "robust_accuracy": [float(a) for a
                                                                          in acc]}
        elif isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        else:
            out[k] = v
    return out


def run_units(cfg, run, budget, device, objective, model, det, data, num_classes, passes,
              save_adv, load_adv, log) -> None:
    """Every unit of the table for one model (each skipped when done)."""
    x_tr, y_tr, x_att, y_att = data
    if f"{objective}/defense" in run.units:
        return
    n = len(x_att)
    x_fit, adv_fit = _fit_data(cfg, run, budget, objective, model, x_tr, device, passes, n,
                               save_adv, load_adv)
    lid = _lid(cfg, run, budget, objective, model, x_fit, adv_fit, device, passes, n)
    maha = _mahalanobis(cfg, run, budget, objective, model, x_tr, y_tr, x_fit, adv_fit,
                        device, num_classes, passes, n)
    adaptive = {name: _adaptive(cfg, run, budget, objective, name, model, det, x_att, y_att,
                                device, passes, save_adv, load_adv)
                for name in ADAPTIVE_ATTACKS}
    paper = {}
    from .experiment import ATTACK_SLUGS, ATTACKS
    for name in ATTACKS:
        paper[name] = load_adv(run.out / "adversarial" /
                               f"{objective}_{ATTACK_SLUGS[name]}.pt", x_att)[0]
    detectors = {"confidence": "confidence", "non-ME": "non-ME", "K-density": det,
                 "LID": lid, "Mahalanobis": maha}

    def work():
        cal, ev = halves(len(x_att))
        rows = adaptive_rows(cfg, len(x_att))
        common = dict(fpr=cfg.defense_fpr, batch_size=BATCH)
        table = evaluate_detectors(model, detectors, x_att[cal], x_att[ev], y_att[ev],
                                   {name: adv[ev] for name, adv in paper.items()}, **common)
        table.update(evaluate_detectors(model, detectors, x_att[cal], x_att[ev], y_att[ev],
                                        adaptive, y_adv=y_att[rows], **common))
        return table
    # scoring: 5 detectors x (2 + 9 attacks) half-sets, LID / Mahalanobis a few passes
    estimate = passes(objective, model, 5 * 11 * 0.5 * 2.0)
    t0 = time.perf_counter()
    table = budget.run_unit("defense table", estimate, work)
    record = {name: {d: _json_metrics(table[name][d]) for d in DETECTORS}
              for name in (*ATTACKS, *ADAPTIVE_ATTACKS)}
    run.record(f"{objective}/defense", {"fpr": cfg.defense_fpr,
                                        "seconds": time.perf_counter() - t0,
                                        "metrics": record})
    kd = record["OPGD"]["K-density"]
    log(f"[{objective}] defense table done: OPGD against K-density: robust accuracy "
        f"{kd['robust_accuracy']:.3f} at FPR {cfg.defense_fpr:g}")


# ------------------------------------------------------------------------------ report

def results_of(run, cfg, n: int) -> dict:
    """The table as results.json holds it (n: the number of attacked images):
    {"fpr", "calibration_images", "evaluation_images", "adaptive_images", "settings",
    "models": {obj: {attack: {detector: metrics}}}, "adaptive": {obj: {attack: record}}}."""
    cal, ev = halves(n)
    out = {"fpr": cfg.defense_fpr, "calibration_images": len(cal),
           "evaluation_images": len(ev), "adaptive_images": len(adaptive_rows(cfg, n)),
           "settings": trimmed_settings(cfg), "models": {}, "adaptive": {}}
    for obj in ("ce", "rce"):
        out["models"][obj] = run.units[f"{obj}/defense"]["metrics"]
        out["adaptive"][obj] = {a: run.units[f"{obj}/{a}"] for a in ADAPTIVE_ATTACKS}
    return out


def trimmed_settings(cfg) -> dict:
    return {"eps": cfg.eps, "pgd_steps": cfg.pgd_steps, "opgd_steps": cfg.opgd_steps,
            "adaptive_n": cfg.adaptive_n, "baseline_fit_n": cfg.baseline_fit_n,
            "lid_k": cfg.lid_k, "lid_batch": cfg.lid_batch,
            "lid_layers": cfg.lid_layers or "all", "mahalanobis_noise": cfg.mahalanobis_noise}


def _num(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def render(defense: dict) -> list[str]:
    """The report's section: the definitions, the table, the settings."""
    f = defense["fpr"]
    s = defense["settings"]
    p = f"{f * 100:g}%"
    lines = [
        f"## Every attack against every detector at {p} FPR (beyond the paper)", "",
        f"Rows: the paper's attacks and two adaptive attacks on classifier + K-density "
        f"together (a GuardedClassifier whose threshold is K-density's at {p} FPR): "
        f"PGD-adaptive (L-inf PGD, eps {s['eps']}, {s['pgd_steps']} steps, random start) "
        f"and OPGD (Orthogonal PGD, eps {s['eps']}, {s['opgd_steps']} steps). For the "
        f"other detectors those two are transfer attacks.",
        "",
        f"Inputs: the attacked test images are split by position; the clean versions of "
        f"the {defense['calibration_images']} at even positions set every threshold "
        f"(held-out calibration: the largest t flagging at most {p} of them, flag "
        f"score < t), and every number below is on the {defense['evaluation_images']} at "
        f"odd positions (the adaptive attacks attack "
        f"{defense['adaptive_images']} of them).",
        "",
        "- **AUROC**: all clean evaluation images (normal) against the attacked "
        "evaluation images the classifier misclassifies (adversarial); not the paper's "
        "pairs protocol of Table 2.",
        "- **TPR**: share of those misclassified attacked images flagged at the "
        "threshold.",
        f"- **RA** (robust accuracy at {p} FPR): share of ALL attacked evaluation images "
        f"that are flagged by the detector at the threshold OR still classified "
        f"correctly; 1 - RA is the attack's success rate against classifier + detector.",
        f"- LID (k = {s['lid_k']}, reference minibatch of {s['lid_batch']}, layers: "
        f"{s['lid_layers'] if isinstance(s['lid_layers'], str) else ', '.join(s['lid_layers'])}"
        f") and Mahalanobis (tied covariance, layer ensemble, pre-processing noise "
        f"{s['mahalanobis_noise']:g}) are fitted on clean, noisy and BIM examples of "
        f"{s['baseline_fit_n']} training images; the other attacks are unseen by them.",
        "",
        "| attack | detector | CE AUROC | CE TPR | CE RA | RCE AUROC | RCE TPR | RCE RA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    models = defense["models"]
    for attack in models["ce"]:
        for det in DETECTORS:
            row = [attack, det]
            for obj in ("ce", "rce"):
                m = models[obj][attack][det]
                row += [_num(m.get(c)) for c in COLUMNS]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "n/a: no attacked evaluation image was misclassified (no adversarial "
              "side for AUROC and TPR).", "",
              f"`{PLOT}`: robust accuracy against FPR (thresholds on the calibration "
              "half), per model and detector the lowest over the attacks at each FPR.", ""]
    return lines


def worst_case_curves(defense: dict) -> dict:
    """{"CE K-density": (fprs, min over attacks of the robust accuracy), ...}."""
    curves = {}
    for obj in ("ce", "rce"):
        table = defense["models"][obj]
        for det in DETECTORS:
            rows = [table[a][det]["curve"] for a in table]
            fprs = np.asarray(rows[0]["fpr"])
            acc = np.min([r["robust_accuracy"] for r in rows], axis=0)
            curves[f"{obj.upper()} {det}"] = (fprs, acc)
    return curves


def write_plot(out: Path, defense: dict) -> None:
    atomic_write(out / PLOT, lambda tmp: plot_robust_accuracy(
        worst_case_curves(defense), tmp,
        title="robust accuracy, worst attack per FPR (evaluation half)"))


__all__ = ["ADAPTIVE_ATTACKS", "DETECTORS", "COLUMNS", "PLOT", "halves", "run_units",
           "results_of", "render", "write_plot", "worst_case_curves"]
