"""Notebook 03: optimizers break the flatness correlation, not the prior's (Zhang et al. 2021, Sec. 5.3, Fig. 4,
S4, S17, S18).

The attack-set sweep of notebook 02 (:mod:`flatness.experiments.attack`: train on :math:`S \\cup A` to zero error
on S, then measure :math:`\\log P(f)` by EP, Keskar sharpness and the Hessian spectral norm) with the training
optimizer as one more axis: ``sgd`` (the baseline), ``adam`` and ``entropy_sgd`` (Fig. 4), ``adagrad``,
``momentum``, ``rmsprop`` and full-batch ``gd`` (Fig. S18), each with the registry's reference hyper-parameters
(:func:`flatness.train.optim.optimizer_table`: the sheet's values where the authors' script gave them, else the
Keras defaults the paper names). On the MNIST FCN every run also gets the Hessian flatness of Fig. S4: the log
product of the top-50 Hessian eigenvalues (:func:`flatness.sharpness.log_top_eig_product`, ``log_top50``) beside
notebook 02's spectral norm (``hessian_norm``).

One run is an :class:`OptimizerRunConfig`: notebook 02's :class:`~flatness.experiments.attack.AttackRunConfig`
(its ``train.optimizer`` and ``train.lr`` set) plus ``top_k``. The row is notebook 02's row
(:data:`flatness.experiments.attack.ROW_COLUMNS`, computed by :func:`flatness.experiments.attack.run`) plus
``log_top50`` and ``reused``. Reuse: when notebook 02's store (``ResultStore("02_attack", results/<profile>)``,
passed as ``reuse``) already holds a run of the same ``AttackRunConfig`` (the plain-SGD runs, whose configs are
notebook 02's), its row and trained weights are taken from there (``reused = "02_attack"``) and only
``log_top50`` is computed; otherwise the run is trained and measured here (``reused = ""``), its weights an
artifact of this notebook's store.

A run that does not reach zero training error within ``max_epochs`` keeps ``status = "max_epochs"`` (no
measurements); it is left out of every correlation and counted in the figure titles.

Figures: :func:`figure_fig4` (per optimizer and FCN panel: log10 P and sharpness vs test error), :func:`figure_s4`
(spectral norm and top-50 log product vs test error and vs sharpness), :func:`figure_s17` (ResNet, Adam vs SGD),
:func:`figure_s18` (the other optimizers), :func:`figure_forest` (Spearman(log P, error) and Spearman(sharpness,
error) with CIs per optimizer and panel). Statistics :func:`correlations`; the issue's three claims
:func:`claim_results`.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd

from .._checks import check_choice
from ..results import ResultStore, results_dir
from ..runs import RunConfig, config_key, param, run_sweep, trained, with_overrides, worker_pool
from . import attack

__all__ = ["OptimizerRunConfig", "OPTIMIZER_NAMES", "FIG4_OPTIMIZERS", "S18_OPTIMIZERS", "PLAN", "TOP_K", "PROFILES",
           "STORE_NAME", "REUSE_STORE_NAME", "WORKERS", "ROW_COLUMNS", "configs", "reuse_store", "run", "run_all",
           "converged", "correlations", "status_counts", "figure_fig4", "figure_s4", "figure_s17", "figure_s18",
           "figure_forest", "claim_results", "cost_table"]

STORE_NAME = "03_optimizers"  #: ``ResultStore(STORE_NAME, results/<profile>)``
REUSE_STORE_NAME = attack.STORE_NAME  #: notebook 02's store, read for rows and weights of identical runs
FIG4_OPTIMIZERS = ("sgd", "adam", "entropy_sgd")
S18_OPTIMIZERS = ("adagrad", "momentum", "rmsprop", "gd")
OPTIMIZER_NAMES = FIG4_OPTIMIZERS + S18_OPTIMIZERS
PROFILES = attack.PROFILES
WORKERS = dict(attack.WORKERS)
#: notebook 02's columns plus the Hessian flatness of Fig. S4 and where the row came from.
ROW_COLUMNS = attack.ROW_COLUMNS + ("log_top50", "log_top50_converged", "log_top50_n_positive", "seconds_top50",
                                    "reused")

_MNIST, _CIFAR, _RESNET = "mnist_fcn", "cifar_fcn", "cifar_resnet"
_STEP100 = tuple(range(0, 501, 100))
_S4_OPTIMIZERS = ("sgd", "adam")  # at least these get log_top50 (every MNIST FCN run does)

#: profile -> optimizer -> panel -> the sweep (``attacks``, ``draws``) and any field overrides
#: (e.g. ``max_epochs``). Sizes per panel are notebook 02's (``attack.PANELS``). ``lr`` is the optimizer's
#: reference default (:func:`flatness.train.optim.optimizer_defaults`) unless given here; plain SGD keeps
#: notebook 02's lr so that its configs, and hence its rows and weights, are notebook 02's.
#:
#: cpu budget (measured per run on one thread, training + measurements, MNIST |S| = 500): SGD 9-15 s, Adam and
#: momentum and RMSProp 8-10 s, Adagrad 12-14 s, full-batch GD 35 s at |A| = 0 (1,653 epochs) and 75 s at
#: |A| = 100 (2,735 epochs; 3,000 epochs were not enough at |A| >= 200), Entropy-SGD (L = 20 SGLD steps per
#: step) 100 s at |A| = 0 and 320-360 s at |A| = 500, 205-583 epochs; CIFAR FCN ~25 s (Adam ~60 s); small ResNet
#: 70-110 s. Entropy-SGD with L = 5 (the sheet's other value) should be no cheaper: by the update rule x moves
#: about a quarter as far per step (not measured). Hence at cpu:
#: - Entropy-SGD: MNIST only, at 4 of SGD's |A| values (the claims compare at equal |A|), 1 draw, capped at 600
#:   epochs (CIFAR FCN: ~3 s an Entropy-SGD epoch, ~15 min a run);
#: - Adagrad, momentum, RMSProp: 1 draw, capped at 1,000 epochs, MNIST at every |A| and CIFAR FCN at |A| in
#:   {0, 250, 500} (momentum reaches the cap on CIFAR at |A| = 0 and 500);
#: - GD: MNIST only, 4 runs at |A| <= 150, capped at 4,000 epochs;
#: - Adam: CIFAR FCN 3 sizes x 2 draws capped at 1,000 epochs (one run at |A| = 500 was still short of zero error
#:   after more than 20 minutes uncapped; the others needed 129-182 epochs); ResNet 2 runs.
_CIFAR_S18 = dict(attacks=(0, 250, 500), draws=1, max_epochs=1000)  # cpu: Fig. S18's CIFAR panel, thinned
#: k of the Fig. S4 top-k log product per profile (smoke: 5, so the eigensolver takes ~0.1 s, not ~1 s)
TOP_K = {"smoke": 5, "cpu": 50, "paper": 50}
PLAN: dict[str, dict[str, dict[str, dict]]] = {
    "smoke": {  # tiny: 13 runs (SGD's read from notebook 02's smoke store when present)
        "sgd": {_MNIST: dict(attacks=(0, 25, 50), draws=1), _CIFAR: dict(attacks=(0,), draws=1),
                _RESNET: dict(attacks=(0,), draws=1)},
        "adam": {_MNIST: dict(attacks=(0, 25, 50), draws=1), _RESNET: dict(attacks=(0,), draws=1)},
        "entropy_sgd": {_MNIST: dict(attacks=(0,), draws=1, max_epochs=50)},
        "adagrad": {_MNIST: dict(attacks=(0,), draws=1)},
        "momentum": {_MNIST: dict(attacks=(0,), draws=1)},
        "rmsprop": {_MNIST: dict(attacks=(0,), draws=1)},
        "gd": {_MNIST: dict(attacks=(0,), draws=1, max_epochs=100)},
    },
    "cpu": {
        "sgd": {_MNIST: dict(attacks=_STEP100, draws=3), _CIFAR: dict(attacks=_STEP100, draws=3),
                _RESNET: dict(attacks=(0, 125, 250), draws=2)},
        "adam": {_MNIST: dict(attacks=_STEP100, draws=3),
                 _CIFAR: dict(attacks=(0, 250, 500), draws=2, max_epochs=1000),
                 _RESNET: dict(attacks=(0, 250), draws=1)},
        "entropy_sgd": {_MNIST: dict(attacks=(0, 100, 300, 500), draws=1, max_epochs=600)},
        "adagrad": {_MNIST: dict(attacks=_STEP100, draws=1, max_epochs=1000), _CIFAR: _CIFAR_S18},
        "momentum": {_MNIST: dict(attacks=_STEP100, draws=1, max_epochs=1000), _CIFAR: _CIFAR_S18},
        "rmsprop": {_MNIST: dict(attacks=_STEP100, draws=1, max_epochs=1000), _CIFAR: _CIFAR_S18},
        "gd": {_MNIST: dict(attacks=(0, 50, 100, 150), draws=1, max_epochs=4000)},
    },
    "paper": {  # notebook 02's paper sizes for every optimizer and panel (ResNet: Adam vs SGD only, Fig. S17)
        **{o: {_MNIST: {}, _CIFAR: {}} for o in OPTIMIZER_NAMES},
        "sgd": {_MNIST: {}, _CIFAR: {}, _RESNET: {}},
        "adam": {_MNIST: {}, _CIFAR: {}, _RESNET: {}},
    },
}


@dataclass(frozen=True)
class OptimizerRunConfig(RunConfig):
    """One run: notebook 02's run config (with its optimizer) plus the Fig. S4 Hessian measurement."""

    VERSION: ClassVar[int] = 1

    run: attack.AttackRunConfig = param(default_factory=attack.AttackRunConfig)
    top_k: int = param(50, min=0)  # log product of the top-k Hessian eigenvalues on S (0: not measured)

    @property
    def optimizer(self) -> str:
        return self.run.train.optimizer

    @property
    def panel(self) -> str:
        return self.run.panel


