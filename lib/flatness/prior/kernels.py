r"""NNGP kernels of the prior over functions: the analytic arc-cosine kernel and a Monte-Carlo kernel.

- :func:`arccos_kernel` / :class:`ArcCosineNNGPKernel`: the infinite-width (NNGP) covariance of the
  output of a ReLU fully-connected network (Cho & Saul 2009; Lee et al. 2018), used by Zhang et al. 2021
  (Appendix D, eq. 6) for every FCN.
- :func:`empirical_nngp_kernel`: the Monte-Carlo kernel of Zhang et al. 2021 (Appendix D, eq. 7), the
  penultimate features of freshly initialised networks followed by one fully-connected GP step, used
  for ResNet-50.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import gpytorch
import torch
from torch import Tensor, nn

from .._checks import check_finite, check_int, check_positive
from .._device import default_device, resolve_device

__all__ = ["arccos_kernel", "ArcCosineNNGPKernel", "empirical_nngp_kernel"]

_FN = "arccos_kernel"
# Elements per row block of the kernel: bounds the temporaries to a few hundred MiB whatever N is.
_BLOCK_ELEMENTS = 2**24


class _ArcCosJ(torch.autograd.Function):
    r""":math:`J(c) = \sqrt{1-c^2} + (\pi - \arccos c)\, c` with the finite derivative :math:`J'(c) = \pi - \arccos c`.

    Written out, ``sin t + (pi - t) cos t`` with ``t = acos(c)``; autograd through ``acos`` and ``sqrt``
    gives ``inf * 0 = NaN`` at ``c = ±1`` although :math:`J'` is finite there.
    """

    @staticmethod
    def forward(ctx, c: Tensor) -> Tensor:
        c = c.clamp(-1.0, 1.0)
        ctx.save_for_backward(c)
        return torch.sqrt((1.0 - c * c).clamp_min(0.0)) + (math.pi - torch.acos(c)) * c

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (c,) = ctx.saved_tensors
        return grad * (math.pi - torch.acos(c))


def _arccos_block(x1: Tensor, x2: Tensor, d1: Tensor, d2: Tensor, n_hidden: int, sw2: float, sb2: float,
                  d_in: int) -> Tensor:
    """Kernel block for rows ``x1`` (B, D) and columns ``x2`` (M, D); ``d1``/``d2`` are the input-layer
    variances of those rows/columns, (B,) and (M,)."""
    if torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad):
        k = sb2 + (sw2 / d_in) * (x1 @ x2.transpose(-1, -2))  # (..., B, M)
        for _ in range(n_hidden):
            norm = torch.sqrt(d1.unsqueeze(-1) * d2.unsqueeze(-2)).clamp_min(torch.finfo(d1.dtype).tiny)
            k = sb2 + (sw2 / (2 * math.pi)) * norm * _ArcCosJ.apply(k / norm)
            d1 = sb2 + 0.5 * sw2 * d1
            d2 = sb2 + 0.5 * sw2 * d2
        return k
    # The same recursion in place: four (B, M) buffers whatever n_hidden is.
    k = torch.matmul(x1, x2.transpose(-1, -2)).mul_(sw2 / d_in).add_(sb2)
    for _ in range(n_hidden):
        norm = (d1.unsqueeze(-1) * d2.unsqueeze(-2)).sqrt_().clamp_min_(torch.finfo(d1.dtype).tiny)  # 0 only for x = 0, sigma_b = 0
        c = k.div_(norm).clamp_(-1.0, 1.0)  # cos(theta), overwrites k
        t = torch.acos(c).neg_().add_(math.pi).mul_(c)  # (pi - theta) cos(theta)
        k = c.mul_(c).neg_().add_(1.0).clamp_min_(0.0).sqrt_().add_(t)  # sin(theta) + (pi - theta) cos(theta)
        k.mul_(norm).mul_(sw2 / (2 * math.pi)).add_(sb2)
        del norm, t
        d1 = sb2 + 0.5 * sw2 * d1
        d2 = sb2 + 0.5 * sw2 * d2
    return k


def _arccos_diag(x: Tensor, n_hidden: int, sw2: float, sb2: float, d_in: int) -> Tensor:
    """Diagonal :math:`K(x, x)` after ``n_hidden`` layers, (..., N)."""
    d = sb2 + (sw2 / d_in) * (x * x).sum(-1)
    for _ in range(n_hidden):
        d = sb2 + 0.5 * sw2 * d
    return d


def _arccos(x1: Tensor, x2: Tensor | None, n_hidden: int, sigma_w: float, sigma_b: float, diag: bool,
            fn: str) -> Tensor:
    """Shared implementation on (..., N, D) inputs already of the working dtype/device."""
    sw2, sb2 = sigma_w**2, sigma_b**2
    d_in = x1.shape[-1]
    if x2 is not None and x2.shape[-1] != d_in:
        raise ValueError(f"{fn}: x2 has {x2.shape[-1]} features per input but x1 has {d_in}; they must match")
    if diag:
        if x2 is not None and x2.shape[-2] != x1.shape[-2]:
            raise ValueError(f"{fn}: diag=True needs as many rows in x2 ({x2.shape[-2]}) as in x1 "
                             f"({x1.shape[-2]})")
        if x2 is None or x2 is x1 or torch.equal(x1, x2):
            return _arccos_diag(x1, n_hidden, sw2, sb2, d_in)
        d1 = sb2 + (sw2 / d_in) * (x1 * x1).sum(-1)
        d2 = sb2 + (sw2 / d_in) * (x2 * x2).sum(-1)
        k = sb2 + (sw2 / d_in) * (x1 * x2).sum(-1)
        for _ in range(n_hidden):
            norm = torch.sqrt(d1 * d2).clamp_min(torch.finfo(d1.dtype).tiny)
            k = sb2 + (sw2 / (2 * math.pi)) * norm * _ArcCosJ.apply(k / norm)
            d1, d2 = sb2 + 0.5 * sw2 * d1, sb2 + 0.5 * sw2 * d2
        return k
    symmetric = x2 is None
    x2 = x1 if x2 is None else x2
    d1 = sb2 + (sw2 / d_in) * (x1 * x1).sum(-1)
    d2 = d1 if symmetric else sb2 + (sw2 / d_in) * (x2 * x2).sum(-1)
    n1, n2 = x1.shape[-2], x2.shape[-2]
    batch = math.prod(x1.shape[:-2]) if x1.ndim > 2 else 1
    rows = max(1, _BLOCK_ELEMENTS // max(1, n2 * batch))
    if rows >= n1:
        k = _arccos_block(x1, x2, d1, d2, n_hidden, sw2, sb2, d_in)
    else:
        k = torch.cat([_arccos_block(x1[..., i:i + rows, :], x2, d1[..., i:i + rows], d2, n_hidden, sw2, sb2, d_in)
                       for i in range(0, n1, rows)], dim=-2)
    if symmetric and not k.requires_grad:
        # Exact symmetry (the two triangles come from different roundings of the same numbers) and the
        # exact diagonal (c = 1 up to rounding), so that Cholesky-based consumers see a symmetric matrix.
        k = torch.add(k, k.transpose(-1, -2)).mul_(0.5)
        k.diagonal(dim1=-2, dim2=-1).copy_(_arccos_diag(x1, n_hidden, sw2, sb2, d_in))
    return k


def arccos_kernel(x1: Tensor, x2: Tensor | None = None, n_hidden: int = 2, sigma_w: float = math.sqrt(2.0),
                  sigma_b: float = 1.0, *, diag: bool = False, dtype: torch.dtype = torch.float64,
                  device: str | torch.device | None = None) -> Tensor:
    r"""NNGP kernel of a ReLU fully-connected network with ``n_hidden`` hidden layers (arc-cosine kernel).

    The output pre-activation of :class:`flatness.models.FCN` with weights :math:`N(0, \sigma_w^2/d)`
    and biases :math:`N(0, \sigma_b^2)` converges, as the hidden widths grow, to a Gaussian process
    with covariance given by the recursion (Cho & Saul 2009; Lee et al. 2018; Zhang et al. 2021,
    Appendix D, eq. 6):

    .. math::

        K_0(x, x') &= \sigma_b^2 + \sigma_w^2 \frac{\langle x, x'\rangle}{d_{\rm in}}, \\
        K_{l+1}(x, x') &= \sigma_b^2 + \frac{\sigma_w^2}{2\pi} \sqrt{K_l(x,x) K_l(x',x')}
            \left(\sin\theta_l + (\pi - \theta_l)\cos\theta_l\right),
        \qquad \cos\theta_l = \frac{K_l(x, x')}{\sqrt{K_l(x,x) K_l(x',x')}}, \\
        K_{l+1}(x, x) &= \sigma_b^2 + \frac{\sigma_w^2}{2} K_l(x, x),

    returning :math:`K_{n_{\rm hidden}}`. ``n_hidden`` counts hidden ReLU layers: ``FCN((7, 40, 40, 1))``
    has 2. :math:`\cos\theta` is clamped to :math:`[-1, 1]` and the gradient at :math:`\cos\theta=\pm1`
    is the finite limit :math:`\pi - \theta` (no NaN from ``acos``).

    Args:
        x1: inputs (N, ...), flattened to (N, D).
        x2: second inputs (M, ...); ``None`` for ``x1`` itself (the result is then exactly symmetric).
        n_hidden: number of hidden ReLU layers (>= 0; 0 gives the linear kernel :math:`K_0`).
        sigma_w: weight scale :math:`\sigma_w` (> 0).
        sigma_b: bias scale :math:`\sigma_b` (>= 0).
        diag: return only :math:`K(x1_i, x2_i)`, shape (N,).
        dtype: working and output dtype (float64 by default).
        device: where to compute; ``None``: CUDA when present, else CPU.

    Returns:
        (N, M) kernel matrix (or (N,) with ``diag=True``), on ``device`` in ``dtype``.

    Example:
        >>> x = torch.eye(2)  # e1, e2: orthogonal unit inputs, d_in = 2
        >>> k = arccos_kernel(x, n_hidden=1, sigma_w=1.0, sigma_b=0.0, device="cpu")
        >>> round(float(k[0, 1]), 6) == round(0.5 / (2 * math.pi), 6)  # theta = pi/2: (1/2pi) * (1/2) * 1
        True
    """
    n_hidden = check_int(_FN, "n_hidden", n_hidden, minimum=0)
    sigma_w = check_positive(_FN, "sigma_w", sigma_w)
    sigma_b = check_positive(_FN, "sigma_b", sigma_b, allow_zero=True)
    dev = resolve_device(device)
    x1 = _flatten(x1, "x1", dtype, dev)
    x2 = None if x2 is None else _flatten(x2, "x2", dtype, dev)
    return _arccos(x1, x2, n_hidden, sigma_w, sigma_b, diag, _FN)


def _flatten(x: Tensor, name: str, dtype: torch.dtype, device: torch.device, fn: str = _FN) -> Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of shape (N, ...), got {type(x).__name__}")
    if x.ndim < 1 or len(x) == 0:
        raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}; expected (N, ...) with N >= 1")
    check_finite(fn, name, x)
    x = x.reshape(len(x), -1) if x.ndim != 1 else x.reshape(-1, 1)
    return x.to(device=device, dtype=dtype)


class ArcCosineNNGPKernel(gpytorch.kernels.Kernel):
    r"""GPyTorch kernel: the NNGP (arc-cosine) kernel of a ReLU FCN with ``n_hidden`` hidden layers.

    .. math::

        K_0 = \sigma_b^2 + \sigma_w^2 \langle x, x'\rangle / d_{\rm in}, \quad
        K_{l+1} = \sigma_b^2 + \tfrac{\sigma_w^2}{2\pi}\sqrt{K_l(x,x)K_l(x',x')}
        \left(\sin\theta_l + (\pi-\theta_l)\cos\theta_l\right),\quad
        \cos\theta_l = \tfrac{K_l(x,x')}{\sqrt{K_l(x,x)K_l(x',x')}}

    (Zhang et al. 2021, Appendix D, eq. 6; see :func:`arccos_kernel`). ``sigma_w`` and ``sigma_b`` are
    fixed (not trained) hyperparameters. ``forward`` takes (..., N, D) and (..., M, D) inputs on any
    device and computes in ``dtype`` (float64 by default), returning (..., N, M) or (..., N) with ``diag``.

    Args:
        n_hidden: number of hidden ReLU layers (``FCN((7, 40, 40, 1))`` has 2).
        sigma_w: weight scale (> 0).
        sigma_b: bias scale (>= 0).
        dtype: working dtype of ``forward`` (stored as ``compute_dtype``).
    """

    has_lengthscale = False

    def __init__(self, n_hidden: int = 2, sigma_w: float = math.sqrt(2.0), sigma_b: float = 1.0,
                 dtype: torch.dtype = torch.float64, **kwargs):
        super().__init__(**kwargs)
        fn = "ArcCosineNNGPKernel"
        self.n_hidden = check_int(fn, "n_hidden", n_hidden, minimum=0)
        self.sigma_w = check_positive(fn, "sigma_w", sigma_w)
        self.sigma_b = check_positive(fn, "sigma_b", sigma_b, allow_zero=True)
        self.compute_dtype = dtype

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False,
                **params) -> Tensor:
        if last_dim_is_batch:
            x1 = x1.transpose(-1, -2).unsqueeze(-1)
            x2 = x2.transpose(-1, -2).unsqueeze(-1)
        x1 = x1.to(self.compute_dtype)
        x2 = x2.to(device=x1.device, dtype=self.compute_dtype)
        same = x1.shape == x2.shape and x1.data_ptr() == x2.data_ptr()
        return _arccos(x1, None if (same and not diag) else x2, self.n_hidden, self.sigma_w, self.sigma_b, diag,
                       "ArcCosineNNGPKernel")

    @classmethod
    def from_fcn(cls, model: nn.Module) -> ArcCosineNNGPKernel:
        """The kernel of a :class:`flatness.models.FCN` (reads ``widths``, ``sigma_w``, ``sigma_b``)."""
        widths = getattr(model, "widths", None)
        if widths is None or not hasattr(model, "sigma_w") or not hasattr(model, "sigma_b"):
            raise TypeError(f"ArcCosineNNGPKernel.from_fcn: model={type(model).__name__} lacks the widths/sigma_w/"
                            "sigma_b attributes of flatness.models.FCN")
        return cls(n_hidden=len(widths) - 2, sigma_w=model.sigma_w, sigma_b=model.sigma_b)

    def extra_repr(self) -> str:
        return f"n_hidden={self.n_hidden}, sigma_w={self.sigma_w:.4g}, sigma_b={self.sigma_b:.4g}"


def _last_linear_name(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("empirical_nngp_kernel: the model built by model_factory has no nn.Linear; pass "
                         "feature_module= the name of the module whose input is the penultimate feature")
    return names[-1]


def empirical_nngp_kernel(model_factory: Callable[[int], nn.Module], x: Tensor, n_samples: int | None = None,
                          sigma_w: float = math.sqrt(2.0), sigma_b: float = 1.0, batch_size: int = 256,
                          device: str | torch.device | None = None, *, feature_module: str | None = None,
                          progress: bool = True, seed_offset: int = 0) -> Tensor:
    r"""Monte-Carlo NNGP kernel from the penultimate features of freshly initialised networks.

    Zhang et al. 2021, Appendix D, eq. 7 (Novak et al. 2019's empirical kernel plus one fully-connected
    GP step, Lee et al. 2018):

    .. math:: K(x, x') = \frac{1}{M} \sum_{m=1}^{M} \frac{\sigma_w^2}{n} \,
              \phi_m(x) \cdot \phi_m(x') + \sigma_b^2

    with :math:`\phi_m` the (n,)-dimensional penultimate features of the m-th network
    ``model_factory(m + seed_offset)``. **Penultimate features** are the input of the model's last
    ``nn.Linear`` (in ``named_modules()`` order; ``resnet50_cifar``: the 2048-d pooled features fed to
    ``fc``; ``FCN``: the last hidden ReLU output), read by a forward pre-hook, or the input of the module
    named ``feature_module``. Each network runs in eval mode under ``torch.no_grad``; its own last layer
    is ignored (the GP step above replaces it). The paper uses :math:`M = 0.1\,|S \cup T|` (the default).

    Memory stays bounded: one network at a time, inputs in batches of ``batch_size``, one (N, n)
    feature matrix per network and the (N, N) float64 accumulator on ``device``.

    Args:
        model_factory: ``model_factory(i) -> nn.Module``, a freshly initialised network for index/seed ``i``.
        x: inputs (N, ...) accepted by the model (kept where they are; moved to ``device`` per batch).
        n_samples: number of networks M; ``None``: ``max(1, round(0.1 * N))``.
        sigma_w: weight scale of the final fully-connected step.
        sigma_b: bias scale of the final fully-connected step.
        batch_size: inputs per forward pass.
        device: where networks run and K is accumulated; ``None``: CUDA when present, else CPU.
        feature_module: name (as in ``named_modules()``) of the module whose input is :math:`\phi`.
        progress: show a tqdm progress bar over networks.
        seed_offset: network ``m`` is ``model_factory(m + seed_offset)``.

    Returns:
        (N, N) float64 kernel on ``device``.
    """
    fn = "empirical_nngp_kernel"
    if not callable(model_factory):
        raise TypeError(f"{fn}: model_factory must be callable as model_factory(i) -> nn.Module")
    if not torch.is_tensor(x) or x.ndim < 1 or len(x) == 0:
        raise ValueError(f"{fn}: x must be a non-empty tensor of shape (N, ...)")
    check_finite(fn, "x", x)
    n = len(x)
    if n_samples is None:
        n_samples = max(1, round(0.1 * n))
    n_samples = check_int(fn, "n_samples", n_samples, minimum=1)
    batch_size = check_int(fn, "batch_size", batch_size, minimum=1)
    sigma_w = check_positive(fn, "sigma_w", sigma_w)
    sigma_b = check_positive(fn, "sigma_b", sigma_b, allow_zero=True)
    dev = resolve_device(device) if device is not None else default_device()

    from tqdm.auto import tqdm

    k = torch.zeros(n, n, dtype=torch.float64, device=dev)
    width = None
    for m in tqdm(range(n_samples), desc="empirical NNGP kernel", disable=not progress, mininterval=2.0):
        model = model_factory(m + seed_offset)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: model_factory({m + seed_offset}) returned {type(model).__name__}, not nn.Module")
        model = model.to(dev).eval()
        name = feature_module if feature_module is not None else _last_linear_name(model)
        modules = dict(model.named_modules())
        if name not in modules:
            raise ValueError(f"{fn}: feature_module={name!r} is not a module of the network; "
                             f"expected one of {[k for k in modules if k][:20]}")
        captured: list[Tensor] = []

        def hook(_module, inputs):
            captured.append(inputs[0].reshape(len(inputs[0]), -1))

        handle = modules[name].register_forward_pre_hook(hook)
        try:
            feats = []
            with torch.no_grad():
                for i in range(0, n, batch_size):
                    captured.clear()
                    model(x[i:i + batch_size].to(dev))
                    if not captured:
                        raise RuntimeError(f"{fn}: module {name!r} was not called in the forward pass")
                    feats.append(captured[0].to(torch.float64))
        finally:
            handle.remove()
        phi = torch.cat(feats)  # (N, n_features)
        if width is None:
            width = phi.shape[1]
        k.addmm_(phi, phi.T)
        del model, phi, feats
    k.mul_(sigma_w**2 / (width * n_samples)).add_(sigma_b**2)
    return k
