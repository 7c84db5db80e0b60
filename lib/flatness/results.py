"""Tidy, resumable result tables: one row per run, with its config, seed, package versions and git commit.

A :class:`ResultStore` is a folder ``results/<name>/`` of parquet part files. Each finished run (or batch
of runs) is written atomically to its own part (a temporary file, then ``os.replace``), keyed by a hash of
its config, so a killed sweep loses only the run in flight and a re-run skips what is done::

    store = ResultStore("01_boolean")
    for cfg in configs:
        if store.has(cfg):
            continue
        store.append(run(cfg), config=cfg)
    df = store.load()            # every figure is re-drawn from this table

Configs are flat or nested dicts (or dataclasses); they are stored whole in every row (``config`` as JSON
plus one ``cfg_<key>`` column per top-level key) with ``key``, ``created``, versions and ``git_commit``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import subprocess
import uuid
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ._paths import REPO_ROOT

__all__ = ["ResultStore", "config_key", "environment_info", "results_dir"]


def results_dir() -> Path:
    """Root of result tables: ``$FLATNESS_RESULTS_DIR`` or ``results/`` in the repository."""
    env = os.environ.get("FLATNESS_RESULTS_DIR")
    return Path(env) if env else REPO_ROOT / "results"


def _plain(config) -> dict:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"config must be a dict or a dataclass instance, got {type(config).__name__}")


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def config_key(config) -> str:
    """A 16-hex-digit hash of a config (order of keys does not matter)."""
    return hashlib.sha256(_json(_plain(config)).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def environment_info() -> dict:
    """Versions of the stack and the git commit of the repository (``"unknown"`` outside git)."""
    import numpy
    import torch

    import flatness

    info = {"flatness_version": flatness.__version__, "torch_version": torch.__version__,
            "numpy_version": numpy.__version__, "pandas_version": pd.__version__,
            "python_version": platform.python_version(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        import gpytorch

        info["gpytorch_version"] = gpytorch.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        info["git_commit"] = (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = "unknown"
    return info


class ResultStore:
    """A resumable table of runs under ``root/name`` (see module docstring)."""

    def __init__(self, name: str, root: str | Path | None = None):
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise ValueError(f"ResultStore: name={name!r} must be a plain folder name")
        self.path = Path(root) if root is not None else results_dir()
        self.path = self.path / name
        self.name = name

    def _parts(self) -> list[Path]:
        return sorted(self.path.glob("*.parquet")) if self.path.is_dir() else []

    def keys(self) -> set[str]:
        """Keys of the configs already stored."""
        keys: set[str] = set()
        for p in self._parts():
            keys.update(pd.read_parquet(p, columns=["key"])["key"].tolist())
        return keys

    def has(self, config) -> bool:
        return config_key(config) in self.keys()

    def append(self, rows: dict | Iterable[dict] | pd.DataFrame, config) -> Path:
        """Store the rows of one finished run (or batch) atomically, tagged with ``config`` and the environment.

        Returns the part file written.
        """
        cfg = _plain(config)
        key = config_key(cfg)
        if isinstance(rows, dict):
            df = pd.DataFrame([rows])
        elif isinstance(rows, pd.DataFrame):
            df = rows.copy()
        else:
            df = pd.DataFrame(list(rows))
        df.insert(0, "key", key)
        for k, v in cfg.items():
            col = f"cfg_{k}"
            if col not in df.columns:
                df[col] = _json(v) if isinstance(v, (dict, list, tuple)) else v
        df["config"] = _json(cfg)
        df["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for k, v in environment_info().items():
            df[k] = v
        self.path.mkdir(parents=True, exist_ok=True)
        final = self.path / f"{key}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = final.with_suffix(".tmp")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, final)
        return final

    def load(self) -> pd.DataFrame:
        """All stored rows (empty frame when nothing is stored)."""
        parts = self._parts()
        if not parts:
            return pd.DataFrame()
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)

    def clear(self) -> None:
        """Delete every stored part (start the sweep afresh)."""
        for p in self._parts():
            p.unlink()

    def __repr__(self) -> str:
        return f"ResultStore({self.name!r}, path={str(self.path)!r}, parts={len(self._parts())})"
