"""Optimizer registry, Entropy-SGD and the functional (stacked-ensemble) optimizers (``flatness.train.optim``)."""

import copy
import math

import pytest
import torch

from flatness.train.optim import (OPTIMIZERS, EntropySGD, functional_optimizer, list_optimizers, make_optimizer,
                                  optimizer_defaults, optimizer_table)

# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------

EXPECTED_DEFAULTS = {  # the module docstring's table; a change here must be a deliberate change of results
    "sgd": {"lr": 0.01},
    "gd": {"lr": 0.01},
    "momentum": {"lr": 0.01, "momentum": 0.9},
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8},
    "adagrad": {"lr": 0.01, "initial_accumulator_value": 0.1, "eps": 1e-10},
    "rmsprop": {"lr": 1e-3, "alpha": 0.9, "momentum": 0.0, "eps": 1e-7},
    "entropy_sgd": {"lr": 0.01, "L": 20, "sgld_lr": 0.1, "gamma": 1e-3, "scoping": 1e-4, "noise": 1e-4,
                    "alpha": 0.75},
}


def test_registry_names_and_defaults():
    assert list_optimizers() == list(EXPECTED_DEFAULTS)
    for name, d in EXPECTED_DEFAULTS.items():
        assert optimizer_defaults(name) == d, name
        opt = make_optimizer(name, [torch.nn.Parameter(torch.zeros(2))])
        for k, v in d.items():
            got = opt.param_groups[0][k]
            assert (tuple(got) if isinstance(v, tuple) else got) == v, (name, k)
    assert OPTIMIZERS["gd"].full_batch and not OPTIMIZERS["sgd"].full_batch
    cls, defaults = OPTIMIZERS["adam"]  # the registry's old (class, defaults) unpacking still works
    assert cls is torch.optim.Adam and defaults["lr"] == 1e-3
    table = optimizer_table()
    assert set(table["optimizer"]) == set(EXPECTED_DEFAULTS)
    assert (table["source"] != "").all()


def test_optimizer_defaults_is_a_copy():
    optimizer_defaults("sgd")["lr"] = 5.0
    assert OPTIMIZERS["sgd"].defaults["lr"] == 0.01


def test_make_optimizer_overrides_and_factory():
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = make_optimizer("momentum", p, lr=0.5, momentum=0.5)
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["momentum"] == 0.5
    opt = make_optimizer(lambda ps: torch.optim.SGD(ps, lr=0.3), p)
    assert opt.param_groups[0]["lr"] == 0.3


@pytest.mark.parametrize("name, kwargs, match", [
    ("nadam", {}, r"make_optimizer: unknown optimizer='nadam'; allowed values are \['sgd'.*'entropy_sgd'\]"),
    ("sgd", {"lr": 0.0}, r"make_optimizer: lr=0.0 must be finite and > 0"),
    ("sgd", {"lr": -1.0}, r"make_optimizer: lr=-1.0"),
    ("adam", {"lr": math.nan}, r"make_optimizer: lr=nan"),
    ("momentum", {"momentum": 1.0}, r"make_optimizer: momentum=1.0 must lie in \[0, 1\)"),
    ("momentum", {"momentum": -0.1}, r"make_optimizer: momentum=-0.1"),
    ("adam", {"betas": (0.9, 1.0)}, r"make_optimizer: betas\[1\]=1.0 must lie in \[0, 1\)"),
    ("adam", {"betas": 0.9}, r"make_optimizer: betas=0.9 must be a pair"),
    ("adam", {"eps": 0.0}, r"make_optimizer: eps=0.0"),
    ("rmsprop", {"alpha": 1.5}, r"make_optimizer: alpha=1.5 must lie in \[0, 1\)"),
    ("adagrad", {"initial_accumulator_value": -1.0}, r"make_optimizer: initial_accumulator_value=-1.0"),
    ("adam", {"momentum": 0.9}, r"make_optimizer: unknown hyper-parameter 'momentum' for optimizer 'adam'"),
    ("entropy_sgd", {"L": 0}, r"make_optimizer: L=0 must be >= 1"),
    ("entropy_sgd", {"sgld_lr": 0.0}, r"make_optimizer: sgld_lr=0.0"),
    ("entropy_sgd", {"gamma": -1.0}, r"make_optimizer: gamma=-1.0 must be finite and >= 0"),
    ("entropy_sgd", {"alpha": 0.0}, r"make_optimizer: alpha=0.0 must lie in \(0, 1\]"),
    ("entropy_sgd", {"noise": -1e-4}, r"make_optimizer: noise=-0.0001"),
])
def test_make_optimizer_rejects_bad_input(name, kwargs, match):
    p = [torch.nn.Parameter(torch.zeros(2))]
    lr = kwargs.pop("lr", None)
    with pytest.raises(ValueError, match=match):
        make_optimizer(name, p, lr=lr, **kwargs)


