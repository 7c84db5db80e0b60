"""The experiment engine: configs, sweeps, result stores and artifacts.

* :mod:`~flatness.runs.config`: :class:`RunConfig` (frozen, versioned, validated), :func:`param`,
  :func:`with_overrides`, :func:`profile_config`, :func:`grid`; :func:`config_key` hashes a config.
* :mod:`~flatness.runs.sweep`: :func:`run_sweep` (in process, a process pool or a Dask client; resumable),
  :func:`trained` (train once, save the weights as an artifact, re-measure later), :func:`worker_pool`
  (single-threaded local worker processes).
* :class:`ResultStore` (from :mod:`flatness.results`): the parquet table of runs and the artifacts folder.
* :mod:`~flatness.runs.demo`: a small example experiment (:class:`DemoConfig`, :func:`demo_train`,
  :func:`demo_train_batch`).
"""

from ..results import ResultStore, config_key
from .config import PROFILE_NAMES, RunConfig, grid, param, profile_config, with_overrides
from .demo import DemoConfig, demo_train, demo_train_batch
from .sweep import DASK_SCHEDULER_ENV, batch_groups, run_sweep, trained, worker_pool

__all__ = [
    # configs
    "RunConfig", "param", "with_overrides", "profile_config", "grid", "config_key", "PROFILE_NAMES",
    # sweeps and storage
    "run_sweep", "batch_groups", "trained", "worker_pool", "ResultStore", "DASK_SCHEDULER_ENV",
    # example experiment
    "DemoConfig", "demo_train", "demo_train_batch",
]
