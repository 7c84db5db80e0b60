"""Input validation shared by the whole package.

Every check raises ``ValueError`` (or ``TypeError`` for wrong types) with a message of the form
``"<function>: <parameter>=<got> <what is wrong>; expected <what is allowed>"``, so that a user sees
which argument to change and to what.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def check_choice(fn: str, name: str, value, allowed: Iterable) -> None:
    """Raise unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{fn}: unknown {name}={value!r}; allowed values are {allowed}")


def check_int(fn: str, name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Raise unless ``value`` is an integer in ``[minimum, maximum]``; return it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise TypeError(f"{fn}: {name}={value!r} must be an integer")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name}={value} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{fn}: {name}={value} exceeds the maximum {maximum}")
    return value


def check_positive(fn: str, name: str, value, *, allow_zero: bool = False) -> float:
    """Raise unless ``value`` is a finite real number > 0 (or >= 0 with ``allow_zero``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name}={value!r} must be a real number") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{fn}: {name}={value!r} must be finite and {bound}")
    return v


def check_finite(fn: str, name: str, t: Tensor) -> None:
    """Raise if a tensor holds NaN or infinite values."""
    if not torch.is_tensor(t):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex():
        if not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{fn}: {name} holds {n_bad} non-finite value(s) (NaN or inf)")


def check_same_length(fn: str, names: Sequence[str], *tensors: Tensor) -> None:
    """Raise unless all tensors share their first dimension."""
    lengths = [len(t) for t in tensors]
    if len(set(lengths)) > 1:
        got = ", ".join(f"{n}: {l}" for n, l in zip(names, lengths))
        raise ValueError(f"{fn}: first dimensions differ ({got}); they must be equal")


def check_data(fn: str, data) -> tuple[Tensor, Tensor]:
    """Validate a ``(x, y)`` pair of tensors with matching first dimension and finite ``x``."""
    try:
        x, y = data
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: data must be a pair (x, y) of tensors, got {type(data).__name__}") from None
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise TypeError(f"{fn}: data must be a pair (x, y) of tensors")
    if len(x) == 0:
        raise ValueError(f"{fn}: data is empty (x has 0 rows); expected at least one example")
    check_same_length(fn, ("x", "y"), x, y)
    check_finite(fn, "x", x)
    return x, y


def check_finite_params(fn: str, model) -> None:
    """Raise if any parameter (or floating buffer) of ``model`` holds NaN or infinite values, naming the tensor."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                n_bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"{fn}: model {kind} {name!r} holds {n_bad} non-finite value(s) (NaN or inf); "
                                 f"a model with non-finite weights (e.g. from a diverged run) cannot be measured")


def check_labels(fn: str, loss_fn, y: Tensor, n_outputs: int | None = None) -> None:
    """Raise unless labels ``y`` are valid for ``loss_fn`` (one of :mod:`flatness.losses`; others pass through).

    ``sigmoid_bce``: finite values in {0, 1} (or probabilities in [0, 1]). ``cross_entropy``: integer classes in
    ``[0, n_outputs)``. ``half_mse``: finite values, integer classes in ``[0, n_outputs)`` or targets of any shape.
    """
    from . import losses  # local: losses does not depend on _checks

    if not torch.is_tensor(y):
        raise TypeError(f"{fn}: labels y must be a torch.Tensor, got {type(y).__name__}")
    if (y.is_floating_point() or y.is_complex()) and not bool(torch.isfinite(y).all()):
        raise ValueError(f"{fn}: labels y hold {int((~torch.isfinite(y)).sum())} non-finite value(s) (NaN or inf)")
    if loss_fn is losses.sigmoid_bce:
        if y.numel() and (bool((y < 0).any()) or bool((y > 1).any())):
            got = sorted({float(v) for v in torch.unique(y)[:6].tolist()})
            raise ValueError(f"{fn}: labels y must lie in {{0, 1}} for sigmoid_bce; got values {got}")
    elif loss_fn is losses.cross_entropy or (loss_fn is losses.half_mse and y.ndim == 1 and not y.is_floating_point()):
        if y.is_floating_point() and not bool((y == y.round()).all()):
            raise ValueError(f"{fn}: labels y must be integer class indices for {loss_fn.__name__}")
        if y.numel() and n_outputs is not None and n_outputs > 1 and (int(y.min()) < 0 or int(y.max()) >= n_outputs):
            raise ValueError(f"{fn}: labels y must be class indices in [0, {n_outputs - 1}] for {loss_fn.__name__} "
                             f"with {n_outputs} outputs; got min {int(y.min())}, max {int(y.max())}")


def check_widths(fn: str, widths, example: str = "(784, 40, 40, 1)") -> tuple[int, ...]:
    """Raise unless ``widths`` is a sequence of at least two positive integer layer widths; return it as a tuple."""
    try:
        widths = tuple(widths)
    except TypeError:
        raise TypeError(f"{fn}: widths={widths!r} must be a sequence of layer widths, e.g. {example}") from None
    if len(widths) < 2:
        raise ValueError(f"{fn}: widths={widths} needs at least an input and an output width, e.g. {example}")
    return tuple(check_int(fn, f"widths[{i}]", w, minimum=1) for i, w in enumerate(widths))
