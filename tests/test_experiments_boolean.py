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


def test_pipeline_trains_each_function_and_measures_against_dense_oracles():
    """Networks express their functions at the loss threshold; the recorded lambda_max is the dense one."""
    import torch
    from torch.func import functional_call, hessian

    from flatness.boolean import boolean_inputs, hex_to_function
    from flatness.losses import sigmoid_bce

    cfg = exp.config_for("smoke", widths=(4, 12, 1), n_functions=3, zeta_sweep=(1e-2,), max_epochs=4000)
    functions = ["0000", "ffff", "00ff"]
    ens, index = exp.train_functions(cfg, functions, progress=False)
    x = boolean_inputs(4)
    runs = exp.measure_flatness(cfg, ens, index, functions, progress=False)
    assert (runs["status"] == "converged").all()
    for i, h in enumerate(functions):
        model = ens.model(i)
        y = hex_to_function(h, 4)
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
        assert runs["hessian_norm"][i] == pytest.approx(float(lam), rel=1e-3)
        assert runs["sharpness"][i] >= 0 and runs["sharpness_lbfgsb"][i] >= 0
    table = exp.per_function(runs, pd.DataFrame({"function": functions, "count": [5, 5, 1],
                                                 "log10_prior": [-0.3, -0.3, -1.0]}))
    assert len(table) == 3 and (table["restarts"] == 1).all()
