"""Callbacks for :func:`~flatness.train.train_to_zero_error` and :func:`~flatness.train.train_ensemble_to_zero_error`.

A callback is a :class:`Callback` (hooks ``on_train_begin``, ``on_step``, ``on_epoch``, ``on_train_end``) or, as
before, a plain callable ``f(state) -> bool | None`` called after every training epoch (not at epoch 0).

When the hooks run (both loops):

- ``on_train_begin(state)``: once, before anything is evaluated; it may restore a checkpoint into ``state``
  (:class:`Checkpoint` does), and the loop then continues from ``state.epoch``.
- ``on_step(state)``: after every ``every_steps``-th optimizer step (``state.step % every_steps == 0``, ``step``
  counting every mini-batch update since the start of the run, resumed runs included). Only callbacks that
  override ``on_step`` are called, so the hook costs nothing otherwise.
- ``on_epoch(state)``: after the evaluation of every ``every``-th epoch (``state.epoch % every == 0``), including
  epoch 0 (the initialisation) for :class:`Callback` subclasses; ``state.record`` is that epoch's history row.
  The single-model loop skips it for an epoch that diverged (the run ends there).
- ``on_train_end(state)``: once, after the last epoch, with ``state.status`` set.

``on_step`` and ``on_epoch`` may return ``True`` (or set ``state.stop = True``) to stop training after the
current step / epoch. Callbacks run in the order given, stably sorted by their ``order`` attribute
(:class:`Checkpoint` has ``order = 100`` so that it saves the row after every other callback has written to it).

Built-ins: :class:`Track` (metrics into the history), :class:`AlphaRescaleAt` (in-place alpha-rescaling at an
epoch, Zhang et al. 2021 Appendix F) and :class:`Checkpoint` (save and resume through a result store).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .._checks import check_choice, check_int, check_positive
from .._modes import eval_mode

__all__ = ["Callback", "Track", "AlphaRescaleAt", "Checkpoint"]


class Callback:
    """Base class of training callbacks; override the hooks you need (all default to doing nothing).

    Attributes:
        every: ``on_epoch`` runs when ``state.epoch % every == 0`` (epoch 0, the initialisation, included).
        every_steps: ``on_step`` runs when ``state.step % every_steps == 0`` (``step`` = global update count).
        order: callbacks run sorted (stably) by ``order``; :class:`Checkpoint` uses 100 to run last.
        at_init: whether ``on_epoch`` is called at epoch 0 too (``True``; the wrapper of plain callables sets
            ``False``, as the old protocol never called them at initialisation).
    """

    every: int = 1
    every_steps: int = 1
    order: int = 0
    at_init: bool = True

    def __init__(self, every: int | None = None, every_steps: int | None = None):
        name = type(self).__name__  # None keeps the class attribute (a subclass may set ``every_steps = 10``)
        if every is not None:
            self.every = check_int(name, "every", every, minimum=1)
        if every_steps is not None:
            self.every_steps = check_int(name, "every_steps", every_steps, minimum=1)

    def on_train_begin(self, state) -> None:
        """Called once before training (may restore ``state`` from a checkpoint)."""

    def on_step(self, state) -> bool | None:
        """Called after every ``every_steps``-th optimizer step; return ``True`` to stop."""

    def on_epoch(self, state) -> bool | None:
        """Called after the evaluation of every ``every``-th epoch; return ``True`` to stop."""

    def on_train_end(self, state) -> None:
        """Called once after training, with ``state.status`` set."""


class _EpochFunction(Callback):
    """The old protocol: a plain callable called after each training epoch, returning ``True`` to stop."""

    at_init = False

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def on_epoch(self, state):
        return self.fn(state)

    def __repr__(self) -> str:
        return f"_EpochFunction({self.fn!r})"


def _overrides(cb: Callback, hook: str) -> bool:
    return getattr(type(cb), hook) is not getattr(Callback, hook)


class _Callbacks:
    """The loops' dispatcher: wraps plain callables, sorts by ``order``, calls hooks at their frequencies."""

    def __init__(self, callbacks: Sequence, fn: str):
        if callbacks is None:
            callbacks = ()
        if isinstance(callbacks, Callback) or callable(callbacks) and not isinstance(callbacks, (list, tuple)):
            callbacks = [callbacks]
        cbs = []
        for i, cb in enumerate(callbacks):
            if isinstance(cb, Callback):
                cbs.append(cb)
            elif callable(cb):
                cbs.append(_EpochFunction(cb))
            else:
                raise TypeError(f"{fn}: callbacks[{i}]={cb!r} is neither a Callback nor a callable")
        self.all = sorted(cbs, key=lambda c: c.order)
        self.stepping = [c for c in self.all if _overrides(c, "on_step")]

    def begin(self, state) -> None:
        for cb in self.all:
            cb.on_train_begin(state)

    def step(self, state) -> bool:
        for cb in self.stepping:
            if state.step % cb.every_steps == 0 and cb.on_step(state):
                state.stop = True
        return state.stop

    def epoch(self, state) -> bool:
        for cb in self.all:
            if state.epoch == 0 and not cb.at_init:
                continue
            if state.epoch % cb.every == 0 and cb.on_epoch(state):
                state.stop = True
        return state.stop

    def end(self, state) -> None:
        for cb in self.all:
            cb.on_train_end(state)


