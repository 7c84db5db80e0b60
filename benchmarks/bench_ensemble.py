"""Stacked ensemble training vs one model after the other.

100 FCNs 784-40-40-1 (``flatness.FCN``, Zhang et al.'s MNIST network) trained with SGD (lr 0.01, batch 32) on
500 bundled MNIST images (``source="embedded"``) for 20 epochs, by

- ``train_ensemble_to_zero_error`` (all models stacked, ``torch.func`` + ``vmap``, one generator per model), and
- the baseline: ``train_to_zero_error`` called once per model with the same seed.

Both do exactly 20 epochs: the labels are random coin flips, which no model fits in 20 epochs (the number of
models that did is printed; it should be 0). Model 0's parameters from both runs are compared (they follow the
same trajectory up to float rounding). Ratios are measured in the same process; on a shared machine the
absolute times are noisy.

Run: ``python benchmarks/bench_ensemble.py [--quick] [--device cuda] [--models 100] [--epochs 20]``.
``--quick``: 10 models, 2 epochs.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import machine_line, parser, peak_rss_mib, print_table, sync  # noqa: E402

from flatness.data import binary_task  # noqa: E402
from flatness.models import FCN  # noqa: E402
from flatness.train import train_ensemble_to_zero_error, train_to_zero_error  # noqa: E402


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=None, help="number of models (default 100; --quick 10)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 20; --quick 2)")
    p.add_argument("--n", type=int, default=500, help="training images")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    M = args.models or (10 if args.quick else 100)
    epochs = args.epochs or (2 if args.quick else 20)
    task = binary_task("mnist", args.n, n_test=0, seed=0, source="embedded")
    x = task.train[0].reshape(args.n, -1).to(device)
    y = torch.randint(0, 2, (args.n,), generator=torch.Generator().manual_seed(1)).to(device)  # unfittable
    models = [FCN((784, 40, 40, 1), seed=i).to(device) for i in range(M)]
    seeds = list(range(M))
    kw = dict(lr=0.01, batch_size=32, max_epochs=epochs)
    print(machine_line())
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"{M} x FCN 784-40-40-1, {args.n} MNIST images ({task.info['source']}), random labels, SGD lr 0.01 "
          f"batch 32, {epochs} epochs, device {device}, load average {load:.1f}")

    # warm-up (first-call costs: vmap tracing, allocator), not timed
    train_ensemble_to_zero_error(models[:2], (x, y), **{**kw, "max_epochs": 1}, seeds=seeds[:2])
    train_to_zero_error(models[0], (x, y), **{**kw, "max_epochs": 1}, seed=0)

    sync(device)
    t0 = time.perf_counter()
    ens = train_ensemble_to_zero_error(models, (x, y), **kw, seeds=seeds)
    sync(device)
    t_ens = time.perf_counter() - t0

    t0 = time.perf_counter()
    singles = [train_to_zero_error(m, (x, y), **kw, seed=s) for m, s in zip(models, seeds)]
    sync(device)
    t_seq = time.perf_counter() - t0

    fitted = sum(s == "converged" for s in ens.status) + sum(r.status == "converged" for r in singles)
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(ens.model(0).parameters(), singles[0].model.parameters()))
    steps = M * epochs * -(-args.n // 32)
    rows = [{"method": "one after the other (train_to_zero_error)", "seconds": t_seq, "model-steps/s": steps / t_seq},
            {"method": "stacked (train_ensemble_to_zero_error)", "seconds": t_ens, "model-steps/s": steps / t_ens},
            {"method": "ratio sequential / stacked", "seconds": t_seq / t_ens}]
    print_table(rows, f"{M} models x {epochs} epochs")
    print(f"speed-up x{t_seq / t_ens:.1f} (target >= 10); models that fitted the random labels: {fitted} "
          f"(should be 0); max |param diff| of model 0, stacked vs single: {diff:.2e}; "
          f"peak RSS {peak_rss_mib():.0f} MiB")
    print("(timings on a shared machine are noisy; the ratio is measured in the same run)")


if __name__ == "__main__":
    main()
