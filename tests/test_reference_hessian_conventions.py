"""Conventions of the Hessian and sharpness measures, pinned against closed forms.

Each convention was checked against a peer (PyHessian / curvlinops: Hessian of the mean loss;
``tml-epfl/sharpness-vs-generalization``: adaptive average-case noise and the raw increase;
``chinsengi/sharpdim``: the Gauss-Newton trace as sharpness and the increase divided by rho^2).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from flatness.hessian import hessian_trace, per_example_grad_norms_sq
from flatness.losses import cross_entropy, half_mse, sigmoid_bce
from flatness.sharpness import LogEigProduct, adaptive_sharpness, log_top_eig_product

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


class DiagQuadratic(nn.Module):
    r""":math:`L(w) = \frac12 \sum_p h_p (w_p - w^*_p)^2`, a "network" whose output ignores the data."""

    def __init__(self, h: torch.Tensor, w_star: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w_star.clone().to(F64))
        self.register_buffer("h", h.to(F64))
        self.register_buffer("w_star", w_star.to(F64))

    def forward(self, x):
        return (0.5 * (self.h * (self.w - self.w_star) ** 2).sum()).expand(x.shape[0])


def mean_out(out, y):
    return out.mean()


DATA = (torch.zeros(8, 1, dtype=F64), torch.zeros(8, dtype=F64))


# ---------------------------------------------------------------------------------------------- trace

@pytest.mark.parametrize("loss_fn", [sigmoid_bce, cross_entropy])
def test_exact_trace_raises_for_losses_other_than_half_mse(loss_fn):
    net = nn.Linear(3, 1 if loss_fn is sigmoid_bce else 2).to(F64)
    x = torch.randn(6, 3, dtype=F64)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    y = y.to(F64) if loss_fn is sigmoid_bce else y
    with pytest.raises(ValueError, match=f"method='exact'.*loss_fn={loss_fn.__name__}.*method='gauss_newton'"):
        hessian_trace(net, loss_fn, (x, y), method="exact")
    assert hessian_trace(net, loss_fn, (x, y)).method == "hutchpp"  # auto: the loss's own curvature


def test_gauss_newton_on_a_linear_model_is_the_closed_form_whatever_the_loss():
    """f(x) = W x + b with k outputs: ||grad_theta f(x)||_F^2 = k (||x||^2 + 1), for any loss."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3).to(F64)
    x = torch.randn(9, 4, dtype=F64)
    closed = 3 * float((x.pow(2).sum(1) + 1).mean())
    for loss_fn, y in ((cross_entropy, torch.randint(0, 3, (9,))), (half_mse, torch.randn(9, 3, dtype=F64)),
                       (None, torch.zeros(9))):
        est = hessian_trace(net, loss_fn, (x, y), method="gauss_newton")
        assert est.method == "gauss_newton" and est.std_err == 0 and est.n_samples == 9
        assert est.value == pytest.approx(closed, rel=1e-12)
    # half_mse is the one loss whose Hessian it is: for a linear model, at any point
    assert hessian_trace(net, half_mse, (x, torch.randn(9, 3, dtype=F64)), method="exact").value == \
        pytest.approx(closed, rel=1e-12)


def test_gauss_newton_of_one_convolution_is_the_patch_closed_form():
    """z_{o,p} = W_o . h_p + b_o: sum over outputs (o, p) of ||grad z_{o,p}||^2 = O * sum_p (||h_p||^2 + 1),
    with the patches h_p cut from the zero-padded input by hand (stride 2, padding 1)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).to(F64)
    net = nn.Sequential(conv, nn.Flatten())
    x = torch.randn(4, 2, 5, 5, dtype=F64)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    per = torch.zeros(4, dtype=F64)
    for r in range(0, 5, 2):
        for c in range(0, 5, 2):
            per += xp[:, :, r:r + 3, c:c + 3].pow(2).sum((1, 2, 3)) + 1
    torch.testing.assert_close(per_example_grad_norms_sq(net, x), 3 * per, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------- average case

def test_average_case_linf_uniform_vs_l2_gaussian_closed_forms():
    r"""At a quadratic minimum with delta_p = rho |w_p| eps_p: E[increase] = rho^2/2 sum_p h_p w_p^2 E[eps_p^2],
    E[eps^2] = 1 (Gaussian, l2) and 1/3 (uniform on [-1, 1], l-inf); .value = raw / rho^2 (Chen et al.),
    .raw the increase itself (Andriushchenko et al.'s code)."""
    h = torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0, 1.5], dtype=F64)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0], dtype=F64)
    q = DiagQuadratic(h, w)
    rho = 0.1
    base = 0.5 * float((h * w**2).sum())  # E[increase] / rho^2 for unit-variance noise
    res = {}
    for norm, c in (("l2", 1.0), ("linf", 1.0 / 3.0)):
        r = adaptive_sharpness(q, mean_out, DATA, rho, kind="average", norm=norm, n_draws=400, max_draws=400,
                               seed=0)
        assert r.norm == norm and r.n_draws == 400
        assert abs(r.value - c * base) <= 4 * r.std_err, (norm, r.value, c * base, r.std_err)
        assert r.raw == pytest.approx(r.value * rho**2, rel=1e-12)
        res[norm] = r
    # the two noises really differ (3x), beyond the error bars
    ratio = res["l2"].value / res["linf"].value
    assert 2.4 < ratio < 3.8
    # l-inf draws stay in the box: the increase never exceeds the box maximum rho^2/2 sum h w^2
    r = adaptive_sharpness(q, mean_out, DATA, rho, kind="average", norm="linf", n_draws=50, max_draws=50, seed=3)
    assert r.raw <= rho**2 * base


# ---------------------------------------------------------------------------------------------- log product

def test_log_top_eig_product_converged_flag_on_a_known_spectrum():
    """Hessian diag(h) with 120 distinct eigenvalues: the default budget converges to sum log of the top k;
    a budget too small is marked not converged (and warns) instead of passing silently."""
    h = torch.linspace(0.1, 12.0, 120, dtype=F64) ** 2
    q = DiagQuadratic(h, torch.linspace(-1, 1, 120, dtype=F64))
    k = 10
    exact = float(h.sort(descending=True).values[:k].log().sum())
    val = log_top_eig_product(q, mean_out, DATA, k=k, tol=1e-8)
    assert isinstance(val, LogEigProduct) and isinstance(val, float)
    assert val.converged and val.n_positive == k
    assert float(val) == pytest.approx(exact, rel=1e-8)
    assert val + 0.0 == pytest.approx(exact, rel=1e-8)  # behaves as the float it was
    with pytest.warns(RuntimeWarning, match="not converged"):
        short = log_top_eig_product(q, mean_out, DATA, k=k, tol=1e-8, max_iter=k + 2)
    assert not short.converged and abs(float(short) - exact) > 1e-6 * abs(exact)
    # backward-compatible tuple form
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v2, ev = log_top_eig_product(q, mean_out, DATA, k=k, tol=1e-8, return_eigenvalues=True)
    assert v2.converged and torch.equal(ev, v2.eigenvalues) and len(ev) == k
    assert math.isclose(float(v2), exact, rel_tol=1e-8)
