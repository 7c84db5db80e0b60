"""Notebook 01's pipeline pieces: profile configs and function selection."""

import numpy as np
import pandas as pd
import pytest

from flatness.experiments import boolean as exp


def test_config_for_profiles_and_overrides():
    assert exp.config_for("cpu").n_prior_samples >= 10**7  # the cpu-profile floor
    assert exp.config_for("paper").n_prior_samples >= 10**9 and exp.config_for("paper").n_functions == 1000
    cfg = exp.config_for("smoke", n_functions=5.0, lr=None, n_prior_samples="1e5")  # papermill floats/strings
    assert cfg.n_functions == 5 and cfg.n_prior_samples == 100_000 and cfg.lr == exp.BooleanConfig().lr
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['nfunctions'\]; valid fields are"):
        exp.config_for("smoke", nfunctions=3)
    with pytest.raises(ValueError, match="unknown profile='gpu'"):
        exp.config_for("gpu")


@pytest.mark.parametrize("field, value, message", [
    ("zeta", 0, "zeta=0.0 must be > 0"), ("lr", -1, "lr=-1.0 must be > 0"), ("batch_size", 0, "batch_size=0 must be >= 1"),
    ("n_functions", 0, "n_functions=0 must be >= 1"), ("max_epochs", 0, "max_epochs=0 must be >= 1"),
    ("restarts", 0, "restarts=0 must be >= 1"), ("selection", "best", "selection='best' is not allowed"),
    ("widths", (7, 40, 2), r"widths=\(7, 40, 2\) must start with"), ("loss_threshold", -0.1, "loss_threshold=-0.1 must be > 0")])
def test_config_for_rejects_bad_values_when_made(field, value, message):
    with pytest.raises(ValueError, match=f"BooleanConfig: {message}"):
        exp.config_for("smoke", **{field: value})


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


def _study():
    cfg = exp.config_for("smoke", widths=(4, 12, 1), zeta_sweep=(1e-2,), max_epochs=4000, restarts=2)
    return cfg, ["0000", "ffff", "00ff"]


def test_pipeline_trains_each_function_and_measures_against_dense_oracles(one_thread):
    """Networks express their functions at the loss threshold; the recorded lambda_max is the dense one."""
    import torch
    from torch.func import functional_call, hessian

    from flatness.boolean import boolean_inputs, hex_to_function
    from flatness.losses import sigmoid_bce

    cfg, functions = _study()
    cfgs = exp.run_configs(cfg, functions)
    assert [(c.train.function, c.train.restart) for c in cfgs] == [(f, r) for f in functions for r in range(2)]
    assert len({c.train.run_seed for c in cfgs}) == len(cfgs)  # seeds from (function, restart), not positions
    rows = exp.run_batch(cfgs)
    assert all(r["status"] == "converged" for r in rows)
    x = boolean_inputs(4)
    for c, row in zip(cfgs[::2], rows[::2]):
        art = exp._train_one(c.train)
        model = exp._init(c.train)
        model.load_state_dict(art["state_dict"])
        y = hex_to_function(c.train.function, 4)
        assert torch.equal((model(x).squeeze(1) > 0).long(), y)  # expresses exactly its function
        assert float(sigmoid_bce(model(x).detach(), y)) <= cfg.loss_threshold
        params = {k: v.detach().double() for k, v in model.named_parameters()}
        flat = torch.cat([p.reshape(-1) for p in params.values()])
        shapes = [(k, p.shape, p.numel()) for k, p in params.items()]

        def loss(v):
            ps, o = {}, 0
            for k, shape, n in shapes:
                ps[k] = v[o:o + n].reshape(shape)
                o += n
            return sigmoid_bce(functional_call(model.double(), ps, (x.double(),)), y)

        lam = torch.linalg.eigvalsh(hessian(loss)(flat))[-1]
        assert row["hessian_norm"] == pytest.approx(float(lam), rel=1e-3)
        assert row["sharpness"] >= 0 and row["sharpness_lbfgsb"] >= 0
    runs = pd.DataFrame(rows)
    table = exp.per_function(runs, pd.DataFrame({"function": functions, "count": [5, 5, 1],
                                                 "log10_prior": [-0.3, -0.3, -1.0]}))
    assert len(table) == 3 and (table["restarts"] == 2).all()


def test_sweep_batched_equals_unbatched_resumes_and_reuses_weights(tmp_path, one_thread):
    """One run per (function, restart) on flatness.runs: the stacked ensemble gives each run the rows its own
    single-model run gives; a second sweep computes nothing; a new box size re-measures the saved weights."""
    from flatness.results import ResultStore

    cfg, functions = _study()
    batched = exp.run_all(cfg, functions, ResultStore("b", tmp_path), progress=False)
    single = exp.run_all(cfg, functions, ResultStore("s", tmp_path), batched=False, progress=False)
    cols = ["function", "restart", "status", "epochs_to_zero", "stop_epoch", "loss", "sharpness", "hessian_norm",
            "sharpness_lbfgsb"]
    assert len(batched) == 6 and batched["key"].tolist() == single["key"].tolist()
    pd.testing.assert_frame_equal(batched[cols], single[cols], rtol=1e-4)
    store = ResultStore("b", tmp_path)
    assert len(store.artifact_keys()) == 6
    parts = sorted(p.name for p in store.path.glob("*.parquet"))
    again = exp.run_all(cfg, functions, store, progress=False)
    assert sorted(p.name for p in store.path.glob("*.parquet")) == parts  # nothing re-run
    pd.testing.assert_frame_equal(again[cols], batched[cols])
    wider = exp.run_all(cfg.replace(zeta=0.05), functions, store, batched=False, progress=False)
    assert len(store.artifact_keys()) == 6  # re-measured, not retrained
    assert (wider["epochs_to_zero"].to_numpy() == batched["epochs_to_zero"].to_numpy()).all()
    assert (wider["sharpness"] != batched["sharpness"]).all()
