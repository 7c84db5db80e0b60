r"""Flatness measures of a trained network's loss landscape.

- :func:`keskar_sharpness`: Keskar et al.'s box sharpness, Zhang et al. 2021 Definition 2.1 (SGD ascent
  with clipping, or L-BFGS-B as Keskar et al.).
- :func:`log_top_eig_product`: log product of the top-k positive Hessian eigenvalues (Zhang et al. Fig. S4).
- :func:`adaptive_sharpness`: average- and worst-case adaptive sharpness (Andriushchenko et al. 2023; Chen et
  al. 2023's ViT figure), with m-sharpness and APGD.
- :func:`relative_flatness`: Petzka et al. 2021's neuron-wise relative flatness of one layer.

Hessian eigenvalues and traces live in :mod:`flatness.hessian`. Every function leaves the model's
parameters, buffers and train/eval flags unchanged; losses are evaluated in eval mode by default
(``eval_mode=True``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

from ._checks import check_choice, check_data, check_int, check_positive
from ._functional import _check_batch_size, _check_inputs, _check_loss, _chunks, _FunctionalModel, _grads
from .hessian import HessianOperator, TraceEstimate, hessian_eigenvalues, hessian_trace, per_example_grad_norms_sq
from .models import parametrized_layers

__all__ = [
    "KeskarResult", "keskar_sharpness", "log_top_eig_product", "LogEigProduct",
    "AdaptiveSharpnessResult", "adaptive_sharpness", "relative_flatness",
    # Hessian-based measures live in flatness.hessian; re-exported here as the public home of every
    # flatness measure (the issues name flatness.sharpness.hessian_eigenvalues / hessian_trace).
    "hessian_eigenvalues", "hessian_trace", "per_example_grad_norms_sq", "TraceEstimate",
]


def _mean_loss(fm: _FunctionalModel, loss_fn: Callable, params: dict[str, Tensor], chunks, *,
               normalize_logits: bool = False) -> Tensor:
    """:math:`\\sum_c (n_c / n)\\, \\text{loss\\_fn}(f(x_c), y_c)`, differentiable in ``params``."""
    total = 0.0
    for xc, yc, wc in chunks:
        out = fm(params, xc)
        if normalize_logits:
            out = _normalize(out)
        total = total + wc * loss_fn(out, yc)
    return total


def _normalize(out: Tensor) -> Tensor:
    """Logits divided by their Euclidean norm over the output dimension (per example)."""
    o = out if out.ndim >= 2 else out[:, None]
    o = o / o.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(o.dtype).tiny)
    return o.reshape(out.shape)


# --------------------------------------------------------------------------------------------------
# Keskar sharpness
# --------------------------------------------------------------------------------------------------

@dataclass
class KeskarResult:
    """Result of :func:`keskar_sharpness`.

    Attributes:
        sharpness: :math:`100\\,(\\max_C L - L(w)) / (1 + L(w))`.
        loss: :math:`L(w)`, the full-data loss at the centre.
        max_loss: the largest full-data loss found in the box (at least :math:`L(w)`).
        method: ``"sgd"`` or ``"lbfgsb"``.
        zeta: the box size.
        trace: running maximum of the full-data loss after each evaluation (starting with the centre);
            ``sharpness_trace`` converts it, for convergence plots (Zhang et al. Fig. S5).
        trace_steps: for each ``trace`` entry, the SGD step (0 = start) or the L-BFGS-B function evaluation.
        batch_losses: SGD: the mini-batch loss of every ascent step (a cheap proxy, never used for the max).
        n_evals: number of full-data loss evaluations.
    """

    sharpness: float
    loss: float
    max_loss: float
    method: str
    zeta: float
    trace: list[float] = field(default_factory=list)
    trace_steps: list[int] = field(default_factory=list)
    batch_losses: list[float] = field(default_factory=list)
    n_evals: int = 0

    @property
    def sharpness_trace(self) -> list[float]:
        """The sharpness implied by each ``trace`` entry."""
        return [100.0 * (m - self.loss) / (1.0 + self.loss) for m in self.trace]


def keskar_sharpness(model: nn.Module, loss_fn: Callable, data, zeta: float = 1e-3, *, method: str = "sgd",
                     lr: float = 1e-3, epochs: int = 10, batch_size: int = 32, seed: int = 0,
                     eval_every: str | int = "step", maxiter: int = 10, eval_batch_size: int | None = None,
                     dtype: torch.dtype | None = None, device=None, eval_mode: bool = True) -> KeskarResult:
    r"""Keskar et al.'s sharpness (Zhang et al. 2021, Definition 2.1).

    .. math:: \text{sharpness} = 100 \times \frac{\max_{w' \in C} L(w') - L(w)}{1 + L(w)}, \qquad
              C = \{ w' : |w'_i - w_i| \le \zeta (|w_i| + 1) \ \forall i \}

    with :math:`L` the mean loss over ``data`` (the clean training set in the paper). For small
    :math:`\zeta` it is about :math:`100\, \zeta^2 \lambda_{\max} \lVert |w|+1 \rVert^2 / 2(1+L)` along the top
    Hessian direction (Dinh et al. 2017). The maximum is searched from a point drawn uniformly in the box
    (a minimum has zero gradient):

    - ``"sgd"`` (Zhang et al.): ``epochs`` passes of mini-batch gradient *ascent*
      :math:`w' \leftarrow \operatorname{clip}_C(w' + \text{lr}\, \nabla L_B(w'))` over shuffled batches of
      ``batch_size``. The maximum is over *full-data* losses :math:`L(w')` evaluated after every step
      (``eval_every="step"``, default), every ``eval_every`` steps (an int), or after each epoch
      (``"epoch"``, for large data/models; the mini-batch losses are recorded in ``batch_losses`` as a
      proxy but never enter the maximum); the last iterate is always evaluated. The centre :math:`w` is
      in :math:`C`, so the maximum starts at :math:`L(w)` and the sharpness is never negative.
    - ``"lbfgsb"`` (Keskar et al.): ``scipy.optimize.minimize(-L, method="L-BFGS-B", bounds=C,
      maxiter=maxiter)`` in float64 on the full data, the maximum tracked over every function evaluation.

    Defaults (``zeta=1e-3, lr=1e-3, epochs=10, batch_size=32``) are cheap choices for the Boolean system,
    whose settings were not recovered (the paper runs 10 epochs). The MNIST FCN settings of the authors'
    code are ``zeta=1e-4, lr=1e-3, batch_size=32, epochs=100``; CIFAR-10 ResNet-50: ``zeta=1e-5,
    lr=1.0, batch_size=128, epochs=100`` (reference sheet). Sharpness values are only comparable at
    identical settings (Zhang et al. Appendix H).

    Args:
        model: the network at the minimum ``w`` (left unchanged, parameters and train/eval mode).
        loss_fn: ``loss_fn(outputs, y) -> scalar`` mean loss (sigmoid cross-entropy in the paper).
        data: ``(x, y)``.
        zeta: box size :math:`\zeta > 0`.
        method: ``"sgd"`` or ``"lbfgsb"``.
        lr: SGD ascent learning rate.
        epochs: SGD epochs.
        batch_size: SGD mini-batch size.
        seed: seed of the start point and of the batch order.
        eval_every: ``"step"``, ``"epoch"`` or a number of steps between full-data evaluations (SGD).
        maxiter: L-BFGS-B iterations (Keskar et al.: 10).
        eval_batch_size: chunk size of full-data loss evaluations (memory only; ``None``: all at once).
        dtype: compute dtype for SGD (default the model's; L-BFGS-B always uses float64).
        device: compute device (default the model's).
        eval_mode: evaluate the network in eval mode (default).

    Returns:
        :class:`KeskarResult`.

    Example:
        >>> net = torch.nn.Linear(1, 1, bias=False)
        >>> _ = net.weight.data.fill_(0.0)
        >>> quad = lambda out, y: (out - y).pow(2).mean()        # L(w) = w^2 for x = 1, y = 0
        >>> data = (torch.ones(4, 1), torch.zeros(4, 1))
        >>> r = keskar_sharpness(net, quad, data, zeta=0.1, method="lbfgsb")
        >>> round(r.sharpness, 6)                                 # 100 * 0.1^2 / (1 + 0)
        1.0
    """
    fn = "keskar_sharpness"
    _check_loss(fn, loss_fn)
    x, y = check_data(fn, data)
    zeta = check_positive(fn, "zeta", zeta)
    check_choice(fn, "method", method, ("sgd", "lbfgsb"))
    lr = check_positive(fn, "lr", lr)
    epochs = check_int(fn, "epochs", epochs, minimum=1)
    batch_size = check_int(fn, "batch_size", batch_size, minimum=1)
    maxiter = check_int(fn, "maxiter", maxiter, minimum=1)
    eval_batch_size = _check_batch_size(fn, eval_batch_size)
    if isinstance(eval_every, str):
        check_choice(fn, "eval_every", eval_every, ("step", "epoch"))
    else:
        eval_every = check_int(fn, "eval_every", eval_every, minimum=1)
    fm = _FunctionalModel(fn, model, dtype=torch.float64 if method == "lbfgsb" else dtype, device=device,
                          eval_mode=eval_mode)
    x, y = fm.cast_data(x, y)
    fm.check_labels(fn, loss_fn, x, y)
    chunks = _chunks(x, y, eval_batch_size)
    w = fm.params
    radius = {n: zeta * (w[n].abs() + 1) for n in fm.names}
    lo = {n: w[n] - radius[n] for n in fm.names}
    hi = {n: w[n] + radius[n] for n in fm.names}
    gen = torch.Generator().manual_seed(int(seed))
    start = {n: w[n] + (2 * torch.rand(w[n].shape, generator=gen, dtype=torch.float64).to(w[n]) - 1) * radius[n]
             for n in fm.names}
    start = {n: torch.minimum(torch.maximum(start[n], lo[n]), hi[n]) for n in fm.names}

    with torch.no_grad():
        L0 = float(_mean_loss(fm, loss_fn, w, chunks))
    res = KeskarResult(0.0, L0, L0, method, zeta)
    best = L0

    def record(value: float, step: int) -> None:
        nonlocal best
        best = max(best, value)
        res.trace.append(best)
        res.trace_steps.append(step)
        res.n_evals += 1

    if method == "sgd":
        wp = start
        with torch.no_grad():
            record(float(_mean_loss(fm, loss_fn, wp, chunks)), 0)
        n, step = len(x), 0
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(fm.device)
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                leaves = {k: v.detach().requires_grad_(True) for k, v in wp.items()}
                loss = loss_fn(fm(leaves, x[idx]), y[idx])
                grads = _grads(loss, list(leaves.values()))
                with torch.no_grad():
                    wp = {k: torch.minimum(torch.maximum(leaves[k] + lr * g, lo[k]), hi[k]).detach()
                          for k, g in zip(fm.names, grads)}
                res.batch_losses.append(float(loss.detach()))
                step += 1
                if eval_every == "step" or (isinstance(eval_every, int) and step % eval_every == 0):
                    with torch.no_grad():
                        record(float(_mean_loss(fm, loss_fn, wp, chunks)), step)
            if eval_every == "epoch":
                with torch.no_grad():
                    record(float(_mean_loss(fm, loss_fn, wp, chunks)), step)
        if res.trace_steps[-1] != step:  # the last iterate is always evaluated
            with torch.no_grad():
                record(float(_mean_loss(fm, loss_fn, wp, chunks)), step)
    else:
        from scipy.optimize import Bounds, minimize

        lo_np = fm.flatten(lo).cpu().numpy()
        hi_np = fm.flatten(hi).cpu().numpy()

        def neg_loss(z: np.ndarray) -> tuple[float, np.ndarray]:
            z = np.clip(z, lo_np, hi_np)
            leaf = torch.from_numpy(z).to(fm.device, torch.float64).requires_grad_(True)
            loss = _mean_loss(fm, loss_fn, fm.unflatten(leaf), chunks)
            (g,) = _grads(loss, [leaf])
            record(float(loss.detach()), res.n_evals)
            return -float(loss.detach()), -g.detach().cpu().numpy().astype(np.float64)

        minimize(neg_loss, fm.flatten(start).cpu().numpy(), jac=True, method="L-BFGS-B",
                 bounds=Bounds(lo_np, hi_np), options={"maxiter": maxiter})
    res.max_loss = best
    res.sharpness = 100.0 * (best - L0) / (1.0 + L0)
    return res


# --------------------------------------------------------------------------------------------------
# Hessian log-product
# --------------------------------------------------------------------------------------------------

class LogEigProduct(float):
    """The value of :func:`log_top_eig_product`: a ``float`` that also says whether it can be trusted.

    Attributes:
        converged: Lanczos / power iteration met its residual tolerance for all top-k eigenvalues. When
            ``False`` the value is an estimate from a truncated Krylov space (e.g. 9% off on a VGG at 200
            iterations) and a ``RuntimeWarning`` was issued.
        eigenvalues: the ``(k,)`` top eigenvalues (CPU), descending.
        n_positive: how many entered the sum (those above ``min_eig``).
        n_matvec: Hessian-vector products used.
        residuals: ``(k,)`` residual norms of the eigenpairs.
    """

    converged: bool
    eigenvalues: Tensor
    n_positive: int
    n_matvec: int
    residuals: Tensor

    def __new__(cls, value: float, *, converged: bool, eigenvalues: Tensor, n_positive: int, n_matvec: int,
                residuals: Tensor):
        obj = super().__new__(cls, value)
        obj.converged, obj.eigenvalues, obj.n_positive = bool(converged), eigenvalues, int(n_positive)
        obj.n_matvec, obj.residuals = int(n_matvec), residuals
        return obj

    def __repr__(self) -> str:
        return f"LogEigProduct({float(self)!r}, converged={self.converged}, n_positive={self.n_positive})"

    def __reduce__(self):  # pickles (results tables, multiprocessing) as a plain float
        return (float, (float(self),))


def log_top_eig_product(model: nn.Module, loss_fn: Callable, data, k: int = 50, *, method: str = "lanczos",
                        min_eig: float | None = None, tol: float = 1e-4, max_iter: int | None = None,
                        seed: int = 0, batch_size: int | None = None, dtype: torch.dtype | None = None,
                        device=None, eval_mode: bool = True,
                        return_eigenvalues: bool = False) -> LogEigProduct | tuple[LogEigProduct, Tensor]:
    r"""Log of the product of the top-k positive Hessian eigenvalues (Zhang et al. 2021, Fig. S4).

    .. math:: \log \prod_{j \le k,\ \lambda_j > 0} \lambda_j = \sum_{j \le k,\ \lambda_j > 0} \log \lambda_j

    with :math:`\lambda_1 \ge \dots \ge \lambda_k` the top-k (largest algebraic) eigenvalues of the loss
    Hessian (:func:`flatness.hessian.hessian_eigenvalues`; the paper follows Wu et al. 2017 and Zhang et al.
    2018 with k = 50). Eigenvalues among the top k that are not positive are left out of the sum (a
    Hessian at a stationary point that is not a strict minimum has them, and a Hessian of rank below k
    has exact zeros): "positive" means above ``min_eig``, by default ``100 * eps * lambda_1`` (``eps`` of
    the compute dtype), so that numerically zero eigenvalues, whose Ritz values are rounding noise, do not
    add arbitrary large negative logs. A ``RuntimeWarning`` says how many were left out. If none is
    positive the result is ``-inf``.

    The eigensolver runs until all k residuals meet ``tol``, within a budget that grows with k
    (Lanczos: ``max(300, 20 k)`` Krylov vectors, capped at the dimension; memory that many parameter
    vectors; power iteration: ``max(1000, 20 k)`` products per eigenpair). The 50th eigenvalue of a trained
    network sits in a dense part of the spectrum and needs far more than the ``4 k`` of
    :func:`~flatness.hessian.lanczos`' default. If the budget runs out, the value comes back with
    ``converged=False`` (and a warning): check it.

    Args:
        model, loss_fn, data: as :func:`flatness.hessian.hessian_eigenvalues`.
        k: number of top eigenvalues.
        min_eig: eigenvalues ``<= min_eig`` count as non-positive (default: numerical zero, see above).
        max_iter: the eigensolver's budget (default above).
        method, tol, seed, batch_size, dtype, device, eval_mode: passed to
            :func:`flatness.hessian.hessian_eigenvalues`.
        return_eigenvalues: also return the ``(k,)`` eigenvalues (they are also ``result.eigenvalues``).

    Returns:
        A :class:`LogEigProduct`: the natural-log product as a ``float`` subclass, with ``converged``,
        ``eigenvalues``, ``n_positive``, ``n_matvec`` and ``residuals``; and the eigenvalues if asked (a tuple,
        as before).
    """
    fn = "log_top_eig_product"
    check_choice(fn, "method", method, ("lanczos", "power"))
    _check_inputs(fn, model, loss_fn, data)
    k = check_int(fn, "k", k, minimum=1)
    if max_iter is None:
        max_iter = max(300, 20 * k) if method == "lanczos" else max(1000, 20 * k)
    res = hessian_eigenvalues(model, loss_fn, data, k, method=method, tol=tol, max_iter=max_iter, seed=seed,
                              batch_size=batch_size, dtype=dtype, device=device, eval_mode=eval_mode,
                              return_result=True)
    ev = res.eigenvalues
    if min_eig is None:
        min_eig = max(0.0, 100 * torch.finfo(ev.dtype).eps * float(ev[0]))
    pos = ev[ev > min_eig]
    if len(pos) < len(ev):
        warnings.warn(f"log_top_eig_product: {len(ev) - len(pos)} of the top {len(ev)} eigenvalues are not "
                      f"positive (<= min_eig={min_eig:.3g}) and are left out of the log product",
                      RuntimeWarning, stacklevel=2)
    value = float(pos.double().log().sum()) if len(pos) else float("-inf")
    out = LogEigProduct(value, converged=res.converged, eigenvalues=ev, n_positive=len(pos), n_matvec=res.n_matvec,
                        residuals=res.residuals.cpu())
    return (out, ev) if return_eigenvalues else out


# --------------------------------------------------------------------------------------------------
# adaptive sharpness
# --------------------------------------------------------------------------------------------------

@dataclass
class AdaptiveSharpnessResult:
    """Result of :func:`adaptive_sharpness`.

    Attributes:
        value: average case :math:`E[L(w+\\delta) - L(w)] / \\rho^2` (Chen et al. 2023, Fig. 4); worst case
            :math:`\\max L(w+\\delta) - L(w)` (averaged over the m-batches).
        std_err: standard error of ``value`` (average case: over noise draws; worst case: over m-batches,
            NaN with a single batch).
        n_draws: noise draws used (average case; 0 for the worst case).
        raw: the unnormalised loss increase (``value * rho**2`` for the average case, ``value`` for the worst):
            what Andriushchenko et al.'s code reports, for both kinds.
        loss: :math:`L(w)` on the data.
        kind, norm, rho: the settings.
        n_batches: number of m-batches.
    """

    value: float
    std_err: float
    n_draws: int
    raw: float
    loss: float
    kind: str
    norm: str
    rho: float
    n_batches: int = 1


def _apgd_checkpoints(n_steps: int) -> set[int]:
    """Croce & Hein 2020's checkpoints :math:`w_j = \\lceil p_j N \\rceil`, p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return {math.ceil(q * n_steps) for q in p[1:] if math.ceil(q * n_steps) < n_steps}


def adaptive_sharpness(model: nn.Module, loss_fn: Callable, data, rho: float = 0.1, *, kind: str = "average",
                       norm: str = "l2", n_draws: int = 50, max_draws: int = 200, rel_tol: float = 0.05,
                       m: int | None = None, n_steps: int = 20, step_size: float | None = None,
                       momentum: float = 0.75, normalize_logits: bool = False, seed: int = 0,
                       draw_batch: int = 10, batch_size: int | None = None, dtype: torch.dtype | None = None,
                       device=None, eval_mode: bool = True) -> AdaptiveSharpnessResult:
    r"""Adaptive (weight-scaled) sharpness, average or worst case (Andriushchenko et al. 2023).

    Average case, :math:`\delta_p = \rho\, |w_p|\, \epsilon_p` with independent :math:`\epsilon_p`:
    standard normal for ``norm="l2"`` (:math:`\delta_p \sim N(0, \rho^2 w_p^2)`) and uniform on
    :math:`[-1, 1]` for ``norm="linf"`` (uniform in the adaptive box :math:`|\delta_p| \le \rho |w_p|`), as
    Andriushchenko et al.'s ``random_init_lw`` (``tml-epfl/sharpness-vs-generalization``):

    .. math:: S_{\text{avg}} = \frac{1}{\rho^2}\, E_\delta \big[ L(w + \delta) - L(w) \big]
              \quad (\texttt{.value}), \qquad
              E_\delta \big[ L(w + \delta) - L(w) \big] \quad (\texttt{.raw})

    estimated from ``n_draws`` draws, then more (``draw_batch`` at a time) until the standard error is at
    most ``rel_tol`` times the estimate or ``max_draws`` is reached (reference: 50, up to 200). For a
    quadratic at a minimum ``.value`` is :math:`\frac{c}{2} \sum_p H_{pp} w_p^2` with :math:`c = E\epsilon_p^2`,
    1 for ``"l2"`` and 1/3 for ``"linf"`` (the ratio 3 holds near a quadratic minimum only; 2.75x and 4.6x were
    seen on an FCN and a VGG).

    Which number is which paper's: Chen et al. 2023's ViT figure (Fig. 4; ``chinsengi/sharpdim``
    ``src/pert.py``) divides by :math:`\rho^2` and uses ``"l2"``: ``.value``. Andriushchenko et al. 2023's
    average-case sharpness (``eval_average_sharpness`` in their code, l2 and l-inf) is the raw increase:
    ``.raw`` (``= .value * rho**2``). The worst case is never divided (``.value == .raw``).

    Worst case, with :math:`\delta = |w| \odot u`:

    .. math:: S_{\max} = \max_{\lVert u \rVert_p \le \rho} L(w + |w| \odot u) - L(w), \qquad p \in \{2, \infty\}

    by APGD (Croce & Hein 2020) in :math:`u`: from a random :math:`u_0` in the ball, ``n_steps`` steps
    :math:`z = P(u_k + \eta\, s(\nabla))` (:math:`s` = sign for :math:`\ell_\infty`, normalised gradient for
    :math:`\ell_2`), :math:`u_{k+1} = P(u_k + \alpha (z - u_k) + (1 - \alpha)(u_k - u_{k-1}))` with
    :math:`\alpha` = ``momentum``, :math:`\eta_0` = ``step_size`` (default :math:`2\rho`) halved at Croce &
    Hein's checkpoints when progress stalls (restarting from the best point); the best value over all
    iterates is kept. :math:`P` projects onto the :math:`\ell_\infty` box or the :math:`\ell_2` ball (an
    ellipsoid in :math:`\delta`).

    m-sharpness (``m``): the data is shuffled (``seed``) into batches of ``m``; the worst case is the mean over
    batches of each batch's maximum (each batch its own :math:`\delta`), the average case draws independent
    noise per batch (same expectation, it changes only the variance). ``normalize_logits`` divides the
    outputs by their norm over the output dimension before the loss (Andriushchenko et al.).

    Args:
        model: the network (left unchanged).
        loss_fn: mean loss ``loss_fn(outputs, y)``.
        data: ``(x, y)``.
        rho: perturbation radius :math:`\rho > 0`.
        kind: ``"average"`` or ``"worst"``.
        norm: ``"l2"`` or ``"linf"``: the ball of the worst case, the noise of the average case (Gaussian or
            uniform in the box).
        n_draws, max_draws, rel_tol: average-case sampling (see above).
        m: m-sharpness batch size (``None``: all data in one batch).
        n_steps, step_size, momentum: APGD settings.
        normalize_logits: divide logits by their norm.
        seed: seed of the noise, the APGD start and the batch shuffle.
        draw_batch: noise draws evaluated together with ``torch.vmap`` (memory ~ ``draw_batch`` forwards).
        batch_size: memory chunk for loss evaluations (``None``: each m-batch at once).
        dtype, device, eval_mode: compute dtype, device, eval mode.

    Returns:
        :class:`AdaptiveSharpnessResult`.
    """
    fn = "adaptive_sharpness"
    _check_loss(fn, loss_fn)
    x, y = check_data(fn, data)
    rho = check_positive(fn, "rho", rho)
    check_choice(fn, "kind", kind, ("average", "worst"))
    check_choice(fn, "norm", norm, ("l2", "linf"))
    n_draws = check_int(fn, "n_draws", n_draws, minimum=2)
    max_draws = check_int(fn, "max_draws", max_draws, minimum=n_draws)
    rel_tol = check_positive(fn, "rel_tol", rel_tol)
    m = None if m is None else check_int(fn, "m", m, minimum=1)
    n_steps = check_int(fn, "n_steps", n_steps, minimum=1)
    step_size = 2 * rho if step_size is None else check_positive(fn, "step_size", step_size)
    momentum = check_positive(fn, "momentum", momentum)
    if momentum > 1:
        raise ValueError(f"{fn}: momentum={momentum} must be in (0, 1]")
    draw_batch = check_int(fn, "draw_batch", draw_batch, minimum=1)
    batch_size = _check_batch_size(fn, batch_size)
    fm = _FunctionalModel(fn, model, dtype=dtype, device=device, eval_mode=eval_mode)
    x, y = fm.cast_data(x, y)
    fm.check_labels(fn, loss_fn, x, y)
    gen = torch.Generator().manual_seed(int(seed))
    N = len(x)
    if m is None or m >= N:
        batches = [torch.arange(N, device=fm.device)]
    else:
        perm = torch.randperm(N, generator=gen).to(fm.device)
        batches = list(perm.split(m))
    weights = [len(b) / N for b in batches]
    batch_chunks = [_chunks(x[b], y[b], batch_size) for b in batches]
    w = fm.params
    scale = {n: w[n].abs() for n in fm.names}

    def loss_at(params, chunks):
        return _mean_loss(fm, loss_fn, params, chunks, normalize_logits=normalize_logits)

    with torch.no_grad():
        base = [float(loss_at(w, ch)) for ch in batch_chunks]
    L0 = sum(wb * b for wb, b in zip(weights, base))

    if kind == "average":
        samples: list[Tensor] = []

        def draw(count: int) -> Tensor:
            total = torch.zeros(count, dtype=torch.float64)
            for wb, ch, b0 in zip(weights, batch_chunks, base):
                if norm == "linf":  # uniform in the box |delta_p| <= rho |w_p|
                    eps = {n: (2 * torch.rand((count, *w[n].shape), generator=gen, dtype=torch.float64) - 1)
                           .to(w[n]) for n in fm.names}
                else:  # Gaussian N(0, rho^2 w_p^2)
                    eps = {n: torch.randn((count, *w[n].shape), generator=gen, dtype=torch.float64).to(w[n])
                           for n in fm.names}
                stacked = {n: w[n] + rho * scale[n] * eps[n] for n in fm.names}
                with torch.no_grad():
                    try:
                        vals = vmap(lambda p: loss_at(p, ch))(stacked)
                    except (RuntimeError, NotImplementedError):  # an op without a batching rule
                        vals = torch.stack([loss_at({n: t[i] for n, t in stacked.items()}, ch)
                                            for i in range(count)])
                total += wb * (vals.double().cpu() - b0)
            return total

        n_done = 0
        while n_done < max_draws:
            want = n_draws - n_done if n_done < n_draws else min(draw_batch, max_draws - n_done)
            for c in range(0, want, draw_batch):
                samples.append(draw(min(draw_batch, want - c)))
            s = torch.cat(samples)
            n_done = len(s)
            mean, se = float(s.mean()), float(s.std() / math.sqrt(n_done))
            if se <= rel_tol * abs(mean):
                break
        return AdaptiveSharpnessResult(mean / rho**2, se / rho**2, n_done, mean, L0, kind, norm, rho,
                                       len(batches))

    # worst case: APGD per m-batch
    checkpoints = _apgd_checkpoints(n_steps)

    def project(u: dict[str, Tensor]) -> dict[str, Tensor]:
        if norm == "linf":
            return {n: t.clamp(-rho, rho) for n, t in u.items()}
        r = torch.sqrt(sum(t.pow(2).sum() for t in u.values()))
        f = torch.clamp(rho / r.clamp_min(torch.finfo(r.dtype).tiny), max=1.0)
        return {n: t * f for n, t in u.items()}

    def direction(g: dict[str, Tensor]) -> dict[str, Tensor]:
        if norm == "linf":
            return {n: t.sign() for n, t in g.items()}
        r = torch.sqrt(sum(t.pow(2).sum() for t in g.values())).clamp_min(torch.finfo(fm.dtype).tiny)
        return {n: t / r for n, t in g.items()}

    def value_and_grad(u: dict[str, Tensor], ch, b0: float) -> tuple[float, dict[str, Tensor]]:
        leaves = {n: t.detach().requires_grad_(True) for n, t in u.items()}
        loss = loss_at({n: w[n] + scale[n] * leaves[n] for n in fm.names}, ch)
        grads = _grads(loss, list(leaves.values()))
        return float(loss.detach()) - b0, dict(zip(fm.names, grads))

    def random_start() -> dict[str, Tensor]:
        if norm == "linf":
            return {n: ((2 * torch.rand(w[n].shape, generator=gen, dtype=torch.float64) - 1) * rho).to(w[n])
                    for n in fm.names}
        g = {n: torch.randn(w[n].shape, generator=gen, dtype=torch.float64).to(w[n]) for n in fm.names}
        r = float(torch.rand((), generator=gen)) ** (1.0 / fm.dim)
        gn = torch.sqrt(sum(t.pow(2).sum() for t in g.values()))
        return {n: t * (rho * r / gn) for n, t in g.items()}

    maxima = []
    for ch, b0 in zip(batch_chunks, base):
        eta = step_size
        u_prev = u = random_start()
        f, g = value_and_grad(u, ch, b0)
        f_best, u_best, g_best = f, u, g
        f_prev, n_up, last_ckpt, reduced_last, f_best_ckpt = f, 0, 0, False, f
        for k in range(1, n_steps + 1):
            z = project({n: u[n] + eta * d for n, d in direction(g).items()})
            if k == 1:
                u_new = z
            else:
                u_new = project({n: u[n] + momentum * (z[n] - u[n]) + (1 - momentum) * (u[n] - u_prev[n])
                                 for n in fm.names})
            u_prev, u = u, u_new
            f, g = value_and_grad(u, ch, b0)
            n_up += f > f_prev
            f_prev = f
            if f > f_best:
                f_best, u_best, g_best = f, u, g
            if k in checkpoints:
                stalled = n_up < 0.75 * (k - last_ckpt)
                no_gain = (not reduced_last) and f_best <= f_best_ckpt
                reduced_last = stalled or no_gain
                if reduced_last:  # halve the step and restart from the best point
                    eta /= 2
                    u = u_prev = u_best
                    g, f_prev = g_best, f_best
                n_up, last_ckpt, f_best_ckpt = 0, k, f_best
        maxima.append(f_best)
    mx = torch.tensor(maxima, dtype=torch.float64)
    wt = torch.tensor(weights, dtype=torch.float64)
    value = float((wt * mx).sum())
    se = float(mx.std() / math.sqrt(len(mx))) if len(mx) > 1 else float("nan")
    return AdaptiveSharpnessResult(value, se, 0, value, L0, kind, norm, rho, len(batches))


# --------------------------------------------------------------------------------------------------
# relative flatness
# --------------------------------------------------------------------------------------------------

def _resolve_layer(fn: str, model: nn.Module, layer) -> tuple[str, nn.Module]:
    names = {mod: name for name, mod in model.named_modules()}
    if layer is None:
        linears = [mod for mod in model.modules() if isinstance(mod, nn.Linear)]
        if not linears:
            raise ValueError(f"{fn}: layer=None needs an nn.Linear in the model; none found, pass layer")
        mod = linears[-1]
    elif isinstance(layer, bool):
        raise TypeError(f"{fn}: layer={layer!r} must be None, an int, a module name or a module")
    elif isinstance(layer, int):
        layers = parametrized_layers(model)
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"{fn}: layer={layer} out of range; the model has {len(layers)} Linear/Conv layers")
        mod = layers[layer]
    elif isinstance(layer, str):
        try:
            mod = model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"{fn}: layer={layer!r} is not a submodule name; expected one of "
                             f"{[n for n, _ in model.named_modules() if n][:8]}...") from None
    elif isinstance(layer, nn.Module):
        if layer not in names:
            raise ValueError(f"{fn}: layer module is not part of model")
        mod = layer
    else:
        raise TypeError(f"{fn}: layer={layer!r} must be None, an int, a module name or a module")
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.ndim < 2:
        raise ValueError(f"{fn}: layer {names[mod]!r} has no weight matrix (ndim >= 2)")
    prefix = names[mod]
    return (f"{prefix}.weight" if prefix else "weight"), mod


