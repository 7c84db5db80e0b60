"""The experiment engine: configs (casting, validation, profiles, grid, keys), run_sweep and artifacts."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch

from flatness.results import ResultStore, config_key
from flatness.runs import (DemoConfig, RunConfig, batch_groups, demo_train, demo_train_batch, grid, param,
                           profile_config, run_sweep, trained, with_overrides)

# columns that legitimately differ between two runs of the same configs
VOLATILE = ["created", "git_commit"]


@dataclass(frozen=True)
class TrainCfg(RunConfig):
    VERSION: ClassVar[int] = 3
    BATCH_FIELDS: ClassVar[tuple[str, ...]] = ("seed", "draw")
    lr: float = param(0.1, positive=True)
    batch_size: int = param(32, min=1)
    max_epochs: int = param(100, min=1)
    n_train: int = param(1000, min=1)
    widths: tuple[int, ...] = param((8, 8), min=1)
    optimizer: str = param("sgd", choices=("sgd", "adam"))
    alpha: float | None = param(None, positive=True)
    overtrain: bool = False
    seed: int = param(0, min=0)
    draw: int = param(0, min=0)


@dataclass(frozen=True)
class MeasureCfg(RunConfig):
    VERSION: ClassVar[int] = 1
    train: TrainCfg = dataclasses.field(default_factory=TrainCfg)
    zeta: float = param(1e-3, positive=True)
    n_functions: int = param(10, min=1)
    restarts: int = param(1, min=1)


PROFILES = {"smoke": {"max_epochs": 2, "n_train": 10}, "cpu": {"max_epochs": "20"}, "paper": {}}


def _same(a: pd.DataFrame, b: pd.DataFrame, exact: bool = True) -> None:
    a, b = a.drop(columns=VOLATILE).reset_index(drop=True), b.drop(columns=VOLATILE).reset_index(drop=True)
    if exact:
        pd.testing.assert_frame_equal(a, b)
    else:
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ configs
def test_with_overrides_casts_papermill_values():
    cfg = with_overrides(TrainCfg(), n_train="1e6", lr="0.1", overtrain="true", alpha="None", widths="[16, 4]",
                         max_epochs=50.0, batch_size=1e3)
    assert cfg.n_train == 1_000_000 and type(cfg.n_train) is int
    assert cfg.lr == 0.1 and type(cfg.lr) is float
    assert cfg.overtrain is True and cfg.alpha is None and cfg.widths == (16, 4)
    assert type(cfg.max_epochs) is int and cfg.batch_size == 1000
    assert with_overrides(cfg, overtrain="False", alpha=2).overtrain is False
    assert with_overrides(cfg, alpha=None).alpha is None
    assert with_overrides(cfg, widths=[3]).widths == (3,)
    assert TrainCfg().n_train == 1000  # the original is unchanged


@pytest.mark.parametrize("field, value, match", [
    ("n_train", "1.5", "n_train='1.5' cannot be read as int"),
    ("n_train", None, "n_train=None is not allowed"),
    ("overtrain", "maybe", "overtrain='maybe' cannot be read as bool"),
    ("lr", "fast", "lr='fast' cannot be read as float"),
    ("widths", "[4, 'a']", r"widths\[1\]='a' cannot be read as int"),
])
def test_with_overrides_cast_errors_name_the_field(field, value, match):
    with pytest.raises(TypeError, match=match):
        with_overrides(TrainCfg(), **{field: value})


def test_with_overrides_unknown_field_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['learning_rate'\]; valid fields are .*'lr'"):
        with_overrides(TrainCfg(), learning_rate=0.1)
    with pytest.raises(TypeError, match="with_overrides: cfg must be a dataclass"):
        with_overrides({"lr": 1}, lr=2)


@pytest.mark.parametrize("cls, field, value, match", [
    (MeasureCfg, "zeta", 0, r"MeasureCfg: zeta=0(\.0)? must be > 0"),
    (TrainCfg, "lr", -1, r"TrainCfg: lr=-1(\.0)? must be > 0"),
    (TrainCfg, "batch_size", 0, "TrainCfg: batch_size=0 must be >= 1"),
    (MeasureCfg, "n_functions", 0, "MeasureCfg: n_functions=0 must be >= 1"),
    (TrainCfg, "max_epochs", 0, "TrainCfg: max_epochs=0 must be >= 1"),
    (MeasureCfg, "restarts", 0, "MeasureCfg: restarts=0 must be >= 1"),
    (TrainCfg, "optimizer", "adagrad", r"optimizer='adagrad' is not allowed; allowed values are \['sgd', 'adam'\]"),
    (TrainCfg, "widths", (8, 0), r"widths\[1\]=0 must be >= 1"),
    (TrainCfg, "alpha", -2.0, "alpha=-2.0 must be > 0"),
])
def test_invalid_values_rejected_when_the_config_is_made(cls, field, value, match):
    with pytest.raises(ValueError, match=match):
        cls(**{field: value})
    with pytest.raises(ValueError, match=match):
        with_overrides(cls(), **{field: value})


def test_direct_construction_checks_types_and_configs_are_frozen():
    with pytest.raises(TypeError, match=r"TrainCfg: batch_size=0.5 has type float; expected int"):
        TrainCfg(batch_size=0.5)
    with pytest.raises(TypeError, match="overtrain=1 has type int; expected bool"):
        TrainCfg(overtrain=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainCfg().lr = 1.0

    @dataclass(frozen=True)
    class Bad(RunConfig):
        BATCH_FIELDS: ClassVar[tuple[str, ...]] = ("sed",)
        seed: int = 0

    with pytest.raises(ValueError, match="BATCH_FIELDS names 'sed', which is not a field"):
        Bad()


def test_nested_training_config_overrides():
    m = with_overrides(MeasureCfg(), **{"train.lr": "0.5", "zeta": "1e-2"}, train__max_epochs="7")
    assert m.train.lr == 0.5 and m.train.max_epochs == 7 and m.zeta == 0.01
    m2 = with_overrides(MeasureCfg(), train={"lr": 0.5, "max_epochs": 7}, zeta=0.01)
    assert m2 == m and config_key(m2) == config_key(m)
    with pytest.raises(ValueError, match="TrainCfg: lr=0.0 must be > 0"):
        with_overrides(MeasureCfg(), **{"train.lr": 0})
    with pytest.raises(ValueError, match="zeta is not a nested config"):
        with_overrides(MeasureCfg(), **{"zeta.x": 1})


def test_profile_config():
    smoke = profile_config(TrainCfg, PROFILES, "smoke")
    assert (smoke.max_epochs, smoke.n_train) == (2, 10)
    assert profile_config(TrainCfg, PROFILES, "cpu").max_epochs == 20
    assert profile_config(TrainCfg, PROFILES, "paper") == TrainCfg()
    # papermill passes every parameter; None means "not set"
    cfg = profile_config(TrainCfg, PROFILES, "smoke", n_train="500", lr=None)
    assert cfg.n_train == 500 and cfg.lr == 0.1 and cfg.max_epochs == 2
    assert profile_config(TrainCfg(lr=0.3), PROFILES, "smoke").lr == 0.3
    with pytest.raises(ValueError, match=r"unknown profile='gpu'; allowed values are \['smoke', 'cpu', 'paper'\]"):
        profile_config(TrainCfg, PROFILES, "gpu")


def test_grid_order_and_validation():
    cfgs = grid(TrainCfg(), lr=[0.1, "0.01"], seed=range(3))
    assert [(c.lr, c.seed) for c in cfgs] == [(0.1, 0), (0.1, 1), (0.1, 2), (0.01, 0), (0.01, 1), (0.01, 2)]
    assert grid(TrainCfg(), lr=[0.1, 0.01], seed=range(3)) == cfgs  # deterministic
    assert len({config_key(c) for c in cfgs}) == 6
    assert grid(TrainCfg()) == [TrainCfg()]
    with pytest.raises(ValueError, match="TrainCfg: lr=0.0 must be > 0"):
        grid(TrainCfg(), lr=[0.1, 0.0])
    with pytest.raises(ValueError, match="grid: axis seed is empty"):
        grid(TrainCfg(), seed=[])
    with pytest.raises(TypeError, match="grid: axis optimizer='adam' must be a list"):
        grid(TrainCfg(), optimizer="adam")


def test_config_key_covers_class_name_and_version(monkeypatch):
    base = TrainCfg()
    key = config_key(base)
    assert config_key(TrainCfg()) == key and len(key) == 16
    assert config_key(with_overrides(base, lr=0.2)) != key
    monkeypatch.setattr(TrainCfg, "VERSION", 4)
    assert config_key(base) != key, "a VERSION bump must change the key"
    meas = config_key(MeasureCfg())
    monkeypatch.setattr(TrainCfg, "VERSION", 5)
    assert config_key(MeasureCfg()) != meas, "a bump of the nested training config's VERSION must change the key"

    @dataclass(frozen=True)
    class Other(RunConfig):
        lr: float = 0.1

    @dataclass(frozen=True)
    class Another(RunConfig):
        lr: float = 0.1

    assert config_key(Other()) != config_key(Another())
    # plain dicts hash as they always did (sorted-key JSON)
    assert config_key({"b": [1, 2], "a": 1}) == hashlib.sha256(b'{"a":1,"b":[1,2]}').hexdigest()[:16]
    with pytest.raises(TypeError, match="config_key: config must be a dict or a dataclass"):
        config_key([1, 2])


def test_field_added_with_key_at_default_false_keeps_the_stored_keys():
    @dataclass(frozen=True)
    class Cfg(RunConfig):
        lr: float = param(0.1, positive=True)

    old = config_key(Cfg())

    @dataclass(frozen=True)
    class Cfg(RunConfig):  # noqa: F811 -- the same class, a field added later
        lr: float = param(0.1, positive=True)
        extra: tuple[tuple[str, float], ...] = param((), key_at_default=False)
        keyed: int = param(0)

    assert config_key(Cfg(keyed=1)) != old
    assert config_key(Cfg()) != old, "a plain new field is keyed even at its default"

    @dataclass(frozen=True)
    class Cfg(RunConfig):  # noqa: F811
        lr: float = param(0.1, positive=True)
        extra: tuple[tuple[str, float], ...] = param((), key_at_default=False)

    assert config_key(Cfg()) == old, "at its default the field is left out of the key"
    assert config_key(Cfg(extra=(("L", 5.0),))) != old, "a non-default value is keyed"
    assert with_overrides(Cfg(), extra='[["L", 5]]').extra == (("L", 5.0),)


def test_batch_groups_over_batch_fields():
    cfgs = grid(TrainCfg(), lr=[0.1, 0.2], seed=range(3), draw=range(2))
    groups = batch_groups(cfgs)
    assert [len(g) for g in groups] == [6, 6]
    assert all(len({c.lr for c in g}) == 1 for g in groups)
    assert [len(g) for g in batch_groups(cfgs, max_batch=4)] == [4, 2, 4, 2]
    assert [len(g) for g in batch_groups([{"a": 1}, {"a": 2}])] == [1, 1]


# --------------------------------------------------------------------------------------------- run_sweep
def _demo_cfgs(n_seeds: int = 4) -> list[DemoConfig]:
    return grid(DemoConfig(steps=10), lr=[0.05, 0.1], seed=range(n_seeds))


class _Counting:
    """``demo_train`` that counts its calls and can be made to fail for some seeds."""

    def __init__(self, fail_seeds=()):
        self.calls: list[int] = []
        self.fail_seeds = set(fail_seeds)

    def __call__(self, cfg):
        self.calls.append(cfg.seed)
        if cfg.seed in self.fail_seeds:
            raise RuntimeError(f"diverged at seed {cfg.seed}")
        return demo_train(cfg)


def test_only_missing_configs_run(tmp_path):
    store = ResultStore("s", tmp_path)
    cfgs = _demo_cfgs()
    fn = _Counting()
    first = run_sweep(fn, cfgs[:3], store, progress=False)
    assert len(fn.calls) == 3 and len(first) == 3
    df = run_sweep(fn, cfgs, store, progress=False)
    assert len(fn.calls) == 8, "only the 5 missing configs may run"
    assert list(df["key"]) == [config_key(c) for c in cfgs], "rows come in the order of cfgs"
    assert (df["status"] == "ok").all() and df["cfg_seed"].tolist() == [c.seed for c in cfgs]
    again = run_sweep(fn, cfgs + cfgs[:2], store, progress=True)  # duplicates run once
    assert len(fn.calls) == 8
    _same(again, df)


def test_error_becomes_a_row_and_is_retried(tmp_path):
    store = ResultStore("s", tmp_path)
    cfgs = _demo_cfgs(2)
    bad = _Counting(fail_seeds={1})
    df = run_sweep(bad, cfgs, store, progress=False)
    err = df[df["status"] == "error"]
    assert len(df) == 4 and len(err) == 2 and set(err["cfg_seed"]) == {1}
    assert (err["error_type"] == "RuntimeError").all()
    assert err["error_message"].iloc[0] == "diverged at seed 1"
    assert "diverged at seed 1" in err["error_traceback"].iloc[0] and "Traceback" in err["error_traceback"].iloc[0]
    assert not store.has(cfgs[1]) and store.has(cfgs[0])
    assert store.error_keys() == {config_key(c) for c in cfgs if c.seed == 1}

    good = _Counting()
    fixed = run_sweep(good, cfgs, store, progress=False)
    assert sorted(good.calls) == [1, 1], "only the failed runs are retried"
    assert (fixed["status"] == "ok").all() and len(fixed) == 4, "the error rows are replaced, not kept beside"
    _same(fixed, run_sweep(demo_train, cfgs, ResultStore("fresh", tmp_path), progress=False))


def test_a_corrupt_part_is_rerun(tmp_path):
    store = ResultStore("s", tmp_path)
    cfgs = _demo_cfgs(2)
    full = run_sweep(demo_train, cfgs, store, progress=False)
    victim = next(store.path.glob(f"{config_key(cfgs[2])}-*.parquet"))
    victim.write_bytes(b"truncated by a full disk")
    fn = _Counting()
    with pytest.warns(UserWarning, match=re.escape(victim.name)):
        again = run_sweep(fn, cfgs, store, progress=False)
    assert fn.calls == [cfgs[2].seed], "only the run whose part cannot be read runs again"
    _same(again, full)


def test_bad_returns_and_arguments(tmp_path):
    store = ResultStore("s", tmp_path)
    cfg = DemoConfig()
    df = run_sweep(lambda c: 3.0, [cfg], store, progress=False)
    assert df["status"].iloc[0] == "error" and "expected a list of dicts" in df["error_message"].iloc[0]
    df = run_sweep(lambda c: [], [cfg], store, progress=False)
    assert "returned no rows" in df["error_message"].iloc[0]
    df = run_sweep(demo_train, [cfg], store, batch=lambda cs: [{"x": 1}], progress=False)
    assert "must carry its config's key" in df["error_message"].iloc[0]
    with pytest.raises(TypeError, match="run_sweep: executor=.* has no submit"):
        run_sweep(demo_train, [cfg], store, executor=object())
    with pytest.raises(TypeError, match="run_sweep: store must be a ResultStore"):
        run_sweep(demo_train, [cfg], tmp_path)


def test_resume_after_interruption_equals_one_full_run(tmp_path):
    cfgs = _demo_cfgs()
    full = run_sweep(demo_train, cfgs, ResultStore("full", tmp_path), progress=False)

    class Interrupt(BaseException):
        pass

    def dies_halfway(cfg, _n=[0]):
        _n[0] += 1
        if _n[0] > len(cfgs) // 2:
            raise Interrupt  # like KeyboardInterrupt or a SIGKILL: not recorded as an error row
        return demo_train(cfg)

    store = ResultStore("resumed", tmp_path)
    with pytest.raises(Interrupt):
        run_sweep(dies_halfway, cfgs, store, progress=False)
    assert len(store.keys()) == len(cfgs) // 2
    _same(run_sweep(demo_train, cfgs, store, progress=False), full)


def test_batched_and_unbatched_sweeps_give_the_same_rows(tmp_path):
    cfgs = _demo_cfgs()
    serial = run_sweep(demo_train, cfgs, ResultStore("serial", tmp_path), progress=False)
    store = ResultStore("batched", tmp_path)
    calls = []

    def counted_batch(group):
        calls.append(len(group))
        return demo_train_batch(group)

    batched = run_sweep(demo_train, cfgs, store, batch=counted_batch, progress=False)
    assert calls == [4, 4], "one stacked run per learning rate"
    assert len(list(store.path.glob("*.parquet"))) == len(cfgs), "one part per config"
    _same(batched, serial, exact=False)
    # a batched sweep resumes an unbatched one (and the other way round)
    mixed = ResultStore("mixed", tmp_path)
    run_sweep(demo_train, cfgs[::2], mixed, progress=False)
    calls.clear()
    _same(run_sweep(demo_train, cfgs, mixed, batch=counted_batch, max_batch=3, progress=False), serial, exact=False)
    assert calls == [2, 2]


@dataclass(frozen=True)
class FcnCfg(RunConfig):
    """A tiny FCN on a fixed 3-bit Boolean task; ``seed`` sets the initialisation and the batch order."""

    VERSION: ClassVar[int] = 1
    BATCH_FIELDS: ClassVar[tuple[str, ...]] = ("seed",)
    width: int = param(8, min=1)
    lr: float = param(0.5, positive=True)
    batch_size: int = param(4, min=1)
    max_epochs: int = param(30, min=1)
    seed: int = param(0, min=0)


def _bool_task():
    from flatness import boolean_inputs

    x = boolean_inputs(3).to(torch.float32)
    y = (x[:, 0] > x[:, 0].mean()).to(torch.float32)  # the first bit: learnt in a few epochs
    return x, y


def _fcn_one(cfg: FcnCfg) -> list[dict]:
    from flatness import FCN, train_to_zero_error

    res = train_to_zero_error(FCN((3, cfg.width, 1), seed=cfg.seed), _bool_task(), lr=cfg.lr,
                              batch_size=cfg.batch_size, max_epochs=cfg.max_epochs, seed=cfg.seed)
    w = torch.cat([p.detach().flatten() for p in res.model.parameters()])
    return [{"seed": cfg.seed, "status": res.status, "epochs_to_zero": res.epochs_to_zero if res.epochs_to_zero
             is not None else -1, "weight_norm": float(w.norm()), "weight_sum": float(w.sum())}]


def _fcn_batch(cfgs: list[FcnCfg]) -> list[dict]:
    from flatness import FCN, train_ensemble_to_zero_error

    c0 = cfgs[0]
    res = train_ensemble_to_zero_error([FCN((3, c0.width, 1), seed=c.seed) for c in cfgs], _bool_task(), lr=c0.lr,
                                       batch_size=c0.batch_size, max_epochs=c0.max_epochs,
                                       seeds=[c.seed for c in cfgs])
    rows = []
    for i, c in enumerate(cfgs):
        w = torch.cat([p.detach().flatten() for p in res.model(i).parameters()])
        rows.append({"key": config_key(c), "seed": c.seed, "status": res.status[i],
                     "epochs_to_zero": int(res.epochs_to_zero[i]), "weight_norm": float(w.norm()),
                     "weight_sum": float(w.sum())})
    return rows


def test_real_stacked_ensemble_batch_matches_serial(tmp_path):
    import inspect

    from flatness import train_ensemble_to_zero_error

    if "seeds" not in inspect.signature(train_ensemble_to_zero_error).parameters:
        pytest.skip("train_ensemble_to_zero_error(..., seeds=[...]) has not landed")
    cfgs = grid(FcnCfg(), seed=range(4))
    serial = run_sweep(_fcn_one, cfgs, ResultStore("serial", tmp_path), progress=False)
    batched = run_sweep(_fcn_one, cfgs, ResultStore("batched", tmp_path), batch=_fcn_batch, progress=False)
    assert (serial["status"] == "converged").any(), serial[["seed", "status", "epochs_to_zero"]]
    a, b = serial.drop(columns=VOLATILE), batched.drop(columns=VOLATILE)
    pd.testing.assert_frame_equal(a.drop(columns=["weight_norm", "weight_sum"]),
                                  b.drop(columns=["weight_norm", "weight_sum"]))
    np.testing.assert_allclose(b[["weight_norm", "weight_sum"]], a[["weight_norm", "weight_sum"]], rtol=1e-4,
                               atol=1e-5)


def test_executors_give_the_serial_rows(tmp_path):
    cfgs = _demo_cfgs(2)
    serial = run_sweep(demo_train, cfgs, ResultStore("serial", tmp_path), progress=False)
    with ThreadPoolExecutor(2) as ex:
        threaded = run_sweep(demo_train, cfgs, ResultStore("threads", tmp_path), executor=ex, progress=False)
    _same(threaded, serial)
    with ProcessPoolExecutor(2) as ex:
        procs = run_sweep(demo_train, cfgs, ResultStore("procs", tmp_path), executor=ex, progress=False,
                          batch=demo_train_batch)
    _same(procs, serial, exact=False)


def test_dask_scheduler_env_var_connects_a_client(tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    seen = {}

    class FakeClient:  # a Client stand-in: records the address, runs on threads
        def __init__(self, address, **kw):
            seen["address"], seen["kw"] = address, kw
            self._pool = ThreadPoolExecutor(2)

        def submit(self, fn, *args, **kw):
            return self._pool.submit(fn, *args)

        def close(self):
            seen["closed"] = True
            self._pool.shutdown()

    monkeypatch.setattr(distributed, "Client", FakeClient)
    monkeypatch.setenv("FLATNESS_DASK_SCHEDULER", "tcp://127.0.0.1:8786")
    cfgs = _demo_cfgs(1)
    df = run_sweep(demo_train, cfgs, ResultStore("env", tmp_path), progress=False)
    assert seen == {"address": "tcp://127.0.0.1:8786", "kw": {"set_as_default": False}, "closed": True}
    assert (df["status"] == "ok").all() and len(df) == 2
    seen.clear()
    run_sweep(demo_train, cfgs, ResultStore("env", tmp_path), progress=False)
    assert seen == {}, "nothing to run: no client is connected"


# ------------------------------------------------------------------------------------------------ artifacts
def test_artifacts_roundtrip_atomic_and_errors(tmp_path):
    store = ResultStore("a", tmp_path)
    key = config_key(TrainCfg())
    assert not store.has_artifact(key)
    with pytest.raises(KeyError, match=rf"no artifact '{key}' in store 'a'"):
        store.load_artifact(key)
    obj = {"state": {"w": torch.arange(3.0)}, "epoch": 4, "cfg": TrainCfg()}
    path = store.save_artifact(key, obj)
    assert path == store.path / "artifacts" / f"{key}.pt" and store.has_artifact(key)
    back = store.load_artifact(key, map_location="cpu")
    assert torch.equal(back["state"]["w"], obj["state"]["w"]) and back["epoch"] == 4 and back["cfg"] == TrainCfg()
    store.save_artifact(key, {"epoch": 5})  # overwrite
    assert store.load_artifact(key) == {"epoch": 5}
    assert not list(path.parent.glob("*.tmp")) and store.artifact_keys() == {key}
    store.delete_artifact(key)
    store.delete_artifact(key)  # missing is fine
    assert not store.has_artifact(key)
    for bad in ("../x", "", "a/b"):
        with pytest.raises(ValueError, match="must be a non-empty plain file name"):
            store.save_artifact(bad, 1)
    assert store.load().empty, "artifacts are not rows"


def test_trained_saves_once_and_is_readable_from_another_store(tmp_path, monkeypatch):
    runs: list = []

    def train_fn(cfg):
        runs.append(cfg)
        torch.manual_seed(cfg.seed)
        return {"w": torch.randn(3)}

    first = ResultStore("nb02", tmp_path)
    cfg = TrainCfg(seed=7)
    w = trained(first, cfg, train_fn)["w"]
    assert torch.equal(trained(first, cfg, train_fn)["w"], w) and len(runs) == 1
    # another notebook re-measures the models of the first by passing its store
    assert torch.equal(trained(first, MeasureCfg(train=cfg, zeta=0.1).train, train_fn)["w"], w)
    assert len(runs) == 1 and not ResultStore("nb08", tmp_path).has_artifact(config_key(cfg))
    monkeypatch.setattr(TrainCfg, "VERSION", 99)
    trained(first, cfg, train_fn)
    assert len(runs) == 2, "a VERSION bump retrains"


def test_measurement_sweep_reuses_trained_weights(tmp_path):
    """A new box size (zeta) re-measures the saved models without retraining them."""
    import functools

    trainings: list = []

    def train_fn(cfg: TrainCfg):
        trainings.append(cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        return {"w": torch.randn(5, generator=g)}

    def measure(cfg: MeasureCfg, store: ResultStore):
        w = trained(store, cfg.train, train_fn)["w"]
        return [{"seed": cfg.train.seed, "zeta": cfg.zeta, "sharp": float((cfg.zeta * w).norm())}]

    store = ResultStore("m", tmp_path)
    fn = functools.partial(measure, store=store)
    first = run_sweep(fn, grid(MeasureCfg(), zeta=[1e-3], train=[TrainCfg(seed=s) for s in range(3)]), store,
                      progress=False)
    assert sorted(trainings) == [0, 1, 2] and len(first) == 3
    more = run_sweep(fn, grid(MeasureCfg(), zeta=[1e-3, 1e-2], train=[TrainCfg(seed=s) for s in range(3)]), store,
                     progress=False)
    assert sorted(trainings) == [0, 1, 2], "the new zeta re-measures, it does not retrain"
    assert len(more) == 6 and store.artifact_keys() == {config_key(TrainCfg(seed=s)) for s in range(3)}
    np.testing.assert_allclose(more.loc[more.zeta == 1e-2, "sharp"].to_numpy(),
                               10 * more.loc[more.zeta == 1e-3, "sharp"].to_numpy(), rtol=1e-5)


def test_worker_pool_single_threaded_processes_and_checks():
    import os

    import torch

    from flatness.runs import worker_pool

    with worker_pool(None) as none, worker_pool(1) as one:
        assert none is None and one is None
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="worker_pool: workers="):
            with worker_pool(bad):
                pass
    with worker_pool(2) as pool:
        threads, pid = pool.submit(torch.get_num_threads).result(), pool.submit(os.getpid).result()
    assert threads == 1 and pid != os.getpid()