def configs(profile: str, optimizers=None, panels=None, *, attacks=None, draws: int | None = None,
            top_k: int | None = None, **overrides) -> list[OptimizerRunConfig]:
    """The run configs of a profile: for each optimizer and panel of :data:`PLAN`, its |A| values times draws.

    Args:
        profile: ``"smoke"``, ``"cpu"`` or ``"paper"``.
        optimizers: optimizer names (default: every one in the profile's plan), from :data:`OPTIMIZER_NAMES`.
        panels: panel names (default: every panel the plan gives the optimizer).
        attacks, draws: replace the plan's |A| values and number of draws (as in ``attack.configs``).
        top_k: k of ``log_top50`` on the MNIST FCN (default :data:`TOP_K` of the profile: 50, smoke 5; 0 skips
            it). Other panels never measure it.
        **overrides: fields of notebook 02's configs for every run (``max_epochs``, ``seed``, ...; ``None``
            values ignored), passed to :func:`flatness.experiments.attack.configs`; they win over the plan.

    Raises:
        ValueError: an unknown profile, optimizer, panel or field, or a value a field rejects.
    """
    from ..train.optim import optimizer_defaults

    fn = "configs"
    check_choice(fn, "profile", profile, PROFILES)
    plan = PLAN[profile]
    opts = list(plan) if optimizers is None else ([optimizers] if isinstance(optimizers, str) else list(optimizers))
    for o in opts:
        check_choice(fn, "optimizers", o, OPTIMIZER_NAMES)
    want = None if panels is None else ([panels] if isinstance(panels, str) else list(panels))
    for p in want or ():
        check_choice(fn, "panels", p, (_MNIST, _CIFAR, _RESNET))
    k = TOP_K[profile] if top_k is None else top_k
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{fn}: top_k={top_k!r}; expected a non-negative integer")
    extra = {kk: v for kk, v in overrides.items() if v is not None}
    for bad in ("optimizer", "lr"):
        if bad in extra:
            raise ValueError(f"{fn}: {bad}= is set per optimizer (the reference defaults); choose optimizers= "
                             f"from {list(OPTIMIZER_NAMES)}")
    out = []
    for o in opts:
        for p, spec in plan.get(o, {}).items():
            if want is not None and p not in want:
                continue
            spec = dict(spec)
            sweep = {kk: spec.pop(kk) for kk in ("attacks", "draws") if kk in spec}
            if attacks is not None:
                sweep["attacks"] = attacks
            if draws is not None:
                sweep["draws"] = draws
            if o != "sgd":
                spec.setdefault("lr", optimizer_defaults(o)["lr"])
            cfgs = attack.configs(profile, p, **sweep, **{**spec, **extra, "optimizer": o})
            out += [OptimizerRunConfig(run=c, top_k=k if p == _MNIST else 0) for c in cfgs]
    return out


