"""Hessian-vector products, eigenvalues and traces vs dense float64 oracles on tiny networks."""

from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from flatness.hessian import (
    HessianOperator, hessian_eigenvalues, hessian_trace, hutchinson_trace, hutchpp_trace, lanczos,
    per_example_grad_norms_sq, power_iteration,
)
from flatness.losses import cross_entropy, half_mse
from flatness.models import FCN

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- oracles

def dense_hessian(model: nn.Module, loss_fn, x, y, names=None) -> torch.Tensor:
    """Dense float64 Hessian of the mean loss w.r.t. the (selected) parameters, via torch.func.hessian."""
    named = {n: p.detach() for n, p in model.named_parameters()}
    names = list(named) if names is None else names
    sizes = [named[n].numel() for n in names]

    def loss(flat):
        ps = {n: v.view(named[n].shape) for n, v in zip(names, flat.split(sizes))}
        return loss_fn(functional_call(model, {**named, **ps}, (x,)), y)

    return hessian(loss)(torch.cat([named[n].reshape(-1) for n in names]))


def jacobian_rows(model: nn.Module, x) -> torch.Tensor:
    """(N, k, P) per-example output Jacobians w.r.t. all parameters, by torch.autograd.functional.jacobian."""
    named = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [p.numel() for p in named.values()]

    def f(flat):
        ps = {n: v.view(named[n].shape) for n, v in zip(named, flat.split(sizes))}
        return functional_call(model, ps, (x,)).reshape(len(x), -1)

    return torch.autograd.functional.jacobian(f, torch.cat([p.reshape(-1) for p in named.values()]))


