"""Notebook 03's pipeline (flatness.experiments.optimizers): the optimizer axis on notebook 02's sweep."""

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from flatness.experiments import attack as A
from flatness.experiments import optimizers as O
from flatness.results import ResultStore
from flatness.runs import config_key, with_overrides
from flatness.train.optim import optimizer_defaults

TINY = dict(n_train=30, n_test=30, sharpness_epochs=2, lbfgsb=False, probit=False, max_epochs=300)


def _tiny(opt, attacks=(0,), **kw):
    return O.configs("smoke", optimizers=opt, panels="mnist_fcn", attacks=attacks, **{**TINY, **kw})


def test_configs_cover_every_optimizer_with_reference_lrs():
    cfgs = O.configs("cpu")
    assert {c.optimizer for c in cfgs} == set(O.OPTIMIZER_NAMES)
    for c in cfgs:
        if c.optimizer != "sgd":
            assert c.run.train.lr == optimizer_defaults(c.optimizer)["lr"]
        assert c.top_k == (50 if c.panel == "mnist_fcn" else 0)
    assert len({config_key(c) for c in cfgs}) == len(cfgs)
    counts = Counter((c.optimizer, c.panel) for c in cfgs)
    assert counts[("adam", "cifar_resnet")] >= 1 and counts[("sgd", "cifar_resnet")] >= 1
    assert all(len(O.configs("paper", optimizers=o, panels="mnist_fcn")) == 55 for o in O.OPTIMIZER_NAMES)


def test_sgd_configs_are_notebook_02s_so_rows_are_shared():
    ours = {config_key(c.run) for c in O.configs("cpu", optimizers="sgd")}
    theirs = {config_key(c) for c in A.configs("cpu")}
    assert ours <= theirs


def test_optimizer_args_are_validated_keyed_only_when_set_and_reach_the_optimizer(monkeypatch):
    base = A.configs("cpu", "mnist_fcn")[0].train
    assert base.optimizer_args == () and base.optimizer_kwargs() == {}
    es = with_overrides(base, optimizer="entropy_sgd", optimizer_args=[["L", 5]])
    assert es.optimizer_kwargs() == {"L": 5} and isinstance(es.optimizer_kwargs()["L"], int)
    assert config_key(es) != config_key(with_overrides(base, optimizer="entropy_sgd"))
    with pytest.raises(ValueError, match="optimizer_args name 'L' is not a hyper-parameter of optimizer='sgd'"):
        with_overrides(base, optimizer_args=[["L", 5]])
    with pytest.raises(ValueError, match="lr is the lr field"):
        with_overrides(base, optimizer="adam", optimizer_args=[["lr", 0.1]])
    with pytest.raises(ValueError, match="must be finite"):
        with_overrides(base, optimizer="entropy_sgd", optimizer_args=[["gamma", float("nan")]])
    with pytest.raises(ValueError, match=r"optimizer_args entry \('L', 'five'\) must be a \(name, number\) pair"):
        A.AttackTrainConfig(optimizer="entropy_sgd", optimizer_args=(("L", "five"),))
    with pytest.raises(ValueError, match="twice"):
        with_overrides(base, optimizer="entropy_sgd", optimizer_args=[["L", 5], ["L", 6]])
    seen = {}

    def fake(model, task, **kw):
        seen.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr("flatness.train.train_to_zero_error", fake)
    with pytest.raises(RuntimeError, match="stop here"):
        A.train_network(with_overrides(es, n_train=10, n_test=10))
    assert seen["optimizer"] == "entropy_sgd" and seen["optimizer_kwargs"] == {"L": 5}


@pytest.mark.parametrize("kw, match", [
    (dict(optimizers="lbfgs"), "optimizers"), (dict(panels="imagenet"), "panels"),
    (dict(lr=0.1), "lr"), (dict(top_k=-1), "top_k"), (dict(max_epochs=0), "max_epochs"),
    (dict(bogus=1), "bogus")])
def test_bad_input_names_the_parameter(kw, match):
    with pytest.raises(ValueError, match=match):
        O.configs("cpu", **kw)
    with pytest.raises(ValueError, match="profile"):
        O.configs("laptop")


