"""Optimizers by name with the reference sheet's defaults (Zhang et al. 2021, "Networks and training")."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._checks import check_choice, check_positive

__all__ = ["OPTIMIZERS", "make_optimizer"]

# name -> (torch optimizer class, default hyper-parameters from the reference sheet; "gd" = full batch SGD).
# RMSProp and full-batch GD settings were not recovered: framework defaults (lr 0.01, alpha 0.99) are used.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.01}),
    "gd": (torch.optim.SGD, {"lr": 0.01}),
    "momentum": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.01}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01, "alpha": 0.99}),
}


def make_optimizer(name: str | Callable, params, lr: float | None = None, **kwargs) -> torch.optim.Optimizer:
    """An optimizer by name (:data:`OPTIMIZERS`) with the reference defaults, or from a factory callable."""
    if callable(name):
        return name(params)
    check_choice("make_optimizer", "optimizer", name, OPTIMIZERS)
    cls, defaults = OPTIMIZERS[name]
    hp = {**defaults, **kwargs}
    if lr is not None:
        hp["lr"] = check_positive("make_optimizer", "lr", lr)
    return cls(params, **hp)