def tanh_mlp(seed: int = 0) -> nn.Module:
    """3-5-2 tanh MLP: unlike a ReLU net its output has non-zero parameter curvature on the diagonal."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)


@pytest.fixture(scope="module")
def tiny():
    """FCN 3-5-2 (32 parameters) in float64, 20 examples, 2 classes."""
    net = FCN((3, 5, 2), seed=0).to(F64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=g, dtype=F64)
    y = torch.randint(0, 2, (20,), generator=g)
    return net, x, y


def spectrum_matrix(eigs, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=F64))
    return q @ torch.diag(torch.as_tensor(eigs, dtype=F64)) @ q.T


# ---------------------------------------------------------------------------------------------- HVPs

@pytest.mark.parametrize("loss_fn", [half_mse, cross_entropy])
@pytest.mark.parametrize("batch_size", [None, 7])
def test_hvp_operator_matches_dense_hessian(tiny, loss_fn, batch_size):
    net, x, y = tiny
    op = HessianOperator(net, loss_fn, (x, y), batch_size=batch_size)
    H = dense_hessian(net, loss_fn, x, y)
    assert op.dim == 32
    torch.testing.assert_close(op.to_dense(), H, rtol=1e-10, atol=1e-12)
    assert op.n_hvp == 32
    assert op.loss() == pytest.approx(float(loss_fn(net(x), y).detach()), rel=1e-12)


def test_hvp_restricted_to_named_parameters(tiny):
    net, x, y = tiny
    names = ["3.weight", "3.bias"]
    op = HessianOperator(net, cross_entropy, (x, y), params=names)
    torch.testing.assert_close(op.to_dense(), dense_hessian(net, cross_entropy, x, y, names), rtol=1e-10, atol=1e-12)
    ev = hessian_eigenvalues(net, cross_entropy, (x, y), k=3, params=names, tol=1e-10)
    ref = torch.linalg.eigvalsh(dense_hessian(net, cross_entropy, x, y, names)).flip(0)[:3]
    torch.testing.assert_close(ev, ref, rtol=1e-6, atol=1e-10)


# ---------------------------------------------------------------------------------------------- eigenvalues

@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("loss_fn", [half_mse, cross_entropy])
def test_top_eigenvalues_match_eigvalsh(tiny, method, loss_fn):
    net, x, y = tiny
    ref = torch.linalg.eigvalsh(dense_hessian(net, loss_fn, x, y)).flip(0)
    # residual tol 1e-7 bounds the eigenvalue errors by 1e-7 * lambda_1 < 1e-6 * lambda_4 here
    kw = dict(tol=1e-7 if method == "power" else 1e-9, max_iter=20_000 if method == "power" else None,
              method=method)
    top1 = hessian_eigenvalues(net, loss_fn, (x, y), k=1, **kw)
    top4 = hessian_eigenvalues(net, loss_fn, (x, y), k=4, **kw)
    assert top1.shape == (1,) and top4.shape == (4,)
    torch.testing.assert_close(top1, ref[:1], rtol=1e-6, atol=0)
    torch.testing.assert_close(top4, ref[:4], rtol=1e-6, atol=1e-9)
    assert bool((top4[:-1] >= top4[1:]).all()), "eigenvalues must be descending"


def test_lanczos_and_power_agree_and_chunking_is_identical(tiny):
    net, x, y = tiny
    lz = hessian_eigenvalues(net, cross_entropy, (x, y), k=3, tol=1e-10)
    pw = hessian_eigenvalues(net, cross_entropy, (x, y), k=3, method="power", tol=1e-7, max_iter=20_000)
    torch.testing.assert_close(lz, pw, rtol=1e-6, atol=1e-10)
    for method, k, tol in [("lanczos", 3, 1e-9), ("power", 2, 1e-6)]:
        a = hessian_eigenvalues(net, cross_entropy, (x, y), k=k, method=method, tol=tol)
        b = hessian_eigenvalues(net, cross_entropy, (x, y), k=k, method=method, tol=tol, batch_size=6)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_float32_model_default_dtype_close_to_float64(tiny):
    net, x, y = tiny
    ev64 = hessian_eigenvalues(net, half_mse, (x, y), k=2, tol=1e-8)
    net32 = FCN((3, 5, 2), seed=0)
    ev32 = hessian_eigenvalues(net32, half_mse, (x.float(), y), k=2, tol=1e-5)
    assert ev32.dtype == torch.float32
    torch.testing.assert_close(ev32.double(), ev64, rtol=1e-4, atol=1e-6)
    ev = hessian_eigenvalues(net32, half_mse, (x.float(), y), k=2, tol=1e-8, dtype=F64)
    torch.testing.assert_close(ev, ev64, rtol=1e-6, atol=1e-9)


def test_lanczos_on_known_spectrum_and_eigenvectors():
    eigs = [10.0, 7.0, 5.0, 3.0, -12.0] + list(torch.linspace(-1, 1, 195).tolist())
    A = spectrum_matrix(eigs)
    res = lanczos(A, k=4, tol=1e-10, return_eigenvectors=True, max_iter=200)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, torch.tensor([10.0, 7.0, 5.0, 3.0], dtype=F64), rtol=1e-8, atol=0)
    V = res.eigenvectors
    torch.testing.assert_close(A @ V, V * res.eigenvalues, atol=1e-7, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(4, dtype=F64), atol=1e-10, rtol=0)
    assert res.n_matvec < 200 and len(res.history) == res.n_matvec


def test_lanczos_restarts_past_an_invariant_krylov_space():
    # rank 3: the Krylov space of one start vector is 4-dimensional (5, 4, 3, 0), fewer than k = 6
    A = spectrum_matrix([5.0, 4.0, 3.0] + [0.0] * 47)
    res = lanczos(A, k=6, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 4.0, 3.0, 0, 0, 0], dtype=F64), atol=1e-10, rtol=0)
    assert res.n_matvec == 6


def test_power_iteration_returns_largest_algebraic_when_a_negative_eigenvalue_dominates():
    A = spectrum_matrix([4.0, 2.0, 1.0, 0.5, -9.0, -0.3])
    res = power_iteration(A, k=3, tol=1e-10, max_iter=20_000)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([4.0, 2.0, 1.0], dtype=F64), rtol=1e-8, atol=0)
    ref = lanczos(A, k=3, tol=1e-12).eigenvalues
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-8, atol=0)


def test_matvec_callable_operator():
    A = spectrum_matrix([3.0, 2.0, 1.0, 0.0])
    res = lanczos(lambda v: A @ v, k=2, dim=4, dtype=F64, tol=1e-12)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0, 2.0], dtype=F64))
    with pytest.raises(ValueError, match="dim"):
        lanczos(lambda v: A @ v, k=2)


# ---------------------------------------------------------------------------------------------- traces

def test_hutchinson_and_hutchpp_converge_within_error_bars():
    g = torch.Generator().manual_seed(3)
    A = spectrum_matrix((10.0 * 0.8 ** torch.arange(150)).tolist() + [0.0] * 50, seed=4)
    A = A + 0.05 * torch.diag(torch.randn(200, generator=g, dtype=F64))  # a non-trivial diagonal
    true = float(A.trace())
    errs, ses = {}, {}
    for method, est in [("hutchinson", hutchinson_trace), ("hutchpp", hutchpp_trace)]:
        for n in (24, 96, 384):
            vals = [est(A, n, seed=s) for s in range(5)]
            for v in vals:
                assert abs(v.value - true) <= 5 * v.std_err + 1e-9, (method, n, v, true)
                assert v.n_samples == n and v.method == method
            errs[method, n] = sum(abs(v.value - true) for v in vals) / 5
            ses[method, n] = sum(v.std_err for v in vals) / 5
        assert errs[method, 384] < errs[method, 24]
    # Hutchinson's error bar shrinks like 1/sqrt(n): 16x the samples, about 4x smaller; Hutch++'s faster
    assert 2.5 < ses["hutchinson", 24] / ses["hutchinson", 384] < 6.5, ses
    assert ses["hutchpp", 24] / ses["hutchpp", 384] > 6.5, ses
    assert ses["hutchpp", 96] < ses["hutchinson", 96]  # a decaying spectrum is Hutch++'s regime


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_hessian_trace_stochastic_methods_on_the_loss_hessian(tiny, method):
    net, x, y = tiny
    true = float(dense_hessian(net, cross_entropy, x, y).trace())
    n = 300 if method == "hutchinson" else 30  # Hutch++: 10 sketch vectors of 32 dimensions
    est = hessian_trace(net, cross_entropy, (x, y), method=method, n_samples=n, seed=1)
    assert abs(est.value - true) <= 4 * est.std_err + 1e-12
    assert 0 < est.std_err < 0.25 * abs(true)
    assert est.n_samples == n


def test_exact_trace_is_hessian_trace_at_interpolation_and_gauss_newton_in_general():
    net = tanh_mlp()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(15, 3, generator=g, dtype=F64)
    # at interpolation (targets = outputs) the half-MSE Hessian is the Gauss-Newton matrix
    y_fit = net(x).detach()
    est = hessian_trace(net, half_mse, (x, y_fit), method="exact")
    assert est.method == "exact" and est.std_err == 0.0 and est.n_samples == 15
    assert est.value == pytest.approx(float(dense_hessian(net, half_mse, x, y_fit).trace()), rel=1e-10)
    # elsewhere: still the Gauss-Newton trace (1/n) sum_i ||J_i||_F^2, no longer the Hessian trace
    y_rand = torch.randn(15, 2, generator=g, dtype=F64)
    J = jacobian_rows(net, x)  # (N, k, P)
    gn = float(torch.einsum("ikp,ikq->pq", J, J).trace() / len(x))
    est = hessian_trace(net, half_mse, (x, y_rand), method="exact")
    assert est.value == pytest.approx(gn, rel=1e-10)
    assert abs(est.value - float(dense_hessian(net, half_mse, x, y_rand).trace())) > 1e-3 * gn


def test_per_example_grad_norms_sq_matches_jacobian_and_chunking():
    net = tanh_mlp(1)
    x = torch.randn(11, 3, dtype=F64)
    J = jacobian_rows(net, x)
    ref = J.pow(2).sum((1, 2))
    torch.testing.assert_close(per_example_grad_norms_sq(net, x), ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(per_example_grad_norms_sq(net, x, chunk_size=4), ref, rtol=1e-10, atol=0)
    # restricted to the first layer's weight (the bound chain's ||grad_W f(x_i)||_F^2)
    first = J[:, :, :15].pow(2).sum((1, 2))
    torch.testing.assert_close(per_example_grad_norms_sq(net, x, ["0.weight"]), first, rtol=1e-10, atol=0)
    # at other parameter values, given as a mapping
    w = {"0.weight": 2 * net[0].weight.detach()}
    net2 = tanh_mlp(1)
    with torch.no_grad():
        net2[0].weight.mul_(2)
    torch.testing.assert_close(per_example_grad_norms_sq(net, x, w),
                               jacobian_rows(net2, x)[:, :, :15].pow(2).sum((1, 2)), rtol=1e-10, atol=0)


def test_exact_trace_on_a_linear_model_closed_form():
    # f(x) = W x + b, k outputs: ||grad f(x)||_F^2 = k (||x||^2 + 1)
    net = nn.Linear(4, 3).to(F64)
    x = torch.randn(9, 4, dtype=F64)
    est = hessian_trace(net, half_mse, (x, net(x).detach()), method="exact")
    assert est.value == pytest.approx(3 * float((x.pow(2).sum(1) + 1).mean()), rel=1e-12)


# ---------------------------------------------------------------------------------------------- hygiene

def test_model_is_left_unchanged(tiny):
    net, x, y = tiny
    net.train()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    hessian_eigenvalues(net, cross_entropy, (x, y), k=2)
    hessian_trace(net, cross_entropy, (x, y), method="hutchinson", n_samples=4)
    hessian_trace(net, None, (x, y), method="exact")
    assert net.training and all(m.training for m in net.modules())
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


def test_batchnorm_running_stats_untouched_and_eval_mode_used():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1)).to(F64)
    x, y = torch.randn(16, 3, dtype=F64), torch.randn(16, 1, dtype=F64)
    net.train()
    stats = net[1].running_mean.clone()
    a = hessian_eigenvalues(net, half_mse, (x, y), k=1, tol=1e-10)
    b = hessian_eigenvalues(net, half_mse, (x, y), k=1, tol=1e-10, batch_size=5)  # eval mode: chunks agree
    torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
    assert torch.equal(net[1].running_mean, stats) and net.training


def test_bad_input_raises(tiny):
    net, x, y = tiny
    with pytest.raises(ValueError, match="method"):
        hessian_eigenvalues(net, half_mse, (x, y), method="arnoldi")
    with pytest.raises(ValueError, match="k=0"):
        hessian_eigenvalues(net, half_mse, (x, y), k=0)
    with pytest.raises(ValueError, match="k=33"):
        hessian_eigenvalues(net, half_mse, (x, y), k=33)
    with pytest.raises(ValueError, match="method"):
        hessian_trace(net, half_mse, (x, y), method="exactly")
    with pytest.raises(ValueError, match="first dimensions differ"):
        hessian_trace(net, half_mse, (x, y[:5]), method="hutchinson")
    with pytest.raises(ValueError, match="batch_size"):
        HessianOperator(net, half_mse, (x, y), batch_size=0)
    with pytest.raises(ValueError, match="unknown params entry"):
        HessianOperator(net, half_mse, (x, y), params=["nope.weight"])
    with pytest.raises(TypeError, match="loss_fn"):
        HessianOperator(net, "half_mse", (x, y))
    with pytest.raises(ValueError, match="n_samples"):
        hutchpp_trace(torch.eye(3, dtype=F64), 3)
    with pytest.raises(ValueError, match="square"):
        lanczos(torch.ones(2, 3))


def test_hessian_trace_auto_uses_the_loss_curvature():
    """Default method: exact Gauss-Newton form only for half_mse; for another loss the true trace (Hutch++)."""
    from flatness.losses import sigmoid_bce

    torch.manual_seed(0)
    model = FCN((3, 8, 1), seed=0).double()
    x = torch.randn(20, 3, dtype=F64)
    y = (x[:, 0] > 0).long()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return sigmoid_bce(torch.func.functional_call(model, p, (x,)), y)

    dense = torch.func.hessian(loss)(params)
    names = list(params)
    true_trace = sum(float(torch.diagonal(dense[n][n].reshape(params[n].numel(), -1)).sum()) for n in names)
    est = hessian_trace(model, sigmoid_bce, (x, y), n_samples=3 * params_count(params), seed=0)
    assert est.method == "hutchpp"
    # Hutch++ with 3x as many probes as parameters sketches the whole space: exact up to round-off
    assert est.value == pytest.approx(true_trace, rel=1e-6)
    gauss_newton = hessian_trace(model, sigmoid_bce, (x, y), method="gauss_newton")
    assert gauss_newton.method == "gauss_newton"
    assert abs(gauss_newton.value - true_trace) > 0.5 * true_trace  # what the old default silently returned
    with pytest.raises(ValueError, match="method='exact'.*sigmoid_bce.*gauss_newton"):
        hessian_trace(model, sigmoid_bce, (x, y), method="exact")
    assert hessian_trace(model, half_mse, (x, model(x).detach())).method == "exact"


def params_count(params) -> int:
    return sum(p.numel() for p in params.values())


def test_hessian_trace_changes_under_alpha_rescale():
    """Function-space quantities are invariant; the Hessian trace is not (Dinh et al.)."""
    from flatness.models import alpha_rescale

    model = FCN((4, 16, 16, 3), seed=1).double()
    x = torch.randn(12, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    scaled = alpha_rescale(model, 0, 4.0)
    assert torch.allclose(scaled(x), model(x), atol=1e-12)
    t0 = hessian_trace(model, half_mse, (x, model(x).detach())).value
    t1 = hessian_trace(scaled, half_mse, (x, scaled(x).detach())).value
    assert abs(t1 - t0) > 0.1 * t0


# ---------------------------------------------------------------------------------------------- fast per-example norms

class _Tokens(nn.Module):
    """Linear layers on (N, T, D) tokens, a LayerNorm and attention (generic path), a tied weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.att = nn.MultiheadAttention(6, 2, batch_first=True)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.ln(self.emb(x))
        h = h + self.att(h, h, h, need_weights=False)[0]
        h = torch.tanh(self.mix(h))
        h = torch.nn.functional.linear(h, self.mix.weight)  # mix.weight used twice: must not be factorised
        return self.head(h.mean(1))


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2, stride=2, dilation=1), nn.ReLU(inplace=True),
        nn.Conv2d(4, 2, 3, padding=1, groups=2),  # grouped: generic path
        nn.Flatten(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3),
    ).to(F64)


