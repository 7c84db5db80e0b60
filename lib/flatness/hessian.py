r"""Matrix-free curvature of the training loss: Hessian-vector products and what is built on them.

The loss is the mean over the data, :math:`L(\theta) = \frac1n \sum_i \ell(f_\theta(x_i), y_i)`, seen as
a pure function of the parameters through :func:`torch.func.functional_call`. Its Hessian
:math:`H = \nabla^2_\theta L` is never formed: :class:`HessianOperator` applies it to vectors by double
backward, accumulating over chunks of the data so that memory stays bounded for big models.

- :func:`lanczos` (full reorthogonalisation) and :func:`power_iteration` (with deflation): top-k
  eigenvalues of any symmetric operator; :func:`hessian_eigenvalues` applies them to the loss Hessian
  (Zhang et al. 2021, Fig. S3/S4: spectral norm and top-50 eigenvalues).
- :func:`hutchinson_trace` and :func:`hutchpp_trace` (Meyer et al. 2021): stochastic trace estimates with a
  standard error; :func:`hessian_trace` applies them to the loss Hessian, or computes Chen et al.'s
  Gauss-Newton trace exactly from per-example parameter gradients (:func:`per_example_grad_norms_sq`).

Every function leaves the model unchanged: parameters are copied into a dictionary and the model is put
in eval mode only for the duration of each forward pass (``eval_mode=True``, so that batch-norm uses its
running statistics and dropout is off; the flags are restored afterwards).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap
from torch.overrides import TorchFunctionMode

from ._checks import check_choice, check_data, check_finite, check_int, check_positive
from ._functional import _check_batch_size, _check_inputs, _check_loss, _chunks, _FunctionalModel, _grads, _GradSq

__all__ = [
    "HessianOperator", "EigenResult", "TraceEstimate",
    "lanczos", "power_iteration", "hutchinson_trace", "hutchpp_trace",
    "hessian_eigenvalues", "hessian_trace", "per_example_grad_norms_sq",
]


# --------------------------------------------------------------------------------------------------
# the Hessian as a linear operator
# --------------------------------------------------------------------------------------------------

class HessianOperator:
    r"""The Hessian of the mean training loss as a matrix-free symmetric operator on flat vectors.

    .. math:: H v = \nabla_\theta \big( \nabla_\theta L(\theta)^\top v \big), \qquad
              L(\theta) = \sum_c \frac{n_c}{n} \, \text{loss\_fn}(f_\theta(x_c), y_c)

    computed by double backward, chunk ``c`` by chunk (``batch_size`` examples at a time), so memory is
    that of one chunk's double-backward graph. With a single chunk the first-order graph is built once
    and reused by every product (``cache_graph``), which saves a forward and a backward pass per product.

    Vectors are flat ``(D,)`` tensors over the selected parameters in ``names`` order
    (:meth:`flatten` / :meth:`unflatten` convert).

    Args:
        model: the network (left unchanged).
        loss_fn: ``loss_fn(outputs, y) -> scalar``, a mean over the batch.
        data: ``(x, y)``.
        params: ``None`` (all parameters requiring grad), parameter names, or a mapping name -> tensor
            (the point at which to take the Hessian; other parameters fixed at the model's values).
        batch_size: data chunk size for the accumulation (``None``: all data at once).
        dtype: compute dtype (e.g. ``torch.float64`` for tiny exact tests); default the model's.
        device: compute device; default the model's.
        eval_mode: run forward passes in eval mode (default; flags restored).
        cache_graph: keep the first-order graph between products (default: only with a single chunk).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data, *, params=None, batch_size: int | None = None,
                 dtype: torch.dtype | None = None, device=None, eval_mode: bool = True,
                 cache_graph: bool | None = None):
        fn = "HessianOperator"
        _check_loss(fn, loss_fn)
        x, y = check_data(fn, data)
        batch_size = _check_batch_size(fn, batch_size)
        self._fm = _FunctionalModel(fn, model, params=params, dtype=dtype, device=device, eval_mode=eval_mode)
        self.loss_fn = loss_fn
        x, y = self._fm.cast_data(x, y)
        self._fm.check_labels(fn, loss_fn, x, y)
        self._chunks = _chunks(x, y, batch_size)
        self.cache_graph = len(self._chunks) == 1 if cache_graph is None else bool(cache_graph)
        self._graphs: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        self.n_hvp = 0

    # -- bookkeeping
    @property
    def dim(self) -> int:
        return self._fm.dim

    @property
    def dtype(self) -> torch.dtype:
        return self._fm.dtype

    @property
    def device(self) -> torch.device:
        return self._fm.device

    @property
    def names(self) -> list[str]:
        return list(self._fm.names)

    @property
    def params(self) -> dict[str, Tensor]:
        """The point at which the Hessian is taken (detached copies)."""
        return dict(self._fm.params)

    def flatten(self, tensors) -> Tensor:
        return self._fm.flatten(tensors)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        return self._fm.unflatten(vec)

    # -- products
    def _graph(self, i: int) -> tuple[list[Tensor], list[Tensor]]:
        if i in self._graphs:
            return self._graphs[i]
        xc, yc, wc = self._chunks[i]
        leaves = [self._fm.params[n].detach().requires_grad_(True) for n in self._fm.names]
        loss = wc * self.loss_fn(self._fm(dict(zip(self._fm.names, leaves)), xc), yc)
        grads = _grads(loss, leaves, create_graph=True)
        if self.cache_graph:
            self._graphs[i] = (leaves, grads)
        return leaves, grads

    def matmat(self, V: Tensor) -> Tensor:
        """``H @ V`` for ``V`` of shape ``(D, B)``; ``B`` Hessian-vector products (counted in ``n_hvp``)."""
        if V.ndim != 2 or V.shape[0] != self.dim:
            raise ValueError(f"HessianOperator.matmat: V has shape {tuple(V.shape)}; expected ({self.dim}, B)")
        V = V.to(self.device, self.dtype)
        out = torch.zeros_like(V)
        for i in range(len(self._chunks)):
            leaves, grads = self._graph(i)
            for b in range(V.shape[1]):
                vs = V[:, b].split(self._fm.numels)
                dot = sum((g * v.view_as(g)).sum() for g, v in zip(grads, vs))
                hv = _grads(dot, leaves, retain_graph=True)  # the graph serves the next column too
                out[:, b] += torch.cat([h.reshape(-1) for h in hv]).detach()
            if not self.cache_graph:
                del leaves, grads
        self.n_hvp += V.shape[1]
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """``H @ v`` for a flat ``(D,)`` vector."""
        if v.ndim != 1 or v.shape[0] != self.dim:
            raise ValueError(f"HessianOperator.matvec: v has shape {tuple(v.shape)}; expected ({self.dim},)")
        return self.matmat(v[:, None])[:, 0]

    __call__ = matvec

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.ndim == 1 else self.matmat(other)

    def loss(self) -> float:
        """The mean loss :math:`L(\\theta)` at the operator's point."""
        with torch.no_grad():
            return float(sum(w * self.loss_fn(self._fm(self._fm.params, xc), yc) for xc, yc, w in self._chunks))

    def to_dense(self) -> Tensor:
        """The dense ``(D, D)`` Hessian by ``D`` products (toy sizes and tests only)."""
        return self.matmat(torch.eye(self.dim, dtype=self.dtype, device=self.device))