def reuse_store(profile: str) -> ResultStore:
    """Notebook 02's store of ``profile`` (``results/<profile>/02_attack``), read for identical runs."""
    check_choice("reuse_store", "profile", profile, PROFILES)
    return ResultStore(REUSE_STORE_NAME, root=results_dir() / profile)


def _row_from(store: ResultStore, key: str) -> dict | None:
    df = store.load([key])
    if not len(df):
        return None
    row = df.iloc[-1].to_dict()
    if "error_message" in row and isinstance(row.get("error_message"), str):
        return None
    return {c: row.get(c, math.nan) for c in attack.ROW_COLUMNS}


def _weights(store: ResultStore, train_cfg):
    def missing(_t):
        raise RuntimeError(f"no trained weights for {config_key(train_cfg)} in {store.path}")

    return trained(store, train_cfg, missing)["state_dict"]


def _log_top(cfg: OptimizerRunConfig, state_dict) -> dict:
    """log_top50 (natural log of the product of the top-k positive Hessian eigenvalues on S) of one FCN."""
    import warnings

    from ..data import binary_task
    from ..losses import sigmoid_bce
    from ..models import FCN
    from ..sharpness import log_top_eig_product

    t = cfg.run.train
    t0 = time.perf_counter()
    model = FCN(t.widths, t.sigma_w, t.sigma_b, seed=0)
    model.load_state_dict(state_dict)
    S, _, _ = binary_task(t.dataset, t.n_train, t.n_attack, t.n_test, seed=t.draw, source=t.source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-positive eigenvalues: counted in n_positive
        r = log_top_eig_product(model, sigmoid_bce, (S.x, S.y), k=cfg.top_k, seed=t.run_seed % (2 ** 31))
    return {"log_top50": float(r), "log_top50_converged": bool(r.converged), "log_top50_n_positive": int(r.n_positive),
            "seconds_top50": time.perf_counter() - t0}


def run(cfg: OptimizerRunConfig, store: ResultStore | None = None, reuse: ResultStore | None = None) -> list[dict]:
    """One run: notebook 02's row (taken from ``reuse`` when it holds this very run, else computed by
    :func:`flatness.experiments.attack.run` into ``store``) plus ``log_top50`` when ``top_k > 0``."""
    if store is None:
        store = ResultStore(STORE_NAME, root=tempfile.mkdtemp(prefix="flatness03_"))
    key = config_key(cfg.run)
    row, src = (_row_from(reuse, key), reuse) if reuse is not None and reuse.has(key) else (None, None)
    if row is not None and not reuse.has_artifact(config_key(cfg.run.train)):
        row = None  # the row without its weights: run it here
    if row is None:
        (row,) = attack.run(cfg.run, store)
        src, row["reused"] = store, ""
    else:
        row["reused"] = REUSE_STORE_NAME
    row.update(log_top50=math.nan, log_top50_converged=False, log_top50_n_positive=-1, seconds_top50=math.nan)
    if cfg.top_k > 0 and cfg.run.train.model == "fcn" and row["status"] == "converged":
        row.update(_log_top(cfg, _weights(src, cfg.run.train)))
    return [row]


#: relative cost of one training step per optimizer (Entropy-SGD: L = 20 gradient evaluations a step).
_OPT_COST = {"entropy_sgd": 15.0, "gd": 5.0}


def _cost(cfg: OptimizerRunConfig) -> float:
    t = cfg.run.train
    per_image = (1.0 if t.model == "fcn" else 40.0) * (3072 / 784 if t.dataset == "cifar10" else 1.0)
    return per_image * _OPT_COST.get(t.optimizer, 1.0) * (t.n_train + t.n_attack)


def run_all(cfgs: list[OptimizerRunConfig], store: ResultStore, *, reuse: ResultStore | None = None,
            workers: int | None = None, executor=None, progress: bool = True) -> pd.DataFrame:
    """Every run of ``cfgs`` on :func:`flatness.runs.run_sweep` (resumable: only missing runs are computed),
    longest first on ``workers`` single-threaded processes; ``reuse`` = notebook 02's store (or ``None``).

    Returns the table in the order of ``cfgs``."""
    from functools import partial

    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"run_all: workers={workers!r}; expected a positive integer or None")
    order = sorted(cfgs, key=_cost, reverse=True)
    with worker_pool(workers if executor is None else None) as pool:
        table = run_sweep(partial(run, store=store, reuse=reuse), order, store, executor=executor or pool,
                          progress=progress)
    if len(table):
        rank = {config_key(c): i for i, c in enumerate(cfgs)}
        table = (table.assign(_rank=table["key"].map(rank)).sort_values("_rank", kind="stable")
                 .drop(columns="_rank").reset_index(drop=True))
    return table


