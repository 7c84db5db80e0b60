"""Training to zero training error, as in Zhang et al. 2021 (Sec. 5, reference sheet "Networks and training").

- :func:`train_to_zero_error`: one model on S ∪ A, stopping at the first epoch with zero error on S (the
  attack set need not be fitted), optionally over-training; per-epoch history, callbacks, and a status
  (``converged``, ``max_epochs``, ``diverged``: a non-finite loss is recorded, never raised).
- :func:`train_ensemble_to_zero_error`: many small models of one architecture trained at once as a
  stacked ensemble (``torch.func.stack_module_state`` + ``vmap``), each with its own mini-batch order,
  each frozen at its own first zero-error epoch. Used for the thousands of Boolean runs of notebook 01.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap

from ._checks import check_choice, check_data, check_int, check_positive
from ._device import resolve_device
from ._modes import eval_mode
from .losses import sigmoid_bce, zero_one_error

__all__ = ["OPTIMIZERS", "make_optimizer", "TrainState", "TrainResult", "train_to_zero_error",
           "EnsembleResult", "train_ensemble_to_zero_error"]

# name -> (torch optimizer class, default hyper-parameters from the reference sheet; "gd" = full batch SGD).
# RMSProp and full-batch GD settings were not recovered: framework defaults (lr 0.01, alpha 0.99) are used.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.01}),
    "gd": (torch.optim.SGD, {"lr": 0.01}),
    "momentum": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.01}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01, "alpha": 0.99}),
}


def make_optimizer(name: str | Callable, params, lr: float | None = None, **kwargs) -> torch.optim.Optimizer:
    """An optimizer by name (:data:`OPTIMIZERS`) with the reference defaults, or from a factory callable."""
    if callable(name):
        return name(params)
    check_choice("make_optimizer", "optimizer", name, OPTIMIZERS)
    cls, defaults = OPTIMIZERS[name]
    hp = {**defaults, **kwargs}
    if lr is not None:
        hp["lr"] = check_positive("make_optimizer", "lr", lr)
    return cls(params, **hp)


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


@dataclass
class EnsembleResult:
    """Outcome of :func:`train_ensemble_to_zero_error` for ``M`` models."""

    params: dict[str, Tensor]  # stacked parameters, leading dimension M, frozen at each model's stopping epoch
    epochs_to_zero: Tensor  # (M,) int64: first epoch with zero error, -1 if never
    status: list[str]  # per model: "converged", "max_epochs" or "diverged"
    base_model: nn.Module  # an architecture template for functional_call
    stop_epoch: Tensor | None = None  # (M,) int64: the epoch each model stopped at (-1 if it never converged)

    def model(self, i: int) -> nn.Module:
        """Model ``i`` as a plain ``nn.Module`` (a copy of the template holding its parameters)."""
        m = copy.deepcopy(self.base_model)
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(self.params[name][i])
        return m

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Outputs of every model on ``x``: ``(M, N, ...)``."""
        fn = vmap(lambda p, xx: functional_call(self.base_model, p, (xx,)), in_dims=(0, None))
        return fn(self.params, x.to(next(iter(self.params.values())).device))


