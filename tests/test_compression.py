"""Compression metrics (flatness.compression) against closed forms and dense float64 autograd oracles."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from flatness.compression import (
    adversarial_mls,
    local_metrics,
    network_log_volume,
    network_mls,
    normalized_mls,
    top_singular_values,
)
from flatness.models import FCN, alpha_rescale

RTOL = 1e-6
METHODS = ["auto", "rev", "fwd", "loop", "factored"]  # factored: first Linear on x with k <= m < d


# ------------------------------------------------------------------------------------------ oracles
def dense_jacobians(model: nn.Module, x: torch.Tensor, post=lambda z: z) -> torch.Tensor:
    """(N, k, d) per-input Jacobians with torch.autograd.functional.jacobian, one input at a time."""
    model.eval()
    rows = []
    for xi in x:
        jac = jacobian(lambda z: post(model(z.unsqueeze(0)).reshape(1, -1))[0], xi)
        rows.append(jac.reshape(jac.shape[0], -1))
    return torch.stack(rows)


def oracle_metrics(jac: torch.Tensor, top_k: int | None = None) -> dict[str, torch.Tensor]:
    s = torch.linalg.svdvals(jac)  # (N, min(k, d)) descending
    # documented convention: singular values below the matrix_rank tolerance are exact zeros
    m, eps = max(jac.shape[1:]), torch.finfo(jac.dtype).eps
    tol = s[:, :1] * max(m * eps, math.sqrt(m * torch.finfo(torch.float64).eps))
    s = torch.where(s > tol, s, torch.zeros_like(s))
    lam = s**2
    sel = s if top_k is None else s[:, :top_k]
    return {"mls": s[:, 0], "log_volume": torch.log(sel).sum(1),
            "local_dim": lam.sum(1) ** 2 / (lam**2).sum(1), "jac_fro": jac.flatten(1).norm(dim=1)}


def assert_metrics_close(got: dict, want: dict, rtol: float = RTOL, atol: float = 1e-9) -> None:
    assert set(got) == {"mls", "log_volume", "local_dim", "jac_fro"}
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def linear_map(a: torch.Tensor, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(a.shape[1], a.shape[0], bias=bias).double()
    with torch.no_grad():
        lin.weight.copy_(a)
        if bias:
            lin.bias.normal_()
    return lin


def tiny_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    ).double()


class TinyViT(nn.Module):
    """Patch embedding, one transformer encoder layer (attention + MLP), mean pooling, linear head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (N, 4, 8)
        return self.head(self.enc(tokens).mean(1))


# ---------------------------------------------------------------------------------- linear maps
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(4, 7), (6, 3), (1, 5)])
def test_affine_map_closed_form(method, shape):
    torch.manual_seed(0)
    a = torch.randn(*shape, dtype=torch.float64)
    s = torch.linalg.svdvals(a)
    x = torch.randn(5, shape[1], dtype=torch.float64)
    if method == "factored" and not shape[0] < shape[1]:
        with pytest.raises(ValueError, match="local_metrics: method='factored' needs a first nn.Linear"):
            local_metrics(linear_map(a), x, method=method)
        return
    got = local_metrics(linear_map(a), x, method=method)
    n = len(x)
    want = {"mls": s[0].expand(n), "log_volume": torch.log(s).sum().expand(n),
            "local_dim": ((s**2).sum() ** 2 / (s**4).sum()).expand(n), "jac_fro": a.norm().expand(n)}
    assert_metrics_close(got, want, rtol=1e-10)


