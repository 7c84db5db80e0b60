"""NNGP kernels: the arc-cosine recursion and the Monte-Carlo empirical kernel.

Oracles: values computed by hand with ``math`` (scalar recursion written out here), Monte-Carlo output
covariances of wide random :class:`flatness.models.FCN` networks (error must shrink with width), and
finite-difference gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatness.models import FCN
from flatness.prior.kernels import ArcCosineNNGPKernel, arccos_kernel, empirical_nngp_kernel

SW, SB = math.sqrt(2.0), 1.0


def _hand_kernel(a: list[float], b: list[float], n_hidden: int, sw: float, sb: float) -> float:
    """Scalar arc-cosine recursion (Cho & Saul 2009) written with math only."""
    d = len(a)
    kab = sb**2 + sw**2 * sum(u * v for u, v in zip(a, b)) / d
    kaa = sb**2 + sw**2 * sum(u * u for u in a) / d
    kbb = sb**2 + sw**2 * sum(v * v for v in b) / d
    for _ in range(n_hidden):
        cos_t = max(-1.0, min(1.0, kab / math.sqrt(kaa * kbb)))
        t = math.acos(cos_t)
        kab = sb**2 + sw**2 / (2 * math.pi) * math.sqrt(kaa * kbb) * (math.sin(t) + (math.pi - t) * cos_t)
        kaa = sb**2 + sw**2 / 2 * kaa
        kbb = sb**2 + sw**2 / 2 * kbb
    return kab


def test_hand_computed_e1_e2_one_hidden_layer():
    # x = e1, e2 in 2-d, sigma_w^2 = 2, sigma_b = 1: K0(e1,e1) = 1 + 2/2 = 2, K0(e1,e2) = 1, cos t = 1/2, t = pi/3.
    k = arccos_kernel(torch.eye(2), n_hidden=1, sigma_w=SW, sigma_b=SB, device="cpu")
    off = 1 + 2 / (2 * math.pi) * 2 * (math.sin(math.pi / 3) + (math.pi - math.pi / 3) * 0.5)
    assert k.dtype == torch.float64
    torch.testing.assert_close(k, torch.tensor([[3.0, off], [off, 3.0]], dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("n_hidden", [0, 1, 2, 5])
@pytest.mark.parametrize("sw,sb", [(SW, SB), (1.0, 0.0), (1.7, 0.3)])
def test_matches_scalar_recursion(n_hidden, sw, sb):
    g = torch.Generator().manual_seed(n_hidden)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    x[5] = -x[4]  # cos t = -1 at the input layer when sigma_b = 0
    k = arccos_kernel(x, n_hidden=n_hidden, sigma_w=sw, sigma_b=sb, device="cpu")
    want = torch.tensor([[_hand_kernel(a.tolist(), b.tolist(), n_hidden, sw, sb) for b in x] for a in x],
                        dtype=torch.float64)
    torch.testing.assert_close(k, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(k, k.T)
    torch.testing.assert_close(arccos_kernel(x, n_hidden=n_hidden, sigma_w=sw, sigma_b=sb, diag=True, device="cpu"),
                               want.diagonal(), rtol=1e-12, atol=1e-12)
    # cross-kernel with x2 and flattening of (N, ...) inputs
    k12 = arccos_kernel(x[:2].reshape(2, 3, 1), x[2:], n_hidden=n_hidden, sigma_w=sw, sigma_b=sb, device="cpu")
    torch.testing.assert_close(k12, want[:2, 2:], rtol=1e-12, atol=1e-12)


def test_no_grad_fast_path_equals_autograd_path():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(40, 9, generator=g, dtype=torch.float64)
    fast = arccos_kernel(x, x, n_hidden=3, device="cpu")
    slow = arccos_kernel(x.clone().requires_grad_(True), x, n_hidden=3, device="cpu").detach()
    torch.testing.assert_close(fast, slow, rtol=1e-13, atol=1e-13)


def test_gradients_finite_at_identical_inputs_and_match_finite_differences():
    x = torch.tensor([[0.3, -0.2, 0.5], [0.3, -0.2, 0.5], [-0.1, 0.4, 0.2]], dtype=torch.float64,
                     requires_grad=True)
    k = arccos_kernel(x, x, n_hidden=2, device="cpu")  # rows 0, 1 identical: cos t = 1 exactly
    k.sum().backward()
    assert torch.isfinite(x.grad).all()
    a = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[-0.1, 0.4, 0.2], [0.7, 0.1, -0.3]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, v: arccos_kernel(u, v, n_hidden=2, device="cpu"), (a, b))


def test_gpytorch_kernel_matches_function_and_batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    kern = ArcCosineNNGPKernel(n_hidden=2, sigma_w=SW, sigma_b=SB)
    want = arccos_kernel(x, n_hidden=2, device="cpu")
    torch.testing.assert_close(kern(x).to_dense(), want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(kern(x, diag=True), want.diagonal(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(kern(x[:3], x[3:]).to_dense(), want[:3, 3:], rtol=1e-13, atol=1e-13)
    xb = torch.stack([x, 2 * x])  # (2, 7, 4)
    kb = kern(xb).to_dense()
    assert kb.shape == (2, 7, 7)
    torch.testing.assert_close(kb[1], arccos_kernel(2 * x, n_hidden=2, device="cpu"), rtol=1e-13, atol=1e-13)
    fcn_kern = ArcCosineNNGPKernel.from_fcn(FCN((4, 10, 10, 10, 1), sigma_w=1.3, sigma_b=0.2))
    assert (fcn_kern.n_hidden, fcn_kern.sigma_w, fcn_kern.sigma_b) == (3, 1.3, 0.2)


def _boolean_points() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(6, 7, generator=g) > 0.5).float()


def test_output_covariance_of_random_fcn_converges_to_kernel():
    """Full networks (last layer included): Monte-Carlo covariance of f(x) over 3000 draws of FCN((7, 256, 1))."""
    x = _boolean_points()
    k = arccos_kernel(x, n_hidden=1, device="cpu")
    model = FCN((7, 256, 1), sigma_w=SW, sigma_b=SB)
    outs = []
    with torch.no_grad():
        for s in range(3000):
            model.reset_parameters(seed=s)
            outs.append(model(x)[:, 0].double())
    f = torch.stack(outs)  # (M, N)
    cov = f.T @ f / len(f)  # the mean is zero by construction
    rel = float((cov - k).norm() / k.norm())
    # MC standard error ~ sqrt(2/3000) ~ 2.6% of the entries (measured 2-3%); a wrong layer count is off by ~30%.
    assert rel < 0.06, f"relative Frobenius error {rel:.3f}"
    k_wrong = arccos_kernel(x, n_hidden=2, device="cpu")
    assert float((cov - k_wrong).norm() / k_wrong.norm()) > 0.15


def test_empirical_kernel_of_wide_fcn_converges_with_width():
    """Penultimate features of FCN((7, w, w, 1)) + one GP step: error vs the arc-cosine kernel shrinks with w."""
    x = _boolean_points()
    k = arccos_kernel(x, n_hidden=2, device="cpu")
    errs = {}
    for w in (16, 128, 1024):
        ke = empirical_nngp_kernel(lambda s, w=w: FCN((7, w, w, 1), sigma_w=SW, sigma_b=SB, seed=s), x,
                                   n_samples=60, sigma_w=SW, sigma_b=SB, batch_size=4, device="cpu",
                                   progress=False)
        assert ke.dtype == torch.float64 and ke.shape == (6, 6)
        errs[w] = float((ke - k).norm() / k.norm())
    assert errs[1024] < errs[128] < errs[16], errs
    assert errs[1024] < 0.01, errs


def test_empirical_kernel_exact_for_linear_readout():
    """Features = the input itself (identity before the last Linear): K = sw^2/d x x^T + sb^2 exactly."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=g)

    def factory(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Identity(), nn.Linear(3, 1))

    ke = empirical_nngp_kernel(factory, x, n_samples=3, sigma_w=1.5, sigma_b=0.5, batch_size=2, device="cpu",
                               progress=False)
    want = 1.5**2 / 3 * x.double() @ x.double().T + 0.25
    torch.testing.assert_close(ke, want, rtol=1e-6, atol=1e-6)
    # an explicit feature module (the input of the Identity is the same x)
    ke2 = empirical_nngp_kernel(factory, x, n_samples=2, sigma_w=1.5, sigma_b=0.5, device="cpu",
                                feature_module="0", progress=False)
    torch.testing.assert_close(ke2, want, rtol=1e-6, atol=1e-6)