# ------------------------------------------------------------------------------------ tables, figures
OPT_TITLES = {"sgd": "SGD", "adam": "Adam", "entropy_sgd": "Entropy-SGD", "adagrad": "Adagrad",
              "momentum": "Momentum (0.9)", "rmsprop": "RMSProp", "gd": "full-batch GD"}
#: pairs of :data:`flatness.experiments.attack.PAIRS` plus the Fig. S4 ones
PAIRS = {**attack.PAIRS,
         "log_top50_vs_test_error": ("log_top50", "test_error", False),
         "hessian_norm_vs_sharpness": ("hessian_norm", "sharpness", True),
         "log_top50_vs_sharpness": ("log_top50", "sharpness", False)}


def converged(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of runs that reached zero error on S."""
    return attack.converged(df)


def _opts_of(df: pd.DataFrame) -> list[str]:
    have = set(df["optimizer"]) if len(df) else set()
    return [o for o in OPTIMIZER_NAMES if o in have]


def status_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Runs per (optimizer, panel): total, converged, max_epochs, diverged; median epochs of the converged."""
    if not len(df):
        return pd.DataFrame(columns=["optimizer", "panel", "runs", "converged", "max_epochs", "diverged",
                                     "epochs_median", "reused"])
    g = df.groupby(["optimizer", "panel"])
    out = g.agg(runs=("status", "size"), converged=("status", lambda s: int((s == "converged").sum())),
                max_epochs=("status", lambda s: int((s == "max_epochs").sum())),
                diverged=("status", lambda s: int((s == "diverged").sum())),
                reused=("reused", lambda s: int((s == REUSE_STORE_NAME).sum())))
    med = converged(df).groupby(["optimizer", "panel"])["epochs"].median()
    out["epochs_median"] = med.reindex(out.index)
    out = out.reset_index()
    out["_o"] = out["optimizer"].map({o: i for i, o in enumerate(OPTIMIZER_NAMES)})
    return out.sort_values(["_o", "panel"]).drop(columns="_o").reset_index(drop=True)


def correlations(df: pd.DataFrame, pairs=None, n_boot: int = 2000) -> pd.DataFrame:
    """:func:`flatness.experiments.attack.correlations` per optimizer (converged runs only; the same numbers
    the figures annotate), with an ``optimizer`` column."""
    import numpy as np

    rows = []
    for o in _opts_of(df):
        sub = df[df["optimizer"] == o]
        pr = [p for p in (pairs or PAIRS) if p in PAIRS]
        base = attack.correlations(sub, [p for p in pr if p in attack.PAIRS], n_boot=n_boot).assign(optimizer=o)
        rows.append(base)
        extra = [p for p in pr if p not in attack.PAIRS]
        if extra:
            from ..stats import correlation

            d = converged(sub)
            for panel in d["panel"].unique():
                s = d[d["panel"] == panel]
                for name in extra:
                    x, y, logx = PAIRS[name]
                    xs = s[x].to_numpy(dtype=float)
                    xs = np.log10(np.where(xs > 0, xs, np.nan)) if logx else xs
                    ys = s[y].to_numpy(dtype=float)
                    if y == "sharpness":
                        ys = np.log10(np.where(ys > 0, ys, np.nan))
                    for method in ("pearson", "spearman"):
                        try:
                            c = correlation(xs, ys, method, n_boot=n_boot)
                        except ValueError:
                            continue
                        rows.append(pd.DataFrame([{"panel": panel, "pair": name, "x": x, "y": y, "method": method,
                                                   "r": c.r, "ci_low": c.ci_low, "ci_high": c.ci_high, "n": c.n,
                                                   "optimizer": o}]))
    cols = ["optimizer", "panel", "pair", "x", "y", "method", "r", "ci_low", "ci_high", "n"]
    rows = [r for r in rows if len(r)]
    return pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)


