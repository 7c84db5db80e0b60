"""The claims scorecard: every notebook records the paper claims it tests, with the measured statistic.

One tidy row per claim and profile, kept in ``results/<profile>/claims/`` (a :class:`~flatness.results.ResultStore`
of parquet parts, so several notebooks, re-runs and parallel runs never overwrite each other; the latest
record of a ``(notebook, claim, profile)`` wins when the table is read)::

    from flatness import claims
    rho = correlation(np.log10(table.sharpness), table.log10_prior, "spearman")
    claims.record("01_boolean_prior_vs_flatness", "fig2_prior_vs_sharpness",
                  "Spearman(log10 P, log10 sharpness)", rho.r, (rho.ci_low, rho.ci_high),
                  "r < -0.3 and CI below 0", rho.r < -0.3 and rho.ci_high < 0, profile,
                  figure="01_fig2_figS3_prior_vs_flatness", paper_ref="Zhang et al. 2021, Fig. 2",
                  text="Flatter functions have higher prior", n=rho.n)

**Assertion semantics.** :func:`record` always writes the row first, as measured, then raises
:class:`ClaimFailed` (an ``AssertionError``) when ``holds`` is false and ``profile`` is in ``assert_at``
(default ``("cpu", "paper")``). At ``smoke`` (too small to test anything) it only records. A claim that does
not hold is reported as measured, never weakened to pass: the notebook fails, and the scorecard says why.

:func:`write_report` renders one profile's table as ``REPORT.md`` (``python -m flatness.claims report
--profile cpu``); ``run_all.sh`` calls it after a notebooks run. Default report paths: ``REPORT.md`` in the
repository for ``cpu`` (committed), ``results/<profile>/REPORT.md`` for ``smoke`` and ``paper``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ._checks import check_choice
from ._paths import REPO_ROOT
from .results import ResultStore, environment_info, results_dir

__all__ = ["ASSERT_AT", "PROFILES", "ClaimFailed", "check", "default_report_path", "load", "record", "render_report",
           "write_report"]

PROFILES = ("smoke", "cpu", "paper")
ASSERT_AT = ("cpu", "paper")  # profiles at which a claim that does not hold fails the notebook
_STORE = "claims"
_COLUMNS = ["notebook", "claim", "profile", "statistic", "value", "ci_low", "ci_high", "expected", "holds",
            "figure", "paper_ref", "text", "n", "recorded", "recorded_ns"]


class ClaimFailed(AssertionError):
    """A recorded claim does not hold at a profile where claims are asserted."""


def _store(profile: str) -> ResultStore:
    return ResultStore(_STORE, root=results_dir() / profile)


def _name(fn: str, param: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{fn}: {param}={value!r} must be a non-empty string")
    return value.strip()


def _figure(value, profile: str) -> str | None:
    """A figure as a path string: relative to the repository when inside it, else absolute."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):  # what save_figure returns: take the PNG
        pngs = [v for v in value if str(v).endswith(".png")]
        value = pngs[0] if pngs else value[0]
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"record: figure={value!r} must be a figure name, a path or save_figure's list of paths")
    p = Path(value)
    if p.parent == Path(".") and not p.suffix:  # a bare name as given to save_figure
        from .plotting import figure_dir

        p = figure_dir(profile) / f"{p.name}.png"
    elif not p.is_absolute():
        p = REPO_ROOT / p
    try:
        return p.resolve().relative_to(REPO_ROOT.resolve()).as_posix()
    except ValueError:
        return str(p.resolve())


