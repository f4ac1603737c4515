"""The detection commands of ``rce-fast``: fit-detector, detect, and the adaptive attacks
(cw-wb, pgd, opgd) of ``rce-fast attack``. ``rce_fast.cli`` wires them in."""
from __future__ import annotations

import argparse
import math
import os
import shutil
from pathlib import Path

COMMANDS = ("fit-detector", "detect")
ADAPTIVE_ATTACKS = ("cw-wb", "pgd", "opgd")
_KINDS = ("kdensity", "lid", "mahalanobis")
_FIT_ATTACKS = ("fgsm", "bim", "pgd")


def _fpr(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2 ** 63 - 1:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63 - 1), got {text}")
    return value


def _fp32_scale(text: str) -> float:
    """A scale used as float32 by the kernels (sigma2, C&W's c): [2**-126, 3.4e38]."""
    value = float(text)
    if not 2.0 ** -126 <= value <= 3.4028234663852886e38:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in [2**-126, 3.4e38] (float32), got {text}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not 2.0 ** -126 <= value <= 2.0 ** 126:
        raise argparse.ArgumentTypeError(f"must be in [2**-126, 2**126], got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_commands(sub, dataset_help: str) -> None:
    """Add the fit-detector and detect subcommands to ``sub``."""
    f = sub.add_parser(
        "fit-detector", help="fit a detector on a checkpoint's training data and save it",
        description="Fit a K-density (default), LID or Mahalanobis detector for a trained "
                    "checkpoint and save it with its threshold and the scores of held-out "
                    "clean training inputs (so `detect --fpr` can set any threshold later). "
                    "The training split is shuffled (--seed) and cut into a calibration "
                    "part (held out), a regression part (LID / Mahalanobis: clean, noisy "
                    "and --fit-attack adversarial inputs for their logistic regression) "
                    "and the rest, which the detector is fitted on.")
    f.add_argument("--checkpoint", required=True, help="checkpoint from `rce-fast train`")
    f.add_argument("--dataset", default="digits",
                   choices=["digits", "mnist", "cifar10", "npz"], help=dataset_help)
    f.add_argument("--data-dir", default=None, help="dataset folder (or .npz file)")
    f.add_argument("--out", required=True, help="detector file to write (.pt)")
    f.add_argument("--kind", default="kdensity", choices=_KINDS,
                   help="detector (default: %(default)s)")
    f.add_argument("--fpr", type=_fpr, default=0.05,
                   help="false-positive rate of the stored threshold (default: %(default)s)")
    f.add_argument("--n-calibration", type=_positive_int, default=None,
                   help="held-out clean inputs for the threshold (default: 10%% of the "
                        "training split, at most 1000)")
    f.add_argument("--n-regression", type=_positive_int, default=None,
                   help="LID / Mahalanobis: inputs for the logistic regression (default: "
                        "20%% of the training split, at most 1000)")
    f.add_argument("--n-fit", type=_positive_int, default=None,
                   help="at most this many inputs to fit on (default: all the rest)")
    f.add_argument("--per-class", type=_positive_int, default=1000,
                   help="K-density: bank features per class (default: %(default)s)")
    f.add_argument("--sigma2", type=_fp32_scale, default=None,
                   help="K-density width (default: the paper's for the objective)")
    f.add_argument("--kernel-points", type=_positive_int, default=100,
                   help="K-density: points per class of the C&W-wb median threshold "
                        "(default: %(default)s)")
    f.add_argument("--k", type=_positive_int, default=20, help="LID: neighbours (default: 20)")
    f.add_argument("--lid-batch", type=_positive_int, default=100,
                   help="LID: size of a reference minibatch (default: %(default)s)")
    f.add_argument("--lid-batches", type=_positive_int, default=1,
                   help="LID: reference minibatches averaged (default: %(default)s)")
    f.add_argument("--noise", type=_non_negative, default=0.0,
                   help="Mahalanobis: input pre-processing magnitude (default: 0, off)")
    f.add_argument("--fit-attack", default="fgsm", choices=_FIT_ATTACKS,
                   help="LID / Mahalanobis: attack crafting the adversarial training "
                        "inputs (default: %(default)s)")
    f.add_argument("--fit-eps", type=_positive, default=0.1,
                   help="eps of --fit-attack (L-inf; default: %(default)s)")
    f.add_argument("--batch-size", type=_positive_int, default=256,
                   help="inputs per forward pass (default: %(default)s)")
    f.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    f.add_argument("--seed", type=_seed, default=0, help="seed (default: %(default)s)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")

    d = sub.add_parser(
        "detect", help="score a file of images with a saved detector",
        description="Stream the images of FILE (.npy, .npz, or .pt; memory-mapped or read "
                    "block by block, so it may be larger than memory) through the "
                    "classifier and the detector, and write, per input, the score "
                    "(higher = more normal), the predicted class and the flag (score "
                    "below the threshold) to an .npz (score, prediction, flagged, "
                    "threshold, fpr). Under torchrun the input is split across the "
                    "processes and one merged file is written. A run stopped by "
                    "--time-budget, SIGTERM or SIGINT keeps what it scored (in "
                    ".OUT.parts beside --out) and exits with status 3; the same command "
                    "continues it, with the results of an uninterrupted run; kept "
                    "scores of other inputs or settings are refused unless --restart.")
    d.add_argument("--checkpoint", required=True, help="checkpoint from `rce-fast train`")
    d.add_argument("--detector", required=True, help="file from `rce-fast fit-detector`")
    d.add_argument("--input", required=True, help="images: .npy, .npz or .pt")
    d.add_argument("--key", default=None,
                   help="array to read in an .npz or a dict .pt (default: x_adv, images, "
                        "x, inputs, x_test, or the only one)")
    d.add_argument("--out", required=True, help="output .npz")
    d.add_argument("--fpr", type=_fpr, default=None,
                   help="flag at this false-positive rate, from the detector's held-out "
                        "calibration scores (default: the detector's stored threshold)")
    d.add_argument("--scale", default="auto", choices=["auto", "uint8", "unit", "centered"],
                   help="pixel range: uint8 0..255, unit [0, 1], centered [-0.5, 0.5]; "
                        "auto decides as rce_fast.data does (default)")
    d.add_argument("--batch-size", type=_positive_int, default=512,
                   help="inputs per batch (default: %(default)s)")
    d.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    from .cli import _seconds  # the other commands' --time-budget check (loaded by now)
    d.add_argument("--time-budget", type=_seconds, default=None, metavar="SECONDS",
                   help="stop cleanly before this many seconds have passed (exit status "
                        "3); the same command continues where it stopped")
    d.add_argument("--restart", action="store_true",
                   help="discard the scores kept by an earlier, stopped run and start over")


def add_attack_arguments(a) -> None:
    """The options of the adaptive attacks on the `attack` subparser."""
    a.add_argument("--detector", default=None,
                   help="detector file (`rce-fast fit-detector`): needed by cw-wb and opgd; "
                        "with pgd it makes the attack adaptive (the guarded classifier)")
    a.add_argument("--fpr", type=_fpr, default=None,
                   help="detector threshold at this FPR (default: the file's threshold)")
    a.add_argument("--norm", default="linf", choices=["linf", "l2"],
                   help="pgd / opgd threat model (default: %(default)s; --eps is its radius)")
    a.add_argument("--steps", type=_positive_int, default=None,
                   help="pgd / opgd iterations (default: 40 / 100)")
    a.add_argument("--step-size", type=_positive, default=None,
                   help="pgd / opgd step (default: 2.5 eps / steps for pgd, eps / 8 opgd)")
    a.add_argument("--restarts", type=_positive_int, default=1,
                   help="pgd random restarts (default: %(default)s)")


def run(args, budget=None) -> int:
    """Run a command of :data:`COMMANDS`; ``budget`` (a :class:`rce_fast.resume.Budget`)
    lets `detect` stop cleanly and resume."""
    if args.command == "fit-detector":
        return _fit_detector(args)
    return _detect(args, budget)


# ------------------------------------------------------------------------- fit-detector

def _batched(fn, x, batch_size, device):
    import torch
    outs = [fn(xb.to(device)) for xb in x.split(batch_size)]
    return torch.cat([o.cpu() for o in outs])


def _fit_detector(args) -> int:
    import torch

    from .attacks import bim, fgsm, pgd
    from .cli import _device
    from .data import load_dataset
    from .detect import (KDensityDetector, LIDDetector, MahalanobisDetector, noisy_like,
                         score_dataset, threshold_at_fpr)
    from .detect.bundle import save_detector
    from .train import load_classifier_and_state

    from .resume import check_output_file

    device = _device(args.device)
    check_output_file(args.out, "--out", {"--checkpoint": args.checkpoint,  # before any work
                                          "--data-dir": args.data_dir})
    model, state = load_classifier_and_state(args.checkpoint, device)
    x_tr, y_tr, _, _ = load_dataset(args.dataset, args.data_dir, seed=0)
    from .cli import check_checkpoint_data, data_source, warn
    note = check_checkpoint_data(args, state, x_tr, y_tr)
    num_classes = int(state["num_classes"])  # the model's, whatever labels the data has
    del state
    n = len(x_tr)
    n_cal = args.n_calibration or min(1000, max(1, n // 10))
    n_reg = 0 if args.kind == "kdensity" else (args.n_regression or min(1000, max(2, n // 5)))
    if n_cal + n_reg >= n:
        raise ValueError(f"the training split has {n} inputs: too few for "
                         f"{n_cal} calibration + {n_reg} regression inputs and a fit part")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    cal, reg, fit = perm[:n_cal], perm[n_cal:n_cal + n_reg], perm[n_cal + n_reg:]
    if args.n_fit:
        fit = fit[:args.n_fit]
    x_fit, y_fit = x_tr[fit], y_tr[fit]
    missing = sorted(set(range(num_classes)) - set(torch.unique(y_fit).tolist()))
    if missing and args.kind != "lid":  # K-density / Mahalanobis: per-class statistics
        raise ValueError(f"{data_source(args)}: the inputs the detector is fitted on hold no "
                         f"class {', '.join(map(str, missing[:10]))}"
                         f"{' ...' if len(missing) > 10 else ''} of the checkpoint's "
                         f"{num_classes} classes; every class needs training inputs"
                         + (f" (raise --n-fit {args.n_fit})" if args.n_fit else ""))
    warn(args, note)  # after the errors: an error is the only line
    progress = not args.quiet
    kernel_points = None
    if args.kind == "kdensity":
        with torch.no_grad():
            feats = _batched(model.features, x_fit, args.batch_size, device).to(device)
        det = KDensityDetector(sigma2=args.sigma2, per_class=args.per_class, seed=args.seed,
                               objective=model.objective)
        labels = y_fit.to(device)
        det.fit(feats, labels, num_classes=num_classes)
        det.class_medians(feats, labels, kernel_points=args.kernel_points)
        kernel_points = args.kernel_points
    else:
        x_reg, y_reg = x_tr[reg], y_tr[reg]
        attack = {"fgsm": lambda xb, yb: fgsm(model, xb, args.fit_eps, labels=yb),
                  "bim": lambda xb, yb: bim(model, xb, args.fit_eps, labels=yb,
                                            project=True),
                  "pgd": lambda xb, yb: pgd(model, xb, args.fit_eps, steps=20, labels=yb,
                                            seed=args.seed)}[args.fit_attack]
        adv = torch.cat([attack(xb.to(device), yb.to(device)).cpu() for xb, yb in
                         zip(x_reg.split(args.batch_size), y_reg.split(args.batch_size))])
        noisy = noisy_like(x_reg, adv, seed=args.seed)
        if args.kind == "lid":
            det = LIDDetector(k=args.k, batch_size=args.lid_batch,
                              reference_batches=args.lid_batches, seed=args.seed)
            det.fit(model, x_reg, adv, noisy, reference=x_fit, batch_size=args.batch_size,
                    progress=progress)
        else:
            det = MahalanobisDetector(noise=args.noise, seed=args.seed)
            det.fit(model, x_fit, y_fit, adv, noisy, clean=x_reg,
                    num_classes=num_classes, batch_size=args.batch_size,
                    progress=progress)
    _, cal_scores = score_dataset(model, det, x_tr[cal], args.batch_size, progress,
                                  "calibration")
    det.threshold = threshold_at_fpr(cal_scores, args.fpr)
    save_detector(args.out, det, cal_scores, args.fpr, model, kernel_points,
                  meta={"checkpoint": str(args.checkpoint), "dataset": args.dataset,
                        "n_fit": int(len(fit)), "n_regression": int(n_reg),
                        "n_calibration": int(n_cal), "seed": int(args.seed)})
    flagged = float((cal_scores < det.threshold).double().mean())
    print(f"fit-detector: {args.kind} on {len(fit)} inputs ({n_reg} for the regression), "
          f"threshold {det.threshold:.6g} at FPR {args.fpr:g} on {n_cal} held-out inputs "
          f"(flags {flagged:.3f} of them) -> {args.out}")
    return 0


# ------------------------------------------------------------------------------- detect

def _distributed():
    from .train import _distributed as init
    return init()


def _agree(world: int, values: list[float], op: str) -> list[float]:
    """All-reduce a few floats across ranks (MIN or MAX); identity with one process."""
    if world == 1:
        return values
    import torch
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return t.cpu().tolist()


def _write_npz(path: Path, parts: dict, scalars: dict) -> None:
    """One .npz from per-rank .npy parts {name: [paths in rank order]}, streamed member by
    member (memory holds one block), written to a temporary file and renamed."""
    import zipfile

    import numpy as np
    from numpy.lib import format as npy

    from ._io import atomic_write

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, files in parts.items():
                arrays = [np.load(f, mmap_mode="r") for f in files]
                total = sum(len(a) for a in arrays)
                dtype = arrays[0].dtype
                with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                    npy.write_array_header_2_0(out, {"descr": npy.dtype_to_descr(dtype),
                                                     "fortran_order": False,
                                                     "shape": (total,)})
                    for a in arrays:
                        for i in range(0, len(a), 1 << 20):
                            out.write(np.ascontiguousarray(a[i:i + (1 << 20)]).tobytes())
            for name, value in scalars.items():
                with zf.open(f"{name}.npy", "w") as out:
                    npy.write_array(out, np.asarray(value))

    try:  # a temporary file beside it, renamed; removed if anything fails
        atomic_write(path, write)
    except OSError as exc:
        raise ValueError(f"--out {path}: cannot be written "
                         f"({exc.strerror or exc})") from None


def parts_folder(out) -> Path:
    """Where `detect` keeps its per-process parts and progress: .OUT.parts beside OUT."""
    out = Path(out)
    return out.with_name(f".{out.name}.parts")


def _detect(args, budget=None) -> int:
    """Score FILE in blocks; under torchrun each process takes a contiguous shard and
    writes it to its own .npy parts, then rank 0 merges them into one .npz. Every
    process agrees (all-reduce) on failures before each collective step, so an error
    on one of them stops all of them instead of leaving the others waiting. A stop
    (``budget``: time, SIGTERM, SIGINT) keeps the parts and each process's progress, and
    the same command continues from there."""
    import torch.distributed as dist

    import torch

    from .resume import Budget

    budget = budget if budget is not None else Budget(None)
    world, rank, local = _distributed()
    if world > 1 and dist.get_backend() == "nccl":
        torch.cuda.set_device(local)  # collectives and the default device: this rank's GPU
    out = Path(args.out)
    parts_dir = parts_folder(out)
    from .resume import StopRequested

    finished = stopped = False
    try:
        code = _detect_shard(args, world, rank, out, parts_dir, budget)
        finished = True
        return code
    except StopRequested:
        stopped = True
        raise
    finally:
        # Kept after a stop or a failure once something was scored (the next run
        # continues from it), and after a stop once the pixel range is known (a budget
        # spent on scanning a large input is not spent again); removed when the merged
        # file is written.
        keep = _scored_any(parts_dir) or (stopped and _has_range(parts_dir))
        if rank == 0 and (finished or not keep):
            shutil.rmtree(parts_dir, ignore_errors=True)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# Progress is recorded (parts flushed first) at least this often while scoring, and at
# a stop: a process killed outright (SIGKILL, power) redoes at most this much.
_PROGRESS_SECONDS = 30.0
# Under torchrun the processes agree this often whether to go on (a stop on one stops
# all within about this long, and a process that is done waits no longer than this).
_AGREE_SECONDS = 10.0


def _scored_any(parts_dir: Path) -> bool:
    """Whether any process recorded scored rows in ``parts_dir``."""
    import json
    try:
        records = list(parts_dir.glob("rank*_progress.json"))
    except OSError:  # no such folder could exist (a name too long, say)
        return False
    for f in records:
        try:
            if int(json.loads(f.read_text())["done"]) > 0:
                return True
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return False


def _has_range(parts_dir: Path) -> bool:
    """Whether a process recorded its pixel range in ``parts_dir``."""
    try:
        return any(parts_dir.glob("rank*_range.json"))
    except OSError:
        return False


def _file_id(path, whole: bool) -> dict:
    """What identifies a file between two runs, by content: its size and a BLAKE2 hash of
    all of it (``whole``: checkpoints and detectors, a few MB), or of its first and last
    MiB and 16 evenly spaced 64 KiB samples (inputs, which may be larger than memory)."""
    import hashlib
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if whole:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            spots = [0, max(0, size - (1 << 20))] + [size * k // 17 for k in range(1, 17)]
            for at in spots:
                f.seek(at)
                h.update(f.read(1 << 20 if at in spots[:2] else 1 << 16))
    return {"size": size, "blake2b": h.hexdigest()}


def _resume_point(progress: Path, settings: dict, parts: dict, rows: int,
                  restart: bool) -> int:
    """Rows of this shard already scored by an earlier run with the same settings (their
    ``parts``, {name: (path, dtype)}, intact); 0 when there is none or with ``restart``. Kept scores of other
    settings are refused (ValueError listing the differences)."""
    import json

    import numpy as np

    from .resume import settings_diff

    if restart or not progress.is_file():
        return 0
    try:
        saved = json.loads(progress.read_text())
        done = int(saved["done"])
        diff = settings_diff(saved["settings"], settings)
    except (OSError, ValueError, KeyError, TypeError):
        return 0  # an unreadable record: nothing is known to be scored
    if diff:
        raise ValueError(
            f"{progress.parent} holds scores of an earlier run with other settings "
            f"({'; '.join(diff)}): run with those settings to continue it, or add "
            f"--restart to discard it")
    for f, dt in parts.values():  # the parts must be what this run would write
        try:
            a = np.load(f, mmap_mode="r")
            ok = a.shape == (rows,) and a.dtype == np.dtype(dt)
            del a
        except (OSError, ValueError):
            ok = False
        if not ok:
            return 0
    return done if 0 <= done <= rows else 0


def _check_fits(model, detector, image_shape: tuple, device, args) -> None:
    """Score one blank image before any work, so a detector fitted on another model (other
    classes, other features or layers) is refused up front, naming --detector, instead of
    failing (or, for a K-density bank with more classes, passing) in the middle of a run."""
    import torch

    from .detect import score_inputs
    try:
        with torch.no_grad():
            score_inputs(model, detector, torch.zeros((1, *image_shape), device=device))
    except (ValueError, RuntimeError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else \
            type(exc).__name__
        raise ValueError(f"--detector {args.detector} does not fit --checkpoint "
                         f"{args.checkpoint}: {first}") from None


def _pixel_range(source, start: int, stop: int, record: Path, key: dict):
    """(min, max) of rows [start, stop) of ``source`` (NaN / inf refused), from ``record``
    when an earlier run of the same input saved it there, else scanned and saved: a run
    continued under a time budget does not read the whole input again first."""
    import json

    from ._io import atomic_write_text
    from .streaming import scan_range
    want = dict(key, start=start, stop=stop)
    try:
        saved = json.loads(record.read_text())
        if saved["of"] == want:
            return float(saved["lo"]), float(saved["hi"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    lo, hi = scan_range(source, start, stop)
    if record.parent.is_dir():
        atomic_write_text(record, json.dumps({"of": want, "lo": lo, "hi": hi}))
    return lo, hi


def _raise_if_any(world: int, error: Exception | None, what: str) -> None:
    if _agree(world, [1.0 if error is not None else 0.0], "max")[0]:
        if error is not None:
            raise error
        raise ValueError(f"another process failed {what} (see its message)")


def _detect_shard(args, world: int, rank: int, out: Path, parts_dir: Path, budget) -> int:
    import time

    import numpy as np
    import torch
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from ._io import atomic_write_text
    from .resume import BudgetTooSmall, StopRequested

    from .cli import _device
    from .detect import score_inputs
    from .detect.bundle import check_model, load_detector
    from .streaming import check_layout, open_array, resolve_scale, to_model_images
    from .train import check_images, load_classifier_and_state

    from .resume import check_output_file

    error = None
    try:
        device = _device(args.device)
        if rank == 0:  # before any work
            check_output_file(out, "--out", {"--input": args.input,
                                             "--checkpoint": args.checkpoint,
                                             "--detector": args.detector})
        model, state = load_classifier_and_state(args.checkpoint, device)
        file = load_detector(args.detector, device)
        check_model(file, model, f" {args.detector}")
        threshold = file.threshold_for(args.fpr)
        source = open_array(args.input, args.key)
        channels, channels_last = check_layout(source.shape, args.input)
        hw = source.shape[1:3] if channels_last else source.shape[-2:]
        check_images(args.checkpoint, state, (channels, *hw), f"--input {args.input}")
        del state
        _check_fits(model, file.detector, (channels, *hw), device, args)
        n = len(source)
        if n == 0:
            raise ValueError(f"{args.input} holds no images")
        start, stop = rank * n // world, (rank + 1) * n // world
        if rank == 0:
            try:
                parts_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"--out {out}: the folder {parts_dir.name} beside it, where "
                                 f"detect keeps its progress, cannot be created "
                                 f"({exc.strerror or exc}); choose a shorter --out name"
                                 ) from None
    except (FileNotFoundError, ValueError, TypeError, SystemExit) as exc:
        error = exc if not isinstance(exc, SystemExit) else ValueError(str(exc))
    _raise_if_any(world, error, "before scoring")
    # The pixel range: one streamed pass over this shard also finds NaN / inf before any
    # scoring starts (kept for a run that continues); the processes agree on one scale,
    # and pixels outside it are refused.
    lo, hi, input_id = math.inf, -math.inf, None
    try:
        input_id = _file_id(args.input, False)
        if not (source.dtype == np.uint8 and args.scale in ("auto", "uint8")):
            stat = os.stat(args.input)  # the id samples the file: also its time stamp,
            # so pixels changed in place between the samples are scanned again
            lo, hi = _pixel_range(source, start, stop, parts_dir / f"rank{rank}_range.json",
                                  {"input": input_id, "key": args.key,
                                   "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino})
    except (OSError, ValueError) as exc:
        error = exc
    _raise_if_any(world, error, "checking its part of the input")
    lo, neg_hi = _agree(world, [lo, -hi], "min")
    scale = resolve_scale(args.scale, source.dtype, lo, -neg_hi, f"--input {args.input}")
    names = {"score": np.float64, "prediction": np.int64, "flagged": np.bool_}
    rows = stop - start
    # What must match for an earlier run's scores to be kept: every input and setting
    # that changes a score, and the blocks (the same batches give the same bits). Not
    # --fpr: it changes only the flags, which are recomputed from the kept scores.
    progress = parts_dir / f"rank{rank}_progress.json"
    my_parts = {k: (parts_dir / f"rank{rank}_{k}.npy", dt) for k, dt in names.items()}
    done = 0
    try:
        settings = {"checkpoint": _file_id(args.checkpoint, True),
                    "detector": _file_id(args.detector, True),
                    "input": input_id, "key": args.key, "scale": scale,
                    "batch_size": args.batch_size, "processes": world, "rank": rank,
                    "device": device.type}
        done = _resume_point(progress, settings, my_parts, rows, args.restart)
        if not done:  # starting over: no record of other scores may outlive them
            progress.unlink(missing_ok=True)
    except (OSError, ValueError) as exc:
        error = exc
    _raise_if_any(world, error, "checking the scores kept by an earlier run")
    arrays = {k: np.lib.format.open_memmap(f, mode="r+" if done else "w+", dtype=dt,
                                           shape=None if done else (rows,))
              for k, (f, dt) in my_parts.items()}
    for a in range(0, done, 1 << 20):  # this run's threshold on the kept scores
        b = min(done, a + (1 << 20))
        arrays["flagged"][a:b] = arrays["score"][a:b] < threshold

    def record_progress(rows_done: int) -> None:
        import json
        if rows_done <= 0:
            return
        for a in arrays.values():  # the scores first, then the record that they exist
            a.flush()
        atomic_write_text(progress, json.dumps({"done": rows_done, "settings": settings}))

    if done and rank == 0 and not args.quiet:
        print(f"detect: continuing: {done} of {rows} inputs were scored by an earlier run")
    bar = tqdm(total=rows, initial=done, desc="detect", disable=args.quiet or rank != 0,
               unit="img")

    def score_block(i: int) -> int:
        """Score rows i .. j of the input into the parts; returns j."""
        j = min(stop, i + args.batch_size)
        x = to_model_images(source.read(i, j), scale, channels_last).to(device)
        with torch.no_grad():
            logits, s = score_inputs(model, file.detector, x)
        s = s.detach().double()
        arrays["score"][i - start:j - start] = s.cpu().numpy()
        arrays["prediction"][i - start:j - start] = logits.argmax(1).cpu().numpy()
        arrays["flagged"][i - start:j - start] = (s < threshold).cpu().numpy()
        bar.update(j - i)
        return j

    i, stopped, last = start + done, False, time.monotonic()
    try:
        # Every process runs the same number of rounds (one agreement each), so a stop,
        # an error or the end is seen by all of them at the same round.
        while True:
            stop_here = False
            if i < stop and error is None:
                try:
                    blocks = budget.grant("detect", -(-(stop - i) // args.batch_size))
                    stop_here = blocks == 0
                    ran, t0 = 0, time.monotonic()
                    while ran < blocks:
                        if budget.interrupted:
                            stop_here = True
                            break
                        i, ran = score_block(i), ran + 1
                        now = time.monotonic()
                        if now - last > _PROGRESS_SECONDS:
                            record_progress(i - start)
                            last = now
                        if world > 1 and now - t0 > _AGREE_SECONDS:
                            break
                    budget.done(ran)
                except StopRequested:  # a second signal: stop now, keep what is scored
                    stop_here = True
                except BudgetTooSmall as exc:
                    error = exc
                except (ValueError, RuntimeError, TypeError, OSError) as exc:
                    error = ValueError(f"scoring failed: {str(exc).splitlines()[0]}")
            stop_any, going, failed = _agree(
                world, [float(stop_here), float(i < stop), float(error is not None)], "max")
            if failed or not going:
                break
            if stop_any:  # (a process that stopped still had rows: going is 1 then)
                stopped = True
                break
    finally:
        bar.close()
        source.close()
        # what was scored is kept, whatever ended the loop (rows up to i are written)
        record_progress(i - start)
        arrays.clear()  # closes the memory maps before rank 0 reads the parts
    _raise_if_any(world, error, "while scoring")
    if stopped:  # the merge needs every part: all processes stop
        raise StopRequested(budget.stop_reason or "another process stopped")
    if rank == 0:
        parts = {k: [parts_dir / f"rank{r}_{k}.npy" for r in range(world)] for k in names}
        _write_npz(out, parts, {"threshold": np.float64(threshold),
                                "fpr": np.float64(math.nan if args.fpr is None
                                                  else args.fpr)})
        with np.load(out) as z:
            flagged = int(z["flagged"].sum())
        print(f"detect: {n} inputs ({scale} pixels), {flagged} flagged "
              f"({flagged / n:.1%}) at threshold {threshold:.6g} -> {out}")
    if world > 1:
        dist.barrier()  # the parts are removed only once every process is done
    return 0


# ---------------------------------------------------------------------- adaptive attacks

def run_attack(args, model, x, y, device, note: str | None = None) -> int:
    """`rce-fast attack --attack cw-wb|pgd|opgd`: craft, save, and report. ``note``: the
    data warning, printed once the checks here have passed."""
    import torch

    from . import attacks as A
    from .detect import GuardedClassifier, score_dataset
    from .detect.bundle import check_model, load_detector

    file = None
    if args.detector is not None:
        file = load_detector(args.detector, device)
        check_model(file, model, f" {args.detector}")
    elif args.attack in ("cw-wb", "opgd"):
        raise ValueError(f"--attack {args.attack} needs --detector (from `rce-fast "
                         "fit-detector`)")
    threshold = None if file is None else file.threshold_for(args.fpr)
    if threshold is not None and not math.isfinite(threshold):
        where = f"--fpr {args.fpr:g}" if args.fpr is not None else \
            f"the threshold stored in --detector {args.detector}"
        raise ValueError(f"{where} flags every input (threshold {threshold}): an attack on "
                         "the detector needs a threshold below 1 in FPR; pass --fpr < 1")
    if args.attack == "cw-wb" and (file.kind != "kdensity" or
                                   getattr(file.detector, "median_index", None) is None):
        raise ValueError("cw-wb attacks the K-density detector: pass a kdensity detector "
                         "file from `rce-fast fit-detector` (it has the class medians)")
    from .cli import warn
    warn(args, note)
    if args.attack == "cw-wb":
        s1 = dict(max_iterations=args.cw_steps, c_init=10.0,
                  binary_search_steps=min(3, args.cw_search))
        s2 = dict(max_iterations=args.cw_steps, c_init=100.0,
                  binary_search_steps=args.cw_search)
        adv, info = A.cw_wb(model, x, "random", file.detector, kappa=5.0, stage1=s1,
                            stage2=s2, seed=args.seed, return_info=True)
    else:
        steps = args.steps or (40 if args.attack == "pgd" else 100)
        common = dict(norm=args.norm, steps=steps, step_size=args.step_size,
                      labels=y.to(device), seed=args.seed, return_info=True)
        target = model if file is None else GuardedClassifier(model, file.detector,
                                                              threshold)
        if args.attack == "pgd":
            adv, info = A.pgd(target, x, args.eps, restarts=args.restarts, **common)
        else:
            adv, info = A.orthogonal_pgd(target, x, args.eps, **common)
    payload = {"attack": args.attack, "x_adv": adv.cpu(), "labels": y, "n": args.n,
               "detector": args.detector, "threshold": threshold,
               "info": {k: v.cpu() if torch.is_tensor(v) else v
                        for k, v in info.as_dict().items()}}
    from ._io import atomic_torch_save
    atomic_torch_save(payload, args.out)
    with torch.no_grad():
        pred = model.predict(adv).cpu()
    wrong = (pred != y).double()
    line = f"{args.attack}: {args.n} examples, {wrong.mean().item():.1%} misclassified"
    if file is not None:
        _, scores = score_dataset(model, file.detector, adv.cpu())
        flagged = scores < threshold
        robust = (flagged | (pred == y)).double().mean().item()
        line += (f", {flagged.double().mean().item():.1%} flagged, robust accuracy "
                 f"{robust:.1%} at threshold {threshold:.6g}")
    if args.attack == "cw-wb":  # the paper's Table 3 reading
        ratio = info.f2_positive_ratio_on_target
        line += (f"; {info.classified_as_target.double().mean().item():.1%} on target, "
                 f"f2 > 0 among them: " + ("n/a" if ratio != ratio else f"{ratio:.2f}"))
    print(f"{line} -> {args.out}")
    return 0
