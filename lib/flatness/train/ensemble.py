"""Stacked ensembles: many small models of one architecture trained at once (``torch.func``), each exactly as
its own :func:`~flatness.train.train_to_zero_error` run."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from .._checks import check_choice, check_data, check_int, check_positive
from .._device import resolve_device
from ..losses import sigmoid_bce, zero_one_error
from .callbacks import _Callbacks, _rng_states, _set_rng_states
from .loop import DIVERGENCE_FACTOR, divergence_threshold
from .optim import FUNCTIONAL_OPTIMIZERS, functional_optimizer

__all__ = ["EnsembleResult", "EnsembleState", "train_ensemble_to_zero_error"]


@dataclass
class EnsembleResult:
    """Outcome of :func:`train_ensemble_to_zero_error` for ``M`` models."""

    params: dict[str, Tensor]  # stacked parameters, leading dimension M, frozen at each model's stopping epoch
    epochs_to_zero: Tensor  # (M,) int64: first epoch with zero error, -1 if never
    status: list[str]  # per model: "converged", "max_epochs" or "diverged"
    base_model: nn.Module  # an architecture template for functional_call
    stop_epoch: Tensor | None = None  # (M,) int64: the epoch each model stopped at (-1 if it never converged)
    history: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per (epoch, model) trained that epoch
    tracks: pd.DataFrame = field(default_factory=pd.DataFrame)  # rows of step-tracking callbacks
    config: dict = field(default_factory=dict)

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


def _tmap(f, tree):
    """Apply ``f`` to every tensor of a nested dict of tensors (an optimizer state)."""
    return {k: _tmap(f, v) for k, v in tree.items()} if isinstance(tree, dict) else f(tree)


def _tset(dst: dict, src: dict, rows) -> None:
    """``dst[...][rows] = src[...]`` for every tensor of two nested dicts of the same structure."""
    for k, v in src.items():
        if isinstance(v, dict):
            _tset(dst[k], v, rows)
        else:
            dst[k][rows] = v


@dataclass
class EnsembleState:
    """What a callback sees during :func:`train_ensemble_to_zero_error`.

    ``params`` and ``opt_state`` are the full stacked tensors (leading dimension ``M``; the active models' rows
    are current after every epoch, and before every ``on_step`` call); ``active`` ``(M,)`` marks the models still
    training; ``record`` is this epoch's history: ``record["model"]`` lists the models evaluated this epoch and
    every other entry a list of their values, in that order. ``generators[i]`` draws model ``i``'s mini-batch
    order. Set ``stop = True`` or return ``True`` from a hook to stop every model.
    """

    epoch: int
    params: dict
    opt_state: dict
    active: Tensor  # (M,) bool
    record: dict
    base_model: nn.Module
    generators: list
    epochs_to_zero: Tensor
    stop_epoch: Tensor
    status: list
    initial_loss: Tensor  # (M,) full loss at epoch 0 (the divergence reference)
    step: int = 0
    phase: str = "train"
    data: tuple | None = None
    splits: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    tracks: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    stop: bool = False
    finished: bool = False
    _scratch: nn.Module | None = None

    # ---- the interface the built-in callbacks use (shared with TrainState)
    def active_indices(self) -> list[int]:
        return torch.nonzero(self.active).flatten().tolist()

    def module(self, i: int) -> nn.Module:
        """A scratch module holding model ``i``'s current parameters (the same object for every ``i``)."""
        if self._scratch is None:
            self._scratch = copy.deepcopy(self.base_model)
        with torch.no_grad():
            for name, p in self._scratch.named_parameters():
                p.copy_(self.params[name][i])
        return self._scratch

    def each_model(self):
        """``(i, module)`` for each model to measure: those evaluated this epoch inside ``on_epoch``, the active
        ones inside ``on_step``."""
        idx = self.record.get("model", []) if self._in_epoch else self.active_indices()
        for i in list(idx):
            yield int(i), self.module(int(i))

    _in_epoch: bool = False

    def add_epoch_values(self, values) -> None:
        pos = {int(m): j for j, m in enumerate(self.record.get("model", []))}  # record values are lists here
        for i, v in values:
            if i not in pos:
                continue
            for k, val in v.items():
                col = self.record.setdefault(k, [math.nan] * len(pos))
                col[pos[i]] = val

    def add_step_values(self, values) -> None:
        for i, v in values:
            self.tracks.append({"epoch": self.epoch, "step": self.step, "model": i, **v})

    def alpha_rescale(self, layer: int, alpha: float) -> None:
        """Alpha-rescale every active model (Zhang et al. 2021, eq. 9) in the stacked parameters."""
        from ..models import parametrized_layers

        layers = parametrized_layers(self.base_model)
        check_int("AlphaRescaleAt", "layer", layer, minimum=0, maximum=len(layers) - 2)
        names = {id(m): name for name, m in self.base_model.named_modules()}
        pre, post = names[id(layers[layer])], names[id(layers[layer + 1])]
        act = self.active.to(next(iter(self.params.values())).device)
        with torch.no_grad():
            for key, scale in ((f"{pre}.weight", alpha), (f"{pre}.bias", alpha), (f"{post}.weight", 1 / alpha)):
                if key in self.params:
                    self.params[key][act] *= scale

    def snapshot(self) -> dict:
        """Everything needed to resume bit-identically (see :class:`~flatness.train.Checkpoint`)."""
        clone = lambda d: _tmap(lambda v: v.detach().clone(), d)  # noqa: E731
        return {"kind": "train_ensemble_to_zero_error", "version": 1, "epoch": self.epoch, "step": self.step,
                "phase": self.phase, "params": clone(self.params), "opt_state": clone(self.opt_state),
                "active": self.active.clone(), "epochs_to_zero": self.epochs_to_zero.clone(),
                "stop_epoch": self.stop_epoch.clone(), "status": list(self.status),
                "initial_loss": self.initial_loss.clone(), "generators": [g.get_state() for g in self.generators],
                "rng": _rng_states(), "history": copy.deepcopy(self.history), "tracks": copy.deepcopy(self.tracks),
                "config": dict(self.config), "stop": self.stop, "finished": self.finished}

    def restore(self, ckpt: dict) -> None:
        if ckpt.get("kind") != "train_ensemble_to_zero_error":
            raise ValueError(f"train_ensemble_to_zero_error: the checkpoint is of kind {ckpt.get('kind')!r}; "
                             f"expected 'train_ensemble_to_zero_error'")
        dev = next(iter(self.params.values())).device
        self.params = {k: v.to(dev) for k, v in ckpt["params"].items()}
        self.opt_state = _tmap(lambda v: v.to(dev), ckpt["opt_state"])
        self.active = ckpt["active"].clone()
        self.epochs_to_zero, self.stop_epoch = ckpt["epochs_to_zero"].clone(), ckpt["stop_epoch"].clone()
        self.status[:] = ckpt["status"]
        self.initial_loss = ckpt["initial_loss"].clone()
        for g, s in zip(self.generators, ckpt["generators"]):
            g.set_state(s)
        _set_rng_states(ckpt["rng"])
        self.epoch, self.step, self.phase = int(ckpt["epoch"]), int(ckpt["step"]), ckpt["phase"]
        self.history[:] = ckpt["history"]
        for rec in self.history:
            _compact(rec)  # a checkpoint saved inside on_epoch holds that epoch's values as lists
        self.tracks[:] = ckpt["tracks"]
        self.stop, self.finished = bool(ckpt["stop"]), bool(ckpt["finished"])
        self.record = self.history[-1] if self.history else {}


