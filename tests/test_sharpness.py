"""Flatness measures vs closed forms on quadratics and dense float64 Hessians of tiny networks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from flatness.hessian import hessian_eigenvalues
from flatness.losses import cross_entropy, half_mse, sigmoid_bce
from flatness.models import FCN, alpha_rescale
from flatness.sharpness import adaptive_sharpness, keskar_sharpness, log_top_eig_product, relative_flatness

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


class Quadratic(nn.Module):
    r""":math:`L(w) = \frac12 (w - w^*)^\top H (w - w^*) + c` as a "network" whose output ignores the data."""

    def __init__(self, H: torch.Tensor, w_star: torch.Tensor, c: float = 0.0, at: torch.Tensor | None = None):
        super().__init__()
        self.w = nn.Parameter((w_star if at is None else at).clone().to(F64))
        self.register_buffer("H", H.to(F64))
        self.register_buffer("w_star", w_star.to(F64))
        self.c = c

    def forward(self, x):
        d = self.w - self.w_star
        return (0.5 * d @ self.H @ d + self.c).expand(x.shape[0])


def mean_out(out, y):
    return out.mean()


DATA = (torch.zeros(64, 1, dtype=F64), torch.zeros(64, dtype=F64))


def dense_hessian(model, loss_fn, x, y):
    named = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [p.numel() for p in named.values()]

    def loss(flat):
        ps = {n: v.view(named[n].shape) for n, v in zip(named, flat.split(sizes))}
        return loss_fn(functional_call(model, ps, (x,)), y)

    return hessian(loss)(torch.cat([p.reshape(-1) for p in named.values()]))


# ---------------------------------------------------------------------------------------------- Keskar

@pytest.mark.parametrize("method,kw", [("sgd", {"lr": 1.0, "epochs": 5}), ("lbfgsb", {})])
def test_keskar_quadratic_reaches_the_box_corner(method, kw):
    h = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=F64)
    w_star = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
    c, zeta = 0.3, 1e-2
    q = Quadratic(torch.diag(h), w_star, c)
    q.train()
    exact = 100 * 0.5 * float((h * (zeta * (w_star.abs() + 1)) ** 2).sum()) / (1 + c)
    res = keskar_sharpness(q, mean_out, DATA, zeta, method=method, **kw)
    assert res.method == method
    assert res.sharpness == pytest.approx(exact, rel=1e-6)
    assert res.loss == pytest.approx(c, rel=1e-12)
    assert res.max_loss == pytest.approx(c + exact * (1 + c) / 100, rel=1e-6)
    # the running maximum is non-decreasing and ends at the reported value
    assert all(b >= a for a, b in zip(res.trace, res.trace[1:]))
    assert res.sharpness_trace[-1] == pytest.approx(res.sharpness, rel=1e-12)
    assert len(res.trace) == res.n_evals == len(res.trace_steps)
    # the model is unchanged, parameters and mode
    assert torch.equal(q.w.detach(), w_star) and q.training


def test_keskar_sgd_eval_schedules_and_never_negative():
    h = torch.tensor([1.0, 2.0], dtype=F64)
    q = Quadratic(torch.diag(h), torch.tensor([1.0, -1.0], dtype=F64))
    step = keskar_sharpness(q, mean_out, DATA, 1e-3, lr=1e-3, epochs=3, batch_size=16)
    epoch = keskar_sharpness(q, mean_out, DATA, 1e-3, lr=1e-3, epochs=3, batch_size=16, eval_every="epoch")
    every5 = keskar_sharpness(q, mean_out, DATA, 1e-3, lr=1e-3, epochs=3, batch_size=16, eval_every=5)
    assert len(step.trace) == 1 + 12 and step.trace_steps[-1] == 12  # start + 4 steps x 3 epochs
    assert len(epoch.trace) == 1 + 3 and epoch.trace_steps == [0, 4, 8, 12]
    assert every5.trace_steps == [0, 5, 10, 12]
    assert len(step.batch_losses) == 12
    for r in (step, epoch, every5):
        assert 0 <= r.sharpness <= 100 * 0.5 * float((h * (1e-3 * 2) ** 2).sum()) + 1e-12
    # evaluating every step sees every iterate the epoch schedule sees (same seed, same path)
    assert step.max_loss >= epoch.max_loss


def test_keskar_on_a_network_and_alpha_rescale_changes_flatness_not_function():
    net = FCN((7, 40, 40, 1), seed=0).to(F64)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (64, 7), generator=g).to(F64)
    y = torch.randint(0, 2, (64,), generator=g)
    scaled = alpha_rescale(net, 0, 5.0)
    torch.testing.assert_close(scaled(x), net(x), rtol=1e-12, atol=1e-12)
    kw = dict(zeta=1e-3, lr=1e-2, epochs=3, batch_size=16)
    s0 = keskar_sharpness(net, sigmoid_bce, (x, y), **kw)
    s1 = keskar_sharpness(scaled, sigmoid_bce, (x, y), **kw)
    assert s0.loss == pytest.approx(s1.loss, rel=1e-10)
    assert abs(s1.sharpness - s0.sharpness) > 0.2 * s0.sharpness > 0
    e0 = hessian_eigenvalues(net, sigmoid_bce, (x, y), k=1, tol=1e-8)
    e1 = hessian_eigenvalues(scaled, sigmoid_bce, (x, y), k=1, tol=1e-8)
    assert abs(float(e1 - e0)) > 0.2 * abs(float(e0))


def test_keskar_lbfgsb_and_sgd_agree_on_a_network():
    # both give lower bounds on the box maximum; Zhang et al. (Appendix G) report that they agree
    net = FCN((3, 8, 1), seed=1).to(F64)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, generator=g, dtype=F64), torch.randint(0, 2, (40,), generator=g)
    lb = keskar_sharpness(net, sigmoid_bce, (x, y), 1e-2, method="lbfgsb", maxiter=50)
    sgd = keskar_sharpness(net, sigmoid_bce, (x, y), 1e-2, lr=0.1, epochs=20)
    assert lb.sharpness > 0 and sgd.sharpness > 0
    assert sgd.sharpness == pytest.approx(lb.sharpness, rel=0.1)


def test_keskar_bad_input():
    q = Quadratic(torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="method"):
        keskar_sharpness(q, mean_out, DATA, method="adam")
    with pytest.raises(ValueError, match="zeta"):
        keskar_sharpness(q, mean_out, DATA, zeta=0)
    with pytest.raises(ValueError, match="eval_every"):
        keskar_sharpness(q, mean_out, DATA, eval_every="batch")
    with pytest.raises(ValueError, match="epochs"):
        keskar_sharpness(q, mean_out, DATA, epochs=0)
    with pytest.raises(TypeError, match="data"):
        keskar_sharpness(q, mean_out, DATA[0])


# ---------------------------------------------------------------------------------------------- log product

def test_log_top_eig_product_vs_dense_eigvalsh():
    net = FCN((3, 5, 2), seed=0).to(F64)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 3, generator=g, dtype=F64), torch.randint(0, 2, (20,), generator=g)
    ev = torch.linalg.eigvalsh(dense_hessian(net, cross_entropy, x, y)).flip(0)
    val, top = log_top_eig_product(net, cross_entropy, (x, y), k=5, tol=1e-10, return_eigenvalues=True)
    assert val == pytest.approx(float(ev[:5].log().sum()), rel=1e-8)
    torch.testing.assert_close(top, ev[:5], rtol=1e-7, atol=1e-12)
    # all 32: the non-positive ones are left out, with a warning
    assert int((ev <= 0).sum()) > 0
    with pytest.warns(RuntimeWarning, match="not positive"):
        val = log_top_eig_product(net, cross_entropy, (x, y), k=32, tol=1e-10)
    assert val == pytest.approx(float(ev[ev > 1e-10].log().sum()), rel=1e-6)  # 11 exact zeros


# ---------------------------------------------------------------------------------------------- adaptive

def psd_matrix(P: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(P, P, generator=g, dtype=F64)
    return A @ A.T / P + 0.1 * torch.eye(P, dtype=F64)


def test_average_adaptive_sharpness_quadratic_closed_form():
    P, rho = 12, 0.1
    H = psd_matrix(P, 0)
    w = torch.linspace(-2, 2, P, dtype=F64) + 0.05
    q = Quadratic(H, w)
    closed = 0.5 * float((torch.diag(H) * w**2).sum())  # E[1/2 d^T H d] / rho^2, d ~ N(0, rho^2 w^2)
    res = adaptive_sharpness(q, mean_out, DATA, rho, kind="average", n_draws=200, max_draws=2000, rel_tol=0.01,
                             seed=0)
    assert res.kind == "average" and res.loss == 0.0
    assert abs(res.value - closed) <= 4 * res.std_err, (res, closed)
    assert res.std_err <= 0.011 * res.value or res.n_draws == 2000
    assert res.raw == pytest.approx(res.value * rho**2, rel=1e-12)
    # more draws, smaller error bar (convergence, not one lucky draw)
    small = adaptive_sharpness(q, mean_out, DATA, rho, n_draws=20, max_draws=20, seed=1)
    assert small.n_draws == 20 and small.std_err > res.std_err * 2
    assert abs(small.value - closed) <= 4 * small.std_err


def test_worst_case_linf_quadratic_exact_box_max_equals_average():
    # diagonal H at a minimum: every corner of the box is a maximum and the box maximum equals the
    # Gaussian average 1/2 rho^2 sum_p h_p w_p^2 (unnormalised)
    rho = 0.1
    h = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=F64)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    q = Quadratic(torch.diag(h), w)
    exact = 0.5 * rho**2 * float((h * w**2).sum())
    res = adaptive_sharpness(q, mean_out, DATA, rho, kind="worst", norm="linf", seed=0)
    assert res.kind == "worst" and res.n_draws == 0 and math.isnan(res.std_err)
    assert res.value == pytest.approx(exact, rel=1e-9) and res.raw == res.value
    avg = adaptive_sharpness(q, mean_out, DATA, rho, kind="average", n_draws=400, max_draws=400, seed=0)
    assert abs(avg.raw - exact) <= 4 * avg.std_err * rho**2


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_worst_case_exceeds_average_case_on_a_network(norm):
    net = FCN((4, 16, 3), seed=3).to(F64)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 4, generator=g, dtype=F64), torch.randint(0, 3, (40,), generator=g)
    rho = 0.05
    avg = adaptive_sharpness(net, cross_entropy, (x, y), rho, kind="average", seed=0)
    worst = adaptive_sharpness(net, cross_entropy, (x, y), rho, kind="worst", norm=norm, seed=0)
    # away from a minimum the worst case gains the first-order term (about rho * ||w * grad||_q) that the
    # zero-mean Gaussian average lacks
    assert worst.raw > avg.raw + 4 * avg.std_err * rho**2
    assert worst.raw > 0


def test_worst_case_l2_quadratic_top_direction():
    rho = 0.1
    h = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=F64)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)  # h w^2 = 1, 8, 0.75, 4.5: the max is 8
    q = Quadratic(torch.diag(h), w)
    res = adaptive_sharpness(q, mean_out, DATA, rho, kind="worst", norm="l2", seed=0)
    assert res.value == pytest.approx(0.5 * rho**2 * 8.0, rel=1e-3)
    assert res.value <= 0.5 * rho**2 * 8.0 * (1 + 1e-9)  # never above the true maximum


def test_m_sharpness_per_example_worst_case():
    # f(x) = <w, x>, half-MSE at interpolation; each example excites one coordinate, so with m = 1 each
    # batch's l2 worst case is 1/2 rho^2 w_c^2 x_c^2 and the full-batch one 1/2 rho^2 max_c w_c^2 mean(x_c^2)
    rho = 0.1
    net = nn.Linear(2, 1, bias=False).to(F64)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.5, -0.5]], dtype=F64))
    x = torch.tensor([[1.0, 0], [2.0, 0], [0, 1.0], [0, 3.0], [0, 0.5], [0.5, 0]], dtype=F64)
    y = net(x).detach()
    w2 = net.weight.detach()[0] ** 2
    per_example = 0.5 * rho**2 * (x**2 * w2).sum(1)
    m1 = adaptive_sharpness(net, half_mse, (x, y), rho, kind="worst", norm="l2", m=1, seed=0)
    assert m1.n_batches == 6
    assert m1.value == pytest.approx(float(per_example.mean()), rel=1e-3)
    full = adaptive_sharpness(net, half_mse, (x, y), rho, kind="worst", norm="l2", seed=0)
    assert full.value == pytest.approx(0.5 * rho**2 * float((w2 * (x**2).mean(0)).max()), rel=1e-3)
    assert m1.value > full.value  # Jensen: the mean of per-batch maxima exceeds the max of the mean
    # average case with m: independent noise per batch, same expectation 1/2 sum_p H_pp w_p^2
    avg = adaptive_sharpness(net, half_mse, (x, y), rho, kind="average", m=2, n_draws=400, max_draws=400)
    closed = 0.5 * float((w2 * (x**2).mean(0)).sum())
    assert abs(avg.value - closed) <= 4 * avg.std_err


def test_adaptive_logit_normalisation_and_model_unchanged():
    net = FCN((3, 6, 3), seed=2).to(F64)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 3, generator=g, dtype=F64), torch.randint(0, 3, (30,), generator=g)
    net.train()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    plain = adaptive_sharpness(net, cross_entropy, (x, y), 0.05, kind="worst", norm="linf")
    normed = adaptive_sharpness(net, cross_entropy, (x, y), 0.05, kind="worst", norm="linf", normalize_logits=True)
    unit = net(x) / net(x).norm(dim=1, keepdim=True)
    assert normed.loss == pytest.approx(float(cross_entropy(unit, y).detach()), rel=1e-12)
    assert plain.loss == pytest.approx(float(cross_entropy(net(x), y).detach()), rel=1e-12)
    assert plain.value > 0 and normed.value > 0
    # doubling the last layer changes the plain loss landscape but not the normalised logits' loss
    net2 = FCN((3, 6, 3), seed=2).to(F64)
    with torch.no_grad():
        net2[-1].weight.mul_(2)
        net2[-1].bias.mul_(2)
    normed2 = adaptive_sharpness(net2, cross_entropy, (x, y), 0.05, kind="worst", norm="linf",
                                 normalize_logits=True)
    assert normed2.value == pytest.approx(normed.value, rel=1e-9)
    assert net.training
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n])


def test_adaptive_bad_input():
    q = Quadratic(torch.eye(2, dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="kind"):
        adaptive_sharpness(q, mean_out, DATA, kind="typical")
    with pytest.raises(ValueError, match="norm"):
        adaptive_sharpness(q, mean_out, DATA, kind="worst", norm="l1")
    with pytest.raises(ValueError, match="rho"):
        adaptive_sharpness(q, mean_out, DATA, rho=-0.1)
    with pytest.raises(ValueError, match="max_draws"):
        adaptive_sharpness(q, mean_out, DATA, n_draws=50, max_draws=10)
    with pytest.raises(ValueError, match="m=0"):
        adaptive_sharpness(q, mean_out, DATA, m=0)


# ---------------------------------------------------------------------------------------------- relative flatness

def relative_flatness_dense(model, loss_fn, x, y, wname):
    """Petzka et al.'s formula from a dense Hessian of the loss w.r.t. the layer weight."""
    named = {n: p.detach() for n, p in model.named_parameters()}
    W = named[wname]

    def loss(Wv):
        return loss_fn(functional_call(model, {**named, wname: Wv}, (x,)), y)

    Hd = hessian(loss)(W)  # (m, n, m, n)
    T = torch.einsum("sata->st", Hd)  # Tr H_{s, s'}
    return float(((W @ W.T) * T).sum())


