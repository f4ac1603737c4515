"""CE / RCE training with the paper's settings (appendix B.1).

SGD with momentum 0.9, batch 128, weight decay 2e-4 on conv and FC weights only (not
biases, not batch norm), a piecewise-constant learning rate by steps, checkpoints with
exact resume (model, optimizer, data order and RNG state: a resumed run is bit-identical
to an uninterrupted one), a tqdm progress bar, bf16 autocast on CUDA (``amp``), and
DistributedDataParallel when launched with torchrun (each rank takes its slice of the
same global batch of 128).
"""
from __future__ import annotations

import hashlib
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from . import _torch_impl
from ._args import check_device, check_has_data, check_seed, scalar
from .data import augment_cifar
from .loss import _check_temperature, rce_loss
from .models import Classifier, build_model
from ._io import safe_torch_load
from .resume import (ResumeMismatch, StopRequested, atomic_torch_save, check_output_file,
                     settings_diff)

#: The paper's schedules: (boundaries in steps, learning rates).
PAPER_SCHEDULES = {
    "mnist": ([10_000, 15_000], [0.1, 0.01, 0.001]),   # then 1e-4 from 20k, the last step
    "cifar10": ([40_000, 60_000, 80_000], [0.1, 0.01, 0.001, 0.0001]),
}


@dataclass
class TrainConfig:
    objective: str = "rce"            # "ce" or "rce"
    model: str = "resnet32"           # resnet32 / resnet56 / resnet8
    steps: int = 20_000
    batch_size: int = 128
    lr_boundaries: list = field(default_factory=lambda: [10_000, 15_000])
    lr_values: list = field(default_factory=lambda: [0.1, 0.01, 0.001])
    momentum: float = 0.9
    weight_decay: float = 2e-4
    temperature: float = 1.0          # RCE only
    augment: bool = False             # the paper's CIFAR-10 augmentation
    amp: bool = False                 # bf16 autocast on CUDA
    seed: int = 0
    checkpoint: str | None = None     # path; saved every checkpoint_every steps and at the end
    checkpoint_every: int = 1000
    progress: bool = True

    def __post_init__(self):
        from .models import MODELS
        if self.objective not in ("ce", "rce"):
            raise ValueError(f"objective must be 'ce' or 'rce', got {self.objective!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        # Numbers are stored as plain Python numbers (a 0-d tensor or NumPy number is
        # taken as the number it holds), so the config is JSON-serialisable as saved.
        self.seed = check_seed(self.seed)
        for name, minimum in (("steps", 0), ("batch_size", 1), ("checkpoint_every", 1)):
            value = scalar(getattr(self, name))
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if minimum is not None and value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
            setattr(self, name, int(value))
        for name in ("lr_boundaries", "lr_values"):
            value = getattr(self, name)
            if isinstance(value, (Tensor, np.ndarray)) and value.ndim == 1:
                value = value.tolist()
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise TypeError(f"{name} must be a list of numbers, got {type(value).__name__}")
            setattr(self, name, [scalar(v) for v in value])
        if len(self.lr_values) != len(self.lr_boundaries) + 1:
            raise ValueError("lr_values needs exactly one more entry than lr_boundaries")
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real) or
               not (0 < v < math.inf) for v in self.lr_values):
            raise ValueError(f"lr_values must be finite numbers > 0, got {self.lr_values}")
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral)
               for v in self.lr_boundaries) or \
                list(self.lr_boundaries) != sorted(self.lr_boundaries):
            raise ValueError("lr_boundaries must be increasing step numbers")
        self.lr_values = [float(v) for v in self.lr_values]
        self.lr_boundaries = [int(v) for v in self.lr_boundaries]
        for name, lo, hi in (("momentum", 0.0, 1.0), ("weight_decay", 0.0, math.inf),
                             ("temperature", 0.0, math.inf)):
            value = scalar(getattr(self, name))
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            ok = (lo < value < hi) if name == "temperature" else (lo <= value < hi)
            if name == "momentum":
                ok = 0.0 <= value <= 1.0
            if not (math.isfinite(value) and ok):
                raise ValueError(f"{name} must be a finite number "
                                 f"{'> 0' if name == 'temperature' else '>= 0'}"
                                 f"{' and <= 1' if name == 'momentum' else ''}, got {value}")
            setattr(self, name, float(value))
        _check_temperature(self.temperature)  # the loss's own range, checked up front

    def lr_at(self, step: int) -> float:
        for boundary, value in zip(self.lr_boundaries, self.lr_values):
            if step < boundary:
                return value
        return self.lr_values[-1]


