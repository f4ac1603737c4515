"""Small trained models on scikit-learn's digits, shared by the attack tests."""
from __future__ import annotations

import functools
import os
import pathlib

import torch
from sklearn.datasets import load_digits

import rce_fast


# Real MNIST (IDX gz, torchvision names) for the tests and benchmarks that use it when
# present: ../shared/data/mnist beside the checkout, or RCE_FAST_MNIST_DIR (the GPU
# machine, where only the repository travels: scripts/gpu_prepare.sh stages a copy).
MNIST_DIR = pathlib.Path(os.environ.get("RCE_FAST_MNIST_DIR") or
                         pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
                         / "mnist")


@functools.lru_cache(maxsize=None)
def digits_tensors():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0 - 0.5
    return x, torch.tensor(d.target)


class Decision(torch.nn.Module):
    """Wraps a network so it returns decision logits: Z (CE) or -Z (RCE)."""

    def __init__(self, net, objective):
        super().__init__()
        self.net, self.objective = net, objective

    def forward(self, x):
        return rce_fast.decision_logits(self.net(x), self.objective)


class MLP(torch.nn.Module):
    """in-hidden-10 MLP with the forward_features / head split rce_fast.models expects."""

    def __init__(self, in_features: int = 64, hidden: int = 128):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, hidden),
                                        torch.nn.LeakyReLU(0.1))
        self.fc = torch.nn.Linear(hidden, 10)

    def forward_features(self, x):
        return self.body(x)

    def head(self, f):
        return self.fc(f)

    def forward(self, x):
        return self.fc(self.body(x))


@functools.lru_cache(maxsize=None)
def digits_mlp(objective: str = "ce", dtype: torch.dtype = torch.float32, steps: int = 400):
    """An MLP trained on the first 1500 digits; returns an eval-mode Classifier."""
    torch.manual_seed(0)
    x, y = digits_tensors()
    x_tr, y_tr = x[:1500], y[:1500]
    net = MLP()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    loss_fn = rce_fast.RCELoss() if objective == "rce" else torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x_tr), (128,), generator=g)
        loss = loss_fn(net(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = rce_fast.models.Classifier(net, objective).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
