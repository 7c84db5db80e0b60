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

Conventions (default first; "rigorous" = a proven inequality for every network and input set)
-----------------------------------------------------------------------------------------------
=====================================  ====================  =========  ==========================================
option                                 value                 rigorous   matches
=====================================  ====================  =========  ==========================================
``mls_bound_chain(weight_norm=)``      ``"first"``           yes        Proposition 3.4 (tight constant)
\                                      ``"all_layers"``      yes        Fig. G.5 (B, C, D times W_list), looser
``lvr_bound(top_k=)``                  ``None`` (r=min(k,d)) yes        Proposition 3.6
\                                      ``3``                 yes        the plotted top-3 log volume
``nmls_bound(variant=)``               ``"ours"``            MLPs only  Proposition 3.8 (conv term heuristic)
\                                      ``"authors"``         no         their NMLS-bound plot (get_nmls, eps 1e-4)
=====================================  ====================  =========  ==========================================

How the terms are computed (one pass)
-------------------------------------
Per chunk of inputs, one forward with zero probes at the inputs and outputs of every Linear/Conv layer
and k backward passes of the batch-summed outputs give :math:`\delta_{l,j} = \partial f_j/\partial z_l`
and :math:`\partial f_j/\partial h_{l-1}` for all layers at once. Every per-example gradient norm then
comes from activations only: :math:`\lVert\nabla_{W_l} f_j\rVert_F^2 = \lVert\delta_{l,j}\rVert^2
\lVert h_{l-1}\rVert^2` for Linear layers, and for weight-shared layers (conv patches :math:`h_p`) either the
direct product :math:`\sum_p \delta_p h_p^\top` or the ghost-norm identity
:math:`\lVert\sum_p \delta_p h_p^\top\rVert_F^2 = \sum_{p,q}(\delta_p\cdot\delta_q)(h_p\cdot h_q)`, whichever
costs less; biases likewise. :math:`\operatorname{Tr} H` is their sum over all parameters (other parameters,
e.g. normalisation layers, through :func:`flatness.hessian.per_example_grad_norms_sq`). The MLS of the
chain uses :math:`J J^\top = \delta_1 W_1 W_1^\top \delta_1^\top` (no backward pass through the first layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._checks import check_choice, check_int, check_positive
from ._functional import (
    _CONVS,
    _called_layers,
    _check_model_input,
    _enters_only_through,
    _param_name,
    _pass_terms,
)
from ._modes import eval_mode
from .hessian import per_example_grad_norms_sq

__all__ = ["MLSBoundChain", "LVRBound", "NMLSBound", "mls_bound_chain", "lvr_bound", "nmls_bound",
           "WEIGHT_NORMS", "NMLS_VARIANTS"]

#: ``weight_norm`` of :func:`mls_bound_chain`: the first layer's ``||W_1||_2`` (Proposition 3.4, tight) or
#: Fig. G.5's ``sqrt(sum_l c_l)`` over all layers (the authors' plotted factor).
WEIGHT_NORMS = ("first", "all_layers")
#: ``variant`` of :func:`nmls_bound`: our coefficients or the authors' (``get_nmls``).
NMLS_VARIANTS = ("ours", "authors")
#: The authors' ``eps`` added to every squared layer-input norm in their NMLS bound (``get_nmls``).
AUTHORS_NMLS_EPS = 1e-4


# ------------------------------------------------------------------------------------------ results
@dataclass
class MLSBoundChain:
    r"""Terms of the MLS tightness chain :math:`A \le A_F \le B \le C \le D` (Chen et al. Fig. G.5).

    ``B``, ``C``, ``D`` use the weight factor :math:`\omega` = ``weight_factor`` chosen by ``weight_norm``:
    :math:`\lVert W_1\rVert_2` (``"first"``) or :math:`(\sum_l c_l)^{1/2}` (``"all_layers"``, Fig. G.5).
    Scalars are floats; per-input terms are ``(N,)`` float64 tensors on the CPU.
    """

    A: float  #: mean_i MLS(x_i)
    A_fro: float  #: mean_i ||J(x_i)||_F (between A and B)
    B: float  #: omega mean_i ||grad_W f(x_i)||_F / ||x_i||
    C: float  #: omega sqrt(mean_i 1/||x_i||^2) sqrt(mean_i ||grad_W f(x_i)||_F^2)
    D: float  #: omega sqrt(mean_i 1/||x_i||^2) sqrt(Tr H)
    w_spectral_norm: float  #: ||W||_2 of the first layer
    trace_hessian: float  #: Tr H (Gauss-Newton trace, eq. zloss_sharpness)
    partial_sharpness: float  #: mean_i ||grad_W f(x_i)||_F^2 (first-layer part of Tr H)
    mls: Tensor  #: (N,) MLS(x_i)
    jac_fro: Tensor  #: (N,) ||J(x_i)||_F
    grad_w_norm: Tensor  #: (N,) ||grad_W f(x_i)||_F (summed over the k outputs)
    x_norm: Tensor  #: (N,) ||x_i||
    per_input_bound: Tensor  #: (N,) omega ||grad_W f(x_i)||_F / ||x_i||  (>= mls)
    weight_norm: str = "first"  #: "first" or "all_layers"
    weight_factor: float = math.nan  #: omega used in B, C, D

    def as_dict(self) -> dict[str, float | str]:
        """The scalar terms (for a results row)."""
        return {k: getattr(self, k) for k in ("A", "A_fro", "B", "C", "D", "w_spectral_norm", "trace_hessian",
                                              "partial_sharpness", "weight_norm", "weight_factor")}


@dataclass
class LVRBound:
    r"""Terms of the log-LVR bound, each a mean over inputs of a per-input log term or its bound.

    ``log_lhs <= log_amgm_top <= log_amgm <= log_partial <= log_partial_mean <= log_rhs`` where ``log_lhs``
    is :math:`\frac1n\sum_i \log \mathrm{LVR}_r(x_i)`, the log volume of the top ``r`` singular values.
    """

    log_lhs: float
    log_amgm: float  #: mean_i (r/2) log(||J_i||_F^2 / r)
    log_partial: float  #: mean_i (r/2) log(||W||_2^2 ||grad_W f(x_i)||_F^2 / (r ||x_i||^2))
    log_partial_mean: float  #: (r/2) log(||W||^2 mean_i ||grad_W f||^2 / r) - (r/n) sum_i log||x_i||
    log_rhs: float  #: (r/2) log(||W||_2^2 Tr H / r) - (r/n) sum_i log ||x_i||
    r: int  #: number of singular values in the volume: top_k, or min(k, d)
    w_spectral_norm: float
    trace_hessian: float
    log_volume: Tensor  #: (N,) log LVR_r(x_i) = 1/2 sum_{j<=r} log lambda_j
    log_amgm_per_input: Tensor  #: (N,)
    log_partial_per_input: Tensor  #: (N,)
    log_amgm_top: float = math.nan  #: mean_i (r/2) log(sum_{j<=r} lambda_j / r)
    top_k: int | None = None  #: the top_k argument (None: all min(k, d))

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("log_lhs", "log_amgm_top", "log_amgm", "log_partial",
                                              "log_partial_mean", "log_rhs", "r", "w_spectral_norm",
                                              "trace_hessian")}


