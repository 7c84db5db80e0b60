"""Tests of the Boolean prior sampler (flatness.prior.sampling).

Oracles: closed-form Gaussian orthant probabilities for networks without hidden layer, a slow loop over
:class:`flatness.models.FCN` networks drawn one at a time, the FCN forward pass itself (same parameters, float64),
and :func:`flatness.boolean.pack_bits` / ``packed_to_hex`` / ``torch.unique`` for the bookkeeping.
Every statistical test uses a fixed seed and sample size, so it is deterministic.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from flatness.boolean import boolean_inputs, function_to_hex, pack_bits, packed_to_hex
from flatness.models import FCN
from flatness.prior import sampling as S
from flatness.prior.sampling import FunctionCounts, sample_function_counts

P_MIN = 1e-3  # a correct sampler fails a chi-square test at this level with probability 1e-3 (fixed seeds)


def _chi2_gof(fc: FunctionCounts, probs: dict[str, float]) -> float:
    """p-value of a chi-square goodness-of-fit test of the sampled counts against exact probabilities."""
    keys = [h for h, p in probs.items() if p > 0]
    obs = np.array([fc.counts_of(h) for h in keys], dtype=float)
    exp = np.array([probs[h] for h in keys]) * fc.n_samples
    assert obs.sum() == fc.n_samples, "a function of probability 0 was sampled"
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def _chi2_two_sample(a: FunctionCounts, b: FunctionCounts, min_expected: float = 5.0) -> float:
    """p-value of a chi-square homogeneity test; rare functions are pooled into one category."""
    t = pd.concat([a.table.set_index("function")["count"].rename("a"),
                   b.table.set_index("function")["count"].rename("b")], axis=1).fillna(0)
    frac_b = b.n_samples / (a.n_samples + b.n_samples)
    rare = (t["a"] + t["b"]) * min(frac_b, 1 - frac_b) < min_expected
    table = pd.concat([t[~rare], t[rare].sum().to_frame().T]).to_numpy()
    table = table[table.sum(1) > 0]
    return stats.chi2_contingency(table.T, correction=False).pvalue


# ---------------------------------------------------------------------------------------------------------
# exact probabilities (networks with no hidden layer: the outputs are jointly Gaussian)
# ---------------------------------------------------------------------------------------------------------


def _orthant3(C: np.ndarray, signs) -> float:
    """P(s_i X_i > 0, i = 1..3) for X ~ N(0, C): 1/8 + sum_{i<j} asin(s_i s_j rho_ij) / (4 pi) (also singular C)."""
    d = np.sqrt(np.diag(C))
    R = C / np.outer(d, d)
    return 1 / 8 + sum(math.asin(signs[i] * signs[j] * R[i, j]) for i, j in ((0, 1), (0, 2), (1, 2))) / (4 * math.pi)


def _exact_probs_n2(sigma_w: float, sigma_b: float) -> dict[str, float]:
    """Exact P(f) for widths (2, 1): outputs o_x = sigma_b zeta + sigma_w / sqrt(2) z.x on x in {0,1}^2.

    The 4 outputs have rank 3 (o_11 = o_01 + o_10 - o_00). Marginalising one output gives a trivariate orthant
    probability: p(s) + p(s with bit i flipped) = P3(s without i), 32 edge equations on the 4-cube whose
    kernel (+-1 by parity) is removed by p(XOR) = 0 (not linearly separable).
    """
    X = boolean_inputs(2, dtype=torch.float64).numpy()
    C = sigma_b**2 + sigma_w**2 / 2 * X @ X.T
    patterns = list(itertools.product((0, 1), repeat=4))
    col = {p: k for k, p in enumerate(patterns)}
    rows, rhs = [], []
    for i in range(4):
        others = [j for j in range(4) if j != i]
        for t in itertools.product((0, 1), repeat=3):
            row = np.zeros(16)
            for bit in (0, 1):
                p = list(t)
                p.insert(i, bit)
                row[col[tuple(p)]] = 1
            rows.append(row)
            rhs.append(_orthant3(C[np.ix_(others, others)], [2 * b - 1 for b in t]))
    for p in ((0, 1, 1, 0), (1, 0, 0, 1)):
        row = np.zeros(16)
        row[col[p]] = 1
        rows.append(row)
        rhs.append(0.0)
    A, y = np.array(rows), np.array(rhs)
    p, *_ = np.linalg.lstsq(A, y, rcond=None)
    assert np.abs(A @ p - y).max() < 1e-12, "orthant equations inconsistent: the oracle itself is wrong"
    return {function_to_hex(list(pat)): max(float(v), 0.0) for pat, v in zip(patterns, p)}


@pytest.mark.parametrize("sigma_w,sigma_b", [(math.sqrt(2), 1.0), (1.0, 2.0)])
def test_single_input_matches_bivariate_orthant(sigma_w, sigma_b):
    # widths (1, 1): o_0 = sigma_b zeta, o_1 = sigma_w z + sigma_b zeta, correlation sigma_b / sqrt(sw^2 + sb^2)
    rho = sigma_b / math.hypot(sigma_w, sigma_b)
    same = 0.25 + math.asin(rho) / (2 * math.pi)
    probs = {"0": same, "3": same, "1": 0.5 - same, "2": 0.5 - same}
    fc = sample_function_counts((1, 1), 200_000, sigma_w, sigma_b, seed=1, progress=False)
    assert _chi2_gof(fc, probs) > P_MIN
    np.testing.assert_allclose(fc.frequencies["3"], same, atol=5 * math.sqrt(same / fc.n_samples))


@pytest.mark.parametrize("sigma_w,sigma_b", [(math.sqrt(2), 1.0), (1.0, 0.3)])
def test_two_inputs_match_orthant_probabilities(sigma_w, sigma_b):
    probs = _exact_probs_n2(sigma_w, sigma_b)
    assert abs(sum(probs.values()) - 1) < 1e-12
    fc = sample_function_counts((2, 1), 300_000, sigma_w, sigma_b, seed=2, progress=False)
    assert fc.counts_of("6") == 0 and fc.counts_of("9") == 0, "XOR/XNOR are not linearly separable"
    assert _chi2_gof(fc, probs) > P_MIN


def test_orthant_oracle_detects_wrong_scales():
    # power check: the same test rejects samples drawn with another sigma_b / sigma_w ratio
    probs = _exact_probs_n2(math.sqrt(2), 1.0)
    fc = sample_function_counts((2, 1), 300_000, math.sqrt(2), 0.7, seed=2, progress=False)
    assert _chi2_gof(fc, probs) < 1e-6


# ---------------------------------------------------------------------------------------------------------
# against FCN networks drawn one at a time
# ---------------------------------------------------------------------------------------------------------


def _reference_counts(widths, sigma_w, sigma_b, n_nets, seed0) -> FunctionCounts:
    """The slow oracle: flatness.models.FCN re-drawn with seeds seed0, seed0+1, ...; output > 0 on all inputs."""
    net = FCN(widths, sigma_w, sigma_b, seed=0)
    x = boolean_inputs(widths[0])
    counts: dict[str, int] = {}
    with torch.no_grad():
        for i in range(n_nets):
            net.reset_parameters(seed=seed0 + i)
            h = function_to_hex((net(x).reshape(-1) > 0).long())
            counts[h] = counts.get(h, 0) + 1
    table = pd.DataFrame({"function": list(counts), "count": list(counts.values())})
    return FunctionCounts(table, n_nets, widths[0], widths, sigma_w, sigma_b, seed=10**6)


@pytest.mark.parametrize("sigma_w,sigma_b", [(math.sqrt(2), 1.0), (1.0, 0.5)])
def test_matches_fcn_loop(sigma_w, sigma_b):
    widths = (3, 6, 5, 1)  # two hidden layers: exercises r_1, r_2, r_3 of the rescaled forward pass
    ref = _reference_counts(widths, sigma_w, sigma_b, 12_000, seed0=1000)
    fc = sample_function_counts(widths, 200_000, sigma_w, sigma_b, seed=3, progress=False)
    assert _chi2_two_sample(fc, ref) > P_MIN


def test_fcn_loop_comparison_has_power():
    ref = _reference_counts((3, 6, 5, 1), math.sqrt(2), 0.5, 12_000, seed0=1000)
    fc = sample_function_counts((3, 6, 5, 1), 200_000, math.sqrt(2), 1.0, seed=3, progress=False)
    assert _chi2_two_sample(fc, ref) < 1e-6


@pytest.mark.parametrize("widths", [(7, 40, 40, 1), (3, 1), (5, 8, 1)])
def test_rescaled_forward_equals_fcn_forward(widths):
    """Same parameters, float64: the batched rescaled pass gives FCN's thresholded outputs and hex strings."""
    sigma_w, sigma_b, m = 1.3, 0.7, 20
    n = widths[0]
    n_params, _ = S._layout(widths)
    buf = torch.empty(m * n_params, dtype=torch.float64)
    views, bias = S._param_views(buf, m, widths)
    nets = [FCN(widths, sigma_w, sigma_b, seed=i).double() for i in range(m)]
    for i, net in enumerate(nets):  # standard normals Z = W sqrt(fan_in) / sigma_w, zeta = b / sigma_b
        for (z, b), layer in zip(views, net.linear_layers()):
            z[i] = layer.weight.detach() * math.sqrt(layer.in_features) / sigma_w
            b[i, :, 0] = layer.bias.detach() / sigma_b
    bias.mul_(S._bias_vector(widths, S._bias_scales(widths, sigma_w, sigma_b), torch.float64, "cpu"))
    N = 2**n
    xT = boolean_inputs(n, dtype=torch.float64).T.contiguous()
    hidden = [torch.empty(m, w, N, dtype=torch.float64) for w in widths[1:-1]]
    bits = torch.empty(m, N, dtype=torch.bool)
    S._forward_signs(views, xT, hidden, torch.empty(m, 1, N, dtype=torch.float64), bits)
    with torch.no_grad():
        expected = torch.stack([net(boolean_inputs(n, dtype=torch.float64)).reshape(-1) > 0 for net in nets])
    assert torch.equal(bits, expected)
    got = S._keys_to_hex(S._pack_rows(bits).numpy(), n)
    assert got == [function_to_hex(e.long()) for e in expected]