@pytest.mark.parametrize("loss_fn", [half_mse, cross_entropy])
def test_relative_flatness_vs_dense_hessian(loss_fn):
    net = FCN((3, 6, 4, 3), seed=1).to(F64)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(25, 3, generator=g, dtype=F64), torch.randint(0, 3, (25,), generator=g)
    last = relative_flatness(net, loss_fn, (x, y))
    assert last == pytest.approx(relative_flatness_dense(net, loss_fn, x, y, "5.weight"), rel=1e-10)
    mid = relative_flatness(net, loss_fn, (x, y), layer=1, block=5, batch_size=7)
    assert mid == pytest.approx(relative_flatness_dense(net, loss_fn, x, y, "3.weight"), rel=1e-10)
    assert relative_flatness(net, loss_fn, (x, y), layer="3") == pytest.approx(mid, rel=1e-12)
    assert relative_flatness(net, loss_fn, (x, y), layer=net[3]) == pytest.approx(mid, rel=1e-12)


def test_relative_flatness_half_mse_closed_form_and_rescaling_invariance():
    # last layer, half-MSE: kappa = (1/n) sum_i ||phi_i||^2 Tr(W W^T)
    net = FCN((3, 6, 4, 3), seed=4).to(F64)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(25, 3, generator=g, dtype=F64), torch.randn(25, 3, generator=g, dtype=F64)
    with torch.no_grad():
        phi = nn.Sequential(*list(net)[:-1])(x)  # inputs of the last layer
        W = net[-1].weight
        closed = float(phi.pow(2).sum(1).mean() * (W @ W.T).trace())
    kappa = relative_flatness(net, half_mse, (x, y))
    assert kappa == pytest.approx(closed, rel=1e-10)
    # invariant when the layer, or the one before it, is rescaled against its neighbour
    for layer in (0, 1):
        scaled = alpha_rescale(net, layer, 3.0)
        assert relative_flatness(scaled, half_mse, (x, y)) == pytest.approx(kappa, rel=1e-9)
        assert relative_flatness(scaled, half_mse, (x, y), layer=layer) == pytest.approx(
            relative_flatness(net, half_mse, (x, y), layer=layer), rel=1e-9)


