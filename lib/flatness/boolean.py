"""Boolean functions on {0,1}^n: the input order and the encoding of functions as bit strings.

Zhang et al. 2021, Section 5.1: a function of the n = 7 system is its vector of outputs on all 128
inputs, i.e. a 128-bit string. Conventions used throughout the package:

- input ``i`` (``0 <= i < 2**n``) is the binary expansion of ``i``, most significant bit first:
  ``boolean_inputs(3)[5] == [1, 0, 1]``;
- a function is the output vector ``y`` with ``y[i] = f(input i)`` in {0, 1};
- its hex string is the integer with bits ``y[0] y[1] ... y[2**n - 1]`` (``y[0]`` most significant),
  written with ``ceil(2**n / 4)`` hex digits: the constant-0 function of n = 7 is ``"0" * 32``;
- packed words (used by the sampler): word ``j`` holds ``y[64 j : 64 j + 64]`` the same way, as int64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_int

__all__ = ["MAX_N", "boolean_inputs", "function_to_hex", "hex_to_function", "pack_bits", "packed_to_hex"]

MAX_N = 20  #: the largest number of inputs n the encoding helpers (and the prior sampler) accept


def boolean_inputs(n: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """All ``2**n`` points of {0,1}^n in the package's fixed order, shape ``(2**n, n)``."""
    n = check_int("boolean_inputs", "n", n, minimum=1, maximum=MAX_N)
    i = torch.arange(2**n, device=device)
    shifts = torch.arange(n - 1, -1, -1, device=device)
    return ((i[:, None] >> shifts) & 1).to(dtype)


def _n_from_length(fn: str, length: int) -> int:
    n = length.bit_length() - 1
    if length < 2 or 2**n != length:
        raise ValueError(f"{fn}: a function on {{0,1}}^n has 2**n outputs; got a vector of length {length}")
    return n


def function_to_hex(y) -> str:
    """Hex string of an output vector ``y`` of length ``2**n`` with entries in {0, 1} (or booleans)."""
    y = torch.as_tensor(y).reshape(-1)
    length = len(y)
    _n_from_length("function_to_hex", length)
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("function_to_hex: y must hold only 0/1 values")
    bits = "".join("1" if int(v) else "0" for v in y.tolist())
    return format(int(bits, 2), f"0{(length + 3) // 4}x")


def hex_to_function(h: str, n: int) -> Tensor:
    """Output vector (int64 0/1, length ``2**n``) of a hex string produced by :func:`function_to_hex`."""
    n = check_int("hex_to_function", "n", n, minimum=1, maximum=MAX_N)
    length = 2**n
    if len(h) != (length + 3) // 4:
        raise ValueError(f"hex_to_function: h has {len(h)} hex digits; expected {(length + 3) // 4} for n={n}")
    value = int(h, 16)
    if value >> length:
        raise ValueError(f"hex_to_function: h={h!r} has more than 2**{n} bits")
    bits = format(value, f"0{length}b")
    return torch.tensor([int(c) for c in bits], dtype=torch.int64)


def pack_bits(bits: Tensor) -> Tensor:
    """Pack boolean outputs ``(..., L)`` into int64 words ``(..., ceil(L / 64))`` (see module doc).

    ``L`` must be a power of two (``L <= 64`` gives a single word holding ``L`` bits).
    """
    L = bits.shape[-1]
    _n_from_length("pack_bits", L)
    w = min(L, 64)
    words = bits.reshape(*bits.shape[:-1], L // w, w).to(torch.int64)
    weights = torch.ones(w, dtype=torch.int64, device=bits.device) << torch.arange(
        w - 1, -1, -1, device=bits.device, dtype=torch.int64)
    # Summing distinct powers of two never carries, so int64 wrap-around of bit 63 is exact.
    return (words * weights).sum(-1)


def packed_to_hex(words: Tensor, n: int) -> list[str]:
    """Hex strings of packed functions ``(M, W)`` (as returned by :func:`pack_bits`) on {0,1}^n."""
    n = check_int("packed_to_hex", "n", n, minimum=1, maximum=MAX_N)
    L = 2**n
    digits = (min(L, 64) + 3) // 4
    rows = words.reshape(len(words), -1).cpu().tolist()
    return ["".join(format(v & 0xFFFFFFFFFFFFFFFF, f"0{digits}x") for v in row) for row in rows]
