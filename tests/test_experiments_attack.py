"""Notebook 02's pipeline (flatness.experiments.attack): sweep sizes, config checks, one tiny run end to end."""

import math
from collections import Counter

import pytest
import torch

from flatness.experiments import attack as A
from flatness.prior import arccos_kernel, log_prior_ep
from flatness.results import ResultStore
from flatness.runs import config_key

CONTRACT = ("panel", "dataset", "model", "optimizer", "n_train", "n_attack", "n_test", "draw", "seed", "status",
            "epochs", "train_error", "attack_error", "test_error", "log_prior", "log10_prior", "likelihood",
            "ep_converged", "sharpness", "sharpness_lbfgsb", "hessian_norm")
TINY = dict(n_train=50, n_test=50, sharpness_epochs=5)  # one MNIST FCN run in a few seconds


def _tiny(n_attack=10, **kw):
    (cfg,) = A.configs("cpu", panels="mnist_fcn", attacks=[n_attack], draws=1, **{**TINY, **kw})
    return cfg


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("profile, counts", [
    ("smoke", {"mnist_fcn": 3, "cifar_fcn": 2, "cifar_resnet": 1}),
    ("cpu", {"mnist_fcn": 55, "cifar_fcn": 18, "cifar_resnet": 6}),
    ("paper", {"mnist_fcn": 55, "cifar_fcn": 55, "cifar_resnet": 55, "mnist_10k": 33}),
])
def test_configs_have_the_issue_counts(profile, counts):
    cfgs = A.configs(profile)
    assert dict(Counter(c.panel for c in cfgs)) == counts
    assert len({config_key(c) for c in cfgs}) == len(cfgs), "every run is a distinct config"


def test_cpu_sizes_match_the_issue_table():
    by = lambda p: A.configs("cpu", panels=p)  # noqa: E731
    mn = by("mnist_fcn")
    assert sorted({c.train.n_attack for c in mn}) == list(range(0, 501, 50))
    assert sorted({c.train.draw for c in mn}) == [0, 1, 2, 3, 4]
    assert {(c.train.n_train, c.train.n_test, c.train.model, c.train.source) for c in mn} == \
        {(500, 1000, "fcn", "embedded")}
    cf = by("cifar_fcn")
    assert sorted({c.train.n_attack for c in cf}) == list(range(0, 501, 100))
    assert {(c.train.n_train, c.train.n_test, c.train.widths) for c in cf} == {(500, 500, (3072, 40, 40, 1))}
    rn = by("cifar_resnet")
    assert sorted({c.train.n_attack for c in rn}) == [0, 125, 250]
    assert {(c.train.model, c.train.batch_size, c.train.lr, c.zeta, c.sharpness_lr, c.sharpness_batch_size,
             c.sharpness_epochs) for c in rn} == {("resnet_small", 32, 0.1, 1e-5, 1.0, 128, 100)}, \
        "cpu ResNet: batch 32 and lr 0.1 (documented), the reference sheet's ascent settings"
    assert {(c.train.batch_size, c.train.lr) for c in A.configs("paper", panels="cifar_resnet")} == {(128, 0.01)}
    assert {(c.zeta, c.sharpness_lr, c.sharpness_epochs, c.train.lr, c.train.batch_size) for c in mn + cf} == \
        {(1e-4, 1e-3, 100, 0.01, 32)}, "reference sheet: FCN sharpness and training settings"
    assert {c.train.source for c in A.configs("paper")} == {"full"}


def test_optimizer_override_reaches_every_run_and_seeds_come_from_the_config():
    cfgs = A.configs("cpu", optimizer="adam", lr=1e-3)
    assert {(c.train.optimizer, c.train.lr) for c in cfgs} == {("adam", 1e-3)}
    a = A.configs("cpu", panels="mnist_fcn", attacks=[100], draws=3)[2]
    b = [c for c in A.configs("cpu", panels="mnist_fcn") if c.train.n_attack == 100 and c.train.draw == 2][0]
    assert a == b and a.train.run_seed == b.train.run_seed, "a run's seed must not depend on its list position"
    assert len({c.train.run_seed for c in A.configs("cpu", panels="mnist_fcn")}) == 55


@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1.0), "lr"), (dict(zeta=0.0), "zeta"), (dict(max_epochs=0), "max_epochs"),
    (dict(bogus=1), "bogus"), (dict(n_attack=5), "n_attack"), (dict(panels="nope"), "panels"),
    (dict(draws=0), "draws"), (dict(batch_size=0), "batch_size"), (dict(source="web"), "source"),
])
def test_bad_overrides_raise_naming_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        A.configs("cpu", **kw)


def test_unknown_profile_raises():
    with pytest.raises(ValueError, match="profile"):
        A.configs("gpu")


# ------------------------------------------------------------------------------------------ one run
@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, one_thread):
    store = ResultStore(A.STORE_NAME, tmp_path_factory.mktemp("results"))
    cfg = _tiny()
    table = A.run_all([cfg], store, progress=False)
    return store, cfg, table


