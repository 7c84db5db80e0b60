"""Notebook 04's pipeline (flatness.experiments.overtraining): configs, tiny runs end to end, resuming a saved
training state bit-identically, artifact reuse from notebook 02's store, figures and claim helpers."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from flatness.experiments import attack as A
from flatness.experiments import overtraining as O
from flatness.results import ResultStore
from flatness.runs import config_key, with_overrides

FAST = O.MeasureConfig(sharpness_method="sgd", sharpness_epochs=1)
PREFIX = O.TemporalPrefixConfig(n_train=30, n_test=10, rescale_after=6, track_every_train=20, track_every=3,
                                zeta_extra_until=10, measure=FAST, max_epochs=3000)


def _runs(alpha=5.9, overtrain=12, **kw):
    return O.TemporalRunConfig(run=f"a{alpha:g}", prefix=PREFIX, alpha=alpha, overtrain_epochs=overtrain,
                               inset_offsets=(1, 2), track_every=3, late_after=9, track_every_late=3, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One prefix, a rescaled run and the control, through run_all on a temporary store."""
    store = ResultStore(O.STORE_NAME, root=tmp_path_factory.mktemp("res") / "smoke")
    df = O.run_all([_runs(5.9), _runs(1.0)], store, progress=False)
    return store, df


# ------------------------------------------------------------------------------------------------ configs
def test_bad_values_raise_naming_the_field():
    with pytest.raises(ValueError, match="profile"):
        O.study("huge")
    with pytest.raises(ValueError, match="kind"):
        O.configs("smoke", kind="everything")
    with pytest.raises(ValueError, match="sharpness_method"):
        O.MeasureConfig(sharpness_method="adam")
    with pytest.raises(ValueError, match="overtrain_epochs"):
        O.TemporalRunConfig(prefix=PREFIX, overtrain_epochs=3)
    with pytest.raises(ValueError, match="alpha"):
        O.AlphaProbeConfig(alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        O.study("cpu", alpha=-1)
    with pytest.raises(ValueError, match="sweep_optimizers"):
        O.study("cpu", sweep_optimizers=("lbfgs",))
    t = A.configs("smoke", panels="cifar_resnet")[0].train
    with pytest.raises(ValueError, match="model"):
        O.OvertrainSweepConfig(train=t)
    with pytest.raises(ValueError, match="overtrain"):
        O.OvertrainSweepConfig(overtrain=(100, 0))


def test_profiles_build_and_sweep_keys_are_notebook_02s():
    for p in ("smoke", "cpu", "paper"):
        s = O.study(p)
        assert {c.run for c in O.temporal_configs(s, 2.0)} >= {"fig5_s9", "figS6"}
        assert len(O.probe_configs(s)) == len(s.probe_alphas)
    s = O.study("cpu")
    sw = O.sweep_configs(s, "cpu")
    assert len(sw) == 2 * 3 * 2 and {c.train.optimizer for c in sw} == {"sgd", "adam"}
    sgd02 = {config_key(c.train) for c in A.configs("cpu", panels="mnist_fcn")}
    assert {config_key(c.train) for c in sw if c.train.optimizer == "sgd"} <= sgd02, "same config -> same artifact"
    adam03 = {config_key(c.train) for c in A.configs("cpu", panels="mnist_fcn", optimizer="adam", lr=1e-3)}
    assert {config_key(c.train) for c in sw if c.train.optimizer == "adam"} <= adam03
    f5 = O.temporal_configs(O.study("paper"))[0]
    assert (f5.alpha, f5.prefix.rescale_after, f5.overtrain_epochs, f5.prefix.n_test) == (5.9, 500, 5500, 100)
    assert O.study("cpu", sweep_draws="3").sweep_draws == 3  # papermill strings are cast


# ------------------------------------------------------------------------------------------- end to end
def test_tiny_temporal_run_has_the_contract_and_the_rescaling_row(tiny):
    _, df = tiny
    assert set(O.ROW_COLUMNS) <= set(df.columns)
    r = df[df.run == "a5.9"].sort_values("epoch")
    assert r.epoch.is_unique and set(r.phase) == {"train", "overtrain"}
    fit = int(r.zero_error_epoch.iloc[0])
    E = fit + PREFIX.rescale_after
    resc = r[r.alpha_applied == True]  # noqa: E712
    assert list(resc.epoch) == [E], "one rescaled record, at the end of the prefix"
    row = resc.iloc[0]
    assert row.same_predictions and not row.function_changed and row.max_logit_change < 1e-4
    assert row.log_prior == row.log_prior_pre, "same labels: EP gives the same value"
    assert row.sharpness > row.sharpness_pre and row.hessian_norm > row.hessian_norm_pre
    assert r.epoch.max() == fit + 12
    assert set(r[r.epoch > E].epoch) >= {E + 1, E + 2}, "inset records"
    # log P is reused exactly when the function did not change since the previous record (EP is forced at the
    # rescaling, to test the invariance)
    later = r.iloc[1:][r.iloc[1:].alpha_applied != True]  # noqa: E712
    assert (later.log_prior_reused == ~later.function_changed.astype(bool)).all()
    assert (r.status == "converged").all()


def test_control_continues_the_prefix_bit_identically(tiny):
    """Restoring the saved state and training on gives the same run as one uninterrupted training."""
    from flatness.train import train_to_zero_error

    _, df = tiny
    c = df[df.run == "a1"].sort_values("epoch")
    p = PREFIX
    task = O._temporal_task(p)
    direct = train_to_zero_error(O._fcn(p.widths, p.sigma_w, p.sigma_b, p.run_seed), task, lr=p.lr,
                                 batch_size=p.batch_size, max_epochs=p.max_epochs, overtrain_epochs=12,
                                 seed=p.run_seed, device="cpu")
    h = direct.history.set_index("epoch")
    for e, loss in zip(c.epoch, c.loss):
        assert loss == h.loc[e, "loss"], f"epoch {e}"
    assert not (c.alpha_applied == True).any()  # noqa: E712


def test_rerun_computes_nothing_and_prefix_is_an_artifact(tiny, monkeypatch):
    store, df = tiny
    assert store.has_artifact(config_key(PREFIX))

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(O, "_run_temporal", boom)
    again = O.run_all([_runs(5.9), _runs(1.0)], store, progress=False)
    assert len(again) == len(df) and (again.status != "error").all()


def test_probe_and_choose_small_alpha(tiny):
    store, _ = tiny
    monkey_train = O._train_prefix
    pr = O.run_all([O.AlphaProbeConfig(prefix=PREFIX, alpha=a, epochs=3) for a in (1.5, 5.9)], store,
                   progress=False)
    assert monkey_train is O._train_prefix
    assert set(pr.alpha) == {1.5, 5.9} and (pr.sharpness_ratio > 1).all()
    synth = pd.DataFrame({"alpha": [1.5, 2.0, 3.0, 5.9], "function_changes": [0, 0, 4, 9],
                          "max_train_error": [0.0, 0.0, 0.02, 0.3]})
    assert O.choose_small_alpha(synth, below=5.9) == 2.0
    assert O.choose_small_alpha(synth, below=1.2) is None


def test_sweep_reuses_notebook_02_weights_and_continues(tmp_path):
    root = tmp_path / "smoke"
    s = O.study("smoke", sweep_attacks=(5,), sweep_overtrain=(0, 3))
    (cfg,) = O.sweep_configs(s, "smoke")
    cfg = with_overrides(cfg, measure=FAST)
    st02 = ResultStore(A.STORE_NAME, root=root)
    st02.save_artifact(config_key(cfg.train), A.train_network(cfg.train))
    store = ResultStore(O.STORE_NAME, root=root)
    df = O.run_all([cfg], store, progress=False)
    assert list(df.overtrain_epochs) == [0, 3] and set(df.weights_from) == {A.STORE_NAME}
    assert not store.has_artifact(config_key(cfg.train)), "nothing retrained"
    assert set(O.ROW_COLUMNS) <= set(df.columns) and (df.train_error == 0).iloc[0]
    assert list(df.epoch - df.overtrain_epochs) == [df.epochs_to_zero.iloc[0]] * 2
    assert list(df.phase) == ["train", "overtrain"]


def test_a_diverging_run_is_a_row_not_a_crash():
    p = with_overrides(PREFIX, lr=1e4)
    rows = O.run(O.TemporalRunConfig(prefix=p, overtrain_epochs=12, run="boom"))
    assert rows and {r["status"] for r in rows} == {"diverged"}


def test_run_rejects_other_configs():
    with pytest.raises(TypeError, match="cfg"):
        O.run(O.MeasureConfig())


# ------------------------------------------------------------------------------------ claims and figures
def _synthetic_run(spike=20.0, relax=True, change_at=None):
    ep = np.arange(0, 200, 5)
    fit, E = 20, 120
    s = np.where(ep < fit, 5.0, 4.0 * np.exp(-(ep - fit) / 40))
    pre = float(s[ep == E][0])
    s = s.copy()
    if relax:
        s[ep > E] = pre * (1 + spike * np.exp(-(ep[ep > E] - E) / 5.0))
    else:
        s[ep > E] = pre * spike
    s[ep == E] = pre * spike
    n_changes = np.where(ep <= fit, 3, 0)
    if change_at is not None:
        n_changes[ep == change_at] = 1
    return pd.DataFrame({"epoch": ep, "sharpness": s, "zero_error_epoch": fit, "alpha_applied": ep == E,
                         "sharpness_pre": np.where(ep == E, pre, np.nan), "n_function_changes": n_changes,
                         "log_prior": -50.0, "log_prior_pre": np.where(ep == E, -50.0, np.nan),
                         "same_predictions": ep == E, "max_logit_change": 0.0, "run": "x",
                         "hessian_norm": s * 10, "loss": np.exp(-ep / 50), "log10_prior": -50 / math.log(10),
                         "train_error": np.where(ep < fit, 0.1, 0.0), "test_error": 0.2, "alpha": 5.9})


def test_claim_helpers_on_synthetic_runs():
    good = _synthetic_run()
    assert O.claim_function_constant(good, window=100)["holds"]
    assert not O.claim_function_constant(_synthetic_run(change_at=80), window=100)["holds"]
    assert O.claim_function_constant(_synthetic_run(change_at=80), window=30)["holds"], "change outside the window"
    c2 = O.claim_rescale_invariance(good)
    assert c2["holds"] and c2["ratio"] == pytest.approx(20.0)
    assert not O.claim_rescale_invariance(_synthetic_run(spike=5.0))["holds"]
    bad = good.copy()
    bad.loc[bad.alpha_applied, "log_prior"] = -49.0
    assert not O.claim_rescale_invariance(bad)["holds"]
    assert O.claim_relaxation(good)["holds"]
    assert not O.claim_relaxation(_synthetic_run(relax=False))["holds"]


def test_claim_helpers_record_failed_claims_instead_of_raising():
    never_fit = _synthetic_run().assign(zero_error_epoch=np.nan)
    c1 = O.claim_function_constant(never_fit)
    assert not c1["holds"] and "never reached zero training error" in c1["reason"] and math.isnan(c1["ratio"])
    never_rescaled = _synthetic_run().assign(alpha_applied=False)
    for fn in (O.claim_rescale_invariance, O.claim_relaxation):
        c = fn(never_rescaled)
        assert not c["holds"] and "never rescaled" in c["reason"]
    assert O.claim_function_constant(never_rescaled)["reason"] is None  # claim 1 uses the last epoch instead
    ended = _synthetic_run()
    ended = ended[ended["epoch"] <= 120]  # the run ends at the rescaling: nothing to relax
    c3 = O.claim_relaxation(ended)
    assert not c3["holds"] and "no record after the rescaling" in c3["reason"]
    flat = _synthetic_run()
    flat.loc[flat.alpha_applied, "sharpness_pre"] = 0.0  # a zero pre-rescale sharpness: no ZeroDivisionError
    assert math.isinf(O.claim_rescale_invariance(flat)["ratio"])
    assert math.isinf(O.claim_relaxation(flat)["min_ratio"]) and not O.claim_relaxation(flat)["holds"]
    zero = _synthetic_run()
    zero["sharpness"] = 0.0
    zero["sharpness_pre"] = np.where(zero.alpha_applied, 0.0, np.nan)
    assert math.isnan(O.claim_function_constant(zero)["ratio"]) and not O.claim_function_constant(zero)["holds"]
    c4 = O.claim_overtrain_correlation(pd.DataFrame(columns=["measure", "r", "ci_low", "ci_high", "n"]))
    assert not c4["holds"] and "no finite" in c4["reason"]
    good = _synthetic_run()
    assert all(f(good)["reason"] is None for f in (O.claim_function_constant, O.claim_rescale_invariance,
                                                   O.claim_relaxation))


def _synthetic_sweep(flip_prior=False):
    rng = np.random.default_rng(0)
    rows = []
    for opt in ("sgd", "adam"):
        for a in (0, 100, 200, 300, 400):
            for k in (0, 100):
                err = 0.1 + a / 1000 + rng.normal(0, 0.01)
                lp = (-1 if not flip_prior else 1) * (a + rng.normal(0, 5))
                rows.append({"kind": "sweep", "optimizer": opt, "overtrain_epochs": k, "n_attack": a,
                             "test_error": err, "log_prior": lp, "log10_prior": lp / math.log(10),
                             "sharpness": rng.lognormal()})
    return pd.DataFrame(rows)


def test_correlation_table_and_claim():
    corr = O.overtrain_correlations(_synthetic_sweep(), n_boot=200)
    assert len(corr) == 2 * 2 * 2 and set(corr.measure) == {"log_prior", "sharpness"}
    lp = corr[corr.measure == "log_prior"]
    assert (lp.r < -0.9).all() and (lp.ci_low <= lp.r).all()
    assert O.claim_overtrain_correlation(corr)["holds"]
    flipped = O.overtrain_correlations(_synthetic_sweep(flip_prior=True), n_boot=200)
    assert not O.claim_overtrain_correlation(flipped)["holds"]


def test_figures_return_figures(tiny):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, df = tiny
    sw = _synthetic_sweep().query("optimizer == 'sgd'")
    figs = [O.figure_temporal(df, "a5.9"), O.figure_temporal(_synthetic_run(), "x", until=100),
            O.figure_zeta(df, "a5.9"), O.figure_hessian(df, "a5.9"), O.figure_long_run(df, "a5.9", control="a1"),
            O.figure_overtrain_scatter(sw), O.figure_overtrain_spearman(O.overtrain_correlations(sw, n_boot=50))]
    for f in figs:
        assert isinstance(f, matplotlib.figure.Figure) and f.axes
        plt.close(f)
