r"""Private plumbing shared by the curvature, sharpness and compression modules.

Nothing here is public. Each public module (:mod:`flatness.hessian`, :mod:`flatness.sharpness`,
:mod:`flatness.compression`, ...) imports what it needs from this one file, never private helpers from
another public module.

Sections:

- functional calls, chunking, batch-size / loss / model checks (the model as a pure function of a
  parameter dictionary, :func:`torch.func.functional_call`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._checks import check_int
from ._device import resolve_device
from ._modes import eval_mode

# --------------------------------------------------------------------------------------------------
# functional calls, chunking, checks (flatness.hessian, flatness.sharpness)
# --------------------------------------------------------------------------------------------------


_module_mode = eval_mode  # (model, enabled); `eval_mode` is shadowed by the argument below


def _check_model(fn: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")


def _check_loss(fn: str, loss_fn) -> None:
    if not callable(loss_fn):
        raise TypeError(f"{fn}: loss_fn must be a callable loss_fn(outputs, y) -> scalar, got {type(loss_fn).__name__}")


class _FunctionalModel:
    """The model as a pure function of a dictionary of (selected) parameters.

    ``params``: ``None`` (every parameter with ``requires_grad``), a sequence of parameter names (those,
    at the model's current values), or a mapping name -> tensor (those names, at the given values). The
    other parameters and all buffers are held fixed (copied, so the model's buffers are never written).
    """

    def __init__(self, fn: str, model: nn.Module, *, params=None, dtype: torch.dtype | None = None,
                 device=None, eval_mode: bool = True):
        _check_model(fn, model)
        self.model, self.eval_mode = model, bool(eval_mode)
        self.device = resolve_device(device, model)
        named = dict(model.named_parameters())
        if not named:
            raise ValueError(f"{fn}: model has no parameters; expected a network with trainable parameters")
        if dtype is None:
            dtype = next(iter(named.values())).dtype
        if not dtype.is_floating_point:
            raise TypeError(f"{fn}: dtype={dtype} must be a floating-point dtype")
        self.dtype = dtype
        if params is None:
            values = {n: p for n, p in named.items() if p.requires_grad}
        elif isinstance(params, Mapping):
            values = dict(params)
        elif isinstance(params, (str, bytes)) or not isinstance(params, Sequence):
            raise TypeError(f"{fn}: params must be None, a sequence of parameter names or a mapping "
                            f"name -> tensor, got {type(params).__name__}")
        else:
            values = {}
            for n in params:
                if n not in named:
                    raise ValueError(f"{fn}: unknown params entry {n!r}; expected names from "
                                     f"model.named_parameters(), e.g. {list(named)[:4]}")
                values[n] = named[n]
        for n, v in values.items():
            if n not in named:
                raise ValueError(f"{fn}: unknown params entry {n!r}; expected names from model.named_parameters()")
            if not torch.is_tensor(v) or tuple(v.shape) != tuple(named[n].shape):
                raise ValueError(f"{fn}: params[{n!r}] must be a tensor of shape {tuple(named[n].shape)}")
        if not values:
            raise ValueError(f"{fn}: no parameter selected (none requires grad); pass params explicitly")
        self.names = list(values)
        self.params = {n: v.detach().to(self.device, dtype).clone() for n, v in values.items()}
        self.fixed = {n: p.detach().to(self.device, dtype) for n, p in named.items() if n not in values}
        for n, b in model.named_buffers():
            b = b.detach().to(self.device)
            self.fixed[n] = (b.to(dtype) if b.is_floating_point() else b).clone()
        self.shapes = [self.params[n].shape for n in self.names]
        self.numels = [self.params[n].numel() for n in self.names]
        self.dim = sum(self.numels)

    def __call__(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        with _module_mode(self.model, self.eval_mode):
            return functional_call(self.model, {**self.fixed, **params}, (x,))

    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        ts = [tensors[n] for n in self.names] if isinstance(tensors, Mapping) else list(tensors)
        return torch.cat([t.reshape(-1) for t in ts])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        return {n: v.view(s) for n, v, s in zip(self.names, vec.split(self.numels), self.shapes)}

    def cast_data(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(self.device, self.dtype) if x.is_floating_point() else x.to(self.device)
        y = y.to(self.device, self.dtype) if y.is_floating_point() else y.to(self.device)
        return x, y


def _chunks(x: Tensor, y: Tensor, batch_size: int | None) -> list[tuple[Tensor, Tensor, float]]:
    """Split the data into consecutive chunks with weights ``len(chunk) / n`` (mean-loss accumulation)."""
    n = len(x)
    bs = n if batch_size is None else min(int(batch_size), n)
    return [(x[i:i + bs], y[i:i + bs], min(bs, n - i) / n) for i in range(0, n, bs)]


def _check_batch_size(fn: str, batch_size) -> int | None:
    return None if batch_size is None else check_int(fn, "batch_size", batch_size, minimum=1)


def _grads(loss: Tensor, leaves: Sequence[Tensor], *, create_graph: bool = False,
           retain_graph: bool = False) -> list[Tensor]:
    """``d loss / d leaves`` with zeros for leaves the loss does not depend on."""
    if not (torch.is_tensor(loss) and loss.requires_grad):
        return [torch.zeros_like(t) for t in leaves]
    gs = torch.autograd.grad(loss, leaves, create_graph=create_graph, retain_graph=retain_graph or create_graph,
                             allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, leaves)]