@dataclass
class NMLSBound:
    r"""Terms of the NMLS bound ``lhs <= layerwise <= cs_layers <= cs_inputs <= rhs`` for the chosen ``variant``.

    ``rigorous`` is False when the chain is not a proven bound: a weight-shared layer (conv, or Linear on a
    >2-D input) got a heuristic coefficient, or ``variant="authors"`` (its ``eps``; module docstring). The
    right-hand sides of both variants are always reported (``ours_rhs``, ``authors_rhs``).
    """

    lhs: float  #: mean_i NMLS(x_i)
    layerwise: float  #: mean_i sum_l c_l^{1/2} ||grad_{W_l} f(x_i)||_F / ||h_{l-1}(x_i)||
    cs_layers: float  #: mean_i (sum_l c_l/||h_{l-1}||^2)^{1/2} (sum_l ||grad_{W_l} f||_F^2)^{1/2}
    cs_inputs: float  #: (mean_i sum_l c_l/||h_{l-1}||^2)^{1/2} (mean_i sum_l ||grad_{W_l} f||_F^2)^{1/2}
    rhs: float  #: (mean_i sum_l c_l/||h_{l-1}||^2)^{1/2} (Tr H)^{1/2}
    trace_hessian: float
    rigorous: bool
    layers: list[str] = field(default_factory=list)  #: layer names, forward order
    coef: Tensor | None = None  #: (L,) c_l of the chosen variant
    sigma: Tensor | None = None  #: (N, L) sigma_max(d f / d h_{l-1}(x_i))
    h_norm: Tensor | None = None  #: (N, L) ||h_{l-1}(x_i)||
    grad_w_norm: Tensor | None = None  #: (N, L) ||grad_{W_l} f(x_i)||_F
    variant: str = "ours"  #: "ours" or "authors"
    coef_ours: Tensor | None = None  #: (L,) ||W_l||_2^2 (Linear on (N, features)), ||W_l||_F^2 * positions (shared)
    coef_authors: Tensor | None = None  #: (L,) the authors' c_l (get_nmls): see nmls_bound
    ours_rhs: float = math.nan  #: rhs with coef_ours, eps = 0
    authors_rhs: float = math.nan  #: rhs with coef_authors and eps = 1e-4 (their plotted "Bound")

    def as_dict(self) -> dict[str, float | str | bool]:
        return {k: getattr(self, k) for k in ("lhs", "layerwise", "cs_layers", "cs_inputs", "rhs", "trace_hessian",
                                              "rigorous", "variant", "ours_rhs", "authors_rhs")}


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


