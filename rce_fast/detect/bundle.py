"""Detector files for the command line: any detector, its calibration and its model.

``save_detector`` writes one file holding the detector's state, the sorted scores of
held-out clean inputs (so a threshold can be set later for any FPR), the threshold, and
a fingerprint of the model it was fitted with; ``load_detector`` reads it back with
``torch.load(weights_only=True)`` (tensors, numbers and strings only: no code runs).
``load_detector`` also reads the files of ``KDensityDetector.save``,
``LIDDetector.save`` and ``MahalanobisDetector.save``.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .._args import check_device
from .._io import atomic_torch_save, check_writable, safe_torch_load
from .kd_detector import KDensityDetector
from .lid import LIDDetector
from .mahalanobis import MahalanobisDetector
from .rates import as_scores, threshold_at_fpr

FORMAT = "rce_fast.detector/1"
KINDS = {"kdensity": KDensityDetector, "lid": LIDDetector, "mahalanobis": MahalanobisDetector}


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class DetectorFile:
    """What :func:`load_detector` returns."""
    detector: object
    kind: str
    calibration_scores: Tensor | None    # sorted float64 scores of held-out clean inputs
    threshold: float | None
    fpr: float | None
    model_fingerprint: str | None
    meta: dict

    def threshold_for(self, fpr: float | None = None) -> float:
        """The threshold at ``fpr`` from the calibration scores, or the stored one."""
        if fpr is None:
            if self.threshold is None:
                raise ValueError("the detector file has no threshold: pass an FPR")
            return self.threshold
        if self.calibration_scores is None:
            raise ValueError("the detector file has no calibration scores, so no threshold "
                             "can be set for a new FPR; refit it with `rce-fast fit-detector`")
        return threshold_at_fpr(self.calibration_scores, fpr)


def _kind_of(detector) -> str:
    for kind, cls in KINDS.items():
        if isinstance(detector, cls):
            return kind
    raise TypeError(f"detector must be one of {[c.__name__ for c in KINDS.values()]}, got "
                    f"{type(detector).__name__}")


def save_detector(path, detector, calibration_scores=None, fpr: float | None = None,
                  model: torch.nn.Module | None = None, kernel_points: int | None = None,
                  meta: dict | None = None) -> None:
    """Write ``detector`` with its calibration (atomically: a temporary file, renamed).

    Args:
        detector: a fitted KDensityDetector, LIDDetector or MahalanobisDetector.
        calibration_scores: scores of held-out clean inputs (kept sorted).
        fpr: the FPR of ``detector.threshold`` (informational).
        model: the classifier it was fitted with (its fingerprint is stored and checked
            by :func:`check_model`).
        kernel_points: for K-density with class medians: the ``kernel_points`` given to
            ``class_medians`` (its small bank is rebuilt identically on load, so C&W-wb
            runs on a loaded detector).
        meta: extra strings / numbers to keep (checkpoint path, dataset, ...).
    """
    kind = _kind_of(detector)
    check_writable(path, "detector")
    state = detector.state_dict()
    state.pop("kind", None)
    cal = None
    if calibration_scores is not None:
        cal = torch.from_numpy(as_scores(calibration_scores, "calibration_scores")).sort().values
    thr = detector.threshold
    payload = {"format": FORMAT, "kind": kind, "state": state, "calibration_scores": cal,
               "threshold": None if thr is None else float(thr),
               "fpr": None if fpr is None else float(fpr),
               "model_fingerprint": None if model is None else model_fingerprint(model),
               "kernel_points": kernel_points, "meta": dict(meta or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(payload, path)


def _kdensity_from_state(state: dict, device, kernel_points: int | None,
                         source: str = "state") -> KDensityDetector:
    state = dict(state)
    if state.get("kernel_points") is None and kernel_points is not None:
        state["kernel_points"] = kernel_points  # files written before the detector kept it
    return KDensityDetector.from_state_dict(state, device, source=source)


def load_detector(path, device: str | torch.device = "cpu") -> DetectorFile:
    """Read a file of :func:`save_detector` (or of a detector's own ``save``)."""
    path = Path(path)
    device = check_device(device)
    payload = safe_torch_load(path, "a detector file (rce-fast fit-detector, or a "
                                    "detector's save)")
    if not isinstance(payload, dict):
        raise ValueError(f"{path} does not hold a detector (found {type(payload).__name__})")
    try:
        return _detector_file(path, payload, device)
    except (KeyError, TypeError, AttributeError, RuntimeError, IndexError) as exc:
        raise ValueError(f"{path}: not a valid detector file ({type(exc).__name__}: "
                         f"{str(exc)[:200]})") from None


def _detector_file(path: Path, payload: dict, device: torch.device) -> DetectorFile:
    if payload.get("format") == FORMAT:
        kind, state = payload["kind"], payload["state"]
        info = dict(calibration_scores=payload["calibration_scores"],
                    threshold=payload["threshold"], fpr=payload["fpr"],
                    model_fingerprint=payload["model_fingerprint"], meta=payload["meta"])
        kernel_points = payload.get("kernel_points")
    elif "bank" in payload and "sigma2" in payload:     # KDensityDetector.save
        kind, state, kernel_points = "kdensity", payload, None
        info = dict(calibration_scores=None, threshold=payload["threshold"], fpr=None,
                    model_fingerprint=None, meta={})
    elif payload.get("kind") in ("lid", "mahalanobis"):  # LID / Mahalanobis .save
        kind, state, kernel_points = payload["kind"], payload, None
        info = dict(calibration_scores=None, threshold=payload.get("threshold"), fpr=None,
                    model_fingerprint=None, meta={})
    else:
        raise ValueError(f"{path} does not hold a detector (keys {sorted(payload)[:8]})")
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown detector kind {kind!r}")
    if kind == "kdensity":
        det = _kdensity_from_state(state, device, kernel_points, source=str(path))
    else:
        det = KINDS[kind]._from_state(state, device)
    thr = info["threshold"]
    if thr is not None and not math.isnan(thr):
        det.threshold = thr
    return DetectorFile(detector=det, kind=kind, **info)


def check_model(file: DetectorFile, model: torch.nn.Module, where: str = "") -> None:
    """ValueError when the detector was fitted with another model (fingerprints differ)."""
    if file.model_fingerprint is not None and model_fingerprint(model) != \
            file.model_fingerprint:
        raise ValueError(f"the detector{where} was fitted with a different model (its "
                         "fingerprint does not match the checkpoint's); refit it with "
                         "`rce-fast fit-detector` on this checkpoint")