def _scatter(ax, sub: pd.DataFrame, x: str, y: str, *, logx=False, logy=False, xlabel="", ylabel="", title=""):
    import numpy as np

    from ..plotting import scatter_corr

    xs, ys = sub[x].to_numpy(dtype=float), sub[y].to_numpy(dtype=float)
    if logx:
        xs = np.log10(np.where(xs > 0, xs, np.nan))
    if logy:
        ys = np.log10(np.where(ys > 0, ys, np.nan))
    hue = (sub["n_attack"] / sub["n_train"]).to_numpy(dtype=float)
    if (np.isfinite(xs) & np.isfinite(ys)).sum() < 3:
        sc = ax.scatter(xs, ys, c=hue, s=14, cmap="viridis", vmin=0, vmax=1)
        ax.text(0.5, 0.9, "fewer than 3 runs: no correlation", transform=ax.transAxes, ha="center", fontsize=8)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        return sc
    *_, sc = scatter_corr(ax, xs, ys, hue=hue, xlabel=xlabel, ylabel=ylabel, title=title, cmap="viridis",
                          vmin=0, vmax=1)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.35 * (hi - lo))
    return sc


def _title(df: pd.DataFrame, o: str, p: str) -> str:
    sub = df[(df["optimizer"] == o) & (df["panel"] == p)]
    n_cap = int((sub["status"] == "max_epochs").sum())
    n_div = int((sub["status"] == "diverged").sum())
    t = f"{OPT_TITLES.get(o, o)}, {attack.PANEL_TITLES.get(p, p)}"
    notes = [f"{n_cap} at max_epochs" for _ in [0] if n_cap] + [f"{n_div} diverged" for _ in [0] if n_div]
    return t + (f"\n({', '.join(notes)}; left out)" if notes else "")


