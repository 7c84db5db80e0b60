r"""Compression metrics of neural representations (Chen et al. 2023, Section 3).

For one input :math:`x \in \mathbb{R}^d` and a network output :math:`f(x) \in \mathbb{R}^k` (logits, or
their sigmoid/softmax), let :math:`J(x) = \partial f / \partial x \in \mathbb{R}^{k \times d}` with singular
values :math:`\sigma_1 \ge \sigma_2 \ge \dots` and :math:`\lambda_j = \sigma_j^2` the eigenvalues of
:math:`J J^\top`. Per input (see :func:`local_metrics`):

.. math::

    \mathrm{MLS}(x) = \sigma_1, \qquad
    \log \mathrm{LVR}(x) = \tfrac12 \sum_{j} \log \lambda_j, \qquad
    D(x) = \frac{(\sum_j \lambda_j)^2}{\sum_j \lambda_j^2}, \qquad
    \lVert J \rVert_F = \Big(\sum_j \lambda_j\Big)^{1/2}

(Chen et al. 2023, Definitions 3.1-3.5, eqs. (logvol) and (dim)), and the network-wide versions
NMLS/NVR, which sum the same quantity over the inputs of every Linear/Conv layer
(:func:`network_mls`, :func:`network_log_volume`).

How they are computed
---------------------
The authors' code (``chinsengi/sharpdim``) loops over inputs, runs one backward pass per output and takes
a numpy SVD of every :math:`k \times d` Jacobian. Here the Jacobians of a whole chunk of inputs come from
:math:`k` backward passes of the batch-summed output over the chunk (or one ``torch.func.jacrev`` pass
vectorised over the outputs; forward mode when :math:`k > d`), and the spectrum from the
:math:`k \times k` Gram matrix :math:`J J^\top` with ``eigvalsh`` in float64 (:math:`O(k^2 d)` instead
of an SVD). When the first layer is an ``nn.Linear`` on the flattened input with fewer outputs
:math:`m` than inputs, :math:`J J^\top = G W W^\top G^\top` with :math:`G = \partial f/\partial z_1`
(``method="factored"``) and the backward passes stop before the first layer. The model sees its inputs
and weights in their own memory format (no channels-last copies), so any ``nn.Module`` works, including
forwards that call ``x.view(x.size(0), -1)`` as the authors' CNN classes do. Inputs too large for a dense Jacobian (ImageNet
ViTs) use :func:`top_singular_values` (subspace iteration with JVPs/VJPs) or :func:`adversarial_mls`.

Conventions (all functions)
---------------------------
* **Per-example independence.** Jacobians of a batch are taken through the batch-summed output, which is
  exact when example ``i``'s output depends on example ``i`` only. The model is therefore run in
  **eval mode** (BatchNorm uses its running statistics, Dropout is off) and put back in its previous mode
  afterwards; models with other batch-coupled operations are not supported. The metrics are those of the
  eval-mode function.
* The model is called through ``torch.func.functional_call`` with detached parameters: its parameters,
  their ``.grad`` and its mode are left unchanged.
* Outputs of shape ``(N,)`` count as ``k = 1``; outputs ``(N, ...)`` are flattened to ``(N, k)``.
* **Zero singular values.** The volume uses the :math:`r = \min(k, d)` singular values of :math:`J`
  (for :math:`k \le d` these are all eigenvalues of :math:`J J^\top`, as in the paper; for :math:`k > d`
  the other :math:`k - d` eigenvalues of :math:`J J^\top` are structurally zero and are left out).
  Eigenvalues :math:`\lambda_j \le \lambda_1 \max\big((m\epsilon)^2, m\,\epsilon_{64}\big)`,
  :math:`m = \max(k, d)`, count as exact zeros: the first term is the numerical-rank tolerance of
  ``torch.linalg.matrix_rank`` (:math:`\sigma_j \le \sigma_1 m \epsilon`, :math:`\epsilon` of the
  Jacobian's dtype), the second the rounding level of the float64 Gram matrix (for float64 models this
  treats :math:`\sigma_j \lesssim 10^{-7}\sigma_1` as zero). So a numerically rank-deficient Jacobian
  (e.g. dead ReLUs leaving fewer than k active paths) has ``log_volume = -inf`` (LVR = 0), as the
  definition implies; pass ``top_k`` (the authors use 3) for a finite value. ``local_dim`` is NaN when
  :math:`J = 0`.

Authors' conventions (``chinsengi/sharpdim`` at commit ``2bcbe24``)
------------------------------------------------------------------
* ``local_metrics(top_k=3)``: their ``cal_logvol`` (top-3 eigenvalues), the log volume of Figs. 1-3;
  default ``None`` (all :math:`\min(k, d)`, Definition 3.1).
* ``adversarial_mls(variant="authors")``: their ``eval_mls_adv`` (ratio at the last of 30 evaluations,
  sigmoid outputs); square it (``normalized_mls``) for Fig. 4. Default ``"ratio"`` (the maximum met).
* ``network_mls``: their ``get_nmls`` sum (layers hooked the same way: inputs of Linear/Conv layers).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._checks import check_choice, check_int, check_positive
from ._functional import (
    OUTPUTS,
    _activation_numel,
    _check_model_input,
    _chunk,
    _factored_gram,
    _first_forward,
    _first_layer_jacobians,
    _gram_spectrum,
    _input_linear,
    _jacobians,
    _layer_jacobians,
    _log_volume,
    _model_fn,
    _per_example_numel,
    _spectrum,
)
from ._modes import eval_mode

__all__ = [
    "local_metrics",
    "top_singular_values",
    "adversarial_mls",
    "normalized_mls",
    "network_mls",
    "network_log_volume",
    "OUTPUTS",
]

_METHODS = ("auto", "rev", "fwd", "loop", "factored")


def _check_top_k(fn: str, top_k, r: int) -> int | None:
    if top_k is None:
        return None
    return check_int(fn, "top_k", top_k, minimum=1, maximum=r)


# ------------------------------------------------------------------------------------ local metrics
def local_metrics(model: nn.Module, x: Tensor, top_k: int | None = None, output: str = "logits",
                  chunk_size: int | None = None, method: str = "auto") -> dict[str, Tensor]:
    r"""Per-input MLS, log LVR, local dimensionality and Jacobian norm (Chen et al. 2023, Section 3).

    With :math:`J(x) = \partial f(x) / \partial x \in \mathbb{R}^{k \times d}` and
    :math:`\lambda_1 \ge \dots \ge \lambda_r` (:math:`r = \min(k, d)`) the eigenvalues of :math:`J J^\top`:

    .. math::

        \mathrm{mls} = \sqrt{\lambda_1}, \quad
        \mathrm{log\_volume} = \tfrac12 \sum_{j=1}^{\text{top\_k or } r} \log \lambda_j, \quad
        \mathrm{local\_dim} = \frac{(\sum_j \lambda_j)^2}{\sum_j \lambda_j^2}, \quad
        \mathrm{jac\_fro} = \lVert J \rVert_F

    (Definitions 3.1 (LVR, eq. logvol), 3.3 (MLS) and 3.5 (local dimensionality, eq. dim)); LVR is
    ``exp(log_volume)``. See the module docstring for eval mode and the handling of zero eigenvalues.

    Args:
        model: any ``nn.Module`` mapping a batch ``(N, ...)`` to ``(N, k)`` (or ``(N,)``).
        x: inputs ``(N, ...)``, one per row (moved to the model's device and dtype).
        top_k: sum only the ``top_k`` largest eigenvalues in ``log_volume`` (the authors' code uses 3);
            ``None``: all :math:`r` of them.
        output: ``"logits"`` (model outputs), ``"sigmoid"`` or ``"softmax"`` (over the last dim).
        chunk_size: inputs per vectorised pass; ``None`` picks one that keeps the Jacobians and the
            vectorised activations under :math:`2^{26}` elements.
        method: ``"loop"`` (k backward passes, each over the whole chunk of inputs), ``"rev"``
            (``jacrev``: one backward pass vectorised over the k outputs, k times the activation memory),
            ``"fwd"`` (``jvp`` vectorised over the d input coordinates), ``"factored"`` (when the first
            layer is an ``nn.Linear`` on ``x.flatten(1)`` itself with :math:`k \le m < d` outputs: backward
            passes stop at its output :math:`z_1` and :math:`J J^\top = G W W^\top G^\top`,
            :math:`G = \partial f/\partial z_1`, so the :math:`k \times d` Jacobian is never formed) or
            ``"auto"``: where ``"factored"`` applies, the backward passes stop at :math:`z_1` as there and
            the spectrum comes either from its float64 :math:`G W W^\top G^\top` (when :math:`2m < d`,
            roughly) or from :math:`J = G W`, one float32 GEMM over all k outputs of the chunk (the
            arithmetic of ``"loop"``, fewer flops when :math:`m` is not small against :math:`d`); else
            ``"fwd"`` when k > d, else ``"loop"`` (on CPU as fast as ``"rev"`` for MLPs and 2x faster for CNNs).

    Returns:
        ``{"mls", "log_volume", "local_dim", "jac_fro"}``, each ``(N,)`` in the model's dtype, on its device.

    Example:
        >>> A = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
        >>> lin = nn.Linear(2, 2, bias=False); lin.weight.data = A
        >>> m = local_metrics(lin, torch.randn(4, 2))
        >>> m["mls"]                          # the spectral norm of A
        tensor([3., 3., 3., 3.])
        >>> round(float(m["log_volume"][0].exp()), 4)   # |det A|
        6.0
    """
    fn = "local_metrics"
    check_choice(fn, "output", output, OUTPUTS)
    check_choice(fn, "method", method, _METHODS)
    if chunk_size is not None:
        chunk_size = check_int(fn, "chunk_size", chunk_size, minimum=1)
    x, _, dtype = _check_model_input(fn, model, x)
    n, d = x.shape[0], x[0].numel()
    with eval_mode(model):
        f = _model_fn(model, output)
        k = _first_forward(fn, model, f, x).shape[1]
        top_k = _check_top_k(fn, top_k, min(k, d))
        first = _input_linear(model, x[:1]) if method in ("auto", "factored") else None
        if method == "factored" and (first is None or not k <= first[1].out_features < d):
            raise ValueError(f"{fn}: method='factored' needs a first nn.Linear fed by x.flatten(1) itself with "
                             f"k <= out_features < d; expected another method for this model")
        if method == "auto":
            if first is not None and k <= first[1].out_features < d:
                # factored: float64 products G (W W^T) G^T, ~2 (n k m^2 + m^2 d) float32-equivalent flops;
                # "first": J = G W as one float32 GEMM, n k m d flops (FNN 784-500: 2.4x fewer)
                m = first[1].out_features
                method = "factored" if 2 * (n * k * m * m + m * m * d) < n * k * m * d else "first"
            else:
                method = "fwd" if k > d else "loop"
        size = _chunk(chunk_size, n, _per_example_numel("factored" if method == "first" else method, k, d,
                                                        _activation_numel(model, x[:1])))
        eps = torch.finfo(dtype).eps
        wwt = None
        if method == "factored":  # W W^T once for all chunks
            w64 = first[1].weight.detach().to(torch.float64)
            wwt = w64 @ w64.mT
        res: dict[str, list[Tensor]] = {"mls": [], "log_volume": [], "local_dim": [], "jac_fro": []}
        for s in range(0, n, size):
            xc = x[s:s + size]
            if method == "factored":
                lam, fro2 = _gram_spectrum(_factored_gram(f, xc, *first, wwt=wwt), max(k, d), eps)
            elif method == "first":
                lam, fro2 = _spectrum(_first_layer_jacobians(f, xc, *first), eps)
            else:
                jac = _jacobians(lambda inp: f(inp["x"]), {"x": xc}, method)["x"]  # (n_c, k, d)
                lam, fro2 = _spectrum(jac, eps)
            res["mls"].append(lam[:, 0].sqrt())
            res["log_volume"].append(_log_volume(lam, top_k))
            res["local_dim"].append(lam.sum(1) ** 2 / lam.pow(2).sum(1))
            res["jac_fro"].append(fro2.sqrt())
    return {key: torch.cat(v).to(dtype) for key, v in res.items()}


# ------------------------------------------------------------------------------ matrix-free top-k
def top_singular_values(model: nn.Module, x: Tensor, k: int = 1, n_iter: int = 200, tol: float = 1e-6,
                        output: str = "logits", oversample: int = 2, chunk_size: int | None = None,
                        seed: int = 0) -> Tensor:
    r"""Top-``k`` singular values of every input Jacobian without forming it (matrix-free).

    Block subspace iteration on :math:`J^\top J` (Golub & Van Loan, Alg. 8.2.4) for all inputs at once,
    with :math:`b = k + \text{oversample}` vectors per input:

    .. math::

        U = J V, \quad \hat\sigma = \operatorname{svd}(U), \quad V \leftarrow \operatorname{qr}(J^\top U)

    One forward pass per chunk is stored; :math:`J^\top U` are vector-Jacobian products on it and
    :math:`J V` the "double-backward" products :math:`\partial_u \langle J^\top u, v\rangle` (no forward-mode
    AD, which fused kernels such as ``nn.TransformerEncoderLayer``'s fast path lack; attention runs with
    the math SDPA kernel, which has a double backward); the Ritz values :math:`\hat\sigma` (singular values
    of :math:`J V`, :math:`V` orthonormal) increase monotonically to :math:`\sigma_1, \dots, \sigma_k`,
    with error ratio :math:`(\sigma_{b+1}/\sigma_j)^2` per iteration. Memory is that of one forward and
    backward graph of the chunk plus :math:`O(N b d)`, never :math:`O(N k d)`: this is the path for
    ImageNet-size inputs (224x224x3, k = 1000) where a dense Jacobian does not fit.
    ``top_singular_values(model, x, 1)[:, 0]`` is the MLS of :func:`local_metrics`.

    Args:
        model: network mapping ``(N, ...)`` to ``(N, k_out)``; run in eval mode (module docstring).
        x: inputs ``(N, ...)``.
        k: number of singular values, ``1 <= k <= min(k_out, d)``.
        n_iter: maximum iterations.
        tol: stop when every Ritz value of every input changed by less than ``tol`` relative.
        output: ``"logits"``, ``"sigmoid"`` or ``"softmax"``.
        oversample: extra block vectors (faster convergence when :math:`\sigma_k \approx \sigma_{k+1}`).
        chunk_size: inputs per pass (``None``: all at once).
        seed: seed of the random start block.

    Returns:
        ``(N, k)`` singular values, descending, in the model's dtype.
    """
    fn = "top_singular_values"
    check_choice(fn, "output", output, OUTPUTS)
    n_iter = check_int(fn, "n_iter", n_iter, minimum=1)
    check_positive(fn, "tol", tol)
    oversample = check_int(fn, "oversample", oversample, minimum=0)
    seed = check_int(fn, "seed", seed)
    if chunk_size is not None:
        chunk_size = check_int(fn, "chunk_size", chunk_size, minimum=1)
    x, device, dtype = _check_model_input(fn, model, x)
    n, d = x.shape[0], x[0].numel()
    f = _model_fn(model, output)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with eval_mode(model):
        k_out = _first_forward(fn, model, f, x).shape[1]
        k = check_int(fn, "k", k, minimum=1, maximum=min(k_out, d))
        b = min(k + oversample, d)
        size = n if chunk_size is None else min(chunk_size, n)
        for s in range(0, n, size):
            xc = x[s:s + size]
            nc = xc.shape[0]
            v0 = torch.randn(nc, d, b, generator=gen, dtype=torch.float64)
            v = torch.linalg.qr(v0).Q.to(device=device, dtype=dtype)  # (nc, d, b)
            xr = xc.detach().requires_grad_(True)
            # attention: the math SDPA kernel has a double backward (the fused CPU/GPU kernels do not)
            with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
                fx = f(xr)  # one forward; the graph is reused by every product below
                u0 = torch.zeros_like(fx, requires_grad=True)
                (jt_u0,) = torch.autograd.grad(fx, xr, u0, create_graph=True)  # J^T u0, linear in u0

            def jmv(vv: Tensor) -> Tensor:  # (nc, d, b) -> (nc, k_out, b): J v = d/du <J^T u, v>
                cols = [torch.autograd.grad(jt_u0, u0, vv[:, :, c].reshape(xc.shape), retain_graph=True)[0]
                        for c in range(b)]
                return torch.stack(cols, dim=2)

            def jtmv(uu: Tensor) -> Tensor:  # (nc, k_out, b) -> (nc, d, b)
                cols = [torch.autograd.grad(fx, xr, uu[:, :, c], retain_graph=True)[0].reshape(nc, d)
                        for c in range(b)]
                return torch.stack(cols, dim=2)

            s_old = None
            for _ in range(n_iter):
                u = jmv(v)
                s_new = torch.linalg.svdvals(u.to(torch.float64))[:, :k]
                if s_old is not None and bool(((s_new - s_old).abs() <= tol * s_new).all()):
                    break
                s_old = s_new
                v = torch.linalg.qr(jtmv(u).to(torch.float64)).Q.to(dtype)
            out.append(s_new)
    return torch.cat(out).to(dtype)


# ------------------------------------------------------------------------------ adversarial MLS
def adversarial_mls(model: nn.Module, x: Tensor, n_steps: int = 30, lr: float = 0.1, init_std: float = 0.1,
                    output: str = "sigmoid", seed: int | None = 0, variant: str = "ratio",
                    chunk_size: int | None = None) -> Tensor:
    r"""Adversarial (finite-difference) MLS estimate of the ViT experiment (Chen et al. 2023, Fig. 4).

    Per input, Adam ascent from :math:`\delta_0 \sim N(0, \text{init\_std}^2 I)` on

    .. math:: r(\delta) = \frac{\lVert g(x + \delta) - g(x) \rVert_2}{\lVert \delta \rVert_2},
        \qquad g = \text{output}(f).

    ``variant="ratio"`` (default, the definition as a maximum) returns the largest :math:`r` met over the
    ``n_steps + 1`` iterates :math:`\delta_0, \dots, \delta_{n\_steps}`. For a linear ``g`` this is
    :math:`\lVert A \delta\rVert / \lVert \delta \rVert \le \sigma_{\max}(A)` and approaches it; for a
    nonlinear ``g`` it is a secant slope, bounded by the Lipschitz constant on the segment (not by the
    local MLS).

    ``variant="authors"`` follows ``chinsengi/sharpdim`` at commit
    ``2bcbe24548253ce80c5029ca231d7b91649418f5`` (``src/pert.py:eval_mls_adv``, the revision used for the
    ViT figure): the same objective :math:`r(\delta)` (no clipping of :math:`\delta`), ``n_steps`` evaluations
    each followed by an Adam step, and the value of :math:`r` at the **last evaluation**, i.e. at the iterate
    :math:`\delta_{n\_steps - 1}` reached after ``n_steps - 1`` Adam steps (with their 30: 29 steps; the 30th
    step's update is never evaluated). Their earlier revisions (a box-clipped :math:`\delta` and
    :math:`\lVert g(x+\delta)-g(x)\rVert^2/\lVert\delta\rVert`) are not reproduced.

    Both variants return the plain ratio. The figure plots its **square** and the normalised
    :math:`r^2 \lVert x\rVert^2` (their ``mls = loss**2``, ``norm_mls = mls * ||x||**2``): pass the result to
    :func:`normalized_mls` (``squared=True``). Adam acts elementwise, so optimising the sum over the batch
    optimises every input independently (the result does not depend on ``chunk_size``).

    Args:
        model: network mapping ``(N, ...)`` to ``(N, k)``; eval mode (module docstring).
        x: inputs ``(N, ...)``.
        n_steps: Adam steps (paper: 30); ``variant="authors"`` needs ``n_steps >= 1`` (evaluations).
        lr: Adam learning rate (paper: 0.1).
        init_std: standard deviation of the initial perturbation (paper: their ``rho`` = 0.1).
        output: ``"sigmoid"`` (paper), ``"softmax"`` or ``"logits"``.
        seed: seed of the initial perturbations (``None``: global RNG).
        variant: ``"ratio"`` (the definition) or ``"authors"``.
        chunk_size: inputs optimised together (``None``: all); the result does not depend on it.

    Returns:
        ``(N,)`` ratios (not squared).
    """
    fn = "adversarial_mls"
    check_choice(fn, "output", output, OUTPUTS)
    check_choice(fn, "variant", variant, ("ratio", "authors"))
    n_steps = check_int(fn, "n_steps", n_steps, minimum=1 if variant == "authors" else 0)
    check_positive(fn, "lr", lr)
    check_positive(fn, "init_std", init_std)
    if chunk_size is not None:
        chunk_size = check_int(fn, "chunk_size", chunk_size, minimum=1)
    x, device, dtype = _check_model_input(fn, model, x)
    f = _model_fn(model, output)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    delta0 = (torch.randn(x.shape, generator=gen, dtype=dtype) * init_std).to(device)
    n = x.shape[0]
    size = n if chunk_size is None else min(chunk_size, n)
    # authors: evaluations at delta_0 .. delta_{n_steps-1}; ratio: at delta_0 .. delta_{n_steps}
    n_eval = n_steps if variant == "authors" else n_steps + 1
    out = []
    with eval_mode(model):
        _first_forward(fn, model, f, x)
        with torch.enable_grad():
            for s in range(0, n, size):
                xc, nc = x[s:s + size], min(size, n - s)
                delta = delta0[s:s + size].clone().requires_grad_(True)
                opt = torch.optim.Adam([delta], lr=lr)
                with torch.no_grad():
                    g0 = f(xc)
                best = torch.zeros(nc, dtype=dtype, device=device)
                for step in range(n_eval):
                    diff2 = (f(xc + delta) - g0).pow(2).sum(1)
                    # clamp: a zero difference would give an infinite gradient of the square root
                    ratio = diff2.clamp_min(torch.finfo(dtype).tiny).sqrt() / delta.reshape(nc, -1).norm(dim=1)
                    best = torch.maximum(best, ratio.detach()) if variant == "ratio" else ratio.detach()
                    if step == n_eval - 1:
                        break  # the authors' loop also steps after its last evaluation: no effect on the value
                    opt.zero_grad(set_to_none=True)
                    (-ratio.sum()).backward()
                    opt.step()
                out.append(best)
    return torch.cat(out)


def normalized_mls(mls: Tensor, x: Tensor, squared: bool = True) -> Tensor:
    r"""Input-norm-normalised MLS of the ViT experiment (Chen et al. 2023, Fig. 4).

    .. math:: \mathrm{NMLS}_{\text{ViT}}(x) = \big(\mathrm{MLS}(x)\, \lVert x \rVert_2\big)^2
        = \mathrm{MLS}(x)^2 \lVert x \rVert_2^2

    The reference sheet reads "reported value squared; normalised MLS = MLS * ||x||^2": the paper's
    MLS is the square of the ratio, so its normalised MLS is the square of :math:`\mathrm{MLS}\,\lVert x\rVert`,
    the scale-free quantity that the first-layer bound controls
    (:math:`\mathrm{MLS}(x) \lVert x \rVert \le \lVert W\rVert_2 \lVert \nabla_W f(x)\rVert_F`,
    :func:`flatness.bounds.mls_bound_chain`). Pass the **plain** MLS (from :func:`adversarial_mls` or
    :func:`local_metrics`); ``squared=False`` gives :math:`\mathrm{MLS}\,\lVert x\rVert` (what the authors'
    code multiplies, with its own un-normalised "MLS").

    Args:
        mls: ``(N,)`` plain (not squared) MLS values.
        x: the inputs ``(N, ...)`` they belong to.
        squared: return the square (paper) or the plain product.

    Returns:
        ``(N,)`` normalised MLS.
    """
    fn = "normalized_mls"
    if not torch.is_tensor(mls) or mls.ndim != 1:
        raise ValueError(f"{fn}: mls must be a tensor of shape (N,), got "
                         f"{tuple(mls.shape) if torch.is_tensor(mls) else type(mls).__name__}")
    if not torch.is_tensor(x) or x.ndim < 1 or len(x) != len(mls):
        raise ValueError(f"{fn}: x must be a tensor (N, ...) with N = len(mls) = {len(mls)}")
    prod = mls * x.reshape(len(x), -1).to(mls).norm(dim=1)
    return prod.pow(2) if squared else prod


# ---------------------------------------------------------------------------- network-wide metrics
def _network_metric(fn: str, model, x, output, chunk_size, method, per_layer, reduce) -> Tensor | dict:
    check_choice(fn, "output", output, OUTPUTS)
    check_choice(fn, "method", method, ("auto", "rev", "loop"))
    if chunk_size is not None:
        chunk_size = check_int(fn, "chunk_size", chunk_size, minimum=1)
    x, _, dtype = _check_model_input(fn, model, x)
    method = "loop" if method == "auto" else method
    parts: dict[str, list[Tensor]] = {}
    with eval_mode(model):
        for layers, jac, _ in _layer_jacobians(model, x, output, chunk_size, method, fn):
            for nm in layers:
                lam, _ = _spectrum(jac[f"in:{nm}"], torch.finfo(dtype).eps)
                parts.setdefault(nm, []).append(reduce(lam))
    cols = {nm: torch.cat(v).to(dtype) for nm, v in parts.items()}
    if per_layer:
        return cols
    return torch.stack(list(cols.values()), dim=1).sum(1)


def network_mls(model: nn.Module, x: Tensor, output: str = "logits", chunk_size: int | None = None,
                method: str = "auto", per_layer: bool = False) -> Tensor | dict[str, Tensor]:
    r"""Network maximum local sensitivity, NMLS (Chen et al. 2023, Definition 3.7).

    .. math:: \mathrm{NMLS}(x) = \sum_{l} \sigma_{\max}\!\Big(\frac{\partial f}{\partial h_{l-1}}(x)\Big)

    over the ``nn.Linear``/``nn.Conv`` layers :math:`l` called in the forward pass, :math:`h_{l-1}` the
    input of layer :math:`l` (:math:`h_0 = x`; for conv layers the feature map, Jacobian
    :math:`k \times CHW`, spectrum via the :math:`k \times k` Gram matrix). The derivative is taken by
    adding a zero probe to the layer's input (forward pre-hook), i.e. it is the sensitivity *through
    layer l*; in a sequential network this is :math:`\partial f / \partial h_{l-1}`, in a network with skip
    connections it excludes the paths bypassing layer l (the quantity the NMLS bound controls). Every
    layer must be called once per forward. All layers' Jacobians come from one vectorised backward pass.
    Not invariant under :func:`flatness.models.alpha_rescale` (the MLS of :func:`local_metrics` is).

    Args:
        model: network mapping ``(N, ...)`` to ``(N, k)``; eval mode (module docstring).
        x: inputs ``(N, ...)``.
        output: ``"logits"``, ``"sigmoid"`` or ``"softmax"``.
        chunk_size: inputs per pass (``None``: automatic, bounded memory).
        method: ``"loop"``/``"auto"`` (k backward passes over the chunk) or ``"rev"`` (vectorised over the
            k outputs, as in :func:`local_metrics`).
        per_layer: return ``{layer name: (N,)}`` terms instead of their sum.

    Returns:
        ``(N,)`` NMLS (or the per-layer terms).
    """
    return _network_metric("network_mls", model, x, output, chunk_size, method, per_layer,
                           lambda lam: lam[:, 0].sqrt())


def network_log_volume(model: nn.Module, x: Tensor, top_k: int | None = None, output: str = "logits",
                       chunk_size: int | None = None, method: str = "auto",
                       per_layer: bool = False) -> Tensor | dict[str, Tensor]:
    r"""Network log volumetric ratio, log NVR (our definition; the paper's was not recovered).

    .. math:: \log \mathrm{NVR}(x) = \sum_l \tfrac12 \sum_{j} \log \lambda_j\Big(
        \frac{\partial f}{\partial h_{l-1}} \frac{\partial f}{\partial h_{l-1}}^{\!\top}\Big)

    i.e. the sum over the Linear/Conv layers of the log volume (:func:`local_metrics`'s ``log_volume``)
    of the Jacobian of the output w.r.t. that layer's input, by analogy with :func:`network_mls`
    (Chen et al. 2023, Definition 3.9 defines NVR for the network; we use the same layer set and the
    same "through layer l" derivative as NMLS). Each layer uses its :math:`\min(k, D_l)` singular values
    (or the ``top_k`` largest); a layer whose Jacobian is numerically rank deficient contributes
    :math:`-\infty` (see the module docstring).

    Args:
        model: network mapping ``(N, ...)`` to ``(N, k)``; eval mode.
        x: inputs ``(N, ...)``.
        top_k: eigenvalues kept per layer (``None``: all :math:`\min(k, D_l)`); must not exceed the
            smallest :math:`\min(k, D_l)`.
        output, chunk_size, method, per_layer: as in :func:`network_mls`.

    Returns:
        ``(N,)`` log NVR (or the per-layer terms).
    """
    fn = "network_log_volume"
    if top_k is not None:
        top_k = check_int(fn, "top_k", top_k, minimum=1)

    def reduce(lam: Tensor) -> Tensor:
        if top_k is not None and top_k > lam.shape[1]:
            raise ValueError(f"{fn}: top_k={top_k} exceeds min(k, D_l)={lam.shape[1]} of a layer; "
                             f"expected top_k <= {lam.shape[1]}")
        return _log_volume(lam, top_k)

    return _network_metric(fn, model, x, output, chunk_size, method, per_layer, reduce)
