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

(:func:`flatness.runs.run_sweep` does this loop for you, in process, on a process pool or on a Dask cluster.)

Configs are flat or nested dicts, or dataclasses (:class:`flatness.runs.RunConfig`); they are stored whole
in every row (``config`` as JSON plus one ``cfg_<key>`` column per top-level key) with ``key``, ``created``,
versions and ``git_commit``.

Layout and rules of the folder (the contract that lets many runs and one reader share it):

* **Parts** are ``<key>-<id>.parquet``: ``key`` is the 16-hex-digit :func:`config_key`, ``id`` is 24 hex
  digits, the write time in nanoseconds (16) and 8 random digits, so the name alone says which config a part
  holds and which of two parts of one key is newer. A part whose rows all have ``status == "error"`` (a run
  that raised, see :func:`flatness.runs.run_sweep`) is named ``<key>-<id>.error.parquet``. Parts written by
  older versions (``<key>-<8 hex>.parquet``) are dated by their file's modification time.
* :meth:`ResultStore.keys` and :meth:`ResultStore.has` read **file names only** (no part is opened), so a
  ``has()`` loop over a sweep of 800 runs costs one directory listing per call, not 800 file reads.
  A key counts as stored when its *newest* part is not an error part.
* **Newest row-set per key**: when one key has several parts (two writers ran the same config, or a failed
  run was retried), :meth:`ResultStore.load` returns the rows of the newest part only, so rows are never
  duplicated. If that part cannot be read it is skipped with a :class:`UserWarning` naming the file and the
  next newest part of the key is used (the key is missing from the table when none can be read).
* **Orphaned temporary files** (``*.tmp``; a writer killed mid-write leaves one) are removed by
  :meth:`append`, :meth:`load` and :meth:`compact` once they are older than :attr:`ResultStore.TMP_MAX_AGE_S`
  (60 s); a part is written in one call that takes well under that, so a ``.tmp`` file untouched for a minute
  is no longer being written.
