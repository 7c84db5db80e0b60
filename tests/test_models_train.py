"""Models (init statistics, alpha-rescaling invariance) and training (stopping rule, status, repeatability)."""

import math

import pytest
import torch

from flatness import FCN, alpha_rescale
from flatness.boolean import boolean_inputs
from flatness.data import BinaryTask, Split
from flatness.losses import half_mse
from flatness.train import make_optimizer, train_ensemble_to_zero_error, train_to_zero_error

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fcn_init_statistics():
    m = FCN((500, 400, 1), sigma_w=1.7, sigma_b=0.3, seed=0)
    w, b = m[1].weight, m[1].bias
    assert w.std().item() == pytest.approx(1.7 / math.sqrt(500), rel=0.02)
    assert b.std().item() == pytest.approx(0.3, rel=0.15)
    assert torch.equal(FCN((5, 3, 1), seed=1)[1].weight, FCN((5, 3, 1), seed=1)[1].weight)


@pytest.mark.parametrize("bad,match", [((7,), "at least an input"), ((7, 0, 1), r"widths\[1\]=0 must be >= 1")])
def test_fcn_bad_widths(bad, match):
    with pytest.raises(ValueError, match=match):
        FCN(bad)


def test_alpha_rescale_preserves_function_changes_weights():
    m = FCN((7, 40, 40, 1), seed=0).double()
    x = boolean_inputs(7, dtype=torch.float64)
    for layer in (0, 1):
        r = alpha_rescale(m, layer, 5.9)
        assert torch.allclose(r(x), m(x), rtol=1e-12, atol=1e-12)
        assert torch.allclose(r[1 + 2 * layer].weight, 5.9 * m[1 + 2 * layer].weight)
    assert m[1].weight.abs().max() < 5  # the input model is unchanged
    with pytest.raises(ValueError, match="layer=2 exceeds the maximum 1"):
        alpha_rescale(m, 2, 2.0)
    with pytest.raises(ValueError, match="alpha"):
        alpha_rescale(m, 0, -1.0)


def _toy_task(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] > 0).long()
    return BinaryTask(Split(x[:48], y[:48]), Split(x[48:56], 1 - y[48:56]), Split(x[56:], y[56:]))


def test_train_stops_at_first_zero_error_epoch_and_is_repeatable():
    task = _toy_task()
    m = FCN((5, 32, 1), seed=0)
    r = train_to_zero_error(m, task, lr=0.1, batch_size=8, max_epochs=500, seed=1)
    assert r.status == "converged"
    h = r.history
    assert h["train_error"].iloc[-1] == 0.0 and (h["train_error"].iloc[:-1] > 0).all()
    assert r.epochs_to_zero == h["epoch"].iloc[-1] and {"attack_error", "test_error", "loss"} <= set(h.columns)
    r2 = train_to_zero_error(m, task, lr=0.1, batch_size=8, max_epochs=500, seed=1)
    assert r2.history.equals(h)  # bit-for-bit on CPU
    assert not torch.equal(r.model[1].weight, m[1].weight)  # trained a copy
    ro = train_to_zero_error(m, task, lr=0.1, batch_size=8, max_epochs=500, seed=1, overtrain_epochs=7)
    assert len(ro.history) == len(h) + 7 and (ro.history["phase"].iloc[-7:] == "overtrain").all()


def test_train_diverged_is_recorded_not_raised():
    task = _toy_task()
    m = FCN((5, 32, 1), seed=0)
    r = train_to_zero_error(m, task, lr=1e6, batch_size=8, max_epochs=50, loss_fn=half_mse)
    assert r.status == "diverged" and r.epochs_to_zero is None


def test_train_max_epochs_and_callbacks():
    task = _toy_task()
    seen = []

    def cb(state):
        state.record["extra"] = state.epoch
        seen.append(state.phase)
        return state.epoch >= 3

    r = train_to_zero_error(FCN((5, 2, 1), seed=0), task, lr=1e-6, max_epochs=100, callbacks=[cb])
    assert r.status == "max_epochs" and len(r.history) == 4 and r.history["extra"].iloc[-1] == 3
    r = train_to_zero_error(FCN((5, 2, 1), seed=0), task, lr=1e-6, max_epochs=2)
    assert r.status == "max_epochs" and len(r.history) == 3


