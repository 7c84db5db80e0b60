"""Notebook 01: the Boolean n = 7 system, sampled prior vs flatness (Zhang et al. 2021, Sec. 5.1, Fig. 2, S3).

Protocol (the paper's is terse; this is the one the suite runs, stated in the notebook too):

1. **Prior.** Sample ``n_prior_samples`` networks 7-40-40-1 from the initialisation distribution
   (weights :math:`N(0, \\sigma_w^2/\\text{fan-in})`, biases :math:`N(0, \\sigma_b^2)`) and count the
   functions they compute on all 128 inputs: :math:`\\hat P(f) = \\text{count}/N`.
2. **Functions.** Pick ``n_functions`` functions with at least ``min_count`` samples (relative error of
   :math:`\\hat P` at most :math:`1/\\sqrt{\\text{min\\_count}}`): the most frequent ones (``selection="top"``,
   the paper's "top-1000") or evenly spread over :math:`\\log \\hat P` (``"stratified"``, which covers the
   range with few functions at reduced sizes).
3. **Training.** For each function, ``restarts`` networks drawn from the same initialisation are trained with
   plain SGD on all 128 inputs labelled by the function (mean sigmoid cross-entropy) until zero training
   error, i.e. until the network expresses exactly that function ("zero training error on all 128 outputs"),
   and on until the mean loss is at most ``loss_threshold``.
4. **Flatness.** When each run stops: Keskar sharpness (Definition 2.1, SGD ascent in the
   box, 10 epochs; L-BFGS-B as a check) and the Hessian spectral norm (Lanczos on Hessian-vector products), both of the mean
   cross-entropy on the 128 inputs; averaged over restarts.

On the experiment engine (:mod:`flatness.runs`): one run is one (function, restart) — a
:class:`BooleanRunConfig` holding its training config :class:`BooleanTrainConfig`, whose seeds derive from the
function and the restart alone (never from a position in a list). :func:`run` trains one network (or loads its
weights, an artifact keyed by the training config) and measures it; :func:`run_batch` trains every missing
network of a group as one stacked ``torch.func`` ensemble, each member following exactly the trajectory
:func:`run` would give it, then measures them. So a sweep can be split, resumed, batched or not, and give the
same rows.

Why a loss threshold: stopping at the *first* zero-error epoch compares functions at very different losses
(a constant function is fitted after one epoch at a loss near 0.5, a complex one after hundreds at a loss
near 0.05), and Keskar sharpness falls as the loss falls (Zhang et al. Sec. 5.4, Fig. 5), so it would measure
training time rather than the landscape. ``loss_threshold=None`` restores the first-zero-error rule.

Mingard et al.'s protocol (a fixed target, a training subset, the found function read on all inputs) was
tried first: SGD then finds the near-constant target's constant completion ~80% of the time and most other
functions once, so the most frequently found functions barely span the prior; see the notebook.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from .._checks import check_choice
from .._device import resolve_device
from ..boolean import MAX_N, boolean_inputs, hex_to_function
from ..losses import sigmoid_bce
from ..models import FCN
from ..results import ResultStore, config_key
from ..runs import RunConfig, param, profile_config, run_sweep, trained
from ..train import train_ensemble_to_zero_error, train_to_zero_error

__all__ = ["BooleanConfig", "BooleanTrainConfig", "BooleanRunConfig", "PROFILES", "config_for", "run_configs",
           "run", "run_batch", "run_all", "sample_prior", "select_functions", "per_function", "ep_vs_sampled"]


def _check_widths(where: str, widths: tuple[int, ...]) -> None:
    if len(widths) < 2 or widths[-1] != 1 or not 1 <= widths[0] <= MAX_N:
        raise ValueError(f"{where}: widths={widths} must start with the number of Boolean inputs n "
                         f"(1..{MAX_N}) and end with one output, e.g. (7, 40, 40, 1)")


@dataclass(frozen=True)
class BooleanConfig(RunConfig):
    """Every setting of notebook 01 (validated when made; stored whole with the results)."""

    VERSION: ClassVar[int] = 2  # 2: one run per (function, restart) on flatness.runs, seeds from the function

    widths: tuple[int, ...] = param((7, 40, 40, 1), min=1)  # FCN 7-40-40-1 (Zhang et al. Sec. 5.1)
    sigma_w: float = param(math.sqrt(2.0), positive=True)  # weight scale, as the FCN init of the MNIST runs
    sigma_b: float = param(1.0, min=0.0)  # bias scale (not recovered for the Boolean system)
    n_prior_samples: int = param(10_000_000, min=1)  # networks sampled for the prior (paper: ~1e9-1e10)
    n_functions: int = param(300, min=1)  # functions whose flatness is measured (paper: top 1000)
    selection: str = param("stratified", choices=("top", "stratified"))  # most frequent, or spread over log P
    min_count: int = param(10, min=1)  # a selected function was sampled at least this often
    restarts: int = param(1, min=1)  # SGD runs per function, flatness averaged over them
    lr: float = param(0.1, positive=True)  # SGD learning rate for training to zero error (not recovered)
    batch_size: int = param(32, min=1)  # SGD batch (not recovered)
    max_epochs: int = param(20_000, min=1)  # cap; runs that do not fit their function are reported and dropped
    loss_threshold: float | None = param(0.01, positive=True)  # train on until the mean loss is this low
    zeta: float = param(1e-2, positive=True)  # Keskar box size (not recovered); see the zeta sweep
    zeta_sweep: tuple[float, ...] = param((1e-3, 1e-2, 1e-1), positive=True)  # L-BFGS-B sharpness at each
    sharpness_lr: float = param(0.1, positive=True)  # SGD ascent lr: reaches L-BFGS-B's maximum in 10 epochs
    sharpness_epochs: int = param(10, min=1)  # "we ran SGD for 10 epochs" (Zhang et al. Sec. 5.1)
    sharpness_batch_size: int = param(32, min=1)
    n_ep_functions: int = param(300, min=1)  # selected functions whose EP log P is compared with the sample
    seed: int = param(0, min=0)

    def validate(self) -> None:
        super().validate()
        _check_widths("BooleanConfig", self.widths)


PROFILES: dict[str, dict] = {
    "smoke": dict(n_prior_samples=20_000, n_functions=12, min_count=3, max_epochs=3_000, n_ep_functions=20),
    "cpu": dict(n_prior_samples=10_000_000, n_functions=300, min_count=10, n_ep_functions=300),
    "paper": dict(n_prior_samples=1_000_000_000, n_functions=1000, selection="top", min_count=10, restarts=3,
                  n_ep_functions=1000),
}


def config_for(profile: str, **overrides) -> BooleanConfig:
    """The :class:`BooleanConfig` of a profile, with ``overrides`` (``None`` values are ignored).

    Every value is cast to its field's type and validated at once (``zeta=0``, ``lr=-1``, ``batch_size=0``,
    ``n_functions=0``, ``max_epochs=0`` or ``restarts=0`` raise naming the field), so nothing fails after
    hours of training.
    """
    check_choice("config_for", "profile", profile, PROFILES)
    return profile_config(BooleanConfig, PROFILES, profile, **overrides)


# ------------------------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class BooleanTrainConfig(RunConfig):
    """One network trained on one Boolean function (its weights are an artifact keyed by this config)."""

    VERSION: ClassVar[int] = 1
    BATCH_FIELDS: ClassVar[tuple[str, ...]] = ("function", "restart")

    function: str = param("0" * 32)  # the target, as hex (flatness.boolean.function_to_hex)
    restart: int = param(0, min=0)
    widths: tuple[int, ...] = param((7, 40, 40, 1), min=1)
    sigma_w: float = param(math.sqrt(2.0), positive=True)
    sigma_b: float = param(1.0, min=0.0)
    lr: float = param(0.1, positive=True)
    batch_size: int = param(32, min=1)
    max_epochs: int = param(20_000, min=1)
    loss_threshold: float | None = param(0.01, positive=True)
    seed: int = param(0, min=0)

    def validate(self) -> None:
        super().validate()
        _check_widths("BooleanTrainConfig", self.widths)
        hex_to_function(self.function, self.widths[0])  # raises on a malformed function

    @property
    def run_seed(self) -> int:
        """Seed of this run's initialisation and mini-batch order: a hash of (seed, function, restart) only."""
        h = hashlib.sha256(f"{self.seed}/{self.function}/{self.restart}".encode()).digest()
        return int.from_bytes(h[:7], "little")


@dataclass(frozen=True)
class BooleanRunConfig(RunConfig):
    """One measured run: its training config plus the flatness-measurement settings."""

    VERSION: ClassVar[int] = 1
    BATCH_FIELDS: ClassVar[tuple[str, ...]] = ("train",)

    train: BooleanTrainConfig = param(default_factory=BooleanTrainConfig)
    zeta: float = param(1e-2, positive=True)
    zeta_sweep: tuple[float, ...] = param((1e-3, 1e-2, 1e-1), positive=True)
    sharpness_lr: float = param(0.1, positive=True)
    sharpness_epochs: int = param(10, min=1)
    sharpness_batch_size: int = param(32, min=1)


def run_configs(cfg: BooleanConfig, functions: list[str]) -> list[BooleanRunConfig]:
    """One :class:`BooleanRunConfig` per (function, restart) of the study ``cfg``."""
    return [BooleanRunConfig(
        train=BooleanTrainConfig(function=f, restart=r, widths=cfg.widths, sigma_w=cfg.sigma_w, sigma_b=cfg.sigma_b,
                                 lr=cfg.lr, batch_size=cfg.batch_size, max_epochs=cfg.max_epochs,
                                 loss_threshold=cfg.loss_threshold, seed=cfg.seed),
        zeta=cfg.zeta, zeta_sweep=cfg.zeta_sweep, sharpness_lr=cfg.sharpness_lr,
        sharpness_epochs=cfg.sharpness_epochs, sharpness_batch_size=cfg.sharpness_batch_size)
        for f in functions for r in range(cfg.restarts)]


def _init(t: BooleanTrainConfig) -> FCN:
    return FCN(t.widths, t.sigma_w, t.sigma_b, seed=t.run_seed)


def _train_one(t: BooleanTrainConfig) -> dict:
    """Train one network (plain SGD, the single-model loop); the artifact: weights and outcome."""
    x, y = boolean_inputs(t.widths[0]), hex_to_function(t.function, t.widths[0])
    res = train_to_zero_error(_init(t), (x, y), optimizer="sgd", lr=t.lr, batch_size=t.batch_size,
                              max_epochs=t.max_epochs, seed=t.run_seed, loss_threshold=t.loss_threshold,
                              device=resolve_device())
    return {"state_dict": res.model.state_dict(), "status": res.status,
            "epochs_to_zero": -1 if res.epochs_to_zero is None else int(res.epochs_to_zero),
            "stop_epoch": int(res.history["epoch"].iloc[-1]) if res.status == "converged" else -1}


def _train_many(ts: list[BooleanTrainConfig], progress: bool = False) -> list[dict]:
    """Train the networks of ``ts`` as one stacked ensemble; member ``i`` follows :func:`_train_one`'s path."""
    t0 = ts[0]
    n = t0.widths[0]
    x = boolean_inputs(n)
    ys = torch.stack([hex_to_function(t.function, n) for t in ts])
    ens = train_ensemble_to_zero_error([_init(t) for t in ts], (x, ys), lr=t0.lr, batch_size=t0.batch_size,
                                       max_epochs=t0.max_epochs, seeds=[t.run_seed for t in ts],
                                       loss_threshold=t0.loss_threshold, device=resolve_device(), progress=progress)
    return [{"state_dict": ens.model(i).state_dict(), "status": ens.status[i],
             "epochs_to_zero": int(ens.epochs_to_zero[i]), "stop_epoch": int(ens.stop_epoch[i])}
            for i in range(len(ts))]


def _measure(cfg: BooleanRunConfig, art: dict) -> dict:
    """Keskar sharpness (SGD ascent; L-BFGS-B at every box size) and the Hessian spectral norm of one run."""
    from ..sharpness import hessian_eigenvalues, keskar_sharpness

    t = cfg.train
    row = {"function": t.function, "restart": t.restart, "run_seed": t.run_seed, "status": art["status"],
           "epochs_to_zero": art["epochs_to_zero"], "stop_epoch": art["stop_epoch"]}
    if art["status"] != "converged":
        return row
    model = _init(t)
    model.load_state_dict(art["state_dict"])
    model.to(resolve_device())  # $FLATNESS_DEVICE, else CUDA when present; the data follow the model
    data = (boolean_inputs(t.widths[0]), hex_to_function(t.function, t.widths[0]))
    seed = t.run_seed % (2 ** 31)
    ks = keskar_sharpness(model, sigmoid_bce, data, zeta=cfg.zeta, method="sgd", lr=cfg.sharpness_lr,
                          epochs=cfg.sharpness_epochs, batch_size=cfg.sharpness_batch_size, seed=seed)
    row.update(loss=ks.loss, sharpness=ks.sharpness)
    for z in sorted({cfg.zeta, *cfg.zeta_sweep}):
        row[f"sharpness_lbfgsb_{z:g}"] = keskar_sharpness(model, sigmoid_bce, data, zeta=z, method="lbfgsb",
                                                          seed=seed).sharpness
    row["sharpness_lbfgsb"] = row[f"sharpness_lbfgsb_{cfg.zeta:g}"]
    row["hessian_norm"] = float(hessian_eigenvalues(model, sigmoid_bce, data, k=1)[0])
    return row


def run(cfg: BooleanRunConfig, store: ResultStore | None = None) -> list[dict]:
    """One run: train (or load the weights saved in ``store``'s artifacts) and measure; one row."""
    art = trained(store, cfg.train, _train_one) if store is not None else _train_one(cfg.train)
    return [_measure(cfg, art)]


def run_batch(cfgs: list[BooleanRunConfig], store: ResultStore | None = None, progress: bool = False) -> list[dict]:
    """:func:`run` for a group of configs: every network not yet saved is trained in one stacked ensemble."""
    arts: dict[str, dict] = {}
    missing = []
    for c in cfgs:
        k = config_key(c.train)
        if store is not None and store.has_artifact(k):
            arts[k] = store.load_artifact(k)
        elif k not in arts:
            missing.append(c.train)
            arts[k] = None
    if missing:
        for t, art in zip(missing, _train_many(missing, progress=progress)):
            arts[config_key(t)] = art
            if store is not None:
                store.save_artifact(config_key(t), art)
    return [{**_measure(c, arts[config_key(c.train)]), "key": config_key(c)} for c in cfgs]


def run_all(cfg: BooleanConfig, functions: list[str], store: ResultStore, *, batched: bool = True,
            executor=None, progress: bool = True) -> pd.DataFrame:
    """Every run of the study on :func:`flatness.runs.run_sweep` (resumable; only missing runs are computed)."""
    from functools import partial

    return run_sweep(partial(run, store=store), run_configs(cfg, functions), store, executor=executor,
                     batch=partial(run_batch, store=store, progress=progress) if batched else None,
                     progress=progress)


# --------------------------------------------------------------------------------------- the prior
def select_functions(table: pd.DataFrame, n_samples: int, n_functions: int, selection: str = "stratified",
                     min_count: int = 10, seed: int = 0) -> pd.DataFrame:
    """Functions of a prior table (columns ``function``, ``count``) whose flatness will be measured.

    Returns columns ``function``, ``count``, ``log10_prior`` (one row per function, most frequent first).
    ``"stratified"`` bins :math:`\\log_{10}\\hat P` into ``n_functions`` equal-width bins and takes one
    random function per bin (cycling over the bins until ``n_functions`` are chosen or none are left).
    """
    check_choice("select_functions", "selection", selection, ("top", "stratified"))
    ok = table[table["count"] >= min_count].sort_values("count", ascending=False).reset_index(drop=True)
    if selection == "top" or len(ok) <= n_functions:
        chosen = ok.head(n_functions)
    else:
        rng = np.random.default_rng(seed)
        logp = np.log10(ok["count"].to_numpy() / n_samples)
        edges = np.linspace(logp.min(), logp.max() + 1e-12, n_functions + 1)
        bins = [list(rng.permutation(np.flatnonzero((logp >= lo) & (logp < hi))))
                for lo, hi in zip(edges[:-1], edges[1:])]
        picked: list[int] = []
        while len(picked) < n_functions and any(bins):
            for b in bins:
                if b and len(picked) < n_functions:
                    picked.append(int(b.pop()))
        chosen = ok.iloc[sorted(picked)]
    chosen = chosen.reset_index(drop=True).copy()
    chosen["log10_prior"] = np.log10(chosen["count"] / n_samples)
    return chosen[["function", "count", "log10_prior"]]


def sample_prior(cfg: BooleanConfig, cache_dir, device=None, progress: bool = True):
    """The sampled prior of ``cfg`` (:func:`flatness.prior.sample_function_counts`), cached as parquet.

    The cache file is named by a hash of the sampling settings, so changing any of them re-samples.
    """
    from pathlib import Path

    from ..prior.sampling import FunctionCounts, sample_function_counts

    spec = {"widths": list(cfg.widths), "sigma_w": cfg.sigma_w, "sigma_b": cfg.sigma_b,
            "n_samples": cfg.n_prior_samples, "seed": cfg.seed}
    path = Path(cache_dir) / f"prior_counts-{config_key(spec)}.parquet"
    if path.is_file():
        return FunctionCounts.load(path)
    counts = sample_function_counts(cfg.widths, n_samples=cfg.n_prior_samples, sigma_w=cfg.sigma_w,
                                    sigma_b=cfg.sigma_b, seed=cfg.seed, device=device, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts.save(path)
    return counts


def per_function(runs: pd.DataFrame, selected: pd.DataFrame) -> pd.DataFrame:
    """Mean flatness over the converged restarts of each function, joined with its sampled prior."""
    ok = runs[runs["status"] == "converged"]
    measures = [c for c in ok.columns if c.startswith("sharpness") or c in ("hessian_norm", "loss", "epochs_to_zero",
                                                                              "stop_epoch")]
    agg = ok.groupby("function")[measures].mean()
    agg["restarts"] = ok.groupby("function").size()
    return selected.merge(agg, left_on="function", right_index=True, how="inner")


def ep_vs_sampled(cfg: BooleanConfig, functions: pd.DataFrame, n_samples: int, likelihood: str = "heaviside",
                  progress: bool = True) -> pd.DataFrame:
    """EP's :math:`\\log P(f)` on the arc-cosine NNGP kernel of all ``2**n`` inputs vs the sampled prior.

    For the first ``cfg.n_ep_functions`` rows of ``functions`` (columns ``function``, ``count``; e.g. the output
    of :func:`select_functions`). Returns columns ``function``, ``count``, ``log10_prior`` (sampled),
    ``log10_prior_ep``, ``ep_converged``.
    """
    from tqdm.auto import tqdm

    from ..prior import ArcCosineNNGPKernel, log_prior

    n = cfg.widths[0]
    x = boolean_inputs(n, dtype=torch.float64)
    K = ArcCosineNNGPKernel.from_fcn(FCN(cfg.widths, cfg.sigma_w, cfg.sigma_b))(x).to_dense()  # once for all f
    top = functions.head(cfg.n_ep_functions)
    rows = []
    for h, c in tqdm(list(zip(top["function"], top["count"])), desc="EP", disable=not progress, mininterval=2.0):
        res = log_prior(K, y=hex_to_function(h, n), likelihood=likelihood)
        rows.append({"function": h, "count": int(c), "log10_prior": math.log10(c / n_samples),
                     "log10_prior_ep": res.log10_prob, "ep_converged": bool(res.converged)})
    return pd.DataFrame(rows)
