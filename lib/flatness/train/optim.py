r"""Optimizers by name with the reference defaults (Zhang et al. 2021, Sec. 5.3, Fig. 4 and S18), Entropy-SGD
(Chaudhari et al. 2019, Algorithm 1), and functional optimizers for stacked ensembles.

Every default and where it comes from ("sheet" = ``shared/reference/zhang2021_flatness_prior.md``, "Networks and
training", values read from the authors' TensorFlow-1 script ``sofuncheung/ICML_2021/FCN/sharpness-generalization.py``;
"Keras" = the Keras defaults, used where the sheet says "not recovered", since the paper says it used "the standard
default Tensorflow hyperparameters"):

- ``sgd`` (``torch.optim.SGD``): lr 0.01. Sheet (``GradientDescentOptimizer(0.01)``).
- ``gd`` (``SGD``, full batch: the loop uses the whole training set as one batch): lr 0.01. Not recovered:
  Keras SGD default (= the paper's SGD lr).
- ``momentum`` (``SGD``): lr 0.01, momentum 0.9 (no dampening, not Nesterov). Sheet
  (``MomentumOptimizer(0.01, 0.9)``, the same heavy-ball update as torch's).
- ``adam`` (``Adam``): lr 1e-3, betas (0.9, 0.999), eps 1e-8. Sheet (``AdamOptimizer()``: TF-1 defaults; Keras
  would use eps 1e-7).
- ``adagrad`` (``Adagrad``): lr 0.01 (sheet, ``AdagradOptimizer(0.01)``), initial_accumulator_value 0.1 (that
  TF-1 class's default), eps 1e-10 (torch's; TF-1 has none, negligible next to sqrt(0.1)).
- ``rmsprop`` (``RMSprop``): lr 1e-3, alpha (= Keras rho) 0.9, momentum 0, eps 1e-7. Not recovered: Keras defaults.
- ``entropy_sgd`` (:class:`EntropySGD`): lr 0.01, L 20, sgld_lr 0.1, gamma 1e-3, scoping 1e-4, noise 1e-4,
  alpha 0.75. Sheet for lr, sgld_lr, noise, alpha, L ("5 or 20") and the gamma range 1e-3..3e-2; scoping from
  ``Justin-Tan/entropy-sgd-tf`` (the code Zhang et al. ran); see :class:`EntropySGD`.

Changes from this module's earlier defaults (they change results): ``adagrad`` gains the TF initial accumulator 0.1
(was torch's 0); ``rmsprop`` lr 0.01 -> 1e-3, alpha 0.99 -> 0.9, eps 1e-8 -> 1e-7 (torch's defaults replaced by
Keras's, which the paper names). Known framework differences kept: Keras RMSprop (TF <= 2.10) adds eps inside the
square root and TF-1 ``RMSPropOptimizer`` starts its mean square at 1 (torch: eps outside, start at 0).

- :data:`OPTIMIZERS`, :func:`make_optimizer`, :func:`list_optimizers`, :func:`optimizer_defaults`,
  :func:`optimizer_table`: the registry.
- :class:`EntropySGD`: Chaudhari et al. 2019, Algorithm 1 (needs ``step(closure)``).
- :func:`functional_optimizer`: ``sgd`` / ``gd`` / ``momentum`` / ``adam`` on stacked ``(M, ...)`` parameters with a
  per-model ``active_mask``, matching the torch optimizers above model by model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_positive

__all__ = ["OPTIMIZERS", "OptimizerSpec", "make_optimizer", "list_optimizers", "optimizer_defaults",
           "optimizer_table", "EntropySGD", "FunctionalOptimizer", "functional_optimizer",
           "FUNCTIONAL_OPTIMIZERS"]


# ---------------------------------------------------------------------------------------------------------------------
# Entropy-SGD
# ---------------------------------------------------------------------------------------------------------------------

def _check_unit(fn: str, name: str, value, *, low_open: bool = False, high_closed: bool = False) -> float:
    """Raise unless ``value`` is a real number in [0, 1) (or (0, 1] etc. as asked); return it as ``float``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name}={value!r} must be a real number") from None
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v <= 1 if high_closed else v < 1
    if not (math.isfinite(v) and lo_ok and hi_ok):
        interval = ("(" if low_open else "[") + "0, 1" + ("]" if high_closed else ")")
        raise ValueError(f"{fn}: {name}={value!r} must lie in {interval}")
    return v


