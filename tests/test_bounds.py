"""Sharpness bounds (flatness.bounds): chains hold on random networks, terms match dense oracles."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian
from torch.func import functional_call, hessian

from flatness.bounds import lvr_bound, mls_bound_chain, nmls_bound
from flatness.compression import network_mls
from flatness.losses import half_mse
from flatness.models import FCN, SmallVGG


# ------------------------------------------------------------------------------------------ oracles
def dense_trace_hessian(model: nn.Module, x: torch.Tensor) -> float:
    """Trace of the dense Hessian of half_mse at interpolation (targets = the model's outputs)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    with torch.no_grad():
        y = model(x)

    def loss(v):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = v[i:i + s.numel()].reshape(s)
            i += s.numel()
        return half_mse(functional_call(model, params, (x,)), y)

    return float(torch.diagonal(hessian(loss)(flat)).sum())


def per_example_weight_grad_norm(model: nn.Module, weight: nn.Parameter, x: torch.Tensor) -> torch.Tensor:
    """||grad_W f(x_i)||_F summed over outputs, one input and one output at a time."""
    out = []
    for xi in x:
        f = model(xi.unsqueeze(0)).reshape(-1)
        sq = 0.0
        for j in range(f.numel()):
            (g,) = torch.autograd.grad(f[j], weight, retain_graph=True)
            sq += float(g.pow(2).sum())
        out.append(math.sqrt(sq))
    return torch.tensor(out, dtype=torch.float64)


def leq(a: float, b: float, rtol: float = 1e-9) -> bool:
    if math.isinf(a) or math.isinf(b):  # log terms are -inf for rank-deficient Jacobians
        return a <= b
    return a <= b + rtol * abs(b) + 1e-12


def random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    d = int(torch.randint(2, 7, (1,), generator=g))
    k = int(torch.randint(1, 4, (1,), generator=g))
    h1, h2 = (int(v) for v in torch.randint(3, 13, (2,), generator=g))
    n = int(torch.randint(1, 9, (1,), generator=g))
    model = FCN((d, h1, h2, k), sigma_b=float(torch.rand(1, generator=g)), seed=seed).double()
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * float(0.2 + 3 * torch.rand(1, generator=g))
    return model, x


# -------------------------------------------------------------------------------- property tests
@pytest.mark.parametrize("seed", range(50))
def test_chains_hold_on_random_networks(seed):
    model, x = random_case(seed)
    tr = dense_trace_hessian(model, x)
    c = mls_bound_chain(model, x, trace_hessian=tr)
    assert leq(c.A, c.A_fro) and leq(c.A_fro, c.B) and leq(c.B, c.C) and leq(c.C, c.D), c.as_dict()
    assert (c.mls <= c.jac_fro * (1 + 1e-9)).all() and (c.jac_fro <= c.per_input_bound * (1 + 1e-9) + 1e-12).all()
    lv = lvr_bound(model, x, trace_hessian=tr)
    terms = [lv.log_lhs, lv.log_amgm, lv.log_partial, lv.log_partial_mean, lv.log_rhs]
    assert all(leq(a, b) for a, b in zip(terms, terms[1:])), lv.as_dict()
    per = [lv.log_volume, lv.log_amgm_per_input, lv.log_partial_per_input]
    assert all(leq(float(a), float(b)) for u, v in zip(per, per[1:]) for a, b in zip(u, v))
    nb = nmls_bound(model, x, trace_hessian=tr)
    terms = [nb.lhs, nb.layerwise, nb.cs_layers, nb.cs_inputs, nb.rhs]
    assert nb.rigorous and all(leq(a, b) for a, b in zip(terms, terms[1:])), nb.as_dict()


# ------------------------------------------------------------------------------- terms vs oracles
def test_terms_match_dense_oracles():
    torch.manual_seed(11)
    model, x = FCN((5, 16, 12, 3), seed=11).double(), torch.randn(6, 5, dtype=torch.float64)
    tr = dense_trace_hessian(model, x)
    c = mls_bound_chain(model, x)  # trace_hessian=None: computed at interpolation
    assert c.trace_hessian == pytest.approx(tr, rel=1e-9)
    w = model[1].weight
    g = per_example_weight_grad_norm(model, w, x)
    torch.testing.assert_close(c.grad_w_norm, g, rtol=1e-9, atol=0)
    jac = torch.stack([jacobian(lambda z: model(z[None])[0], xi) for xi in x])
    s = torch.linalg.svdvals(jac)
    assert c.A == pytest.approx(float(s[:, 0].mean()), rel=1e-9)
    w2 = float(torch.linalg.svdvals(w.detach())[0])
    xn = x.norm(dim=1)
    assert c.w_spectral_norm == pytest.approx(w2, rel=1e-12)
    assert c.B == pytest.approx(w2 * float((g / xn).mean()), rel=1e-9)
    inv = math.sqrt(float((1 / xn**2).mean()))
    assert c.C == pytest.approx(w2 * inv * math.sqrt(float((g**2).mean())), rel=1e-9)
    assert c.D == pytest.approx(w2 * inv * math.sqrt(tr), rel=1e-9)
    lv = lvr_bound(model, x, trace_hessian=tr)
    assert lv.log_lhs == pytest.approx(float(torch.log(s).sum(1).mean()), rel=1e-9)
    assert lv.log_rhs == pytest.approx(1.5 * math.log(w2**2 * tr / 3) - 3 * float(torch.log(xn).mean()), rel=1e-9)
    nb = nmls_bound(model, x, trace_hessian=tr)
    assert nb.layers == ["1", "3", "5"]
    for li, idx in enumerate((1, 3, 5)):
        lin = model[idx]
        torch.testing.assert_close(nb.grad_w_norm[:, li], per_example_weight_grad_norm(model, lin.weight, x),
                                   rtol=1e-9, atol=1e-12)
        assert float(nb.coef[li]) == pytest.approx(float(torch.linalg.svdvals(lin.weight.detach())[0]) ** 2)
        with torch.no_grad():
            h = x
            for m in list(model)[:idx]:
                h = m(h)
        torch.testing.assert_close(nb.h_norm[:, li], h.norm(dim=1), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------- equality cases
def test_equality_single_linear_output():
    """f = w.x (k = 1, no bias), inputs of equal norm: A = B = C = D and all LVR/NMLS terms coincide."""
    torch.manual_seed(12)
    lin = nn.Linear(4, 1, bias=False).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    x = 2.0 * x / x.norm(dim=1, keepdim=True)
    c = mls_bound_chain(lin, x)
    for v in (c.A_fro, c.B, c.C, c.D):
        assert v == pytest.approx(c.A, rel=1e-10)
    assert c.A == pytest.approx(float(lin.weight.detach().norm()), rel=1e-10)
    lv = lvr_bound(lin, x[:1])
    for v in (lv.log_amgm, lv.log_partial, lv.log_partial_mean, lv.log_rhs):
        assert v == pytest.approx(lv.log_lhs, rel=1e-10, abs=1e-12)
    nb = nmls_bound(lin, x[:1])
    for v in (nb.layerwise, nb.cs_layers, nb.cs_inputs, nb.rhs):
        assert v == pytest.approx(nb.lhs, rel=1e-10)


def test_single_input_b_equals_c():
    model, x = FCN((4, 6, 5, 2), seed=13).double(), torch.randn(1, 4, dtype=torch.float64)
    c = mls_bound_chain(model, x, trace_hessian=dense_trace_hessian(model, x))
    assert c.B == pytest.approx(c.C, rel=1e-12) and c.A < c.B and c.C < c.D


# ------------------------------------------------------------------------------------ weight sharing
def conv_counterexample() -> nn.Module:
    """1x1 conv (w = 1) on a 2-pixel input, readout a = (1, -1): grad_w f = a.x = 0 at x = (1, 1)."""
    conv = nn.Conv1d(1, 1, 1, bias=False).double()
    lin = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
        lin.weight.copy_(torch.tensor([[1.0, -1.0]]))
    return nn.Sequential(conv, nn.Flatten(), lin)


def test_conv_bounds_are_not_bounds():
    model = conv_counterexample()
    x = torch.ones(1, 1, 2, dtype=torch.float64)
    nb = nmls_bound(model, x)
    assert not nb.rigorous
    assert nb.lhs == pytest.approx(2 * math.sqrt(2)) and nb.rhs == pytest.approx(2.0)  # violated
    with pytest.raises(ValueError, match="nmls_bound: layer '0' \\(Conv1d\\) shares its weight"):
        nmls_bound(model, x, conv="raise")
    with pytest.raises(NotImplementedError, match="mls_bound_chain: the first layer '0' is Conv1d"):
        mls_bound_chain(model, x)
    with pytest.raises(NotImplementedError, match="lvr_bound: the first layer"):
        lvr_bound(model, x)


def test_small_vgg_reference_variant_runs():
    torch.manual_seed(14)
    nb = nmls_bound(SmallVGG(), torch.rand(2, 3, 32, 32))
    assert not nb.rigorous and nb.sigma.shape == (2, 7) and math.isfinite(nb.rhs) and nb.rhs > 0


def test_bad_input():
    model, x = FCN((4, 6, 2), seed=15).double(), torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="mls_bound_chain: trace_hessian=-1.0 must be finite and >= 0"):
        mls_bound_chain(model, x, trace_hessian=-1.0)
    with pytest.raises(ValueError, match="nmls_bound: unknown conv='ignore'"):
        nmls_bound(model, x, conv="ignore")
    pre = nn.Sequential(nn.Flatten(), nn.Tanh(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="does not receive the raw input"):
        mls_bound_chain(pre, x)


# ------------------------------------------------------------------ conventions (issue 7), hand-computed
def two_layer_linear() -> nn.Module:
    """f(x) = w2 W1 x with W1 = diag(3, 1), w2 = (1, 2): ||W1||_2 = 3, ||w2||_2 = sqrt(5), J = (3, 2)."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        model[1].weight.copy_(torch.tensor([[1.0, 2.0]]))
    return model


def test_g5_weight_norm_all_layers_by_hand(one_thread):
    model, x = two_layer_linear(), torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    # grad_W1 f = w2^T x^T: ||.||_F = sqrt(5) ||x||; grad_w2 f = (W1 x)^T; ||x|| = 1, 2; W1 x = (3, 0), (0, 2)
    tr = (5 * 1 + 9 + 5 * 4 + 4) / 2  # mean_i ||grad_theta f(x_i)||^2 = 19
    inv_x = math.sqrt((1 + 1 / 4) / 2)
    partial = math.sqrt((5 * 1 + 5 * 4) / 2)
    for wn, omega in (("first", 3.0), ("all_layers", math.sqrt(9 + 5))):
        c = mls_bound_chain(model, x, weight_norm=wn)
        assert c.weight_norm == wn and c.weight_factor == pytest.approx(omega, rel=1e-12)
        assert c.A == pytest.approx(math.sqrt(13), rel=1e-12) and c.w_spectral_norm == pytest.approx(3.0)
        assert c.B == pytest.approx(omega * math.sqrt(5), rel=1e-12)
        assert c.C == pytest.approx(omega * inv_x * partial, rel=1e-12)
        assert c.D == pytest.approx(omega * inv_x * math.sqrt(tr), rel=1e-12)
        assert c.trace_hessian == pytest.approx(tr, rel=1e-12)
    with pytest.raises(ValueError, match="mls_bound_chain: unknown weight_norm='last'"):
        mls_bound_chain(model, x, weight_norm="last")


def test_lvr_top_k_diagonal_map_by_hand(one_thread):
    lin = nn.Linear(3, 3, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([4.0, 2.0, 1.0])))
    x = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # unit norms
    lv = lvr_bound(lin, x, top_k=2)
    # lambda = 16, 4, 1; ||grad_W f||^2 = k ||x||^2 = 3; Tr H = 3; ||W||_2 = 4
    assert lv.r == 2 and lv.top_k == 2
    assert lv.log_lhs == pytest.approx(math.log(8.0), rel=1e-12)  # log(4 * 2)
    assert lv.log_amgm_top == pytest.approx(math.log(10.0), rel=1e-12)  # (2/2) log((16 + 4) / 2)
    assert lv.log_amgm == pytest.approx(math.log(10.5), rel=1e-12)  # log(21 / 2)
    assert lv.log_partial == pytest.approx(math.log(24.0), rel=1e-12)  # log(16 * 3 / 2)
    assert lv.log_partial_mean == pytest.approx(math.log(24.0), rel=1e-12)
    assert lv.log_rhs == pytest.approx(math.log(24.0), rel=1e-12)
    full = lvr_bound(lin, x)
    assert full.r == 3 and full.log_lhs == pytest.approx(math.log(8.0), rel=1e-12)
    assert full.log_amgm_top == pytest.approx(full.log_amgm, rel=1e-12) == 1.5 * math.log(7.0)
    with pytest.raises(ValueError, match="lvr_bound: top_k=4 exceeds the maximum 3"):
        lvr_bound(lin, x, top_k=4)


class ViewCNN(nn.Module):
    """The authors' pattern: conv features, ``x.view(x.size(0), -1)``, a Linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 3, 3, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(3, 4, 3, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 3))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


def test_nmls_authors_variant_cnn_by_formula(one_thread):
    torch.manual_seed(40)
    model = ViewCNN().double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    tr = dense_trace_hessian(model, x)
    nb = nmls_bound(model, x, variant="authors")
    assert nb.variant == "authors" and not nb.rigorous and nb.layers == ["features.0", "features.3", "classifier.0",
                                                                          "classifier.2"]
    assert nb.trace_hessian == pytest.approx(tr, rel=1e-9)
    # their c_l: ||W||_F^2 * H_out W_out (conv: 6x6, 5x5 outputs), ||W||_F^2 for Linear layers
    mods = [model.features[0], model.features[3], model.classifier[0], model.classifier[2]]
    want_c = [float(m.weight.detach().pow(2).sum()) * p for m, p in zip(mods, (36, 25, 1, 1))]
    torch.testing.assert_close(nb.coef_authors, torch.tensor(want_c, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(nb.coef, nb.coef_authors, rtol=0, atol=0)
    hs = []
    with torch.no_grad():
        h0 = x
        h1 = model.features[:3](h0)
        h2 = model.features(h0).view(3, -1)
        h3 = model.classifier[:2](h2)
    hs = torch.stack([h.reshape(3, -1).norm(dim=1) for h in (h0, h1, h2, h3)], 1)
    torch.testing.assert_close(nb.h_norm, hs, rtol=1e-12, atol=0)
    harm = (torch.tensor(want_c, dtype=torch.float64) / (hs**2 + 1e-4)).sum(1).mean()
    assert nb.rhs == pytest.approx(math.sqrt(tr) * math.sqrt(float(harm)), rel=1e-9)
    assert nb.authors_rhs == nb.rhs
    # per-layer gradient norms: conv terms (direct and ghost-norm paths) vs one-output-at-a-time autograd
    for li, m in enumerate(mods):
        torch.testing.assert_close(nb.grad_w_norm[:, li], per_example_weight_grad_norm(model, m.weight, x),
                                   rtol=1e-9, atol=1e-12)
    ours = nmls_bound(model, x, trace_hessian=tr)
    assert ours.variant == "ours" and not ours.rigorous and ours.ours_rhs == ours.rhs
    assert ours.authors_rhs == pytest.approx(nb.rhs, rel=1e-12)
    assert float(ours.coef[2]) == pytest.approx(float(torch.linalg.matrix_norm(mods[2].weight.detach(), 2)) ** 2)
    with pytest.raises(ValueError, match="nmls_bound: unknown variant='theirs'"):
        nmls_bound(model, x, variant="theirs")


def test_nmls_authors_variant_fnn_spectral_plus_eps(one_thread):
    model, x = FCN((4, 6, 5, 2), seed=41).double(), torch.randn(3, 4, dtype=torch.float64)
    nb = nmls_bound(model, x, variant="authors")
    torch.testing.assert_close(nb.coef_authors, nb.coef_ours, rtol=0, atol=0)  # no conv: ||W_l||_2^2 (their FNN)
    harm = (nb.coef_ours / (nb.h_norm**2 + 1e-4)).sum(1).mean()
    assert nb.rhs == pytest.approx(math.sqrt(nb.trace_hessian * float(harm)), rel=1e-12)
    assert nb.rhs < nb.ours_rhs and nb.ours_rhs == pytest.approx(nmls_bound(model, x).rhs, rel=1e-12)


def shared_layers_model() -> nn.Module:
    """Conv1d (groups=2, stride 2, dilation 2), a token-wise Linear on (N, T, F), then a readout."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2)
            self.tok = nn.Linear(6, 5)
            self.out = nn.Linear(15, 2)

        def forward(self, x):
            h = torch.tanh(self.conv(x))  # (N, 6, 3)
            return self.out(torch.tanh(self.tok(h.transpose(1, 2))).flatten(1))

    torch.manual_seed(42)
    return M().double()


def test_shared_layer_gradient_norms_and_trace(one_thread):
    model, x = shared_layers_model(), torch.randn(3, 4, 8, dtype=torch.float64)
    nb = nmls_bound(model, x)
    for li, m in enumerate((model.conv, model.tok, model.out)):
        torch.testing.assert_close(nb.grad_w_norm[:, li], per_example_weight_grad_norm(model, m.weight, x),
                                   rtol=1e-9, atol=1e-12)
    assert nb.trace_hessian == pytest.approx(dense_trace_hessian(model, x), rel=1e-9)


def test_view_cnn_and_non_finite_and_skip(one_thread):
    torch.manual_seed(43)
    nb = nmls_bound(ViewCNN(), torch.rand(2, 2, 4, 4))  # float32, x.view in forward
    assert math.isfinite(nb.rhs) and nb.sigma.shape == (2, 4)
    model, x = FCN((4, 6, 2), seed=44).double(), torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    for f in (mls_bound_chain, lvr_bound, nmls_bound):
        with pytest.raises(ValueError, match=f"{f.__name__}: model parameter '1.bias' holds 1 non-finite"):
            f(model, x)

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.skip = nn.Linear(4, 5), nn.Linear(5, 2), nn.Linear(4, 2)

        def forward(self, z):
            return self.fc2(torch.tanh(self.fc1(z))) + self.skip(z)

    with pytest.raises(ValueError, match="mls_bound_chain: x reaches the output other than through the first layer"):
        mls_bound_chain(Skip().double(), x)
    with pytest.raises(ValueError, match=r"lvr_bound: x has shape \(3, 5\)"):
        lvr_bound(FCN((4, 6, 2), seed=44).double(), torch.randn(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(12))
def test_options_keep_the_chains(seed, one_thread):
    model, x = random_case(seed)
    tr = dense_trace_hessian(model, x)
    c = mls_bound_chain(model, x, trace_hessian=tr, weight_norm="all_layers")
    assert leq(c.A, c.A_fro) and leq(c.A_fro, c.B) and leq(c.B, c.C) and leq(c.C, c.D), c.as_dict()
    lv = lvr_bound(model, x, trace_hessian=tr, top_k=1)
    terms = [lv.log_lhs, lv.log_amgm_top, lv.log_amgm, lv.log_partial, lv.log_partial_mean, lv.log_rhs]
    assert lv.r == 1 and all(leq(a, b) for a, b in zip(terms, terms[1:])), lv.as_dict()


class _DeadLayer(nn.Module):
    """A Linear layer called on x but not used by the output: zero Jacobians and zero weight gradients."""

    def __init__(self):
        super().__init__()
        self.a, self.dead, self.b = nn.Linear(6, 5), nn.Linear(6, 4), nn.Linear(5, 3)

    def forward(self, x):
        self.unused = self.dead(x)
        return self.b(torch.tanh(self.a(x)))


def test_layer_the_outputs_do_not_depend_on(one_thread):
    torch.manual_seed(45)
    model, x = _DeadLayer().double(), torch.randn(4, 6, dtype=torch.float64)
    per_layer = network_mls(model, x, per_layer=True)
    assert torch.equal(per_layer["dead"], torch.zeros(4, dtype=torch.float64))
    nb = nmls_bound(model, x)
    assert torch.equal(nb.sigma[:, 0], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(nb.grad_w_norm[:, 0], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(nb.sigma[:, 1:], torch.stack([per_layer["a"], per_layer["b"]], 1), rtol=1e-12, atol=0)
