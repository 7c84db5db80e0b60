"""Experiment configurations: frozen dataclasses with a ``VERSION``, validated when made.

An experiment's configuration subclasses :class:`RunConfig`::

    @dataclass(frozen=True)
    class TrainConfig(RunConfig):
        VERSION: ClassVar[int] = 1                      # bump when the code's results change
        BATCH_FIELDS: ClassVar[tuple[str, ...]] = ("seed",)  # configs differing only here train as one ensemble
        lr: float = param(0.1, positive=True)            # learning rate
        batch_size: int = param(32, min=1)
        optimizer: str = param("sgd", choices=("sgd", "adam"))
        seed: int = param(0, min=0)

    TrainConfig(lr=-1)  # ValueError: TrainConfig: lr=-1 must be > 0

:func:`with_overrides` casts papermill's strings and floats to each field's type (``"1e6"`` -> ``1000000`` for an
``int`` field) and validates; :func:`profile_config` applies a profile's table of overrides (``smoke``, ``cpu``,
``paper``); :func:`grid` is the Cartesian product of named fields. :func:`flatness.results.config_key` hashes a
config's fields, class name and ``VERSION``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = ["RunConfig", "param", "with_overrides", "profile_config", "grid", "PROFILE_NAMES"]

PROFILE_NAMES = ("smoke", "cpu", "paper")
_MISSING = dataclasses.MISSING


def param(default=_MISSING, *, positive: bool = False, min: float | None = None, max: float | None = None,
          choices=None, doc: str | None = None, default_factory=_MISSING, key_at_default: bool = True) -> Any:
    """A dataclass field with declarative checks, enforced by :meth:`RunConfig.validate`.

    Args:
        default: the default value.
        positive: the value must be > 0.
        min: the value must be >= ``min``.
        max: the value must be <= ``max``.
        choices: the value must be one of these.
        doc: a short description of the field (kept in the field's metadata).
        default_factory: as in :func:`dataclasses.field`.
        key_at_default: ``False`` leaves the field out of :func:`flatness.results.config_key` while it holds its
            default, so a field added to an existing config class keeps every stored key (rows and artifacts
            stay valid); a non-default value is keyed as usual.

    For ``Optional`` fields the checks apply to non-``None`` values; for tuple fields, to every element.
    """
    meta = {"positive": positive, "min": min, "max": max,
            "choices": tuple(choices) if choices is not None else None, "doc": doc, "key_at_default": key_at_default}
    kw = {"metadata": meta}
    if default is not _MISSING:
        kw["default"] = default
    if default_factory is not _MISSING:
        kw["default_factory"] = default_factory
    return dataclasses.field(**kw)


# ------------------------------------------------------------------------------------------------ types
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls) -> dict[str, Any]:
    """The resolved field types of ``cls`` (cached; a name that cannot be resolved counts as ``Any``)."""
    hit = _HINTS.get(cls)
    if hit is None:
        try:
            hit = typing.get_type_hints(cls)
        except (NameError, TypeError):  # e.g. a class defined inside a function, annotated with a local name
            hit = {f.name: (f.type if not isinstance(f.type, str) else Any) for f in dataclasses.fields(cls)}
        _HINTS[cls] = hit
    return hit


def _is_optional(tp) -> tuple[bool, Any]:
    """``(True, X)`` for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, (args[0] if len(args) == 1 else typing.Union[tuple(args)])
    return False, tp


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _cast(where: str, name: str, tp, value):
    """Cast ``value`` (often a string or float from papermill) to ``tp``; raise naming the field."""
    optional, inner = _is_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional or tp is Any:
            return None
        raise TypeError(f"{where}: {name}=None is not allowed; expected {_type_name(tp)}")
    tp = inner
    origin = typing.get_origin(tp)
    try:
        if tp is Any:
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
                return False
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            f = float(value.strip()) if isinstance(value, str) else float(value)
            if not math.isfinite(f) or not f.is_integer():
                raise ValueError
            return int(f)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value.strip()) if isinstance(value, str) else float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if origin is typing.Literal:
            allowed = typing.get_args(tp)
            for a in allowed:
                if value == a or (isinstance(value, str) and not isinstance(a, str) and value == str(a)):
                    return a
            raise ValueError(f"{where}: {name}={value!r} is not allowed; expected one of {list(allowed)}")
        if origin in (tuple, list):
            if isinstance(value, str):
                text = value.strip()
                try:
                    value = json.loads(text)
                except ValueError:
                    value = ast.literal_eval(text if text.startswith(("(", "[")) else f"({text},)")
            if not isinstance(value, (list, tuple)):
                value = (value,)
            args = typing.get_args(tp)
            if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
                elem = [args[0]] * len(value)
            elif origin is tuple and args:
                if len(args) != len(value):
                    raise ValueError(f"{where}: {name}={value!r} must have {len(args)} elements")
                elem = list(args)
            else:
                elem = [args[0] if args else Any] * len(value)
            out = [_cast(where, f"{name}[{i}]", t, v) for i, (t, v) in enumerate(zip(elem, value))]
            return tuple(out) if origin is tuple else out
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):
                return value
            if isinstance(value, str):
                value = json.loads(value)
            if isinstance(value, Mapping):
                return with_overrides(tp(), **value) if _all_defaults(tp) else _make(tp, value)
            raise ValueError
        if isinstance(tp, type):
            if isinstance(value, tp):
                return value
            return tp(value)
        return value
    except (ValueError, TypeError, SyntaxError) as exc:
        if str(exc).startswith(where):
            raise
        raise TypeError(f"{where}: {name}={value!r} cannot be read as {_type_name(tp)}") from None


