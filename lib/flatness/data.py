"""Datasets and the binary tasks of Zhang et al. 2021 (train set S, attack set A, test set T).

:func:`load_dataset` returns raw ``uint8`` images and ``int64`` labels of ``mnist``, ``fashion_mnist`` or
``cifar10``. Where it looks, in order (``source="auto"``):

1. ``$FLATNESS_DATA_DIR``, the repository's ``data/`` and ``../shared/data/``: the full-size npz archives
   (``mnist.npz``, ``fashion_mnist.npz``, ``cifar10_jpeg_{train_part1,train_part2,test}.npz``), each verified
   against its sha256;
2. the standard torchvision layout under ``data/`` (``MNIST/raw``, ``FashionMNIST/raw``,
   ``cifar-10-batches-py``);
3. a torchvision download into ``data/``, only when ``download=True`` (never in tests or CI);
4. the small real subsets committed under ``data/`` (see ``data/README.md``), with a warning.

``source="embedded"`` always uses the committed subsets (the ``smoke`` and ``cpu`` profiles do, so their
results are the same on every machine); ``source="full"`` never falls back to them.

The full CIFAR-10 archives are decoded JPEGs (lossy, see ``../shared/data/README.md``). The embedded
CIFAR-10 subset holds airplane, automobile and cat images only: exact pixels where the exact-pixel subset of
``../shared/data`` has them, decoded JPEG otherwise; each file's ``source_train`` / ``source_test`` array and
``data/README.md`` record which. The bundled files of each dataset and split are listed, with their sha256,
in ``data/manifest.json`` (several parts are concatenated in order).
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._checks import check_choice, check_int
from ._paths import REPO_ROOT
from .boolean import boolean_inputs, function_to_hex, hex_to_function  # re-exported: the Boolean "dataset"

__all__ = [
    "DATASETS", "Dataset", "Split", "BinaryTask", "load_dataset", "binary_task", "data_dirs",
    "boolean_inputs", "function_to_hex", "hex_to_function",
]

DATASETS = ("mnist", "fashion_mnist", "cifar10")
SPLITS = ("train", "test")
SOURCES = ("auto", "full", "embedded")

EMBEDDED_DIR = REPO_ROOT / "data"

# (file, images key, labels key) per dataset and split; several files are concatenated in order.
_FULL_FILES: dict[str, dict[str, list[tuple[str, str, str]]]] = {
    "mnist": {"train": [("mnist.npz", "x_train", "y_train")], "test": [("mnist.npz", "x_test", "y_test")]},
    "fashion_mnist": {"train": [("fashion_mnist.npz", "x_train", "y_train")],
                      "test": [("fashion_mnist.npz", "x_test", "y_test")]},
    "cifar10": {"train": [("cifar10_jpeg_train_part1.npz", "x_train", "y_train"),
                          ("cifar10_jpeg_train_part2.npz", "x_train", "y_train")],
                "test": [("cifar10_jpeg_test.npz", "x_test", "y_test")]},
}

# sha256 of the full archives, from ../shared/data/README.md.
FULL_SHA256 = {
    "mnist.npz": "094b831e432331f1f6d6829ab9bfff4551410a81e1f816c9cce482d3e9b3ba57",
    "fashion_mnist.npz": "c2c37d617253c9f5a6fc23ba8553045734f3682da04a81934b27e6c7c2363beb",
    "cifar10_lossless_subset.npz": "28b057311777c03dcfc646806eee6ee856dac58ee1aa9fc3a8d46ae1c29e0049",
    "cifar10_jpeg_train_part1.npz": "a6c82a31edfef7ef6444887c3ad1d6eb1a5283861da4f97837218ffd327e5c17",
    "cifar10_jpeg_train_part2.npz": "6531e5e68f5d89632fc65282a293f8aea145419fc8808548a0ea8723ee482a68",
    "cifar10_jpeg_test.npz": "baa2e2e9a6e697eb9b7660bd8248e26ba257177ce255fcedccb9bbb7cc5a2ad2",
}

_TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


class Dataset(NamedTuple):
    """Raw images and labels of one split, and where they came from."""

    images: Tensor  # uint8, (N, 28, 28) for MNIST-like, (N, 32, 32, 3) for CIFAR-10
    labels: Tensor  # int64, (N,)
    name: str
    split: str
    source: str  # "npz", "torchvision" or "embedded"
    paths: tuple[str, ...]


class Split(NamedTuple):
    """A labelled set: ``x`` float images in [0, 1] of shape ``(N, C, H, W)``, ``y`` int64 labels in {0, 1}."""

    x: Tensor
    y: Tensor


@dataclass
class BinaryTask:
    """Train set S, attack set A (flipped labels) and test set T of a binary task (Zhang et al. 2021, Sec. 5.2).

    Unpacks as ``S, A, T = task``. ``info`` records the dataset, class mapping, seed, sizes and source.
    """

    train: Split
    attack: Split
    test: Split
    info: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.train, self.attack, self.test))

    @property
    def train_and_attack(self) -> Split:
        """S ∪ A, the set the network is trained on."""
        return Split(torch.cat([self.train.x, self.attack.x]), torch.cat([self.train.y, self.attack.y]))


def data_dirs() -> list[Path]:
    """Folders searched for the full npz archives, in order."""
    dirs = []
    if os.environ.get("FLATNESS_DATA_DIR"):
        dirs.append(Path(os.environ["FLATNESS_DATA_DIR"]))
    dirs += [EMBEDDED_DIR, REPO_ROOT.parent / "shared" / "data"]
    return dirs


_VERIFIED: dict[tuple[str, int, float], str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime)
    if key not in _VERIFIED:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _VERIFIED[key] = h.hexdigest()
    return _VERIFIED[key]


def _verify(path: Path, expected: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise OSError(
            f"load_dataset: {path} is corrupt or not the expected version (sha256 {got}, expected {expected}). "
            f"Replace it with the original file (see ../shared/data/README.md or data/README.md) or delete it."
        )


def _load_npz(name: str, split: str) -> Dataset | None:
    files = _FULL_FILES[name][split]
    for d in data_dirs():
        paths = [d / f for f, _, _ in files]
        if all(p.is_file() for p in paths):
            xs, ys = [], []
            for p, (f, kx, ky) in zip(paths, files):
                _verify(p, FULL_SHA256[f])
                with np.load(p) as z:
                    xs.append(z[kx])
                    ys.append(z[ky])
            return Dataset(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)).long(),
                           name, split, "npz", tuple(map(str, paths)))
    return None


def _load_torchvision(name: str, split: str, download: bool) -> Dataset | None:
    root = EMBEDDED_DIR
    try:
        import torchvision.datasets as tvd

        cls = getattr(tvd, _TORCHVISION[name])
        ds = cls(str(root), train=(split == "train"), download=download)
    except (RuntimeError, OSError) as err:  # not present (download=False) or download failed
        if download:
            raise OSError(f"load_dataset: torchvision download of {name} into {root} failed: {err}") from err
        return None
    images = torch.as_tensor(np.asarray(ds.data)).to(torch.uint8)
    labels = torch.as_tensor(np.asarray(ds.targets)).long()
    return Dataset(images, labels, name, split, "torchvision", (str(root),))


def _embedded_manifest() -> dict:
    """``data/manifest.json`` (empty when absent); ``OSError`` naming the file when it is truncated or corrupt."""
    path = EMBEDDED_DIR / "manifest.json"
    if not path.is_file():
        return {}
    fix = ("Rebuild it with `.venv/bin/python data/build_subsets.py` (needs ../shared/data/) or restore the "
           "committed version with `git checkout -- data/manifest.json`.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OSError(f"load_dataset: {path} is truncated or corrupt (not valid JSON: {err}). {fix}") from None
    if not isinstance(manifest, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in manifest.values()):
        raise OSError(f"load_dataset: {path} is corrupt (expected an object mapping each bundled file to an "
                      f"entry with its 'sha256'). {fix}")
    return manifest


def _check_seed(fn: str, name: str, seed) -> int:
    """``seed`` as ``int`` (Python or NumPy integers); ``TypeError`` naming the parameter otherwise."""
    if isinstance(seed, bool):
        raise TypeError(f"{fn}: {name}={seed!r} must be an integer, got a bool")
    try:
        return operator.index(seed)
    except TypeError:
        raise TypeError(f"{fn}: {name}={seed!r} must be an integer (e.g. {name}=0), "
                        f"got {type(seed).__name__}") from None


def _embedded_files(name: str, split: str) -> list[tuple[str, dict]]:
    """Manifest entries holding ``name``/``split``, in part order (an entry without ``dataset``/``splits``
    keys is ``<name>_small.npz`` with both splits, the original layout)."""
    found = [(f, e) for f, e in _embedded_manifest().items()
             if e.get("dataset", f.removesuffix("_small.npz")) == name and split in e.get("splits", SPLITS)]
    return sorted(found, key=lambda fe: (fe[1].get("part", 0), fe[0]))


def _load_embedded(name: str, split: str) -> Dataset | None:
    files = _embedded_files(name, split)
    paths = [EMBEDDED_DIR / f for f, _ in files]
    if not files or not all(p.is_file() for p in paths):
        return None
    xs, ys = [], []
    for path, (_, entry) in zip(paths, files):
        _verify(path, entry["sha256"])
        with np.load(path) as z:
            xs.append(z[f"x_{split}"])
            ys.append(z[f"y_{split}"])
    images, labels = (xs[0], ys[0]) if len(xs) == 1 else (np.concatenate(xs), np.concatenate(ys))
    return Dataset(torch.from_numpy(images), torch.from_numpy(labels).long(), name, split, "embedded",
                   tuple(map(str, paths)))


def load_dataset(name: str, split: str = "train", *, source: str = "auto", download: bool = False) -> Dataset:
    """Raw ``uint8`` images and ``int64`` labels of a dataset split (lookup order in the module docstring).

    Args:
        name: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
        split: ``"train"`` or ``"test"``.
        source: ``"auto"`` (full data if found, else the embedded subset with a warning), ``"full"`` or
            ``"embedded"``.
        download: allow a torchvision download into ``data/`` when nothing local is found (needs network).
    Raises:
        ValueError: unknown name, split or source.
        FileNotFoundError: nothing found; the message lists every place looked at and how to get the files.
        OSError: a file exists but its sha256 does not match (corrupt or different version), or
            ``data/manifest.json`` is truncated or corrupt (the message says how to rebuild or restore it).
    """
    check_choice("load_dataset", "name", name, DATASETS)
    check_choice("load_dataset", "split", split, SPLITS)
    check_choice("load_dataset", "source", source, SOURCES)
    if source != "embedded":
        found = _load_npz(name, split) or _load_torchvision(name, split, download=False)
        if found is None and download:
            found = _load_torchvision(name, split, download=True)
        if found is not None:
            return found
    if source != "full":
        found = _load_embedded(name, split)
        if found is not None:
            if source == "auto":
                warnings.warn(f"load_dataset: full {name} not found; using the small embedded subset "
                              f"({len(found.labels)} {split} images, data/README.md)", stacklevel=2)
            return found
    files = sorted({f for f, _, _ in _FULL_FILES[name][split]})
    looked = [str(d / f) for d in data_dirs() for f in files]
    looked.append(str(EMBEDDED_DIR / _TORCHVISION[name]) + " (torchvision layout)")
    if source != "full":
        bundled = [f for f, _ in _embedded_files(name, split)] or [f"{name}_small*.npz"]
        looked.append(", ".join(str(EMBEDDED_DIR / f) for f in bundled) + " (embedded subset, data/manifest.json)")
    raise FileNotFoundError(
        f"load_dataset: no {name}/{split} data found (source={source!r}). Looked for: " + "; ".join(looked)
        + f". To fix: copy {', '.join(files)} (see ../shared/data/README.md for sha256) into data/ or a folder "
        "named by $FLATNESS_DATA_DIR; or call load_dataset(..., download=True) when online; or use "
        "source='embedded' for the small bundled subset."
    )


def _as_float_nchw(images: Tensor) -> Tensor:
    x = images.float().div_(255.0)
    if x.ndim == 3:  # (N, H, W) grey
        return x.unsqueeze(1)
    return x.permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)


_DEFAULT_CLASSES = {"mnist": ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)), "fashion_mnist": ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)),
                    "cifar10": ((1,), (3,))}


def _class_groups(name: str, classes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if classes is None:
        return _DEFAULT_CLASSES[name]
    try:
        a, b = classes
    except (TypeError, ValueError):
        raise ValueError(f"binary_task: classes={classes!r} must be a pair (class0, class1) of labels or "
                         "tuples of labels, e.g. (1, 3) or ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))") from None
    ga = tuple(int(c) for c in (a if isinstance(a, (tuple, list)) else (a,)))
    gb = tuple(int(c) for c in (b if isinstance(b, (tuple, list)) else (b,)))
    for c in ga + gb:
        check_int("binary_task", "classes", c, minimum=0, maximum=9)
    if set(ga) & set(gb) or not ga or not gb:
        raise ValueError(f"binary_task: classes={classes!r} must be two non-empty disjoint groups of labels 0..9")
    return ga, gb


def binary_task(name: str, n_train: int, n_attack: int = 0, n_test: int = 1000, seed: int = 0, *,
                classes=None, attack_seed: int | None = None, source: str = "auto",
                device=None) -> BinaryTask:
    """Binary task with an attack set (Zhang et al. 2021, Sec. 5.2; the attack-set trick of Wu et al. 2017).

    - ``mnist`` (and ``fashion_mnist``): labels 0-4 -> 0 and 5-9 -> 1 by default;
    - ``cifar10``: automobile (1) -> 0 and cat (3) -> 1 by default; ``classes=(a, b)`` picks any two
      (groups of) classes.

    S (``n_train``) and A (``n_attack``) are drawn without overlap from the training split, T (``n_test``)
    from the test split, so the three are disjoint. A's labels are flipped. S and T depend only on
    ``seed`` and on their own sizes (prefixes of one permutation), so a sweep over ``n_attack`` with a fixed
    seed trains on the same S and tests on the same T; A is a prefix of a permutation of the rest of the pool
    (seeded by ``attack_seed``, default ``seed``), so larger attack sets contain smaller ones.

    Returns:
        :class:`BinaryTask` of float images in [0, 1], shape ``(N, C, H, W)``, and int64 labels in {0, 1}.
    Raises:
        ValueError: unknown dataset or classes, a class absent from the source (the bundled CIFAR-10 subset
            holds classes 0, 1 and 3 only), negative sizes, or sizes larger than the pools (the message
            names the parameter and the maximum).
        TypeError: ``seed`` or ``attack_seed`` not an integer.
    """
    fn = "binary_task"
    check_choice(fn, "name", name, DATASETS)
    n_train = check_int(fn, "n_train", n_train, minimum=1)
    n_attack = check_int(fn, "n_attack", n_attack, minimum=0)
    n_test = check_int(fn, "n_test", n_test, minimum=0)
    seed = _check_seed(fn, "seed", seed)
    attack_seed = None if attack_seed is None else _check_seed(fn, "attack_seed", attack_seed)
    g0, g1 = _class_groups(name, classes)
    train, test = load_dataset(name, "train", source=source), load_dataset(name, "test", source=source)
    for ds in (train, test):  # a group absent from the pool would silently give one-class labels
        held = sorted(int(c) for c in torch.unique(ds.labels))
        missing = [c for c in g0 + g1 if c not in held]
        if missing:
            given = classes if classes is not None else (g0, g1)
            hint = (" Use source='full' with the full archives (../shared/data/README.md) for every class."
                    if ds.source == "embedded" else "")
            raise ValueError(f"{fn}: classes={given!r} asks for class(es) {missing} absent from {name}/{ds.split} "
                             f"(source {ds.source!r}, which holds only classes {held}).{hint}")

    def pool(ds: Dataset):
        idx = torch.nonzero(torch.isin(ds.labels, torch.tensor(g0 + g1))).squeeze(1)
        return idx, torch.isin(ds.labels[idx], torch.tensor(g1)).long()

    tr_idx, tr_lab = pool(train)
    te_idx, te_lab = pool(test)
    where = f"{name}/train (classes {g0} vs {g1}, source {train.source})"
    if n_train > len(tr_idx):
        raise ValueError(f"{fn}: n_train={n_train} exceeds the {len(tr_idx)} images of {where}")
    if n_train + n_attack > len(tr_idx):
        raise ValueError(f"{fn}: n_attack={n_attack} exceeds the {len(tr_idx) - n_train} images of {where} left "
                         f"after n_train={n_train} (maximum n_attack={len(tr_idx) - n_train})")
    if n_test > len(te_idx):
        raise ValueError(f"{fn}: n_test={n_test} exceeds the {len(te_idx)} images of {name}/test "
                         f"(classes {g0} vs {g1}, source {test.source})")

    gen = torch.Generator().manual_seed(int(seed))
    perm_tr = torch.randperm(len(tr_idx), generator=gen)
    perm_te = torch.randperm(len(te_idx), generator=gen)
    s, rest = perm_tr[:n_train], perm_tr[n_train:]
    gen_a = torch.Generator().manual_seed((seed if attack_seed is None else attack_seed) + 1_000_003)
    a = rest[torch.randperm(len(rest), generator=gen_a)[:n_attack]]
    t = perm_te[:n_test]

    def make(ds: Dataset, idx: Tensor, lab: Tensor, sel: Tensor, flip: bool = False) -> Split:
        y = lab[sel]
        return Split(_as_float_nchw(ds.images[idx[sel]]).to(device), (1 - y if flip else y).to(device))

    info = {"dataset": name, "classes": [list(g0), list(g1)], "seed": int(seed),
            "attack_seed": int(seed if attack_seed is None else attack_seed), "n_train": n_train,
            "n_attack": n_attack, "n_test": n_test, "source": train.source,
            "train_pool": len(tr_idx), "test_pool": len(te_idx)}
    return BinaryTask(make(train, tr_idx, tr_lab, s), make(train, tr_idx, tr_lab, a, flip=True),
                      make(test, te_idx, te_lab, t), info)