def record(notebook: str, claim: str, statistic: str, value: float, ci: Sequence[float] | None, expected: str,
           holds: bool, profile: str, *, figure=None, paper_ref: str | None = None, text: str | None = None,
           n: int | None = None, assert_at: Sequence[str] = ASSERT_AT) -> dict:
    """Record one measured claim, then assert it at the profiles of ``assert_at``.

    Args:
        notebook: the notebook testing the claim, e.g. ``"01_boolean_prior_vs_flatness"``.
        claim: a short identifier, unique within the notebook, e.g. ``"fig2_prior_vs_sharpness"``.
        statistic: what was measured, e.g. ``"Spearman(log10 P, log10 sharpness)"``.
        value: the measured value.
        ci: its ``(low, high)`` confidence interval, or ``None``.
        expected: the expected sign or range in words, e.g. ``"r < -0.3 and CI below 0"``.
        holds: whether the measurement satisfies ``expected`` (computed by the caller from the same
            statistic it reports).
        profile: ``"smoke"``, ``"cpu"`` or ``"paper"``.
        figure: the figure showing it: a name as given to :func:`flatness.plotting.save_figure` (resolved in
            that profile's figure folder), a path, or ``save_figure``'s list of paths (the PNG is kept).
        paper_ref: where the paper makes the claim, e.g. ``"Zhang et al. 2021, Fig. 2"``.
        text: the claim in words.
        n: the sample size of the statistic.
        assert_at: profiles at which a claim that does not hold raises (default ``("cpu", "paper")``).

    Returns:
        The row written (a dict with the columns of :func:`load`).

    Raises:
        ClaimFailed: ``holds`` is false and ``profile`` is in ``assert_at`` (after the row is written).
        ValueError: an unknown profile, an empty name, or a ``ci`` that is not a pair.
        TypeError: ``holds`` is not a boolean.
    """
    check_choice("record", "profile", profile, PROFILES)
    for p in assert_at:
        check_choice("record", "assert_at", p, PROFILES)
    notebook = _name("record", "notebook", notebook)
    claim = _name("record", "claim", claim)
    statistic = _name("record", "statistic", statistic)
    expected = _name("record", "expected", expected)
    if type(holds).__name__ not in ("bool", "bool_"):  # bool or numpy.bool_, never None or a string
        raise TypeError(f"record: holds={holds!r} must be a boolean (True when the claim holds)")
    if ci is None:
        ci_low = ci_high = math.nan
    else:
        try:
            ci_low, ci_high = (float(c) for c in ci)
        except (TypeError, ValueError):
            raise ValueError(f"record: ci={ci!r} must be a pair (low, high) of numbers or None") from None
    now = time.time_ns()
    row = {"notebook": notebook, "claim": claim, "profile": profile, "statistic": statistic, "value": float(value),
           "ci_low": ci_low, "ci_high": ci_high, "expected": expected, "holds": bool(holds),
           "figure": _figure(figure, profile), "paper_ref": paper_ref, "text": text,
           "n": None if n is None else int(n),
           "recorded": _dt.datetime.fromtimestamp(now / 1e9, _dt.timezone.utc).isoformat(timespec="seconds"),
           "recorded_ns": now}
    _store(profile).append(row, config={"notebook": notebook, "claim": claim, "profile": profile})
    if not row["holds"] and profile in assert_at:
        raise ClaimFailed(f"{notebook}/{claim} does not hold at profile {profile!r}: {statistic} = "
                          f"{row['value']:+.3g} [{ci_low:+.3g}, {ci_high:+.3g}], expected {expected}")
    return row


def load(profile: str) -> pd.DataFrame:
    """The claims recorded at ``profile``: the latest row per ``(notebook, claim)``, by notebook, in recording order.

    Columns: those of :func:`record`'s row plus ``git_commit`` and the package versions of the run that
    recorded it. An empty frame (with those columns) when nothing is recorded.
    """
    check_choice("load", "profile", profile, PROFILES)
    df = _store(profile).load()
    if df.empty:
        return pd.DataFrame(columns=_COLUMNS)
    df = df.drop(columns=[c for c in df.columns if c.startswith("cfg_")] + ["key", "config", "created"],
                 errors="ignore")
    # The store keeps the newest part per key (notebook, claim, profile); this also covers compacted tables.
    df = df.sort_values("recorded_ns", kind="stable").drop_duplicates(["notebook", "claim", "profile"], keep="last")
    return df.sort_values(["notebook", "recorded_ns"], kind="stable").reset_index(drop=True)


def check(profile: str, notebook: str | None = None, *, assert_at: Sequence[str] = ASSERT_AT) -> pd.DataFrame:
    """The recorded claims of ``profile`` (of one ``notebook``) that do not hold; raises at ``assert_at``.

    Raises:
        ClaimFailed: some claim does not hold and ``profile`` is in ``assert_at``.
    """
    df = load(profile)
    if notebook is not None:
        df = df[df["notebook"] == notebook]
    failed = df[~df["holds"].astype(bool)]
    if len(failed) and profile in assert_at:
        raise ClaimFailed(f"{len(failed)} claim(s) do not hold at profile {profile!r}: "
                          + ", ".join(f"{r.notebook}/{r.claim}" for r in failed.itertuples()))
    return failed.reset_index(drop=True)


def default_report_path(profile: str) -> Path:
    """``REPORT.md`` in the repository for ``cpu``; ``results/<profile>/REPORT.md`` otherwise."""
    check_choice("default_report_path", "profile", profile, PROFILES)
    return REPO_ROOT / "REPORT.md" if profile == "cpu" else results_dir() / profile / "REPORT.md"


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v).replace("|", "\\|").replace("\n", " ")


def _num(v: float) -> str:
    return "nan" if v is None or math.isnan(v) else f"{v:+.3f}".replace("-", "−")


def _link(figure, out_dir: Path) -> tuple[str, str] | None:
    """(label, relative link) of a recorded figure, as seen from ``out_dir``."""
    if figure is None or (isinstance(figure, float) and math.isnan(figure)) or figure == "":
        return None
    p = Path(figure)
    p = p if p.is_absolute() else REPO_ROOT / p
    return p.name, Path(os.path.relpath(p, out_dir)).as_posix()


