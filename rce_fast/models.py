"""Models of the paper and the classifier wrapper every attack and detector takes.

ResNet-6n+2 (He et al. 2016, pre-activation) as in Pang et al. 2018: three stages of n
units with 16/32/64 filters (after a 16-filter stem), strides 1/2/2, leaky ReLU 0.1,
batch norm with PyTorch momentum 0.1 / eps 1e-3 (TF decay 0.9), option-A shortcuts
(average pool + zero-padded channels), a final BN + activation, global average pool to
64-d features, and a linear layer. ResNet-32 is n = 5, ResNet-56 n = 9.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .loss import decision_logits

_BN = dict(momentum=0.1, eps=1e-3)
_SLOPE = 0.1


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, **_BN)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, **_BN)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.stride, self.pad = stride, c_out - c_in

    def shortcut(self, x: Tensor) -> Tensor:
        """Option A: average-pool to the new resolution, zero-pad the new channels."""
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride)
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.bn1(x), _SLOPE)
        out = self.conv1(out)
        out = self.conv2(F.leaky_relu(self.bn2(out), _SLOPE))
        return out + self.shortcut(x)


class ResNet(nn.Module):
    """Pre-activation ResNet-(6n+2); ``forward`` gives raw logits Z.

    Args:
        n: units per stage (5: ResNet-32, 9: ResNet-56).
        in_channels: 1 (MNIST) or 3 (CIFAR-10).
        num_classes: L.
        widths: filters of the three stages (the paper: 16, 32, 64).
    """

    def __init__(self, n: int = 5, in_channels: int = 1, num_classes: int = 10,
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.depth = 6 * n + 2
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, c_in = [], widths[0]
        for stage, width in enumerate(widths):
            for unit in range(n):
                blocks.append(PreActBlock(c_in, width, 2 if (stage > 0 and unit == 0) else 1))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in, **_BN)
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=_SLOPE, mode="fan_out",
                                        nonlinearity="leaky_relu")

    def forward_features(self, x: Tensor) -> Tensor:
        """The last hidden layer: (B, 64) after the final BN + activation + average pool."""
        out = self.blocks(self.stem(x))
        out = F.leaky_relu(self.bn(out), _SLOPE)
        return out.mean((2, 3))

    def head(self, features: Tensor) -> Tensor:
        return self.fc(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))

    # -- per-layer activations (for the LID and Mahalanobis detectors)
    @property
    def layer_names(self) -> tuple[str, ...]:
        """Names accepted by :meth:`features_at`, in forward order: "stem" (the first
        convolution), "block1" ... "blockK" (each residual unit's output, K = 3n),
        "features" (the 64-d last hidden layer) and "logits" (raw Z)."""
        return (("stem",) + tuple(f"block{i + 1}" for i in range(len(self.blocks)))
                + ("features", "logits"))

    @property
    def stage_layers(self) -> tuple[str, ...]:
        """The stem, the end of the first two stages and the last hidden layer: the layers
        Lee et al. (2018) read for their Mahalanobis layer ensemble on ResNets."""
        n = len(self.blocks) // 3
        return ("stem", f"block{n}", f"block{2 * n}", "features")

    def features_at(self, x: Tensor, layers) -> list[Tensor]:
        """Activations at the named ``layers`` (see :attr:`layer_names`) from ONE forward
        pass that stops after the deepest layer asked for. Returns a list in the order
        of ``layers``: (B, C, H, W) for "stem"/"blockK", (B, 64) for "features",
        (B, L) for "logits"; each differentiable w.r.t. ``x``."""
        names = self.layer_names
        position = {name: i for i, name in enumerate(names)}
        layers = list(layers)
        for name in layers:
            if name not in position:
                raise ValueError(f"unknown layer {name!r}; this network has {list(names)}")
        if not layers:
            return []
        last = max(position[name] for name in layers)
        wanted, out = set(layers), {}
        h = self.stem(x)
        if "stem" in wanted:
            out["stem"] = h
        for i, block in enumerate(self.blocks, start=1):
            if i > last:
                break
            h = block(h)
            if f"block{i}" in wanted:
                out[f"block{i}"] = h
        if last >= position["features"]:
            feats = F.leaky_relu(self.bn(h), _SLOPE).mean((2, 3))
            out["features"] = feats
            if "logits" in wanted:
                out["logits"] = self.head(feats)
        return [out[name] for name in layers]


def resnet32(in_channels: int = 1, num_classes: int = 10) -> ResNet:
    return ResNet(5, in_channels, num_classes)


def resnet56(in_channels: int = 1, num_classes: int = 10) -> ResNet:
    return ResNet(9, in_channels, num_classes)


def resnet_small(in_channels: int = 1, num_classes: int = 10) -> ResNet:
    """ResNet-8 (n = 1) with the paper's widths: fast enough to train on a CPU."""
    return ResNet(1, in_channels, num_classes)


MODELS = {"resnet32": resnet32, "resnet56": resnet56, "resnet8": resnet_small}


def build_model(name: str, in_channels: int, num_classes: int = 10) -> ResNet:
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](in_channels, num_classes)


