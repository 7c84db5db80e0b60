"""The single-model training loop: train on S ∪ A to zero error on S (Zhang et al. 2021), then optionally
over-train; per-epoch history, callbacks and a status (``converged``, ``max_epochs``, ``diverged``)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from .._checks import check_choice, check_data, check_int
from .._device import resolve_device
from .._modes import eval_mode
from ..losses import sigmoid_bce, zero_one_error
from .optim import OPTIMIZERS, make_optimizer

__all__ = ["TrainState", "TrainResult", "train_to_zero_error"]


@dataclass
class TrainState:
    """What a callback sees after each epoch. Add metrics to ``record``; return ``True`` to stop training."""

    epoch: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    record: dict
    phase: str  # "train" (before zero error on S) or "overtrain"


@dataclass
class TrainResult:
    """Outcome of :func:`train_to_zero_error`."""

    model: nn.Module
    status: str  # "converged", "max_epochs" or "diverged"
    history: pd.DataFrame  # one row per epoch (epoch 0 = initialisation)
    epochs_to_zero: int | None  # first epoch with zero error on S (None if never)
    config: dict = field(default_factory=dict)

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


def train_to_zero_error(model: nn.Module, task, optimizer: str | Callable = "sgd", lr: float | None = None,
                        batch_size: int | None = 32, max_epochs: int = 50_000, overtrain_epochs: int = 0,
                        seed: int = 0, callbacks: Sequence[Callable[[TrainState], bool | None]] = (),
                        loss_fn: Callable = sigmoid_bce, device=None, progress: bool = False,
                        optimizer_kwargs: dict | None = None, copy_model: bool = True) -> TrainResult:
    """Train on S ∪ A until zero error on S (Zhang et al. 2021), then optionally over-train.

    After every epoch the full loss on S ∪ A and the errors on S, A and T are recorded (epoch 0 is the
    initialisation). Training stops at the first epoch whose error on S is zero (status ``converged``), after
    ``overtrain_epochs`` further epochs if asked; at ``max_epochs`` (status ``max_epochs``); or as soon as a
    mini-batch loss is non-finite (status ``diverged``; the run is recorded, nothing is raised).

    Args:
        model: the network (copied unless ``copy_model=False``; the copy is returned in the result).
        task: a :class:`flatness.data.BinaryTask` (or anything with ``train``/``attack``/``test`` (x, y)
            pairs), or a plain ``(x, y)`` training pair.
        optimizer: name in :data:`OPTIMIZERS` (``sgd``, ``gd`` = full batch, ``momentum``, ``adam``,
            ``adagrad``, ``rmsprop``) or a factory ``params -> Optimizer``.
        lr: learning rate (default: the optimizer's reference default).
        batch_size: mini-batch size (``None`` or the optimizer ``gd``: full batch).
        max_epochs: cap on epochs before zero error (the paper used 50,000).
        overtrain_epochs: epochs to keep training after the first zero-error epoch (Fig. 5).
        seed: seeds the mini-batch order (the initialisation is the caller's); CPU runs are bit-for-bit
            repeatable.
        callbacks: called after each epoch with a :class:`TrainState`; may add to ``state.record``, may change
            the model in place (e.g. alpha-rescaling), and may return ``True`` to stop.
        loss_fn: training loss (default: mean sigmoid cross-entropy).
        device: where to train (default: the model's device).
        progress: show a tqdm bar over epochs.
        optimizer_kwargs: extra hyper-parameters for a named optimizer (e.g. ``{"momentum": 0.5}``).
    """
    fn = "train_to_zero_error"
    max_epochs = check_int(fn, "max_epochs", max_epochs, minimum=0)
    overtrain_epochs = check_int(fn, "overtrain_epochs", overtrain_epochs, minimum=0)
    if batch_size is not None:
        batch_size = check_int(fn, "batch_size", batch_size, minimum=1)
    if not callable(optimizer):
        check_choice(fn, "optimizer", optimizer, OPTIMIZERS)
    device = resolve_device(device, model)
    model = (copy.deepcopy(model) if copy_model else model).to(device)
    train, attack, test = _splits(task)
    train = tuple(t.to(device) for t in train)
    attack = tuple(t.to(device) for t in attack) if attack is not None and len(attack[0]) else None
    test = tuple(t.to(device) for t in test) if test is not None and len(test[0]) else None
    fit_x = train[0] if attack is None else torch.cat([train[0], attack[0]])
    fit_y = train[1] if attack is None else torch.cat([train[1], attack[1]])
    n = len(fit_x)
    bs = n if (batch_size is None or optimizer == "gd") else min(batch_size, n)
    opt = make_optimizer(optimizer, model.parameters(), lr=lr, **(optimizer_kwargs or {}))
    gen = torch.Generator().manual_seed(int(seed))
    config = {"optimizer": optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "custom"),
              "lr": opt.param_groups[0]["lr"], "batch_size": bs, "max_epochs": max_epochs,
              "overtrain_epochs": overtrain_epochs, "seed": int(seed), "n_fit": n}

    rows: list[dict] = []

    def record(epoch: int, phase: str) -> dict:
        with eval_mode(model):
            loss, _ = _evaluate(model, loss_fn, (fit_x, fit_y))
            _, tr_err = _evaluate(model, loss_fn, train)
            _, at_err = _evaluate(model, loss_fn, attack)
            te_loss, te_err = _evaluate(model, loss_fn, test)
        row = {"epoch": epoch, "phase": phase, "loss": loss, "train_error": tr_err, "attack_error": at_err,
               "test_error": te_err, "test_loss": te_loss}
        rows.append(row)
        return row

    status, epochs_to_zero = "max_epochs", None
    row = record(0, "train")
    if row["train_error"] == 0.0:
        epochs_to_zero, status = 0, "converged"
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_epochs + overtrain_epochs, desc="epochs", leave=False, mininterval=2.0)
    epoch = 0
    model.train()
    while True:
        if epochs_to_zero is None and epoch >= max_epochs:
            break
        if epochs_to_zero is not None and epoch >= epochs_to_zero + overtrain_epochs:
            break
        epoch += 1
        phase = "train" if epochs_to_zero is None else "overtrain"
        perm = torch.randperm(n, generator=gen).to(device)
        diverged = False
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(fit_x[idx]), fit_y[idx])
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            opt.step()
        row = record(epoch, phase)
        if diverged or not math.isfinite(row["loss"]):
            status = "diverged"
            break
        if epochs_to_zero is None and row["train_error"] == 0.0:
            epochs_to_zero, status = epoch, "converged"
        stop = False
        for cb in callbacks:
            stop = bool(cb(TrainState(epoch, model, opt, row, phase))) or stop
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3g}", err=f"{row['train_error']:.3f}", refresh=False)
        if stop:
            break
    if bar is not None:
        bar.close()
    model.eval()
    return TrainResult(model, status, pd.DataFrame(rows), epochs_to_zero, config)
