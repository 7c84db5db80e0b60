r"""Notebook 06: the sharpness bounds, their tightness, and many-model correlations (Chen et al. 2023).

Reproduces **Fig. 3** (MLS vs its sharpness bound, NMLS vs its bound; one column per combination of network
and data set, Pearson :math:`\rho` in the corner), the **full pairwise scatter matrix** of the appendix
("subsec:corr": local dimensionality, sharpness, log volume, MLS, NMLS, generalisation gap, bounds,
relative flatness) and **Fig. G.5** (the tightness chain :math:`A \le B \le C \le D` of eq. (tightness)
tracked over the training of the FNN).

Protocol (the paper's, from the authors' code ``chinsengi/sharpdim`` at 2bcbe24, where it was recovered):

1. **Models.** Three combinations (:data:`COMBOS`): ``fnn`` (FNN 784-500-500-500-10, PyTorch's default
   init) on Fashion-MNIST, ``lenet5`` (LeNet-5, Xavier-normal init) on CIFAR-10, ``small_vgg`` (the authors'
   small VGG, He fan-out init) on 2-class CIFAR-10 (airplane vs automobile). Ten outputs everywhere, one-hot
   targets over 10 classes as the authors' ``to_one_hot`` (also for the 2- and 3-class subsets).
2. **Training.** Plain SGD (no momentum, no weight decay) on the half mean squared error against one-hot
   targets, :math:`L = \frac1{2n}\sum_i \lVert f(x_i) - e_{y_i}\rVert^2` (:func:`mse_loss`; Chen et al.'s
   normalisation, for which :math:`\operatorname{Tr} H` at interpolation is the Gauss-Newton trace). The
   authors' ``torch.nn.MSELoss`` averages over the 10 outputs too, i.e. their loss is :math:`0.2\,L`: their
   learning rate :math:`\eta` equals :math:`0.2\,\eta` here. Each model trains until zero training error
   or ``max_epochs`` (the authors train a fixed 150,000 iterations), so "(near) interpolation"; the final
   training error is a column.
3. **Many models.** ``seeds`` random initialisations (and mini-batch orders) times the (lr, batch)
   ``settings`` of each combination: 20 x 5 = 100 per combination at ``paper``. The initialisation depends on
   (combination, seed) only, so the settings are compared on the same initial networks.
4. **Metrics** at the end of training, averaged over a fixed set of ``n_measure`` training inputs (the
   authors: 20): MLS, NMLS, log volume (all min(k, d) eigenvalues and the authors' top-3), local
   dimensionality, :math:`\sqrt{\operatorname{Tr} H}` (Gauss-Newton, eq. zloss_sharpness), relative
   flatness of the last Linear layer (Petzka et al.; the authors' ``calculateNeuronwiseHessians_fc_layer``),
   train/test loss and accuracy (``gen_gap`` = train minus test accuracy in percent, the authors'
   ``plot_corr``), and every bound (below).
5. **Bounds** (:mod:`flatness.bounds`).

   * MLS chain :math:`A \le B \le C \le D` (Proposition 3.4, eq. tightness) with the rigorous weight factor
     :math:`\omega = \lVert W_1\rVert_2` (``mls_bound_B``, ``mls_bound_C``, ``mls_bound_D``; FNN only: a conv
     first layer has no such bound, a 1x1-conv counterexample is in :mod:`flatness.bounds`) and with the
     authors' factors: ``*_all`` = :math:`\omega = (\sum_l c_l)^{1/2}` over all layers (their ``W_list``,
     plotted in Fig. G.5; rigorous for the FNN), ``*_authors`` = their first-layer factor ``W0`` (the
     FNN's :math:`\lVert W_1\rVert_2`, so equal to the rigorous columns there; for CNNs
     :math:`(\lVert W_1\rVert_F^2 H_{out} W_{out})^{1/2}`, not a proven bound), the quantity their
     ``plot_corr.py`` correlates as "D". ``mls_bound`` (the Fig. 3 bound) is ``mls_bound_D_authors``:
     Proposition 3.4's sharpness bound (rigorous on the FNN, the authors' heuristic on CNNs,
     ``mls_bound_rigorous``).
   * NMLS bound (Proposition 3.8): ``nmls_bound`` (ours: :math:`\lVert W_l\rVert_2^2` for Linear layers,
     the reference's Frobenius term for conv layers, ``nmls_bound_rigorous`` False then) and
     ``nmls_bound_authors`` (their ``get_nmls``, :math:`\epsilon = 10^{-4}`), with every step of our chain.
   * LVR bound (Proposition 3.6) in log form for all eigenvalues (``lvr_bound``) and the top 3
     (``lvr_bound_top3``): FNN only (conv first layer).

On the experiment engine (:mod:`flatness.runs`): one run is one model, a :class:`CorrRunConfig` holding its
:class:`CorrTrainConfig`; :func:`run` trains it (or loads its weights, an artifact keyed by the training
config) and measures it; :func:`run_batch` trains the missing FNNs of each (lr, batch) setting as one stacked
``torch.func`` ensemble (:func:`flatness.train.train_ensemble_to_zero_error`, each member following its single
run's trajectory) and the CNNs one by one. :func:`track_chain` (Fig. G.5) trains one FNN with the chain
measured every few epochs (:class:`ChainTrackConfig`).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from .._checks import check_choice
from .._device import resolve_device
from ..losses import half_mse
from ..results import ResultStore, config_key
from ..runs import RunConfig, param, run_sweep, trained, with_overrides

__all__ = ["CorrTrainConfig", "CorrRunConfig", "ChainTrackConfig", "COMBOS", "PROFILES", "STORE_NAME",
           "ROW_COLUMNS", "PAIR_COLUMNS", "configs", "track_config", "mse_loss", "run", "run_batch", "run_all",
           "track_chain", "run_track", "track_violations", "chain_checks", "chain_ratios", "correlations",
           "CLAIM_PAIRS", "claim_results", "stacking_speedup",
           "figure_fig3", "figure_pairplot", "figure_heatmap", "figure_g5"]

STORE_NAME = "06_correlations"  #: ``ResultStore(STORE_NAME, results/<profile>)``
COMBOS = ("fnn", "lenet5", "small_vgg")
_DATASET = {"fnn": "fashion_mnist", "lenet5": "cifar10", "small_vgg": "cifar10"}
_LABEL = {"fnn": "FNN / Fashion-MNIST", "lenet5": "LeNet-5 / CIFAR-10", "small_vgg": "small VGG / 2-class CIFAR-10"}
_TOL = 1e-6  # relative tolerance of an inequality check (float32 passes, float64 sums)

#: The columns every measured row carries (the store adds ``config``, ``key`` and ``cfg_*``).
ROW_COLUMNS = (
    "combo", "model", "dataset", "lr", "batch_size", "seed", "run_seed", "status", "epochs", "epochs_to_zero",
    "train_error", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "gen_gap", "gen_gap_loss",
    "n_params", "train_seconds",
    "mls", "nmls", "log_volume", "log_volume_top3", "local_dim", "sqrt_trace_h", "trace_h", "relative_flatness",
    "mls_bound_A", "mls_bound_A_fro", "mls_bound_B", "mls_bound_C", "mls_bound_D",
    "mls_bound_B_all", "mls_bound_C_all", "mls_bound_D_all",
    "mls_bound_B_authors", "mls_bound_C_authors", "mls_bound_D_authors", "mls_bound", "mls_bound_rigorous",
    "w1_spectral_norm", "weight_factor_all", "weight_factor_authors", "partial_sharpness",
    "nmls_layerwise", "nmls_cs_layers", "nmls_cs_inputs", "nmls_bound", "nmls_bound_authors",
    "nmls_bound_rigorous",
    "lvr_lhs", "lvr_bound", "lvr_lhs_top3", "lvr_bound_top3", "lvr_chain_ok", "lvr_bound_rigorous",
)

#: Variables of the pairwise matrix (the authors' ``plot_corr.py`` set, plus bound C) and their labels.
PAIR_COLUMNS = {"local_dim": "local dim", "sqrt_trace_h": r"$\sqrt{\mathrm{Tr}\,H}$", "log_volume_top3": "log volume",
                "mls": "MLS", "nmls": "NMLS", "gen_gap": "gen gap (%)", "mls_bound_C_authors": "C",
                "mls_bound": "MLS bound (D)", "nmls_bound": "NMLS bound", "relative_flatness": "rel. flatness"}


# ------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class CorrTrainConfig(RunConfig):
    """One model of one combination, trained with plain SGD on MSE (its weights are an artifact keyed by this)."""

    VERSION: ClassVar[int] = 1
    BATCH_FIELDS: ClassVar[tuple[str, ...]] = ("seed",)

    combo: str = param("fnn", choices=COMBOS)  # fnn / Fashion-MNIST, lenet5 / CIFAR-10, small_vgg / 2-class CIFAR
    classes: tuple[int, ...] = param((), min=0, max=9)  # classes used (relabelled 0..C-1); () = all 10
    hidden: tuple[int, ...] = param((500, 500, 500), min=1)  # FNN hidden widths (Chen et al.: 500, 500, 500)
    vgg_widths: tuple[int, ...] = param((16, 16, 32, 64, 64), min=1)  # small VGG convs, each then a 2x2 max-pool
    vgg_hidden: tuple[int, ...] = param((128,), min=1)  # small VGG head (theirs: 256-128-10)
    num_outputs: int = param(10, min=2)  # outputs, one-hot over 10 as the authors' to_one_hot
    n_train: int = param(3000, min=1)  # training images (a seeded subset of the split; the same for every model)
    n_test: int = param(1000, min=1)  # test images
    source: str = param("embedded", choices=("embedded", "full", "auto"))  # bundled subsets at smoke/cpu
    lr: float = param(0.1, positive=True)  # SGD lr on the half-MSE (= 5x the authors' MSELoss lr)
    batch_size: int = param(32, min=1)
    max_epochs: int = param(30, min=1)  # stop at zero training error or here (the authors: 150k iterations)
    seed: int = param(0, min=0)

    def validate(self) -> None:
        super().validate()
        if len(set(self.classes)) != len(self.classes) or len(self.classes) == 1:
            raise ValueError(f"CorrTrainConfig: classes={self.classes} must be () (all 10) or at least two "
                             "distinct class indices")
        if self.classes and self.num_outputs < len(self.classes):
            raise ValueError(f"CorrTrainConfig: num_outputs={self.num_outputs} is smaller than the "
                             f"{len(self.classes)} classes {self.classes}")

    @property
    def dataset(self) -> str:
        return _DATASET[self.combo]

    @property
    def run_seed(self) -> int:
        """Initialisation and mini-batch seed: a hash of (combination, seed) only, shared by all settings."""
        h = hashlib.sha256(f"06/{self.combo}/{self.seed}".encode()).digest()
        return int.from_bytes(h[:6], "little")


@dataclass(frozen=True)
class CorrRunConfig(RunConfig):
    """One measured model: its training config plus the measurement settings."""

    VERSION: ClassVar[int] = 1
    BATCH_FIELDS: ClassVar[tuple[str, ...]] = ("train",)

    train: CorrTrainConfig = param(default_factory=CorrTrainConfig)
    n_measure: int = param(50, min=3)  # training inputs the metrics and bounds average over (the authors: 20)
    top_k: int = param(3, min=1)  # eigenvalues of the plotted log volume (the authors: 3)


@dataclass(frozen=True)
class ChainTrackConfig(RunConfig):
    """Fig. G.5: one FNN trained for ``epochs`` epochs, the MLS chain measured every ``every`` epochs."""

    VERSION: ClassVar[int] = 1

    train: CorrTrainConfig = param(default_factory=CorrTrainConfig)  # its max_epochs is ignored
    epochs: int = param(30, min=1)  # trained on past zero error (the authors: 150 x 5000 iterations)
    every: int = param(2, min=1)  # epochs between chain measurements (epoch 0 included)
    n_measure: int = param(50, min=3)


# ------------------------------------------------------------------------------------------ profiles
_SETTINGS_PAPER = ((0.01, 20), (0.02, 20), (0.04, 20), (0.02, 8), (0.02, 32))  # authors' Figs. 1-2 design x 0.2
_SETTINGS_CPU = ((0.1, 32), (0.2, 32), (0.3, 32), (0.2, 16), (0.2, 64))
# LeNet-5 at cpu: with _SETTINGS_CPU (lr >= 0.2) 10 of 20 LeNet-5s died within 25 epochs (constant outputs, every
# ReLU of a layer off, an infinite NMLS bound; first cpu run, 2026-12-01), which the paper's protocol (trained to
# near interpolation) excludes; so its lr are halved and it trains longer.
_SETTINGS_CPU_LENET = ((0.05, 32), (0.1, 32), (0.15, 32), (0.1, 16), (0.1, 64))
#: Combination -> profile -> fields (``settings`` = the (lr, batch) pairs, ``seeds`` = models per setting).
_COMBO_SPECS: dict[str, dict[str, dict]] = {
    "fnn": {
        "paper": dict(n_train=60_000, n_test=10_000, source="full", max_epochs=20, n_measure=100, seeds=20,
                      settings=_SETTINGS_PAPER),
        "cpu": dict(n_train=500, n_test=1000, max_epochs=30, n_measure=50, seeds=8, settings=_SETTINGS_CPU),
        "smoke": dict(hidden=(32, 32, 32), n_train=64, n_test=64, max_epochs=2, n_measure=8, seeds=3,
                      settings=((0.1, 32),)),
    },
    "lenet5": {
        "paper": dict(n_train=50_000, n_test=10_000, source="full", max_epochs=20, n_measure=100, seeds=20,
                      settings=_SETTINGS_PAPER),
        "cpu": dict(classes=(0, 1, 3), n_train=450, n_test=600, max_epochs=80, n_measure=50, seeds=4,
                    settings=_SETTINGS_CPU_LENET),
        "smoke": dict(classes=(0, 1, 3), n_train=48, n_test=48, max_epochs=2, n_measure=6, seeds=3,
                      settings=((0.1, 16),)),
    },
    "small_vgg": {
        "paper": dict(classes=(0, 1), n_train=10_000, n_test=2000, source="full", max_epochs=20, n_measure=100,
                      seeds=20, settings=_SETTINGS_PAPER),
        "cpu": dict(classes=(0, 1), vgg_widths=(8, 8, 16, 32, 32), vgg_hidden=(64,), n_train=400, n_test=500,
                    max_epochs=25, n_measure=50, seeds=4, settings=_SETTINGS_CPU),
        "smoke": dict(classes=(0, 1), vgg_widths=(4, 4, 8, 8, 8), vgg_hidden=(16,), n_train=32, n_test=32,
                      max_epochs=2, n_measure=6, seeds=3, settings=((0.1, 16),)),
    },
}
PROFILES = {p: {c: dict(s[p]) for c, s in _COMBO_SPECS.items()} for p in ("smoke", "cpu", "paper")}
_TRACK = {"smoke": dict(epochs=2, every=1), "cpu": dict(epochs=30, every=2), "paper": dict(epochs=20, every=1)}

_TRAIN_FIELDS = {f.name for f in fields(CorrTrainConfig)} - {"combo", "seed"}
_RUN_FIELDS = {f.name for f in fields(CorrRunConfig)} - {"train"}


def _routed(fn: str, values: dict) -> dict:
    out = {}
    for k, v in values.items():
        if k in _RUN_FIELDS:
            out[k] = v
        elif k in _TRAIN_FIELDS:
            out[f"train.{k}"] = v
        else:
            raise ValueError(f"{fn}: unknown field {k!r} (seed and combo are set by the sweep: use seeds= and "
                             f"combos=); valid fields are {sorted(_RUN_FIELDS | _TRAIN_FIELDS)}")
    return out


def _check_settings(fn: str, settings) -> list[tuple[float, int]]:
    try:
        out = [(float(lr), int(bs)) for lr, bs in settings]
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: settings={settings!r} must be a list of (lr, batch_size) pairs") from None
    if not out:
        raise ValueError(f"{fn}: settings is empty; give at least one (lr, batch_size) pair")
    return out


def configs(profile: str, combos=None, *, seeds: int | None = None, settings=None,
            **overrides) -> list[CorrRunConfig]:
    """The run configs of a profile: for each combination, every (lr, batch) setting times ``seeds`` seeds.

    Args:
        profile: ``"smoke"``, ``"cpu"`` or ``"paper"`` (:data:`PROFILES`).
        combos: combination names (default: all of :data:`COMBOS`).
        seeds: models per setting (seeds 0 .. seeds-1), replacing the profile's.
        settings: ``[(lr, batch_size), ...]`` replacing the profile's.
        **overrides: fields of :class:`CorrRunConfig` or :class:`CorrTrainConfig` for every run (``None`` is
            ignored), each cast and validated at once.

    Returns:
        One :class:`CorrRunConfig` per (combination, setting, seed), in that order.

    Raises:
        ValueError: an unknown profile, combination or field, or a value a field's checks reject.
    """
    fn = "configs"
    check_choice(fn, "profile", profile, PROFILES)
    combos = list(COMBOS) if combos is None else ([combos] if isinstance(combos, str) else list(combos))
    for c in combos:
        check_choice(fn, "combos", c, COMBOS)
    if seeds is not None and (not isinstance(seeds, (int, np.integer)) or isinstance(seeds, bool) or seeds < 1):
        raise ValueError(f"{fn}: seeds={seeds!r} must be a positive integer")
    extra = _routed(fn, {k: v for k, v in overrides.items() if v is not None})
    out = []
    for c in combos:
        spec = dict(PROFILES[profile][c])
        n_seeds, sets = spec.pop("seeds"), spec.pop("settings")
        n_seeds = int(n_seeds if seeds is None else seeds)
        sets = _check_settings(fn, sets if settings is None else settings)
        base = with_overrides(with_overrides(CorrRunConfig(train=CorrTrainConfig(combo=c)), **_routed(fn, spec)),
                              **extra)
        out += [with_overrides(base, **{"train.lr": lr, "train.batch_size": bs, "train.seed": s})
                for lr, bs in sets for s in range(n_seeds)]
    return out


def track_config(profile: str, **overrides) -> ChainTrackConfig:
    """The Fig. G.5 run of a profile: the FNN of :func:`configs` at its middle setting, seed 0.

    ``overrides``: ``epochs``, ``every``, ``n_measure`` or any :class:`CorrTrainConfig` field (``lr``,
    ``batch_size``, ...); ``None`` values are ignored.
    """
    fn = "track_config"
    check_choice(fn, "profile", profile, PROFILES)
    spec = dict(PROFILES[profile]["fnn"])
    sets = spec.pop("settings")
    spec.pop("seeds")
    n_measure = spec.pop("n_measure")
    lr, bs = sets[len(sets) // 2] if len(sets) > 2 else sets[0]
    train = with_overrides(CorrTrainConfig(combo="fnn"), lr=lr, batch_size=bs, **spec)
    cfg = with_overrides(ChainTrackConfig(train=train), n_measure=n_measure, **_TRACK[profile])
    top = {f.name for f in fields(ChainTrackConfig)} - {"train"}
    routed = {}
    for k, v in overrides.items():
        if v is None:
            continue
        if k in top:
            routed[k] = v
        elif k in _TRAIN_FIELDS:
            routed[f"train.{k}"] = v
        else:
            raise ValueError(f"{fn}: unknown field {k!r}; valid fields are {sorted(top | _TRAIN_FIELDS)}")
    return with_overrides(cfg, **routed)


# --------------------------------------------------------------------------------------------- data
#: The loss of every model here: :func:`flatness.losses.half_mse`,
#: :math:`\frac1{2n}\sum_i\lVert f(x_i) - e_{y_i}\rVert^2` for class indices ``y`` ``(N,)`` (vmap-safe).
mse_loss = half_mse


_DATA_CACHE: dict = {}


def _split(t: CorrTrainConfig, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``split`` (float in [0, 1], NCHW for CIFAR, flat for Fashion-MNIST), classes relabelled."""
    from ..data import load_dataset

    key = (t.dataset, split, t.source, t.classes, n)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    ds = load_dataset(t.dataset, split, source=t.source)
    labels = ds.labels.long()
    idx = torch.arange(len(labels))
    if t.classes:
        idx = idx[torch.isin(labels, torch.tensor(t.classes))]
    gen = torch.Generator().manual_seed(0)  # one fixed subset per (data set, split, classes), for every model
    idx = idx[torch.randperm(len(idx), generator=gen)]
    if n > len(idx):
        raise ValueError(f"CorrTrainConfig: n_{split}={n} exceeds the {len(idx)} {split} images of "
                         f"{t.dataset} (source={t.source!r}, classes={t.classes or 'all'})")
    idx = idx[:n]
    x = ds.images[idx].float().div(255.0)
    x = x.permute(0, 3, 1, 2).contiguous() if x.ndim == 4 else x.reshape(len(x), -1)
    y = labels[idx]
    if t.classes:
        y = torch.searchsorted(torch.tensor(sorted(t.classes)), y)
    out = (x, y)
    _DATA_CACHE[key] = out
    return out


