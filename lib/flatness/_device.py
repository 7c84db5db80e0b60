"""Device selection: ``$FLATNESS_DEVICE`` when set, else CUDA when present, CPU otherwise."""

from __future__ import annotations

import os

import torch
from torch import nn

DEVICE_ENV = "FLATNESS_DEVICE"  #: e.g. ``cpu``, ``cuda``, ``cuda:1``: the device experiments default to


def default_device() -> torch.device:
    """``$FLATNESS_DEVICE`` if set, else ``cuda`` when a GPU is visible, else ``cpu``.

    Raises:
        ValueError: ``$FLATNESS_DEVICE`` is not a device name torch knows, or names CUDA with no GPU visible.
    """
    name = os.environ.get(DEVICE_ENV, "").strip()
    if name:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ValueError(f"default_device: {DEVICE_ENV}={name!r} is not a device name; expected e.g. 'cpu', "
                             "'cuda' or 'cuda:0'") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"default_device: {DEVICE_ENV}={name!r} but no CUDA device is visible; "
                             "unset it or use 'cpu'")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None = None, model: nn.Module | None = None) -> torch.device:
    """The device to compute on: ``device`` if given, else the model's, else :func:`default_device`."""
    if device is not None:
        return torch.device(device)
    if model is not None:
        for p in model.parameters():
            return p.device
    return default_device()
