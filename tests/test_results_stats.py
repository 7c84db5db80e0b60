"""Result store (atomic, resumable, tagged) and correlation statistics (vs closed forms and scipy)."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flatness.results import ResultStore, config_key, environment_info
from flatness.stats import correlation, correlation_table


def test_store_roundtrip_and_resume(tmp_path):
    store = ResultStore("demo", root=tmp_path)
    assert store.load().empty and not store.has({"a": 1})
    store.append({"loss": 0.5}, config={"a": 1, "seed": 0})
    store.append([{"loss": 0.1, "epoch": 1}, {"loss": 0.2, "epoch": 2}], config={"a": 2, "seed": 0})
    assert store.has({"seed": 0, "a": 1})  # key order does not matter
    df = store.load()
    assert len(df) == 3 and set(df["cfg_a"]) == {1, 2}
    for col in ("key", "config", "created", "torch_version", "git_commit", "flatness_version"):
        assert col in df.columns
    assert not list(store.path.glob("*.tmp"))
    store.clear()
    assert store.load().empty


def test_config_key_changes_with_values():
    assert config_key({"a": 1}) != config_key({"a": 2})
    assert config_key({"a": 1, "b": [1, 2]}) == config_key({"b": [1, 2], "a": 1})


def test_environment_info_has_versions():
    info = environment_info()
    assert info["torch_version"].startswith("2.")


def test_store_rejects_bad_name(tmp_path):
    with pytest.raises(ValueError, match="plain folder name"):
        ResultStore("../x", root=tmp_path)


def test_correlation_matches_scipy_and_bivariate_normal():
    rng = np.random.default_rng(0)
    rho = -0.6
    z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=4000)
    c = correlation(z[:, 0], z[:, 1], "pearson", n_boot=500)
    assert c.r == pytest.approx(stats.pearsonr(z[:, 0], z[:, 1])[0])
    assert c.ci_low < rho < c.ci_high and c.ci_high - c.ci_low < 0.06
    s = correlation(z[:, 0], z[:, 1], "spearman", n_boot=500)
    # Spearman of a bivariate normal: (6/pi) arcsin(rho/2)
    assert s.r == pytest.approx(6 / np.pi * np.arcsin(rho / 2), abs=0.03)
    assert s.ci_low < s.r < s.ci_high


def test_correlation_drops_nonfinite_and_validates():
    c = correlation([1, 2, 3, np.nan, 5], [2, 4, 6, 8, np.inf], "pearson", n_boot=0)
    assert c.n == 3 and c.r == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 3 finite pairs"):
        correlation([1, 2], [1, 2])
    with pytest.raises(ValueError, match="unknown method='kendall'"):
        correlation([1, 2, 3], [1, 2, 3], "kendall")


def test_correlation_table():
    df = pd.DataFrame({"x": np.arange(10.0), "y": np.arange(10.0) ** 2, "g": [0, 1] * 5})
    t = correlation_table(df, "x", ["y"], by="g", n_boot=50)
    assert len(t) == 4 and np.allclose(t.loc[t.method == "spearman", "r"], 1.0)