def _prior_sharp_grid(df: pd.DataFrame, optimizers, panels, suptitle: str):
    import matplotlib.pyplot as plt

    cols = [(o, p) for o in optimizers for p in panels
            if len(df) and ((df["optimizer"] == o) & (df["panel"] == p)).any()]
    fig, axes = plt.subplots(2, max(1, len(cols)), figsize=(3.9 * max(1, len(cols)) + 1, 6.6), squeeze=False,
                             layout="constrained")
    d = converged(df)
    sc = None
    for j, (o, p) in enumerate(cols):
        sub = d[(d["optimizer"] == o) & (d["panel"] == p)]
        sc = _scatter(axes[0, j], sub, "test_error", "log10_prior", xlabel="test error",
                      ylabel=r"$\log_{10} P(f)$ (EP, Heaviside)", title=_title(df, o, p)) or sc
        _scatter(axes[1, j], sub, "test_error", "sharpness", logy=True, xlabel="test error",
                 ylabel=r"$\log_{10}$ Keskar sharpness")
    if sc is not None:
        fig.colorbar(sc, ax=axes.ravel().tolist(), label="|A| / |S|", shrink=0.8)
    fig.suptitle(suptitle)
    return fig


def figure_fig4(df: pd.DataFrame, optimizers=FIG4_OPTIMIZERS, panels=(_MNIST, _CIFAR)):
    """Zhang et al. Fig. 4: per optimizer and FCN panel, log10 P(f) (top) and log10 sharpness (bottom) vs test
    error; colour |A| / |S|; runs at ``max_epochs`` left out and counted in the titles."""
    return _prior_sharp_grid(df, optimizers, panels, "Zhang et al. Fig. 4: prior and flatness vs generalisation, "
                                                     "per optimizer")


def figure_s18(df: pd.DataFrame, optimizers=S18_OPTIMIZERS, panels=(_MNIST, _CIFAR)):
    """Zhang et al. Fig. S18: as :func:`figure_fig4` for Adagrad, momentum, RMSProp and full-batch GD."""
    return _prior_sharp_grid(df, optimizers, panels, "Zhang et al. Fig. S18: other optimizers")


def figure_s17(df: pd.DataFrame):
    """Zhang et al. Fig. S17: the CIFAR-10 ResNet trained by SGD and by Adam (log10 P and sharpness vs error)."""
    return _prior_sharp_grid(df, ("sgd", "adam"), (_RESNET,), "Zhang et al. Fig. S17: ResNet, SGD vs Adam")


def figure_s4(df: pd.DataFrame, optimizers=("sgd", "adam"), panel: str = _MNIST):
    """Zhang et al. Fig. S4 on the MNIST FCN: log10 Hessian spectral norm and log top-50 eigenvalue product
    against test error and against log10 Keskar sharpness, one row per optimizer."""
    import matplotlib.pyplot as plt

    d = converged(df)
    d = d[d["panel"] == panel] if len(d) else d
    opts = [o for o in optimizers if len(d) and (d["optimizer"] == o).any()] or list(optimizers[:1])
    fig, axes = plt.subplots(len(opts), 4, figsize=(17, 3.4 * len(opts)), squeeze=False, layout="constrained")
    sc = None
    for i, o in enumerate(opts):
        sub = d[d["optimizer"] == o] if len(d) else d
        t = _title(df, o, panel)
        sc = _scatter(axes[i, 0], sub, "test_error", "hessian_norm", logy=True, xlabel="test error",
                      ylabel=r"$\log_{10} \lambda_{max}$", title=t) or sc
        _scatter(axes[i, 1], sub, "test_error", "log_top50", xlabel="test error",
                 ylabel=r"$\ln \prod_{j \leq 50} \lambda_j$", title=t)
        _scatter(axes[i, 2], sub, "sharpness", "hessian_norm", logx=True, logy=True,
                 xlabel=r"$\log_{10}$ Keskar sharpness", ylabel=r"$\log_{10} \lambda_{max}$", title=t)
        _scatter(axes[i, 3], sub, "sharpness", "log_top50", logx=True, xlabel=r"$\log_{10}$ Keskar sharpness",
                 ylabel=r"$\ln \prod_{j \leq 50} \lambda_j$", title=t)
    if sc is not None:
        fig.colorbar(sc, ax=axes.ravel().tolist(), label="|A| / |S|", shrink=0.8)
    fig.suptitle("Zhang et al. Fig. S4: Hessian-based flatness (MNIST FCN)")
    return fig


