"""Notebook 05's pipeline (Chen et al. 2023, Figs. 1-2): configs, one tracked run, resuming, analysis, figures."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from flatness.experiments import dynamics as exp
from flatness.results import ResultStore, config_key

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**kw):
    """A run small enough for a unit test (bundled images, a few SGD steps)."""
    base = dict(n_train=40, n_test=20, source="embedded", iterations=12, track_every=4, n_track=3, eval_epochs=2,
                batch_size=8, lr=0.05)
    return exp.DynamicsConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------ configs
def test_profiles_build_the_issue_sweeps():
    smoke, cpu, paper = (exp.configs(p) for p in ("smoke", "cpu", "paper"))
    settings = {(0.05, 20), (0.1, 20), (0.2, 20), (0.1, 8), (0.1, 32)}
    for cfgs, seeds in ((smoke, 1), (cpu, 2), (paper, 5)):
        got = {(c.lr, c.batch_size) for c in cfgs}
        assert got == settings
        assert {c.seed for c in cfgs} == set(range(seeds))
    assert len(cpu) == 10 and len(paper) == 2 * 5 * 5  # paper: small VGG and torchvision VGG-11
    assert {c.model for c in paper} == {"small_vgg", "vgg11"}
    p = paper[0]
    assert (p.iterations, p.track_every, p.n_track, p.n_train, p.top_k) == (750_000, 200, 20, 10_000, 3)
    assert all(c.source == "embedded" for c in smoke + cpu) and p.source == "full"
    assert len({config_key(c) for c in cpu}) == 10
    c = exp.configs("smoke", iterations="40", seeds=2.0)  # papermill strings and floats
    assert c[0].iterations == 40 and len(c) == 10
    # cpu: each setting past its loss minimum (lr 0.05 2x, batch 8 5x the reference (0.1, 20)'s steps); paper equal
    steps = {(c.lr, c.batch_size): c.iterations for c in cpu}
    assert steps == {(0.05, 20): 10_000, (0.1, 20): 5000, (0.2, 20): 5000, (0.1, 8): 25_000, (0.1, 32): 5000}
    assert {c.iterations for c in paper} == {750_000}
    assert {c.iterations for c in exp.configs("cpu", budget="equal")} == {5000}
    assert {c.iterations for c in exp.configs("cpu", budget="matched", iterations=100)} == {100, 200, 250}
    assert {c.iterations for c in exp.configs("cpu", iterations=100)} == {100, 200, 500}
    assert exp.setting_iterations(100, 0.1, 4, "past_minimum") == 500  # not in the table: "matched"'s 20 / 4
    assert exp.setting_iterations(7, 0.1, 20, "matched") == 7 and exp.setting_iterations(7, 0.1, 6, "matched") == 24
    with pytest.raises(ValueError, match="budget"):
        exp.configs("cpu", budget="longest")


@pytest.mark.parametrize("kw, message", [
    (dict(lr=0.0), "lr=0.0 must be > 0"), (dict(batch_size=0), "batch_size=0 must be >= 1"),
    (dict(model="resnet"), "model='resnet' is not allowed"), (dict(loss="ce"), "loss='ce' is not allowed"),
    (dict(classes=(0,)), r"classes=\(0,\) must be at least two distinct"), (dict(n_train=41), "n_train=41 must be a multiple"),
    (dict(n_track=50), "n_track=50 exceeds n_train=40"), (dict(num_outputs=1), "num_outputs=1 must be >= 2"),
    (dict(track_every=0), "track_every=0 must be >= 1")])
def test_config_rejects_bad_values_naming_the_field(kw, message):
    with pytest.raises(ValueError, match=f"DynamicsConfig: {message}"):
        _tiny(**kw)


def test_configs_rejects_unknown_profile_model_field_and_sweep_fields():
    with pytest.raises(ValueError, match="unknown profile='gpu'"):
        exp.configs("gpu")
    with pytest.raises(ValueError, match="unknown models='vgg16'"):
        exp.configs("smoke", models=["vgg16"])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['lr'\]"):
        exp.configs("smoke", lr=0.1)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['iters'\]"):
        exp.configs("smoke", iters=5)
    with pytest.raises(ValueError, match="seeds=0"):
        exp.configs("smoke", seeds=0)


def test_mse_option_is_torch_mse_and_half_mse_for_two_outputs():
    out, y = torch.randn(6, 2), torch.randint(0, 2, (6,))
    onehot = torch.nn.functional.one_hot(y, 2).float()
    assert torch.allclose(exp._loss_fn("mse", 2)(out, y), torch.nn.functional.mse_loss(out, onehot))
    assert torch.allclose(exp._loss_fn("half_mse", 2)(out, y), torch.nn.functional.mse_loss(out, onehot))
    out10 = torch.randn(6, 10)
    from flatness.losses import half_mse

    assert torch.allclose(exp._loss_fn("half_mse", 10)(out10, y), half_mse(out10, y))
    assert torch.allclose(exp._loss_fn("mse", 10)(out10, y),
                          torch.nn.functional.mse_loss(out10, torch.nn.functional.one_hot(y, 10).float()))


# -------------------------------------------------------------------------------------------- runs
def test_run_rows_have_the_contract_columns_and_match_an_independent_measurement(tmp_path):
    from flatness.compression import local_metrics, network_mls
    from flatness.hessian import per_example_grad_norms_sq

    cfg = _tiny()
    store = ResultStore("dyn", root=tmp_path)
    rows = exp.run(cfg, store)
    df = pd.DataFrame(rows)
    assert set(exp.ROW_COLUMNS) <= set(df.columns)
    assert df["iteration"].tolist() == [0, 4, 8, 12] and (df["status"] == "ok").all()
    assert df["run"].nunique() == 1 and df["lr"].iloc[0] == 0.05 and df["batch_size"].iloc[0] == 8
    assert np.isclose(df["log_volume"], df["log_volume_top3"]).all()  # k = 2 outputs: top-3 = all
    # the final row equals metrics recomputed on the saved weights (dense per-example gradients as oracle)
    art = store.load_artifact(config_key(cfg))
    model = exp._init(cfg)
    model.load_state_dict(art["state_dict"])
    model.eval()
    x, y = exp._split(cfg.classes, "train", cfg.n_train, cfg.source)
    xt = x[exp._track_indices(cfg.n_train, cfg.n_track)]
    dense = 0.0
    for xi in xt:
        for j in range(cfg.k):
            model.zero_grad()
            model(xi[None])[0, j].backward()
            dense += sum(float(p.grad.pow(2).sum()) for p in model.parameters())
    last = df.iloc[-1]
    assert math.isclose(last["sqrt_trace_h"], math.sqrt(dense / len(xt)), rel_tol=1e-4)
    assert math.isclose(last["sqrt_trace_h"] ** 2, float(per_example_grad_norms_sq(model, xt).mean()), rel_tol=1e-4)
    lm = local_metrics(model, xt)
    assert math.isclose(last["mls"], float(lm["mls"].mean()), rel_tol=1e-5)
    assert math.isclose(last["nmls"], float(network_mls(model, xt).mean()), rel_tol=1e-5)
    with torch.no_grad():
        out = model(x)
    assert math.isclose(last["loss"], float(exp._loss_fn("half_mse", 2)(out, y)), rel_tol=1e-5)
    assert not store.has_artifact(f"checkpoint-{config_key(cfg)}")  # removed once the run is saved


def test_killed_run_resumes_from_its_checkpoint_with_the_same_rows(tmp_path, monkeypatch):
    cfg = _tiny(iterations=20, eval_epochs=1)  # 40 images, batch 8: 5 steps per epoch, a checkpoint each
    ref = exp.run(cfg)  # uninterrupted, no store

    store = ResultStore("dyn", root=tmp_path)
    from flatness.train import loop

    real = loop._evaluate
    calls = {"n": 0}

    def killing_evaluate(model, loss_fn, data, *a, **k):  # dies in epoch 3's evaluation (epoch 2 checkpointed)
        calls["n"] += data is not None
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real(model, loss_fn, data, *a, **k)

    monkeypatch.setattr(loop, "_evaluate", killing_evaluate)
    with pytest.raises(KeyboardInterrupt):
        exp.run(cfg, store)
    ckpt = store.load_artifact(f"checkpoint-{config_key(cfg)}")
    assert 0 < ckpt["step"] < cfg.iterations
    monkeypatch.setattr(loop, "_evaluate", real)
    resumed = exp.run(cfg, store)
    pd.testing.assert_frame_equal(pd.DataFrame(resumed), pd.DataFrame(ref))


def test_run_all_is_resumable_and_reads_saved_runs(tmp_path, monkeypatch):
    cfgs = [_tiny(seed=s) for s in (0, 1)]
    store = ResultStore("dyn", root=tmp_path)
    df = exp.run_all(cfgs, store, progress=False)
    assert len(df) == 8 and df["seed"].tolist() == [0] * 4 + [1] * 4
    monkeypatch.setattr(exp, "_train", lambda *a, **k: pytest.fail("retrained a saved run"))
    again = exp.run_all(cfgs, store, progress=False)  # nothing is computed
    pd.testing.assert_frame_equal(df, again)
    # the rows can be rebuilt from the artifacts alone (a new table, same weights and tracks)
    rows = exp.run(cfgs[0], store)
    assert pd.DataFrame(rows)["sqrt_trace_h"].tolist() == df[df.seed == 0]["sqrt_trace_h"].tolist()


def test_diverged_run_is_a_row_with_status_diverged():
    rows = exp.run(_tiny(lr=1e4, iterations=40))
    assert rows and all(r["status"] == "diverged" for r in rows)


# -------------------------------------------------------------------------------------- analysis
def _synthetic(n_seeds=2, its=np.arange(0, 2001, 100)):
    """Loss falls to a floor at 1000; sharpness and MLS rise, then decay at a rate growing with lr / batch."""
    rows = []
    for lr, bs in exp.SETTINGS:
        for s in range(n_seeds):
            rate = lr / bs * 20
            for it in its:
                loss = max(1e-3, 0.5 * math.exp(-it / 150))
                peak = 10 / (1 + rate)
                sharp = peak * min(1.0, it / 1000) * (math.exp(-rate * (it - 1000) / 2000) if it > 1000 else 1.0)
                rows.append({"run": f"lr={lr}/bs={bs}/seed={s}", "model": "small_vgg", "lr": lr, "batch_size": bs,
                             "seed": s, "iteration": int(it), "loss": loss, "train_error": 0.0 if it > 800 else 0.1,
                             "sqrt_trace_h": sharp + 0.01 * s, "mls": sharp / 10, "log_volume": math.log(sharp + 1),
                             "log_volume_top3": math.log(sharp + 1), "local_dim": 1.5, "nmls": sharp,
                             "test_accuracy": 0.8, "status": "ok"})
    return pd.DataFrame(rows)


def test_late_phase_starts_where_the_loss_is_near_its_minimum():
    df = _synthetic()
    late = exp.late_phase(df, loss_factor=10)
    # loss <= 1e-2 first at it >= 150 ln 50 = 587 -> 600
    assert (late.groupby("run")["late_start"].first() == 600).all()
    assert exp.late_phase(df, loss_factor=1)["late_start"].iloc[0] == 1000  # the floor itself
    with pytest.raises(ValueError, match="loss_factor=0.5 must be >= 1"):
        exp.late_phase(df, 0.5)
    with pytest.raises(ValueError, match="lacks columns"):
        exp.late_phase(df.drop(columns="loss"))
    bad = df.assign(status=np.where(df["lr"] == 0.2, "diverged", "ok"))
    assert 0.2 not in set(exp.late_phase(bad)["lr"])


def test_late_phase_spearman_and_orderings_on_synthetic_runs():
    df = _synthetic()
    sp = exp.late_phase_spearman(df, loss_factor=1, n_boot=200)
    assert len(sp) == 10 * 3 and (sp["r"] < 0).all() and (sp["n"] == 11).all()
    assert (sp["ci_high"] <= 0).all()
    fin = exp.final_values(df)
    lr = exp.ordering(fin, "lr", "sqrt_trace_h")  # higher lr -> lower sharpness
    assert lr["holds"] and lr["min_gap"] > 0 and list(lr["values"]) == [0.05, 0.1, 0.2] and lr["n_seeds"] == 2
    bs = exp.ordering(fin, "batch_size", "sqrt_trace_h", decreasing=False)  # smaller batch -> lower
    assert bs["holds"] and list(bs["values"]) == [8, 20, 32]
    flipped = exp.ordering(fin, "lr", "sqrt_trace_h", decreasing=False)
    assert not flipped["holds"] and flipped["min_gap"] < 0
    with pytest.raises(ValueError, match="unknown along='seed'"):
        exp.ordering(fin, "seed", "mls")
    with pytest.raises(ValueError, match="frac=0 must be"):
        exp.final_values(df, frac=0)


def test_claim_results_hold_on_the_synthetic_runs_and_fail_when_one_run_rises():
    import inspect

    from flatness import claims

    df = _synthetic()
    res = {c["claim"]: c for c in exp.claim_results(df, loss_factor=1, n_boot=200)}
    assert set(res) == {"late_decline_sqrt_trace_h", "late_decline_mls", "late_decline_log_volume_top3",
                        "order_lr_sqrt_trace_h", "order_batch_sqrt_trace_h", "order_lr_mls", "order_batch_mls"}
    assert all(c["holds"] for c in res.values()), {k: c["value"] for k, c in res.items()}
    assert res["late_decline_mls"]["n"] == 10 and res["late_decline_mls"]["value"] < 0
    for c in res.values():  # each is a valid claims.record call
        inspect.signature(claims.record).bind("05_test", profile="smoke", **c)
    given = exp.claim_results(df, spearman=exp.late_phase_spearman(df, loss_factor=1, n_boot=200),
                              final=exp.final_values(df))  # the notebook's tables, not recomputed
    assert [(c["claim"], c["value"], c["holds"]) for c in given] == [(c["claim"], c["value"], c["holds"])
                                                                     for c in res.values()]
    # one run whose sharpness keeps rising after the loss minimum breaks "in every run" (and only that claim)
    bad = df.copy()
    one = bad["run"] == bad["run"].iloc[0]
    bad.loc[one, "sqrt_trace_h"] = bad.loc[one, "iteration"] / 100.0
    res2 = {c["claim"]: c for c in exp.claim_results(bad, loss_factor=1, n_boot=200)}
    assert not res2["late_decline_sqrt_trace_h"]["holds"] and res2["late_decline_sqrt_trace_h"]["value"] == 1.0
    assert res2["late_decline_mls"]["holds"]
    # a run with too few late points cannot count as declining
    short = df[~((df["run"] == df["run"].iloc[0]) & (df["iteration"] > 1100))]
    res3 = {c["claim"]: c for c in exp.claim_results(short, loss_factor=1, n_boot=200)}
    assert not res3["late_decline_mls"]["holds"]


def test_figures_return_figures_on_a_tiny_frame():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = _synthetic(its=np.arange(0, 2001, 250))
    fig = exp.figure_dynamics(df, "batch_size")
    assert len([a for a in fig.axes if a.get_visible()]) == 6
    plt.close(fig)
    fig = exp.figure_late_trajectories(df[df["batch_size"] == 20], ys=("mls",))
    assert len(fig.axes) >= 3
    plt.close(fig)
    with pytest.raises(ValueError, match="unknown vary='seed'"):
        exp.figure_dynamics(df, "seed")


def test_cost_estimate_counts_steps_tracks_and_passes():
    cfgs = exp.configs("paper", models="small_vgg")
    est = exp.cost_estimate(cfgs, {8: 1e-3, 20: 1e-3, 32: 1e-3}, track_s=0.1, eval_img_s=0.0)
    assert est["runs"] == 25 and est["steps"] == 25 * 750_000 and est["tracks"] == 25 * 3751
    assert math.isclose(est["seconds"], 25 * 750.0 + 25 * 3751 * 0.1)
