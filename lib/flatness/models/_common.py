"""Small helpers shared by the model files."""

from __future__ import annotations

import operator


def check_seed(fn: str, seed) -> int:
    """``seed`` as a Python ``int`` (NumPy integers accepted); ``TypeError`` naming the parameter otherwise."""
    if isinstance(seed, bool):
        raise TypeError(f"{fn}: seed={seed!r} must be an integer, got a bool")
    try:
        return operator.index(seed)
    except TypeError:
        raise TypeError(f"{fn}: seed={seed!r} must be an integer (e.g. seed=0), got {type(seed).__name__}") from None