def _conv1d_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1, stride=2), nn.BatchNorm1d(3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(9, 2)).to(F64)


class _DeadBranch(nn.Module):
    """A conv branch computed but unused (its layer-output gradients are ``None``: zero norms), next to
    a used one; the unused convs take both paths (per-example weight gradients formed, and the ghost norm)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)  # P = 36, D = 9, C = 2: direct
        self.conv2 = nn.Conv2d(2, 8, 3, stride=3)  # P = 4, D = 18, C = 8: ghost
        self.used = nn.Conv2d(1, 2, 3, padding=1)
        self.lin = nn.Linear(72, 2)

    def forward(self, x):
        self.dead = self.conv2(torch.tanh(self.conv(x)))
        return self.lin(torch.tanh(self.used(x)).flatten(1))


def test_factorised_norms_of_a_layer_the_outputs_do_not_depend_on():
    torch.manual_seed(3)
    net = _DeadBranch().to(F64)
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    ref = jacobian_rows(net, x).pow(2).sum((1, 2))
    torch.testing.assert_close(per_example_grad_norms_sq(net, x), ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(per_example_grad_norms_sq(net, x, chunk_size=3), ref, rtol=1e-10, atol=0)


@pytest.mark.parametrize("make,shape", [(_conv_net, (5, 2, 7, 7)), (_conv1d_net, (6, 2, 5)),
                                        (lambda: _Tokens().to(F64), (4, 5, 4))])
def test_factorised_per_example_norms_match_dense_jacobians(make, shape):
    """Ghost / factorised norms (conv, pooling, in-place ReLU, token Linear) + vmap fallback vs the dense Jacobian."""
    net = make()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    with torch.no_grad():  # non-trivial batch-norm statistics (eval mode)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    net.eval()
    ref = jacobian_rows(net, x).pow(2).sum((1, 2))
    torch.testing.assert_close(per_example_grad_norms_sq(net, x), ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(per_example_grad_norms_sq(net, x, chunk_size=2), ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(per_example_grad_norms_sq(net, x, method="vmap"), ref, rtol=1e-10, atol=0)
    # one parameter only (a bias, then a weight)
    names = [n for n, _ in net.named_parameters()]
    J = jacobian_rows(net, x)
    sizes = [p.numel() for p in net.parameters()]
    offs = torch.tensor([0] + sizes).cumsum(0)
    for i in (1, 2):
        ref_i = J[:, :, offs[i]:offs[i + 1]].pow(2).sum((1, 2))
        torch.testing.assert_close(per_example_grad_norms_sq(net, x, [names[i]]), ref_i, rtol=1e-10, atol=0)


def test_per_example_norms_float32_equal_authors_algorithm():
    """float32, the authors' way (one input, one output at a time, parameter .grad): equal to 1e-5 relative."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=2), nn.ReLU(True), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 5 * 5, 6), nn.ReLU(True), nn.Linear(6, 3))
    x = torch.rand(4, 3, 8, 8)
    ref = []
    for i in range(len(x)):
        out = net(x[i:i + 1]).reshape(-1)
        tot = 0.0
        for j in range(len(out)):
            net.zero_grad()
            out[j].backward(retain_graph=True)
            tot += sum(float(p.grad.double().pow(2).sum()) for p in net.parameters())
        ref.append(tot)
    net.zero_grad(set_to_none=True)
    got = per_example_grad_norms_sq(net, x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=F64), rtol=1e-5, atol=0)