# ---------------------------------------------------------------------------------------------------------
# bookkeeping helpers against the package's reference implementations
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 9])
def test_pack_rows_and_hex_match_boolean_module(n):
    g = torch.Generator().manual_seed(n)
    bits = torch.rand(300, 2**n, generator=g) < 0.5
    bits[0] = True  # bit 63 set: negative int64 words
    packed = S._pack_rows(bits)
    assert torch.equal(packed, pack_bits(bits))
    assert S._keys_to_hex(packed.numpy(), n) == packed_to_hex(packed, n)


def test_keys_to_hex_across_blocks():
    keys = torch.randint(-2**63, 2**63 - 1, (2**16 + 5, 2), generator=torch.Generator().manual_seed(1))
    assert S._keys_to_hex(keys.numpy(), 7) == packed_to_hex(keys, 7)


@pytest.mark.parametrize("n_words", [1, 2, 3])
def test_unique_rows_matches_torch_unique(n_words):
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(-3, 3, (2000, n_words), generator=g)
    keys[::7, 0] = torch.iinfo(torch.int64).min
    expect_keys, expect_counts = torch.unique(keys, dim=0, return_counts=True)
    got_keys, got_counts = S._unique_rows(keys)
    order = np.lexsort(got_keys.numpy().T[::-1])  # both lexicographic; compare as sets of rows
    assert torch.equal(got_keys[order], expect_keys) and torch.equal(got_counts[order], expect_counts)
    w = torch.randint(1, 5, (2000,), generator=g)
    _, wc = S._unique_rows(keys, w)
    _, inv = torch.unique(keys, dim=0, return_inverse=True)
    assert torch.equal(wc[order], torch.zeros(len(expect_keys), dtype=torch.int64).index_add_(0, inv, w))