class EntropySGD(torch.optim.Optimizer):
    r"""Entropy-SGD (Chaudhari et al. 2019, "Entropy-SGD: biasing gradient descent into wide valleys", Algorithm 1).

    Gradient descent on the local entropy :math:`F(x, \gamma) = \log \int \exp(-f(x') - \tfrac{\gamma}{2}
    \|x - x'\|^2) \, dx'`, whose gradient :math:`-\gamma (x - \langle x' \rangle)` is estimated by ``L`` steps of
    stochastic gradient Langevin dynamics (SGLD) started at :math:`x`. One call of :meth:`step` does, with
    :math:`\gamma_t = \gamma_0 (1 + \gamma_1)^t` (scoping; :math:`t` = number of outer steps so far):

    .. math::
        x', \mu &\leftarrow x \\
        \text{repeat } L \text{ times: } \quad
        x' &\leftarrow x' - \eta' \left(\nabla f(x') - \gamma_t (x - x')\right) + \sqrt{\eta'}\, \varepsilon\, \xi,
        \qquad \xi \sim N(0, I) \\
        \mu &\leftarrow (1 - \alpha) \mu + \alpha x' \\
        x &\leftarrow x - \eta (x - \mu).

    The outer step uses :math:`x - \mu` without Algorithm 1's factor :math:`\gamma` (:math:`\gamma` absorbed into
    :math:`\eta`), as both public implementations do (the authors' ``ucla-vision/entropy-sgd`` and
    ``Justin-Tan/entropy-sgd-tf``, the one Zhang et al. 2021 ran); with Algorithm 1's literal
    :math:`\eta\gamma` and the reference values the outer step would be ~1e-5 and nothing would train.

    Defaults (reference sheet, Zhang et al. 2021 Fig. 4: "exact call used in the paper not recovered"):
    ``lr`` 0.01 (sheet; the authors' code default), ``L`` 20 (sheet "5 or 20"; Chaudhari et al. "usually set to 20";
    ``Justin-Tan/entropy-sgd-tf``'s config), ``sgld_lr`` 0.1 (sheet), ``gamma`` 1e-3 (low end of the sheet's
    1e-3..3e-2; ``Justin-Tan/entropy-sgd-tf`` default), ``scoping`` 1e-4 (that repository's test config; the sheet
    says "scoped" without a value), ``noise`` 1e-4 (sheet), ``alpha`` 0.75 (sheet; weight of the newest :math:`x'`,
    as in Algorithm 1 and ``Justin-Tan/entropy-sgd-tf``; ``ucla-vision`` puts 0.75 on the old mean instead).

    Mini-batches: Algorithm 1 draws a fresh mini-batch for each of the ``L`` SGLD steps. :meth:`step` calls
    ``closure`` once per SGLD step, so a closure that draws a new mini-batch on each call follows Algorithm 1
    exactly; the closure of :func:`flatness.train.train_to_zero_error` (zero_grad + forward + backward on the
    current mini-batch) makes the ``L`` steps reuse one mini-batch, and one outer step costs ``L`` forward/backward
    passes.

    Stability: the SGLD step is stable only while :math:`\eta' \gamma_t < 2`; with scoping :math:`\gamma_t` grows
    without bound (with the defaults :math:`\eta' \gamma_t` reaches 2 after about 99,000 outer steps).

    Args:
        params: parameters or parameter groups (every hyper-parameter may be set per group).
        lr: outer learning rate :math:`\eta`.
        L: SGLD steps per outer step (>= 1).
        sgld_lr: SGLD step size :math:`\eta'`.
        gamma: initial scope :math:`\gamma_0` (>= 0).
        scoping: :math:`\gamma_1` (>= 0) in :math:`\gamma_t = \gamma_0 (1 + \gamma_1)^t`.
        noise: thermal noise :math:`\varepsilon` (>= 0; 0 makes the inner loop deterministic).
        alpha: exponential-average weight in (0, 1] of the newest :math:`x'` in :math:`\mu`.
        generator: ``torch.Generator`` for the SGLD noise (default: torch's global generator); on another device
            than the parameters the noise is drawn there and moved.

    State per parameter: ``x`` (the outer iterate during a step), ``x_prime``, ``mu``, ``step`` (outer steps done);
    :meth:`state_dict` also holds ``generator``'s state, so a checkpoint resumes the same noise. After a step,
    ``.grad`` holds the gradient at the last SGLD iterate :math:`x'`, not at the new weights.

    Raises:
        ValueError: a hyper-parameter outside its range (named in the message).

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = EntropySGD([w], lr=1.0, L=5, sgld_lr=0.1, noise=0.0)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (w ** 2).sum()
        ...     loss.backward()
        ...     return loss
        >>> opt.step(closure).item()  # the loss at w before the step
        1.0
        >>> bool(abs(w.item()) < 1.0)
        True
    """

    def __init__(self, params, lr: float = 0.01, L: int = 20, sgld_lr: float = 0.1, gamma: float = 1e-3,
                 scoping: float = 1e-4, noise: float = 1e-4, alpha: float = 0.75,
                 generator: torch.Generator | None = None):
        defaults = self._validate("EntropySGD", dict(lr=lr, L=L, sgld_lr=sgld_lr, gamma=gamma, scoping=scoping,
                                                     noise=noise, alpha=alpha))
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"EntropySGD: generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        super().__init__(params, defaults)
        for group in self.param_groups:  # per-group overrides
            group.update(self._validate("EntropySGD", {k: group[k] for k in defaults}))

    @staticmethod
    def _validate(fn: str, hp: dict) -> dict:
        return dict(lr=check_positive(fn, "lr", hp["lr"]),
                    L=check_int(fn, "L", hp["L"], minimum=1),
                    sgld_lr=check_positive(fn, "sgld_lr", hp["sgld_lr"]),
                    gamma=check_positive(fn, "gamma", hp["gamma"], allow_zero=True),
                    scoping=check_positive(fn, "scoping", hp["scoping"], allow_zero=True),
                    noise=check_positive(fn, "noise", hp["noise"], allow_zero=True),
                    alpha=_check_unit(fn, "alpha", hp["alpha"], low_open=True, high_closed=True))

    def state_dict(self) -> dict:
        """The usual optimizer state, plus the noise generator's state when one was given."""
        sd = super().state_dict()
        if self.generator is not None:
            sd["generator_state"] = self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` (including the noise generator's state when both have one)."""
        state_dict = dict(state_dict)
        gen_state = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        if gen_state is not None and self.generator is not None:
            self.generator.set_state(gen_state)

    def _randn_like(self, p: Tensor) -> Tensor:
        gen = self.generator
        if gen is None:
            return torch.randn_like(p)
        return torch.randn(p.shape, generator=gen, device=gen.device, dtype=p.dtype).to(p.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """One outer step (``L`` SGLD steps, then the move towards their average).

        Args:
            closure: re-evaluates the loss with gradients at the parameters' current values (zero_grad, forward,
                backward, return the loss); called ``L`` times, with the parameters set to the SGLD iterate.

        Returns:
            The loss of the first closure call, i.e. at the parameters before this step.

        Raises:
            RuntimeError: without a closure.
        """
        if closure is None:
            raise RuntimeError("EntropySGD.step: a closure is required (Entropy-SGD re-evaluates the loss L times "
                               "per step): call opt.step(closure) with a closure that zeroes the gradients, runs "
                               "forward and backward on a mini-batch and returns the loss")
        groups = [g for g in self.param_groups if g["params"]]
        for group in groups:  # x, mu <- current weights; during the SGLD loop the parameters hold x'
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["x"], st["x_prime"], st["mu"] = p.detach().clone(), p.detach().clone(), p.detach().clone()
                else:
                    st["x"].copy_(p)
                    st["mu"].copy_(p)
        gammas = [g["gamma"] * (1.0 + g["scoping"]) ** self.state[g["params"][0]]["step"] for g in groups]
        first_loss = None
        for ell in range(max((g["L"] for g in groups), default=0)):
            with torch.enable_grad():
                loss = closure()
            if ell == 0:
                first_loss = loss
            for group, gamma_t in zip(groups, gammas):
                if ell >= group["L"]:
                    continue
                eta, eps, alpha = group["sgld_lr"], group["noise"], group["alpha"]
                ps = group["params"]
                xs = [self.state[p]["x"] for p in ps]
                mus = [self.state[p]["mu"] for p in ps]
                dx = torch._foreach_sub(ps, xs)  # x' - x: the scope's force -gamma_t (x - x') / gamma_t
                torch._foreach_mul_(dx, gamma_t)
                torch._foreach_add_(dx, [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps])
                torch._foreach_add_(ps, dx, alpha=-eta)  # x' <- x' - eta' (grad f(x') - gamma_t (x - x'))
                if eps > 0:
                    torch._foreach_add_(ps, [self._randn_like(p) for p in ps], alpha=math.sqrt(eta) * eps)
                torch._foreach_lerp_(mus, list(ps), alpha)  # mu <- (1 - alpha) mu + alpha x'
        for group in groups:
            for p in group["params"]:
                st = self.state[p]
                st["x_prime"].copy_(p)
                p.copy_(st["x"].sub(st["x"].sub(st["mu"]), alpha=group["lr"]))  # x - eta (x - mu)
                st["step"] += 1
        return first_loss


# ---------------------------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry: the class, its default hyper-parameters and where each default comes from."""

    cls: type[torch.optim.Optimizer]
    defaults: dict
    sources: dict = field(default_factory=dict)  # hyper-parameter -> where its default comes from
    full_batch: bool = False  # the training loop uses the whole training set as one batch
    description: str = ""

    def __iter__(self):  # ``cls, defaults = OPTIMIZERS[name]`` keeps working (the registry's old tuple form)
        return iter((self.cls, self.defaults))


_SHEET = "reference sheet (authors' TF-1 script)"
_KERAS = "not recovered: Keras default"

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(torch.optim.SGD, {"lr": 0.01}, {"lr": _SHEET}, description="plain mini-batch SGD"),
    "gd": OptimizerSpec(torch.optim.SGD, {"lr": 0.01}, {"lr": _KERAS + " (SGD)"}, full_batch=True,
                        description="full-batch gradient descent"),
    "momentum": OptimizerSpec(torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}, {"lr": _SHEET, "momentum": _SHEET},
                              description="SGD with heavy-ball momentum"),
    "adam": OptimizerSpec(torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8},
                          {"lr": _SHEET, "betas": _SHEET, "eps": _SHEET + " (TF-1 default; Keras uses 1e-7)"},
                          description="Adam (Kingma & Ba 2014)"),
    "adagrad": OptimizerSpec(torch.optim.Adagrad, {"lr": 0.01, "initial_accumulator_value": 0.1, "eps": 1e-10},
                             {"lr": _SHEET, "initial_accumulator_value": "TF-1 AdagradOptimizer default",
                              "eps": "torch default (TF-1 has none)"},
                             description="Adagrad (Duchi et al. 2011)"),
    "rmsprop": OptimizerSpec(torch.optim.RMSprop, {"lr": 1e-3, "alpha": 0.9, "momentum": 0.0, "eps": 1e-7},
                             {"lr": _KERAS, "alpha": _KERAS + " (rho)", "momentum": _KERAS, "eps": _KERAS},
                             description="RMSProp (Tieleman & Hinton 2012)"),
    "entropy_sgd": OptimizerSpec(EntropySGD, {"lr": 0.01, "L": 20, "sgld_lr": 0.1, "gamma": 1e-3, "scoping": 1e-4,
                                              "noise": 1e-4, "alpha": 0.75},
                                 {"lr": "reference sheet", "L": "reference sheet (5 or 20); Chaudhari et al.: 20",
                                  "sgld_lr": "reference sheet", "gamma": "reference sheet range 1e-3..3e-2 (low end)",
                                  "scoping": "Justin-Tan/entropy-sgd-tf test config (sheet: 'scoped')",
                                  "noise": "reference sheet", "alpha": "reference sheet"},
                                 description="Entropy-SGD (Chaudhari et al. 2019, Algorithm 1); needs step(closure)"),
}


def list_optimizers() -> list[str]:
    """The registered optimizer names (:data:`OPTIMIZERS`)."""
    return list(OPTIMIZERS)


def optimizer_defaults(name: str) -> dict:
    """A copy of the default hyper-parameters of optimizer ``name``.

    Raises:
        ValueError: unknown ``name`` (the message lists the registered names).
    """
    check_choice("optimizer_defaults", "optimizer", name, OPTIMIZERS)
    return dict(OPTIMIZERS[name].defaults)


def optimizer_table():
    """Every registered optimizer's defaults and their sources as a ``pandas.DataFrame``
    (columns ``optimizer, class, full_batch, parameter, value, source``)."""
    import pandas as pd

    rows = [{"optimizer": name, "class": spec.cls.__name__, "full_batch": spec.full_batch, "parameter": k,
             "value": v, "source": spec.sources.get(k, "")}
            for name, spec in OPTIMIZERS.items() for k, v in spec.defaults.items()]
    return pd.DataFrame(rows)


def _check_betas(fn: str, betas) -> tuple[float, float]:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: betas={betas!r} must be a pair (beta1, beta2) in [0, 1)") from None
    return _check_unit(fn, "betas[0]", b1), _check_unit(fn, "betas[1]", b2)


def _validate_hparams(fn: str, hp: dict) -> dict:
    """Range checks for the hyper-parameters the registry's torch optimizers share; returns a checked copy."""
    hp = dict(hp)
    if "lr" in hp:
        hp["lr"] = check_positive(fn, "lr", hp["lr"])
    if "momentum" in hp:
        hp["momentum"] = _check_unit(fn, "momentum", hp["momentum"])
    if "betas" in hp:
        hp["betas"] = _check_betas(fn, hp["betas"])
    if "eps" in hp:
        hp["eps"] = check_positive(fn, "eps", hp["eps"])
    if "initial_accumulator_value" in hp:
        hp["initial_accumulator_value"] = check_positive(fn, "initial_accumulator_value",
                                                         hp["initial_accumulator_value"], allow_zero=True)
    if "weight_decay" in hp:
        hp["weight_decay"] = check_positive(fn, "weight_decay", hp["weight_decay"], allow_zero=True)
    return hp


def make_optimizer(name: str | Callable, params, lr: float | None = None, **kwargs) -> torch.optim.Optimizer:
    """An optimizer by name (:data:`OPTIMIZERS`) with the reference defaults, or from a factory callable.

    Args:
        name: a registered name (:func:`list_optimizers`) or a factory ``params -> Optimizer``.
        params: the parameters (or parameter groups) to optimise.
        lr: learning rate (default: the optimizer's reference default).
        **kwargs: other hyper-parameters of the optimizer's class (override the defaults), e.g. ``momentum=0.5``.

    Returns:
        The optimizer.

    Raises:
        ValueError: unknown ``name`` (listing the registered names), an invalid hyper-parameter value (named), or a
            keyword the optimizer's class does not take (listing those it does).
    """
    fn = "make_optimizer"
    if callable(name):
        return name(params)
    check_choice(fn, "optimizer", name, OPTIMIZERS)
    spec = OPTIMIZERS[name]
    accepted = [k for k in inspect.signature(spec.cls.__init__).parameters if k not in ("self", "params")]
    for k in kwargs:
        if k not in accepted:
            raise ValueError(f"{fn}: unknown hyper-parameter {k!r} for optimizer {name!r}; accepted: {accepted}")
    hp = {**spec.defaults, **kwargs}
    if lr is not None:
        hp["lr"] = lr
    if spec.cls is EntropySGD:
        hp.update(EntropySGD._validate(fn, hp))
    else:
        hp = _validate_hparams(fn, hp)
        if name == "rmsprop" and "alpha" in hp:
            hp["alpha"] = _check_unit(fn, "alpha", hp["alpha"])
    return spec.cls(params, **hp)


# ---------------------------------------------------------------------------------------------------------------------
# Functional optimizers for stacked ensembles
# ---------------------------------------------------------------------------------------------------------------------

FUNCTIONAL_OPTIMIZERS = ("sgd", "gd", "momentum", "adam")


def _row_view(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-model ``(M,)`` tensor to broadcast against a stacked ``(M, ...)`` tensor."""
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


@dataclass(frozen=True)
class FunctionalOptimizer:
    r"""A pure optimizer on stacked parameters ``{name: (M, ...)}`` (leading dimension = model).

    ``init(params) -> state``; ``step(params, grads, state, active_mask=None) -> (params, state)``. Rows whose
    ``active_mask`` is ``False`` keep their parameters, optimizer state and step count (models of an ensemble stop
    at different epochs); their gradients are ignored (may be NaN). Row by row the updates are those of
    ``torch.optim.SGD`` (``momentum`` = 0 or not, no dampening, not Nesterov) and ``torch.optim.Adam``
    (no weight decay, no AMSGrad) with the same hyper-parameters:

    .. math::
        \text{sgd: } b \leftarrow \mu b + g,\ \theta \leftarrow \theta - \eta b \ (b = g \text{ if } \mu = 0);
        \qquad \text{adam: } m \leftarrow \beta_1 m + (1-\beta_1) g,\ v \leftarrow \beta_2 v + (1-\beta_2) g^2,\
        \theta \leftarrow \theta - \frac{\eta}{1 - \beta_1^t} \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}

    with each model's own step count :math:`t`. Inputs are not modified.

    Attributes:
        name: ``sgd``, ``gd``, ``momentum`` or ``adam``.
        hparams: the hyper-parameters in use (registry defaults overridden by the caller's).
    """

    name: str
    hparams: dict

    @property
    def lr(self) -> float:
        return self.hparams["lr"]

    def init(self, params: dict[str, Tensor]) -> dict:
        """Fresh optimizer state for stacked ``params`` (``{name: (M, ...)}``): step counts ``(M,)`` int64 and,
        as the method needs, ``momentum_buffer`` / ``exp_avg`` / ``exp_avg_sq`` dicts of zeros."""
        m = _n_models("FunctionalOptimizer.init", params)
        dev = next(iter(params.values())).device
        state: dict = {"step": torch.zeros(m, dtype=torch.int64, device=dev)}
        if self.name in ("sgd", "gd", "momentum") and self.hparams.get("momentum", 0.0) > 0:
            state["momentum_buffer"] = {k: torch.zeros_like(v) for k, v in params.items()}
        if self.name == "adam":
            state["exp_avg"] = {k: torch.zeros_like(v) for k, v in params.items()}
            state["exp_avg_sq"] = {k: torch.zeros_like(v) for k, v in params.items()}
        return state

    @torch.no_grad()
    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], state: dict,
             active_mask: Tensor | None = None) -> tuple[dict[str, Tensor], dict]:
        """One update of every active model; returns new ``(params, state)``.

        Args:
            params: stacked parameters ``{name: (M, ...)}``.
            grads: gradients with the same keys and shapes.
            state: from :meth:`init` or a previous :meth:`step`.
            active_mask: ``(M,)`` bool; ``None`` = all models active.

        Raises:
            ValueError: mismatched keys or shapes, or an ``active_mask`` that is not ``(M,)``.
        """
        fn = "FunctionalOptimizer.step"
        m = _n_models(fn, params)
        if set(grads) != set(params):
            raise ValueError(f"{fn}: grads keys {sorted(grads)} differ from params keys {sorted(params)}")
        for k, v in params.items():
            if grads[k].shape != v.shape:
                raise ValueError(f"{fn}: grads[{k!r}] has shape {tuple(grads[k].shape)}, params[{k!r}] "
                                 f"{tuple(v.shape)}; they must match")
        dev = next(iter(params.values())).device
        if active_mask is None:
            mask = torch.ones(m, dtype=torch.bool, device=dev)
        else:
            mask = torch.as_tensor(active_mask, device=dev)
            if mask.shape != (m,):
                raise ValueError(f"{fn}: active_mask has shape {tuple(mask.shape)}; expected ({m},) for {m} models")
            mask = mask.to(torch.bool)
        if active_mask is None:  # every model steps: no selection (torch.where was ~20% of a stacked step)
            def where(rows, new, old):
                return new
        else:
            where = torch.where
        step = where(mask, state["step"] + 1, state["step"])
        new_state: dict = {"step": step}
        lr = self.hparams["lr"]
        new_params: dict[str, Tensor] = {}
        if self.name in ("sgd", "gd", "momentum"):
            mom = self.hparams.get("momentum", 0.0)
            bufs = {}
            for k, p in params.items():
                g = grads[k]
                if mom > 0:
                    b = state["momentum_buffer"][k].mul(mom).add_(g)
                    bufs[k] = where(_row_view(mask, p), b, state["momentum_buffer"][k])
                    g = b
                new_params[k] = where(_row_view(mask, p), torch.add(p, g, alpha=-lr), p)
            if mom > 0:
                new_state["momentum_buffer"] = bufs
        else:  # adam, as torch's single-tensor Adam: per-model bias corrections in float64, then cast
            b1, b2 = self.hparams["betas"]
            eps = self.hparams["eps"]
            wide = torch.float32 if dev.type == "mps" else torch.float64  # MPS has no float64
            t = step.to(wide).clamp(min=1.0)
            bc1 = 1.0 - torch.pow(torch.tensor(b1, dtype=wide, device=dev), t)
            bc2_sqrt = (1.0 - torch.pow(torch.tensor(b2, dtype=wide, device=dev), t)).sqrt()
            step_size = lr / bc1
            ea, eas = {}, {}
            for k, p in params.items():
                g = grads[k]
                rows = _row_view(mask, p)
                e1 = state["exp_avg"][k].lerp(g, 1.0 - b1)
                e2 = state["exp_avg_sq"][k].mul(b2).addcmul_(g, g, value=1.0 - b2)
                denom = (e2.sqrt() / _row_view(bc2_sqrt.to(p.dtype), p)).add_(eps)
                upd = p - _row_view(step_size.to(p.dtype), p) * e1 / denom
                new_params[k] = where(rows, upd, p)
                ea[k] = where(rows, e1, state["exp_avg"][k])
                eas[k] = where(rows, e2, state["exp_avg_sq"][k])
            new_state["exp_avg"], new_state["exp_avg_sq"] = ea, eas
        return new_params, new_state


def _n_models(fn: str, params: dict[str, Tensor]) -> int:
    if not isinstance(params, dict) or not params:
        raise ValueError(f"{fn}: params must be a non-empty dict of stacked tensors {{name: (M, ...)}}")
    ms = {k: (v.shape[0] if v.ndim else None) for k, v in params.items()}
    if len(set(ms.values())) != 1 or None in ms.values():
        raise ValueError(f"{fn}: every stacked parameter needs the same leading dimension M; got {ms}")
    return next(iter(ms.values()))


_FUNCTIONAL_KEYS = {"sgd": ("lr", "momentum"), "gd": ("lr", "momentum"), "momentum": ("lr", "momentum"),
                    "adam": ("lr", "betas", "eps")}


def functional_optimizer(name: str, lr: float | None = None, **kwargs) -> FunctionalOptimizer:
    """A functional optimizer for stacked ensembles, with the registry's defaults (:data:`OPTIMIZERS`).

    Args:
        name: ``sgd``, ``gd`` (same update as ``sgd``; full batch is the caller's business), ``momentum`` or
            ``adam``.
        lr: learning rate (default: the registry default).
        **kwargs: ``momentum`` (sgd, gd, momentum) or ``betas``, ``eps`` (adam).

    Returns:
        A :class:`FunctionalOptimizer`.

    Raises:
        ValueError: an unsupported name (listing the supported ones), an unknown keyword, or an invalid value.

    Example:
        >>> opt = functional_optimizer("sgd", lr=0.5)
        >>> p = {"w": torch.ones(2, 3)}
        >>> st = opt.init(p)
        >>> p, st = opt.step(p, {"w": torch.ones(2, 3)}, st, active_mask=torch.tensor([True, False]))
        >>> p["w"][:, 0].tolist(), st["step"].tolist()
        ([0.5, 1.0], [1, 0])
    """
    fn = "functional_optimizer"
    if name not in FUNCTIONAL_OPTIMIZERS:
        raise ValueError(f"{fn}: optimizer={name!r} has no functional form; supported: {list(FUNCTIONAL_OPTIMIZERS)}"
                         f" (the registry also has {[n for n in OPTIMIZERS if n not in FUNCTIONAL_OPTIMIZERS]}, "
                         f"for single models via make_optimizer)")
    for k in kwargs:
        if k not in _FUNCTIONAL_KEYS[name]:
            raise ValueError(f"{fn}: unknown hyper-parameter {k!r} for {name!r}; accepted: "
                             f"{list(_FUNCTIONAL_KEYS[name])}")
    hp = {**OPTIMIZERS[name].defaults, **kwargs}
    if lr is not None:
        hp["lr"] = lr
    hp = _validate_hparams(fn, hp)
    return FunctionalOptimizer(name, hp)
