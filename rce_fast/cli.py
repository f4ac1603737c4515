"""The ``rce-fast`` command line: demo, reproduce, train, attack, evaluate, fit-detector,
detect."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import _cli_detect
from ._cli_detect import (_fp32_scale, _fraction, _non_negative as _eps,  # one parser
                          _positive_int, _seed, _temperature)                # per rule

DATASET_HELP = ("digits (scikit-learn's bundled 8x8 digits, embedded), mnist (IDX files, "
                "raw or .gz, torchvision names), cifar10 (cifar-10-batches-py), npz (your "
                "own .npz; --data-dir is the file)")
#: for the commands that take a --checkpoint: its training data is checked against it
CHECKPOINT_DATASET_HELP = (DATASET_HELP + ". Default: digits. Give the dataset the "
                           "checkpoint was trained on: other image shapes are refused, "
                           "other data of the same shape gets a warning")
REPRODUCE_DATASET_HELP = ("mnist (IDX files, raw or .gz, torchvision names) or cifar10 "
                          "(cifar-10-batches-py); --data-dir is their folder")


def data_source(args) -> str:
    """How the user named the dataset, for messages."""
    return f"--dataset {args.dataset}" + (f" --data-dir {args.data_dir}"
                                          if args.data_dir else "")


def check_checkpoint_data(args, state, x_train, y_train, x_test=None,
                          y_test=None) -> str | None:
    """Refuse a dataset whose images (either split) the checkpoint was not trained on, or
    whose labels it does not have, before any work. Returns the warning for other data of
    the same shape (or None): the caller prints it with :func:`warn` once its own checks
    have passed, so an error is always the only line. ``state``: the checkpoint's dict."""
    from .train import check_training_data
    return check_training_data(args.checkpoint, x_train, y_train, data_source(args),
                               x_test=x_test, y_test=y_test, state=state)


def warn(args, note: str | None) -> None:
    """One warning line on stderr (nothing for None)."""
    if note:
        print(f"rce-fast {args.command}: warning: {note}", file=sys.stderr)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


RESUME_EPILOG = (
    "Stopping and resuming: with --time-budget SECONDS the run stops on its own before "
    "the budget runs out, at a safe point (after a training checkpoint, between attacks, "
    "or inside C&W between chunks of iterations), saves its state and exits with status "
    "3 and the line 'not finished, run the same command again'. SIGTERM and SIGINT "
    "(Ctrl-C) stop it the same way. Running the same command again continues it; the "
    "results are those of an uninterrupted run. A re-run with other settings is refused, "
    "listing them, unless --force-resume (continue with the new settings; finished parts "
    "stay as they are) or --restart (start over) is given.")


def _add_resume_options(parser, what: str) -> None:
    parser.add_argument("--time-budget", type=_seconds, default=None, metavar="SECONDS",
                        help="stop cleanly before this many seconds have passed (exit "
                             "status 3); the same command continues the run")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--force-resume", action="store_true",
                   help=f"continue the {what} in --out even if it was started with other "
                        "settings")
    g.add_argument("--restart", action="store_true",
                   help=f"discard the {what} in --out and start over")