def test_relative_flatness_bad_layer():
    net = FCN((3, 4, 2), seed=0).to(F64)
    data = (torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,)))
    with pytest.raises(ValueError, match="layer=7"):
        relative_flatness(net, cross_entropy, data, layer=7)
    with pytest.raises(ValueError, match="submodule"):
        relative_flatness(net, cross_entropy, data, layer="head")
    with pytest.raises(ValueError, match="nn.Linear"):
        relative_flatness(nn.Sequential(nn.Flatten(), nn.Conv1d(1, 1, 1)), cross_entropy, data)


# ---------------------------------------------------------------------------------------------- bad models and labels

def _bce_problem():
    net = FCN((3, 4, 1), seed=0).to(F64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=F64)
    y = (x[:, 0] > 0).to(F64)
    return net, x, y


MEASURES = [
    ("keskar_sharpness", lambda n, d: keskar_sharpness(n, sigmoid_bce, d, epochs=1)),
    ("log_top_eig_product", lambda n, d: log_top_eig_product(n, sigmoid_bce, d, k=2)),
    ("adaptive_sharpness", lambda n, d: adaptive_sharpness(n, sigmoid_bce, d, n_draws=2, max_draws=2)),
    ("relative_flatness", lambda n, d: relative_flatness(n, sigmoid_bce, d)),
]


@pytest.mark.parametrize("name,call", MEASURES)
def test_measures_reject_non_finite_parameters_naming_the_tensor(name, call):
    net, x, y = _bce_problem()
    with torch.no_grad():
        net[3].bias.fill_(float("nan"))
    with pytest.raises(ValueError, match=rf"{name}: model parameter '3.bias' holds 1 non-finite"):
        call(net, (x, y))


@pytest.mark.parametrize("name,call", MEASURES)
def test_measures_validate_labels_against_the_loss(name, call):
    net, x, y = _bce_problem()
    with pytest.raises(ValueError, match=rf"{name}: labels y must lie in \{{0, 1\}} for sigmoid_bce; got values \[0.0, 5.0\]"):
        call(net, (x, 5 * y))
    y_nan = y.clone()
    y_nan[0] = float("nan")
    with pytest.raises(ValueError, match=rf"{name}: labels y hold 1 non-finite"):
        call(net, (x, y_nan))
