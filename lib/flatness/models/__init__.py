"""Networks of the two papers, with the initialisations they use.

- :class:`FCN`: ReLU multilayer perceptron, weights :math:`N(0, \\sigma_w^2/\\text{fan-in})`, biases
  :math:`N(0, \\sigma_b^2)` (Zhang et al. 2021, FCN 7-40-40-1 and 784-40-40-1).
- :class:`FNN`: Chen et al. 2023's FNN 784-500-500-500-10 (PyTorch default init, ReLU or tanh).
- :class:`SmallVGG`: Chen et al.'s small VGG of Figs. 1-2 (padding 2, head 256-128-k, 97,018 parameters).
- :class:`LeNet5`: Chen et al.'s LeNet-5 (Xavier-normal weights, zero biases).
- :func:`resnet50_cifar`: ResNet-50 with a CIFAR 3x3 stem (Zhang et al. Fig. 3c); :class:`CifarResNet` /
  :func:`resnet_cifar`: small CIFAR ResNets (ResNet-8, -20) with the same initialisation, for CPU profiles.
- :func:`alpha_rescale`: Dinh et al.'s function-preserving alpha-scaling (Zhang et al. Appendix F).
- :func:`build`: any of them (and torchvision VGG-11, timm ViTs) by name, seeded (:data:`MODELS`).
"""

from .conv import SMALL_VGG_CFG, LeNet5, SmallVGG
from .mlp import FCN, FNN
from .registry import MODELS, available_models, build
from .rescale import alpha_rescale, parametrized_layers
from .resnet import CifarResNet, resnet50_cifar, resnet_cifar

__all__ = [
    "FCN", "FNN", "SmallVGG", "LeNet5", "SMALL_VGG_CFG", "resnet50_cifar", "CifarResNet", "resnet_cifar",
    "alpha_rescale", "parametrized_layers", "build", "MODELS", "available_models",
]
