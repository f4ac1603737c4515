"""The end-to-end experiment: train CE and RCE models, attack them, detect, report.

Produces ``report.md``, ``results.json`` and PNG plots in the output folder:
classification error (the paper's Table 1 layout), AUC of confidence / non-ME /
K-density per attack for CE and RCE (Table 2), the C&W-wb table (ratio of f2 > 0 and
distortion, Table 3), time per adversarial example (appendix Table 1), ROC curves,
K-density histograms of normal, noisy and adversarial inputs (appendix Fig. 2/3), and a
grid of example adversarial images.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import attacks as A
from .attacks.cw import WB_STAGE1, WB_STAGE2, f2_positive_ratios
from ._args import check_seed
from .data import load_dataset
from . import _defense_table as DT
from .detect import KDensityDetector, confidence, non_me, paper_auc
from .detect.rates import _check_fpr
from .resume import (Budget, ResumeMismatch, StopRequested, WorkControl, atomic_torch_save,
                     atomic_write, atomic_write_text, check_output_folder, normalise,
                     pack_like, settings_diff, unpack_like)
from .train import (TrainConfig, data_fingerprint, evaluate_error, load_classifier,
                    scaled_schedule, train)

ATTACKS = ("FGSM", "BIM", "ILCM", "JSMA", "C&W", "C&W-hc", "C&W-wb")
METRICS = ("confidence", "non-ME", "K-density")
PAPER_TABLE1 = {("mnist", "resnet32", "ce"): 0.38, ("mnist", "resnet56", "rce"): 0.32}
PAPER_SECONDS = {"FGSM": (1.9e-3, 2.4e-3), "BIM": (3.3e-3, 3.6e-3), "ILCM": (4.1e-3, 4.3e-3),
                 "JSMA": (29.0, 20.0), "C&W": (45.0, 55.0), "C&W-hc": (65.0, 110.0),
                 "C&W-wb": (700.0, 1300.0)}


@dataclass
class ExperimentConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "resnet8"
    steps: int = 1500
    n_attack: int = 300               # test images attacked per model
    out: str = "rce_fast_demo"
    device: str | None = None
    seed: int = 0
    per_class: int = 1000             # K-density bank rows per class
    kernel_points: int = 100          # C&W-wb median threshold bank
    eps: float = 0.1                  # FGSM / BIM / ILCM
    rand_eps: float = 0.04            # RAND (appendix B.3)
    jsma_gamma: float = 0.1
    jsma_max_iterations: int | None = 100
    cw_steps: int = 200
    cw_search: int = 5
    cw_c_init: float = 1.0
    wb_stage1: dict = field(default_factory=lambda: dict(max_iterations=200, c_init=10.0,
                                                        binary_search_steps=1))
    wb_stage2: dict = field(default_factory=lambda: dict(max_iterations=200, c_init=100.0,
                                                        binary_search_steps=3))
    checkpoints: dict = field(default_factory=dict)  # objective -> existing checkpoint
    progress: bool = True
    # The defense table (every attack x every detector at one FPR; rce_fast._defense_table)
    defense_fpr: float = 0.05         # the operating point: FPR on held-out clean images
    pgd_steps: int = 40               # adaptive PGD on classifier + K-density
    opgd_steps: int = 100             # Orthogonal PGD (the paper's 100)
    adaptive_n: int | None = None     # evaluation images attacked adaptively (None: all)
    baseline_fit_n: int = 1000        # training images (clean, noisy, BIM) fitting LID / Maha
    lid_k: int = 20                   # LID neighbours (Ma et al.: 20)
    lid_batch: int = 100              # LID reference minibatch (Ma et al.: 100)
    lid_layers: list | None = None    # LID layers (None: every layer of the network)
    mahalanobis_noise: float = 0.0    # Mahalanobis input pre-processing (0: off)

    #: The demo's training steps and attacked images (every digits test image: 540).
    DEMO_STEPS = 4000
    DEMO_N_ATTACK = 1000
    #: The demo's C&W budgets: 150 iterations per binary-search step rather than the
    #: default 200, which keeps the whole demo under 10 minutes on a 2-core CPU (C&W,
    #: C&W-hc and C&W-wb are 60% of its time).
    DEMO_ATTACKS = dict(cw_steps=150,
                        wb_stage1=dict(max_iterations=150, c_init=10.0, binary_search_steps=1),
                        wb_stage2=dict(max_iterations=150, c_init=100.0,
                                       binary_search_steps=3))
    #: The demo's trimmed budgets for the defense table (the defaults are the papers').
    DEMO_DEFENSE = dict(pgd_steps=20, opgd_steps=50, baseline_fit_n=500,
                        lid_layers=["block1", "block2", "block3", "features"])

    @classmethod
    def demo(cls, **overrides) -> "ExperimentConfig":
        """Embedded digits, ResNet-8, small attack budgets: minutes on a 2-core CPU.

        4000 steps rather than fewer: RCE's margins (and so C&W-hc with the paper's
        kappa = 10) need them, and every test image is attacked so that the AUCs rest on
        hundreds of pairs (their standard errors are in the report)."""
        return cls(**{"jsma_gamma": 0.3, "steps": cls.DEMO_STEPS,
                      "n_attack": cls.DEMO_N_ATTACK, **cls.DEMO_ATTACKS, **cls.DEMO_DEFENSE,
                      **overrides})

    @classmethod
    def paper(cls, dataset: str, data_dir: str, **overrides) -> "ExperimentConfig":
        """The paper's settings (ResNet-32, 20k / 90k steps, 1000 images, 9 x 10,000 C&W
        steps, the two-stage C&W-wb, 100 JSMA iterations)."""
        base = dict(dataset=dataset, data_dir=data_dir, model="resnet32",
                    steps=90_000 if dataset == "cifar10" else 20_000, n_attack=1000,
                    cw_steps=10_000, cw_search=9, cw_c_init=1e-3,
                    wb_stage1=dict(max_iterations=5000, c_init=10.0, binary_search_steps=3),
                    wb_stage2=dict(max_iterations=10_000, c_init=100.0,
                                   binary_search_steps=9),
                    out=f"rce_fast_{dataset}")
        base.update(overrides)
        return cls(**base)


def _batched(fn, x, device, batch=1000):
    return torch.cat([fn(b.to(device)).detach().cpu() for b in x.split(batch)])


def _scores(model, det, x, device):
    """(predictions, {metric: scores}) for inputs x; higher score = more normal."""
    with torch.no_grad():
        logits, feats = [], []
        for b in x.split(1000):
            z, f = model.logits_and_features(b.to(device))
            logits.append(z.float().cpu())
            feats.append(f.cpu())
        z, f = torch.cat(logits), torch.cat(feats)
    pred = z.argmax(1)
    kd = det.score(f.to(device), pred.to(device)).float().cpu()
    return pred, {"confidence": confidence(z), "non-ME": non_me(z), "K-density": kd}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------ the state folder

#: The run's record in its output folder: settings, finished units, sessions.
STATE_FILE = "state.json"
_STATE_FORMAT = "rce_fast-experiment-state/1"
#: File names of the attacks' results (adversarial/OBJECTIVE_SLUG.pt).
ATTACK_SLUGS = {"FGSM": "fgsm", "BIM": "bim", "ILCM": "ilcm", "JSMA": "jsma", "C&W": "cw",
                "C&W-hc": "cw-hc", "C&W-wb": "cw-wb"}
#: ExperimentConfig fields that do not change the results (not compared on resume;
#: data_dir is replaced by a fingerprint of the data, so the folder may move).
_NOT_SETTINGS = ("out", "device", "progress", "data_dir")
#: A C&W attack under way saves its whole state at least this often (seconds), so a
#: SIGKILL loses little.
AUTOSAVE_SECONDS = 300.0
_PLOTS = ("roc.png", "kd_hist.png", "examples.png")


def experiment_settings(cfg: ExperimentConfig, data: dict) -> dict:
    """What a state folder must match to be continued: every setting that changes the
    results, and the fingerprint of the data."""
    out = {k: v for k, v in asdict(cfg).items() if k not in _NOT_SETTINGS}
    out["data"] = data
    return normalise(out)


def _owned_files(out: Path) -> list[Path]:
    """Every file a run writes in its folder (what --restart removes; nothing else)."""
    names = [STATE_FILE, "report.md", "results.json", *_PLOTS, *DT.FILES]
    for obj in ("ce", "rce"):
        names += [f"{obj}.pt", f"{obj}_detector.pt"]
        for slug in ATTACK_SLUGS.values():
            names += [f"adversarial/{obj}_{slug}.pt", f"partial/{obj}_{slug}.pt"]
    return [out / n for n in names]


class _RunState:
    """``state.json``: the settings, the finished units with what they measured, and
    one record per session. Rewritten atomically after every unit."""

    def __init__(self, out: Path, settings: dict, log, force: bool, restart: bool) -> None:
        self.out, self.path = out, out / STATE_FILE
        if restart:
            for f in _owned_files(out):
                f.unlink(missing_ok=True)
            for d in ("adversarial", "partial"):
                with contextlib.suppress(OSError):
                    (out / d).rmdir()
        self.forced: list[str] = []
        if self.path.is_file():
            try:
                state = json.loads(self.path.read_text())
                if state.get("format") != _STATE_FORMAT:
                    raise ValueError(f"format {state.get('format')!r}")
            except (ValueError, OSError) as exc:
                raise ValueError(f"{self.path} is not a readable rce_fast run state ({exc}); "
                                 "use --restart to start over in this folder") from None
            diffs = settings_diff(state["settings"], settings)
            if diffs and not force:
                raise ResumeMismatch(
                    f"{out} holds a run with other settings ({'; '.join(diffs)}): run the "
                    "same command to continue it, add --force-resume to continue it with "
                    "the new settings (finished parts stay as they are), or --restart to "
                    "start over")
            if diffs:
                log(f"continuing {out} with changed settings (--force-resume): "
                    + "; ".join(diffs))
                state.setdefault("forced_resumes", []).append(diffs)
                state["settings"] = settings
                self.forced = diffs
            self.state = state
        else:
            self.state = {"format": _STATE_FORMAT, "settings": settings, "units": {},
                          "sessions": []}
        self.save()

    @property
    def units(self) -> dict:
        return self.state["units"]

    def record(self, key: str, value: dict) -> None:
        self.units[key] = value
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.state, indent=1))

    @staticmethod
    def session_record(device, budget: Budget, result: str) -> dict:
        return {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(
                    time.time() - budget.elapsed())),
                "seconds": round(budget.elapsed(), 3), "device": str(device),
                "device_name": _device_name(device), "torch": torch.__version__,
                "time_budget": budget.seconds, "result": result}

    def session(self, record: dict) -> None:
        self.state["sessions"].append(record)
        self.save()


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from ._backend import cpu_model
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


# ------------------------------------------------------------------ files of the units

def _save_adversarial(path: Path, adv: Tensor, x: Tensor, info, seconds: float) -> None:
    stored = {}
    for k, v in (info.as_dict() if info is not None else {}).items():
        if isinstance(v, Tensor):
            stored[k] = v.detach().cpu()
        elif v is None or isinstance(v, (bool, int, float, str)):
            stored[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"x_adv": pack_like(adv, x), "info": stored, "seconds": seconds}, path)


class _OtherImages(ValueError):
    """Stored adversarial examples of other images than this run's."""


