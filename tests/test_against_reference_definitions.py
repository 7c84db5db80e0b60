"""The authors' conventions (chinsengi/sharpdim @ 2bcbe24), each pinned by a case computed by hand.

Every expected value below is a closed form derived in the comment next to it (linear maps with chosen
singular values, diagonal two-layer nets, a 1x1 convolution, a linear model's Gauss-Newton trace, a
quadratic loss under uniform noise, an Adam trajectory with a constant gradient), never the output of our
implementation or of theirs. The conventions (see ``benchmarks/_authors.py`` for where each lives in
their code):

(a) MLS = sigma_1 of the logits' input Jacobian; log volume = (1/2) sum of log of the top 3 eigenvalues of
    J J^T; local dim = participation ratio of the squared singular values; ||J||_F^2 their ``G``.
    NMLS = sum over Linear/Conv layers of sigma_1(d f / d h_{l-1}). Models that flatten with ``x.view``.
(b) Fig. G.5 multiplies B, C, D by sqrt(sum_l ||W_l||_2^2) over all layers; Fig. 3's MLS bound "D" uses
    the first layer's ||W_1||_2 (their ``W0``).
(c) log-volume bound with the top-3 volume.
(d) NMLS bound term sum_l c_l / (||h_{l-1}||^2 + 1e-4): c_l = ||W_l||_2^2 for their FNN, ||W_l||_F^2 for
    every layer of a CNN, conv terms times the output positions.
(e) Sharpness = Tr (1/n) sum_i J_theta(x_i)^T J_theta(x_i) (Gauss-Newton trace); "exact" refuses other losses.
(f) Average adaptive sharpness, l-inf: delta_p = rho |w_p| u_p, u_p ~ U(-1, 1); value = raw / rho^2.
(g) ViT adversarial MLS: ratio ||sigma(f(x+d)) - sigma(f(x))|| / ||d|| at the last of 30 evaluations
    (after 29 Adam steps, lr 0.1), no clipping.
(h) Parameter counts of their small VGG (97,018), LeNet-5 (62,006) and FNN 784-500-500-500-10 (898,510).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatness.bounds import lvr_bound, mls_bound_chain, nmls_bound
from flatness.compression import adversarial_mls, local_metrics, network_mls
from flatness.hessian import hessian_trace
from flatness.losses import half_mse, sigmoid_bce
from flatness.sharpness import adaptive_sharpness

pytestmark = pytest.mark.usefixtures("one_thread")
D64 = torch.float64


def _linear(weight: list[list[float]], bias: bool = False) -> nn.Linear:
    w = torch.tensor(weight, dtype=D64)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias).to(D64)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(torch.linspace(-1.0, 1.0, w.shape[0], dtype=D64))
    return lin


# --------------------------------------------------------------------------------- (a) local metrics
def _map_with_singular_values(s: list[float], d: int) -> torch.Tensor:
    """A = U diag(s) V^T with U = Hadamard/2 (4x4, orthogonal) and V = columns (2, 0, 5, 3) of I_d (signed)."""
    u = 0.5 * torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=D64)
    v = torch.zeros(d, 4, dtype=D64)
    for col, (row, sign) in enumerate([(2, 1.0), (0, -1.0), (5, 1.0), (3, -1.0)]):
        v[row, col] = sign
    return u @ torch.diag(torch.tensor(s, dtype=D64)) @ v.T


S = [5.0, 3.0, 2.0, 0.5]


def test_local_metrics_linear_map_authors_conventions():
    a = _map_with_singular_values(S, 6)
    model = _linear(a.tolist(), bias=True)  # the bias does not change the Jacobian
    x = torch.randn(3, 6, dtype=D64, generator=torch.Generator().manual_seed(0))
    m = local_metrics(model, x, top_k=3)
    lam = [s * s for s in S]
    # MLS = sigma_1; log volume (top 3) = log(5 * 3 * 2); PR of lambda; ||J||_F^2 = sum lambda
    torch.testing.assert_close(m["mls"], torch.full((3,), 5.0, dtype=D64))
    torch.testing.assert_close(m["log_volume"], torch.full((3,), math.log(30.0), dtype=D64))
    pr = sum(lam) ** 2 / sum(v * v for v in lam)
    torch.testing.assert_close(m["local_dim"], torch.full((3,), pr, dtype=D64))
    torch.testing.assert_close(m["jac_fro"] ** 2, torch.full((3,), sum(lam), dtype=D64))
    # all r = 4 eigenvalues without top_k: log(5 * 3 * 2 * 0.5)
    full = local_metrics(model, x)
    torch.testing.assert_close(full["log_volume"], torch.full((3,), math.log(15.0), dtype=D64))


def test_local_metrics_default_output_is_the_logits():
    """Their get_dim differentiates the raw model outputs: no sigmoid/softmax by default."""
    model = _linear([[2.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[3.0, -1.0]], dtype=D64)
    assert float(local_metrics(model, x)["mls"][0]) == pytest.approx(2.0, rel=1e-12)
    # sigmoid of (6, -1): J = diag(s'(6) * 2, s'(-1) * 1), s'(z) = s(z)(1 - s(z))
    sp = [torch.sigmoid(torch.tensor(z, dtype=D64)) * (1 - torch.sigmoid(torch.tensor(z, dtype=D64)))
          for z in (6.0, -1.0)]
    expected = max(2 * float(sp[0]), float(sp[1]))
    assert float(local_metrics(model, x, output="sigmoid")["mls"][0]) == pytest.approx(expected, rel=1e-10)


class _ViewConv(nn.Module):
    """1x1 conv (weight 2) on a (1, 2, 2) image, ``x.view`` flatten as the authors' CNNs, then Linear(4, 2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False).to(D64)
        self.fc = _linear([[1.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
        with torch.no_grad():
            self.conv.weight.fill_(2.0)

    def forward(self, x):
        x = self.conv(x)
        return self.fc(x.view(x.size(0), -1))


def test_local_metrics_and_nmls_on_a_model_that_calls_view():
    model = _ViewConv()
    x = torch.randn(2, 1, 2, 2, dtype=D64, generator=torch.Generator().manual_seed(1))
    # J = 2 * fc.weight: singular values 6 and 2
    m = local_metrics(model, x)
    torch.testing.assert_close(m["mls"], torch.full((2,), 6.0, dtype=D64))
    torch.testing.assert_close(m["local_dim"], torch.full((2,), (36 + 4) ** 2 / (36**2 + 4**2), dtype=D64))
    # NMLS = sigma_1(d f / d x) + sigma_1(d f / d h_1) = 6 + 3
    torch.testing.assert_close(network_mls(model, x), torch.full((2,), 9.0, dtype=D64))


# two-layer linear net f(x) = W2 W1 x with W1 = diag(2, 1, 0.5), W2 = [[3, 0, 0], [0, 1, 0]]
W1 = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]]
W2 = [[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
X2 = [[1.0, 2.0, 2.0], [0.0, 3.0, 4.0], [2.0, -1.0, 2.0]]  # norms 3, 5, 3


def _two_layer() -> nn.Sequential:
    return nn.Sequential(_linear(W1), _linear(W2))


def test_network_mls_two_layer_linear():
    # sigma_1(W2 W1) = sigma_1([[6,0,0],[0,1,0]]) = 6, sigma_1(W2) = 3
    out = network_mls(_two_layer(), torch.tensor(X2, dtype=D64))
    torch.testing.assert_close(out, torch.full((3,), 9.0, dtype=D64))


# ------------------------------------------------------------------------------ (b) Fig. G.5 chain
def _g5_expected(factor: float) -> dict[str, float]:
    """grad_{W1} f_j = W2[j]^T x^T, so sum_j ||.||^2 = ||W2||_F^2 ||x||^2 = 10 ||x||^2;
    grad_{W2} f_j = e_j (W1 x)^T, so sum_j ||.||^2 = k ||W1 x||^2 = 2 ||W1 x||^2."""
    norms2 = [sum(v * v for v in x) for x in X2]
    w1x2 = [sum((W1[i][i] * x[i]) ** 2 for i in range(3)) for x in X2]
    n = len(X2)
    inv = math.sqrt(sum(1 / v for v in norms2) / n)
    tr = sum(10 * a + 2 * b for a, b in zip(norms2, w1x2)) / n
    return {"A": 6.0, "B": factor * math.sqrt(10.0), "C": factor * inv * math.sqrt(10 * sum(norms2) / n),
            "D": factor * inv * math.sqrt(tr), "trace_hessian": tr}


@pytest.mark.parametrize("weight_norm, factor", [("all_layers", math.sqrt(2.0**2 + 3.0**2)), ("first", 2.0)])
def test_mls_bound_chain_weight_factor(weight_norm, factor):
    """Fig. G.5: B, C, D times sqrt(||W1||_2^2 + ||W2||_2^2) = sqrt(13); "first": ||W1||_2 = 2."""
    r = mls_bound_chain(_two_layer(), torch.tensor(X2, dtype=D64), weight_norm=weight_norm)
    exp = _g5_expected(factor)
    for key, value in exp.items():
        assert getattr(r, key) == pytest.approx(value, rel=1e-10), key


# --------------------------------------------------------------------------------- (c) LVR, top 3
def test_lvr_bound_top3_diagonal_map():
    """f = diag(4, 3, 2, 1, 0.5) x: log LVR_3 = log 24; grad_W f_j = e_j x^T so Tr H = 5 mean ||x||^2;
    bound (3/2) log(||W||_2^2 Tr H / 3) - 3 mean log ||x||."""
    s = [4.0, 3.0, 2.0, 1.0, 0.5]
    model = _linear([[s[i] if i == j else 0.0 for j in range(5)] for i in range(5)])
    x = torch.tensor([[1.0, 2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 4.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=D64)
    r = lvr_bound(model, x, top_k=3)
    norms = [3.0, 5.0, math.sqrt(5.0)]
    tr = 5 * sum(v * v for v in norms) / 3
    assert r.log_lhs == pytest.approx(math.log(24.0), rel=1e-12)
    assert r.trace_hessian == pytest.approx(tr, rel=1e-12)
    rhs = 1.5 * math.log(16.0 * tr / 3) - 3 * sum(math.log(v) for v in norms) / 3
    assert r.log_rhs == pytest.approx(rhs, rel=1e-12)
    chain = [r.log_lhs, r.log_amgm, r.log_partial, r.log_partial_mean, r.log_rhs]
    assert all(a <= b + 1e-12 for a, b in zip(chain, chain[1:])), chain
    # without top_k: all five singular values, log(4 * 3 * 2 * 1 * 0.5) = log 12
    assert lvr_bound(model, x).log_lhs == pytest.approx(math.log(12.0), rel=1e-12)


# ----------------------------------------------------------------------------- (d) CNN NMLS bound
class _TinyCNN(nn.Module):
    """Conv2d(1, 1, 1) with weight w = 2 on a (1, 1, 2) image (2 positions), ``x.view``, Linear a = diag(1, 2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False).to(D64)
        self.fc = _linear([[1.0, 0.0], [0.0, 2.0]])
        with torch.no_grad():
            self.conv.weight.fill_(2.0)

    def forward(self, x):
        x = self.conv(x)
        return self.fc(x.view(x.size(0), -1))


def test_nmls_bound_cnn_authors_convention():
    """c_conv = ||w||_F^2 * 2 positions = 8, c_fc = ||a||_F^2 = 5 (Frobenius, not ||a||_2^2 = 4);
    h_0 = x, h_1 = w x, so sum_l c_l/||h_l||^2 = (8 + 5/4)/||x||^2; Tr H = mean(||a x||^2 + k w^2 ||x||^2);
    NMLS = sigma_1(a w) + sigma_1(a) = 4 + 2. Inputs with ||x||^2 >= 25 keep their +1e-4 below 1e-5 relative."""
    xs = [[3.0, 4.0], [0.0, 5.0], [6.0, 8.0]]
    x = torch.tensor(xs, dtype=D64).reshape(3, 1, 1, 2)
    r = nmls_bound(_TinyCNN(), x, variant="authors")
    n2 = [a * a + b * b for a, b in xs]
    harm = sum(9.25 / v for v in n2) / 3
    tr = sum(a * a + 4 * b * b + 2 * 4 * (a * a + b * b) for a, b in xs) / 3
    assert r.lhs == pytest.approx(6.0, rel=1e-10)
    assert r.trace_hessian == pytest.approx(tr, rel=1e-10)
    assert r.rhs == pytest.approx(math.sqrt(harm) * math.sqrt(tr), rel=1e-4)
    # with their +1e-4: sum over inputs and layers of c_l / (||h||^2 + 1e-4), h_1 = 2 x
    harm_eps = sum(8 / (v + 1e-4) + 5 / (4 * v + 1e-4) for v in n2) / 3
    assert r.rhs == pytest.approx(math.sqrt(harm_eps) * math.sqrt(tr), rel=1e-12)
    # our (rigorous) variant keeps the spectral ||a||_2^2 = 4 for the Linear layer: 8 + 4/4 = 9
    ours = nmls_bound(_TinyCNN(), x)
    assert ours.rhs == pytest.approx(math.sqrt(sum(9.0 / v for v in n2) / 3) * math.sqrt(tr), rel=1e-12)


def test_nmls_bound_fnn_spectral_convention():
    """Their FNN: c_l = ||W_l||_2^2 (4 and 9 for the two-layer net), h_0 = x, h_1 = W1 x;
    Tr H = mean(10 ||x||^2 + 2 ||W1 x||^2) as in (b); NMLS = 6 + 3."""
    x = torch.tensor(X2, dtype=D64)
    r = nmls_bound(_two_layer(), x)
    w1x2 = [sum((W1[i][i] * v[i]) ** 2 for i in range(3)) for v in X2]
    harm = sum(4.0 / sum(t * t for t in v) + 9.0 / b for v, b in zip(X2, w1x2)) / 3
    tr = _g5_expected(1.0)["trace_hessian"]
    assert r.lhs == pytest.approx(9.0, rel=1e-10)
    assert r.rhs == pytest.approx(math.sqrt(harm) * math.sqrt(tr), rel=1e-10)
    # the authors' variant: the same spectral terms for a network without convolutions, plus their 1e-4
    a = nmls_bound(_two_layer(), x, variant="authors")
    harm_eps = sum(4.0 / (sum(t * t for t in v) + 1e-4) + 9.0 / (b + 1e-4) for v, b in zip(X2, w1x2)) / 3
    assert a.rhs == pytest.approx(math.sqrt(harm_eps) * math.sqrt(tr), rel=1e-12)


# ------------------------------------------------------------------------------- (e) Hessian trace
@pytest.mark.parametrize("method", ["exact", "gauss_newton"])
def test_trace_linear_model_closed_form(method):
    """f = W x + b, k = 3 outputs: grad_W f_j = e_j x^T, grad_b f_j = e_j, so Tr = k mean(||x||^2 + 1)."""
    model = nn.Linear(4, 3).to(D64)
    x = torch.tensor([[1.0, 2.0, 2.0, 0.0], [0.0, 3.0, 0.0, 4.0]], dtype=D64)  # ||x||^2 = 9, 25
    with torch.no_grad():
        y = model(x)
    est = hessian_trace(model, half_mse, (x, y), method=method)
    assert est.value == pytest.approx(3 * (10 + 26) / 2, rel=1e-12)


def test_trace_exact_refuses_bce_and_gauss_newton_accepts_it():
    model = nn.Linear(4, 1).to(D64)
    x = torch.tensor([[1.0, 2.0, 2.0, 0.0], [0.0, 3.0, 0.0, 4.0]], dtype=D64)
    y = torch.tensor([0.0, 1.0], dtype=D64)
    with pytest.raises(ValueError, match="hessian_trace"):
        hessian_trace(model, sigmoid_bce, (x, y), method="exact")
    # the Gauss-Newton trace ignores the loss: k = 1, mean(||x||^2 + 1) = 18
    assert hessian_trace(model, sigmoid_bce, (x, y), method="gauss_newton").value == pytest.approx(18.0, rel=1e-12)


# ------------------------------------------------------------------------- (f) adaptive sharpness
def test_average_adaptive_sharpness_linf_uniform_quadratic():
    """L(w) = (1/2n) sum_i (x_i . w - y_i)^2 at y_i = x_i . w; delta_p = rho |w_p| u_p, u_p ~ U(-1, 1):
    E[L(w + delta)] - L(w) = (1/2n) sum_i sum_p x_ip^2 rho^2 w_p^2 E[u^2], E[u^2] = 1/3
    (a Gaussian delta would give E[u^2] = 1, three times more)."""
    w = [1.0, -2.0, 0.5]
    model = _linear([w])
    x = torch.tensor([[1.0, 0.5, 2.0], [-1.0, 1.0, 0.0], [0.5, -0.5, 1.0], [2.0, 0.0, -1.0]], dtype=D64)
    with torch.no_grad():
        y = model(x)
    rho = 0.1
    r = adaptive_sharpness(model, half_mse, (x, y), rho=rho, kind="average", norm="linf", n_draws=400,
                           max_draws=4000, rel_tol=0.01, seed=0)
    mean_x2 = (x**2).mean(0).tolist()
    expected = 0.5 * sum(wp * wp * m for wp, m in zip(w, mean_x2)) / 3
    assert r.value == pytest.approx(r.raw / rho**2, rel=1e-12)
    assert r.loss == pytest.approx(0.0, abs=1e-20)
    assert abs(r.value - expected) <= 4 * r.std_err + 1e-12, (r.value, expected, r.std_err)
    assert r.std_err < 0.05 * expected


# --------------------------------------------------------------------------- (g) adversarial MLS
class _LogitOfQuadratic(nn.Module):
    """sigmoid(f(u)) = c + alpha u + beta u^2 on a 1-D input: f(u) = logit(c + alpha u + beta u^2)."""

    c, alpha, beta = 0.1, 0.05, 0.02

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=D64))  # fixes the dtype; the value 1 changes nothing

    def forward(self, u):
        return torch.logit(self.c + self.scale * self.alpha * u + self.beta * u**2)


def test_adversarial_mls_authors_last_iterate_after_29_adam_steps():
    """At u = 0: r(d) = |g(d) - g(0)| / |d| = alpha + beta d for d > -alpha/beta, a gradient beta > 0 that is
    constant, so each Adam step moves d by lr (bias-corrected m/sqrt(v) = 1). From d_0 ~ N(0, 1e-4^2) the
    30th evaluation is at d = d_0 + 29 * 0.1, r = alpha + 2.9 beta = 0.108 (plain ratio, not squared; the
    definition's maximum over 31 iterates would be 0.110; box clipping at 1e-4 would give 0.05)."""
    model = _LogitOfQuadratic()
    x = torch.zeros(3, 1, dtype=D64)
    m = _LogitOfQuadratic
    out = adversarial_mls(model, x, init_std=1e-4, variant="authors", seed=0)
    torch.testing.assert_close(out, torch.full((3,), m.alpha + 2.9 * m.beta, dtype=D64), atol=2e-5, rtol=0)
    ratio = adversarial_mls(model, x, init_std=1e-4, variant="ratio", seed=0)
    torch.testing.assert_close(ratio, torch.full((3,), m.alpha + 3.0 * m.beta, dtype=D64), atol=2e-5, rtol=0)


class _LogitOfLinear(nn.Module):
    """sigmoid(f(u)) = 0.5 + 0.2 u: the ratio is 0.2 for every d (and the gradient is 0)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=D64))

    def forward(self, u):
        return torch.logit(0.5 + 0.2 * self.scale * u)


def test_adversarial_mls_authors_sigmoid_outputs_plain_ratio():
    """The sigmoid is applied to the outputs (without it the logit's secant slope would differ from 0.2),
    and the value is the ratio (their reported MLS is its square, 0.04)."""
    out = adversarial_mls(_LogitOfLinear(), torch.zeros(2, 1, dtype=D64), variant="authors", seed=0)
    torch.testing.assert_close(out, torch.full((2,), 0.2, dtype=D64), atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------- (h) their models
def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_of_their_models():
    """Counted by hand: VGG convs 448 + 2320 + 4640 + 18496 + 36928, head 32896 + 1290 = 97,018;
    LeNet-5 456 + 2416 + 48120 + 10164 + 850 = 62,006; FNN 392,500 + 2 x 250,500 + 5,010 = 898,510."""
    from flatness.models import FNN, LeNet5, SmallVGG

    assert _count(SmallVGG()) == 97_018
    assert _count(LeNet5()) == 62_006
    assert _count(FNN()) == 898_510


def test_small_vgg_architecture_and_init():
    """Padding 2: 32 -> 34 -> 17 -> 19 -> 9 -> 11 -> 5 -> 7 -> 3 -> 5 -> 2, so 64 x 2 x 2 = 256 features;
    conv weights N(0, 2 / (9 C_out)), conv biases zero."""
    from flatness.models import SmallVGG

    torch.manual_seed(0)
    net = SmallVGG()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.padding == (2, 2) and c.kernel_size == (3, 3) for c in convs)
    assert all(float(c.bias.detach().abs().max()) == 0.0 for c in convs)
    c5 = convs[-1]  # 64 * 64 * 9 = 36,864 weights: the sample variance is within 3% of 2 / (9 * 64)
    assert float(c5.weight.detach().var()) == pytest.approx(2.0 / (9 * 64), rel=0.03)
    lin = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert (lin[0].in_features, lin[0].out_features, lin[-1].out_features) == (256, 128, 10)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
