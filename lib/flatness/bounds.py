r"""Sharpness bounds on representation compression (Chen et al. 2023, Propositions 3.4-3.8, eq. tightness).

Every function returns the whole chain of intermediate terms (not only the two sides), so that a
notebook can plot where each inequality is loose (Chen et al. Fig. G.5).

Setting. :math:`f(x) \in \mathbb{R}^k` are the logits, :math:`J(x) = \partial f/\partial x`, and the
sharpness is Chen et al.'s eq. (zloss_sharpness): the Hessian trace of the half mean squared error
(:func:`flatness.losses.half_mse`) at an interpolation minimum, i.e. the Gauss-Newton trace

.. math:: \operatorname{Tr} H = \frac1n \sum_{i=1}^n \lVert \nabla_\theta f(x_i) \rVert_F^2
    \qquad (\text{summed over the } k \text{ outputs}).

It is computed with ``flatness.sharpness.hessian_trace(..., method="exact")`` on targets equal to the
model's outputs (so the network interpolates them), or passed in as ``trace_hessian``.

Derivations (verified; each step is one of the returned terms)
------------------------------------------------------------
Let the first layer be :math:`z = W x + b` with :math:`W \in \mathbb{R}^{m \times d}`, and
:math:`G = \partial f / \partial z \in \mathbb{R}^{k \times m}`. Then

1. :math:`J = G W` and :math:`\nabla_W f_j = G_{j,:}^\top x^\top`, so
   :math:`\lVert \nabla_W f \rVert_F^2 = \sum_j \lVert G_{j,:}\rVert^2 \lVert x\rVert^2
   = \lVert G\rVert_F^2 \lVert x\rVert^2`.
2. :math:`\mathrm{MLS}(x) = \lVert G W\rVert_2 \le \lVert G W\rVert_F \le \lVert G\rVert_F \lVert W\rVert_2
   = \lVert W\rVert_2 \lVert \nabla_W f(x)\rVert_F / \lVert x\rVert` (per input).
3. Cauchy-Schwarz over inputs:
   :math:`\frac1n\sum_i a_i b_i \le (\frac1n\sum_i a_i^2)^{1/2} (\frac1n\sum_i b_i^2)^{1/2}`.
4. :math:`\frac1n \sum_i \lVert \nabla_W f(x_i)\rVert_F^2 \le \frac1n \sum_i \lVert \nabla_\theta f(x_i)\rVert_F^2
   = \operatorname{Tr} H` since :math:`W` is part of :math:`\theta`.

These give the MLS chain :math:`A \le B \le C \le D` (:func:`mls_bound_chain`). For the volume, with
:math:`r = \min(k, d)` singular values, AM-GM gives :math:`\mathrm{LVR}^2 = \prod_{j \le r} \lambda_j \le
(\lVert J\rVert_F^2 / r)^r`, then step 2 and AM-GM over inputs (:func:`lvr_bound`). For NMLS, step 2 holds for
every Linear layer :math:`l` with input :math:`h_{l-1}`, then Cauchy-Schwarz over layers and over inputs
(:func:`nmls_bound`). All of this is exact algebra: the bounds hold for every network, input set and
parameter value (not only at a minimum) when :math:`\operatorname{Tr} H` is the Gauss-Newton trace above.
An input or layer input that is exactly zero (e.g. all units of a ReLU layer dead) has an infinite
factor :math:`1/\lVert h\rVert` and makes the bound :math:`+\infty` (vacuous; :math:`0 \cdot \infty := \infty`).

Weight sharing (conv layers, token-wise Linear layers): step 1 fails, because
:math:`\nabla_W f = \sum_p G_{:,p}\, \mathrm{patch}_p(x)^\top` sums over positions and can vanish while
:math:`J \neq 0`. Counterexample: a 1x1 convolution with weight :math:`w = 1` on a 2-pixel input
:math:`x = (1, 1)` followed by a readout :math:`a = (1, -1)`: MLS :math:`= \sqrt2` but
:math:`\nabla_w f = a^\top x = 0`, so :math:`B = 0 < A`; the NMLS bound with the reference's conv
term (:math:`\lVert W\rVert_F^2` times the number of output positions) gives :math:`2 < 2\sqrt2`. Hence
:func:`mls_bound_chain` and :func:`lvr_bound` refuse a conv first layer, and :func:`nmls_bound` computes
the reference's conv term but flags the result ``rigorous=False``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._checks import check_choice, check_int, check_positive
from ._functional import (
    _called_layers,
    _check_model_input,
    _layer_jacobians,
    _model_fn as _functional,
    _spectrum,
)
from ._modes import eval_mode as _eval_mode
from .compression import local_metrics
from .losses import half_mse
from .sharpness import hessian_trace, per_example_grad_norms_sq

__all__ = ["MLSBoundChain", "LVRBound", "NMLSBound", "mls_bound_chain", "lvr_bound", "nmls_bound"]


# ------------------------------------------------------------------------------------------ results
@dataclass
class MLSBoundChain:
    r"""Terms of the MLS tightness chain :math:`A \le A_F \le B \le C \le D` (Chen et al. Fig. G.5).

    Scalars are floats; per-input terms are ``(N,)`` float64 tensors on the CPU.
    """

    A: float  #: mean_i MLS(x_i)
    A_fro: float  #: mean_i ||J(x_i)||_F (between A and B)
    B: float  #: ||W||_2 mean_i ||grad_W f(x_i)||_F / ||x_i||
    C: float  #: ||W||_2 sqrt(mean_i 1/||x_i||^2) sqrt(mean_i ||grad_W f(x_i)||_F^2)
    D: float  #: ||W||_2 sqrt(mean_i 1/||x_i||^2) sqrt(Tr H)
    w_spectral_norm: float  #: ||W||_2 of the first layer
    trace_hessian: float  #: Tr H (Gauss-Newton trace, eq. zloss_sharpness)
    partial_sharpness: float  #: mean_i ||grad_W f(x_i)||_F^2 (first-layer part of Tr H)
    mls: Tensor  #: (N,) MLS(x_i)
    jac_fro: Tensor  #: (N,) ||J(x_i)||_F
    grad_w_norm: Tensor  #: (N,) ||grad_W f(x_i)||_F (summed over the k outputs)
    x_norm: Tensor  #: (N,) ||x_i||
    per_input_bound: Tensor  #: (N,) ||W||_2 ||grad_W f(x_i)||_F / ||x_i||  (>= mls)

    def as_dict(self) -> dict[str, float]:
        """The scalar terms (for a results row)."""
        return {k: getattr(self, k) for k in ("A", "A_fro", "B", "C", "D", "w_spectral_norm",
                                              "trace_hessian", "partial_sharpness")}


@dataclass
class LVRBound:
    r"""Terms of the log-LVR bound, each a mean over inputs of a per-input log term or its bound.

    ``log_lhs <= log_amgm <= log_partial <= log_partial_mean <= log_rhs`` where ``log_lhs`` is
    :math:`\frac1n\sum_i \log \mathrm{LVR}(x_i) = \log (\prod_i \mathrm{LVR}(x_i))^{1/n}`.
    """

    log_lhs: float
    log_amgm: float  #: mean_i (r/2) log(||J_i||_F^2 / r)
    log_partial: float  #: mean_i (r/2) log(||W||_2^2 ||grad_W f(x_i)||_F^2 / (r ||x_i||^2))
    log_partial_mean: float  #: (r/2) log(||W||^2 mean_i ||grad_W f||^2 / r) - (r/n) sum_i log||x_i||
    log_rhs: float  #: (r/2) log(||W||_2^2 Tr H / r) - (r/n) sum_i log ||x_i||
    r: int  #: number of singular values in the volume, min(k, d)
    w_spectral_norm: float
    trace_hessian: float
    log_volume: Tensor  #: (N,) log LVR(x_i)
    log_amgm_per_input: Tensor  #: (N,)
    log_partial_per_input: Tensor  #: (N,)

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("log_lhs", "log_amgm", "log_partial", "log_partial_mean",
                                              "log_rhs", "r", "w_spectral_norm", "trace_hessian")}


@dataclass
class NMLSBound:
    r"""Terms of the NMLS bound ``lhs <= layerwise <= cs_layers <= cs_inputs <= rhs``.

    ``rigorous`` is False when a weight-shared layer (conv, or Linear on a >2-D input) used the
    reference's heuristic coefficient; then the inequalities may fail (module docstring).
    """

    lhs: float  #: mean_i NMLS(x_i)
    layerwise: float  #: mean_i sum_l c_l^{1/2} ||grad_{W_l} f(x_i)||_F / ||h_{l-1}(x_i)||
    cs_layers: float  #: mean_i (sum_l c_l/||h_{l-1}||^2)^{1/2} (sum_l ||grad_{W_l} f||_F^2)^{1/2}
    cs_inputs: float  #: (mean_i sum_l c_l/||h_{l-1}||^2)^{1/2} (mean_i sum_l ||grad_{W_l} f||_F^2)^{1/2}
    rhs: float  #: (mean_i sum_l c_l/||h_{l-1}||^2)^{1/2} (Tr H)^{1/2}
    trace_hessian: float
    rigorous: bool
    layers: list[str] = field(default_factory=list)  #: layer names, forward order
    coef: Tensor | None = None  #: (L,) c_l = ||W_l||_2^2 (Linear) or ||W_l||_F^2 * positions (shared)
    sigma: Tensor | None = None  #: (N, L) sigma_max(d f / d h_{l-1}(x_i))
    h_norm: Tensor | None = None  #: (N, L) ||h_{l-1}(x_i)||
    grad_w_norm: Tensor | None = None  #: (N, L) ||grad_{W_l} f(x_i)||_F

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("lhs", "layerwise", "cs_layers", "cs_inputs", "rhs",
                                              "trace_hessian", "rigorous")}


# ------------------------------------------------------------------------------------------ helpers
def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with ``x / 0 = +inf`` (also 0 / 0): a zero layer input makes a bound vacuous."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.full_like(num, math.inf))


def _prod(a: Tensor, b: Tensor) -> Tensor:
    """``a * b`` with ``inf * 0 = inf`` (an infinite bound factor keeps the bound infinite)."""
    return torch.where(torch.isinf(a) | torch.isinf(b), torch.full_like(a, math.inf), a * b)


def _scalar_prod(a: float, b: float) -> float:
    return math.inf if math.isinf(a) or math.isinf(b) else a * b


def _log_bound(r: int, v: float, mean_log_x: float) -> float:
    """(r/2) log v - r mean_i log ||x_i||, with log 0 = -inf and a zero input giving +inf."""
    if math.isinf(mean_log_x):
        return math.inf
    return -math.inf if v == 0 else 0.5 * r * math.log(v) - r * mean_log_x


def _param_name(layer: str, p: str) -> str:
    return f"{layer}.{p}" if layer else p


def _grad_sq(model: nn.Module, x: Tensor, names: list[str], chunk_size: int | None) -> Tensor:
    """``(N, len(names))`` per-example squared gradient norms :math:`\\lVert\\nabla_{\\theta_p} f(x_i)\\rVert_F^2`."""
    cols = [per_example_grad_norms_sq(model, x, params=[nm], chunk_size=chunk_size) for nm in names]
    return torch.stack([c.detach().to(torch.float64) for c in cols], dim=1)


def _trace_hessian(model: nn.Module, x: Tensor, trace_hessian, chunk_size: int | None, fn: str) -> float:
    """Chen's eq. (zloss_sharpness) at interpolation, via :func:`flatness.sharpness.hessian_trace`."""
    if trace_hessian is not None:
        return check_positive(fn, "trace_hessian", trace_hessian, allow_zero=True)
    with _eval_mode(model):
        with torch.no_grad():
            y = model(x).detach()
        return float(hessian_trace(model, half_mse, (x, y), method="exact", chunk_size=chunk_size).value)


