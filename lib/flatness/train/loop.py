"""The single-model training loop: train on S ∪ A to zero error on S (Zhang et al. 2021), then optionally
over-train; per-epoch history, callbacks (:mod:`flatness.train.callbacks`), divergence detection and a status
(``converged``, ``max_epochs``, ``diverged``)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from .._checks import check_choice, check_data, check_int, check_labels, check_positive
from .._device import resolve_device
from .._modes import eval_mode
from ..losses import sigmoid_bce, zero_one_error
from .callbacks import _alpha_rescale_inplace, _Callbacks, _rng_states, _set_rng_states
from .optim import OPTIMIZERS, make_optimizer

__all__ = ["TrainState", "TrainResult", "train_to_zero_error", "divergence_threshold"]

DIVERGENCE_FACTOR = 1e3  # default: diverged once a loss exceeds 1000 x max(initial loss, 1)


def divergence_threshold(initial_loss: float, factor: float | None) -> float:
    r"""The loss above which a run counts as diverged: :math:`\text{factor} \cdot \max(L_0, 1)`.

    :math:`L_0` is the full training loss at initialisation (epoch 0). The floor 1 keeps the rule meaningful for
    losses that start near 0 (half-MSE on a well-initialised model); a constant-prediction sigmoid cross-entropy
    starts at :math:`\ln 2 \approx 0.69`, so the default factor 1000 flags mean losses above 1000, i.e. logits of
    order 1000 on the wrong side, which no healthy run reaches. ``factor=None`` disables the rule (``inf``);
    non-finite losses always count as diverged.
    """
    if factor is None:
        return math.inf
    l0 = initial_loss if math.isfinite(initial_loss) else 1.0
    return float(factor) * max(l0, 1.0)


@dataclass
class TrainState:
    """What a callback sees (:mod:`flatness.train.callbacks`). Add metrics to ``record`` (this epoch's history
    row); set ``stop = True`` or return ``True`` from a hook to stop training.

    ``data`` is the fitted pair (S ∪ A), ``splits`` maps ``"train"``, ``"fit"``, ``"attack"``, ``"test"`` to
    ``(x, y)`` pairs (``None`` when absent), ``generator`` draws the mini-batch order (one ``randperm`` per
    epoch), ``batch`` holds the indices (into ``data``) of the last mini-batch and ``loss`` its loss.
    """

    epoch: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    record: dict
    phase: str  # "train" (before zero error on S) or "overtrain"
    step: int = 0  # optimizer steps so far (global iteration count)
    data: tuple | None = None  # (x, y) trained on: S ∪ A
    splits: dict = field(default_factory=dict)
    generator: torch.Generator | None = None
    batch: torch.Tensor | None = None
    loss: float | None = None  # last mini-batch loss
    epochs_to_zero: int | None = None
    fit_epoch: int | None = None  # first epoch meeting the stop rule (zero error on S, and loss <= loss_threshold)
    status: str | None = None  # set at the end ("converged", "max_epochs", "diverged")
    history: list = field(default_factory=list)  # rows so far (the last one is ``record`` after an epoch)
    tracks: list = field(default_factory=list)  # step-tracked rows (Track(on="step"))
    config: dict = field(default_factory=dict)
    stop: bool = False

    # ---- the interface the built-in callbacks use (shared with the ensemble's state)
    def each_model(self):
        """``(None, model)``: the model to measure (ensembles yield one pair per active model)."""
        yield None, self.model

    def active_indices(self) -> list:
        return [None]

    def add_epoch_values(self, values) -> None:
        for _, v in values:
            self.record.update(v)

    def add_step_values(self, values) -> None:
        for _, v in values:
            self.tracks.append({"epoch": self.epoch, "step": self.step, **v})

    def alpha_rescale(self, layer: int, alpha: float) -> None:
        _alpha_rescale_inplace(self.model, layer, alpha)

    def snapshot(self) -> dict:
        """Everything needed to resume the run bit-identically (see :class:`~flatness.train.Checkpoint`)."""
        opt_sd = self.optimizer.state_dict() if hasattr(self.optimizer, "state_dict") else None
        return {"kind": "train_to_zero_error", "version": 1, "epoch": self.epoch, "step": self.step,
                "phase": self.phase, "epochs_to_zero": self.epochs_to_zero, "fit_epoch": self.fit_epoch,
                "status": self.status,
                "stop": self.stop, "model": copy.deepcopy(self.model.state_dict()),
                "optimizer": copy.deepcopy(opt_sd), "generator": self.generator.get_state(),
                "rng": _rng_states(), "history": copy.deepcopy(self.history),
                "tracks": copy.deepcopy(self.tracks), "config": dict(self.config)}

    def restore(self, ckpt: dict) -> None:
        """Load a :meth:`snapshot` into this state (model and optimizer in place)."""
        if ckpt.get("kind") != "train_to_zero_error":
            raise ValueError(f"train_to_zero_error: the checkpoint is of kind {ckpt.get('kind')!r}; expected "
                             f"'train_to_zero_error'")
        self.model.load_state_dict(ckpt["model"])
        if ckpt["optimizer"] is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.generator.set_state(ckpt["generator"])
        _set_rng_states(ckpt["rng"])
        self.epoch, self.step, self.phase = int(ckpt["epoch"]), int(ckpt["step"]), ckpt["phase"]
        self.epochs_to_zero, self.status, self.stop = ckpt["epochs_to_zero"], ckpt["status"], bool(ckpt["stop"])
        self.fit_epoch = ckpt.get("fit_epoch", self.epochs_to_zero)
        self.history[:] = ckpt["history"]
        self.tracks[:] = ckpt["tracks"]
        self.record = self.history[-1] if self.history else {}


@dataclass
class TrainResult:
    """Outcome of :func:`train_to_zero_error`."""

    model: nn.Module
    status: str  # "converged", "max_epochs" or "diverged"
    history: pd.DataFrame  # one row per epoch (epoch 0 = initialisation)
    epochs_to_zero: int | None  # first epoch with zero error on S (None if never)
    config: dict = field(default_factory=dict)
    tracks: pd.DataFrame = field(default_factory=pd.DataFrame)  # step-tracked rows (Track(on="step"))

    @property
    def final(self) -> dict:
        """The last history row as a dict."""
        return self.history.iloc[-1].to_dict() if len(self.history) else {}


def _splits(task):
    """(train, attack, test) pairs from a BinaryTask-like object or an (x, y) pair."""
    if hasattr(task, "train"):
        return task.train, getattr(task, "attack", None), getattr(task, "test", None)
    x, y = check_data("train_to_zero_error", task)
    return (x, y), None, None


@torch.no_grad()
def _evaluate(model: nn.Module, loss_fn, data, batch: int = 4096) -> tuple[float, float]:
    """(mean loss, error) of ``model`` on ``data``; (nan, nan) for empty or missing data."""
    if data is None or len(data[0]) == 0:
        return math.nan, math.nan
    x, y = data
    tot_loss, tot_err = 0.0, 0.0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch])
        n = len(out)
        tot_loss += float(loss_fn(out, y[i:i + batch])) * n
        tot_err += float(zero_one_error(out, y[i:i + batch])) * n
    return tot_loss / len(x), tot_err / len(x)


def _params_finite(params) -> bool:
    """Whether every tensor is finite (one reduction per tensor, one host sync)."""
    params = list(params)
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True


def _noise_seed(seed: int) -> int:
    """The seed of an optimizer's own noise generator (Entropy-SGD), derived from the run's ``seed`` (not equal to
    it, so the noise is not the mini-batch order's stream)."""
    return (int(seed) * 1_000_003 + 12_345) % (2 ** 63)


def train_to_zero_error(model: nn.Module, task, optimizer: str | Callable = "sgd", lr: float | None = None,
                        batch_size: int | None = 32, max_epochs: int = 50_000, overtrain_epochs: int = 0,
                        seed: int = 0, callbacks: Sequence = (),
                        loss_fn: Callable = sigmoid_bce, device=None, progress: bool = False,
                        optimizer_kwargs: dict | None = None, copy_model: bool = True,
                        divergence_factor: float | None = DIVERGENCE_FACTOR,
                        loss_threshold: float | None = None, eval_every: int = 1) -> TrainResult:
    """Train on S ∪ A until zero error on S (Zhang et al. 2021), then optionally over-train.

    After every epoch the full loss on S ∪ A and the errors on S, A and T are recorded (epoch 0 is the
    initialisation; the ``step`` column counts optimizer steps so far). Training stops at the first epoch whose
    error on S is zero (status ``converged``), after ``overtrain_epochs`` further epochs if asked; at
    ``max_epochs`` (status ``max_epochs``); when a callback asks; or as soon as the run diverges (status
    ``diverged``; recorded, nothing is raised): a mini-batch loss that is non-finite or above
    :func:`divergence_threshold` (``divergence_factor`` times the initial loss, floored at 1; checked after
    every step), or non-finite parameters or full loss (checked after every epoch).

    Each step calls ``optimizer.step(closure)``, the closure zeroing the gradients, computing the mini-batch
    loss and back-propagating it, so optimizers that re-evaluate the loss (Entropy-SGD, L-BFGS-like) work;
    plain optimizers take exactly the updates of the usual ``zero_grad``/``backward``/``step`` order.

    Args:
        model: the network (copied unless ``copy_model=False``; the copy is returned in the result).
        task: a :class:`flatness.data.BinaryTask` (or anything with ``train``/``attack``/``test`` (x, y)
            pairs), or a plain ``(x, y)`` training pair.
        optimizer: name in :data:`OPTIMIZERS` (``sgd``, ``gd`` = full batch, ``momentum``, ``adam``,
            ``adagrad``, ``rmsprop``, ...) or a factory ``params -> Optimizer``.
        lr: learning rate (default: the optimizer's reference default).
        batch_size: mini-batch size (``None`` or the optimizer ``gd``: full batch).
        max_epochs: cap on epochs before zero error (the paper used 50,000).
        overtrain_epochs: epochs to keep training after the first zero-error epoch (Fig. 5).
        seed: seeds the mini-batch order (``torch.randperm(n, generator=torch.Generator().manual_seed(seed))``
            once per epoch; the initialisation is the caller's) and, for an optimizer that draws noise from its
            own ``generator`` attribute left ``None`` (Entropy-SGD's SGLD noise), that generator too, so a run
            never depends on torch's global RNG (i.e. on what ran before it in the process); CPU runs are
            bit-for-bit repeatable.
        callbacks: :class:`~flatness.train.Callback` objects (``Track``, ``AlphaRescaleAt``, ``Checkpoint``...)
            or plain callables called after each epoch with the :class:`TrainState`, which may add to
            ``state.record``, change the model in place, and return ``True`` to stop.
        loss_fn: training loss (default: mean sigmoid cross-entropy).
        device: where to train (default: the model's device).
        progress: show a tqdm bar over epochs.
        optimizer_kwargs: extra hyper-parameters for a named optimizer (e.g. ``{"momentum": 0.5}``).
        copy_model: train a deep copy (default) rather than ``model`` itself.
        divergence_factor: see :func:`divergence_threshold` (``None``: only non-finite values diverge).
        loss_threshold: also require the mean loss on S ∪ A to fall to this value before the run counts as
            fitted (status ``converged``; over-training counts from that epoch), as
            :func:`~flatness.train.train_ensemble_to_zero_error` does; ``epochs_to_zero`` is still the first
            zero-error epoch.
        eval_every: evaluate the full losses and errors (the history row, the stop rule, the full-loss and
            parameter divergence checks, and the epoch callbacks) only after every ``eval_every``-th epoch, and
            after the last one (a callback's stop, or divergence); the mini-batch divergence check still runs
            every step. ``1`` (default): every epoch. With ``eval_every > 1`` zero error is only seen at
            evaluated epochs, so ``epochs_to_zero`` and the start of over-training are the first *evaluated*
            epoch with zero error (up to ``eval_every - 1`` epochs late). Long runs tracked per step (``Track(on="step")``) use it
            to skip full-data passes they do not need: on a CPU one forward pass over the training set costs
            as much as a third to a whole epoch of training (Chen et al.'s small VGG, batch 20).
    Returns:
        :class:`TrainResult` (``tracks`` holds the rows of step-tracking callbacks).
    """
    fn = "train_to_zero_error"
    max_epochs = check_int(fn, "max_epochs", max_epochs, minimum=0)
    overtrain_epochs = check_int(fn, "overtrain_epochs", overtrain_epochs, minimum=0)
    eval_every = check_int(fn, "eval_every", eval_every, minimum=1)
    if batch_size is not None:
        batch_size = check_int(fn, "batch_size", batch_size, minimum=1)
    if not callable(optimizer):
        check_choice(fn, "optimizer", optimizer, OPTIMIZERS)
    if loss_threshold is not None:
        loss_threshold = check_positive(fn, "loss_threshold", loss_threshold)
    if divergence_factor is not None:
        divergence_factor = check_positive(fn, "divergence_factor", divergence_factor)
    cbs = _Callbacks(callbacks, fn)
    device = resolve_device(device, model)
    model = (copy.deepcopy(model) if copy_model else model).to(device)
    train, attack, test = _splits(task)
    train = tuple(t.to(device) for t in train)
    attack = tuple(t.to(device) for t in attack) if attack is not None and len(attack[0]) else None
    test = tuple(t.to(device) for t in test) if test is not None and len(test[0]) else None
    fit_x = train[0] if attack is None else torch.cat([train[0], attack[0]])
    fit_y = train[1] if attack is None else torch.cat([train[1], attack[1]])
    with torch.no_grad(), eval_mode(model):  # labels valid for the loss (e.g. classes in [0, K) for half_mse)
        out1 = model(fit_x[:1])
    check_labels(fn, loss_fn, fit_y, int(out1.shape[-1]) if out1.ndim >= 2 else 1)
    n = len(fit_x)
    full_batch = isinstance(optimizer, str) and getattr(OPTIMIZERS[optimizer], "full_batch", optimizer == "gd")
    bs = n if (batch_size is None or full_batch) else min(batch_size, n)
    opt = make_optimizer(optimizer, model.parameters(), lr=lr, **(optimizer_kwargs or {}))
    if getattr(opt, "generator", False) is None:  # a noise-drawing optimizer (Entropy-SGD's SGLD) without its own
        opt.generator = torch.Generator().manual_seed(_noise_seed(seed))  # generator: seeded here, not global
    gen = torch.Generator().manual_seed(int(seed))
    config = {"optimizer": optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "custom"),
              "lr": opt.param_groups[0]["lr"] if hasattr(opt, "param_groups") else lr, "batch_size": bs,
              "max_epochs": max_epochs, "overtrain_epochs": overtrain_epochs, "seed": int(seed), "n_fit": n,
              "divergence_factor": divergence_factor, "loss_threshold": loss_threshold}
    state = TrainState(0, model, opt, {}, "train", data=(fit_x, fit_y), generator=gen, config=config,
                       splits={"train": train, "fit": (fit_x, fit_y), "attack": attack, "test": test})
    rows = state.history

    def record(epoch: int, phase: str) -> dict:
        with eval_mode(model):
            if attack is None:  # S ∪ A = S: one pass
                loss, tr_err = _evaluate(model, loss_fn, train)
            else:
                loss, _ = _evaluate(model, loss_fn, (fit_x, fit_y))
                _, tr_err = _evaluate(model, loss_fn, train)
            _, at_err = _evaluate(model, loss_fn, attack)
            te_loss, te_err = _evaluate(model, loss_fn, test)
        row = {"epoch": epoch, "phase": phase, "loss": loss, "train_error": tr_err, "attack_error": at_err,
               "test_error": te_err, "test_loss": te_loss, "step": state.step}
        rows.append(row)
        state.record = row
        return row

    def closure():
        opt.zero_grad(set_to_none=True)
        out = loss_fn(model(xb), yb)
        out.backward()
        last[0] = out
        return out

    def fits(row: dict) -> bool:  # the stop rule: zero error on S (and, with loss_threshold, a loss that low)
        return row["train_error"] == 0.0 and (loss_threshold is None or row["loss"] <= loss_threshold)

    cbs.begin(state)  # may restore a checkpoint: state.epoch > 0, history non-empty
    if not rows:
        row = record(0, "train")
        if not math.isfinite(row["loss"]):
            state.status = "diverged"
        elif row["train_error"] == 0.0:
            state.epochs_to_zero = 0
            if fits(row):
                state.fit_epoch = 0
        if state.status is None:
            cbs.epoch(state)
    threshold = divergence_threshold(rows[0]["loss"], divergence_factor)
    bar = None
    if progress and state.status is None:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_epochs + overtrain_epochs, initial=state.epoch, desc="epochs", leave=False,
                   mininterval=2.0)
    model.train()
    last: list = [None]
    while state.status is None and not state.stop:
        if state.fit_epoch is None and state.epoch >= max_epochs:
            break
        if state.fit_epoch is not None and state.epoch >= state.fit_epoch + overtrain_epochs:
            break
        state.epoch += 1
        state.phase = "train" if state.fit_epoch is None else "overtrain"
        perm = torch.randperm(n, generator=gen).to(device)
        diverged = False
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            xb, yb = fit_x[idx], fit_y[idx]
            last[0] = None
            ret = opt.step(closure)
            loss = ret if ret is not None else last[0]
            state.step += 1
            lv = float(loss.detach() if torch.is_tensor(loss) else loss) if loss is not None else math.nan
            state.batch, state.loss = idx, lv
            if not math.isfinite(lv) or lv > threshold:
                diverged = True
                break
            if cbs.stepping and cbs.step(state):
                break
        at_end = (state.epoch >= max_epochs if state.fit_epoch is None
                  else state.epoch >= state.fit_epoch + overtrain_epochs)
        if not (diverged or state.stop or at_end or state.epoch % eval_every == 0):
            continue  # eval_every > 1: no full-data pass, no history row, no epoch callbacks this epoch
        diverged = diverged or not _params_finite(model.parameters())
        row = record(state.epoch, state.phase)
        if diverged or not math.isfinite(row["loss"]) or row["loss"] > threshold:
            state.status = "diverged"
            break
        if state.epochs_to_zero is None and row["train_error"] == 0.0:
            state.epochs_to_zero = state.epoch
        if state.fit_epoch is None and fits(row):
            state.fit_epoch = state.epoch
        cbs.epoch(state)
        if bar is not None:
            bar.update(state.epoch - bar.n)
            bar.set_postfix(loss=f"{row['loss']:.3g}", err=f"{row['train_error']:.3f}", refresh=False)
    if bar is not None:
        bar.close()
    if state.status is None:
        state.status = "converged" if state.fit_epoch is not None else "max_epochs"
    model.eval()
    cbs.end(state)
    return TrainResult(model, state.status, pd.DataFrame(rows), state.epochs_to_zero, config,
                       pd.DataFrame(state.tracks))