def _compact(rec: dict) -> None:
    """Store an epoch record's per-model lists as numpy arrays (8 bytes a value instead of a Python float)."""
    for k, v in rec.items():
        if isinstance(v, list):
            arr = np.asarray(v)
            if arr.dtype != object:
                rec[k] = arr


def _history_frame(records: list[dict]) -> pd.DataFrame:
    """One row per (epoch, model) from the per-epoch records (columns missing in an epoch are NaN)."""
    keys = list(dict.fromkeys(k for rec in records for k in rec))
    cols: dict[str, list] = {k: [] for k in keys}
    for rec in records:
        m = len(rec["model"])
        for k in keys:
            v = rec.get(k)
            if k == "epoch":
                cols[k].append(np.full(m, v, dtype=np.int64))
            elif v is None:
                cols[k].append(np.full(m, np.nan))
            else:
                cols[k].append(np.asarray(v) if isinstance(v, list) else v)
    out = {}
    for k, parts in cols.items():
        if not parts:
            continue
        kinds = {p.dtype.kind for p in parts}
        if len(kinds) > 1 and not kinds <= {"i", "u", "f"}:
            parts = [p.astype(object) for p in parts]
        out[k] = np.concatenate(parts)
    return pd.DataFrame(out)


def _parse_data(fn: str, data, M: int):
    """(fit_x, fit_y, n_S, splits): y is (N,) shared or (M, N) per model; a task gives S ∪ A and T."""
    if hasattr(data, "train"):
        train, attack, test = data.train, getattr(data, "attack", None), getattr(data, "test", None)
        x, y = check_data(fn, train)
        if y.ndim != 1:
            raise ValueError(f"{fn}: a task's train labels must have shape (N,); got {tuple(y.shape)}")
        attack = tuple(attack) if attack is not None and len(attack[0]) else None
        test = tuple(test) if test is not None and len(test[0]) else None
        fit_x = x if attack is None else torch.cat([x, attack[0]])
        fit_y = y if attack is None else torch.cat([y, attack[1]])
        return fit_x, fit_y, len(x), {"train": (x, y), "attack": attack, "test": test}
    try:
        x, y = data
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: data must be a pair (x, y) of tensors or a task with train/attack/test") from None
    if not torch.is_tensor(y):
        raise TypeError(f"{fn}: data must be a pair (x, y) of tensors")
    if y.ndim == 2 and y.shape != (M, len(x)) or y.ndim not in (1, 2):
        raise ValueError(f"{fn}: y has shape {tuple(y.shape)}; expected (N,) = ({len(x)},) or "
                         f"(M, N) = ({M}, {len(x)})")
    check_data(fn, (x, y.T if y.ndim == 2 else y))
    return x, y, len(x), {"train": (x, y), "attack": None, "test": None}


