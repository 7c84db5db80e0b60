"""Correlation statistics with bootstrap confidence intervals (the papers report scatter plots only).

.. math:: r_P = \\frac{\\sum_i (x_i - \\bar x)(y_i - \\bar y)}{\\sqrt{\\sum_i (x_i-\\bar x)^2 \\sum_i (y_i-\\bar y)^2}},
   \\qquad r_S = r_P(\\operatorname{rank} x, \\operatorname{rank} y)

The confidence interval is the percentile interval of ``n_boot`` paired bootstrap resamples (ranks are
recomputed in every resample for Spearman).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from ._checks import check_choice, check_int

__all__ = ["Correlation", "correlation", "correlation_table"]


class Correlation(NamedTuple):
    method: str
    r: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int

    def __str__(self) -> str:
        return f"{self.method} r = {self.r:+.3f} [{self.ci_low:+.3f}, {self.ci_high:+.3f}] (n={self.n})"


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of (B, n) arrays."""
    xc = x - x.mean(1, keepdims=True)
    yc = y - y.mean(1, keepdims=True)
    den = np.sqrt((xc * xc).sum(1) * (yc * yc).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (xc * yc).sum(1) / den


def correlation(x, y, method: str = "spearman", n_boot: int = 2000, ci: float = 0.95,
                seed: int = 0) -> Correlation:
    """Pearson or Spearman correlation of paired samples with a bootstrap percentile CI.

    Non-finite pairs are dropped. Needs at least 3 finite pairs.
    """
    check_choice("correlation", "method", method, ("pearson", "spearman"))
    n_boot = check_int("correlation", "n_boot", n_boot, minimum=0)
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"correlation: x and y have different lengths ({len(x)} and {len(y)})")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    if n < 3:
        raise ValueError(f"correlation: needs at least 3 finite pairs, got {n}")
    from scipy import stats as _st  # imported on use: scipy.stats costs ~1.5 s at `import flatness`

    if method == "pearson":
        res = _st.pearsonr(x, y)
    else:
        res = _st.spearmanr(x, y)
    r, p = float(res[0]), float(res[1])
    lo = hi = float("nan")
    if n_boot:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_boot, n))
        xb, yb = x[idx], y[idx]
        if method == "spearman":
            xb = _st.rankdata(xb, axis=1)
            yb = _st.rankdata(yb, axis=1)
        rb = _pearson_rows(xb, yb)
        rb = rb[np.isfinite(rb)]
        if len(rb):
            a = (1 - ci) / 2
            lo, hi = (float(v) for v in np.quantile(rb, [a, 1 - a]))
    return Correlation(method, r, lo, hi, p, n)


def correlation_table(df: pd.DataFrame, x: str, ys: Sequence[str], by: str | None = None,
                      methods: Sequence[str] = ("pearson", "spearman"), **kw) -> pd.DataFrame:
    """One row per (group, y column, method): r, CI and n of ``corr(df[x], df[y])``."""
    groups = [(None, df)] if by is None else list(df.groupby(by))
    rows = []
    for g, sub in groups:
        for y in ys:
            for m in methods:
                c = correlation(sub[x], sub[y], method=m, **kw)
                rows.append({**({by: g} if by else {}), "x": x, "y": y, "method": m, "r": c.r,
                             "ci_low": c.ci_low, "ci_high": c.ci_high, "p_value": c.p_value, "n": c.n})
    return pd.DataFrame(rows)
