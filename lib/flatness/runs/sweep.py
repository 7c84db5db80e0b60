"""Sweeps: run a pure function over a list of configs, store one row-set per config, resume what is missing.

``run_sweep(fn, cfgs, store)`` runs ``fn(cfg) -> rows`` for every config whose key is not yet stored, in
process, on a :mod:`concurrent.futures` executor or on a Dask cluster (``dask.distributed.Client``), writes
each run's rows from the calling process only, and returns the table of all requested configs. A run that
raises becomes an error row and is retried by the next call. Artifacts (trained weights) are kept apart from
measurements with :func:`trained`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import json
import os
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd

from ..results import ResultStore, config_key

__all__ = ["run_sweep", "trained", "batch_groups", "worker_pool", "DASK_SCHEDULER_ENV"]

DASK_SCHEDULER_ENV = "FLATNESS_DASK_SCHEDULER"


# --------------------------------------------------------------------------------------- local pools
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def worker_pool(workers: int | None):
    """A local executor for :func:`run_sweep`: ``workers`` single-threaded worker processes (``spawn``).

    Small networks gain little from intra-op threads: on 2 cores two one-thread runs side by side finish sooner
    than one run on two threads. ``None`` or 1 yields ``None`` (run in this process). The pool is shut down on exit.

    Example::

        with worker_pool(2) as pool:
            table = run_sweep(fn, cfgs, store, executor=pool)

    Raises:
        ValueError: ``workers`` is not a positive integer or ``None``.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"worker_pool: workers={workers!r}; expected a positive integer or None")
    if workers is None or workers == 1:
        yield None
        return
    import multiprocessing as mp

    pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_one_thread)
    try:
        yield pool
    finally:
        pool.shutdown()


# --------------------------------------------------------------------------------------- worker side
def _error_row(exc: BaseException, tb: str | None = None) -> dict:
    return {"status": "error", "error_type": type(exc).__name__, "error_message": str(exc),
            "error_traceback": tb if tb is not None else "".join(traceback.format_exception(exc))}


def _as_rows(fn_name: str, out) -> list[dict]:
    if isinstance(out, dict):
        rows = [out]
    elif isinstance(out, pd.DataFrame):
        rows = out.to_dict("records")
    elif isinstance(out, (list, tuple)) and all(isinstance(r, dict) for r in out):
        rows = [dict(r) for r in out]
    else:
        raise TypeError(f"run_sweep: {fn_name} returned {type(out).__name__}; expected a list of dicts "
                        "(one per row), a dict or a DataFrame")
    if not rows:
        raise ValueError(f"run_sweep: {fn_name} returned no rows; a run must give at least one row")
    for r in rows:
        r.setdefault("status", "ok")
    return rows


def _guarded_one(fn: Callable, cfg) -> list[dict]:
    """Run ``fn(cfg)`` where it is scheduled; an exception becomes one error row (with its traceback)."""
    try:
        return _as_rows(getattr(fn, "__name__", "fn"), fn(cfg))
    except Exception as exc:  # noqa: BLE001  (every failure of a run is recorded, then retried next time)
        return [_error_row(exc)]


def _guarded_batch(batch: Callable, cfgs: Sequence) -> dict[str, list[dict]]:
    """Run ``batch(cfgs)`` and split its rows by config key; on failure every config gets an error row."""
    keys = [config_key(c) for c in cfgs]
    try:
        rows = _as_rows(getattr(batch, "__name__", "batch"), batch(list(cfgs)))
        out: dict[str, list[dict]] = {k: [] for k in keys}
        for r in rows:
            k = r.pop("key", None)
            if k not in out:
                raise ValueError(f"run_sweep: batch returned a row with key={k!r}, which is not the key of any "
                                 f"config of its group {keys}; each row must carry its config's key "
                                 "(row['key'] = config_key(cfg))")
            out[k].append(r)
        empty = [k for k, v in out.items() if not v]
        if empty:
            raise ValueError(f"run_sweep: batch returned no rows for key(s) {empty}")
        return out
    except Exception as exc:  # noqa: BLE001
        row = _error_row(exc)
        return {k: [dict(row)] for k in keys}