def _load_adversarial(path: Path, x: Tensor) -> tuple[Tensor, dict]:
    """The examples and info stored by :func:`_save_adversarial` for the images ``x``;
    ValueError naming the file when it cannot be read or holds examples of other images
    (another ``n_attack``, say)."""
    from ._io import safe_torch_load
    saved = safe_torch_load(path, "adversarial examples of this run")
    try:
        packed, info = saved["x_adv"], saved["info"]
        shape = tuple(int(d) for d in packed["shape"])
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{path} does not hold adversarial examples of this run") from None
    if shape != tuple(x.shape):
        raise _OtherImages(f"{path} holds examples of shape {shape}, this run attacks "
                           f"images of shape {tuple(x.shape)}")
    try:
        return unpack_like(packed, x), info
    except Exception as exc:  # zlib, codec or size errors: a damaged payload
        raise ValueError(f"{path} is damaged ({type(exc).__name__}: {exc})") from None


def _redo_unreadable_units(cfg, run, x_tr: Tensor, x_att: Tensor, log) -> None:
    """Before any work: every finished unit whose adversarial examples will be read again
    is checked; one whose file is damaged (a cut copy of the state folder) or holds
    examples of other images (``n_attack`` changed under force_resume) is dropped, its
    file removed, and redone, instead of failing at the report after all other work.
    A model's defense table, computed from those examples, is redone with them, and so
    are its adaptive attacks when the attacked images changed (their threshold was
    calibrated on the other half of the attacked images, even where their own rows are
    the same)."""
    other_images = False

    def drop(key: str, path: Path | None, why: str) -> None:
        log(f"note: {why}; redoing {key}")
        if path is not None:
            path.unlink(missing_ok=True)
        del run.units[key]

    def check(key: str, path: Path, ref: Tensor) -> bool:
        nonlocal other_images
        if key not in run.units:
            return False
        try:
            _load_adversarial(path, ref)
            return False
        except (ValueError, OSError) as exc:
            other_images |= isinstance(exc, _OtherImages)
            drop(key, path, str(exc).splitlines()[0])
            return True

    for obj in ("ce", "rce"):
        folder = run.out / "adversarial"
        redone = [check(f"{obj}/{name}", folder / f"{obj}_{ATTACK_SLUGS[name]}.pt", x_att)
                  for name in ATTACKS]
        if f"{obj}/defense" in run.units and any(redone):
            drop(f"{obj}/defense", None, f"the attacks of {obj} are redone")
        if f"{obj}/defense" in run.units:
            continue  # its inputs below are not read again
        check(f"{obj}/baseline-fit", folder / f"{obj}_fit-bim.pt",
              x_tr[:min(cfg.baseline_fit_n, len(x_tr))])
        rows = DT.adaptive_rows(cfg, len(x_att))
        for name in DT.ADAPTIVE_ATTACKS:
            key, path = f"{obj}/{name}", folder / f"{obj}_{DT.ADAPTIVE_SLUGS[name]}.pt"
            if check(key, path, x_att[rows]) or key not in run.units:
                continue
            n_then = run.units[key].get("n_attack")  # older states: not recorded
            if n_then != len(x_att) and (n_then is not None or other_images):
                drop(key, path, f"{key} was attacked against a threshold calibrated on "
                     f"{n_then or 'other'} attacked images, this run has {len(x_att)}")
    run.save()