def _first_linear(fn: str, model: nn.Module, x: Tensor) -> tuple[str, nn.Linear]:
    """The first Linear/Conv layer called; it must be an ``nn.Linear`` fed by ``x.flatten(1)`` itself."""
    with _eval_mode(model):
        layers, inputs, _ = _called_layers(fn, model, x[:1])
    name, layer = next(iter(layers.items()))
    if not isinstance(layer, nn.Linear):
        raise NotImplementedError(
            f"{fn}: the first layer {name!r} is {type(layer).__name__}; the bound needs a Linear first layer. "
            "With weight sharing (convolution) ||grad_W f|| is not ||df/dz|| ||x|| and the inequality fails "
            "(see flatness.bounds module docstring for a counterexample)")
    h = inputs[name]
    if h.shape != (1, x[0].numel()) or not torch.equal(h.reshape(-1), x[0].reshape(-1)):
        raise ValueError(f"{fn}: the first Linear layer {name!r} does not receive the raw input x.flatten(1) "
                         f"(got input of shape {tuple(h.shape)}); expected z = W x + b on the input itself")
    return name, layer


def _prepare(fn: str, model, x, chunk_size):
    if chunk_size is not None:
        chunk_size = check_int(fn, "chunk_size", chunk_size, minimum=1)
    x, _, _ = _check_model_input(fn, model, x)
    return x, chunk_size


