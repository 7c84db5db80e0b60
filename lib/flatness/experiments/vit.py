"""Notebook 07: vision transformers, adaptive sharpness vs normalised MLS (Chen et al. 2023, Fig. 4).

Chen et al. measure 181 pretrained timm models whose names contain ``vit`` on 100 ImageNet training images:
average-case adaptive sharpness (Andriushchenko et al. 2023) against the normalised maximum local
sensitivity, coloured by family (the first ``_``-separated part of the timm name, as their ``plot_vit.py``).
The same pipeline runs two zoos:

* **Online** (``paper``; network and ImageNet needed): every timm model matching :data:`ONLINE_PATTERN` with
  pretrained weights, input <= 384 px and 1000 classes (:func:`online_model_names`), 100 images drawn from
  ``imagenet_dir/train/<wnid>/*.JPEG``, each model's own preprocessing (``timm.data.resolve_data_config`` +
  ``create_transform``). A model that fails to load or run is a row with ``status="failed"`` and the reason.
* **Offline** (``smoke``/``cpu``; no network): 36 small vision transformers of four families built with timm
  at 32 px (:data:`ARCHS`: ViT, LeViT, FastViT, MobileViT; two sizes each), trained from scratch on the
  bundled CIFAR-10 airplane vs automobile with varied learning rate, augmentation and epochs
  (:data:`RECIPES`), weights saved as artifacts (:func:`flatness.runs.trained`).

Per model (:class:`MetricConfig`; reference sheet ``chen2023_flatness_compression.md``):

.. math::
    S_{\\text{avg}} = \\frac{1}{\\rho^2} E_{\\delta_p \\sim N(0, \\rho^2 w_p^2)}[L(w + \\delta) - L(w)],\\quad
    L = \\frac1n \\sum_i \\lVert \\sigma(f(x_i)) - e_{y_i} \\rVert^2 \\quad (\\rho = 0.1)

:func:`flatness.sharpness.adaptive_sharpness` (50 noise draws, up to 200 until the standard error is at most
5% of the mean); the worst case by APGD in the adaptive :math:`\\ell_\\infty` box (``rho_worst = 0.001``,
m-sharpness with batches of 128, 20 steps: Andriushchenko et al.'s ViT setting, ``tml-epfl/
sharpness-vs-generalization`` README); the adversarial MLS estimate :math:`r_i` of
:func:`flatness.compression.adversarial_mls` (``variant="authors"``: 30 Adam steps, lr 0.1, sigmoid
outputs), reported squared, and the normalised MLS :math:`\\frac1n\\sum_i r_i^2 \\lVert x_i\\rVert^2`
(:func:`~flatness.compression.normalized_mls`); where the Jacobian is affordable (``k d`` small: every
offline model) the exact :math:`\\sigma_{\\max}(\\partial \\sigma(f)/\\partial x)` from
:func:`flatness.compression.local_metrics`, squared and normalised the same way, to show the estimator's gap.

Coverage: both sharpness measures perturb every trainable parameter (attention projections, biases,
norms, LeViT's attention biases) and use the eval-mode network (BatchNorm running statistics). Both MLS
values are input-output quantities of the whole network: reverse-mode autograd (the exact one, ``k``
backward passes) or plain forward/backward passes (the estimator), so fused attention (which has no
forward-mode rule) is never an obstacle. LeViT-style modules cache their attention biases in eval mode;
:func:`uncache_attention_biases` turns that cache off so that parameter perturbations reach them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice
from ..results import ResultStore
from ..runs import RunConfig, param, run_sweep, trained, with_overrides

__all__ = ["ARCHS", "RECIPES", "PROFILES", "STORE_NAME", "ROW_COLUMNS", "ONLINE_PATTERN", "MetricConfig",
           "VitTrainConfig", "OfflineRunConfig", "OnlineRunConfig", "configs", "online_configs",
           "online_model_names", "imagenet_images", "cifar_pair", "build_arch", "trained_model",
           "uncache_attention_biases", "sigmoid_sum_mse", "run", "run_all", "family_correlations",
           "claim_positive_overall", "claim_within_families", "figure_fig4", "figure_estimator", "FAMILY_COLORS"]

STORE_NAME = "07_vit"  #: ``ResultStore(STORE_NAME, results/<profile>)``
ONLINE_PATTERN = "*vit*"  #: the authors' ``timm.list_models(f"*{args.model}*", pretrained=True)`` with ``vit``
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)

#: The offline zoo's architectures: label -> (family, timm model, constructor kwargs, MobileViT width).
#: All construct and run at 32 px with ``num_classes=2`` (checked in the tests). Tried and left out:
#: ``tiny_vit_5m_224`` (its constructor takes no ``img_size``), PiT, EfficientViT and GC ViT (construct, but
#: 3-10x the cost of these at equal size on the CPU), DeiT (the ViT class itself, not in the ``*vit*`` filter).
ARCHS: dict[str, tuple[str, str, dict, float | None]] = {
    "vit_d32": ("vit", "vit_tiny_patch16_224",
                dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0), None),
    "vit_d48": ("vit", "vit_tiny_patch16_224",
                dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0), None),
    "levit_s": ("levit", "levit_128s",
                dict(img_size=32, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4), depth=(1, 1, 1)), None),
    "levit_m": ("levit", "levit_128s",
                dict(img_size=32, embed_dim=(64, 96, 128), key_dim=16, num_heads=(2, 3, 4), depth=(1, 2, 2)), None),
    "fastvit_s": ("fastvit", "fastvit_t8", dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64)), None),
    "fastvit_m": ("fastvit", "fastvit_t8", dict(layers=(1, 1, 2, 1), embed_dims=(16, 32, 64, 128)), None),
    # MobileViT has no size kwargs: timm's mobilevit_xxs ByoModelCfg with width_factor and transformer dims
    # scaled by the width (multiples of 8) and transformer depth capped at 1 (w25) or 2 (w50).
    "mobilevit_w25": ("mobilevit", "mobilevit_xxs", dict(transformer_depth=1), 0.25),
    "mobilevit_w50": ("mobilevit", "mobilevit_xxs", dict(transformer_depth=2), 0.5),
}

#: Training recipes per profile: (arch labels, [(lr, augment, epochs), ...]); every arch gets every recipe
#: of its group, so sharpness and MLS vary within each family.
_SMALL = ("vit_d32", "levit_s", "fastvit_s", "mobilevit_w25")
_MEDIUM = ("vit_d48", "levit_m", "fastvit_m", "mobilevit_w50")
RECIPES: dict[str, list[tuple[tuple[str, ...], list[tuple[float, str, int]]]]] = {
    "smoke": [(_SMALL, [(1e-3, "crop", 1)])],
    "cpu": [(_SMALL, [(1e-3, "none", 4), (2e-3, "crop", 4), (3e-4, "none", 8), (1e-3, "flip", 6),
                      (2e-3, "none", 4)]),
            (_MEDIUM, [(1e-3, "none", 4), (2e-3, "crop", 4), (1e-3, "flip", 6), (2e-3, "none", 4)])],
    "paper": [(_SMALL + _MEDIUM, [(1e-3, "none", 20), (2e-3, "crop", 20), (3e-4, "none", 40), (1e-3, "crop", 40),
                                  (1e-3, "flip", 30), (2e-3, "none", 20)])],
}

#: Sizes per profile (fields of :class:`VitTrainConfig` / :class:`MetricConfig`; the rest keep defaults).
PROFILES: dict[str, dict] = {
    "smoke": dict(n_train=64, n_test=100, n_inputs=8, n_draws=2, max_draws=4, worst_n=16, worst_m=16,
                  worst_steps=2, mls_steps=3),
    "cpu": dict(n_train=1000, n_test=1000, n_inputs=64, max_draws=100, worst_n=128, worst_steps=10),
    "paper": dict(n_train=4000, n_test=1000, n_inputs=100, worst_n=1024, source="full"),
}


# ----------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class MetricConfig(RunConfig):
    """How one trained or pretrained model is measured (reference sheet; defaults = the paper's settings)."""

    VERSION: ClassVar[int] = 1

    n_inputs: int = param(100, min=1)  # images of the MLS and average-case sharpness (paper: 100)
    rho: float = param(0.1, positive=True)  # average case: delta_p ~ N(0, rho^2 w_p^2) (paper: 0.1)
    n_draws: int = param(50, min=2)  # noise draws, then more until the SE is small (paper: 50 ...)
    max_draws: int = param(200, min=2)  # (... up to 200)
    rel_tol: float = param(0.05, positive=True)  # stop when SE <= rel_tol * estimate
    worst: bool = param(True)  # also the worst case (APGD)
    worst_norm: str = param("linf", choices=("linf", "l2"))  # Andriushchenko et al.'s ViT runs: adaptive l-inf
    worst_rho: float = param(1e-3, positive=True)  # their ViT/CIFAR example: rho 0.001
    worst_n: int = param(1024, min=1)  # training points of the worst case (theirs: 1024)
    worst_m: int = param(128, min=1)  # m-sharpness batch (theirs: 128)
    worst_steps: int = param(20, min=1)  # APGD iterations (theirs: 20)
    mls_steps: int = param(30, min=1)  # adversarial MLS: Adam steps (paper: 30)
    mls_lr: float = param(0.1, positive=True)  # Adam lr (paper: 0.1)
    mls_init_std: float = param(0.1, positive=True)  # delta_0 ~ N(0, 0.1^2 I) (paper)
    mls_variant: str = param("authors", choices=("authors", "ratio"))  # the authors' estimator, or the max met
    exact_max_jacobian: int = param(5_000_000, min=0)  # exact MLS when k * d <= this (0: never)
    chunk_size: int | None = param(None, min=1)  # inputs per MLS pass (memory)
    seed: int = param(0, min=0)

    def validate(self) -> None:
        super().validate()
        if self.max_draws < self.n_draws:
            raise ValueError(f"MetricConfig: max_draws={self.max_draws} must be >= n_draws={self.n_draws}")


@dataclass(frozen=True)
class VitTrainConfig(RunConfig):
    """One offline-zoo model trained on bundled CIFAR-10 airplane vs automobile (weights: an artifact)."""

    VERSION: ClassVar[int] = 1

    arch: str = param("vit_d32", choices=tuple(ARCHS))
    lr: float = param(1e-3, positive=True)  # Adam, constant
    augment: str = param("none", choices=("none", "flip", "crop"))  # crop = 4-px reflect-pad crop + flip
    epochs: int = param(4, min=1)
    batch_size: int = param(64, min=1)
    optimizer: str = param("adam")  # a name of flatness.train.list_optimizers()
    weight_decay: float = param(0.0, min=0.0)
    n_train: int = param(1000, min=2)  # balanced: n_train / 2 per class
    n_test: int = param(1000, min=2)
    source: str = param("embedded", choices=("embedded", "full", "auto"))
    seed: int = param(0, min=0)

    def validate(self) -> None:
        super().validate()
        from ..train.optim import list_optimizers

        check_choice("VitTrainConfig", "optimizer", self.optimizer, list_optimizers())

    @property
    def run_seed(self) -> int:
        """Seed of the initialisation, batch order and augmentation: a hash of the recipe and ``seed``."""
        h = hashlib.sha256(f"{self.seed}/{self.arch}/{self.lr}/{self.augment}/{self.epochs}".encode()).digest()
        return int.from_bytes(h[:6], "little")

    @property
    def label(self) -> str:
        return f"{self.arch}-lr{self.lr:g}-{self.augment}-e{self.epochs}"


@dataclass(frozen=True)
class OfflineRunConfig(RunConfig):
    """One measured offline-zoo model: its training config and the measurement settings."""

    VERSION: ClassVar[int] = 1

    train: VitTrainConfig = param(default_factory=VitTrainConfig)
    metrics: MetricConfig = param(default_factory=MetricConfig)


@dataclass(frozen=True)
class OnlineRunConfig(RunConfig):
    """One pretrained timm model measured on ImageNet training images (the paper's zoo)."""

    VERSION: ClassVar[int] = 1

    model: str = param("vit_small_patch16_224.augreg_in21k_ft_in1k")  # a timm name (with its pretrained tag)
    imagenet_dir: str = param("")  # the folder holding train/<wnid>/*.JPEG
    n_images: int = param(100, min=1)  # images drawn (paper: 100)
    image_seed: int = param(0, min=0)  # which images
    pretrained: bool = param(True)  # False: random weights (tests)
    model_kwargs: tuple = param(())  # extra create_model kwargs as (name, value) pairs (tests)
    device: str | None = param(None)  # None: the default device ($FLATNESS_DEVICE, else CUDA when available)
    metrics: MetricConfig = param(default_factory=MetricConfig)


_TRAIN_FIELDS = {f.name for f in dataclasses.fields(VitTrainConfig)}
_METRIC_FIELDS = {f.name for f in dataclasses.fields(MetricConfig)}


def _routed(where: str, values: dict, allow_train: bool = True) -> dict:
    out = {}
    for k, v in values.items():
        if k == "seed" and allow_train:  # one seed for the study: initialisation, batches and metric noise
            out["train.seed"] = out["metrics.seed"] = v
        elif k in _METRIC_FIELDS:
            out[f"metrics.{k}"] = v
        elif allow_train and k in _TRAIN_FIELDS and k not in ("arch", "lr", "augment", "epochs"):
            out[f"train.{k}"] = v
        else:
            valid = sorted(_METRIC_FIELDS | ((_TRAIN_FIELDS - {"arch", "lr", "augment", "epochs"})
                                             if allow_train else set()))
            raise ValueError(f"{where}: unknown field {k!r} (arch, lr, augment and epochs come from the "
                             f"recipes: pass recipes=); valid fields are {valid}")
    return out


def configs(profile: str, *, recipes=None, archs=None, **overrides) -> list[OfflineRunConfig]:
    """The offline zoo of a profile: one :class:`OfflineRunConfig` per (architecture, recipe).

    Args:
        profile: ``"smoke"``, ``"cpu"`` or ``"paper"``.
        recipes: replaces the profile's :data:`RECIPES` (a list of ``(arch labels, [(lr, augment, epochs)])``).
        archs: keep only these architecture labels (of :data:`ARCHS`).
        **overrides: fields of :class:`VitTrainConfig` (not arch/lr/augment/epochs) or :class:`MetricConfig`
            for every run, e.g. ``n_train=500`` or ``n_draws=100``; ``None`` values are ignored.

    Raises:
        ValueError: an unknown profile, architecture or field, or a value its checks reject.
    """
    fn = "configs"
    check_choice(fn, "profile", profile, tuple(RECIPES))
    spec = RECIPES[profile] if recipes is None else recipes
    if archs is not None:
        archs = [archs] if isinstance(archs, str) else list(archs)
        for a in archs:
            check_choice(fn, "archs", a, tuple(ARCHS))
    base = with_overrides(OfflineRunConfig(), **_routed(fn, PROFILES[profile]))
    base = with_overrides(base, **_routed(fn, {k: v for k, v in overrides.items() if v is not None}))
    out = []
    for labels, recs in spec:
        for a in labels:
            check_choice(fn, "archs", a, tuple(ARCHS))
            if archs is not None and a not in archs:
                continue
            for lr, aug, ep in recs:
                out.append(with_overrides(base, **{"train.arch": a, "train.lr": lr, "train.augment": aug,
                                                   "train.epochs": ep}))
    return out


def online_model_names(pattern: str = ONLINE_PATTERN, max_input_size: int = 384,
                       num_classes: int = 1000) -> list[str]:
    """timm models with pretrained weights matching ``pattern`` (input <= ``max_input_size`` px, 1000 classes).

    Reads timm's local registry only (no network): ``timm.list_models(pattern, pretrained=True)`` (names with
    their weight tag, as the authors'), then each tag's pretrained config.
    """
    import timm

    out = []
    for name in timm.list_models(pattern, pretrained=True):
        try:
            pc = timm.models.get_pretrained_cfg(name)
        except Exception:  # noqa: BLE001  (a tag without a config: keep it, run() records any failure)
            pc = None
        if pc is not None:
            size = max(tuple(getattr(pc, "input_size", (3, 0, 0)))[-2:])
            if size > max_input_size or getattr(pc, "num_classes", num_classes) != num_classes:
                continue
        out.append(name)
    return out


def online_configs(profile: str, imagenet_dir, names=None, *, pattern: str = ONLINE_PATTERN,
                   pretrained: bool = True, model_kwargs: dict | None = None, **overrides) -> list[OnlineRunConfig]:
    """The online zoo: one :class:`OnlineRunConfig` per timm model (``names``, default :func:`online_model_names`).

    Raises:
        ValueError: ``imagenet_dir`` is not a folder with a ``train/`` subfolder, an unknown profile or field.
    """
    fn = "online_configs"
    check_choice(fn, "profile", profile, tuple(PROFILES))
    root = Path(str(imagenet_dir)) if imagenet_dir else None
    if root is None or not (root / "train").is_dir():
        raise ValueError(f"{fn}: imagenet_dir={imagenet_dir!r} must be a folder holding train/<wnid>/*.JPEG "
                         "(the standard ImageNet layout)")
    names = online_model_names(pattern) if names is None else ([names] if isinstance(names, str) else list(names))
    prof = {k: v for k, v in PROFILES[profile].items() if k in _METRIC_FIELDS}
    base = OnlineRunConfig(imagenet_dir=str(root.resolve()), pretrained=pretrained,
                           model_kwargs=tuple(sorted((model_kwargs or {}).items())))
    n_images = overrides.pop("n_images", None)
    if n_images is not None:
        base = with_overrides(base, n_images=n_images)
    base = with_overrides(base, **_routed(fn, prof, allow_train=False))
    base = with_overrides(base, **_routed(fn, {k: v for k, v in overrides.items() if v is not None},
                                          allow_train=False))
    return [dataclasses.replace(base, model=n) for n in names]


# ------------------------------------------------------------------------------------------------ models
def uncache_attention_biases(model: nn.Module) -> nn.Module:
    """Turn off the eval-mode attention-bias cache of LeViT-style timm modules (in place; returns ``model``).

    ``timm``'s LeViT, EfficientViT (MSRA), EfficientFormer and TinyViT attention blocks cache
    ``attention_biases[:, attention_bias_idxs]`` on their first eval-mode call; a functional call with
    perturbed parameters (adaptive sharpness) would then reuse the unperturbed biases (or keep a perturbed
    one). Each such module gets an instance method that indexes the current parameter instead.
    """
    def _biases(self, device=None):
        return self.attention_biases[:, self.attention_bias_idxs]

    for mod in model.modules():
        if hasattr(mod, "attention_bias_cache") and hasattr(mod, "attention_biases") \
                and hasattr(mod, "attention_bias_idxs"):
            mod.attention_bias_cache = {}
            mod.get_attention_biases = types.MethodType(_biases, mod)
    return model


def _mobilevit(base: str, width: float, transformer_depth: int, num_classes: int) -> nn.Module:
    from timm.models.byobnet import ByobNet
    from timm.models.mobilevit import model_cfgs

    def scale(b):
        if isinstance(b, tuple):
            return tuple(scale(x) for x in b)
        if b.type == "mobilevit":
            kw = dict(b.block_kwargs)
            kw["transformer_dim"] = max(16, int(round(kw["transformer_dim"] * width / 8)) * 8)
            kw["transformer_depth"] = min(kw["transformer_depth"], transformer_depth)
            return dataclasses.replace(b, block_kwargs=kw)
        return b

    cfg = model_cfgs[base]
    return ByobNet(dataclasses.replace(cfg, blocks=scale(cfg.blocks), width_factor=width), num_classes=num_classes)


def build_arch(arch: str, seed: int, num_classes: int = 2) -> nn.Module:
    """An offline-zoo architecture of :data:`ARCHS`, initialised from ``seed`` (timm, ``pretrained=False``)."""
    check_choice("build_arch", "arch", arch, tuple(ARCHS))
    family, name, kw, width = ARCHS[arch]
    if width is None:
        from ..models import build

        model = build(f"timm:{name}", seed=seed, num_classes=num_classes, **kw)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            model = _mobilevit(name, width, kw["transformer_depth"], num_classes)
    return uncache_attention_biases(model)


# -------------------------------------------------------------------------------------------------- data
def sigmoid_sum_mse(logits: Tensor, y: Tensor) -> Tensor:
    """Chen et al.'s Fig. 4 loss: squared error of sigmoid outputs against one-hot targets, summed over the
    k outputs, averaged over examples (their ``MSELoss(reduction="sum")`` on batches of one image)."""
    target = F.one_hot(y.long(), logits.shape[-1]).to(logits.dtype)
    return (torch.sigmoid(logits) - target).pow(2).sum(-1).mean()


def cifar_pair(split: str, n: int, source: str = "embedded", seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` balanced airplane (0) vs automobile (1) images of ``split`` (seeded), normalised with the CIFAR-10 mean
    and std: the offline zoo's data, ``(n, 3, 32, 32)`` and labels ``(n,)``."""
    from ..data import load_dataset

    d = load_dataset("cifar10", split, source=source)
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in (0, 1):
        cls = torch.nonzero(d.labels == c).flatten()
        if len(cls) < n // 2:
            raise ValueError(f"vit: n_{split}={n} needs {n // 2} images of class {c}; {source} cifar10/{split} "
                             f"holds {len(cls)}")
        idx.append(cls[torch.randperm(len(cls), generator=g)[: n // 2]])
    idx = torch.stack(idx, 1).flatten()  # interleaved classes: any prefix is balanced
    x = d.images[idx].permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(_CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(_CIFAR_STD).view(1, 3, 1, 1)
    return x.contiguous(), d.labels[idx].long()


def _augment(x: Tensor, kind: str, gen: torch.Generator) -> Tensor:
    if kind == "none":
        return x
    n = len(x)
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1).to(x.device), x.flip(-1), x)
    if kind == "crop":
        pad = F.pad(x, (4, 4, 4, 4), mode="reflect")
        dx, dy = torch.randint(0, 9, (2, n), generator=gen).tolist()
        x = torch.stack([pad[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
    return x


def imagenet_images(imagenet_dir, n: int, seed: int = 0) -> tuple[list[Path], Tensor]:
    """``n`` image files drawn from ``imagenet_dir/train/<wnid>/*.JPEG`` and their ImageNet-1k class indices.

    Class indices follow timm's ImageNet-1k order (``timm.data.ImageNetInfo().label_names()``, the sorted
    wnids). Raises ``ValueError`` for a missing ``train/`` folder, no images, or a folder that is not a wnid.
    """
    from timm.data import ImageNetInfo

    fn = "imagenet_images"
    train = Path(str(imagenet_dir)) / "train"
    if not train.is_dir():
        raise ValueError(f"{fn}: imagenet_dir={str(imagenet_dir)!r} has no train/ folder (expected "
                         "train/<wnid>/*.JPEG)")
    index = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    files = sorted(p for p in train.glob("*/*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not files:
        raise ValueError(f"{fn}: no images under {train}/<wnid>/ (expected *.JPEG files)")
    bad = sorted({p.parent.name for p in files if p.parent.name not in index})
    if bad:
        raise ValueError(f"{fn}: folder(s) {bad[:5]} under {train} are not ImageNet-1k wnids (e.g. n01440764)")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(files), size=min(n, len(files)), replace=False).tolist())
    chosen = [files[i] for i in pick]
    return chosen, torch.tensor([index[p.parent.name] for p in chosen], dtype=torch.long)


# ----------------------------------------------------------------------------------------------- training
def _train_one(t: VitTrainConfig) -> dict:
    """Train one offline-zoo model: Adam (constant lr), cross-entropy, fixed epochs, optional augmentation.

    A non-finite loss or parameters end the run with ``status="diverged"``. The artifact holds the weights,
    the status, the last epoch's mean training loss and the training time.
    """
    from .._device import resolve_device
    from ..train.optim import make_optimizer

    t0 = time.perf_counter()
    device = resolve_device(None)
    model = build_arch(t.arch, seed=t.run_seed).to(device)
    x, y = cifar_pair("train", t.n_train, t.source, seed=0)
    x, y = x.to(device), y.to(device)
    opt = make_optimizer(t.optimizer, model.parameters(), lr=t.lr,
                         **({"weight_decay": t.weight_decay} if t.weight_decay else {}))
    gen = torch.Generator().manual_seed(t.run_seed)
    status, last = "trained", math.nan
    model.train()
    for _ in range(t.epochs):
        perm = torch.randperm(len(x), generator=gen).to(device)
        tot = 0.0
        for i in range(0, len(x), t.batch_size):
            b = perm[i:i + t.batch_size]
            xb = _augment(x[b], t.augment, gen)
            loss = F.cross_entropy(model(xb), y[b])
            if not torch.isfinite(loss):
                status = "diverged"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(b)
        if status == "diverged" or not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            status = "diverged"
            break
        last = tot / len(x)
    model.eval()
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "status": status,
            "train_loss": last, "train_seconds": time.perf_counter() - t0}


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


# ------------------------------------------------------------------------------------------ measurement
#: The columns every row carries (the store adds ``config`` and ``key``).
ROW_COLUMNS = ("model", "family", "zoo", "arch", "params", "lr", "augment", "epochs", "status", "reason",
               "train_loss", "train_accuracy", "test_accuracy", "adaptive_sharpness", "adaptive_sharpness_se",
               "adaptive_sharpness_draws", "adaptive_sharpness_worst", "mls", "nmls", "mls_exact", "nmls_exact",
               "mls_to_exact", "input_norm_sq", "n_inputs", "train_seconds", "metric_seconds")


def _metrics(model: nn.Module, x: Tensor, y: Tensor, xw: Tensor, yw: Tensor, m: MetricConfig) -> dict:
    """Sharpness (average, worst), MLS (estimator and exact) of one eval-mode model on ``x`` (``xw`` worst)."""
    from ..compression import adversarial_mls, local_metrics, normalized_mls
    from ..sharpness import adaptive_sharpness

    t0 = time.perf_counter()
    row: dict = {}
    avg = adaptive_sharpness(model, sigmoid_sum_mse, (x, y), rho=m.rho, kind="average", norm="l2",
                             n_draws=m.n_draws, max_draws=m.max_draws, rel_tol=m.rel_tol, seed=m.seed)
    row.update(adaptive_sharpness=avg.value, adaptive_sharpness_se=avg.std_err, adaptive_sharpness_draws=avg.n_draws)
    if m.worst:
        row["adaptive_sharpness_worst"] = adaptive_sharpness(
            model, sigmoid_sum_mse, (xw, yw), rho=m.worst_rho, kind="worst", norm=m.worst_norm, m=m.worst_m,
            n_steps=m.worst_steps, seed=m.seed).value
    r = adversarial_mls(model, x, n_steps=m.mls_steps, lr=m.mls_lr, init_std=m.mls_init_std, output="sigmoid",
                        seed=m.seed, variant=m.mls_variant, chunk_size=m.chunk_size).detach().double().cpu()
    xc = x.detach().double().cpu()
    row.update(mls=float(r.pow(2).mean()), nmls=float(normalized_mls(r, xc).mean()),
               input_norm_sq=float(xc.flatten(1).pow(2).sum(1).mean()), n_inputs=len(x))
    with torch.no_grad():
        k = int(model(x[:1]).shape[-1])
    if k * x[0].numel() <= m.exact_max_jacobian:
        s = local_metrics(model, x, output="sigmoid", chunk_size=m.chunk_size)["mls"].detach().double().cpu()
        row.update(mls_exact=float(s.pow(2).mean()), nmls_exact=float(normalized_mls(s, xc).mean()),
                   mls_to_exact=float((r / s).median()))
    row["metric_seconds"] = time.perf_counter() - t0
    return row


def _blank(**kw) -> dict:
    row = {c: math.nan for c in ROW_COLUMNS}
    row.update(reason="", **kw)
    return row


def _run_offline(cfg: OfflineRunConfig, store: ResultStore | None) -> dict:
    from .._device import resolve_device

    t, m = cfg.train, cfg.metrics
    art = trained(store, t, _train_one) if store is not None else _train_one(t)
    family = ARCHS[t.arch][0]
    row = _blank(model=t.label, family=family, zoo="offline", arch=t.arch, lr=t.lr, augment=t.augment,
                 epochs=t.epochs, status=art["status"], train_loss=art["train_loss"],
                 train_seconds=art["train_seconds"])
    device = resolve_device(None)
    model = build_arch(t.arch, seed=t.run_seed)
    model.load_state_dict(art["state_dict"])
    model = model.to(device).eval()
    row["params"] = sum(p.numel() for p in model.parameters())
    if art["status"] != "trained":
        row["reason"] = "training diverged (non-finite loss or weights)"
        return row
    xtr, ytr = cifar_pair("train", t.n_train, t.source, seed=0)
    xte, yte = cifar_pair("test", t.n_test, t.source, seed=0)
    row["train_accuracy"] = _accuracy(model, xtr.to(device), ytr.to(device))
    row["test_accuracy"] = _accuracy(model, xte.to(device), yte.to(device))
    n = min(m.n_inputs, len(xtr))
    nw = min(m.worst_n, len(xtr))
    row.update(_metrics(model, xtr[:n].to(device), ytr[:n].to(device), xtr[:nw].to(device), ytr[:nw].to(device), m))
    return row


def _run_online(cfg: OnlineRunConfig) -> dict:
    """One pretrained model; any failure (download, construction, preprocessing, a metric) -> ``"failed"``."""
    from PIL import Image

    from .._device import resolve_device

    row = _blank(model=cfg.model, family=cfg.model.split("_")[0].split(".")[0], zoo="online", arch=cfg.model,
                 status="failed")
    stage = "load"
    try:
        import timm

        t0 = time.perf_counter()
        device = resolve_device(cfg.device)
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, **dict(cfg.model_kwargs))
        model = uncache_attention_biases(model).to(device).eval()
        for p in model.parameters():
            p.requires_grad_(True)
        row["params"] = sum(p.numel() for p in model.parameters())
        stage = "preprocess"
        data_cfg = timm.data.resolve_data_config(model=model)
        transform = timm.data.create_transform(**data_cfg)
        files, y = imagenet_images(cfg.imagenet_dir, cfg.n_images, cfg.image_seed)
        x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files]).to(device)
        y = y.to(device)
        row["train_seconds"] = time.perf_counter() - t0
        stage = "measure"
        row["train_accuracy"] = _accuracy(model, x, y, batch=25)
        m = cfg.metrics
        row.update(_metrics(model, x[:m.n_inputs], y[:m.n_inputs], x[:m.worst_n], y[:m.worst_n], m))
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001  (the paper drops models that fail; so do we, with the reason)
        row["reason"] = f"{stage}: {type(exc).__name__}: {exc}"[:500]
    return row


def trained_model(cfg: OfflineRunConfig | VitTrainConfig, store: ResultStore | None = None) -> nn.Module:
    """The trained offline-zoo model of ``cfg`` in eval mode (from ``store``'s artifacts; trained if absent)."""
    t = cfg.train if isinstance(cfg, OfflineRunConfig) else cfg
    art = trained(store, t, _train_one) if store is not None else _train_one(t)
    model = build_arch(t.arch, seed=t.run_seed)
    model.load_state_dict(art["state_dict"])
    return model.eval()


def run(cfg: OfflineRunConfig | OnlineRunConfig, store: ResultStore | None = None) -> list[dict]:
    """One model: train (or load its artifact) and measure (offline), or load and measure (online); one row.

    Offline rows have ``status`` ``"ok"`` or ``"diverged"``; online rows ``"ok"`` or ``"failed"`` (with the
    reason in ``reason``), never an exception.
    """
    if isinstance(cfg, OfflineRunConfig):
        row = _run_offline(cfg, store)
        if row["status"] == "trained":
            row["status"] = "ok"
        return [row]
    if isinstance(cfg, OnlineRunConfig):
        return [_run_online(cfg)]
    raise TypeError(f"run: cfg must be an OfflineRunConfig or OnlineRunConfig, got {type(cfg).__name__}")


def run_all(cfgs: list, store: ResultStore, *, executor=None, progress: bool = True) -> pd.DataFrame:
    """Every model of ``cfgs`` on :func:`flatness.runs.run_sweep` (resumable; only missing rows are computed)."""
    from functools import partial

    return run_sweep(partial(run, store=store), cfgs, store, executor=executor, progress=progress)


# ------------------------------------------------------------------------------------- statistics, claims
def family_correlations(df: pd.DataFrame, x: str = "nmls", y: str = "adaptive_sharpness", min_n: int = 3,
                        n_boot: int = 2000) -> pd.DataFrame:
    """Spearman(x, y) with bootstrap 95% CIs over all ``status == "ok"`` rows (``family="all"``) and per family.

    Families with fewer than ``min_n`` finite pairs get NaN. Columns: ``family, n, r, ci_low, ci_high, p_value``.
    """
    from ..stats import correlation

    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    rows = []
    for fam, sub in [("all", ok), *sorted(ok.groupby("family"), key=lambda kv: kv[0])]:
        keep = np.isfinite(sub[x].to_numpy(float)) & np.isfinite(sub[y].to_numpy(float))
        if keep.sum() < min_n:
            rows.append({"family": fam, "n": int(keep.sum()), "r": math.nan, "ci_low": math.nan,
                         "ci_high": math.nan, "p_value": math.nan})
            continue
        c = correlation(sub[x], sub[y], "spearman", n_boot=n_boot)
        rows.append({"family": fam, "n": c.n, "r": c.r, "ci_low": c.ci_low, "ci_high": c.ci_high,
                     "p_value": c.p_value})
    return pd.DataFrame(rows)


def claim_positive_overall(corr: pd.DataFrame) -> dict:
    """The overall claim: Spearman > 0 with the 95% CI above 0 (row ``family == "all"`` of
    :func:`family_correlations`). Returns ``value, ci, n, holds``."""
    r = corr[corr["family"] == "all"].iloc[0]
    holds = bool(np.isfinite(r.r) and r.r > 0 and r.ci_low > 0)
    return {"value": float(r.r), "ci": (float(r.ci_low), float(r.ci_high)), "n": int(r.n), "holds": holds}


def claim_within_families(corr: pd.DataFrame) -> dict:
    """Within most families: the fraction of families (with a finite Spearman) whose Spearman is > 0.

    Returns ``value`` (the fraction), ``n`` (families), ``positive``/``breaking`` (family names, with the
    breaking ones those whose r <= 0) and ``holds`` (fraction > 1/2).
    """
    fam = corr[(corr["family"] != "all") & np.isfinite(corr["r"])]
    pos = fam.loc[fam["r"] > 0, "family"].tolist()
    brk = fam.loc[fam["r"] <= 0, "family"].tolist()
    frac = len(pos) / len(fam) if len(fam) else math.nan
    return {"value": frac, "n": len(fam), "positive": pos, "breaking": brk,
            "holds": bool(len(fam) > 0 and frac > 0.5)}


# ----------------------------------------------------------------------------------------------- figures
#: Fixed colours of the families (others get the remaining tab20 colours in name order).
FAMILY_COLORS = {"vit": "tab:blue", "levit": "tab:orange", "fastvit": "tab:green", "mobilevit": "tab:red",
                 "mobilevitv2": "tab:pink", "deit": "tab:purple"}


def _colors(families) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    out, j = {}, 0
    for f in sorted(set(families)):
        if f in FAMILY_COLORS:
            out[f] = FAMILY_COLORS[f]
        else:
            out[f] = cmap(j % 20)
            j += 1
    return out


def _fmt(r) -> str:
    return "n/a" if not np.isfinite(r.r) else f"{r.r:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"


def figure_fig4(df: pd.DataFrame, x: str = "nmls", y: str = "adaptive_sharpness", title: str = "",
                corr: pd.DataFrame | None = None):
    """Fig. 4: adaptive sharpness vs normalised MLS coloured by family (log-log), and the Spearman r with
    95% CIs overall and per family (a forest plot). Returns the figure."""
    import matplotlib.pyplot as plt

    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    corr = family_correlations(ok, x, y) if corr is None else corr
    colors = _colors(ok["family"])
    fig, (ax, axr) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.5, 1]})
    by = corr.set_index("family")
    for fam, sub in sorted(ok.groupby("family"), key=lambda kv: kv[0]):
        lab = f"{fam} (n={len(sub)}; ρ {_fmt(by.loc[fam])})" if fam in by.index else fam
        ax.scatter(sub[x], sub[y], s=28, alpha=0.85, color=colors[fam], label=lab, edgecolor="none")
    pos = ok[(ok[x] > 0) & (ok[y] > 0)]
    if len(pos):
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set(xlabel=r"normalised MLS  $\frac{1}{n}\sum_i \mathrm{MLS}(x_i)^2 \|x_i\|^2$",
           ylabel=r"adaptive sharpness (average, $\rho$ = 0.1)",
           title=title or "Fig. 4: adaptive sharpness vs normalised MLS")
    ax.text(0.02, 0.98, f"Spearman (all) {_fmt(by.loc['all'])}, n = {int(by.loc['all'].n)}", transform=ax.transAxes,
            va="top", fontsize=8, bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8, "lw": 0})
    ax.legend(fontsize=7, loc="lower right", frameon=True)
    ys = np.arange(len(corr))[::-1]
    for yy, r in zip(ys, corr.itertuples()):
        c = "k" if r.family == "all" else colors.get(r.family, "grey")
        if np.isfinite(r.r):
            axr.errorbar(r.r, yy, xerr=[[r.r - r.ci_low], [r.ci_high - r.r]], fmt="o", color=c, capsize=3)
        else:
            axr.text(0, yy, "n < 3", ha="center", va="center", fontsize=7)
    axr.axvline(0, color="k", lw=0.8)
    axr.set_yticks(ys, [f"{r.family} (n={r.n})" for r in corr.itertuples()])
    axr.set(xlim=(-1.05, 1.05), xlabel="Spearman ρ [95% bootstrap CI]", title="overall and per family")
    fig.tight_layout()
    return fig


def figure_estimator(df: pd.DataFrame, title: str = ""):
    """Left: the adversarial normalised-MLS estimate vs the exact one (identity dashed). Right: worst-case vs
    average-case adaptive sharpness. Coloured by family. Returns the figure."""
    import matplotlib.pyplot as plt

    from ..stats import correlation

    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    colors = _colors(ok["family"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    have = ok[np.isfinite(ok["nmls_exact"].to_numpy(float))] if "nmls_exact" in ok else ok.iloc[:0]
    for fam, sub in have.groupby("family"):
        a1.scatter(sub["nmls_exact"], sub["nmls"], s=24, color=colors[fam], label=fam, alpha=0.85)
    if len(have):
        lo = float(np.nanmin(have[["nmls", "nmls_exact"]].to_numpy())) * 0.8
        hi = float(np.nanmax(have[["nmls", "nmls_exact"]].to_numpy())) * 1.25
        if lo > 0:
            a1.set_xscale("log")
            a1.set_yscale("log")
        a1.plot([lo, hi], [lo, hi], "k--", lw=1)
        med = float(np.nanmedian(have["mls_to_exact"]))
        a1.text(0.02, 0.98, f"median per-input ratio estimate / exact MLS: {med:.3f}", transform=a1.transAxes,
                va="top", fontsize=8)
        a1.legend(fontsize=7, loc="lower right")
    else:
        a1.text(0.5, 0.5, "exact MLS not computed (Jacobian too large)", ha="center", transform=a1.transAxes)
    a1.set(xlabel="normalised MLS, exact (Jacobian SVD)", ylabel="normalised MLS, adversarial estimate",
           title="estimator vs exact MLS")
    w = ok[np.isfinite(ok["adaptive_sharpness_worst"].to_numpy(float))] if "adaptive_sharpness_worst" in ok \
        else ok.iloc[:0]
    for fam, sub in w.groupby("family"):
        a2.scatter(sub["adaptive_sharpness"], sub["adaptive_sharpness_worst"], s=24, color=colors[fam], label=fam)
    if len(w) >= 3:
        c = correlation(w["adaptive_sharpness"], w["adaptive_sharpness_worst"], "spearman")
        a2.text(0.02, 0.98, f"Spearman {c.r:+.2f} [{c.ci_low:+.2f}, {c.ci_high:+.2f}]", transform=a2.transAxes,
                va="top", fontsize=8)
    if len(w) and (w["adaptive_sharpness"] > 0).all() and (w["adaptive_sharpness_worst"] > 0).all():
        a2.set_xscale("log")
        a2.set_yscale("log")
    a2.set(xlabel="adaptive sharpness, average (ρ = 0.1)", ylabel="adaptive sharpness, worst case (APGD)",
           title="worst vs average case")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
