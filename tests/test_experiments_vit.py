"""Notebook 07's pipeline (flatness.experiments.vit): configs, the offline zoo, the online path on a tiny
random-weight timm ViT and generated JPEGs (never the network), resumability, artifacts, figures, claims."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("timm")

from flatness.experiments import vit as exp  # noqa: E402
from flatness.results import ResultStore  # noqa: E402

TINY = dict(n_train=32, n_test=20, n_inputs=4, n_draws=2, max_draws=2, worst_n=8, worst_m=4, worst_steps=2,
            mls_steps=2)


def _tiny(arch="vit_d32", **kw):
    return exp.configs("smoke", archs=[arch], **{**TINY, **kw})


# ------------------------------------------------------------------------------------------------ configs
def test_config_errors_name_the_parameter():
    with pytest.raises(ValueError, match="profile"):
        exp.configs("gpu")
    with pytest.raises(ValueError, match="lr"):
        exp.configs("cpu", lr=0.1)  # set by the recipes
    with pytest.raises(ValueError, match="n_draws"):
        exp.configs("cpu", n_draws=1)
    with pytest.raises(ValueError, match="archs"):
        exp.configs("cpu", archs=["resnet"])
    with pytest.raises(ValueError, match="arch"):
        exp.VitTrainConfig(arch="vit_huge")
    with pytest.raises(ValueError, match="augment"):
        exp.VitTrainConfig(augment="mixup")
    with pytest.raises(ValueError, match="optimizer"):
        exp.VitTrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="max_draws"):
        exp.MetricConfig(n_draws=50, max_draws=10)
    with pytest.raises(ValueError, match="worst_norm"):
        exp.MetricConfig(worst_norm="l1")
    with pytest.raises(ValueError, match="imagenet_dir"):
        exp.online_configs("paper", None, names=["vit_tiny_patch16_224"])


def test_profiles_zoo_shape():
    cpu = exp.configs("cpu")
    fams = {}
    for c in cpu:
        fams.setdefault(exp.ARCHS[c.train.arch][0], set()).add(c.train.arch)
    assert len(cpu) >= 16 and len(fams) >= 4, (len(cpu), fams)
    assert all(len(a) >= 2 for a in fams.values()), fams  # 2+ sizes per family
    assert len({(c.train.lr, c.train.augment, c.train.epochs) for c in cpu}) >= 3  # varied recipes
    assert len(exp.configs("smoke")) <= 4
    assert len(exp.configs("paper")) >= len(cpu)
    assert cpu[0].metrics.rho == 0.1 and exp.MetricConfig().n_draws == 50 and exp.MetricConfig().max_draws == 200
    s3 = exp.configs("cpu", seed=3)[0]
    assert s3.train.seed == 3 and s3.metrics.seed == 3 and s3.train.run_seed != cpu[0].train.run_seed


@pytest.mark.parametrize("arch", list(exp.ARCHS))
def test_every_arch_builds_at_32px(arch):
    m = exp.build_arch(arch, seed=0).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    m2 = exp.build_arch(arch, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_levit_attention_biases_are_perturbed_in_eval_mode():
    from torch.func import functional_call

    m = exp.build_arch("levit_s", seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    params = dict(m.named_parameters())
    names = [n for n in params if n.endswith("attention_biases")]
    g = torch.Generator().manual_seed(0)
    # random (not constant: softmax is shift-invariant) perturbations of every stage's biases
    moved_params = {**params, **{n: params[n] + 5 * torch.randn(params[n].shape, generator=g) for n in names}}
    with torch.no_grad():
        base = m(x)
        moved = functional_call(m, moved_params, (x,))
        again = m(x)
    assert not torch.allclose(base, moved)  # the perturbation reaches the biases (no stale cache)
    assert torch.allclose(base, again)  # and does not stick


def test_sigmoid_sum_mse_closed_form():
    z = torch.tensor([[0.0, 0.0], [100.0, -100.0]])
    y = torch.tensor([1, 0])
    # first: (0.5-0)^2 + (0.5-1)^2 = 0.5; second: ~0
    assert exp.sigmoid_sum_mse(z, y).item() == pytest.approx(0.25, abs=1e-6)


# --------------------------------------------------------------------------------------------- offline run
def test_offline_run_columns_resume_and_artifacts(tmp_path, monkeypatch):
    store = ResultStore("07_vit", root=tmp_path)
    cfgs = _tiny()
    df = exp.run_all(cfgs, store, progress=False)
    assert len(df) == 1 and df.status.iloc[0] == "ok", df.get("error_message")
    assert set(exp.ROW_COLUMNS) <= set(df.columns)
    r = df.iloc[0]
    assert r.zoo == "offline" and r.family == "vit" and r.params > 0
    for c in ("adaptive_sharpness", "adaptive_sharpness_worst", "mls", "nmls", "mls_exact", "nmls_exact",
              "test_accuracy"):
        assert math.isfinite(r[c]), c
    assert r.nmls == pytest.approx(r.mls * r.input_norm_sq, rel=0.5)  # same order: MLS^2 ||x||^2
    assert 0 <= r.test_accuracy <= 1
    assert len(store.artifact_keys()) == 1

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(exp, "_train_one", boom)
    monkeypatch.setattr(exp, "_metrics", boom)
    again = exp.run_all(cfgs, store, progress=False)  # resumable: nothing runs
    assert again["key"].tolist() == df["key"].tolist()
    monkeypatch.undo()
    monkeypatch.setattr(exp, "_train_one", boom)  # a new measurement re-uses the saved weights
    new = exp.run_all(_tiny(rho=0.05), store, progress=False)
    assert new.status.iloc[0] == "ok" and new.adaptive_sharpness.iloc[0] != df.adaptive_sharpness.iloc[0]


def test_diverged_training_is_a_row(tmp_path, monkeypatch):
    store = ResultStore("07_vit", root=tmp_path)
    cfg = _tiny()[0]
    sd = exp.build_arch(cfg.train.arch, cfg.train.run_seed).state_dict()
    monkeypatch.setattr(exp, "_train_one", lambda t: {"state_dict": sd, "status": "diverged",
                                                      "train_loss": math.nan, "train_seconds": 0.0})
    (row,) = exp.run(cfg, store)
    assert row["status"] == "diverged" and "diverged" in row["reason"] and math.isnan(row["nmls"])


# ---------------------------------------------------------------------------------------------- online path
def _imagenet(tmp_path, wnids=("n01440764", "n01443537"), per=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    for w in wnids:
        d = tmp_path / "imagenet" / "train" / w
        d.mkdir(parents=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{w}_{i}.JPEG")
    return tmp_path / "imagenet"


def test_online_path_on_a_tiny_random_vit(tmp_path):
    root = _imagenet(tmp_path)
    files, y = exp.imagenet_images(root, 3, seed=0)
    assert len(files) == 3 and set(y.tolist()) <= {0, 1}
    cfgs = exp.online_configs("smoke", root, names=["vit_tiny_patch16_224", "no_such_model_xyz"],
                              pretrained=False, model_kwargs=dict(patch_size=32, embed_dim=16, depth=1, num_heads=1),
                              n_images=3, n_inputs=2, n_draws=2, max_draws=2, worst_n=2, worst_m=2, worst_steps=1,
                              mls_steps=2)
    store = ResultStore("07_vit", root=tmp_path / "res")
    df = exp.run_all(cfgs, store, progress=False)
    ok, bad = df.iloc[0], df.iloc[1]
    assert ok.status == "ok", ok.reason
    assert ok.zoo == "online" and ok.family == "vit" and math.isfinite(ok.nmls) and math.isfinite(ok.adaptive_sharpness)
    assert math.isnan(ok.mls_exact)  # 1000 x 150528 Jacobian: over exact_max_jacobian, skipped
    assert bad.status == "failed" and "load" in bad.reason
    assert "failed" in set(exp.run_all(cfgs, store, progress=False).status)  # failures are kept, not retried


def test_imagenet_layout_errors(tmp_path):
    with pytest.raises(ValueError, match="train/"):
        exp.imagenet_images(tmp_path, 2)
    (tmp_path / "train" / "cats").mkdir(parents=True)
    (tmp_path / "train" / "cats" / "a.JPEG").write_bytes(b"")
    with pytest.raises(ValueError, match="wnid"):
        exp.imagenet_images(tmp_path, 2)


def test_online_model_names_filter():
    names = exp.online_model_names()
    assert len(names) > 50 and all("vit" in n for n in names)
    assert not any("_512" in n.split(".")[0] or "_448" in n.split(".")[0] for n in names)  # > 384 px dropped


# ------------------------------------------------------------------------------------------ figures, claims
def _synthetic(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for fam, sign in (("vit", 1), ("levit", 1), ("fastvit", 1), ("mobilevit", -1)):
        for i in range(6):
            x = 10 ** rng.uniform(0, 2)
            rows.append({"family": fam, "status": "ok", "nmls": x,
                         "adaptive_sharpness": (x if sign > 0 else 100 / x) * (1 + 0.05 * rng.random()) + 1,
                         "adaptive_sharpness_worst": x * 1e-3, "nmls_exact": x * 0.9, "mls_to_exact": 0.9})
    rows.append({"family": "vit", "status": "diverged", "nmls": math.nan, "adaptive_sharpness": math.nan})
    return pd.DataFrame(rows)


def test_claim_helpers_on_synthetic_data():
    corr = exp.family_correlations(_synthetic())
    assert corr.family.iloc[0] == "all" and set(corr.family) == {"all", "vit", "levit", "fastvit", "mobilevit"}
    fams = exp.claim_within_families(corr)
    assert fams["breaking"] == ["mobilevit"] and fams["value"] == pytest.approx(0.75) and fams["holds"]
    assert corr.set_index("family").loc["vit", "r"] > 0.9
    over = exp.claim_positive_overall(corr)
    assert over["n"] == 24 and over["holds"] is True and over["value"] > 0 and over["ci"][0] > 0
    neg = _synthetic().assign(adaptive_sharpness=lambda d: 1 / d.nmls)
    c2 = exp.family_correlations(neg)
    assert not exp.claim_positive_overall(c2)["holds"] and not exp.claim_within_families(c2)["holds"]


def test_figures_return_figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = _synthetic()
    for fig in (exp.figure_fig4(df), exp.figure_estimator(df), exp.figure_estimator(df.drop(columns="nmls_exact"))):
        assert isinstance(fig, matplotlib.figure.Figure)
        plt.close(fig)
