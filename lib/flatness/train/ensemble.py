"""Stacked ensembles: many small models of one architecture trained at once (``torch.func``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap

from .._checks import check_data, check_int, check_positive
from .._device import resolve_device
from ..losses import sigmoid_bce

__all__ = ["EnsembleResult", "train_ensemble_to_zero_error"]


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
