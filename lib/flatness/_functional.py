r"""Private plumbing shared by the curvature, sharpness and compression modules.

Nothing here is public. Each public module (:mod:`flatness.hessian`, :mod:`flatness.sharpness`,
:mod:`flatness.compression`, ...) imports what it needs from this one file, never private helpers from
another public module.

Sections:

- functional calls, chunking, batch-size / loss / model checks (the model as a pure function of a
  parameter dictionary, :func:`torch.func.functional_call`).
- compression metrics and bounds: model calls, shape errors, layer probes, input-Jacobian passes and the
  one-pass bound terms (:mod:`flatness.compression`, :mod:`flatness.bounds`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._checks import check_finite_params, check_int, check_labels
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
        check_finite_params(fn, model)
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
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"{fn}: params[{n!r}] holds {int((~torch.isfinite(v)).sum())} non-finite "
                                 f"value(s) (NaN or inf)")
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


    def n_outputs(self, x: Tensor) -> int:
        """Size of the last output dimension on one example (1 for scalar outputs)."""
        with torch.no_grad():
            out = self(self.params, x[:1])
        return int(out.shape[-1]) if out.ndim >= 2 else 1

    def check_labels(self, fn: str, loss_fn, x: Tensor, y: Tensor) -> None:
        """:func:`flatness._checks.check_labels` with the model's number of outputs."""
        check_labels(fn, loss_fn, y, self.n_outputs(x))


def _check_inputs(fn: str, model, loss_fn, data) -> tuple[Tensor, Tensor]:
    """Model, loss and data checks of a public entry point, under its own name, before any work.

    A module with finite parameters, a callable loss, ``(x, y)`` data and labels valid for the loss
    (:func:`flatness._checks.check_labels`, with the number of outputs read off a one-example forward pass).
    """
    from ._checks import check_data

    _check_model(fn, model)
    check_finite_params(fn, model)
    if loss_fn is not None:
        _check_loss(fn, loss_fn)
    x, y = check_data(fn, data)
    if loss_fn is not None:
        p = next(iter(model.parameters()), None)
        x1 = x[:1]
        if p is not None:
            x1 = x1.to(p.device, p.dtype) if x1.is_floating_point() else x1.to(p.device)
        with torch.no_grad(), eval_mode(model, True):
            out = model(x1)
        check_labels(fn, loss_fn, y, int(out.shape[-1]) if out.ndim >= 2 else 1)
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


# --------------------------------------------------------------------------------------------------
# compression metrics and bounds: model calls, probes, Jacobian passes (flatness.compression, flatness.bounds)
# --------------------------------------------------------------------------------------------------
# The model is called with detached parameters (no parameter graph); Jacobians of a chunk of inputs come
# from k backward passes of the batch-summed outputs with zero "probe" tensors added at the inputs and/or
# outputs of the Linear/Conv layers. The memory format of every tensor is the model's own (no
# channels-last copies: a forward calling ``x.view`` must keep working).

import math  # noqa: E402
import re  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch.func import jacrev, jvp, vmap  # noqa: E402

from ._checks import check_finite, check_finite_params  # noqa: E402
from .models import parametrized_layers  # noqa: E402

#: Allowed values of ``output`` in flatness.compression: raw outputs, or their sigmoid / softmax (last dim).
OUTPUTS = ("logits", "sigmoid", "softmax")
# Elements (not bytes) a chunk may hold in Jacobians plus vectorised activations when chunk_size=None.
_CHUNK_BUDGET = 2**26
# RuntimeError messages of a forward that got an input of the wrong shape.
_SHAPE_ERROR = re.compile(r"shape|size|mat1|channels|dimension|expected input", re.IGNORECASE)