def render_report(profile: str, out_dir: str | Path | None = None) -> str:
    """The markdown of :func:`write_report` (figure links relative to ``out_dir``, default the report's folder)."""
    df = load(profile)
    out_dir = Path(out_dir) if out_dir is not None else default_report_path(profile).parent
    env = environment_info()
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n_hold = int(df["holds"].astype(bool).sum()) if len(df) else 0
    versions = ", ".join(f"{k.removesuffix('_version')} {v}" for k, v in env.items() if k.endswith("_version"))
    table = _store(profile).path
    try:
        table = table.resolve().relative_to(REPO_ROOT.resolve())
    except ValueError:
        pass
    lines = [f"# Claims scorecard: profile `{profile}`", "",
             f"Generated {now} by `python -m flatness.claims report --profile {profile}` from the claims table "
             f"`{table.as_posix()}/` (the latest record of each claim).", "",
             f"- git commit: `{env.get('git_commit', 'unknown')}` (at report time; each row's own commit is in "
             f"the *recorded* column)",
             f"- profile: `{profile}`", f"- versions: {versions}", f"- device: {env.get('device', 'unknown')}", "",
             f"**{n_hold} of {len(df)} claims hold.** A claim that does not hold is reported as measured "
             f"(notebooks assert at {', '.join(ASSERT_AT)}; at smoke they only record).", ""]
    if profile == "smoke":
        lines += ["*smoke* checks the plumbing on a few functions and runs: its statistics test nothing.", ""]
    if len(df) == 0:
        lines.append("No claims recorded at this profile yet: run `./run_all.sh --profile "
                     f"{profile}`.")
        return "\n".join(lines) + "\n"
    lines += ["| notebook | paper | claim | statistic | measured [95% CI] | expected | holds | n | figure | recorded |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    figures: dict[str, str] = {}
    for r in df.itertuples():
        link = _link(r.figure, out_dir)
        fig = f"[{link[0]}]({link[1]})" if link else ""
        if link:
            figures.setdefault(link[1], link[0])
        measured = _num(r.value) + ("" if math.isnan(r.ci_low) else f" [{_num(r.ci_low)}, {_num(r.ci_high)}]")
        holds = "✅ yes" if bool(r.holds) else "❌ **no**"
        n = "" if r.n is None or (isinstance(r.n, float) and math.isnan(r.n)) else str(int(r.n))
        text = _cell(r.text) or _cell(r.claim)
        rec = f"{str(r.recorded)[:10]} `{_cell(getattr(r, 'git_commit', ''))}`"
        lines.append(f"| {_cell(r.notebook)} | {_cell(r.paper_ref)} | {text} (`{_cell(r.claim)}`) | "
                     f"{_cell(r.statistic)} | {measured} | {_cell(r.expected)} | {holds} | {n} | {fig} | {rec} |")
    if figures:
        lines += ["", "## Figures", ""]
        for rel, name in figures.items():
            lines += [f"### {name}", "", f"![{name}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(profile: str, path: str | Path | None = None) -> Path:
    """Write the scorecard of ``profile`` as markdown; returns the path written.

    Args:
        profile: ``"smoke"``, ``"cpu"`` or ``"paper"``.
        path: where to write; default :func:`default_report_path` (``REPORT.md`` in the repository for
            ``cpu``, ``results/<profile>/REPORT.md`` otherwise). Figure links are relative to its folder.
    """
    check_choice("write_report", "profile", profile, PROFILES)
    path = Path(path) if path is not None else default_report_path(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_report(profile, out_dir=path.resolve().parent)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flatness.claims report --profile P [--out PATH]`` or ``check --profile P``."""
    ap = argparse.ArgumentParser(prog="python -m flatness.claims", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="write the scorecard of a profile as markdown")
    rep.add_argument("--profile", default="cpu", choices=PROFILES)
    rep.add_argument("--out", default=None, help="default: REPORT.md (cpu), results/<profile>/REPORT.md otherwise")
    chk = sub.add_parser("check", help="list the claims that do not hold; exit 1 if any (at cpu/paper)")
    chk.add_argument("--profile", default="cpu", choices=PROFILES)
    args = ap.parse_args(argv)
    if args.command == "report":
        path = write_report(args.profile, args.out)
        df = load(args.profile)
        print(f"{path}: {int(df['holds'].astype(bool).sum()) if len(df) else 0} of {len(df)} claims hold "
              f"(profile {args.profile})")
        return 0
    try:
        failed = check(args.profile)
    except ClaimFailed as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{len(failed)} claim(s) do not hold at profile {args.profile}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
