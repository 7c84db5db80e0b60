"""flatness: loss flatness, function priors and compressed representations.

A reproducible replication of Zhang et al. 2021 ("Why flatness does and does not correlate with
generalization") and Chen et al. 2023 ("A simple connection from loss flatness to compressed neural
representations").
"""

from ._device import default_device
from .losses import cross_entropy, half_mse, sigmoid_bce, zero_one_error
from .models import FCN, SmallVGG, alpha_rescale, parametrized_layers, resnet50_cifar

__version__ = "0.1.0"

__all__ = [
    # models
    "FCN", "SmallVGG", "resnet50_cifar", "alpha_rescale", "parametrized_layers",
    # losses
    "sigmoid_bce", "half_mse", "cross_entropy", "zero_one_error",
    # utilities
    "default_device",
]