def test_bad_input():
    x = torch.rand(4, 3)
    with pytest.raises(ValueError, match="n_hidden"):
        arccos_kernel(x, n_hidden=-1)
    with pytest.raises(ValueError, match="sigma_w"):
        arccos_kernel(x, sigma_w=0.0)
    with pytest.raises(ValueError, match="x1 holds 1 non-finite"):
        arccos_kernel(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="features per input"):
        arccos_kernel(x, torch.rand(2, 5))
    with pytest.raises(ValueError, match="feature_module='nope'"):
        empirical_nngp_kernel(lambda s: FCN((3, 4, 1)), x, n_samples=1, feature_module="nope", device="cpu",
                              progress=False)
    with pytest.raises(ValueError, match="n_samples"):
        empirical_nngp_kernel(lambda s: FCN((3, 4, 1)), x, n_samples=0, device="cpu", progress=False)


def test_float32_kernel_is_finite_at_the_origin_without_biases():
    """sigma_b = 0 and x = 0 (the first Boolean input): k(0, x) = 0 exactly, no 0/0 in float32."""
    from flatness.boolean import boolean_inputs

    x = boolean_inputs(3)
    for dtype in (torch.float32, torch.float64):
        K = arccos_kernel(x, sigma_b=0.0, dtype=dtype)
        assert torch.isfinite(K).all(), dtype
        assert float(K[0].abs().max()) < 1e-30
        K64 = arccos_kernel(x, sigma_b=0.0, dtype=torch.float64)
        assert torch.allclose(K.double(), K64, rtol=1e-5, atol=1e-6)