def test_optimizer_defaults_unknown_name():
    with pytest.raises(ValueError, match=r"optimizer_defaults: unknown optimizer='x'; allowed values"):
        optimizer_defaults("x")


# ---------------------------------------------------------------------------------------------------------------------
# Entropy-SGD
# ---------------------------------------------------------------------------------------------------------------------

def _quadratic_closure(opt, w, target):
    def closure():
        opt.zero_grad()
        loss = 0.5 * ((w - target) ** 2).sum()
        loss.backward()
        return loss
    return closure


def test_entropy_sgd_requires_closure():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = EntropySGD([w])
    with pytest.raises(RuntimeError, match="EntropySGD.step: a closure is required"):
        opt.step()


def test_entropy_sgd_validates_at_construction():
    with pytest.raises(ValueError, match="EntropySGD: L=0 must be >= 1"):
        EntropySGD([torch.nn.Parameter(torch.zeros(1))], L=0)
    with pytest.raises(ValueError, match="EntropySGD: lr=0"):
        EntropySGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0}])
    with pytest.raises(TypeError, match="EntropySGD: generator"):
        EntropySGD([torch.nn.Parameter(torch.zeros(1))], generator=0)


def test_entropy_sgd_closed_form_quadratic():
    """Noise-free, f = |w - c|^2 / 2: each SGLD step is x' <- x' - eta' ((x' - c) - gamma_t (x - x')), a linear
    recursion; check two outer steps (gamma_0, then gamma_0 (1 + gamma_1)) against it computed by hand, and the
    returned loss (at w before the step)."""
    c = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x = torch.tensor([0.5, 0.5], dtype=torch.float64)
    w = torch.nn.Parameter(x.clone())
    lr, L, eta, gamma, scoping, alpha = 0.7, 4, 0.1, 0.3, 0.5, 0.75
    opt = EntropySGD([w], lr=lr, L=L, sgld_lr=eta, gamma=gamma, scoping=scoping, noise=0.0, alpha=alpha)
    closure = _quadratic_closure(opt, w, c)
    for t in range(2):
        loss = opt.step(closure)
        assert loss.item() == pytest.approx(0.5 * float(((x - c) ** 2).sum()))
        gamma_t = gamma * (1 + scoping) ** t
        xp, mu = x.clone(), x.clone()
        for _ in range(L):
            xp = xp - eta * ((xp - c) - gamma_t * (x - xp))
            mu = (1 - alpha) * mu + alpha * xp
        x = x - lr * (x - mu)
        torch.testing.assert_close(w.detach(), x, rtol=1e-12, atol=1e-12)
        assert opt.state[w]["step"] == t + 1
        torch.testing.assert_close(opt.state[w]["x_prime"], xp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[w]["mu"], mu, rtol=1e-12, atol=1e-12)


def test_entropy_sgd_converges_on_quadratic():
    """With noise 0 on a quadratic Entropy-SGD converges to the minimum (the local entropy's minimum)."""
    c = torch.tensor([3.0])
    w = torch.nn.Parameter(torch.zeros(1))
    opt = EntropySGD([w], lr=1.0, L=5, sgld_lr=0.1, gamma=0.01, scoping=0.05, noise=0.0)
    closure = _quadratic_closure(opt, w, c)
    for _ in range(60):
        opt.step(closure)
    assert abs(w.item() - 3.0) < 1e-4