# --------------------------------------------------------------------------------------------------
# generic symmetric-operator algorithms
# --------------------------------------------------------------------------------------------------

@dataclass
class EigenResult:
    """Top-k eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` largest algebraic eigenvalues, descending.
        eigenvectors: ``(D, k)`` orthonormal eigenvectors (columns), or ``None`` if not kept.
        residuals: ``(k,)`` residual norms :math:`\\lVert A y - \\theta y \\rVert` (bounds on the eigenvalue errors).
        n_matvec: operator applications used.
        converged: every residual is within ``tol`` times the spectral scale.
        history: estimate of the top eigenvalue after each operator application (for convergence plots).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    n_matvec: int
    converged: bool
    history: list[float] = field(default_factory=list)


def _as_operator(fn: str, operator, dim: int | None, dtype, device):
    """``(matmat, dim, dtype, device)`` for a dense matrix, a :class:`HessianOperator` or a matvec callable."""
    if isinstance(operator, HessianOperator):
        return operator.matmat, operator.dim, operator.dtype, operator.device
    if torch.is_tensor(operator):
        if operator.ndim != 2 or operator.shape[0] != operator.shape[1]:
            raise ValueError(f"{fn}: operator has shape {tuple(operator.shape)}; expected a square (D, D) matrix")
        if not operator.is_floating_point():
            raise TypeError(f"{fn}: operator must be a floating-point matrix, got {operator.dtype}")
        check_finite(fn, "operator", operator)
        A = operator
        return (lambda V: A @ V.to(A.dtype)), A.shape[0], A.dtype, A.device
    if callable(operator):
        if dim is None:
            raise ValueError(f"{fn}: dim=None; a matvec callable needs dim (the vector length)")
        dim = check_int(fn, "dim", dim, minimum=1)
        mv = operator

        def matmat(V: Tensor) -> Tensor:
            return torch.stack([mv(V[:, b]) for b in range(V.shape[1])], dim=1)

        return matmat, dim, dtype or torch.get_default_dtype(), torch.device(device or "cpu")
    raise TypeError(f"{fn}: operator must be a (D, D) tensor, a HessianOperator or a matvec callable, "
                    f"got {type(operator).__name__}")


def _randn(dim: int, gen: torch.Generator, dtype, device, cols: int | None = None) -> Tensor:
    shape = (dim,) if cols is None else (dim, cols)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


def _rademacher(dim: int, gen: torch.Generator, dtype, device, cols: int) -> Tensor:
    return (torch.randint(0, 2, (dim, cols), generator=gen) * 2 - 1).to(device, dtype)


def _ritz(alphas: list[float], betas: list[float], kk: int) -> tuple[Tensor, Tensor, float]:
    """Top-``kk`` Ritz values of the Lanczos tridiagonal (descending, float64), their ``(n, kk)`` eigenvectors
    and the spectral scale ``max |theta|``: dense ``eigh`` for small ``n``, else LAPACK's tridiagonal
    bisection + inverse iteration (``O(n kk)`` per call, so long runs stay cheap)."""
    n = len(alphas)
    if n <= 64:
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if n > 1:
            off = torch.tensor(betas[: n - 1], dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        idx = torch.argsort(theta, descending=True)[:kk]
        return theta[idx], S[:, idx], float(theta.abs().max())
    import numpy as np
    from scipy.linalg import eigh_tridiagonal

    a, b = np.asarray(alphas, dtype=np.float64), np.asarray(betas[: n - 1], dtype=np.float64)
    w, v = eigh_tridiagonal(a, b, select="i", select_range=(n - kk, n - 1))
    lo = eigh_tridiagonal(a, b, eigvals_only=True, select="i", select_range=(0, 0))
    order = np.argsort(w)[::-1].copy()
    return (torch.from_numpy(w[order].copy()), torch.from_numpy(v[:, order].copy()),
            float(max(abs(w.max()), abs(lo[0]))))


def lanczos(operator, k: int = 1, *, dim: int | None = None, max_iter: int | None = None, tol: float = 1e-4,
            seed: int = 0, return_eigenvectors: bool = False, dtype: torch.dtype | None = None,
            device=None) -> EigenResult:
    r"""Top-k (largest algebraic) eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

    The Krylov basis :math:`q_1, \dots, q_m` is kept and every new vector is orthogonalised against all
    previous ones (twice, classical Gram-Schmidt), so no spurious copies appear; the Ritz values of the
    tridiagonal :math:`T_m = Q_m^\top A Q_m` approximate the extreme eigenvalues. Iteration stops when the
    top-k Ritz residuals :math:`r_i = \beta_m |s_{m,i}| = \lVert A y_i - \theta_i y_i \rVert` satisfy
    :math:`r_i \le \text{tol}\,|\theta_i| + 100\,\epsilon \max_j |\theta_j|` (relative accuracy per eigenvalue,
    down to the rounding floor of the dtype). If the Krylov space becomes invariant before ``k``
    Ritz values exist (a low-rank operator), Lanczos restarts with a random vector orthogonal to it. Like
    every single-vector Krylov method it finds one copy of an exactly repeated eigenvalue per start
    vector, so exact multiplicities among the top k can be missed (they do not occur in practice for
    trained networks). Memory: ``m`` vectors of length ``D``.

    Args:
        operator: a symmetric ``(D, D)`` tensor, a :class:`HessianOperator`, or a callable ``v -> A v``
            (then ``dim`` is required).
        k: number of eigenvalues, ``1 <= k <= D``.
        max_iter: Krylov dimension cap (default ``min(D, max(100, 4 k))``).
        tol: relative residual tolerance (each eigenvalue's error is at most about ``tol * |lambda_i|``,
            typically far less: ~ residual^2 / gap).
        seed: seed of the random start vector.
        return_eigenvectors: also return the ``(D, k)`` Ritz vectors.
        dtype, device: for a callable operator, the vectors' dtype and device.

    Returns:
        An :class:`EigenResult` (eigenvalues on the operator's device and dtype).

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
        >>> lanczos(A, k=2).eigenvalues.tolist()
        [3.0, 1.0]
    """
    fn = "lanczos"
    matmat, D, dtype, device = _as_operator(fn, operator, dim, dtype, device)
    k = check_int(fn, "k", k, minimum=1, maximum=D)
    m = min(D, max(100, 4 * k)) if max_iter is None else check_int(fn, "max_iter", max_iter, minimum=k)
    m = min(m, D)
    tol = check_positive(fn, "tol", tol)
    gen = torch.Generator().manual_seed(int(seed))
    eps = torch.finfo(dtype).eps

    cap = min(m, max(2 * k + 20, 32))
    Q = torch.empty(cap, D, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    history: list[float] = []
    q = _randn(D, gen, dtype, device)
    q = q / q.norm()
    converged = False
    top = S = res = None
    for j in range(m):
        if j == Q.shape[0]:
            Q = torch.cat([Q, torch.empty(min(m, 2 * Q.shape[0]) - Q.shape[0], D, dtype=dtype, device=device)])
        Q[j] = q
        w = matmat(q[:, None])[:, 0]
        a = float(q @ w)
        w = w - a * q
        if j > 0:
            w = w - betas[-1] * Q[j - 1]
        Qj = Q[: j + 1]
        for _ in range(2):  # full reorthogonalisation, "twice is enough"
            w = w - Qj.T @ (Qj @ w)
        b = float(w.norm())
        alphas.append(a)
        top, S, scale = _ritz(alphas, betas, min(k, j + 1))
        res = b * S[j].abs()
        scale = scale or 1.0
        history.append(float(top[0]))
        thresh = tol * top.abs() + 100 * eps * scale
        if j + 1 == D:
            converged = True  # the Krylov space is the whole space: Ritz values are exact
            break
        if j + 1 >= k and bool((res <= thresh).all()):
            converged = True
            break
        if b <= 100 * eps * scale:  # invariant subspace with fewer than k Ritz values: restart orthogonally
            r = _randn(D, gen, dtype, device)
            for _ in range(2):
                r = r - Qj.T @ (Qj @ r)
            q, b = r / r.norm(), 0.0
        else:
            q = w / b
        betas.append(b)
    if not converged:
        worst = int(torch.argmax(res / thresh))
        warnings.warn(f"lanczos: not converged after {len(alphas)} iterations (residual {float(res[worst]):.3g} "
                      f"> {float(thresh[worst]):.3g} for eigenvalue {float(top[worst]):.6g}); "
                      f"increase max_iter", RuntimeWarning, stacklevel=2)
    vals = top.to(device=device, dtype=dtype)
    vecs = None
    if return_eigenvectors:
        n = len(alphas)
        vecs = Q[:n].T @ S.to(device=device, dtype=dtype)
    return EigenResult(vals, vecs, res.to(dtype), len(alphas), converged, history)


def power_iteration(operator, k: int = 1, *, dim: int | None = None, max_iter: int = 1000, tol: float = 1e-4,
                    seed: int = 0, return_eigenvectors: bool = False, dtype: torch.dtype | None = None,
                    device=None) -> EigenResult:
    r"""Top-k (largest algebraic) eigenvalues by power iteration with deflation.

    Eigenpairs are found one at a time on the deflated, shifted operator
    :math:`P (A - s I) P`, :math:`P = I - Y Y^\top` projecting out the eigenvectors :math:`Y` found so far.
    The shift starts at :math:`s = 0`; if the iteration converges to a negative value (a negative
    eigenvalue dominates the rest of the spectrum) the shift is set to that eigenvalue, which makes the
    remaining spectrum non-negative, and the search is repeated, so the result is always the largest
    algebraic eigenvalues. Each eigenpair stops when :math:`\lVert A v - \theta v\rVert \le \text{tol}\,|\lambda|
    + 100\,\epsilon\,\lambda_{\text{scale}}` (as :func:`lanczos`).

    Args:
        operator: a symmetric ``(D, D)`` tensor, a :class:`HessianOperator`, or a callable ``v -> A v``.
        k: number of eigenvalues.
        max_iter: iterations per eigenpair.
        tol: relative residual tolerance.
        seed: seed of the random start vectors.
        return_eigenvectors: also return the ``(D, k)`` eigenvectors.
        dtype, device: for a callable operator.

    Returns:
        An :class:`EigenResult`.
    """
    fn = "power_iteration"
    matmat, D, dtype, device = _as_operator(fn, operator, dim, dtype, device)
    k = check_int(fn, "k", k, minimum=1, maximum=D)
    max_iter = check_int(fn, "max_iter", max_iter, minimum=1)
    tol = check_positive(fn, "tol", tol)
    gen = torch.Generator().manual_seed(int(seed))
    eps = torch.finfo(dtype).eps
    Y = torch.empty(D, 0, dtype=dtype, device=device)
    vals: list[float] = []
    resids: list[float] = []
    history: list[float] = []
    n_matvec, shift, all_converged = 0, 0.0, True

    def project(v: Tensor) -> Tensor:
        return v - Y @ (Y.T @ v) if Y.shape[1] else v

    j = 0
    while j < k:
        v = project(_randn(D, gen, dtype, device))
        v = v / v.norm()
        converged, theta, res = False, 0.0, float("inf")
        for _ in range(max_iter):
            w = project(matmat(v[:, None])[:, 0] - shift * v)
            n_matvec += 1
            theta = float(v @ w)
            res = float((w - theta * v).norm())
            if j == 0:
                history.append(theta + shift)
            scale = max(abs(theta), abs(theta + shift), abs(vals[0]) if vals else 0.0) or 1.0
            thresh = tol * abs(theta + shift) + 100 * eps * scale
            if res <= thresh:
                converged = True
                break
            nw = w.norm()
            if float(nw) == 0.0:  # v is in the null space of the deflated operator
                converged, res = True, 0.0
                break
            v = w / nw
        if converged and theta < -thresh:
            shift += theta  # a negative eigenvalue dominates: shift it to zero and search again
            continue
        all_converged &= converged
        Y = torch.cat([Y, (v / v.norm())[:, None]], dim=1)
        vals.append(theta + shift)
        resids.append(res)
        j += 1
    if not all_converged:
        warnings.warn(f"power_iteration: not converged within max_iter={max_iter} iterations per eigenpair "
                      f"(last residual {res:.3g}); increase max_iter", RuntimeWarning, stacklevel=2)
    order = torch.argsort(torch.tensor(vals, dtype=torch.float64), descending=True)
    ev = torch.tensor(vals, dtype=torch.float64)[order].to(device=device, dtype=dtype)
    rs = torch.tensor(resids, dtype=torch.float64)[order].to(dtype)
    return EigenResult(ev, Y[:, order.to(device)] if return_eigenvectors else None, rs, n_matvec,
                       all_converged, history)


class TraceEstimate(NamedTuple):
    """A trace value with its standard error (0 for exact methods) and the samples it used."""

    value: float
    std_err: float
    n_samples: int
    method: str


def _blocks(n: int, block: int) -> Iterator[int]:
    while n > 0:
        yield min(block, n)
        n -= block


def hutchinson_trace(operator, n_samples: int = 100, *, dim: int | None = None, seed: int = 0,
                     block: int = 8, dtype: torch.dtype | None = None, device=None) -> TraceEstimate:
    r"""Hutchinson's estimate of :math:`\operatorname{Tr} A` with Rademacher probes.

    .. math:: \widehat{\operatorname{Tr}} A = \frac1m \sum_{j=1}^m z_j^\top A z_j, \qquad
              z_j \in \{\pm 1\}^D, \qquad \text{std err} = \frac{\operatorname{sd}(z_j^\top A z_j)}{\sqrt m}

    (Hutchinson 1989). Probes are applied ``block`` at a time.

    Args:
        operator: a symmetric ``(D, D)`` tensor, a :class:`HessianOperator`, or a callable ``v -> A v``.
        n_samples: number of probes ``m`` (>= 2).
        seed: seed of the probes.
        block: probes per batched product.
    """
    fn = "hutchinson_trace"
    matmat, D, dtype, device = _as_operator(fn, operator, dim, dtype, device)
    n_samples = check_int(fn, "n_samples", n_samples, minimum=2)
    block = check_int(fn, "block", block, minimum=1)
    gen = torch.Generator().manual_seed(int(seed))
    samples = []
    for b in _blocks(n_samples, block):
        Z = _rademacher(D, gen, dtype, device, b)
        samples.append((Z * matmat(Z)).sum(0).double().cpu())
    s = torch.cat(samples)
    return TraceEstimate(float(s.mean()), float(s.std() / math.sqrt(n_samples)), n_samples, "hutchinson")


def hutchpp_trace(operator, n_samples: int = 99, *, dim: int | None = None, seed: int = 0, block: int = 8,
                  dtype: torch.dtype | None = None, device=None) -> TraceEstimate:
    r"""Hutch++ estimate of :math:`\operatorname{Tr} A` (Meyer, Musco, Musco, Woodruff 2021, Algorithm 1).

    With :math:`s = \lfloor m/3 \rfloor` sketch probes :math:`S` and :math:`g = m - 2s` residual probes
    :math:`G` (Rademacher), :math:`Q = \operatorname{orth}(A S)`:

    .. math:: \widehat{\operatorname{Tr}} A = \operatorname{Tr}(Q^\top A Q)
              + \frac1g \sum_{j=1}^{g} g_j^\top (I - QQ^\top) A (I - QQ^\top) g_j

    using exactly ``m`` products. The low-rank part is exact given :math:`Q`; the reported standard error is
    that of the residual Hutchinson term (conditional on :math:`Q`). Memory: ``s`` vectors of length ``D``.

    Args:
        operator: a symmetric ``(D, D)`` tensor, a :class:`HessianOperator`, or a callable ``v -> A v``.
        n_samples: total products ``m`` (>= 4).
        seed: seed of the probes.
        block: probes per batched product.
    """
    fn = "hutchpp_trace"
    matmat, D, dtype, device = _as_operator(fn, operator, dim, dtype, device)
    n_samples = check_int(fn, "n_samples", n_samples, minimum=4)
    block = check_int(fn, "block", block, minimum=1)
    gen = torch.Generator().manual_seed(int(seed))
    s = n_samples // 3
    g = n_samples - 2 * s

    def apply(V: Tensor) -> Tensor:
        return torch.cat([matmat(V[:, i:i + block]) for i in range(0, V.shape[1], block)], dim=1)

    S = _rademacher(D, gen, dtype, device, s)
    Q, _ = torch.linalg.qr(apply(S))
    low_rank = float((Q * apply(Q)).sum())
    G = _rademacher(D, gen, dtype, device, g)
    G = G - Q @ (Q.T @ G)
    samples = (G * apply(G)).sum(0).double().cpu()
    return TraceEstimate(low_rank + float(samples.mean()), float(samples.std() / math.sqrt(g)), n_samples,
                         "hutchpp")


# --------------------------------------------------------------------------------------------------
# loss-Hessian estimators
# --------------------------------------------------------------------------------------------------

def hessian_eigenvalues(model: nn.Module, loss_fn: Callable, data, k: int = 1, *, method: str = "lanczos",
                        tol: float = 1e-4, max_iter: int | None = None, seed: int = 0,
                        batch_size: int | None = None, params=None, dtype: torch.dtype | None = None,
                        device=None, eval_mode: bool = True, return_result: bool = False) -> Tensor | EigenResult:
    r"""Top-k eigenvalues (largest algebraic, descending) of the training-loss Hessian, matrix-free.

    .. math:: H = \nabla_\theta^2 \, \frac1n \sum_{i=1}^n \ell(f_\theta(x_i), y_i), \qquad
              \lambda_1 \ge \lambda_2 \ge \dots \ge \lambda_k

    :math:`\lambda_1` is the spectral norm at a minimum (Zhang et al. 2021, Fig. S3; Keskar et al.'s
    sharpness is about :math:`\zeta^2 \lambda_1 / 2(1+L)` for small boxes, Dinh et al. 2017); the top 50
    give Fig. S4's log product (:func:`flatness.sharpness.log_top_eig_product`). Only Hessian-vector
    products are used (:class:`HessianOperator`), never the dense Hessian.

    Args:
        model: the network (left unchanged).
        loss_fn: ``loss_fn(outputs, y) -> scalar`` mean loss.
        data: ``(x, y)``, ``x`` of shape ``(N, ...)``.
        k: number of eigenvalues.
        method: ``"lanczos"`` (full reorthogonalisation, default; memory ``max_iter`` vectors) or
            ``"power"`` (power iteration with deflation; memory ``k`` vectors, many more products).
        tol: relative residual tolerance (see :func:`lanczos`).
        max_iter: Lanczos Krylov dimension (default ``min(D, max(100, 4k))``) or power iterations per
            eigenpair (default 1000).
        seed: seed of the start vectors.
        batch_size: examples per chunk of the Hessian-vector-product accumulation (``None``: all at once).
        params: restrict to / evaluate at these parameters (see :class:`HessianOperator`).
        dtype: compute dtype, e.g. ``torch.float64`` for tiny exact checks.
        device: compute device (default: the model's).
        eval_mode: forward passes in eval mode (batch-norm running statistics; restored afterwards).
        return_result: return the full :class:`EigenResult` (eigenvectors excluded) instead of the values.

    Returns:
        ``(k,)`` CPU tensor of eigenvalues, descending (or an :class:`EigenResult`).
    """
    fn = "hessian_eigenvalues"
    check_choice(fn, "method", method, ("lanczos", "power"))
    _check_inputs(fn, model, loss_fn, data)
    op = HessianOperator(model, loss_fn, data, params=params, batch_size=batch_size, dtype=dtype, device=device,
                         eval_mode=eval_mode)
    k = check_int(fn, "k", k, minimum=1, maximum=op.dim)
    if method == "lanczos":
        res = lanczos(op, k, max_iter=max_iter, tol=tol, seed=seed)
    else:
        res = power_iteration(op, k, max_iter=1000 if max_iter is None else max_iter, tol=tol, seed=seed)
    res.eigenvalues = res.eigenvalues.cpu()
    return res if return_result else res.eigenvalues


# -- per-example gradient norms: layer-wise factorisation (Linear, Conv1d, Conv2d) + vmap for the rest

_FAST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _fast_modules(fm: _FunctionalModel, model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose selected parameters can use the factorised per-example norm.

    Exactly ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (not subclasses, whose forward may differ), dense
    (``groups=1``), zero padding given as integers, owning every use of their parameters (no tying), with at
    least one of ``weight`` / ``bias`` selected. Whether each is called exactly once per forward is checked
    on a probe pass (:func:`_probe_fast`).
    """
    owners: dict[int, int] = {}
    for mod in model.modules():
        for t in mod.parameters(recurse=False):
            owners[id(t)] = owners.get(id(t), 0) + 1
    sel = set(fm.names)
    out = {}
    for name, mod in model.named_modules():
        if type(mod) not in _FAST_TYPES:
            continue
        if isinstance(mod, nn.modules.conv._ConvNd) and (
                mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
            continue
        pre = f"{name}." if name else ""
        own = [t for t in (mod.weight, mod.bias) if t is not None]
        if any(owners.get(id(t), 0) != 1 for t in own):
            continue
        if f"{pre}weight" in sel or f"{pre}bias" in sel:
            out[name] = mod
    return out


class _CountUses(TorchFunctionMode):
    """Counts how often each tracked tensor enters a torch function (a parameter tied or reused outside its
    module shows up as more than one use)."""

    def __init__(self, tensors: Sequence[Tensor]):
        super().__init__()
        self.ids = {id(t) for t in tensors}
        self.counts: dict[int, int] = {}

    def _scan(self, a) -> None:
        if isinstance(a, (list, tuple)):
            for b in a:
                self._scan(b)
        elif isinstance(a, dict):
            for b in a.values():
                self._scan(b)
        elif torch.is_tensor(a) and id(a) in self.ids:
            self.counts[id(a)] = self.counts.get(id(a), 0) + 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._scan(args)
        self._scan(kwargs)
        return func(*args, **kwargs)


def _capture(mods: dict[str, nn.Module], store: dict[str, list]):
    """Forward hooks recording each module's ``(input, output)``; returns the handles.

    The input is copied and the output handed on as a copy, so that a later in-place operation
    (``ReLU(inplace=True)``, ``out += identity``) changes neither what is recorded nor the graph node whose
    gradient is taken.
    """
    def hook(name):
        def f(_m, inp, out):
            store.setdefault(name, []).append((inp[0].detach().clone(), out))
            return out.clone()
        return f
    return [m.register_forward_hook(hook(n)) for n, m in mods.items()]


def _grad_norms_sq(fn: str, model: nn.Module, x: Tensor, params=None, *, chunk_size: int | None = None,
                   dtype: torch.dtype | None = None, device=None, eval_mode: bool = True, method: str = "auto",
                   loss_fn: Callable | None = None, y: Tensor | None = None) -> Tensor:
    """:func:`per_example_grad_norms_sq` under the name ``fn`` (labels checked against ``loss_fn`` if given)."""
    if not torch.is_tensor(x):
        raise TypeError(f"{fn}: x must be a torch.Tensor of shape (N, ...), got {type(x).__name__}")
    if x.ndim < 1 or len(x) == 0:
        raise ValueError(f"{fn}: x has shape {tuple(x.shape)}; expected (N, ...) with N >= 1")
    check_choice(fn, "method", method, ("auto", "vmap"))
    fm = _FunctionalModel(fn, model, params=params, dtype=dtype, device=device, eval_mode=eval_mode)
    x = x.to(fm.device, fm.dtype) if x.is_floating_point() else x.to(fm.device)
    if loss_fn is not None:
        fm.check_labels(fn, loss_fn, x, y)
    if chunk_size is not None:
        chunk_size = check_int(fn, "chunk_size", chunk_size, minimum=1)

    # which selected parameters take the factorised path: probe one forward pass (two examples if there are)
    fast: dict[str, nn.Module] = {}
    batch_stats = not eval_mode and any(isinstance(m, nn.modules.batchnorm._NormBase) and m.training
                                        for m in model.modules())
    if method == "auto" and not batch_stats:  # examples must not interact within a batch
        fast = _fast_modules(fm, model)
    store: dict[str, list] = {}
    handles = _capture(fast, store)
    pre = {n: (f"{n}." if n else "") for n in fast}
    probe_params = {n: t.clone() for n, t in fm.params.items()}  # distinct objects, to count their uses
    tracked = {n: [probe_params[f"{pre[n]}{kind}"] for kind in ("weight", "bias") if f"{pre[n]}{kind}" in probe_params]
               for n in fast}
    counter = _CountUses([t for ts in tracked.values() for t in ts])
    try:
        with torch.no_grad(), counter:
            probe = x[:2]
            out = fm(probe_params, probe)
    finally:
        for hd in handles:
            hd.remove()
    k = out[0].numel()
    for n in list(fast):
        calls = store.get(n, [])
        if (len(calls) != 1 or calls[0][0].shape[0] != len(probe) or calls[0][1].shape[0] != len(probe)
                or any(counter.counts.get(id(t), 0) != 1 for t in tracked[n])):
            del fast[n]  # called twice or never, not batch-first, or a parameter used elsewhere: generic path
    del probe_params, tracked, counter
    fast_names = {f"{pre[n]}{kind}" for n in fast for kind in ("weight", "bias")} & set(fm.names)
    rest = [n for n in fm.names if n not in fast_names]
    act = sum(v[0][1][0].numel() + v[0][0][0].numel() for v in store.values() if v)
    dim_rest = sum(fm.params[n].numel() for n in rest)
    if chunk_size is None:  # ~2**25 floats of Jacobians / output gradients (k per example) per chunk
        chunk_size = max(1, 2**25 // max(1, k * (dim_rest + act)))

    def f_single(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return fm({**fm.params, **p}, xi.unsqueeze(0)).reshape(-1)

    jac = vmap(jacrev(f_single), in_dims=(None, 0))
    out_norms = []
    for xc in x.split(chunk_size):
        g = torch.zeros(len(xc), dtype=fm.dtype, device=fm.device)
        if fast:
            # one forward pass; then, per output j, one backward pass of sum_i f_j(x_i) down to the
            # factorised layers' outputs gives every example's d f_j / d z (examples are independent)
            store.clear()
            leaves = {n: (fm.params[n].detach().requires_grad_(True) if n in fast_names else fm.params[n])
                      for n in fm.names}
            handles = _capture(fast, store)
            try:
                with torch.enable_grad():
                    o = fm(leaves, xc).reshape(len(xc), -1)  # (B, k)
            finally:
                for hd in handles:
                    hd.remove()
            names = [n for n in fast if store[n][0][1].requires_grad]
            zs = [store[n][0][1] for n in names]
            acc = [_GradSq(fast[n], store[n][0][0], k, weight=f"{pre[n]}weight" in fast_names,
                           bias=f"{pre[n]}bias" in fast_names) for n in names]
            store.clear()
            # per output j, one backward pass to the layer outputs; each layer keeps what it needs of
            # d f_j / d z (flatness._functional._GradSq: ||delta||^2 ||h||^2, the ghost norm, or the gradients
            # of all k outputs for one product per example at the end)
            for j in range(k):
                deltas = torch.autograd.grad(o[:, j].sum(), zs, retain_graph=j < k - 1, allow_unused=True)
                for a_, d in zip(acc, deltas):
                    if d is not None:
                        a_.add(j, d)
            for a_ in acc:
                w_sq, b_sq = a_.totals()
                g = g + (w_sq + b_sq).to(g.dtype)
            del o, zs, acc, deltas
        if rest:
            J = jac({n: fm.params[n] for n in rest}, xc)  # name -> (B, K, *shape)
            g = g + sum(J[n].pow(2).flatten(1).sum(1) for n in rest)
        out_norms.append(g.detach())
    return torch.cat(out_norms)


def per_example_grad_norms_sq(model: nn.Module, x: Tensor, params=None, *, chunk_size: int | None = None,
                              dtype: torch.dtype | None = None, device=None, eval_mode: bool = True,
                              method: str = "auto") -> Tensor:
    r"""Squared Frobenius norms of the per-example parameter Jacobians of the outputs.

    .. math:: g_i = \lVert \nabla_\theta f(x_i) \rVert_F^2 = \sum_{j=1}^{k} \lVert \nabla_\theta f_j(x_i) \rVert^2

    (summed over the ``k`` outputs). Chen et al. 2023's sharpness (eq. (zloss_sharpness)) is the mean of
    :math:`g_i`. ``params`` restricts the gradient (e.g. ``["1.weight"]`` for the first layer of an
    :class:`~flatness.models.FCN`) or, as a mapping name -> tensor, evaluates at other values.

    ``method="auto"``: for the parameters of ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layers (dense,
    zero padding, each called once per forward, parameters not tied) the norm factorises over the layer's
    input :math:`h` and output gradient :math:`\delta_j = \partial f_j / \partial z` (Goodfellow 2015; the
    ghost norm of Li et al. 2022 for convolutions):

    .. math:: \lVert \nabla_W f_j \rVert_F^2 = \Big\lVert \sum_p \delta_{j,p} h_p^\top \Big\rVert_F^2
              = \sum_{p,q} (\delta_{j,p} \cdot \delta_{j,q})(h_p \cdot h_q), \qquad
              \lVert \nabla_b f_j \rVert^2 = \Big\lVert \sum_p \delta_{j,p} \Big\rVert^2

    over output positions :math:`p` (one for a Linear layer on ``(N, D)`` inputs, where it is
    :math:`\lVert\delta_j\rVert^2 \lVert h\rVert^2`), so one forward pass and, per output :math:`j`, one
    backward pass of :math:`\sum_i f_j(x_i)` down to the layer outputs (batched over the examples) suffice; no
    per-example parameter gradient is formed for Linear layers on ``(N, D)`` inputs, and for convolutions
    the cheaper of the ghost norm (:math:`P^2 I + k P^2 O`, the patch Gram matrix shared by the k outputs)
    and the k per-example weight gradients (:math:`k P I O`, one product per example) is used. This assumes that
    examples do not interact within a batch (true in eval mode; with ``eval_mode=False`` and batch-norm in
    training mode the generic path is used). Every other parameter (norm layers, attention projections used
    functionally, tied weights) uses ``vmap(jacrev)`` per-example Jacobians, as ``method="vmap"`` does for all.

    Args:
        model: the network (left unchanged).
        x: ``(N, ...)`` inputs.
        params: ``None`` (all trainable parameters), names, or a mapping name -> tensor.
        chunk_size: examples per vectorised chunk (default: about ``2**25`` Jacobian / gradient entries).
        dtype, device: compute dtype and device (default: the model's).
        eval_mode: forward passes in eval mode.
        method: ``"auto"`` (factorised where possible) or ``"vmap"`` (per-example Jacobians throughout).

    Returns:
        ``(N,)`` tensor on the compute device.
    """
    return _grad_norms_sq("per_example_grad_norms_sq", model, x, params, chunk_size=chunk_size, dtype=dtype,
                          device=device, eval_mode=eval_mode, method=method)


_TRACE_METHODS = ("auto", "exact", "gauss_newton", "hutchinson", "hutchpp")


def hessian_trace(model: nn.Module, loss_fn: Callable | None, data, *, method: str = "auto",
                  n_samples: int = 100, seed: int = 0, batch_size: int | None = None, params=None,
                  chunk_size: int | None = None, dtype: torch.dtype | None = None, device=None,
                  eval_mode: bool = True) -> TraceEstimate:
    r"""Trace of the training-loss Hessian: Chen et al.'s Gauss-Newton form or a stochastic estimate.

    ``"gauss_newton"`` (Chen et al. 2023, eq. (zloss_sharpness)), whatever the loss:

    .. math:: \operatorname{Tr} G = \frac1n \sum_{i=1}^n \lVert \nabla_\theta f(x_i) \rVert_F^2
              = \operatorname{Tr} \frac1n \sum_i J_i^\top J_i,

    summed over the ``k`` outputs: the trace of the Gauss-Newton matrix of
    :func:`flatness.losses.half_mse`, which equals the true Hessian trace of ``half_mse`` at an
    interpolation minimum (:math:`f(x_i) = y_i`; the paper's sharpness, its figures plot
    :math:`\sqrt{\operatorname{Tr} H}`). It uses only ``model`` and ``x``; ``loss_fn`` and ``y`` are not used.
    ``std_err`` is 0 and ``n_samples`` the number of examples. Computed by
    :func:`per_example_grad_norms_sq` (one backward pass per output through the activations, no
    per-example parameter gradients for Linear / Conv layers).

    ``"exact"``: the same number, allowed only where it is the loss's own Gauss-Newton trace: ``loss_fn``
    is :func:`~flatness.losses.half_mse` or ``None``. With any other loss (BCE, cross-entropy) it raises a
    ``ValueError``: their Hessian trace differs from the half-MSE Gauss-Newton trace (26x and 76x on an
    FCN and a VGG); ask for ``"gauss_newton"`` (the paper's quantity) or ``"hutchpp"`` (that loss's trace)
    explicitly. Away from interpolation even the ``half_mse`` Hessian adds
    :math:`\frac1n \sum_i (f(x_i) - y_i)^\top \operatorname{Tr} \nabla^2_\theta f(x_i)`, which ``"exact"`` omits.

    ``"hutchinson"`` / ``"hutchpp"``: :func:`hutchinson_trace` / :func:`hutchpp_trace` applied to the Hessian
    of ``loss_fn`` (any loss, any point) with ``n_samples`` Hessian-vector products.

    Args:
        model: the network (left unchanged).
        loss_fn: mean loss ``loss_fn(outputs, y)``; may be ``None`` for ``"exact"`` and ``"gauss_newton"``.
        data: ``(x, y)``.
        method: ``"auto"`` (default: ``"exact"`` when ``loss_fn`` is ``None`` or
            :func:`~flatness.losses.half_mse`, else ``"hutchpp"``, so that another loss's curvature is never
            silently ignored), ``"exact"``, ``"gauss_newton"``, ``"hutchinson"`` or ``"hutchpp"``.
        n_samples: probes (Hessian-vector products) of the stochastic methods.
        seed: seed of the probes.
        batch_size: examples per chunk of the Hessian-vector products.
        params: restrict to / evaluate at these parameters.
        chunk_size: examples per vectorised chunk (``"exact"``, ``"gauss_newton"``).
        dtype, device, eval_mode: as :func:`hessian_eigenvalues`.

    Returns:
        :class:`TraceEstimate` ``(value, std_err, n_samples, method)``.

    Raises:
        ValueError: ``method="exact"`` with a loss other than ``half_mse``; non-finite parameters; labels
            invalid for the loss (:func:`flatness._checks.check_labels`).

    Example:
        >>> from flatness.losses import half_mse
        >>> net = torch.nn.Linear(3, 2)
        >>> x = torch.randn(5, 3)
        >>> est = hessian_trace(net, half_mse, (x, net(x).detach()), method="exact")
        >>> round(est.value, 4) == round(2 * float((x.pow(2).sum(1) + 1).mean()), 4)
        True
    """
    fn = "hessian_trace"
    check_choice(fn, "method", method, _TRACE_METHODS)
    _check_inputs(fn, model, loss_fn, data)
    from .losses import half_mse

    if method == "auto":
        method = "exact" if loss_fn is None or loss_fn is half_mse else "hutchpp"
    if method == "exact" and loss_fn is not None and loss_fn is not half_mse:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise ValueError(f"{fn}: method='exact' is the Gauss-Newton trace of half_mse, not the Hessian trace of "
                         f"loss_fn={name}; use method='gauss_newton' for Chen et al.'s (1/n) sum_i "
                         f"||grad_theta f(x_i)||_F^2 whatever the loss, or method='hutchpp' / 'hutchinson' "
                         f"(or 'auto') for the trace of {name}'s own Hessian")
    if method in ("exact", "gauss_newton"):
        x, y = check_data(fn, data)
        if loss_fn is not None:
            _check_loss(fn, loss_fn)
        g = _grad_norms_sq(fn, model, x, params, chunk_size=chunk_size, dtype=dtype, device=device,
                           eval_mode=eval_mode, loss_fn=loss_fn, y=y)
        return TraceEstimate(float(g.double().mean()), 0.0, len(x), method)
    op = HessianOperator(model, loss_fn, data, params=params, batch_size=batch_size, dtype=dtype, device=device,
                         eval_mode=eval_mode)
    if method == "hutchinson":
        return hutchinson_trace(op, n_samples, seed=seed)
    return hutchpp_trace(op, n_samples, seed=seed)