def scaled_schedule(dataset: str, steps: int) -> tuple[list, list]:
    """The paper's schedule for ``dataset`` compressed to ``steps`` total steps."""
    bounds, values = PAPER_SCHEDULES["cifar10" if dataset == "cifar10" else "mnist"]
    total = 90_000 if dataset == "cifar10" else 20_000
    return [max(1, round(b * steps / total)) for b in bounds], list(values)


def _param_groups(net: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for module in net.modules():
        for name, p in module.named_parameters(recurse=False):
            is_weight = name == "weight" and isinstance(module, (torch.nn.Conv2d,
                                                                 torch.nn.Linear))
            (decay if is_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class _Sampler:
    """Seeded epochs of random permutations; its state is part of the checkpoint.

    Each epoch's permutation is generated on the CPU (so the order does not depend on
    the device) and copied to ``device`` once per epoch: the indices of a batch are
    then sliced on the device, with no host-to-device copy (and no stream sync) per
    step."""

    def __init__(self, n: int, seed: int, device=None) -> None:
        self.n, self.g = n, torch.Generator().manual_seed(seed)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.perm, self.pos = torch.randperm(n, generator=self.g), 0
        self._on_device = self.perm.to(self.device)

    def next(self, batch: int) -> torch.Tensor:
        out = []
        while batch:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
                self._on_device = self.perm.to(self.device)
            take = min(batch, self.n - self.pos)
            out.append(self._on_device[self.pos:self.pos + take])
            self.pos += take
            batch -= take
        return out[0] if len(out) == 1 else torch.cat(out)

    def state(self) -> dict:
        return {"g": self.g.get_state(), "perm": self.perm, "pos": self.pos}

    def load(self, state: dict) -> None:
        """Continue the saved order; a run forced on with a training set of another size
        (``force_resume``) starts a fresh epoch over the new set from the saved generator
        (the old order would draw short or empty batches, or indices past its end)."""
        self.g.set_state(state["g"])
        self.perm, self.pos = state["perm"], int(state["pos"])
        if len(self.perm) != self.n or not 0 <= self.pos <= self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
        self._on_device = self.perm.to(self.device)


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if world > 1 else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


#: TrainConfig fields that do not change what is computed (not compared on resume).
_NOT_RESULTS = ("checkpoint", "checkpoint_every", "progress")


def training_settings(config: TrainConfig, in_channels: int, num_classes: int,
                      data: dict | None = None) -> dict:
    """The settings a checkpoint must match to be continued: every TrainConfig field
    that changes the result, the input channels and classes, and the training data's
    fingerprint (:func:`data_fingerprint`)."""
    out = {k: v for k, v in asdict(config).items() if k not in _NOT_RESULTS}
    out.update(in_channels=int(in_channels), num_classes=int(num_classes))
    if data is not None:
        out["data"] = data
    return out


def data_fingerprint(*tensors: torch.Tensor) -> dict:
    """Shapes, dtypes and a BLAKE2 hash of the bytes of ``tensors``: which data a run
    used, independent of where the files lie."""
    h = hashlib.blake2b(digest_size=16)
    shapes = []
    for t in tensors:
        t = t.detach().cpu().contiguous()
        shapes.append([str(t.dtype).replace("torch.", "")] + list(t.shape))
        h.update(repr(shapes[-1]).encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return {"shapes": shapes, "blake2b": h.hexdigest()}


def _check_resume(path: Path, state: dict, current: dict, force: bool) -> list[str]:
    """The differing settings (a ResumeMismatch unless ``force``; architecture
    differences refuse even then, since the weights cannot be loaded)."""
    saved = {k: v for k, v in state["config"].items() if k not in _NOT_RESULTS}
    saved.update(in_channels=state["in_channels"], num_classes=state["num_classes"])
    if state.get("data") is not None:
        saved["data"] = state["data"]
    if "data" not in saved:  # a checkpoint from before fingerprints: not compared
        current = {k: v for k, v in current.items() if k != "data"}
    diffs = settings_diff(saved, current)
    if not diffs:
        return []
    hard = [d for d in diffs if d.split(":")[0] in ("model", "in_channels", "num_classes")]
    if hard and force:
        raise ResumeMismatch(f"checkpoint {path} cannot be continued with these settings, "
                             f"its weights do not fit the network ({'; '.join(hard)}): "
                             "use --restart (API: resume=False) or another --out")
    if not force:
        raise ResumeMismatch(f"checkpoint {path} was written with other settings "
                             f"({'; '.join(diffs)}): run with the same settings to continue "
                             "it, --force-resume to continue it anyway, or --restart to "
                             "start over (API: force_resume=True / resume=False)")
    return diffs


def _agree(n: int, interrupted: bool, world: int, device: torch.device) -> tuple[int, bool]:
    """Under DDP every rank must run the same steps: rank 0's grant, and a stop if any
    rank was signalled (two tiny collectives per chunk, never per step)."""
    if world == 1:
        return n, interrupted
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([n, int(interrupted)], dtype=torch.int64, device=where)
    flag = t[1:].clone()
    dist.broadcast(t, 0)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(t[0]), bool(flag[0])


def _check_train_args(config, x_train, y_train, num_classes) -> int | None:
    """Checks, and returns num_classes as an int (or None)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(x_train, torch.Tensor):
        raise TypeError(f"x_train must be a torch.Tensor of images, got "
                        f"{type(x_train).__name__}")
    if not x_train.dtype.is_floating_point:
        raise TypeError(f"x_train must be a floating-point tensor, got {x_train.dtype}")
    if x_train.dim() != 4 or len(x_train) == 0:
        raise ValueError(f"x_train must be a non-empty batch of images (N, C, H, W), got "
                         f"{tuple(x_train.shape)}")
    check_has_data(x_train, "x_train")
    if not _torch_impl.all_finite(x_train):
        raise ValueError("x_train contains NaN or inf values")
    if not isinstance(y_train, torch.Tensor):
        raise TypeError(f"y_train must be a torch.Tensor of class indices, got "
                        f"{type(y_train).__name__}")
    if y_train.dtype.is_floating_point or y_train.dtype.is_complex or \
            y_train.dtype == torch.bool:
        raise TypeError(f"y_train must be an integer tensor of class indices, got "
                        f"{y_train.dtype}")
    if tuple(y_train.shape) != (len(x_train),):
        raise ValueError(f"y_train must have shape ({len(x_train)},) like x_train, got "
                         f"{tuple(y_train.shape)}")
    check_has_data(y_train, "y_train")
    lo, hi = (int(v) for v in torch.aminmax(y_train))
    if lo < 0:
        raise ValueError(f"y_train holds a negative class index ({lo})")
    if num_classes is None and hi < 1:
        raise ValueError(f"y_train holds one class only ({hi}): training needs at least 2 "
                         "(pass num_classes to train on labels that lack some classes)")
    if num_classes is not None:
        num_classes = scalar(num_classes)
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
        if num_classes < 2 or hi >= num_classes:
            raise ValueError(f"num_classes must be >= 2 and above every label (y_train "
                             f"holds class {hi}), got {num_classes}")
        num_classes = int(num_classes)
    return num_classes


def train(config: TrainConfig, x_train: torch.Tensor, y_train: torch.Tensor,
          device: str | torch.device | None = None, num_classes: int | None = None,
          resume: bool = True, *, force_resume: bool = False, budget=None,
          keep_optimizer: bool = True) -> tuple[Classifier, dict]:
    """Train a model from ``config`` on (x_train, y_train); returns (Classifier, history).

    If ``config.checkpoint`` exists and ``resume`` is true, training continues from it
    exactly, after checking that it was written with the same settings (every
    TrainConfig field that changes the result, the input shape and classes, and a
    fingerprint of the training data): a difference raises
    :class:`rce_fast.resume.ResumeMismatch` listing them, unless ``force_resume``.
    ``resume=False`` starts over (the checkpoint is replaced at the first save).

    ``budget``: a :class:`rce_fast.resume.Budget` for a time-boxed run: steps run in
    chunks it grants; when it refuses (time, SIGTERM/SIGINT) a checkpoint is written at
    the current step and :class:`rce_fast.resume.StopRequested` is raised. Needs
    ``config.checkpoint``. ``keep_optimizer=False``: the final checkpoint holds the
    model only (no optimizer or sampler state: it cannot be trained further, but it is
    half the size). Under torchrun every rank runs this same call.
    """
    num_classes = _check_train_args(config, x_train, y_train, num_classes)
    world, rank, local = _distributed()
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = check_device(device)
    if device.type == "cuda":
        # Make the rank's GPU the current one: kernels launched outside a device guard
        # (and NCCL) use the current device, which is cuda:0 on every rank otherwise.
        torch.cuda.set_device(device)
    num_classes = int(y_train.max()) + 1 if num_classes is None else num_classes
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                         f"{world} processes")
    ckpt = Path(config.checkpoint) if config.checkpoint else None
    if budget is not None and ckpt is None:
        raise ValueError("a time budget needs config.checkpoint (where to save on a stop)")
    if ckpt is not None and rank == 0:
        check_output_file(ckpt, "checkpoint")
    settings = training_settings(config, x_train.shape[1], num_classes,
                                 data_fingerprint(x_train, y_train) if ckpt else None)
    torch.manual_seed(config.seed)
    net = build_model(config.model, x_train.shape[1], num_classes).to(device)
    opt = torch.optim.SGD(_param_groups(net, config.weight_decay), lr=config.lr_at(0),
                          momentum=config.momentum)
    sampler = _Sampler(len(x_train), config.seed, device)
    aug_g = torch.Generator().manual_seed(config.seed + 1)
    history = {"step": [], "loss": [], "lr": [], "config": asdict(config)}
    start, seconds_before = 0, 0.0
    if ckpt is not None and resume and ckpt.is_file():
        state = _load_checkpoint(ckpt)
        forced = _check_resume(ckpt, state, settings, force_resume)
        net.load_state_dict(state["model"])
        history, start = state["history"], state["step"]
        seconds_before = float(state.get("seconds", 0.0))
        if forced:
            history.setdefault("forced_resumes", []).append({"at_step": start,
                                                             "differences": forced})
        if "optimizer" in state:
            opt.load_state_dict(state["optimizer"])
            sampler.load(state["sampler"])
            aug_g.set_state(state["aug_rng"])
            torch.set_rng_state(state["torch_rng"])
        elif start < config.steps:
            raise ResumeMismatch(f"checkpoint {ckpt} is a finished model without optimizer "
                                 f"state (step {start}); it cannot be trained further: use "
                                 "--restart or another --out")
    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = config.amp and device.type == "cuda"
    # The data go to the device once, so that a step copies nothing from the host; as
    # float32 (the model's dtype; amp casts on the fly) and out of any autograd graph
    # (the caller's x_train.grad is never written).
    x_dev, y_dev = x_train.detach().to(device, torch.float32), y_train.to(device)
    model.train()
    # The bar appears once the first chunk is granted: a budget too small to start gives
    # its one-line error with no bar drawn above it.
    bar = tqdm(total=config.steps, initial=start, disable=not config.progress or rank != 0,
               desc=f"train {config.objective}", delay=3600.0 if budget is not None else 0.0)
    hidden_bar = budget is not None and not bar.disable
    per_rank = config.batch_size // world
    pending: list[tuple[int, torch.Tensor, float]] = []
    t_start = time.perf_counter()

    def flush() -> None:
        # The losses logged every 50 steps stay on the device until here (one sync).
        if pending:
            values = torch.stack([v for _, v, _ in pending]).tolist()
            for (s, _, lr), value in zip(pending, values):
                history["step"].append(s)
                history["loss"].append(value)
                history["lr"].append(lr)
            bar.set_postfix(loss=f"{values[-1]:.4f}", lr=pending[-1][2])
            pending.clear()

    def save(step: int, final: bool) -> None:
        flush()
        if ckpt is not None and rank == 0:
            seconds = seconds_before + time.perf_counter() - t_start
            save_checkpoint(ckpt, net, None if final and not keep_optimizer else opt,
                            sampler, aug_g, history, step, config, x_train.shape[1],
                            num_classes, data=settings.get("data"), seconds=seconds)

    kind = f"train {config.model} batch {config.batch_size}"
    step = start
    try:
        while step < config.steps:
            n = config.steps - step
            if budget is not None:
                n = budget.grant(kind, n) if rank == 0 else n
                n, stop = _agree(n, budget.interrupted, world, device)
                if n == 0 or stop:
                    save(step, False)
                    raise StopRequested(budget.stop_reason or "stop requested")
            if hidden_bar:
                hidden_bar = False
                bar.delay = 0.0
                bar.refresh()
            ran = 0
            for _ in range(n):
                if budget is not None and world == 1 and budget.interrupted:
                    break
                lr = config.lr_at(step)
                for group in opt.param_groups:
                    group["lr"] = lr
                idx = sampler.next(config.batch_size)[rank * per_rank:(rank + 1) * per_rank]
                xb, yb = x_dev[idx], y_dev[idx]
                if config.augment:
                    xb = augment_cifar(xb, aug_g)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(xb)
                if config.objective == "rce":
                    loss = rce_loss(logits.float(), yb, temperature=config.temperature)
                else:
                    loss = _torch_impl.cross_entropy(logits.float(), yb)  # no CPU exp slow path
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step % 50 == 0 or step == config.steps - 1:
                    pending.append((step, loss.detach(), lr))
                step += 1
                ran += 1
                bar.update(1)
                if step % config.checkpoint_every == 0 or step == config.steps:
                    save(step, step == config.steps)
            flush()  # one sync per chunk: the bar shows the latest logged loss
            if budget is not None:
                if rank == 0:
                    budget.done(ran)
                if world == 1 and budget.interrupted and step < config.steps:
                    save(step, False)
                    raise StopRequested(budget.stop_reason or "stop requested")
        flush()
    finally:
        bar.close()
    history["seconds"] = seconds_before + time.perf_counter() - t_start
    return Classifier(net, config.objective).eval(), history


def _load_checkpoint(path: Path) -> dict:
    """The checkpoint's dict, on the CPU: the RNG states must stay CPU tensors (and
    load_state_dict moves weights and optimizer state to the parameters' device)."""
    state = safe_torch_load(path, "an rce_fast training checkpoint (rce-fast train)")
    if not isinstance(state, dict) or not {"model", "config", "step", "in_channels",
                                           "num_classes"} <= set(state) or \
            not isinstance(state["config"], dict) or \
            not {"model", "objective"} <= set(state["config"]):
        raise ValueError(f"checkpoint {path} is not an rce_fast training checkpoint "
                         "(expected the dict written by rce_fast.train)")
    return state


def save_checkpoint(path, net, opt, sampler, aug_g, history, step, config, in_channels,
                    num_classes, data: dict | None = None, seconds: float = 0.0) -> None:
    """Write a checkpoint atomically. ``opt=None`` writes a finished model only (no
    optimizer, sampler or RNG state)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": net.state_dict(), "history": history, "step": step,
             "config": asdict(config), "in_channels": in_channels,
             "num_classes": num_classes, "seconds": float(seconds)}
    if data is not None:
        state["data"] = data
    if opt is not None:
        state.update(optimizer=opt.state_dict(), sampler=sampler.state(),
                     aug_rng=aug_g.get_state(), torch_rng=torch.get_rng_state())
    atomic_torch_save(state, path)  # never leave a half-written checkpoint


def load_classifier(path, device: str | torch.device = "cpu") -> Classifier:
    """A Classifier (eval mode) from a checkpoint written by :func:`train`."""
    return load_classifier_and_state(path, device)[0]


def load_classifier_and_state(path, device: str | torch.device = "cpu"
                              ) -> tuple[Classifier, dict]:
    """:func:`load_classifier` and the checkpoint's dict (for :func:`check_images` and
    :func:`check_training_data`), from one read of the file."""
    path = Path(path)
    device = check_device(device)
    state = _load_checkpoint(path)
    cfg = state["config"]
    try:
        net = build_model(cfg["model"], int(state["in_channels"]), int(state["num_classes"]))
        net.load_state_dict(state["model"])
        model = Classifier(net, cfg["objective"])
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {path}: its weights do not fit the network it names "
                         f"({cfg.get('model')!r}): {first[:200]}") from None
    return model.to(device).eval(), state


def _trained_image_shape(state: dict) -> tuple[int, ...] | None:
    """(C, H, W) of the checkpoint's training images, from its data fingerprint."""
    try:
        return tuple(int(d) for d in state["data"]["shapes"][0][2:])
    except (TypeError, KeyError, IndexError, ValueError):
        return None


def check_images(path, state: dict, image_shape, source: str = "the data") -> None:
    """ValueError unless images of shape ``image_shape`` (C, H, W) are what the checkpoint
    (``state``, read from ``path``) was trained on. A fully convolutional network runs on
    images of any size without complaint, so this is the only guard. A checkpoint from
    before data fingerprints records only its input channels."""
    shape = tuple(int(d) for d in image_shape)
    trained = _trained_image_shape(state)
    if trained is None:
        channels = int(state["in_channels"])
        if not shape or shape[0] != channels:
            raise ValueError(f"checkpoint {path} takes images with {channels} channels but "
                             f"{source} has images of shape {shape}: use the data it was "
                             "trained on")
        return
    if shape != trained:
        raise ValueError(f"checkpoint {path} was trained on images of shape {trained} but "
                         f"{source} has images of shape {shape}: use the data it was "
                         "trained on")


def check_training_data(path, x_train: torch.Tensor, y_train: torch.Tensor,
                        source: str = "the data", *, x_test: torch.Tensor | None = None,
                        y_test: torch.Tensor | None = None,
                        state: dict | None = None) -> str | None:
    """Check that a dataset can be the one checkpoint ``path`` was trained on.

    Raises ValueError when the images of either split (``x_test`` / ``y_test`` too, when
    given) have another shape than those it was trained on (:func:`check_images`), or a
    label is outside its classes. Returns a sentence when the shapes fit but the training
    split's fingerprint (:func:`data_fingerprint`) is not the checkpoint's (other data of
    the same shape: the caller decides whether to warn), else None. ``state``: the
    checkpoint's dict if already read (:func:`load_classifier_and_state`).
    """
    path = Path(path)
    state = _load_checkpoint(path) if state is None else state
    classes = int(state["num_classes"])
    for x, y, split in ((x_train, y_train, "training"), (x_test, y_test, "test")):
        if y is not None and len(y) and int(y.max()) >= classes:
            raise ValueError(f"checkpoint {path} has {classes} classes but {source} has "
                             f"{split} label {int(y.max())}: use the data it was trained on")
        if x is not None:
            check_images(path, state, x.shape[1:], f"{source} ({split} split)")
    data = state.get("data")
    if data is not None and data_fingerprint(x_train, y_train) != data:
        return (f"{source} is not the training data of checkpoint {path} (same image "
                "shape, other contents)")
    return None


@torch.no_grad()
def evaluate_error(model: Classifier, x: torch.Tensor, y: torch.Tensor,
                   batch_size: int = 1000) -> float:
    """Test error in percent: the share of ``x`` whose arg max of ``model`` (decision
    logits) is not ``y``, in eval mode (each module's mode is restored afterwards)."""
    from .attacks._common import check_images, check_int, model_in_eval_mode
    check_images(x, "x")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"y must be an integer tensor of class indices, got {y.dtype}")
    if tuple(y.shape) != (len(x),):
        raise ValueError(f"y must have shape ({len(x)},) like x, got {tuple(y.shape)}")
    check_has_data(y, "y")
    batch_size = check_int(batch_size, "batch_size", 1)
    device = next(model.parameters()).device
    wrong, classes = 0, None
    with model_in_eval_mode(model):
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            logits = model(xb.to(device))
            if classes is None:
                classes = logits.shape[1]
                lo, hi = (int(v) for v in torch.aminmax(y))
                if lo < 0 or hi >= classes:
                    raise ValueError(f"y holds classes outside [0, {classes}) (the model's "
                                     f"classes): {lo if lo < 0 else hi}")
            wrong += int((logits.argmax(1).cpu() != yb.cpu()).sum())
    return 100.0 * wrong / len(x)