def test_entropy_sgd_noise_is_seeded():
    def run(seed):
        w = torch.nn.Parameter(torch.zeros(4))
        opt = EntropySGD([w], L=3, noise=0.1, generator=torch.Generator().manual_seed(seed))
        closure = _quadratic_closure(opt, w, torch.ones(4))
        for _ in range(3):
            opt.step(closure)
        return w.detach().clone()

    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert not torch.equal(run(1), run(2))


def test_entropy_sgd_state_dict_resumes_identically():
    def make():
        w = torch.nn.Parameter(torch.zeros(4))
        return w, EntropySGD([w], L=3, noise=0.1, scoping=0.1, generator=torch.Generator().manual_seed(3))

    w, opt = make()
    closure = _quadratic_closure(opt, w, torch.ones(4))
    opt.step(closure)
    sd, w_mid = copy.deepcopy(opt.state_dict()), w.detach().clone()  # as a checkpoint on disk would be
    opt.step(closure)
    opt.step(closure)
    w2, opt2 = make()
    with torch.no_grad():
        w2.copy_(w_mid)
    opt2.load_state_dict(sd)
    closure2 = _quadratic_closure(opt2, w2, torch.ones(4))
    opt2.step(closure2)
    opt2.step(closure2)
    assert torch.equal(w2.detach(), w.detach())
    assert opt2.state[w2]["step"] == 3


# ---------------------------------------------------------------------------------------------------------------------
# Functional optimizers
# ---------------------------------------------------------------------------------------------------------------------

SHAPES = {"w": (4, 3), "b": (4,)}


def _gradient_sequence(n_steps, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn((m, *s), generator=g) for k, s in SHAPES.items()} for _ in range(n_steps)]


