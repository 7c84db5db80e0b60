"""Figure helpers shared by the notebooks: where figures go, a consistent style, annotated scatters.

Figures of the ``cpu`` profile go to ``figures/`` (committed); other profiles to ``figures/<profile>/``
(``smoke`` output is never committed, ``paper`` output is kept apart from the reduced reproduction).
``$FLATNESS_FIGURES_DIR`` replaces ``figures/`` as the root (tests run notebooks without touching the repository).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._paths import REPO_ROOT
from .stats import correlation

__all__ = ["figure_dir", "save_figure", "scatter_corr", "set_style"]



def figure_dir(profile: str = "cpu") -> Path:
    """``figures/`` for the ``cpu`` profile, ``figures/<profile>/`` otherwise (created if needed).

    The root is ``$FLATNESS_FIGURES_DIR`` when set, else ``figures/`` in the repository.
    """
    root = Path(os.environ["FLATNESS_FIGURES_DIR"]) if os.environ.get("FLATNESS_FIGURES_DIR") else REPO_ROOT / "figures"
    d = root if profile == "cpu" else root / profile
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_figure(fig, name: str, profile: str = "cpu", dpi: int = 150) -> list[Path]:
    """Save ``fig`` as ``<name>.png`` and ``<name>.pdf`` in :func:`figure_dir`; returns the paths."""
    d = figure_dir(profile)
    paths = [d / f"{name}.png", d / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=dpi, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None})
    return paths


def set_style() -> None:
    """Seaborn's ticks style with a readable context."""
    import seaborn as sns

    sns.set_theme(style="ticks", context="notebook")


def scatter_corr(ax, x, y, *, hue=None, logx: bool = False, xlabel: str = "", ylabel: str = "",
                 title: str = "", n_boot: int = 2000, **kw):
    """Scatter ``y`` against ``x`` and annotate Pearson and Spearman r with bootstrap 95% CIs.

    Returns the two :class:`flatness.stats.Correlation` results (both on ``log10 x`` when ``logx``) and the
    scatter artist. They are :func:`flatness.stats.correlation` with its defaults (``n_boot=2000``, ``seed=0``),
    so a notebook asserts and records the very numbers the figure shows.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    sc = ax.scatter(x, y, c=hue, s=kw.pop("s", 14), alpha=kw.pop("alpha", 0.7), **kw)
    xs = np.log10(np.where(x > 0, x, np.nan)) if logx else x
    cp = correlation(xs, y, "pearson", n_boot=n_boot)
    cs = correlation(xs, y, "spearman", n_boot=n_boot)
    ax.text(0.02, 0.98, f"Pearson {cp.r:+.2f} [{cp.ci_low:+.2f}, {cp.ci_high:+.2f}]\n"
            f"Spearman {cs.r:+.2f} [{cs.ci_low:+.2f}, {cs.ci_high:+.2f}]\nn = {cs.n}",
            transform=ax.transAxes, va="top", ha="left", fontsize=8,
            bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8, "lw": 0})
    if logx:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return cp, cs, sc