def _first_layer_terms(fn: str, model: nn.Module, x: Tensor, chunk_size: int | None):
    """||W||_2, ||grad_W f(x_i)||_F (N,) and ||x_i|| (N,) for the first Linear layer."""
    name, layer = _first_linear(fn, model, x)
    w_norm = float(torch.linalg.matrix_norm(layer.weight.detach().to(torch.float64), ord=2))
    with _eval_mode(model):
        g2 = _grad_sq(model, x, [_param_name(name, "weight")], chunk_size)[:, 0]
    x_norm = x.reshape(len(x), -1).to(torch.float64).norm(dim=1).cpu()
    return w_norm, g2.sqrt().cpu(), x_norm


# -------------------------------------------------------------------------------------- the bounds
def mls_bound_chain(model: nn.Module, x: Tensor, trace_hessian: float | None = None,
                    chunk_size: int | None = None) -> MLSBoundChain:
    r"""The MLS tightness chain of Chen et al. 2023 (Proposition 3.4, eq. tightness, Fig. G.5).

    .. math::

        \underbrace{\tfrac1n \textstyle\sum_i \mathrm{MLS}(x_i)}_{A}
        \le \underbrace{\lVert W\rVert_2\, \tfrac1n \textstyle\sum_i
            \frac{\lVert \nabla_W f(x_i)\rVert_F}{\lVert x_i\rVert}}_{B}
        \le \underbrace{\lVert W\rVert_2 \big(\tfrac1n \textstyle\sum_i \lVert x_i\rVert^{-2}\big)^{1/2}
            \big(\tfrac1n \textstyle\sum_i \lVert \nabla_W f(x_i)\rVert_F^2\big)^{1/2}}_{C}
        \le \underbrace{\lVert W\rVert_2 \big(\tfrac1n \textstyle\sum_i \lVert x_i\rVert^{-2}\big)^{1/2}
            \sqrt{\operatorname{Tr} H}}_{D}

    with :math:`W` the first layer's weight (an ``nn.Linear`` applied to ``x.flatten(1)``) and
    :math:`\lVert \nabla_W f\rVert_F^2` summed over the k outputs. Also returned:
    :math:`A_F = \frac1n\sum_i \lVert J(x_i)\rVert_F` with :math:`A \le A_F \le B` (derivation in the module
    docstring, steps 2-4). Equalities: :math:`A = B` iff every :math:`G_i` is rank one and aligned with
    :math:`W`'s top left singular vector (e.g. a single Linear layer with one output); :math:`B = C` iff
    :math:`\lVert \nabla_W f(x_i)\rVert \propto 1/\lVert x_i\rVert`; :math:`C = D` iff only :math:`W` has
    a non-zero gradient (a single Linear layer without bias).

    Args:
        model: network whose first Linear/Conv layer called is an ``nn.Linear`` on ``x.flatten(1)``.
        x: inputs ``(N, ...)``.
        trace_hessian: precomputed :math:`\operatorname{Tr} H`; ``None`` computes it at interpolation
            (targets = the model's outputs).
        chunk_size: inputs per vectorised pass (``None``: automatic).

    Returns:
        :class:`MLSBoundChain`.

    Raises:
        NotImplementedError: the first layer is a convolution (the bound does not hold, module docstring).
        ValueError: the first Linear layer does not see the raw input.
    """
    fn = "mls_bound_chain"
    x, chunk_size = _prepare(fn, model, x, chunk_size)
    w_norm, g, x_norm = _first_layer_terms(fn, model, x, chunk_size)
    met = local_metrics(model, x, chunk_size=chunk_size)
    mls, fro = met["mls"].detach().cpu().double(), met["jac_fro"].detach().cpu().double()
    tr = _trace_hessian(model, x, trace_hessian, chunk_size, fn)
    inv_x = math.sqrt(float(_ratio(torch.ones_like(x_norm), x_norm**2).mean()))
    partial = float((g**2).mean())
    per_input = w_norm * _ratio(g, x_norm)
    return MLSBoundChain(
        A=float(mls.mean()), A_fro=float(fro.mean()), B=float(per_input.mean()),
        C=_scalar_prod(w_norm * inv_x, math.sqrt(partial)), D=_scalar_prod(w_norm * inv_x, math.sqrt(tr)),
        w_spectral_norm=w_norm, trace_hessian=tr, partial_sharpness=partial,
        mls=mls, jac_fro=fro, grad_w_norm=g, x_norm=x_norm, per_input_bound=per_input)


