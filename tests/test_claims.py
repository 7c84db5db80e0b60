"""The claims scorecard: record/load round trip, latest wins, assertion semantics, REPORT.md content."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flatness import claims
from flatness._paths import REPO_ROOT


@pytest.fixture(autouse=True)
def tmp_results(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATNESS_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("FLATNESS_FIGURES_DIR", str(tmp_path / "figures"))
    return tmp_path


def _rec(claim="fig2", value=-0.5, holds=True, profile="smoke", **kw):
    kw.setdefault("figure", "01_fig2")
    kw.setdefault("paper_ref", "Zhang et al. 2021, Fig. 2")
    kw.setdefault("text", "Flatter functions have higher prior")
    return claims.record("01_boolean", claim, "Spearman(log P, sharpness)", value, (value - 0.1, value + 0.1),
                         "r < -0.3 and CI below 0", holds, profile, n=300, **kw)


def test_record_load_round_trip(tmp_results):
    row = _rec()
    df = claims.load("smoke")
    assert len(df) == 1
    got = df.iloc[0]
    for k in ("notebook", "claim", "profile", "statistic", "expected", "paper_ref", "text"):
        assert got[k] == row[k]
    assert got["value"] == pytest.approx(-0.5) and got["ci_low"] == pytest.approx(-0.6)
    assert got["ci_high"] == pytest.approx(-0.4) and bool(got["holds"]) and int(got["n"]) == 300
    assert "git_commit" in df.columns and "torch_version" in df.columns
    # a bare figure name resolves in the profile's figure folder, as save_figure writes it
    assert Path(got["figure"]) == (tmp_results / "figures" / "smoke" / "01_fig2.png").resolve()
    # stored under results/<profile>/claims/
    assert list((tmp_results / "results" / "smoke" / "claims").glob("*.parquet"))
    assert claims.load("cpu").empty and "holds" in claims.load("cpu").columns


def test_latest_record_wins_per_notebook_claim_profile(tmp_results):
    _rec(value=-0.5)
    _rec(value=-0.7)
    _rec(claim="figS3", value=-0.2, holds=False)
    _rec(value=-0.9, profile="cpu")
    claims.record("02_attack", "fig3", "Spearman", 0.3, None, "> 0", True, "smoke")
    df = claims.load("smoke")
    assert df["claim"].tolist() == ["fig2", "figS3", "fig3"]  # by notebook, in recording order
    by = df.set_index(["notebook", "claim"])
    assert by.loc[("01_boolean", "fig2"), "value"] == pytest.approx(-0.7)
    assert math.isnan(by.loc[("02_attack", "fig3"), "ci_low"])
    assert len(list((tmp_results / "results" / "smoke" / "claims").glob("*.parquet"))) == 4  # re-runs append
    assert claims.load("cpu")["value"].tolist() == pytest.approx([-0.9])


def test_failed_claim_is_recorded_at_smoke_and_raises_at_cpu_and_paper():
    row = _rec(holds=False, profile="smoke")  # smoke only records
    assert row["holds"] is False
    for profile in ("cpu", "paper"):
        with pytest.raises(claims.ClaimFailed, match="01_boolean/fig2 does not hold at profile"):
            _rec(holds=False, profile=profile)
        # the row is written before raising: it is reported as measured
        assert not claims.load(profile)["holds"].item()
    assert issubclass(claims.ClaimFailed, AssertionError)
    assert _rec(holds=np.bool_(True), profile="cpu")["holds"] is True
    _rec(holds=False, profile="cpu", assert_at=())  # asserting can be switched off explicitly
    with pytest.raises(claims.ClaimFailed):
        claims.check("cpu")
    assert len(claims.check("smoke")) == 1  # smoke lists, never raises


def test_bad_input_names_the_parameter():
    with pytest.raises(ValueError, match="profile='huge'.*allowed"):
        _rec(profile="huge")
    with pytest.raises(TypeError, match="holds=None must be a boolean"):
        _rec(holds=None)
    with pytest.raises(ValueError, match="ci=.* pair"):
        claims.record("01", "c", "s", 0.1, (0.1,), "> 0", True, "smoke")
    with pytest.raises(ValueError, match="claim=''"):
        claims.record("01", "", "s", 0.1, None, "> 0", True, "smoke")


def test_report_rows_links_and_header(tmp_results):
    _rec(value=-0.52)
    _rec(claim="figS3", value=-0.21, holds=False, figure=REPO_ROOT / "figures" / "x.png", text="a | b")
    out = claims.write_report("smoke", tmp_results / "rep" / "REPORT.md")
    md = out.read_text()
    assert md.startswith("# Claims scorecard: profile `smoke`")
    assert "git commit: `" in md and "torch " in md and "Generated 20" in md
    assert "**1 of 2 claims hold.**" in md
    rows = [l for l in md.splitlines() if l.startswith("| 01_boolean")]
    assert len(rows) == 2 and all(r.count(" | ") == 9 for r in rows)
    fig2 = next(r for r in rows if "`fig2`" in r)
    assert "Zhang et al. 2021, Fig. 2" in fig2 and "−0.520 [−0.620, −0.420]" in fig2 and "✅ yes" in fig2
    assert "[01_fig2.png](../figures/smoke/01_fig2.png)" in fig2  # relative to the report's folder
    figs3 = next(r for r in rows if "`figS3`" in r)
    assert "❌ **no**" in figs3 and "a \\| b" in figs3
    assert "![01_fig2.png](../figures/smoke/01_fig2.png)" in md


def test_default_report_paths(tmp_results):
    assert claims.default_report_path("cpu") == REPO_ROOT / "REPORT.md"
    assert claims.default_report_path("smoke") == tmp_results / "results" / "smoke" / "REPORT.md"
    assert "No claims recorded" in claims.render_report("paper")


def test_cli_report(tmp_results):
    _rec()
    out = tmp_results / "R.md"
    res = subprocess.run([sys.executable, "-m", "flatness.claims", "report", "--profile", "smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "1 of 1 claims hold" in res.stdout and "| 01_boolean |" in out.read_text()
    with pytest.raises(SystemExit) as e:  # in process: a second interpreter start costs seconds
        claims.main(["report", "--profile", "huge"])
    assert e.value.code == 2
    assert claims.main(["check", "--profile", "smoke"]) == 0
    _rec(holds=False, profile="cpu", assert_at=())
    assert claims.main(["check", "--profile", "cpu"]) == 1
