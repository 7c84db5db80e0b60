r"""One call from a network (or kernel) and a labelled input set to :math:`\ln P(f)`.

Zhang et al. 2021, Appendix D: the prior of the function :math:`f` that a network expresses on
:math:`S \cup T`, under the NNGP of its architecture, approximated by EP (:func:`flatness.prior.ep.log_prior_ep`).
"""

from __future__ import annotations

import gpytorch
import torch
from torch import Tensor, nn

from .._device import resolve_device
from .._modes import eval_mode
from .ep import EPResult, log_prior_ep, to_log10
from .kernels import ArcCosineNNGPKernel, arccos_kernel

__all__ = ["log_prior", "to_log10"]

_FN = "log_prior"


def _fcn_kernel_args(model: nn.Module) -> tuple[int, float, float, int]:
    widths = tuple(model.widths)
    if widths[-1] != 1:
        raise ValueError(f"{_FN}: the FCN has {widths[-1]} outputs (widths={widths}); the prior of a binary function "
                         "needs a single output")
    return len(widths) - 2, float(model.sigma_w), float(model.sigma_b), widths[0]


def _predicted_labels(model: nn.Module, x: Tensor) -> Tensor:
    """Labels 1{f(x) > 0} of a single-output network, in eval mode, every module's mode restored."""
    device = resolve_device(None, model)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    with eval_mode(model), torch.no_grad():
        out = model(x.to(device=device, dtype=dtype))
    return (out.reshape(len(x), -1)[:, 0] > 0).long()


def log_prior(model_or_kernel_spec, x: Tensor | None = None, y=None, *, likelihood: str = "heaviside",
              device: str | torch.device | None = None, **ep_kwargs) -> EPResult:
    r""":math:`\ln P(f)` of the binary function with labels ``y`` on inputs ``x`` under an NNGP prior.

    .. math:: P(f) = \Pr_{g \sim N(0, K)}\big[\mathrm{sign}(g_i) = y_i \ \forall i\big]
              \quad (\text{Zhang et al. 2021, Appendix D, eq. 6; EP as in } \texttt{log\_prior\_ep})

    Args:
        model_or_kernel_spec: one of

            - a :class:`flatness.models.FCN` (anything with ``widths``, ``sigma_w``, ``sigma_b``): its
              arc-cosine kernel with ``n_hidden = len(widths) - 2`` (:func:`arccos_kernel`);
            - an :class:`ArcCosineNNGPKernel` or any ``gpytorch.kernels.Kernel``, evaluated on ``x``;
            - a precomputed kernel matrix ``K`` (N, N) (``x`` is then ignored and may be ``None``).
        x: inputs (N, ...) of :math:`S \cup T` (not needed for a precomputed K).
        y: the function's labels (N,), 0/1 or -1/+1. ``None`` with an FCN: its own predictions
            :math:`1\{f(x) > 0\}` (the function the trained network expresses).
        likelihood: ``"heaviside"`` (the paper's definition) or ``"probit"`` (GPy's default, the authors' code).
        device: where the kernel is built and EP runs; ``None``: CUDA when present, else CPU (a
            precomputed K stays where it is).
        **ep_kwargs: passed to :func:`log_prior_ep` (``max_iter``, ``tol``, ``damping``, ``schedule``, ...).

    Returns:
        The :class:`EPResult`; ``result.log_prob`` is :math:`\ln P(f)` (``float(result)`` too) and
        ``result.log10_prob`` (or :func:`to_log10`) the :math:`\log_{10}` of the paper's plots.

    Raises:
        TypeError: an unsupported ``model_or_kernel_spec``.
        ValueError: missing ``x``/``y``, an FCN with more than one output or input size mismatch, and
            everything :func:`log_prior_ep` rejects.

    Example:
        >>> from flatness.models import FCN
        >>> x = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> res = log_prior(FCN((2, 8, 1)), x, torch.tensor([1, 1]), device="cpu")
        >>> -1.3863 < res.log_prob < 0  # positively correlated outputs: P(same sign) > 1/4 = exp(-1.3863)
        True
    """
    spec = model_or_kernel_spec
    if torch.is_tensor(spec):
        K = spec
        if y is None:
            raise ValueError(f"{_FN}: y=None; with a precomputed K the labels are required")
        return log_prior_ep(K, y, likelihood=likelihood, **ep_kwargs)
    if x is None:
        raise ValueError(f"{_FN}: x=None; inputs are needed to build the kernel of {type(spec).__name__}")
    dev = resolve_device(device)
    if isinstance(spec, nn.Module) and all(hasattr(spec, a) for a in ("widths", "sigma_w", "sigma_b")) \
            and not isinstance(spec, gpytorch.kernels.Kernel):
        n_hidden, sigma_w, sigma_b, d_in = _fcn_kernel_args(spec)
        d = x[0].numel() if x.ndim > 1 else 1
        if d != d_in:
            raise ValueError(f"{_FN}: x has {d} features per input but the FCN expects widths[0]={d_in}")
        if y is None:
            y = _predicted_labels(spec, x)
        K = arccos_kernel(x, n_hidden=n_hidden, sigma_w=sigma_w, sigma_b=sigma_b, device=dev)
    elif isinstance(spec, ArcCosineNNGPKernel):
        if y is None:
            raise ValueError(f"{_FN}: y=None; with a kernel the function's labels are required")
        K = arccos_kernel(x, n_hidden=spec.n_hidden, sigma_w=spec.sigma_w, sigma_b=spec.sigma_b,
                          dtype=spec.compute_dtype, device=dev)
    elif isinstance(spec, gpytorch.kernels.Kernel):
        if y is None:
            raise ValueError(f"{_FN}: y=None; with a kernel the function's labels are required")
        with torch.no_grad():
            K = spec.to(dev)(x.reshape(len(x), -1).to(device=dev, dtype=torch.float64)).to_dense()
    else:
        raise TypeError(f"{_FN}: model_or_kernel_spec={type(spec).__name__} is not supported; expected a "
                        "flatness.models.FCN, an ArcCosineNNGPKernel (or other gpytorch Kernel) or a (N, N) "
                        "kernel tensor (empirical_nngp_kernel for other networks)")
    return log_prior_ep(K, y, likelihood=likelihood, **ep_kwargs)