# ---------------------------------------------------------------------------------------------------------
# the sampler's contract
# ---------------------------------------------------------------------------------------------------------


def test_counts_sum_reproducible_and_worker_independent():
    kw = dict(widths=(3, 6, 5, 1), n_samples=5_001, chunk=64, progress=False)
    a = sample_function_counts(seed=4, n_workers=1, **kw)
    b = sample_function_counts(seed=4, n_workers=3, **kw)
    c = sample_function_counts(seed=5, n_workers=2, **kw)
    assert int(a.table["count"].sum()) == 5_001 and a.n_samples == 5_001
    assert a.table.equals(b.table), "the sample must not depend on the number of worker threads"
    assert not a.table.equals(c.table)
    assert a.seed == 4 and a.widths == (3, 6, 5, 1) and a.n == 3


def test_chunk_size_changes_stream_not_distribution():
    kw = dict(widths=(3, 6, 5, 1), n_samples=100_000, progress=False)
    a = sample_function_counts(seed=6, chunk=64, **kw)
    b = sample_function_counts(seed=7, chunk=1000, **kw)
    assert a.n_samples == b.n_samples == int(b.table["count"].sum())
    assert _chi2_two_sample(a, b) > P_MIN


def test_buffer_merges_are_exact(monkeypatch):
    kw = dict(widths=(4, 5, 1), n_samples=20_000, seed=8, chunk=50, progress=False, n_workers=2)
    ref = sample_function_counts(**kw)
    monkeypatch.setattr(S, "_BITS_BYTES", {"cpu": 16 * 120})  # pack every 120 networks
    monkeypatch.setattr(S, "_MERGE_ROWS", {"cpu": 7})  # merge every pack while the table is small
    many = sample_function_counts(**kw)
    assert many.table.equals(ref.table)