def _spectral_sq(w: Tensor) -> float:
    """:math:`\\lVert W\\rVert_2^2`: the largest eigenvalue of the smaller float64 Gram matrix (2x faster than an SVD)."""
    w = w.detach().to(torch.float64).reshape(w.shape[0], -1)
    gram = w @ w.mT if w.shape[0] <= w.shape[1] else w.mT @ w
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0))


def _positions(mod: nn.Module, out_shape: tuple[int, ...]) -> int:
    """Positions sharing the weight: spatial output size (conv) or the non-feature output dims (Linear)."""
    return math.prod(out_shape[1:]) if isinstance(mod, (*_CONVS, nn.Conv3d)) else math.prod(out_shape[:-1])


def _coefficients(layers: dict[str, nn.Module], out_shapes: dict[str, tuple[int, ...]]):
    r"""``(coef_ours, shared, coef_authors)`` per layer (float64 ``(L,)``, list of bools, ``(L,)``).

    Ours: :math:`\lVert W\rVert_2^2` for a Linear layer on ``(N, features)`` inputs, else (weight shared over
    positions) :math:`\lVert W\rVert_F^2 \times` positions. Authors' (``get_nmls``): a network without
    convolutions gets :math:`\lVert W_l\rVert_2^2` for every layer (their ``FNN`` branch), any other
    :math:`\lVert W_l\rVert_F^2` for Linear layers and :math:`\lVert W_l\rVert_F^2 \times` (output spatial size)
    for convolutions.
    """
    ours, shared, authors = [], [], []
    has_conv = any(isinstance(m, (*_CONVS, nn.Conv3d)) for m in layers.values())
    for nm, m in layers.items():
        w = m.weight.detach().to(torch.float64)
        fro2 = float(w.pow(2).sum())
        is_shared = not (isinstance(m, nn.Linear) and len(out_shapes[nm]) == 1)
        spec = _spectral_sq(w) if not is_shared or not has_conv else math.nan  # computed once per layer
        shared.append(is_shared)
        ours.append(fro2 * _positions(m, out_shapes[nm]) if is_shared else spec)
        if not has_conv:
            authors.append(spec)
        else:
            authors.append(fro2 if isinstance(m, nn.Linear) else fro2 * _positions(m, out_shapes[nm]))
    return torch.tensor(ours, dtype=torch.float64), shared, torch.tensor(authors, dtype=torch.float64)


