"""``build(name, seed=...)``: every network of the suite by name, constructed reproducibly."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
from torch import nn

from ._common import check_seed
from .conv import LeNet5, SmallVGG
from .mlp import FCN, FNN
from .resnet import resnet50_cifar, resnet_cifar

__all__ = ["build", "MODELS", "available_models"]

TIMM_PREFIX = "timm:"


def _vgg11(num_classes: int = 10, **kw) -> nn.Module:
    from torchvision.models import vgg11

    if kw.pop("weights", None) is not None or kw.pop("pretrained", False):
        raise ValueError("build: 'vgg11' never loads pretrained weights (weights/pretrained must be unset)")
    return vgg11(weights=None, num_classes=num_classes, **kw)


def _fcn(widths=(784, 40, 40, 1), *, seed: int, **kw) -> nn.Module:
    return FCN(widths, seed=seed, **kw)


# name -> (constructor, one-line description); constructors that draw their own seed take ``seed``.
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "fcn": (_fcn, "FCN, Zhang et al.'s prior-initialised ReLU MLP (widths=(784, 40, 40, 1), sigma_w, sigma_b)"),
    "fnn": (FNN, "FNN 784-500-500-500-10 of Chen et al. (widths, activation='relu'|'tanh', layer_norm)"),
    "lenet5": (LeNet5, "LeNet-5 of Chen et al., 3x32x32 inputs (num_classes=10)"),
    "small_vgg": (SmallVGG, "Chen et al.'s small VGG, 97,018 parameters (num_classes=10, in_channels, image_size)"),
    "vgg11": (_vgg11, "torchvision VGG-11, random init, no pretrained weights (num_classes=10)"),
    "resnet50_cifar": (resnet50_cifar, "ResNet-50 with a CIFAR stem, Zhang et al. Fig. 3c (num_classes=1, sigma_b)"),
    "resnet8": (lambda **kw: resnet_cifar(depth=8, **kw), "CIFAR ResNet-8, basic blocks, width 16 (num_classes=1)"),
    "resnet20": (lambda **kw: resnet_cifar(depth=20, **kw), "CIFAR ResNet-20, basic blocks, width 16 (num_classes=1)"),
    "resnet_small": (lambda depth=8, width=8, **kw: resnet_cifar(depth=depth, width=width, **kw),
                     "CIFAR ResNet-8 of width 8 (19,657 parameters), the fast CPU profile net (depth, width, "
                     "num_classes=1, sigma_b)"),
}
_SEEDED = {"fcn"}

#: Names accepted by :func:`build` (plus ``"timm:<model name>"``).
MODELS: tuple[str, ...] = tuple(_REGISTRY)


def available_models() -> dict[str, str]:
    """Each name :func:`build` accepts with a one-line description (``"timm:<name>"`` stands for any timm model)."""
    out = {k: d for k, (_, d) in _REGISTRY.items()}
    out[TIMM_PREFIX + "<name>"] = ("any timm model, e.g. 'timm:vit_tiny_patch16_224' with img_size=32, "
                                   "patch_size=4, num_classes=2; pretrained=False unless asked")
    return out


def _timm(name: str, **kw) -> nn.Module:
    try:
        import timm
    except ImportError as err:  # pragma: no cover - timm is a dependency
        raise ImportError(f"build: {TIMM_PREFIX}{name} needs the timm package (pip install timm)") from err
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(f"build: unknown timm model {name!r}" + (f"; close names: {close}" if close else "")
                         + "; see timm.list_models()")
    kw.setdefault("pretrained", False)
    return timm.create_model(name, **kw)


def build(name: str, *, seed: int, **kw) -> nn.Module:
    """Construct a network of the suite by name, reproducibly.

    The construction runs inside :func:`torch.random.fork_rng` with the CPU generator seeded by ``seed``,
    so the same ``(name, seed, kw)`` gives identical parameters and the caller's global RNG is left as it
    was. ``build("fcn", seed=s, widths=w)`` equals ``FCN(w, seed=s)``.

    Names (:data:`MODELS`, :func:`available_models`): ``fcn`` (:class:`FCN`), ``fnn`` (:class:`FNN`),
    ``lenet5`` (:class:`LeNet5`), ``small_vgg`` (:class:`SmallVGG`), ``vgg11`` (torchvision, random init),
    ``resnet50_cifar``, ``resnet8`` / ``resnet20`` / ``resnet_small`` (:class:`CifarResNet`), and
    ``"timm:<model name>"`` for any timm model (``timm.create_model(name, pretrained=False, **kw)``; pass
    ``pretrained=True`` yourself to download weights), e.g.
    ``build("timm:vit_tiny_patch16_224", seed=0, img_size=32, patch_size=4, num_classes=2)``.

    Args:
        name: a name of :data:`MODELS` or ``"timm:<model name>"``.
        seed: integer seed of the initialisation.
        **kw: keyword arguments of the model's constructor (e.g. ``num_classes``, ``widths``).
    Returns:
        The model, on the CPU, in training mode.
    Raises:
        ValueError: unknown name (the message lists the allowed names).
        TypeError: a non-integer seed, or keyword arguments the constructor does not take (or of the wrong type).
    """
    if not isinstance(name, str):
        raise TypeError(f"build: name={name!r} must be a string; allowed values are {list(MODELS)} or 'timm:<name>'")
    seed = check_seed("build", seed)
    if name.startswith(TIMM_PREFIX):
        ctor, kwargs = (lambda **k: _timm(name[len(TIMM_PREFIX):], **k)), dict(kw)
    elif name in _REGISTRY:
        ctor, kwargs = _REGISTRY[name][0], dict(kw)
        if name in _SEEDED:
            kwargs["seed"] = seed
    else:
        raise ValueError(f"build: unknown name={name!r}; allowed values are {list(MODELS)} "
                         f"or '{TIMM_PREFIX}<timm model name>'")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        try:
            return ctor(**kwargs)
        except TypeError as err:
            raise TypeError(f"build: constructing {name!r} with keyword arguments {sorted(kw)} failed: {err}") from err
