"""Notebook 04: overtraining and alpha-rescaling over time (Zhang et al. 2021, Sec. 5.4, App. H-I; Fig. 5, S6,
S8-S16).

Flatness is relative: after zero training error the function (and so its prior :math:`P(f)`) stays fixed while
the cross-entropy keeps falling, and Keskar sharpness (Definition 2.1) falls with it; a Dinh et al.
alpha-rescaling (Appendix F, eq. 9: :math:`(W_1, b_1, W_2) \\mapsto (W_1/\\alpha, b_1/\\alpha, \\alpha W_2)`,
"first layer divided, second multiplied") leaves the function unchanged and makes the sharpness spike.

Three kinds of run, all on the experiment engine (:func:`flatness.runs.run_sweep`, one store
``ResultStore(STORE_NAME, results/<profile>)``), each a pure function of its config:

* **Temporal** (:class:`TemporalRunConfig`, Fig. 5, S6, S8, S9, S10): FCN 784-40-40-1 on binarised MNIST,
  :math:`|S| = 500`, :math:`|T| = 100`, no attack set, plain SGD (lr 0.01, batch 32). A shared *prefix*
  (:class:`TemporalPrefixConfig`: train to zero error on S, then ``rescale_after`` overtraining epochs, tracked)
  is trained once and kept as an artifact with the full training state (model, optimizer, batch-order
  generator, RNG); each run restores it, alpha-rescales in place (:meth:`flatness.train.TrainState.alpha_rescale`,
  as :class:`flatness.train.AlphaRescaleAt` does) and continues to ``overtrain_epochs`` -- bit-identical to one
  uninterrupted run, so the Fig. 5 run (alpha 5.9), the Fig. S6 run (a smaller alpha) and the no-rescaling
  control share their first ``rescale_after`` overtraining epochs exactly. Fig. S9 is the alpha = 5.9 run
  continued (5000 epochs after the rescaling at ``paper``).
* **Alpha probe** (:class:`AlphaProbeConfig`, for Fig. S6): rescale the prefix's end state by each candidate alpha
  and train ``epochs`` epochs, counting the epochs whose function on S ∪ T changed; :func:`choose_small_alpha`
  takes the largest candidate below the Fig. 5 alpha that never changed the function.
* **Overtraining sweep** (:class:`OvertrainSweepConfig`, Figs. S11-S16): notebook 02's MNIST FCN attack-set
  runs (:class:`flatness.experiments.attack.AttackTrainConfig`, same config -> same artifact key; loaded from
  notebook 02's store when it has them, else trained by the same protocol here), continued from the saved
  weights with the same optimizer (a fresh optimizer state: the artifacts hold weights only) and measured after
  ``overtrain`` = 0, 100, 500 (and 1000 at ``paper``) further epochs.

What is tracked, per record (one row per (run, epoch); columns :data:`ROW_COLUMNS`): the loop's training loss
(mean sigmoid cross-entropy on S ∪ A) and errors; Keskar sharpness on S (box ``zeta`` = 1e-4, SGD ascent lr 1e-3,
batch 32, 100 epochs, the reference sheet; ``sharpness_method="lbfgsb"`` uses Keskar's L-BFGS-B maximiser
instead, ~5x cheaper on CPU; ``check_sgd`` adds the SGD value at the key epochs); the Hessian spectral norm on S
(Lanczos, Fig. S10); :math:`\\ln P(f)` by EP (Heaviside, the paper's definition) of the labels the network gives
S ∪ T under the arc-cosine NNGP kernel (:math:`\\sigma_w = \\sqrt 2, \\sigma_b = 1`), the kernel computed once per
run. log P is a function of the function only, so when the function on S ∪ T did not change since the previous
record the previous value is reused (``log_prior_reused``); ``function_changed`` says whether it changed since
the previous record, ``n_function_changes`` how many epochs since then changed it (the function is compared after
*every* epoch, cheaply, even where nothing else is measured).
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
from .._modes import eval_mode
from ..losses import sigmoid_bce
from ..results import ResultStore, config_key
from ..runs import RunConfig, param, run_sweep, trained, with_overrides
from ..train import Callback
from . import attack as _attack

__all__ = ["STORE_NAME", "ROW_COLUMNS", "MeasureConfig", "StudyConfig", "TemporalPrefixConfig", "TemporalRunConfig",
           "AlphaProbeConfig", "OvertrainSweepConfig", "PROFILES", "study", "configs", "temporal_configs",
           "probe_configs", "sweep_configs", "run", "run_all", "zero_error_epoch", "choose_small_alpha",
           "overtrain_correlations", "claim_function_constant", "claim_rescale_invariance", "claim_relaxation",
           "claim_overtrain_correlation", "figure_temporal", "figure_zeta", "figure_hessian", "figure_long_run",
           "figure_overtrain_scatter", "figure_overtrain_spearman"]

STORE_NAME = "04_overtraining"  #: ``ResultStore(STORE_NAME, results/<profile>)``
_IN_FEATURES = {"mnist": 784, "fashion_mnist": 784}
_EP_TOL = 1e-6  # log_prior_ep's default relative tolerance

#: The columns every temporal and sweep row carries (the store adds ``config`` and ``key``).
ROW_COLUMNS = ("run", "kind", "epoch", "phase", "loss", "train_error", "test_error", "sharpness", "log_prior",
               "log10_prior", "hessian_norm", "alpha_applied", "function_changed", "n_function_changes",
               "log_prior_reused", "ep_converged", "status")


# ============================================================================================ configs
@dataclass(frozen=True)
class MeasureConfig(RunConfig):
    """How each record is measured (Keskar sharpness, EP prior); nested in every run config."""

    VERSION: ClassVar[int] = 1

    zeta: float = param(1e-4, positive=True)  # Keskar box, MNIST FCN (reference sheet)
    sharpness_method: str = param("sgd", choices=("sgd", "lbfgsb"))  # SGD ascent (paper) or L-BFGS-B (Keskar)
    sharpness_lr: float = param(1e-3, positive=True)  # SGD ascent lr (authors' code)
    sharpness_epochs: int = param(100, min=1)  # SGD ascent epochs (authors' code)
    sharpness_batch_size: int = param(32, min=1)
    lbfgsb_maxiter: int = param(10, min=1)  # Keskar et al.'s L-BFGS-B iterations
    check_sgd: bool = param(False)  # also the SGD sharpness at the key epochs (zero error, rescaling)
    likelihood: str = param("heaviside", choices=("heaviside", "probit"))  # EP likelihood (paper: Heaviside)


@dataclass(frozen=True)
class TemporalPrefixConfig(RunConfig):
    """Train to zero error on S, then ``rescale_after`` overtraining epochs, tracked (an artifact, shared)."""

    VERSION: ClassVar[int] = 1

    dataset: str = param("mnist", choices=tuple(_IN_FEATURES))
    hidden: tuple[int, ...] = param((40, 40), min=1)  # FCN 784-40-40-1 (Zhang et al.)
    sigma_w: float = param(math.sqrt(2.0), positive=True)  # init N(0, sigma_w^2 / fan-in)
    sigma_b: float = param(1.0, min=0.0)  # bias init N(0, sigma_b^2)
    n_train: int = param(500, min=1)  # |S| (Fig. 5)
    n_test: int = param(100, min=1)  # |T| = 100 (Fig. 5)
    draw: int = param(0, min=0)  # the task's seed
    source: str = param("embedded", choices=("embedded", "full", "auto"))
    lr: float = param(0.01, positive=True)  # plain SGD lr (reference sheet)
    batch_size: int = param(32, min=1)
    max_epochs: int = param(50_000, min=1)  # cap before zero error (authors')
    rescale_after: int = param(500, min=1)  # overtraining epochs before the rescaling (Fig. 5: 500)
    track_every_train: int = param(1, min=1)  # records every this many epochs before zero error
    track_every: int = param(1, min=1)  # ... and after it
    zeta_extra: tuple[float, ...] = param((1e-3,), positive=True)  # further boxes (Fig. S8), early records only
    zeta_extra_until: int = param(300, min=0)  # extra boxes on records up to this epoch
    measure: MeasureConfig = param(default_factory=MeasureConfig)
    seed: int = param(0, min=0)

    @property
    def widths(self) -> tuple[int, ...]:
        return (_IN_FEATURES[self.dataset], *self.hidden, 1)

    @property
    def run_seed(self) -> int:
        """Initialisation and batch-order seed: a hash of (seed, dataset, |S|, draw) only."""
        h = hashlib.sha256(f"{self.seed}/{self.dataset}/{self.n_train}/{self.draw}/temporal".encode())
        return int.from_bytes(h.digest()[:6], "little")


@dataclass(frozen=True)
class TemporalRunConfig(RunConfig):
    """One temporal run: the prefix, an alpha-rescaling at its end (alpha = 1: none), then on to ``overtrain_epochs``."""

    VERSION: ClassVar[int] = 1

    run: str = param("fig5")  # label
    prefix: TemporalPrefixConfig = param(default_factory=TemporalPrefixConfig)
    alpha: float = param(5.9, positive=True)  # first layer divided by alpha, second multiplied (1: no rescaling)
    overtrain_epochs: int = param(1000, min=1)  # total overtraining epochs (Fig. 5: 1000; S9: 5500)
    inset_offsets: tuple[int, ...] = param((1, 2, 3, 5, 7, 10, 15, 20, 30, 50), min=1)  # dense after rescaling
    track_every: int = param(1, min=1)  # records every this many epochs up to overtraining epoch late_after
    late_after: int = param(1000, min=0)
    track_every_late: int = param(1, min=1)  # ... and after it (Fig. S9)

    def validate(self) -> None:
        super().validate()
        if self.overtrain_epochs < self.prefix.rescale_after:
            raise ValueError(f"TemporalRunConfig: overtrain_epochs={self.overtrain_epochs} must be >= "
                             f"prefix.rescale_after={self.prefix.rescale_after} (the rescaling happens there)")


@dataclass(frozen=True)
class AlphaProbeConfig(RunConfig):
    """Rescale the prefix's end state by ``alpha``, train ``epochs`` epochs: does the function change (Fig. S6)?"""

    VERSION: ClassVar[int] = 1

    prefix: TemporalPrefixConfig = param(default_factory=TemporalPrefixConfig)
    alpha: float = param(2.0, positive=True)  # != 1
    epochs: int = param(100, min=1)

    def validate(self) -> None:
        super().validate()
        if self.alpha == 1.0:
            raise ValueError("AlphaProbeConfig: alpha=1.0 is no rescaling; probe alphas must differ from 1")