def lvr_bound(model: nn.Module, x: Tensor, trace_hessian: float | None = None,
              chunk_size: int | None = None) -> LVRBound:
    r"""The local-volume bound of Chen et al. 2023 (Proposition 3.6), in log form.

    .. math::

        \Big(\prod_{i=1}^n \mathrm{LVR}(x_i)\Big)^{1/n}
        \le \frac{\big(\lVert W\rVert_2^2 \operatorname{Tr} H / r\big)^{r/2}}{\big(\prod_i \lVert x_i\rVert\big)^{r/n}},
        \qquad r = \min(k, d) \;(= k \text{ in the paper, } k \le d)

    Chain (all as means over inputs of logs): AM-GM on the eigenvalues,
    :math:`\log \mathrm{LVR} \le \frac r2 \log(\lVert J\rVert_F^2/r)` (``log_amgm``); step 2 of the
    module docstring, :math:`\lVert J\rVert_F \le \lVert W\rVert_2 \lVert\nabla_W f\rVert_F/\lVert x\rVert`
    (``log_partial``); Jensen/AM-GM over inputs, :math:`\frac1n\sum_i \log \lVert\nabla_W f(x_i)\rVert^2 \le
    \log \frac1n \sum_i \lVert\nabla_W f(x_i)\rVert^2` (``log_partial_mean``); and
    :math:`\frac1n\sum_i\lVert\nabla_W f(x_i)\rVert^2 \le \operatorname{Tr} H` (``log_rhs``). The stated
    bound is correct. ``log_lhs`` is ``-inf`` when some Jacobian is rank deficient.

    Args, Raises: as :func:`mls_bound_chain`.

    Returns:
        :class:`LVRBound`.
    """
    fn = "lvr_bound"
    x, chunk_size = _prepare(fn, model, x, chunk_size)
    w_norm, g, x_norm = _first_layer_terms(fn, model, x, chunk_size)
    met = local_metrics(model, x, chunk_size=chunk_size)
    logvol = met["log_volume"].detach().cpu().double()
    fro = met["jac_fro"].detach().cpu().double()
    tr = _trace_hessian(model, x, trace_hessian, chunk_size, fn)
    with torch.no_grad(), _eval_mode(model):
        k = model(x[:1]).reshape(1, -1).shape[1]
    r = min(k, x[0].numel())
    amgm = 0.5 * r * torch.log(fro**2 / r)
    partial = 0.5 * r * torch.log(w_norm**2 * _ratio(g**2, r * x_norm**2))
    mean_log_x = float(torch.log(x_norm).mean())
    return LVRBound(
        log_lhs=float(logvol.mean()), log_amgm=float(amgm.mean()), log_partial=float(partial.mean()),
        log_partial_mean=_log_bound(r, w_norm**2 * float((g**2).mean()) / r, mean_log_x),
        log_rhs=_log_bound(r, w_norm**2 * tr / r, mean_log_x),
        r=r, w_spectral_norm=w_norm, trace_hessian=tr, log_volume=logvol,
        log_amgm_per_input=amgm, log_partial_per_input=partial)