# ----------------------------------------------------------------------------------------------------- Track
_DATA = ("train", "fit", "attack", "test")


class Track(Callback):
    """Record metrics of the model being trained, every ``every`` epochs or steps.

    Args:
        metrics: a callable ``(model, data) -> dict[str, float]``, or a dict ``name -> (model, data) -> float``
            (e.g. ``{"sharpness": lambda m, d: keskar_sharpness(m, sigmoid_bce, d).sharpness}``). Metrics run
            with the model in eval mode (gradients allowed, so Hessian or sharpness metrics work); they must not
            change the parameters.
        every: how often, in epochs (``on="epoch"``) or optimizer steps (``on="step"``).
        on: ``"epoch"``: the values become columns of that epoch's history row (``TrainResult.history``;
            epoch 0, the initialisation, included). ``"step"``: one row ``{"epoch", "step", **values}`` per
            call, collected in ``TrainResult.tracks`` (a separate DataFrame; ``epoch`` is the epoch in progress).
        data: the ``(x, y)`` pair handed to the metrics: ``"train"`` (S, default), ``"fit"`` (S ∪ A, what is
            trained on), ``"attack"``, ``"test"``, or an explicit ``(x, y)`` pair.

    Ensembles (:func:`~flatness.train.train_ensemble_to_zero_error`): the metrics are called once per active
    model on a plain module holding that model's parameters (one scratch module reused for every model: copy
    it if you keep it); epoch values become columns of the ensemble history (one row per epoch and model),
    step rows carry a ``model`` column.
    """

    def __init__(self, metrics: Callable | Mapping[str, Callable], every: int = 1, on: str = "epoch",
                 data="train"):
        check_choice("Track", "on", on, ("epoch", "step"))
        super().__init__(every=every if on == "epoch" else None, every_steps=every if on == "step" else None)
        if isinstance(metrics, Mapping):
            for k, f in metrics.items():
                if not callable(f):
                    raise TypeError(f"Track: metrics[{k!r}] must be a callable (model, data) -> float")
        elif not callable(metrics):
            raise TypeError("Track: metrics must be a callable (model, data) -> dict or a dict of callables")
        if isinstance(data, str):
            check_choice("Track", "data", data, _DATA)
        elif not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise TypeError(f"Track: data must be one of {list(_DATA)} or an (x, y) pair")
        self.metrics, self.on, self.data = metrics, on, data

    def _values(self, model: nn.Module, data) -> dict:
        with eval_mode(model):
            if isinstance(self.metrics, Mapping):
                out = {k: f(model, data) for k, f in self.metrics.items()}
            else:
                out = dict(self.metrics(model, data))
        return {k: (v.item() if torch.is_tensor(v) and v.numel() == 1 else v) for k, v in out.items()}

    def _measure(self, state) -> list[tuple[int | None, dict]]:
        data = state.splits.get(self.data) if isinstance(self.data, str) else self.data
        return [(i, self._values(m, data)) for i, m in state.each_model()]

    def on_epoch(self, state):
        if self.on == "epoch":
            state.add_epoch_values(self._measure(state))

    def on_step(self, state):
        if self.on == "step":
            state.add_step_values(self._measure(state))