def test_gauss_newton_trace_any_loss_and_exact_only_for_half_mse(tiny):
    from flatness.losses import sigmoid_bce

    net, x, y = tiny
    J = jacobian_rows(net, x)
    gn = float(J.pow(2).sum() / len(x))
    for loss in (cross_entropy, half_mse, None):
        est = hessian_trace(net, loss, (x, y), method="gauss_newton")
        assert est.method == "gauss_newton" and est.value == pytest.approx(gn, rel=1e-10)
    assert hessian_trace(net, None, (x, y), method="exact").value == pytest.approx(gn, rel=1e-10)
    with pytest.raises(ValueError, match="method='exact'.*loss_fn=cross_entropy.*gauss_newton.*hutchpp"):
        hessian_trace(net, cross_entropy, (x, y), method="exact")
    one = FCN((3, 4, 1), seed=0).to(F64)
    with pytest.raises(ValueError, match="loss_fn=sigmoid_bce"):
        hessian_trace(one, sigmoid_bce, (x, (y > 0).to(F64)), method="exact")


# ---------------------------------------------------------------------------------------------- bad models and labels

def _nan_net(where: str = "1.weight"):
    net = FCN((3, 5, 2), seed=0).to(F64)
    with torch.no_grad():
        dict(net.named_parameters())[where][0, 0] = float("nan") if where.endswith("weight") else float("inf")
    return net


