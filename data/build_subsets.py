"""Build the small real subsets committed under data/ from the full archives in ../shared/data/.

    python data/build_subsets.py [--shared ../shared/data]

Writes mnist_small.npz, fashion_mnist_small.npz, cifar10_small.npz and manifest.json (sha256, sizes,
provenance) beside this file. Deterministic: the same inputs give byte-identical outputs.
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

# name -> (source file, n_train, n_test, classes or None); the first images of the original order.
SUBSETS = {
    "mnist": ("mnist.npz", 4000, 1000, None),
    "fashion_mnist": ("fashion_mnist.npz", 3000, 1000, None),
    # exact pixels; airplane (0) and automobile (1) for Chen et al.'s 2-class VGG, automobile and cat (3)
    # for Zhang et al.'s car-vs-cat task: every such image of the lossless subset.
    "cifar10": ("cifar10_lossless_subset.npz", None, None, (0, 1, 3)),
}


def _deterministic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed but with fixed zip timestamps, so rebuilding gives identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shared", default=str(HERE.parent.parent / "shared" / "data"))
    args = p.parse_args(argv)
    shared = Path(args.shared)
    manifest = {}
    for name, (src, n_train, n_test, classes) in SUBSETS.items():
        with np.load(shared / src) as z:
            out = {}
            for split, n in (("train", n_train), ("test", n_test)):
                x, y = z[f"x_{split}"], z[f"y_{split}"]
                idx = np.arange(len(y)) if classes is None else np.flatnonzero(np.isin(y, classes))
                idx = idx[:n] if n is not None else idx
                out[f"x_{split}"], out[f"y_{split}"] = x[idx], y[idx].astype(np.int64)
                out[f"index_{split}"] = idx.astype(np.int64)  # position in the original order
        path = HERE / f"{name}_small.npz"
        _deterministic_npz(path, out)
        manifest[path.name] = {
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "bytes": path.stat().st_size,
            "source": src,
            "n_train": int(len(out["y_train"])),
            "n_test": int(len(out["y_test"])),
            "train_counts": np.bincount(out["y_train"], minlength=10).tolist(),
            "test_counts": np.bincount(out["y_test"], minlength=10).tolist(),
            "selection": ("first images of the original order" if classes is None
                          else f"every image of classes {list(classes)} in the source, original order"),
        }
        print(f"{path.name}: {manifest[path.name]['bytes'] / 2**20:.2f} MiB, sha256 {manifest[path.name]['sha256']}")
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