def train_ensemble_to_zero_error(models: Sequence[nn.Module], data, lr: float | None = None,
                                 batch_size: int | None = 32, max_epochs: int = 10_000, seed: int = 0,
                                 loss_fn: Callable = sigmoid_bce, device=None, progress: bool = False,
                                 loss_threshold: float | None = None, *, seeds: Sequence[int] | None = None,
                                 optimizer: str = "sgd", optimizer_kwargs: dict | None = None,
                                 callbacks: Sequence = (),
                                 divergence_factor: float | None = DIVERGENCE_FACTOR) -> EnsembleResult:
    r"""Train many models of one architecture at once; each stops at its first zero-error epoch (or, with
    ``loss_threshold``, at its first epoch with zero error and full-data mean loss <= the threshold).

    The models are stacked (``torch.func.stack_module_state``) and updated with ``vmap``'d gradients and a
    functional optimizer (:mod:`flatness.train.optim`) on the stacked tensors. Model ``i`` has its own
    generator ``torch.Generator().manual_seed(seeds[i])`` and draws ``torch.randperm(n, generator=...)`` each
    epoch it trains, exactly as :func:`train_to_zero_error` does, so it follows the trajectory of
    ``train_to_zero_error(models[i], data_i, optimizer=optimizer, lr=lr, batch_size=batch_size, seed=seeds[i])``
    (same batches, same updates, to float rounding), whatever else is in the ensemble. The divergence rule is
    the single-model one, per model: a mini-batch loss (checked every step) or full loss (every epoch) that is
    non-finite or above :func:`~flatness.train.divergence_threshold`, or non-finite parameters (every epoch),
    mark the model ``diverged`` and stop it at once.

    Callbacks (:mod:`flatness.train.callbacks`) receive an :class:`EnsembleState`: ``on_epoch`` after every
    epoch's evaluation (epoch 0 included), ``on_step`` after every stacked step (``step`` counts stacked
    steps). :class:`~flatness.train.Track` measures each model evaluated that epoch (a ``Track`` value becomes
    a column of ``history``); :class:`~flatness.train.AlphaRescaleAt` rescales every active model;
    :class:`~flatness.train.Checkpoint` saves the stacked parameters, optimizer state, every model's generator,
    the per-model status and the history, and resumes from them.

    Args:
        models: ``M`` freshly initialised models with identical parameter shapes and no buffers.
        data: ``(x, y)`` training pair: ``x`` ``(N, ...)`` shared by all models, ``y`` ``(N,)`` shared labels
            or ``(M, N)`` one labelling per model (e.g. each model fits its own Boolean function); or a
            :class:`~flatness.data.BinaryTask`-like object: training on S ∪ A (shared labels), zero error
            measured on S only, errors on A and T recorded in the history.
        lr: learning rate (default: the optimizer's reference default, 0.01 for SGD).
        batch_size, max_epochs, loss_fn, device: as :func:`train_to_zero_error` (``None``: full batch).
        seed: with ``seeds=None``, model ``i``'s mini-batch order is seeded by ``seed + i``.
        progress: show a tqdm bar over epochs.
        loss_threshold: also require the mean training loss to fall to this value, so that models fitting
            different functions are compared at the same loss rather than at different stages of training.
        seeds: one mini-batch seed per model (length ``M``).
        optimizer: ``"sgd"``, ``"gd"`` (full batch), ``"momentum"``, ``"adam"``, or another name that
            ``flatness.train.optim.functional_optimizer`` knows.
        optimizer_kwargs: extra hyper-parameters of the optimizer (e.g. ``{"momentum": 0.5}``).
        callbacks: as for :func:`train_to_zero_error`.
        divergence_factor: see :func:`~flatness.train.divergence_threshold` (``None``: only non-finite values).
    Returns:
        :class:`EnsembleResult` whose parameters are those of each model's stopping epoch, with the history (one
        row per epoch and model trained that epoch: ``epoch``, ``model``, ``loss`` (on S ∪ A),
        ``train_error`` (on S), ``attack_error``/``test_error``/``test_loss`` for tasks, ``step``).
    """
    fn = "train_ensemble_to_zero_error"
    if len(models) == 0:
        raise ValueError(f"{fn}: models is empty; expected at least one model")
    M = len(models)
    fit_x, fit_y, n_s, splits = _parse_data(fn, data, M)
    per_model = fit_y.ndim == 2
    if not isinstance(optimizer, str):
        raise TypeError(f"{fn}: optimizer must be a name (str); got {type(optimizer).__name__}")
    if lr is not None:
        lr = check_positive(fn, "lr", lr)
    max_epochs = check_int(fn, "max_epochs", max_epochs, minimum=0)
    if loss_threshold is not None:
        loss_threshold = check_positive(fn, "loss_threshold", loss_threshold, allow_zero=True)
    if divergence_factor is not None:
        divergence_factor = check_positive(fn, "divergence_factor", divergence_factor)
    if seeds is None:
        seeds = [int(seed) + i for i in range(M)]
    else:
        seeds = [check_int(fn, f"seeds[{i}]", s) for i, s in enumerate(seeds)]
        if len(seeds) != M:
            raise ValueError(f"{fn}: seeds has {len(seeds)} entries; expected one per model ({M})")
    cbs = _Callbacks(callbacks, fn)
    check_choice(fn, "optimizer", optimizer, FUNCTIONAL_OPTIMIZERS)
    fopt = functional_optimizer(optimizer, lr=lr, **dict(optimizer_kwargs or {}))
    device = resolve_device(device, models[0])
    fit_x, fit_y = fit_x.to(device), fit_y.to(device)
    splits = {k: (tuple(t.to(device) for t in v) if v is not None else None) for k, v in splits.items()}
    splits["fit"] = (fit_x, fit_y)
    n = len(fit_x)
    bs = n if (batch_size is None or optimizer == "gd") else min(check_int(fn, "batch_size", batch_size,
                                                                           minimum=1), n)
    base = copy.deepcopy(models[0]).to(device)
    params, buffers = stack_module_state([m.to(device) for m in models])
    if buffers:
        raise ValueError(f"{fn}: models with buffers (e.g. BatchNorm) are not supported; got {list(buffers)}")
    params = {k: v.detach().clone() for k, v in params.items()}
    config = {"optimizer": optimizer, "lr": fopt.lr, "batch_size": bs, "max_epochs": max_epochs, "seeds": seeds,
              "n_fit": n, "n_models": M, "loss_threshold": loss_threshold, "divergence_factor": divergence_factor}

    def loss_one(p, xb, yb):
        return loss_fn(functional_call(base, p, (xb,)), yb)

    grad_all = vmap(grad_and_value(loss_one), in_dims=(0, 0, 0))
    def eval_one(p, xx, yy):
        out = functional_call(base, p, (xx,))
        return loss_fn(out, yy), zero_one_error(out, yy)

    eval_shared = vmap(eval_one, in_dims=(0, None, None))  # labels shared by the models
    eval_own = vmap(eval_one, in_dims=(0, None, 0))  # (m, N) labels, one row per model

    def labels(rows: Tensor) -> Tensor:  # (m, N) labels of the given models
        return fit_y[rows] if per_model else fit_y.expand(len(rows), n)

    @torch.no_grad()
    def loss_and_error(p: dict, x: Tensor, yy: Tensor, shared: bool, chunk: int = 4096) -> tuple[list, list]:
        """Mean loss and error of each model on ``(x, yy)`` (``yy`` ``(N,)`` if ``shared`` else ``(m, N)``),
        accumulated over chunks of examples exactly as the single-model loop does."""
        m = len(next(iter(p.values())))
        tot_loss = torch.zeros(m, dtype=torch.float64, device=x.device)
        tot_err = torch.zeros(m, dtype=torch.float64, device=x.device)
        fn_eval = eval_shared if shared else eval_own
        for i in range(0, len(x), chunk):
            yc = yy[i:i + chunk] if shared else yy[:, i:i + chunk]
            loss_c, err_c = fn_eval(p, x[i:i + chunk], yc)  # one vmap'd forward: (m,), (m,)
            c = len(x[i:i + chunk])
            tot_loss += loss_c.double() * c
            tot_err += err_c.double() * c
        return (tot_loss / len(x)).tolist(), (tot_err / len(x)).tolist()

    def evaluate(rows: Tensor, epoch: int) -> dict:
        """History record of the given models: loss on S ∪ A, error on S (and A, T for tasks)."""
        p = {k: v[rows] for k, v in state.params.items()}
        shared = not per_model
        yy = fit_y if shared else fit_y[rows]
        loss, err = loss_and_error(p, fit_x, yy, shared)
        rec = {"epoch": epoch, "model": rows.tolist(), "loss": loss, "train_error": err}
        if splits["attack"] is not None:  # then the labels are shared
            rec["train_error"] = loss_and_error(p, *splits["train"], True)[1]
            rec["attack_error"] = loss_and_error(p, *splits["attack"], True)[1]
        if splits["test"] is not None:
            rec["test_loss"], rec["test_error"] = loss_and_error(p, *splits["test"], True)
        rec["step"] = [state.step] * len(rows)
        return rec

    state = EnsembleState(0, params, fopt.init(params), torch.ones(M, dtype=torch.bool), {}, base,
                          [torch.Generator().manual_seed(s) for s in seeds],
                          torch.full((M,), -1, dtype=torch.int64), torch.full((M,), -1, dtype=torch.int64),
                          ["max_epochs"] * M, torch.zeros(M), data=(fit_x, fit_y), splits=splits, config=config)

    def conclude(rec: dict, bad_step: set[int]) -> None:
        """Update the per-model status from an epoch's record (diverged, first zero error, finished)."""
        finite = torch.stack([torch.isfinite(state.params[k][torch.tensor(rec["model"], device=device)]
                                             .reshape(len(rec["model"]), -1)).all(1) for k in state.params]).all(0)
        finite = finite.tolist()  # one host sync
        for j, i in enumerate(rec["model"]):
            loss, err = rec["loss"][j], rec["train_error"][j]
            thr = divergence_threshold(float(state.initial_loss[i]), divergence_factor)
            if i in bad_step or not finite[j] or not math.isfinite(loss) or loss > thr:
                state.status[i], state.active[i] = "diverged", False
                continue
            if err == 0 and state.epochs_to_zero[i] < 0:
                state.epochs_to_zero[i] = rec["epoch"]
            if err == 0 and (loss_threshold is None or loss <= loss_threshold):
                state.status[i], state.active[i] = "converged", False
                state.stop_epoch[i] = rec["epoch"]

    def epoch_callbacks() -> None:
        state._in_epoch = True
        try:
            cbs.epoch(state)
        finally:
            state._in_epoch = False

    cbs.begin(state)  # may restore a checkpoint
    if not state.history:
        rec = evaluate(torch.arange(M, device=device), 0)
        state.initial_loss = torch.tensor(rec["loss"], dtype=torch.float64)
        state.history.append(rec)
        state.record = rec
        conclude(rec, set())
        epoch_callbacks()
        _compact(rec)
    bar = None
    if progress and not state.finished:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_epochs, initial=state.epoch, desc=f"{M} models", leave=False, mininterval=2.0)
    thresholds = torch.tensor([divergence_threshold(float(v), divergence_factor) for v in state.initial_loss],
                              device=device)
    while not state.finished and not state.stop and state.epoch < max_epochs and bool(state.active.any()):
        state.epoch += 1
        idx_start = torch.nonzero(state.active).flatten()
        idx = idx_start.to(device)
        sub = {k: v[idx] for k, v in state.params.items()}
        sub_state = _tmap(lambda v: v[idx], state.opt_state)
        perms = torch.stack([torch.randperm(n, generator=state.generators[i]) for i in idx_start.tolist()])
        perms = perms.to(device)  # (m, n): each model's own order, as train_to_zero_error draws it
        y_act, thr = labels(idx), thresholds[idx]
        bad_step: set[int] = set()

        def write_back(rows=None):
            sel = slice(None) if rows is None else rows
            for k in sub:
                state.params[k][idx[sel]] = sub[k][sel]
            _tset(state.opt_state, _tmap(lambda v: v[sel], sub_state), idx[sel])

        for i in range(0, n, bs):
            b = perms[:, i:i + bs]
            g, lval = grad_all(sub, fit_x[b], torch.gather(y_act, 1, b))
            with torch.no_grad():
                sub, sub_state = fopt.step(sub, g, sub_state)
            state.step += 1
            bad = ~torch.isfinite(lval) | (lval > thr)
            if bool(bad.any()):  # stop those models at once, as the single-model loop does
                write_back(bad)
                bad_step.update(idx[bad].tolist())
                keep = ~bad
                state.active[idx[bad].cpu()] = False
                sub = {k: v[keep] for k, v in sub.items()}
                sub_state = _tmap(lambda v: v[keep], sub_state)
                perms, y_act, thr, idx = perms[keep], y_act[keep], thr[keep], idx[keep]
                if len(idx) == 0:
                    break
            if cbs.stepping:
                write_back()
                if cbs.step(state):
                    break
                sub = {k: v[idx] for k, v in state.params.items()}
                sub_state = _tmap(lambda v: v[idx], state.opt_state)
        if len(idx):
            write_back()
        rec = evaluate(idx_start.to(device), state.epoch)
        state.history.append(rec)
        state.record = rec
        conclude(rec, bad_step)
        epoch_callbacks()
        _compact(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(active=int(state.active.sum()), refresh=False)
    if bar is not None:
        bar.close()
    state.finished = True
    cbs.end(state)
    return EnsembleResult(state.params, state.epochs_to_zero, state.status, base, state.stop_epoch,
                          _history_frame(state.history), pd.DataFrame(state.tracks), config)
