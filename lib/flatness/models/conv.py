"""Chen et al. 2023's convolutional networks: the small VGG of Figs. 1-2 and LeNet-5 of Fig. 3.

Both follow the authors' code (``chinsengi/sharpdim``, ``src/models/vgg.py`` and ``src/models/fnn.py``):
layers, padding, head and initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_int

__all__ = ["SmallVGG", "LeNet5", "SMALL_VGG_CFG"]

SMALL_VGG_CFG = (16, "M", 16, "M", 32, "M", 64, "M", 64, "M")


class SmallVGG(nn.Module):
    r"""The small VGG-style network of Chen et al. 2023 (Figs. 1-2, called "VGG-11" in the paper).

    As the authors' ``vgg11`` (config ``"A"``): convolutions ``cfg`` = 16, M, 16, M, 32, M, 64, M, 64, M
    (3x3 kernels, **padding 2**, ReLU, no batch-norm; ``"M"`` = 2x2 max-pool, stride 2), then the head
    ``flatten -> Linear(256, 128) -> ReLU -> Linear(128, num_classes)``. With padding 2 each convolution
    grows the map by 2 pixels: 32 -> 34 -> 17 -> 19 -> 9 -> 11 -> 5 -> 7 -> 3 -> 5 -> 2, so the flattened
    features are 64 x 2 x 2 = 256 (28x28 Fashion-MNIST inputs also give 256). 97,018 parameters for 10 classes.

    Initialisation (theirs): conv weights :math:`N(0, 2 / (k^2 C_{out}))` (He et al.'s fan-out rule, 3x3
    kernels: :math:`2/(9 C_{out})`), conv biases zero, ``Linear`` layers PyTorch's default.

    Input ``(N, in_channels, image_size, image_size)``; a grey batch ``(N, H, W)`` gets its channel axis.

    Args:
        num_classes: outputs ``k``.
        cfg: conv widths and ``"M"`` (max-pool) entries.
        hidden: widths of the hidden ``Linear`` layers of the head (theirs: ``(128,)``).
        in_channels: 3 (CIFAR-10) or 1 (Fashion-MNIST).
        image_size: input height = width, used to size the first ``Linear`` layer.
        padding: convolution padding (theirs: 2; 1 gives the usual "same" VGG).
    """

    def __init__(self, num_classes: int = 10, cfg: Sequence = SMALL_VGG_CFG, hidden: Sequence[int] = (128,),
                 in_channels: int = 3, image_size: int = 32, padding: int = 2):
        super().__init__()
        fn = "SmallVGG"
        num_classes = check_int(fn, "num_classes", num_classes, minimum=1)
        in_channels = check_int(fn, "in_channels", in_channels, minimum=1)
        image_size = check_int(fn, "image_size", image_size, minimum=1)
        padding = check_int(fn, "padding", padding, minimum=0)
        hidden = tuple(check_int(fn, f"hidden[{i}]", h, minimum=1) for i, h in enumerate(hidden))
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
            else:
                v = check_int(fn, "cfg entry", v, minimum=1)
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=padding), nn.ReLU()]
                c, size = v, size + 2 * padding - 2
            if size < 1:
                raise ValueError(f"{fn}: image_size={image_size} is too small for cfg={list(cfg)} with "
                                 f"padding={padding} (the feature map vanishes)")
        self.features = nn.Sequential(*layers)
        dims = [c * size * size, *hidden, num_classes]
        head: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            head.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                head.append(nn.ReLU())
        self.classifier = nn.Sequential(*head)
        self.in_channels, self.image_size, self.feature_size = in_channels, image_size, dims[0]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # (N, H, W) grey images, as the authors' forward
            x = x.unsqueeze(1)
        return self.classifier(self.features(x).flatten(1))


class LeNet5(nn.Module):
    r"""LeNet-5 as in Chen et al. 2023 (Fig. 3, CIFAR-10), the authors' ``LeNet5`` class.

    ``conv(3->6, 5x5) -> ReLU -> maxpool 2 -> conv(6->16, 5x5) -> ReLU -> maxpool 2 -> flatten(400)
    -> Linear(400, 120) -> ReLU -> Linear(120, 84) -> ReLU -> Linear(84, num_classes)``, no padding.
    Initialisation (theirs): every weight Xavier-normal, :math:`N(0, 2/(\text{fan-in} + \text{fan-out}))`,
    every bias zero. 62,006 parameters for 10 classes. Input ``(N, 3, 32, 32)``.

    Args:
        num_classes: outputs (the authors' ``output_dim``).
        in_channels: input channels (theirs: 3).
        image_size: input height = width (theirs: 32, giving 16 x 5 x 5 = 400 features).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        fn = "LeNet5"
        num_classes = check_int(fn, "num_classes", num_classes, minimum=1)
        in_channels = check_int(fn, "in_channels", in_channels, minimum=1)
        image_size = check_int(fn, "image_size", image_size, minimum=16)
        size = ((image_size - 4) // 2 - 4) // 2
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * size * size, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        for m in (self.conv1, self.conv2, self.fc1, self.fc2, self.fc3):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)
