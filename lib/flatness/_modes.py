"""Train/eval mode handling shared by every measurement: evaluate in eval mode, restore every flag after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Put every submodule of ``model`` in eval mode for the block (when ``enabled``); afterwards restore each
    submodule's own ``training`` flag, so models with mixed modes come back exactly as they were."""
    if not enabled:
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, t in flags:
            m.training = t