def _check_model_input(fn: str, model, x) -> tuple[Tensor, torch.device, torch.dtype]:
    """Validate ``model`` (finite parameters) and ``x`` ``(N, ...)``; ``x`` on the model's device and dtype."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    check_finite_params(fn, model)
    if not torch.is_tensor(x):
        raise TypeError(f"{fn}: x must be a torch.Tensor of shape (N, ...), got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{fn}: x has shape {tuple(x.shape)}; expected (N, ...) with a leading batch dimension")
    if len(x) == 0:
        raise ValueError(f"{fn}: x is empty (0 inputs); expected at least one input")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor, got dtype {x.dtype}")
    check_finite(fn, "x", x)
    device = resolve_device(None, model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
    return x.detach().to(device=device, dtype=dtype), device, dtype


def _output_transform(output: str) -> Callable[[Tensor], Tensor]:
    if output == "sigmoid":
        return torch.sigmoid
    if output == "softmax":
        return lambda z: torch.softmax(z, dim=-1)
    return lambda z: z


def _as_2d(out: Tensor) -> Tensor:
    """Model output ``(N,)`` or ``(N, ...)`` as ``(N, k)``."""
    return out.reshape(out.shape[0], -1)


def _model_fn(model: nn.Module, output: str = "logits") -> Callable[[Tensor], Tensor]:
    """``x -> g(model(x))`` as ``(N, k)`` with detached parameters (no parameter graph is built)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    post = _output_transform(output)

    def f(x: Tensor) -> Tensor:
        return post(_as_2d(functional_call(model, params, (x,))))

    return f


def _first_forward(fn: str, model: nn.Module, f: Callable[[Tensor], Tensor], x: Tensor,
                   shape: tuple[int, ...] | None = None) -> Tensor:
    """``f(x[:1])`` without gradients; a shape error of the model is re-raised as a ``ValueError`` naming ``x``.

    The message gives ``x``'s shape and, when the first Linear/Conv layer called is known, the number of
    input features (Linear) or channels (Conv) it expects and what it got. ``shape``: the shape of the whole
    ``x`` for the message when ``x`` is already a slice.
    """
    shape = tuple(x.shape) if shape is None else tuple(shape)
    first: list[tuple[nn.Module, Tensor]] = []
    wanted = {id(m) for m in parametrized_layers(model)}
    names = {id(m): n for n, m in model.named_modules()}

    def pre(mod, args):
        if not first and args and torch.is_tensor(args[0]):
            first.append((mod, args[0]))

    handles = [m.register_forward_pre_hook(pre) for m in model.modules() if id(m) in wanted]
    try:
        with torch.no_grad():
            return f(x[:1])
    except (RuntimeError, ValueError) as exc:  # ValueError: models that check their input themselves
        if not _SHAPE_ERROR.search(str(exc)):
            raise
        if first:
            mod, h = first[0]
        else:
            mod, h = next(iter(parametrized_layers(model)), None), None
        expect = ""
        if isinstance(mod, nn.Linear):
            got = f", got {h.shape[-1]} (layer input of shape {tuple(h.shape[1:])} per input)" if h is not None else ""
            expect = (f"; the first layer {names[id(mod)]!r} (Linear) expects {mod.in_features} input "
                      f"features{got}")
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            got = (f", got {h.shape[1]} (layer input of shape {tuple(h.shape[1:])} per input)"
                   if h is not None and h.ndim > 1 else "")
            expect = (f"; the first layer {names[id(mod)]!r} ({type(mod).__name__}) expects {mod.in_channels} "
                      f"input channels{got}")
        raise ValueError(f"{fn}: x has shape {shape} ({shape[1:]} per input), which the model "
                         f"cannot take{expect}; the forward raised: {exc}") from exc
    finally:
        for hd in handles:
            hd.remove()