def test_tiny_run_row_has_the_contract(tiny_store):
    store, cfg, table = tiny_store
    assert len(table) == 1
    row = table.iloc[0]
    missing = [c for c in (*CONTRACT, "config", "key") if c not in table.columns]
    assert not missing, f"missing contract columns {missing}"
    assert row["status"] == "converged" and row["epochs"] > 0
    assert (row["panel"], row["dataset"], row["model"], row["optimizer"]) == ("mnist_fcn", "mnist", "fcn", "sgd")
    assert (row["n_train"], row["n_attack"], row["n_test"], row["draw"]) == (50, 10, 50, 0)
    assert row["seed"] == cfg.train.run_seed
    assert row["train_error"] == 0.0
    assert 0.0 <= row["test_error"] <= 1.0 and 0.0 <= row["attack_error"] <= 1.0
    assert math.isfinite(row["log_prior"]) and row["log_prior"] < 0
    assert row["log10_prior"] == pytest.approx(row["log_prior"] / math.log(10))
    assert row["likelihood"] == "heaviside" and bool(row["ep_converged"])
    assert math.isfinite(row["log_prior_probit"])
    assert row["sharpness"] >= 0 and row["sharpness_lbfgsb"] >= 0 and row["hessian_norm"] > 0


def test_log_prior_equals_an_independent_ep_call(tiny_store):
    store, cfg, table = tiny_store
    t = cfg.train
    model = A._init(t)
    model.load_state_dict(store.load_artifact(config_key(t))["state_dict"])
    task = A._task(t)
    x = torch.cat([task.train.x, task.test.x])
    with torch.no_grad():
        y = (model(x)[:, 0] > 0).long()
    assert torch.equal(y[: t.n_train], task.train.y), "zero training error: predictions on S are its labels"
    ref = log_prior_ep(arccos_kernel(x.reshape(len(x), -1), n_hidden=2, sigma_w=math.sqrt(2), sigma_b=1.0), y)
    assert table.iloc[0]["log_prior"] == pytest.approx(ref.log_prob, rel=1e-9)
    probit = log_prior_ep(arccos_kernel(x.reshape(len(x), -1)), y, likelihood="probit")
    assert table.iloc[0]["log_prior_probit"] == pytest.approx(probit.log_prob, rel=1e-9)


def test_second_run_all_computes_nothing_and_remeasuring_does_not_retrain(tiny_store, monkeypatch):
    store, cfg, table = tiny_store

    def boom(*a, **k):
        raise AssertionError("nothing should be computed")

    monkeypatch.setattr(A, "run", boom)
    again = A.run_all([cfg], store, progress=False)
    assert again.drop(columns=[c for c in again.columns if c.startswith("_")], errors="ignore") \
        .equals(table.drop(columns=[c for c in table.columns if c.startswith("_")], errors="ignore"))
    monkeypatch.undo()
    monkeypatch.setattr(A, "train_network", boom)  # a new box size re-measures the saved weights
    wider = cfg.replace(zeta=1e-3)
    (row,) = A.run(wider, store)
    assert wider.train == cfg.train and row["status"] == "converged" and row["sharpness"] >= 0


def test_a_run_that_cannot_converge_is_a_row_with_its_status(tmp_path, one_thread):
    store = ResultStore(A.STORE_NAME, tmp_path)
    cfg = _tiny(n_attack=50, max_epochs=1)  # one epoch of SGD at lr 0.01 cannot fit S
    table = A.run_all([cfg], store, progress=False)
    row = table.iloc[0]
    assert row["status"] == "max_epochs" and row["epochs"] == -1
    assert all(c in table.columns for c in CONTRACT)
    assert all(math.isnan(row[c]) for c in ("log_prior", "sharpness", "sharpness_lbfgsb", "hessian_norm"))


def test_tiny_resnet_run_uses_the_empirical_kernel(one_thread):
    (cfg,) = A.configs("smoke", panels="cifar_resnet", n_train=20, n_test=20, kernel_samples=2, sharpness_epochs=1)
    (row,) = A.run(cfg)
    assert row["status"] == "converged" and row["train_error"] == 0.0
    assert (row["model"], row["kernel"], row["kernel_samples"]) == ("resnet_small", "empirical", 2)
    assert math.isfinite(row["log_prior"]) and row["sharpness"] >= 0 and math.isnan(row["sharpness_lbfgsb"])


# ------------------------------------------------------------------------------ kernel reuse, sweep order
def test_s_and_t_do_not_depend_on_the_attack_size_so_runs_of_a_draw_share_the_kernel():
    from flatness.data import binary_task

    a = binary_task("mnist", 50, 0, 50, seed=3, source="embedded")
    b = binary_task("mnist", 50, 40, 50, seed=3, source="embedded")
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.x, b.test.x)
    c0, c1 = _tiny(n_attack=0), _tiny(n_attack=40)
    assert A._kernel_config(c0, 100) == A._kernel_config(c1, 100)
    assert A._kernel_config(c0, 100) != A._kernel_config(c0.replace(train=c0.train.replace(draw=1)), 100)