# ------------------------------------------------------------------------------------------- AlphaRescaleAt
class AlphaRescaleAt(Callback):
    r"""Alpha-rescale the model in place after epoch ``epoch`` (Zhang et al. 2021, Appendix F, eq. 9).

    .. math:: (W_l, b_l, W_{l+1}) \mapsto (\alpha W_l, \alpha b_l, W_{l+1} / \alpha)

    The function is unchanged (ReLU is positively homogeneous), its flatness is not; the parameters are
    scaled in place, so the optimizer keeps training the same ``Parameter`` objects (its state, e.g. momentum
    buffers or Adam moments, is left as it is). The scaling happens after that epoch's row was evaluated, and
    the row gets ``alpha_applied=True`` (rows of other epochs hold NaN there). For ensembles every active model
    is rescaled.

    Args:
        epoch: the epoch after which to rescale (0 = before training starts).
        layer: index of the Linear/Conv layer to multiply by ``alpha`` (see
            :func:`flatness.models.parametrized_layers`; not the last one).
        alpha: positive scale.
    """

    def __init__(self, epoch: int, layer: int, alpha: float):
        super().__init__()
        self.epoch = check_int("AlphaRescaleAt", "epoch", epoch, minimum=0)
        self.layer = check_int("AlphaRescaleAt", "layer", layer, minimum=0)
        self.alpha = check_positive("AlphaRescaleAt", "alpha", alpha)

    def on_epoch(self, state):
        if state.epoch == self.epoch:
            state.alpha_rescale(self.layer, self.alpha)
            state.add_epoch_values([(i, {"alpha_applied": True}) for i in state.active_indices()])


def _alpha_rescale_inplace(model: nn.Module, layer: int, alpha: float) -> None:
    """In-place alpha-rescaling of a single model (:func:`flatness.models.alpha_rescale` with ``inplace=True``)."""
    from ..models import alpha_rescale

    alpha_rescale(model, layer, alpha, inplace=True)


# ----------------------------------------------------------------------------------------------- Checkpoint
class Checkpoint(Callback):
    """Save the run every ``every`` epochs through a result store, and resume from it on start.

    What is saved (one artifact under ``key``, overwritten each time): the model ``state_dict`` (ensembles: the
    stacked parameters), the optimizer state, the mini-batch generator state(s), torch's global RNG state(s),
    ``epoch``, ``step``, ``phase``, ``epochs_to_zero`` (ensembles also ``active``, ``stop_epoch``, ``status``),
    the history (and step tracks) so far, and the run's config. A final checkpoint with the run's status is saved
    at the end, so that calling the same training again returns the finished run at once.

    On ``on_train_begin``, if ``store.has_artifact(key)``, the run is restored from it and continues from the
    saved epoch; on CPU the resumed run is bit-identical to an uninterrupted one (same batches, same updates,
    same history). A checkpoint whose config (optimizer, lr, batch size, sizes, seed...) differs from the
    current run's raises ``ValueError`` rather than silently mixing two runs.

    Args:
        store: an object with ``save_artifact(key, obj)``, ``load_artifact(key, map_location=None)`` and
            ``has_artifact(key)`` (``delete_artifact(key)`` for ``delete_at_end``), e.g.
            :class:`flatness.results.ResultStore`.
        key: the artifact's name (one per run, e.g. ``config_key(config)``).
        every: save after every ``every``-th epoch.
        delete_at_end: delete the checkpoint when the run ends instead of saving the final one.
    """

    order = 100

    def __init__(self, store, key: str, every: int = 1, delete_at_end: bool = False):
        super().__init__(every=every)
        for m in ("save_artifact", "load_artifact", "has_artifact") + (("delete_artifact",) if delete_at_end else ()):
            if not callable(getattr(store, m, None)):
                raise TypeError(f"Checkpoint: store must have a method {m}(key, ...); got {type(store).__name__}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"Checkpoint: key={key!r} must be a non-empty string")
        self.store, self.key, self.delete_at_end = store, key, bool(delete_at_end)
        self.resumed_from: int | None = None  # the epoch restored on start (None: fresh run)

    def on_train_begin(self, state):
        self.resumed_from = None
        if self.store.has_artifact(self.key):
            ckpt = self.store.load_artifact(self.key, map_location="cpu")
            _check_config("Checkpoint", self.key, ckpt.get("config", {}), state.config)
            state.restore(ckpt)
            self.resumed_from = int(ckpt["epoch"])

    def on_epoch(self, state):
        self.store.save_artifact(self.key, state.snapshot())

    def on_train_end(self, state):
        if self.delete_at_end:
            if self.store.has_artifact(self.key):
                self.store.delete_artifact(self.key)
        else:
            self.store.save_artifact(self.key, state.snapshot())


def _check_config(fn: str, key: str, saved: dict, current: dict) -> None:
    diff = {k: (saved[k], current[k]) for k in saved.keys() & current.keys() if not _same(saved[k], current[k])}
    if diff:
        got = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{fn}: the checkpoint {key!r} belongs to a different run ({got}); use another key or "
                         f"delete it")


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return a == b


def _rng_states() -> dict:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_states(states: dict) -> None:
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
