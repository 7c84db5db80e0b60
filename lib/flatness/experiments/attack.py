"""Notebook 02: attack sets, log P(f), sharpness and generalisation (Zhang et al. 2021, Sec. 5.2, Fig. 3, S7, S19).

Protocol of one run (issue 9; sizes, kernels and sharpness settings from the reference sheet):

1. **Task.** ``binary_task(dataset, n_train, n_attack, n_test, seed=draw)``: train set S, attack set A (images
   disjoint from S and T, labels flipped), test set T. MNIST 0-4 vs 5-9; CIFAR-10 car vs cat.
2. **Training.** From the prior initialisation (FCN: weights :math:`N(0, 2/\\text{fan-in})`, biases
   :math:`N(0, 1)`), train on :math:`S \\cup A` with ``optimizer`` (plain SGD, lr 0.01, batch 32 for FCNs,
   128 for ResNets; mean sigmoid cross-entropy) until the first epoch with zero error on S (A need not be
   fitted). ``max_epochs`` or divergence end a run with that status and no measurements.
3. **Measurements** at that epoch: errors on S, A and T; :math:`\\ln P(f)` by EP (Heaviside, the paper's
   definition, as ``log_prior``; probit as ``log_prior_probit``) of the labels the trained network gives
   :math:`S \\cup T`, under the arc-cosine NNGP kernel (:math:`\\sigma_w = \\sqrt 2, \\sigma_b = 1`) for FCNs
   and the Monte-Carlo empirical kernel (``M = kernel_fraction`` :math:`\\times |S \\cup T|` fresh networks)
   for ResNets; Keskar sharpness (Definition 2.1) of the mean cross-entropy on the clean S (SGD ascent, plus
   L-BFGS-B on FCNs); the Hessian spectral norm on S (Lanczos, k = 1).

On the experiment engine (:mod:`flatness.runs`): one run is one (panel, |A|, draw), an :class:`AttackRunConfig`
holding its training config :class:`AttackTrainConfig`. The weights are an artifact keyed by the training
config (:func:`flatness.runs.trained`), so notebooks 03, 04 and 08 re-measure them without retraining, and
notebook 03 runs the same sweep with another ``optimizer`` (``configs("cpu", optimizer="adam", lr=1e-3)``).
Seeds derive from the config (dataset, model, |A|, draw, seed), never from positions in a list.

Not batched: the draws of one |A| have different S, A and T (``seed=draw``), and the stacked ensemble trainer
shares one input tensor across members, so each run trains on its own (:func:`run`).

At the ``cpu`` profile the ResNet panel uses ``resnet_small`` (:func:`flatness.models.resnet_cifar`, depth 8,
width 8, ~20k parameters, BatchNorm) without the crop+flip augmentation of the paper's ResNet-50 runs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import ClassVar

import pandas as pd
import torch

from .._checks import check_choice
from ..losses import sigmoid_bce
from ..results import ResultStore
from ..runs import RunConfig, param, run_sweep, trained, with_overrides

__all__ = ["AttackTrainConfig", "AttackRunConfig", "PANELS", "PROFILES", "STORE_NAME", "configs", "run",
           "run_all", "ROW_COLUMNS"]

STORE_NAME = "02_attack"  #: ``ResultStore(STORE_NAME, results/<profile>)``
_IN_FEATURES = {"mnist": 784, "fashion_mnist": 784, "cifar10": 3072}
_MODELS = ("fcn", "resnet_small", "resnet8", "resnet20", "resnet50_cifar")
_KERNEL_SEED_OFFSET = 1_000_000  # fresh networks of the empirical kernel: seeds 10^6, 10^6 + 1, ...

#: The columns every row carries (the store adds ``config`` and ``key``).
ROW_COLUMNS = ("panel", "dataset", "model", "optimizer", "n_train", "n_attack", "n_test", "draw", "seed",
               "status", "epochs", "train_error", "attack_error", "test_error", "train_loss", "log_prior",
               "log10_prior", "likelihood", "ep_converged", "log_prior_probit", "log10_prior_probit",
               "ep_converged_probit", "kernel", "kernel_samples", "sharpness", "sharpness_lbfgsb",
               "hessian_norm", "n_params")


@dataclass(frozen=True)
class AttackTrainConfig(RunConfig):
    """One network trained on S ∪ A to zero error on S (its weights are an artifact keyed by this config)."""

    VERSION: ClassVar[int] = 1

    dataset: str = param("mnist", choices=tuple(_IN_FEATURES))
    model: str = param("fcn", choices=_MODELS)  # FCN 784/3072-40-40-1, or a CIFAR ResNet
    hidden: tuple[int, ...] = param((40, 40), min=1)  # FCN hidden widths (Zhang et al.: 40, 40)
    sigma_w: float = param(math.sqrt(2.0), positive=True)  # FCN init N(0, sigma_w^2 / fan-in)
    sigma_b: float = param(1.0, min=0.0)  # bias init N(0, sigma_b^2)
    n_train: int = param(500, min=1)  # |S|
    n_attack: int = param(0, min=0)  # |A|
    n_test: int = param(1000, min=1)  # |T|
    draw: int = param(0, min=0)  # the task's seed (S, A, T) and part of the init seed
    source: str = param("embedded", choices=("embedded", "full", "auto"))  # bundled data at smoke/cpu
    optimizer: str = param("sgd")  # a name of flatness.train.OPTIMIZERS (notebook 03 varies it)
    lr: float | None = param(0.01, positive=True)  # None: the optimizer's reference default
    batch_size: int = param(32, min=1)  # 32 for FCNs, 128 for ResNets
    max_epochs: int = param(50_000, min=1)  # the authors' cap
    seed: int = param(0, min=0)

    @property
    def run_seed(self) -> int:
        """Initialisation and mini-batch seed: a hash of (seed, dataset, model, |A|, draw) only."""
        h = hashlib.sha256(f"{self.seed}/{self.dataset}/{self.model}/{self.n_attack}/{self.draw}".encode())
        return int.from_bytes(h.digest()[:6], "little")

    @property
    def widths(self) -> tuple[int, ...]:
        return (_IN_FEATURES[self.dataset], *self.hidden, 1)


@dataclass(frozen=True)
class AttackRunConfig(RunConfig):
    """One measured run: the training config plus the measurement settings (reference sheet per architecture)."""

    VERSION: ClassVar[int] = 1

    panel: str = param("mnist_fcn")  # which panel of Fig. 3 (a label; see PANELS)
    train: AttackTrainConfig = param(default_factory=AttackTrainConfig)
    zeta: float = param(1e-4, positive=True)  # Keskar box (MNIST/CIFAR FCN 1e-4; ResNet 1e-5)
    sharpness_lr: float = param(1e-3, positive=True)  # SGD ascent lr (FCN 1e-3; ResNet 1.0)
    sharpness_epochs: int = param(100, min=1)  # SGD ascent epochs (the authors': 100)
    sharpness_batch_size: int = param(32, min=1)  # FCN 32; ResNet 128
    sharpness_eval_every: str = param("step", choices=("step", "epoch"))  # when the full-data max is taken
    lbfgsb: bool = param(True)  # also L-BFGS-B sharpness (FCNs; Keskar's original maximiser)
    probit: bool = param(True)  # also the probit EP log P (the authors' GPy code)
    kernel_fraction: float = param(0.1, positive=True)  # empirical kernel: M = fraction * |S ∪ T| (ResNets)
    kernel_samples: int | None = param(None, min=1)  # fixes M instead (smoke)


# ------------------------------------------------------------------------------------------ profiles
#: Panel -> the training and measurement fields that define it, at each profile; ``attacks`` and ``draws``
#: give the sweep. Fields not named keep the dataclass defaults.
_FCN_SHARP = dict(zeta=1e-4, sharpness_lr=1e-3, sharpness_epochs=100, sharpness_batch_size=32)
_RESNET_SHARP = dict(zeta=1e-5, sharpness_lr=1.0, sharpness_epochs=100, sharpness_batch_size=128,
                     sharpness_eval_every="epoch", lbfgsb=False)
PANELS: dict[str, dict[str, dict]] = {
    "mnist_fcn": {  # Fig. 3a/d
        "paper": dict(dataset="mnist", model="fcn", n_train=500, n_test=1000, attacks=range(0, 501, 50), draws=5,
                      source="full", **_FCN_SHARP),
        "cpu": dict(dataset="mnist", model="fcn", n_train=500, n_test=1000, attacks=range(0, 501, 50), draws=5,
                    **_FCN_SHARP),
        "smoke": dict(dataset="mnist", model="fcn", n_train=100, n_test=100, attacks=(0, 50, 100), draws=1,
                      max_epochs=2000, **{**_FCN_SHARP, "sharpness_epochs": 10}),
    },
    "cifar_fcn": {  # Fig. 3b/e
        "paper": dict(dataset="cifar10", model="fcn", n_train=5000, n_test=2000, attacks=range(0, 5001, 500),
                      draws=5, source="full", **_FCN_SHARP),
        "cpu": dict(dataset="cifar10", model="fcn", n_train=500, n_test=500, attacks=range(0, 501, 100), draws=3,
                    **_FCN_SHARP),
        "smoke": dict(dataset="cifar10", model="fcn", n_train=100, n_test=100, attacks=(0, 100), draws=1,
                      max_epochs=2000, **{**_FCN_SHARP, "sharpness_epochs": 10}),
    },
    "cifar_resnet": {  # Fig. 3c/f
        "paper": dict(dataset="cifar10", model="resnet50_cifar", n_train=5000, n_test=2000,
                      attacks=range(0, 5001, 500), draws=5, batch_size=128, source="full", **_RESNET_SHARP),
        "cpu": dict(dataset="cifar10", model="resnet_small", n_train=250, n_test=250, attacks=(0, 125, 250),
                    draws=2, batch_size=128, **_RESNET_SHARP),
        "smoke": dict(dataset="cifar10", model="resnet_small", n_train=50, n_test=50, attacks=(0,), draws=1,
                      batch_size=128, max_epochs=500, kernel_samples=4,
                      **{**_RESNET_SHARP, "sharpness_epochs": 5}),
    },
    "mnist_10k": {  # Fig. S19, paper profile only
        "paper": dict(dataset="mnist", model="fcn", n_train=10_000, n_test=1000, attacks=range(0, 10_001, 1000),
                      draws=3, source="full", **_FCN_SHARP),
    },
}
PROFILES = ("smoke", "cpu", "paper")

_TRAIN_FIELDS = {f.name for f in fields(AttackTrainConfig)}
_RUN_FIELDS = {f.name for f in fields(AttackRunConfig)} - {"train"}


def _routed(where: str, values: dict) -> dict:
    """Flat field names -> ``with_overrides`` names of :class:`AttackRunConfig` (``train.<name>`` for training)."""
    out = {}
    for k, v in values.items():
        if k in _RUN_FIELDS:
            out[k] = v
        elif k in _TRAIN_FIELDS and k not in ("n_attack", "draw"):
            out[f"train.{k}"] = v
        else:
            valid = sorted((_RUN_FIELDS | _TRAIN_FIELDS) - {"n_attack", "draw", "panel"})
            raise ValueError(f"{where}: unknown field {k!r} (n_attack and draw are set by the sweep: use attacks= "
                             f"and draws=); valid fields are {valid}")
    return out


def configs(profile: str, panels=None, *, attacks=None, draws: int | None = None,
            **overrides) -> list[AttackRunConfig]:
    """The run configs of a profile: for each panel, every |A| of its sweep times ``draws`` draws.

    Args:
        profile: ``"smoke"``, ``"cpu"`` or ``"paper"`` (sizes of issue 9's table).
        panels: panel names (default: every panel the profile has; ``mnist_10k`` is paper-only).
        attacks: the |A| values, replacing each panel's (e.g. ``range(0, 501, 100)``).
        draws: number of draws per |A|, replacing each panel's (draws are 0, 1, ..., ``draws - 1``).
        **overrides: fields of :class:`AttackRunConfig` or :class:`AttackTrainConfig` for every run, e.g.
            ``optimizer="adam", lr=1e-3`` (notebook 03) or ``max_epochs=100``; ``None`` values are ignored.
            Each is cast and validated at once, so a bad value raises naming its field.

    Returns:
        One :class:`AttackRunConfig` per (panel, |A|, draw), in that order.

    Raises:
        ValueError: an unknown profile, panel or field, or a value a field's checks reject.
    """
    fn = "configs"
    check_choice(fn, "profile", profile, PROFILES)
    have = [p for p in PANELS if profile in PANELS[p]]
    panels = have if panels is None else ([panels] if isinstance(panels, str) else list(panels))
    for p in panels:
        check_choice(fn, "panels", p, have)
    extra = _routed(fn, {k: v for k, v in overrides.items() if v is not None})
    if draws is not None and (not isinstance(draws, int) or draws < 1):
        raise ValueError(f"{fn}: draws={draws!r}; expected a positive integer")
    out = []
    for p in panels:
        spec = dict(PANELS[p][profile])
        sweep, n_draws = list(spec.pop("attacks")), spec.pop("draws")
        sweep, n_draws = (sweep if attacks is None else list(attacks)), (n_draws if draws is None else draws)
        base = with_overrides(AttackRunConfig(panel=p), **_routed(fn, spec))
        base = with_overrides(base, **extra)
        out += [with_overrides(base, **{"train.n_attack": a, "train.draw": d}) for a in sweep
                for d in range(n_draws)]
    return out


# --------------------------------------------------------------------------------------- one run
def _task(t: AttackTrainConfig):
    from ..data import binary_task

    return binary_task(t.dataset, t.n_train, t.n_attack, t.n_test, seed=t.draw, source=t.source)


def _init(t: AttackTrainConfig, seed: int | None = None) -> torch.nn.Module:
    from ..models import FCN, build

    s = t.run_seed if seed is None else seed
    if t.model == "fcn":
        return FCN(t.widths, t.sigma_w, t.sigma_b, seed=s)
    return build(t.model, seed=s, sigma_b=t.sigma_b)


def _train_one(t: AttackTrainConfig) -> dict:
    """Train one network on S ∪ A until zero error on S; the artifact: weights and outcome at that epoch."""
    from ..train import train_to_zero_error

    res = train_to_zero_error(_init(t), _task(t), optimizer=t.optimizer, lr=t.lr, batch_size=t.batch_size,
                              max_epochs=t.max_epochs, seed=t.run_seed, device="cpu")
    last = res.final
    return {"state_dict": res.model.state_dict(), "status": res.status,
            "epochs": -1 if res.epochs_to_zero is None else int(res.epochs_to_zero),
            "train_error": float(last.get("train_error", math.nan)),
            "attack_error": float(last.get("attack_error", math.nan)),
            "test_error": float(last.get("test_error", math.nan)), "train_loss": float(last.get("loss", math.nan))}


def _predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Labels 1{f(x) > 0} in eval mode (batched), the model left in eval mode."""
    model.eval()
    with torch.no_grad():
        return torch.cat([(model(xb).reshape(len(xb)) > 0).long() for xb in x.split(512)])


def _kernel(cfg: AttackRunConfig, x: torch.Tensor) -> tuple[torch.Tensor, str, int]:
    """The prior kernel on S ∪ T: arc-cosine NNGP (FCN) or the Monte-Carlo empirical kernel (ResNets)."""
    from ..prior import arccos_kernel, empirical_nngp_kernel

    t = cfg.train
    if t.model == "fcn":
        return (arccos_kernel(x.reshape(len(x), -1), n_hidden=len(t.hidden), sigma_w=t.sigma_w, sigma_b=t.sigma_b,
                              device="cpu"), "arccos", 0)
    m = cfg.kernel_samples or max(1, round(cfg.kernel_fraction * len(x)))
    K = empirical_nngp_kernel(lambda i: _init(t, seed=i), x, n_samples=m, sigma_b=t.sigma_b, device="cpu",
                              progress=False, seed_offset=_KERNEL_SEED_OFFSET)
    return K, "empirical", m


def _measure(cfg: AttackRunConfig, art: dict) -> dict:
    """One row: the run's identity and outcome, and (if it converged) log P(f), sharpness and ||H||_2."""
    from ..hessian import hessian_eigenvalues
    from ..prior import log_prior_ep
    from ..sharpness import keskar_sharpness

    t = cfg.train
    row = {c: math.nan for c in ROW_COLUMNS}
    row.update(panel=cfg.panel, dataset=t.dataset, model=t.model, optimizer=t.optimizer, n_train=t.n_train,
               n_attack=t.n_attack, n_test=t.n_test, draw=t.draw, seed=t.run_seed, status=art["status"],
               epochs=art["epochs"], train_error=art["train_error"], attack_error=art["attack_error"],
               test_error=art["test_error"], train_loss=art["train_loss"], likelihood="heaviside",
               ep_converged=False, ep_converged_probit=False, kernel=None)
    model = _init(t)
    model.load_state_dict(art["state_dict"])
    row["n_params"] = sum(p.numel() for p in model.parameters())
    if art["status"] != "converged":
        return row
    S, _, T = _task(t)
    x_st = torch.cat([S.x, T.x])
    y_pred = _predict(model, x_st)
    K, kind, m = _kernel(cfg, x_st)
    ep = log_prior_ep(K, y_pred, likelihood="heaviside")
    row.update(log_prior=ep.log_prob, log10_prior=ep.log10_prob, ep_converged=bool(ep.converged), kernel=kind,
               kernel_samples=m)
    if cfg.probit:
        pr = log_prior_ep(K, y_pred, likelihood="probit")
        row.update(log_prior_probit=pr.log_prob, log10_prior_probit=pr.log10_prob,
                   ep_converged_probit=bool(pr.converged))
    data = (S.x, S.y)
    seed = t.run_seed % (2 ** 31)
    row["sharpness"] = keskar_sharpness(model, sigmoid_bce, data, zeta=cfg.zeta, method="sgd", lr=cfg.sharpness_lr,
                                        epochs=cfg.sharpness_epochs, batch_size=cfg.sharpness_batch_size,
                                        seed=seed, eval_every=cfg.sharpness_eval_every).sharpness
    if cfg.lbfgsb:
        row["sharpness_lbfgsb"] = keskar_sharpness(model, sigmoid_bce, data, zeta=cfg.zeta, method="lbfgsb",
                                                   seed=seed).sharpness
    row["hessian_norm"] = float(hessian_eigenvalues(model, sigmoid_bce, data, k=1, seed=seed)[0])
    return row


def run(cfg: AttackRunConfig, store: ResultStore | None = None) -> list[dict]:
    """One run: train (or load the weights saved in ``store``'s artifacts) and measure; one row.

    A run that diverges or reaches ``max_epochs`` is a row with that ``status`` and NaN measurements.
    """
    art = trained(store, cfg.train, _train_one) if store is not None else _train_one(cfg.train)
    return [_measure(cfg, art)]


def run_all(cfgs: list[AttackRunConfig], store: ResultStore, *, executor=None, progress: bool = True) -> pd.DataFrame:
    """Every run of ``cfgs`` on :func:`flatness.runs.run_sweep` (resumable; only missing runs are computed)."""
    from functools import partial

    return run_sweep(partial(run, store=store), cfgs, store, executor=executor, progress=progress)

