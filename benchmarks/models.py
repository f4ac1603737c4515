"""Small models trained once per benchmark session (MNIST-sized when real MNIST is present)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import rce_fast
from rce_fast.models import Classifier, build_model
from tests.helpers import MLP, MNIST_DIR, digits_tensors


@functools.lru_cache(maxsize=None)
def mnist_sized_data():
    """(x_train, y_train, x_test, y_test, name): real MNIST if present, else the digits
    upsampled to 28 x 28 (so the attacks still see 784 features)."""
    if (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        from rce_fast.data import load_mnist
        x_tr, y_tr = load_mnist(MNIST_DIR, "train")
        x_te, y_te = load_mnist(MNIST_DIR, "test")
        return x_tr[:20000], y_tr[:20000], x_te, y_te, "mnist"
    x, y = digits_tensors()
    x = F.interpolate(x + 0.5, size=28, mode="bilinear", align_corners=False) - 0.5
    return x[:1500], y[:1500], x[1500:], y[1500:], "digits28"


@functools.lru_cache(maxsize=None)
def mnist_sized_model(kind: str = "mlp", objective: str = "ce", steps: int = 300,
                      device: str = "cpu"):
    """A briefly trained CE or RCE model on MNIST-sized data, as an eval-mode Classifier.

    kind: "mlp" (784-256-10, CPU default) or a rce_fast.models name ("resnet8",
    "resnet32", ...)."""
    x_tr, y_tr, _, _, _ = mnist_sized_data()
    torch.manual_seed(0)
    net = MLP(784, 256) if kind == "mlp" else build_model(kind, in_channels=1)
    net = net.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loss_fn = rce_fast.RCELoss() if objective == "rce" else torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x_tr), (128,), generator=g)
        loss = loss_fn(net(x_tr[idx].to(device)), y_tr[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Classifier(net, objective).eval()


def mnist_sized_mlp(objective: str = "ce"):
    return mnist_sized_model("mlp", objective)