def test_restores_thread_count():
    before = torch.get_num_threads()
    sample_function_counts((2, 3, 1), 1000, progress=False, n_workers=2)
    assert torch.get_num_threads() == before


def test_constant_functions_most_frequent_n7():
    fc = sample_function_counts((7, 40, 40, 1), 20_000, seed=9, progress=False)
    assert set(fc.top(2)["function"]) == {"0" * 32, "f" * 32}
    assert fc.top(2)["count"].min() > 10 * fc.table["count"].iloc[2]


def test_zero_bias_gives_zero_on_origin_and_ignores_sigma_w():
    # sigma_b = 0: the input 0...0 has output exactly 0, so bit 0 is 0; all r_l = 0, so sigma_w drops out
    a = sample_function_counts((4, 6, 1), 5000, sigma_w=1.0, sigma_b=0.0, seed=10, progress=False)
    b = sample_function_counts((4, 6, 1), 5000, sigma_w=3.0, sigma_b=0.0, seed=10, progress=False)
    assert a.table.equals(b.table)
    assert all(int(h[0], 16) < 8 for h in a.table["function"])


def test_sigma_ratio_matters_only_without_hidden_layers():
    # widths (n, 1): (sigma_w, sigma_b) and (2 sigma_w, 2 sigma_b) give the same r_1, hence the same sample
    a = sample_function_counts((3, 1), 5000, 1.0, 0.5, seed=11, progress=False)
    b = sample_function_counts((3, 1), 5000, 2.0, 1.0, seed=11, progress=False)
    assert a.table.equals(b.table)
    # with hidden layers scaling both by 4 shrinks r_2 by 4 and r_3 by 16: a different prior
    c = sample_function_counts((3, 6, 5, 1), 100_000, 1.0, 1.0, seed=12, progress=False)
    d = sample_function_counts((3, 6, 5, 1), 100_000, 4.0, 4.0, seed=13, progress=False)
    assert _chi2_two_sample(c, d) < 1e-6


def test_float64_agrees_with_float32():
    kw = dict(widths=(3, 6, 5, 1), n_samples=3000, seed=14, chunk=100, progress=False)
    a = sample_function_counts(**kw)
    b = sample_function_counts(dtype=torch.float64, **kw)
    # float64 normals come from the generator differently (another stream): compare distributions
    assert a.n_samples == b.n_samples
    assert _chi2_two_sample(a, b) > P_MIN


# ---------------------------------------------------------------------------------------------------------
# FunctionCounts
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fc3():
    return sample_function_counts((3, 6, 5, 1), 20_000, seed=15, progress=False)


