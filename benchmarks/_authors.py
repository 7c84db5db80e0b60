r"""The authors' models and measurement loops, re-implemented as the baseline of ``bench_reference.py``.

Chen, Recanatesi & Shea-Brown's public code (``github.com/chinsengi/sharpdim``, read at commit
``2bcbe24``, 2025-01-27) measures every quantity one input at a time, with one backward pass per output.
This module re-implements those algorithms from a reading of that code (no code copied), keeping their
structure and their costs, so that the benchmark times the algorithm the authors actually run:

* :func:`get_dim` (their ``src/utils.py:get_dim``): per input, ``k`` calls of ``torch.autograd.grad`` of
  one logit w.r.t. the input into a float64 numpy array ``(k, d)``, then ``np.linalg.svd``. MLS =
  :math:`\sigma_1`, local dim = :math:`(\sum\lambda)^2/\sum\lambda^2`, log volume =
  :math:`\tfrac12\sum_{j\le 3}\log\lambda_j` (their ``cal_logvol``: top 3), ``G`` = :math:`\lVert J\rVert_F^2`.
  Outputs are the logits (no sigmoid/softmax).
* :func:`get_grad_w` (their ``get_gradW``): per input and output, ``model.zero_grad()``, ``backward`` of the
  logit, all parameter gradients concatenated into one numpy vector; the sum of squares over outputs is
  :math:`\lVert\nabla_\theta f(x_i)\rVert_F^2` (their sharpness is the square root of its mean), the first
  Linear/Conv2d weight's part is :math:`\lVert\nabla_{W_1} f(x_i)\rVert_F^2`.
* :func:`get_nmls` (their ``get_nmls``): per input, forward hooks record the input of every Linear/Conv2d
  (in ``model.modules()`` order); per layer, ``k`` gradients of the logits w.r.t. that input,
  ``torch.linalg.svdvals``; NMLS = sum over layers of :math:`\sigma_1`. Their bound term ("harmonic") is
  :math:`\sum_l c_l / (\lVert h_{l-1}\rVert^2 + 10^{-4})` with :math:`c_l = \lVert W_l\rVert_2^2` for their
  ``FNN`` class and :math:`c_l = \lVert W_l\rVert_F^2 \times` (output positions :math:`H_{out} W_{out}`,
  1 for Linear) for every other model (VGG, LeNet-5), recomputed for every input as their loop does; the
  weight factor of Fig. G.5 is :math:`(\sum_l c_l)^{1/2}`.

Models: :class:`FNN` (``src/models/fnn.py:FNN``, the FashionMNIST branch without layer norm), :class:`VGG`
/ :func:`vgg11` (``src/models/vgg.py``: convs ``[16,M,16,M,32,M,64,M,64,M]``, 3x3, padding 2,
``ReLU(inplace=True)``, no batch norm, head 256-128-k, conv weights :math:`N(0, 2/(9 C_{out}))`, zero conv
biases, PyTorch-default Linear init) and :class:`LeNet5` (``src/models/fnn.py:LeNet5``, Xavier-normal
weights, zero biases). All their forwards flatten with ``x.view``.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FNN", "VGG", "vgg11", "LeNet5", "get_dim", "get_grad_w", "get_nmls", "quad_mean",
           "weight_factor", "g5_chain", "nmls_bound_terms", "mls_adv", "forward_flops"]


# ------------------------------------------------------------------------------------------- models
class FNN(nn.Module):
    """The authors' fully connected net for FashionMNIST: 784-500-500-500-k, PyTorch default init.

    Their module list interleaves ``nn.Identity`` (the slot of the optional LayerNorm) before each Linear;
    ``forward`` flattens with ``x.view(x.shape[0], -1)``. ``nonlinearity``: ``"tanh"`` (the default of their
    ``train.py``) or ``"relu"``.
    """

    def __init__(self, num_classes: int = 10, nonlinearity: str = "tanh",
                 layers: tuple[int, ...] = (500, 500, 500), in_features: int = 784):
        super().__init__()
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"FNN: nonlinearity={nonlinearity!r}; expected 'tanh' or 'relu'")
        act = nn.Tanh() if nonlinearity == "tanh" else nn.ReLU()
        widths = (in_features, *layers)
        mods: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            mods += [nn.Identity(), nn.Linear(a, b), act]
        mods += [nn.Identity(), nn.Linear(widths[-1], num_classes)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(x.shape[0], -1)
        return self.net(x)


class VGG(nn.Module):
    """The authors' small VGG (their ``vgg11``): conv features, ``x.view`` flatten, head Linear-ReLU-Linear."""

    def __init__(self, features: nn.Sequential, feature_size: int = 256, num_classes: int = 10):
        super().__init__()
        self.features = features
        self.classifier = nn.Sequential(nn.Linear(feature_size, 128), nn.ReLU(True), nn.Linear(128, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                with torch.no_grad():
                    m.weight.normal_(0.0, math.sqrt(2.0 / n))
                    m.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != 1 and x.shape[1] != 3:
            x = x.unsqueeze(1)
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


def vgg11(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """Configuration ``[16, M, 16, M, 32, M, 64, M, 64, M]``, 3x3 convs with padding 2 (97,018 parameters)."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in (16, "M", 16, "M", 32, "M", 64, "M", 64, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, int(v), kernel_size=3, padding=2), nn.ReLU(inplace=True)]
            c = int(v)
    return VGG(nn.Sequential(*layers), feature_size=256, num_classes=num_classes)


class LeNet5(nn.Module):
    """The authors' LeNet-5 for CIFAR-10 (3x32x32): Xavier-normal weights, zero biases, ``x.view(-1, 400)``."""

    def __init__(self, output_dim: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, output_dim)
        for m in (self.conv1, self.conv2, self.fc1, self.fc2, self.fc3):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


# --------------------------------------------------------------------------------------- baselines
def _one_blas_thread():
    """numpy BLAS on one thread for the small per-input SVDs (faster for them; avoids oversubscription)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _is_fnn(model: nn.Module) -> bool:
    """Their ``isinstance(model, FNN)`` switch between spectral and Frobenius weight norms."""
    return isinstance(model, FNN)


def get_dim(model: nn.Module, x: Tensor) -> dict[str, np.ndarray]:
    """Per-input MLS, log volume (top 3), local dimension and ||J||_F^2, one input and one output at a time.

    Args:
        model: the network (their models; eval mode is not changed: theirs have no dropout/BN).
        x: inputs ``(N, ...)``; row ``i`` is fed as ``x[i:i+1]``.

    Returns:
        ``{"mls", "log_volume", "local_dim", "jac_fro2"}``, each ``(N,)`` float64. Their ``A``, log volume,
        dim and ``G`` are the means of these.
    """
    n = len(x)
    out = {key: np.zeros(n) for key in ("mls", "log_volume", "local_dim", "jac_fro2")}
    with _one_blas_thread():
        for i in range(n):
            xi = x[i:i + 1].clone().requires_grad_(True)
            logits = model(xi).reshape(1, -1)
            grad_x = np.zeros((logits.shape[1], xi.numel()))
            g2 = 0.0
            for j in range(logits.shape[1]):
                (g,) = torch.autograd.grad(logits[0][j], xi, retain_graph=True)
                g = g.detach().cpu().numpy().reshape(-1)
                grad_x[j, :] = g
                g2 += float(np.sum(g**2))
            sv = np.linalg.svd(grad_x, compute_uv=False)
            eig = sv**2
            out["mls"][i] = np.max(sv)
            out["local_dim"][i] = np.sum(eig) ** 2 / np.sum(eig**2)
            out["log_volume"][i] = np.sum(np.log(eig[:3])) / 2
            out["jac_fro2"][i] = g2
    return out


def _first_weight(model: nn.Module) -> nn.Parameter | None:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            return m.weight
    return None


def get_grad_w(model: nn.Module, x: Tensor) -> dict[str, np.ndarray]:
    """Per-input ||grad_theta f||_F^2 and ||grad_{W_1} f||_F^2 (summed over outputs) and ||x||.

    One ``backward`` per input and output after ``model.zero_grad()``, every parameter gradient copied into
    one numpy vector, as their ``get_gradW``. Leaves ``.grad`` set (as theirs does).

    Returns:
        ``{"grad_theta2", "grad_w2", "x_norm"}``, each ``(N,)`` float64. Their sharpness is
        ``sqrt(mean(grad_theta2))``, their ``gradW`` ``sqrt(mean(grad_w2))`` and their ``B`` (before the
        weight factor) ``mean(sqrt(grad_w2) / x_norm)``.
    """
    n = len(x)
    out = {key: np.zeros(n) for key in ("grad_theta2", "grad_w2", "x_norm")}
    w1 = _first_weight(model)
    for i in range(n):
        xi = x[i:i + 1]
        logits = model(xi).reshape(1, -1)
        out["x_norm"][i] = torch.linalg.vector_norm(xi.flatten(), 2).item()
        for j in range(logits.shape[1]):
            model.zero_grad()
            logits[0][j].backward(retain_graph=True)
            flat = np.concatenate([p.grad.detach().cpu().numpy().reshape(-1) for p in model.parameters()])
            out["grad_theta2"][i] += float(np.sum(flat**2))
            if w1 is not None:
                out["grad_w2"][i] += float(np.sum(w1.grad.detach().cpu().numpy() ** 2))
    return out


def _layer_coef(weight: Tensor, positions: int, fnn: bool) -> Tensor:
    """Their per-layer weight term: ||W||_2^2 (FNN) or ||W||_F^2 x output positions (1 for Linear)."""
    if fnn:
        return torch.linalg.matrix_norm(weight, 2) ** 2
    if weight.ndim == 2:
        positions = 1
    return (torch.linalg.matrix_norm(weight, "fro") ** 2).sum() * positions


def get_nmls(model: nn.Module, x: Tensor, with_norms: bool = True, eps: float = 1e-4) -> dict[str, np.ndarray]:
    """Per-input NMLS and the NMLS-bound term, one input, one layer and one output at a time.

    Args:
        model: the network; hooks go on every ``nn.Linear``/``nn.Conv2d`` in ``model.modules()`` order.
        x: inputs ``(N, ...)``.
        with_norms: also compute their "harmonic" term (weight norms recomputed for every input, as in
            their loop); ``False`` times the NMLS part alone.
        eps: their ``1e-4`` added to every squared layer-input norm.

    Returns:
        ``{"nmls": (N,), "harmonic": (N,), "weight_factor": ()}``: NMLS, :math:`\\sum_l c_l/(\\lVert
        h_{l-1}\\rVert^2 + \\epsilon)` and :math:`(\\sum_l c_l)^{1/2}` (the last two only ``with_norms``).
    """
    n = len(x)
    fnn = _is_fnn(model)
    out = {"nmls": np.zeros(n), "harmonic": np.zeros(n), "weight_factor": np.array(np.nan)}
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for i in range(n):
        acts: list[Tensor] = []
        weights: list[Tensor] = []
        numel: list[int] = []

        def hook(module, inp, output):
            inp[0].retain_grad()
            acts.append(inp[0])
            weights.append(module.weight)
            numel.append(int(torch.tensor(output.shape[-2:]).prod().item()) if output.dim() >= 2
                         else output.numel())

        handles = [m.register_forward_hook(hook) for m in layers]
        xi = x[i:i + 1].clone().requires_grad_(True)
        try:
            logits = model(xi).reshape(1, -1)
        finally:
            for h in handles:
                h.remove()
        total = 0.0
        for a, w, p in zip(acts, weights, numel):
            jac = torch.zeros((logits.shape[1], a.nelement()), dtype=a.dtype)
            for j in range(logits.shape[1]):
                (g,) = torch.autograd.grad(logits[0][j], a, retain_graph=True)
                jac[j, :] = g.flatten()
            out["nmls"][i] += torch.linalg.svdvals(jac).max().item()
            if with_norms:
                c = _layer_coef(w.detach(), p, fnn)
                out["harmonic"][i] += float(c) / (torch.linalg.vector_norm(a.flatten(), 2).item() ** 2 + eps)
                if i == 0:
                    total += float(c)
        if with_norms and i == 0:
            out["weight_factor"] = np.array(math.sqrt(total))
    return out


def quad_mean(x: Tensor) -> float:
    """Their ``quad_mean``: :math:`(\\frac1n\\sum_i \\lVert x_i\\rVert^{-2})^{1/2}`."""
    q = sum(1.0 / torch.linalg.vector_norm(xi.flatten(), 2).item() ** 2 for xi in x)
    return math.sqrt(q / len(x))


def weight_factor(model: nn.Module, x1: Tensor, first: bool = False) -> float:
    """:math:`(\\sum_l c_l)^{1/2}` of :func:`get_nmls` (Fig. G.5's ``W``), or with ``first`` the first layer's
    :math:`c_1^{1/2}` (their ``W0``, the factor of Fig. 3's bound "D"), computed once from one forward."""
    fnn = _is_fnn(model)
    numel: dict[int, int] = {}
    layers = _one_forward_with_hook(
        model, x1, lambda mod, _i, o: numel.__setitem__(id(mod), int(torch.tensor(o.shape[-2:]).prod().item())))
    coefs = [float(_layer_coef(m.weight.detach(), numel[id(m)], fnn)) for m in layers if id(m) in numel]
    return math.sqrt(coefs[0] if first else sum(coefs))


def g5_chain(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Fig. G.5's A, B, C, D as their ``plot_bound_mls.py`` combines ``get_dim``, ``get_gradW``, ``quad_mean``
    and the weight factor of ``get_nmls`` (:math:`(\\sum_l \\lVert W_l\\rVert_2^2)^{1/2}` for the FNN), and
    Fig. 3's MLS bound "D" of ``plot_corr.py`` (``sharpness * W0 * quad``, first layer only)."""
    dim = get_dim(model, x)
    gw = get_grad_w(model, x)
    w, w0 = weight_factor(model, x), weight_factor(model, x, first=True)
    q = quad_mean(x)
    sharp = math.sqrt(float(gw["grad_theta2"].mean()))
    return {"A": float(dim["mls"].mean()),
            "B": float((np.sqrt(gw["grad_w2"]) / gw["x_norm"]).mean()) * w,
            "C": w * q * math.sqrt(float(gw["grad_w2"].mean())),
            "D": sharp * w * q, "D_fig3": sharp * w0 * q, "trace_hessian": sharp**2, "weight_factor": w}


def nmls_bound_terms(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Their NMLS plot (``plot_bound_nmls.py``): mean NMLS and ``sharpness * sqrt(harmonic mean)``."""
    nm = get_nmls(model, x, with_norms=True)
    gw = get_grad_w(model, x)
    tr = float(gw["grad_theta2"].mean())
    return {"lhs": float(nm["nmls"].mean()), "rhs": math.sqrt(tr) * math.sqrt(float(nm["harmonic"].mean())),
            "trace_hessian": tr}


def mls_adv(model: nn.Module, x: Tensor, delta0: Tensor, n_iters: int = 30, lr: float = 0.1) -> np.ndarray:
    """Their ViT adversarial MLS (``src/pert.py:eval_mls_adv`` at 2bcbe24), one input at a time.

    Per input: ``delta`` starts at ``delta0[i]`` (theirs: ``randn * rho``, rho = 0.1), Adam (lr 0.1) on
    :math:`-\lVert\sigma(f(x)) - \sigma(f(x+\delta))\rVert / \lVert\delta\rVert`, ``n_iters`` evaluations
    each followed by a step; the value is the ratio at the last evaluation (after ``n_iters - 1`` steps).
    They report its square; this returns the plain ratio ``(N,)``. Parameters are frozen during the loop,
    as their ``vit_exp`` sets ``requires_grad = False``.
    """
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    out = np.zeros(len(x))
    try:
        for i in range(len(x)):
            img = x[i:i + 1]
            orig = model(img)
            delta = delta0[i:i + 1].clone().requires_grad_(True)
            opt = torch.optim.Adam([delta], lr=lr)
            loss = None
            for _ in range(n_iters):
                pert = model(img + delta)
                loss = -torch.norm(torch.sigmoid(orig) - torch.sigmoid(pert)) / torch.norm(delta.flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
            out[i] = -loss.item()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return out


def forward_flops(model: nn.Module, x1: Tensor) -> float:
    """Multiply-add FLOPs (2 per MAC) of one forward of ``x1[:1]`` through the Linear/Conv2d layers."""
    total = [0.0]

    def hook(m, _i, o):
        if isinstance(m, nn.Conv2d):
            total[0] += 2.0 * o.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            total[0] += 2.0 * o.numel() * m.in_features

    _one_forward_with_hook(model, x1, hook)
    return total[0]


def _one_forward_with_hook(model: nn.Module, x1: Tensor, hook) -> list[nn.Module]:
    """Run ``x1[:1]`` through ``model`` once with ``hook`` on every Linear/Conv2d layer; return those layers."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            model(x1[:1])
    finally:
        for h in handles:
            h.remove()
    return layers
