"""Build the small real subsets committed under data/ from the full archives in ../shared/data/.

    python data/build_subsets.py [--shared ../shared/data]

Writes beside this file:

- ``mnist_small.npz``, ``fashion_mnist_small.npz``: the first images of the original order;
- ``cifar10_small_train_part{1..4}.npz`` and ``cifar10_small_test.npz``: airplane (0), automobile (1) and cat (3),
  the first ``CIFAR_PER_CLASS`` images of each class, with exact pixels from ``cifar10_lossless_subset.npz``
  wherever it holds the image and the decoded-JPEG archives (``cifar10_jpeg_*.npz``, lossy) otherwise;
  a per-image ``source_<split>`` array says which;
- ``manifest.json``: sha256, sizes, per-class and per-source counts, which dataset and split each file holds.

Deterministic: the same inputs give byte-identical outputs. Each file stays under 5 MiB (the repository's
per-file limit).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# name -> (source file, n_train, n_test): the first images of the original order.
SIMPLE = {"mnist": ("mnist.npz", 4000, 1000), "fashion_mnist": ("fashion_mnist.npz", 3000, 1000)}

# CIFAR-10: airplane (0) and automobile (1) for Chen et al.'s 2-class VGG, automobile and cat (3) for
# Zhang et al.'s car-vs-cat task; the first images of each class (original order within the class).
CIFAR_CLASSES = (0, 1, 3)
CIFAR_PER_CLASS = {"train": 2000, "test": 500}
CIFAR_TRAIN_PARTS = 4
LOSSLESS, JPEG = "lossless", "jpeg"  # values of the per-image source arrays


def _deterministic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed but with fixed zip timestamps, so rebuilding gives identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def _entry(path: Path, out: dict[str, np.ndarray], dataset: str, src: str, selection: str, part: int = 0) -> dict:
    splits = [s for s in ("train", "test") if f"y_{s}" in out]
    e = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size,
         "dataset": dataset, "splits": splits, "part": part, "source": src}
    for s in splits:
        e[f"n_{s}"] = int(len(out[f"y_{s}"]))
        e[f"{s}_counts"] = np.bincount(out[f"y_{s}"], minlength=10).tolist()
        if f"source_{s}" in out:
            e[f"{s}_sources"] = {k: int(np.sum(out[f"source_{s}"] == k)) for k in (LOSSLESS, JPEG)}
    e["selection"] = selection
    print(f"{path.name}: {e['bytes'] / 2**20:.2f} MiB, sha256 {e['sha256']}")
    assert e["bytes"] <= 5 * 2**20, f"{path.name} exceeds the 5 MiB per-file limit"
    return e


def _simple(shared: Path, name: str, src: str, n_train: int, n_test: int) -> tuple[Path, dict]:
    out = {}
    with np.load(shared / src) as z:
        for split, n in (("train", n_train), ("test", n_test)):
            idx = np.arange(n)
            out[f"x_{split}"], out[f"y_{split}"] = z[f"x_{split}"][idx], z[f"y_{split}"][idx].astype(np.int64)
            out[f"index_{split}"] = idx.astype(np.int64)  # position in the original order
    path = HERE / f"{name}_small.npz"
    _deterministic_npz(path, out)
    return path, _entry(path, out, name, src, "first images of the original order")


def _cifar_train(shared: Path) -> dict[str, np.ndarray]:
    """First CIFAR_PER_CLASS train images of each class, original training order; exact pixels where known."""
    with np.load(shared / "cifar10_lossless_subset.npz") as z:
        xl, yl, il = z["x_train"], z["y_train"], z["train_index"]
    xs, ys, idx = [], [], []
    for part in ("cifar10_jpeg_train_part1.npz", "cifar10_jpeg_train_part2.npz"):
        with np.load(shared / part) as z:
            xs.append(z["x_train"]), ys.append(z["y_train"]), idx.append(z["train_index"])
    xj, yj, ij = np.concatenate(xs), np.concatenate(ys), np.concatenate(idx)
    assert np.array_equal(ij, np.arange(len(ij))), "JPEG train archives are not in the original order"
    assert np.array_equal(il, np.arange(len(il))) and np.array_equal(yj[: len(yl)], yl), "labels disagree"
    n = CIFAR_PER_CLASS["train"]
    sel = np.sort(np.concatenate([np.flatnonzero(yj == c)[:n] for c in CIFAR_CLASSES]))
    exact = sel < len(yl)
    x = np.where(exact[:, None, None, None], xl[np.minimum(sel, len(yl) - 1)], xj[sel])
    return {"x_train": x, "y_train": yj[sel].astype(np.int64), "index_train": sel.astype(np.int64),
            "source_train": np.where(exact, LOSSLESS, JPEG)}


def _cifar_test(shared: Path) -> dict[str, np.ndarray]:
    """First CIFAR_PER_CLASS test images of each class (ranks within the class), grouped by class.

    The JPEG test archive is grouped by class in original order within each class (its ``test_rank_in_class``);
    the lossless subset holds the first 1000 test images, i.e. ranks ``0 .. n_c - 1`` of each class ``c``.
    Original indices are known only for those (``index_test = -1`` for the others).
    """
    with np.load(shared / "cifar10_lossless_subset.npz") as z:
        xl, yl, il = z["x_test"], z["y_test"], z["test_index"]
    with np.load(shared / "cifar10_jpeg_test.npz") as z:
        xj, yj, rj = z["x_test"], z["y_test"], z["test_rank_in_class"]
    n = CIFAR_PER_CLASS["test"]
    x, y, index, rank, source = [], [], [], [], []
    for c in CIFAR_CLASSES:
        exact_pos = np.flatnonzero(yl == c)  # lossless images of class c, original order = ranks 0, 1, ...
        for r in range(n):
            (j,) = np.flatnonzero((yj == c) & (rj == r))
            if r < len(exact_pos):
                p = exact_pos[r]
                # the JPEG of rank r must be a lossy copy of the exact image of that rank (README: MAE ~ 6)
                assert np.abs(xj[j].astype(int) - xl[p].astype(int)).mean() < 20, (c, r)
                x.append(xl[p]), index.append(int(il[p])), source.append(LOSSLESS)
            else:
                x.append(xj[j]), index.append(-1), source.append(JPEG)
            y.append(c), rank.append(r)
    return {"x_test": np.stack(x), "y_test": np.array(y, np.int64), "index_test": np.array(index, np.int64),
            "rank_in_class_test": np.array(rank, np.int64), "source_test": np.array(source)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shared", default=str(HERE.parent.parent / "shared" / "data"))
    args = p.parse_args(argv)
    shared = Path(args.shared)
    manifest = {}
    for name, (src, n_train, n_test) in SIMPLE.items():
        path, entry = _simple(shared, name, src, n_train, n_test)
        manifest[path.name] = entry
    classes = list(CIFAR_CLASSES)
    train = _cifar_train(shared)
    for k, chunk in enumerate(np.array_split(np.arange(len(train["y_train"])), CIFAR_TRAIN_PARTS), start=1):
        out = {key: v[chunk] for key, v in train.items()}
        path = HERE / f"cifar10_small_train_part{k}.npz"
        _deterministic_npz(path, out)
        manifest[path.name] = _entry(
            path, out, "cifar10", "cifar10_lossless_subset.npz + cifar10_jpeg_train_part{1,2}.npz",
            f"part {k} of {CIFAR_TRAIN_PARTS} (original order) of the first {CIFAR_PER_CLASS['train']} train images "
            f"of each class {classes}: exact pixels for original indices < 4000, decoded JPEG otherwise", part=k)
    test = _cifar_test(shared)
    path = HERE / "cifar10_small_test.npz"
    _deterministic_npz(path, test)
    manifest[path.name] = _entry(
        path, test, "cifar10", "cifar10_lossless_subset.npz + cifar10_jpeg_test.npz",
        f"the first {CIFAR_PER_CLASS['test']} test images of each class {classes} (grouped by class): exact pixels "
        "for those among the first 1000 test images, decoded JPEG otherwise")
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