# -------------------------------------------------------------------------- the run

def run_experiment(cfg: ExperimentConfig, log=print, *, budget: Budget | None = None,
                   force_resume: bool = False, restart: bool = False) -> dict:
    """Run the whole pipeline and write the report; returns the results dict.

    Resumable: ``cfg.out`` is the state folder. Every finished unit (a trained model, a
    detector, an attack's adversarial examples) is written there as it finishes, and a
    second call with the same settings continues where the first one stopped; its
    results are the same as those of one uninterrupted call (bit for bit on CPU).

    ``budget``: a :class:`rce_fast.resume.Budget` (time budget, signals); when it says
    stop, the state is saved and :class:`rce_fast.resume.StopRequested` is raised.
    A folder holding a run with other settings raises
    :class:`rce_fast.resume.ResumeMismatch` listing them, unless ``force_resume``
    (finished parts are kept) or ``restart`` (the run's files are removed first).
    """
    if force_resume and restart:
        raise ValueError("force_resume and restart exclude each other")
    budget = Budget() if budget is None else budget
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if budget.sync is None and device.type == "cuda":
        budget.sync = lambda: torch.cuda.synchronize(device)
    out = check_output_folder(cfg.out, "output folder")
    # a copy with the seed as a plain int (a 0-d tensor or NumPy seed is taken as the
    # number it holds); the caller's config is not modified
    cfg = replace(cfg, seed=check_seed(cfg.seed))
    x_tr, y_tr, x_te, y_te = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    # the adaptive attacks need a finite threshold: checked up front
    if _check_fpr(cfg.defense_fpr, "defense_fpr") == 1.0:
        raise ValueError("defense_fpr must be below 1: at 1 every input is flagged and the "
                         "adaptive attacks have no threshold")
    if min(cfg.n_attack, len(x_te)) < 2:  # checked before any work, not at the last table
        raise ValueError(f"n_attack must be >= 2 (got {cfg.n_attack}, {len(x_te)} test "
                         "images): the defense table calibrates its thresholds on half "
                         "of the attacked images and evaluates on the other half")
    data = {"train": data_fingerprint(x_tr, y_tr), "test": data_fingerprint(x_te, y_te)}
    run = _RunState(out, experiment_settings(cfg, data), log, force_resume, restart)
    previous = {s["device"] for s in run.state["sessions"]}
    if previous and str(device) not in previous:
        log(f"note: earlier sessions of this run used {sorted(previous)}, this one "
            f"{device}: results computed on different devices need not match bit for bit")
    try:
        results = _pipeline(cfg, run, budget, device, (x_tr, y_tr, x_te, y_te), log,
                            force_resume)
    except StopRequested as exc:
        run.session(run.session_record(device, budget, f"stopped: {exc.reason}"))
        log(f"stopped ({exc.reason}) after {budget.elapsed():.0f}s; state saved in {out}")
        raise
    except BaseException as exc:
        run.session(run.session_record(device, budget, f"failed: {type(exc).__name__}"))
        raise
    run.session(results["sessions"][-1])  # this session, as the results give it
    return results