def test_top_k_and_rank_deficiency():
    torch.manual_seed(1)
    a = torch.randn(5, 8, dtype=torch.float64)
    s = torch.linalg.svdvals(a)
    x = torch.randn(3, 8, dtype=torch.float64)
    got = local_metrics(linear_map(a), x, top_k=2)
    torch.testing.assert_close(got["log_volume"], torch.log(s[:2]).sum().expand(3), rtol=1e-10, atol=0)
    # rank one: the volume over all 5 eigenvalues is exactly zero (log -inf); top_k=1 stays finite
    u, v = torch.randn(5, 1, dtype=torch.float64), torch.randn(1, 8, dtype=torch.float64)
    r1 = local_metrics(linear_map(u @ v), x)
    assert torch.isneginf(r1["log_volume"]).all()
    torch.testing.assert_close(r1["local_dim"], torch.ones(3, dtype=torch.float64), rtol=1e-10, atol=0)
    r1k = local_metrics(linear_map(u @ v), x, top_k=1)
    torch.testing.assert_close(r1k["log_volume"], torch.log(u.norm() * v.norm()).expand(3), rtol=1e-10, atol=0)
    # zero map: MLS 0, volume -inf, local dim undefined (NaN)
    z = local_metrics(linear_map(torch.zeros(5, 8, dtype=torch.float64)), x)
    assert (z["mls"] == 0).all() and torch.isneginf(z["log_volume"]).all() and torch.isnan(z["local_dim"]).all()


# ------------------------------------------------------------------------------ nonlinear networks
def _mlp(seed):
    return FCN((8, 32, 24, 4), seed=seed).double()


def _narrow_mlp(seed):
    return FCN((12, 10, 10, 3), sigma_b=0.1, seed=seed).double()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make,shape", [(_mlp, (8,)), (_narrow_mlp, (3, 4)), (tiny_cnn, (2, 4, 4))])
