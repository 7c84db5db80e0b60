"""Result store (atomic, resumable, tagged) and correlation statistics (vs closed forms and scipy)."""

import os
import re
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy import stats

from flatness.results import ResultStore, config_key, environment_info
from flatness.stats import correlation, correlation_table


def test_store_roundtrip_and_resume(tmp_path):
    store = ResultStore("demo", root=tmp_path)
    assert store.load().empty and not store.has({"a": 1})
    store.append({"loss": 0.5}, config={"a": 1, "seed": 0})
    store.append([{"loss": 0.1, "epoch": 1}, {"loss": 0.2, "epoch": 2}], config={"a": 2, "seed": 0})
    assert store.has({"seed": 0, "a": 1})  # key order does not matter
    df = store.load()
    assert len(df) == 3 and set(df["cfg_a"]) == {1, 2}
    for col in ("key", "config", "created", "torch_version", "git_commit", "flatness_version"):
        assert col in df.columns
    assert not list(store.path.glob("*.tmp"))
    store.clear()
    assert store.load().empty


def test_config_key_changes_with_values():
    assert config_key({"a": 1}) != config_key({"a": 2})
    assert config_key({"a": 1, "b": [1, 2]}) == config_key({"b": [1, 2], "a": 1})


def test_environment_info_has_versions():
    info = environment_info()
    assert info["torch_version"].startswith("2.")


def test_store_rejects_bad_name(tmp_path):
    with pytest.raises(ValueError, match="plain folder name"):
        ResultStore("../x", root=tmp_path)


def _part_names(store):
    return sorted(p.name for p in store.path.glob("*.parquet"))


def test_keys_and_has_read_file_names_only(tmp_path, monkeypatch):
    store = ResultStore("k", root=tmp_path)
    for i in range(5):
        store.append({"loss": i}, config={"i": i})
    assert all(re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]{24}\.parquet", n) for n in _part_names(store))

    def no_reads(*a, **k):
        raise AssertionError("keys()/has() must not open parts")

    monkeypatch.setattr(pd, "read_parquet", no_reads)
    monkeypatch.setattr(pq, "read_table", no_reads)
    assert store.keys() == {config_key({"i": i}) for i in range(5)}
    assert store.has({"i": 3}) and not store.has({"i": 9}) and store.has(config_key({"i": 3}))


def test_newest_row_set_per_key_no_duplicates(tmp_path):
    store = ResultStore("n", root=tmp_path)
    store.append([{"loss": 1.0}, {"loss": 1.5}], config={"a": 1})
    store.append({"loss": 2.0}, config={"a": 1})  # a second writer of the same config
    store.append({"loss": 3.0}, config={"a": 2})
    df = store.load()
    assert df["loss"].tolist() == [2.0, 3.0], "only the newest part of a key, in write order"
    assert store.load(keys=[config_key({"a": 2})])["loss"].tolist() == [3.0]
    # a part of the older <key>-<8 hex> format is dated by its modification time
    old = store.path / f"{config_key({'a': 2})}-deadbeef.parquet"
    pd.DataFrame({"key": [config_key({"a": 2})], "loss": [9.0]}).to_parquet(old)
    t = time.time() + 60
    os.utime(old, (t, t))
    assert store.load()["loss"].tolist() == [2.0, 9.0]
    os.utime(old, (t - 3600, t - 3600))
    assert store.load()["loss"].tolist() == [2.0, 3.0]


def test_corrupt_part_skipped_with_a_warning(tmp_path):
    store = ResultStore("c", root=tmp_path)
    store.append({"loss": 1.0}, config={"a": 1})
    store.append({"loss": 2.0}, config={"a": 2})
    older = store.append({"loss": 3.0}, config={"a": 3})
    bad = store.append({"loss": 4.0}, config={"a": 3})
    bad.write_bytes(b"PAR1 not really parquet")  # truncated / corrupt newest part of key a=3
    with pytest.warns(UserWarning, match=re.escape(bad.name)):
        df = store.load()
    assert df["loss"].tolist() == [1.0, 2.0, 3.0], "the next newest part of the key is used"
    older.unlink()
    with pytest.warns(UserWarning, match="skipping unreadable part"):
        assert store.load()["loss"].tolist() == [1.0, 2.0]
    assert config_key({"a": 3}) in store.keys(), "keys come from file names, even of an unreadable part"


def test_orphan_tmp_files_removed(tmp_path):
    store = ResultStore("t", root=tmp_path)
    store.append({"loss": 1.0}, config={"a": 1})
    orphan = store.path / "0123456789abcdef-0000.parquet.1234abcd.tmp"
    orphan.write_bytes(b"half a part")
    past = time.time() - 2 * ResultStore.TMP_MAX_AGE_S
    os.utime(orphan, (past, past))
    in_flight = store.path / "fedcba9876543210-0000.parquet.5678abcd.tmp"
    in_flight.write_bytes(b"being written")
    (store.path / "artifacts").mkdir()
    art_orphan = store.path / "artifacts" / "k.pt.1111.tmp"
    art_orphan.write_bytes(b"x")
    os.utime(art_orphan, (past, past))
    assert len(store.load()) == 1
    assert not orphan.exists() and not art_orphan.exists() and in_flight.exists()
    assert store.clean_tmp(max_age_s=0) == [in_flight]