@dataclass(frozen=True)
class OvertrainSweepConfig(RunConfig):
    """One notebook-02 run continued from its saved weights, measured after each of ``overtrain`` epochs."""

    VERSION: ClassVar[int] = 1

    train: _attack.AttackTrainConfig = param(default_factory=_attack.AttackTrainConfig)
    overtrain: tuple[int, ...] = param((0, 100, 500), min=0)  # measure after these many further epochs
    measure: MeasureConfig = param(default_factory=MeasureConfig)

    def validate(self) -> None:
        super().validate()
        if self.train.model != "fcn" or self.train.dataset not in _IN_FEATURES:
            raise ValueError(f"OvertrainSweepConfig: train.model={self.train.model!r}, "
                             f"train.dataset={self.train.dataset!r}; only the MNIST FCN panel is supported "
                             f"(model 'fcn', dataset one of {list(_IN_FEATURES)})")
        if not self.overtrain or list(self.overtrain) != sorted(set(self.overtrain)):
            raise ValueError(f"OvertrainSweepConfig: overtrain={self.overtrain!r} must be non-empty, increasing "
                             "and without repeats, e.g. (0, 100, 500)")


# ------------------------------------------------------------------------------------------ the study
@dataclass(frozen=True)
class StudyConfig(RunConfig):
    """Every setting of notebook 04 (validated when made); :func:`temporal_configs` etc. build the runs."""

    VERSION: ClassVar[int] = 1

    # temporal runs (Fig. 5, S6, S8, S9, S10)
    n_train: int = param(500, min=1)
    n_test: int = param(100, min=1)
    max_epochs: int = param(50_000, min=1)
    rescale_after: int = param(500, min=1)  # overtraining epochs before the rescaling
    overtrain_epochs: int = param(1000, min=1)  # Fig. 5 / S6 length after zero error
    long_overtrain_epochs: int = param(5500, min=1)  # Fig. S9: rescale at 500, then 5000 more
    alpha: float = param(5.9, positive=True)  # Fig. 5
    alpha_small: float | None = param(None, positive=True)  # Fig. S6 (None: chosen by the probe)
    probe_alphas: tuple[float, ...] = param((1.5, 2.0, 3.0, 4.0, 5.9), positive=True)
    probe_epochs: int = param(100, min=1)
    control: bool = param(True)  # also the run without rescaling (alpha = 1)
    track_every_train: int = param(1, min=1)
    track_every: int = param(1, min=1)
    track_every_late: int = param(10, min=1)
    inset_offsets: tuple[int, ...] = param((1, 2, 3, 5, 7, 10, 15, 20, 30, 50), min=1)  # records after rescaling
    zeta_extra: tuple[float, ...] = param((1e-3,), positive=True)  # Fig. S8's larger box
    zeta_extra_until: int = param(300, min=0)
    window: int = param(400, min=1)  # claim: no function change in the last `window` pre-rescale epochs
    # measurement
    zeta: float = param(1e-4, positive=True)
    sharpness_method: str = param("sgd", choices=("sgd", "lbfgsb"))
    sharpness_epochs: int = param(100, min=1)
    lbfgsb_maxiter: int = param(10, min=1)
    check_sgd: bool = param(False)
    # overtraining sweep (Figs. S11-S16)
    sweep_optimizers: tuple[str, ...] = param(("sgd", "adam"), choices=("sgd", "adam"))
    sweep_attacks: tuple[int, ...] = param(tuple(range(0, 501, 50)), min=0)
    sweep_draws: int = param(5, min=1)
    sweep_n_train: int | None = param(None, min=1)  # None: notebook 02's |S| at the profile (smoke: smaller)
    sweep_n_test: int | None = param(None, min=1)  # None: notebook 02's |T|
    sweep_overtrain: tuple[int, ...] = param((0, 100, 500, 1000), min=0)
    seed: int = param(0, min=0)