def _all_defaults(cls) -> bool:
    return all(f.default is not _MISSING or f.default_factory is not _MISSING
               for f in dataclasses.fields(cls) if f.init)


def _make(cls, values: Mapping):
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _check_names(cls.__name__, values, fields)
    return cls(**{k: _cast(cls.__name__, k, hints[k], v) for k, v in values.items()})


def _check_names(where: str, values, fields) -> None:
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; valid fields are {sorted(fields)}")


# ------------------------------------------------------------------------------------------- validation
def _type_ok(tp, value) -> bool:
    optional, inner = _is_optional(tp)
    if value is None:
        return optional or tp is Any
    tp = inner
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin is tuple:
        return isinstance(value, tuple)
    if origin is list:
        return isinstance(value, list)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _check_value(where: str, name: str, value, meta: Mapping) -> None:
    if value is None:
        return
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _check_value(where, f"{name}[{i}]", v, meta)
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{where}: {name}={value!r} is not allowed; allowed values are {list(choices)}")
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if meta.get("positive") and numeric and not value > 0:
        raise ValueError(f"{where}: {name}={value!r} must be > 0")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and numeric and not value >= lo:
        raise ValueError(f"{where}: {name}={value!r} must be >= {lo}")
    if hi is not None and numeric and not value <= hi:
        raise ValueError(f"{where}: {name}={value!r} must be <= {hi}")
    if numeric and isinstance(value, float) and math.isnan(value) and (meta.get("positive") or lo is not None
                                                                        or hi is not None):
        raise ValueError(f"{where}: {name}=nan must be a number")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Base of experiment configurations: frozen, versioned, validated when made.

    Subclasses are ``@dataclass(frozen=True)`` and declare:

    * ``VERSION: ClassVar[int]``: bump it when the code's results change; it is part of the config's key
      (:func:`flatness.results.config_key`), so old rows and artifacts stop counting as done.
    * ``BATCH_FIELDS: ClassVar[tuple[str, ...]]``: fields (e.g. ``("seed", "draw")``) over which
      :func:`flatness.runs.run_sweep` may group configs into one stacked run (its ``batch=`` function).
    * fields with :func:`param` checks (``positive``, ``min``, ``max``, ``choices``), and, for anything else,
      a ``validate()`` override that calls ``super().validate()`` first.

    Every field's type is checked too (an ``int`` field rejects ``0.5``; use :func:`with_overrides` to cast
    strings and floats).
    """

    VERSION: ClassVar[int] = 1
    BATCH_FIELDS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field's type and its :func:`param` constraints; raise naming the field.

        Raises:
            TypeError: a field has the wrong type.
            ValueError: a field breaks its constraint (the message says what is allowed).
        """
        where = type(self).__name__
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = hints.get(f.name, Any)
            if not _type_ok(tp, value):
                raise TypeError(f"{where}: {f.name}={value!r} has type {type(value).__name__}; expected "
                                f"{_type_name(tp)} (with_overrides casts strings and floats)")
            _check_value(where, f.name, value, f.metadata)
        for name in type(self).BATCH_FIELDS:
            if name not in {f.name for f in dataclasses.fields(self)}:
                raise ValueError(f"{where}: BATCH_FIELDS names {name!r}, which is not a field")

    def replace(self, **overrides) -> RunConfig:
        """:func:`with_overrides` as a method."""
        return with_overrides(self, **overrides)

    def to_dict(self) -> dict:
        """The fields as a plain dict (nested configs as dicts)."""
        return dataclasses.asdict(self)