def nmls_bound(model: nn.Module, x: Tensor, trace_hessian: float | None = None,
               chunk_size: int | None = None, conv: str = "reference") -> NMLSBound:
    r"""The network-MLS bound of Chen et al. 2023 (Proposition 3.8).

    .. math::

        \frac1n \sum_i \mathrm{NMLS}(x_i)
        \le \Big(\frac1n \sum_i \sum_l \frac{c_l}{\lVert h_{l-1}(x_i)\rVert^2}\Big)^{1/2} \sqrt{\operatorname{Tr} H},
        \qquad c_l = \lVert W_l \rVert_2^2

    over the Linear/Conv layers :math:`l` (inputs :math:`h_{l-1}`, NMLS as :func:`network_mls`). Chain:
    step 2 of the module docstring per layer (``layerwise``), Cauchy-Schwarz over layers
    (``cs_layers``) and over inputs (``cs_inputs``), then
    :math:`\sum_l \lVert\nabla_{W_l} f\rVert^2 \le \lVert\nabla_\theta f\rVert^2` (``rhs``). Rigorous for
    Linear layers applied to ``(N, features)`` inputs (any architecture, because NMLS differentiates through
    layer l only). For weight-shared layers (Conv, Linear on token sequences) ``conv="reference"`` uses
    the reference's :math:`c_l = \lVert W_l\rVert_F^2 \times` (number of output positions) and sets
    ``rigorous=False`` (not a valid bound: see the counterexample in the module docstring);
    ``conv="raise"`` raises instead.

    Args:
        model: network; every Linear/Conv layer called once per forward.
        x: inputs ``(N, ...)``.
        trace_hessian: precomputed :math:`\operatorname{Tr} H` (``None``: computed at interpolation).
        chunk_size: inputs per vectorised pass.
        conv: ``"reference"`` or ``"raise"`` for weight-shared layers.

    Returns:
        :class:`NMLSBound`.
    """
    fn = "nmls_bound"
    check_choice(fn, "conv", conv, ("reference", "raise"))
    x, chunk_size = _prepare(fn, model, x, chunk_size)
    sig_parts, h_parts = [], []
    names: list[str] = []
    mods: list[nn.Module] = []
    with _eval_mode(model):
        for layers, jac, inputs in _layer_jacobians(model, x, "logits", chunk_size, "loop", fn):
            names, mods = list(layers), list(layers.values())
            eps = torch.finfo(x.dtype).eps
            sig_parts.append(torch.stack([_spectrum(jac[f"in:{nm}"], eps)[0][:, 0].sqrt() for nm in names], 1))
            h_parts.append(torch.stack([inputs[nm].reshape(len(inputs[nm]), -1).to(torch.float64).norm(dim=1)
                                        for nm in names], 1))
        with torch.no_grad():
            shapes = {}
            hooks = [m.register_forward_hook(lambda _m, _a, o, nm=nm: shapes.__setitem__(nm, o.shape))
                     for nm, m in zip(names, mods)]
            try:
                _functional(model)(x[:1])
            finally:
                for h in hooks:
                    h.remove()
        name_of = {id(m): nm for nm, m in model.named_modules()}
        wnames = [_param_name(name_of[id(m)], "weight") for m in mods]
        g = _grad_sq(model, x, wnames, chunk_size).sqrt().cpu()  # (N, L)
    sigma = torch.cat(sig_parts).cpu()
    h_norm = torch.cat(h_parts).cpu()
    coef, rigorous = [], True
    for nm, m in zip(names, mods):
        w = m.weight.detach().to(torch.float64)
        shared = not (isinstance(m, nn.Linear) and len(shapes[nm]) == 2)
        if shared:
            if conv == "raise":
                raise ValueError(f"{fn}: layer {nm!r} ({type(m).__name__}) shares its weight across positions; "
                                 "the NMLS bound is only rigorous for Linear layers on (N, features) inputs; "
                                 "pass conv='reference' for the reference's heuristic term")
            rigorous = False
            positions = math.prod(shapes[nm][2:]) if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) \
                else math.prod(shapes[nm][1:-1])
            coef.append(float(w.pow(2).sum()) * positions)
        else:
            coef.append(float(torch.linalg.matrix_norm(w, ord=2)) ** 2)
    c = torch.tensor(coef, dtype=torch.float64)
    a2 = _ratio(c.expand_as(h_norm), h_norm**2)  # (N, L); +inf where a layer input is exactly 0
    tr = _trace_hessian(model, x, trace_hessian, chunk_size, fn)
    mean_a2 = float(a2.sum(1).mean())
    return NMLSBound(
        lhs=float(sigma.sum(1).mean()),
        layerwise=float(_prod(c.sqrt().expand_as(g), _ratio(g, h_norm)).sum(1).mean()),
        cs_layers=float(_prod(a2.sum(1).sqrt(), g.pow(2).sum(1).sqrt()).mean()),
        cs_inputs=_scalar_prod(math.sqrt(mean_a2), math.sqrt(float(g.pow(2).sum(1).mean()))),
        rhs=_scalar_prod(math.sqrt(mean_a2), math.sqrt(tr)), trace_hessian=tr, rigorous=rigorous,
        layers=names, coef=c, sigma=sigma, h_norm=h_norm, grad_w_norm=g)
