"""Model zoo: the authors' architectures (parameter counts, shapes, init), input checks, in-place
alpha-rescaling and the seeded ``build`` registry."""

import math
import re

import pytest
import torch
from torch import nn

from flatness import models as M
from flatness.models import FCN, FNN, MODELS, LeNet5, SmallVGG, alpha_rescale, available_models, build


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------------------------- architectures

def test_small_vgg_is_the_authors_net(one_thread):
    m = SmallVGG()
    # convs 3-16-16-32-64-64 (3x3, +bias) and the head 256-128-10, counted by hand
    convs = [(3, 16), (16, 16), (16, 32), (32, 64), (64, 64)]
    expected = sum(9 * a * b + b for a, b in convs) + (256 * 128 + 128) + (128 * 10 + 10)
    assert expected == 97_018 and n_params(m) == 97_018
    assert [c.padding for c in m.modules() if isinstance(c, nn.Conv2d)] == [(2, 2)] * 5
    assert [tuple(l.weight.shape) for l in m.modules() if isinstance(l, nn.Linear)] == [(128, 256), (10, 128)]
    assert not any(isinstance(c, nn.BatchNorm2d) for c in m.modules())
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert m.features(torch.rand(1, 3, 32, 32)).shape == (1, 64, 2, 2)  # 32 -> 34 -> 17 -> ... -> 5 -> 2
    # Fashion-MNIST: grey (N, 28, 28) also gives 256 features
    assert SmallVGG(in_channels=1, image_size=28)(torch.rand(2, 28, 28)).shape == (2, 10)
    assert SmallVGG(num_classes=2).classifier[-1].out_features == 2


def test_small_vgg_init_distribution(one_thread):
    torch.manual_seed(0)
    m = SmallVGG()
    for c in (c for c in m.modules() if isinstance(c, nn.Conv2d)):
        target = math.sqrt(2.0 / (9 * c.out_channels))
        assert c.weight.std().item() == pytest.approx(target, rel=0.1), c
        assert c.weight.mean().abs().item() < 0.25 * target  # >= 4 standard errors for 432 weights
        assert torch.count_nonzero(c.bias) == 0
    # head keeps PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std 1/sqrt(3 fan_in)
    fc = m.classifier[0]
    assert fc.weight.abs().max().item() <= 1 / math.sqrt(256)
    assert fc.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 256), rel=0.05)