def _pipeline(cfg, run: _RunState, budget: Budget, device, data, log, force_resume) -> dict:
    x_tr, y_tr, x_te, y_te = data
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    n = min(cfg.n_attack, len(x_te))
    x_att, y_att = x_te[:n], y_te[:n]
    _redo_unreadable_units(cfg, run, x_tr, x_att, log)
    xa = x_att.to(device)
    pass_seconds: dict[str, float] = {}

    def passes(objective: str, model, count: float) -> float:
        """Estimated seconds of ``count`` gradient passes over the attacked images, from
        one measured pass (once per model and session)."""
        if objective not in pass_seconds:
            _sync(device)
            t = time.perf_counter()
            xg = xa[:1000].detach().clone().requires_grad_(True)
            torch.autograd.grad(model(xg).float().logsumexp(1).sum(), xg)
            _sync(device)
            pass_seconds[objective] = (time.perf_counter() - t) * len(xa) / len(xg)
        return count * pass_seconds[objective]

    for objective in ("ce", "rce"):
        model = _train_unit(cfg, run, budget, device, objective, x_tr, y_tr, x_te, y_te,
                            x_att, num_classes, log, force_resume, passes)
        det = _detector_unit(cfg, run, budget, device, objective, model, x_tr, y_tr, x_att,
                             num_classes, passes)
        runs = _attack_runs(cfg, model, det, num_classes)
        clean = None
        for name in ATTACKS:
            key = f"{objective}/{name}"
            if key in run.units:
                continue
            adv, info, seconds = _attack_unit(cfg, run, budget, device, objective, name,
                                              runs[name], model, xa, x_att, passes)
            if clean is None:
                clean = _scores(model, det, x_att, device)
            entry, _, _ = _attack_entry(name, adv, info, x_att, y_att, clean, model, det,
                                        device, seconds, n)
            aucs = entry["auc"]
            log(f"[{objective}] {name:7s} {seconds / n * 1e3:8.2f} ms/example  pairs "
                f"{entry['pairs']:4d}  AUC conf {aucs['confidence']:.3f} non-ME "
                f"{aucs['non-ME']:.3f} KD {aucs['K-density']:.3f}")
        DT.run_units(cfg, run, budget, device, objective, model, det,
                     (x_tr, y_tr, x_att, y_att), num_classes, passes, _save_adversarial,
                     _load_adversarial, log)

    est = sum(passes(o, _load_model(cfg, run, o, device), 4.0 + 2 * len(ATTACKS))
              for o in ("ce", "rce")) + 10.0
    return budget.run_unit("report", est, lambda: _report(
        cfg, run, device, (x_tr, y_tr, x_te, y_te), num_classes, log,
        run.session_record(device, budget, "finished")))


def _load_model(cfg, run, objective, device):
    if objective in cfg.checkpoints:
        return load_classifier(cfg.checkpoints[objective], device)
    return load_classifier(run.out / f"{objective}.pt", device)


