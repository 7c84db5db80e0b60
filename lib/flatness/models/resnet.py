"""Residual networks for CIFAR-size inputs: Zhang et al.'s ResNet-50 and a small ResNet for CPU profiles."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_int, check_positive

__all__ = ["resnet50_cifar", "CifarResNet", "resnet_cifar"]


def _zhang_init(net: nn.Module, sigma_b: float) -> None:
    """Kaiming-normal conv/linear weights (fan-in, ReLU gain), biases :math:`N(0, \\sigma_b^2)` (Zhang et al.'s code)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.normal_(m.bias, std=sigma_b)


def resnet50_cifar(num_classes: int = 1, sigma_b: float = 1.0) -> nn.Module:
    """torchvision ResNet-50 with a CIFAR stem (3x3 conv, stride 1, no max-pool), final width 2048.

    Zhang et al. 2021, Fig. 3c. Initialisation as their code: Kaiming-normal conv/linear weights, biases
    :math:`N(0, \\sigma_b^2)`.
    """
    from torchvision.models import resnet50

    check_int("resnet50_cifar", "num_classes", num_classes, minimum=1)
    check_positive("resnet50_cifar", "sigma_b", sigma_b, allow_zero=True)
    net = resnet50(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    _zhang_init(net, sigma_b)
    return net


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and an identity (or 1x1 conv-BN projection) shortcut, He et al. 2016."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    r"""CIFAR ResNet of He et al. 2016 (Sec. 4.2) with basic blocks: depth :math:`6n + 2`.

    Stem ``conv 3x3 (in_channels -> width), BN, ReLU`` at full resolution, three stages of :math:`n` basic
    blocks with ``width``, ``2 width``, ``4 width`` channels (the 2nd and 3rd start with stride 2 and a
    1x1 projection shortcut), global average pooling and ``Linear(4 width, num_classes)``. Sizes for one
    output: ``depth=8, width=16`` 77,457 parameters; ``depth=20, width=16`` 271,889 (He et al.'s ResNet-20
    uses parameter-free option-A shortcuts, 0.27M); ``depth=8, width=8`` 19,657 (``build("resnet_small")``:
    3.2M multiply-accumulates per 32x32 image, against 12.5M at width 16 and 40.8M for ResNet-20; a forward +
    backward pass on 128 images took 0.40 s on 2 CPU cores at load 2.4).

    Initialisation as :func:`resnet50_cifar` (Zhang et al.): Kaiming-normal conv/linear weights, biases
    :math:`N(0, \sigma_b^2)`; batch-norm scales 1 and shifts 0.

    Args:
        depth: :math:`6n + 2` (8, 14, 20, 32, ...).
        width: channels of the first stage.
        num_classes: outputs (1 for Zhang et al.'s binary tasks).
        sigma_b: std of the bias of the final layer.
        in_channels: input channels.
    """

    def __init__(self, depth: int = 8, width: int = 16, num_classes: int = 1, sigma_b: float = 1.0,
                 in_channels: int = 3):
        super().__init__()
        fn = "CifarResNet"
        depth = check_int(fn, "depth", depth, minimum=8)
        if (depth - 2) % 6:
            raise ValueError(f"{fn}: depth={depth} must be 6n + 2 (8, 14, 20, 32, 44, 56, 110)")
        width = check_int(fn, "width", width, minimum=1)
        num_classes = check_int(fn, "num_classes", num_classes, minimum=1)
        sigma_b = check_positive(fn, "sigma_b", sigma_b, allow_zero=True)
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c = [], width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlock(c, w, stride=2 if (i > 0 and j == 0) else 1))
                c = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c, num_classes)
        self.depth, self.width = depth, width
        _zhang_init(self, sigma_b)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled ``(N, 4 width)`` features fed to the final layer."""
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}"


def resnet_cifar(depth: int = 8, width: int = 16, num_classes: int = 1, sigma_b: float = 1.0,
                 in_channels: int = 3) -> CifarResNet:
    """A :class:`CifarResNet` (``resnet8`` by default: the fast CPU stand-in for :func:`resnet50_cifar`)."""
    return CifarResNet(depth=depth, width=width, num_classes=num_classes, sigma_b=sigma_b, in_channels=in_channels)