def train_ensemble_to_zero_error(models: Sequence[nn.Module], data, lr: float = 0.01, batch_size: int | None = 32,
                                 max_epochs: int = 10_000, seed: int = 0, loss_fn: Callable = sigmoid_bce,
                                 device=None, progress: bool = False,
                                 loss_threshold: float | None = None) -> EnsembleResult:
    r"""Plain SGD on many models of one architecture at once; each stops at its first zero-error epoch
    (or, with ``loss_threshold``, at its first epoch with zero error and full-data mean loss <= the threshold).

    The models are stacked (``torch.func.stack_module_state``) and evaluated with ``vmap``; each model has its
    own mini-batch order (drawn from ``seed``), so the runs are independent, as ``M`` separate calls of
    :func:`train_to_zero_error` with ``optimizer="sgd"`` and no attack set would be (same update rule
    :math:`\theta \leftarrow \theta - \eta \nabla L_B(\theta)`; the random streams differ).

    Args:
        models: ``M`` freshly initialised models with identical parameter shapes and no buffers.
        data: ``(x, y)`` training pair: ``x`` ``(N, ...)`` shared by all models, ``y`` ``(N,)`` shared labels
            or ``(M, N)`` one labelling per model (e.g. each model fits its own Boolean function).
        lr, batch_size, max_epochs, seed, loss_fn, device: as :func:`train_to_zero_error`.
        loss_threshold: also require the mean training loss to fall to this value, so that models fitting
            different functions are compared at the same loss rather than at different stages of training.
    Returns:
        :class:`EnsembleResult` whose parameters are those of each model's stopping epoch.
    """
    fn = "train_ensemble_to_zero_error"
    if len(models) == 0:
        raise ValueError(f"{fn}: models is empty; expected at least one model")
    try:
        x, y = data
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: data must be a pair (x, y) of tensors") from None
    per_model = y.ndim == 2
    if per_model and y.shape != (len(models), len(x)):
        raise ValueError(f"{fn}: y has shape {tuple(y.shape)}; expected (N,) = ({len(x)},) or "
                         f"(M, N) = ({len(models)}, {len(x)})")
    check_data(fn, (x, y.T if per_model else y))
    check_positive(fn, "lr", lr)
    max_epochs = check_int(fn, "max_epochs", max_epochs, minimum=0)
    device = resolve_device(device, models[0])
    x, y = x.to(device), y.to(device)
    n = len(x)
    bs = n if batch_size is None else min(check_int(fn, "batch_size", batch_size, minimum=1), n)
    base = copy.deepcopy(models[0]).to(device)
    params, buffers = stack_module_state([m.to(device) for m in models])
    if buffers:
        raise ValueError(f"{fn}: models with buffers (e.g. BatchNorm) are not supported; got {list(buffers)}")
    params = {k: v.detach().clone() for k, v in params.items()}
    M = len(models)

    def loss_one(p, xb, yb):
        return loss_fn(functional_call(base, p, (xb,)), yb)

    grad_all = vmap(grad(loss_one), in_dims=(0, 0, 0))
    predict_all = vmap(lambda p, xx: functional_call(base, p, (xx,)), in_dims=(0, None))

    def evaluate(p, yy: Tensor) -> tuple[Tensor, Tensor]:
        """(error, mean loss) of each model on the full data."""
        out = predict_all(p, x)  # (m, N, K)
        loss = vmap(loss_fn)(out, yy)
        if out.shape[-1] > 1:
            return (out.argmax(-1) != yy.long()).float().mean(1), loss
        return ((out.reshape(len(out), n) > 0).long() != yy.long()).float().mean(1), loss

    def labels(rows: Tensor) -> Tensor:  # (m, N) labels of the given models
        return y[rows] if per_model else y.expand(len(rows), n)

    def finished(err: Tensor, loss: Tensor) -> Tensor:
        return (err == 0) & (loss <= loss_threshold) if loss_threshold is not None else err == 0

    gen = torch.Generator().manual_seed(int(seed))
    epochs_to_zero = torch.full((M,), -1, dtype=torch.int64)
    stop_epoch = torch.full((M,), -1, dtype=torch.int64)
    status = ["max_epochs"] * M
    with torch.no_grad():
        err, loss = evaluate(params, labels(torch.arange(M, device=device)))
    epochs_to_zero[(err == 0).cpu()] = 0
    active = ~finished(err, loss)
    stop_epoch[~active.cpu()] = 0
    for i in torch.nonzero(~active).flatten().tolist():
        status[i] = "converged"
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_epochs, desc=f"{M} models", leave=False, mininterval=2.0)
    for epoch in range(1, max_epochs + 1):
        if not bool(active.any()):
            break
        idx_act = torch.nonzero(active).flatten()
        sub = {k: v[idx_act] for k, v in params.items()}
        y_act = labels(idx_act)
        perms = torch.argsort(torch.rand(len(idx_act), n, generator=gen), dim=1).to(device)  # own order each
        for i in range(0, n, bs):
            b = perms[:, i:i + bs]
            g = grad_all(sub, x[b], torch.gather(y_act, 1, b))
            with torch.no_grad():
                for k in sub:
                    sub[k] -= lr * g[k]
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(v.reshape(len(idx_act), -1)).all(1) for v in sub.values()]).all(0)
            err, loss = evaluate(sub, y_act)
            for k in params:
                params[k][idx_act] = sub[k]
        first_zero = (err == 0) & (epochs_to_zero[idx_act.cpu()] < 0).to(err.device)
        epochs_to_zero[idx_act[first_zero].cpu()] = epoch
        done = finished(err, loss) & finite
        for j, i in enumerate(idx_act.tolist()):
            if not bool(finite[j]):
                status[i] = "diverged"
                active[i] = False
            elif bool(done[j]):
                status[i] = "converged"
                stop_epoch[i] = epoch
                active[i] = False
        if bar is not None:
            bar.update(1)
            bar.set_postfix(active=int(active.sum()), refresh=False)
    if bar is not None:
        bar.close()
    return EnsembleResult(params, epochs_to_zero, status, base, stop_epoch)