def _train_unit(cfg, run, budget, device, objective, x_tr, y_tr, x_te, y_te, x_att,
                num_classes, log, force_resume, passes):
    key = f"{objective}/train"
    if key in run.units:
        return _load_model(cfg, run, objective, device)
    if objective in cfg.checkpoints:
        seconds = 0.0
        log(f"[{objective}] loaded {cfg.checkpoints[objective]}")
    else:
        bounds, values = scaled_schedule(cfg.dataset, cfg.steps)
        amp = _amp_as_begun(run.out / f"{objective}.pt", device.type == "cuda", log)
        tcfg = TrainConfig(objective=objective, model=cfg.model, steps=cfg.steps,
                           lr_boundaries=bounds, lr_values=values, seed=cfg.seed,
                           augment=cfg.dataset == "cifar10", amp=amp,
                           checkpoint=str(run.out / f"{objective}.pt"),
                           checkpoint_every=max(100, cfg.steps // 10),
                           progress=cfg.progress)
        _, history = train(tcfg, x_tr, y_tr, device, num_classes, budget=budget,
                           force_resume=force_resume, keep_optimizer=False)
        seconds = history["seconds"]
    model = _load_model(cfg, run, objective, device)  # the same path on every run
    error = budget.run_unit("test error", passes(objective, model, len(x_te) / len(x_att)),
                            lambda: evaluate_error(model, x_te, y_te))
    run.record(key, {"seconds": seconds, "test_error": error})
    log(f"[{objective}] test error {error:.2f}% (trained in {seconds:.0f}s)")
    return model


def _amp_as_begun(checkpoint: Path, default: bool, log) -> bool:
    """bf16 autocast is on for training on CUDA; a run that began on another kind of
    device keeps the setting it began with (else the checkpoint, written with the other
    setting, would be refused as a run of other settings when a state folder moves
    between a CPU and a GPU machine). It only acts on CUDA either way."""
    if not checkpoint.is_file():
        return default
    from ._io import safe_torch_load
    try:
        saved = bool(safe_torch_load(checkpoint, "a training checkpoint",
                                    mmap=True)["config"]["amp"])
    except (ValueError, OSError, KeyError, TypeError):
        return default  # train() reports an unreadable checkpoint itself
    if saved != default:
        log(f"note: {checkpoint.name} began with amp={saved} (bf16 autocast on CUDA); its "
            "training continues so")
    return saved


def _detector_unit(cfg, run, budget, device, objective, model, x_tr, y_tr, x_att,
                   num_classes, passes):
    key = f"{objective}/detector"
    path = run.out / f"{objective}_detector.pt"
    if key not in run.units:
        def fit() -> KDensityDetector:
            feats = _batched(model.features, x_tr, device)
            det = KDensityDetector(objective=objective, per_class=cfg.per_class,
                                   seed=cfg.seed)
            det.fit(feats.to(device), y_tr.to(device), num_classes)
            det.class_medians(feats.to(device), y_tr.to(device), cfg.kernel_points)
            det.save(path)  # atomic; holds the C&W-wb kernel points too
            return det

        det = budget.run_unit("detector",
                              passes(objective, model, 2.0 * len(x_tr) / len(x_att)), fit)
        run.record(key, {"sigma2": det.sigma2})
    return KDensityDetector.load(path, device)  # the same path on every run


def _attack_settings(cfg: ExperimentConfig, name: str, n: int) -> dict:
    keys = {"C&W": ("cw_steps", "cw_search", "cw_c_init"),
            "C&W-hc": ("cw_steps", "cw_search", "cw_c_init"),
            "C&W-wb": ("wb_stage1", "wb_stage2", "kernel_points", "per_class")}[name]
    return normalise({"attack": name, "n": n, "seed": cfg.seed,
                      **{k: getattr(cfg, k) for k in keys}})


def _jsma_passes(cfg, x) -> float:
    iterations = int(cfg.jsma_gamma * x[0].numel()) // 2
    if cfg.jsma_max_iterations is not None:
        iterations = min(iterations, cfg.jsma_max_iterations)
    return 2.0 * iterations + 2.0


def _attack_unit(cfg, run, budget, device, objective, name, fn, model, xa, x_att, passes):
    """Run (or continue) one attack and store its result; returns (adv, info, seconds)."""
    slug = ATTACK_SLUGS[name]
    path = run.out / "adversarial" / f"{objective}_{slug}.pt"
    partial = run.out / "partial" / f"{objective}_{slug}.pt"
    if name.startswith("C&W"):
        settings = _attack_settings(cfg, name, len(xa))
        saved, before = None, 0.0
        if partial.is_file():
            from ._io import safe_torch_load
            try:
                state = safe_torch_load(partial, "a stopped attack's state")
                if not isinstance(state, dict) or state.get("settings") != settings:
                    state = None
                else:
                    saved, before = state["state"], float(state["seconds"])
            except (ValueError, OSError, KeyError, TypeError):  # damaged: start it over
                state = None
            if state is None:
                partial.unlink()
        _sync(device)
        t0 = time.perf_counter()

        def save(state: dict) -> None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"settings": settings, "state": state,
                               "seconds": before + time.perf_counter() - t0}, partial)

        control = WorkControl(budget, save, saved, autosave_seconds=AUTOSAVE_SECONDS)
        adv, info = fn(xa, control=control)
        _sync(device)
        seconds = before + time.perf_counter() - t0
    else:
        estimate = {"FGSM": 3.0, "BIM": 12.0, "ILCM": 12.0,
                    "JSMA": _jsma_passes(cfg, x_att)}[name]
        def attack() -> tuple:
            _sync(device)
            t0 = time.perf_counter()
            adv, info = fn(xa)
            _sync(device)
            return adv, info, time.perf_counter() - t0

        adv, info, seconds = budget.run_unit(f"attack {name}",
                                             passes(objective, model, estimate), attack)
    adv = adv.cpu()
    _save_adversarial(path, adv, x_att, info, seconds)
    run.record(f"{objective}/{name}", {"seconds": seconds})
    partial.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # only if empty
        partial.parent.rmdir()
    adv, info = _load_adversarial(path, x_att)  # the same path on every run
    return adv, info, seconds


