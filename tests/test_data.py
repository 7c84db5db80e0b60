"""Data layer: counts and checksums of the bundled subsets, lookup order, binary tasks, bad input."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flatness import data as D
from flatness.data import binary_task, load_dataset

ROOT = Path(__file__).resolve().parents[1]


CIFAR_FILES = [f"cifar10_small_train_part{k}.npz" for k in (1, 2, 3, 4)] + ["cifar10_small_test.npz"]


def test_manifest_checksums_match_files():
    manifest = json.loads((ROOT / "data" / "manifest.json").read_text())
    assert set(manifest) == {"mnist_small.npz", "fashion_mnist_small.npz", *CIFAR_FILES}
    total = 0
    for name, entry in manifest.items():
        blob = (ROOT / "data" / name).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"], name
        assert len(blob) == entry["bytes"]
        assert len(blob) <= 5 * 2**20, f"{name}: the repository's per-file limit is 5 MiB"
        total += len(blob)
    assert total <= 25 * 2**20, "bundled data must stay under 25 MiB"


def _manifest_counts(name: str, split: str) -> list[int]:
    manifest = json.loads((ROOT / "data" / "manifest.json").read_text())
    rows = [e[f"{split}_counts"] for f, e in manifest.items() if e["dataset"] == name and split in e["splits"]]
    return np.sum(rows, axis=0).tolist()


@pytest.mark.parametrize("name,n_train,n_test,shape", [
    ("mnist", 4000, 1000, (28, 28)), ("fashion_mnist", 3000, 1000, (28, 28)), ("cifar10", 6000, 1500, (32, 32, 3))])
def test_embedded_counts_and_types(name, n_train, n_test, shape):
    tr = load_dataset(name, "train", source="embedded")
    te = load_dataset(name, "test", source="embedded")
    assert tr.images.dtype == torch.uint8 and tr.labels.dtype == torch.int64
    assert tuple(tr.images.shape) == (n_train, *shape) and tuple(te.images.shape) == (n_test, *shape)
    assert np.bincount(tr.labels.numpy(), minlength=10).tolist() == _manifest_counts(name, "train")
    assert np.bincount(te.labels.numpy(), minlength=10).tolist() == _manifest_counts(name, "test")


def test_embedded_cifar10_classes_and_provenance():
    tr = load_dataset("cifar10", "train", source="embedded")
    te = load_dataset("cifar10", "test", source="embedded")
    assert np.bincount(tr.labels.numpy(), minlength=10).tolist() == [2000, 2000, 0, 2000] + [0] * 6
    assert np.bincount(te.labels.numpy(), minlength=10).tolist() == [500, 500, 0, 500] + [0] * 6
    assert len(tr.paths) == 4  # the parts, concatenated in order
    parts = [np.load(ROOT / "data" / f) for f in CIFAR_FILES]
    idx = np.concatenate([z["index_train"] for z in parts[:4]])
    src = np.concatenate([z["source_train"] for z in parts[:4]])
    assert (np.diff(idx) > 0).all()  # original training order
    assert np.array_equal(src == "lossless", idx < 4000) and set(src) == {"lossless", "jpeg"}
    assert (src == "lossless").sum() == 1146  # every airplane, automobile and cat among the first 4000
    z = parts[4]
    assert np.array_equal(z["source_test"] == "lossless", z["index_test"] >= 0)
    assert (z["source_test"] == "lossless").sum() == 295 and (z["index_test"][z["source_test"] == "jpeg"] == -1).all()
    assert np.array_equal(z["rank_in_class_test"], np.tile(np.arange(500), 3))
    # first train image of classes {0, 1, 3} is original index 4 (automobile), exact pixels
    assert idx[0] == 4 and parts[0]["y_train"][0] == 1 and src[0] == "lossless"
    shared = ROOT.parent / "shared" / "data" / "cifar10_lossless_subset.npz"
    if shared.is_file():  # exact pixels are the original ones
        with np.load(shared) as s:
            keep = idx < 4000
            assert np.array_equal(tr.images.numpy()[keep], s["x_train"][idx[keep]])
            t_keep = z["index_test"] >= 0
            assert np.array_equal(te.images.numpy()[t_keep], s["x_test"][z["index_test"][t_keep]])


def test_embedded_cifar10_supports_both_papers_tasks():
    chen = binary_task("cifar10", 4000, 0, 1000, classes=(0, 1), source="embedded")  # airplane vs automobile
    assert chen.train.x.shape == (4000, 3, 32, 32) and chen.test.y.float().mean() == 0.5
    zhang = binary_task("cifar10", 1500, 2500, 1000, source="embedded")  # car vs cat, with an attack set
    assert zhang.info["train_pool"] == 4000 and zhang.attack.x.shape[0] == 2500


def test_embedded_mnist_is_the_original_prefix():
    # y_train[:10] of MNIST is known: 5 0 4 1 9 2 1 3 1 4 (../shared/data/README.md)
    tr = load_dataset("mnist", "train", source="embedded")
    assert tr.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def test_full_data_sha256_when_shared_present():
    shared = ROOT.parent / "shared" / "data" / "mnist.npz"
    if not shared.is_file():
        pytest.skip("../shared/data not present")
    tr = load_dataset("mnist", "train", source="full")
    assert tr.source == "npz" and len(tr.labels) == 60000
    assert np.bincount(tr.labels.numpy()).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_missing_data_error_lists_places(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "data_dirs", lambda: [tmp_path])
    monkeypatch.setattr(D, "EMBEDDED_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"mnist.npz.*FLATNESS_DATA_DIR"):
        load_dataset("mnist", "train")


def test_corrupt_file_is_detected(tmp_path, monkeypatch):
    (tmp_path / "mnist.npz").write_bytes(b"not the real file")
    monkeypatch.setattr(D, "data_dirs", lambda: [tmp_path])
    with pytest.raises(OSError, match="corrupt"):
        load_dataset("mnist", "train", source="full")


def test_env_dir_takes_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATNESS_DATA_DIR", str(tmp_path))
    assert D.data_dirs()[0] == tmp_path


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="svhn", n_train=10), r"unknown name='svhn'; allowed values are \['mnist'"),
    (dict(name="mnist", n_train=-1), r"n_train=-1 must be >= 1"),
    (dict(name="mnist", n_train=5000), r"n_train=5000 exceeds the 4000 images"),
    (dict(name="mnist", n_train=3000, n_attack=2000), r"maximum n_attack=1000"),
    (dict(name="mnist", n_train=10, n_test=5000), r"n_test=5000 exceeds the 1000 images"),
    (dict(name="cifar10", n_train=10, classes=(1, 1)), r"disjoint"),
    (dict(name="cifar10", n_train=10, classes=(1, 12)), r"classes=12 exceeds the maximum 9"),
])
def test_binary_task_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        binary_task(**{"source": "embedded", **kwargs})


def test_load_dataset_bad_split():
    with pytest.raises(ValueError, match=r"unknown split='val'; allowed values are \['train', 'test'\]"):
        load_dataset("mnist", "val")


def test_binary_task_mnist_disjoint_flipped_and_nested():
    t = binary_task("mnist", 200, 100, 300, seed=3, source="embedded")
    S, A, T = t
    assert S.x.shape == (200, 1, 28, 28) and A.x.shape == (100, 1, 28, 28) and T.x.shape == (300, 1, 28, 28)
    assert S.x.dtype == torch.float32 and 0.0 <= float(S.x.min()) and float(S.x.max()) <= 1.0
    assert set(S.y.unique().tolist()) <= {0, 1}
    # labels follow the 0-4 / 5-9 split: recover digits from the raw data to check
    raw = load_dataset("mnist", "train", source="embedded")
    where = {bytes(img.numpy()): i for i, img in enumerate(raw.images)}

    def digits(x):  # index of each image in the raw pool (exact pixel match)
        return torch.tensor([where[bytes((xi[0] * 255).round().to(torch.uint8).numpy())] for xi in x])

    iS, iA = digits(S.x), digits(A.x)
    assert not set(iS.tolist()) & set(iA.tolist())  # S and A disjoint
    assert torch.equal(S.y, (raw.labels[iS] >= 5).long())
    assert torch.equal(A.y, 1 - (raw.labels[iA] >= 5).long())  # attack labels flipped
    # same seed, bigger attack set: S and T unchanged, A nested
    t2 = binary_task("mnist", 200, 150, 300, seed=3, source="embedded")
    assert torch.equal(t2.train.x, S.x) and torch.equal(t2.test.x, T.x)
    assert set(iA.tolist()) <= set(digits(t2.attack.x).tolist())
    assert t.train_and_attack.x.shape[0] == 300


def test_binary_task_cifar_classes():
    t = binary_task("cifar10", 100, 50, 60, seed=0, source="embedded")
    assert t.train.x.shape == (100, 3, 32, 32) and t.info["classes"] == [[1], [3]]
    t = binary_task("cifar10", 100, 0, 60, seed=0, classes=(0, 1), source="embedded")
    assert t.attack.x.shape[0] == 0 and t.info["classes"] == [[0], [1]]


def test_data_readme_lists_the_manifest_checksums():
    manifest = json.loads((ROOT / "data" / "manifest.json").read_text())
    readme = (ROOT / "data" / "README.md").read_text()
    for name, entry in manifest.items():
        assert entry["sha256"] in readme and f"{entry['bytes']:,}" in readme, name


def test_binary_task_class_absent_from_the_source_is_named():
    # the bundled CIFAR-10 subset holds airplane (0), automobile (1) and cat (3) only
    with pytest.raises(ValueError, match=r"binary_task: classes=\(0, 5\) asks for class\(es\) \[5\] absent from "
                                         r"cifar10/train \(source 'embedded', which holds only classes \[0, 1, 3\]\)"
                                         r".*source='full'"):
        binary_task("cifar10", 10, 0, 10, classes=(0, 5), source="embedded")
    with pytest.raises(ValueError, match=r"class\(es\) \[2, 4\] absent"):
        binary_task("cifar10", 10, 0, 10, classes=((1, 2), (3, 4)), source="embedded")


@pytest.mark.parametrize("content,match", [
    (None, r"manifest\.json is truncated or corrupt \(not valid JSON"),  # None: the real file, truncated
    ("[1, 2]", r"manifest\.json is corrupt \(expected an object"),
    ('{"mnist_small.npz": {"bytes": 3}}', r"manifest\.json is corrupt"),
])
def test_corrupt_manifest_names_the_file_and_the_fix(tmp_path, monkeypatch, content, match):
    real = (ROOT / "data" / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(real[: len(real) // 2] if content is None else content)
    monkeypatch.setattr(D, "EMBEDDED_DIR", tmp_path)  # a temp copy: the real manifest is never touched
    with pytest.raises(OSError, match=match + r".*build_subsets\.py.*git checkout -- data/manifest\.json"):
        load_dataset("mnist", "train", source="embedded")
    assert json.loads((ROOT / "data" / "manifest.json").read_text())  # still intact


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed="abc"), r"binary_task: seed='abc' must be an integer"),
    (dict(seed=1.5), r"binary_task: seed=1.5 must be an integer"),
    (dict(seed=True), r"binary_task: seed=True must be an integer"),
    (dict(attack_seed="x"), r"binary_task: attack_seed='x' must be an integer"),
])
def test_binary_task_bad_seed(kwargs, match):
    with pytest.raises(TypeError, match=match):
        binary_task("mnist", 10, 5, 10, source="embedded", **kwargs)


def test_binary_task_numpy_seed_is_an_integer():
    a = binary_task("mnist", 10, 5, 10, seed=np.int64(4), source="embedded")
    b = binary_task("mnist", 10, 5, 10, seed=4, source="embedded")
    assert torch.equal(a.train.x, b.train.x) and a.info["seed"] == 4