def test_run_all_end_to_end_resumable_and_reuses_notebook_02(tmp_path):
    reuse = ResultStore(A.STORE_NAME, root=tmp_path)
    sgd = _tiny("sgd", attacks=(0,))
    A.run_all([c.run for c in sgd], reuse, progress=False)  # notebook 02 ran the SGD run
    cfgs = sgd + _tiny("adam", attacks=(0,)) + _tiny("gd", attacks=(0,), max_epochs=2)
    store = ResultStore(O.STORE_NAME, root=tmp_path)
    df = O.run_all(cfgs, store, reuse=reuse, progress=False)
    assert set(O.ROW_COLUMNS) <= set(df.columns) and len(df) == 3
    by = df.set_index("optimizer")
    assert by.loc["sgd", "reused"] == "02_attack" and by.loc["adam", "reused"] == ""
    assert by.loc["gd", "status"] == "max_epochs" and math.isnan(by.loc["gd", "log10_prior"])
    for o in ("sgd", "adam"):
        assert by.loc[o, "status"] == "converged" and np.isfinite(by.loc[o, "log_top50"])
        assert np.isfinite(by.loc[o, "log10_prior"]) and by.loc[o, "sharpness"] > 0
    assert not store.has_artifact(config_key(sgd[0].run.train)), "SGD weights were read from 02's store"
    again = O.run_all(cfgs, store, reuse=reuse, progress=False, executor=_Fail())
    pd.testing.assert_frame_equal(df.drop(columns=["config"]), again.drop(columns=["config"]))
    assert set(O.status_counts(df)["max_epochs"]) == {0, 1}


class _Fail:
    def submit(self, *a, **k):
        raise AssertionError("nothing should run")

    def map(self, *a, **k):
        raise AssertionError("nothing should run")


def _synthetic(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for o, noise in (("sgd", 0.02), ("adam", 0.5), ("entropy_sgd", 0.5)):
        for p in ("mnist_fcn", "cifar_fcn"):
            for a in range(0, 501, 50):
                err = 0.1 + 0.8 * a / 1000 + rng.normal(0, 0.01)
                rows.append(dict(optimizer=o, panel=p, n_attack=a, n_train=500, status="converged",
                                 test_error=err, log10_prior=-300 - 200 * err + rng.normal(0, 2),
                                 sharpness=10 ** (err + rng.normal(0, noise)) * (0.5 if o == "entropy_sgd" else 1),
                                 hessian_norm=10 ** (err + rng.normal(0, 0.1)), log_top50=err * 50,
                                 reused="", epochs=10))
    rows.append(dict(optimizer="adam", panel="mnist_fcn", n_attack=500, n_train=500, status="max_epochs",
                     test_error=math.nan, log10_prior=math.nan, sharpness=math.nan, reused="", epochs=-1))
    return pd.DataFrame(rows)


def test_claims_on_synthetic_data():
    df = _synthetic()
    res = {c["claim"]: c for c in O.claim_results(df)}
    assert {"log_prior_predicts_sgd", "log_prior_predicts_adam", "flatness_weaker_adam",
            "flatness_weaker_entropy_sgd", "entropy_sgd_flatter"} <= set(res)
    assert all(res[f"log_prior_predicts_{o}"]["holds"] for o in ("sgd", "adam", "entropy_sgd"))
    assert res["flatness_weaker_adam"]["holds"] and res["flatness_weaker_adam"]["ci"][1] < 0
    assert res["entropy_sgd_flatter"]["holds"] and res["entropy_sgd_flatter"]["value"] < 1
    assert "1 runs not converged" in res["log_prior_predicts_adam"]["statistic"]
    flip = df.assign(log10_prior=-df["log10_prior"])  # a prior that anti-predicts must fail
    assert not O.claim_results(flip)[0]["holds"]


def test_figures_return_a_figure_on_a_tiny_frame():
    import matplotlib

    matplotlib.use("Agg")
    df = _synthetic()
    small = df[df["n_attack"] <= 50]  # two points per group: "fewer than 3 runs" branch
    for f in (O.figure_fig4, O.figure_s18, O.figure_s17, O.figure_s4, O.figure_forest):
        for d in (df, small):
            assert f(d) is not None
    corr = O.correlations(df)
    assert {"optimizer", "panel", "pair", "r", "ci_low", "ci_high"} <= set(corr.columns)
    assert corr[(corr.optimizer == "adam") & (corr.panel == "mnist_fcn")]["n"].max() == 11  # max_epochs left out


def test_forest_plot_draws_an_interval_that_excludes_its_point():
    """A percentile-bootstrap CI need not contain r (cpu: Adam CIFAR FCN at n = 5 gave r = -0.9, CI [-1, -1]);
    the forest plot must draw it, not raise on a negative error-bar length."""
    import matplotlib

    matplotlib.use("Agg")
    df = _synthetic()
    corr = O.correlations(df, ["log10_prior_vs_test_error", "sharpness_vs_test_error"])
    i = corr.index[(corr.method == "spearman")][0]
    corr.loc[i, ["r", "ci_low", "ci_high"]] = (-0.9, -1.0, -1.0)
    j = corr.index[(corr.method == "spearman")][1]
    corr.loc[j, "r"] = float("nan")
    fig = O.figure_forest(df, corr)
    assert fig is not None