def relative_flatness(model: nn.Module, loss_fn: Callable, data, layer=None, *, batch_size: int | None = None,
                      block: int = 256, dtype: torch.dtype | None = None, device=None,
                      eval_mode: bool = True) -> float:
    r"""Petzka et al. 2021's neuron-wise relative flatness of one layer (Chen et al. 2023, Fig. 3).

    .. math:: \kappa(w) = \sum_{s, s'} \langle w_s, w_{s'} \rangle \,
              \operatorname{Tr} H_{s,s'}, \qquad
              (H_{s,s'})_{ab} = \frac{\partial^2 L}{\partial W_{sa}\, \partial W_{s'b}}

    (Petzka et al. 2021, Definition 3, :math:`\kappa^\phi_{Tr}`), where :math:`w_s` is row :math:`s` of the
    layer's weight matrix :math:`W` (the incoming weights of output neuron :math:`s`) and :math:`L` the mean
    loss on ``data``. Equivalently :math:`\kappa = \operatorname{Tr}\big((W W^\top \otimes I) H_W\big)`. For a
    Linear layer with inputs :math:`\phi_i` and per-example losses it equals
    :math:`\frac1n \sum_i \lVert\phi_i\rVert^2 \operatorname{Tr}(W W^\top \nabla^2_{z_i} \ell_i)`. It is invariant
    to rescaling the layer against its neighbour (:func:`flatness.models.alpha_rescale`).

    The Hessian block :math:`H_W` of the layer's weight (``m x n`` entries; conv kernels are flattened per
    output channel) is applied to the ``mn`` unit vectors by Hessian-vector products restricted to that
    weight, ``block`` at a time, so the cost is ``mn`` cheap products (the layer is small).

    Args:
        model: the network (left unchanged).
        loss_fn: mean loss ``loss_fn(outputs, y)``.
        data: ``(x, y)``.
        layer: ``None`` (the last ``nn.Linear``, Petzka et al.'s feature layer), an index into
            :func:`flatness.models.parametrized_layers`, a submodule name, or the module itself.
        batch_size: examples per chunk of the Hessian-vector products.
        block: unit vectors per batched product.
        dtype, device, eval_mode: as :func:`flatness.hessian.hessian_eigenvalues`.

    Returns:
        :math:`\kappa` as a float.
    """
    fn = "relative_flatness"
    _check_inputs(fn, model, loss_fn, data)
    wname, _ = _resolve_layer(fn, model, layer)
    block = check_int(fn, "block", block, minimum=1)
    op = HessianOperator(model, loss_fn, data, params=[wname], batch_size=batch_size, dtype=dtype,
                         device=device, eval_mode=eval_mode)
    W = op.params[wname]
    rows = W.shape[0]
    W2 = W.reshape(rows, -1)
    cols = W2.shape[1]
    D = rows * cols
    T = torch.zeros(rows, rows, dtype=op.dtype, device=op.device)  # T[s, s'] = Tr H_{s, s'}
    for c0 in range(0, D, block):
        c = torch.arange(c0, min(c0 + block, D), device=op.device)
        V = torch.zeros(D, len(c), dtype=op.dtype, device=op.device)
        V[c, torch.arange(len(c), device=op.device)] = 1
        HV = op.matmat(V).reshape(rows, cols, len(c))  # column (s', a) of H_W
        s_prime, a = c // cols, c % cols
        vals = HV[:, a, torch.arange(len(c), device=op.device)]  # (rows, B): H[(s, a), (s', a)]
        T.index_add_(1, s_prime, vals)
    return float(((W2 @ W2.T) * T).sum())
