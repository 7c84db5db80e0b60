"""Fully-connected networks: Zhang et al.'s prior-initialised :class:`FCN` and Chen et al.'s :class:`FNN`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_choice, check_int, check_positive, check_widths
from ._common import check_seed

__all__ = ["FCN", "FNN"]


def _check_features(fn: str, x: torch.Tensor, expected: int) -> None:
    """One comparison on the shape (works under ``vmap``): ``(N, ...)`` must hold ``expected`` features per row."""
    if x.ndim < 2 or math.prod(x.shape[1:]) != expected:
        got = "no batch dimension" if x.ndim < 2 else f"{math.prod(x.shape[1:])} features per example"
        raise ValueError(f"{fn}: input of shape {tuple(x.shape)} has {got}; expected shape (N, {expected}) or "
                         f"(N, ...) with {expected} features per example (widths[0]={expected})")


class FCN(nn.Sequential):
    r"""ReLU fully-connected network ``widths[0] -> widths[1] -> ... -> widths[-1]``.

    Inputs of any shape ``(N, ...)`` are flattened to ``(N, widths[0])``; any other number of features
    raises a ``ValueError`` naming the expected and the given shape. Initialisation:

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
        widths = check_widths("FCN", widths)
        check_positive("FCN", "sigma_w", sigma_w)
        check_positive("FCN", "sigma_b", sigma_b, allow_zero=True)
        seed = None if seed is None else check_seed("FCN", seed)
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.widths, self.sigma_w, self.sigma_b = widths, float(sigma_w), float(sigma_b)
        self.reset_parameters(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features("FCN", x, self.widths[0])
        return super().forward(x)

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


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class FNN(nn.Module):
    r"""Chen et al. 2023's fully-connected network, FNN 784-500-500-500-10 by default (Fig. 3, Fig. G.5).

    As the authors' ``src/models/fnn.py`` (FashionMNIST branch): ``Linear`` layers with an activation
    between them, PyTorch's default initialisation (:math:`U(-1/\sqrt{d}, 1/\sqrt{d})` for weights and
    biases, :math:`d` = fan-in), inputs ``(N, ...)`` flattened to ``(N, widths[0])``. The module layout is
    theirs too, ``net = [norm, Linear, act, norm, Linear, act, ..., norm, Linear]`` where ``norm`` is an
    ``Identity`` (or a parameter-free ``LayerNorm`` with ``layer_norm=True``), so their ``state_dict`` keys
    (``net.1.weight``, ``net.4.weight``, ...) load unchanged.

    Args:
        widths: layer widths including input and output (``(3072, 500, 500, 500, 10)`` is their CIFAR-10 FNN).
        activation: ``"relu"`` or ``"tanh"``.
        layer_norm: parameter-free ``LayerNorm`` before each ``Linear`` (the authors' ``use_layer_norm``).
    """

    def __init__(self, widths: Sequence[int] = (784, 500, 500, 500, 10), activation: str = "relu",
                 layer_norm: bool = False):
        super().__init__()
        widths = check_widths("FNN", widths)
        check_choice("FNN", "activation", activation, tuple(_ACTIVATIONS))
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            mods.append(nn.LayerNorm(a, elementwise_affine=False) if layer_norm else nn.Identity())
            mods.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                mods.append(_ACTIVATIONS[activation]())
        self.net = nn.Sequential(*mods)
        self.widths, self.activation, self.layer_norm = widths, activation, bool(layer_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features("FNN", x, self.widths[0])
        return self.net(x.reshape(x.shape[0], -1))

    def extra_repr(self) -> str:
        return f"widths={self.widths}, activation={self.activation!r}, layer_norm={self.layer_norm}"
