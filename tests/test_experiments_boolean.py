"""Notebook 01's pipeline pieces: profile configs and function selection."""

import numpy as np
import pandas as pd
import pytest

from flatness.experiments import boolean as exp


def test_config_for_profiles_and_overrides():
    assert exp.config_for("cpu").n_prior_samples >= 10**7  # the cpu-profile floor
    assert exp.config_for("paper").n_prior_samples >= 10**9 and exp.config_for("paper").n_functions == 1000
    cfg = exp.config_for("smoke", n_functions=5.0, lr=None)  # papermill passes floats; None keeps the default
    assert cfg.n_functions == 5 and cfg.lr == exp.BooleanConfig().lr
    with pytest.raises(ValueError, match="unknown parameter 'nfunctions'"):
        exp.config_for("smoke", nfunctions=3)
    with pytest.raises(ValueError, match="unknown profile='gpu'"):
        exp.config_for("gpu")


def test_select_functions_top_and_stratified():
    counts = np.array([5000, 4000, 300, 200, 100, 50, 20, 12, 11, 10, 9, 3, 1])
    table = pd.DataFrame({"function": [f"{i:02x}" for i in range(len(counts))], "count": counts})
    n = int(counts.sum())
    top = exp.select_functions(table, n, 4, "top", min_count=10)
    assert top["function"].tolist() == ["00", "01", "02", "03"]
    strat = exp.select_functions(table, n, 4, "stratified", min_count=10, seed=0)
    assert len(strat) == 4 and strat["count"].min() >= 10
    # spread: both ends of the log-prior range are represented
    assert strat["count"].max() >= 4000 and strat["count"].min() <= 12
    assert np.allclose(strat["log10_prior"], np.log10(strat["count"] / n))
    everything = exp.select_functions(table, n, 100, "stratified", min_count=10)
    assert len(everything) == 10