def test_log_prior_lookups(fc3):
    top = fc3.table.iloc[0]
    h, c = top["function"], int(top["count"])
    expected = math.log(c / fc3.n_samples)
    assert fc3.log_prior(h) == pytest.approx(expected, rel=1e-12)
    assert fc3.log_prior(h.upper()) == pytest.approx(expected, rel=1e-12)
    y = [int(b) for b in format(int(h, 16), "08b")]
    assert fc3.log_prior(y) == pytest.approx(expected, rel=1e-12)
    assert fc3.log_prior(torch.tensor(y)) == pytest.approx(expected, rel=1e-12)
    assert fc3.log10_prior(h) == pytest.approx(expected / math.log(10), rel=1e-12)
    unseen = next(f"{v:02x}" for v in range(256) if fc3.counts_of(f"{v:02x}") == 0)
    assert fc3.log_prior(unseen) == -math.inf
    many = fc3.log_prior([h, unseen])
    assert many[0] == pytest.approx(expected) and many[1] == -math.inf
    assert np.array_equal(fc3.log_prior(np.array([h, unseen])), many)
    arr = fc3.log_prior(np.array([y, y]))
    assert arr.shape == (2,) and np.allclose(arr, expected)
    assert fc3.unseen_log_prior_bound(0.95) == pytest.approx(math.log(1 - 0.05 ** (1 / fc3.n_samples)))
    assert np.isclose(fc3.frequencies.sum(), 1.0)
    top3 = fc3.top(3)
    assert list(top3.columns) == ["function", "count", "frequency", "log10_prior"] and len(top3) == 3
    assert top3["count"].is_monotonic_decreasing


def test_log_prior_rejects_bad_functions(fc3):
    with pytest.raises(ValueError, match="hex"):
        fc3.log_prior("abc")
    with pytest.raises(ValueError, match="hex"):
        fc3.log_prior("zz")
    with pytest.raises(ValueError, match="0/1"):
        fc3.log_prior([0, 2, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="expected"):
        fc3.log_prior([0, 1, 0])
    with pytest.raises(ValueError, match="k=0"):
        fc3.top(0)


def test_merge_and_save_load(fc3, tmp_path):
    other = sample_function_counts((3, 6, 5, 1), 7_000, seed=16, progress=False)
    merged = fc3 + other
    assert merged.n_samples == 27_000 and merged.seed == (15, 16) and len(merged.runs) == 2
    for h in fc3.table["function"].head(20):
        assert merged.counts_of(h) == fc3.counts_of(h) + other.counts_of(h)
    assert int(merged.table["count"].sum()) == 27_000
    with pytest.raises(ValueError, match="seed"):
        merged.merge(other)
    with pytest.raises(ValueError, match="configurations differ"):
        fc3.merge(sample_function_counts((3, 6, 5, 1), 100, sigma_b=0.5, seed=17, progress=False))
    path = tmp_path / "counts.parquet"
    merged.save(path)
    back = FunctionCounts.load(path)
    assert back.table.equals(merged.table)
    assert (back.n_samples, back.n, back.widths, back.sigma_w, back.sigma_b, back.seed) == (
        merged.n_samples, merged.n, merged.widths, merged.sigma_w, merged.sigma_b, merged.seed)
    fc3.save(tmp_path / "one.parquet")
    assert FunctionCounts.load(tmp_path / "one.parquet").seed == 15


def test_function_counts_validates_table():
    with pytest.raises(ValueError, match="sum to 3"):
        FunctionCounts(pd.DataFrame({"function": ["0"], "count": [3]}), 4, 1, (1, 1), 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="end with 1"):
        FunctionCounts(pd.DataFrame({"function": ["0"], "count": [3]}), 3, 1, (1, 2), 1.0, 1.0, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(widths=(7, 40, 40, 2)), "must end in 1"),
    (dict(widths=(7,)), "at least an input and an output"),
    (dict(widths=(7, 0, 1)), r"widths\[1\]=0"),
    (dict(widths=(21, 1)), "exceeds the maximum 20"),
    (dict(n_samples=0), "n_samples=0 must be >= 1"),
    (dict(sigma_w=0.0), "sigma_w"),
    (dict(sigma_b=-1.0), "sigma_b"),
    (dict(seed=-1), "seed=-1"),
    (dict(seed=2**26), "seed=67108864 exceeds"),
    (dict(chunk=0), "chunk=0"),
    (dict(n_workers=0), "n_workers=0"),
    (dict(dtype=torch.bfloat16), "dtype"),
])
def test_bad_input_raises(kwargs, match):
    args = dict(widths=(3, 4, 1), n_samples=10, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        sample_function_counts(**args)


def test_bad_types_raise():
    with pytest.raises(TypeError, match="widths"):
        sample_function_counts(7, 10, progress=False)
    with pytest.raises(TypeError, match="n_samples"):
        sample_function_counts((3, 1), 10.5, progress=False)
