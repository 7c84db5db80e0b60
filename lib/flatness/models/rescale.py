"""Dinh et al.'s function-preserving alpha-scaling (Zhang et al. 2021, Appendix F)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .._checks import check_int, check_positive

__all__ = ["alpha_rescale", "parametrized_layers"]


def parametrized_layers(model: nn.Module) -> list[nn.Module]:
    """The model's ``nn.Linear`` and ``nn.Conv*`` layers in forward (registration) order."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def alpha_rescale(model: nn.Module, layer: int, alpha: float, *, inplace: bool = False) -> nn.Module:
    r"""Dinh et al.'s alpha-scaling: a rescaled network that computes the same function.

    .. math:: (W_l, b_l, W_{l+1}) \mapsto (\alpha W_l, \alpha b_l, W_{l+1} / \alpha)

    (Zhang et al. 2021, Appendix F, eq. 9). Valid when layer ``l`` is followed by a positively
    homogeneous activation (ReLU) and then layer ``l+1``, as in :class:`~flatness.models.FCN`. Flatness
    measures change; the function, and hence its prior :math:`P(f)`, do not.

    Args:
        model: network whose Linear/Conv layers (in order, see :func:`parametrized_layers`) are scaled.
        layer: index ``l`` of the layer to multiply (0-based among Linear/Conv layers; not the last one).
        alpha: positive scale.
        inplace: ``False`` (default): scale a deep copy and leave ``model`` unchanged. ``True``: scale
            ``model``'s own parameters in place (the same ``Parameter`` objects, so an optimizer holding
            them keeps training them: Zhang et al.'s rescaling in the middle of training, Fig. 5) and
            return ``model``. Optimizer state (momentum, Adam moments) is not rescaled.
    Returns:
        The rescaled network: a deep copy, or ``model`` itself with ``inplace=True``.
    """
    check_positive("alpha_rescale", "alpha", alpha)
    if not isinstance(inplace, bool):
        raise TypeError(f"alpha_rescale: inplace={inplace!r} must be True or False")
    layers = parametrized_layers(model)
    check_int("alpha_rescale", "layer", layer, minimum=0, maximum=len(layers) - 2)
    out = model if inplace else copy.deepcopy(model)
    new_layers = parametrized_layers(out)
    with torch.no_grad():
        new_layers[layer].weight.mul_(alpha)
        if new_layers[layer].bias is not None:
            new_layers[layer].bias.mul_(alpha)
        new_layers[layer + 1].weight.div_(alpha)
    return out