def figure_forest(df: pd.DataFrame, corr: pd.DataFrame | None = None):
    """New summary: Spearman(log10 P, test error) and Spearman(log10 sharpness, test error) with bootstrap 95%
    CIs, one line per (optimizer, panel), side by side (a forest plot); n and runs left out in the labels."""
    import matplotlib.pyplot as plt
    import numpy as np

    corr = correlations(df, ["log10_prior_vs_test_error", "sharpness_vs_test_error"]) if corr is None else corr
    c = corr[(corr["method"] == "spearman") & corr["pair"].isin(["log10_prior_vs_test_error",
                                                                   "sharpness_vs_test_error"])]
    keys = [(o, p) for o in OPTIMIZER_NAMES for p in attack.PANELS
            if ((c["optimizer"] == o) & (c["panel"] == p)).any()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.42 * max(3, len(keys)) + 1.6), sharey=True, squeeze=False,
                             layout="constrained")
    for ax, pair, lab in zip(axes[0], ("log10_prior_vs_test_error", "sharpness_vs_test_error"),
                             (r"Spearman($\log_{10} P(f)$, test error)", "Spearman(sharpness, test error)")):
        for i, (o, p) in enumerate(keys):
            r = c[(c["optimizer"] == o) & (c["panel"] == p) & (c["pair"] == pair)]
            if r.empty:
                continue
            r = r.iloc[0]
            col = f"C{OPTIMIZER_NAMES.index(o)}"
            if not np.isfinite(r.r):
                continue
            # a percentile-bootstrap interval need not contain r (e.g. at n = 4): draw the interval as it is
            ax.errorbar(r.r, i, xerr=[[max(0.0, r.r - r.ci_low)], [max(0.0, r.ci_high - r.r)]], fmt="o", color=col,
                        capsize=3)
            if np.isfinite(r.ci_low) and np.isfinite(r.ci_high) and not r.ci_low <= r.r <= r.ci_high:
                ax.plot([r.ci_low, r.ci_high], [i, i], color=col, lw=1, ls=":")
        ax.axvline(0, color="0.5", lw=0.8)
        ax.set(xlim=(-1.05, 1.05), xlabel=lab)
    labels = []
    for o, p in keys:
        sub = df[(df["optimizer"] == o) & (df["panel"] == p)]
        n_ok = int((sub["status"] == "converged").sum())
        n_out = len(sub) - n_ok
        labels.append(f"{OPT_TITLES.get(o, o)}, {attack.PANEL_TITLES.get(p, p)} (n={n_ok}"
                      + (f", {n_out} left out)" if n_out else ")"))
    axes[0, 0].set_yticks(range(len(keys)), labels, fontsize=8)
    axes[0, 0].invert_yaxis()
    fig.suptitle("Prior vs flatness as predictors of generalisation, per optimizer (95% bootstrap CIs)")
    return fig


def cost_table(df: pd.DataFrame) -> pd.DataFrame:
    """Summed per-run seconds (training, measurements, log_top50) per optimizer and panel, as stored."""
    if not len(df):
        return pd.DataFrame()
    g = df.groupby(["optimizer", "panel"])
    return g[["seconds_train", "seconds_measure", "seconds_top50"]].sum().assign(runs=g.size()).reset_index()


# ------------------------------------------------------------------------------------------- claims
_PAPER = "Zhang et al. 2021, Sec. 5.3, Fig. 4"
LOGP_THRESHOLD = -0.5