@pytest.mark.parametrize("name", ["sgd", "gd", "momentum", "adam", "adagrad", "rmsprop"])
def test_optimizers_by_name(name):
    task = _toy_task()
    r = train_to_zero_error(FCN((5, 32, 1), seed=0), task, optimizer=name, max_epochs=3)
    assert len(r.history) == 4 and r.status in {"converged", "max_epochs"}
    if name == "gd":
        assert r.config["batch_size"] == 56


def test_bad_optimizer_name():
    with pytest.raises(ValueError, match=r"unknown optimizer='lbfgs'; allowed values are \['sgd'"):
        train_to_zero_error(FCN((5, 2, 1)), _toy_task(), optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr"):
        make_optimizer("sgd", FCN((5, 2, 1)).parameters(), lr=-1.0)


def test_ensemble_matches_single_model_sgd_full_batch():
    """Full-batch SGD has no randomness: each ensemble member must follow the single-model trajectory."""
    x = boolean_inputs(4)
    ys = torch.stack([(x.sum(1) > 1).long(), (x[:, 0] == 1).long(), (x[:, 1] != x[:, 2]).long()])
    models = [FCN((4, 16, 1), seed=s).double() for s in range(3)]
    ens = train_ensemble_to_zero_error(models, (x.double(), ys), lr=0.5, batch_size=None, max_epochs=3000)
    for i, m in enumerate(models):
        r = train_to_zero_error(m, (x.double(), ys[i]), optimizer="gd", lr=0.5, max_epochs=3000)
        assert ens.status[i] == r.status == "converged"
        assert int(ens.epochs_to_zero[i]) == r.epochs_to_zero
        for p_ens, p in zip(ens.model(i).parameters(), r.model.parameters()):
            assert torch.allclose(p_ens, p, rtol=1e-9, atol=1e-9)
    out = (ens.predict(x.double()).squeeze(-1) > 0).long()
    assert torch.equal(out, ys)


def test_ensemble_bad_labels_shape():
    x = boolean_inputs(3)
    with pytest.raises(ValueError, match=r"expected \(N,\) = \(8,\) or \(M, N\) = \(2, 8\)"):
        train_ensemble_to_zero_error([FCN((3, 4, 1)), FCN((3, 4, 1))], (x, torch.zeros(3, 8)))


def test_ensemble_loss_threshold_trains_past_zero_error():
    x = boolean_inputs(4)
    y = (x.sum(1) > 1).long()
    models = [FCN((4, 16, 1), seed=s) for s in range(4)]
    first = train_ensemble_to_zero_error(models, (x, y), lr=0.5, batch_size=None, max_epochs=5000)
    thr = train_ensemble_to_zero_error(models, (x, y), lr=0.5, batch_size=None, max_epochs=5000, loss_threshold=1e-3)
    assert torch.equal(first.epochs_to_zero, thr.epochs_to_zero)  # same trajectory, same first zero-error epoch
    assert (thr.stop_epoch > first.stop_epoch).all()
    from flatness.losses import sigmoid_bce
    with torch.no_grad():
        for i in range(4):
            assert float(sigmoid_bce(thr.model(i)(x), y)) <= 1e-3 < float(sigmoid_bce(first.model(i)(x), y))


def test_half_mse_runs_under_vmap_and_matches_one_hot():
    import torch.nn.functional as F
    from torch.func import vmap

    from flatness.losses import half_mse

    out = torch.randn(3, 5, 4, dtype=torch.float64)  # 3 stacked models, 5 examples, 4 outputs
    y = torch.tensor([0, 3, 1, 2, 3])
    ref = torch.stack([0.5 * (o - F.one_hot(y, 4).double()).pow(2).sum() / 5 for o in out])
    torch.testing.assert_close(vmap(half_mse, in_dims=(0, None))(out, y), ref, rtol=0, atol=0)