PROFILES: dict[str, dict] = {
    "smoke": dict(n_train=50, n_test=20, max_epochs=3000, rescale_after=10, overtrain_epochs=20,
                  long_overtrain_epochs=30, probe_alphas=(2.0, 5.9), probe_epochs=5, control=False,
                  track_every_train=50, track_every=10, track_every_late=10, inset_offsets=(1, 3),
                  zeta_extra_until=60, window=10, sharpness_method="sgd", sharpness_epochs=2,
                  sweep_optimizers=("sgd",), sweep_attacks=(0, 10, 20), sweep_draws=1, sweep_overtrain=(0, 2, 5), sweep_n_train=20,
                  sweep_n_test=20),
    "cpu": dict(track_every_train=10, track_every=50, track_every_late=250, long_overtrain_epochs=2000,
                zeta_extra_until=250, probe_epochs=100, sharpness_method="lbfgsb", check_sgd=True,
                sweep_attacks=(0, 250, 500), sweep_draws=2, sweep_overtrain=(0, 100, 500)),
    "paper": dict(sweep_draws=5),
}
_ADAM_LR = 1e-3  # reference sheet (and notebook 03's configs("cpu", optimizer="adam", lr=1e-3))


def study(profile: str, **overrides) -> StudyConfig:
    """The :class:`StudyConfig` of a profile with ``overrides`` (``None`` values ignored; cast and validated)."""
    check_choice("study", "profile", profile, PROFILES)
    cfg = with_overrides(StudyConfig(), **PROFILES[profile])
    return with_overrides(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _measure_cfg(s: StudyConfig) -> MeasureConfig:
    return MeasureConfig(zeta=s.zeta, sharpness_method=s.sharpness_method, sharpness_epochs=s.sharpness_epochs,
                         lbfgsb_maxiter=s.lbfgsb_maxiter, check_sgd=s.check_sgd)


def _prefix(s: StudyConfig) -> TemporalPrefixConfig:
    return TemporalPrefixConfig(n_train=s.n_train, n_test=s.n_test, max_epochs=s.max_epochs,
                                rescale_after=s.rescale_after, track_every_train=s.track_every_train,
                                track_every=s.track_every, zeta_extra=s.zeta_extra,
                                zeta_extra_until=s.zeta_extra_until, measure=_measure_cfg(s), seed=s.seed)


def temporal_configs(s: StudyConfig, alpha_small: float | None = None) -> list[TemporalRunConfig]:
    """The temporal runs: ``fig5_s9`` (alpha, long), ``figS6`` (the small alpha, when known) and ``control``."""
    p = _prefix(s)
    common = dict(prefix=p, track_every=s.track_every, late_after=s.overtrain_epochs,
                  track_every_late=s.track_every_late, inset_offsets=s.inset_offsets)
    out = [TemporalRunConfig(run="fig5_s9", alpha=s.alpha, overtrain_epochs=max(s.long_overtrain_epochs,
                                                                                s.overtrain_epochs), **common)]
    small = alpha_small if alpha_small is not None else s.alpha_small
    if small is not None:
        out.append(TemporalRunConfig(run="figS6", alpha=float(small), overtrain_epochs=s.overtrain_epochs, **common))
    if s.control:  # no inset records: nothing happens at the would-be rescaling
        out.append(TemporalRunConfig(run="control", alpha=1.0, overtrain_epochs=s.overtrain_epochs,
                                     **{**common, "inset_offsets": ()}))
    return out


def probe_configs(s: StudyConfig) -> list[AlphaProbeConfig]:
    """One :class:`AlphaProbeConfig` per candidate alpha."""
    return [AlphaProbeConfig(prefix=_prefix(s), alpha=a, epochs=s.probe_epochs) for a in s.probe_alphas]


def sweep_configs(s: StudyConfig, profile: str) -> list[OvertrainSweepConfig]:
    """Notebook 02's MNIST FCN runs of ``profile`` (thinned to the study's attacks and draws), per optimizer."""
    out = []
    for opt in s.sweep_optimizers:
        lr = 0.01 if opt == "sgd" else _ADAM_LR
        runs = _attack.configs(profile, panels="mnist_fcn", attacks=s.sweep_attacks, draws=s.sweep_draws,
                               optimizer=opt, lr=lr, n_train=s.sweep_n_train, n_test=s.sweep_n_test)
        out += [OvertrainSweepConfig(train=c.train, overtrain=tuple(sorted(set(s.sweep_overtrain))),
                                     measure=_measure_cfg(s)) for c in runs]
    return out


def configs(profile: str, kind: str = "temporal", **overrides) -> list:
    """The run configs of one kind (``"temporal"``, ``"probe"``, ``"sweep"``) of a profile, with study overrides."""
    check_choice("configs", "kind", kind, ("temporal", "probe", "sweep"))
    s = study(profile, **overrides)
    return {"temporal": lambda: temporal_configs(s), "probe": lambda: probe_configs(s),
            "sweep": lambda: sweep_configs(s, profile)}[kind]()


# ============================================================================================ measuring
class _Meter:
    """Measurements of one run: the function on S ∪ T, sharpness and ||H|| on S, EP log P (kernel computed once)."""

    def __init__(self, measure: MeasureConfig, S, x_st: torch.Tensor, n_hidden: int, sigma_w: float, sigma_b: float,
                 seed: int):
        from ..prior import arccos_kernel

        self.m, self.data, self.x_st, self.seed = measure, (S.x, S.y), x_st, seed % (2 ** 31)
        self.K = arccos_kernel(x_st.reshape(len(x_st), -1), n_hidden=n_hidden, sigma_w=sigma_w, sigma_b=sigma_b,
                               device="cpu")
        self._last: tuple[torch.Tensor, float, bool] | None = None

    def logits(self, model) -> torch.Tensor:
        with eval_mode(model), torch.no_grad():
            dev = next(model.parameters()).device
            return torch.cat([model(xb.to(dev)).reshape(len(xb)).cpu() for xb in self.x_st.split(1024)])

    def predict(self, model) -> torch.Tensor:
        return (self.logits(model) > 0).long()

    def log_prior(self, pred: torch.Tensor, force: bool = False) -> tuple[float, bool, bool]:
        """(ln P, converged, reused): EP, or the previous value when the labels did not change."""
        from ..prior import log_prior_ep

        if not force and self._last is not None and torch.equal(self._last[0], pred):
            return self._last[1], self._last[2], True
        ep = log_prior_ep(self.K, pred, likelihood=self.m.likelihood)
        self._last = (pred.clone(), float(ep.log_prob), bool(ep.converged))
        return float(ep.log_prob), bool(ep.converged), False

    def sharpness(self, model, zeta: float | None = None, method: str | None = None) -> float:
        from ..sharpness import keskar_sharpness

        m = self.m
        zeta, method = (m.zeta if zeta is None else zeta), (m.sharpness_method if method is None else method)
        if method == "lbfgsb":
            return keskar_sharpness(model, sigmoid_bce, self.data, zeta=zeta, method="lbfgsb", seed=self.seed,
                                    maxiter=m.lbfgsb_maxiter).sharpness
        return keskar_sharpness(model, sigmoid_bce, self.data, zeta=zeta, method="sgd", lr=m.sharpness_lr,
                                epochs=m.sharpness_epochs, batch_size=m.sharpness_batch_size, seed=self.seed).sharpness

    def hessian_norm(self, model) -> float:
        from ..hessian import hessian_eigenvalues

        return float(hessian_eigenvalues(model, sigmoid_bce, self.data, k=1, seed=self.seed)[0])

    def flatness(self, model, zetas=(), sgd_check: bool = False) -> dict:
        out = {"sharpness": self.sharpness(model), "hessian_norm": self.hessian_norm(model)}
        for z in zetas:
            out[f"sharpness_zeta_{z:g}"] = self.sharpness(model, zeta=z)
        if sgd_check:
            out["sharpness_sgd"] = self.sharpness(model, method="sgd")
        return out


class _Tracker(Callback):
    """Compare the function after every epoch; at the epochs ``want(state)`` picks, record a full row."""

    order = 10

    def __init__(self, meter: _Meter, run: str, kind: str, want, zetas=None, sgd_check=None):
        super().__init__()
        self.meter, self.run, self.kind, self.want = meter, run, kind, want
        self.zetas = zetas or (lambda state: ())
        self.sgd_check = sgd_check or (lambda state: False)
        self.rows: list[dict] = []
        self.prev_pred: torch.Tensor | None = None  # the function at the previous record
        self.epoch_pred: torch.Tensor | None = None  # ... at the previous epoch
        self.n_changes = 0

    def on_epoch(self, state):
        pred = self.meter.predict(state.model)
        if self.epoch_pred is not None and not torch.equal(pred, self.epoch_pred):
            self.n_changes += 1
        self.epoch_pred = pred
        if self.want(state):
            self.record(state, pred)

    def record(self, state, pred: torch.Tensor, force_ep: bool = False, **extra) -> dict:
        r = state.record
        lp, conv, reused = self.meter.log_prior(pred, force=force_ep)
        row = {"run": self.run, "kind": self.kind, "epoch": int(state.epoch), "phase": r["phase"],
               "loss": float(r["loss"]), "train_error": float(r["train_error"]),
               "attack_error": float(r.get("attack_error", math.nan)), "test_error": float(r["test_error"]),
               "test_loss": float(r.get("test_loss", math.nan)), "log_prior": lp, "log10_prior": lp / math.log(10),
               "ep_converged": conv, "log_prior_reused": reused, "alpha_applied": False,
               "function_changed": bool(self.prev_pred is not None and not torch.equal(pred, self.prev_pred)),
               "n_function_changes": int(self.n_changes), "zero_error_epoch": state.epochs_to_zero,
               **self.meter.flatness(state.model, self.zetas(state), self.sgd_check(state)), **extra}
        self.rows.append(row)
        self.prev_pred, self.n_changes = pred, 0
        return row


class _Snapshot(Callback):
    """Keep the full training state after epoch ``at(state)`` (to continue the run later, bit-identically)."""

    order = 100

    def __init__(self, at):
        super().__init__()
        self.at, self.snapshot = at, None

    def on_epoch(self, state):
        if self.at(state):
            self.snapshot = state.snapshot()


class _Resume(Callback):
    """Restore a snapshot on start, alpha-rescale the first layer by 1/alpha in place, record the rescaled state."""

    order = -10

    def __init__(self, snapshot: dict, alpha: float, tracker: _Tracker | None, pre_row: dict | None):
        super().__init__()
        self.snapshot, self.alpha, self.tracker, self.pre_row = snapshot, alpha, tracker, pre_row
        self.info: dict = {}

    def on_train_begin(self, state):
        state.restore(self.snapshot)
        if self.tracker is None:
            return
        meter = self.tracker.meter
        before = meter.logits(state.model)
        self.tracker.prev_pred = self.tracker.epoch_pred = (before > 0).long()
        if self.alpha == 1.0:
            return
        state.alpha_rescale(0, 1.0 / self.alpha)  # W1, b1 <- W1 / alpha, b1 / alpha; W2 <- alpha W2
        after = meter.logits(state.model)
        pre = self.pre_row or {}
        lp_pre, _, _ = meter.log_prior((before > 0).long(), force=True)
        extra = {"alpha_applied": True, "alpha": self.alpha,
                 "same_predictions": bool(torch.equal(before > 0, after > 0)),
                 "max_logit_change": float((after - before).abs().max()), "log_prior_pre": lp_pre,
                 "sharpness_pre": pre.get("sharpness", math.nan), "hessian_norm_pre": pre.get("hessian_norm", math.nan)}
        if "sharpness_sgd" in pre:
            extra["sharpness_sgd_pre"] = pre["sharpness_sgd"]
        self.info = self.tracker.record(state, (after > 0).long(), force_ep=True, **extra)


# ------------------------------------------------------------------------------------------------ runs
def _temporal_task(p: TemporalPrefixConfig):
    from ..data import binary_task

    return binary_task(p.dataset, p.n_train, 0, p.n_test, seed=p.draw, source=p.source)


def _meter(measure: MeasureConfig, task, hidden, sigma_w, sigma_b, seed) -> _Meter:
    S, _, T = task
    return _Meter(measure, S, torch.cat([S.x, T.x]), len(hidden), sigma_w, sigma_b, seed)


def _fcn(widths, sigma_w, sigma_b, seed):
    from ..models import FCN

    return FCN(widths, sigma_w, sigma_b, seed=seed)


def _train_prefix(p: TemporalPrefixConfig) -> dict:
    """Train to zero error, overtrain ``rescale_after`` epochs, tracked; the artifact: rows + the final state."""
    from ..train import train_to_zero_error

    task = _temporal_task(p)
    meter = _meter(p.measure, task, p.hidden, p.sigma_w, p.sigma_b, p.run_seed)

    def k(state):  # overtraining epochs so far (None before zero error)
        return None if state.fit_epoch is None else state.epoch - state.fit_epoch

    def want(state):
        o = k(state)
        if o is None:
            return state.epoch % p.track_every_train == 0
        return o == 0 or o % p.track_every == 0 or o == p.rescale_after

    def key(state):
        return p.measure.check_sgd and k(state) in (0, p.rescale_after)

    tracker = _Tracker(meter, "prefix", "temporal", want,
                       zetas=lambda s: p.zeta_extra if s.epoch <= p.zeta_extra_until else (), sgd_check=key)
    snap = _Snapshot(lambda s: k(s) == p.rescale_after)
    res = train_to_zero_error(_fcn(p.widths, p.sigma_w, p.sigma_b, p.run_seed), task, optimizer="sgd", lr=p.lr,
                              batch_size=p.batch_size, max_epochs=p.max_epochs, overtrain_epochs=p.rescale_after,
                              seed=p.run_seed, callbacks=[tracker, snap], device=resolve_device())
    return {"status": res.status, "rows": tracker.rows, "snapshot": snap.snapshot,
            "epochs_to_zero": res.epochs_to_zero, "fit_epoch": None if snap.snapshot is None else
            snap.snapshot["fit_epoch"]}


def _prefix_state(p: TemporalPrefixConfig, store: ResultStore | None) -> dict:
    return trained(store, p, _train_prefix) if store is not None else _train_prefix(p)


def _continue(p: TemporalPrefixConfig, pre: dict, alpha: float, overtrain_epochs: int, run: str, want=None,
              sgd_check=None):
    """Restore the prefix's end state, rescale, train on to ``overtrain_epochs``; (tracker, resume, result)."""
    from ..train import train_to_zero_error

    task = _temporal_task(p)
    meter = _meter(p.measure, task, p.hidden, p.sigma_w, p.sigma_b, p.run_seed)
    tracker = _Tracker(meter, run, "temporal", want or (lambda s: False), sgd_check=sgd_check)
    resume = _Resume(pre["snapshot"], alpha, tracker, pre["rows"][-1])
    res = train_to_zero_error(_fcn(p.widths, p.sigma_w, p.sigma_b, p.run_seed), task, optimizer="sgd", lr=p.lr,
                              batch_size=p.batch_size, max_epochs=p.max_epochs, overtrain_epochs=overtrain_epochs,
                              seed=p.run_seed, callbacks=[resume, tracker], device=resolve_device())
    return tracker, resume, res


def _run_temporal(cfg: TemporalRunConfig, store: ResultStore | None) -> list[dict]:
    p = cfg.prefix
    pre = _prefix_state(p, store)
    rows = [{**r, "run": cfg.run, "alpha": cfg.alpha} for r in pre["rows"]]
    z = pre["epochs_to_zero"]
    if pre["status"] != "converged" or pre["snapshot"] is None:
        return [{**r, "status": pre["status"], "zero_error_epoch": z} for r in rows] or [{"run": cfg.run, "kind": "temporal",
                                                                   "status": pre["status"]}]
    fit, E = pre["fit_epoch"], pre["fit_epoch"] + p.rescale_after
    dense = {E + o for o in cfg.inset_offsets}

    def want(state):
        o = state.epoch - fit
        if state.epoch in dense or o == cfg.overtrain_epochs:
            return True
        if o <= cfg.late_after:
            return o % cfg.track_every == 0
        return (o - cfg.late_after) % cfg.track_every_late == 0

    # the SGD cross-check on the rescaled state (recorded in on_train_begin, when state.epoch is still E)
    tracker, resume, res = _continue(p, pre, cfg.alpha, cfg.overtrain_epochs, cfg.run, want,
                                     sgd_check=lambda s: p.measure.check_sgd and s.epoch == E)
    if cfg.alpha != 1.0:
        rows = rows[:-1]  # the record at the rescaling epoch is replaced by the rescaled one (pre-values kept in it)
    out = rows + [{**r, "alpha": cfg.alpha} for r in tracker.rows]
    return [{**r, "status": res.status, "zero_error_epoch": z} for r in out]


def _run_probe(cfg: AlphaProbeConfig, store: ResultStore | None) -> list[dict]:
    p = cfg.prefix
    pre = _prefix_state(p, store)
    base = {"run": f"probe_alpha_{cfg.alpha:g}", "kind": "probe", "alpha": cfg.alpha}
    if pre["status"] != "converged" or pre["snapshot"] is None:
        return [{**base, "status": pre["status"]}]
    fit = pre["fit_epoch"]
    E = fit + p.rescale_after
    last = E + cfg.epochs
    tracker, resume, res = _continue(p, pre, cfg.alpha, p.rescale_after + cfg.epochs, base["run"],
                                     want=lambda s: s.epoch == last)
    hist = res.history[res.history["epoch"] > E]
    first, end = tracker.rows[0], tracker.rows[-1]
    changes = sum(int(r["n_function_changes"]) for r in tracker.rows[1:])
    return [{**base, "epoch": E, "probe_epochs": cfg.epochs, "sharpness_pre": first.get("sharpness_pre"),
             "sharpness_post": first["sharpness"], "sharpness_ratio": first["sharpness"] / first["sharpness_pre"],
             "sharpness_end": end["sharpness"], "function_changes": changes,
             "max_train_error": float(hist["train_error"].max()), "log10_prior_pre": first["log10_prior"],
             "log10_prior_max": max(r["log10_prior"] for r in tracker.rows),
             "log10_prior_end": end["log10_prior"], "status": res.status}]


# --------------------------------------------------------------------------------------- the sweep
def _attack_weights(t: _attack.AttackTrainConfig, store: ResultStore | None) -> tuple[dict, str]:
    """Notebook 02's artifact for ``t``: from this store, from notebook 02's store beside it, else trained here."""
    if store is None:
        return _attack.train_network(t), "trained"
    key = config_key(t)
    if store.has_artifact(key):
        return store.load_artifact(key), store.name
    other = ResultStore(_attack.STORE_NAME, root=store.path.parent)
    if other.has_artifact(key):
        return other.load_artifact(key), other.name
    art = _attack.train_network(t)
    store.save_artifact(key, art)
    return art, "trained"


def _run_sweep_one(cfg: OvertrainSweepConfig, store: ResultStore | None) -> list[dict]:
    from ..data import binary_task
    from ..train import train_to_zero_error

    t = cfg.train
    art, source = _attack_weights(t, store)
    run = f"{t.optimizer}_A{t.n_attack}_d{t.draw}"
    base = {"run": run, "kind": "sweep", "optimizer": t.optimizer, "n_attack": t.n_attack, "draw": t.draw,
            "weights_from": source, "epochs_to_zero": art["epochs"]}
    if art["status"] != "converged":
        return [{**base, "status": art["status"]}]
    task = binary_task(t.dataset, t.n_train, t.n_attack, t.n_test, seed=t.draw, source=t.source)
    model = _fcn(t.widths, t.sigma_w, t.sigma_b, t.run_seed)
    model.load_state_dict(art["state_dict"])
    meter = _meter(cfg.measure, task, t.hidden, t.sigma_w, t.sigma_b, t.run_seed)
    marks = set(cfg.overtrain)
    tracker = _Tracker(meter, run, "sweep", lambda s: s.epoch in marks)
    res = train_to_zero_error(model, task, optimizer=t.optimizer, lr=t.lr, batch_size=t.batch_size,
                              max_epochs=t.max_epochs, overtrain_epochs=max(cfg.overtrain), seed=t.run_seed,
                              callbacks=[tracker], device=resolve_device())
    rows = [{**r, **base, "overtrain_epochs": r["epoch"], "epoch": r["epoch"] + art["epochs"],
             "status": res.status} for r in tracker.rows]
    return rows or [{**base, "status": res.status}]


def run(cfg, store: ResultStore | None = None) -> list[dict]:
    """One run of any kind (temporal, probe, sweep): rows, one per (run, epoch) (the probe: one summary row).

    With a ``store`` the trained prefixes and notebook-02 weights are artifacts (loaded when saved).
    A run that diverges or never reaches zero error gives rows with that ``status``, never an exception.
    """
    if isinstance(cfg, TemporalRunConfig):
        rows = _run_temporal(cfg, store)
    elif isinstance(cfg, AlphaProbeConfig):
        rows = _run_probe(cfg, store)
    elif isinstance(cfg, OvertrainSweepConfig):
        rows = _run_sweep_one(cfg, store)
    else:
        raise TypeError(f"run: cfg must be a TemporalRunConfig, AlphaProbeConfig or OvertrainSweepConfig, "
                        f"got {type(cfg).__name__}")
    for r in rows:
        for c in ROW_COLUMNS:
            r.setdefault(c, math.nan)
    return rows


def run_all(cfgs: list, store: ResultStore, *, executor=None, progress: bool = True) -> pd.DataFrame:
    """Every run of ``cfgs`` on :func:`flatness.runs.run_sweep` (resumable; only missing runs are computed)."""
    from functools import partial

    return run_sweep(partial(run, store=store), cfgs, store, executor=executor, progress=progress)


# ============================================================================================ analysis
def choose_small_alpha(probe: pd.DataFrame, below: float) -> float | None:
    """The largest probed alpha below ``below`` whose rescaling never changed the function (Fig. S6); else None."""
    ok = probe[(probe["alpha"] < below) & (probe["function_changes"] == 0) & (probe["max_train_error"] == 0)]
    return float(ok["alpha"].max()) if len(ok) else None


def _rescale_epoch(run: pd.DataFrame) -> int | None:
    hit = run[run["alpha_applied"] == True]  # noqa: E712  (NaN-safe)
    return int(hit["epoch"].iloc[0]) if len(hit) else None


def zero_error_epoch(run: pd.DataFrame) -> int | None:
    """The first zero-error epoch of a temporal run's rows (``zero_error_epoch`` column); ``None`` if never reached."""
    z = run["zero_error_epoch"].dropna() if "zero_error_epoch" in run.columns else run.iloc[:0]
    return int(z.iloc[0]) if len(z) else None


def _ratio(a: float, b: float) -> float:
    """a / b, with a zero or non-finite denominator giving NaN (0 / 0) or +-inf instead of raising."""
    a, b = float(a), float(b)
    if b == 0 or not math.isfinite(b):
        return math.nan if (a == 0 or not math.isfinite(a) or not math.isfinite(b)) else math.copysign(math.inf, a)
    return a / b


_NO_ZERO = "the run never reached zero training error"
_NO_RESCALE = "the run was never rescaled (no alpha_applied row)"


def _zero_epoch(run: pd.DataFrame) -> int:
    z = zero_error_epoch(run)
    if z is None:
        raise ValueError("04_overtraining: the run never reached zero training error (no zero_error_epoch); "
                         "its claims cannot be evaluated")
    return z


def claim_function_constant(run: pd.DataFrame, window: int = 400) -> dict:
    """Claim 1: after zero error no function change in the last ``window`` pre-rescale epochs, sharpness falls >= 2x.

    Returns ``changes`` (epochs in the window whose function differed from the epoch before), ``ratio``
    (sharpness at the zero-error epoch / just before the rescaling), ``constant_after`` (the record after which the
    function never changed again before the rescaling), ``log10_prior_range`` (max - min of log10 P from zero error
    to the rescaling), ``holds``, ``reason`` (``None``; else why the claim could not be evaluated, e.g. a run that
    never reached zero error: then ``holds`` is False and the measurements NaN).
    """
    run = run.sort_values("epoch")
    E = _rescale_epoch(run)
    fit = zero_error_epoch(run)
    if fit is None:
        return {"changes": -1, "window": (None, None), "sharpness_zero": math.nan, "sharpness_pre_rescale": math.nan,
                "ratio": math.nan, "constant_after": None, "log10_prior_range": math.nan, "holds": False,
                "reason": _NO_ZERO}
    if E is None:
        E = int(run["epoch"].max())
    pre = run[run["epoch"] < E]
    lo = max(fit, E - window)
    win = run[(run["epoch"] > lo) & (run["epoch"] <= E)]  # n_function_changes counts epochs since the previous record
    changes = int(win["n_function_changes"].sum())
    s0 = float(run.loc[run["epoch"] == fit, "sharpness"].iloc[0])
    r_end = run[run["epoch"] == E].iloc[0]
    s_end = float(r_end.get("sharpness_pre", math.nan)) if bool(r_end["alpha_applied"] == True) else \
        float(r_end["sharpness"])  # noqa: E712
    if not math.isfinite(s_end):
        s_end = float(pre["sharpness"].iloc[-1])
    ratio = _ratio(s0, s_end)
    moved = run[(run["epoch"] > fit) & (run["epoch"] <= E) & (run["n_function_changes"] > 0)]
    return {"changes": changes, "window": (lo, E), "sharpness_zero": s0, "sharpness_pre_rescale": s_end,
            "ratio": ratio, "constant_after": int(moved["epoch"].max()) if len(moved) else fit,
            "log10_prior_range": float(run.loc[(run["epoch"] >= fit) & (run["epoch"] <= E), "log10_prior"].max()
                                       - run.loc[(run["epoch"] >= fit) & (run["epoch"] <= E), "log10_prior"].min()),
            "holds": bool(changes == 0 and ratio >= 2.0), "reason": None}


def claim_rescale_invariance(run: pd.DataFrame) -> dict:
    """Claim 2: at the rescaling step the predictions are identical, |Δ ln P| <= EP tolerance, sharpness x > 10.

    A run that was never rescaled gives ``holds=False`` with ``reason`` (else ``reason`` is ``None``)."""
    hit = run[run["alpha_applied"] == True]  # noqa: E712
    if not len(hit):
        return {"same_predictions": False, "delta_log_prior": math.nan, "tolerance": math.nan, "ratio": math.nan,
                "max_logit_change": math.nan, "epoch": None, "holds": False, "reason": _NO_RESCALE}
    r = hit.iloc[0]
    dlp = abs(float(r["log_prior"]) - float(r["log_prior_pre"]))
    tol = _EP_TOL * max(1.0, abs(float(r["log_prior_pre"])))
    ratio = _ratio(r["sharpness"], r["sharpness_pre"])
    same = bool(r["same_predictions"])
    return {"same_predictions": same, "delta_log_prior": dlp, "tolerance": tol, "ratio": ratio,
            "max_logit_change": float(r["max_logit_change"]), "epoch": int(r["epoch"]),
            "holds": bool(same and dlp <= tol and ratio > 10), "reason": None}


def claim_relaxation(run: pd.DataFrame, until: int | None = None) -> dict:
    """Claim 3: after the spike the sharpness falls back below 2x its pre-rescale value by epoch ``until``.

    A run that was never rescaled, or has no record after the rescaling, gives ``holds=False`` with ``reason``."""
    run = run.sort_values("epoch")
    hit = run[run["alpha_applied"] == True]  # noqa: E712
    none = {"sharpness_pre": math.nan, "min_ratio": math.nan, "end_ratio": math.nan, "first_epoch_below": None,
            "epochs_after": None, "holds": False}
    if not len(hit):
        return {**none, "reason": _NO_RESCALE}
    r = hit.iloc[0]
    E, pre = int(r["epoch"]), float(r["sharpness_pre"])
    after = run[(run["epoch"] > E) & (run["epoch"] <= (until if until is not None else run["epoch"].max()))]
    if not len(after):
        return {**none, "sharpness_pre": pre, "reason": f"no record after the rescaling at epoch {E}"}
    below = after[after["sharpness"] < 2 * pre]
    ratios = [_ratio(v, pre) for v in after["sharpness"]]
    finite = [v for v in ratios if not math.isnan(v)]
    return {"sharpness_pre": pre, "min_ratio": min(finite) if finite else math.nan,
            "end_ratio": ratios[-1], "reason": None,
            "first_epoch_below": int(below["epoch"].iloc[0]) if len(below) else None,
            "epochs_after": int(below["epoch"].iloc[0]) - E if len(below) else None, "holds": bool(len(below))}


def overtrain_correlations(df: pd.DataFrame, n_boot: int = 2000) -> pd.DataFrame:
    """Spearman(log P, test error) and Spearman(sharpness, test error) per (optimizer, overtraining epochs).

    Columns ``optimizer``, ``overtrain_epochs``, ``measure`` (``log_prior``/``sharpness``), ``r``, ``ci_low``,
    ``ci_high``, ``n`` (bootstrap 95% intervals, :func:`flatness.stats.correlation`).
    """
    from ..stats import correlation

    ok = df[(df["kind"] == "sweep") & df["overtrain_epochs"].notna()]
    rows = []
    for (opt, k), g in ok.groupby(["optimizer", "overtrain_epochs"], sort=True):
        for m in ("log_prior", "sharpness"):
            c = correlation(g[m], g["test_error"], "spearman", n_boot=n_boot)
            rows.append({"optimizer": opt, "overtrain_epochs": int(k), "measure": m, "r": c.r, "ci_low": c.ci_low,
                         "ci_high": c.ci_high, "n": c.n})
    return pd.DataFrame(rows)


def claim_overtrain_correlation(corr: pd.DataFrame, threshold: float = -0.5) -> dict:
    """Claim 4: Spearman(log P, test error) <= ``threshold`` at every overtraining length and optimizer.

    With no finite correlation (no sweep rows, or too few runs) ``holds`` is False and ``reason`` says why."""
    lp = corr[corr["measure"] == "log_prior"] if len(corr) else corr
    if not len(lp) or not lp["r"].notna().any():
        return {"worst_r": math.nan, "worst_ci": (math.nan, math.nan), "worst_at": None, "n": 0, "holds": False,
                "reason": "no finite Spearman(log P, test error): no overtraining sweep rows, or too few runs"}
    worst = lp.loc[lp["r"].idxmax()]
    return {"worst_r": float(worst["r"]), "worst_ci": (float(worst["ci_low"]), float(worst["ci_high"])),
            "worst_at": (worst["optimizer"], int(worst["overtrain_epochs"])), "n": int(lp["n"].min()),
            "holds": bool((lp["r"] <= threshold).all()), "reason": None}


# ============================================================================================ figures
def _mark(ax, run: pd.DataFrame) -> None:
    ax.axvline(_zero_epoch(run), color="0.5", ls=":", lw=1)
    E = _rescale_epoch(run)
    if E is not None:
        ax.axvline(E, color="tab:red", ls="--", lw=0.8)


def figure_temporal(df: pd.DataFrame, run: str = "fig5_s9", until: int | None = None, inset: bool = True,
                    title: str | None = None):
    """Fig. 5 / S6: sharpness and loss, log10 P(f), errors vs epoch, with an inset zoomed on the rescaling.

    Args:
        df: temporal rows (columns :data:`ROW_COLUMNS`).
        run: which run.
        until: last overtraining epoch shown (default: all).
        inset: zoom on the rescaling (sharpness and log10 P, epochs E-60 .. E+60).
    """
    import matplotlib.pyplot as plt

    r = df[df["run"] == run].sort_values("epoch")
    fit = _zero_epoch(r)
    if until is not None:
        r = r[r["epoch"] <= fit + until]
    E = _rescale_epoch(r)
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True, gridspec_kw={"height_ratios": [2.4, 1.2, 1]})
    ax = axes[0]
    ax.semilogy(r["epoch"], r["sharpness"], ".-", ms=3, color="tab:blue", label="Keskar sharpness")
    ax.semilogy(r["epoch"], r["loss"], "-", color="tab:green", lw=1, label="training loss")
    ax.semilogy(r["epoch"], r["hessian_norm"] / r["hessian_norm"].iloc[0] * r["sharpness"].iloc[0], "-",
                color="tab:purple", lw=0.8, alpha=0.6, label=r"$\|H\|_2$ (scaled)")
    if E is not None:
        pre = r[r["alpha_applied"] == True].iloc[0]  # noqa: E712
        ax.semilogy([E], [pre["sharpness_pre"]], "o", mfc="none", color="tab:blue", label="just before rescaling")
    ax.set_ylabel("sharpness / loss")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_ylim(top=ax.get_ylim()[1] * 30)  # head room for the inset
    axes[1].plot(r["epoch"], r["log10_prior"], ".-", ms=3, color="tab:orange")
    axes[1].set_ylabel(r"$\log_{10} P(f)$ (EP)")
    axes[2].plot(r["epoch"], r["train_error"], "-", label="train error")
    axes[2].plot(r["epoch"], r["test_error"], "-", label="test error")
    axes[2].set(ylabel="error", xlabel="epoch")
    axes[2].legend(fontsize=7)
    for a in axes:
        _mark(a, r)
    alpha = r["alpha"].dropna().iloc[0] if "alpha" in r and r["alpha"].notna().any() else math.nan
    axes[0].set_title(title or f"{run}: zero error at epoch {fit}" + (f", alpha = {alpha:g} at epoch {E}" if E else ""))
    fig.tight_layout()  # before the inset, which tight_layout cannot place
    if inset and E is not None:  # two stacked insets over the flat overtraining stretch (upper middle)
        z = r[(r["epoch"] >= E - 60) & (r["epoch"] <= E + 60)]
        top = axes[0].inset_axes([0.2, 0.7, 0.34, 0.24])
        bot = axes[0].inset_axes([0.2, 0.46, 0.34, 0.21], sharex=top)
        top.semilogy(z["epoch"], z["sharpness"], ".-", ms=3, color="tab:blue")
        top.semilogy([E], [pre["sharpness_pre"]], "o", mfc="none", color="tab:blue")
        top.set_ylabel("sharpness", fontsize=6)
        top.set_title(f"zoom on the rescaling (epochs {E - 60}-{E + 60})", fontsize=7, pad=2)
        bot.plot(z["epoch"], z["log10_prior"], ".-", ms=3, color="tab:orange")
        bot.set_ylabel(r"$\log_{10} P$", fontsize=6)
        for a in (top, bot):
            a.axvline(E, color="tab:red", ls="--", lw=0.8)
            a.tick_params(labelsize=6)
        top.tick_params(labelbottom=False)
    return fig