def test_resnet_kernel_is_an_artifact_reused_by_the_next_attack_size(tmp_path, one_thread, monkeypatch):
    store = ResultStore(A.STORE_NAME, tmp_path)
    cfgs = A.configs("smoke", panels="cifar_resnet", attacks=[0, 10], n_train=20, n_test=20, kernel_samples=2,
                     sharpness_epochs=1)
    A._KERNEL_CACHE.clear()
    (r0,) = A.run(cfgs[0], store)
    kc = A._kernel_config(cfgs[0], 40)
    assert store.has_artifact(config_key(kc)), "the empirical kernel is saved as an artifact"
    A._KERNEL_CACHE.clear()
    import flatness.prior as prior

    def boom(*a, **k):
        raise AssertionError("the kernel must be loaded, not recomputed")

    monkeypatch.setattr(prior, "empirical_nngp_kernel", boom)
    (r1,) = A.run(cfgs[1], store)
    assert r1["status"] == "converged" and r1["kernel"] == "empirical" and math.isfinite(r1["log_prior"])


def test_run_all_keeps_the_order_of_its_configs_and_checks_workers(tiny_store):
    store, cfg, _ = tiny_store
    other = _tiny(n_attack=0)
    table = A.run_all([other, cfg], store, progress=False)
    assert list(table["n_attack"]) == [0, 10]
    with pytest.raises(ValueError, match="workers"):
        A.run_all([cfg], store, workers=0)
    assert A.WORKERS == {"smoke": 1, "cpu": 2, "paper": 1}


# -------------------------------------------------------------------------------- figures and claims
def _synthetic(sign=1.0, n=30, seed=0):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for panel in ("mnist_fcn", "cifar_fcn", "cifar_resnet"):
        for i in range(n):
            a = 50 * (i % 6)
            err = 0.1 + 0.0008 * a + rng.normal(0, 0.01)
            rows.append(dict(panel=panel, status="converged", n_attack=a, n_train=250, test_error=err,
                             log10_prior=-300 - sign * 300 * err + rng.normal(0, 2),
                             log10_prior_probit=-320 - 250 * a / 250 + rng.normal(0, 2),
                             sharpness=10 ** rng.normal(0, 1), sharpness_lbfgsb=10 ** rng.normal(0, 1),
                             hessian_norm=10 ** rng.normal(1, 0.3)))
    rows.append(dict(panel="mnist_fcn", status="max_epochs", n_attack=0, n_train=250))
    return pd.DataFrame(rows)


def test_correlations_and_claims_on_synthetic_data():
    df = _synthetic()
    corr = A.correlations(df, n_boot=200)
    assert set(corr.panel) == {"mnist_fcn", "cifar_fcn", "cifar_resnet"}
    r = corr[(corr.pair == "log10_prior_vs_test_error") & (corr.method == "spearman")]
    assert (r.r < -0.9).all() and (r.n == 30).all(), "the non-converged row is left out"
    res = {c["claim"]: c for c in A.claim_results(df, corr)}
    assert res["test_error_rises_mnist_fcn"]["holds"] and res["log_prior_predicts_cifar_resnet"]["holds"]
    assert res["flatness_looser_mnist_fcn"]["holds"] and res["flatness_looser_mnist_fcn"]["value"] < 0
    lo, hi = res["flatness_looser_mnist_fcn"]["ci"]
    assert lo <= res["flatness_looser_mnist_fcn"]["value"] <= hi
    assert res["scale_log10p_high"]["value"] == pytest.approx(-320, abs=3) and res["scale_log10p_high"]["holds"]
    assert res["scale_log10p_low"]["value"] == pytest.approx(-570, abs=3) and not res["scale_log10p_low"]["holds"]
    bad = {c["claim"]: c for c in A.claim_results(_synthetic(sign=-1.0))}  # prior rising with test error
    assert not bad["log_prior_predicts_mnist_fcn"]["holds"] and bad["log_prior_predicts_mnist_fcn"]["value"] > 0.9
    sharp = _synthetic(sign=0.0)  # prior unrelated to the error, sharpness a monotone function of it
    sharp["sharpness"] = 10 ** (10 * sharp["test_error"])
    looser = {c["claim"]: c for c in A.claim_results(sharp)}["flatness_looser_mnist_fcn"]
    assert not looser["holds"] and looser["value"] > 0.5
    from flatness import claims

    for c in res.values():  # every dict is accepted by claims.record's signature
        assert set(c) <= set(claims.record.__code__.co_varnames)


def test_figure_functions_return_figures_on_a_tiny_frame():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = _synthetic(n=6)
    for f in (A.figure_fig3, A.figure_s7, A.figure_spectral_norm, A.figure_scale):
        fig = f(df)
        assert fig.axes, f.__name__
        plt.close(fig)
    assert A.figure_fig3(df).axes[0].get_title() == "MNIST, FCN"
    plt.close("all")
    tab = A.scale_table(df)
    assert list(tab["n_attack"]) == sorted(set(df["n_attack"].dropna().astype(int)))
