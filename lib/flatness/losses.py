"""Loss functions with the conventions of the two papers.

Every loss is a pure function ``loss(outputs, targets) -> scalar`` (mean over the batch), so that it
composes with :func:`torch.func.functional_call`, ``vmap`` and Hessian-vector products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_bce(logits: Tensor, y: Tensor) -> Tensor:
    """Mean sigmoid cross-entropy for binary labels (Zhang et al. 2021, all experiments).

    Args:
        logits: ``(N,)`` or ``(N, 1)`` real outputs.
        y: ``(N,)`` labels in {0, 1} (any dtype).
    """
    return F.binary_cross_entropy_with_logits(logits.reshape(-1), y.reshape(-1).to(logits.dtype))


def half_mse(outputs: Tensor, y: Tensor) -> Tensor:
    r"""Half squared error against one-hot targets, averaged over examples (Chen et al. 2023).

    .. math:: L = \frac{1}{2n} \sum_i \lVert f(x_i) - e_{y_i} \rVert^2

    With this normalisation the Hessian at an interpolation minimum is the Gauss-Newton matrix
    :math:`\frac1n \sum_i J_i^\top J_i`, so :math:`\operatorname{Tr} H = \frac1n \sum_i \lVert \nabla_\theta f(x_i)\rVert_F^2`,
    Chen et al.'s eq. (zloss_sharpness). ``y`` may be integer class labels ``(N,)`` (one-hot encoded when
    there are several outputs; the target value itself for a single output) or targets ``(N, K)``. The one-hot
    encoding is a comparison with ``arange`` (not ``F.one_hot``), so the loss also runs under ``vmap`` (stacked
    ensembles); a label outside ``[0, K)`` therefore gives an all-zero target instead of an error (the trainers
    check labels before training: ``flatness._checks.check_labels``).
    """
    if y.ndim == 1 and outputs.ndim == 2 and outputs.shape[1] > 1 and not y.is_floating_point():
        y = (y.unsqueeze(-1) == torch.arange(outputs.shape[1], device=outputs.device)).to(outputs.dtype)
    return 0.5 * (outputs - y.reshape(outputs.shape).to(outputs.dtype)).pow(2).sum() / outputs.shape[0]


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean softmax cross-entropy for integer labels ``(N,)`` and logits ``(N, K)``."""
    return F.cross_entropy(logits, y.long())


def zero_one_error(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of misclassified examples: sign threshold for one output, argmax for several."""
    if logits.ndim == 1 or logits.shape[-1] == 1:
        pred = (logits.reshape(-1) > 0).long()
    else:
        pred = logits.argmax(-1)
    return (pred != y.reshape(-1).long()).float().mean()