def _masks(n_steps, m, seed=1):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n_steps, m, generator=g) > 0.35
    masks[:, 0] = True  # model 0 always active; the others skip steps at random
    masks[n_steps // 2:, 2] = False  # model 2 stops half-way (as a converged ensemble member does)
    return masks


@pytest.mark.parametrize("name, kwargs, torch_cls, torch_kwargs", [
    ("sgd", {}, torch.optim.SGD, {"lr": 0.01}),
    ("gd", {"lr": 0.2}, torch.optim.SGD, {"lr": 0.2}),
    ("momentum", {}, torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    ("sgd", {"momentum": 0.5, "lr": 0.1}, torch.optim.SGD, {"lr": 0.1, "momentum": 0.5}),
    ("adam", {}, torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}),
    ("adam", {"lr": 0.05, "betas": (0.5, 0.9), "eps": 1e-6}, torch.optim.Adam,
     {"lr": 0.05, "betas": (0.5, 0.9), "eps": 1e-6}),
])
def test_functional_matches_torch_with_active_mask(one_thread, name, kwargs, torch_cls, torch_kwargs):
    """M = 3 stacked models vs 3 separate torch optimizers on the same gradients; inactive rows (mask False) take
    no step at all (the torch optimizer of that model is not stepped), so Adam's per-model step counts differ."""
    m, n_steps = 3, 25
    g0 = torch.Generator().manual_seed(42)
    init = {k: torch.randn((m, *s), generator=g0) for k, s in SHAPES.items()}
    grads, masks = _gradient_sequence(n_steps, m), _masks(n_steps, m)

    fopt = functional_optimizer(name, **kwargs)
    params = {k: v.clone() for k, v in init.items()}
    state = fopt.init(params)
    models = [{k: torch.nn.Parameter(init[k][i].clone()) for k in SHAPES} for i in range(m)]
    topts = [torch_cls(list(mod.values()), **torch_kwargs) for mod in models]
    for t in range(n_steps):
        g = {k: v.clone() for k, v in grads[t].items()}
        g["w"][~masks[t]] = math.nan  # inactive rows' gradients must be ignored
        params, state = fopt.step(params, g, state, active_mask=masks[t])
        for i in range(m):
            if masks[t, i]:
                for k, p in models[i].items():
                    p.grad = grads[t][k][i].clone()
                topts[i].step()
    counts = masks.sum(0)
    assert torch.equal(state["step"], counts)
    assert len(set(counts.tolist())) > 1  # the test exercises different step counts
    for i in range(m):
        for k in SHAPES:
            exact = name != "adam"
            torch.testing.assert_close(params[k][i], models[i][k].detach(), rtol=0 if exact else 1e-6,
                                       atol=0 if exact else 1e-7, msg=f"{name} model {i} {k}")


def test_functional_all_active_by_default_and_inputs_untouched():
    fopt = functional_optimizer("adam")
    p = {"w": torch.ones(2, 3)}
    p_before = p["w"].clone()
    st = fopt.init(p)
    p2, st2 = fopt.step(p, {"w": torch.ones(2, 3)}, st)
    assert torch.equal(p["w"], p_before) and torch.equal(st["step"], torch.zeros(2, dtype=torch.int64))
    assert torch.equal(st2["step"], torch.ones(2, dtype=torch.int64))
    torch.testing.assert_close(p2["w"], torch.full((2, 3), 1.0 - 1e-3), rtol=0, atol=1e-6)  # Adam's first step


def test_functional_uses_registry_defaults():
    for name in ("sgd", "gd", "momentum", "adam"):
        hp = functional_optimizer(name).hparams
        for k, v in optimizer_defaults(name).items():
            assert hp[k] == v, (name, k)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: functional_optimizer("entropy_sgd"), ValueError,
     r"functional_optimizer: optimizer='entropy_sgd' has no functional form; supported: \['sgd', 'gd', "
     r"'momentum', 'adam'\]"),
    (lambda: functional_optimizer("rmsprop"), ValueError, "has no functional form"),
    (lambda: functional_optimizer("adam", momentum=0.9), ValueError,
     r"functional_optimizer: unknown hyper-parameter 'momentum' for 'adam'"),
    (lambda: functional_optimizer("sgd", lr=-1), ValueError, r"functional_optimizer: lr=-1"),
    (lambda: functional_optimizer("momentum", momentum=1.2), ValueError, r"functional_optimizer: momentum=1.2"),
    (lambda: functional_optimizer("sgd").step({"w": torch.zeros(2, 1)}, {"w": torch.zeros(2, 1)},
                                              {"step": torch.zeros(2, dtype=torch.int64)},
                                              active_mask=torch.ones(3, dtype=torch.bool)),
     ValueError, r"FunctionalOptimizer.step: active_mask has shape \(3,\); expected \(2,\)"),
    (lambda: functional_optimizer("sgd").step({"w": torch.zeros(2, 1)}, {"v": torch.zeros(2, 1)}, {}),
     ValueError, "grads keys"),
    (lambda: functional_optimizer("sgd").init({"w": torch.zeros(2, 1), "b": torch.zeros(3)}), ValueError,
     "same leading dimension"),
])
def test_functional_rejects_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------------------
# Entropy-SGD prefers the wide valley (Chaudhari et al. 2019, Fig. 1)
# ---------------------------------------------------------------------------------------------------------------------

A, B, S1, S2, X1, X2 = 1.0, 0.5, 0.2, 1.5, 0.0, 2.0  # narrow deep well at X1 (A > B, S1 << S2), wide shallow at X2
STARTS = (-0.3, -0.15, 0.15, 0.3, 0.4)  # all in plain gradient descent's basin of the narrow well


def _two_wells(x):
    return -A * torch.exp(-(x - X1) ** 2 / (2 * S1 ** 2)) - B * torch.exp(-(x - X2) ** 2 / (2 * S2 ** 2))


def _run_1d(opt, w, steps):
    def closure():
        opt.zero_grad()
        loss = _two_wells(w).sum()  # a sum over coordinates: each coordinate is an independent 1-d run
        loss.backward()
        return loss
    for _ in range(steps):
        opt.step(closure)
    return w.detach()


