"""Stacked ensembles: model i trains exactly as its own train_to_zero_error run (seeds, optimizers, ragged batches,
different stopping epochs), divergence, tasks with attack sets, callbacks and checkpoints."""

import pytest
import torch

from flatness import FCN
from flatness.boolean import boolean_inputs
from flatness.data import BinaryTask, Split
from flatness.train import (AlphaRescaleAt, Callback, Checkpoint, Track, train_ensemble_to_zero_error,
                            train_to_zero_error)

from test_train_loop import FakeStore

pytestmark = pytest.mark.usefixtures("one_thread")

LRS = {"sgd": 0.5, "momentum": 0.1, "adam": 0.03}


def _functions():
    x = boolean_inputs(4).double()
    ys = torch.stack([(x.sum(1) > 1).long(), (x[:, 0] == 1).long(), ((x[:, 1] + x[:, 2] + x[:, 3]) > 1).long()])
    return x, ys


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_each_model_trains_as_its_own_single_run(name):
    """16 inputs in batches of 5 (ragged last batch of 1), three functions fitted at different epochs."""
    x, ys = _functions()
    models = [FCN((4, 16, 1), seed=s).double() for s in range(3)]
    seeds = [11, 5, 11]
    ens = train_ensemble_to_zero_error(models, (x, ys), optimizer=name, lr=LRS[name], batch_size=5,
                                       max_epochs=400, seeds=seeds)
    stops = []
    for i, m in enumerate(models):
        r = train_to_zero_error(m, (x, ys[i]), optimizer=name, lr=LRS[name], batch_size=5, max_epochs=400,
                                seed=seeds[i])
        assert ens.status[i] == r.status == "converged", (i, ens.status[i], r.status)
        assert int(ens.epochs_to_zero[i]) == r.epochs_to_zero == int(ens.stop_epoch[i])
        for p_ens, p in zip(ens.model(i).parameters(), r.model.parameters()):
            assert torch.allclose(p_ens, p, rtol=1e-9, atol=1e-10), (name, i)
        h = ens.history[ens.history["model"] == i]
        assert h["epoch"].tolist() == r.history["epoch"].tolist()
        assert torch.allclose(torch.tensor(h["loss"].tolist()), torch.tensor(r.history["loss"].tolist()), rtol=1e-9)
        assert h["step"].iloc[-1] == r.history["step"].iloc[-1] == 4 * r.epochs_to_zero
        stops.append(r.epochs_to_zero)
    assert len(set(stops)) > 1, stops  # models stopping at different epochs do not disturb the others


def test_loss_threshold_stops_as_the_single_run_does():
    """With loss_threshold both loops train past the first zero-error epoch until the loss is that low, and stop
    at the same epoch with the same weights; a threshold never reached gives max_epochs in both."""
    x, ys = _functions()
    models = [FCN((4, 16, 1), seed=s).double() for s in range(3)]
    seeds = [3, 4, 5]
    ens = train_ensemble_to_zero_error(models, (x, ys), lr=0.5, batch_size=5, max_epochs=400, seeds=seeds,
                                       loss_threshold=0.05)
    for i, m in enumerate(models):
        r = train_to_zero_error(m, (x, ys[i]), lr=0.5, batch_size=5, max_epochs=400, seed=seeds[i],
                                loss_threshold=0.05)
        assert ens.status[i] == r.status == "converged"
        assert int(ens.epochs_to_zero[i]) == r.epochs_to_zero
        stop = int(r.history["epoch"].iloc[-1])
        assert int(ens.stop_epoch[i]) == stop > r.epochs_to_zero  # trained on after the first zero error
        assert r.history["loss"].iloc[-1] <= 0.05 < r.history["loss"].iloc[-2]
        for p_ens, p in zip(ens.model(i).parameters(), r.model.parameters()):
            assert torch.allclose(p_ens, p, rtol=1e-9, atol=1e-10)
    never = train_to_zero_error(models[0], (x, ys[0]), lr=0.5, batch_size=5, max_epochs=30, seed=3,
                                loss_threshold=1e-9)
    ens_never = train_ensemble_to_zero_error(models[:1], (x, ys[:1]), lr=0.5, batch_size=5, max_epochs=30,
                                             seeds=[3], loss_threshold=1e-9)
    assert never.status == ens_never.status[0] == "max_epochs" and never.epochs_to_zero is not None
    with pytest.raises(ValueError, match="train_to_zero_error: loss_threshold=0"):
        train_to_zero_error(models[0], (x, ys[0]), loss_threshold=0)