@pytest.mark.parametrize("call", [
    lambda n, d: hessian_eigenvalues(n, cross_entropy, d, k=1),
    lambda n, d: hessian_trace(n, cross_entropy, d),
    lambda n, d: hessian_trace(n, None, d, method="gauss_newton"),
    lambda n, d: hessian_trace(n, half_mse, d, method="exact"),
    lambda n, d: per_example_grad_norms_sq(n, d[0]),
    lambda n, d: HessianOperator(n, cross_entropy, d),
])
def test_non_finite_parameters_are_rejected_naming_the_tensor(tiny, call):
    _, x, y = tiny
    with pytest.raises(ValueError, match=r"model parameter '3.weight' holds 1 non-finite"):
        call(_nan_net("3.weight"), (x, y))


def test_non_finite_operator_and_params_mapping_rejected(tiny):
    net, x, y = tiny
    A = torch.eye(3, dtype=F64)
    A[0, 1] = float("nan")
    with pytest.raises(ValueError, match="lanczos: operator holds 1 non-finite"):
        lanczos(A)
    bad = {"1.weight": torch.full((5, 3), float("nan"), dtype=F64)}
    with pytest.raises(ValueError, match=r"params\['1.weight'\] holds 15 non-finite"):
        per_example_grad_norms_sq(net, x, bad)


