"""run_sweep on a local Dask cluster (two worker processes on 127.0.0.1) gives the rows of the serial run."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from flatness.results import ResultStore
from flatness.runs import DemoConfig, demo_train, demo_train_batch, grid, run_sweep

distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed (pip install -e '.[dask]')")

VOLATILE = ["created", "git_commit"]


@pytest.fixture(scope="module")
def client():
    """Two worker processes on 127.0.0.1, no dashboard.

    The workers are forked rather than spawned, after torch and torch.func are warmed up here, so they start
    in under a second instead of importing torch afresh (10-30 s on a loaded 2-core CI runner); the test checks
    the engine, not the cluster's start-up. Runs still cross a process boundary (pickled configs and rows).
    """
    import dask

    demo_train_batch([DemoConfig(steps=1)])  # import torch.func's lazy modules before forking
    with dask.config.set({"distributed.worker.multiprocessing-method": "fork"}), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                     dashboard_address=None, silence_logs=50) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def _table(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=VOLATILE).reset_index(drop=True)


def test_dask_sweep_matches_serial(tmp_path, client):
    cfgs = grid(DemoConfig(steps=10), lr=[0.05, 0.1], seed=range(4))  # 8 small trainings
    serial = run_sweep(demo_train, cfgs, ResultStore("serial", tmp_path), progress=False)
    store = ResultStore("dask", tmp_path)
    on_dask = run_sweep(demo_train, cfgs, store, executor=client, progress=False)
    pd.testing.assert_frame_equal(_table(on_dask), _table(serial))
    assert len(store.keys()) == 8
    pids = set(client.run(os.getpid).values())
    assert len(pids) == 2 and os.getpid() not in pids, "two worker processes, apart from this one"
    # batched on the cluster: one stacked run per learning rate, same rows
    batched = run_sweep(demo_train, cfgs, ResultStore("dask_batched", tmp_path), executor=client,
                        batch=demo_train_batch, progress=False)
    pd.testing.assert_frame_equal(_table(batched), _table(serial), check_exact=False, rtol=1e-10, atol=1e-12)


def test_dask_errors_become_rows(tmp_path, client):
    cfgs = [DemoConfig(seed=0), DemoConfig(seed=1)]
    store = ResultStore("dask_err", tmp_path)
    df = run_sweep(_fails_on_odd_seed, cfgs, store, executor=client, progress=False)
    assert df["status"].tolist() == ["ok", "error"]
    assert df["error_type"].iloc[1] == "ValueError" and "odd seed" in df["error_traceback"].iloc[1]
    assert not store.has(cfgs[1])
    assert (run_sweep(demo_train, cfgs, store, executor=client, progress=False)["status"] == "ok").all()


def _fails_on_odd_seed(cfg):
    if cfg.seed % 2:
        raise ValueError(f"odd seed {cfg.seed}")
    return demo_train(cfg)