def test_seed_means_seed_plus_i_and_membership_does_not_matter():
    x, ys = _functions()
    models = [FCN((4, 16, 1), seed=s).double() for s in range(3)]
    a = train_ensemble_to_zero_error(models, (x, ys), lr=0.5, batch_size=5, max_epochs=300, seed=7)
    b = train_ensemble_to_zero_error(models, (x, ys), lr=0.5, batch_size=5, max_epochs=300, seeds=[7, 8, 9])
    c = train_ensemble_to_zero_error(models[1:2], (x, ys[1:2]), lr=0.5, batch_size=5, max_epochs=300, seeds=[8])
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
        assert torch.allclose(a.params[k][1], c.params[k][0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"train_ensemble_to_zero_error: seeds has 2 entries; expected one per "
                                         r"model \(3\)"):
        train_ensemble_to_zero_error(models, (x, ys), seeds=[1, 2])
    with pytest.raises(ValueError, match=r"train_ensemble_to_zero_error: unknown optimizer='rmsprop'"):
        train_ensemble_to_zero_error(models, (x, ys), optimizer="rmsprop")


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_huge_lr_diverges_within_a_few_epochs(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = (x[:, 0] > 0).long()
    ens = train_ensemble_to_zero_error([FCN((5, 32, 1), seed=s) for s in range(4)], (x, y), optimizer=name,
                                       lr=1e4, max_epochs=100)
    assert ens.status == ["diverged"] * 4
    assert ens.history["epoch"].max() <= 3 and (ens.stop_epoch == -1).all()
    healthy = train_ensemble_to_zero_error([FCN((5, 32, 1), seed=s) for s in range(4)], (x, y), optimizer=name,
                                           lr=LRS[name] / 5, max_epochs=300)
    assert healthy.status == ["converged"] * 4


def test_task_with_attack_set_matches_single_runs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(70, 5, generator=g).double()
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    task = BinaryTask(Split(x[:40], y[:40]), Split(x[40:50], 1 - y[40:50]), Split(x[50:], y[50:]))
    models = [FCN((5, 32, 1), seed=s).double() for s in range(2)]
    ens = train_ensemble_to_zero_error(models, task, optimizer="momentum", lr=0.05, batch_size=8, max_epochs=500)
    assert {"attack_error", "test_error", "test_loss"} <= set(ens.history.columns)
    for i, m in enumerate(models):
        r = train_to_zero_error(m, task, optimizer="momentum", lr=0.05, batch_size=8, max_epochs=500, seed=i)
        assert r.status == ens.status[i] == "converged" and r.epochs_to_zero == int(ens.epochs_to_zero[i])
        h = ens.history[ens.history["model"] == i].reset_index(drop=True)
        for col in ("train_error", "attack_error", "test_error"):
            assert h[col].tolist() == r.history[col].tolist(), col
        assert r.history["attack_error"].iloc[-1] > 0  # zero error is measured on S only


def test_ensemble_callbacks_track_alpha_rescale_and_steps():
    x, ys = _functions()
    models = [FCN((4, 16, 16, 1), seed=s).double() for s in range(3)]
    seen = {}

    class Probe(Callback):
        order = 1

        def on_epoch(self, state):
            if state.epoch == 2:
                seen["after"] = {k: v.clone() for k, v in state.params.items()}

    class Before(Callback):
        order = -1

        def on_epoch(self, state):
            if state.epoch == 2:
                seen["before"] = {k: v.clone() for k, v in state.params.items()}

    steps = []

    class Steps(Callback):
        every_steps = 2

        def on_step(self, state):
            steps.append((state.step, int(state.active.sum())))

    ens = train_ensemble_to_zero_error(models, (x, ys), lr=0.1, batch_size=5, max_epochs=300, callbacks=[
        Before(), AlphaRescaleAt(2, layer=1, alpha=3.0), Probe(), Steps(),
        Track({"out0": lambda m, d: m(d[0][:1]).detach()}, every=2),
        Track(lambda m, d: {"w": float(m[1].weight.detach().norm())}, every=3, on="step")])
    assert list(ens.tracks.columns) == ["epoch", "step", "model", "w"] and (ens.tracks["step"] % 3 == 0).all()
    first = ens.tracks[ens.tracks["step"] == 3]
    assert first["model"].tolist() == [0, 1, 2]
    assert len(set(first["w"])) == 3  # each model measured on its own parameters
    b, a = seen["before"], seen["after"]
    assert torch.allclose(a["3.weight"], 3 * b["3.weight"]) and torch.allclose(a["5.weight"], b["5.weight"] / 3)
    from torch.func import functional_call, vmap
    f = vmap(lambda p: functional_call(ens.base_model, p, (x,)))
    assert torch.allclose(f(a), f(b), rtol=1e-10, atol=1e-10)  # same functions
    h = ens.history
    assert h.loc[h["epoch"] == 2, "alpha_applied"].tolist() == [True] * 3
    assert h.loc[h["epoch"] % 2 == 0, "out0"].notna().all() and h.loc[h["epoch"] % 2 == 1, "out0"].isna().all()
    assert [s for s, _ in steps] == list(range(2, 2 * len(steps) + 1, 2)) and steps[-1][1] >= 1
    assert set(ens.status) == {"converged"}


class _Interrupt(Exception):
    pass


def test_ensemble_checkpoint_resume_is_bit_identical(tmp_path):
    x, ys = _functions()
    x = x.float()
    models = [FCN((4, 16, 1), seed=s) for s in range(3)]
    kw = dict(optimizer="adam", lr=0.03, batch_size=5, max_epochs=200, seeds=[3, 4, 5], loss_threshold=0.1)
    full = train_ensemble_to_zero_error(models, (x, ys), **kw)
    first, last = int(full.stop_epoch.min()), int(full.stop_epoch.max())
    assert first < last - 4, full.stop_epoch
    crash = (first + last) // 2 + 1  # some models have stopped, others train on
    saved = crash - 1 - (crash - 1) % 2

    class Crash(Callback):
        def on_epoch(self, state):
            if state.epoch == crash:
                raise _Interrupt

    store = FakeStore(tmp_path)
    with pytest.raises(_Interrupt):
        train_ensemble_to_zero_error(models, (x, ys), callbacks=[Crash(), Checkpoint(store, "ens", every=2)], **kw)
    assert store.load_artifact("ens")["epoch"] == saved
    ck = Checkpoint(store, "ens", every=2)
    res = train_ensemble_to_zero_error([FCN((4, 16, 1), seed=9) for _ in range(3)], (x, ys), callbacks=[ck], **kw)
    assert ck.resumed_from == saved and res.status == full.status
    assert torch.equal(res.epochs_to_zero, full.epochs_to_zero) and res.history.equals(full.history)
    for k in full.params:
        assert torch.equal(res.params[k], full.params[k])