def test_error_parts_do_not_count_as_done(tmp_path):
    store = ResultStore("e", root=tmp_path)
    store.append({"status": "error", "error_type": "RuntimeError"}, config={"a": 1})
    store.append([{"status": "converged"}, {"status": "error"}], config={"a": 2})  # partly failed: a result
    assert any(n.endswith(".error.parquet") for n in _part_names(store))
    assert not store.has({"a": 1}) and store.has({"a": 2})
    assert store.keys() == {config_key({"a": 2})} and store.error_keys() == {config_key({"a": 1})}
    assert store.keys(include_errors=True) == {config_key({"a": 1}), config_key({"a": 2})}
    assert len(store.load()) == 3
    store.append({"status": "ok"}, config={"a": 1})  # the retry succeeds
    assert store.has({"a": 1}) and store.error_keys() == set()
    assert store.load()["status"].tolist() == ["converged", "error", "ok"]
    with pytest.raises(ValueError, match="rows carry key"):
        store.append({"key": "0000000000000000", "x": 1}, config={"a": 1})


def test_compact_keeps_keys_has_and_load(tmp_path):
    store = ResultStore("m", root=tmp_path)
    for i in range(6):
        store.append([{"loss": float(i), "step": s} for s in range(3)], config={"i": i, "lr": 0.1})
    store.append({"loss": 99.0, "extra": "x"}, config={"i": 2, "lr": 0.1})  # newer row-set of i=2
    store.append({"status": "error", "error_type": "ValueError"}, config={"i": 7, "lr": 0.1})
    before = (store.keys(), store.error_keys(), store.load())
    compacted = store.compact()
    assert _part_names(store) == [compacted.name]
    after = (store.keys(), store.error_keys(), store.load())
    assert after[0] == before[0] and after[1] == before[1]
    pd.testing.assert_frame_equal(after[2], before[2])
    assert store.has({"i": 2, "lr": 0.1}) and not store.has({"i": 7, "lr": 0.1})
    # new runs keep adding parts beside the compacted file, and the newest row-set still wins
    store.append({"loss": -1.0}, config={"i": 0, "lr": 0.1})
    store.append({"status": "ok"}, config={"i": 7, "lr": 0.1})
    df = store.load()
    assert df.loc[df["cfg_i"] == 0, "loss"].tolist() == [-1.0] and store.has({"i": 7, "lr": 0.1})
    again = store.load()
    second = store.compact()
    assert _part_names(store) == [second.name]
    pd.testing.assert_frame_equal(store.load(), again)
    assert ResultStore("empty", root=tmp_path).compact() is None


def test_load_mixes_column_types_and_compact_refuses(tmp_path):
    store = ResultStore("x", root=tmp_path)
    store.append({"value": 1}, config={"a": 1})
    store.append({"value": "n/a"}, config={"a": 2})
    assert store.load()["value"].tolist() == [1, "n/a"]
    with pytest.raises(RuntimeError, match="ResultStore.compact: the parts of 'x' do not make one table"):
        store.compact()
    assert len(_part_names(store)) == 2


def test_load_during_a_concurrent_compaction(tmp_path, monkeypatch):
    import warnings

    store = ResultStore("v", root=tmp_path)
    for i in range(3):
        store.append({"loss": float(i)}, config={"i": i})
    expected = store.load()
    stale = store._scan()  # a listing taken just before another process compacts
    store.compact()
    real, calls = store._scan, []

    def scan(only=None):
        calls.append(only)
        return stale if len(calls) == 1 else real(only)

    monkeypatch.setattr(store, "_scan", scan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a vanished part is not "unreadable": no warning, the store lists again
        pd.testing.assert_frame_equal(store.load(), expected)
    assert len(calls) == 2


def test_store_pickles_by_path(tmp_path):
    import pickle

    store = ResultStore("p", root=tmp_path)
    store.append({"x": 1}, config={"a": 1})
    clone = pickle.loads(pickle.dumps(store))
    assert clone.path == store.path and clone.keys() == store.keys()


def test_correlation_matches_scipy_and_bivariate_normal():
    rng = np.random.default_rng(0)
    rho = -0.6
    z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=4000)
    c = correlation(z[:, 0], z[:, 1], "pearson", n_boot=500)
    assert c.r == pytest.approx(stats.pearsonr(z[:, 0], z[:, 1])[0])
    assert c.ci_low < rho < c.ci_high and c.ci_high - c.ci_low < 0.06
    s = correlation(z[:, 0], z[:, 1], "spearman", n_boot=500)
    # Spearman of a bivariate normal: (6/pi) arcsin(rho/2)
    assert s.r == pytest.approx(6 / np.pi * np.arcsin(rho / 2), abs=0.03)
    assert s.ci_low < s.r < s.ci_high


def test_correlation_drops_nonfinite_and_validates():
    c = correlation([1, 2, 3, np.nan, 5], [2, 4, 6, 8, np.inf], "pearson", n_boot=0)
    assert c.n == 3 and c.r == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 3 finite pairs"):
        correlation([1, 2], [1, 2])
    with pytest.raises(ValueError, match="unknown method='kendall'"):
        correlation([1, 2, 3], [1, 2, 3], "kendall")


def test_correlation_table():
    df = pd.DataFrame({"x": np.arange(10.0), "y": np.arange(10.0) ** 2, "g": [0, 1] * 5})
    t = correlation_table(df, "x", ["y"], by="g", n_boot=50)
    assert len(t) == 4 and np.allclose(t.loc[t.method == "spearman", "r"], 1.0)