def _attack_entry(name, adv, info: dict, x_att, y_att, clean, model, det, device, seconds, n):
    clean_pred, clean_scores = clean
    adv_pred, adv_scores = _scores(model, det, adv, device)
    aucs = paper_auc(clean_scores, adv_scores, y_att, clean_pred, adv_pred,
                     standard_errors=True)
    entry = {"seconds_per_example": seconds / n, "pairs": aucs.pop("n"),
             "auc_se": aucs.pop("se"), "auc": aucs,
             "misclassified": float((adv_pred != y_att).float().mean()),
             "mean_l2": float((adv - x_att).flatten(1).norm(dim=1).mean())}
    if name == "C&W-wb":
        # from the stored per-example values, so a state folder of an earlier version
        # (which kept only the ratio over every input) reports the same
        ok = info["classified_as_target"].cpu()
        entry["f2_positive_ratio"], entry["f2_positive_ratio_on_target"] = \
            f2_positive_ratios(info["f2"].cpu(), ok)
        entry["classified_as_target"] = float(ok.float().mean())
        entry["distortion_l2"] = float(info["l2"].cpu()[ok].mean()) if ok.any() else None
    return entry, adv_pred, adv_scores


def _report(cfg, run, device, data, num_classes, log, session: dict) -> dict:
    """Results, plots and report from the files of the finished units."""
    out = run.out
    x_tr, y_tr, x_te, y_te = data
    n = min(cfg.n_attack, len(x_te))
    x_att, y_att = x_te[:n], y_te[:n]
    results = {"config": asdict(cfg), "device": str(device), "torch": torch.__version__,
               "data": {"dataset": cfg.dataset, "train": len(x_tr), "test": len(x_te),
                        "attacked": n, "shape": list(x_tr.shape[1:])},
               "models": {}, "sessions": run.state["sessions"] + [session]}
    if run.state.get("forced_resumes"):
        results["forced_resumes"] = run.state["forced_resumes"]
    plots = {"hist": {}, "roc": {}, "examples": {}}
    for objective in ("ce", "rce"):
        model = _load_model(cfg, run, objective, device)
        det = KDensityDetector.load(out / f"{objective}_detector.pt", device)
        trained = run.units[f"{objective}/train"]
        clean_pred, clean_scores = _scores(model, det, x_att, device)
        res = {"test_error": trained["test_error"], "train_seconds": trained["seconds"],
               "attacks": {}, "sigma2": det.sigma2}
        hist = {"normal": clean_scores["K-density"].numpy()}
        noisy = A.rand_noise(x_att.to(device), cfg.rand_eps, seed=cfg.seed)
        noisy_pred, noisy_scores = _scores(model, det, noisy.cpu(), device)
        hist["noisy (RAND)"] = noisy_scores["K-density"].numpy()
        res["rand"] = {"eps": cfg.rand_eps,
                       "error": float((noisy_pred != y_att).float().mean() * 100)}
        roc = {}
        examples = {"clean": x_att[:6]}
        for name in ATTACKS:
            adv, info = _load_adversarial(
                out / "adversarial" / f"{objective}_{ATTACK_SLUGS[name]}.pt", x_att)
            seconds = run.units[f"{objective}/{name}"]["seconds"]
            entry, adv_pred, adv_scores = _attack_entry(
                name, adv, info, x_att, y_att, (clean_pred, clean_scores), model, det,
                device, seconds, n)
            res["attacks"][name] = entry
            keep = (clean_pred == y_att) & (adv_pred != y_att)
            hist[name] = adv_scores["K-density"][keep].numpy()
            roc[name] = (clean_scores["K-density"][keep].numpy(),
                         adv_scores["K-density"][keep].numpy())
            examples[name] = adv[:6]
        results["models"][objective] = res
        plots["hist"][objective], plots["roc"][objective] = hist, roc
        plots["examples"][objective] = examples
    results["kd_comparison"] = {
        name: {"verdict": v, "rce_minus_ce": gap, "two_se": noise}
        for name, (v, gap, noise) in compare_kd(results["models"]).items()}
    results["defense"] = DT.results_of(run, cfg, n)
    _write_plots(out, plots)
    DT.write_plot(out, results["defense"])
    report = render_report(results)
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / "results.json",
                      json.dumps(_clean(results), indent=2, allow_nan=False))
    log(report)
    return results