def _trace(fn: str, model: nn.Module, x: Tensor, grad_sq: dict[str, Tensor], trace_hessian,
           chunk_size: int | None) -> float:
    r"""Chen's eq. (zloss_sharpness) at interpolation: :math:`\frac1n\sum_i\lVert\nabla_\theta f(x_i)\rVert_F^2`.

    Over the parameters with ``requires_grad`` (as ``flatness.hessian.hessian_trace(..., method="exact")``
    on half-MSE at targets = outputs): the Linear/Conv terms come from the one pass (``grad_sq``), any other
    parameter from :func:`flatness.hessian.per_example_grad_norms_sq`.
    """
    if trace_hessian is not None:
        return check_positive(fn, "trace_hessian", trace_hessian, allow_zero=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    total = torch.zeros(len(x), dtype=torch.float64)
    for n in names:
        if n in grad_sq:
            total += grad_sq[n]
    rest = [n for n in names if n not in grad_sq]
    if rest:
        total += per_example_grad_norms_sq(model, x, params=rest, chunk_size=chunk_size).detach().cpu().double()
    return float(total.mean())


def _prepare(fn: str, model, x, chunk_size):
    if chunk_size is not None:
        chunk_size = check_int(fn, "chunk_size", chunk_size, minimum=1)
    x, _, _ = _check_model_input(fn, model, x)
    return x, chunk_size


def _first_linear(fn: str, model: nn.Module, x: Tensor):
    """Layers, output shapes and the first layer called; it must be an ``nn.Linear`` fed by ``x.flatten(1)``."""
    layers, inputs, out_shapes = _called_layers(fn, model, x[:1], x.shape)
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
    if not _enters_only_through(model, x[:1], name, layer):
        raise ValueError(f"{fn}: x reaches the output other than through the first layer {name!r} (a skip "
                         "connection from x?); the bound needs J = (df/dz_1) W_1")
    return layers, out_shapes, name, layer


def _first_layer_pass(fn: str, model: nn.Module, x: Tensor, trace_hessian, chunk_size: int | None):
    """One pass: J spectrum (via the first layer's output gradient), first-layer terms, Tr H, layer shapes."""
    with eval_mode(model):
        layers, out_shapes, name, layer = _first_linear(fn, model, x)
        grad_layers = list(layers) if trace_hessian is None else [name]
        terms = _pass_terms(fn, model, x, grad_layers=grad_layers, x_factored=name, chunk_size=chunk_size)
        tr = _trace(fn, model, x, terms.grad_sq, trace_hessian, chunk_size)
    g = terms.grad_sq[_param_name(name, "weight")].sqrt()
    x_norm = x.reshape(len(x), -1).to(torch.float64).norm(dim=1).cpu()
    return terms, layers, out_shapes, layer, g, x_norm, tr


# -------------------------------------------------------------------------------------- the bounds
def mls_bound_chain(model: nn.Module, x: Tensor, trace_hessian: float | None = None,
                    chunk_size: int | None = None, weight_norm: str = "first") -> MLSBoundChain:
    r"""The MLS tightness chain of Chen et al. 2023 (Proposition 3.4, eq. tightness, Fig. G.5).

    .. math::

        \underbrace{\tfrac1n \textstyle\sum_i \mathrm{MLS}(x_i)}_{A}
        \le \underbrace{\omega\, \tfrac1n \textstyle\sum_i
            \frac{\lVert \nabla_W f(x_i)\rVert_F}{\lVert x_i\rVert}}_{B}
        \le \underbrace{\omega \big(\tfrac1n \textstyle\sum_i \lVert x_i\rVert^{-2}\big)^{1/2}
            \big(\tfrac1n \textstyle\sum_i \lVert \nabla_W f(x_i)\rVert_F^2\big)^{1/2}}_{C}
        \le \underbrace{\omega \big(\tfrac1n \textstyle\sum_i \lVert x_i\rVert^{-2}\big)^{1/2}
            \sqrt{\operatorname{Tr} H}}_{D}

    with :math:`W` the first layer's weight (an ``nn.Linear`` applied to ``x.flatten(1)``, the only way
    ``x`` reaches the output) and :math:`\lVert \nabla_W f\rVert_F^2` summed over the k outputs. Weight factor
    :math:`\omega` (``weight_norm``):

    * ``"first"`` (default): :math:`\omega = \lVert W_1\rVert_2`, the tight constant of Proposition 3.4
      (module docstring, steps 2-4).
    * ``"all_layers"``: :math:`\omega = (\sum_l c_l)^{1/2}` over all Linear/Conv layers, the factor the
      authors plot in **Fig. G.5** (``plot_bound_mls.py`` multiplies B, C, D by ``W_list`` from ``get_nmls``):
      :math:`c_l = \lVert W_l\rVert_2^2` for a network without convolutions (their FNN), else the
      Frobenius terms of :func:`nmls_bound`'s ``variant="authors"``. Also a valid bound (since
      :math:`\omega \ge \lVert W_1\rVert_2`), looser by :math:`\omega / \lVert W_1\rVert_2`.

    Also returned: :math:`A_F = \frac1n\sum_i \lVert J(x_i)\rVert_F` with :math:`A \le A_F \le B`.
    Equalities (``"first"``): :math:`A = B` iff every :math:`G_i` is rank one and aligned with :math:`W`'s top
    left singular vector (e.g. a single Linear layer with one output); :math:`B = C` iff
    :math:`\lVert \nabla_W f(x_i)\rVert \propto 1/\lVert x_i\rVert`; :math:`C = D` iff only :math:`W` has a
    non-zero gradient (a single Linear layer without bias).

    Cost: one set of k backward passes per chunk of inputs (output probes at every layer): the MLS from
    :math:`J J^\top = G W W^\top G^\top` (:math:`G = \partial f/\partial z_1`), every layer's
    :math:`\lVert\nabla_{W_l} f\rVert_F^2` from activations (:math:`\lVert\delta\rVert^2\lVert h\rVert^2`, or
    the ghost-norm identity for weight-shared layers) and hence :math:`\operatorname{Tr} H`; no per-example
    parameter gradients.

    Args:
        model: network whose first Linear/Conv layer called is an ``nn.Linear`` on ``x.flatten(1)``.
        x: inputs ``(N, ...)``.
        trace_hessian: precomputed :math:`\operatorname{Tr} H`; ``None`` computes it at interpolation
            (targets = the model's outputs), over the parameters with ``requires_grad``.
        chunk_size: inputs per pass (``None``: automatic).
        weight_norm: ``"first"`` (rigorous, tight) or ``"all_layers"`` (Fig. G.5's plotted factor).

    Returns:
        :class:`MLSBoundChain` (``weight_norm`` and ``weight_factor`` recorded).

    Raises:
        NotImplementedError: the first layer is a convolution (the bound does not hold, module docstring).
        ValueError: the first Linear layer does not see the raw input, or ``x`` also bypasses it.
    """
    fn = "mls_bound_chain"
    check_choice(fn, "weight_norm", weight_norm, WEIGHT_NORMS)
    x, chunk_size = _prepare(fn, model, x, chunk_size)
    terms, layers, out_shapes, layer, g, x_norm, tr = _first_layer_pass(fn, model, x, trace_hessian, chunk_size)
    mls, fro = terms.lam["x"][:, 0].sqrt(), terms.fro2["x"].sqrt()
    if weight_norm == "first":
        w_norm = omega = math.sqrt(_spectral_sq(layer.weight))
    else:
        coef_ours, _, coef_authors = _coefficients(layers, out_shapes)
        w_norm, omega = math.sqrt(float(coef_ours[0])), math.sqrt(float(coef_authors.sum()))
    inv_x = math.sqrt(float(_ratio(torch.ones_like(x_norm), x_norm**2).mean()))
    partial = float((g**2).mean())
    per_input = omega * _ratio(g, x_norm)
    return MLSBoundChain(
        A=float(mls.mean()), A_fro=float(fro.mean()), B=float(per_input.mean()),
        C=_scalar_prod(omega * inv_x, math.sqrt(partial)), D=_scalar_prod(omega * inv_x, math.sqrt(tr)),
        w_spectral_norm=w_norm, trace_hessian=tr, partial_sharpness=partial,
        mls=mls, jac_fro=fro, grad_w_norm=g, x_norm=x_norm, per_input_bound=per_input,
        weight_norm=weight_norm, weight_factor=omega)


def lvr_bound(model: nn.Module, x: Tensor, trace_hessian: float | None = None,
              chunk_size: int | None = None, top_k: int | None = None) -> LVRBound:
    r"""The local-volume bound of Chen et al. 2023 (Proposition 3.6), in log form, for the top ``r`` values.

    With :math:`\mathrm{LVR}_r(x) = \prod_{j \le r} \sigma_j(J(x))` (all :math:`r = \min(k, d)` singular
    values by default, as in the paper; ``top_k=r`` for the authors' plotted top-3 volume):

    .. math::

        \Big(\prod_{i=1}^n \mathrm{LVR}_r(x_i)\Big)^{1/n}
        \le \frac{\big(\lVert W\rVert_2^2 \operatorname{Tr} H / r\big)^{r/2}}{\big(\prod_i \lVert x_i\rVert\big)^{r/n}}

    Chain (means over inputs of logs), with :math:`\lambda_j = \sigma_j^2`:

    1. AM-GM on the top r eigenvalues: :math:`\prod_{j \le r}\lambda_j \le (\frac1r\sum_{j\le r}\lambda_j)^r`
       (``log_amgm_top``);
    2. :math:`\sum_{j \le r}\lambda_j \le \sum_j \lambda_j = \lVert J\rVert_F^2`, so
       :math:`\log \mathrm{LVR}_r \le \frac r2 \log(\lVert J\rVert_F^2/r)` (``log_amgm``; equal to step 1 when
       :math:`r = \min(k, d)`);
    3. :math:`\lVert J\rVert_F \le \lVert W\rVert_2 \lVert\nabla_W f\rVert_F/\lVert x\rVert` (module docstring,
       step 2; ``log_partial``);
    4. Jensen over inputs, :math:`\frac1n\sum_i \log \lVert\nabla_W f(x_i)\rVert^2 \le
       \log \frac1n \sum_i \lVert\nabla_W f(x_i)\rVert^2` (``log_partial_mean``);
    5. :math:`\frac1n\sum_i\lVert\nabla_W f(x_i)\rVert^2 \le \operatorname{Tr} H` (``log_rhs``).

    So the bound holds for every :math:`1 \le r \le \min(k, d)`. ``log_lhs`` is ``-inf`` when one of the
    r eigenvalues is (numerically) zero. One backward pass set as in :func:`mls_bound_chain`.

    Args:
        model, x, trace_hessian, chunk_size: as :func:`mls_bound_chain`.
        top_k: ``r``, the number of largest singular values in the volume (``None``: :math:`\min(k, d)`;
            the authors' code: 3), at most :math:`\min(k, d)`.

    Returns:
        :class:`LVRBound`.

    Raises:
        As :func:`mls_bound_chain`; ValueError for ``top_k`` outside ``[1, min(k, d)]``.
    """
    fn = "lvr_bound"
    x, chunk_size = _prepare(fn, model, x, chunk_size)
    if top_k is not None:
        top_k = check_int(fn, "top_k", top_k, minimum=1)
    terms, _, _, layer, g, x_norm, tr = _first_layer_pass(fn, model, x, trace_hessian, chunk_size)
    lam, fro2 = terms.lam["x"], terms.fro2["x"]
    r_max = min(terms.k, x[0].numel())
    if top_k is not None:
        top_k = check_int(fn, "top_k", top_k, minimum=1, maximum=r_max)
    r = r_max if top_k is None else top_k
    w_norm = math.sqrt(_spectral_sq(layer.weight))
    top = lam[:, :r]
    logvol = 0.5 * torch.log(top).sum(1)
    amgm_top = 0.5 * r * torch.log(top.sum(1) / r)
    amgm = 0.5 * r * torch.log(fro2 / r)
    partial = 0.5 * r * torch.log(w_norm**2 * _ratio(g**2, r * x_norm**2))
    mean_log_x = float(torch.log(x_norm).mean())
    return LVRBound(
        log_lhs=float(logvol.mean()), log_amgm=float(amgm.mean()), log_partial=float(partial.mean()),
        log_partial_mean=_log_bound(r, w_norm**2 * float((g**2).mean()) / r, mean_log_x),
        log_rhs=_log_bound(r, w_norm**2 * tr / r, mean_log_x),
        r=r, w_spectral_norm=w_norm, trace_hessian=tr, log_volume=logvol,
        log_amgm_per_input=amgm, log_partial_per_input=partial, log_amgm_top=float(amgm_top.mean()), top_k=top_k)


def _nmls_chain(sigma: Tensor, g: Tensor, h_norm: Tensor, c: Tensor, tr: float, eps: float) -> dict[str, float]:
    """lhs, layerwise, cs_layers, cs_inputs, rhs for coefficients ``c`` and squared-norm offset ``eps``."""
    h2 = h_norm**2 + eps
    a2 = _ratio(c.expand_as(h2), h2)  # (N, L); +inf where a layer input is exactly 0 (eps = 0)
    mean_a2 = float(a2.sum(1).mean())
    return {
        "lhs": float(sigma.sum(1).mean()),
        "layerwise": float(_prod(c.sqrt().expand_as(g), _ratio(g, h2.sqrt())).sum(1).mean()),
        "cs_layers": float(_prod(a2.sum(1).sqrt(), g.pow(2).sum(1).sqrt()).mean()),
        "cs_inputs": _scalar_prod(math.sqrt(mean_a2), math.sqrt(float(g.pow(2).sum(1).mean()))),
        "rhs": _scalar_prod(math.sqrt(mean_a2), math.sqrt(tr)),
    }


def nmls_bound(model: nn.Module, x: Tensor, trace_hessian: float | None = None,
               chunk_size: int | None = None, conv: str = "reference", variant: str = "ours") -> NMLSBound:
    r"""The network-MLS bound of Chen et al. 2023 (Proposition 3.8).

    .. math::

        \frac1n \sum_i \mathrm{NMLS}(x_i)
        \le \Big(\frac1n \sum_i \sum_l \frac{c_l}{\lVert h_{l-1}(x_i)\rVert^2 + \epsilon}\Big)^{1/2}
        \sqrt{\operatorname{Tr} H}

    over the Linear/Conv layers :math:`l` (inputs :math:`h_{l-1}`, NMLS as :func:`network_mls`). Chain:
    step 2 of the module docstring per layer (``layerwise``), Cauchy-Schwarz over layers
    (``cs_layers``) and over inputs (``cs_inputs``), then
    :math:`\sum_l \lVert\nabla_{W_l} f\rVert^2 \le \lVert\nabla_\theta f\rVert^2` (``rhs``).

    Coefficients (``variant``; the other variant's ``rhs`` is reported too, ``ours_rhs``/``authors_rhs``):

    * ``"ours"`` (default; :math:`\epsilon = 0`): :math:`c_l = \lVert W_l\rVert_2^2` for Linear layers on
      ``(N, features)`` inputs: **rigorous** for any architecture (NMLS differentiates through layer l only).
      Weight-shared layers (Conv, Linear on token sequences): ``conv="reference"`` uses
      :math:`c_l = \lVert W_l\rVert_F^2 \times` (positions) and sets ``rigorous=False`` (not a valid bound:
      counterexample in the module docstring); ``conv="raise"`` raises instead.
    * ``"authors"``: ``chinsengi/sharpdim`` ``get_nmls`` (plotted by ``plot_bound_nmls.py``, their NMLS-bound
      figure): a network without convolutions (their ``FNN``) gets :math:`c_l = \lVert W_l\rVert_2^2`; any
      other network :math:`\lVert W_l\rVert_F^2` for **every** Linear layer and
      :math:`\lVert W_l\rVert_F^2 \times H_{out} W_{out}` for convolutions; and :math:`\epsilon = 10^{-4}`
      is added to every squared layer-input norm. ``rigorous=False`` (the :math:`\epsilon` makes even the
      FNN chain fail in principle; the conv terms are not a bound).

    Cost: one set of k backward passes per chunk with probes at every layer's input (the spectra) and
    output (the gradient norms from activations); :math:`\operatorname{Tr} H` from the same pass.

    Args:
        model: network; every Linear/Conv layer called once per forward.
        x: inputs ``(N, ...)``.
        trace_hessian: precomputed :math:`\operatorname{Tr} H` (``None``: computed at interpolation).
        chunk_size: inputs per pass.
        conv: ``"reference"`` or ``"raise"`` for weight-shared layers.
        variant: ``"ours"`` or ``"authors"``: the coefficients of the returned chain.

    Returns:
        :class:`NMLSBound`.
    """
    fn = "nmls_bound"
    check_choice(fn, "conv", conv, ("reference", "raise"))
    check_choice(fn, "variant", variant, NMLS_VARIANTS)
    x, chunk_size = _prepare(fn, model, x, chunk_size)
    with eval_mode(model):
        layers, _, out_shapes = _called_layers(fn, model, x[:1], x.shape)
        names = list(layers)
        coef_ours, shared, coef_authors = _coefficients(layers, out_shapes)
        if conv == "raise" and any(shared):
            nm = names[shared.index(True)]
            raise ValueError(f"{fn}: layer {nm!r} ({type(layers[nm]).__name__}) shares its weight across positions; "
                             "the NMLS bound is only rigorous for Linear layers on (N, features) inputs; "
                             "pass conv='reference' for the reference's heuristic term")
        terms = _pass_terms(fn, model, x, gram_layers=names, grad_layers=names, chunk_size=chunk_size)
        wnames = [_param_name(nm, "weight") for nm in names]
        missing = [w for w in wnames if w not in terms.grad_sq]
        for w in missing:  # layers _pass_terms does not factorise (e.g. Conv3d): per-example gradients
            terms.grad_sq[w] = per_example_grad_norms_sq(model, x, params=[w], chunk_size=chunk_size).detach().cpu().double()
        tr = _trace(fn, model, x, terms.grad_sq, trace_hessian, chunk_size)
    sigma = torch.stack([terms.lam[nm][:, 0].sqrt() for nm in names], 1)
    h_norm = torch.stack([terms.h_norm[nm] for nm in names], 1)
    g = torch.stack([terms.grad_sq[w].sqrt() for w in wnames], 1)
    ours = _nmls_chain(sigma, g, h_norm, coef_ours, tr, 0.0)
    authors = _nmls_chain(sigma, g, h_norm, coef_authors, tr, AUTHORS_NMLS_EPS)
    main = ours if variant == "ours" else authors
    return NMLSBound(
        **main, trace_hessian=tr, rigorous=variant == "ours" and not any(shared), layers=names,
        coef=coef_ours if variant == "ours" else coef_authors, sigma=sigma, h_norm=h_norm, grad_w_norm=g,
        variant=variant, coef_ours=coef_ours, coef_authors=coef_authors, ours_rhs=ours["rhs"],
        authors_rhs=authors["rhs"])