def with_overrides(cfg, **overrides):
    """A copy of the frozen config ``cfg`` with fields replaced, each cast to its field's type and validated.

    Papermill passes strings and floats, so ``"1e6"`` becomes ``1000000`` for an ``int`` field, ``"0.1"`` a
    float, ``"true"`` / ``"false"`` a bool, ``"none"`` or ``None`` is allowed for ``Optional`` fields, and
    ``"[1, 2]"`` or a list becomes a tuple for a tuple field. A nested config field takes a config, a dict of
    its fields, or dotted names: ``with_overrides(cfg, **{"train.lr": 0.1})`` (also ``train__lr=0.1``).
    ``None`` for a non-optional field is an error.

    Args:
        cfg: a dataclass instance (usually a :class:`RunConfig`).
        **overrides: field names and new values.

    Returns:
        The new config (``cfg`` itself is unchanged).

    Raises:
        ValueError: an unknown field (the message lists the valid ones), or a value its checks reject.
        TypeError: a value that cannot be cast to its field's type.
    """
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"with_overrides: cfg must be a dataclass instance, got {type(cfg).__name__}")
    cls = type(cfg)
    fields = {f.name: f for f in dataclasses.fields(cfg) if f.init}
    flat: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for k, v in overrides.items():
        sep = "." if "." in k else ("__" if "__" in k else None)
        if sep is not None:
            head, rest = k.split(sep, 1)
            nested.setdefault(head, {})[rest] = v
        else:
            flat[k] = v
    _check_names(f"with_overrides({cls.__name__})", list(flat) + list(nested), fields)
    hints = _hints(cls)
    new = {k: _cast(cls.__name__, k, hints[k], v) for k, v in flat.items()}
    for head, sub in nested.items():
        base = new.get(head, getattr(cfg, head))
        if not dataclasses.is_dataclass(base):
            raise ValueError(f"with_overrides({cls.__name__}): {head} is not a nested config, so "
                             f"{sorted(sub)} cannot be set inside it")
        new[head] = with_overrides(base, **sub)
    return dataclasses.replace(cfg, **new)


def profile_config(base, profiles: Mapping[str, Mapping[str, Any]], profile: str, **overrides):
    """The config of a profile: ``base`` with the profile's overrides, then ``overrides``.

    Args:
        base: a config class (its defaults are used) or a config instance.
        profiles: ``{profile name: {field: value}}``, e.g. ``{"smoke": {...}, "cpu": {...}, "paper": {}}``;
            a profile overrides only what differs from the defaults.
        profile: which profile.
        **overrides: further fields (e.g. papermill parameters); ``None`` values are ignored, so a notebook
            can pass all its parameters and leave the ones it does not set as ``None``.

    Raises:
        ValueError: an unknown profile (the message lists the known ones) or field.
    """
    if profile not in profiles:
        raise ValueError(f"profile_config: unknown profile={profile!r}; allowed values are {list(profiles)}")
    cfg = base() if isinstance(base, type) else base
    cfg = with_overrides(cfg, **dict(profiles[profile]))
    return with_overrides(cfg, **{k: v for k, v in overrides.items() if v is not None})


def grid(base, **axes) -> list:
    """Every combination of the values of the named fields (the Cartesian product), in a fixed order.

    The first axis varies slowest (as :func:`itertools.product`); each value is cast and validated through
    :func:`with_overrides`. ``grid(cfg, lr=[0.1, 0.01], seed=range(3))`` gives 6 configs:
    ``(0.1, 0), (0.1, 1), (0.1, 2), (0.01, 0), ...``.

    Raises:
        ValueError: an axis that is empty, or an unknown field.
        TypeError: an axis that is not a list, tuple or range of values.
    """
    import itertools

    names = list(axes)
    values = []
    for name in names:
        vals = axes[name]
        if isinstance(vals, (str, bytes, Mapping)) or not hasattr(vals, "__iter__"):
            raise TypeError(f"grid: axis {name}={vals!r} must be a list, tuple or range of values")
        vals = list(vals)
        if not vals:
            raise ValueError(f"grid: axis {name} is empty; give at least one value")
        values.append(vals)
    return [with_overrides(base, **dict(zip(names, combo))) for combo in itertools.product(*values)]
