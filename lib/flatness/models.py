"""Networks of the two papers, with the initialisations they use.

- :class:`FCN`: ReLU multilayer perceptron, weights :math:`N(0, \\sigma_w^2/\\text{fan-in})`, biases
  :math:`N(0, \\sigma_b^2)` (Zhang et al. 2021, FCN 7-40-40-1 and 784-40-40-1; Chen et al. 784-500-500-500-10).
- :class:`SmallVGG`: the small VGG-style net of Chen et al.'s Figs. 1-2 (reference sheet).
- :func:`resnet50_cifar`: ResNet-50 with a CIFAR 3x3 stem (Zhang et al. Fig. 3c).
- :func:`alpha_rescale`: Dinh et al.'s function-preserving alpha-scaling (Zhang et al. Appendix F).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from ._checks import check_int, check_positive

__all__ = ["FCN", "SmallVGG", "resnet50_cifar", "alpha_rescale", "parametrized_layers"]


class FCN(nn.Sequential):
    r"""ReLU fully-connected network ``widths[0] -> widths[1] -> ... -> widths[-1]``.

    Inputs of any shape ``(N, ...)`` are flattened to ``(N, widths[0])``. Initialisation:

    .. math:: W_l \sim N(0, \sigma_w^2 / d_{l-1}), \qquad b_l \sim N(0, \sigma_b^2)

    the prior of Zhang et al. 2021 (Appendix D, :math:`\sigma_w=\sqrt2, \sigma_b=1`), whose NNGP
    limit is the arc-cosine kernel in :mod:`flatness.prior`.

    Args:
        widths: layer widths including input and output, e.g. ``(7, 40, 40, 1)``.
        sigma_w: weight scale :math:`\sigma_w`.
        sigma_b: bias scale :math:`\sigma_b` (0 gives zero biases).
        seed: seed of a private generator for the initialisation (``None``: the global RNG).
    """

    def __init__(self, widths: Sequence[int] = (784, 40, 40, 1), sigma_w: float = math.sqrt(2.0),
                 sigma_b: float = 1.0, seed: int | None = None):
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ValueError(f"FCN: widths={widths} needs at least an input and an output width")
        for i, w in enumerate(widths):
            check_int("FCN", f"widths[{i}]", w, minimum=1)
        check_positive("FCN", "sigma_w", sigma_w)
        check_positive("FCN", "sigma_b", sigma_b, allow_zero=True)
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.widths, self.sigma_w, self.sigma_b = widths, float(sigma_w), float(sigma_b)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int | None = None) -> None:
        """Re-draw all parameters from the prior (a private generator when ``seed`` is given)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for layer in self.linear_layers():
                w = torch.randn(layer.weight.shape, generator=gen) * (self.sigma_w / math.sqrt(layer.in_features))
                b = torch.randn(layer.bias.shape, generator=gen) * self.sigma_b
                layer.weight.copy_(w)
                layer.bias.copy_(b)

    def linear_layers(self) -> list[nn.Linear]:
        return [m for m in self if isinstance(m, nn.Linear)]

    def extra_repr(self) -> str:
        return f"widths={self.widths}, sigma_w={self.sigma_w:.4g}, sigma_b={self.sigma_b:.4g}"


class SmallVGG(nn.Module):
    """The small VGG-style network of Chen et al. 2023 (Figs. 1-2, "VGG-11" in the paper).

    Convolutions ``cfg`` (3x3, padding 1, ReLU, no batch-norm; ``"M"`` = 2x2 max-pool), then a head
    ``flatten -> hidden[0] -> hidden[1] -> num_classes`` with ReLU, default PyTorch initialisation.
    Input ``(N, 3, 32, 32)``.
    """

    def __init__(self, num_classes: int = 10, cfg: Sequence = (16, "M", 16, "M", 32, "M", 64, "M", 64, "M"),
                 hidden: Sequence[int] = (256, 128), in_channels: int = 3, image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)
        dims = [c * size * size, *hidden, num_classes]
        head: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            head.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                head.append(nn.ReLU())
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet50_cifar(num_classes: int = 1, sigma_b: float = 1.0) -> nn.Module:
    """torchvision ResNet-50 with a CIFAR stem (3x3 conv, stride 1, no max-pool), final width 2048.

    Initialisation as Zhang et al.'s code: Kaiming-normal conv/linear weights, biases :math:`N(0, \\sigma_b^2)`.
    """
    from torchvision.models import resnet50

    net = resnet50(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.normal_(m.bias, std=sigma_b)
    return net


def parametrized_layers(model: nn.Module) -> list[nn.Module]:
    """The model's ``nn.Linear`` and ``nn.Conv*`` layers in forward (registration) order."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def alpha_rescale(model: nn.Module, layer: int, alpha: float) -> nn.Module:
    r"""Dinh et al.'s alpha-scaling: a rescaled copy that computes the same function.

    .. math:: (W_l, b_l, W_{l+1}) \mapsto (\alpha W_l, \alpha b_l, W_{l+1} / \alpha)

    (Zhang et al. 2021, Appendix F, eq. 9). Valid when layer ``l`` is followed by a positively
    homogeneous activation (ReLU) and then layer ``l+1``, as in :class:`FCN`. Flatness measures change;
    the function, and hence its prior :math:`P(f)`, do not.

    Args:
        model: network whose Linear/Conv layers (in order, see :func:`parametrized_layers`) are scaled.
        layer: index ``l`` of the layer to multiply (0-based among Linear/Conv layers; not the last one).
        alpha: positive scale.
    Returns:
        A deep copy of ``model``; the input is unchanged.
    """
    check_positive("alpha_rescale", "alpha", alpha)
    layers = parametrized_layers(model)
    check_int("alpha_rescale", "layer", layer, minimum=0, maximum=len(layers) - 2)
    out = copy.deepcopy(model)
    new_layers = parametrized_layers(out)
    with torch.no_grad():
        new_layers[layer].weight.mul_(alpha)
        if new_layers[layer].bias is not None:
            new_layers[layer].bias.mul_(alpha)
        new_layers[layer + 1].weight.div_(alpha)
    return out
