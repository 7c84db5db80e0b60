r"""Direct sampling of the prior over Boolean functions :math:`P(f)` of a ReLU FCN.

Zhang et al. 2021, Section 5.1 (Boolean :math:`n = 7` system, FCN 7-40-40-1) and Definition 2.3: the prior
of a function is the probability that parameters drawn from the initialisation distribution produce it,

.. math:: P(f) = \Pr_{\theta \sim p(\theta)}\bigl[\, \mathbb 1[F_\theta(x) > 0] = f(x)\ \ \forall x \in \{0,1\}^n \bigr],

estimated by the frequency :math:`\hat P(f) = N_f / N` over :math:`N` i.i.d. networks. The parameter
distribution is exactly the one of :class:`flatness.models.FCN`: weights :math:`W_l \sim N(0, \sigma_w^2/d_{l-1})`,
biases :math:`b_l \sim N(0, \sigma_b^2)`, ReLU hidden layers, a single output thresholded at 0
(output ``> 0`` gives 1; an output exactly 0 gives 0).

**Rescaled forward pass (exact).** Write :math:`W_l = \frac{\sigma_w}{\sqrt{d_{l-1}}} Z_l`, :math:`b_l = \sigma_b \zeta_l`
with standard normal :math:`Z_l, \zeta_l`, and :math:`c_l = \prod_{k \le l} \sigma_w / \sqrt{d_{k-1}}`. Since ReLU is
positively homogeneous, induction on :math:`l` gives :math:`h_l = c_l\, g_l` with

.. math:: g_0 = x, \quad u_l = Z_l\, g_{l-1} + r_l\, \zeta_l, \quad g_l = \mathrm{ReLU}(u_l), \quad
          r_l = \frac{\sigma_b}{c_l} = \frac{\sigma_b \sqrt{d_0 d_1 \cdots d_{l-1}}}{\sigma_w^{\,l}},

and the output is :math:`c_L u_L` with :math:`c_L > 0`: the sampled function is
:math:`\mathbb 1[u_L > 0]`. The sampler therefore draws only standard normals and scales the biases by
:math:`r_l` (81 of the 2001 numbers of a 7-40-40-1 net). Consequences for the hyper-parameters:

- the function distribution depends on :math:`(\sigma_w, \sigma_b)` only through :math:`(r_1, \dots, r_L)`;
- :math:`\sigma_b = 0`: all :math:`r_l = 0` and :math:`\sigma_w` is irrelevant;
- no hidden layer (``widths=(n, 1)``): only the ratio :math:`\sigma_b/\sigma_w` matters;
- with hidden layers the ratio alone does **not** determine the prior: scaling :math:`(\sigma_w, \sigma_b)` by
  :math:`\alpha` multiplies :math:`r_l` by :math:`\alpha^{1-l}`, shrinking the deeper biases. (Positive rescaling of the
  last layer alone, or Dinh's compensated :math:`\alpha`-scaling of a hidden layer, leaves every function unchanged.)

Defaults :math:`\sigma_w = \sqrt 2, \sigma_b = 1` are :class:`~flatness.models.FCN`'s, i.e. the initialisation that SGD
starts from and the values of Zhang et al.'s Appendix D kernel; related work used :math:`\sigma_w = 1`,
:math:`\sigma_b \in \{0, 1\}` (reference sheet). Both are parameters.

**Random stream.** Networks are drawn in chunks of ``chunk`` networks; chunk ``k`` takes its normals from random
stream ``k mod 64``, a private generator on ``device`` seeded with ``64 * seed + k mod 64`` (seeds of distinct
``(seed, stream)`` pairs are distinct 32-bit integers, so different seeds never share a stream). The sampled
counts are a deterministic function of ``(seed, device type, chunk, widths, sigma_w, sigma_b, dtype, n_samples)``;
they do **not** depend on the number of CPU worker threads. A different ``chunk`` (or device) gives a different,
statistically equivalent sample; runs with the same seed share networks, so pool runs of distinct seeds
(:meth:`FunctionCounts.merge` checks). Results agree across machines up to floating-point rounding in the
matrix products (an output within rounding error of 0 may change sign).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_positive, check_widths
from .._device import resolve_device
from ..boolean import MAX_N, boolean_inputs, pack_bits

__all__ = ["FunctionCounts", "sample_function_counts"]

_N_STREAMS = 64  # random streams; also the most CPU worker threads used
_MAX_SEED = 2**32 // _N_STREAMS - 1  # 64 * seed + stream must fit in the 32-bit seed of the CPU generator
# Elements of one hidden-activation buffer (chunk * 2**n * width) per chunk: the CPU value keeps a worker's
# buffers near its L2 cache (64 nets of 7-40-40-1), the CUDA value fills the GPU (32768 nets of 7-40-40-1).
_CHUNK_ELEMS = {"cpu": 64 * 128 * 40, "cuda": 2**15 * 128 * 40}
_MAX_CHUNK = {"cpu": 2**14, "cuda": 2**20}  # networks per chunk when the networks are tiny
# Bytes of thresholded outputs a worker collects before packing them, and the least number of packed
# functions it collects before merging them into the table (at least the table's size, so that merging,
# a sort, costs O(log) per network and memory stays O(distinct functions)).
_BITS_BYTES = {"cpu": 2**23, "cuda": 2**28}
_MERGE_ROWS = {"cpu": 2**18, "cuda": 2**24}
_META_KEY = b"flatness.function_counts"


# ----------------------------------------------------------------------------------------------------------
# FunctionCounts
# ----------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class FunctionCounts:
    r"""Sampled counts of Boolean functions: the empirical prior :math:`\hat P(f) = N_f / N`.

    Attributes:
        table: DataFrame with columns ``function`` (hex string, :mod:`flatness.boolean` encoding) and ``count``
            (int64), sorted by count descending, ties by hex ascending. Unseen functions are absent.
        n_samples: number :math:`N` of sampled networks (the counts sum to it).
        n: number of Boolean inputs (``2**n`` points).
        widths: network widths, ``widths[0] == n`` and ``widths[-1] == 1``.
        sigma_w: weight scale :math:`\sigma_w` (weights :math:`N(0, \sigma_w^2 / \text{fan-in})`).
        sigma_b: bias scale :math:`\sigma_b`.
        seed: the seed of the run, or a sorted tuple of the seeds of merged runs.
        runs: one dict per contributing run (seed, n_samples, device, chunk, dtype), for provenance.

    Example:
        >>> fc = sample_function_counts((1, 1), n_samples=1000, progress=False)
        >>> int(fc.table["count"].sum())
        1000
    """

    table: pd.DataFrame
    n_samples: int
    n: int
    widths: tuple[int, ...]
    sigma_w: float
    sigma_b: float
    seed: int | tuple[int, ...]
    runs: tuple[dict, ...] = field(default=())
    _index: pd.Index | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        fn = "FunctionCounts"
        self.widths = tuple(int(w) for w in self.widths)
        self.sigma_w, self.sigma_b = float(self.sigma_w), float(self.sigma_b)
        self.n = check_int(fn, "n", self.n, minimum=1, maximum=MAX_N)
        self.n_samples = check_int(fn, "n_samples", self.n_samples, minimum=1)
        if not self.widths or self.widths[0] != self.n or self.widths[-1] != 1:
            raise ValueError(f"{fn}: widths={self.widths} must start with n={self.n} and end with 1")
        if not isinstance(self.table, pd.DataFrame) or not {"function", "count"} <= set(self.table.columns):
            raise ValueError(f"{fn}: table must be a DataFrame with columns 'function' and 'count'")
        table = self.table[["function", "count"]].copy()
        table["function"] = table["function"].astype(str).str.lower()
        table["count"] = table["count"].astype(np.int64)
        total = int(table["count"].sum())
        if total != self.n_samples:
            raise ValueError(f"{fn}: the counts sum to {total}; expected n_samples={self.n_samples}")
        if (table["count"] <= 0).any() or table["function"].duplicated().any():
            raise ValueError(f"{fn}: table must hold each function once with a positive count")
        self.table = table.sort_values(["count", "function"], ascending=[False, True], kind="stable",
                                       ignore_index=True)
        self.seed = int(self.seed) if np.ndim(self.seed) == 0 else tuple(sorted(int(s) for s in self.seed))
        self.runs = tuple(dict(r) for r in self.runs)

    # -- basic views ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of distinct functions seen."""
        return len(self.table)

    def __repr__(self) -> str:
        return (f"FunctionCounts(n={self.n}, widths={self.widths}, sigma_w={self.sigma_w:.4g}, "
                f"sigma_b={self.sigma_b:.4g}, seed={self.seed}, n_samples={self.n_samples}, "
                f"distinct={len(self)})")

    @property
    def config(self) -> dict:
        """The prior's configuration: ``n``, ``widths``, ``sigma_w``, ``sigma_b`` (what merging requires equal)."""
        return {"n": self.n, "widths": self.widths, "sigma_w": self.sigma_w, "sigma_b": self.sigma_b}

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seed(s) as a tuple."""
        return self.seed if isinstance(self.seed, tuple) else (self.seed,)

    @property
    def frequencies(self) -> pd.Series:
        r"""Empirical prior :math:`\hat P(f) = N_f/N`, a Series indexed by function hex, sorted descending."""
        return pd.Series(self.table["count"].to_numpy() / self.n_samples,
                         index=pd.Index(self.table["function"], name="function"), name="frequency")

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` most frequent functions: columns ``function``, ``count``, ``frequency``, ``log10_prior``."""
        k = check_int("FunctionCounts.top", "k", k, minimum=1)
        out = self.table.head(k).copy()
        out["frequency"] = out["count"] / self.n_samples
        out["log10_prior"] = np.log10(out["frequency"])
        return out

    # -- lookups ------------------------------------------------------------------------------------------
    def _hexes(self, function) -> tuple[list[str], bool]:
        """Normalise ``function`` to a list of hex strings; the flag says whether one function was given."""
        fn = "FunctionCounts.log_prior"
        L = 2**self.n
        digits = (L + 3) // 4 if L < 64 else L // 4
        if isinstance(function, str):
            hexes, single = [function], True
        elif (isinstance(function, (list, tuple, pd.Series, pd.Index, np.ndarray)) and len(function)
              and all(isinstance(h, str) for h in function)):
            hexes, single = [str(h) for h in function], False
        else:
            y = torch.as_tensor(np.asarray(function) if not torch.is_tensor(function) else function)
            single = y.ndim == 1
            y = y.reshape(1, -1) if single else y
            if y.ndim != 2 or y.shape[1] != L:
                raise ValueError(f"{fn}: function has shape {tuple(y.shape)}; expected ({L},) or (M, {L}) "
                                 f"0/1 outputs for n={self.n}, or hex strings")
            if not bool(((y == 0) | (y == 1)).all()):
                raise ValueError(f"{fn}: function must hold only 0/1 values")
            hexes = _keys_to_hex(pack_bits(y.bool().cpu()).numpy(), self.n)
            return hexes, single
        out = []
        for h in hexes:
            h = h.lower()
            if len(h) != digits or any(c not in "0123456789abcdef" for c in h) or int(h, 16) >> L:
                raise ValueError(f"{fn}: function={h[:40]!r} is not the hex string of a function on "
                                 f"{{0,1}}^{self.n}; expected {digits} hex digits (see flatness.boolean)")
            out.append(h)
        return out, single

    def counts_of(self, function) -> int | np.ndarray:
        """Count :math:`N_f` of a function (hex string or 0/1 vector) or of several; 0 when unseen."""
        hexes, single = self._hexes(function)
        if self._index is None:
            self._index = pd.Index(self.table["function"])
        pos = self._index.get_indexer(hexes)
        counts = np.where(pos >= 0, self.table["count"].to_numpy()[np.maximum(pos, 0)], 0).astype(np.int64)
        return int(counts[0]) if single else counts

    def log_prior(self, function) -> float | np.ndarray:
        r"""Natural log of the empirical prior, :math:`\ln (N_f / N)`.

        Args:
            function: a hex string, a 0/1 output vector ``(2**n,)`` (tensor, array or list), or several:
                a list of hex strings or an array ``(M, 2**n)``.
        Returns:
            A float (one function) or an array ``(M,)``. An unseen function gives ``-inf``; a one-sided
            upper confidence bound for such a function is :meth:`unseen_log_prior_bound`.
        Raises:
            ValueError: a string that is not a hex function on ``{0,1}^n`` or a vector of the wrong length.
        """
        counts = self.counts_of(function)
        with np.errstate(divide="ignore"):
            out = np.log(np.asarray(counts, dtype=np.float64)) - math.log(self.n_samples)
        return float(out) if np.ndim(out) == 0 else out

    def log10_prior(self, function) -> float | np.ndarray:
        r""":math:`\log_{10}(N_f / N)`; see :meth:`log_prior`."""
        return self.log_prior(function) / math.log(10.0)

    def unseen_log_prior_bound(self, confidence: float = 0.95) -> float:
        r"""Natural log of the exact binomial upper bound on :math:`P(f)` of a function never sampled.

        .. math:: \Pr[N_f = 0] = (1 - p)^N \ge 1 - \text{confidence} \iff p \le 1 - (1-\text{confidence})^{1/N}
                  \approx \frac{-\ln(1-\text{confidence})}{N}
        """
        c = check_positive("FunctionCounts.unseen_log_prior_bound", "confidence", confidence)
        if c >= 1:
            raise ValueError(f"FunctionCounts.unseen_log_prior_bound: confidence={confidence} must be < 1")
        return math.log(-math.expm1(math.log1p(-c) / self.n_samples))

    # -- merging ------------------------------------------------------------------------------------------
    def merge(self, other: FunctionCounts) -> FunctionCounts:
        """Pool the counts of two independent runs of the same prior (to extend or resume sampling).

        Raises:
            ValueError: different configurations (``n``, ``widths``, ``sigma_w``, ``sigma_b``), or shared seeds
                (the same seed reuses the same random stream, so the pooled networks would not be independent).
        """
        fn = "FunctionCounts.merge"
        if not isinstance(other, FunctionCounts):
            raise TypeError(f"{fn}: other must be a FunctionCounts, got {type(other).__name__}")
        if self.config != other.config:
            raise ValueError(f"{fn}: configurations differ ({self.config} vs {other.config}); they must be equal")
        shared = set(self.seeds) & set(other.seeds)
        if shared:
            raise ValueError(f"{fn}: seed(s) {sorted(shared)} occur in both; runs to pool need distinct seeds")
        both = pd.concat([self.table, other.table], ignore_index=True)
        table = both.groupby("function", sort=False, as_index=False)["count"].sum()
        return FunctionCounts(table, self.n_samples + other.n_samples, self.n, self.widths, self.sigma_w,
                              self.sigma_b, self.seeds + other.seeds, self.runs + other.runs)

    __add__ = merge

    # -- persistence --------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write to a parquet file (the table, with the configuration in the schema metadata).

        Atomic: written to a temporary file beside ``path``, then renamed, so an interrupted write never
        leaves a truncated file that a later run would load.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        meta = {"n_samples": self.n_samples, "n": self.n, "widths": list(self.widths), "sigma_w": self.sigma_w,
                "sigma_b": self.sigma_b, "seed": list(self.seeds) if isinstance(self.seed, tuple) else self.seed,
                "runs": list(self.runs)}
        tab = pa.Table.from_pandas(self.table, preserve_index=False)
        tab = tab.replace_schema_metadata({**(tab.schema.metadata or {}), _META_KEY: json.dumps(meta).encode()})
        tmp = f"{path}.tmp-{os.getpid()}"
        pq.write_table(tab, tmp)
        os.replace(tmp, str(path))

    @classmethod
    def load(cls, path) -> FunctionCounts:
        """Read a file written by :meth:`save`."""
        import pyarrow.parquet as pq

        tab = pq.read_table(str(path))
        raw = (tab.schema.metadata or {}).get(_META_KEY)
        if raw is None:
            raise ValueError(f"FunctionCounts.load: {path} holds no FunctionCounts metadata; expected a file "
                             "written by FunctionCounts.save")
        meta = json.loads(raw)
        seed = tuple(meta["seed"]) if isinstance(meta["seed"], list) else meta["seed"]
        return cls(tab.to_pandas(), meta["n_samples"], meta["n"], tuple(meta["widths"]), meta["sigma_w"],
                   meta["sigma_b"], seed, tuple(meta.get("runs", ())))


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _keys_to_hex(keys: np.ndarray, n: int) -> list[str]:
    """Hex strings of packed functions ``(M, W)`` int64 (vectorised :func:`flatness.boolean.packed_to_hex`)."""
    L = 2**n
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    M, W = keys.shape
    digits = 16 * W if L >= 64 else (L + 3) // 4  # L < 64: one word holding L bits, keep its last digits
    skip = 16 * W - digits
    out: list[str] = []
    for i in range(0, M, 2**16):  # blockwise: temporaries stay small however many functions there are
        text = keys[i: i + 2**16].astype(">u8").tobytes().hex()  # 16 digits per word, big-endian
        R = 16 * W
        out.extend(text[j + skip: j + R] for j in range(0, len(text), R))
    return out


