"""EP for log P(f): Heaviside (Gaussian orthant probabilities) and probit likelihoods.

Oracles: closed-form orthant probabilities (n = 1, 2, 3), scipy's Genz integration of the multivariate
normal CDF (n <= 15), one-dimensional quadrature for equicorrelated kernels (any n), 2-d quadrature of
the probit integral, truncated-normal moments (scipy.stats.truncnorm), mpmath for the Mills-ratio terms,
and GPy's EP (when installed).

Measured EP error (the approximation itself, not convergence; tolerances below are set from these):
- Heaviside, n = 2: exact when rho = 0; otherwise log P_EP <= log P, e.g. rho = 0.3: 2.5e-4 relative,
  rho = 0.9 same signs: 3.6%, rho = 0.99 same signs: 11%; opposite signs stay within 0.005 nats up to
  rho = 1 - 1e-12.
- Heaviside, arc-cosine kernel on Boolean inputs, n = 5..20: random labels 0.01-1.0% of log P;
  near-constant functions (log P ~ -1.2, the likeliest ones) 8-14% of log P, i.e. < 0.2 nats.
- Heaviside, equicorrelated n = 300..2000 with mixed labels: < 1e-5 relative; all labels equal: ~12%.
- Probit: < 3% of log P (< 0.06 nats) on all of the above; GPy's EP agrees to ~1e-8 relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flatness.models import FCN
from flatness.prior.ep import EPResult, _inv_mills_terms, _site_updates, _tri_inv_lower, log_prior_ep, to_log10
from flatness.prior.gp import log_prior
from flatness.prior.kernels import ArcCosineNNGPKernel, arccos_kernel

F64 = torch.float64


def _orthant_exact_2(rho: float) -> float:
    return 0.25 + math.asin(rho) / (2 * math.pi)


def _equicorrelated(n: int, rho: float) -> torch.Tensor:
    return (1 - rho) * torch.eye(n, dtype=F64) + rho


def _equicorrelated_log_orthant(n: int, rho: float, n_pos: int) -> float:
    """log P(sign g = y), g = sqrt(rho) z + sqrt(1 - rho) e: a 1-d integral over z, done in log space."""
    from scipy import special, stats

    a = math.sqrt(rho / (1 - rho))
    z = np.linspace(-40, 40, 400_001)
    lf = stats.norm.logpdf(z) + n_pos * special.log_ndtr(a * z) + (n - n_pos) * special.log_ndtr(-a * z)
    m = lf.max()
    return float(m + math.log(np.trapezoid(np.exp(lf - m), z)))


def _boolean_kernel(n: int, seed: int) -> torch.Tensor:
    from flatness.boolean import boolean_inputs

    idx = np.random.default_rng(seed).choice(128, n, replace=False)
    return arccos_kernel(boolean_inputs(7).double()[idx], n_hidden=2, device="cpu")


# ------------------------------------------------------------------------------------ Heaviside


def test_n1_is_one_half_for_any_variance():
    for k in (1e-6, 1.0, 3e4):
        for y in (0, 1):
            res = log_prior_ep(torch.tensor([[k]], dtype=F64), torch.tensor([y]))
            assert abs(res.log_prob - math.log(0.5)) < 1e-12, res
            assert res.converged and res.jitter == 0.0


@pytest.mark.parametrize("rho", [0.0, 0.3, -0.5, 0.9])
@pytest.mark.parametrize("y", [(1, 1), (1, -1), (0, 0)])
def test_n2_closed_form(rho, y):
    K = torch.tensor([[2.0, 2.0 * rho], [2.0 * rho, 2.0]], dtype=F64)  # variance 2: P depends on rho only
    res = log_prior_ep(K, torch.tensor(y))
    s = rho * y[0] * y[1] if y != (0, 0) else rho
    exact = math.log(_orthant_exact_2(s))
    # EP is exact for rho = 0; measured relative error 2.5e-4 (|rho| = 0.3), 0.4% (0.5), 3.6% (0.9)
    bound = 1e-10 if rho == 0 else 0.05 * abs(exact)
    assert abs(res.log_prob - exact) <= bound, (res.log_prob, exact)
    assert res.converged


def test_n3_closed_form_with_sign_patterns():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=g, dtype=F64)
    K = a @ a.T + 0.5 * torch.eye(3, dtype=F64)
    d = K.diagonal().sqrt()
    C = K / d[:, None] / d[None, :]
    for bits in range(8):
        y = torch.tensor([1.0 if bits >> i & 1 else -1.0 for i in range(3)], dtype=F64)
        cs = C * y[:, None] * y[None, :]  # flip rows/cols by the labels
        exact = 1 / 8 + sum(math.asin(cs[i, j]) / (4 * math.pi) for i in range(3) for j in range(i + 1, 3))
        res = log_prior_ep(K, y)
        assert abs(res.log_prob - math.log(exact)) <= 0.05 * abs(math.log(exact)), (bits, res.log_prob, exact)


@pytest.mark.parametrize("n,seed", [(5, 0), (10, 1), (15, 2), (20, 3)])
def test_vs_genz_multivariate_normal_cdf(n, seed):
    from scipy.stats import multivariate_normal

    K = _boolean_kernel(n, seed)
    rng = np.random.default_rng(seed)
    L = torch.linalg.cholesky(K)
    labels = {"random": torch.from_numpy(rng.choice([-1.0, 1.0], n)),
              "gp sample": torch.sign(L @ torch.from_numpy(rng.standard_normal(n)))}
    for kind, y in labels.items():
        cov = (K * y[:, None] * y[None, :]).numpy()  # P(y g > 0) = P(y g < 0) = CDF of N(0, D K D) at 0
        p = multivariate_normal.cdf(np.zeros(n), mean=np.zeros(n), cov=cov, abseps=1e-10, releps=1e-5,
                                    maxpts=200_000, rng=np.random.default_rng(1))
        exact = math.log(p)
        ep = log_prior_ep(K, y)
        # measured: random labels <= 1% of log P, likely (near-constant) functions <= 14% and < 0.2 nats
        assert abs(ep.log_prob - exact) <= max(0.02 * abs(exact), 0.2), (kind, ep.log_prob, exact)
        assert ep.converged


@pytest.mark.parametrize("n,rho,frac", [(300, 0.9, 0.5), (1000, 0.99, 0.3), (40, 0.9, 1.0)])
def test_equicorrelated_vs_quadrature(n, rho, frac):
    n_pos = int(frac * n)
    y = torch.tensor([1] * n_pos + [0] * (n - n_pos))
    exact = _equicorrelated_log_orthant(n, rho, n_pos)
    res = log_prior_ep(_equicorrelated(n, rho), y)
    assert res.converged
    if frac < 1:  # mixed labels: measured < 1e-5 relative
        assert abs(res.log_prob - exact) <= 1e-4 * abs(exact), (res.log_prob, exact)
    else:  # all labels equal, strongly correlated: EP's known bias, measured 12%; needs adaptive damping
        assert abs(res.log_prob - exact) <= 0.2 * abs(exact), (res.log_prob, exact)
        assert res.damping > 0


def test_extreme_log_prob_stays_finite_and_accurate():
    """500 near-duplicate pairs (rho = 1 - 1e-10) with opposite labels, shuffled: log P ~ -6500."""
    rho = 1 - 1e-10
    blk = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=F64)
    n_pairs = 500
    perm = torch.randperm(2 * n_pairs, generator=torch.Generator().manual_seed(0))
    K = torch.block_diag(*([blk] * n_pairs))[perm][:, perm]
    y = torch.tensor([1, -1] * n_pairs)[perm]
    exact = n_pairs * math.log(0.25 - math.asin(rho) / (2 * math.pi))
    res = log_prior_ep(K, y)
    assert res.converged and math.isfinite(res.log_prob)
    assert abs(res.log_prob - exact) <= 1e-3 * abs(exact), (res.log_prob, exact)  # measured 3e-4


def test_parallel_sequential_and_damping_reach_the_same_fixed_point():
    K = _boolean_kernel(30, 3)
    y = torch.from_numpy(np.random.default_rng(3).choice([0, 1], 30))
    for lik in ("heaviside", "probit"):
        ref = log_prior_ep(K, y, likelihood=lik, tol=1e-10).log_prob
        for kw in ({"schedule": "sequential"}, {"damping": 0.5}, {"damping": 0.3, "adaptive_damping": False}):
            res = log_prior_ep(K, y, likelihood=lik, tol=1e-10, **kw)
            assert abs(res.log_prob - ref) <= 1e-7 * abs(ref), (lik, kw, res.log_prob, ref)


def test_oscillating_parallel_ep_is_rescued_by_adaptive_damping():
    K = _equicorrelated(20, 0.99)
    y = torch.ones(20)
    plain = log_prior_ep(K, y, adaptive_damping=False, max_iter=60)
    assert not plain.converged  # undamped parallel EP is caught in a 2-cycle here
    res = log_prior_ep(K, y, max_iter=200)
    seq = log_prior_ep(K, y, schedule="sequential")
    assert res.converged and res.damping > 0
    assert abs(res.log_prob - seq.log_prob) < 1e-4


# ------------------------------------------------------------------------------------ probit


def test_probit_n1_n2_vs_quadrature_and_closed_form():
    from scipy import integrate, stats

    # n = 1: int N(f; 0, k) Phi(f) df = Phi(0) = 1/2 for any k
    assert abs(log_prior_ep(torch.tensor([[5.0]], dtype=F64), [1], likelihood="probit").log_prob
               - math.log(0.5)) < 1e-12
    # n = 2: P = P(y1 (f1 + e1) > 0, y2 (f2 + e2) > 0) = orthant probability of K + I (closed form),
    # checked also by 2-d quadrature of the defining integral.
    K = torch.tensor([[1.5, 0.9], [0.9, 2.0]], dtype=F64)
    cov = K.numpy()
    for y in ((1, 1), (1, -1)):
        rho = y[0] * y[1] * 0.9 / math.sqrt(2.5 * 3.0)
        closed = math.log(_orthant_exact_2(rho))
        prec = np.linalg.inv(cov)
        norm = 1 / (2 * math.pi * math.sqrt(np.linalg.det(cov)))

        def integrand(f2, f1):
            quad_form = prec[0, 0] * f1 * f1 + 2 * prec[0, 1] * f1 * f2 + prec[1, 1] * f2 * f2
            return norm * math.exp(-0.5 * quad_form) * stats.norm.cdf(y[0] * f1) * stats.norm.cdf(y[1] * f2)

        quad = integrate.dblquad(integrand, -10, 10, -10, 10, epsabs=1e-10)[0]
        assert abs(math.log(quad) - closed) < 1e-7
        res = log_prior_ep(K, torch.tensor(y), likelihood="probit")
        assert abs(res.log_prob - closed) <= 0.005 * abs(closed), (res.log_prob, closed)  # measured 1e-4


@pytest.mark.parametrize("n,seed", [(10, 4), (15, 5)])
def test_probit_vs_genz_on_k_plus_identity(n, seed):
    from scipy.stats import multivariate_normal

    K = _boolean_kernel(n, seed)
    y = torch.from_numpy(np.random.default_rng(seed).choice([-1.0, 1.0], n))
    cov = ((K + torch.eye(n, dtype=F64)) * y[:, None] * y[None, :]).numpy()
    exact = math.log(multivariate_normal.cdf(np.zeros(n), mean=np.zeros(n), cov=cov, abseps=1e-10, releps=1e-5,
                                             maxpts=200_000, rng=np.random.default_rng(1)))
    res = log_prior_ep(K, y, likelihood="probit")
    assert abs(res.log_prob - exact) <= 0.03 * abs(exact), (res.log_prob, exact)


def test_probit_matches_gpy():
    GPy = pytest.importorskip("GPy")
    g = torch.Generator().manual_seed(0)
    K = _boolean_kernel(80, 7)
    for y in ((torch.rand(80, generator=g) > 0.5).long(),
              (torch.linalg.cholesky(K) @ torch.randn(80, generator=g, dtype=F64) > 0).long()):
        model = GPy.core.GP(np.arange(80, dtype=float)[:, None], y.numpy().astype(float)[:, None],
                            kernel=GPy.kern.Fixed(1, K.numpy()), likelihood=GPy.likelihoods.Bernoulli(),
                            inference_method=GPy.inference.latent_function_inference.EP(parallel_updates=True))
        ref = float(model.log_likelihood())
        res = log_prior_ep(K, y, likelihood="probit")
        # brief: within 0.5%; measured ~1e-8 (GPy's own stopping rule is the looser one)
        assert abs(res.log_prob - ref) <= 1e-5 * abs(ref), (res.log_prob, ref)


# ------------------------------------------------------------------------------------ numerics


def test_site_moments_match_truncated_normal():
    """Heaviside tilted distribution = cavity truncated to y f > 0 (scipy truncnorm), also deep in the tail."""
    from scipy.stats import truncnorm

    mu_c = torch.tensor([0.3, -2.0, -9.0, 4.0, -30.0], dtype=F64)
    var_c = torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0], dtype=F64)
    for yv in (1.0, -1.0):
        y = torch.full_like(mu_c, yv)
        log_z, tau_new, nu_new = _site_updates(y, 1 / var_c, mu_c, noise=0.0)
        var_hat = 1 / (1 / var_c + tau_new)
        mu_hat = var_hat * (mu_c / var_c + nu_new)
        for i in range(len(mu_c)):
            m, s = float(mu_c[i]), math.sqrt(float(var_c[i]))
            a, b = ((0 - m) / s, math.inf) if yv > 0 else (-math.inf, (0 - m) / s)
            tn = truncnorm(a, b, loc=m, scale=s)
            assert abs(float(mu_hat[i]) - tn.mean()) <= 1e-8 * max(1.0, abs(tn.mean()))
            assert abs(float(var_hat[i]) - tn.var()) <= 1e-6 * tn.var()
            from scipy.special import log_ndtr

            assert abs(float(log_z[i]) - log_ndtr(yv * m / s)) <= 1e-12 * max(1.0, abs(log_ndtr(yv * m / s)))


def test_inverse_mills_terms_vs_mpmath():
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    z = torch.tensor([-1e6, -1e3, -40.0, -6.0, -5.0, -4.9, -1.0, 0.0, 3.0, 8.0, 30.0], dtype=F64)
    r, zr, q, omq = _inv_mills_terms(z)
    for i, zi in enumerate(z.tolist()):
        zz = mp.mpf(zi)
        rr = mp.npdf(zz) / mp.ncdf(zz)
        for got, want in ((r[i], rr), (zr[i], zz + rr), (q[i], rr * (zz + rr)), (omq[i], 1 - rr * (zz + rr))):
            assert abs(float(got) - float(want)) <= 1e-11 * abs(float(want)), (zi, float(got), float(want))


def test_triangular_inverse():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(700, 700, generator=g, dtype=F64)
    L = torch.linalg.cholesky(a @ a.T / 700 + torch.eye(700, dtype=F64))
    inv = _tri_inv_lower(L, base=64)
    torch.testing.assert_close(inv @ L, torch.eye(700, dtype=F64), rtol=0, atol=1e-12)
    assert torch.equal(inv.triu(1), torch.zeros_like(inv))


def test_jitter_only_when_needed():
    K = _boolean_kernel(12, 6)
    y = torch.from_numpy(np.random.default_rng(6).choice([0, 1], 12))
    assert log_prior_ep(K, y).jitter == 0.0
    # duplicate an input: K is singular (PSD) and gets the smallest jitter of the ladder, reported as added.
    idx = torch.cat([torch.arange(12), torch.tensor([0])])
    k_dup = K[idx][:, idx]
    res = log_prior_ep(k_dup, y[idx])
    assert 0.0 < res.jitter <= 1e-6 * float(K.diagonal().mean())
    same = log_prior_ep(k_dup + res.jitter * torch.eye(13, dtype=F64), y[idx], check_psd=False)
    assert abs(res.log_prob - same.log_prob) < 1e-12
    # the exact P is that of the 12 points (a duplicate with the same label adds nothing); EP counts the
    # repeated constraint partly twice: measured 0.15 nats lower here.
    assert -0.25 < res.log_prob - log_prior_ep(K, y).log_prob < 0


# ------------------------------------------------------------------------------------ API


def test_log_prior_convenience_and_log10():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(20, 7, generator=g) > 0.5).float()
    model = FCN((7, 40, 40, 1), seed=0)
    y = (torch.rand(20, generator=g) > 0.5).long()
    want = log_prior_ep(arccos_kernel(x, n_hidden=2, device="cpu"), y)
    for spec in (model, ArcCosineNNGPKernel(n_hidden=2), arccos_kernel(x, n_hidden=2, device="cpu")):
        res = log_prior(spec, x, y, device="cpu")
        assert isinstance(res, EPResult)
        assert abs(res.log_prob - want.log_prob) < 1e-10
    # y=None with an FCN: the network's own labels 1{f(x) > 0}; the model's mode is restored
    model.train()
    res = log_prior(model, x, device="cpu")
    with torch.no_grad():
        own = (model(x)[:, 0] > 0).long()
    assert model.training
    assert abs(res.log_prob - log_prior_ep(arccos_kernel(x, n_hidden=2, device="cpu"), own).log_prob) < 1e-10
    assert abs(to_log10(res) - res.log_prob / math.log(10)) < 1e-12
    assert abs(to_log10(-math.log(10.0)) + 1.0) < 1e-15
    assert float(res) == res.log_prob


def test_bad_input():
    K = torch.eye(3, dtype=F64)
    y = torch.tensor([1, 0, 1])
    with pytest.raises(ValueError, match="K is not positive semi-definite"):
        log_prior_ep(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), [1, 1])
    with pytest.raises(ValueError, match="K holds 1 non-finite"):
        log_prior_ep(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), [1, 1])
    with pytest.raises(ValueError, match=r"y holds the values \[0, 2\]"):
        log_prior_ep(K, torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match=r"y holds the values \[-1, 0, 1\]"):
        log_prior_ep(K, torch.tensor([-1, 0, 1]))
    with pytest.raises(ValueError, match=r"first dimensions differ \(K: 3, y: 2\)"):
        log_prior_ep(K, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"K has shape \(3, 2\)"):
        log_prior_ep(torch.ones(3, 2), y)
    with pytest.raises(ValueError, match="K is not symmetric"):
        log_prior_ep(torch.tensor([[1.0, 0.5], [0.0, 1.0]]), [1, 1])
    with pytest.raises(ValueError, match=r"K\[1,1\] = 0"):
        log_prior_ep(torch.diag(torch.tensor([1.0, 0.0])), [1, 1])
    with pytest.raises(ValueError, match="unknown likelihood='logit'"):
        log_prior_ep(K, y, likelihood="logit")
    with pytest.raises(ValueError, match="unknown schedule"):
        log_prior_ep(K, y, schedule="random")
    with pytest.raises(ValueError, match="damping=1.0"):
        log_prior_ep(K, y, damping=1.0)
    with pytest.raises(ValueError, match="widths\\[0\\]=7"):
        log_prior(FCN((7, 5, 1)), torch.rand(3, 6), y)
    with pytest.raises(ValueError, match="2 outputs"):
        log_prior(FCN((7, 5, 2)), torch.rand(3, 7), y)
    with pytest.raises(TypeError, match="model_or_kernel_spec=str"):
        log_prior("resnet", torch.rand(3, 7), y)