# ------------------------------------------------------------------------------------------- groups
def batch_groups(cfgs: Sequence, max_batch: int | None = None) -> list[list]:
    """Group configs that are equal except for their class's ``BATCH_FIELDS`` (e.g. ``seed``, ``draw``).

    Groups keep the order of first appearance, and configs keep their order inside a group; a group is split
    into chunks of at most ``max_batch`` configs. Configs without ``BATCH_FIELDS`` form groups of one.
    """
    groups: dict[str, list] = {}
    for c in cfgs:
        fields = tuple(getattr(type(c), "BATCH_FIELDS", ()) or ())
        if dataclasses.is_dataclass(c) and fields:
            rest = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name not in fields}
            gid = type(c).__qualname__ + json.dumps(rest, sort_keys=True, default=repr)
        else:
            gid = "single:" + config_key(c)
        groups.setdefault(gid, []).append(c)
    out = []
    for g in groups.values():
        step = len(g) if not max_batch else max_batch
        out.extend(g[i:i + step] for i in range(0, len(g), step))
    return out


# ------------------------------------------------------------------------------------------ executors
def _is_dask_client(executor) -> bool:
    return type(executor).__module__.split(".")[0] == "distributed" and hasattr(executor, "gather")


def _submit(executor, func, *args, label: str):
    if _is_dask_client(executor):
        # pure=False: a failed run must run again when re-submitted, not be served from the scheduler's memory
        return executor.submit(func, *args, pure=False, key=f"{label}-{os.urandom(4).hex()}")
    return executor.submit(func, *args)


def _as_completed(executor, futures):
    if _is_dask_client(executor):
        import distributed

        return distributed.as_completed(futures)
    return cf.as_completed(futures)


def _cancel(executor, futures) -> None:
    for f in futures:
        try:
            f.cancel()
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------------------------------------- sweep
def run_sweep(fn: Callable[[Any], list[dict]], cfgs: Iterable, store: ResultStore, *, executor=None,
              batch: Callable[[list], list[dict]] | None = None, progress: bool = True,
              max_batch: int | None = None) -> pd.DataFrame:
    """Run ``fn`` on every config not yet stored, store each run's rows, return the table of all ``cfgs``.

    ``fn(cfg) -> list[dict]`` must be a pure function of its config: seeds come from the config, never from
    a position in the list, so a run gives the same rows wherever and whenever it runs. Only the calling
    process writes to ``store`` (workers return rows), one part per config, atomically, as runs finish; a
    sweep killed at any point resumes by calling ``run_sweep`` again with the same arguments.

    A run that raises (or whose worker dies) is stored as one row with ``status="error"``, ``error_type``,
    ``error_message`` and ``error_traceback``; error rows do not count as done, so the next call retries the
    run. Rows without a ``status`` get ``status="ok"``.

    Args:
        fn: ``fn(cfg) -> rows`` (a list of dicts, a dict or a DataFrame). With a process pool or Dask it must
            be importable by the workers (a module-level function, or a :func:`functools.partial` of one).
        cfgs: the configs (dataclasses such as :class:`flatness.runs.RunConfig`, or dicts); duplicates run once.
        store: where rows are stored and read from.
        executor: ``None`` (run in this process, one after another), a :class:`concurrent.futures.Executor`
            (e.g. ``ProcessPoolExecutor``), or a ``dask.distributed.Client`` (anything with ``submit``).
            With ``None`` and the environment variable ``FLATNESS_DASK_SCHEDULER`` set (``run_all.sh
            --scheduler ADDRESS``), a ``distributed.Client`` is connected to that address for this sweep.
        batch: optional ``batch(cfgs) -> rows`` that runs a group of configs differing only in their class's
            ``BATCH_FIELDS`` (e.g. seeds) as one stacked ensemble; every row must carry its config's key as
            ``row["key"] = config_key(cfg)``. Each config still gets its own part, so batched and unbatched
            sweeps give the same table and resume each other.
        progress: show a tqdm bar over runs (updated at most every 2 s).
        max_batch: split a batch group into chunks of at most this many configs (default: no limit).

    Returns:
        The stored rows of every requested config (newest row-set per key, including error rows), ordered as
        ``cfgs``.

    Raises:
        TypeError: ``executor`` has no ``submit``, or ``store`` is not a :class:`ResultStore`.
    """
    if not isinstance(store, ResultStore):
        raise TypeError(f"run_sweep: store must be a ResultStore, got {type(store).__name__}")
    if executor is not None and not hasattr(executor, "submit"):
        raise TypeError(f"run_sweep: executor={executor!r} has no submit(); expected None, a "
                        "concurrent.futures executor or a dask.distributed.Client")
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"run_sweep: max_batch={max_batch!r} must be a positive integer or None")
    by_key: dict[str, Any] = {}
    for c in cfgs:
        by_key.setdefault(config_key(c), c)
    wanted = list(by_key)

    before = store.load(keys=wanted)
    done = set()
    if len(before):
        ok = before["status"] != "error" if "status" in before.columns else pd.Series(True, index=before.index)
        done = set(before.loc[ok, "key"])
    todo = [by_key[k] for k in wanted if k not in done]

    own_client = None
    if todo and executor is None and os.environ.get(DASK_SCHEDULER_ENV):
        import distributed

        own_client = executor = distributed.Client(os.environ[DASK_SCHEDULER_ENV], set_as_default=False)
    try:
        if todo:
            _run(fn, todo, store, executor=executor, batch=batch, progress=progress, max_batch=max_batch)
    finally:
        if own_client is not None:
            own_client.close()

    table = store.load(keys=wanted) if todo else before
    if len(table):
        order = {k: i for i, k in enumerate(wanted)}
        table = (table.assign(_order=table["key"].map(order)).sort_values("_order", kind="stable")
                 .drop(columns="_order").reset_index(drop=True))
        missing = set(wanted) - set(table["key"])
        if missing:
            warnings.warn(f"run_sweep: {len(missing)} config(s) have no readable rows in {store!r} "
                          f"(see the warnings above); keys {sorted(missing)[:5]}", stacklevel=2)
    return table