* :meth:`ResultStore.compact` merges the newest row-set of every key into one ``_compacted-<id>.parquet``
  (keeping each row-set's write time in a hidden column) and deletes the parts it merged. ``keys()``,
  ``has()`` and ``load()`` answer the same before and after; ``keys()`` then reads the ``key`` column of the
  compacted file once (cached while the file is unchanged). New runs keep adding parts beside it.
* **Artifacts** (trained weights, checkpoints) live in ``<store.path>/artifacts/<key>.pt``, written atomically
  with :func:`torch.save` (:meth:`ResultStore.save_artifact`, :meth:`load_artifact`, :meth:`has_artifact`,
  :meth:`delete_artifact`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import re
import secrets
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ._paths import REPO_ROOT

__all__ = ["ResultStore", "config_key", "environment_info", "results_dir"]

_STAMP = "_store_written_ns"  # hidden column of compacted files: the write time of each row-set
_VANISHED = object()  # a part removed between listing and reading
_PART_RE = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{8}|[0-9a-f]{24})(\.error)?\.parquet$")
_ARTIFACT_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


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


def _is_default(f: dataclasses.Field, value) -> bool:
    if f.default is not dataclasses.MISSING:
        return value == f.default
    if f.default_factory is not dataclasses.MISSING:
        return value == f.default_factory()
    return False


def _key_payload(obj):
    """What :func:`config_key` hashes: dataclasses carry their class name and ``VERSION``, recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: _key_payload(getattr(obj, f.name)) for f in dataclasses.fields(obj)
               if not (f.metadata.get("key_at_default") is False and _is_default(f, getattr(obj, f.name)))}
        out["__class__"] = type(obj).__qualname__
        version = getattr(type(obj), "VERSION", None)
        if version is not None:
            out["__version__"] = version
        return out
    if isinstance(obj, dict):
        return {k: _key_payload(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_key_payload(v) for v in obj]
    return obj


def config_key(config) -> str:
    """A 16-hex-digit hash of a config.

    For a dict the order of keys does not matter. For a dataclass (e.g. a :class:`flatness.runs.RunConfig`)
    the hash covers its fields, its class name and its class-level ``VERSION``, recursively through nested
    dataclass fields: bumping ``VERSION`` (when the code's results change) gives every config a new key, so
    old rows and artifacts are no longer taken as done. A field declared ``param(..., key_at_default=False)``
    is left out while it holds its default (a field added later keeps the stored keys).

    Raises:
        TypeError: ``config`` is neither a dict nor a dataclass instance.
    """
    if not (isinstance(config, dict) or (dataclasses.is_dataclass(config) and not isinstance(config, type))):
        raise TypeError(f"config_key: config must be a dict or a dataclass instance, got {type(config).__name__}")
    return hashlib.sha256(_json(_key_payload(config)).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def environment_info() -> dict:
    """Versions of the stack and the git commit of the repository (``"unknown"`` outside git)."""
    import numpy
    import torch

    import flatness

    from ._device import default_device

    dev = default_device()  # what the pipelines compute on ($FLATNESS_DEVICE, else CUDA when present)
    info = {"flatness_version": flatness.__version__, "torch_version": torch.__version__,
            "numpy_version": numpy.__version__, "pandas_version": pd.__version__,
            "python_version": platform.python_version(),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type}
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


def _new_id() -> str:
    """24 hex digits: the time in ns (16, so names sort by write time) and 8 random ones."""
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


def _is_error_frame(df: pd.DataFrame) -> bool:
    return len(df) > 0 and "status" in df.columns and bool((df["status"] == "error").all())


@dataclasses.dataclass(frozen=True)
class _Part:
    path: str
    key: str
    stamp: int  # write time, ns
    error: bool



def _to_cpu(obj):
    """``obj`` with every tensor (in nested dicts, lists and tuples) on the CPU; ``obj`` itself if all are."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type == "cpu" else obj.detach().cpu()
    if isinstance(obj, dict):
        items = {k: _to_cpu(v) for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj
        out = items if type(obj) is dict else type(obj)(items)  # an OrderedDict state_dict stays one
        if hasattr(obj, "_metadata"):  # state_dict version metadata, read by load_state_dict
            out._metadata = obj._metadata
        return out
    if type(obj) in (list, tuple):
        items = [_to_cpu(v) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    return obj


class ResultStore:
    """A resumable table of runs under ``root/name`` (see the module docstring for the folder's rules).

    Args:
        name: folder name of the table (no path separators).
        root: parent folder; default :func:`results_dir`.
    """

    TMP_MAX_AGE_S: float = 60.0

    def __init__(self, name: str, root: str | Path | None = None):
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise ValueError(f"ResultStore: name={name!r} must be a plain folder name")
        self.path = Path(root) if root is not None else results_dir()
        self.path = self.path / name
        self.name = name
        self._compacted_cache: dict[str, tuple[tuple, dict]] = {}

    # ---------------------------------------------------------------------------------------- listing
    def _parts(self) -> list[Path]:
        """Every parquet file of the table (parts and compacted files)."""
        return sorted(self.path.glob("*.parquet")) if self.path.is_dir() else []

    def _scan(self, only: str | None = None) -> tuple[list[_Part], list[Path]]:
        """Per-key parts (from their names) and compacted files, in one directory listing.

        Args:
            only: list the parts of this key only (compacted files are always listed).
        """
        parts: list[_Part] = []
        compacted: list[Path] = []
        if not self.path.is_dir():
            return parts, compacted
        with os.scandir(self.path) as it:
            for entry in it:
                name = entry.name
                if not name.endswith(".parquet"):
                    continue
                if name.startswith("_compacted-"):
                    compacted.append(Path(entry.path))
                    continue
                if only is not None and not name.startswith(only):
                    continue
                m = _PART_RE.match(name)
                if m is None:
                    continue
                key, pid, err = m.groups()
                if len(pid) == 24:
                    stamp = int(pid[:16], 16)
                else:  # a part of the older <key>-<8 hex> format: dated by its file
                    try:
                        stamp = entry.stat().st_mtime_ns
                    except FileNotFoundError:  # removed meanwhile (compaction)
                        continue
                parts.append(_Part(entry.path, key, stamp, err is not None))
        return parts, sorted(compacted)

    def _compacted_index(self, path: Path) -> dict[str, tuple[int, bool]] | None:
        """``{key: (write time, is_error)}`` of the row-sets of a compacted file (cached while it is unchanged)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        sig = (st.st_mtime_ns, st.st_size)
        hit = self._compacted_cache.get(path.name)
        if hit is not None and hit[0] == sig:
            return hit[1]
        try:
            import pyarrow.parquet as pq

            cols = set(pq.read_schema(path).names)
            df = pq.read_table(path, columns=["key", _STAMP] + (["status"] if "status" in cols else [])).to_pandas()
        except FileNotFoundError:  # replaced by a newer compaction since the listing
            return None
        except Exception as exc:  # noqa: BLE001  (any unreadable file: skip it, say which)
            warnings.warn(f"ResultStore {self.name!r}: skipping unreadable compacted file {path} ({exc})",
                          stacklevel=4)
            return None
        err = (df["status"] == "error") if "status" in df.columns else pd.Series(False, index=df.index)
        agg = (df.assign(_err=err).groupby("key", sort=False).agg(stamp=(_STAMP, "max"), error=("_err", "all")))
        idx = {k: (int(t), bool(e)) for k, t, e in zip(agg.index, agg["stamp"], agg["error"])}
        self._compacted_cache[path.name] = (sig, idx)
        return idx

    def _candidates(self, only: str | None = None) -> dict[str, list[tuple[int, bool, str, bool]]]:
        """Per key, its row-sets ``(stamp, is_error, file, in_compacted)``, newest first."""
        parts, compacted = self._scan(only)
        out: dict[str, list] = {}
        for p in parts:
            out.setdefault(p.key, []).append((p.stamp, p.error, p.path, False))
        for c in compacted:
            idx = self._compacted_index(c)
            if idx is None:
                continue
            items = idx.items() if only is None else ([(only, idx[only])] if only in idx else [])
            for key, (stamp, err) in items:
                out.setdefault(key, []).append((stamp, err, str(c), True))
        for v in out.values():
            if len(v) > 1:
                v.sort(reverse=True)
        return out

    def keys(self, include_errors: bool = False) -> set[str]:
        """Keys of the configs already stored, read from file names.

        Args:
            include_errors: also return keys whose newest row-set is a failed run (``status == "error"``).

        Returns:
            The set of keys whose newest row-set is a finished run (plus failed ones with ``include_errors``).
        """
        return {k for k, c in self._candidates().items() if include_errors or not c[0][1]}

    def error_keys(self) -> set[str]:
        """Keys whose newest row-set is a failed run (they are retried by :func:`flatness.runs.run_sweep`)."""
        return {k for k, c in self._candidates().items() if c[0][1]}

    def has(self, config) -> bool:
        """Whether ``config`` (a dict, a dataclass or a key string) has a finished run stored."""
        key = config if isinstance(config, str) else config_key(config)
        c = self._candidates(only=key).get(key)
        return bool(c) and not c[0][1]

    # ---------------------------------------------------------------------------------------- writing
    def append(self, rows: dict | Iterable[dict] | pd.DataFrame, config) -> Path:
        """Store the rows of one finished run (or batch) atomically, tagged with ``config`` and the environment.

        Rows that all have ``status == "error"`` mark a failed run (an error part, not counted by
        :meth:`has`). Returns the part file written.
        """
        cfg = _plain(config)
        key = config_key(config)
        if isinstance(rows, dict):
            df = pd.DataFrame([rows])
        elif isinstance(rows, pd.DataFrame):
            df = rows.copy()
        else:
            df = pd.DataFrame(list(rows))
        if "key" in df.columns:
            bad = set(df["key"].astype(str)) - {key}
            if bad:
                raise ValueError(f"ResultStore.append: rows carry key(s) {sorted(bad)} but config has key {key}")
            df = df.drop(columns="key")
        extra: dict = {}
        for k, v in cfg.items():
            col = f"cfg_{k}"
            if col not in df.columns:
                extra[col] = _json(v) if isinstance(v, (dict, list, tuple)) else v
        extra["config"] = _json(cfg)
        if dataclasses.is_dataclass(config):
            extra["config_class"] = type(config).__qualname__
            version = getattr(type(config), "VERSION", None)
            if version is not None:
                extra["config_version"] = version
        extra["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")
        extra.update(environment_info())
        df = df.drop(columns=[k for k in extra if k in df.columns])  # store-owned columns win
        n = len(df)
        df = pd.concat([pd.DataFrame({"key": [key] * n}, index=df.index), df,
                        pd.DataFrame({k: [v] * n for k, v in extra.items()}, index=df.index)], axis=1)
        self.path.mkdir(parents=True, exist_ok=True)
        self.clean_tmp()
        suffix = ".error.parquet" if _is_error_frame(df) else ".parquet"
        final = self.path / f"{key}-{_new_id()}{suffix}"
        tmp = self.path / f"{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            df.to_parquet(tmp, index=False)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def clean_tmp(self, max_age_s: float | None = None) -> list[Path]:
        """Remove temporary files left by killed writers (older than ``max_age_s``, default 60 s).

        Returns the files removed.
        """
        age = self.TMP_MAX_AGE_S if max_age_s is None else max_age_s
        now = time.time()
        removed = []
        for d in (self.path, self.path / "artifacts"):
            if not d.is_dir():
                continue
            for p in d.glob("*.tmp"):
                try:
                    if now - p.stat().st_mtime >= age:
                        p.unlink()
                        removed.append(p)
                except FileNotFoundError:
                    pass
        return removed

    # ---------------------------------------------------------------------------------------- reading
    def _read(self, path: Path):
        """The part as an arrow table without pandas metadata (``None``, with a warning, when unreadable)."""
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).replace_schema_metadata(None)
        except FileNotFoundError:  # compacted away since the listing: the caller lists again
            return _VANISHED
        except Exception as exc:  # noqa: BLE001  (a truncated or corrupt part must not break the table)
            warnings.warn(f"ResultStore {self.name!r}: skipping unreadable part {path} "
                          f"({type(exc).__name__}: {exc})", stacklevel=4)
            return None

    def _load_arrow(self, keys: Iterable[str] | None = None):
        """Newest row-set per key as arrow tables with the hidden write-time column, in write order.

        A part that vanishes between listing and reading (a concurrent :meth:`compact`) makes it list again.
        """
        self.clean_tmp()
        for _ in range(4):
            tables = self._load_arrow_once(keys)
            if tables is not _VANISHED:
                return tables
        raise RuntimeError(f"ResultStore.load: parts of {self.name!r} kept vanishing while being read "
                           "(is compact() running in a loop elsewhere?)")

    def _load_arrow_once(self, keys: Iterable[str] | None):
        import pyarrow as pa

        cands = self._candidates()
        if keys is not None:
            wanted = set(keys)
            cands = {k: v for k, v in cands.items() if k in wanted}
        tables: list[tuple[int, str, pa.Table]] = []
        compacted: dict[Path, tuple | None] = {}
        for key, options in cands.items():
            for stamp, _err, path, in_compacted in options:
                if in_compacted:
                    if path not in compacted:
                        whole = self._read(path)
                        if whole is _VANISHED:
                            return _VANISHED
                        compacted[path] = None if whole is None else (whole, whole.select(["key", _STAMP])
                                                                      .to_pandas().groupby(["key", _STAMP],
                                                                                           sort=False).indices)
                    if compacted[path] is None:
                        continue
                    whole, groups = compacted[path]
                    rows = groups.get((key, stamp))
                    if rows is None:
                        continue
                    t = whole.take(pa.array(rows))
                else:
                    t = self._read(path)
                    if t is _VANISHED:
                        return _VANISHED
                    if t is None:
                        continue
                    t = t.append_column(_STAMP, pa.array([stamp] * t.num_rows, pa.int64()))
                tables.append((stamp, key, t))
                break
        tables.sort(key=lambda x: (x[0], x[1]))
        return [t for _, _, t in tables]

    def _load(self, keys: Iterable[str] | None = None) -> pd.DataFrame:
        """Newest row-set per key, with the hidden write-time column, ordered by write time."""
        import pyarrow as pa

        tables = self._load_arrow(keys)
        if not tables:
            return pd.DataFrame()
        try:
            return pa.concat_tables(tables, promote_options="permissive").to_pandas()
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            # a column whose type differs between parts (e.g. int in one, str in another): let pandas mix them
            return pd.concat([t.to_pandas() for t in tables], ignore_index=True)

    def load(self, keys: Iterable[str] | None = None) -> pd.DataFrame:
        """All stored rows: the newest row-set of each key, in the order they were written.

        Args:
            keys: only these keys (default: all).

        Returns:
            The table (an empty frame when nothing is stored). Unreadable parts are skipped with a warning.
        """
        df = self._load(keys)
        return df.drop(columns=_STAMP) if _STAMP in df.columns else df

    def compact(self) -> Path | None:
        """Merge the newest row-set of every key into one ``_compacted-<id>.parquet`` and delete the merged parts.

        ``keys()``, ``has()`` and ``load()`` give the same answers before and after. Unreadable parts are left
        in place (and still skipped with a warning). Safe against concurrent writers and readers: a part written
        while compacting is not deleted (and is newer than the compacted copy of its key), and a reader whose
        listing went stale lists again. Run it from one process at a time (e.g. after a sweep).

        Returns:
            The compacted file, or ``None`` when the store is empty.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts, compacted = self._scan()  # only what is listed now is deleted below: later parts stay
        tables = self._load_arrow()
        if not tables:
            return None
        try:
            table = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise RuntimeError(f"ResultStore.compact: the parts of {self.name!r} do not make one table ({exc}); "
                               "the parts are left as they were") from exc
        final = self.path / f"_compacted-{_new_id()}.parquet"
        tmp = self.path / f"{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, final)
        except Exception as exc:
            raise RuntimeError(f"ResultStore.compact: could not write one table for {self.name!r} ({exc}); "
                               "the parts are left as they were") from exc
        finally:
            tmp.unlink(missing_ok=True)
        readable_compacted = {c for c in compacted if self._compacted_index(c) is not None}
        for p in parts:
            # keep unreadable parts: deleting them would hide the problem
            if self._readable(p.path):
                Path(p.path).unlink(missing_ok=True)
        for c in readable_compacted:
            c.unlink(missing_ok=True)
            self._compacted_cache.pop(c.name, None)
        return final

    @staticmethod
    def _readable(path: Path) -> bool:
        try:
            import pyarrow.parquet as pq

            pq.read_metadata(path)
            return True
        except Exception:  # noqa: BLE001
            return False

    def clear(self) -> None:
        """Delete every stored part (start the sweep afresh). Artifacts are kept (see :meth:`delete_artifact`)."""
        for p in self._parts():
            p.unlink()
        self._compacted_cache.clear()

    # -------------------------------------------------------------------------------------- artifacts
    def _artifact_path(self, fn: str, key: str) -> Path:
        if not isinstance(key, str) or not _ARTIFACT_KEY_RE.match(key):
            raise ValueError(f"ResultStore.{fn}: key={key!r} must be a non-empty plain file name "
                             "(letters, digits, '_', '.', '=', '+', '-'), e.g. a config_key")
        return self.path / "artifacts" / f"{key}.pt"

    def save_artifact(self, key: str, obj) -> Path:
        """Save ``obj`` (weights, a checkpoint dict) under ``key`` with :func:`torch.save`, atomically.

        Written to a temporary file in the same folder, then renamed with ``os.replace``, so a reader sees
        the old artifact or the new one, never half of one. Tensors (also inside dicts, lists and tuples) are
        saved on the CPU, so a store written on a GPU machine loads anywhere. Returns
        ``<store.path>/artifacts/<key>.pt``.
        """
        import torch

        final = self._artifact_path("save_artifact", key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            torch.save(_to_cpu(obj), tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def load_artifact(self, key: str, map_location=None):
        """Load the artifact saved under ``key`` (``map_location`` as in :func:`torch.load`).

        Raises:
            KeyError: no artifact ``key`` in this store.
        """
        import torch

        path = self._artifact_path("load_artifact", key)
        if not path.is_file():
            raise KeyError(f"ResultStore.load_artifact: no artifact {key!r} in store {self.name!r} ({path.parent})")
        # our own files: they may hold configs and optimizer states, not only tensors
        return torch.load(path, map_location=map_location, weights_only=False)

    def has_artifact(self, key: str) -> bool:
        """Whether an artifact ``key`` is saved."""
        return self._artifact_path("has_artifact", key).is_file()

    def delete_artifact(self, key: str) -> None:
        """Delete the artifact ``key`` (nothing happens when it is absent)."""
        self._artifact_path("delete_artifact", key).unlink(missing_ok=True)

    def artifact_keys(self) -> set[str]:
        """Keys of the saved artifacts."""
        d = self.path / "artifacts"
        return {p.stem for p in d.glob("*.pt")} if d.is_dir() else set()

    def __reduce__(self):  # pickled by name and folder only (no caches), for process pools and Dask workers
        return (_store_from_path, (self.name, str(self.path.parent)))

    def __repr__(self) -> str:
        return f"ResultStore({self.name!r}, path={str(self.path)!r}, parts={len(self._parts())})"


def _store_from_path(name: str, root: str) -> ResultStore:
    return ResultStore(name, root)