def test_entropy_sgd_ends_in_wide_minimum_where_sgd_ends_in_narrow(one_thread):
    """f(x) = -A exp(-(x-X1)^2 / 2 S1^2) - B exp(-(x-X2)^2 / 2 S2^2), from 5 starts near the narrow well.

    Plain gradient descent with lr 0.05, given as many gradient evaluations as Entropy-SGD, ends in the narrow deep
    well from every start; Entropy-SGD with the same lr 0.05 (and the reference noise 1e-4, alpha 0.75, L 20, an SGLD
    step 10x the lr, as in the reference defaults 0.01 / 0.1) ends in the wide shallow one from every start, for 5
    noise replicas per start: the loss is a sum over 25 coordinates, so each coordinate is an independent 1-d run
    with its own SGLD noise (25 runs for the price of one). Mechanism in this regime: SGLD steps of eta' = 0.5
    cannot settle in a minimum of curvature A / S1^2 = 25 > 2 / eta' (its local entropy is low), so the SGLD
    average mu, and hence x, moves into the wide valley. "Ends in" = lies in the basin of attraction: plain GD
    from the final x converges to X2 (over 10 generator seeds x 100 runs the slowest run was at x = 1.1, the
    basins' boundary is near 0.6)."""
    x0 = torch.tensor(STARTS).repeat(5)  # 5 starts x 5 noise replicas
    outer, inner = 40, 20
    w = torch.nn.Parameter(x0.clone())
    gd = _run_1d(torch.optim.SGD([w], lr=0.05), w, outer * inner)
    assert (gd - X1).abs().max() < 0.05, f"plain GD should end in the narrow well: {gd.tolist()}"
    w = torch.nn.Parameter(x0.clone())
    esgd = EntropySGD([w], lr=0.05, L=inner, sgld_lr=0.5, gamma=1e-3, scoping=0.0, noise=1e-4, alpha=0.75,
                      generator=torch.Generator().manual_seed(0))
    x = _run_1d(esgd, w, outer)
    assert (x - X1).abs().min() > 3 * S1, f"Entropy-SGD should leave the narrow well: {x.tolist()}"
    w = torch.nn.Parameter(x.clone())  # where x lies: plain GD from there finds the minimum of its basin
    polished = _run_1d(torch.optim.SGD([w], lr=0.5), w, 100)
    assert (polished - X2).abs().max() < 0.05, f"Entropy-SGD should end in the wide well's basin: {x.tolist()}"


# ---------------------------------------------------------------------------------------------------------------------
# Every registered optimizer trains the FCN to zero error (issue 8)
# ---------------------------------------------------------------------------------------------------------------------

# (lr, extra kwargs, max_epochs) per optimizer: registry defaults where they converge in a few seconds; otherwise a
# larger lr, stated here. Epoch caps are ~3x what the runs need, so a broken optimizer fails the test.
TRAIN_SETTINGS = {
    "sgd": (0.05, {}, 150),  # default lr 0.01 needs ~150 epochs
    "gd": (0.1, {}, 500),  # full batch: one step per epoch; default lr 0.01 needs ~1100 epochs
    "momentum": (None, {}, 100),
    "adam": (None, {}, 100),
    "adagrad": (0.05, {}, 100),  # default lr 0.01 needs ~100 epochs
    "rmsprop": (None, {}, 100),
    "entropy_sgd": (0.5, {"L": 5}, 40),  # L 5 (the sheet's other value) and outer lr 0.5: each step costs L passes
}


@pytest.fixture(scope="module")
def mnist_task():
    import flatness
    return flatness.data.binary_task("mnist", n_train=200, n_attack=0, n_test=100, seed=0, source="embedded")


def test_train_settings_cover_registry():
    assert set(TRAIN_SETTINGS) == set(list_optimizers())


@pytest.mark.parametrize("name", list(TRAIN_SETTINGS))
def test_every_optimizer_trains_fcn_to_zero_error(one_thread, mnist_task, name):
    import flatness
    lr, kwargs, max_epochs = TRAIN_SETTINGS[name]
    torch.manual_seed(0)
    model = flatness.FCN((784, 40, 40, 1))
    res = flatness.train.train_to_zero_error(model, mnist_task, optimizer=name, lr=lr, max_epochs=max_epochs,
                                             optimizer_kwargs=kwargs)
    assert res.status == "converged", f"{name}: {res.status} after {len(res.history) - 1} epochs"
    assert res.final["train_error"] == 0.0
