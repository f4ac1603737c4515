"""Per-layer activations of the models (what LID and Mahalanobis read)."""
import pytest
import torch
import torch.nn.functional as F

from rce_fast.models import Classifier, build_model
from tests.helpers import MLP


def test_resnet_features_at_matches_a_plain_forward():
    net = build_model("resnet8", 1).eval()
    x = torch.randn(4, 1, 8, 8)
    assert net.layer_names == ("stem", "block1", "block2", "block3", "features", "logits")
    assert net.stage_layers == ("stem", "block1", "block2", "features")
    outs = net.features_at(x, net.layer_names)
    h = net.stem(x)
    expected = [h]
    for block in net.blocks:
        h = block(h)
        expected.append(h)
    feats = F.leaky_relu(net.bn(h), 0.1).mean((2, 3))
    expected += [feats, net.fc(feats)]
    for got, want in zip(outs, expected):
        assert torch.equal(got, want)
    assert torch.equal(outs[-2], net.forward_features(x)) and torch.equal(outs[-1], net(x))
    # any order, any subset; one pass
    a, b = net.features_at(x, ["features", "stem"])
    assert torch.equal(a, outs[4]) and torch.equal(b, outs[0])
    assert net.features_at(x, []) == []
    with pytest.raises(ValueError, match="unknown layer 'block9'"):
        net.features_at(x, ["block9"])


def test_resnet32_layer_names():
    net = build_model("resnet32", 3)
    assert len(net.layer_names) == 15 + 3
    assert net.stage_layers == ("stem", "block5", "block10", "features")


def test_features_at_stops_after_the_deepest_layer():
    net = build_model("resnet8", 1).eval()
    calls = []
    net.blocks[2].register_forward_hook(lambda *a: calls.append("block3"))
    net.fc.register_forward_hook(lambda *a: calls.append("fc"))
    net.features_at(torch.randn(2, 1, 8, 8), ["block1"])
    assert calls == []
    net.features_at(torch.randn(2, 1, 8, 8), ["features"])
    assert calls == ["block3"]


def test_classifier_features_at_uses_decision_logits():
    net = build_model("resnet8", 1).eval()
    x = torch.randn(3, 1, 8, 8)
    rce = Classifier(net, "rce")
    logits, stem = rce.features_at(x, ["logits", "stem"])
    assert torch.equal(logits, rce(x)) and torch.equal(logits, -net(x))
    assert torch.equal(stem, net.stem(x))
    assert rce.layer_names == net.layer_names and rce.stage_layers == net.stage_layers
    # a network without features_at offers its features and logits only
    mlp = Classifier(MLP(), "ce").eval()
    x = torch.randn(3, 1, 8, 8)
    f, z = mlp.features_at(x, ["features", "logits"])
    assert torch.equal(f, mlp.features(x)) and torch.equal(z, mlp(x))
    assert mlp.layer_names == ("features", "logits") and mlp.stage_layers == ("features",)
    with pytest.raises(ValueError, match="only 'features' and 'logits'"):
        mlp.features_at(x, ["stem"])


def test_features_at_is_differentiable():
    net = build_model("resnet8", 1).eval()
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    (a,) = net.features_at(x, ["block2"])
    (g,) = torch.autograd.grad(a.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