def figure_zeta(df: pd.DataFrame, run: str = "fig5_s9", until: int | None = None):
    """Fig. S8: sharpness at the default box and the larger ones over the early epochs (each scaled to its max)."""
    import matplotlib.pyplot as plt

    r = df[df["run"] == run].sort_values("epoch")
    cols = ["sharpness"] + sorted(c for c in r.columns if c.startswith("sharpness_zeta_") and r[c].notna().any())
    r = r[r[cols[-1]].notna()] if len(cols) > 1 else r
    if until is not None:
        r = r[r["epoch"] <= until]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for c in cols:
        lab = "zeta = 1e-4 (default)" if c == "sharpness" else f"zeta = {c.rsplit('_', 1)[1]}"
        axes[0].semilogy(r["epoch"], r[c], ".-", ms=3, label=lab)
        axes[1].plot(r["epoch"], r[c] / r[c].max(), ".-", ms=3, label=lab)
    for a in axes:
        _mark(a, r)
        a.set_xlabel("epoch")
        a.legend(fontsize=7)
    axes[0].set(ylabel="Keskar sharpness", title="Fig. S8: box size, early epochs")
    axes[1].set(ylabel="sharpness / its maximum", title="the same, each scaled to its maximum")
    fig.tight_layout()
    return fig