def test_against_dense_jacobian(make, shape, method):
    model = make(3)
    x = torch.randn(7, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    if method == "factored" and make is not _narrow_mlp:
        with pytest.raises(ValueError, match="method='factored' needs a first nn.Linear"):
            local_metrics(model, x, method=method)
        return
    jac = dense_jacobians(model, x)
    assert_metrics_close(local_metrics(model, x, method=method), oracle_metrics(jac))
    assert_metrics_close(local_metrics(model, x, method=method, top_k=2), oracle_metrics(jac, top_k=2))


@pytest.mark.parametrize("output,post", [("sigmoid", torch.sigmoid), ("softmax", lambda z: torch.softmax(z, -1))])
def test_sigmoid_softmax_outputs(output, post):
    model = tiny_cnn(4)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    jac = dense_jacobians(model, x, post)
    # softmax Jacobians have rank <= k - 1: compare the volume over the top k-1 singular values
    top_k = 2 if output == "softmax" else None
    assert_metrics_close(local_metrics(model, x, output=output, top_k=top_k), oracle_metrics(jac, top_k))


def test_float32_chunking_and_model_untouched():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(8, 3))
    model.train()
    with torch.no_grad():
        model[2].running_mean.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(10, 3, 4)
    got = local_metrics(model, x, chunk_size=3)
    # eval-mode oracle (BatchNorm running statistics, no dropout)
    want = oracle_metrics(dense_jacobians(model.double(), x.double()))
    model.float()
    assert_metrics_close({k: v.double() for k, v in got.items()}, want, rtol=1e-4, atol=1e-5)
    assert got["mls"].dtype == torch.float32 and got["mls"].shape == (10,)
    model.train()
    local_metrics(model, x)
    network_mls(model, x)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(local_metrics(model, x)["mls"], got["mls"], rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_vision_transformer():
    torch.manual_seed(20)
    model = TinyViT().double()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    jac = dense_jacobians(model, x)
    assert_metrics_close(local_metrics(model, x), oracle_metrics(jac))
    torch.testing.assert_close(top_singular_values(model, x, k=2, tol=1e-12, n_iter=500),
                               torch.linalg.svdvals(jac)[:, :2], rtol=1e-6, atol=1e-9)
    # Linear/Conv modules that are called: the attention projections run inside F.multi_head_attention
    assert list(network_mls(model, x, per_layer=True)) == ["patch", "enc.linear1", "enc.linear2", "head"]


# ------------------------------------------------------------------------------- matrix-free paths
@pytest.mark.parametrize("make,shape", [(_mlp, (8,)), (tiny_cnn, (2, 4, 4))])
def test_top_singular_values_vs_dense(make, shape):
    model = make(5)
    x = torch.randn(6, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    want = torch.linalg.svdvals(dense_jacobians(model, x))[:, :3]
    got = top_singular_values(model, x, k=3, n_iter=500, tol=1e-12, chunk_size=4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_adversarial_mls_linear_reaches_spectral_norm():
    torch.manual_seed(6)
    a = torch.randn(4, 10, dtype=torch.float64)
    lin = linear_map(a)
    x = torch.randn(5, 10, dtype=torch.float64)
    s1 = torch.linalg.svdvals(a)[0]
    few = adversarial_mls(lin, x, n_steps=0, output="logits", seed=0)
    many = adversarial_mls(lin, x, n_steps=300, lr=0.05, output="logits", seed=0)
    assert (few <= s1 * (1 + 1e-12)).all() and (many <= s1 * (1 + 1e-12)).all()
    assert (many > few).all()
    torch.testing.assert_close(many, s1.expand(5), rtol=1e-3, atol=0)


def test_adversarial_mls_sigmoid_and_authors_variant():
    model = _mlp(7)
    x = torch.randn(4, 8, dtype=torch.float64)
    r = adversarial_mls(model, x, n_steps=10)
    assert r.shape == (4,) and torch.isfinite(r).all() and (r > 0).all()
    # Adam is elementwise: optimising inputs together or apart gives the same result
    torch.testing.assert_close(adversarial_mls(model, x, n_steps=10, chunk_size=3), r, rtol=1e-10, atol=0)
    # sigmoid' <= 1/4, so the secant slope of sigmoid(f) is below 1/4 of f's Lipschitz constant
    lip = math.prod(float(torch.linalg.matrix_norm(m.weight.detach(), ord=2)) for m in model.linear_layers())
    assert (r <= lip / 4).all()
    ra = adversarial_mls(model, x, n_steps=10, variant="authors")
    assert ra.shape == (4,) and torch.isfinite(ra).all()
    # the ascent differentiates w.r.t. the perturbation only: no gradient is left on the model's parameters
    assert all(p.grad is None for p in model.parameters())


def test_normalized_mls_closed_form():
    mls = torch.tensor([2.0, 0.5])
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    torch.testing.assert_close(normalized_mls(mls, x), torch.tensor([100.0, 0.25]))
    torch.testing.assert_close(normalized_mls(mls, x, squared=False), torch.tensor([10.0, 0.5]))


# ---------------------------------------------------------------------------- network-wide metrics
def test_network_mls_known_linear_layers():
    torch.manual_seed(8)
    a1, a2, a3 = (torch.randn(m, n, dtype=torch.float64) for m, n in [(7, 9), (6, 7), (3, 6)])
    model = nn.Sequential(linear_map(a1), nn.Identity(), linear_map(a2), linear_map(a3))
    x = torch.randn(4, 9, dtype=torch.float64)
    mats = {"0": a3 @ a2 @ a1, "2": a3 @ a2, "3": a3}
    per = network_mls(model, x, per_layer=True)
    assert list(per) == ["0", "2", "3"]
    for name, m in mats.items():
        torch.testing.assert_close(per[name], torch.linalg.svdvals(m)[0].expand(4), rtol=1e-10, atol=0)
    total = sum(torch.linalg.svdvals(m)[0] for m in mats.values())
    torch.testing.assert_close(network_mls(model, x), total.expand(4), rtol=1e-10, atol=0)
    lv = sum(torch.log(torch.linalg.svdvals(m)).sum() for m in mats.values())
    torch.testing.assert_close(network_log_volume(model, x), lv.expand(4), rtol=1e-10, atol=0)
    lv2 = sum(torch.log(torch.linalg.svdvals(m)[:2]).sum() for m in mats.values())
    torch.testing.assert_close(network_log_volume(model, x, top_k=2, method="rev"), lv2.expand(4),
                               rtol=1e-10, atol=0)


def test_network_mls_cnn_vs_dense():
    model = tiny_cnn(9)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    per = network_mls(model, x, per_layer=True, chunk_size=2)
    for idx in (0, 3, 6):  # Linear/Conv positions in the Sequential
        with torch.no_grad():
            h = model[:idx](x)
        want = torch.linalg.svdvals(dense_jacobians(model[idx:], h))[:, 0]
        torch.testing.assert_close(per[str(idx)], want, rtol=RTOL, atol=1e-12)
    # the first layer's term is the MLS itself
    torch.testing.assert_close(per["0"], local_metrics(model, x)["mls"], rtol=RTOL, atol=1e-12)


def test_alpha_rescale_function_space_vs_network_metrics():
    model = FCN((5, 8, 8, 3), seed=10).double()
    scaled = alpha_rescale(model, 0, 4.0)
    x = torch.randn(6, 5, dtype=torch.float64)
    assert_metrics_close(local_metrics(scaled, x), local_metrics(model, x), rtol=1e-9)
    per0, per1 = network_mls(model, x, per_layer=True), network_mls(scaled, x, per_layer=True)
    # d f / d h_1 (input of the second layer) scales by 1/alpha; the other terms are unchanged
    torch.testing.assert_close(per1["3"], per0["3"] / 4.0, rtol=1e-9, atol=0)
    torch.testing.assert_close(per1["1"], per0["1"], rtol=1e-9, atol=0)
    assert not torch.allclose(network_mls(scaled, x), network_mls(model, x))


# ------------------------------------------------------------------------------------- validation
def test_bad_input():
    lin = linear_map(torch.randn(2, 3, dtype=torch.float64))
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="local_metrics: unknown output='probs'"):
        local_metrics(lin, x, output="probs")
    with pytest.raises(ValueError, match="local_metrics: unknown method='svd'"):
        local_metrics(lin, x, method="svd")
    with pytest.raises(ValueError, match="local_metrics: top_k=3 exceeds the maximum 2"):
        local_metrics(lin, x, top_k=3)
    with pytest.raises(ValueError, match="local_metrics: x has shape \\(3,\\)"):
        local_metrics(lin, x[0])
    with pytest.raises(ValueError, match="chunk_size=0 must be >= 1"):
        local_metrics(lin, x, chunk_size=0)
    with pytest.raises(ValueError, match="non-finite"):
        local_metrics(lin, torch.full((2, 3), float("nan"), dtype=torch.float64))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        local_metrics(lambda z: z, x)
    with pytest.raises(ValueError, match="top_singular_values: k=3 exceeds the maximum 2"):
        top_singular_values(lin, x, k=3)
    with pytest.raises(ValueError, match="adversarial_mls: unknown variant='max'"):
        adversarial_mls(lin, x, variant="max")
    with pytest.raises(ValueError, match="network_log_volume: top_k=3 exceeds min"):
        network_log_volume(lin, x, top_k=3)
    with pytest.raises(ValueError, match="normalized_mls: x must be a tensor"):
        normalized_mls(torch.ones(3), x)
    shared = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="called more than once"):
        network_mls(nn.Sequential(shared, shared).double(), x)


# ------------------------------------------------------------------- any nn.Module, bad input (issue 7)
class ViewCNN(nn.Module):
    """The authors' CNN pattern: features, then ``x.view(x.size(0), -1)`` in forward (needs contiguous NCHW)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 4, 3, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


def test_view_forward_cnn(one_thread):
    torch.manual_seed(30)
    model = ViewCNN().double()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    jac = dense_jacobians(model, x)
    assert_metrics_close(local_metrics(model, x), oracle_metrics(jac))
    assert_metrics_close(local_metrics(model, x, method="rev"), oracle_metrics(jac))
    per = network_mls(model, x, per_layer=True)
    assert list(per) == ["features.0", "features.3", "classifier"]
    torch.testing.assert_close(per["features.0"], torch.linalg.svdvals(jac)[:, 0], rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(top_singular_values(model, x, k=1, tol=1e-12, n_iter=500)[:, 0],
                               torch.linalg.svdvals(jac)[:, 0], rtol=1e-6, atol=1e-9)


class SkipMLP(nn.Module):
    """x reaches the output through the first layer and a skip connection: J != (df/dz_1) W_1."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.skip = nn.Linear(8, 5), nn.Linear(5, 3), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) + self.skip(x)


def test_skip_connection_from_input_is_not_factored(one_thread):
    torch.manual_seed(31)
    model = SkipMLP().double()
    x = torch.randn(4, 8, dtype=torch.float64)
    assert_metrics_close(local_metrics(model, x), oracle_metrics(dense_jacobians(model, x)))  # auto: not factored
    with pytest.raises(ValueError, match="local_metrics: method='factored' needs a first nn.Linear"):
        local_metrics(model, x, method="factored")


def test_non_finite_parameters_rejected(one_thread):
    model = FCN((4, 6, 2), seed=32).double()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    x = torch.randn(3, 4, dtype=torch.float64)
    for f in (local_metrics, network_mls, network_log_volume, top_singular_values, adversarial_mls):
        with pytest.raises(ValueError, match=f"{f.__name__}: model parameter '1.weight' holds 1 non-finite"):
            f(model, x)


def test_wrong_input_shape_names_x(one_thread):
    model = nn.Sequential(nn.Linear(784, 10), nn.ReLU(), nn.Linear(10, 3))
    with pytest.raises(ValueError, match=r"local_metrics: x has shape \(5, 783\) .*the first layer '0' \(Linear\) "
                                         r"expects 784 input features, got 783"):
        local_metrics(model, torch.rand(5, 783))
    with pytest.raises(ValueError, match=r"network_mls: x has shape \(5, 783\)"):
        network_mls(model, torch.rand(5, 783))
    fcn = FCN((784, 10, 3), seed=33)  # checks its input itself (a ValueError before the first layer)
    with pytest.raises(ValueError, match=r"local_metrics: x has shape \(5, 783\) .*'1' \(Linear\) expects 784"):
        local_metrics(fcn, torch.rand(5, 783))
    cnn = ViewCNN()
    with pytest.raises(ValueError, match=r"local_metrics: x has shape \(2, 3, 4, 4\) .*'features.0' \(Conv2d\) "
                                         r"expects 2 input channels, got 3"):
        local_metrics(cnn, torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"top_singular_values: x has shape \(2, 2, 6, 6\).*mat1"):
        top_singular_values(cnn, torch.rand(2, 2, 6, 6))  # the convs accept it, the classifier does not


def test_adversarial_mls_authors_variant_last_iterate(one_thread):
    """Authors (sharpdim 2bcbe24): ratio at the last of n_steps evaluations, i.e. after n_steps - 1 Adam steps."""
    torch.manual_seed(34)
    a = torch.randn(3, 6, dtype=torch.float64)
    lin = linear_map(a)
    x = torch.randn(4, 6, dtype=torch.float64)
    delta0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1
    # one evaluation, no step: ||A delta_0|| / ||delta_0|| (closed form for an affine map)
    want = (delta0 @ a.T).norm(dim=1) / delta0.norm(dim=1)
    got = adversarial_mls(lin, x, n_steps=1, output="logits", variant="authors")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # five evaluations: an independent per-input loop of 4 Adam steps on the ratio
    ref = []
    for i in range(len(x)):
        d = delta0[i].clone().requires_grad_(True)
        opt = torch.optim.Adam([d], lr=0.1)
        for _ in range(4):
            opt.zero_grad()
            (-(torch.sigmoid(lin(x[i] + d)) - torch.sigmoid(lin(x[i]))).norm() / d.norm()).backward()
            opt.step()
        with torch.no_grad():
            ref.append((torch.sigmoid(lin(x[i] + d)) - torch.sigmoid(lin(x[i]))).norm() / d.norm())
    torch.testing.assert_close(adversarial_mls(lin, x, n_steps=5, variant="authors"), torch.stack(ref),
                               rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="adversarial_mls: n_steps=0 must be >= 1"):
        adversarial_mls(lin, x, n_steps=0, variant="authors")