def test_labels_checked_against_the_loss(tiny):
    from flatness.losses import sigmoid_bce

    net, x, y = tiny
    one = FCN((3, 4, 1), seed=0).to(F64)
    y5 = (y * 5).to(F64)  # {0, 5}: a negative BCE loss, a meaningless curvature
    with pytest.raises(ValueError, match=r"hessian_trace: labels y must lie in \{0, 1\} for sigmoid_bce"):
        hessian_trace(one, sigmoid_bce, (x, y5))
    with pytest.raises(ValueError, match=r"hessian_eigenvalues: labels y must lie in \{0, 1\}"):
        hessian_eigenvalues(one, sigmoid_bce, (x, y5))
    with pytest.raises(ValueError, match=r"hessian_trace: labels y must lie in \{0, 1\}"):
        hessian_trace(one, sigmoid_bce, (x, y5), method="gauss_newton")
    y_nan = y.to(F64)
    y_nan[3] = float("nan")
    with pytest.raises(ValueError, match="HessianOperator: labels y hold 1 non-finite"):
        HessianOperator(one, sigmoid_bce, (x, y_nan))
    with pytest.raises(ValueError, match=r"class indices in \[0, 1\] for cross_entropy"):
        hessian_eigenvalues(net, cross_entropy, (x, y + 1))