def _activation_numel(model: nn.Module, x1: Tensor) -> int:
    """Per-example number of elements in all leaf-module outputs (one forward on one input)."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if torch.is_tensor(out):
            total += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            out = model(x1)
    finally:
        for h in handles:
            h.remove()
    return total + out.numel()


def _chunk(chunk_size: int | None, n: int, per_example: int) -> int:
    if chunk_size is not None:
        return min(chunk_size, n)
    return max(1, min(n, _CHUNK_BUDGET // max(1, per_example)))


def _input_linear(model: nn.Module, x1: Tensor) -> tuple[str, nn.Linear] | None:
    """The first Linear/Conv layer called, if it is an ``nn.Linear`` whose input is a view of ``x`` itself.

    Checked at run time: the layer's input shares ``x``'s memory with shape ``(1, d)`` and unit stride (so
    only ``flatten``/``view`` lie between), and ``x`` was not modified in place.
    """
    wanted = {id(m) for m in parametrized_layers(model)}
    seen: list[tuple[str, nn.Module, Tensor]] = []
    xx = x1.detach().clone().contiguous()
    version = xx._version

    def hook(name):
        def h(mod, args):
            if not seen:
                seen.append((name, mod, args[0]))
        return h

    handles = [m.register_forward_pre_hook(hook(nm)) for nm, m in model.named_modules() if id(m) in wanted]
    try:
        with torch.no_grad():
            model(xx)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        return None
    name, mod, h = seen[0]
    d = xx.numel()
    ok = (isinstance(mod, nn.Linear) and torch.is_tensor(h) and h.shape == (1, d) and h.stride(-1) == 1
          and h.data_ptr() == xx.data_ptr() and xx._version == version)
    return (name, mod) if ok and _enters_only_through(model, x1, name, mod) else None


def _enters_only_through(model: nn.Module, x1: Tensor, name: str, layer: nn.Linear) -> bool:
    """Whether :math:`J = (\\partial f/\\partial z_1) W` holds on ``x1`` (``x`` reaches the output through ``layer`` only).

    False for a skip connection from ``x`` past the first layer. Checked on one input: the k backward passes
    as one batched (vmapped) backward over the k unit cotangents.
    """
    f = _model_fn(model)
    xr = x1[:1].detach().clone().requires_grad_(True)
    z = torch.zeros(1, layer.out_features, dtype=x1.dtype, device=x1.device, requires_grad=True)
    probes = _Probes({name: layer}, outputs=True)
    with probes, torch.enable_grad():
        out = probes.call(f, xr, {f"out:{name}": z})
        k = out.shape[1]
        eye = torch.eye(k, dtype=out.dtype, device=out.device).unsqueeze(1)  # (k, 1, k): row j selects output j
        gx, gz = torch.autograd.grad(out, [xr, z], eye, is_grads_batched=True, allow_unused=True)
    jd64 = (torch.zeros(k, xr.numel(), dtype=torch.float64, device=x1.device) if gx is None
            else gx.reshape(k, -1).to(torch.float64))
    jz64 = (torch.zeros(k, z.numel(), dtype=torch.float64, device=x1.device) if gz is None
            else gz.reshape(k, -1).to(torch.float64))
    jf64 = jz64 @ layer.weight.detach().to(torch.float64)
    scale = float(jd64.norm()) + float(jf64.norm())
    return float((jd64 - jf64).norm()) <= 1e3 * torch.finfo(x1.dtype).eps * scale + 1e-30


class _Probes:
    """Forward hooks adding zero "probe" tensors to the input (and optionally output) of given layers.

    The Jacobian of the output w.r.t. a probe at layer ``l``'s input (key ``"in:l"``) is
    :math:`\\partial f / \\partial h_{l-1}` *through layer l* (exactly :math:`\\partial f / \\partial h_{l-1}`
    in a sequential network); at the output (key ``"out:l"``) it is :math:`\\partial f / \\partial z_l`. Only
    the keys present in the values passed to :meth:`call` are added. Layer inputs seen during the forward
    are recorded (detached copies, so later in-place operations of the model cannot change them), and the
    per-example output shapes.
    """

    def __init__(self, layers: dict[str, nn.Module], outputs: bool = False):
        self.layers, self.outputs = layers, outputs
        self.values: dict[str, Tensor] = {}
        self.inputs: dict[str, Tensor] = {}
        self.out_shapes: dict[str, tuple[int, ...]] = {}
        self.calls: dict[str, int] = {}
        self.handles: list = []

    def call(self, f: Callable[[Tensor], Tensor], x: Tensor, values: dict[str, Tensor]) -> Tensor:
        """``f(x)`` with the probe ``values`` added at the hooked layers (a pure function of ``values``)."""
        self.values = values
        try:
            return f(x)
        finally:
            self.values = {}

    def __enter__(self) -> "_Probes":
        for name, mod in self.layers.items():
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre(self, name: str):
        def hook(_mod, args):
            self.calls[name] = self.calls.get(name, 0) + 1
            h = args[0]
            self.inputs[name] = h.detach().clone()
            key = f"in:{name}"
            if key in self.values:
                return (h + self.values[key],) + tuple(args[1:])
            return None
        return hook

    def _post(self, name: str):
        def hook(_mod, _args, out):
            if torch.is_tensor(out):
                self.out_shapes[name] = tuple(out.shape[1:])
            key = f"out:{name}"
            if self.outputs and key in self.values:
                return out + self.values[key]
            return None
        return hook


def _called_layers(fn: str, model: nn.Module, x1: Tensor, shape: tuple[int, ...] | None = None
                   ) -> tuple[dict[str, nn.Module], dict[str, Tensor], dict[str, tuple[int, ...]]]:
    """Linear/Conv layers called in a forward of ``x1``, in call order, their inputs and per-example output shapes."""
    wanted = {id(m) for m in parametrized_layers(model)}
    named = {n: m for n, m in model.named_modules() if id(m) in wanted}
    with _Probes(named) as pr:
        _first_forward(fn, model, model, x1, shape)
    twice = [n for n, c in pr.calls.items() if c > 1]
    if twice:
        raise ValueError(f"{fn}: layers {twice} are called more than once per forward (weight sharing); "
                         "expected every Linear/Conv layer to be called once")
    order = list(pr.inputs)
    if not order:
        raise ValueError(f"{fn}: model has no nn.Linear/nn.Conv layer called in its forward; expected at least one")
    return {n: named[n] for n in order}, {n: pr.inputs[n] for n in order}, dict(pr.out_shapes)


def _per_example_numel(method: str, k: int, d: int, act: int) -> int:
    """Elements held per input: the Jacobian plus the activations, vectorised over k (rev) or d (fwd)."""
    if method in ("loop", "factored"):
        return act + 2 * k * d
    n_ad = d if method == "fwd" else k
    return n_ad * (act + d) + k * d


def _jacobians(fn: Callable[[dict[str, Tensor]], Tensor], inputs: dict[str, Tensor],
               method: str) -> dict[str, Tensor]:
    """Per-example Jacobians of ``fn(inputs) (N, k)`` w.r.t. each ``inputs[name] (N, *shape)``.

    Returns ``{name: (N, k, prod(shape))}``. ``rev``: ``jacrev`` of the batch-summed output (one backward
    pass vectorised over the k outputs); ``loop``: k plain backward passes (rows written into float64
    buffers); ``fwd``: ``jvp`` vectorised over the input coordinates (a single input tensor, used when k > d).
    """
    names = list(inputs)
    n = next(iter(inputs.values())).shape[0]
    if method == "rev":
        jac = jacrev(lambda inp: fn(inp).sum(0))(inputs)  # {name: (k, N, *shape)}
        return {nm: jac[nm].movedim(0, 1).reshape(n, jac[nm].shape[0], -1) for nm in names}
    if method == "loop":
        leaves = {nm: t.detach().requires_grad_(True) for nm, t in inputs.items()}
        with torch.enable_grad():
            out = fn(leaves)
            k = out.shape[1]
            jac = {nm: torch.empty(n, k, t[0].numel(), dtype=torch.float64, device=t.device)
                   for nm, t in leaves.items()}
            for j in range(k):
                grads = torch.autograd.grad(out[:, j].sum(), [leaves[nm] for nm in names],
                                            retain_graph=j < k - 1, allow_unused=True)
                for nm, g in zip(names, grads):
                    if g is None:  # output j does not depend on this input
                        jac[nm][:, j].zero_()
                    else:
                        jac[nm][:, j].view(g.shape).copy_(g)
        return jac
    (nm,) = names  # forward mode: tangent e_j (same coordinate for every example) gives column j of every J_i
    x = inputs[nm]
    d = x[0].numel()
    basis = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:]).expand(d, *x.shape)
    cols = vmap(lambda t: jvp(lambda z: fn({nm: z}), (x,), (t,))[1])(basis)  # (d, N, k)
    return {nm: cols.permute(1, 2, 0)}


def _factored_gram(f: Callable[[Tensor], Tensor], xc: Tensor, name: str, layer: nn.Linear,
                   wwt: Tensor | None = None) -> Tensor:
    """:math:`J J^\\top = G (W W^\\top) G^\\top` with :math:`G = \\partial f / \\partial z_1`, ``(n_c, k, k)`` float64.

    Backward passes stop at the first layer's output (a probe), so the :math:`k \\times m \\times d` input
    gradient of the first layer is never formed; exact because :math:`J = G W`. ``wwt``: :math:`W W^\\top` in
    float64 when the caller computed it once for all chunks.
    """
    probes = _Probes({name: layer}, outputs=True)
    zeros = {f"out:{name}": torch.zeros(xc.shape[0], layer.out_features, dtype=xc.dtype, device=xc.device)}
    with probes:
        gz = _jacobians(lambda pv: probes.call(f, xc, pv), zeros, "loop")[f"out:{name}"]  # (n_c, k, m) float64
    if wwt is None:
        w = layer.weight.detach().to(torch.float64)
        wwt = w @ w.mT
    return gz @ wwt @ gz.mT


def _first_layer_jacobians(f: Callable[[Tensor], Tensor], xc: Tensor, name: str, layer: nn.Linear) -> Tensor:
    """:math:`J = G W` ``(n_c, k, d)`` in ``xc``'s dtype, :math:`G = \\partial f / \\partial z_1` from k backward passes.

    The backward passes stop at the first layer's output (a probe; ``xc`` needs no gradient), and the
    first layer's input gradient of all k outputs and all inputs of the chunk is one ``(n_c k, m) @ (m, d)``
    GEMM instead of k smaller ones inside the passes. The same arithmetic as ``"loop"`` (a float32 ``J``),
    without the float64 :math:`G (W W^\\top) G^\\top` products of :func:`_factored_gram`.
    """
    n, m = xc.shape[0], layer.out_features
    probes = _Probes({name: layer}, outputs=True)
    z = torch.zeros(n, m, dtype=xc.dtype, device=xc.device, requires_grad=True)
    with probes, torch.enable_grad():
        out = probes.call(f, xc.detach(), {f"out:{name}": z})
        k = out.shape[1]
        gz = torch.empty(n, k, m, dtype=xc.dtype, device=xc.device)
        for j in range(k):
            (g,) = torch.autograd.grad(out[:, j].sum(), z, retain_graph=j < k - 1, allow_unused=True)
            if g is None:
                gz[:, j].zero_()
            else:
                gz[:, j].copy_(g)
    return (gz.reshape(n * k, m) @ layer.weight.detach()).reshape(n, k, -1)


def _spectrum(jac: Tensor, eps: float | None = None) -> tuple[Tensor, Tensor]:
    """Eigenvalues of :math:`J J^\\top` (descending, the min(k, D) largest) and :math:`\\lVert J\\rVert_F^2`.

    ``jac`` is ``(N, k, D)``; the Gram matrix (the smaller of :math:`J J^\\top`, :math:`J^\\top J`) and
    ``eigvalsh`` run in float64. ``eps``: machine epsilon of the computation (default: ``jac``'s dtype).
    """
    n, k, dim = jac.shape
    j64 = jac.to(torch.float64)
    gram = j64 @ j64.mT if k <= dim else j64.mT @ j64
    return _gram_spectrum(gram, max(k, dim), torch.finfo(jac.dtype).eps if eps is None else eps)


def _gram_spectrum(gram: Tensor, m: int, eps: float) -> tuple[Tensor, Tensor]:
    """Descending eigenvalues of a float64 Gram matrix ``(N, r, r)`` and its trace.

    Eigenvalues below :math:`\\lambda_1 \\max((m\\epsilon)^2, m\\epsilon_{64})` are set to exactly 0
    (flatness.compression module docstring), ``m = max(k, D)``.
    """
    fro2 = gram.diagonal(dim1=1, dim2=2).sum(1)  # tr(J J^T) = ||J||_F^2
    lam = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0.0)  # (N, r) descending
    tol = lam[:, :1] * max((m * eps) ** 2, m * torch.finfo(torch.float64).eps)
    lam = torch.where(lam > tol, lam, torch.zeros_like(lam))
    return lam, fro2


def _log_volume(lam: Tensor, top_k: int | None) -> Tensor:
    """:math:`\\tfrac12 \\sum_{j \\le \\text{top\\_k}} \\log \\lambda_j` (-inf when one of them is 0)."""
    sel = lam if top_k is None else lam[:, :top_k]
    return 0.5 * torch.log(sel).sum(dim=1)


def _layer_jacobians(model: nn.Module, x: Tensor, output: str, chunk_size: int | None, method: str, fn: str):
    """Generator over chunks: ``(layers, {"in:l": (n_c, k, D_l)}, {l: layer input (n_c, ...)})``."""
    layers, inputs1, _ = _called_layers(fn, model, x[:1], x.shape)
    f = _model_fn(model, output)
    with torch.no_grad():
        k = f(x[:1]).shape[1]
    probe_numel = sum(t[0].numel() for t in inputs1.values())
    n = x.shape[0]
    size = _chunk(chunk_size, n, _per_example_numel(method, k, 2 * probe_numel, _activation_numel(model, x[:1])))
    for s in range(0, n, size):
        xc = x[s:s + size]
        probes = _Probes(layers)
        zeros = {f"in:{nm}": torch.zeros(len(xc), *inputs1[nm].shape[1:], dtype=xc.dtype, device=xc.device)
                 for nm in layers}
        with probes:
            jac = _jacobians(lambda pv: probes.call(f, xc, pv), zeros, method)
        yield layers, jac, {nm: t for nm, t in probes.inputs.items()}


# ---- one pass for the bounds: input-Jacobian spectra, per-example weight-gradient norms, layer-input norms
_CONVS = (nn.Conv1d, nn.Conv2d)


def _param_name(layer: str, p: str) -> str:
    return f"{layer}.{p}" if layer else p


def _grad_supported(mod: nn.Module) -> bool:
    """Layers whose per-example weight-gradient norms :func:`_pass_terms` computes from activations."""
    if isinstance(mod, nn.Linear):
        return True
    return (isinstance(mod, _CONVS) and mod.padding_mode == "zeros"
            and not (isinstance(mod.padding, str) and mod.padding != "valid"))


def _patches(mod: nn.Module, h: Tensor) -> Tensor:
    """Conv input ``h`` as patches ``(N, groups, D_g, P)`` (D_g = C_in/groups * kernel, P output positions).

    ``F.unfold``'s own layout (a view of its output, no copy).
    """
    if isinstance(mod, nn.Conv1d):
        h = h.unsqueeze(2)
        ks, dil, st = (1, mod.kernel_size[0]), (1, mod.dilation[0]), (1, mod.stride[0])
        pad = (0, 0) if isinstance(mod.padding, str) else (0, mod.padding[0])
    else:
        ks, dil, st = mod.kernel_size, mod.dilation, mod.stride
        pad = (0, 0) if isinstance(mod.padding, str) else mod.padding
    u = F.unfold(h, ks, dilation=dil, padding=pad, stride=st)  # (N, C_in * kernel, P)
    n, dk, p = u.shape
    return u.view(n, mod.groups, dk // mod.groups, p)


class _GradSq:
    r"""Per-input :math:`\sum_j \lVert \nabla_W f_j(x_i)\rVert_F^2` and :math:`\sum_j \lVert \nabla_b f_j(x_i)\rVert^2`
    of one layer, from its input :math:`h` and output gradients :math:`\delta_j = \partial f_j / \partial z`.

    Never from per-example parameter gradients of the whole network (Goodfellow 2015; the ghost norm of
    Li et al. 2022 for weights shared over positions):

    * Linear on ``(N, features)``: :math:`\lVert \delta_j h^\top\rVert_F^2 = \lVert\delta_j\rVert^2 \lVert h\rVert^2`.
    * weight shared over P positions (Conv, Linear on ``(N, ..., features)``), patches :math:`h_p`:
      :math:`\nabla_W f_j = \sum_p \delta_{j,p} h_p^\top` and :math:`\nabla_b f_j = \sum_p \delta_{j,p}`, by
      whichever of two costs less per input (k outputs, :math:`C` output channels, :math:`D` patch size):

      - ``"direct"``: the output gradients of all k outputs are kept, ``(k C, P)``, and the k weight
        gradients come from one ``(D, P) @ (P, k C)`` product per input at the end (:meth:`totals`):
        :math:`k C P D` multiply-adds.
      - ``"ghost"``: :math:`\lVert\sum_p \delta_p h_p^\top\rVert_F^2 = \sum_{p,q} (\delta_p\cdot\delta_q)(h_p\cdot h_q)`,
        the patch Gram matrix shared by the k outputs: :math:`P^2 D + k P^2 C`.

    Products and each output's sums run in the input's dtype; the sums over outputs accumulate in float64.
    """

    def __init__(self, mod: nn.Module, h: Tensor, k: int, *, weight: bool = True, bias: bool = True):
        self.mod, self.n, self.k, self.weight, self.bias = mod, h.shape[0], k, weight, bias
        self.w = torch.zeros(self.n, dtype=torch.float64, device=h.device)
        self.b = torch.zeros_like(self.w)
        if isinstance(mod, nn.Linear) and h.ndim == 2:
            self.kind, self.h2 = "dense", h.to(torch.float64).pow(2).sum(1)
            return
        self.groups = 1 if isinstance(mod, nn.Linear) else mod.groups
        self.c_out = (mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels) // self.groups
        if not weight:
            self.kind = "bias"
            return
        if isinstance(mod, nn.Linear):
            u = h.reshape(self.n, 1, -1, h.shape[-1]).mT  # (N, 1, in, P)
        else:
            u = _patches(mod, h)  # (N, g, D_g, P)
        dg, p = u.shape[2], u.shape[3]
        if p * p * dg + k * p * p * self.c_out < k * self.c_out * p * dg:
            self.kind, self.hh = "ghost", u.mT @ u  # (N, g, P, P)
        else:
            self.kind, self.u, self.added = "direct", u, set()
            self.buf = torch.empty(self.n, self.groups, k, self.c_out, p, dtype=h.dtype, device=h.device)

    def add(self, j: int, delta: Tensor) -> None:
        """Add output ``j``'s term; ``delta`` is :math:`\partial f_j/\partial z` ``(N, *out_shape)``."""
        n = self.n
        if self.kind == "dense":
            d2 = delta.to(torch.float64).pow(2).sum(1)
            self.w += d2 * self.h2
            self.b += d2
            return
        if isinstance(self.mod, nn.Linear):
            dl = delta.reshape(n, 1, -1, delta.shape[-1]).mT  # (N, 1, out, P)
        else:
            dl = delta.reshape(n, self.groups, self.c_out, -1)  # (N, g, C_out/g, P)
        if self.bias:
            self.b += dl.sum(3).to(torch.float64).pow(2).sum((1, 2))
        if self.kind == "direct":
            self.buf[:, :, j].copy_(dl)
            self.added.add(j)
        elif self.kind == "ghost":
            self.w += ((dl.mT @ dl) * self.hh).sum((1, 2, 3)).to(torch.float64)

    def totals(self) -> tuple[Tensor, Tensor]:
        """``(weight, bias)`` terms ``(N,)`` float64 (zeros for a part not asked for); call after every ``add``."""
        if self.kind == "direct":
            for j in set(range(self.k)) - self.added:  # outputs that do not depend on this layer
                self.buf[:, :, j].zero_()
            grads = self.u @ self.buf.flatten(2, 3).mT  # (N, g, D_g, k C_out): all k weight gradients
            self.w += torch.linalg.vector_norm(grads.flatten(1), dim=1).to(torch.float64).pow(2)
            del self.buf, self.u
            self.kind = "done"
        return (self.w if self.weight else torch.zeros_like(self.w),
                self.b if self.bias else torch.zeros_like(self.b))


@dataclass
class _PassTerms:
    """What :func:`_pass_terms` returns; per-input tensors are float64 on the CPU."""

    layers: dict[str, nn.Module]  # Linear/Conv layers called, forward order
    out_shapes: dict[str, tuple[int, ...]]  # per-example output shape of each layer
    k: int  # number of outputs
    lam: dict[str, Tensor] = field(default_factory=dict)  # {layer | "x": (N, r) eigenvalues of J J^T, descending}
    fro2: dict[str, Tensor] = field(default_factory=dict)  # {layer | "x": (N,) ||J||_F^2}
    h_norm: dict[str, Tensor] = field(default_factory=dict)  # {layer: (N,) ||h_{l-1}||}
    grad_sq: dict[str, Tensor] = field(default_factory=dict)  # {param name: (N,) sum_j ||grad_p f_j||_F^2}


def _pass_terms(fn: str, model: nn.Module, x: Tensor, *, gram_layers=(), grad_layers=(),
                x_factored: str | None = None, chunk_size: int | None = None) -> _PassTerms:
    """One set of k backward passes (per chunk) giving every term of the bounds.

    Args:
        gram_layers: layers whose input Jacobian :math:`\\partial f/\\partial h_{l-1}` spectrum is wanted (input probes).
        grad_layers: layers whose weight/bias squared gradient norms are wanted (output probes, :class:`_GradSq`);
            unsupported layers (:func:`_grad_supported`) are skipped (the caller computes them otherwise).
        x_factored: name of a first ``nn.Linear`` applied to ``x.flatten(1)`` itself: the input-Jacobian
            spectrum (key ``"x"``) from :math:`J = \\delta_1 W` with its output gradient :math:`\\delta_1`.
    """
    layers, inputs1, out_shapes = _called_layers(fn, model, x[:1], x.shape)
    f = _model_fn(model, "logits")
    with torch.no_grad():
        k = f(x[:1]).shape[1]
    gram_layers = [nm for nm in layers if nm in set(gram_layers)]
    grad_layers = [nm for nm in layers if nm in set(grad_layers) and _grad_supported(layers[nm])]
    if x_factored is not None and x_factored not in grad_layers:
        grad_layers.insert(0, x_factored)
    dims = {nm: inputs1[nm][0].numel() for nm in gram_layers}
    per_ex = (2 * _activation_numel(model, x[:1]) + 2 * k * sum(dims.values())
              + sum((2 + k) * math.prod(out_shapes[nm]) + 4 * inputs1[nm][0].numel() * 9 for nm in grad_layers))
    n = x.shape[0]
    size = _chunk(chunk_size, n, per_ex)
    eps = torch.finfo(x.dtype).eps
    res = _PassTerms(layers, out_shapes, k)
    parts: dict[str, list[Tensor]] = {}
    for s in range(0, n, size):
        xc = x[s:s + size]
        nc = len(xc)
        zeros = {f"in:{nm}": torch.zeros(nc, *inputs1[nm].shape[1:], dtype=xc.dtype, device=xc.device)
                 for nm in gram_layers}
        zeros.update({f"out:{nm}": torch.zeros(nc, *out_shapes[nm], dtype=xc.dtype, device=xc.device)
                      for nm in grad_layers})
        leaves = {key: t.requires_grad_(True) for key, t in zeros.items()}
        probes = _Probes(layers, outputs=True)
        with probes, torch.enable_grad():
            out = probes.call(f, xc, leaves)
        inputs = probes.inputs
        acc = {nm: _GradSq(layers[nm], inputs[nm], k) for nm in grad_layers}
        rows = {nm: torch.empty(nc, k, dims[nm], dtype=torch.float64, device=xc.device) for nm in gram_layers}
        if x_factored is not None:
            rows["x"] = torch.empty(nc, k, layers[x_factored].out_features, dtype=torch.float64, device=xc.device)
        keys = list(leaves)
        for j in range(k):
            grads = torch.autograd.grad(out[:, j].sum(), [leaves[key] for key in keys], retain_graph=j < k - 1,
                                        allow_unused=True)
            for key, g in zip(keys, grads):
                kind, nm = key.split(":", 1)
                if g is None:  # output j does not depend on this layer: zero rows, no weight-gradient term
                    if kind == "in":
                        rows[nm][:, j].zero_()
                    elif nm == x_factored:
                        rows["x"][:, j].zero_()
                    continue
                if kind == "in":
                    rows[nm][:, j] = g.reshape(nc, -1)
                else:
                    acc[nm].add(j, g)
                    if nm == x_factored:
                        rows["x"][:, j] = g
        for nm, r in rows.items():
            if nm == "x":
                w = layers[x_factored].weight.detach().to(torch.float64)
                lam, fro2 = _gram_spectrum(r @ (w @ w.mT) @ r.mT, max(k, x[0].numel()), eps)
            else:
                lam, fro2 = _spectrum(r, eps)
            parts.setdefault(f"lam:{nm}", []).append(lam.cpu())
            parts.setdefault(f"fro2:{nm}", []).append(fro2.cpu())
        for nm, a in acc.items():
            w_sq, b_sq = a.totals()
            parts.setdefault(f"g:{_param_name(nm, 'weight')}", []).append(w_sq.cpu())
            if layers[nm].bias is not None:
                parts.setdefault(f"g:{_param_name(nm, 'bias')}", []).append(b_sq.cpu())
        for nm in layers:
            parts.setdefault(f"h:{nm}", []).append(inputs[nm].reshape(nc, -1).to(torch.float64).norm(dim=1).cpu())
    for key, v in parts.items():
        kind, nm = key.split(":", 1)
        target = {"lam": res.lam, "fro2": res.fro2, "h": res.h_norm, "g": res.grad_sq}[kind]
        target[nm] = torch.cat(v)
    return res
