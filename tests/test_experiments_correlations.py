"""Notebook 06's pipeline: configs, one tiny end-to-end sweep (rows, resumability, artifacts, batched = single),
the bound columns against the library, figure functions and claim helpers."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from flatness.experiments import correlations as exp
from flatness.results import ResultStore, config_key


# ------------------------------------------------------------------------------------------ configs
def test_configs_per_profile_sizes_and_order():
    cpu = exp.configs("cpu")
    by = pd.Series([c.train.combo for c in cpu]).value_counts().to_dict()
    assert by == {"fnn": 40, "lenet5": 20, "small_vgg": 20}  # the cpu sizes
    paper = exp.configs("paper")
    assert len(paper) == 300 and all(c.train.source == "full" for c in paper)
    assert {(c.train.lr, c.train.batch_size) for c in paper if c.train.combo == "fnn"} == set(exp._SETTINGS_PAPER)
    smoke = exp.configs("smoke")
    assert len(smoke) == 9 and [c.train.seed for c in smoke[:3]] == [0, 1, 2]
    # settings and seeds replace the profile's; strings/floats from papermill are cast
    cf = exp.configs("smoke", "fnn", seeds=2, settings=[("0.05", 8), (0.1, 16.0)], max_epochs="3")
    assert [(c.train.lr, c.train.batch_size, c.train.seed) for c in cf] == [(0.05, 8, 0), (0.05, 8, 1),
                                                                            (0.1, 16, 0), (0.1, 16, 1)]
    assert all(c.train.max_epochs == 3 for c in cf)
    # the initialisation depends on (combo, seed) only: shared across settings
    assert cf[0].train.run_seed == cf[2].train.run_seed != cf[1].train.run_seed
    t = exp.track_config("cpu", epochs=4)
    assert t.epochs == 4 and t.train.combo == "fnn" and t.every == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(profile="gpu"), "configs: unknown profile='gpu'"),
    (dict(profile="smoke", combos="resnet"), "configs: unknown combos='resnet'"),
    (dict(profile="smoke", lr=-1), "CorrTrainConfig: lr=-1.0 must be > 0"),
    (dict(profile="smoke", batch_size=0), "CorrTrainConfig: batch_size=0 must be >= 1"),
    (dict(profile="smoke", n_measure=1), "CorrRunConfig: n_measure=1 must be >= 3"),
    (dict(profile="smoke", classes=(1,)), r"classes=\(1,\) must be \(\) \(all 10\) or at least two"),
    (dict(profile="smoke", source="web"), "source='web' is not allowed"),
    (dict(profile="smoke", seed=3), "unknown field 'seed'"),
    (dict(profile="smoke", seeds=0), "seeds=0 must be a positive integer"),
    (dict(profile="smoke", settings=[]), "settings is empty"),
    (dict(profile="smoke", settings=[0.1]), "must be a list of \\(lr, batch_size\\) pairs"),
])
def test_configs_reject_bad_values_when_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        exp.configs(**kwargs)


def test_track_config_rejects_unknown_field_and_cnn():
    with pytest.raises(ValueError, match="track_config: unknown field 'epoch'"):
        exp.track_config("smoke", epoch=3)
    bad = exp.ChainTrackConfig(train=exp.CorrTrainConfig(combo="lenet5"))
    with pytest.raises(ValueError, match="track_chain: train.combo='lenet5'"):
        exp.track_chain(bad)


def test_n_train_beyond_the_bundle_raises_naming_it():
    cfg = exp.configs("smoke", "small_vgg", seeds=1, n_train=10**6)[0]
    with pytest.raises(ValueError, match=r"n_train=1000000 exceeds the 4000 train images of cifar10"):
        exp.run(cfg)


def test_mse_loss_is_half_mse_and_vmaps():
    from torch.func import vmap

    from flatness.losses import half_mse

    out, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    assert torch.allclose(exp.mse_loss(out, y), half_mse(out, y))
    batched = vmap(exp.mse_loss)(torch.randn(3, 6, 10), torch.randint(0, 10, (3, 6)))
    assert batched.shape == (3,)


# -------------------------------------------------------------------------------------- end to end
def _tiny(seeds=2):
    cfgs = exp.configs("smoke", "fnn", seeds=seeds, hidden=(16, 16), n_train=32, n_test=32, n_measure=8,
                       max_epochs=2)
    cfgs += exp.configs("smoke", "lenet5", seeds=1, n_train=24, n_test=24, n_measure=4, max_epochs=1)
    return cfgs


def test_end_to_end_rows_resume_artifacts_and_bounds(tmp_path, one_thread):
    from flatness.bounds import mls_bound_chain, nmls_bound

    store = ResultStore("corr", root=tmp_path)
    cfgs = _tiny()
    df = exp.run_all(cfgs, store, progress=False)
    assert len(df) == 3 and set(exp.ROW_COLUMNS) <= set(df.columns)
    assert (df["status"] != "error").all(), df.get("error_message")
    fnn, cnn = df[df.combo == "fnn"], df[df.combo == "lenet5"]
    assert fnn["mls_bound_rigorous"].all() and not cnn["mls_bound_rigorous"].any()
    assert cnn["mls_bound_D"].isna().all() and cnn["mls_bound_D_authors"].notna().all()
    # FNN: the authors' first-layer factor is ||W_1||_2, so the *_authors chain equals the rigorous one
    assert np.allclose(fnn["mls_bound_D_authors"], fnn["mls_bound_D"], rtol=1e-6)
    assert np.allclose(fnn["mls_bound"], fnn["mls_bound_D"], rtol=1e-6)
    assert np.allclose(fnn["sqrt_trace_h"] ** 2, fnn["trace_h"])
    # every artifact saved; a re-run computes nothing
    assert all(store.has_artifact(config_key(c.train)) for c in cfgs)
    parts = len(list((tmp_path / "corr").glob("*.parquet")))
    again = exp.run_all(cfgs, store, progress=False)
    assert len(list((tmp_path / "corr").glob("*.parquet"))) == parts
    pd.testing.assert_frame_equal(again[list(exp.ROW_COLUMNS)], df[list(exp.ROW_COLUMNS)])
    # the stored row is the library's chain on the saved weights and the measurement inputs
    c = cfgs[0]
    model = exp._init(c.train)
    model.load_state_dict(store.load_artifact(config_key(c.train))["state_dict"])
    x = exp._split(c.train, "train", c.train.n_train)[0][: c.n_measure]
    ch, nb = mls_bound_chain(model, x), nmls_bound(model, x)
    row = df.iloc[0]
    assert math.isclose(row.mls_bound_D, ch.D, rel_tol=1e-5) and math.isclose(row.mls_bound_B, ch.B, rel_tol=1e-5)
    assert math.isclose(row.nmls, nb.lhs, rel_tol=1e-5) and math.isclose(row.nmls_bound, nb.rhs, rel_tol=1e-5)
    # every rigorous inequality holds
    checks = exp.chain_checks(df)
    assert checks.loc[checks.rigorous, "violations"].sum() == 0 and checks.loc[checks.rigorous, "n"].min() >= 1


def test_batched_and_unbatched_sweeps_give_the_same_rows(tmp_path, one_thread):
    cfgs = exp.configs("smoke", "fnn", seeds=3, hidden=(8,), n_train=32, n_test=16, n_measure=6, max_epochs=3)
    a = exp.run_all(cfgs, ResultStore("a", root=tmp_path), batched=True, progress=False)
    b = exp.run_all(cfgs, ResultStore("b", root=tmp_path), batched=False, progress=False)
    cols = ["mls", "nmls", "sqrt_trace_h", "mls_bound_D", "train_loss", "epochs"]
    np.testing.assert_allclose(a[cols].to_numpy(float), b[cols].to_numpy(float), rtol=1e-4)


def test_track_chain_rows_hold_the_chain(tmp_path, one_thread):
    cfg = exp.track_config("smoke", epochs=2, every=1, n_train=32, n_measure=6, hidden=(8, 8))
    track = exp.run_track(cfg, ResultStore("t", root=tmp_path), progress=False)
    assert list(track["epoch"]) == [0, 1, 2]
    assert exp.track_violations(track) == 0
    assert (track["D_all"] >= track["D"]).all()


def test_stacking_speedup_trains_the_same_models(one_thread):
    t = exp.CorrTrainConfig(combo="fnn", hidden=(8,), n_train=32, batch_size=16)
    s = exp.stacking_speedup(t, n_models=2, epochs=1)
    assert s["max_abs_diff"] < 1e-5 and s["speedup"] > 0


# ---------------------------------------------------------------------------------- claim helpers
def _synthetic(n=12, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for combo in exp.COMBOS:
        for i in range(n):
            a = rng.uniform(1, 2)
            r = {k: rng.normal() for k in exp.PAIR_COLUMNS}
            r.update(combo=combo, status="converged", lr=0.1 * (1 + i % 3), mls=a, mls_bound_A=a,
                     mls_bound_A_fro=1.1 * a, mls_bound_B=1.3 * a, mls_bound_C=1.4 * a, mls_bound_D=3 * a,
                     mls_bound_B_all=2 * a, mls_bound_C_all=2.2 * a, mls_bound_D_all=5 * a,
                     mls_bound_B_authors=1.3 * a, mls_bound_C_authors=1.4 * a, mls_bound_D_authors=3 * a + 0.01 * i,
                     mls_bound=3 * a + 0.01 * i, nmls=a, nmls_layerwise=2 * a, nmls_cs_layers=2.1 * a,
                     nmls_cs_inputs=2.2 * a, nmls_bound=2.5 * a, nmls_bound_authors=2.5 * a,
                     mls_bound_rigorous=combo == "fnn", nmls_bound_rigorous=combo == "fnn",
                     lvr_bound_rigorous=combo == "fnn", lvr_chain_ok=True)
            rows.append(r)
    return pd.DataFrame(rows)


def test_chain_checks_count_violations_and_ratios():
    df = _synthetic()
    checks = exp.chain_checks(df)
    assert checks.loc[checks.rigorous, "violations"].sum() == 0
    df.loc[0, "mls_bound_C"] = 0.5 * df.loc[0, "mls_bound_B"]  # one broken step on one FNN
    checks = exp.chain_checks(df)
    row = checks[(checks.combo == "fnn") & (checks.inequality == "A <= A_F <= B <= C <= D")].iloc[0]
    assert row.violations == 1 and row.n == 12
    assert set(checks.loc[~checks.rigorous, "combo"]) == {"lenet5", "small_vgg"}
    ratios = exp.chain_ratios(_synthetic())
    med = ratios.set_index(["combo", "step"])["median"]
    assert math.isclose(med[("fnn", "B / A")], 1.3) and math.isclose(med[("fnn", "D / C")], 3 / 1.4)


def test_claim_results_on_the_synthetic_frame_and_a_broken_chain():
    import inspect

    from flatness import claims

    df = _synthetic(n=20)
    res = {c["claim"]: c for c in exp.claim_results(df, n_boot=300)}
    names = {"every_inequality_holds"} | {f"fig3_{m}_vs_bound_{c}" for m in ("mls", "nmls") for c in exp.COMBOS} \
        | {f"figG5_C_correlates_with_mls_{c}" for c in exp.COMBOS}
    assert set(res) == names
    assert res["every_inequality_holds"]["holds"] and res["every_inequality_holds"]["value"] == 0
    assert res["every_inequality_holds"]["n"] == 20 * 4  # the FNN's four rigorous chains (CNN rows not rigorous)
    assert "B/A = 1.30" in res["every_inequality_holds"]["text"]
    assert all(res[f"fig3_mls_vs_bound_{c}"]["holds"] for c in exp.COMBOS)  # planted: bound = 3 MLS + noise
    assert "not rigorous" in res["fig3_mls_vs_bound_lenet5"]["statistic"]
    assert "not rigorous" not in res["fig3_mls_vs_bound_fnn"]["statistic"]
    for c in res.values():
        inspect.signature(claims.record).bind("06_test", profile="smoke", **c)
    bad = df.copy()
    bad.loc[0, "mls_bound_C"] = 0.5 * bad.loc[0, "mls_bound_B"]
    track = pd.DataFrame([dict(A=1.0, A_fro=1.1, B=1.2, C=1.0, D=2.0, B_all=2.0, C_all=2.1, D_all=3.0)])  # C < B
    res2 = {c["claim"]: c for c in exp.claim_results(bad, track, n_boot=300)}
    assert not res2["every_inequality_holds"]["holds"] and res2["every_inequality_holds"]["value"] == 2
    assert res2["every_inequality_holds"]["n"] == 20 * 4 + 1


def test_correlations_recover_a_planted_relation():
    df = _synthetic(n=30)
    corr = exp.correlations(df, [("mls_bound", "mls"), ("local_dim", "mls")], n_boot=300)
    strong = corr[(corr.x == "mls_bound")]
    assert (strong["r"] > 0.9).all() and (strong["ci_low"] > 0.5).all()
    assert set(corr.combo) == set(exp.COMBOS) and (corr.n == 30).all()


def test_figures_return_figures_on_a_tiny_frame():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = _synthetic(n=6)
    for fig in (exp.figure_fig3(df, n_boot=50), exp.figure_heatmap(df, n_boot=50),
                exp.figure_pairplot(df, "fnn", dict(list(exp.PAIR_COLUMNS.items())[:3]), n_boot=50)):
        assert isinstance(fig, matplotlib.figure.Figure) and fig.axes
        plt.close(fig)
    track = pd.DataFrame({"epoch": [0, 2], "A": [1, 1], "B": [2, 2], "C": [3, 3], "D": [5, 4], "B_all": [3, 3],
                          "C_all": [4, 4], "D_all": [8, 7], "status": "ok"})
    fig = exp.figure_g5(track)
    assert len(fig.axes) == 2
    plt.close(fig)
    with pytest.raises(ValueError, match="figure_pairplot: unknown combo='mlp'"):
        exp.figure_pairplot(df, "mlp")