class _Parser(argparse.ArgumentParser):
    """argparse with every usage error on ONE line of stderr (exit status 2), like every
    other user error of the command line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="rce-fast",
        description="Reverse cross-entropy training and K-density detection of adversarial "
                    "examples (Pang et al., NeurIPS 2018), GPU-accelerated.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="end-to-end demo on the embedded digits data (CPU: minutes)",
                       description="Train a CE and an RCE ResNet-8 on scikit-learn's digits, run "
                                   "every attack on test images, fit the K-density detector, "
                                   "and write report.md, results.json and PNG plots.",
                       epilog=RESUME_EPILOG)
    d.add_argument("--out", default="rce_fast_demo",
                   help="output and state folder (default: %(default)s)")
    d.add_argument("--steps", type=_positive_int, default=None,
                   help="training steps per model (default: 4000)")
    d.add_argument("--n-attack", type=_positive_int, default=None,
                   help="test images attacked per model (default: all 540 test images)")
    d.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if "
                                                  "available, else cpu)")
    d.add_argument("--seed", type=_seed, default=0, help="seed (default: %(default)s)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_resume_options(d, "run")

    r = sub.add_parser("reproduce", help="the paper's experiment on real MNIST or CIFAR-10",
                       description="The same pipeline with the paper's settings by default: "
                                   "ResNet-32, 20,000 (MNIST) / 90,000 (CIFAR-10) steps, 1000 "
                                   "attacked images, 9 x 10,000 C&W steps, two-stage C&W-wb.",
                       epilog=RESUME_EPILOG)
    r.add_argument("--dataset", required=True, choices=["mnist", "cifar10"],
                   help=REPRODUCE_DATASET_HELP)
    r.add_argument("--data-dir", required=True, help="folder holding the dataset files")
    r.add_argument("--model", default="resnet32", choices=["resnet8", "resnet32", "resnet56"],
                   help="network (default: %(default)s)")
    r.add_argument("--steps", type=_positive_int, default=None,
                   help="training steps (default: the paper's; the schedule is scaled)")
    r.add_argument("--n-attack", type=_positive_int, default=1000,
                   help="test images attacked per model (default: %(default)s)")
    r.add_argument("--cw-steps", type=_positive_int, default=None,
                   help="C&W iterations per binary-search step (default: 10000)")
    r.add_argument("--cw-search", type=_positive_int, default=None,
                   help="C&W binary-search steps (default: 9)")
    r.add_argument("--cw-c-init", type=_fp32_scale, default=None,
                   help="C&W initial c of the binary search (default: 1e-3, the paper's; "
                        "with few steps per search step, 1 wastes fewer of them)")
    r.add_argument("--wb-steps", type=_positive_int, default=None,
                   help="C&W-wb iterations per search step, both stages (default: 5000 / "
                        "10000 as in the release)")
    r.add_argument("--wb-search", type=_positive_int, default=None,
                   help="C&W-wb search steps of stage 2 (default: 9; stage 1 uses 1 when "
                        "--wb-steps is given, else 3)")
    r.add_argument("--jsma-iterations", type=_positive_int, default=None,
                   help="JSMA iteration cap (default: 100, as the release)")
    r.add_argument("--out", default=None,
                   help="output and state folder (default: rce_fast_DATASET); carry it "
                        "between sessions to continue a run")
    r.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    r.add_argument("--seed", type=_seed, default=0, help="seed (default: %(default)s)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_resume_options(r, "run")

    t = sub.add_parser("train", help="train one CE or RCE model and save a checkpoint",
                       description="Train with the paper's optimiser (SGD momentum 0.9, batch "
                                   "128, weight decay 2e-4 on conv/FC weights) and its piecewise "
                                   "schedule scaled to --steps. Re-running with the same "
                                   "--out resumes exactly. Runs under torchrun for DDP.",
                       epilog=RESUME_EPILOG)
    t.add_argument("--dataset", default="digits", choices=["digits", "mnist", "cifar10", "npz"],
                   help=DATASET_HELP)
    t.add_argument("--data-dir", default=None, help="dataset folder (or .npz file)")
    t.add_argument("--objective", default="rce", choices=["ce", "rce"],
                   help="training objective (default: %(default)s)")
    t.add_argument("--model", default="resnet32", choices=["resnet8", "resnet32", "resnet56"],
                   help="network (default: %(default)s)")
    t.add_argument("--steps", type=_positive_int, default=20_000,
                   help="training steps (default: %(default)s)")
    t.add_argument("--temperature", type=_temperature, default=1.0, help="RCE temperature T > 0")
    t.add_argument("--out", required=True, help="checkpoint path (.pt)")
    t.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    t.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    t.add_argument("--seed", type=_seed, default=0, help="seed (default: %(default)s)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_resume_options(t, "training")

    a = sub.add_parser("attack", help="attack test images with a trained checkpoint",
                       description="Craft adversarial examples and save them with their "
                                   "diagnostics to a .pt file.")
    a.add_argument("--checkpoint", required=True, help="checkpoint from `rce-fast train`")
    a.add_argument("--dataset", default="digits", choices=["digits", "mnist", "cifar10", "npz"],
                   help=CHECKPOINT_DATASET_HELP)
    a.add_argument("--data-dir", default=None, help="dataset folder (or .npz file)")
    a.add_argument("--attack", required=True,
                   choices=["fgsm", "bim", "ilcm", "jsma", "cw", "cw-hc", "rand",
                            *_cli_detect.ADAPTIVE_ATTACKS],
                   help="attack to run; cw-wb and opgd attack the classifier and the "
                        "--detector together, pgd too when --detector is given")
    a.add_argument("--eps", type=_eps, default=0.1,
                   help="eps for fgsm/bim/ilcm/rand, radius for pgd/opgd")
    a.add_argument("--n", type=_positive_int, default=1000, help="test images (default: 1000)")
    a.add_argument("--cw-steps", type=_positive_int, default=1000,
                   help="C&W iterations per search step (default: %(default)s; the paper: "
                        "10000)")
    a.add_argument("--cw-search", type=_positive_int, default=9,
                   help="C&W binary-search steps (default: %(default)s)")
    a.add_argument("--cw-c-init", type=_fp32_scale, default=1e-3,
                   help="C&W initial c (default: %(default)s); cw-wb uses the release's "
                        "10 (stage 1, at most 3 search steps) and 100 (stage 2)")
    a.add_argument("--gamma", type=_fraction, default=0.1, help="JSMA max fraction changed")
    a.add_argument("--out", required=True, help="output .pt with x_adv, labels, info")
    a.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    a.add_argument("--seed", type=_seed, default=0, help="seed (default: %(default)s)")
    _cli_detect.add_attack_arguments(a)

    e = sub.add_parser("evaluate", help="clean error and detection AUCs for saved attacks",
                       description="Clean test error of a checkpoint, and for each file from "
                                   "`rce-fast attack` the AUCs of confidence, non-ME and "
                                   "K-density by the paper's protocol.")
    e.add_argument("--checkpoint", required=True, help="checkpoint from `rce-fast train`")
    e.add_argument("--dataset", default="digits", choices=["digits", "mnist", "cifar10", "npz"],
                   help=CHECKPOINT_DATASET_HELP)
    e.add_argument("--data-dir", default=None, help="dataset folder (or .npz file)")
    e.add_argument("--adversarial", nargs="*", default=[],
                   help=".pt files written by `rce-fast attack`")
    e.add_argument("--sigma2", type=_fp32_scale, default=None,
                   help="K-density width (default: the paper's for the objective)")
    e.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    e.add_argument("--json", default=None, help="also write the results to this file")
    _cli_detect.add_commands(sub, CHECKPOINT_DATASET_HELP)
    return p


def _device(name):
    """The --device option as a torch.device; ValueError (one line, exit status 2) for a
    string that is no device or a device that is not on this machine."""
    import os

    import torch

    from ._args import check_device
    if name is None:
        if torch.cuda.is_available():  # under torchrun each rank takes its own GPU
            return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        return torch.device("cpu")
    return check_device(name, "--device")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .resume import EXIT_NOT_FINISHED, Budget, StopRequested, handle_signals, process_age

    # The budget counts from the start of the process: imports and data loading are
    # part of it.
    budget = Budget(getattr(args, "time_budget", None), spent=process_age())
    try:
        if args.command == "detect":
            with handle_signals(budget):
                return _cli_detect.run(args, budget)
        if args.command in _cli_detect.COMMANDS:
            return _cli_detect.run(args)
        if args.command in ("demo", "reproduce", "train"):
            with handle_signals(budget):
                return _run(args, budget)
        return _run(args, budget)
    except StopRequested as exc:
        where = args.out if args.command != "reproduce" else (
            args.out or f"rce_fast_{args.dataset}")
        if args.command == "detect":
            where = _cli_detect.parts_folder(args.out)
        print(f"rce-fast {args.command}: not finished, run the same command again "
              f"({exc.reason}; state saved in {where})", file=sys.stderr)
        return EXIT_NOT_FINISHED
    except (OSError, ValueError) as exc:
        print(f"rce-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run(args, budget) -> int:
    import torch

    from .data import load_dataset
    from .experiment import ExperimentConfig, run_experiment
    from .resume import atomic_torch_save, check_output_file, check_output_folder

    resume = dict(budget=budget, force_resume=getattr(args, "force_resume", False),
                  restart=getattr(args, "restart", False))
    if args.command == "demo":
        over = {k: v for k, v in dict(steps=args.steps, n_attack=args.n_attack).items()
                if v is not None}
        cfg = ExperimentConfig.demo(out=args.out, device=args.device, seed=args.seed,
                                    progress=not args.quiet, **over)
        _device(args.device)
        check_output_folder(args.out, "--out")
        run_experiment(cfg, **resume)
        print(f"\nreport: {Path(args.out) / 'report.md'}")
        return 0
    if args.command == "reproduce":
        _device(args.device)
        check_output_folder(args.out or f"rce_fast_{args.dataset}", "--out")
        over = {k: v for k, v in dict(model=args.model, steps=args.steps,
                                      n_attack=args.n_attack, cw_steps=args.cw_steps,
                                      cw_search=args.cw_search, cw_c_init=args.cw_c_init,
                                      out=args.out,
                                      device=args.device, seed=args.seed,
                                      jsma_max_iterations=args.jsma_iterations).items()
                if v is not None}
        if args.wb_steps or args.wb_search:
            paper = ExperimentConfig.paper(args.dataset, args.data_dir)
            s1, s2 = dict(paper.wb_stage1), dict(paper.wb_stage2)
            if args.wb_steps:
                s1.update(max_iterations=args.wb_steps, binary_search_steps=1)
                s2.update(max_iterations=args.wb_steps)
            if args.wb_search:
                s2.update(binary_search_steps=args.wb_search)
            over.update(wb_stage1=s1, wb_stage2=s2)
        cfg = ExperimentConfig.paper(args.dataset, args.data_dir, progress=not args.quiet,
                                     **over)
        run_experiment(cfg, **resume)
        print(f"\nreport: {Path(cfg.out) / 'report.md'}")
        return 0

    device = _device(args.device)
    reads = {"--data-dir": args.data_dir, "--checkpoint": getattr(args, "checkpoint", None),
             "--detector": getattr(args, "detector", None)}
    if args.command in ("train", "attack"):  # before any work: fail fast on a bad --out
        check_output_file(args.out, "--out", reads)
    x_tr, y_tr, x_te, y_te = load_dataset(args.dataset, args.data_dir, seed=0)
    if args.command == "train":
        from .train import TrainConfig, evaluate_error, scaled_schedule, train
        bounds, values = scaled_schedule(args.dataset, args.steps)
        cfg = TrainConfig(objective=args.objective, model=args.model, steps=args.steps,
                          lr_boundaries=bounds, lr_values=values,
                          temperature=args.temperature, augment=args.dataset == "cifar10",
                          amp=args.amp, seed=args.seed, checkpoint=args.out,
                          checkpoint_every=max(100, args.steps // 20),
                          progress=not args.quiet)
        model, _ = train(cfg, x_tr, y_tr, device, int(y_tr.max()) + 1,
                         resume=not args.restart, force_resume=args.force_resume,
                         budget=budget)
        import os
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
            print(f"test error {evaluate_error(model, x_te, y_te):.2f}%  checkpoint "
                  f"{args.out}")
        return 0

    from .train import load_classifier_and_state
    if args.command == "evaluate" and args.json:  # before any work: fail fast on a bad --json
        reads.update({f"--adversarial {p}": p for p in args.adversarial})
        check_output_file(args.json, "--json", reads)
    model, state = load_classifier_and_state(args.checkpoint, device)
    note = check_checkpoint_data(args, state, x_tr, y_tr, x_te, y_te)  # warned below
    del state  # the weights are in the model; the optimizer state is not needed
    if args.command == "attack":
        from . import attacks as A
        if args.n > len(x_te):  # the file records how many were attacked
            print(f"note: --n {args.n} is more than the {len(x_te)} test images: attacking "
                  f"all {len(x_te)}", file=sys.stderr)
            args.n = len(x_te)
        x, y = x_te[:args.n].to(device), y_te[:args.n]
        if args.attack in _cli_detect.ADAPTIVE_ATTACKS:
            return _cli_detect.run_attack(args, model, x, y, device, note)
        cw = dict(binary_search_steps=args.cw_search, max_iterations=args.cw_steps,
                  c_init=args.cw_c_init,
                  seed=args.seed, return_info=True)
        runs = {"fgsm": lambda: A.fgsm(model, x, args.eps, return_info=True),
                "bim": lambda: A.bim(model, x, args.eps, return_info=True),
                "ilcm": lambda: A.ilcm(model, x, args.eps, return_info=True),
                "jsma": lambda: A.jsma(model, x, "least_likely", gamma=args.gamma,
                                       return_info=True),
                "cw": lambda: A.cw_l2(model, x, "random", **cw),
                "cw-hc": lambda: A.cw_l2(model, x, "random", kappa=10.0, **cw),
                "rand": lambda: (A.rand_noise(x, args.eps, seed=args.seed), None)}
        warn(args, note)
        adv, info = runs[args.attack]()
        atomic_torch_save({"attack": args.attack, "x_adv": adv.cpu(), "labels": y,
                           "n": args.n, "info": None if info is None else
                           {k: v.cpu() if torch.is_tensor(v) else v
                            for k, v in info.as_dict().items()}}, args.out)
        with torch.no_grad():
            wrong = (model.predict(adv).cpu() != y).float().mean().item() * 100
        print(f"{args.attack}: {args.n} examples, {wrong:.1f}% misclassified -> {args.out}")
        return 0

    # evaluate: every --adversarial file is read (safely) and checked before any work
    from .detect import KDensityDetector, confidence, non_me, paper_auc
    from .train import evaluate_error
    adversarial = [(path, _load_adversarial(path, x_te)) for path in args.adversarial]
    warn(args, note)
    result = {"checkpoint": args.checkpoint, "test_error": evaluate_error(model, x_te, y_te),
              "attacks": {}}
    with torch.no_grad():
        feats = torch.cat([model.features(b.to(device)) for b in x_tr.split(1000)])
    det = KDensityDetector(sigma2=args.sigma2, objective=model.objective).fit(
        feats, y_tr.to(device))

    def scores(x):
        with torch.no_grad():
            z, f = model.logits_and_features(x.to(device))
        pred = z.argmax(1)
        return pred.cpu(), {"confidence": confidence(z).cpu(), "non-ME": non_me(z).cpu(),
                            "K-density": det.score(f, pred).cpu()}

    for path, (n, x_adv) in adversarial:
        clean_pred, clean = scores(x_te[:n])
        adv_pred, adv = scores(x_adv)
        result["attacks"][path] = paper_auc(clean, adv, y_te[:n], clean_pred, adv_pred)
    print(json.dumps(result, indent=2))
    if args.json:
        from ._io import atomic_write_text
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


def _load_adversarial(path, x_test):
    """(n, x_adv) from a file of `rce-fast attack`, loaded with weights_only=True (a
    crafted file cannot run code) and checked: one ValueError naming the path."""
    import torch

    from ._io import require_keys, safe_torch_load
    from ._torch_impl import all_finite

    what = "adversarial examples written by `rce-fast attack`"
    saved = require_keys(safe_torch_load(path, what), ("x_adv", "n"), path, what)
    x_adv, n = saved["x_adv"], saved["n"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(x_test):
        raise ValueError(f"{path}: n must be an int in [1, {len(x_test)}] (the test images "
                         f"attacked), got {n!r}")
    if not isinstance(x_adv, torch.Tensor) or not x_adv.dtype.is_floating_point or \
            tuple(x_adv.shape) != (n, *x_test.shape[1:]):
        raise ValueError(f"{path}: x_adv must be a float tensor of shape "
                         f"{(n, *x_test.shape[1:])} (n images of this dataset), got "
                         f"{getattr(x_adv, 'dtype', type(x_adv).__name__)} "
                         f"{tuple(getattr(x_adv, 'shape', ()))}")
    if not all_finite(x_adv):
        raise ValueError(f"{path}: x_adv contains NaN or inf values")
    return n, x_adv


if __name__ == "__main__":
    raise SystemExit(main())
