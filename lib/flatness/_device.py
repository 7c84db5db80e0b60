"""Device selection: CUDA when present, CPU otherwise."""

from __future__ import annotations

import torch
from torch import nn


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None = None, model: nn.Module | None = None) -> torch.device:
    """The device to compute on: ``device`` if given, else the model's, else :func:`default_device`."""
    if device is not None:
        return torch.device(device)
    if model is not None:
        for p in model.parameters():
            return p.device
    return default_device()