def test_lenet5_is_the_authors_net(one_thread):
    m = LeNet5()
    expected = (3 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert expected == 62_006 and n_params(m) == 62_006
    assert m(torch.rand(3, 3, 32, 32)).shape == (3, 10)
    assert LeNet5(num_classes=2)(torch.rand(1, 3, 32, 32)).shape == (1, 2)
    big = LeNet5(num_classes=10)
    for name, p in big.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
    w = big.fc1.weight  # Xavier normal: std sqrt(2 / (fan_in + fan_out))
    assert w.std().item() == pytest.approx(math.sqrt(2 / (400 + 120)), rel=0.05)


def test_fnn_is_the_authors_net(one_thread):
    m = FNN()
    expected = (784 * 500 + 500) + 2 * (500 * 500 + 500) + (500 * 10 + 10)
    assert expected == 898_510 and n_params(m) == 898_510
    assert m(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    # the authors' module layout, so their state_dict keys load
    assert [k for k in m.state_dict() if k.endswith("weight")] == [f"net.{i}.weight" for i in (1, 4, 7, 10)]
    t = FNN((12, 7, 3), activation="tanh")
    assert isinstance(t.net[2], nn.Tanh) and n_params(t) == 12 * 7 + 7 + 7 * 3 + 3
    assert n_params(FNN((3072, 500, 500, 500, 10))) == 3072 * 500 + 500 + 2 * 250_500 + 5010
    # PyTorch default init: |W| <= 1/sqrt(fan_in)
    assert m.net[1].weight.abs().max().item() <= 1 / math.sqrt(784)
    with pytest.raises(ValueError, match=r"FNN: unknown activation='gelu'; allowed values are \['relu', 'tanh'\]"):
        FNN(activation="gelu")
    ln = FNN((6, 5, 2), layer_norm=True)
    assert isinstance(ln.net[0], nn.LayerNorm) and n_params(ln) == 6 * 5 + 5 + 5 * 2 + 2


@pytest.mark.parametrize("cls,x,widths", [(FCN, torch.rand(5, 783), (784, 40, 40, 1)),
                                          (FCN, torch.rand(5, 1, 27, 28), (784, 40, 40, 1)),
                                          (FNN, torch.rand(2, 10), (12, 4, 3))])
def test_mlp_wrong_input_width_raises_naming_shapes(cls, x, widths):
    m = cls(widths)
    shape = re.escape(str(tuple(x.shape)))
    with pytest.raises(ValueError, match=rf"{cls.__name__}: input of shape {shape} .* expected shape \(N, {widths[0]}\)"):
        m(x)
    assert m(torch.rand(2, widths[0])).shape == (2, widths[-1])  # the right width still works
    with pytest.raises(ValueError, match=rf"{cls.__name__}: input of shape \({widths[0]},\) has no batch dimension"):
        m(torch.rand(widths[0]))


def test_fcn_input_check_works_under_vmap(one_thread):
    m = FCN((6, 5, 1), seed=0)
    x = torch.rand(4, 6)
    out = torch.func.vmap(lambda xi: m(xi.unsqueeze(0)))(x)
    assert torch.allclose(out.squeeze(1), m(x))


def test_resnets_shapes_counts_and_init(one_thread):
    r8 = M.resnet_cifar(depth=8, width=16)
    assert n_params(r8) == 77_457 and r8(torch.rand(2, 3, 32, 32)).shape == (2, 1)
    r20 = M.resnet_cifar(depth=20, width=16, num_classes=10)
    blocks = [b for b in r20.modules() if type(b).__name__ == "_BasicBlock"]
    assert len(blocks) == 9  # 3 stages x n = 3, depth 6 * 3 + 2
    assert r20.features(torch.rand(1, 3, 32, 32)).shape == (1, 64)
    with pytest.raises(ValueError, match=r"CifarResNet: depth=10 must be 6n \+ 2"):
        M.resnet_cifar(depth=10)
    torch.manual_seed(0)
    r = M.resnet_cifar(depth=8, width=16, sigma_b=0.5)
    conv = r.layer3[0].conv2  # Kaiming normal: std sqrt(2 / fan_in)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)
    m = M.resnet_cifar(depth=8, width=16, num_classes=2000, sigma_b=0.5)
    assert m.fc.bias.std().item() == pytest.approx(0.5, rel=0.1)


def _forward_macs(m: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the conv and linear layers in one forward pass (forward hooks)."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            total[0] += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            total[0] += out.numel() * mod.in_features

    handles = [mod.register_forward_hook(hook) for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        m(x)
    for h in handles:
        h.remove()
    return total[0]


def test_resnet_small_is_fast(one_thread):
    """Counted, not timed (timings depend on the load): 3.2M multiply-accumulates per 32x32 image, i.e.
    about 2.4 GFLOP for a forward + backward pass on 128 images (0.4 s measured on 2 cores at load 2.4),
    a quarter of ResNet-8 at width 16."""
    x = torch.rand(1, 3, 32, 32)
    small, r8 = _forward_macs(build("resnet_small", seed=0), x), _forward_macs(build("resnet8", seed=0), x)
    assert 2.5e6 < small < 3.5e6 and r8 > 3.5 * small, (small, r8)


# ------------------------------------------------------------------------------------------------ alpha_rescale

def test_alpha_rescale_inplace_keeps_parameter_objects(one_thread):
    m = FCN((7, 20, 20, 1), seed=0).double()
    x = torch.rand(16, 7, dtype=torch.float64)
    before = m(x).detach()
    params = list(m.parameters())
    w0 = m[1].weight.detach().clone()
    out = alpha_rescale(m, 0, 3.0, inplace=True)
    assert out is m
    assert all(p is q for p, q in zip(params, m.parameters()))  # the same Parameter objects
    assert torch.allclose(m(x), before, rtol=1e-12, atol=1e-12)  # same function
    assert torch.allclose(m[1].weight, 3.0 * w0)
    m(x).sum().backward()  # gradients reach the parameters an optimizer would hold
    assert all(p.grad is not None for p in params)
    # default unchanged: a copy, the input untouched
    c = alpha_rescale(m, 1, 2.0)
    assert c is not m and torch.allclose(m[1].weight, 3.0 * w0)
    with pytest.raises(TypeError, match="alpha_rescale: inplace='yes'"):
        alpha_rescale(m, 0, 2.0, inplace="yes")


def test_alpha_rescale_small_vgg_preserves_function(one_thread):
    torch.manual_seed(0)
    m = SmallVGG(num_classes=3).double()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    assert torch.allclose(alpha_rescale(m, 2, 4.0)(x), m(x), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ build registry

# (name, kwargs, input shape, output shape): tiny inputs
CASES = {
    "fcn": (dict(widths=(12, 8, 1)), (2, 12), (2, 1)),
    "fnn": (dict(widths=(12, 8, 8, 3)), (2, 1, 3, 4), (2, 3)),
    "lenet5": (dict(num_classes=2), (2, 3, 32, 32), (2, 2)),
    "small_vgg": (dict(num_classes=2), (2, 3, 32, 32), (2, 2)),
    "vgg11": (dict(num_classes=2), (1, 3, 32, 32), (1, 2)),
    "resnet50_cifar": (dict(num_classes=1), (1, 3, 32, 32), (1, 1)),
    "resnet8": (dict(num_classes=2), (2, 3, 32, 32), (2, 2)),
    "resnet20": (dict(num_classes=2), (2, 3, 32, 32), (2, 2)),
    "resnet_small": (dict(), (2, 3, 32, 32), (2, 1)),
}


BIG = ("vgg11", "resnet50_cifar")


def test_big_models_parameter_counts():
    with torch.device("meta"):
        assert n_params(build("vgg11", seed=0, num_classes=10)) == 128_807_306  # torchvision VGG-11, 10 classes
        r = build("resnet50_cifar", seed=0, num_classes=1)
    assert r.fc.in_features == 2048 and r.conv1.kernel_size == (3, 3) and isinstance(r.maxpool, nn.Identity)


def test_cases_cover_every_registered_name():
    assert set(CASES) == set(MODELS)
    assert set(MODELS) < set(available_models()) and "timm:<name>" in available_models()


@pytest.mark.parametrize("name", sorted(CASES))
def test_build_every_name_runs_and_is_seeded(name, one_thread):
    kw, x_shape, y_shape = CASES[name]
    if name in BIG:  # 133M / 24M parameters: shapes on the meta device (no memory, no arithmetic)
        with torch.device("meta"):
            m = build(name, seed=1, **kw)
            assert m.eval()(torch.rand(x_shape)).shape == y_shape
        return
    m = build(name, seed=1, **kw)
    with torch.no_grad():
        assert m.eval()(torch.rand(x_shape)).shape == y_shape
    same, other = build(name, seed=1, **kw), build(name, seed=2, **kw)
    for (k, p), q, r in zip(m.state_dict().items(), same.state_dict().values(), other.state_dict().values()):
        assert torch.equal(p, q), (name, k)
    assert any(not torch.equal(p, r) for p, r in zip(m.parameters(), other.parameters())), name


def test_build_leaves_the_global_rng_alone_and_matches_fcn():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build("small_vgg", seed=5)
    assert torch.equal(torch.rand(3), expected)
    a, b = build("fcn", seed=7, widths=(5, 4, 1)), FCN((5, 4, 1), seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_build_bad_input():
    with pytest.raises(ValueError, match=r"build: unknown name='vgg12'; allowed values are \[.*'small_vgg'.*timm:"):
        build("vgg12", seed=0)
    with pytest.raises(TypeError, match="build: seed='abc' must be an integer"):
        build("fcn", seed="abc")
    with pytest.raises(TypeError, match="build: constructing 'lenet5' .*'depth'"):
        build("lenet5", seed=0, depth=3)
    with pytest.raises(ValueError, match="never loads pretrained"):
        build("vgg11", seed=0, pretrained=True)
    with pytest.raises(ValueError, match="build: unknown timm model 'vit_tiny_patch16_2244'.*vit_tiny_patch16_224"):
        build("timm:vit_tiny_patch16_2244", seed=0)


def test_build_timm_vit_small_input(one_thread):
    pytest.importorskip("timm")
    kw = dict(img_size=32, patch_size=4, num_classes=2, depth=2)
    m = build("timm:vit_tiny_patch16_224", seed=0, **kw)
    assert m.patch_embed.patch_size == (4, 4)
    with torch.no_grad():
        assert m.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 2)
    m2 = build("timm:vit_tiny_patch16_224", seed=0, **kw)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))


@pytest.mark.parametrize("widths, exc, match", [
    (5, TypeError, r"FCN: widths=5 must be a sequence of layer widths"),
    ((784,), ValueError, r"FCN: widths=\(784,\) needs at least an input and an output width"),
    ((784, 0, 1), ValueError, r"FCN: widths\[1\]=0 must be >= 1"),
    ((784, 2.5, 1), TypeError, r"FCN: widths\[1\]=2.5 must be an integer")])
def test_bad_widths_name_the_parameter(widths, exc, match):
    with pytest.raises(exc, match=match):
        FCN(widths)
    with pytest.raises(exc, match=match.replace("FCN", "FNN")):
        FNN(widths)
