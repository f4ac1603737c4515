"""CE / RCE training with the paper's settings (appendix B.1).

SGD with momentum 0.9, batch 128, weight decay 2e-4 on conv and FC weights only (not
biases, not batch norm), a piecewise-constant learning rate by steps, checkpoints with
exact resume (model, optimizer, data order and RNG state: a resumed run is bit-identical
to an uninterrupted one), a tqdm progress bar, bf16 autocast on CUDA (``amp``), and
DistributedDataParallel when launched with torchrun (each rank takes its slice of the
same global batch of 128).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import augment_cifar
from .loss import rce_loss
from .models import Classifier, build_model

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
        if self.objective not in ("ce", "rce"):
            raise ValueError(f"objective must be 'ce' or 'rce', got {self.objective!r}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("steps must be >= 0 and batch_size >= 1")
        if len(self.lr_values) != len(self.lr_boundaries) + 1:
            raise ValueError("lr_values needs exactly one more entry than lr_boundaries")
        if list(self.lr_boundaries) != sorted(self.lr_boundaries):
            raise ValueError("lr_boundaries must be increasing")

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
    """Seeded epochs of random permutations; its state is part of the checkpoint."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.g = n, torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.g), 0

    def next(self, batch: int) -> torch.Tensor:
        out = []
        while batch:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
            take = min(batch, self.n - self.pos)
            out.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            batch -= take
        return torch.cat(out)

    def state(self) -> dict:
        return {"g": self.g.get_state(), "perm": self.perm, "pos": self.pos}

    def load(self, state: dict) -> None:
        self.g.set_state(state["g"])
        self.perm, self.pos = state["perm"], state["pos"]


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if world > 1 else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def train(config: TrainConfig, x_train: torch.Tensor, y_train: torch.Tensor,
          device: str | torch.device | None = None, num_classes: int | None = None,
          resume: bool = True) -> tuple[Classifier, dict]:
    """Train a model from ``config`` on (x_train, y_train); returns (Classifier, history).

    If ``config.checkpoint`` exists and ``resume`` is true, training continues from it
    exactly. Under torchrun every rank runs this same call.
    """
    world, rank, local = _distributed()
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if x_train.dim() != 4 or len(x_train) != len(y_train) or len(x_train) == 0:
        raise ValueError(f"x_train must be (N, C, H, W) with matching y_train; got "
                         f"{tuple(x_train.shape)} and {tuple(y_train.shape)}")
    num_classes = int(y_train.max()) + 1 if num_classes is None else num_classes
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                         f"{world} processes")
    torch.manual_seed(config.seed)
    net = build_model(config.model, x_train.shape[1], num_classes).to(device)
    opt = torch.optim.SGD(_param_groups(net, config.weight_decay), lr=config.lr_at(0),
                          momentum=config.momentum)
    sampler = _Sampler(len(x_train), config.seed)
    aug_g = torch.Generator().manual_seed(config.seed + 1)
    history = {"step": [], "loss": [], "lr": [], "config": asdict(config)}
    start = 0
    ckpt = Path(config.checkpoint) if config.checkpoint else None
    if ckpt is not None and resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.load(state["sampler"])
        aug_g.set_state(state["aug_rng"])
        torch.set_rng_state(state["torch_rng"])
        history, start = state["history"], state["step"]
    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = config.amp and device.type == "cuda"
    model.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
               disable=not config.progress or rank != 0, desc=f"train {config.objective}")
    per_rank = config.batch_size // world
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = config.lr_at(step)
        idx = sampler.next(config.batch_size)[rank * per_rank:(rank + 1) * per_rank]
        xb, yb = x_train[idx].to(device), y_train[idx].to(device)
        if config.augment:
            xb = augment_cifar(xb, aug_g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(xb)
        if config.objective == "rce":
            loss = rce_loss(logits.float(), yb, temperature=config.temperature)
        else:
            loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == config.steps - 1:
            value = float(loss.detach())
            history["step"].append(step)
            history["loss"].append(value)
            history["lr"].append(config.lr_at(step))
            bar.set_postfix(loss=f"{value:.4f}", lr=config.lr_at(step))
        done = step + 1
        if ckpt is not None and rank == 0 and (done % config.checkpoint_every == 0
                                               or done == config.steps):
            save_checkpoint(ckpt, net, opt, sampler, aug_g, history, done, config,
                            x_train.shape[1], num_classes)
    return Classifier(net, config.objective).eval(), history


def save_checkpoint(path, net, opt, sampler, aug_g, history, step, config, in_channels,
                    num_classes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(),
                "sampler": sampler.state(), "aug_rng": aug_g.get_state(),
                "torch_rng": torch.get_rng_state(), "history": history, "step": step,
                "config": asdict(config), "in_channels": in_channels,
                "num_classes": num_classes}, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint


def load_classifier(path, device: str | torch.device = "cpu") -> Classifier:
    """A Classifier (eval mode) from a checkpoint written by :func:`train`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    state = torch.load(path, map_location=device, weights_only=False)
    cfg = state["config"]
    net = build_model(cfg["model"], state["in_channels"], state["num_classes"]).to(device)
    net.load_state_dict(state["model"])
    return Classifier(net, cfg["objective"]).eval()


@torch.no_grad()
def evaluate_error(model: Classifier, x: torch.Tensor, y: torch.Tensor,
                   batch_size: int = 1000) -> float:
    """Test error in percent."""
    device = next(model.parameters()).device
    wrong = sum(int((model(xb.to(device)).argmax(1).cpu() != yb).sum())
                for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return 100.0 * wrong / max(1, len(x))