def _clean(v):
    """JSON-safe copy: NaN (an AUC with no pairs) becomes null, other objects strings."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else v
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)


def _attack_runs(cfg: ExperimentConfig, model, det, num_classes):
    info = dict(return_info=True)
    cw = dict(binary_search_steps=cfg.cw_search, max_iterations=cfg.cw_steps,
              c_init=cfg.cw_c_init, seed=cfg.seed, progress=cfg.progress, **info)
    return {
        "FGSM": lambda x: A.fgsm(model, x, cfg.eps, **info),
        "BIM": lambda x: A.bim(model, x, cfg.eps, **info),
        "ILCM": lambda x: A.ilcm(model, x, cfg.eps, **info),
        "JSMA": lambda x: A.jsma(model, x, "least_likely", gamma=cfg.jsma_gamma,
                                 max_iterations=cfg.jsma_max_iterations, **info),
        "C&W": lambda x, control=None: A.cw_l2(model, x, "random", control=control, **cw),
        "C&W-hc": lambda x, control=None: A.cw_l2(model, x, "random", kappa=10.0,
                                                  control=control, **cw),
        "C&W-wb": lambda x, control=None: A.cw_wb(
            model, x, "random", det, kappa=5.0, stage1=cfg.wb_stage1, stage2=cfg.wb_stage2,
            seed=cfg.seed, progress=cfg.progress, control=control, **info),
    }


# ------------------------------------------------------------------------------ report

def _f(v, fmt="{:.3f}"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def render_report(results: dict) -> str:
    cfg, data, models = results["config"], results["data"], results["models"]
    lines = [f"# rce_fast experiment: {data['dataset']}, {cfg['model']}", "",
             f"{data['train']} training and {data['test']} test images "
             f"({'x'.join(map(str, data['shape']))}); {data['attacked']} test images "
             f"attacked per model; {cfg['steps']} training steps; device {results['device']}"
             f", torch {results['torch']}.", "",
             "## Classification error on the test set (%) (paper Table 1 layout)", "",
             "| objective | test error | paper (MNIST) |", "| --- | --- | --- |"]
    for obj in ("ce", "rce"):
        ref = PAPER_TABLE1.get((data["dataset"], cfg["model"], obj))
        lines.append(f"| {obj.upper()} | {models[obj]['test_error']:.2f} | "
                     f"{_f(ref, '{:.2f}')} |")
    lines += ["", "## AUC of detection metrics (paper Table 2 layout)", "",
              "Normal = positive; only pairs whose clean image is classified correctly and "
              "whose adversarial image is misclassified count (pairs per model in brackets; "
              "± one DeLong standard error).",
              "", "| attack | CE confidence | CE non-ME | CE K-density | RCE confidence | "
              "RCE non-ME | RCE K-density |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ATTACKS:
        row = [name]
        for obj in ("ce", "rce"):
            a = models[obj]["attacks"][name]
            for m in METRICS:
                if m == "K-density":
                    se = a.get("auc_se", {}).get(m)
                    pm = f" ± {se:.3f}" if se is not None and math.isfinite(se) else ""
                    row.append(f"{_f(a['auc'][m])}{pm} ({a['pairs']})")
                else:
                    row.append(_f(a["auc"][m]))
        lines.append("| " + " | ".join(row) + " |")
    lines += [""] + _kd_verdict(models)
    lines += ["", "## C&W-wb: white-box attack on K-density (paper Table 3)", "",
              "| objective | classified as target | ratio of f2(x*) > 0 among them | "
              "ratio of f2 > 0 over all inputs | mean L2 distortion |",
              "| --- | --- | --- | --- | --- |"]
    for obj in ("ce", "rce"):
        a = models[obj]["attacks"]["C&W-wb"]
        lines.append(f"| {obj.upper()} | {_f(a['classified_as_target'], '{:.2f}')} | "
                     f"{_f(a.get('f2_positive_ratio_on_target'), '{:.2f}')} | "
                     f"{_f(a['f2_positive_ratio'], '{:.2f}')} | "
                     f"{_f(a['distortion_l2'])} |")
    lines += ["", "Paper (MNIST, ResNet-32, kappa = 5, its full budget): ratio 0.77 for RCE, "
              "0.01 for CE. x* are the adversarial examples: the inputs the attack moved to "
              "its target class (with margin kappa). An input it left short of the target "
              "is not one, yet its own f2 is mostly > 0: counted over all inputs, a short "
              "budget inflates the ratio, so the paper's number is the column among them.",
              "",
              "## Time per adversarial example (beside the paper's appendix Table 1)", "",
              _time_conditions(results), "",
              "| attack | CE (s) | RCE (s) | paper CE (s) | paper RCE (s) |",
              "| --- | --- | --- | --- | --- |"]
    for name in ATTACKS:
        ce = models["ce"]["attacks"][name]["seconds_per_example"]
        rce = models["rce"]["attacks"][name]["seconds_per_example"]
        p = PAPER_SECONDS[name]
        lines.append(f"| {name} | {ce:.2e} | {rce:.2e} | {p[0]:.2e} | {p[1]:.2e} |")
    lines += ["", "## Noise (RAND, appendix B.3)", "",
              "| objective | eps | error on noisy inputs (%) |", "| --- | --- | --- |"]
    for obj in ("ce", "rce"):
        r = models[obj]["rand"]
        lines.append(f"| {obj.upper()} | {r['eps']} | {r['error']:.2f} |")
    if "defense" in results:
        lines += [""] + DT.render(results["defense"])
    lines += ["", "## Plots", "", "- `roc.png`: K-density ROC curves per attack, CE and RCE",
              "- `kd_hist.png`: log K-density of normal, noisy and adversarial inputs "
              "(appendix Fig. 2/3)", "- `examples.png`: clean and adversarial examples",
              f"- `{DT.PLOT}`: robust accuracy against FPR, worst attack per detector, CE "
              "and RCE", ""]
    return "\n".join(lines)


def _time_conditions(results: dict) -> str:
    """Both sides of the time table: model, data, budgets, hardware. They differ, so the
    table is a comparison of unlike conditions, never a speedup."""
    cfg, data = results["config"], results["data"]
    names = []
    for s in results.get("sessions", []):
        name = s.get("device_name") or s.get("device")
        if name and name not in names:
            names.append(name)
    hardware = "; ".join(names) or results.get("device", "?")

    def stages(s1, s2):
        s2 = {**WB_STAGE2, **s2}
        if s1 is False:
            return f"{s2['binary_search_steps']} x {s2['max_iterations']:,} steps"
        s1 = {**WB_STAGE1, **s1}
        return (f"{s1['binary_search_steps']} x {s1['max_iterations']:,} then "
                f"{s2['binary_search_steps']} x {s2['max_iterations']:,} steps")
    jsma = f"JSMA up to gamma {cfg['jsma_gamma']:g} of the features"
    if cfg.get("jsma_max_iterations") is not None:
        jsma += f" (at most {cfg['jsma_max_iterations']} iterations)"
    paper_wb = stages(dict(WB_STAGE1), dict(WB_STAGE2))
    return ("Unlike conditions, so not a speedup. rce_fast here: "
            f"{cfg['model']} on {data['dataset']} ({'x'.join(map(str, data['shape']))}), "
            f"on {hardware}; FGSM 1 step, BIM and ILCM 10 steps, {jsma}, C&W and C&W-hc "
            f"{cfg['cw_search']} x {cfg['cw_steps']:,} steps, C&W-wb "
            f"{stages(cfg['wb_stage1'], cfg['wb_stage2'])}. The paper: ResNet-32 on a P100, "
            "the mean of MNIST and CIFAR-10; FGSM 1 step, BIM and ILCM 10 steps, JSMA at "
            "most 100 iterations, C&W and C&W-hc 9 x 10,000 steps, C&W-wb "
            f"{paper_wb}.")


# Table 2 compares detection of attacks that do not know the detector; C&W-wb attacks
# K-density itself and is judged by Table 3 (the ratio of f2 > 0), as in the paper.
_NON_ADAPTIVE = tuple(a for a in ATTACKS if a != "C&W-wb")


def compare_kd(models: dict) -> dict:
    """RCE + K-density against CE + K-density per attack: (verdict, RCE - CE, two
    standard errors of that difference). Verdicts: "at_or_above"; "within_noise" (lower,
    but by less than two standard errors, which noise alone explains); "below"; and
    "undefined" (no pair on one side)."""
    out = {}
    for name in ATTACKS:
        ce, rce = models["ce"]["attacks"][name], models["rce"]["attacks"][name]
        a_ce, a_rce = ce["auc"]["K-density"], rce["auc"]["K-density"]
        if any(v is None or math.isnan(v) for v in (a_ce, a_rce)):
            out[name] = ("undefined", None, None)
            continue
        se = [x.get("auc_se", {}).get("K-density") for x in (ce, rce)]
        se = [v if v is not None and math.isfinite(v) else 0.0 for v in se]
        gap, noise = a_rce - a_ce, 2.0 * math.hypot(*se)
        verdict = ("at_or_above" if gap >= 0 else "within_noise" if gap >= -noise
                   else "below")
        out[name] = (verdict, gap, noise)
    return out


def _kd_verdict(models: dict) -> list[str]:
    cmp = compare_kd(models)
    groups = {k: [a for a in _NON_ADAPTIVE if cmp[a][0] == k]
              for k in ("at_or_above", "within_noise", "below", "undefined")}
    judged = len(_NON_ADAPTIVE) - len(groups["undefined"])
    lines = [f"RCE + K-density against CE + K-density (the paper's claim) on the "
             f"{len(_NON_ADAPTIVE)} attacks that do not target the detector, {judged} with "
             f"pairs on both models:",
             f"- at or above: {len(groups['at_or_above'])} "
             f"({', '.join(groups['at_or_above']) or 'none'})",
             f"- at or above within noise: "
             f"{len(groups['at_or_above']) + len(groups['within_noise'])} of {judged}"]
    if groups["within_noise"]:
        lines.append("- lower for RCE, but by less than two standard errors of the difference "
                     "(DeLong; noise at these pair counts): " + ", ".join(
                         f"{a} ({cmp[a][1]:+.3f}, 2 SE = {cmp[a][2]:.3f})"
                         for a in groups["within_noise"]))
    if groups["below"]:
        lines.append("- NOT at or above (RCE lower by more than two standard errors): " +
                     ", ".join(f"{a} ({cmp[a][1]:+.3f}, 2 SE = {cmp[a][2]:.3f})"
                               for a in groups["below"]) +
                     ". The paper's claim is for ResNet-32/56 on MNIST and CIFAR-10; "
                     "small models and few pairs need not show it.")
    if groups["undefined"]:
        lines.append("- no AUC (the attack produced no misclassified example from a "
                     "correctly classified one within its budget on one model): " +
                     ", ".join(groups["undefined"]))
    wb = cmp["C&W-wb"]
    lines += ["", "C&W-wb attacks the K-density detector itself: its K-density AUC above "
              "says how far it got past the detector"
              + (f" (RCE - CE = {wb[1]:+.3f})" if wb[1] is not None else "")
              + "; the paper judges it by the ratio of f2 > 0 in the next table."]
    return lines


def _write_plots(out: Path, plots: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, obj in zip(axes, ("ce", "rce")):
        for name, (pos, neg) in plots["roc"][obj].items():
            if len(pos) and len(neg):
                fpr, tpr, _ = roc_curve(np.r_[np.ones(len(pos)), np.zeros(len(neg))],
                                        np.r_[pos, neg])
                ax.plot(fpr, tpr, label=name)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(title=f"K-density ROC, {obj.upper()}", xlabel="false positive rate",
               ylabel="true positive rate")
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out / "roc.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, obj in zip(axes, ("ce", "rce")):
        for name, values in plots["hist"][obj].items():
            values = values[np.isfinite(values)]
            if len(values):
                ax.hist(values, bins=30, histtype="step", label=f"{name} ({len(values)})")
        ax.set(title=f"log K-density, {obj.upper()}", xlabel="log K-density",
               ylabel="images")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out / "kd_hist.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)

    ex = plots["examples"]["rce"]
    rows = list(ex)
    cols = len(ex["clean"])
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.4 * cols, 1.4 * len(rows)))
    for i, name in enumerate(rows):
        for j in range(cols):
            img = ex[name][j].float() + 0.5
            img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
            ax = axes[i, j]
            ax.imshow(img.clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("RCE model: clean and adversarial examples", fontsize=9)
    fig.tight_layout()
    atomic_write(out / "examples.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