def figure_hessian(df: pd.DataFrame, run: str = "fig5_s9", until: int | None = None):
    """Fig. S10: the Hessian spectral norm over time, beside the sharpness."""
    import matplotlib.pyplot as plt

    r = df[df["run"] == run].sort_values("epoch")
    if until is not None:
        r = r[r["epoch"] <= _zero_epoch(r) + until]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.semilogy(r["epoch"], r["hessian_norm"], ".-", ms=3, color="tab:purple", label=r"$\|H\|_2$ (Lanczos)")
    ax.set(xlabel="epoch", ylabel=r"Hessian spectral norm on S", title="Fig. S10: Hessian-based flatness over time")
    a2 = ax.twinx()
    a2.semilogy(r["epoch"], r["sharpness"], "-", lw=0.8, color="tab:blue", alpha=0.6, label="sharpness")
    a2.set_ylabel("Keskar sharpness", color="tab:blue")
    _mark(ax, r)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def figure_long_run(df: pd.DataFrame, run: str = "fig5_s9", control: str | None = "control"):
    """Fig. S9: the long run after the rescaling, with the unrescaled control (when present) for comparison."""
    import matplotlib.pyplot as plt

    r = df[df["run"] == run].sort_values("epoch")
    fig, axes = plt.subplots(2, 1, figsize=(7.5, 5.5), sharex=True)
    axes[0].semilogy(r["epoch"], r["sharpness"], ".-", ms=3, label=f"{run} (rescaled)")
    axes[1].plot(r["epoch"], r["log10_prior"], ".-", ms=3, label=run)
    if control is not None and (df["run"] == control).any():
        c = df[df["run"] == control].sort_values("epoch")
        axes[0].semilogy(c["epoch"], c["sharpness"], ".-", ms=3, color="0.5", label="no rescaling")
        axes[1].plot(c["epoch"], c["log10_prior"], ".-", ms=3, color="0.5", label="no rescaling")
    axes[0].set(ylabel="Keskar sharpness", title="Fig. S9: overtraining long after the rescaling")
    axes[1].set(ylabel=r"$\log_{10} P(f)$", xlabel="epoch")
    for a in axes:
        _mark(a, r)
        a.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_overtrain_scatter(df: pd.DataFrame, floor: float = 1e-12):
    """Figs. S11-S16: test error vs log10 P and vs sharpness, per optimizer (rows) and overtraining length (cols).

    Sharpness below ``floor`` (exactly 0 after long Adam runs, whose loss and Hessian all but vanish) is drawn at
    ``floor`` on the log axis; the annotated correlations then use the clipped values (Spearman is unchanged).
    """
    import matplotlib.pyplot as plt

    from ..plotting import scatter_corr

    ok = df[(df["kind"] == "sweep") & df["overtrain_epochs"].notna()]
    opts = sorted(ok["optimizer"].unique())
    ks = sorted(int(k) for k in ok["overtrain_epochs"].unique())
    fig, axes = plt.subplots(2 * len(opts), len(ks), figsize=(3.3 * len(ks), 2.9 * 2 * len(opts)), squeeze=False)
    for i, opt in enumerate(opts):
        for j, k in enumerate(ks):
            g = ok[(ok["optimizer"] == opt) & (ok["overtrain_epochs"] == k)]
            scatter_corr(axes[2 * i, j], g["log10_prior"], g["test_error"], hue=g["n_attack"], cmap="viridis",
                         xlabel=r"$\log_{10} P(f)$", ylabel="test error", title=f"{opt}, +{k} epochs")
            sharp = g["sharpness"].clip(lower=floor)  # long Adam runs reach sharpness 0.0 (loss ~ 0): shown at floor
            scatter_corr(axes[2 * i + 1, j], sharp, g["test_error"], hue=g["n_attack"], cmap="viridis", logx=True,
                         xlabel="Keskar sharpness" + (f" (0 shown at {floor:g})" if (g["sharpness"] < floor).any()
                                                      else ""), ylabel="test error", title=f"{opt}, +{k} epochs")
    for ax in axes.ravel():  # head room: the annotation box sits in the upper left
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + 0.6 * (hi - lo))
    fig.tight_layout()
    return fig


def figure_overtrain_spearman(corr: pd.DataFrame):
    """Spearman(log P, test error) and Spearman(sharpness, test error) vs overtraining epochs, with 95% CIs."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), sharey=True)
    for ax, m, lab in zip(axes, ("log_prior", "sharpness"), (r"$\log P(f)$", "sharpness")):
        for i, (opt, g) in enumerate(corr[corr["measure"] == m].groupby("optimizer")):
            g = g.sort_values("overtrain_epochs")
            x = np.arange(len(g)) + (i - 0.5) * 0.08
            yerr = [(g["r"] - g["ci_low"]).clip(lower=0), (g["ci_high"] - g["r"]).clip(lower=0)]
            ax.errorbar(x, g["r"], yerr=yerr, fmt="o-", capsize=3, label=opt)
            ax.set_xticks(np.arange(len(g)), [str(k) for k in g["overtrain_epochs"]])
        ax.axhline(0, color="k", lw=0.8)
        if m == "log_prior":
            ax.axhline(-0.5, color="tab:red", lw=0.8, ls="--")
        ax.set(xlabel="overtraining epochs", title=f"Spearman({lab}, test error)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("Spearman r (95% CI)")
    fig.tight_layout()
    return fig

