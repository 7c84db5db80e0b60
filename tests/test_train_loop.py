"""The single-model loop: divergence (issue 7), callbacks (on_step/on_epoch, Track, AlphaRescaleAt, Checkpoint with
a SIGKILL-and-resume run) and the optimizer-step closure."""

import math
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

from flatness import FCN
from flatness.data import BinaryTask, Split
from flatness.losses import sigmoid_bce
from flatness.results import ResultStore
from flatness.train import (AlphaRescaleAt, Callback, Checkpoint, Track, divergence_threshold,
                            train_to_zero_error)

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy_task(seed=0, n=64, random_labels=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, 2, (n,), generator=g) if random_labels else (x[:, 0] > 0).long()
    return BinaryTask(Split(x[:48], y[:48]), Split(x[48:56], 1 - y[48:56]), Split(x[56:], y[56:]))


class FakeStore:
    """The artifact half of flatness.results.ResultStore: one atomic torch.save file per key."""

    def __init__(self, root):
        import pathlib
        self.root = pathlib.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.saves = 0

    def _path(self, key):
        return self.root / f"{key}.pt"

    def save_artifact(self, key, obj):
        import os
        tmp = self._path(key).with_suffix(".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, self._path(key))
        self.saves += 1
        return self._path(key)

    def load_artifact(self, key, map_location=None):
        if not self._path(key).is_file():
            raise KeyError(key)
        return torch.load(self._path(key), map_location=map_location, weights_only=False)

    def has_artifact(self, key):
        return self._path(key).is_file()

    def delete_artifact(self, key):
        self._path(key).unlink()


# ------------------------------------------------------------------------------------------------ divergence
@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_huge_lr_diverges_within_a_few_epochs(name):
    task = _toy_task()
    r = train_to_zero_error(FCN((5, 32, 1), seed=0), task, optimizer=name, lr=1e4, max_epochs=100)
    assert r.status == "diverged" and len(r.history) <= 4, (r.status, len(r.history))
    assert r.epochs_to_zero is None
    # only the loss-multiple rule catches it: without it adam runs to max_epochs with finite, huge losses
    if name == "adam":
        r = train_to_zero_error(FCN((5, 32, 1), seed=0), task, optimizer=name, lr=1e4, max_epochs=5,
                                divergence_factor=None)
        assert r.status == "max_epochs" and r.history["loss"].max() > 1e3


def test_healthy_run_is_never_flagged():
    task = _toy_task()
    for name, lr in (("sgd", 0.5), ("momentum", 0.1), ("adam", 0.01)):
        r = train_to_zero_error(FCN((5, 32, 1), seed=0), task, optimizer=name, lr=lr, max_epochs=300)
        assert r.status == "converged", (name, r.status)
    r = train_to_zero_error(FCN((5, 32, 1), seed=0), _toy_task(random_labels=True), lr=0.5, max_epochs=30)
    assert r.status == "max_epochs" and len(r.history) == 31


def test_divergence_threshold_and_bad_factor():
    assert divergence_threshold(0.69, 1e3) == 1e3  # floored at 1
    assert divergence_threshold(5.0, 10) == 50.0
    assert divergence_threshold(5.0, None) == math.inf
    with pytest.raises(ValueError, match="train_to_zero_error: divergence_factor=-1"):
        train_to_zero_error(FCN((5, 2, 1)), _toy_task(), divergence_factor=-1)


def test_nonfinite_parameters_are_diverged():
    class Poison(Callback):
        def on_step(self, state):
            if state.step == 3:
                with torch.no_grad():
                    state.model[1].weight[0, 0] = float("inf")

    r = train_to_zero_error(FCN((5, 8, 1), seed=0), _toy_task(), lr=1e-6, max_epochs=20, callbacks=[Poison()],
                            divergence_factor=None)
    assert r.status == "diverged" and r.history["epoch"].iloc[-1] <= 2


# ------------------------------------------------------------------------------------------------ closure
def _old_loop(model, task, opt, epochs, bs, seed):
    """The update order before the closure: zero_grad, forward, backward, step."""
    x = torch.cat([task.train[0], task.attack[0]])
    y = torch.cat([task.train[1], task.attack[1]])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            opt.zero_grad(set_to_none=True)
            sigmoid_bce(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


@pytest.mark.parametrize("name,cls,kw", [("sgd", torch.optim.SGD, {"lr": 0.1}),
                                         ("momentum", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
                                         ("adam", torch.optim.Adam, {"lr": 0.01})])
def test_closure_step_is_bit_identical_to_the_old_update_order(name, cls, kw):
    task = _toy_task(random_labels=True)  # not fitted in 6 epochs: both run all of them
    r = train_to_zero_error(FCN((5, 16, 1), seed=0), task, optimizer=name, lr=kw["lr"], batch_size=10,
                            max_epochs=6, seed=4)
    assert r.status == "max_epochs" and r.history["step"].iloc[-1] == 6 * 6  # 56 examples, batches of 10
    m = FCN((5, 16, 1), seed=0)
    _old_loop(m, task, cls(m.parameters(), **kw), 6, 10, 4)
    for p, q in zip(r.model.parameters(), m.parameters()):
        assert torch.equal(p, q)


class _ThreeEvaluations(torch.optim.Optimizer):
    """Evaluates the closure three times per step and descends along the mean gradient."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})
        self.calls = 0

    def step(self, closure):
        acc = None
        for _ in range(3):
            with torch.enable_grad():
                loss = closure()
            self.calls += 1
            grads = [p.grad.clone() for p in self.param_groups[0]["params"]]
            acc = grads if acc is None else [a + g for a, g in zip(acc, grads)]
        with torch.no_grad():
            for p, a in zip(self.param_groups[0]["params"], acc):
                p -= self.param_groups[0]["lr"] * a / 3
        return loss


def test_optimizer_evaluating_the_closure_several_times():
    made = []

    def factory(params):
        made.append(_ThreeEvaluations(params, lr=0.5))
        return made[-1]

    r = train_to_zero_error(FCN((5, 32, 1), seed=0), _toy_task(), optimizer=factory, batch_size=8, max_epochs=300)
    assert r.status == "converged"
    assert made[0].calls == 3 * r.history["step"].iloc[-1] > 0
    # same minibatch -> the three gradients agree -> identical to plain SGD with the same lr
    s = train_to_zero_error(FCN((5, 32, 1), seed=0), _toy_task(), lr=0.5, batch_size=8, max_epochs=300)
    assert r.epochs_to_zero == s.epochs_to_zero
    for p, q in zip(r.model.parameters(), s.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


# ------------------------------------------------------------------------------------------------ callbacks
class Recorder(Callback):
    def __init__(self, every=1, every_steps=1):
        super().__init__(every=every, every_steps=every_steps)
        self.calls = []

    def on_train_begin(self, state):
        self.calls.append(("begin", state.epoch, state.step))

    def on_step(self, state):
        self.calls.append(("step", state.epoch, state.step))

    def on_epoch(self, state):
        self.calls.append(("epoch", state.epoch, state.step))

    def on_train_end(self, state):
        self.calls.append(("end", state.status))


def test_callback_hooks_and_frequencies():
    rec = Recorder(every=2, every_steps=3)
    plain = []
    r = train_to_zero_error(FCN((5, 8, 1), seed=0), _toy_task(random_labels=True), lr=0.1, batch_size=16,
                            max_epochs=5, callbacks=[rec, lambda s: plain.append(s.epoch)])
    assert rec.calls[0] == ("begin", 0, 0) and rec.calls[-1] == ("end", "max_epochs")
    epochs = [c[1:] for c in rec.calls if c[0] == "epoch"]
    steps = [c[2] for c in rec.calls if c[0] == "step"]
    assert epochs == [(0, 0), (2, 8), (4, 16)]  # 56 examples in batches of 16: 4 steps per epoch
    assert steps == list(range(3, 21, 3))
    assert plain == [1, 2, 3, 4, 5]  # the old protocol: after each training epoch, never at initialisation
    assert r.history["step"].tolist() == [0, 4, 8, 12, 16, 20]


def test_step_callback_can_stop_mid_epoch():
    class StopAt(Callback):
        def on_step(self, state):
            return state.step == 6

    r = train_to_zero_error(FCN((5, 8, 1), seed=0), _toy_task(random_labels=True), lr=0.1, batch_size=16,
                            max_epochs=50, callbacks=[StopAt()])
    assert r.history["step"].iloc[-1] == 6 and r.history["epoch"].iloc[-1] == 2


def test_bad_callbacks():
    with pytest.raises(TypeError, match=r"train_to_zero_error: callbacks\[0\]=3"):
        train_to_zero_error(FCN((5, 2, 1)), _toy_task(), callbacks=[3])
    with pytest.raises(ValueError, match=r"Track: unknown on='batch'; allowed values are \['epoch', 'step'\]"):
        Track(lambda m, d: {}, on="batch")
    with pytest.raises(ValueError, match="Track: every=0 must be >= 1"):
        Track(lambda m, d: {}, every=0)
    with pytest.raises(TypeError, match="Checkpoint: store must have a method save_artifact"):
        Checkpoint(object(), "k")


def test_track_epoch_and_step():
    def loss_on(model, data):
        with torch.no_grad():
            return float(sigmoid_bce(model(data[0]), data[1]))

    ep = Track({"fit_loss": loss_on}, every=2, data="fit")
    st = Track(lambda m, d: {"w_norm": m[1].weight.norm()}, every=5, on="step")
    r = train_to_zero_error(FCN((5, 8, 1), seed=0), _toy_task(random_labels=True), lr=0.1, batch_size=16,
                            max_epochs=6, callbacks=[ep, st])
    h = r.history
    tracked = h[h["epoch"] % 2 == 0]
    assert tracked["fit_loss"].notna().all() and h[h["epoch"] % 2 == 1]["fit_loss"].isna().all()
    assert torch.allclose(torch.tensor(tracked["fit_loss"].tolist()), torch.tensor(tracked["loss"].tolist()),
                          rtol=1e-5)  # the history's loss is the loss on S ∪ A
    assert list(r.tracks.columns) == ["epoch", "step", "w_norm"]
    assert r.tracks["step"].tolist() == list(range(5, 25, 5)) and r.tracks["w_norm"].dtype == float


def test_alpha_rescale_at_keeps_the_function_and_keeps_training():
    task = _toy_task(random_labels=True)
    x = torch.cat([task.train[0], task.test[0]])
    seen = {}

    class Probe(Callback):
        def __init__(self, tag, order):
            super().__init__()
            self.tag, self.order = tag, order

        def on_epoch(self, state):
            if state.epoch == 3:
                with torch.no_grad():
                    seen[self.tag] = (state.model(x).clone(), [p.detach().clone() for p in state.model.parameters()],
                                      [id(p) for p in state.model.parameters()])
            if state.epoch == 3 and self.tag == "after":
                ids = [id(p) for p in state.optimizer.param_groups[0]["params"]]
                seen["opt_ids"] = ids

    cbs = [Probe("before", -1), AlphaRescaleAt(3, layer=0, alpha=4.0), Probe("after", 1)]
    r = train_to_zero_error(FCN((5, 16, 16, 1), seed=0), task, optimizer="momentum", lr=0.05, max_epochs=6,
                            callbacks=cbs)
    out_b, p_b, id_b = seen["before"]
    out_a, p_a, id_a = seen["after"]
    assert torch.allclose(out_a, out_b, rtol=1e-5, atol=1e-6)  # same function at that step
    assert torch.allclose(p_a[0], 4 * p_b[0]) and torch.allclose(p_a[2], p_b[2] / 4)
    assert id_a == id_b == seen["opt_ids"] == [id(p) for p in r.model.parameters()]  # same Parameter objects
    assert not torch.equal(p_a[0], r.model[1].weight) and not torch.equal(p_a[4], r.model[5].weight)  # trained on
    h = r.history
    assert h.loc[h["epoch"] == 3, "alpha_applied"].item() is True
    assert h.loc[h["epoch"] != 3, "alpha_applied"].isna().all()
    with pytest.raises(ValueError, match="AlphaRescaleAt: alpha"):
        AlphaRescaleAt(1, 0, 0.0)


# ------------------------------------------------------------------------------------------------ checkpoints
class _Interrupt(Exception):
    pass


class _Crash(Callback):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch(self, state):
        if state.epoch == self.at:
            raise _Interrupt


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_checkpoint_resume_in_process_is_bit_identical(tmp_path, name):
    task = _toy_task(random_labels=True)
    kw = dict(optimizer=name, lr=0.05, batch_size=10, max_epochs=12, seed=2)
    full = train_to_zero_error(FCN((5, 16, 1), seed=0), task, callbacks=[Track({"tr": lambda m, d: 1.0}, 5,
                                                                                on="step")], **kw)
    store = FakeStore(tmp_path) if name == "sgd" else ResultStore("runs", root=tmp_path)  # the protocol, the store
    with pytest.raises(_Interrupt):
        train_to_zero_error(FCN((5, 16, 1), seed=0), task, callbacks=[
            _Crash(8), Checkpoint(store, "run", every=3), Track({"tr": lambda m, d: 1.0}, 5, on="step")], **kw)
    assert store.load_artifact("run")["epoch"] == 6
    ck = Checkpoint(store, "run", every=3)
    res = train_to_zero_error(FCN((5, 16, 1), seed=1), task, callbacks=[ck, Track({"tr": lambda m, d: 1.0}, 5,
                                                                                   on="step")], **kw)
    assert ck.resumed_from == 6
    assert res.status == full.status and res.history.equals(full.history) and res.tracks.equals(full.tracks)
    for p, q in zip(res.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)
    # calling again returns the finished run from its final checkpoint, without training
    rec = Recorder()
    again = train_to_zero_error(FCN((5, 16, 1), seed=1), task, callbacks=[Checkpoint(store, "run"), rec], **kw)
    assert again.history.equals(full.history) and not [c for c in rec.calls if c[0] in ("step", "epoch")]
    with pytest.raises(ValueError, match=r"Checkpoint: the checkpoint 'run' belongs to a different run \(lr: saved"):
        train_to_zero_error(FCN((5, 16, 1), seed=1), task, callbacks=[Checkpoint(store, "run")], **{**kw, "lr": 0.1})


_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from flatness import FCN
from flatness.data import binary_task
from flatness.results import ResultStore
from flatness.train import Callback, Checkpoint, train_to_zero_error

class Say(Callback):
    def on_epoch(self, state):
        print("epoch", state.epoch, flush=True)
        time.sleep(float(sys.argv[3]))

def run(store, callbacks=()):
    task = binary_task("mnist", 200, n_attack=20, n_test=50, seed=0, source="embedded")
    return train_to_zero_error(FCN((784, 16, 1), seed=0), task, optimizer="momentum", lr=0.02, batch_size=32,
                               max_epochs=20, overtrain_epochs=20, seed=3,
                               callbacks=[*callbacks, Checkpoint(store, "run", every=4)])

if __name__ == "__main__":
    r = run(ResultStore("ckpt", root=sys.argv[1]), [Say()])
    torch.save({"params": list(r.model.parameters()), "history": r.history, "status": r.status}, sys.argv[2])
    print("done", flush=True)
"""


def test_sigkill_mid_training_resumes_bit_identically(tmp_path):
    """A run killed with SIGKILL after a checkpoint resumes from it and ends exactly as an uninterrupted run."""
    script = tmp_path / "job.py"
    script.write_text(_SCRIPT)
    store_dir, out = tmp_path / "store", tmp_path / "out.pt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(store_dir), str(out), "0.05"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.strip() == "epoch 10":  # the checkpoint of epoch 8 exists
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    store = ResultStore("ckpt", root=store_dir)
    killed_at = store.load_artifact("run")["epoch"]
    assert killed_at in (8, 12) and store.load_artifact("run")["status"] is None

    resumed = subprocess.run([sys.executable, str(script), str(store_dir), str(out), "0"], capture_output=True,
                             text=True, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    printed = [int(s.split()[1]) for s in resumed.stdout.split("\n") if s.startswith("epoch")]
    assert printed[0] == killed_at + 1  # resumed, not restarted
    got = torch.load(out, weights_only=False)

    ns = {"__name__": "job"}
    exec(compile(script.read_text(), str(script), "exec"), ns)
    ref = ns["run"](ResultStore("ckpt", root=tmp_path / "fresh"))
    assert got["status"] == ref.status and len(ref.history) > killed_at + 1
    pd.testing.assert_frame_equal(got["history"], ref.history, check_exact=True)
    for p, q in zip(got["params"], ref.model.parameters()):
        assert torch.equal(p, q)


def test_entropy_sgd_trains_through_the_closure():
    """Entropy-SGD (flatness.train.optim) needs step(closure): L inner evaluations per outer step."""
    calls = []

    class Count(Callback):
        def on_step(self, state):
            calls.append(state.step)

    task = _toy_task()
    r = train_to_zero_error(FCN((5, 16, 1), seed=0), task, optimizer="entropy_sgd", batch_size=16, max_epochs=3,
                            optimizer_kwargs={"L": 3}, callbacks=[Count()])
    assert r.status in ("converged", "max_epochs") and len(calls) == r.history["step"].iloc[-1] > 0
    assert not torch.equal(r.model[1].weight, FCN((5, 16, 1), seed=0)[1].weight)


def test_entropy_sgd_noise_comes_from_the_seed_not_the_global_rng():
    """The SGLD noise is drawn from a generator seeded by ``seed``: what ran before in the process (the global RNG's
    state) does not change the run; another seed does. Before, a worker's earlier runs changed Entropy-SGD's."""
    task = _toy_task()

    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        torch.randn(1000)  # another run's draws
        r = train_to_zero_error(FCN((5, 16, 1), seed=0), task, optimizer="entropy_sgd", batch_size=16, max_epochs=2,
                                seed=seed, optimizer_kwargs={"L": 3, "noise": 0.5})
        return torch.cat([p.detach().flatten() for p in r.model.parameters()])

    a, b, c = run(0, 1), run(0, 2), run(1, 1)
    assert torch.equal(a, b), "the global RNG must not change the run"
    assert not torch.equal(a, c), "the seed must"
    own = torch.Generator().manual_seed(7)  # an optimizer with its own generator keeps it
    from flatness.train.optim import EntropySGD

    model = FCN((5, 16, 1), seed=0)
    r = train_to_zero_error(model, task, optimizer=lambda ps: EntropySGD(ps, L=2, generator=own), batch_size=16,
                            max_epochs=1)
    assert r.status in ("converged", "max_epochs") and own.initial_seed() == 7


def test_eval_every_skips_full_passes_but_not_the_trajectory():
    """eval_every=k: history rows (and epoch callbacks) only every k-th epoch and at the end; same weights."""
    task = _toy_task(random_labels=True)
    seen = []

    class Epochs(Callback):
        def on_epoch(self, state):
            seen.append(state.epoch)

    class StopAt(Callback):
        every_steps = 1

        def on_step(self, state):
            return state.step == 23  # mid-epoch (48 examples, batch 8: 6 steps per epoch)

    kw = dict(optimizer="sgd", lr=0.05, batch_size=8, max_epochs=1000, seed=3, overtrain_epochs=1000)
    full = train_to_zero_error(FCN((5, 16, 1), seed=0), task, callbacks=[StopAt()], **kw)
    sparse = train_to_zero_error(FCN((5, 16, 1), seed=0), task, callbacks=[StopAt(), Epochs()], eval_every=2, **kw)
    assert seen == [0, 2, 4] and sparse.history["epoch"].tolist() == [0, 2, 4]  # epoch 4 stopped at step 23
    assert full.history["epoch"].tolist() == [0, 1, 2, 3, 4]
    for a, b in zip(full.model.parameters(), sparse.model.parameters()):
        assert torch.equal(a, b)
    pd.testing.assert_frame_equal(full.history.iloc[[0, 2, 4]].reset_index(drop=True), sparse.history)
    short = train_to_zero_error(FCN((5, 16, 1), seed=0), task, max_epochs=3, eval_every=2, optimizer="sgd",
                                lr=1e-4, batch_size=8)
    assert short.history["epoch"].tolist() == [0, 2, 3] and short.status == "max_epochs"  # the last epoch too
    with pytest.raises(ValueError, match="eval_every"):
        train_to_zero_error(FCN((5, 16, 1), seed=0), task, eval_every=0)


def test_labels_outside_the_classes_raise_before_training():
    from flatness.losses import half_mse
    from flatness.train import train_to_zero_error

    model = torch.nn.Linear(3, 4)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 4, 1])  # 4 outputs, a label 4
    with pytest.raises(ValueError, match="train_to_zero_error"):
        train_to_zero_error(model, (x, y), loss_fn=half_mse, max_epochs=1)