def _spearman_diff(a, ya, b, yb, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """|Spearman(a, ya)| - |Spearman(b, yb)| over two independent sets of runs, with a bootstrap 95% CI
    (each set resampled on its own)."""
    import numpy as np
    from scipy import stats as st

    def clean(u, v):
        u, v = np.asarray(u, dtype=float), np.asarray(v, dtype=float)
        k = np.isfinite(u) & np.isfinite(v)
        return u[k], v[k]

    a, ya = clean(a, ya)
    b, yb = clean(b, yb)
    if len(a) < 3 or len(b) < 3:
        return math.nan, math.nan, math.nan
    val = abs(st.spearmanr(a, ya)[0]) - abs(st.spearmanr(b, yb)[0])
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        i, j = rng.integers(0, len(a), len(a)), rng.integers(0, len(b), len(b))
        ra, rb = st.spearmanr(a[i], ya[i])[0], st.spearmanr(b[j], yb[j])[0]
        if np.isfinite(ra) and np.isfinite(rb):
            out.append(abs(ra) - abs(rb))
    lo, hi = np.quantile(out, [0.025, 0.975]) if out else (math.nan, math.nan)
    return float(val), float(lo), float(hi)


def claim_results(df: pd.DataFrame, corr: pd.DataFrame | None = None, panel: str = _MNIST) -> list[dict]:
    """The three claims of issue 10 on ``panel`` (MNIST FCN), measured: keyword arguments for
    :func:`flatness.claims.record` (without ``notebook`` and ``profile``).

    1. ``log_prior_predicts_<optimizer>``: Spearman(log10 P, test error) <= -0.5 with its 95% CI below 0, for
       each optimizer present.
    2. ``flatness_weaker_<optimizer>`` (Adam, Entropy-SGD): |Spearman(sharpness, error)| under the optimizer
       minus that under SGD < 0, with a bootstrap 95% CI of the difference (the two sets resampled apart).
    3. ``entropy_sgd_flatter``: the median over shared |A| of median sharpness (Entropy-SGD) / median sharpness
       (SGD) < 1 (flatter), and the median over |A| of the median test-error difference (Entropy-SGD - SGD)
       >= -0.02 (no better generalisation than SGD's, within 2 points); the interval is the range over |A|.
    Converged runs only; runs at ``max_epochs`` are left out (counted in the figures).
    """
    import numpy as np

    corr = correlations(df, ["log10_prior_vs_test_error", "sharpness_vs_test_error"]) if corr is None else corr
    out = []
    d = converged(df)
    d = d[d["panel"] == panel] if len(d) else d
    title = attack.PANEL_TITLES.get(panel, panel)
    for o in _opts_of(d):
        r = corr[(corr.optimizer == o) & (corr.panel == panel) & (corr.pair == "log10_prior_vs_test_error")
                 & (corr.method == "spearman")]
        if r.empty:
            continue
        r = r.iloc[0]
        n_out = int(((df["optimizer"] == o) & (df["panel"] == panel) & (df["status"] != "converged")).sum())
        out.append(dict(claim=f"log_prior_predicts_{o}",
                        statistic=f"Spearman(log10 P Heaviside, test error), {OPT_TITLES[o]}, {title}"
                                  + (f" ({n_out} runs not converged, left out)" if n_out else ""),
                        value=float(r.r), ci=(float(r.ci_low), float(r.ci_high)),
                        expected=f"r <= {LOGP_THRESHOLD} and 95% CI below 0",
                        holds=bool(r.r <= LOGP_THRESHOLD and r.ci_high < 0), n=int(r.n),
                        figure="03_fig4_optimizers", paper_ref=_PAPER,
                        text="The prior's correlation with generalisation survives every optimizer"))
    sgd = d[d["optimizer"] == "sgd"] if len(d) else d
    lsh = lambda s: np.log10(s["sharpness"].where(s["sharpness"] > 0))  # noqa: E731
    for o in ("adam", "entropy_sgd"):
        sub = d[d["optimizer"] == o] if len(d) else d
        if len(sub) < 3 or len(sgd) < 3:
            continue
        v, lo, hi = _spearman_diff(lsh(sub), sub["test_error"], lsh(sgd), sgd["test_error"])
        out.append(dict(claim=f"flatness_weaker_{o}",
                        statistic=f"|Spearman(sharpness, test error)| {OPT_TITLES[o]} - SGD, {title} "
                                  f"(n = {len(sub)} vs {len(sgd)})",
                        value=v, ci=(lo, hi), expected="< 0", holds=bool(v < 0), n=len(sub),
                        figure="03_forest_spearman", paper_ref=_PAPER,
                        text=f"Flatness correlates more weakly with generalisation under {OPT_TITLES[o]} than SGD"))
    es = d[d["optimizer"] == "entropy_sgd"] if len(d) else d
    if len(es) and len(sgd):
        ms = sgd.groupby("n_attack")[["sharpness", "test_error"]].median()
        me = es.groupby("n_attack")[["sharpness", "test_error"]].median()
        common = ms.index.intersection(me.index)
        if len(common):
            ratio = (me.loc[common, "sharpness"] / ms.loc[common, "sharpness"]).to_numpy(dtype=float)
            derr = (me.loc[common, "test_error"] - ms.loc[common, "test_error"]).to_numpy(dtype=float)
            v = float(np.median(ratio))
            de = float(np.median(derr))
            out.append(dict(claim="entropy_sgd_flatter",
                            statistic=f"median over |A| in {[int(a) for a in common]} of median sharpness ratio "
                                      f"Entropy-SGD / SGD, {title} (median test-error difference "
                                      f"Entropy-SGD - SGD {de:+.3f})",
                            value=v, ci=(float(np.min(ratio)), float(np.max(ratio))),
                            expected="ratio < 1 and test-error difference >= -0.02",
                            holds=bool(v < 1 and de >= -0.02), n=int(len(common)),
                            figure="03_fig4_optimizers", paper_ref=_PAPER,
                            text="Entropy-SGD finds flatter minima without better generalisation"))
    return out