class Classifier(nn.Module):
    """A trained network plus the objective it was trained with: the one object attacks
    and detectors take, keeping the sign convention in one place.

    ``forward(x)`` returns DECISION logits (Z for "ce", -Z for "rce"), so
    ``argmax`` is the prediction and softmax gives the model's probabilities;
    ``features(x)`` the last hidden layer; ``logits_and_features(x)`` both in one pass;
    ``raw_logits(x)`` the network's Z. The network needs ``forward_features`` and
    ``head`` (every model here has them).
    """

    def __init__(self, net: nn.Module, objective: str) -> None:
        super().__init__()
        if objective not in ("ce", "rce"):
            raise ValueError(f"objective must be 'ce' or 'rce', got {objective!r}")
        for attr in ("forward_features", "head"):
            if not callable(getattr(net, attr, None)):
                raise TypeError(f"net must define {attr}(...); got {type(net).__name__}")
        self.net, self.objective = net, objective

    def raw_logits(self, x: Tensor) -> Tensor:
        return self.net(x)

    def features(self, x: Tensor) -> Tensor:
        return self.net.forward_features(x)

    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.net.forward_features(x)
        return decision_logits(self.net.head(feats), self.objective), feats

    def forward(self, x: Tensor) -> Tensor:
        return decision_logits(self.net(x), self.objective)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Layers :meth:`features_at` accepts: the network's own ``layer_names`` when it
        has ``features_at``, else only "features" and "logits"."""
        names = getattr(self.net, "layer_names", None)
        if names is not None and callable(getattr(self.net, "features_at", None)):
            return tuple(names)
        return ("features", "logits")

    @property
    def stage_layers(self) -> tuple[str, ...]:
        """The network's ``stage_layers`` (Mahalanobis' default ensemble), else
        ("features",)."""
        return tuple(getattr(self.net, "stage_layers", ("features",)))

    def features_at(self, x: Tensor, layers) -> list[Tensor]:
        """Activations at the named ``layers`` in one forward pass (see
        :meth:`ResNet.features_at`); "logits" are the DECISION logits (Z for CE, -Z for
        RCE), like ``forward``. Networks without ``features_at`` offer "features" and
        "logits" only."""
        layers = list(layers)
        if callable(getattr(self.net, "features_at", None)):
            outs = self.net.features_at(x, layers)
        else:
            for name in layers:
                if name not in ("features", "logits"):
                    raise ValueError(f"unknown layer {name!r}: {type(self.net).__name__} has "
                                     "no features_at, so only 'features' and 'logits' exist")
            feats = self.net.forward_features(x)
            raw = self.net.head(feats) if "logits" in layers else None
            outs = [feats if name == "features" else raw for name in layers]
        return [decision_logits(o, self.objective) if name == "logits" else o
                for name, o in zip(layers, outs)]

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 1024) -> Tensor:
        return torch.cat([self(b).argmax(1) for b in x.split(batch_size)])
