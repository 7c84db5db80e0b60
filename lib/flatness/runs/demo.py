"""A small example experiment for :func:`flatness.runs.run_sweep`: linear regression trained by gradient descent.

Public so that the README, the tests and Dask workers (which must import the function they run) share it::

    from flatness.runs import DemoConfig, demo_train, demo_train_batch, grid, run_sweep
    cfgs = grid(DemoConfig(), lr=[0.05, 0.1], seed=range(4))
    df = run_sweep(demo_train, cfgs, store)                          # one run per config
    df = run_sweep(demo_train, cfgs, store, batch=demo_train_batch)  # the 4 seeds of each lr as one vmap

Each run draws its data and initial weights from ``cfg.seed`` (never from its position in a list) and takes
``steps`` full-batch gradient steps on the half mean squared error, in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..results import config_key
from .config import RunConfig, param

__all__ = ["DemoConfig", "demo_train", "demo_train_batch"]


@dataclass(frozen=True)
class DemoConfig(RunConfig):
    """A linear-regression run: ``n`` examples in ``d`` dimensions, ``steps`` gradient steps of size ``lr``."""

    VERSION: ClassVar[int] = 1
    BATCH_FIELDS: ClassVar[tuple[str, ...]] = ("seed",)

    n: int = param(32, min=1, doc="training examples")
    d: int = param(4, min=1, doc="input dimension")
    steps: int = param(20, min=1, doc="full-batch gradient steps")
    lr: float = param(0.1, positive=True, doc="learning rate")
    noise: float = param(0.1, min=0.0, doc="label noise (standard deviation)")
    seed: int = param(0, min=0, doc="seed of the data and the initial weights")


def _draw(cfg: DemoConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.n, cfg.d, generator=g, dtype=torch.float64)  # (N, D)
    w_true = torch.randn(cfg.d, generator=g, dtype=torch.float64)  # (D,)
    y = x @ w_true + cfg.noise * torch.randn(cfg.n, generator=g, dtype=torch.float64)  # (N,)
    w0 = 0.1 * torch.randn(cfg.d, generator=g, dtype=torch.float64)  # (D,)
    return x, y, w_true, w0


def _loss(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return 0.5 * ((x @ w - y) ** 2).mean()


def _row(cfg: DemoConfig, w: Tensor, x: Tensor, y: Tensor, w_true: Tensor) -> dict:
    return {"seed": cfg.seed, "step": cfg.steps, "train_loss": float(_loss(w, x, y)),
            "weight_error": float(torch.linalg.vector_norm(w - w_true))}


def demo_train(cfg: DemoConfig) -> list[dict]:
    """Train one linear model; one row: ``seed``, ``step``, ``train_loss``, ``weight_error``."""
    x, y, w_true, w = _draw(cfg)
    for _ in range(cfg.steps):
        w = w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_loss(w, x, y), w)
        w = w.detach() - cfg.lr * g
    return [_row(cfg, w, x, y, w_true)]


def demo_train_batch(cfgs: list[DemoConfig]) -> list[dict]:
    """Train configs that differ only in ``seed`` as one stacked ensemble (``torch.func.vmap`` over seeds).

    Gives the rows of :func:`demo_train` for each config (to float64 rounding), each with its config's ``key``.
    """
    first = cfgs[0]
    for c in cfgs:
        if (c.n, c.d, c.steps, c.lr, c.noise) != (first.n, first.d, first.steps, first.lr, first.noise):
            raise ValueError("demo_train_batch: configs must differ only in seed")
    x, y, w_true, w = (torch.stack(t) for t in zip(*(_draw(c) for c in cfgs)))  # (S, N, D), (S, N), (S, D), (S, D)
    grad = torch.func.vmap(torch.func.grad(_loss))
    for _ in range(first.steps):
        w = w - first.lr * grad(w, x, y)
    return [{"key": config_key(c), **_row(c, w[i], x[i], y[i], w_true[i])} for i, c in enumerate(cfgs)]