def _run(fn, todo, store, *, executor, batch, progress, max_batch) -> None:
    units = batch_groups(todo, max_batch) if batch is not None else [[c] for c in todo]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"{store.name}: runs", mininterval=2.0, leave=False)

    def finish(unit, result: dict[str, list[dict]]) -> None:
        for c in unit:
            store.append(result[config_key(c)], config=c)
        if bar is not None:
            bar.update(len(unit))

    def call(unit):
        if batch is not None:
            return _guarded_batch, (batch, unit)
        return _guarded_one, (fn, unit[0])

    def wrap(unit, out) -> dict[str, list[dict]]:
        return out if batch is not None else {config_key(unit[0]): out}

    try:
        if executor is None:
            for unit in units:
                func, args = call(unit)
                finish(unit, wrap(unit, func(*args)))
            return
        futures = {}
        for unit in units:
            func, args = call(unit)
            futures[_submit(executor, func, *args, label=f"run-{config_key(unit[0])}")] = unit
        try:
            for fut in _as_completed(executor, list(futures)):
                unit = futures[fut]
                try:
                    out = wrap(unit, fut.result())
                except Exception as exc:  # noqa: BLE001  (a worker died, or the result could not be sent)
                    row = _error_row(exc)
                    out = {config_key(c): [dict(row)] for c in unit}
                finish(unit, out)
        except BaseException:
            _cancel(executor, futures)
            raise
    finally:
        if bar is not None:
            bar.close()


# ------------------------------------------------------------------------------------------ artifacts
def trained(store: ResultStore, train_cfg, train_fn: Callable[[Any], Any], *, map_location=None,
            save: bool = True):
    """The trained object of ``train_cfg``: loaded from ``store``'s artifacts if saved, else trained and saved.

    Keeps measurement apart from training: a measurement config holds its training config (a nested
    field) and calls ``trained(store, cfg.train, train_fn)``, so a new box size or metric re-measures the
    saved models without retraining, and another notebook re-measures the models of an earlier one by
    passing that notebook's store. The artifact key is ``config_key(train_cfg)`` (it covers the training
    config's ``VERSION``).

    Args:
        store: whose ``artifacts/`` folder holds the object.
        train_cfg: the training config.
        train_fn: ``train_fn(train_cfg) -> obj`` (e.g. a state dict or a dict of tensors), run when absent.
        map_location: as in :func:`torch.load`.
        save: save a freshly trained object (default ``True``).

    Returns:
        The object (as saved, when loaded).
    """
    key = config_key(train_cfg)
    if store.has_artifact(key):
        return store.load_artifact(key, map_location=map_location)
    obj = train_fn(train_cfg)
    if save:
        store.save_artifact(key, obj)
    return obj
