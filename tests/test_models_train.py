"""Models (shapes, parameter count, sign convention) and training (loss, resume, decay)."""
import pytest
import torch

import rce_fast
from rce_fast.data import load_digits_split
from rce_fast.models import Classifier, ResNet, build_model, resnet32, resnet56
from rce_fast.train import TrainConfig, _param_groups, load_classifier, scaled_schedule, train


def test_resnet_shapes_and_parameter_counts():
    m32 = resnet32(in_channels=1)
    assert m32.depth == 32
    n32 = sum(p.numel() for p in m32.parameters())
    assert 0.45e6 < n32 < 0.47e6  # the paper's ResNet-32: about 0.46M parameters
    assert resnet56().depth == 56
    for channels, size in ((1, 28), (3, 32), (1, 8)):
        net = build_model("resnet8", channels)
        x = torch.randn(2, channels, size, size)
        assert net.forward_features(x).shape == (2, 64)
        assert net(x).shape == (2, 10)
    bn = [m for m in m32.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(b.momentum == 0.1 and b.eps == 1e-3 for b in bn)
    with pytest.raises(ValueError, match="model must be"):
        build_model("vgg", 1)


def test_option_a_shortcut_pads_channels_and_pools():
    block = ResNet(1).blocks[1]  # 16 -> 32 channels, stride 2
    x = torch.randn(1, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (1, 32, 4, 4)
    assert torch.equal(s[:, :8], torch.zeros(1, 8, 4, 4))
    torch.testing.assert_close(s[:, 8:24], torch.nn.functional.avg_pool2d(x, 2))


def test_classifier_sign_convention():
    net = build_model("resnet8", 1).eval()
    x = torch.randn(3, 1, 8, 8)
    z = net(x)
    rce, ce = Classifier(net, "rce"), Classifier(net, "ce")
    assert torch.equal(rce(x), -z) and torch.equal(ce(x), z)
    logits, feats = rce.logits_and_features(x)
    assert torch.equal(logits, -z) and torch.equal(feats, net.forward_features(x))
    assert torch.equal(rce.predict(x), z.argmin(1))
    with pytest.raises(ValueError, match="objective"):
        Classifier(net, "mse")
    with pytest.raises(TypeError, match="forward_features"):
        Classifier(torch.nn.Linear(2, 2), "ce")


def test_weight_decay_only_on_conv_and_fc_weights():
    net = build_model("resnet8", 1)
    decay, no_decay = _param_groups(net, 2e-4)
    ids = {id(p) for p in decay["params"]}
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            assert id(module.weight) in ids
        if isinstance(module, torch.nn.BatchNorm2d):
            assert id(module.weight) not in ids and id(module.bias) not in ids
    assert id(net.fc.bias) not in ids and no_decay["weight_decay"] == 0.0


def test_schedule():
    cfg = TrainConfig(steps=20_000)
    assert [cfg.lr_at(s) for s in (0, 9_999, 10_000, 15_000, 19_999)] == [
        0.1, 0.1, 0.01, 0.001, 0.001]
    assert scaled_schedule("mnist", 2000) == ([1000, 1500], [0.1, 0.01, 0.001])
    assert scaled_schedule("cifar10", 900)[0] == [400, 600, 800]
    with pytest.raises(ValueError, match="lr_values"):
        TrainConfig(lr_boundaries=[1, 2], lr_values=[0.1])


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.mark.parametrize("objective", ["ce", "rce"])
def test_loss_goes_down_and_model_learns(digits, objective):
    x_tr, y_tr, x_te, y_te = digits
    cfg = TrainConfig(objective=objective, model="resnet8", steps=200, lr_boundaries=[150],
                      lr_values=[0.1, 0.01], progress=False)
    model, hist = train(cfg, x_tr, y_tr, "cpu")
    assert hist["loss"][-1] < hist["loss"][0]
    err = (model.predict(x_te) != y_te).float().mean().item()
    assert err < 0.15, f"{objective} test error {err:.3f}"
    assert not model.training


def test_train_bad_inputs(digits):
    x_tr, y_tr, _, _ = digits
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="mse")
    with pytest.raises(ValueError, match="x_train"):
        train(TrainConfig(steps=1, progress=False), x_tr[:, 0], y_tr)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_classifier("nope.pt")