def _init(t: CorrTrainConfig) -> torch.nn.Module:
    from ..models import build

    if t.combo == "fnn":
        return build("fnn", seed=t.run_seed, widths=(784, *t.hidden, t.num_outputs))
    if t.combo == "lenet5":
        return build("lenet5", seed=t.run_seed, num_classes=t.num_outputs)
    cfg = [v for w in t.vgg_widths for v in (w, "M")]
    return build("small_vgg", seed=t.run_seed, num_classes=t.num_outputs, cfg=cfg, hidden=t.vgg_hidden)


@torch.no_grad()
def _loss_acc(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    out = torch.cat([model(x[i:i + 1024]) for i in range(0, len(x), 1024)])
    return float(mse_loss(out, y)), float((out.argmax(1) == y).float().mean()) * 100.0


# ----------------------------------------------------------------------------------------- training
def _artifact(model: torch.nn.Module, status: str, epochs: int, epochs_to_zero: int, seconds: float) -> dict:
    return {"state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}, "status": status,
            "epochs": int(epochs), "epochs_to_zero": int(epochs_to_zero), "train_seconds": float(seconds)}


def _train_one(t: CorrTrainConfig) -> dict:
    """Train one model (plain SGD, the single-model loop); the artifact: weights and outcome."""
    from ..train import train_to_zero_error

    x, y = _split(t, "train", t.n_train)
    t0 = time.perf_counter()
    res = train_to_zero_error(_init(t), (x, y), optimizer="sgd", lr=t.lr, batch_size=t.batch_size,
                              max_epochs=t.max_epochs, seed=t.run_seed, loss_fn=mse_loss, device=resolve_device())
    ez = -1 if res.epochs_to_zero is None else int(res.epochs_to_zero)
    return _artifact(res.model, res.status, int(res.history["epoch"].iloc[-1]), ez, time.perf_counter() - t0)


def _train_many(ts: list[CorrTrainConfig], progress: bool = False) -> list[dict]:
    """Train ``ts`` (one setting, several seeds) as one stacked ensemble; member i follows :func:`_train_one`."""
    from ..train import train_ensemble_to_zero_error

    t0 = ts[0]
    x, y = _split(t0, "train", t0.n_train)
    start = time.perf_counter()
    ens = train_ensemble_to_zero_error([_init(t) for t in ts], (x, y), lr=t0.lr, batch_size=t0.batch_size,
                                       max_epochs=t0.max_epochs, seeds=[t.run_seed for t in ts], loss_fn=mse_loss,
                                       device=resolve_device(), progress=progress)
    seconds = (time.perf_counter() - start) / len(ts)
    last = ens.history.groupby("model")["epoch"].max() if len(ens.history) else {}
    return [_artifact(ens.model(i), ens.status[i], int(last[i]) if i in last else 0, int(ens.epochs_to_zero[i]),
                      seconds) for i in range(len(ts))]


# -------------------------------------------------------------------------------------- measurement
def _chain_ok(terms: list[float], tol: float = _TOL) -> bool:
    """Whether a chain ``t_0 <= t_1 <= ...`` holds (relative tolerance ``tol``; +inf on the right is fine)."""
    return all(a <= b + tol * abs(b) + 1e-12 for a, b in zip(terms[:-1], terms[1:]))


def _measure(cfg: CorrRunConfig, art: dict) -> dict:
    """Every metric and bound of one trained model (one row)."""
    from ..bounds import lvr_bound, mls_bound_chain, nmls_bound
    from ..compression import local_metrics
    from ..hessian import hessian_trace
    from ..sharpness import relative_flatness

    t = cfg.train
    row: dict = {"combo": t.combo, "model": t.combo, "dataset": t.dataset, "lr": t.lr, "batch_size": t.batch_size,
                 "seed": t.seed, "run_seed": t.run_seed, "status": art["status"], "epochs": art["epochs"],
                 "epochs_to_zero": art["epochs_to_zero"], "train_seconds": art["train_seconds"]}
    if art["status"] == "diverged":
        return row
    model = _init(t)
    model.load_state_dict(art["state_dict"])
    dev = resolve_device()  # $FLATNESS_DEVICE, else CUDA when present; the data follow the model
    model.to(dev).eval()
    row["n_params"] = sum(p.numel() for p in model.parameters())
    xtr, ytr = (v.to(dev) for v in _split(t, "train", t.n_train))
    xte, yte = (v.to(dev) for v in _split(t, "test", t.n_test))
    row["train_loss"], row["train_accuracy"] = _loss_acc(model, xtr, ytr)
    row["test_loss"], row["test_accuracy"] = _loss_acc(model, xte, yte)
    row["train_error"] = 1.0 - row["train_accuracy"] / 100.0
    row["gen_gap"] = row["train_accuracy"] - row["test_accuracy"]  # the authors' plot_corr (percent)
    row["gen_gap_loss"] = row["test_loss"] - row["train_loss"]
    n = min(cfg.n_measure, t.n_train)
    x, y = xtr[:n], ytr[:n]
    lm = local_metrics(model, x)
    lm3 = local_metrics(model, x, top_k=min(cfg.top_k, t.num_outputs))
    tr = float(hessian_trace(model, None, (x, y), method="gauss_newton").value)
    row.update(mls=float(lm["mls"].mean()), log_volume=float(lm["log_volume"].mean()),
               log_volume_top3=float(lm3["log_volume"].mean()), local_dim=float(lm["local_dim"].mean()),
               trace_h=tr, sqrt_trace_h=math.sqrt(tr))
    row["relative_flatness"] = float(relative_flatness(model, mse_loss, (x, y)))
    nb = nmls_bound(model, x, trace_hessian=tr)
    row.update(nmls=nb.lhs, nmls_layerwise=nb.layerwise, nmls_cs_layers=nb.cs_layers, nmls_cs_inputs=nb.cs_inputs,
               nmls_bound=nb.rhs, nmls_bound_authors=nb.authors_rhs, nmls_bound_rigorous=bool(nb.rigorous))
    # the MLS chain with the authors' weight factors, from the NMLS pass (first layer = x's layer)
    g, xn = nb.grad_w_norm[:, 0], nb.h_norm[:, 0]
    inv_x = math.sqrt(float((1.0 / xn**2).mean()))
    partial = float((g**2).mean())
    w0, w_all = math.sqrt(float(nb.coef_authors[0])), math.sqrt(float(nb.coef_authors.sum()))
    for name, w in (("authors", w0), ("all", w_all)):
        row[f"mls_bound_B_{name}"] = w * float((g / xn).mean())
        row[f"mls_bound_C_{name}"] = w * inv_x * math.sqrt(partial)
        row[f"mls_bound_D_{name}"] = w * inv_x * math.sqrt(tr)
    row.update(weight_factor_authors=w0, weight_factor_all=w_all, partial_sharpness=partial)
    nan = math.nan
    if t.combo == "fnn":  # rigorous chains (a Linear first layer)
        ch = mls_bound_chain(model, x, trace_hessian=tr)
        ch_all = mls_bound_chain(model, x, trace_hessian=tr, weight_norm="all_layers")
        row.update(mls_bound_A=ch.A, mls_bound_A_fro=ch.A_fro, mls_bound_B=ch.B, mls_bound_C=ch.C, mls_bound_D=ch.D,
                   w1_spectral_norm=ch.w_spectral_norm, mls_bound_B_all=ch_all.B, mls_bound_C_all=ch_all.C,
                   mls_bound_D_all=ch_all.D, mls_bound_rigorous=True)
        lv, lv3 = lvr_bound(model, x, trace_hessian=tr), lvr_bound(model, x, trace_hessian=tr, top_k=cfg.top_k)
        row.update(lvr_lhs=lv.log_lhs, lvr_bound=lv.log_rhs, lvr_lhs_top3=lv3.log_lhs, lvr_bound_top3=lv3.log_rhs,
                   lvr_bound_rigorous=True,
                   lvr_chain_ok=bool(_chain_ok([lv.log_lhs, lv.log_amgm_top, lv.log_amgm, lv.log_partial,
                                                lv.log_partial_mean, lv.log_rhs])
                                     and _chain_ok([lv3.log_lhs, lv3.log_amgm_top, lv3.log_amgm, lv3.log_partial,
                                                    lv3.log_partial_mean, lv3.log_rhs])))
    else:  # conv first layer: no rigorous MLS/LVR bound (flatness.bounds), the authors' variants only
        row.update(mls_bound_A=row["mls"], mls_bound_A_fro=nan, mls_bound_B=nan, mls_bound_C=nan, mls_bound_D=nan,
                   w1_spectral_norm=nan, mls_bound_rigorous=False, lvr_lhs=nan, lvr_bound=nan, lvr_lhs_top3=nan,
                   lvr_bound_top3=nan, lvr_chain_ok=False, lvr_bound_rigorous=False)
    row["mls_bound"] = row["mls_bound_D_authors"]
    return row


def run(cfg: CorrRunConfig, store: ResultStore | None = None) -> list[dict]:
    """One model: train (or load the weights saved in ``store``'s artifacts) and measure; one row."""
    art = trained(store, cfg.train, _train_one) if store is not None else _train_one(cfg.train)
    return [_measure(cfg, art)]


def run_batch(cfgs: list[CorrRunConfig], store: ResultStore | None = None, progress: bool = False,
              stack: tuple[str, ...] = ("fnn",)) -> list[dict]:
    """:func:`run` for a group of configs: the missing models of each (combination, setting) whose combination
    is in ``stack`` train as one stacked ensemble (:func:`_train_many`), the others one by one."""
    arts: dict[str, dict | None] = {}
    groups: dict[str, list[CorrTrainConfig]] = {}
    for c in cfgs:
        k = config_key(c.train)
        if k in arts:
            continue
        if store is not None and store.has_artifact(k):
            arts[k] = store.load_artifact(k)
            continue
        arts[k] = None
        rest = {f.name: getattr(c.train, f.name) for f in fields(c.train) if f.name != "seed"}
        groups.setdefault(repr(sorted(rest.items())), []).append(c.train)
    for ts in groups.values():
        if ts[0].combo in stack and len(ts) > 1:
            done = _train_many(ts, progress=progress)
        else:
            done = [_train_one(t) for t in ts]
        for t, art in zip(ts, done):
            arts[config_key(t)] = art
            if store is not None:
                store.save_artifact(config_key(t), art)
    return [{**_measure(c, arts[config_key(c.train)]), "key": config_key(c)} for c in cfgs]


def run_all(cfgs: list[CorrRunConfig], store: ResultStore, *, batched: bool = True, executor=None,
            progress: bool = True) -> pd.DataFrame:
    """Every model of ``cfgs`` on :func:`flatness.runs.run_sweep` (resumable; only missing runs are computed).

    ``batched``: stack the FNNs of each setting (:func:`run_batch`); the rows are the same either way (to float
    rounding). Batches hold at most one setting's seeds, so rows are stored setting by setting.
    """
    from collections import Counter
    from functools import partial

    per_setting = Counter(repr(with_overrides(c.train, seed=0)) for c in cfgs)
    return run_sweep(partial(run, store=store), cfgs, store, executor=executor,
                     batch=partial(run_batch, store=store, progress=progress) if batched else None,
                     progress=progress, max_batch=max(per_setting.values()) if per_setting else None)


# ----------------------------------------------------------------------------------- Fig. G.5 track
def track_chain(cfg: ChainTrackConfig) -> list[dict]:
    """Fig. G.5: train one FNN for ``cfg.epochs`` epochs; every ``cfg.every`` epochs, the MLS chain of both
    weight factors on the first ``n_measure`` training inputs. One row per measured epoch."""
    from ..bounds import mls_bound_chain
    from ..hessian import hessian_trace
    from ..train import Track, train_to_zero_error

    t = cfg.train
    if t.combo != "fnn":
        raise ValueError(f"track_chain: train.combo={t.combo!r}; the chain needs a Linear first layer: 'fnn'")
    x, y = _split(t, "train", t.n_train)
    dev = resolve_device()  # training and the chain measurements on the default device
    xm, ym = x[: min(cfg.n_measure, t.n_train)].to(dev), y[: min(cfg.n_measure, t.n_train)].to(dev)

    def chain(model, data) -> dict:
        tr = float(hessian_trace(model, None, (xm, ym), method="gauss_newton").value)
        first = mls_bound_chain(model, xm, trace_hessian=tr)
        all_ = mls_bound_chain(model, xm, trace_hessian=tr, weight_norm="all_layers")
        return {"A": first.A, "A_fro": first.A_fro, "B": first.B, "C": first.C, "D": first.D, "B_all": all_.B,
                "C_all": all_.C, "D_all": all_.D, "sqrt_trace_h": math.sqrt(tr)}

    # a loss threshold no run reaches: train all cfg.epochs epochs (past zero error), as the authors' fixed budget
    res = train_to_zero_error(_init(t), (x, y), optimizer="sgd", lr=t.lr, batch_size=t.batch_size,
                              max_epochs=cfg.epochs, seed=t.run_seed, loss_fn=mse_loss, device=dev,
                              loss_threshold=1e-30, callbacks=[Track(chain, every=cfg.every)])
    h = res.history.dropna(subset=["A"])
    cols = ["epoch", "step", "loss", "train_error", "A", "A_fro", "B", "C", "D", "B_all", "C_all", "D_all",
            "sqrt_trace_h"]
    return [{**r, "status": "diverged" if res.status == "diverged" else "ok", "lr": t.lr,
             "batch_size": t.batch_size, "seed": t.seed} for r in h[cols].to_dict("records")]


def track_violations(track: pd.DataFrame) -> int:
    """Tracked epochs (Fig. G.5) where the chain ``A <= A_F <= B <= C <= D`` or ``A_F <= B_all <= C_all <= D_all``
    fails (relative tolerance 1e-6)."""
    return int(sum(not (_chain_ok([r.A, r.A_fro, r.B, r.C, r.D]) and _chain_ok([r.A_fro, r.B_all, r.C_all, r.D_all]))
                   for r in track.itertuples()))


def run_track(cfg: ChainTrackConfig, store: ResultStore, progress: bool = True) -> pd.DataFrame:
    """:func:`track_chain` on :func:`flatness.runs.run_sweep` (stored in ``store``; a re-run computes nothing)."""
    return run_sweep(track_chain, [cfg], store, progress=progress)


# ------------------------------------------------------------------------------------------- claims
def chain_checks(df: pd.DataFrame) -> pd.DataFrame:
    """Per combination, the number of models violating each inequality, where it is rigorous.

    Returns one row per (combo, inequality) with ``n`` (models checked), ``violations`` and ``rigorous``.
    Inequalities: the MLS chain ``A <= A_F <= B <= C <= D`` (``||W_1||_2``) and with the all-layer factor
    (``A_F <= B_all <= C_all <= D_all``), the NMLS chain (``nmls <= layerwise <= cs_layers <= cs_inputs <=
    bound``), the LVR chain (all and top-3 eigenvalues), and, for information where not rigorous (CNNs), the
    authors' variants (``A <= D_authors``, ``nmls <= nmls_bound_authors``).
    """
    ok = df[df["status"].isin(["converged", "max_epochs"])] if "status" in df.columns else df
    rows = []

    def add(combo, name, sub, lhs_cols, rigorous):
        vals = sub[lhs_cols].to_numpy(dtype=float)
        good = np.array([_chain_ok(list(v)) for v in vals], dtype=bool) if len(vals) else np.array([], bool)
        rows.append({"combo": combo, "inequality": name, "rigorous": rigorous, "n": int(len(vals)),
                     "violations": int((~good).sum())})

    for combo, sub in ok.groupby("combo", sort=False):
        rig = sub[sub["mls_bound_rigorous"].astype(bool)]
        if len(rig):
            add(combo, "A <= A_F <= B <= C <= D", rig, ["mls_bound_A", "mls_bound_A_fro", "mls_bound_B", "mls_bound_C",
                                                       "mls_bound_D"], True)
            add(combo, "A_F <= B_all <= C_all <= D_all", rig, ["mls_bound_A_fro", "mls_bound_B_all",
                                                              "mls_bound_C_all", "mls_bound_D_all"], True)
        nr = sub[sub["nmls_bound_rigorous"].astype(bool)]
        if len(nr):
            add(combo, "NMLS <= layerwise <= CS layers <= CS inputs <= bound", nr,
                ["nmls", "nmls_layerwise", "nmls_cs_layers", "nmls_cs_inputs", "nmls_bound"], True)
        lr_ = sub[sub["lvr_bound_rigorous"].astype(bool)]
        if len(lr_):
            rows.append({"combo": combo, "inequality": "LVR chain (all and top-3 eigenvalues)", "rigorous": True,
                         "n": int(len(lr_)), "violations": int((~lr_["lvr_chain_ok"].astype(bool)).sum())})
        cnn = sub[~sub["mls_bound_rigorous"].astype(bool)]
        if len(cnn):
            add(combo, "A <= D_authors (not a proven bound)", cnn, ["mls", "mls_bound_D_authors"], False)
            add(combo, "NMLS <= NMLS bound, conv term (not a proven bound)", cnn, ["nmls", "nmls_bound"], False)
    return pd.DataFrame(rows, columns=["combo", "inequality", "rigorous", "n", "violations"])


def chain_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Median (and 10th/90th percentile) ratio of each step of the MLS chain, per combination and factor."""
    ok = df[df["status"].isin(["converged", "max_epochs"])] if "status" in df.columns else df
    steps = [("B / A", "mls_bound_B", "mls_bound_A"), ("C / B", "mls_bound_C", "mls_bound_B"),
             ("D / C", "mls_bound_D", "mls_bound_C"), ("D / A", "mls_bound_D", "mls_bound_A"),
             ("B_all / A", "mls_bound_B_all", "mls_bound_A"), ("D_all / A", "mls_bound_D_all", "mls_bound_A"),
             ("B_authors / A", "mls_bound_B_authors", "mls_bound_A"),
             ("C_authors / B_authors", "mls_bound_C_authors", "mls_bound_B_authors"),
             ("D_authors / C_authors", "mls_bound_D_authors", "mls_bound_C_authors"),
             ("NMLS bound / NMLS", "nmls_bound", "nmls")]
    rows = []
    for combo, sub in ok.groupby("combo", sort=False):
        for name, num, den in steps:
            r = (sub[num] / sub[den]).to_numpy(dtype=float)
            r = r[np.isfinite(r)]
            if len(r):
                rows.append({"combo": combo, "step": name, "median": float(np.median(r)),
                             "p10": float(np.quantile(r, 0.1)), "p90": float(np.quantile(r, 0.9)), "n": len(r)})
    return pd.DataFrame(rows, columns=["combo", "step", "median", "p10", "p90", "n"])


def correlations(df: pd.DataFrame, pairs, method: str = "pearson", n_boot: int = 2000) -> pd.DataFrame:
    """``method`` correlation with a bootstrap 95% CI of each ``(x, y)`` column pair, per combination.

    The statistic is :func:`flatness.stats.correlation` with its defaults (``seed=0``), the numbers the figures
    show. Returns columns ``combo, x, y, r, ci_low, ci_high, n``.
    """
    from ..stats import correlation

    ok = df[df["status"].isin(["converged", "max_epochs"])] if "status" in df.columns else df
    rows = []
    for combo, sub in ok.groupby("combo", sort=False):
        for xc, yc in pairs:
            xv, yv = sub[xc].to_numpy(dtype=float), sub[yc].to_numpy(dtype=float)
            if (np.isfinite(xv) & np.isfinite(yv)).sum() < 3:
                continue
            c = correlation(xv, yv, method, n_boot=n_boot)
            rows.append({"combo": combo, "x": xc, "y": yc, "r": c.r, "ci_low": c.ci_low, "ci_high": c.ci_high,
                         "n": c.n})
    return pd.DataFrame(rows, columns=["combo", "x", "y", "r", "ci_low", "ci_high", "n"])


#: The correlations the claims read (and notebook 06 tabulates).
CLAIM_PAIRS = (("mls_bound", "mls"), ("nmls_bound", "nmls"), ("mls_bound_C_authors", "mls"),
               ("mls_bound_D_authors", "mls"))
_PAPER = "Chen et al. 2023"


def claim_results(df: pd.DataFrame, track: pd.DataFrame | None = None, corr: pd.DataFrame | None = None,
                  n_boot: int = 2000) -> list[dict]:
    """Notebook 06's claims, measured: keyword arguments for :func:`flatness.claims.record` (without ``notebook``
    and ``profile``).

    1. ``every_inequality_holds``: 0 violations of the rigorous chains (:func:`chain_checks`, rigorous rows)
       over all models, plus the Fig. G.5 tracked epochs (:func:`track_violations` of ``track``, if given).
    2. ``fig3_mls_vs_bound_<combo>`` / ``fig3_nmls_vs_bound_<combo>``: Pearson(MLS, MLS bound) and Pearson(NMLS,
       NMLS bound) > 0 with the 95% CI above 0, per combination (Fig. 3); the statistic says when the bound is
       not rigorous there (the authors' CNN convention).
    3. ``figG5_C_correlates_with_mls_<combo>``: Pearson(MLS, C) > 0, CI above 0 (Fig. G.5's caption); D's
       correlation is reported in the text (the paper finds it negative on the FNN).
    ``corr``: :func:`correlations` of ``df`` over at least :data:`CLAIM_PAIRS` (computed when not given).
    """
    corr = correlations(df, CLAIM_PAIRS, n_boot=n_boot) if corr is None else corr
    checks, ratios = chain_checks(df), chain_ratios(df)
    g5_viol = track_violations(track) if track is not None else 0
    viol = int(checks.loc[checks.rigorous, "violations"].sum()) + g5_viol
    n_checked = int(checks.loc[checks.rigorous, "n"].sum()) + (len(track) if track is not None else 0)
    med = ratios.set_index(["combo", "step"])["median"]
    steps = [med.get(("fnn", s), np.nan) for s in ("B / A", "C / B", "D / C")]
    out = [dict(claim="every_inequality_holds",
                statistic="violations of the rigorous chains (MLS A<=A_F<=B<=C<=D both factors, NMLS, LVR all/top-3) "
                          "over all models + Fig. G.5 epochs", value=viol, ci=None, expected="0 violations",
                holds=viol == 0, n=n_checked, figure="06_figG5_chain_over_training",
                paper_ref=f"{_PAPER}, Props. 3.4-3.8, Fig. G.5",
                text="Every inequality holds on every model; FNN median ratios B/A = {:.2f}, C/B = {:.2f}, "
                     "D/C = {:.2f}".format(*steps))]
    present = [c for c in COMBOS if "combo" in df.columns and c in set(df["combo"])]
    for combo in present:
        for xc, yc, name in (("mls_bound", "mls", "MLS"), ("nmls_bound", "nmls", "NMLS")):
            r = corr[(corr.combo == combo) & (corr.x == xc) & (corr.y == yc)]
            if r.empty:
                continue
            r = r.iloc[0]
            rig = bool(df.loc[df.combo == combo, f"{xc}_rigorous"].astype(bool).all())
            out.append(dict(claim=f"fig3_{name.lower()}_vs_bound_{combo}",
                            statistic=f"Pearson({name}, {name} bound) on {combo}"
                                      + ("" if rig else " (bound not rigorous: authors' conv convention)"),
                            value=float(r.r), ci=(float(r.ci_low), float(r.ci_high)),
                            expected="r > 0 and 95% CI above 0", holds=bool(r.r > 0 and r.ci_low > 0),
                            n=int(r.n), figure="06_fig3_bounds", paper_ref=f"{_PAPER}, Fig. 3",
                            text=f"{name} correlates positively with its sharpness bound"))
    for combo in present:
        rc = corr[(corr.combo == combo) & (corr.x == "mls_bound_C_authors") & (corr.y == "mls")]
        rd = corr[(corr.combo == combo) & (corr.x == "mls_bound_D_authors") & (corr.y == "mls")]
        if rc.empty:
            continue
        rc = rc.iloc[0]
        d_txt = (f"D: r = {rd.iloc[0].r:+.2f} [{rd.iloc[0].ci_low:+.2f}, {rd.iloc[0].ci_high:+.2f}]" if len(rd)
                 else "D: not measured")
        out.append(dict(claim=f"figG5_C_correlates_with_mls_{combo}", statistic=f"Pearson(MLS, C) on {combo}",
                        value=float(rc.r), ci=(float(rc.ci_low), float(rc.ci_high)),
                        expected="r > 0 and 95% CI above 0", holds=bool(rc.r > 0 and rc.ci_low > 0), n=int(rc.n),
                        figure="06_correlation_heatmap", paper_ref=f"{_PAPER}, Fig. G.5 caption",
                        text=f"Bound C (partial sharpness) correlates positively with MLS; {d_txt} "
                             f"(paper: negative on the FNN)"))
    return out


def stacking_speedup(t: CorrTrainConfig, n_models: int = 8, epochs: int = 1) -> dict:
    """Wall time of training ``n_models`` seeds of ``t`` for ``epochs`` epochs one after another
    (:func:`flatness.train.train_to_zero_error`) and as one stacked ensemble, both on the CPU (the timing is a
    CPU benchmark; ``threads`` is torch's thread count); the speed-up is their ratio.

    Both run the same models on the same mini-batches (zero error is not reached in so few epochs, so both do
    the same number of steps); a check of the final parameters' agreement is returned too (``max_abs_diff``).
    """
    from ..train import train_ensemble_to_zero_error, train_to_zero_error

    ts = [with_overrides(t, seed=s, max_epochs=epochs) for s in range(n_models)]
    x, y = _split(t, "train", t.n_train)
    start = time.perf_counter()
    singles = [train_to_zero_error(_init(u), (x, y), lr=u.lr, batch_size=u.batch_size, max_epochs=epochs,
                                   seed=u.run_seed, loss_fn=mse_loss, device="cpu") for u in ts]
    seq = time.perf_counter() - start
    start = time.perf_counter()
    ens = train_ensemble_to_zero_error([_init(u) for u in ts], (x, y), lr=t.lr, batch_size=t.batch_size,
                                       max_epochs=epochs, seeds=[u.run_seed for u in ts], loss_fn=mse_loss,
                                       device="cpu")
    stacked = time.perf_counter() - start
    diff = max(float((p.detach() - ens.params[k][i]).abs().max()) for i, s in enumerate(singles)
               for k, p in s.model.named_parameters())
    return {"n_models": n_models, "epochs": epochs, "n_train": t.n_train, "batch_size": t.batch_size,
            "sequential_s": seq, "stacked_s": stacked, "speedup": seq / stacked, "max_abs_diff": diff,
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ figures
def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"].isin(["converged", "max_epochs"])] if "status" in df.columns else df


def _annotate(ax, x, y, n_boot: int = 2000, fontsize: float = 8):
    from ..stats import correlation

    xv, yv = np.asarray(x, float), np.asarray(y, float)
    if (np.isfinite(xv) & np.isfinite(yv)).sum() < 3:
        return None
    c = correlation(xv, yv, "pearson", n_boot=n_boot)
    ax.text(0.03, 0.97, f"ρ = {c.r:+.2f}\n[{c.ci_low:+.2f}, {c.ci_high:+.2f}]", transform=ax.transAxes, va="top",
            ha="left", fontsize=fontsize, bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8, "lw": 0})
    return c


def figure_fig3(df: pd.DataFrame, n_boot: int = 2000):
    """Fig. 3: MLS vs its bound (top) and NMLS vs its bound (bottom), one column per combination, coloured by
    learning rate, Pearson :math:`\\rho` with its bootstrap 95% CI in the corner. Not-rigorous bounds are marked."""
    import matplotlib.pyplot as plt

    ok = _ok(df)
    combos = [c for c in COMBOS if c in set(ok["combo"])]
    fig, axes = plt.subplots(2, max(len(combos), 1), figsize=(4 * max(len(combos), 1) + 1, 7), squeeze=False,
                             layout="constrained")
    loglr = np.log10(ok["lr"].astype(float))
    norm = plt.Normalize(float(loglr.min()), float(loglr.max()) + 1e-9)
    sc = None
    for j, combo in enumerate(combos):
        sub = ok[ok["combo"] == combo]
        rig_m = bool(sub["mls_bound_rigorous"].astype(bool).all())
        rig_n = bool(sub["nmls_bound_rigorous"].astype(bool).all())
        for i, (xc, yc, rig, lab) in enumerate([("mls_bound", "mls", rig_m, "MLS bound D (Prop. 3.4)"),
                                                 ("nmls_bound", "nmls", rig_n, "NMLS bound (Prop. 3.8)")]):
            ax = axes[i, j]
            sc = ax.scatter(sub[xc], sub[yc], c=np.log10(sub["lr"].astype(float)), cmap="viridis", norm=norm, s=16,
                            alpha=0.8)
            _annotate(ax, sub[xc], sub[yc], n_boot)
            ax.set_xlabel(lab + ("" if rig else "\n(authors' conv convention, not rigorous)"), fontsize=9)
            ax.set_ylabel(yc.upper())
            if i == 0:
                ax.set_title(_LABEL[combo], fontsize=10)
    if sc is not None:
        fig.colorbar(sc, ax=axes.ravel().tolist(), shrink=0.5, label=r"$\log_{10}$ lr")
    return fig


def figure_pairplot(df: pd.DataFrame, combo: str, columns: dict | None = None, n_boot: int = 1000):
    """The full pairwise scatter matrix of one combination (the authors' ``plot_corr.py``), Pearson
    :math:`\\rho` with a bootstrap 95% CI in each lower cell, histograms on the diagonal."""
    import matplotlib.pyplot as plt

    check_choice("figure_pairplot", "combo", combo, COMBOS)
    columns = dict(PAIR_COLUMNS if columns is None else columns)
    sub = _ok(df)
    sub = sub[sub["combo"] == combo]
    cols = [c for c in columns if c in sub.columns and np.isfinite(sub[c].to_numpy(float)).sum() >= 3]
    k = len(cols)
    fig, axes = plt.subplots(k, k, figsize=(1.3 * k + 1, 1.3 * k + 1), squeeze=False)
    for i, yc in enumerate(cols):
        for j, xc in enumerate(cols):
            ax = axes[i, j]
            xv = sub[xc].to_numpy(float)
            if i == j:
                ax.hist(xv[np.isfinite(xv)], bins=12, color="0.6")
            else:
                ax.scatter(xv, sub[yc].to_numpy(float), s=5, alpha=0.7 if i > j else 0.35,
                           color="C0" if i > j else "0.5", rasterized=True)
                if i > j:
                    _annotate(ax, xv, sub[yc], n_boot, fontsize=6)
            # ticks only on the outer axes (text layout dominates the cost of a k x k grid)
            ax.set_xticks([]) if i < k - 1 else ax.locator_params(axis="x", nbins=3)
            ax.set_yticks([]) if j > 0 or i == 0 else ax.locator_params(axis="y", nbins=3)
            ax.tick_params(labelsize=5, length=2, pad=1)
            if i == k - 1:
                ax.set_xlabel(columns[xc], fontsize=7)
            if j == 0:
                ax.set_ylabel(columns[yc], fontsize=7)
    fig.suptitle(f"{_LABEL[combo]}: pairwise scatter matrix (n = {len(sub)}; lower: Pearson ρ [95% CI])",
                 y=0.995, fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.07, top=0.96, wspace=0.06, hspace=0.06)
    return fig


def figure_heatmap(df: pd.DataFrame, columns: dict | None = None, n_boot: int = 1000):
    """Pearson correlation matrix per combination as a heat-map, each cell ``r`` and its bootstrap 95% CI."""
    import matplotlib.pyplot as plt

    from ..stats import correlation

    columns = dict(PAIR_COLUMNS if columns is None else columns)
    ok = _ok(df)
    combos = [c for c in COMBOS if c in set(ok["combo"])]
    fig, axes = plt.subplots(1, max(len(combos), 1), figsize=(7.2 * max(len(combos), 1), 6), squeeze=False)
    for a, combo in enumerate(combos):
        sub = ok[ok["combo"] == combo]
        cols = [c for c in columns if c in sub.columns and np.isfinite(sub[c].to_numpy(float)).sum() >= 3]
        k = len(cols)
        mat = np.full((k, k), np.nan)
        ax = axes[0, a]
        for i, yc in enumerate(cols):
            for j, xc in enumerate(cols):
                if i == j:
                    mat[i, j] = 1.0
                    continue
                if j > i:
                    continue
                xv, yv = sub[xc].to_numpy(float), sub[yc].to_numpy(float)
                if (np.isfinite(xv) & np.isfinite(yv)).sum() < 3:
                    continue
                c = correlation(xv, yv, "pearson", n_boot=n_boot)
                mat[i, j] = mat[j, i] = c.r
                ax.text(j, i, f"{c.r:+.2f}\n[{c.ci_low:+.2f},\n{c.ci_high:+.2f}]", ha="center", va="center",
                        fontsize=5.5)
        im = ax.imshow(mat, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(k), [columns[c] for c in cols], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(k), [columns[c] for c in cols], fontsize=7)
        ax.set_title(f"{_LABEL[combo]} (n = {len(sub)})", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.6, label="Pearson r (lower: r [95% CI])")
    return fig


def figure_g5(track: pd.DataFrame):
    """Fig. G.5: the MLS chain A, B, C, D over training of the FNN, with the rigorous factor
    :math:`\\lVert W_1\\rVert_2` (left) and the authors' all-layer factor (right, their plot), log scale."""
    import matplotlib.pyplot as plt

    tr = track[track["status"] != "error"].sort_values("epoch") if "status" in track.columns else track
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, suffix, title in ((axes[0], "", r"$\omega = \|W_1\|_2$ (rigorous, tight)"),
                              (axes[1], "_all", r"$\omega = (\sum_l \|W_l\|_2^2)^{1/2}$ (authors' Fig. G.5)")):
        ax.plot(tr["epoch"], tr["A"], "o-", ms=3, label="A = mean MLS")
        for name, color in (("B", "C1"), ("C", "C2"), ("D", "C3")):
            ax.plot(tr["epoch"], tr[name + suffix], "o-", ms=3, color=color, label=name)
        ax.fill_between(tr["epoch"], tr["C" + suffix], tr["D" + suffix], color="C3", alpha=0.1)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("value")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig
