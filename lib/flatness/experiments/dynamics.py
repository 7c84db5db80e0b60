"""Notebook 05: training dynamics of sharpness and compression (Chen et al. 2023, Figs. 1 and 2).

Chen et al.'s first result: once SGD has found an (approximately) interpolating solution, sharpness
(:math:`\\sqrt{\\operatorname{Tr} H}`, eq. (zloss_sharpness)) and the local volumes of the representation (log
LVR, eq. (logvol); MLS, Definition 3.3; NMLS, Definition 3.7) decrease together, and higher learning rates
(Fig. 1) and smaller batches (Fig. 2) give lower sharpness and stronger compression; the local dimensionality
(eq. (dim)) behaves independently.

Protocol of one run (issue 12; the authors' ``chinsengi/sharpdim`` ``train.py``/``src/trainer.py`` at 2bcbe24):

1. **Data.** CIFAR-10 classes ``classes`` (airplane, automobile), the first ``n_train / k`` training and
   ``n_test / k`` test images of each class in the dataset's order (the authors take the first images too),
   pixels / 255, labels 0..k-1 (one-hot targets inside the loss).
2. **Model.** ``small_vgg`` (:class:`flatness.models.SmallVGG`, the authors' net) or torchvision's ``vgg11``,
   ``num_outputs`` outputs (default k = 2, the issue; the authors' code keeps 10 outputs, one-hot over 10
   classes), initialised by :func:`flatness.models.build` with ``seed``: the settings of one seed start from
   the same weights and draw the same mini-batch order, so settings are compared in pairs.
3. **Training.** Plain SGD (no momentum, no weight decay), ``lr``, ``batch_size``, mean ``half_mse``
   :math:`\\frac1{2n}\\sum_i\\lVert f(x_i)-e_{y_i}\\rVert^2` (for k = 2 this equals torch's ``MSELoss()``, the
   authors' loss, exactly; ``loss="mse"`` gives ``MSELoss`` for any k), for exactly ``iterations`` steps
   (:func:`flatness.train.train_to_zero_error` over-training without a stop rule; epochs = fresh permutations).
4. **Tracking.** At iteration 0 and every ``track_every`` iterations, in eval mode: on ``n_track`` fixed
   training inputs (the same for every run) :math:`\\sqrt{\\operatorname{Tr} H}` (the exact Gauss-Newton trace,
   :func:`flatness.hessian.hessian_trace` ``method="gauss_newton"``), MLS, log volume (all eigenvalues, and
   the top-``top_k`` = 3 of the authors' figures), local dimensionality (:func:`flatness.compression.local_metrics`),
   NMLS (:func:`flatness.compression.network_mls`); the training loss and error on ``n_loss`` training
   inputs (default all of them; the authors plot an exponential moving average of mini-batch losses); the test
   accuracy on the ``n_test`` test images.
5. **Checkpoints.** Every ``eval_epochs`` epochs (:class:`flatness.train.Checkpoint`: weights, optimizer,
   generator, RNG and the tracked rows): a killed run resumes where it was and gives the rows an uninterrupted
   run gives. The finished run (weights and every tracked row) is an artifact keyed by the config
   (:func:`flatness.runs.trained`), so a re-run reads it.

Rows: one per (run, tracked iteration), columns :data:`ROW_COLUMNS`. Analysis: :func:`late_phase` (the
iterations after approximate interpolation), :func:`late_phase_spearman`, :func:`final_values`,
:func:`ordering`, the claims :func:`claim_results`; figures :func:`figure_dynamics` (Fig. 1 ``vary="lr"``,
Fig. 2 ``vary="batch_size"``) and :func:`figure_late_trajectories`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from .._checks import check_choice
from ..results import ResultStore, config_key
from ..losses import half_mse
from ..runs import RunConfig, param, run_sweep, trained, with_overrides, worker_pool

__all__ = ["DynamicsConfig", "PROFILES", "SETTINGS", "BUDGETS", "REFERENCE_SETTING", "PAST_MINIMUM_SCALE",
           "setting_iterations", "STORE_NAME", "ROW_COLUMNS", "METRICS", "configs", "run",
           "run_all", "late_phase", "late_phase_spearman", "final_values", "ordering", "claim_results",
           "figure_dynamics",
           "figure_late_trajectories", "cost_estimate"]

STORE_NAME = "05_dynamics"  #: ``ResultStore(STORE_NAME, results/<profile>)``
MODELS = ("small_vgg", "vgg11")
#: The (lr, batch size) settings: Fig. 1 varies lr at batch 20, Fig. 2 the batch at lr 0.1; (0.1, 20) is shared.
SETTINGS = ((0.05, 20), (0.1, 20), (0.2, 20), (0.1, 8), (0.1, 32))
#: Tracked metrics (row columns) in the order of the paper's panels, then the others.
METRICS = ("loss", "nmls", "sqrt_trace_h", "log_volume_top3", "mls", "local_dim", "log_volume", "test_accuracy",
           "train_error")
#: Columns of every row (the store adds ``config`` and ``key``).
ROW_COLUMNS = ("run", "model", "lr", "batch_size", "seed", "iteration", "epoch", "loss", "train_error",
               "sqrt_trace_h", "mls", "log_volume", "log_volume_top3", "local_dim", "nmls", "test_accuracy",
               "status", "n_train")
_NO_STOP = 10 ** 9  # max_epochs / overtrain_epochs: the run ends only at `iterations`


@dataclass(frozen=True)
class DynamicsConfig(RunConfig):
    """One training run of Figs. 1-2, tracked every ``track_every`` iterations (validated when made)."""

    VERSION: ClassVar[int] = 1

    model: str = param("small_vgg", choices=MODELS)  # the authors' small VGG; torchvision VGG-11 at paper
    classes: tuple[int, ...] = param((0, 1), min=0, max=9)  # CIFAR-10 airplane, automobile
    num_outputs: int | None = param(None, min=2)  # None: one per class (issue); the authors' code: 10
    n_train: int = param(10_000, min=2)  # training images (paper: all 10,000 of classes 0 and 1)
    n_test: int = param(2000, min=2)  # test images for the test accuracy
    source: str = param("full", choices=("embedded", "full", "auto"))  # bundled subsets at smoke/cpu
    loss: str = param("half_mse", choices=("half_mse", "mse"))  # mse = torch MSELoss (= half_mse when k = 2)
    lr: float = param(0.1, positive=True)
    batch_size: int = param(20, min=1)
    iterations: int = param(750_000, min=1)  # SGD steps (paper 750k)
    track_every: int = param(200, min=1)  # the authors' cal_freq for Figs. 1-2
    n_track: int = param(20, min=1)  # fixed training inputs of the metrics (the authors' dim_nsample)
    n_loss: int | None = param(None, min=1)  # training inputs of the tracked loss (None: all)
    top_k: int = param(3, min=1)  # the authors' cal_logvol: top-3 eigenvalues
    eval_epochs: int = param(10, min=1)  # full-data pass and checkpoint every this many epochs
    seed: int = param(0, min=0)  # initialisation and mini-batch order

    def validate(self) -> None:
        super().validate()
        where = type(self).__name__
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"{where}: classes={self.classes} must be at least two distinct CIFAR-10 classes")
        k = len(self.classes)
        if self.num_outputs is not None and self.num_outputs < k:
            raise ValueError(f"{where}: num_outputs={self.num_outputs} must be >= the {k} classes")
        for name in ("n_train", "n_test"):
            if getattr(self, name) % k:
                raise ValueError(f"{where}: {name}={getattr(self, name)} must be a multiple of the {k} classes "
                                 f"(balanced: the same number of images per class)")
        if self.n_track > self.n_train:
            raise ValueError(f"{where}: n_track={self.n_track} exceeds n_train={self.n_train}")
        if self.n_loss is not None and self.n_loss > self.n_train:
            raise ValueError(f"{where}: n_loss={self.n_loss} exceeds n_train={self.n_train}")

    @property
    def k(self) -> int:
        """Network outputs."""
        return self.num_outputs or len(self.classes)

    @property
    def run_name(self) -> str:
        """The ``run`` column: model, lr, batch size and seed."""
        return f"{self.model}/lr={self.lr:g}/bs={self.batch_size}/seed={self.seed}"


# ------------------------------------------------------------------------------------------ profiles
#: Profile -> fields that differ from the defaults, plus the sweep (``seeds``, ``models``).
PROFILES: dict[str, dict] = {
    "smoke": dict(n_train=100, n_test=100, source="embedded", iterations=40, track_every=20, n_track=3,
                  eval_epochs=100, seeds=1, models=("small_vgg",)),
    "cpu": dict(n_train=4000, n_test=500, n_loss=500, source="embedded", iterations=5000, track_every=200,
                n_track=20, eval_epochs=100, seeds=2, models=("small_vgg",), budget="past_minimum"),
    "paper": dict(n_train=10_000, n_test=2000, source="full", iterations=750_000, track_every=200, n_track=20,
                  eval_epochs=10, seeds=5, models=MODELS),
}
#: Iteration budgets across settings, as multiples of ``iterations`` (the reference setting (0.1, 20)'s steps):
#:
#: * ``"equal"`` (the paper): every setting runs ``iterations`` steps;
#: * ``"matched"``: ``max(1, lr_ref / lr, batch_ref / batch)``, so each setting gets at least the reference's SGD
#:   time lr x steps and its number of samples batch x steps (lr 0.05: 2x, batch 8: 2.5x);
#: * ``"past_minimum"`` (cpu): :data:`PAST_MINIMUM_SCALE` where given, else ``"matched"``'s: set from cpu pilots so
#:   that every setting passes its loss minimum (issue 12: "a documented number of iterations long enough to pass
#:   the loss minimum"). At 5,000 iterations lr 0.05's loss was still falling with sharpness still rising; with
#:   batch 8 at 2.5x (12,500) the loss was still halving every ~5,000 iterations (0.005 at the end) and the
#:   late-phase rule started on the noise floor at iteration 2,600; hence 5x (25,000 = 50 epochs) for batch 8.
BUDGETS = ("equal", "matched", "past_minimum")
REFERENCE_SETTING = (0.1, 20)
PAST_MINIMUM_SCALE = {(0.05, 20): 2.0, (0.1, 8): 5.0}


def setting_iterations(iterations: int, lr: float, batch_size: int, budget: str = "equal") -> int:
    """The steps of one (lr, batch) setting under ``budget`` (:data:`BUDGETS`) given the reference's
    ``iterations``."""
    check_choice("setting_iterations", "budget", budget, BUDGETS)
    if budget == "equal":
        return int(iterations)
    lr_ref, bs_ref = REFERENCE_SETTING
    scale = max(1.0, lr_ref / lr, bs_ref / batch_size)
    if budget == "past_minimum":
        scale = next((v for (lr_s, bs_s), v in PAST_MINIMUM_SCALE.items()
                      if math.isclose(lr_s, lr) and bs_s == batch_size), scale)
    return int(math.ceil(iterations * scale - 1e-9))


_FIELDS = {f for f in DynamicsConfig.__dataclass_fields__}


def configs(profile: str, *, seeds: int | None = None, models=None, settings=None, budget: str | None = None,
            **overrides) -> list[DynamicsConfig]:
    """The run configs of a profile: every model x (lr, batch) setting x seed.

    Args:
        profile: ``"smoke"``, ``"cpu"`` or ``"paper"``.
        seeds: number of seeds (``0 .. seeds - 1``; default: the profile's, 1 / 2 / 5).
        models: model names (default: the profile's; ``vgg11`` only at ``paper``).
        settings: ``(lr, batch_size)`` pairs (default :data:`SETTINGS`).
        budget: ``"equal"``, ``"matched"`` or ``"past_minimum"`` iterations across settings (:data:`BUDGETS`,
            :func:`setting_iterations`; default: the profile's, ``"past_minimum"`` at cpu, else ``"equal"``);
            ``iterations`` is the reference setting's (lr 0.1, batch 20).
        **overrides: fields of :class:`DynamicsConfig` for every run (``None`` values are ignored), each cast
            and validated at once, e.g. ``iterations="2e4"``.

    Raises:
        ValueError: an unknown profile, model or field, or a value a field's checks reject.
    """
    fn = "configs"
    check_choice(fn, "profile", profile, PROFILES)
    spec = dict(PROFILES[profile])
    n_seeds, mods = spec.pop("seeds"), spec.pop("models")
    profile_budget = spec.pop("budget", "equal")
    budget = profile_budget if budget is None else budget
    check_choice(fn, "budget", budget, BUDGETS)
    n_seeds = n_seeds if seeds is None else seeds
    if isinstance(n_seeds, float) and n_seeds.is_integer():
        n_seeds = int(n_seeds)
    if not isinstance(n_seeds, int) or isinstance(n_seeds, bool) or n_seeds < 1:
        raise ValueError(f"{fn}: seeds={seeds!r}; expected a positive integer")
    mods = mods if models is None else ((models,) if isinstance(models, str) else tuple(models))
    for m in mods:
        check_choice(fn, "models", m, MODELS)
    unknown = [k for k in overrides if k not in _FIELDS or k in ("lr", "batch_size", "seed", "model")]
    if unknown:
        raise ValueError(f"{fn}: unknown field(s) {unknown} (lr, batch_size, seed and model are set by the sweep: use "
                         f"settings=, seeds=, models=); valid fields are "
                         f"{sorted(_FIELDS - {'lr', 'batch_size', 'seed', 'model'})}")
    base = with_overrides(DynamicsConfig(**{k: v for k, v in spec.items()}),
                          **{k: v for k, v in overrides.items() if v is not None})
    pairs = SETTINGS if settings is None else tuple(tuple(s) for s in settings)
    return [with_overrides(base, model=m, lr=lr, batch_size=bs, seed=s,
                           iterations=setting_iterations(base.iterations, lr, bs, budget))
            for m in mods for lr, bs in pairs for s in range(n_seeds)]


# ------------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=4)
def _split(classes: tuple[int, ...], split: str, n: int, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n / k`` images of each class of ``split`` in dataset order: ``x`` (n, 3, 32, 32) in [0, 1],
    ``y`` in 0..k-1 (class ``classes[j]`` -> ``j``), ordered by class then position."""
    from ..data import load_dataset

    ds = load_dataset("cifar10", split, source=source)
    per = n // len(classes)
    idx = []
    for c in classes:
        where = torch.nonzero(ds.labels == c).flatten()
        if len(where) < per:
            raise ValueError(f"05_dynamics: {split} has {len(where)} images of CIFAR-10 class {c} "
                             f"(source={source!r}); n_{split}={n} needs {per} per class")
        idx.append(where[:per])
    idx = torch.cat(idx)
    x = ds.images[idx].permute(0, 3, 1, 2).float().div(255).contiguous()
    y = torch.cat([torch.full((per,), j, dtype=torch.int64) for j in range(len(classes))])
    return x, y


def _track_indices(n_train: int, n_track: int) -> torch.Tensor:
    """The fixed training inputs of the metrics: a seeded permutation's first ``n_track`` (same for every run)."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(20230))[:n_track]


def _loss_fn(name: str, k: int):
    """:func:`~flatness.losses.half_mse`, or torch's ``MSELoss`` (the mean over the N x k entries: 2/k of it)."""
    if name == "half_mse":
        return half_mse
    scale = 2.0 / k

    def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return scale * half_mse(out, y)

    mse.__name__ = name
    return mse


def _init(cfg: DynamicsConfig) -> torch.nn.Module:
    from ..models import build

    return build(cfg.model, seed=cfg.seed, num_classes=cfg.k)


# ------------------------------------------------------------------------------------------ one run
def _metrics(cfg: DynamicsConfig, x_loss, y_loss, x_track, x_test, y_test, loss_fn):
    """The tracked values of a model: ``metrics(model, data) -> dict`` for :class:`flatness.train.Track`."""
    from ..compression import local_metrics, network_mls
    from ..hessian import hessian_trace

    top_k = min(cfg.top_k, cfg.k)

    @torch.no_grad()
    def _loss_err(model, x, y):
        tot_l = tot_e = 0.0
        for xb, yb in zip(x.split(250), y.split(250)):
            out = model(xb)
            tot_l += float(loss_fn(out, yb)) * len(xb)
            tot_e += float((out.argmax(1) != yb).sum())
        return tot_l / len(x), tot_e / len(x)

    def metrics(model, _data) -> dict:
        loss, err = _loss_err(model, x_loss, y_loss)
        _, test_err = _loss_err(model, x_test, y_test)
        row = {"loss": loss, "train_error": err, "test_accuracy": 1.0 - test_err}
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            return {**row, **{m: math.nan for m in ("sqrt_trace_h", "mls", "log_volume", "log_volume_top3",
                                                     "local_dim", "nmls")}}
        tr = hessian_trace(model, None, (x_track, torch.zeros(len(x_track))), method="gauss_newton").value
        lm = local_metrics(model, x_track)
        top = lm if top_k == min(cfg.k, x_track[0].numel()) else local_metrics(model, x_track, top_k=top_k)
        row.update(sqrt_trace_h=math.sqrt(max(tr, 0.0)), mls=float(lm["mls"].mean()),
                   log_volume=float(lm["log_volume"].mean()), log_volume_top3=float(top["log_volume"].mean()),
                   local_dim=float(lm["local_dim"].mean()), nmls=float(network_mls(model, x_track).mean()))
        return row

    return metrics


def _train(cfg: DynamicsConfig, store: ResultStore | None, device=None, progress: bool = False) -> dict:
    """Train one run for ``cfg.iterations`` SGD steps, tracked and checkpointed; the artifact."""
    from .._device import resolve_device
    from ..train import Callback, Checkpoint, Track, train_to_zero_error

    device = resolve_device(device)
    x, y = _split(cfg.classes, "train", cfg.n_train, cfg.source)
    x_test, y_test = _split(cfg.classes, "test", cfg.n_test, cfg.source)
    loss_fn = _loss_fn(cfg.loss, cfg.k)
    n_loss = cfg.n_loss or cfg.n_train
    loss_idx = torch.arange(cfg.n_train) if n_loss == cfg.n_train else _track_indices(cfg.n_train, n_loss)
    x_track = x[_track_indices(cfg.n_train, cfg.n_track)].to(device)
    metrics = _metrics(cfg, x[loss_idx].to(device), y[loss_idx].to(device), x_track, x_test.to(device),
                       y_test.to(device), loss_fn)

    class Tracker(Track):
        order = 200  # on_train_begin after Checkpoint's restore: iteration 0 is measured once, on a fresh run

        def on_train_begin(self, state):
            if state.step == 0 and not state.tracks:
                state.add_step_values(self._measure(state))

    class StopAt(Callback):
        def on_step(self, state):
            return state.step >= cfg.iterations

    callbacks = [Tracker(metrics, every=cfg.track_every, on="step", data=(x_track, x_track)),
                 StopAt(every_steps=cfg.iterations)]
    ckpt_key = f"checkpoint-{config_key(cfg)}"
    if store is not None:
        callbacks.append(Checkpoint(store, ckpt_key, every=1))  # every evaluated epoch (eval_epochs)
    res = train_to_zero_error(_init(cfg), (x, y), optimizer="sgd", lr=cfg.lr, batch_size=cfg.batch_size,
                              max_epochs=_NO_STOP, overtrain_epochs=_NO_STOP, seed=cfg.seed, callbacks=callbacks,
                              loss_fn=loss_fn, device=device, progress=progress, eval_every=cfg.eval_epochs)
    tracks = res.tracks.to_dict("records")
    status = "diverged" if res.status == "diverged" else "ok"
    return {"state_dict": {k: v.cpu() for k, v in res.model.state_dict().items()}, "status": status,
            "tracks": tracks, "history": res.history.to_dict("records"),
            "steps": int(tracks[-1]["step"]) if tracks else 0}


def run(cfg: DynamicsConfig, store: ResultStore | None = None, *, device=None, progress: bool = False) -> list[dict]:
    """One run: train (or load the finished run from ``store``'s artifacts; resume a killed one from its
    checkpoint) and return one row per tracked iteration (:data:`ROW_COLUMNS`).

    A diverged run keeps the rows tracked before it diverged, every row with ``status="diverged"``.
    """
    train = functools.partial(_train, store=store, device=device, progress=progress)
    if store is None:
        art = train(cfg)
    else:
        art = trained(store, cfg, train)
        ckpt = f"checkpoint-{config_key(cfg)}"
        if store.has_artifact(ckpt):  # the finished run is saved: its checkpoint is no longer needed
            store.delete_artifact(ckpt)
    ident = {"run": cfg.run_name, "model": cfg.model, "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed,
             "status": art["status"], "n_train": cfg.n_train}
    rows = []
    for t in art["tracks"]:
        row = {c: math.nan for c in ROW_COLUMNS}
        row.update(ident, iteration=int(t["step"]), epoch=int(t["epoch"]),
                   **{m: float(t[m]) for m in METRICS if m in t})
        rows.append(row)
    return rows


def run_all(cfgs: list[DynamicsConfig], store: ResultStore, *, executor=None, workers: int | None = None,
            progress: bool = True) -> pd.DataFrame:
    """Every run of ``cfgs`` on :func:`flatness.runs.run_sweep` (resumable: only missing runs are computed; a
    killed run resumes from its last checkpoint). ``executor``: a ``concurrent.futures`` executor or a Dask
    client; without one, ``workers`` single-threaded local processes (:func:`flatness.runs.worker_pool`; ``None``
    or 1: in this process). The runs are independent and submitted longest first, so workers end together."""
    cfgs = list(cfgs)
    todo = sorted(cfgs, key=lambda c: -c.iterations * c.batch_size)
    with worker_pool(workers if executor is None else None) as pool:
        df = run_sweep(functools.partial(run, store=store), todo, store, executor=executor or pool,
                       progress=progress)
    if not len(df):
        return df
    order = {config_key(c): i for i, c in enumerate(cfgs)}
    return (df.assign(_o=df["key"].map(order)).sort_values(["_o", "iteration"], kind="stable")
            .drop(columns="_o").reset_index(drop=True))


# ------------------------------------------------------------------------------------------ analysis
def _runs(df: pd.DataFrame) -> pd.DataFrame:
    need = {"run", "iteration", "loss"}
    if not need <= set(df.columns):
        raise ValueError(f"05_dynamics: the table lacks columns {sorted(need - set(df.columns))}; expected the rows "
                         f"of run()/run_all()")
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    return ok.sort_values(["run", "iteration"], kind="stable")


def late_phase(df: pd.DataFrame, loss_factor: float = 10.0) -> pd.DataFrame:
    """The rows of each run after it has (approximately) minimised the training loss.

    A run's late phase starts at its first tracked iteration whose training loss is within ``loss_factor``
    of the smallest loss it reaches (the paper's "after the loss is minimized (so that an approximate
    interpolation solution is found)"; a loss that keeps falling slowly is "minimised" once it is within that
    factor of its final level); the start is in column ``late_start``. Diverged runs and error rows are left out.

    Raises:
        ValueError: ``loss_factor`` < 1, or a table without the row columns.
    """
    if not loss_factor >= 1:
        raise ValueError(f"late_phase: loss_factor={loss_factor!r} must be >= 1")
    out = []
    for _, g in _runs(df).groupby("run", sort=False):
        ok = g["loss"] <= loss_factor * g["loss"].min()
        start = int(g.loc[ok, "iteration"].iloc[0])
        out.append(g[g["iteration"] >= start].assign(late_start=start))
    return pd.concat(out, ignore_index=True) if out else df.iloc[:0].assign(late_start=pd.Series(dtype=int))


def late_phase_spearman(df: pd.DataFrame, metrics=("sqrt_trace_h", "mls", "log_volume_top3"), *, x: str = "iteration",
                        loss_factor: float = 10.0, n_boot: int = 2000) -> pd.DataFrame:
    """Spearman correlation of ``x`` with each metric over each run's late phase (:func:`late_phase`).

    Returns one row per (run, metric): ``run``, ``lr``, ``batch_size``, ``seed``, ``metric``, ``r``, ``ci_low``,
    ``ci_high`` (bootstrap 95%, :func:`flatness.stats.correlation`), ``n`` (tracked iterations), ``late_start``.
    Runs with fewer than 3 late iterations get ``r = NaN``.
    """
    from ..stats import correlation

    late = late_phase(df, loss_factor)
    rows = []
    for run_name, g in late.groupby("run", sort=False):
        for m in metrics:
            base = {"run": run_name, "lr": g["lr"].iloc[0], "batch_size": g["batch_size"].iloc[0],
                    "seed": g["seed"].iloc[0], "metric": m, "late_start": int(g["late_start"].iloc[0]), "n": len(g)}
            try:
                c = correlation(g[x], g[m], "spearman", n_boot=n_boot)
                base.update(r=c.r, ci_low=c.ci_low, ci_high=c.ci_high, n=c.n)
            except ValueError:
                base.update(r=math.nan, ci_low=math.nan, ci_high=math.nan)
            rows.append(base)
    return pd.DataFrame(rows, columns=["run", "lr", "batch_size", "seed", "metric", "r", "ci_low", "ci_high", "n",
                                       "late_start"])


def final_values(df: pd.DataFrame, metrics=("sqrt_trace_h", "mls", "log_volume_top3", "local_dim"),
                 frac: float = 0.1) -> pd.DataFrame:
    """Each run's metrics averaged over its last ``frac`` of the iterations (the "final" values), per run.

    Returns one row per run: ``run``, ``lr``, ``batch_size``, ``seed`` and the metrics.
    """
    if not 0 < frac <= 1:
        raise ValueError(f"final_values: frac={frac!r} must be in (0, 1]")
    rows = []
    for run_name, g in _runs(df).groupby("run", sort=False):
        last = g["iteration"].max()
        tail = g[g["iteration"] >= last - frac * last]
        rows.append({"run": run_name, "lr": g["lr"].iloc[0], "batch_size": g["batch_size"].iloc[0],
                     "seed": g["seed"].iloc[0], **{m: float(tail[m].mean()) for m in metrics}})
    return pd.DataFrame(rows)


def ordering(final: pd.DataFrame, along: str, metric: str, *, fixed: dict | None = None,
             decreasing: bool = True) -> dict:
    """Is the seed-mean ``metric`` monotone along ``along`` (``"lr"`` or ``"batch_size"``)?

    ``fixed`` selects the other setting (default: batch 20 for ``lr``, lr 0.1 for ``batch_size``). With
    ``decreasing=True`` the expected order is metric(v_1) > metric(v_2) > ... for increasing values ``v``.
    Returns ``values`` (setting -> seed mean), ``gaps`` (successive differences in the expected direction),
    ``min_gap`` (the statistic: > 0 when the order holds), ``holds``, ``n_seeds``.
    """
    check_choice("ordering", "along", along, ("lr", "batch_size"))
    fixed = fixed or ({"batch_size": 20} if along == "lr" else {"lr": 0.1})
    sub = final
    for k, v in fixed.items():
        sub = sub[np.isclose(sub[k], v)]
    means = sub.groupby(along)[metric].mean().sort_index()
    vals = means.to_numpy()
    gaps = (vals[:-1] - vals[1:]) if decreasing else (vals[1:] - vals[:-1])
    min_gap = float(gaps.min()) if len(gaps) else math.nan
    return {"values": {float(k): float(v) for k, v in means.items()}, "gaps": gaps.tolist(), "min_gap": min_gap,
            "holds": bool(len(gaps) >= 1 and np.all(gaps > 0)), "n_seeds": int(sub.groupby(along).size().min())
            if len(sub) else 0}


# -------------------------------------------------------------------------------------------- claims
_DECLINE = (("sqrt_trace_h", "sqrt(Tr H)"), ("mls", "MLS"), ("log_volume_top3", "log volume (top 3)"))


def claim_results(df: pd.DataFrame, *, loss_factor: float = 10.0, final_frac: float = 0.1,
                  n_boot: int = 2000, spearman: pd.DataFrame | None = None,
                  final: pd.DataFrame | None = None) -> list[dict]:
    """Issue 12's claims, measured: keyword arguments for :func:`flatness.claims.record` (without ``notebook``
    and ``profile``).

    1. ``late_decline_<metric>`` (sqrt(Tr H), MLS, top-3 log volume): Spearman(iteration, metric) < 0 over the
       late phase (:func:`late_phase`) of **every** run; the statistic is the largest r over the runs, with that
       run's bootstrap 95% interval; a run with fewer than 3 late points counts as not declining.
    2. ``order_lr_<metric>`` / ``order_batch_<metric>`` (sqrt(Tr H), MLS): the seed-mean final values
       (:func:`final_values`) ordered 0.05 > 0.1 > 0.2 along lr (batch 20) and 8 < 20 < 32 along the batch (lr
       0.1); the statistic is the smallest gap in the expected direction (> 0 when the order holds), no interval.
    The local dimensionality is not a claim (the paper finds it behaves independently).

    ``spearman`` / ``final``: :func:`late_phase_spearman` (over at least these metrics) and :func:`final_values`
    of ``df`` when the caller already has them (computed here otherwise, with ``loss_factor`` and ``final_frac``).
    """
    sp = (late_phase_spearman(df, tuple(m for m, _ in _DECLINE), loss_factor=loss_factor, n_boot=n_boot)
          if spearman is None else spearman)
    n_runs = _runs(df)["run"].nunique()
    out = []
    for metric, name in _DECLINE:
        s = sp[sp["metric"] == metric]
        worst = s.loc[s["r"].idxmax()] if s["r"].notna().any() else None
        ok = n_runs > 0 and len(s) == n_runs and bool((s["r"] < 0).all())
        out.append(dict(claim=f"late_decline_{metric}",
                        statistic=f"max over runs of Spearman(iteration, {name}) in the late phase",
                        value=float(worst["r"]) if worst is not None else math.nan,
                        ci=(float(worst["ci_low"]), float(worst["ci_high"])) if worst is not None else None,
                        expected="< 0 in every run", holds=ok, n=int(len(s)), figure="05_late_phase_trajectories",
                        paper_ref="Chen et al. 2023, Figs. 1-2",
                        text=f"After the loss minimum, {name} decreases, in every run"))
    final = final_values(df, frac=final_frac) if final is None else final
    for metric, name in _DECLINE[:2]:
        o_lr = ordering(final, "lr", metric, decreasing=True)  # 0.05 > 0.1 > 0.2
        o_bs = ordering(final, "batch_size", metric, decreasing=False)  # 8 < 20 < 32
        out.append(dict(claim=f"order_lr_{metric}", statistic=f"min gap of seed-mean final {name} along lr "
                        f"0.05 > 0.1 > 0.2 (values {_fmt(o_lr['values'])})", value=o_lr["min_gap"], ci=None,
                        expected="> 0 (both gaps)", holds=o_lr["holds"], n=o_lr["n_seeds"],
                        figure="05_fig1_lr_dynamics", paper_ref="Chen et al. 2023, Fig. 1",
                        text=f"Higher learning rate gives lower final {name}"))
        out.append(dict(claim=f"order_batch_{metric}", statistic=f"min gap of seed-mean final {name} along batch "
                        f"8 < 20 < 32 (values {_fmt(o_bs['values'])})", value=o_bs["min_gap"], ci=None,
                        expected="> 0 (both gaps)", holds=o_bs["holds"], n=o_bs["n_seeds"],
                        figure="05_fig2_batch_dynamics", paper_ref="Chen et al. 2023, Fig. 2",
                        text=f"Smaller batch gives lower final {name}"))
    return out


def _fmt(values: dict) -> str:
    return ", ".join(f"{k:g}: {v:.3g}" for k, v in values.items())


# ------------------------------------------------------------------------------------------- figures
_LABELS = {"loss": "training loss", "nmls": "NMLS", "sqrt_trace_h": r"sharpness $\sqrt{\mathrm{Tr}\,H}$",
           "log_volume_top3": "log volume (top 3)", "log_volume": "log volume", "mls": "MLS",
           "local_dim": "local dimensionality", "test_accuracy": "test accuracy", "train_error": "training error"}
_PANELS = ("loss", "nmls", "sqrt_trace_h", "log_volume_top3", "mls", "local_dim")


def figure_dynamics(df: pd.DataFrame, vary: str = "lr", *, fixed: dict | None = None, panels=_PANELS,
                    late_start: bool = True, loss_factor: float = 10.0):
    """Fig. 1 (``vary="lr"``, batch 20) or Fig. 2 (``vary="batch_size"``, lr 0.1): six panels against the
    iteration, one line per setting (mean over seeds) with a band of one standard deviation across seeds
    (none with one seed); a dotted line marks the start of the late phase (:func:`late_phase`, mean over
    seeds). Returns the figure."""
    import matplotlib.pyplot as plt

    check_choice("figure_dynamics", "vary", vary, ("lr", "batch_size"))
    fixed = fixed or ({"batch_size": 20} if vary == "lr" else {"lr": 0.1})
    sub = _runs(df)
    for k, v in fixed.items():
        sub = sub[np.isclose(sub[k], v)]
    values = sorted(sub[vary].unique())
    ncol = 3
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(len(values), 1)))
    starts = late_phase(sub, loss_factor).groupby(vary)["late_start"].mean() if late_start and len(sub) else {}
    for ax, m in zip(axes.flat, panels):
        for c, v in zip(colors, values):
            g = sub[np.isclose(sub[vary], v)].groupby("iteration")[m]
            mean, sd = g.mean(), g.std(ddof=1).fillna(0.0)
            label = f"{'lr' if vary == 'lr' else 'batch'} = {v:g}"
            ax.plot(mean.index, mean.to_numpy(), color=c, lw=1.4, label=label)
            ax.fill_between(mean.index, (mean - sd).to_numpy(), (mean + sd).to_numpy(), color=c, alpha=0.2, lw=0)
            if v in getattr(starts, "index", ()):
                ax.axvline(starts[v], color=c, ls=":", lw=1)
        if m == "loss":
            ax.set_yscale("log")
        ax.set(xlabel="iteration", ylabel=_LABELS.get(m, m))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8, frameon=False)
    fixed_txt = ", ".join(f"{'batch' if k == 'batch_size' else k} = {v:g}" for k, v in fixed.items())
    n_seeds = sub.groupby(vary)["seed"].nunique().min() if len(sub) else 0
    fig.suptitle(f"{'Fig. 1' if vary == 'lr' else 'Fig. 2'}: varying {'learning rate' if vary == 'lr' else 'batch size'}"
                 f" ({fixed_txt}; mean ± sd over {n_seeds} seed(s))", fontsize=11)
    fig.tight_layout()
    return fig


def figure_late_trajectories(df: pd.DataFrame, *, ys=("mls", "log_volume_top3"), loss_factor: float = 10.0):
    """For each run, its late-phase trajectory of MLS and log volume (rows) against :math:`\\sqrt{\\operatorname{Tr} H}`
    (one column per setting, seeds as separate lines coloured by iteration), annotated with the Spearman
    correlation over the post-minimum iterations. Returns the figure."""
    import matplotlib.pyplot as plt

    from ..stats import correlation

    late = late_phase(df, loss_factor)
    settings = sorted({(float(a), int(b)) for a, b in zip(late["lr"], late["batch_size"])},
                      key=lambda s: (s[1] != 20, s[1], s[0]))
    fig, axes = plt.subplots(len(ys), max(len(settings), 1), figsize=(3.2 * max(len(settings), 1), 2.9 * len(ys)),
                             squeeze=False)
    markers = "os^Dv<>p"
    for j, (lr, bs) in enumerate(settings):
        g_set = late[np.isclose(late["lr"], lr) & (late["batch_size"] == bs)]
        for i, yname in enumerate(ys):
            ax = axes[i, j]
            txt = []
            for s_i, (seed, g) in enumerate(g_set.groupby("seed")):
                ax.plot(g["sqrt_trace_h"], g[yname], color="0.7", lw=0.7, zorder=1)
                ax.scatter(g["sqrt_trace_h"], g[yname], c=g["iteration"], cmap="viridis", s=10,
                           marker=markers[s_i % len(markers)], zorder=2)
                try:
                    c = correlation(g["sqrt_trace_h"], g[yname], "spearman", n_boot=0)
                    txt.append(f"seed {seed}: ρ = {c.r:+.2f} (n={c.n})")
                except ValueError:
                    txt.append(f"seed {seed}: n < 3")
            ax.text(0.02, 0.98, "\n".join(txt), transform=ax.transAxes, va="top", fontsize=7,
                    bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8, "lw": 0})
            ax.set(xlabel=r"$\sqrt{\mathrm{Tr}\,H}$" if i == len(ys) - 1 else "", ylabel=_LABELS[yname] if j == 0 else "")
            if i == 0:
                ax.set_title(f"lr = {lr:g}, batch = {bs}", fontsize=9)
    fig.suptitle("Late phase (after the loss minimum): compression against sharpness, colour = iteration",
                 fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- cost
def cost_estimate(cfgs: list[DynamicsConfig], step_s: dict[int, float], track_s: float,
                  eval_img_s: float = 0.0) -> dict:
    """Predicted compute of a sweep from measured unit costs (seconds): ``step_s[batch_size]`` per SGD step,
    ``track_s`` per tracked point, ``eval_img_s`` per image of the full-data passes (every ``eval_epochs``).

    Returns ``{"runs", "steps", "tracks", "seconds", "hours"}`` (one device, runs one after the other).
    """
    steps = sum(c.iterations for c in cfgs)
    tracks = sum(c.iterations // c.track_every + 1 for c in cfgs)
    secs = 0.0
    for c in cfgs:
        epochs = c.iterations * c.batch_size / c.n_train
        secs += (c.iterations * step_s[c.batch_size] + (c.iterations // c.track_every + 1) * track_s
                 + epochs / c.eval_epochs * c.n_train * eval_img_s)
    return {"runs": len(cfgs), "steps": steps, "tracks": tracks, "seconds": secs, "hours": secs / 3600}