def _unique_rows(keys: Tensor, counts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Distinct rows of ``keys`` ``(M, W)`` (lexicographically sorted) and their total counts ``(K,)``.

    ``counts`` ``(M,)`` are per-row weights (default 1). Sort-based: ``W`` stable argsorts, much faster than
    ``torch.unique(dim=0)``.
    """
    M, W = keys.shape
    if M == 0:
        return keys, torch.zeros(0, dtype=torch.int64, device=keys.device)
    order = torch.sort(keys[:, W - 1]).indices
    for j in range(W - 2, -1, -1):
        order = order[torch.sort(keys[order, j], stable=True).indices]
    s = keys[order]
    new = torch.ones(M, dtype=torch.bool, device=keys.device)
    new[1:] = (s[1:] != s[:-1]).any(1)
    starts = torch.nonzero(new).squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([M], device=keys.device)])
    if counts is None:
        c = ends - starts
    else:
        cs = torch.cumsum(counts[order], 0)
        c = cs[ends - 1] - torch.cat([torch.zeros(1, dtype=cs.dtype, device=cs.device), cs[ends[:-1] - 1]])
    return s[starts], c


def _bias_scales(widths: Sequence[int], sigma_w: float, sigma_b: float) -> list[float]:
    """:math:`r_l = \\sigma_b / \\prod_{k \\le l} (\\sigma_w / \\sqrt{d_{k-1}})` for each layer (module doc)."""
    r, c = [], 1.0
    for d_in in widths[:-1]:
        c *= sigma_w / math.sqrt(d_in)
        r.append(sigma_b / c)
    return r


class _Tally:
    """Thread-safe table of distinct packed functions and their counts (on the sampling device)."""

    def __init__(self, n_words: int, device: torch.device):
        self.keys = torch.empty((0, n_words), dtype=torch.int64, device=device)
        self.counts = torch.empty(0, dtype=torch.int64, device=device)
        self.lock = threading.Lock()

    def add(self, keys: list[Tensor]) -> int:
        """Count the rows of ``keys`` (packed functions, one per network); return the number of distinct ones."""
        with self.lock:
            ones = [torch.ones(len(k), dtype=torch.int64, device=k.device) for k in keys]
            self.keys, self.counts = _unique_rows(torch.cat([self.keys, *keys]), torch.cat([self.counts, *ones]))
            return len(self.keys)


def _pack_rows(bits: Tensor) -> Tensor:
    """:func:`flatness.boolean.pack_bits` of ``(M, L)`` booleans, via bytes when ``L >= 64`` (4x faster).

    Each group of 8 outputs becomes a byte (first output most significant); reversing the 8 bytes of a word and
    reading them as a little-endian int64 puts output ``64 j`` in the most significant bit of word ``j``.
    """
    M, L = bits.shape
    step = max(1, (2**22 if L < 64 else 2**26) // L)  # bounds the temporaries (int64 ones in pack_bits)
    if M > step:
        return torch.cat([_pack_rows(bits[i: i + step]) for i in range(0, M, step)])
    if L < 64 or sys.byteorder != "little":
        return pack_bits(bits)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    by = (bits.view(torch.uint8).view(M, L // 64, 8, 8) * weights).sum(-1, dtype=torch.uint8)
    return by.flip(-1).contiguous().view(torch.int64).view(M, L // 64)


def _layout(widths: Sequence[int]) -> tuple[int, int]:
    """(normals per network, biases per network): weights ``Z_l`` of all layers first, then all biases."""
    n_weights = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    return n_weights + sum(widths[1:]), sum(widths[1:])


def _param_views(buf: Tensor, m: int, widths: Sequence[int]) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Views of the first ``m * n_params`` normals of ``buf``.

    Returns ``[(Z_l (m, d_l, d_{l-1}), zeta_l (m, d_l, 1)), ...]`` and the bias block ``(m, sum d_l)`` (so that
    all biases are scaled by one multiplication).
    """
    n_params, n_bias = _layout(widths)
    o, zs = 0, []
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        zs.append(buf[o: o + m * d_out * d_in].view(m, d_out, d_in))
        o += m * d_out * d_in
    bias = buf[o: o + m * n_bias].view(m, n_bias)
    views, j = [], 0
    for z, d_out in zip(zs, widths[1:]):
        views.append((z, bias[:, j: j + d_out].unsqueeze(-1)))
        j += d_out
    return views, bias


def _bias_vector(widths: Sequence[int], scales: list[float], dtype, device) -> Tensor:
    """Per-bias multipliers ``(sum d_l,)``: :math:`r_l` for hidden layers, :math:`-r_L` for the output threshold."""
    r = [s for s, d in zip(scales[:-1], widths[1:-1]) for _ in range(d)] + [-scales[-1]]
    return torch.tensor(r, dtype=dtype, device=device)


def _forward_signs(views: list[tuple[Tensor, Tensor]], xT: Tensor, hidden: list[Tensor], out: Tensor,
                   bits: Tensor) -> Tensor:
    """Outputs > 0 of ``m`` rescaled networks on all inputs, written to ``bits`` ``(m, 2**n)``.

    ``views`` hold ``Z_l`` and the already scaled biases ``r_l zeta_l`` (last layer: ``-r_L zeta_L``). Layout
    features-by-inputs ``(m, d_l, 2**n)``: ``u_l = Z_l g_{l-1} + r_l zeta_l`` (module doc). The last layer is
    compared without adding its bias: ``fl(o + b) > 0`` exactly when ``o > -b`` under round-to-nearest.
    """
    m = views[0][0].shape[0]
    a = xT.expand(m, *xT.shape)
    for (w, b), h in zip(views[:-1], hidden):
        h = h[:m]
        torch.baddbmm(b, w, a, out=h).relu_()
        a = h
    w_last, thr = views[-1]
    o = torch.bmm(w_last, a, out=out[:m])  # (m, 1, 2**n)
    return torch.gt(o, thr, out=bits.view(m, 1, -1)).view(m, -1)


class _Worker:
    """Samples the chunks of some random streams with preallocated buffers (one per thread)."""

    def __init__(self, ctx: dict, streams: list[int]):
        self.ctx, self.streams = ctx, streams

    def run(self) -> None:
        ctx = self.ctx
        dev, dtype, widths, B, N = ctx["device"], ctx["dtype"], ctx["widths"], ctx["chunk"], ctx["n_inputs"]
        if dev.type == "cpu":
            torch.set_num_threads(1)  # OpenMP's thread count is per thread: set it in every worker
        gens = {s: torch.Generator(device=dev).manual_seed(_N_STREAMS * ctx["seed"] + s) for s in self.streams}
        n_params, _ = _layout(widths)
        buf = torch.empty(B * n_params, dtype=dtype, device=dev)
        hidden = [torch.empty((B, w, N), dtype=dtype, device=dev) for w in widths[1:-1]]
        out = torch.empty((B, 1, N), dtype=dtype, device=dev)
        # Thresholded outputs accumulate in `bits` (about _BITS_BYTES) and are packed in one go when it is full;
        # packed words wait in `pending` until they are as many as the table's rows, then merge (sort-based).
        bits = torch.empty((max(B, _BITS_BYTES[dev.type] // N), N), dtype=torch.bool, device=dev)
        pending: list[Tensor] = []
        n_pending, n_bits, merge_at = 0, 0, _MERGE_ROWS[dev.type]
        views_full = _param_views(buf, B, widths)
        bias_mult, xT = ctx["bias_mult"], ctx["xT"]
        for k in range(ctx["n_chunks"]):
            s = k % _N_STREAMS
            if s not in gens:
                continue
            if ctx["stop"].is_set():
                return
            m = min(B, ctx["n_samples"] - k * B)
            if n_bits + m > len(bits):
                pending.append(_pack_rows(bits[:n_bits]))
                n_pending, n_bits = n_pending + n_bits, 0
                if n_pending >= merge_at:
                    merge_at = max(merge_at, ctx["tally"].add(pending))
                    pending, n_pending = [], 0
            torch.randn(m * n_params, generator=gens[s], out=buf[: m * n_params])
            views, bias = views_full if m == B else _param_views(buf, m, widths)
            bias.mul_(bias_mult)
            _forward_signs(views, xT, hidden, out, bits[n_bits: n_bits + m])
            n_bits += m
            ctx["progress"](m)
        if n_bits:
            pending.append(_pack_rows(bits[:n_bits]))
        if pending:
            ctx["tally"].add(pending)


def _check_widths(fn: str, widths) -> tuple[int, ...]:
    widths = check_widths(fn, widths, example="(7, 40, 40, 1)")
    if widths[-1] != 1:
        raise ValueError(f"{fn}: widths={widths} must end in 1 (a single output thresholded at 0)")
    check_int(fn, "widths[0]", widths[0], minimum=1, maximum=MAX_N)
    return widths


def _default_chunk(widths: Sequence[int], device: str | torch.device = "cpu") -> int:
    """Default networks per chunk: a fixed activation-buffer size divided by ``2**n * max hidden width``."""
    width = max(widths[1:-1], default=1)
    kind = torch.device(device).type
    return max(1, min(_MAX_CHUNK[kind], _CHUNK_ELEMS[kind] // (2 ** widths[0] * width)))


# ----------------------------------------------------------------------------------------------------------
# sampler
# ----------------------------------------------------------------------------------------------------------


def sample_function_counts(widths: Sequence[int] = (7, 40, 40, 1), n_samples: int = 10**6,
                           sigma_w: float = math.sqrt(2.0), sigma_b: float = 1.0, seed: int = 0,
                           device: str | torch.device | None = None, chunk: int | None = None,
                           progress: bool = True, n_workers: int | None = None,
                           dtype: torch.dtype = torch.float32) -> FunctionCounts:
    r"""Sample i.i.d. ReLU FCNs from the prior and count the Boolean functions they compute.

    Each network (weights :math:`N(0, \sigma_w^2/d_{l-1})`, biases :math:`N(0, \sigma_b^2)`, as
    :class:`flatness.models.FCN`) is evaluated on all ``2**n`` inputs of
    :func:`flatness.boolean.boolean_inputs` and its output thresholded at 0; functions are packed into int64
    words and counted (Zhang et al. 2021, Section 5.1, Boolean system). See the module doc for the exact rescaled
    forward pass, how :math:`\sigma_w` and :math:`\sigma_b` interact, and the random stream.

    .. math:: \hat P(f) = \frac{1}{N} \sum_{i=1}^N \mathbb 1\bigl[f_{\theta_i} = f\bigr], \qquad \theta_i \sim p(\theta)\ \text{i.i.d.}

    Memory is bounded by the number of distinct functions (plus fixed chunk buffers), not by ``n_samples``.
    On CPU, ``n_workers`` threads each run single-threaded torch ops on their own chunks (the global torch
    thread count is restored afterwards); on CUDA one host thread queues large chunks with no host
    synchronisation except when merging counts, with TF32 disabled for the duration.

    Args:
        widths: layer widths ``(n, ..., 1)``; ``n = widths[0]`` inputs (1 to 20; ``2**n`` points each network).
        n_samples: number :math:`N` of networks.
        sigma_w: weight scale :math:`\sigma_w > 0` (default :math:`\sqrt 2`, as :class:`~flatness.models.FCN`).
        sigma_b: bias scale :math:`\sigma_b \ge 0` (default 1, as :class:`~flatness.models.FCN`).
        seed: integer in ``[0, 2**26)``; with ``device`` type and ``chunk`` it fixes the sample.
        device: ``"cpu"``/``"cuda"``; default CUDA when present.
        chunk: networks per batched forward pass; default: a fixed activation-buffer size over
            ``2**n * max hidden width`` (64 for 7-40-40-1 on CPU, 32768 on CUDA). Part of the random stream.
        progress: show a tqdm progress bar.
        n_workers: CPU threads (default: the usable cores, at most torch's thread count and 64; 1 on CUDA).
            Does not change the sample.
        dtype: ``torch.float32`` (default) or ``torch.float64``.
    Returns:
        A :class:`FunctionCounts`.
    Raises:
        ValueError / TypeError: widths not ending in 1, ``n_samples < 1``, a bad scale, seed, chunk or dtype.
    """
    fn = "sample_function_counts"
    widths = _check_widths(fn, widths)
    n_samples = check_int(fn, "n_samples", n_samples, minimum=1)
    sigma_w = check_positive(fn, "sigma_w", sigma_w)
    sigma_b = check_positive(fn, "sigma_b", sigma_b, allow_zero=True)
    seed = check_int(fn, "seed", seed, minimum=0, maximum=_MAX_SEED)
    check_choice(fn, "dtype", dtype, [torch.float32, torch.float64])
    dev = resolve_device(device)
    check_choice(fn, "device type", dev.type, ["cpu", "cuda"])
    if chunk is None:
        chunk = _default_chunk(widths, dev)
    chunk = min(check_int(fn, "chunk", chunk, minimum=1), n_samples)
    if n_workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n_workers = 1 if dev.type == "cuda" else min(cores, torch.get_num_threads())
    n_workers = check_int(fn, "n_workers", n_workers, minimum=1)
    n = widths[0]
    n_chunks = -(-n_samples // chunk)
    n_workers = min(n_workers, _N_STREAMS, n_chunks) if dev.type == "cpu" else 1

    from tqdm.auto import tqdm

    bar = tqdm(total=n_samples, disable=not progress, unit="net", unit_scale=True, desc="sampling functions",
               mininterval=2.0)
    bar_lock = threading.Lock()

    def advance(m: int) -> None:
        if progress:
            with bar_lock:
                bar.update(m)

    tally = _Tally(max(1, 2**n // 64), dev)
    scales = _bias_scales(widths, sigma_w, sigma_b)
    ctx = {"device": dev, "dtype": dtype, "widths": widths, "chunk": chunk, "n_inputs": 2**n, "seed": seed,
           "n_samples": n_samples, "n_chunks": n_chunks, "bias_mult": _bias_vector(widths, scales, dtype, dev),
           "xT": boolean_inputs(n, dtype=dtype, device=dev).T.contiguous(), "tally": tally,
           "progress": advance, "stop": threading.Event()}
    workers = [_Worker(ctx, list(range(w, _N_STREAMS, n_workers))) for w in range(n_workers)]
    threads = torch.get_num_threads()
    matmul_precision = torch.get_float32_matmul_precision()
    try:
        if dev.type == "cuda":
            torch.set_float32_matmul_precision("highest")  # no TF32: it can flip the sign of small outputs
            with torch.no_grad():
                workers[0].run()
        else:
            torch.set_num_threads(1)
            if n_workers == 1:
                with torch.no_grad():
                    workers[0].run()
            else:
                def run(w: _Worker) -> None:
                    with torch.no_grad():
                        w.run()

                with ThreadPoolExecutor(n_workers) as pool:
                    futures = [pool.submit(run, w) for w in workers]
                    try:
                        for f in futures:
                            f.result()
                    except BaseException:
                        ctx["stop"].set()
                        raise
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(matmul_precision)
        bar.close()

    keys, counts = tally.keys.cpu().numpy(), tally.counts.cpu().numpy()
    table = pd.DataFrame({"function": _keys_to_hex(keys, n), "count": counts})
    run_info = {"seed": seed, "n_samples": n_samples, "device": dev.type, "chunk": chunk, "dtype": str(dtype)}
    return FunctionCounts(table, n_samples, n, widths, sigma_w, sigma_b, seed, (run_info,))
